//! `TrainingJob`: one training run, from renting a GPU to a verified model in storage.
// kube's `printcolumn(...)` repeats keys like `type_` across columns, which clippy misreads as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

use super::{
    EnvVar, MachineRequirements, ProviderSpec, Reason, SecretKeyRef, SecretRef, common::default_true, schema,
};

/// A training run on a rented GPU. The operator rents a machine matching `resources`, ships the
/// dataset and the tool's recipe to it, runs the tool, follows its progress, uploads the results
/// to `output`, and always releases the machine.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "gputrainer.dev",
    version = "v1alpha1",
    kind = "TrainingJob",
    doc = "A training run on a rented GPU: rent, stage, train, follow progress, upload, release.",
    plural = "trainingjobs",
    shortname = "tj",
    category = "gputrainer",
    namespaced,
    status = "TrainingJobStatus",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.percentText",
        description = "Training progress"
    ),
    printcolumn(
        name = "GPU",
        type_ = "string",
        json_path = ".status.instance.gpu",
        description = "Rented GPU"
    ),
    printcolumn(
        name = "$/H",
        type_ = "number",
        json_path = ".status.cost.pricePerHour",
        description = "Price per hour in USD"
    ),
    printcolumn(
        name = "Cost",
        type_ = "number",
        json_path = ".status.cost.accrued",
        description = "Cost so far in USD"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = spec_schema)]
pub struct TrainingJobSpec {
    /// Training tool as `name@version`, from the tool registry (`gpu-trainer tools list`),
    /// e.g. `flux-lora@1` or `demo@1`.
    #[schemars(pattern(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?@[1-9][0-9]{0,5}$"))]
    pub tool: String,
    /// Tool parameters. Keys and types are checked against the tool's parameter list
    /// (`gpu-trainer tools show NAME@VERSION`); unknown keys are an error.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "schema::tool_params")]
    pub params: BTreeMap<String, serde_json::Value>,
    /// The training data: exactly one of `s3`, `url` or `local`.
    pub dataset: DatasetSource,
    /// Where the trained model goes: `s3` and/or `huggingFace`. Without it nothing is uploaded:
    /// the job lists its results in `status.artifacts` and they are lost when the machine is
    /// released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,
    /// The machine to rent.
    #[serde(default)]
    pub resources: MachineRequirements,
    /// Where the GPU comes from. Defaults to the Vast.ai marketplace.
    #[serde(default)]
    pub provider: ProviderSpec,
    /// Environment variables for the trainer. Use `valueFrom.secretKeyRef` for tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
    /// Spending limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Hard wall-clock limit in seconds, provisioning included. When it passes the job is stopped,
    /// the latest checkpoint uploaded, and the job fails with `DeadlineExceeded`. Default 4 hours.
    #[serde(default = "default_active_deadline")]
    #[schemars(range(min = 60, max = 2_592_000))]
    pub active_deadline_seconds: i64,
    /// Soft wall-clock limit in seconds: a Warning event and condition, the job keeps running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 2_592_000))]
    pub soft_deadline_seconds: Option<i64>,
    /// How many replacement machines to rent after a machine is lost or fails to boot. Training
    /// resumes from the latest synced checkpoint when the tool supports it. Default 3.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 20))]
    pub backoff_limit: i32,
    /// Suspend the job: checkpoint, upload, release the GPU. Setting it back to false resumes on a
    /// new machine from the checkpoint.
    #[serde(default)]
    pub suspend: bool,
    /// Delete the job this many seconds after it finished. Unset keeps it forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// How progress is followed and stalls detected.
    #[serde(default)]
    pub monitoring: MonitoringSpec,
    /// Notifications besides Kubernetes events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
}

/// What the API server checks across the spec's fields and between a job and its previous
/// version. What a running job is built from (the tool and its parameters, the data, the machine
/// and where it comes from) cannot change under it: a machine already rented, a dataset already
/// staged and a trainer already started would no longer match the spec. `suspend`, the
/// deadlines, the budget, the TTL, monitoring, output and notifications stay editable.
fn spec_schema(s: &mut Schema) {
    schema::cel_rule(
        s,
        "!has(self.softDeadlineSeconds) || !has(self.activeDeadlineSeconds) \
         || self.softDeadlineSeconds < self.activeDeadlineSeconds",
        "softDeadlineSeconds",
        "spec.softDeadlineSeconds must be below spec.activeDeadlineSeconds (the soft deadline warns \
         before the hard one stops the job)",
    );
    // A known gap in `params`: the API server compares the keys of a free-form object from one
    // side only (k8s.io/apiserver, pkg/cel/common/valuesunstructured.go, as of 1.37), so renaming
    // a key while keeping the number of keys and the value passes. Changed values, added and
    // removed keys are refused; a renamed key that the tool does not know is still refused by the
    // controller's parameter check.
    for field in ["tool", "params", "dataset", "resources", "provider"] {
        schema::immutable(s, field, &format!("spec.{field}"), "TrainingJob");
    }
}

