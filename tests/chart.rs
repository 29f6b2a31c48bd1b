//! The Helm chart (`charts/gpu-trainer`) and the kustomize base (`config/default`) install the same
//! operator, and both match the binary.
//!
//! Plain tests (no environment) read the kustomize base, the CRD copies and the chart's sources:
//! - the CRDs in the chart and in the kustomize base are byte-identical to `crds/`;
//! - the kustomize objects live in its namespace and refer to each other;
//! - every flag and environment variable of its Deployment is one `gpu-trainer run` reads (its
//!   own argument parser accepts the arguments), with the binary's own defaults;
//! - credentials come only from Secrets and the pod is locked down;
//! - every `.Values.x` a template uses exists in `values.yaml`, and every value is used.
//!
//! With the real Helm 3 and Helm 4 CLIs of `tests/env/` (modules `helm3` and `helm4`, ignored
//! without the environment; each test runs once per Helm):
//! - `helm lint --strict` passes with the default values, with every option on
//!   (`tests/fixtures/chart/all-options.yaml`) and with every optional object off;
//! - `helm template` with the default values renders exactly the objects of `config/default`
//!   (same names, specs, RBAC rules, arguments and environment; Helm only adds labels), so the
//!   plain checks above hold for the chart's defaults too;
//! - with every option on, each value reaches the flag, variable or field it is for, the binary
//!   parses the arguments and the environment, credentials still come only from Secrets, the pod
//!   is still locked down, and the alerts use metrics the operator exports; with every optional
//!   object off only the Deployment and the Service remain;
//! - `values.schema.json`, as Helm applies it, refuses broken values with an error naming the
//!   field;
//! - the API server accepts every rendering, CRDs included, in a server-side dry run with strict
//!   field validation. ServiceMonitor and PrometheusRule are checked against minimal CRDs that
//!   this file installs: the subset of prometheus-operator's `monitoring.coreos.com/v1` schemas
//!   the chart uses (field names, types, the duration pattern), without unknown fields, so a
//!   misspelt field is refused.
//!
//! `tests/helm_e2e.rs` installs the chart with Helm and runs a job with its ServiceAccount;
//! `tests/rbac_e2e.rs` shows that every permission of the kustomize base (the chart's default
//! RBAC, as checked here) is needed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use common::helm::{Helm, chart_dir, documents};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kustomize() -> PathBuf {
    root().join("config/default")
}

fn all_options_values() -> PathBuf {
    root().join("tests/fixtures/chart/all-options.yaml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

/// The one object of `kind_` among `objects`.
fn only<'a>(objects: &'a [Value], kind_: &str, what: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|v| kind(v) == kind_).collect();
    assert_eq!(found.len(), 1, "{what}: expected one {kind_}, found {}", found.len());
    found[0]
}

fn kinds(objects: &[Value]) -> BTreeSet<&str> {
    objects.iter().map(kind).collect()
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn args(deployment: &Value) -> Vec<String> {
    container(deployment)["args"]
        .as_sequence()
        .expect("container args")
        .iter()
        .map(|a| a.as_str().expect("string args").to_string())
        .collect()
}

/// The container's environment: name → the entry (`value` or `valueFrom`).
fn env(deployment: &Value) -> BTreeMap<String, Value> {
    container(deployment)["env"]
        .as_sequence()
        .expect("container env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

fn env_value(deployment: &Value, name: &str) -> Option<String> {
    env(deployment).get(name).and_then(|e| e["value"].as_str().map(String::from))
}

// ---------------------------------------------------------------------------------------------
// The kustomize base

fn yaml_files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), read(&p)))
        .collect()
}

/// The objects `kubectl apply -k config/default` creates (resources listed in
/// kustomization.yaml, which must all be local files) and the namespace it sets.
fn kustomize_objects() -> (String, Vec<Value>) {
    let kustomization: Value = serde_yaml::from_str(&read(&kustomize().join("kustomization.yaml"))).unwrap();
    let namespace = kustomization["namespace"].as_str().expect("kustomization sets namespace").to_string();
    let mut out = Vec::new();
    let mut listed = BTreeSet::new();
    for resource in kustomization["resources"].as_sequence().expect("resources") {
        let file = resource.as_str().unwrap();
        assert!(!file.contains(".."), "{file}: kustomize refuses files outside config/default by default");
        listed.insert(file.to_string());
        out.extend(documents(&read(&kustomize().join(file)), file));
    }
    for crd in yaml_files(&kustomize().join("crds")).keys() {
        assert!(listed.contains(&format!("crds/{crd}")), "kustomization.yaml does not list crds/{crd}");
    }
    (namespace, out)
}

fn kustomize_object(kind_: &str, name_: &str) -> Value {
    let (_, objects) = kustomize_objects();
    objects
        .into_iter()
        .find(|v| kind(v) == kind_ && name(v) == name_)
        .unwrap_or_else(|| panic!("config/default has no {kind_} {name_}"))
}

fn kustomize_deployment() -> Value {
    kustomize_object("Deployment", "gpu-trainer")
}

#[test]
fn chart_and_kustomize_crds_are_identical_to_crds() {
    let generated = yaml_files(&root().join("crds"));
    assert_eq!(generated.len(), 2, "crds/ holds the two CRDs");
    for copy in [chart_dir().join("crds"), kustomize().join("crds")] {
        let files = yaml_files(&copy);
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            generated.keys().collect::<Vec<_>>(),
            "{} must hold the same files as crds/",
            copy.display()
        );
        for (name, text) in &files {
            assert!(
                text == &generated[name],
                "{}/{name} differs from crds/{name}; after `cargo run -- crd --output-dir crds` run \
                 `cp crds/*.yaml charts/gpu-trainer/crds/ && cp crds/*.yaml config/default/crds/`",
                copy.display()
            );
        }
    }
}

