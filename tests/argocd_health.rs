//! The Argo CD health checks in `config/argocd/` (Argo CD's `resource_customizations` layout:
//! `<group>/<Kind>/health.lua`, `testdata/*.yaml`, `health_test.yaml`).
//!
//! Every sample is run through its `health.lua` in gopher-lua, the Lua VM Argo CD embeds, by
//! `tests/env/argocd-lua`: a small Go program pinned to the gopher-lua version of Argo CD's
//! go.mod that prepares the VM as Argo CD does for an argocd-cm script (only the base, table and
//! package libraries and os.time/os.date, `obj` as a global, a 1 s deadline) and reads the
//! returned table by Argo CD's rules. The status and message are compared with
//! `health_test.yaml`. That test needs the harness binary: `bash tests/env/build-argocd-lua.sh`
//! (run by `tests/env/install.sh`) builds it into `$GPU_TRAINER_CACHE`, or
//! `GPU_TRAINER_TEST_ARGOCD_LUA` names one. The plain tests check that the samples are real
//! objects (they deserialize into the CRD types without losing a field, and their specs pass the
//! tool's checks) and that the generated argocd-cm patch embeds the current scripts.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gpu_trainer::api::{GpuInstance, Reason, TrainingJob, instance_condition, job_condition};
use gpu_trainer::remote::tool::ToolRegistry;
use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

const KINDS: [&str; 2] = ["GpuInstance", "TrainingJob"];
const CM_PATCH: &str = "config/argocd/argocd-cm-patch.yaml";
const BLESS_ENV: &str = "GPU_TRAINER_BLESS";
/// Health statuses Argo CD accepts from a script; anything else becomes Unknown.
const ARGO_STATUSES: [&str; 6] = ["Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthTests {
    tests: Vec<HealthTest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HealthTest {
    health_status: HealthStatus,
    input_path: String,
}

/// A health status as Argo CD's `health.HealthStatus` holds it: an empty field is left out.
#[derive(Deserialize, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct HealthStatus {
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kind_dir(kind: &str) -> PathBuf {
    root().join("config/argocd/gputrainer.dev").join(kind)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn health_tests(kind: &str) -> Vec<HealthTest> {
    let path = kind_dir(kind).join("health_test.yaml");
    let tests: HealthTests =
        serde_yaml::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(!tests.tests.is_empty(), "{} lists no tests", path.display());
    tests.tests
}

fn sample(kind: &str, input_path: &str) -> Value {
    let path = kind_dir(kind).join(input_path);
    serde_yaml::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Running the health scripts in gopher-lua, as Argo CD does

/// The harness binary to use instead of the one `tests/env/build-argocd-lua.sh` caches.
const HARNESS_ENV: &str = "GPU_TRAINER_TEST_ARGOCD_LUA";
const HARNESS_SRC: &str = "tests/env/argocd-lua";
const GOPHER_LUA: &str = "github.com/yuin/gopher-lua";

/// One script run, as `tests/env/argocd-lua` reads it.
#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Case {
    name: String,
    script: PathBuf,
    object: Value,
    use_open_libs: bool,
}

/// What Argo CD makes of a run: the script's result as Argo CD reads it, or why the run failed;
/// and the health Argo CD shows for the object.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Outcome {
    name: String,
    result: Option<HealthStatus>,
    error: Option<String>,
    shown: HealthStatus,
}

/// The gopher-lua version `tests/env/argocd-lua/go.mod` pins (Argo CD's).
fn gopher_lua_version() -> String {
    let go_mod = read(&root().join(HARNESS_SRC).join("go.mod"));
    go_mod
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(GOPHER_LUA)).then(|| words.next()).flatten().map(str::to_string)
        })
        .unwrap_or_else(|| panic!("{HARNESS_SRC}/go.mod does not require {GOPHER_LUA}"))
}

/// Where `tests/env/build-argocd-lua.sh` puts the harness built from the current source: the
/// directory name carries the first 12 hex digits of the SHA-256 of go.mod, go.sum and main.go.
fn cached_harness() -> PathBuf {
    let mut hasher = Sha256::new();
    for file in ["go.mod", "go.sum", "main.go"] {
        let path = root().join(HARNESS_SRC).join(file);
        hasher.update(std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())));
    }
    let hash = hex::encode(hasher.finalize());
    let cache = std::env::var_os("GPU_TRAINER_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/gpu-trainer")
    });
    cache.join(format!("argocd-lua-{}-{}/bin/argocd-lua", gopher_lua_version(), &hash[..12]))
}