fn default_active_deadline() -> i64 {
    4 * 3600
}

fn default_backoff_limit() -> i32 {
    3
}

/// The training data. Exactly one source is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = dataset_schema)]
pub struct DatasetSource {
    /// A tar archive in S3-compatible storage. The machine downloads it through a presigned GET
    /// valid for 15 minutes; storage credentials never leave the operator. It is read with the
    /// connection of `output.s3` (endpoint, region, forcePathStyle, credentialsSecretRef) when
    /// that names the same bucket; otherwise with the operator's own settings (`AWS_*`
    /// environment), or, when the operator has none, with `output.s3`'s connection. With
    /// neither, the job fails at staging naming this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Dataset>,
    /// A tar archive at an HTTP(S) URL the machine downloads itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlDataset>,
    /// A folder on the machine running `gpu-trainer launch` (command line only; refused in a
    /// cluster). It is packed deterministically and uploaded over SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalDataset>,
}

fn dataset_schema(s: &mut Schema) {
    schema::exactly_one_of(s, &["s3", "url", "local"]);
}

const SHA256_PATTERN: &str = r"^[0-9a-f]{64}$";

/// A dataset archive in S3-compatible storage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Dataset {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Object key of the tar archive (as made by `gpu-trainer dataset pack`).
    #[schemars(length(min = 1, max = 1024))]
    pub key: String,
    /// Expected SHA-256 of the archive, lower-case hex. Checked on the machine before unpacking;
    /// a mismatch fails the job (reason `ChecksumMismatch`). Unset: the archive's checksum is
    /// computed and reported, not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SHA256_PATTERN))]
    pub sha256: Option<String>,
}

/// A dataset archive at a URL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UrlDataset {
    /// HTTP or HTTPS URL of the tar archive.
    #[schemars(pattern(r"^https?://[^\s]+$"), length(max = 4096))]
    pub href: String,
    /// Expected SHA-256 of the archive, lower-case hex. Checked on the machine before unpacking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(SHA256_PATTERN))]
    pub sha256: Option<String>,
}

/// A local dataset folder (command line only).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalDataset {
    /// Path of the folder, relative to the job file.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

/// Where results go. At least one destination is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = output_schema)]
pub struct OutputSpec {
    /// S3-compatible storage (AWS S3, Cloudflare R2, MinIO, Garage). The machine uploads through
    /// presigned URLs; credentials stay with the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Output>,
    /// A Hugging Face model repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceOutput>,
}

fn output_schema(s: &mut Schema) {
    schema::at_least_one_of(s, &["s3", "huggingFace"]);
}

/// An S3 destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Output {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Key prefix; objects are stored under `<prefix>/<job name>-<job uid>/`. Unset stores them
    /// under `<job name>-<job uid>/` at the top of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub prefix: Option<String>,
    /// Upload every new checkpoint while training runs, so a replacement machine can resume from
    /// it. Default true.
    #[serde(default = "default_true")]
    pub sync_checkpoints: bool,
    /// Endpoint of an S3-compatible service, e.g. `https://<account>.r2.cloudflarestorage.com`.
    /// Unset uses the operator's default (`AWS_ENDPOINT_URL_S3`), or AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^https?://[^\s/]+(/.*)?$"), length(max = 2048))]
    pub endpoint: Option<String>,
    /// Signing region; Cloudflare R2 uses `auto`. Unset uses the operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket/key` instead of `bucket.endpoint/key` (MinIO, Garage).
    /// Unset uses the operator's default (virtual-hosted style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_path_style: Option<bool>,
    /// Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (optionally
    /// `AWS_SESSION_TOKEN`). Read by the operator only: the machine receives presigned URLs.
    /// Unset uses the operator's own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A Hugging Face destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceOutput {
    /// Repository id as `owner/name`.
    #[schemars(pattern(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"), length(max = 200))]
    pub repo: String,
    /// Create the repository as private. Default true.
    #[serde(default = "default_true")]
    pub private: bool,
    /// Secret key holding a Hugging Face token with write access. It reaches the machine only as
    /// the `HF_TOKEN` environment variable of the upload command.
    pub token_secret_ref: SecretKeyRef,
}