/// Namespaced objects live in `namespace`; bindings bind existing roles to the ServiceAccount
/// the pod runs as; the Service selects the pod.
fn check_references(objects: &[Value], namespace: &str, what: &str) {
    let cluster_scoped = ["Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"];
    for object in objects {
        let ns = object["metadata"]["namespace"].as_str();
        if cluster_scoped.contains(&kind(object)) {
            assert_eq!(ns, None, "{what}: {} {} is cluster-scoped", kind(object), name(object));
        } else {
            assert_eq!(ns, Some(namespace), "{what}: {} {}", kind(object), name(object));
        }
    }
    let deployment: Deployment = serde_yaml::from_value(only(objects, "Deployment", what).clone()).unwrap();
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    let account = pod.service_account_name.clone().expect("the pod names its ServiceAccount");
    if objects.iter().any(|o| kind(o) == "ServiceAccount") {
        assert_eq!(name(only(objects, "ServiceAccount", what)), account, "{what}: the pod's ServiceAccount");
    }
    for (binding, role_kind) in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")] {
        for object in objects.iter().filter(|o| kind(o) == binding) {
            assert_eq!(object["roleRef"]["kind"], role_kind, "{what}");
            let role = object["roleRef"]["name"].as_str().unwrap();
            assert!(objects.iter().any(|o| kind(o) == role_kind && name(o) == role), "{what}: {role}");
            let subject = &object["subjects"][0];
            assert_eq!(subject["kind"], "ServiceAccount", "{what}");
            assert_eq!(subject["name"].as_str(), Some(account.as_str()), "{what}: {binding} subject");
            assert_eq!(subject["namespace"].as_str(), Some(namespace), "{what}: {binding} subject");
        }
    }
    let service = only(objects, "Service", what);
    let pod_labels = deployment.spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let selector = deployment.spec.selector.match_labels.clone().unwrap();
    let selector = serde_yaml::to_value(&selector).unwrap();
    for (k, v) in
        service["spec"]["selector"].as_mapping().unwrap().iter().chain(selector.as_mapping().unwrap())
    {
        assert_eq!(
            pod_labels.get(k.as_str().unwrap()).map(String::as_str),
            v.as_str(),
            "{what}: selector {k:?} does not select the pod"
        );
    }
}

#[test]
fn kustomize_objects_live_in_its_namespace_and_refer_to_each_other() {
    let (namespace, objects) = kustomize_objects();
    assert!(objects.iter().any(|o| kind(o) == "Namespace" && name(o) == namespace));
    check_references(&objects, &namespace, "config/default");
}

// ---------------------------------------------------------------------------------------------
// What the binary reads

/// `gpu-trainer run`'s flags: long name → (env var, default value).
fn run_flags() -> BTreeMap<String, (Option<String>, Option<String>)> {
    let command = gpu_trainer::cli::Cli::command();
    let run = command.find_subcommand("run").expect("`gpu-trainer run` exists");
    run.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            let default = a.get_default_values().first().map(|d| d.to_string_lossy().into_owned());
            Some((format!("--{long}"), (env, default)))
        })
        .collect()
}

/// All Rust sources, to check that an environment variable is really read by the code.
fn sources() -> String {
    let mut text = String::new();
    for entry in walkdir::WalkDir::new(root().join("src")) {
        let entry = entry.unwrap();
        if entry.path().extension().is_some_and(|x| x == "rs") {
            text.push_str(&read(entry.path()));
        }
    }
    text
}

/// The container runs `gpu-trainer run` with flags the binary has (its own parser accepts the
/// arguments) and variables it reads; the provider variables parse.
fn check_settings_are_read_by_the_binary(deployment: &Value, what: &str) {
    let args = args(deployment);
    assert_eq!(args[0], "run", "{what}: the container runs `gpu-trainer run`");
    let flags = run_flags();
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        assert!(flags.contains_key(flag), "{what}: `gpu-trainer run` has no flag {flag}");
    }
    if let Err(e) =
        gpu_trainer::cli::Cli::try_parse_from(std::iter::once("gpu-trainer".to_string()).chain(args))
    {
        panic!("{what}: `gpu-trainer` refuses the container's arguments: {e}");
    }
    let flag_envs: BTreeSet<String> = flags.values().filter_map(|(env, _)| env.clone()).collect();
    let sources = sources();
    let env = env(deployment);
    for name in env.keys() {
        // RUST_LOG is read by tracing-subscriber's EnvFilter::try_from_default_env.
        let read_by_code = flag_envs.contains(name)
            || sources.contains(&format!("\"{name}\""))
            || (name == "RUST_LOG" && sources.contains("try_from_default_env"));
        assert!(read_by_code, "{what}: environment variable {name} is not read by the binary");
    }
    let lookup = |name: &str| match name {
        "VASTAI_API_KEY" => Some("from-the-secret".to_string()),
        _ => env.get(name).and_then(|e| e["value"].as_str().map(String::from)),
    };
    if let Err(e) = gpu_trainer::provider::config::ProviderConfig::from_lookup(lookup) {
        panic!("{what}: the binary refuses the provider settings: {e}");
    }
}