/// The harness: `$GPU_TRAINER_TEST_ARGOCD_LUA`, or the cached build of the current source.
/// Missing, or built with another gopher-lua, fails the test.
fn harness() -> PathBuf {
    let path = std::env::var_os(HARNESS_ENV).map(PathBuf::from).unwrap_or_else(cached_harness);
    assert!(
        path.is_file(),
        "the gopher-lua harness {} is missing: build it with `bash tests/env/build-argocd-lua.sh` \
         (tests/env/install.sh runs it), or set {HARNESS_ENV} to a build of {HARNESS_SRC}",
        path.display()
    );
    let output = Command::new(&path)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    let versions = String::from_utf8_lossy(&output.stdout);
    let wanted = format!("{GOPHER_LUA} {}", gopher_lua_version());
    assert!(
        output.status.success() && versions.lines().any(|line| line == wanted),
        "{} is not built with {wanted} (it reports {versions:?}); rebuild it with `bash tests/env/build-argocd-lua.sh`",
        path.display()
    );
    path
}

/// Runs every case in one harness process; the outcomes come back in the cases' order.
fn run_in_argo_cd_vm(cases: &[Case]) -> Vec<Outcome> {
    let harness = harness();
    let mut child = Command::new(&harness)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", harness.display()));
    // The harness reads all its input before it writes anything.
    child.stdin.take().unwrap().write_all(&serde_json::to_vec(cases).unwrap()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{} failed ({}): {}",
        harness.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let outcomes: Vec<Outcome> = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("unexpected harness output ({e}): {}", String::from_utf8_lossy(&output.stdout))
    });
    let names = |it: &mut dyn Iterator<Item = &String>| it.cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&mut outcomes.iter().map(|o| &o.name)),
        names(&mut cases.iter().map(|c| &c.name)),
        "the harness answered other cases than asked"
    );
    outcomes
}

/// What Argo CD shows for an object whose script gave `result` (gitops-engine's
/// GetResourceHealth): a deleted object is "Pending deletion" whatever its script says, unless
/// it carries Argo CD's hook finalizer.
fn expected_shown(object: &Value, result: &HealthStatus) -> HealthStatus {
    let hook = object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "argocd.argoproj.io/hook-finalizer"));
    if object["metadata"]["deletionTimestamp"].is_null() || hook {
        HealthStatus { status: result.status.clone(), message: result.message.clone() }
    } else {
        HealthStatus { status: "Progressing".into(), message: "Pending deletion".into() }
    }
}

#[test]
#[ignore = "needs tests/ environment"]
fn health_scripts_give_the_expected_status_for_every_sample() {
    let mut cases = Vec::new();
    let mut expected = Vec::new();
    for kind in KINDS {
        let script = kind_dir(kind).join("health.lua");
        for test in health_tests(kind) {
            cases.push(Case {
                name: format!("{kind}/{}", test.input_path),
                script: script.clone(),
                object: sample(kind, &test.input_path),
                // What argocd-cm-patch.yaml installs: no resource.customizations.useOpenLibs key.
                use_open_libs: false,
            });
            expected.push(test.health_status);
        }
    }
    let outcomes = run_in_argo_cd_vm(&cases);
    let mut failures = Vec::new();
    for ((case, outcome), want) in cases.iter().zip(&outcomes).zip(&expected) {
        match (&outcome.result, &outcome.error) {
            (Some(got), None) if got == want => {
                let shown = expected_shown(&case.object, got);
                if outcome.shown != shown {
                    failures.push(format!(
                        "{}: Argo CD would show {:?}, not {shown:?}",
                        case.name, outcome.shown
                    ));
                }
            }
            (Some(got), None) => failures.push(format!("{}: expected {want:?}, got {got:?}", case.name)),
            _ => failures.push(format!("{}: the script failed: {:?}", case.name, outcome.error)),
        }
    }
    assert!(failures.is_empty(), "{} sample(s) failed:\n{}", failures.len(), failures.join("\n"));
    assert!(cases.len() >= 20, "only {} samples checked", cases.len());
}