/// Spending limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// Highest total cost in US dollars across all machines of this job. The job is stopped
    /// (checkpoint uploaded) before the next poll would cross it, and fails with `BudgetExceeded`.
    #[schemars(range(min = 0.01, max = 1_000_000.0))]
    pub max_total_cost: f64,
}

/// How progress is followed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = monitoring_schema)]
pub struct MonitoringSpec {
    /// Seconds between reads of the trainer's log. Default 60.
    #[serde(default = "default_poll_interval")]
    #[schemars(range(min = 5, max = 3600))]
    pub poll_interval_seconds: u32,
    /// No new step for this long is a stall by itself. Default 7200.
    #[serde(default = "default_no_progress_timeout")]
    #[schemars(range(min = 60, max = 86_400))]
    pub no_progress_timeout_seconds: u32,
    /// Stall detection from the trend of the ETA and the step rate.
    #[serde(default)]
    pub stall_detection: StallDetectionSpec,
}

/// A poll interval as long as the no-progress timeout would flag a stall whenever one reading
/// saw no new step (a checkpoint save is enough).
fn monitoring_schema(s: &mut Schema) {
    schema::cel_rule(
        s,
        "!has(self.pollIntervalSeconds) || !has(self.noProgressTimeoutSeconds) \
         || self.pollIntervalSeconds < self.noProgressTimeoutSeconds",
        "pollIntervalSeconds",
        "spec.monitoring.pollIntervalSeconds must be below spec.monitoring.noProgressTimeoutSeconds",
    );
}

fn default_poll_interval() -> u32 {
    60
}

fn default_no_progress_timeout() -> u32 {
    7200
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        Self {
            poll_interval_seconds: default_poll_interval(),
            no_progress_timeout_seconds: default_no_progress_timeout(),
            stall_detection: StallDetectionSpec::default(),
        }
    }
}

/// Stall detection. A stall is flagged when, over the last three readings, the ETA fell by less
/// than `etaConvergenceThreshold` of the wall-clock time that passed; a drop of the step rate by
/// more than `speedDropThreshold` from its peak confirms it. Checkpoint and sample pauses do not
/// trigger it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StallDetectionSpec {
    /// Turn stall detection on or off. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Readings needed before any judgement. Default 4.
    #[serde(default = "default_min_samples")]
    #[schemars(range(min = 3, max = 100))]
    pub min_samples: u32,
    /// Fraction of elapsed wall-clock time by which the ETA must fall. Default 0.5.
    #[serde(default = "default_half")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub eta_convergence_threshold: f64,
    /// Fractional drop of steps per second from the peak that confirms a stall. Default 0.5.
    #[serde(default = "default_half")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub speed_drop_threshold: f64,
    /// Seconds a flagged stall has to recover before the job is stopped. Default 900.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 0, max = 86_400))]
    pub grace_period_seconds: u32,
}

fn default_min_samples() -> u32 {
    4
}

fn default_half() -> f64 {
    0.5
}

fn default_grace() -> u32 {
    900
}

impl Default for StallDetectionSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            min_samples: default_min_samples(),
            eta_convergence_threshold: default_half(),
            speed_drop_threshold: default_half(),
            grace_period_seconds: default_grace(),
        }
    }
}

/// Notifications besides Kubernetes events.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotifySpec {
    /// Secret key holding a webhook URL that receives a small JSON message when a stall is
    /// detected and when the job is stopped, succeeds or fails.
    pub webhook_secret_ref: SecretKeyRef,
}

/// Lifecycle phase of a `TrainingJob`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum TrainingJobPhase {
    /// Accepted; nothing rented yet.
    #[default]
    Pending,
    /// Renting a machine and waiting for it to be ready.
    Provisioning,
    /// Copying dataset and recipe to the machine.
    Staging,
    /// The trainer is running.
    Training,
    /// Uploading and verifying results.
    Uploading,
    /// Finished; results verified in `output`.
    Succeeded,
    /// Finished without success; `reason` says why.
    Failed,
    /// Suspended by `spec.suspend`; no machine is rented.
    Suspended,
}

impl TrainingJobPhase {
    /// Succeeded and Failed are final.
    pub fn is_finished(self) -> bool {
        matches!(self, TrainingJobPhase::Succeeded | TrainingJobPhase::Failed)
    }
}

