//! `spec.dataset.s3` end to end, against Garage (which checks SigV4 signatures): the operator
//! (`gpu-trainer run`, real API server, `fake-vastai` whose machines are this machine over the
//! test sshd) presigns a GET and the machine downloads, verifies and unpacks the archive; a wrong
//! `sha256` fails the job naming the field; `gpu-trainer launch` does the same from a terminal.
//! The presigned URL's signature never shows up in the operator's log, the job's status or its
//! events.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::operator::{
    OperatorOptions, OperatorProcess, installation_id, live_instances, start_fake, work_base,
};
use gpu_trainer::api::{Reason, TrainingJob, TrainingJobPhase};
use gpu_trainer::artifacts::s3::S3Store;
use gpu_trainer::artifacts::store::Validity;
use gpu_trainer::artifacts::{ObjectRef, ObjectStore, S3Credentials, S3Settings};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};

const TIMEOUT: Duration = Duration::from_secs(180);

/// Garage from `tests/env/up.sh`.
struct Garage {
    endpoint: String,
    region: String,
    bucket: String,
    access_key_id: String,
    secret_access_key: String,
}

impl Garage {
    fn from_env() -> Self {
        Self {
            endpoint: common::test_env("GPU_TRAINER_TEST_S3_ENDPOINT"),
            region: common::test_env("GPU_TRAINER_TEST_S3_REGION"),
            bucket: common::test_env("GPU_TRAINER_TEST_S3_BUCKET"),
            access_key_id: common::test_env("GPU_TRAINER_TEST_S3_ACCESS_KEY_ID"),
            secret_access_key: common::test_env("GPU_TRAINER_TEST_S3_SECRET_ACCESS_KEY"),
        }
    }

    fn store(&self) -> S3Store {
        S3Store::new(&S3Settings {
            endpoint: Some(self.endpoint.clone()),
            region: self.region.clone(),
            force_path_style: true,
            credentials: S3Credentials {
                access_key_id: self.access_key_id.clone(),
                secret_access_key: self.secret_access_key.clone(),
                session_token: None,
            },
        })
    }

    /// The operator's (or the launcher's) environment for this storage.
    fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_ENDPOINT_URL_S3", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("GPU_TRAINER_S3_FORCE_PATH_STYLE", "true".into()),
        ]
    }

    /// Packs a small dataset with `gpu-trainer dataset pack` and uploads it under `key`.
    /// Returns the archive's SHA-256.
    async fn put_dataset(&self, dir: &Path, key: &str) -> String {
        let (archive, sha256) = common::dataset::pack_dataset(dir);
        let body = std::fs::read(&archive).unwrap();
        let put = self
            .store()
            .presign_put(
                &ObjectRef::new(&self.bucket, key),
                body.len() as u64,
                Validity::from_now(Duration::from_secs(300)),
            )
            .await
            .unwrap();
        let mut request = reqwest::Client::new().put(&put.url);
        // The signed content-length is the body's, which reqwest sends itself.
        for (name, value) in put.headers.iter().filter(|(n, _)| n != "content-length") {
            request = request.header(name, value);
        }
        let request = request.body(body);
        let response = request.send().await.unwrap();
        assert!(response.status().is_success(), "upload to Garage: {}", response.status());
        sha256
    }
}

fn job(name: &str, dataset: serde_json::Value, output: Option<serde_json::Value>) -> TrainingJob {
    let mut spec = serde_json::json!({
        "tool": "demo@1",
        "params": {"steps": 4, "secondsPerStep": 0.1},
        "dataset": {"s3": dataset},
        "activeDeadlineSeconds": 900,
        "monitoring": {"pollIntervalSeconds": 5}
    });
    if let Some(output) = output {
        spec["output"] = output;
    }
    common::training_job(name, spec)
}

