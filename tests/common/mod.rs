//! Helpers for tests that run against the real components started by `tests/env/up.sh`
//! (through `tests/run.sh`). Such tests are `#[ignore = "needs tests/ environment"]`.
#![allow(dead_code)]

pub mod account;
pub mod dataset;
pub mod helm;
pub mod operator;

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The folder `tests/env/up.sh` wrote its files to.
pub fn env_dir() -> PathBuf {
    match std::env::var_os("GPU_TRAINER_ENV_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => panic!(
            "GPU_TRAINER_ENV_DIR is not set: this test needs the real components; run it through `bash tests/run.sh`"
        ),
    }
}

pub fn kubeconfig_path() -> PathBuf {
    env_dir().join("kubeconfig")
}

/// A client for the test API server, authenticated as the admin token.
pub async fn kube_client() -> Client {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; is the test environment up?", path.display()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig from tests/env/up.sh is valid");
    Client::try_from(config).expect("client")
}

/// Installs (server-side apply) the CRDs checked in under `crds/` and waits until both are
/// established. Safe to call from many tests at once.
pub async fn install_crds(client: &Client) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut crds = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("crds/ exists") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("readable CRD file");
        let crd: serde_json::Value = serde_yaml::from_str(&text).expect("CRD file parses");
        crds.push(crd);
    }
    apply_crds(client, &crds).await;
}

/// Server-side applies CRDs (as objects: a test may hand-write minimal ones) and waits until each
/// is established.
pub async fn apply_crds(client: &Client, objects: &[serde_json::Value]) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in objects {
        let name = crd["metadata"]["name"].as_str().expect("CRD has a name").to_string();
        crds.patch(&name, &PatchParams::apply("gpu-trainer-tests").force(), &Patch::Apply(crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        names.push(name);
    }
    for name in names {
        wait_until(Duration::from_secs(30), &format!("CRD {name} established"), || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let crd = crds.get(&name).await.ok()?;
                let established =
                    crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        })
        .await;
    }
}

/// Creates a namespace with a unique name starting with `prefix` and returns its name.
pub async fn fresh_namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{:08x}", rand::random::<u32>());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
    namespaces.create(&PostParams::default(), &ns).await.expect("create namespace");
    name
}

/// Deletes a namespace (best effort; the namespace controller finishes the job).
pub async fn delete_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(name, &DeleteParams::default()).await;
}

/// Polls `check` every 100 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `kubectl` against the test API server and returns stdout; panics with stderr on failure.
pub fn kubectl(args: &[&str]) -> String {
    let output = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(args)
        .output()
        .expect("kubectl is installed");
    assert!(
        output.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `kubectl args...` against the test API server with `input` on stdin; returns whether it
/// succeeded and what it printed (stdout and stderr).
pub fn kubectl_with_input(args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl is installed");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// Reasons of the events about object `name` in `ns`, oldest first.
pub async fn event_reasons(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let mut list: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    list.sort_by_key(|e| {
        (e.event_time.clone().map(|t| t.0), e.metadata.creation_timestamp.clone().map(|t| t.0))
    });
    list.into_iter().filter_map(|e| e.reason).collect()
}

/// Stops a trainer left running in a job's work dir: a destroyed fake instance does not kill
/// processes the way a real one does (every "machine" is this machine). Only a live wrapper of
/// ours is signalled: a recorded pid may since belong to another process group.
pub fn kill_trainer(work_dir: &std::path::Path) {
    if work_dir.join("exit_code").exists() {
        return;
    }
    let Ok(pid) = std::fs::read_to_string(work_dir.join("train.pid")) else { return };
    let Ok(pid) = pid.trim().parse::<u32>() else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("gpu-trainer-run") {
        let _ = std::process::Command::new("kill").args(["-KILL", "--"]).arg(format!("-{pid}")).status();
    }
}

/// A stand-alone GpuInstance with the defaults the tests use (an hour's lifetime).
pub fn gpu_instance(name: &str) -> gpu_trainer::api::GpuInstance {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gputrainer.dev/v1alpha1",
        "kind": "GpuInstance",
        "metadata": {"name": name},
        "spec": {"image": "pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime", "maxLifetimeSeconds": 3600}
    }))
    .unwrap()
}

/// A TrainingJob named `name` with this `spec`.
pub fn training_job(name: &str, spec: serde_json::Value) -> gpu_trainer::api::TrainingJob {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gputrainer.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap()
}

/// A `demo@1` TrainingJob (four quick steps) on the dataset at `href`.
pub fn demo_job(name: &str, href: &str, sha256: &str) -> gpu_trainer::api::TrainingJob {
    training_job(
        name,
        serde_json::json!({
            "tool": "demo@1",
            "params": {"steps": 4, "secondsPerStep": 0.25, "saveEvery": 2},
            "dataset": {"url": {"href": href, "sha256": sha256}},
            "activeDeadlineSeconds": 600,
            "monitoring": {"pollIntervalSeconds": 5}
        }),
    )
}

/// A variable `tests/env/up.sh` wrote to its env file (the run sources it).
pub fn test_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run through tests/run.sh"))
}

/// Waits until the job's phase satisfies `done`; panics after `timeout` with its status and the
/// operator's log.
pub async fn wait_job(
    api: &Api<gpu_trainer::api::TrainingJob>,
    name: &str,
    operator: &operator::OperatorProcess,
    timeout: Duration,
    done: impl Fn(gpu_trainer::api::TrainingJobPhase) -> bool,
) -> gpu_trainer::api::TrainingJob {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let job = api.get(name).await.unwrap();
        let status = job.status.clone().unwrap_or_default();
        if done(status.phase) {
            return job;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{name} did not reach the expected phase: {status:#?}\noperator log:\n{}",
                operator.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
