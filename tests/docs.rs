//! The hand-written documentation (README.md, docs/*.md, config/argocd/README.md) names
//! commands, flags, environment variables, metrics, conditions and event reasons. These tests
//! check each against the code, so the docs cannot promise what the binary does not have.
//! (The reference pages docs/trainingjob.md and docs/gpuinstance.md are generated and checked in
//! src/api/docs.rs.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use gpu_trainer::api::{Reason, instance_condition, job_condition};
use gpu_trainer::cli::Cli;
use gpu_trainer::metrics::{
    ControllerLabels, ErrorLabels, KubeRequestLabels, Metrics, OutcomeLabels, PhaseLabels, ProviderLabels,
    ReasonLabels, SshOperationLabels, SweepLabels,
};
use regex::Regex;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `(path, text)` of every hand-written document.
fn documents() -> Vec<(String, String)> {
    let mut paths = vec![root().join("README.md"), root().join("config/argocd/README.md")];
    for name in ["operating.md", "tools.md", "troubleshooting.md"] {
        paths.push(root().join("docs").join(name));
    }
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.strip_prefix(root()).unwrap().display().to_string(), text)
        })
        .collect()
}

/// The code pieces of a Markdown text: lines of fenced blocks and inline code spans.
fn code_pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut fenced = false;
    let inline = Regex::new(r"`([^`]+)`").unwrap();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            pieces.push(line.to_string());
        } else {
            pieces.extend(inline.captures_iter(line).map(|c| c[1].to_string()));
        }
    }
    pieces
}

/// All source files of the crate and its tests and scripts, concatenated.
fn all_code() -> String {
    let mut out = String::new();
    for dir in ["src", "tests"] {
        for entry in walkdir::WalkDir::new(root().join(dir)).into_iter().filter_map(Result::ok) {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "rs" || e == "sh") {
                out.push_str(&std::fs::read_to_string(p).unwrap());
            }
        }
    }
    out.push_str(&std::fs::read_to_string(root().join("Dockerfile")).unwrap());
    out
}

fn long_flags(cmd: &clap::Command) -> BTreeSet<String> {
    let mut flags: BTreeSet<String> =
        cmd.get_arguments().filter_map(|a| a.get_long()).map(str::to_string).collect();
    flags.extend(["help".to_string(), "version".to_string()]);
    flags
}

/// Checks one command line that starts after `gpu-trainer `: subcommands exist, and every
/// `--flag` exists on the subcommand it is given to.
fn check_command(line: &str, errors: &mut Vec<String>, context: &str) {
    let root_cmd = Cli::command();
    let mut path = vec![root_cmd.clone()];
    let mut tokens = line.split_whitespace().peekable();
    while let Some(token) = tokens.peek() {
        let current = path.last().unwrap();
        // `dataset validate/pack` names two subcommands at once.
        let found: Option<Vec<&clap::Command>> =
            token.split('/').map(|alternative| current.find_subcommand(alternative)).collect();
        match found.and_then(|subs| subs.first().copied()) {
            Some(sub) => {
                path.push(sub.clone());
                tokens.next();
            }
            None => break,
        }
    }
    if path.last().unwrap().has_subcommands() && tokens.peek().is_some_and(|t| !t.starts_with('-')) {
        errors.push(format!("{context}: `gpu-trainer {line}`: no such subcommand"));
        return;
    }
    let mut known = BTreeSet::new();
    for (i, cmd) in path.iter().enumerate() {
        let global = cmd.get_arguments().filter(|a| a.is_global_set()).filter_map(|a| a.get_long());
        if i + 1 == path.len() {
            known.extend(long_flags(cmd));
        } else {
            known.extend(global.map(str::to_string));
        }
    }
    for token in tokens {
        if ["#", "|", "||", "&&", ";", "\\"].contains(&token)
            || token.starts_with('#')
            || token.starts_with('>')
        {
            break;
        }
        if let Some(flag) = token.strip_prefix("--") {
            let name = flag.split('=').next().unwrap_or_default();
            if !known.contains(name) {
                errors.push(format!("{context}: `gpu-trainer {line}`: no flag --{name}"));
            }
        }
    }
}