fn start_operator(
    ns: &str,
    fake: &gpu_trainer::provider::fake::FakeServer,
    installation: &str,
    env: Vec<(&'static str, String)>,
) -> OperatorProcess {
    let mut options = OperatorOptions::new(ns, fake, installation).remote_base(&work_base(ns));
    options.env = env;
    OperatorProcess::start(&options)
}

/// Nothing the operator wrote down carries the presigned URL's signature.
async fn assert_no_signature(client: &kube::Client, ns: &str, job: &TrainingJob, operator: &OperatorProcess) {
    let log = std::fs::read_to_string(&operator.log).unwrap();
    assert!(!log.contains("X-Amz-Signature"), "the operator log holds a presigned URL");
    assert!(!log.contains("X-Amz-Credential"), "the operator log holds a presigned URL");
    let status = serde_json::to_string(&job.status).unwrap();
    assert!(!status.contains("X-Amz-"), "{status}");
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    for event in events.list(&ListParams::default()).await.unwrap() {
        let note = event.note.unwrap_or_default();
        assert!(!note.contains("X-Amz-"), "{note}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn an_s3_dataset_is_downloaded_by_the_machine_and_the_job_succeeds() {
    let garage = Garage::from_env();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "ds-s3").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    // No AWS_* for the operator: the dataset is read with output.s3's connection (same bucket).
    let operator = start_operator(&ns, &fake, &installation, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    let key = format!("datasets/{ns}/photos.tar");
    let sha256 = garage.put_dataset(tmp.path(), &key).await;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "garage"},
        "stringData": {
            "AWS_ACCESS_KEY_ID": garage.access_key_id,
            "AWS_SECRET_ACCESS_KEY": garage.secret_access_key
        }
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let tj = job(
        "from-s3",
        serde_json::json!({"bucket": garage.bucket, "key": key, "sha256": sha256}),
        Some(serde_json::json!({"s3": {
            "bucket": garage.bucket,
            "prefix": format!("e2e/{ns}"),
            "endpoint": garage.endpoint,
            "region": garage.region,
            "forcePathStyle": true,
            "credentialsSecretRef": {"name": "garage"}
        }})),
    );
    jobs.create(&PostParams::default(), &tj).await.unwrap();
    let done = common::wait_job(&jobs, "from-s3", &operator, TIMEOUT, TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{status:#?}\n{}", operator.log_tail());
    let staged = status.conditions.iter().find(|c| c.type_ == "DataStaged").expect("DataStaged");
    assert_eq!(staged.status, "True");
    assert!(staged.message.contains(&format!("s3://{}/{key}", garage.bucket)), "{}", staged.message);
    assert!(staged.message.contains(&sha256[..12]), "{}", staged.message);
    assert_no_signature(&client, &ns, &done, &operator).await;
    let prefix = format!("gputrainer:{installation}:");
    common::wait_until(TIMEOUT, "the provider to release the machine", || async {
        live_instances(&fake, &prefix).await.is_empty().then_some(())
    })
    .await;
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_wrong_s3_dataset_checksum_fails_the_job_naming_the_field() {
    let garage = Garage::from_env();
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "ds-sha").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    // The operator's own settings read the dataset (no output.s3 in the job).
    let operator = start_operator(&ns, &fake, &installation, garage.aws_env());
    let tmp = tempfile::tempdir().unwrap();
    let key = format!("datasets/{ns}/photos.tar");
    let actual = garage.put_dataset(tmp.path(), &key).await;
    let wrong = "0".repeat(64);

    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let tj = job("bad-sha", serde_json::json!({"bucket": garage.bucket, "key": key, "sha256": wrong}), None);
    jobs.create(&PostParams::default(), &tj).await.unwrap();
    let done = common::wait_job(&jobs, "bad-sha", &operator, TIMEOUT, TrainingJobPhase::is_finished).await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, TrainingJobPhase::Failed, "{status:#?}");
    assert_eq!(status.reason, Some(Reason::ChecksumMismatch), "{status:#?}");
    let message = status.message.clone().unwrap_or_default();
    assert!(message.contains("spec.dataset.s3.sha256"), "{message}");
    // The machine did download the archive: the checksum it reports is the real one.
    assert!(message.contains(&wrong) && message.contains(&actual), "{message}");
    assert_no_signature(&client, &ns, &done, &operator).await;
    let prefix = format!("gputrainer:{installation}:");
    common::wait_until(TIMEOUT, "the provider to release the machine", || async {
        live_instances(&fake, &prefix).await.is_empty().then_some(())
    })
    .await;
    common::delete_namespace(&client, &ns).await;
}

/// `gpu-trainer launch` (this machine as the GPU machine) with Garage's settings as `AWS_*`.
fn launch(job: &Path, garage: &Garage, extra: &[&str]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpu-trainer"));
    command
        .arg("launch")
        .arg(job)
        .args([
            "--tools-dir",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/tools").to_str().unwrap(),
        ])
        .args(extra);
    for (name, value) in garage.aws_env() {
        command.env(name, value);
    }
    let out: Output = command.output().unwrap();
    let code = if out.status.success() { "exit 0" } else { "exit failure" };
    format!("{code}\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn launch_stages_an_s3_dataset_with_its_own_credentials() {
    let garage = Garage::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let key = format!("datasets/launch-{:08x}/photos.tar", rand::random::<u32>());
    let sha256 = garage.put_dataset(tmp.path(), &key).await;
    let write_job = |sha: &str| {
        let job = tmp.path().join("job.yaml");
        std::fs::write(
            &job,
            format!(
                "apiVersion: gputrainer.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: t}}\nspec:\n  tool: demo@1\n  \
                 params: {{steps: 4, secondsPerStep: 0.05}}\n  dataset: {{s3: {{bucket: {}, key: \"{key}\", sha256: \"{sha}\"}}}}\n",
                garage.bucket
            ),
        )
        .unwrap();
        job
    };
    let job = write_job(&sha256);
    let all = tokio::task::block_in_place(|| launch(&job, &garage, &[]));
    assert!(all.starts_with("exit 0"), "{all}");
    assert!(all.contains("t: Succeeded"), "{all}");
    let state = std::fs::read_to_string(tmp.path().join(".gpu-trainer/t.json")).unwrap();
    assert!(
        state.contains(&format!("dataset from s3://{}/{key} (sha256 {}", garage.bucket, &sha256[..12])),
        "{state}"
    );
    assert!(!all.contains("X-Amz-Signature") && !state.contains("X-Amz-"), "{all}\n{state}");

    let wrong = "f".repeat(64);
    let job = write_job(&wrong);
    let all = tokio::task::block_in_place(|| launch(&job, &garage, &["--restart"]));
    assert!(all.starts_with("exit failure"), "{all}");
    assert!(all.contains("spec.dataset.s3.sha256 is ffff"), "{all}");
    assert!(all.contains(&sha256), "the archive's real checksum is reported: {all}");
    assert!(!all.contains("X-Amz-Signature"), "{all}");
}

/// `launch` with `spec.output.s3`: the model and its card go to the store as in a cluster (the
/// machine uploads through presigned URLs, verified after), with the credentials from a
/// `--secret` file; the status lists the verified objects and the store has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn launch_uploads_and_verifies_the_model_to_s3_like_the_controller() {
    let garage = Garage::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let dataset = tmp.path().join("data");
    std::fs::create_dir_all(&dataset).unwrap();
    std::fs::write(dataset.join("a.txt"), "hello").unwrap();
    let prefix = format!("launch-out-{:08x}", rand::random::<u32>());
    let credentials = tmp.path().join("store.env");
    std::fs::write(
        &credentials,
        format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n",
            garage.access_key_id, garage.secret_access_key
        ),
    )
    .unwrap();
    let job = tmp.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "apiVersion: gputrainer.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: t}}\nspec:\n  tool: demo@1\n  \
             params: {{steps: 6, secondsPerStep: 0.02, saveEvery: 2}}\n  dataset: {{local: {{path: data}}}}\n  \
             output: {{s3: {{bucket: {}, prefix: {prefix}, credentialsSecretRef: {{name: store}}}}}}\n",
            garage.bucket
        ),
    )
    .unwrap();
    let secret = format!("store={}", credentials.display());
    let all = tokio::task::block_in_place(|| launch(&job, &garage, &["--secret", &secret]));
    assert!(all.starts_with("exit 0"), "{all}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join(".gpu-trainer/t.json")).unwrap()).unwrap();
    let status = &state["status"];
    assert_eq!(status["phase"], "Succeeded", "{status}");
    let uploaded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Uploaded").unwrap();
    assert!(uploaded["message"].as_str().unwrap().starts_with("uploaded and verified"), "{uploaded}");
    let model = status["artifacts"].as_array().unwrap().iter().find(|a| a["name"] == "model").unwrap();
    let uri = model["uri"].as_str().unwrap();
    assert!(uri.starts_with(&format!("s3://{}/{prefix}/", garage.bucket)), "{uri}");
    let stored = garage.store().list(&garage.bucket, &prefix).await.unwrap();
    let key = uri.strip_prefix(&format!("s3://{}/", garage.bucket)).unwrap();
    let found = stored.iter().find(|(o, _)| o.key == key).unwrap_or_else(|| panic!("{key} in {stored:?}"));
    assert_eq!(found.1, model["sizeBytes"].as_u64().unwrap());
    assert!(stored.iter().any(|(o, _)| o.key.ends_with("README.md")), "the model card: {stored:?}");
    assert!(!all.contains(&garage.secret_access_key), "no credential in the output");
    assert!(
        !std::fs::read_to_string(tmp.path().join(".gpu-trainer/t.json"))
            .unwrap()
            .contains(&garage.secret_access_key)
    );
}