#[test]
fn kustomize_settings_are_flags_and_variables_the_binary_reads() {
    check_settings_are_read_by_the_binary(&kustomize_deployment(), "config/default");
}

#[test]
fn kustomize_defaults_are_the_binarys_defaults() {
    let flags = run_flags();
    let deployment = kustomize_deployment();
    for arg in &args(&deployment)[1..] {
        let (flag, value) =
            arg.split_once('=').unwrap_or_else(|| panic!("config/default: {arg} has no value"));
        let (_, default) = &flags[flag];
        if flag == "--leader-elect" {
            // One replica: no election (the binary's default is on, for several replicas).
            assert_eq!(value, "false");
            continue;
        }
        assert_eq!(Some(value), default.as_deref(), "config/default passes {flag}={value}, not the default");
    }
    assert_eq!(deployment["spec"]["replicas"], 1, "one replica, as the chart's default");

    // Provider and S3 settings: the binary's defaults.
    use gpu_trainer::provider::config as provider;
    let env_defaults = [
        ("VASTAI_API_BASE_URL", provider::DEFAULT_BASE_URL.to_string()),
        ("VASTAI_PREFERRED_GPUS", String::new()),
        ("VASTAI_MAX_BID_PER_HOUR", provider::DEFAULT_MAX_BID_PER_HOUR.to_string()),
        ("VASTAI_MIN_VRAM_GB", provider::DEFAULT_MIN_VRAM_GB.to_string()),
        ("VASTAI_DEFAULT_DISK_GB", provider::DEFAULT_DISK_GB.to_string()),
        ("AWS_ENDPOINT_URL_S3", String::new()),
        ("AWS_REGION", String::new()),
        ("GPU_TRAINER_S3_FORCE_PATH_STYLE", "false".into()),
    ];
    for (name, default) in env_defaults {
        assert_eq!(env_value(&deployment, name), Some(default), "config/default {name}");
    }
}

/// Everything that looks like a credential comes from a Secret; `expected` are those variables.
fn check_credentials_come_only_from_secrets(deployment: &Value, what: &str, expected: &[&str]) {
    let secret_like = regex::Regex::new(r"(?i)(key|secret|token|password)").unwrap();
    for arg in args(deployment) {
        assert!(!secret_like.is_match(&arg), "{what}: argument {arg} looks like a credential");
    }
    let mut from_secrets = BTreeSet::new();
    for (name, entry) in env(deployment) {
        if secret_like.is_match(&name) {
            assert!(entry.get("value").is_none(), "{what}: {name} must come from a Secret, not a value");
            assert!(entry["valueFrom"]["secretKeyRef"]["name"].is_string(), "{what}: {name} from a Secret");
            from_secrets.insert(name);
        }
    }
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    assert_eq!(from_secrets, expected, "{what}: credentials");
}

const ALL_CREDENTIALS: [&str; 4] =
    ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "VASTAI_API_KEY"];

#[test]
fn kustomize_credentials_come_only_from_secrets() {
    check_credentials_come_only_from_secrets(&kustomize_deployment(), "config/default", &ALL_CREDENTIALS);
}

/// Non-root, read-only root filesystem, no privilege escalation, no capabilities, resource
/// requests, probes on the metrics port, /tmp the only writable place; one replica never overlaps
/// its successor, several elect a leader.
fn check_locked_down(deployment: &Value, what: &str) {
    let deployment: Deployment = serde_yaml::from_value(deployment.clone()).unwrap();
    // Required since Kubernetes 1.37's types (k8s-openapi `v1_37`): no longer an Option.
    let spec = deployment.spec;
    let replicas = spec.replicas.unwrap_or(1);
    let strategy = spec.strategy.unwrap().type_.unwrap();
    let pod = spec.template.spec.unwrap();
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap();
    if replicas == 1 {
        assert_eq!(strategy, "Recreate", "{what}: one replica without election must not overlap");
        assert!(args.contains(&"--leader-elect=false".to_string()), "{what}: {args:?}");
    } else {
        assert_eq!(strategy, "RollingUpdate", "{what}");
        assert!(args.contains(&"--leader-elect=true".to_string()), "{what}: {args:?}");
    }
    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true), "{what}: runAsNonRoot");
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true), "{what}");
    assert_eq!(security.allow_privilege_escalation, Some(false), "{what}");
    assert_eq!(security.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]), "{what}");
    let resources = container.resources.clone().unwrap();
    assert!(
        resources.requests.as_ref().is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
        "{what}: resource requests"
    );
    assert!(resources.limits.as_ref().is_some_and(|r| r.contains_key("memory")), "{what}: memory limit");
    let port =
        container.ports.as_ref().unwrap().iter().find(|p| p.name.as_deref() == Some("metrics")).unwrap();
    assert_eq!(port.container_port, 8080, "{what}");
    assert!(args.contains(&"--metrics-addr=0.0.0.0:8080".to_string()), "{what}");
    for (probe, path) in [(&container.liveness_probe, "/healthz"), (&container.readiness_probe, "/readyz")] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path), "{what}");
        assert_eq!(serde_json::to_value(&get.port).unwrap(), "metrics", "{what}");
    }
    let mounts = container.volume_mounts.clone().unwrap();
    assert_eq!(mounts.len(), 1, "{what}: only /tmp is writable");
    assert_eq!(mounts[0].mount_path, "/tmp", "{what}");
    let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == mounts[0].name).unwrap();
    assert!(volume.empty_dir.is_some(), "{what}: /tmp is an emptyDir");
}