/// Observed state of a `TrainingJob`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: TrainingJobPhase,
    /// Why the job is in this phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// A sentence for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Conditions: InstanceReady, DataStaged, Training, Stalled, SoftDeadlineExceeded, Uploaded,
    /// Suspended, Succeeded, Failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Machines rented for this job so far.
    #[serde(default)]
    pub attempts: i32,
    /// The machine currently rented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<JobInstanceStatus>,
    /// Training progress read from the trainer's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressStatus>,
    /// Money spent and expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostStatus>,
    /// Checkpoints written by the trainer, oldest first: the newest 20 (see
    /// `checkpointsOmitted`). Those with a `uri` are in storage
    /// (`spec.output.s3.syncCheckpoints`) and survive the machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointStatus>,
    /// Checkpoints older than those in `checkpoints`, which lists only the newest 20 (the machine
    /// decides how many there are; a status must stay small): how many were left out. The ones
    /// that were synced stay in storage under `<prefix>/<job>-<uid>/checkpoints/`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checkpoints_omitted: u64,
    /// What this job has uploaded to S3 so far, over all its machines. The operator limits it
    /// per job (`gpu-trainer run --max-upload-files-per-job`, `--max-upload-gib-per-job`); the
    /// machine reporting more is refused before anything is uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded: Option<UploadedStatus>,
    /// The checkpoint the current machine resumes from: on a replacement machine (after a lost
    /// instance or a suspension), the latest checkpoint found there or brought back from
    /// storage. Unset when training starts from the beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<CheckpointStatus>,
    /// Uploaded and verified results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactStatus>,
    /// When work started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// The machine a job runs on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobInstanceStatus {
    /// Name of the GpuInstance.
    pub name: String,
    /// The provider's id for the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// GPU model and count, e.g. `RTX 4090` or `2x A100 SXM4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// Price in US dollars per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_hour: Option<f64>,
}

/// Training progress, in the shape of Kubeflow's trainer status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgressStatus {
    /// Last completed step.
    pub step: u64,
    /// Total steps, when the trainer says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// step / totalSteps × 100, computed from the counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// `percent` formatted for `kubectl get`, e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_text: Option<String>,
    /// Latest training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Observed steps per second, including save and sample pauses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_per_second: Option<f64>,
    /// Seconds to the end at the observed rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// When progress last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<Time>,
}

impl ProgressStatus {
    /// Sets `step`, `totalSteps`, `percent` and `percentText` together so they never disagree.
    pub fn set_step(&mut self, step: u64, total_steps: Option<u64>) {
        self.step = step;
        self.total_steps = total_steps;
        self.percent = total_steps.filter(|t| *t > 0).map(|t| {
            let pct = (step.min(t) as f64) * 100.0 / t as f64;
            (pct * 10.0).floor() / 10.0
        });
        self.percent_text = self.percent.map(|p| format!("{}%", p.floor() as u64));
    }
}

/// Money spent and expected, in US dollars.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CostStatus {
    /// Price per hour of the current machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_hour: Option<f64>,
    /// Spent so far across all machines of this job.
    #[serde(default)]
    pub accrued: f64,
    /// Expected total at the current rate and ETA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_total: Option<f64>,
}

/// A checkpoint written by the trainer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// File or folder name on the machine.
    pub name: String,
    /// Training step it was saved at.
    pub step: u64,
    /// Size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Where it was synced to, when checkpoint sync is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

/// Files and bytes uploaded to storage.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadedStatus {
    /// Files (objects) uploaded.
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An uploaded and verified result.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactStatus {
    /// What it is: `model`, `checkpoint-<step>`, `samples`, `model-card`.
    pub name: String,
    /// Where it is, e.g. `s3://bucket/prefix/job/model.safetensors` or `hf://owner/repo`.
    pub uri: String,
    /// Size in bytes, verified after upload.
    pub size_bytes: u64,
    /// SHA-256 computed on the machine before upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Secret references in a spec, for RBAC-free validation and for documentation of what a job
/// reads.
impl TrainingJobSpec {
    pub fn secret_refs(&self) -> Vec<&SecretKeyRef> {
        let mut refs: Vec<&SecretKeyRef> =
            self.env.iter().filter_map(|e| e.value_from.as_ref().map(|v| &v.secret_key_ref)).collect();
        if let Some(hf) = self.output.as_ref().and_then(|o| o.hugging_face.as_ref()) {
            refs.push(&hf.token_secret_ref);
        }
        if let Some(n) = &self.notify {
            refs.push(&n.webhook_secret_ref);
        }
        if let Some(key) = self.provider.ssh.as_ref().and_then(|s| s.key_secret_ref.as_ref()) {
            refs.push(key);
        }
        refs
    }
}
