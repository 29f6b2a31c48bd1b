//! The TrainingJob controller end to end: `gpu-trainer run` as a real process, the real API
//! server, `fake-vastai` (in this process) whose machines are this machine over the test sshd,
//! `demo@1` as the trainer and a dataset served over HTTP from this test.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::operator::{OperatorOptions, OperatorProcess, installation_id, live_instances, start_fake};
use gpu_trainer::api::{GpuInstance, Reason, TrainingJob, TrainingJobPhase};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

const TIMEOUT: Duration = Duration::from_secs(180);

/// A dataset packed with `gpu-trainer dataset pack`, served from 127.0.0.1: (URL, SHA-256).
async fn serve_dataset(dir: &Path) -> (String, String) {
    let folder = dir.join("photos");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("a.jpg"), [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 4]).unwrap();
    std::fs::write(folder.join("a.txt"), "a photo of sks dog").unwrap();
    let archive = dir.join("photos.tar");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-trainer"))
        .args(["dataset", "pack", "--no-validate", "-o"])
        .arg(&archive)
        .arg(&folder)
        .output()
        .unwrap();
    assert!(out.status.success(), "dataset pack: {}", String::from_utf8_lossy(&out.stderr));
    let sha256 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let bytes = bytes::Bytes::from(std::fs::read(&archive).unwrap());
    let app =
        axum::Router::new().route("/photos.tar", axum::routing::get(move || async move { bytes.clone() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/photos.tar"), sha256)
}

fn job(name: &str, params: serde_json::Value, href: &str, sha256: &str) -> TrainingJob {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gputrainer.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "tool": "demo@1",
            "params": params,
            "dataset": {"url": {"href": href, "sha256": sha256}},
            "activeDeadlineSeconds": 900,
            "monitoring": {"pollIntervalSeconds": 5}
        }
    }))
    .unwrap()
}

/// A temporary remote base under the environment folder and the operator using it.
fn start_operator(
    ns: &str,
    fake: &gpu_trainer::provider::fake::FakeServer,
    installation: &str,
) -> (OperatorProcess, PathBuf) {
    let base = common::env_dir().join("work").join(ns);
    std::fs::create_dir_all(&base).unwrap();
    let mut options = OperatorOptions::new(ns, fake, installation);
    options.args = vec!["--remote-base".into(), base.display().to_string()];
    (OperatorProcess::start(&options), base)
}