#[test]
fn the_kustomize_pod_is_locked_down_and_probed_on_the_metrics_port() {
    check_locked_down(&kustomize_deployment(), "config/default");
}

// ---------------------------------------------------------------------------------------------
// The chart's sources

fn values() -> Value {
    serde_yaml::from_str(&read(&chart_dir().join("values.yaml"))).expect("values.yaml is YAML")
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.as_mapping()?.get(key))
}

/// `.Values.a.b` references in all templates (including `_helpers.tpl` and NOTES.txt).
fn values_references() -> BTreeSet<String> {
    let re = regex::Regex::new(r"\.Values((?:\.[A-Za-z0-9_]+)+)").unwrap();
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(chart_dir().join("templates")).unwrap() {
        let text = read(&entry.unwrap().path());
        for cap in re.captures_iter(&text) {
            out.insert(cap[1].trim_start_matches('.').to_string());
        }
    }
    out
}

#[test]
fn every_value_used_by_a_template_exists_and_every_value_is_used() {
    let values = values();
    let references = values_references();
    for path in &references {
        assert!(lookup(&values, path).is_some(), "templates use .Values.{path}, which values.yaml lacks");
    }
    fn leaves(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v.as_mapping() {
            Some(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = k.as_str().unwrap();
                    let path = if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
                    leaves(&path, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut all = Vec::new();
    leaves("", &values, &mut all);
    for leaf in all {
        let used = references.iter().any(|r| leaf == *r || leaf.starts_with(&format!("{r}.")));
        assert!(used, "values.yaml has {leaf}, which no template uses");
    }
}

// ---------------------------------------------------------------------------------------------
// Monitoring

/// Series names the operator exports: counters as `_total`, histograms as `_bucket`, `_sum`
/// and `_count`. A labelled family appears only once it has a child, so each gets one.
fn exported_series() -> BTreeSet<String> {
    use gpu_trainer::metrics::*;
    let m = Metrics::new();
    let controller = ControllerLabels { controller: "x" };
    let outcome = OutcomeLabels { outcome: "x" };
    let phase = PhaseLabels { phase: "x" };
    let provider = ProviderLabels { operation: "x", outcome: "x" };
    m.reconcile_runs.get_or_create(&controller).inc();
    m.reconcile_errors.get_or_create(&ErrorLabels { controller: "x", category: "x" }).inc();
    m.reconcile_duration.get_or_create(&controller).observe(1.0);
    m.instances_by_phase.get_or_create(&phase).set(0);
    m.launches.get_or_create(&outcome).inc();
    m.terminations.get_or_create(&outcome).inc();
    m.orphans.get_or_create(&SweepLabels { action: "x" }).inc();
    m.provider_requests.get_or_create(&provider).inc();
    m.provider_request_duration.get_or_create(&provider).observe(1.0);
    m.jobs_by_phase.get_or_create(&phase).set(0);
    m.job_duration.get_or_create(&phase).observe(1.0);
    m.job_failures.get_or_create(&ReasonLabels { reason: "x" }).inc();
    let text = m.encode();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, type_) = rest.split_once(' ').unwrap();
        match type_ {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// The rendered alerts use metric names and label values the operator really exports.
fn check_alerts(rule: &Value, what: &str) {
    let exported = exported_series();
    assert!(exported.contains("gputrainer_hourly_spend_dollars"), "{exported:?}");
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().unwrap();
    let alerts: BTreeSet<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for wanted in [
        "GpuTrainerTerminationStuck",
        "GpuTrainerOrphansFound",
        "GpuTrainerSpendRateHigh",
        "GpuTrainerJobsStalled",
    ] {
        assert!(alerts.contains(wanted), "{what}: alert {wanted} missing");
    }
    let metric = regex::Regex::new(r"gputrainer_[a-z_]+").unwrap();
    let matcher = regex::Regex::new(r#"([a-z_]+)=~?"([^"]+)""#).unwrap();
    let sources = sources();
    for r in rules {
        let expr = r["expr"].as_str().unwrap();
        let names: Vec<&str> = metric.find_iter(expr).map(|m| m.as_str()).collect();
        assert!(!names.is_empty(), "{expr}");
        for name in names {
            assert!(
                exported.contains(name),
                "{what}: alert {:?} uses {name}, which the operator does not export",
                r["alert"]
            );
        }
        for cap in matcher.captures_iter(expr) {
            for value in cap[2].split('|') {
                assert!(
                    sources.contains(&format!("{}: \"{value}\"", &cap[1])),
                    "{what}: alert {:?}: no metric is labelled {}=\"{value}\" in src/",
                    r["alert"],
                    &cap[1]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RBAC

/// Permissions as (apiGroup, resource, resourceName or "*", verb), so that how rules are grouped
/// does not matter.
fn permissions(rules: &Value, what: &str) -> BTreeSet<(String, String, String, String)> {
    let rules: Vec<PolicyRule> =
        serde_yaml::from_value(rules.clone()).unwrap_or_else(|e| panic!("{what}: rules: {e}"));
    let mut out = BTreeSet::new();
    for rule in rules {
        let names = rule.resource_names.clone().unwrap_or_else(|| vec!["*".into()]);
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for name in &names {
                    for verb in &rule.verbs {
                        assert_ne!(verb, "*", "{what}: no wildcard verbs");
                        assert_ne!(resource, "*", "{what}: no wildcard resources");
                        out.insert((group.clone(), resource.clone(), name.clone(), verb.clone()));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn kustomize_reads_secrets_by_name_only() {
    let cluster = permissions(&kustomize_object("ClusterRole", "gpu-trainer")["rules"], "ClusterRole");
    for verb in ["list", "watch", "update", "patch", "delete"] {
        assert!(!cluster.contains(&("".into(), "secrets".into(), "*".into(), verb.into())), "secrets {verb}");
    }
}

// ---------------------------------------------------------------------------------------------
// With Helm 3 and Helm 4

/// `helm lint --strict` with the default values, every option on, and every optional object off,
/// for the Kubernetes release the tests run; a release older than the chart's `kubeVersion` is
/// refused.
fn lint_strict_passes(helm: &Helm) {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let kube = common::helm::kube_version();
    let all = all_options_values();
    let sets = minimal_sets();
    let mut minimal = vec!["lint", "--strict", chart, "--kube-version", &kube];
    minimal.extend(sets.iter().map(String::as_str));
    for args in [
        vec!["lint", "--strict", chart, "--kube-version", &kube],
        vec!["lint", "--strict", chart, "--kube-version", &kube, "--values", all.to_str().unwrap()],
        minimal,
    ] {
        helm.ok(&args);
    }
    let chart_yaml: Value = serde_yaml::from_str(&read(&chart_dir().join("Chart.yaml"))).unwrap();
    let wanted = chart_yaml["kubeVersion"].as_str().expect("Chart.yaml sets kubeVersion");
    // The minor below the oldest the chart accepts (`>=1.M.0-0`).
    let minor: u32 = wanted.trim_start_matches(">=1.").split('.').next().unwrap().parse().unwrap();
    let too_old = format!("1.{}.0", minor - 1);
    let error = helm.fails(&["template", "x", chart, "--kube-version", &too_old]);
    assert!(
        error.contains(wanted),
        "helm {}: Kubernetes {too_old} should be refused ({wanted}): {error}",
        helm.major
    );
}

/// Every object of config/default but the Namespace and the CRDs (`helm template` leaves CRDs
/// out; `--include-crds` adds them, and they are the same files).
fn kustomize_objects_but_namespace_and_crds() -> (String, Vec<Value>) {
    let (namespace, objects) = kustomize_objects();
    let objects = objects
        .into_iter()
        .filter(|o| !["Namespace", "CustomResourceDefinition"].contains(&kind(o)))
        .collect();
    (namespace, objects)
}

fn identity(v: &Value) -> (String, String, String) {
    (
        kind(v).to_string(),
        name(v).to_string(),
        v["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
    )
}

/// `helm template gpu-trainer -n gpu-trainer-system` is config/default, object for object and
/// field for field; Helm may only add labels.
fn default_rendering_is_the_kustomize_base(helm: &Helm) {
    let (namespace, kustomize) = kustomize_objects_but_namespace_and_crds();
    let rendered = helm.template("gpu-trainer", &namespace, &[]);
    let what = format!("helm {} template (default values)", helm.major);
    let ids = |objects: &[Value]| objects.iter().map(identity).collect::<BTreeSet<_>>();
    assert_eq!(ids(&rendered), ids(&kustomize), "{what}: objects differ from config/default");
    for expected in &kustomize {
        let actual = rendered.iter().find(|o| identity(o) == identity(expected)).unwrap();
        let (mut a, mut e) = (actual.clone(), expected.clone());
        let a_labels = a["metadata"].as_mapping_mut().unwrap().remove("labels").unwrap_or_default();
        let e_labels = e["metadata"].as_mapping_mut().unwrap().remove("labels").unwrap_or_default();
        for (k, v) in e_labels.as_mapping().into_iter().flatten() {
            assert_eq!(
                a_labels.get(k),
                Some(v),
                "{what}: {:?} lacks config/default's label {k:?}",
                identity(actual)
            );
        }
        assert!(
            a == e,
            "{what}: {:?} differs from config/default:\n--- chart\n{}--- config/default\n{}",
            identity(actual),
            serde_yaml::to_string(&a).unwrap(),
            serde_yaml::to_string(&e).unwrap()
        );
    }
    // So the checks of config/default hold for the chart's defaults; run them on the rendering too.
    let deployment = only(&rendered, "Deployment", &what);
    check_references(&rendered, &namespace, &what);
    check_settings_are_read_by_the_binary(deployment, &what);
    check_credentials_come_only_from_secrets(deployment, &what, &ALL_CREDENTIALS);
    check_locked_down(deployment, &what);
    // And the rendered labels are the chart's.
    let labels = &deployment["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{what}");
    assert_eq!(labels["helm.sh/chart"], "gpu-trainer-0.1.0", "{what}");
}

/// Every option on: each value reaches its flag, variable or field.
fn all_options_reach_the_objects(helm: &Helm) {
    let all = all_options_values();
    let rendered = helm.template("ops", "operators", &["--values", all.to_str().unwrap()]);
    let what = format!("helm {} template (tests/fixtures/chart/all-options.yaml)", helm.major);
    let expected_kinds = [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "PrometheusRule",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ];
    assert_eq!(kinds(&rendered), expected_kinds.into_iter().collect(), "{what}: kinds");
    assert_eq!(rendered.len(), expected_kinds.len(), "{what}: one object of each kind");
    check_references(&rendered, "operators", &what);
    for object in &rendered {
        // nameOverride: the release name plus `trainer`; the ServiceAccount has its own name.
        let expected = if kind(object) == "ServiceAccount" { "trainer-account" } else { "ops-trainer" };
        assert!(name(object).starts_with(expected), "{what}: {} {}", kind(object), name(object));
        assert_eq!(object["metadata"]["labels"]["app.kubernetes.io/name"], "trainer", "{what}");
        assert_eq!(object["metadata"]["labels"]["app.kubernetes.io/instance"], "ops", "{what}");
    }

    let deployment = only(&rendered, "Deployment", &what);
    assert_eq!(
        args(deployment),
        [
            "run",
            "--metrics-addr=0.0.0.0:8080",
            "--log-format=pretty",
            "--leader-elect=true",
            "--sweep-interval-seconds=30",
            "--sweep-grace-seconds=300",
            "--remote-base=/data/gputrainer",
            "--boot-timeout-seconds=1200",
            "--liveness-poll-seconds=30",
            "--boot-poll-seconds=2",
            "--fast-poll-seconds=3",
            "--create-pending-grace-seconds=90",
            "--termination-stuck-seconds=900",
            "--sweep-dry-run",
            "--installation-id=0a1b2c3d",
            "--namespace=training",
            "--tools-dir=/etc/gpu-trainer/tools",
            "--allow-private-endpoints",
        ],
        "{what}: arguments"
    );
    check_settings_are_read_by_the_binary(deployment, &what);
    check_credentials_come_only_from_secrets(deployment, &what, &ALL_CREDENTIALS);
    check_locked_down(deployment, &what);
    let env = env(deployment);
    let secret_ref = |name: &str| {
        let r = &env[name]["valueFrom"]["secretKeyRef"];
        (
            r["name"].as_str().unwrap().to_string(),
            r["key"].as_str().unwrap().to_string(),
            r["optional"].as_bool(),
        )
    };
    assert_eq!(secret_ref("VASTAI_API_KEY"), ("marketplace-key".into(), "token".into(), None), "{what}");
    for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"] {
        assert_eq!(secret_ref(key), ("r2-credentials".into(), key.into(), Some(true)), "{what}: {key}");
    }
    for (name, value) in [
        ("VASTAI_API_BASE_URL", "https://vast.example.com"),
        ("VASTAI_PREFERRED_GPUS", "RTX 4090,A100"),
        ("VASTAI_MAX_BID_PER_HOUR", "2.25"),
        ("VASTAI_MIN_VRAM_GB", "40"),
        ("VASTAI_DEFAULT_DISK_GB", "100"),
        ("AWS_ENDPOINT_URL_S3", "https://0123abcd.r2.cloudflarestorage.com"),
        ("AWS_REGION", "auto"),
        ("GPU_TRAINER_S3_FORCE_PATH_STYLE", "true"),
        ("RUST_LOG", "info,gpu_trainer=debug"),
    ] {
        assert_eq!(env_value(deployment, name).as_deref(), Some(value), "{what}: {name}");
    }
    // What the binary makes of them.
    let provider = gpu_trainer::provider::config::ProviderConfig::from_lookup(|name| match name {
        "VASTAI_API_KEY" => Some("from-the-secret".into()),
        _ => env_value(deployment, name),
    })
    .unwrap();
    assert_eq!(provider.base_url.as_str(), "https://vast.example.com/", "{what}");
    assert_eq!(provider.preferred_gpus, ["RTX 4090", "A100"], "{what}");
    assert_eq!((provider.max_bid_per_hour, provider.min_vram_gb, provider.default_disk_gb), (2.25, 40, 100));

    let values: Value = serde_yaml::from_str(&read(&all)).unwrap();
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    assert_eq!(spec["replicas"], 2, "{what}");
    assert_eq!(container(deployment)["image"], "registry.example.com/ml/gpu-trainer:9.9.9", "{what}");
    assert_eq!(container(deployment)["imagePullPolicy"], "Always", "{what}");
    assert_eq!(pod["serviceAccountName"], "trainer-account", "{what}");
    for (field, value) in [
        (&pod["imagePullSecrets"], &values["imagePullSecrets"]),
        (&pod["nodeSelector"], &values["nodeSelector"]),
        (&pod["tolerations"], &values["tolerations"]),
        (&pod["affinity"], &values["affinity"]),
        (&pod["priorityClassName"], &values["priorityClassName"]),
        (&pod["securityContext"], &values["podSecurityContext"]),
        (&container(deployment)["securityContext"], &values["securityContext"]),
        (&container(deployment)["resources"], &values["resources"]),
        (&spec["template"]["metadata"]["annotations"], &values["podAnnotations"]),
        (&spec["template"]["metadata"]["labels"]["team"], &values["podLabels"]["team"]),
    ] {
        assert_eq!(field, value, "{what}: the pod does not carry the value");
    }
    let account = only(&rendered, "ServiceAccount", &what);
    assert_eq!(account["metadata"]["annotations"], values["serviceAccount"]["annotations"], "{what}");

    // RBAC: config/default's, without reading kube-system (the installation id is given).
    let kube_system =
        ("".to_string(), "namespaces".to_string(), "kube-system".to_string(), "get".to_string());
    let mut expected =
        permissions(&kustomize_object("ClusterRole", "gpu-trainer")["rules"], "config/default");
    assert!(expected.remove(&kube_system));
    let cluster_role = only(&rendered, "ClusterRole", &what);
    assert_eq!(permissions(&cluster_role["rules"], &what), expected, "{what}: ClusterRole");
    let role = only(&rendered, "Role", &what);
    assert_eq!(
        permissions(&role["rules"], &what),
        permissions(&kustomize_object("Role", "gpu-trainer-leader-election")["rules"], "config/default"),
        "{what}: leader-election Role"
    );

    let service = only(&rendered, "Service", &what);
    assert_eq!(service["spec"]["type"], "NodePort", "{what}");
    assert_eq!(service["spec"]["ports"][0]["port"], 9090, "{what}");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics", "{what}");

    let monitor = only(&rendered, "ServiceMonitor", &what);
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus", "{what}");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(
        (&endpoint["port"], &endpoint["path"], &endpoint["interval"]),
        (&Value::from("metrics"), &Value::from("/metrics"), &Value::from("15s"))
    );
    let rule = only(&rendered, "PrometheusRule", &what);
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus", "{what}");
    check_alerts(rule, &what);
    let spend = rule["spec"]["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "GpuTrainerSpendRateHigh")
        .unwrap();
    assert_eq!(spend["expr"], "max(gputrainer_hourly_spend_dollars) > 12.5", "{what}");
}

/// `--set` arguments that turn every optional object off.
fn minimal_sets() -> Vec<String> {
    [
        "--set",
        "rbac.create=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=existing-account",
        "--set-string",
        "s3.existingSecret=",
        "--set",
        "fullnameOverride=trainer",
    ]
    .map(String::from)
    .to_vec()
}

/// Every optional object off: the Deployment and its Service only, run as an existing account,
/// and no S3 credentials looked for.
fn optional_objects_can_be_left_out(helm: &Helm) {
    let sets = minimal_sets();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let rendered = helm.template("ops", "operators", &sets);
    let what = format!("helm {} template (optional objects off)", helm.major);
    assert_eq!(kinds(&rendered), BTreeSet::from(["Deployment", "Service"]), "{what}");
    check_references(&rendered, "operators", &what);
    let deployment = only(&rendered, "Deployment", &what);
    assert_eq!(name(deployment), "trainer", "{what}: fullnameOverride");
    assert_eq!(name(only(&rendered, "Service", &what)), "trainer-metrics", "{what}: fullnameOverride");
    assert_eq!(deployment["spec"]["template"]["spec"]["serviceAccountName"], "existing-account", "{what}");
    check_settings_are_read_by_the_binary(deployment, &what);
    check_credentials_come_only_from_secrets(deployment, &what, &["VASTAI_API_KEY"]);
    check_locked_down(deployment, &what);
    // Without a ServiceAccount to create, its name is required.
    let error = template_fails(helm, &["--set", "serviceAccount.create=false"]);
    assert!(error.contains("serviceAccount.name is required"), "helm {}: {error}", helm.major);
}

/// `helm template` with `extra`, for the tested Kubernetes release, which must fail; its output.
fn template_fails(helm: &Helm, extra: &[&str]) -> String {
    let chart = chart_dir();
    let kube = common::helm::kube_version();
    let mut args = vec!["template", "x", chart.to_str().unwrap(), "--kube-version", &kube];
    args.extend_from_slice(extra);
    helm.fails(&args)
}

/// values.schema.json, as Helm applies it, refuses broken values and names the field.
fn the_schema_refuses_broken_values_and_names_the_field(helm: &Helm) {
    let cases = [
        ("--set-string", "installationId=xyz"),
        ("--set-string", "vastai.existingSecret="),
        ("--set", "replicaCount=0"),
        ("--set-string", "sweep.intervalSeconds=60"),
        ("--set", "logFormat=xml"),
        ("--set", "jobDefaults.maxPricePerHour=0"),
        ("--set", "vastai.apiKey=inline-key"),
        ("--set", "serviceMonitor.interval=15 seconds"),
        ("--set-string", "vastai.endpoint=ftp://vast.example.com"),
    ];
    for (flag, setting) in cases {
        let path = setting.split('=').next().unwrap();
        let error = template_fails(helm, &[flag, setting]);
        // Both name the field by its JSON pointer (`at '/a/b'`); an unknown key by the pointer
        // of its parent and its own name.
        let pointer = format!("'/{}'", path.replace('.', "/"));
        let (parent, leaf) = path.rsplit_once('.').unwrap_or(("", path));
        let parent = format!("'/{}'", parent.replace('.', "/"));
        let named =
            error.contains(&pointer) || (error.contains(&parent) && error.contains(&format!("'{leaf}'")));
        assert!(
            error.contains("schema") && named,
            "helm {}: {flag} {setting} should be refused by values.schema.json naming {path}; got:\n{error}",
            helm.major
        );
    }
    // The default values and tests/fixtures/chart/all-options.yaml pass it: the renderings
    // above would fail otherwise.
}

// ---------------------------------------------------------------------------------------------
// Server-side dry run

/// Minimal CRDs for prometheus-operator's ServiceMonitor and PrometheusRule: the fields the chart
/// uses, with the types and the duration pattern of prometheus-operator's `monitoring.coreos.com/v1`
/// schemas. Unknown fields are not preserved, so strict field validation refuses a misspelt one.
fn monitoring_crds() -> Vec<serde_json::Value> {
    use serde_json::json;
    let duration = json!({"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"});
    let string_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let crd = |plural: &str, kind_: &str, spec: serde_json::Value| {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"plural": plural, "singular": kind_.to_lowercase(), "kind": kind_, "listKind": format!("{kind_}List")},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "required": ["spec"],
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": spec,
                        }
                    }}
                }]
            }
        })
    };
    let service_monitor = json!({
        "type": "object",
        "required": ["selector"],
        "properties": {
            "selector": {"type": "object", "properties": {"matchLabels": string_map}},
            "endpoints": {"type": "array", "items": {"type": "object", "properties": {
                "port": {"type": "string"},
                "path": {"type": "string"},
                "interval": duration,
            }}},
        }
    });
    let prometheus_rule = json!({
        "type": "object",
        "properties": {
            "groups": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "minLength": 1},
                "interval": duration,
                "rules": {"type": "array", "items": {"type": "object", "required": ["expr"], "properties": {
                    "alert": {"type": "string"},
                    "record": {"type": "string"},
                    "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": true},
                    "for": duration,
                    "labels": string_map,
                    "annotations": string_map,
                }}},
            }}},
        }
    });
    vec![
        crd("servicemonitors", "ServiceMonitor", service_monitor),
        crd("prometheusrules", "PrometheusRule", prometheus_rule),
    ]
}

async fn install_monitoring_crds(client: &kube::Client) {
    common::apply_crds(client, &monitoring_crds()).await;
}

/// `kubectl apply --dry-run=server --validate=strict` of `objects`: Ok(what kubectl printed) or
/// Err(its refusal).
fn server_dry_run(objects: &str) -> Result<String, String> {
    let (ok, text) = common::kubectl_with_input(
        &["apply", "--dry-run=server", "--validate=strict", "--field-manager=gpu-trainer-tests", "-f", "-"],
        objects,
    );
    if ok { Ok(text) } else { Err(text) }
}

/// The API server accepts the default, all-options and minimal renderings (CRDs included).
async fn renderings_pass_a_server_side_dry_run(helm: &Helm) {
    let client = common::kube_client().await;
    install_monitoring_crds(&client).await;
    let namespace = common::fresh_namespace(&client, &format!("chart-dry-run-h{}", helm.major)).await;
    let all = all_options_values();
    let minimal = minimal_sets();
    let renderings: [(&str, Vec<&str>); 3] = [
        ("default values", vec![]),
        ("all options", vec!["--values", all.to_str().unwrap()]),
        ("optional objects off", minimal.iter().map(String::as_str).collect()),
    ];
    for (what, extra) in renderings {
        let mut extra = extra;
        extra.push("--include-crds");
        let text = helm.template_text(&format!("dry-h{}", helm.major), &namespace, &extra);
        let objects = documents(&text, what);
        let printed = server_dry_run(&text).unwrap_or_else(|e| {
            panic!("helm {} ({what}): the API server refuses the rendering:\n{e}", helm.major)
        });
        for object in &objects {
            // `kind[.group]/name created|configured (server dry run)`
            let (kind_, line) = (kind(object).to_lowercase(), format!("/{} ", name(object)));
            let about = |l: &str| {
                (l.starts_with(&format!("{kind_}/")) || l.starts_with(&format!("{kind_}.")))
                    && l.contains(&line)
            };
            assert!(
                printed.lines().any(|l| about(l) && l.contains("(server dry run)")),
                "helm {} ({what}): {line} missing from the dry run:\n{printed}",
                helm.major
            );
        }
    }
    // The minimal monitoring CRDs do check: a misspelt field and a bad duration are refused.
    let text = helm.template_text("dry-bad", &namespace, &["--values", all.to_str().unwrap()]);
    let mut monitor =
        documents(&text, "all options").into_iter().find(|o| kind(o) == "ServiceMonitor").unwrap();
    monitor["spec"]["endpoints"][0].as_mapping_mut().unwrap().insert("scrapeEvery".into(), "15s".into());
    let refusal = server_dry_run(&serde_yaml::to_string(&monitor).unwrap()).unwrap_err();
    assert!(refusal.contains("scrapeEvery"), "{refusal}");
    monitor["spec"]["endpoints"][0].as_mapping_mut().unwrap().remove("scrapeEvery");
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds".into();
    let refusal = server_dry_run(&serde_yaml::to_string(&monitor).unwrap()).unwrap_err();
    assert!(refusal.contains("interval"), "{refusal}");
    common::delete_namespace(&client, &namespace).await;
}

macro_rules! with_helm {
    ($major:literal, $module:ident) => {
        mod $module {
            use super::*;

            #[test]
            #[ignore = "needs tests/ environment"]
            fn lint_strict_passes() {
                super::lint_strict_passes(&Helm::new($major));
            }

            #[test]
            #[ignore = "needs tests/ environment"]
            fn default_rendering_is_the_kustomize_base() {
                super::default_rendering_is_the_kustomize_base(&Helm::new($major));
            }

            #[test]
            #[ignore = "needs tests/ environment"]
            fn all_options_reach_the_objects() {
                super::all_options_reach_the_objects(&Helm::new($major));
            }

            #[test]
            #[ignore = "needs tests/ environment"]
            fn optional_objects_can_be_left_out() {
                super::optional_objects_can_be_left_out(&Helm::new($major));
            }

            #[test]
            #[ignore = "needs tests/ environment"]
            fn the_schema_refuses_broken_values_and_names_the_field() {
                super::the_schema_refuses_broken_values_and_names_the_field(&Helm::new($major));
            }

            #[tokio::test]
            #[ignore = "needs tests/ environment"]
            async fn renderings_pass_a_server_side_dry_run() {
                super::renderings_pass_a_server_side_dry_run(&Helm::new($major)).await;
            }
        }
    };
}

with_helm!(3, helm3);
with_helm!(4, helm4);