#[test]
fn gpu_trainer_commands_in_the_docs_exist() {
    // A command starts a code line or follows a shell separator or an environment assignment.
    let start = Regex::new(r"(?:^|[;&|(]\s*|\b[A-Z_]+=\S*\s+)(?:gpu-trainer|cargo run --) (.*)$").unwrap();
    let mut errors = Vec::new();
    let mut checked = 0;
    for (name, text) in documents() {
        for piece in code_pieces(&text) {
            let piece = piece.trim();
            if let Some(c) = start.captures(piece) {
                check_command(&c[1], &mut errors, &name);
                checked += 1;
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked > 20, "only {checked} commands found");
}

#[test]
fn flags_named_in_the_docs_exist() {
    fn all_flags(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        out.extend(long_flags(cmd));
        for sub in cmd.get_subcommands() {
            all_flags(sub, out);
        }
    }
    let mut known = BTreeSet::new();
    all_flags(&Cli::command(), &mut known);
    let alone = Regex::new(r"^--([a-z][a-z-]*)(=\S*)?$").unwrap();
    let mut errors = Vec::new();
    for (name, text) in documents() {
        for piece in code_pieces(&text) {
            if let Some(c) = alone.captures(piece.trim())
                && !known.contains(&c[1])
            {
                errors.push(format!("{name}: --{} is not a flag of gpu-trainer", &c[1]));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// The configuration table of docs/operating.md covers every flag of `gpu-trainer run`.
#[test]
fn operating_guide_lists_every_flag_of_run() {
    let guide = std::fs::read_to_string(root().join("docs/operating.md")).unwrap();
    let run = Cli::command().find_subcommand("run").expect("a run subcommand").clone();
    let missing: Vec<String> = long_flags(&run)
        .into_iter()
        .filter(|f| f != "help" && f != "version")
        .filter(|f| !guide.contains(&format!("| `--{f}` |")))
        .collect();
    assert!(missing.is_empty(), "docs/operating.md does not document: {missing:?}");
}

#[test]
fn environment_variables_in_the_docs_exist() {
    let code = all_code();
    let var = Regex::new(r"\b(?:GPU_TRAINER|VASTAI|AWS|POD|RUST)_[A-Z0-9_]*[A-Z0-9]\b").unwrap();
    let mut errors = BTreeSet::new();
    for (name, text) in documents() {
        for m in var.find_iter(&text) {
            if !code.contains(&format!("\"{}\"", m.as_str())) && !code.contains(m.as_str()) {
                errors.insert(format!("{name}: {} is not used by the code", m.as_str()));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.into_iter().collect::<Vec<_>>().join("\n"));
}

#[test]
fn metrics_in_the_docs_are_exported() {
    // Families are only described once they have a child: give each one.
    let m = Metrics::new();
    let controller = ControllerLabels { controller: "trainingjob" };
    m.reconcile_runs.get_or_create(&controller).inc();
    m.reconcile_errors.get_or_create(&ErrorLabels { controller: "trainingjob", category: "Kube" }).inc();
    m.reconcile_duration.get_or_create(&controller).observe(0.1);
    m.instances_by_phase.get_or_create(&PhaseLabels { phase: "Running" }).set(1);
    m.jobs_by_phase.get_or_create(&PhaseLabels { phase: "Training" }).set(1);
    m.job_duration.get_or_create(&PhaseLabels { phase: "Succeeded" }).observe(60.0);
    m.launches.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
    m.terminations.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
    m.orphans.get_or_create(&SweepLabels { action: "found" }).inc();
    let provider = ProviderLabels { operation: "list_instances", outcome: "success" };
    m.provider_requests.get_or_create(&provider).inc();
    m.provider_request_duration.get_or_create(&provider).observe(0.1);
    m.job_failures.get_or_create(&ReasonLabels { reason: "Stalled" }).inc();
    m.reconcile_abandoned("trainingjob", "poll");
    m.machine_verdicts.get_or_create(&ReasonLabels { reason: "MachineUnresponsive" }).inc();
    m.kube_requests
        .get_or_create(&KubeRequestLabels { verb: "patch", resource: "trainingjobs", subresource: "status" })
        .inc();
    gpu_trainer::metrics::TRANSPORT
        .ssh_operation_duration
        .get_or_create(&SshOperationLabels { operation: "run" })
        .observe(0.1);
    let exposition = m.encode();
    let metric = Regex::new(r"\bgputrainer_[a-z_]+").unwrap();
    let mut errors = BTreeSet::new();
    let mut seen = 0;
    for (name, text) in documents() {
        for m in metric.find_iter(&text) {
            seen += 1;
            let full = m.as_str();
            let base = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| full.strip_suffix(suffix))
                .unwrap_or(full);
            let counter = full.ends_with("_total");
            let declared = exposition.lines().any(|l| {
                l.strip_prefix("# TYPE ")
                    .and_then(|rest| rest.split_once(' '))
                    .is_some_and(|(n, kind)| n == base && (!counter || kind == "counter"))
            });
            if !declared {
                errors.insert(format!("{name}: {full} is not exported on /metrics"));
            }
        }
    }
    assert!(errors.is_empty(), "{}\n{exposition}", errors.into_iter().collect::<Vec<_>>().join("\n"));
    assert!(seen > 10);
}

#[test]
fn conditions_named_in_the_docs_exist() {
    let condition = Regex::new(r"condition `([A-Za-z]+)`").unwrap();
    let known: BTreeSet<&str> =
        job_condition::ALL.iter().chain(instance_condition::ALL).map(|(name, _)| *name).collect();
    let mut errors = Vec::new();
    for (name, text) in documents() {
        for c in condition.captures_iter(&text) {
            if !known.contains(&c[1]) {
                errors.push(format!("{name}: condition {} does not exist", &c[1]));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// The event table in troubleshooting.md and the events the code records name the same reasons.
#[test]
fn the_event_table_lists_exactly_the_recorded_event_reasons() {
    let text = std::fs::read_to_string(root().join("docs/troubleshooting.md")).unwrap();
    let table = text.split("## Events").nth(1).expect("troubleshooting.md has an Events section");
    let name = Regex::new(r"`([A-Za-z]+)`").unwrap();
    let documented: BTreeSet<String> = table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| {
            let first = l.split('|').nth(1).unwrap_or_default().to_string();
            name.captures_iter(&first).map(|c| c[1].to_string()).collect::<Vec<_>>()
        })
        .collect();

    // Event reasons in the code: `Reason::X` next to an EventType (events take a `Reason`).
    let code = all_code_in(&root().join("src"));
    let literal = Regex::new(r#"EventType::(?:Normal|Warning),\s*"([A-Za-z]+)""#).unwrap();
    let variant = Regex::new(r#"EventType::(?:Normal|Warning),\s*Reason::([A-Za-z]+)\b"#).unwrap();
    let field = Regex::new(r#"reason: Reason::([A-Za-z]+)\.as_str\(\)"#).unwrap();
    // The result store's events go through its `OutputEvents` port.
    let port = Regex::new(r#"events\s*\.(?:warning|normal)\(\s*Reason::([A-Za-z]+)\b"#).unwrap();
    let mut recorded: BTreeSet<String> = BTreeSet::new();
    for re in [&literal, &variant, &field, &port] {
        recorded.extend(re.captures_iter(&code).map(|c| c[1].to_string()));
    }
    assert!(recorded.len() > 15, "found only {recorded:?} in the code");
    let missing: Vec<&String> = recorded.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "event reasons recorded by the code but not in troubleshooting.md: {missing:?}"
    );
    // Reasons chosen at run time (`reason.as_str()`, `if .. { "Succeeded" } else { "Failed" }`)
    // are documented too; each must at least be a Reason or a string in the code.
    let reasons: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    for name in documented.difference(&recorded) {
        assert!(
            reasons.contains(name.as_str()) || code.contains(&format!("\"{name}\"")),
            "troubleshooting.md documents event {name}, which the code neither records nor has as a Reason"
        );
    }
}

fn all_code_in(dir: &Path) -> String {
    let mut out = String::new();
    for entry in walkdir::WalkDir::new(dir).into_iter().filter_map(Result::ok) {
        if entry.path().extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(entry.path()).unwrap());
        }
    }
    out
}

#[test]
fn readme_keeps_its_first_two_commands_and_links_the_docs() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block = readme.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).unwrap_or_default();
    let lines: Vec<&str> = block.lines().collect();
    assert!(lines.first().is_some_and(|l| l.starts_with("cargo run -- launch examples/quickstart.yaml")));
    assert!(lines.get(1).is_some_and(|l| l.starts_with("bash tests/run.sh")));
    for link in [
        "docs/trainingjob.md",
        "docs/gpuinstance.md",
        "docs/operating.md",
        "docs/tools.md",
        "docs/troubleshooting.md",
        "config/argocd/README.md",
    ] {
        assert!(readme.contains(&format!("({link}")), "README.md does not link {link}");
        assert!(root().join(link).is_file(), "{link} does not exist");
    }
}

/// `NAME=value` from `tests/env/versions.env`, where every tested version is pinned.
fn pinned_version(name: &str) -> String {
    let text = std::fs::read_to_string(root().join("tests/env/versions.env")).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("tests/env/versions.env does not pin {name}"))
        .trim()
        .to_string()
}

fn minor(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

#[test]
fn the_tested_kubernetes_range_is_stated_where_users_look() {
    let range = format!(
        "Kubernetes {} to {}",
        minor(&pinned_version("KUBE_OLDEST_VERSION")),
        minor(&pinned_version("KUBE_VERSION"))
    );
    for doc in ["README.md", "docs/operating.md", "charts/gpu-trainer/README.md"] {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        assert!(text.contains(&range), "{doc} does not state the tested range ({range})");
    }
    let chart = std::fs::read_to_string(root().join("charts/gpu-trainer/Chart.yaml")).unwrap();
    let wanted = format!("kubeVersion: \">={}.0-0\"", minor(&pinned_version("KUBE_OLDEST_VERSION")));
    assert!(chart.contains(&wanted), "Chart.yaml's kubeVersion is not {wanted}");
}