/// The harness itself: what Argo CD makes of scripts that break its rules, and of objects whose
/// values Lua could misread.
#[test]
#[ignore = "needs tests/ environment"]
fn harness_runs_scripts_as_argo_cd_does() {
    enum Want {
        Result(&'static str, &'static str),
        Error(&'static str),
    }
    use Want::{Error, Result};
    let dir = tempfile::tempdir().unwrap();
    let phase = serde_json::json!({"status": {"phase": "Running"}});
    let values = serde_json::json!({
        "metadata": {"generation": 2, "gone": null},
        "status": {"note": "a \"quoted\"\nline\\ é", "ratio": 0.5, "big": 12345678901234_i64, "list": [1, null, 3]},
    });
    let deleted = serde_json::json!({"metadata": {"deletionTimestamp": "2026-05-04T10:00:00Z"}});
    let hook = serde_json::json!({"metadata": {
        "deletionTimestamp": "2026-05-04T10:00:00Z",
        "finalizers": ["argocd.argoproj.io/hook-finalizer"],
    }});
    let healthy = "return {status = 'Degraded', message = 'the script ran'}";
    let cases = [
        // argocd-cm scripts get no string, math, io or debug library, nor string methods.
        (
            "string",
            "return {status = string.upper(obj.status.phase)}",
            &phase,
            false,
            Error("attempt to index"),
        ),
        ("method", "return {status = obj.status.phase:upper()}", &phase, false, Error("attempt to index")),
        (
            "math",
            "return {status = 'Healthy', message = tostring(math.floor(1.5))}",
            &phase,
            false,
            Error("attempt to index"),
        ),
        (
            "libraries",
            "return {status = 'Healthy', message = type(io) .. type(debug) .. type(os.exit) .. type(os.time()) .. type(require('os').date) .. type(table.concat)}",
            &phase,
            false,
            Result("Healthy", "nilnilnilnumberfunctionfunction"),
        ),
        // resource.customizations.useOpenLibs.<group_kind>: true opens them.
        (
            "open libs",
            "return {status = 'Healthy', message = obj.status.phase:upper()}",
            &phase,
            true,
            Result("Healthy", "RUNNING"),
        ),
        // How Argo CD reads what a script returns.
        (
            "not a table",
            "return 'Healthy'",
            &phase,
            false,
            Error("expect table output from Lua script, not string"),
        ),
        (
            "invalid status",
            "return {status = 'Fine'}",
            &phase,
            false,
            Result("Unknown", "Lua returned an invalid health status"),
        ),
        ("nothing", "local x = 1", &phase, false, Result("", "")),
        ("empty table", "return {}", &phase, false, Result("", "")),
        ("runtime error", "error('boom')", &phase, false, Error("boom")),
        ("syntax error", "return {status = ", &phase, false, Error("syntax error")),
        ("endless", "while true do end", &phase, false, Error("context deadline exceeded")),
        // Values arrive intact: strings with their escapes, integers print without a fraction,
        // null is absent (also inside a list, which closes up).
        (
            "values",
            "local s = obj.status return {status = 'Healthy', message = s.note .. '|' .. obj.metadata.generation .. '|' .. s.ratio .. '|' .. s.big .. '|' .. #s.list .. '|' .. tostring(obj.metadata.gone)}",
            &values,
            false,
            Result("Healthy", "a \"quoted\"\nline\\ é|2|0.5|12345678901234|2|nil"),
        ),
        ("deleted", healthy, &deleted, false, Result("Degraded", "the script ran")),
        ("deleted hook", healthy, &hook, false, Result("Degraded", "the script ran")),
    ];
    let cases: Vec<(Case, Want)> = cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, body, object, use_open_libs, want))| {
            let script = dir.path().join(format!("{i}.lua"));
            std::fs::write(&script, body).unwrap();
            (Case { name: name.into(), script, object: object.clone(), use_open_libs }, want)
        })
        .collect();
    let requests: Vec<Case> = cases.iter().map(|(case, _)| case.clone()).collect();
    let outcomes = run_in_argo_cd_vm(&requests);
    for ((case, want), outcome) in cases.iter().zip(&outcomes) {
        let name = &case.name;
        let shown = match (want, &outcome.result, &outcome.error) {
            (Result(status, message), Some(got), None) => {
                assert_eq!(
                    got,
                    &HealthStatus { status: status.to_string(), message: message.to_string() },
                    "{name}"
                );
                expected_shown(&case.object, got)
            }
            (Error(part), None, Some(err)) => {
                assert!(err.contains(part), "{name}: {err:?} does not contain {part:?}");
                assert!(!err.contains("stack traceback"), "{name}: Argo CD drops the stack trace: {err:?}");
                HealthStatus { status: "Unknown".into(), message: err.clone() }
            }
            _ => panic!("{name}: unexpected {outcome:?}"),
        };
        assert_eq!(outcome.shown, shown, "{name}");
    }
    let shown = |name: &str| &outcomes.iter().find(|o| o.name == name).unwrap().shown;
    assert_eq!(shown("deleted").message, "Pending deletion");
    assert_eq!(shown("deleted hook").message, "the script ran");
}