async fn wait_phase(
    api: &Api<TrainingJob>,
    name: &str,
    operator: &OperatorProcess,
    done: impl Fn(TrainingJobPhase) -> bool,
) -> TrainingJob {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
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

async fn wait_gone(api: &Api<GpuInstance>, name: &str, operator: &OperatorProcess) {
    common::wait_until(TIMEOUT, &format!("GpuInstance {name} to be deleted"), || async {
        api.get_opt(name).await.unwrap().is_none().then_some(())
    })
    .await;
    let _ = operator;
}

/// True when `wanted` appears in `seen` in this order (other events may come between).
fn in_order(seen: &[String], wanted: &[&str]) -> bool {
    let mut rest = seen.iter();
    wanted.iter().all(|w| rest.any(|s| s == w))
}

/// Stops a trainer this test left running on "the machine" (this machine): a destroyed fake
/// instance does not kill processes the way a real one does. Only a live wrapper of ours is
/// signalled: a recorded pid may since belong to another process group.
fn kill_trainer(base: &Path, uid: &str) {
    let dir = base.join(uid);
    if dir.join("exit_code").exists() {
        return;
    }
    let Ok(pid) = std::fs::read_to_string(dir.join("train.pid")) else { return };
    let Ok(pid) = pid.trim().parse::<u32>() else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("gpu-trainer-run") {
        let _ = std::process::Command::new("kill").args(["-KILL", "--"]).arg(format!("-{pid}")).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_demo_job_trains_lists_its_model_and_releases_the_machine() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "tj-ok").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let (operator, _base) = start_operator(&ns, &fake, &installation);
    let tmp = tempfile::tempdir().unwrap();
    let (href, sha256) = serve_dataset(tmp.path()).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    let params = serde_json::json!({"steps": 12, "secondsPerStep": 0.25, "saveEvery": 5});
    jobs.create(&PostParams::default(), &job("lora", params, &href, &sha256)).await.unwrap();
    let done = wait_phase(&jobs, "lora", &operator, TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{status:#?}\n{}", operator.log_tail());
    assert_eq!(status.reason, Some(Reason::Succeeded));
    assert_eq!(status.attempts, 1);
    let progress = status.progress.clone().expect("progress in status");
    assert_eq!((progress.step, progress.total_steps, progress.percent), (12, Some(12), Some(100.0)));
    let instance = status.instance.clone().expect("instance in status");
    assert_eq!(instance.name, "lora-1");
    assert!(instance.provider_id.is_some() && instance.gpu.is_some(), "{instance:?}");
    let cost = status.cost.clone().expect("cost in status");
    assert!(cost.price_per_hour.is_some_and(|p| p > 0.0), "{cost:?}");
    // No `output`: the model stays listed in status with its size and checksum.
    let model = &status.artifacts[0];
    assert!(model.size_bytes > 0 && model.sha256.as_ref().is_some_and(|s| s.len() == 64), "{model:?}");
    assert!(!status.checkpoints.is_empty(), "{status:#?}");
    for (type_, value) in [
        ("InstanceReady", "False"),
        ("DataStaged", "True"),
        ("Uploaded", "True"),
        ("Succeeded", "True"),
        ("Failed", "False"),
    ] {
        assert!(
            status.conditions.iter().any(|c| c.type_ == type_ && c.status == value),
            "condition {type_}={value} missing: {:#?}",
            status.conditions
        );
    }

    // The machine is released: the GpuInstance is deleted and the provider no longer lists it.
    wait_gone(&instances, "lora-1", &operator).await;
    let prefix = format!("gputrainer:{installation}:");
    common::wait_until(TIMEOUT, "the provider to release the machine", || async {
        live_instances(&fake, &prefix).await.is_empty().then_some(())
    })
    .await;
    let creates = fake.requests().iter().filter(|r| r.endpoint == "create_instance").count();
    assert_eq!(creates, 1, "one machine rented");

    let reasons = common::event_reasons(&client, &ns, "lora").await;
    let story = ["Provisioning", "InstanceReady", "Staged", "TrainingStarted", "Uploaded", "Succeeded"];
    assert!(in_order(&reasons, &story), "events out of order or missing: {reasons:?}");

    let metrics = operator.metrics().await;
    for line in [
        "gputrainer_job_duration_seconds_count{phase=\"Succeeded\"} 1",
        "gputrainer_job_apply_to_training_seconds_count 1",
        "gputrainer_job_cost_dollars_count 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    let table = common::kubectl(&["get", "tj", "-n", &ns]);
    let row = table.lines().find(|l| l.starts_with("lora")).unwrap_or_default();
    assert!(row.contains("Succeeded") && row.contains("100%"), "{table}");
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn deleting_a_running_job_releases_the_gpu() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "tj-del").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let (operator, base) = start_operator(&ns, &fake, &installation);
    let tmp = tempfile::tempdir().unwrap();
    let (href, sha256) = serve_dataset(tmp.path()).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    let params = serde_json::json!({"steps": 2000, "secondsPerStep": 0.5});
    jobs.create(&PostParams::default(), &job("long", params, &href, &sha256)).await.unwrap();
    let running =
        wait_phase(&jobs, "long", &operator, |p| p == TrainingJobPhase::Training || p.is_finished()).await;
    let uid = running.uid().unwrap();
    assert_eq!(running.status.clone().unwrap().phase, TrainingJobPhase::Training, "{}", operator.log_tail());
    let prefix = format!("gputrainer:{installation}:");
    assert_eq!(live_instances(&fake, &prefix).await.len(), 1);

    jobs.delete("long", &DeleteParams::background()).await.unwrap();
    wait_gone(&instances, "long-1", &operator).await;
    common::wait_until(TIMEOUT, "the provider to release the machine", || async {
        live_instances(&fake, &prefix).await.is_empty().then_some(())
    })
    .await;
    kill_trainer(&base, &uid);
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn an_invalid_job_fails_with_invalid_spec_without_renting() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "tj-bad").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let (operator, _base) = start_operator(&ns, &fake, &installation);
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);

    let params = serde_json::json!({"stepz": 5});
    let sha = "0".repeat(64);
    jobs.create(&PostParams::default(), &job("typo", params, "http://127.0.0.1:9/d.tar", &sha))
        .await
        .unwrap();
    let failed = wait_phase(&jobs, "typo", &operator, TrainingJobPhase::is_finished).await;
    let status = failed.status.unwrap();
    assert_eq!((status.phase, status.reason), (TrainingJobPhase::Failed, Some(Reason::InvalidSpec)));
    let message = status.message.unwrap_or_default();
    assert!(message.contains("spec.params") && message.contains("stepz"), "{message}");

    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);
    assert!(instances.list(&ListParams::default()).await.unwrap().items.is_empty());
    let creates = fake.requests().iter().filter(|r| r.endpoint == "create_instance").count();
    assert_eq!(creates, 0, "nothing rented for an invalid job");
    let reasons = common::event_reasons(&client, &ns, "typo").await;
    assert!(reasons.iter().any(|r| r == "InvalidSpec"), "{reasons:?}");
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_trainer_that_stops_progressing_is_stopped_and_fails_as_stalled() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "tj-stall").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let (operator, base) = start_operator(&ns, &fake, &installation);
    let tmp = tempfile::tempdir().unwrap();
    let (href, sha256) = serve_dataset(tmp.path()).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    let params = serde_json::json!({"steps": 100, "secondsPerStep": 0.2, "stallAtStep": 5, "saveEvery": 2});
    let mut stalling = job("stuck", params, &href, &sha256);
    // The shortest no-progress timeout the schema allows, and no grace period.
    stalling.spec.monitoring.no_progress_timeout_seconds = 60;
    stalling.spec.monitoring.stall_detection.grace_period_seconds = 0;
    // The stall is detected at least 60 s after the last step, so this warning comes first.
    stalling.spec.soft_deadline_seconds = Some(60);
    jobs.create(&PostParams::default(), &stalling).await.unwrap();
    let done = wait_phase(&jobs, "stuck", &operator, TrainingJobPhase::is_finished).await;
    let uid = done.uid().unwrap();
    let status = done.status.clone().unwrap();
    assert_eq!(
        (status.phase, status.reason),
        (TrainingJobPhase::Failed, Some(Reason::Stalled)),
        "{status:#?}"
    );
    // `stallAtStep: 5` hangs before step 5 completes.
    assert!(status.progress.as_ref().is_some_and(|p| p.step == 4), "{:?}", status.progress);
    // What the trainer saved before it stalled is listed.
    assert!(status.checkpoints.iter().any(|c| c.step == 4), "{:?}", status.checkpoints);
    // The trainer was stopped (the wrapper recorded its exit), then the machine released.
    assert!(base.join(&uid).join("exit_code").is_file(), "the trainer was stopped");
    wait_gone(&instances, "stuck-1", &operator).await;
    let prefix = format!("gputrainer:{installation}:");
    common::wait_until(TIMEOUT, "the provider to release the machine", || async {
        live_instances(&fake, &prefix).await.is_empty().then_some(())
    })
    .await;
    let reasons = common::event_reasons(&client, &ns, "stuck").await;
    assert!(in_order(&reasons, &["TrainingStarted", "Stalled", "Failed"]), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "SoftDeadlineExceeded"), "{reasons:?}");
    assert!(status.conditions.iter().any(|c| c.type_ == "SoftDeadlineExceeded" && c.status == "True"));
    kill_trainer(&base, &uid);
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_controller_killed_mid_training_resumes_without_starting_training_twice() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "tj-restart").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let (mut first, base) = start_operator(&ns, &fake, &installation);
    let tmp = tempfile::tempdir().unwrap();
    let (href, sha256) = serve_dataset(tmp.path()).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    let params = serde_json::json!({"steps": 40, "secondsPerStep": 0.25});
    jobs.create(&PostParams::default(), &job("again", params, &href, &sha256)).await.unwrap();
    let running =
        wait_phase(&jobs, "again", &first, |p| p == TrainingJobPhase::Training || p.is_finished()).await;
    first.kill();
    let uid = running.uid().unwrap();

    let (second, _) = start_operator(&ns, &fake, &installation);
    let done = wait_phase(&jobs, "again", &second, TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{status:#?}\n{}", second.log_tail());
    let log = std::fs::read_to_string(base.join(&uid).join("train.log")).unwrap();
    assert_eq!(log.matches("Running demo job").count(), 1, "training started once:\n{log}");
    wait_gone(&instances, "again-1", &second).await;
    let creates = fake.requests().iter().filter(|r| r.endpoint == "create_instance").count();
    assert_eq!(creates, 1, "one machine rented across the restart");
    common::delete_namespace(&client, &ns).await;
}

async fn set_suspend(api: &Api<TrainingJob>, name: &str, suspend: bool) {
    let patch = serde_json::json!({"spec": {"suspend": suspend}});
    api.patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_suspended_job_releases_its_gpu_and_resumes_on_a_new_machine() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "tj-susp").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let (operator, base) = start_operator(&ns, &fake, &installation);
    let tmp = tempfile::tempdir().unwrap();
    let (href, sha256) = serve_dataset(tmp.path()).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    let params = serde_json::json!({"steps": 80, "secondsPerStep": 0.25, "saveEvery": 5});
    jobs.create(&PostParams::default(), &job("pause", params, &href, &sha256)).await.unwrap();
    common::wait_until(TIMEOUT, "a checkpoint to be written", || async {
        let job = jobs.get("pause").await.ok()?;
        let status = job.status?;
        (status.phase == TrainingJobPhase::Training && status.progress?.step >= 6).then_some(())
    })
    .await;
    set_suspend(&jobs, "pause", true).await;
    let suspended =
        wait_phase(&jobs, "pause", &operator, |p| p == TrainingJobPhase::Suspended || p.is_finished()).await;
    let status = suspended.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Suspended, "{status:#?}\n{}", operator.log_tail());
    assert!(!status.checkpoints.is_empty(), "what the trainer saved is listed: {status:#?}");
    wait_gone(&instances, "pause-1", &operator).await;
    let prefix = format!("gputrainer:{installation}:");
    common::wait_until(TIMEOUT, "the provider to release the machine", || async {
        live_instances(&fake, &prefix).await.is_empty().then_some(())
    })
    .await;

    set_suspend(&jobs, "pause", false).await;
    let done = wait_phase(&jobs, "pause", &operator, TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{status:#?}\n{}", operator.log_tail());
    assert_eq!(status.attempts, 2);
    assert_eq!(status.instance.as_ref().map(|i| i.name.as_str()), Some("pause-2"));
    let uid = done.uid().unwrap();
    // The test's machines share one disk, so the resume command finds the checkpoint.
    let log = std::fs::read_to_string(base.join(&uid).join("train.log")).unwrap();
    assert!(log.contains("Resuming from step"), "{log}");
    wait_gone(&instances, "pause-2", &operator).await;
    let reasons = common::event_reasons(&client, &ns, "pause").await;
    // The recorder folds a repeated reason into one event series, so the second start is not a
    // separate event; the log above shows it.
    let story = ["TrainingStarted", "Suspended", "Resumed", "Succeeded"];
    assert!(in_order(&reasons, &story), "{reasons:?}");
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_job_past_its_active_deadline_is_stopped_and_fails() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "tj-late").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let (operator, base) = start_operator(&ns, &fake, &installation);
    let tmp = tempfile::tempdir().unwrap();
    let (href, sha256) = serve_dataset(tmp.path()).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    let params = serde_json::json!({"steps": 2000, "secondsPerStep": 0.25});
    let mut late = job("late", params, &href, &sha256);
    // The shortest deadline the schema allows.
    late.spec.active_deadline_seconds = 60;
    jobs.create(&PostParams::default(), &late).await.unwrap();
    let done = wait_phase(&jobs, "late", &operator, TrainingJobPhase::is_finished).await;
    let uid = done.uid().unwrap();
    let status = done.status.clone().unwrap();
    assert_eq!(
        (status.phase, status.reason),
        (TrainingJobPhase::Failed, Some(Reason::DeadlineExceeded)),
        "{status:#?}"
    );
    // The deadline counts provisioning too; on a slow machine it can pass before training starts.
    assert!(status.progress.as_ref().is_none_or(|p| p.step < 2000), "{:?}", status.progress);
    if base.join(&uid).join("train.pid").is_file() {
        assert!(base.join(&uid).join("exit_code").is_file(), "the trainer was stopped");
    }
    wait_gone(&instances, "late-1", &operator).await;
    let prefix = format!("gputrainer:{installation}:");
    common::wait_until(TIMEOUT, "the provider to release the machine", || async {
        live_instances(&fake, &prefix).await.is_empty().then_some(())
    })
    .await;
    kill_trainer(&base, &uid);
    common::delete_namespace(&client, &ns).await;
}

