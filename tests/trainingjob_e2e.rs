//! The TrainingJob controller end to end: `gpu-trainer run` as a real process, the real API
//! server, `fake-vastai` (in this process) whose machines are this machine over the test sshd,
//! `demo@1` as the trainer and a dataset served over HTTP from this test.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::dataset::serve_dataset;
use common::operator::{
    OperatorOptions, OperatorProcess, installation_id, live_instances, start_fake, work_base,
};
use gpu_trainer::api::{GpuInstance, Reason, TrainingJob, TrainingJobPhase};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

const TIMEOUT: Duration = Duration::from_secs(180);

fn job(name: &str, params: serde_json::Value, href: &str, sha256: &str) -> TrainingJob {
    common::training_job(
        name,
        serde_json::json!({
            "tool": "demo@1",
            "params": params,
            "dataset": {"url": {"href": href, "sha256": sha256}},
            "activeDeadlineSeconds": 900,
            "monitoring": {"pollIntervalSeconds": 5}
        }),
    )
}

/// A temporary remote base under the environment folder and the operator using it.
fn start_operator(
    ns: &str,
    fake: &gpu_trainer::provider::fake::FakeServer,
    installation: &str,
) -> (OperatorProcess, PathBuf) {
    let base = work_base(ns);
    (OperatorProcess::start(&OperatorOptions::new(ns, fake, installation).remote_base(&base)), base)
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

/// Stops a trainer this test left running in the job's work dir.
fn kill_trainer(base: &Path, uid: &str) {
    common::kill_trainer(&base.join(uid));
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
    let done = common::wait_job(&jobs, "lora", &operator, TIMEOUT, TrainingJobPhase::is_finished).await;
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
    // `kubectl describe` tells the story: conditions with reasons and messages, and the events.
    let described = common::kubectl(&["describe", "tj", "lora", "-n", &ns]);
    for needle in ["Conditions:", "DataStaged", "Succeeded", "Events:", "TrainingStarted", "InstanceReady"] {
        assert!(described.contains(needle), "{needle} missing from kubectl describe:\n{described}");
    }
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
    let running = common::wait_job(&jobs, "long", &operator, TIMEOUT, |p| {
        p == TrainingJobPhase::Training || p.is_finished()
    })
    .await;
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
    let failed = common::wait_job(&jobs, "typo", &operator, TIMEOUT, TrainingJobPhase::is_finished).await;
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
    let running = common::wait_job(&jobs, "again", &first, TIMEOUT, |p| {
        p == TrainingJobPhase::Training || p.is_finished()
    })
    .await;
    first.kill();
    let uid = running.uid().unwrap();

    let (second, _) = start_operator(&ns, &fake, &installation);
    let done = common::wait_job(&jobs, "again", &second, TIMEOUT, TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{status:#?}\n{}", second.log_tail());
    assert_eq!(launches(&base, &uid), 1, "training started once");
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
    let done = common::wait_job(&jobs, "late", &operator, TIMEOUT, TrainingJobPhase::is_finished).await;
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

/// How many times training was started in the job's work dir (the launch audit trail).
fn launches(base: &Path, uid: &str) -> usize {
    std::fs::read_to_string(base.join(uid).join("launches")).map(|l| l.lines().count()).unwrap_or(0)
}

/// The launch audit lines of a job (time, pid, machine).
async fn launch_lines(base: &Path, jobs: &Api<TrainingJob>, name: &str) -> Vec<String> {
    let Some(uid) = jobs.get_opt(name).await.ok().flatten().and_then(|j| j.uid()) else { return Vec::new() };
    std::fs::read_to_string(base.join(uid).join("launches"))
        .map(|l| l.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Lines about `job` (its name, or its GpuInstances') from every operator log of the namespace,
/// oldest log first, at most 200.
fn operator_log_lines(namespace: &str, job: &str) -> Vec<String> {
    let prefix = format!("operator-{namespace}-");
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(common::env_dir().join("logs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
        .collect();
    logs.sort();
    let mut lines = Vec::new();
    for (_, log) in logs {
        lines.push(format!("[{}]", log.display()));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        lines.extend(text.lines().filter(|l| l.contains(job)).map(str::to_string));
    }
    let skip = lines.len().saturating_sub(200);
    lines.split_off(skip)
}

/// Everything one job test needs: a namespace, a fake Vast.ai, the operator, a served dataset.
struct JobTest {
    client: kube::Client,
    ns: String,
    fake: gpu_trainer::provider::fake::FakeServer,
    installation: String,
    operator: OperatorProcess,
    base: PathBuf,
    _dataset_dir: tempfile::TempDir,
    href: String,
    sha256: String,
    jobs: Api<TrainingJob>,
    instances: Api<GpuInstance>,
}

impl JobTest {
    async fn start(
        prefix: &str,
        fake_config: impl FnOnce(&mut gpu_trainer::provider::fake::FakeConfig),
        extra_args: &[String],
    ) -> Self {
        let client = common::kube_client().await;
        common::install_crds(&client).await;
        let ns = common::fresh_namespace(&client, prefix).await;
        let fake = start_fake(fake_config).await;
        let installation = installation_id();
        let base = common::env_dir().join("work").join(&ns);
        std::fs::create_dir_all(&base).unwrap();
        let operator = Self::operator(&ns, &fake, &installation, &base, extra_args);
        let tmp = tempfile::tempdir().unwrap();
        let (href, sha256) = serve_dataset(tmp.path()).await;
        JobTest {
            jobs: Api::namespaced(client.clone(), &ns),
            instances: Api::namespaced(client.clone(), &ns),
            client,
            ns,
            fake,
            installation,
            operator,
            base,
            _dataset_dir: tmp,
            href,
            sha256,
        }
    }

    fn operator(
        ns: &str,
        fake: &gpu_trainer::provider::fake::FakeServer,
        installation: &str,
        base: &Path,
        extra_args: &[String],
    ) -> OperatorProcess {
        let mut options = OperatorOptions::new(ns, fake, installation);
        options.args = vec!["--remote-base".into(), base.display().to_string()];
        options.args.extend_from_slice(extra_args);
        OperatorProcess::start(&options)
    }

    fn job(&self, name: &str, params: serde_json::Value) -> TrainingJob {
        job(name, params, &self.href, &self.sha256)
    }

    /// Creates a Secret with string data.
    async fn secret(&self, name: &str, data: serde_json::Value) {
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data
        }))
        .unwrap();
        Api::namespaced(self.client.clone(), &self.ns).create(&PostParams::default(), &secret).await.unwrap();
    }

    /// `spec.output.s3` pointing at the test Garage, with its credentials in a Secret.
    async fn s3_output(&self) -> serde_json::Value {
        self.secret(
            "garage",
            serde_json::json!({
                "AWS_ACCESS_KEY_ID": common::test_env("GPU_TRAINER_TEST_S3_ACCESS_KEY_ID"),
                "AWS_SECRET_ACCESS_KEY": common::test_env("GPU_TRAINER_TEST_S3_SECRET_ACCESS_KEY"),
            }),
        )
        .await;
        serde_json::json!({
            "bucket": common::test_env("GPU_TRAINER_TEST_S3_BUCKET"),
            "prefix": format!("e2e/{}", self.ns),
            "endpoint": common::test_env("GPU_TRAINER_TEST_S3_ENDPOINT"),
            "region": common::test_env("GPU_TRAINER_TEST_S3_REGION"),
            "forcePathStyle": true,
            "credentialsSecretRef": {"name": "garage"}
        })
    }

    async fn wait(&self, name: &str, done: impl Fn(TrainingJobPhase) -> bool) -> TrainingJob {
        common::wait_job(&self.jobs, name, &self.operator, TIMEOUT, done).await
    }

    /// The GpuInstance is deleted and the provider lists no machine of this test.
    async fn wait_released(&self, instance: &str) {
        wait_gone(&self.instances, instance, &self.operator).await;
        let prefix = format!("gputrainer:{}:", self.installation);
        common::wait_until(TIMEOUT, "the provider to release every machine", || async {
            live_instances(&self.fake, &prefix).await.is_empty().then_some(())
        })
        .await;
    }

    fn creates(&self) -> usize {
        self.fake.requests().iter().filter(|r| r.endpoint == "create_instance").count()
    }

    fn operator_log(&self) -> String {
        std::fs::read_to_string(&self.operator.log).unwrap_or_default()
    }

    async fn finish(self) {
        common::delete_namespace(&self.client, &self.ns).await;
    }
}

/// The test Garage, as the test reads it back.
fn garage() -> gpu_trainer::artifacts::s3::S3Store {
    use gpu_trainer::artifacts::{S3Credentials, S3Settings};
    gpu_trainer::artifacts::s3::S3Store::new(&S3Settings {
        endpoint: Some(common::test_env("GPU_TRAINER_TEST_S3_ENDPOINT")),
        region: common::test_env("GPU_TRAINER_TEST_S3_REGION"),
        force_path_style: true,
        credentials: S3Credentials {
            access_key_id: common::test_env("GPU_TRAINER_TEST_S3_ACCESS_KEY_ID"),
            secret_access_key: common::test_env("GPU_TRAINER_TEST_S3_SECRET_ACCESS_KEY"),
            session_token: None,
        },
    })
}

/// The size of `uri` (`s3://bucket/key`) in Garage; `None` when it is not there.
async fn stored_size(uri: &str) -> Option<u64> {
    use gpu_trainer::artifacts::{ObjectRef, ObjectStore};
    let (bucket, key) = uri.strip_prefix("s3://")?.split_once('/')?;
    garage().head(&ObjectRef::new(bucket, key)).await.unwrap().map(|h| h.size)
}

/// The text of `uri` in Garage.
async fn stored_text(uri: &str) -> String {
    use gpu_trainer::artifacts::store::Validity;
    use gpu_trainer::artifacts::{ObjectRef, ObjectStore};
    let (bucket, key) = uri.strip_prefix("s3://").unwrap().split_once('/').unwrap();
    let get = garage()
        .presign_get(&ObjectRef::new(bucket, key), Validity::from_now(Duration::from_secs(60)))
        .await
        .unwrap();
    reqwest::get(&get.url).await.unwrap().error_for_status().unwrap().text().await.unwrap()
}

/// A webhook receiver on loopback: (URL, the JSON bodies received).
async fn webhook() -> (String, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = seen.clone();
    let app = axum::Router::new().route(
        "/hook/{token}",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let store = store.clone();
            async move {
                store.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook/t0k3n-in-path"), seen)
}

async fn webhook_events(
    seen: &std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    wanted: &[&str],
) -> Vec<String> {
    common::wait_until(Duration::from_secs(30), "webhook messages", || async {
        let events: Vec<String> =
            seen.lock().unwrap().iter().filter_map(|m| m["event"].as_str().map(str::to_string)).collect();
        in_order(&events, wanted).then_some(events)
    })
    .await
}

/// A stand-in for the Hugging Face CLI on "the machine": checks the token arrived in `HF_TOKEN`
/// and copies the uploaded folder into `hub/<repo>`, recording its arguments.
fn fake_hf_cli(dir: &Path, token: &str) -> (PathBuf, PathBuf) {
    let hub = dir.join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    let cli = dir.join("hf");
    std::fs::write(
        &cli,
        format!(
            "#!/bin/sh\nset -e\n[ \"$1\" = upload ] || {{ echo \"unexpected: $*\" >&2; exit 2; }}\n\
             [ \"$HF_TOKEN\" = '{token}' ] || {{ echo 'HF_TOKEN is wrong' >&2; exit 3; }}\n\
             mkdir -p '{hub}'/\"$2\"\ncp -R \"$3\"/. '{hub}'/\"$2\"/\nshift 3\necho \"$@\" > '{hub}'/args\n",
            hub = hub.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod").arg("+x").arg(&cli).status().unwrap();
    (cli, hub)
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_job_with_outputs_uploads_model_card_and_checkpoints_verified() {
    const HF_TOKEN: &str = "hf_e2eTokenValue1234";
    let scratch = tempfile::tempdir().unwrap();
    let (cli, hub) = fake_hf_cli(scratch.path(), HF_TOKEN);
    let t = JobTest::start("tj-out", |_| {}, &["--hf-cli".into(), cli.display().to_string()]).await;
    let (hook, seen) = webhook().await;
    t.secret("hf", serde_json::json!({"token": HF_TOKEN})).await;
    t.secret("hook", serde_json::json!({"url": hook})).await;
    let s3 = t.s3_output().await;

    let mut tj = t.job("upload", serde_json::json!({"steps": 12, "secondsPerStep": 0.25, "saveEvery": 5}));
    tj.spec.output = Some(
        serde_json::from_value(serde_json::json!({
            "s3": s3,
            "huggingFace": {"repo": "acme/demo-lora", "tokenSecretRef": {"name": "hf", "key": "token"}}
        }))
        .unwrap(),
    );
    tj.spec.notify = Some(
        serde_json::from_value(serde_json::json!({"webhookSecretRef": {"name": "hook", "key": "url"}}))
            .unwrap(),
    );
    t.jobs.create(&PostParams::default(), &tj).await.unwrap();
    let done = t.wait("upload", TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{status:#?}\n{}", t.operator.log_tail());

    // S3: the model and its card, verified, with what the machine computed.
    let bucket = common::test_env("GPU_TRAINER_TEST_S3_BUCKET");
    let in_s3 = |name: &str| {
        status
            .artifacts
            .iter()
            .find(|a| a.name == name && a.uri.starts_with(&format!("s3://{bucket}/e2e/{}/upload-", t.ns)))
            .unwrap_or_else(|| panic!("no {name} in S3: {:#?}", status.artifacts))
            .clone()
    };
    let model = in_s3("model");
    assert!(model.sha256.as_ref().is_some_and(|s| s.len() == 64), "{model:?}");
    assert_eq!(stored_size(&model.uri).await, Some(model.size_bytes));
    let card = stored_text(&in_s3("model-card").uri).await;
    assert!(card.contains("demo@1") && !card.contains("incomplete"), "{card}");
    // Every checkpoint is in S3 with its size.
    let steps: Vec<u64> = status.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, [5, 10], "{:#?}", status.checkpoints);
    for cp in &status.checkpoints {
        let uri = cp.uri.clone().unwrap_or_else(|| panic!("checkpoint not synced: {cp:?}"));
        assert_eq!(stored_size(&uri).await, cp.size_bytes, "{cp:?}");
    }

    // Hugging Face: the same model file, the card, a private repository, the token only in the
    // CLI's environment.
    let hf_model = status
        .artifacts
        .iter()
        .find(|a| a.uri == "hf://acme/demo-lora/demo.safetensors")
        .expect("model on the Hub");
    assert_eq!(hf_model.sha256, model.sha256);
    assert_eq!(sha256_hex(&hub.join("acme/demo-lora/demo.safetensors")), model.sha256.clone().unwrap());
    assert!(hub.join("acme/demo-lora/README.md").is_file());
    let args = std::fs::read_to_string(hub.join("args")).unwrap();
    assert!(args.contains("--private") && !args.contains(HF_TOKEN), "{args}");

    // Webhook: the success, with the facts.
    let events = webhook_events(&seen, &["Succeeded"]).await;
    assert!(!events.contains(&"Failed".to_string()), "{events:?}");
    let message = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(message["job"]["name"], "upload");
    assert_eq!(message["progress"]["step"], 12);

    // No credential anywhere the operator writes.
    let log = t.operator_log();
    for secret in [
        HF_TOKEN,
        "t0k3n-in-path",
        "X-Amz-Signature",
        &common::test_env("GPU_TRAINER_TEST_S3_SECRET_ACCESS_KEY"),
    ] {
        assert!(!log.contains(secret), "{secret} in the operator log");
    }
    t.wait_released("upload-1").await;
    let reasons = common::event_reasons(&t.client, &t.ns, "upload").await;
    assert!(in_order(&reasons, &["TrainingStarted", "Uploaded", "Succeeded"]), "{reasons:?}");
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_trainer_that_stops_progressing_is_stopped_saved_and_fails_as_stalled() {
    let t = JobTest::start("tj-stall", |_| {}, &[]).await;
    let (hook, seen) = webhook().await;
    t.secret("hook", serde_json::json!({"url": hook})).await;
    let s3 = t.s3_output().await;
    let params = serde_json::json!({"steps": 100, "secondsPerStep": 0.2, "stallAtStep": 5, "saveEvery": 2});
    let mut stalling = t.job("stuck", params);
    stalling.spec.output = Some(serde_json::from_value(serde_json::json!({"s3": s3})).unwrap());
    stalling.spec.notify = Some(
        serde_json::from_value(serde_json::json!({"webhookSecretRef": {"name": "hook", "key": "url"}}))
            .unwrap(),
    );
    // The shortest no-progress timeout the schema allows, and no grace period.
    stalling.spec.monitoring.no_progress_timeout_seconds = 60;
    stalling.spec.monitoring.stall_detection.grace_period_seconds = 0;
    // The stall is detected at least 60 s after the last step, so this warning comes first.
    stalling.spec.soft_deadline_seconds = Some(60);
    t.jobs.create(&PostParams::default(), &stalling).await.unwrap();
    let done = t.wait("stuck", TrainingJobPhase::is_finished).await;
    let uid = done.uid().unwrap();
    let status = done.status.clone().unwrap();
    assert_eq!(
        (status.phase, status.reason),
        (TrainingJobPhase::Failed, Some(Reason::Stalled)),
        "{status:#?}"
    );
    // `stallAtStep: 5` hangs before step 5 completes.
    assert!(status.progress.as_ref().is_some_and(|p| p.step == 4), "{:?}", status.progress);
    // The latest checkpoint is in S3, and the model card there says the run is incomplete.
    let latest = status.checkpoints.iter().max_by_key(|c| c.step).cloned().expect("checkpoints listed");
    assert_eq!(latest.step, 4, "{:#?}", status.checkpoints);
    let uri = latest.uri.clone().unwrap_or_else(|| panic!("latest checkpoint not saved: {status:#?}"));
    assert_eq!(stored_size(&uri).await, latest.size_bytes);
    let card = status.artifacts.iter().find(|a| a.name == "model-card").expect("model card saved");
    let text = stored_text(&card.uri).await;
    assert!(text.contains("incomplete") && text.contains("Stalled"), "{text}");
    let message = status.message.clone().unwrap_or_default();
    assert!(message.contains(&uri), "the message says where the checkpoint went: {message}");
    // The trainer was stopped (the wrapper recorded its exit), then the machine released.
    assert!(t.base.join(&uid).join("exit_code").is_file(), "the trainer was stopped");
    t.wait_released("stuck-1").await;
    let reasons = common::event_reasons(&t.client, &t.ns, "stuck").await;
    assert!(in_order(&reasons, &["TrainingStarted", "Stalled", "Failed"]), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "SoftDeadlineExceeded"), "{reasons:?}");
    assert!(status.conditions.iter().any(|c| c.type_ == "SoftDeadlineExceeded" && c.status == "True"));
    webhook_events(&seen, &["StallDetected", "Terminated"]).await;
    kill_trainer(&t.base, &uid);
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_suspended_job_releases_its_gpu_and_resumes_from_s3_on_a_fresh_machine() {
    let t = JobTest::start("tj-susp", |_| {}, &[]).await;
    let s3 = t.s3_output().await;
    let params = serde_json::json!({"steps": 80, "secondsPerStep": 0.25, "saveEvery": 5});
    let mut tj = t.job("pause", params);
    tj.spec.output = Some(serde_json::from_value(serde_json::json!({"s3": s3})).unwrap());
    t.jobs.create(&PostParams::default(), &tj).await.unwrap();
    common::wait_until(TIMEOUT, "a checkpoint to be written", || async {
        let status = t.jobs.get("pause").await.ok()?.status?;
        (status.phase == TrainingJobPhase::Training && status.progress?.step >= 6).then_some(())
    })
    .await;
    set_suspend(&t.jobs, "pause", true).await;
    let suspended = t.wait("pause", |p| p == TrainingJobPhase::Suspended || p.is_finished()).await;
    let uid = suspended.uid().unwrap();
    let status = suspended.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Suspended, "{status:#?}\n{}", t.operator.log_tail());
    let latest = status.checkpoints.iter().max_by_key(|c| c.step).cloned().expect("checkpoints listed");
    assert!(latest.uri.is_some(), "the latest checkpoint is kept in S3 before the GPU goes: {status:#?}");
    t.wait_released("pause-1").await;

    // The next machine has an empty disk: wipe what the first one left on this shared one.
    std::fs::remove_dir_all(t.base.join(&uid)).unwrap();
    set_suspend(&t.jobs, "pause", false).await;
    let done = t.wait("pause", TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{status:#?}\n{}", t.operator.log_tail());
    assert_eq!(status.attempts, 2);
    assert_eq!(status.instance.as_ref().map(|i| i.name.as_str()), Some("pause-2"));
    assert_eq!(status.resumed_from.as_ref().map(|c| c.step), Some(latest.step), "{status:#?}");
    let log = std::fs::read_to_string(t.base.join(&uid).join("train.log")).unwrap();
    assert!(log.contains(&format!("Resuming from step {}", latest.step)), "{log}");
    t.wait_released("pause-2").await;
    let reasons = common::event_reasons(&t.client, &t.ns, "pause").await;
    let story = ["TrainingStarted", "Suspended", "Resumed", "Restored", "Succeeded"];
    assert!(in_order(&reasons, &story), "{reasons:?}");
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn an_instance_lost_mid_run_is_replaced_and_training_resumes_from_s3() {
    use gpu_trainer::provider::fake::ForcedState;
    let t = JobTest::start("tj-lost", |_| {}, &[]).await;
    let s3 = t.s3_output().await;
    let params = serde_json::json!({"steps": 60, "secondsPerStep": 0.25, "saveEvery": 5});
    let mut tj = t.job("phoenix", params);
    tj.spec.output = Some(serde_json::from_value(serde_json::json!({"s3": s3})).unwrap());
    tj.spec.backoff_limit = 1;
    t.jobs.create(&PostParams::default(), &tj).await.unwrap();
    let (uid, provider_id) = common::wait_until(TIMEOUT, "a checkpoint synced to S3", || async {
        let job = t.jobs.get("phoenix").await.ok()?;
        let status = job.status.clone()?;
        status.checkpoints.iter().any(|c| c.uri.is_some()).then_some(())?;
        Some((job.uid()?, status.instance?.provider_id?))
    })
    .await;

    // The machine dies: the provider reports it exited and its trainer stops where it is.
    let pid: i32 =
        std::fs::read_to_string(t.base.join(&uid).join("train.pid")).unwrap().trim().parse().unwrap();
    t.fake.set_instance_state(provider_id.parse().unwrap(), ForcedState::Exited);
    std::process::Command::new("kill").args(["-STOP", "--"]).arg(format!("-{pid}")).status().unwrap();
    let replaced = common::wait_until(TIMEOUT * 2, "a replacement machine", || async {
        (t.jobs.get("phoenix").await.ok()?.status?.attempts == 2).then_some(())
    });
    if tokio::time::timeout(TIMEOUT, replaced).await.is_err() {
        panic!("no replacement machine within {TIMEOUT:?}; the operator's log:\n{}", t.operator.log_tail());
    }
    // Its disk goes with it (the replacement shares this machine's disk in the test).
    std::fs::remove_dir_all(t.base.join(&uid)).unwrap();
    std::process::Command::new("kill").args(["-KILL", "--"]).arg(format!("-{pid}")).status().unwrap();

    let done = t.wait("phoenix", TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{status:#?}\n{}", t.operator.log_tail());
    assert_eq!(status.attempts, 2);
    let from = status.resumed_from.clone().unwrap_or_else(|| panic!("not resumed: {status:#?}"));
    assert!(from.step >= 5, "{from:?}");
    let log = std::fs::read_to_string(t.base.join(&uid).join("train.log")).unwrap();
    assert!(log.contains(&format!("Resuming from step {}", from.step)), "{log}");
    assert_eq!(launches(&t.base, &uid), 1, "one start on the replacement machine");
    assert_eq!(t.creates(), 2, "exactly one replacement rented");
    t.wait_released("phoenix-2").await;
    let reasons = common::event_reasons(&t.client, &t.ns, "phoenix").await;
    assert!(in_order(&reasons, &["TrainingStarted", "Restored", "Succeeded"]), "{reasons:?}");
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_job_is_stopped_before_it_would_cross_its_budget() {
    // One offer at $36/h: a cent a second. The budget (60 s of it) leaves time for renting, booting
    // and staging on a busy machine before training shows progress.
    let scratch = tempfile::tempdir().unwrap();
    let catalogue = scratch.path().join("offers.json");
    std::fs::write(
        &catalogue,
        r#"[{"dph_base": 36.0, "dph_total": 36.0, "reliability": 0.99, "reliability2": 0.99}]"#,
    )
    .unwrap();
    let t = JobTest::start("tj-budget", |c| c.catalogue = Some(catalogue.clone()), &[]).await;
    let mut tj = t.job("pricey", serde_json::json!({"steps": 2000, "secondsPerStep": 0.25}));
    tj.spec.resources.max_price_per_hour = Some(40.0);
    tj.spec.budget = Some(serde_json::from_value(serde_json::json!({"maxTotalCost": 0.6})).unwrap());
    t.jobs.create(&PostParams::default(), &tj).await.unwrap();
    let done = t.wait("pricey", TrainingJobPhase::is_finished).await;
    let uid = done.uid().unwrap();
    let status = done.status.clone().unwrap();
    assert_eq!(
        (status.phase, status.reason),
        (TrainingJobPhase::Failed, Some(Reason::BudgetExceeded)),
        "{status:#?}\n{}",
        t.operator.log_tail()
    );
    let cost = status.cost.clone().expect("cost in status");
    // The offer's $36/h plus the disk's storage charge.
    assert!(cost.price_per_hour.is_some_and(|p| (36.0..37.0).contains(&p)), "{cost:?}");
    assert!(cost.accrued <= 0.6, "stopped before crossing the budget: {cost:?}");
    assert!(cost.accrued >= 0.3, "it ran for a while first: {cost:?}");
    assert!(status.progress.as_ref().is_some_and(|p| p.step > 0 && p.step < 2000), "{:?}", status.progress);
    t.wait_released("pricey-1").await;
    kill_trainer(&t.base, &uid);
    t.finish().await;
}

/// One row of the controller-kill table.
struct KillTrial {
    job: String,
    /// When the operator was killed (after the round began) and the job's phase then.
    kills: Vec<(Duration, String)>,
    outcome: String,
    launches: usize,
    machines: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn the_controller_killed_at_random_moments_never_loses_or_repeats_work() {
    use rand::Rng;
    const ROUNDS: usize = 5;
    const JOBS_PER_ROUND: usize = 4;
    let mut t = JobTest::start("tj-kill", |_| {}, &[]).await;
    let mut trials: Vec<KillTrial> = Vec::new();
    for round in 0..ROUNDS {
        let names: Vec<String> = (0..JOBS_PER_ROUND).map(|i| format!("r{round}-j{i}")).collect();
        let started = tokio::time::Instant::now();
        // Jobs are applied at staggered moments while the operator is killed twice at random:
        // early (renting, booting) and later (staging, training, uploading).
        let creator = {
            let (jobs, names) = (t.jobs.clone(), names.clone());
            let specs: Vec<TrainingJob> = names
                .iter()
                .map(|n| t.job(n, serde_json::json!({"steps": 16, "secondsPerStep": 0.25, "saveEvery": 4})))
                .collect();
            tokio::spawn(async move {
                for spec in specs {
                    let offset = Duration::from_millis(rand::rng().random_range(0..3000));
                    tokio::time::sleep(offset).await;
                    jobs.create(&PostParams::default(), &spec).await.unwrap();
                }
                names
            })
        };
        let kill_times = [
            Duration::from_millis(rand::rng().random_range(500..8000)),
            Duration::from_millis(rand::rng().random_range(8000..20000)),
        ];
        let mut kills: Vec<(Duration, Vec<(String, String)>)> = Vec::new();
        for at in kill_times {
            tokio::time::sleep_until(started + at).await;
            let when = started.elapsed();
            kills.push((when, kill_and_restart(&mut t, &names).await));
        }
        creator.await.unwrap();
        for name in &names {
            let done = t.wait(name, TrainingJobPhase::is_finished).await;
            let status = done.status.clone().unwrap();
            let uid = done.uid().unwrap();
            trials.push(KillTrial {
                job: name.clone(),
                kills: kills
                    .iter()
                    .map(|(at, phases)| {
                        let phase = phases.iter().find(|(n, _)| n == name).map(|(_, p)| p.clone());
                        (*at, phase.unwrap_or_default())
                    })
                    .collect(),
                outcome: format!("{:?}", status.phase),
                launches: launches(&t.base, &uid),
                machines: status.attempts as usize,
            });
        }
        for name in &names {
            t.wait_released(&format!("{name}-1")).await;
        }
    }
    println!(
        "\nthe operator killed (SIGKILL) and restarted twice per round, {JOBS_PER_ROUND} jobs per round"
    );
    println!(
        "{:<7} {:<42} {:<10} {:>8} {:>8}",
        "job", "kills: time (phase then)", "outcome", "launches", "machines"
    );
    for trial in &trials {
        let kills: Vec<String> =
            trial.kills.iter().map(|(at, phase)| format!("{:.1}s ({phase})", at.as_secs_f64())).collect();
        println!(
            "{:<7} {:<42} {:<10} {:>8} {:>8}",
            trial.job,
            kills.join(", "),
            trial.outcome,
            trial.launches,
            trial.machines
        );
    }
    assert!(trials.len() >= 20);
    let bad: Vec<&KillTrial> =
        trials.iter().filter(|t| t.outcome != "Succeeded" || t.launches != 1 || t.machines != 1).collect();
    for trial in &bad {
        // What the operators said about it, so a rare failure in CI can be understood.
        println!("\n--- {}: launches {:?}", trial.job, launch_lines(&t.base, &t.jobs, &trial.job).await);
        for line in operator_log_lines(&t.ns, &trial.job) {
            println!("{line}");
        }
    }
    assert!(bad.is_empty(), "{} trials lost or repeated work (see the table)", bad.len());
    assert_eq!(t.creates(), trials.len(), "one machine rented per job");
    let prefix = format!("gputrainer:{}:", t.installation);
    assert!(live_instances(&t.fake, &prefix).await.is_empty(), "no machine left");
    t.finish().await;
}

/// Kills the operator (SIGKILL), records the phase of each job of the round, starts a new one.
async fn kill_and_restart(t: &mut JobTest, names: &[String]) -> Vec<(String, String)> {
    t.operator.kill();
    let mut phases = Vec::new();
    for name in names {
        let phase = match t.jobs.get_opt(name).await.unwrap() {
            Some(job) => format!("{:?}", job.status.unwrap_or_default().phase),
            None => "not created".into(),
        };
        phases.push((name.clone(), phase));
    }
    t.operator = JobTest::operator(&t.ns, &t.fake, &t.installation, &t.base, &[]);
    phases
}

/// The operator dies at each step of renting a job's machine (before and after the create-pending
/// mark, after the rent call, after recording the instance id) and right after a finished job
/// released its machine, and is started again: every job still succeeds on one machine, rented
/// once, with training started once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_job_whose_operator_dies_at_a_critical_step_still_uses_one_machine() {
    let mut t = JobTest::start("tj-rentcrash", |_| {}, &[]).await;
    t.operator.kill();
    let steps = [
        "before-pending-mark",
        "after-pending-mark",
        "after-rent",
        "after-recording-id",
        "after-job-release",
    ];
    let mut rows = Vec::new();
    for step in steps {
        let name = format!("crash-{step}");
        let creates_before = t.creates();
        let mut options = OperatorOptions::new(&t.ns, &t.fake, &t.installation);
        options.args = vec!["--remote-base".into(), t.base.display().to_string()];
        options.env.push(("GPU_TRAINER_CRASH_AT", step.to_string()));
        let mut crashing = OperatorProcess::start(&options);
        let spec = t.job(&name, serde_json::json!({"steps": 8, "secondsPerStep": 0.1, "saveEvery": 4}));
        t.jobs.create(&PostParams::default(), &spec).await.unwrap();
        let exit = crashing.wait_exit(TIMEOUT).await;
        assert!(!exit.success(), "{step}: the operator stopped at the crash point");
        t.operator = JobTest::operator(&t.ns, &t.fake, &t.installation, &t.base, &[]);
        let done = t.wait(&name, TrainingJobPhase::is_finished).await;
        let status = done.status.clone().unwrap();
        let uid = done.uid().unwrap();
        t.wait_released(&format!("{name}-1")).await;
        let creates = t.creates() - creates_before;
        let row = (step, format!("{:?}", status.phase), status.attempts, creates, launches(&t.base, &uid));
        if row.1 != "Succeeded" || row.2 != 1 || row.4 != 1 {
            println!("--- {name}: launches {:?}", launch_lines(&t.base, &t.jobs, &name).await);
            for line in operator_log_lines(&t.ns, &name) {
                println!("{line}");
            }
        }
        t.operator.kill();
        rows.push(row);
    }
    println!("\n{:<22} {:<10} {:>8} {:>8} {:>8}", "crash at", "outcome", "machines", "rents", "launches");
    for (step, outcome, machines, rents, launched) in &rows {
        println!("{step:<22} {outcome:<10} {machines:>8} {rents:>8} {launched:>8}");
    }
    for (step, outcome, machines, rents, launched) in &rows {
        assert_eq!(
            (outcome.as_str(), *machines, *launched),
            ("Succeeded", 1, 1),
            "{step}: one machine, training started once"
        );
        assert_eq!(*rents, 1, "{step}: rented once");
    }
    t.operator = JobTest::operator(&t.ns, &t.fake, &t.installation, &t.base, &[]);
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn without_allow_private_endpoints_a_loopback_s3_endpoint_and_webhook_are_refused() {
    let mut t = JobTest::start("tj-policy", |_| {}, &[]).await;
    // The same operator, but holding jobs' URLs to the address policy.
    t.operator.kill();
    let mut options = OperatorOptions::new(&t.ns, &t.fake, &t.installation);
    options.args = vec!["--remote-base".into(), t.base.display().to_string()];
    options.allow_private_endpoints = false;
    t.operator = OperatorProcess::start(&options);
    let (hook, seen) = webhook().await;
    t.secret("hook", serde_json::json!({"url": hook})).await;
    let s3 = t.s3_output().await;
    let mut tj = t.job("strict", serde_json::json!({"steps": 3, "secondsPerStep": 0.1}));
    tj.spec.output = Some(serde_json::from_value(serde_json::json!({"s3": s3})).unwrap());
    tj.spec.notify = Some(
        serde_json::from_value(serde_json::json!({"webhookSecretRef": {"name": "hook", "key": "url"}}))
            .unwrap(),
    );
    t.jobs.create(&PostParams::default(), &tj).await.unwrap();
    let done = t.wait("strict", TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Failed, "{status:#?}\n{}", t.operator.log_tail());
    assert_eq!(status.reason, Some(Reason::UploadFailed), "{status:#?}");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("the S3 endpoint in spec.output.s3.endpoint")
            && message.contains("a loopback address")
            && message.contains("--allow-private-endpoints"),
        "{message}"
    );
    t.wait_released("strict-1").await;

    // The webhook: a Warning naming the Secret and key, without the URL's token; nothing sent.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(t.client.clone(), &t.ns);
    let note = common::wait_until(Duration::from_secs(30), "a NotifyFailed event", || async {
        events.list(&ListParams::default()).await.unwrap().items.into_iter().find_map(|e| {
            (e.reason.as_deref() == Some("NotifyFailed") && e.type_.as_deref() == Some("Warning"))
                .then(|| e.note.unwrap_or_default())
        })
    })
    .await;
    let secret = format!("the webhook URL in Secret {}/hook key `url`", t.ns);
    assert!(note.contains(&secret) && note.contains("a loopback address"), "{note}");
    assert!(!note.contains("t0k3n-in-path") && !t.operator_log().contains("t0k3n-in-path"), "{note}");
    assert!(seen.lock().unwrap().is_empty(), "the webhook got {:?}", seen.lock().unwrap());
    t.finish().await;
}