// ---------------------------------------------------------------------------------------------
// The samples are real objects

/// Every field of `sample` exists with the same value in `back` (numbers compared as numbers):
/// a misspelled or invented field is lost in the round trip through the Rust types.
fn check_subset(path: &str, sample: &Value, back: &Value, errors: &mut Vec<String>) {
    match (sample, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a.iter().filter(|(_, v)| !v.is_null()) {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => check_subset(&here, value, other, errors),
                    None => errors.push(format!("{here} is not a field of the type")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                check_subset(&format!("{path}[{i}]"), x, y, errors);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => errors.push(format!("{path}: {a} became {b}")),
    }
}

fn round_trip(kind: &str, object: &Value) -> Value {
    match kind {
        "TrainingJob" => {
            serde_json::to_value(serde_json::from_value::<TrainingJob>(object.clone()).unwrap()).unwrap()
        }
        "GpuInstance" => {
            serde_json::to_value(serde_json::from_value::<GpuInstance>(object.clone()).unwrap()).unwrap()
        }
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn samples_are_objects_the_operator_writes() {
    let tools = ToolRegistry::load(&root().join("config/tools")).unwrap();
    let mut errors = Vec::new();
    for kind in KINDS {
        for test in health_tests(kind) {
            let object = sample(kind, &test.input_path);
            let name = format!("{kind}/{}", test.input_path);
            assert_eq!(object["apiVersion"], "gputrainer.dev/v1alpha1", "{name}");
            assert_eq!(object["kind"], kind, "{name}");
            let back = round_trip(kind, &object);
            for part in ["metadata", "spec", "status"] {
                if let Some(value) = object.get(part) {
                    check_subset(&format!("{name}: {part}"), value, &back[part], &mut errors);
                }
            }
            if kind == "TrainingJob" {
                let job: TrainingJob = serde_json::from_value(object.clone()).unwrap();
                let invalid = job.status.as_ref().and_then(|s| s.reason) == Some(Reason::InvalidSpec);
                let checked = tools.get(&job.spec.tool).map_err(|e| e.to_string()).and_then(|tool| {
                    tool.resolve_params(&job.spec.params).map_err(|e| e.to_string())?;
                    tool.check_secrets(job.spec.env.iter().map(|e| e.name.as_str()))
                        .map_err(|e| e.to_string())
                });
                match (invalid, checked) {
                    (false, Err(e)) => errors.push(format!("{name}: the spec would be refused: {e}")),
                    (true, Ok(())) => errors.push(format!("{name}: says InvalidSpec but the spec is valid")),
                    _ => {}
                }
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn every_sample_is_tested_and_every_status_is_covered() {
    for kind in KINDS {
        let tests = health_tests(kind);
        let listed: Vec<String> = tests.iter().map(|t| t.input_path.clone()).collect();
        let unique: BTreeSet<&String> = listed.iter().collect();
        assert_eq!(unique.len(), listed.len(), "{kind}: a sample is listed twice");
        let on_disk: BTreeSet<String> = std::fs::read_dir(kind_dir(kind).join("testdata"))
            .unwrap()
            .map(|e| format!("testdata/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        assert_eq!(unique, on_disk.iter().collect(), "{kind}: health_test.yaml and testdata/ differ");
        let statuses: BTreeSet<&str> = tests.iter().map(|t| t.health_status.status.as_str()).collect();
        for status in &statuses {
            assert!(ARGO_STATUSES.contains(status), "{kind}: {status} is not an Argo CD health status");
        }
        let wanted: &[&str] = if kind == "TrainingJob" {
            &["Healthy", "Progressing", "Degraded", "Suspended"]
        } else {
            &["Healthy", "Progressing", "Degraded"]
        };
        for status in wanted {
            assert!(statuses.contains(status), "{kind}: no sample is {status}");
        }
    }
}

/// The scripts compare against phase and condition names as strings: each must exist in the API,
/// and every phase must be handled, so a renamed or new phase fails here rather than in Argo CD.
#[test]
fn health_scripts_name_real_phases_and_conditions_and_handle_every_phase() {
    let condition_use = regex::Regex::new(r#"(?:isTrue|condition)\(status, "([A-Za-z]+)"\)"#).unwrap();
    let phase_use = regex::Regex::new(r#"phase == "([A-Za-z]+)""#).unwrap();
    for kind in KINDS {
        let (crd, conditions) = match kind {
            "TrainingJob" => (TrainingJob::crd(), job_condition::ALL),
            _ => (GpuInstance::crd(), instance_condition::ALL),
        };
        let crd = serde_json::to_value(crd).unwrap();
        let phases: BTreeSet<String> = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["status"]["properties"]["phase"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        let script = read(&kind_dir(kind).join("health.lua"));
        let used_conditions: BTreeSet<&str> =
            condition_use.captures_iter(&script).map(|c| c.get(1).unwrap().as_str()).collect();
        let used_phases: BTreeSet<String> =
            phase_use.captures_iter(&script).map(|c| c.get(1).unwrap().as_str().to_string()).collect();
        assert!(!used_conditions.is_empty(), "{kind}: no condition checks found");
        for name in &used_conditions {
            assert!(conditions.iter().any(|(c, _)| c == name), "{kind}: {name} is not a condition type");
        }
        assert_eq!(used_phases, phases, "{kind}: the script must handle exactly the phases of the CRD");
    }
}

// ---------------------------------------------------------------------------------------------
// The argocd-cm patch

fn configmap_key(kind: &str) -> String {
    format!("resource.customizations.health.gputrainer.dev_{kind}")
}

/// The patch file as generated from the current scripts.
fn argocd_cm_patch() -> String {
    let mut out = String::from(
        "# Argo CD health checks for gpu-trainer's TrainingJob and GpuInstance, as a patch of Argo CD's\n\
         # argocd-cm ConfigMap (see config/argocd/README.md):\n\
         #   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file config/argocd/argocd-cm-patch.yaml\n\
         # Generated from config/argocd/gputrainer.dev/<Kind>/health.lua; do not edit. Regenerate with\n\
         #   GPU_TRAINER_BLESS=1 cargo test --test argocd_health\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: argocd-cm\ndata:\n",
    );
    for kind in KINDS {
        let path = kind_dir(kind).join("health.lua");
        let script = read(&path);
        assert!(
            script.ends_with('\n') && !script.ends_with("\n\n") && !script.contains('\t'),
            "{} must end with exactly one newline and contain no tabs (it is embedded in YAML)",
            path.display()
        );
        assert!(!script.starts_with(' '), "{} must not start with a space", path.display());
        out.push_str(&format!("  {}: |\n", configmap_key(kind)));
        for line in script.lines() {
            if !line.is_empty() {
                out.push_str("    ");
                out.push_str(line);
            }
            out.push('\n');
        }
    }
    out
}

#[test]
fn argocd_cm_patch_embeds_the_current_scripts() {
    let path = root().join(CM_PATCH);
    let expected = argocd_cm_patch();
    if std::env::var_os(BLESS_ENV).is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == expected,
        "{CM_PATCH} is out of date; regenerate it with `{BLESS_ENV}=1 cargo test --test argocd_health`"
    );
    // And the YAML really carries each script byte for byte.
    let patch: Value = serde_yaml::from_str(&on_disk).unwrap();
    assert_eq!(patch["metadata"]["name"], "argocd-cm");
    for kind in KINDS {
        let script = read(&kind_dir(kind).join("health.lua"));
        assert_eq!(patch["data"][configmap_key(kind)].as_str(), Some(script.as_str()), "{kind}");
    }
}

#[test]
fn readme_names_the_keys_and_the_patch() {
    let readme = read(&root().join("config/argocd/README.md"));
    assert!(readme.contains("argocd-cm-patch.yaml"));
    for kind in KINDS {
        assert!(readme.contains(&configmap_key(kind)), "README does not name {}", configmap_key(kind));
    }
}