fn test_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: source the tests/env env file"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_job_with_s3_output_uploads_a_verified_model() {
    use gpu_trainer::artifacts::s3::S3Store;
    use gpu_trainer::artifacts::{ObjectRef, ObjectStore, S3Credentials, S3Settings};
    use k8s_openapi::api::core::v1::Secret;

    let endpoint = test_env("GPU_TRAINER_TEST_S3_ENDPOINT");
    let region = test_env("GPU_TRAINER_TEST_S3_REGION");
    let bucket = test_env("GPU_TRAINER_TEST_S3_BUCKET");
    let access_key_id = test_env("GPU_TRAINER_TEST_S3_ACCESS_KEY_ID");
    let secret_access_key = test_env("GPU_TRAINER_TEST_S3_SECRET_ACCESS_KEY");

    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "tj-s3").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let (operator, _base) = start_operator(&ns, &fake, &installation);
    let tmp = tempfile::tempdir().unwrap();
    let (href, sha256) = serve_dataset(tmp.path()).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "garage"},
        "stringData": {"AWS_ACCESS_KEY_ID": access_key_id, "AWS_SECRET_ACCESS_KEY": secret_access_key}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();

    let params = serde_json::json!({"steps": 6, "secondsPerStep": 0.25, "saveEvery": 5});
    let mut tj = job("upload", params, &href, &sha256);
    tj.spec.output = Some(
        serde_json::from_value(serde_json::json!({
            "s3": {
                "bucket": bucket,
                "prefix": format!("e2e/{ns}"),
                "endpoint": endpoint,
                "region": region,
                "forcePathStyle": true,
                "credentialsSecretRef": {"name": "garage"}
            }
        }))
        .unwrap(),
    );
    jobs.create(&PostParams::default(), &tj).await.unwrap();
    let done = wait_phase(&jobs, "upload", &operator, TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{status:#?}\n{}", operator.log_tail());
    assert!(
        status.conditions.iter().any(|c| c.type_ == "Uploaded" && c.status == "True"),
        "{:#?}",
        status.conditions
    );

    // The model is reported from S3, with the size and checksum the machine computed.
    let model = status.artifacts.iter().find(|a| a.name == "model").expect("model artifact");
    assert!(model.size_bytes > 0 && model.sha256.as_ref().is_some_and(|s| s.len() == 64), "{model:?}");
    let uri_prefix = format!("s3://{bucket}/");
    let key = model.uri.strip_prefix(&uri_prefix).unwrap_or_else(|| panic!("not in {bucket}: {model:?}"));
    assert!(key.starts_with(&format!("e2e/{ns}/upload-")), "{key}");

    // And it is really there, with that size.
    let settings = S3Settings {
        endpoint: Some(endpoint.clone()),
        region: region.clone(),
        force_path_style: true,
        credentials: S3Credentials { access_key_id, secret_access_key, session_token: None },
    };
    let store = S3Store::new(&settings);
    let head = store.head(&ObjectRef::new(&bucket, key)).await.unwrap().expect("object in Garage");
    assert_eq!(head.size, model.size_bytes);

    // The machine is released after the upload.
    wait_gone(&instances, "upload-1", &operator).await;
    let prefix = format!("gputrainer:{installation}:");
    common::wait_until(TIMEOUT, "the provider to release the machine", || async {
        live_instances(&fake, &prefix).await.is_empty().then_some(())
    })
    .await;
    let reasons = common::event_reasons(&client, &ns, "upload").await;
    assert!(in_order(&reasons, &["TrainingStarted", "Uploaded", "Succeeded"]), "{reasons:?}");
    common::delete_namespace(&client, &ns).await;
}
