//! Getting results off the machine, always before it is released:
//! - while training, every new checkpoint is synced to `spec.output.s3` once it is complete;
//! - at the end, the final model, its model card and any checkpoint not yet synced go to S3
//!   and/or Hugging Face, each verified, and only then does the job succeed;
//! - a run stopped early (stall, deadline, budget) saves its latest checkpoint and a model card
//!   marked incomplete, within a bounded time, and says what was saved and what was lost;
//! - a replacement machine gets the latest synced checkpoint back before training resumes.
//!
//! A failed upload never keeps the machine: the job fails with `UploadFailed` naming what was not
//! uploaded, and the finish step releases the GPU.
//!
//! What the machine lists is checked before it is used (`monitor::remote_names`,
//! `monitor::checkpoints`, `artifacts::upload`): a refused name is left out and reported once in
//! a Warning event naming the machine; a listing outside the limits (too many checkpoints, files
//! or bytes) is the machine's fault: a Warning event naming it, and an error holding
//! `RemoteError::Refused` so that the machine is judged, not retried.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{info, warn};

use super::{Outputs, OutputsError};
use crate::api::{
    ArtifactStatus, CheckpointStatus, ConditionStatus, Reason, TrainingJobPhase, TrainingJobSpec,
    TrainingJobStatus, job_condition, set_condition,
};
use crate::artifacts::address::EndpointPolicy;
use crate::artifacts::checkpoints::{CheckpointSync, checkpoint_item, restore_items};
use crate::artifacts::download::download;
use crate::artifacts::huggingface::{HfUpload, upload_to_hub};
use crate::artifacts::model_card::write_to_machine;
use crate::artifacts::upload::JobUploadLimits;
use crate::artifacts::{ArtifactError, UploadItem, UploadSettings, Uploader};
use crate::engine::env::Secrets;
use crate::engine::outcome::{Failure, StepError};
use crate::engine::results;
use crate::error::error_chain;
use crate::monitor::checkpoints::{Checkpoint, CheckpointInventory};
use crate::monitor::remote_names::RefusedNames;
use crate::remote::launch::RemoteLayout;
use crate::remote::tool::RenderedTool;
use crate::remote::{MachineFault, RemoteError, RemoteExec, RunOptions, shell_quote};

/// Where what users should know goes: Kubernetes events, or the terminal.
#[async_trait]
pub trait OutputEvents: Send + Sync {
    async fn warning(&mut self, reason: Reason, action: &str, message: &str);
    async fn normal(&mut self, reason: Reason, action: &str, message: &str);
}

/// What the store works on in one call.
pub struct JobView<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub spec: &'a TrainingJobSpec,
    pub layout: &'a RemoteLayout,
    pub tool: &'a RenderedTool,
    pub status: &'a mut TrainingJobStatus,
    pub secrets: &'a dyn Secrets,
    pub events: &'a mut dyn OutputEvents,
    pub now: chrono::DateTime<chrono::Utc>,
}

/// The job's destinations as resolved: ready, or a sentence saying why the job cannot upload.
enum Destinations {
    Ready(Arc<Outputs>),
    Unusable(String),
}

/// The results side of a job, kept between passes: the resolved destinations (dropped with the
/// connection), what was synced, the job's limits.
pub struct ResultStore {
    outputs: Option<Arc<Outputs>>,
    /// Checkpoint sizes seen at the last poll, to sync only complete ones.
    pub sync: CheckpointSync,
    /// What one job may upload in all (the machine listing more is refused).
    pub limits: JobUploadLimits,
    /// The Hugging Face CLI run on the machine (`hf`; tests substitute a stand-in).
    pub hf_cli: String,
    /// Which addresses the S3 endpoint may reach.
    pub policy: EndpointPolicy,
}

impl ResultStore {
    pub fn new(limits: JobUploadLimits, hf_cli: String, policy: EndpointPolicy) -> Self {
        Self { outputs: None, sync: CheckpointSync::new(), limits, hf_cli, policy }
    }

    /// Forgets the resolved destinations (with the connection: credentials may have changed).
    pub fn forget_outputs(&mut self) {
        self.outputs = None;
    }
}

/// Longest a Hugging Face upload may take.
const HF_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Longest bringing a checkpoint back onto a new machine may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Where the model card is written on the machine, relative to the work dir.
const CARD: &str = "README.md";

/// What the upload of one set of files came to.
#[derive(Default)]
struct Sent {
    artifacts: Vec<ArtifactStatus>,
    checkpoints: Vec<CheckpointStatus>,
    /// Destinations that failed, with why (no credentials or URLs in the text).
    failures: Vec<String>,
    /// Files and bytes sent to S3, for the job's totals.
    files: u64,
    bytes: u64,
    /// Files left out because their names are refused.
    refused_names: RefusedNames,
    /// The machine listed more than the limits allow (its fault; also in `failures`).
    refusal: Option<ArtifactError>,
}

/// True when `error` (or one of its sources) is the machine reporting something outside the
/// limits: a [`RemoteError`] whose fault is [`MachineFault::Misbehaved`].
fn is_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::remote::remote_error_in(error)
        .is_some_and(|remote| remote.machine_fault() == Some(MachineFault::Misbehaved))
}

/// The error for a refused upload, with the `RemoteError` kept as its source (the machine is
/// judged by it).
fn refusal_error(error: ArtifactError) -> StepError {
    match error {
        ArtifactError::Remote { source, .. } => StepError::Remote(source),
        other => StepError::Remote(RemoteError::Refused(error_chain(&other))),
    }
}

/// The machine as messages name it: `GpuInstance <name> (provider id <id>)`.
fn machine_named(status: &TrainingJobStatus) -> String {
    match &status.instance {
        Some(i) => match &i.provider_id {
            Some(id) => format!("GpuInstance {} (provider id {id})", i.name),
            None => format!("GpuInstance {}", i.name),
        },
        None => "the machine".into(),
    }
}

impl ResultStore {
    /// The job's destinations, resolved once per connection.
    async fn destinations(&mut self, job: &JobView<'_>) -> Result<Destinations, StepError> {
        if let Some(outputs) = &self.outputs {
            return Ok(Destinations::Ready(outputs.clone()));
        }
        match super::resolve(job.secrets, job.spec, job.name, job.uid, self.policy).await {
            Ok(outputs) => {
                let outputs = Arc::new(outputs);
                self.outputs = Some(outputs.clone());
                Ok(Destinations::Ready(outputs))
            }
            Err(OutputsError::Unusable(why)) => Ok(Destinations::Unusable(why)),
            Err(OutputsError::Read(e)) => Err(StepError::Secret(e)),
        }
    }

    /// Reports names the machine listed in `place` that were refused and left out: a Warning
    /// event naming the machine, once per name (not at every poll).
    async fn report_refused_names(&mut self, job: &mut JobView<'_>, place: &str, refused: &RefusedNames) {
        if refused.is_empty() {
            return;
        }
        let Some(fresh) = self.sync.reported.fresh(refused) else { return };
        let machine = machine_named(job.status);
        warn!(job = %job.name, %machine, refused = fresh.count, "Refused names the machine listed");
        let message = format!("{machine} listed names that are not accepted in {place}: {fresh}");
        job.events.warning(Reason::MachineMisbehaved, "Inspect", &message).await;
    }

    /// A listing outside the limits: a Warning event naming the machine (the error itself holds
    /// the `RemoteError` for the verdict on the machine).
    async fn report_refusal(job: &mut JobView<'_>, error: &(dyn std::error::Error + Send + Sync + 'static)) {
        let machine = machine_named(job.status);
        let why = error_chain(error);
        warn!(job = %job.name, %machine, error = %why, "Refused what the machine listed");
        let message = format!("{machine}: {why}");
        job.events.warning(Reason::MachineMisbehaved, "Inspect", &message).await;
    }

    /// The checkpoints on the machine, with refused names reported; a listing outside the
    /// limits is refused (event and error).
    async fn list_checkpoints(
        &mut self,
        job: &mut JobView<'_>,
        exec: &dyn RemoteExec,
    ) -> Result<CheckpointInventory, StepError> {
        let kind = crate::monitor::ParserKind::from(job.tool.parser);
        match crate::monitor::poller::checkpoint_inventory(exec, &job.layout.output_dir(), kind).await {
            Ok(inventory) => {
                self.report_refused_names(job, "its output folder", &inventory.refused).await;
                Ok(inventory)
            }
            Err(e) => {
                let error = StepError::Monitor(Box::new(e));
                if is_refusal(&error) {
                    Self::report_refusal(job, &error).await;
                }
                Err(error)
            }
        }
    }

    /// Lists the checkpoints on the machine into `status.checkpoints` (the newest of them).
    pub async fn collect_checkpoints(
        &mut self,
        job: &mut JobView<'_>,
        exec: &dyn RemoteExec,
    ) -> Result<(), StepError> {
        let inventory = self.list_checkpoints(job, exec).await?;
        results::record_checkpoints(job.status, &inventory.to_status(), &[]);
        Ok(())
    }

    /// Upload settings within what the job may still upload.
    fn within_limits(&self, status: &TrainingJobStatus, settings: UploadSettings) -> UploadSettings {
        UploadSettings { limits: results::upload_limits(self.limits, status), ..settings }
    }

    /// After a poll of a running trainer: lists the checkpoints and syncs the complete ones to
    /// S3 when the job asks for it. A failed sync is a Warning, not a failed job; a sync refused
    /// because the machine listed more than the limits allow is the machine's fault (an error).
    pub async fn sync_checkpoints(
        &mut self,
        job: &mut JobView<'_>,
        exec: &dyn RemoteExec,
    ) -> Result<(), StepError> {
        let Destinations::Ready(outputs) = self.destinations(job).await? else { return Ok(()) };
        let Some(s3) = outputs.s3.as_ref().filter(|s| s.sync_checkpoints) else { return Ok(()) };
        let inventory = self.list_checkpoints(job, exec).await?;
        let candidates = results::checkpoints_to_sync(&inventory.checkpoints, job.status);
        let ready = self.sync.ready(&candidates, &job.status.checkpoints);
        let mut synced = Vec::new();
        let mut refusal = None;
        if !ready.is_empty() {
            let settings = self.within_limits(job.status, UploadSettings::default());
            let output_dir = job.layout.output_dir();
            let (done, failure) = match crate::artifacts::checkpoints::sync_checkpoints(
                &s3.store,
                &settings,
                exec,
                &s3.dest,
                &output_dir,
                &ready,
            )
            .await
            {
                Ok(done) => (done, None),
                Err((done, e)) => (done, Some(e)),
            };
            for cp in &done.checkpoints {
                info!(job = %job.name, checkpoint = %cp.name, step = cp.step, "Checkpoint synced");
            }
            results::add_uploaded(job.status, done.files, done.bytes);
            self.report_refused_names(job, "its checkpoint folders", &done.refused).await;
            synced = done.checkpoints;
            match failure {
                Some(e) if is_refusal(&e) => {
                    Self::report_refusal(job, &e).await;
                    refusal = Some(e);
                }
                Some(e) => {
                    let message = format!("checkpoint sync to S3 failed (will retry): {}", error_chain(&e));
                    warn!(job = %job.name, error = %message, "Checkpoint sync failed");
                    job.events.warning(Reason::CheckpointSyncFailed, "Sync", &message).await;
                }
                None => {}
            }
        }
        // What was synced before a refusal is kept in status either way.
        results::record_checkpoints(job.status, &inventory.to_status(), &synced);
        match refusal {
            Some(e) => Err(refusal_error(e)),
            None => Ok(()),
        }
    }

    /// The end of a successful run: upload and verify the model, its card and the checkpoints
    /// to every destination, then mark the job `Uploaded` (or failed, naming what was lost).
    pub async fn upload(&mut self, job: &mut JobView<'_>, exec: &dyn RemoteExec) -> Result<(), StepError> {
        // Its time is when uploading began: the engine gives up after `UPLOAD_GRACE`.
        set_condition(
            &mut job.status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::False,
            Reason::Uploading,
            "uploading the results",
            None,
            job.now,
        );
        self.collect_checkpoints(job, exec).await?;
        let model = final_model(exec, job.layout, job.tool).await?;
        let Some(model) = model else {
            let message =
                format!("the trainer finished but left no model at {}", job.tool.outputs.final_model);
            return Err(StepError::Failed(Failure::new(Reason::UploadFailed, message)));
        };
        let listed = format!(
            "model {} ({} bytes, sha256 {})",
            model.uri,
            model.size_bytes,
            model.sha256.clone().unwrap_or_default()
        );
        job.status.artifacts = vec![model];
        let outputs = match self.destinations(job).await? {
            Destinations::Ready(outputs) => outputs,
            Destinations::Unusable(why) => {
                let message = format!("{why}; {listed} was not uploaded");
                return Err(StepError::Failed(Failure::new(Reason::UploadFailed, message)));
            }
        };
        if outputs.is_empty() {
            let message = format!("no spec.output: results listed, not uploaded: {listed}");
            return mark_uploaded(job, &message).await;
        }
        let model_file = model_file_name(job.tool);
        let card = results::model_card(job.name, job.spec, job.status, None, vec![model_file.clone()]);
        write_card(job.layout, exec, &card.render()).await?;
        let unsynced: Vec<CheckpointStatus> =
            job.status.checkpoints.iter().filter(|c| c.uri.is_none()).cloned().collect();
        let files = vec![
            ("model".to_string(), job.layout.join(&job.tool.outputs.final_model), model_file),
            ("model-card".to_string(), job.layout.join(CARD), CARD.to_string()),
        ];
        let sent = self.send(job, &outputs, exec, &files, &unsynced, UploadSettings::default()).await;
        self.record_sent(job, &sent).await;
        if let Some(e) = sent.refusal {
            Self::report_refusal(job, &e).await;
            return Err(refusal_error(e));
        }
        let uploaded = describe(&sent.artifacts);
        if sent.artifacts.iter().any(|a| a.name == "model") {
            job.status.artifacts = sent.artifacts;
        }
        if !sent.failures.is_empty() {
            let saved = if uploaded.is_empty() {
                String::new()
            } else {
                format!("uploaded and verified: {uploaded}; ")
            };
            let message = format!("{saved}{}; {listed} was not uploaded there", sent.failures.join("; "));
            return Err(StepError::Failed(Failure::new(Reason::UploadFailed, message)));
        }
        mark_uploaded(job, &format!("uploaded and verified: {uploaded}")).await
    }

    /// A run stopped early: saves the latest checkpoint and a model card marked incomplete to
    /// every destination, within a bounded time. Returns a sentence for the final message.
    pub async fn salvage(
        &mut self,
        job: &mut JobView<'_>,
        exec: &dyn RemoteExec,
        stop_reason: &str,
    ) -> Result<String, StepError> {
        let outputs = match self.destinations(job).await? {
            Destinations::Ready(outputs) if !outputs.is_empty() => outputs,
            Destinations::Ready(_) => {
                return Ok(checkpoint_sentence(job.status, "stays on the machine and is lost with it"));
            }
            Destinations::Unusable(why) => return Ok(format!("nothing was saved: {why}")),
        };
        let Some(latest) = job.status.checkpoints.iter().max_by_key(|c| c.step).cloned() else {
            return Ok("there was no checkpoint to save".into());
        };
        job.status.phase = TrainingJobPhase::Uploading;
        job.status.reason = Some(Reason::Uploading);
        job.status.message = Some("saving the latest checkpoint".into());
        let path_in_repo = format!("checkpoints/{}", latest.name);
        let card = results::model_card(
            job.name,
            job.spec,
            job.status,
            Some(stop_reason),
            vec![path_in_repo.clone()],
        );
        write_card(job.layout, exec, &card.render()).await?;
        let mut files = vec![("model-card".to_string(), job.layout.join(CARD), CARD.to_string())];
        // Hugging Face takes files: a folder checkpoint (no extension, e.g. `checkpoint-500`)
        // goes to S3 only.
        if outputs.hf.is_some() && latest.name.contains('.') {
            let path = format!("{}/{}", job.layout.output_dir(), latest.name);
            files.push((format!("checkpoint-{}", latest.step), path, path_in_repo));
        }
        let pending: Vec<CheckpointStatus> =
            std::iter::once(latest.clone()).filter(|c| c.uri.is_none()).collect();
        let sent = self.send(job, &outputs, exec, &files, &pending, results::salvage_settings()).await;
        // The run failed already: a refusal is reported and said in the message, no more.
        self.record_sent(job, &sent).await;
        if let Some(e) = &sent.refusal {
            Self::report_refusal(job, e).await;
        }
        job.status.artifacts.extend(sent.artifacts.iter().cloned());
        let saved = describe(&sent.artifacts);
        let mut sentence =
            match job.status.checkpoints.iter().find(|c| c.name == latest.name).and_then(|c| c.uri.clone()) {
                Some(uri) => {
                    format!("latest checkpoint {} (step {}) saved to {uri}", latest.name, latest.step)
                }
                None => {
                    format!("latest checkpoint {} (step {}) was not saved to S3", latest.name, latest.step)
                }
            };
        if !saved.is_empty() {
            sentence.push_str(&format!("; saved with a model card marked incomplete: {saved}"));
        }
        if !sent.failures.is_empty() {
            sentence.push_str(&format!("; {}", sent.failures.join("; ")));
        }
        Ok(sentence)
    }

    /// Before a suspended job's machine is released: the latest checkpoint goes to S3 (when the
    /// job has `spec.output.s3`) so the next machine can resume from it. Returns a sentence for
    /// the Suspended message.
    pub async fn keep_latest_checkpoint(
        &mut self,
        job: &mut JobView<'_>,
        exec: &dyn RemoteExec,
    ) -> Result<String, StepError> {
        let Some(latest) = job.status.checkpoints.iter().max_by_key(|c| c.step).cloned() else {
            return Ok("there is no checkpoint: training will start over".into());
        };
        let outputs = match self.destinations(job).await? {
            Destinations::Ready(outputs) if outputs.s3.is_some() => outputs,
            Destinations::Ready(_) => {
                return Ok(checkpoint_sentence(job.status, "stays on this machine only"));
            }
            Destinations::Unusable(why) => return Ok(format!("the latest checkpoint was not saved: {why}")),
        };
        if latest.uri.is_none() {
            let sent = self
                .send(job, &outputs, exec, &[], std::slice::from_ref(&latest), results::salvage_settings())
                .await;
            self.record_sent(job, &sent).await;
            if let Some(e) = &sent.refusal {
                Self::report_refusal(job, e).await;
            }
            if let Some(failure) = sent.failures.first() {
                return Ok(format!(
                    "latest checkpoint {} (step {}) was not saved: {failure}",
                    latest.name, latest.step
                ));
            }
        }
        Ok(checkpoint_sentence(job.status, "stays on this machine only"))
    }

    /// On a replacement machine, before the trainer starts: the latest checkpoint is found on the
    /// machine or brought back from S3, and recorded as `resumedFrom`. Without one, training
    /// starts over (with a Warning saying so).
    pub async fn restore(&mut self, job: &mut JobView<'_>, exec: &dyn RemoteExec) -> Result<(), StepError> {
        job.status.resumed_from = None;
        if job.status.attempts <= 1 || job.status.checkpoints.is_empty() {
            return Ok(());
        }
        let on_machine = self.list_checkpoints(job, exec).await?.to_status();
        let wanted = results::latest_synced(&job.status.checkpoints).cloned();
        let newest_here = on_machine.iter().max_by_key(|c| c.step).cloned();
        let from = match (wanted, newest_here) {
            (Some(w), Some(h)) if h.step >= w.step => Some(h),
            (None, here) => here,
            (Some(w), here) => match self.bring_back(job, exec, &w).await? {
                BringBack::Restored => Some(w),
                BringBack::Failed(why) => {
                    let message = format!(
                        "could not bring checkpoint {} (step {}) back from storage: {why}",
                        w.name, w.step
                    );
                    warn!(job = %job.name, error = %message, "Restore failed");
                    job.events.warning(Reason::RestoreFailed, "Restore", &message).await;
                    here
                }
            },
        };
        match &from {
            Some(cp) => {
                let message = format!("resuming from checkpoint {} (step {})", cp.name, cp.step);
                job.events.normal(Reason::Restored, "Restore", &message).await;
            }
            None => {
                let message = "no checkpoint reached this machine: training starts over (sync checkpoints with spec.output.s3 to resume on a new machine)";
                job.events.warning(Reason::NoCheckpoint, "Restore", message).await;
            }
        }
        job.status.resumed_from = from;
        Ok(())
    }

    /// Downloads the synced checkpoint `cp` into the output folder.
    async fn bring_back(
        &mut self,
        job: &mut JobView<'_>,
        exec: &dyn RemoteExec,
        cp: &CheckpointStatus,
    ) -> Result<BringBack, StepError> {
        let outputs = match self.destinations(job).await? {
            Destinations::Ready(outputs) => outputs,
            Destinations::Unusable(why) => return Ok(BringBack::Failed(why)),
        };
        let Some(s3) = outputs.s3.as_ref() else {
            return Ok(BringBack::Failed("spec.output.s3 is not set".into()));
        };
        let output_dir = job.layout.output_dir();
        let items = match restore_items(&s3.store, &s3.dest, &output_dir, &cp.name).await {
            Ok(items) if items.is_empty() => {
                let uri = cp.uri.clone().unwrap_or_default();
                return Ok(BringBack::Failed(format!("nothing stored under {uri}")));
            }
            Ok(items) => items,
            Err(e) => return Ok(BringBack::Failed(error_chain(&e))),
        };
        let ttl = UploadSettings::default().url_ttl;
        Ok(match download(&s3.store, exec, &items, ttl, RESTORE_TIMEOUT).await {
            Ok(()) => BringBack::Restored,
            Err(e) => BringBack::Failed(error_chain(&e)),
        })
    }

    /// Records in status what `send` uploaded: synced checkpoints, the job's totals; reports the
    /// names it left out.
    async fn record_sent(&mut self, job: &mut JobView<'_>, sent: &Sent) {
        results::record_checkpoints(job.status, &[], &sent.checkpoints);
        results::add_uploaded(job.status, sent.files, sent.bytes);
        self.report_refused_names(job, "the results to upload", &sent.refused_names).await;
    }

    /// Uploads `files` (artifact name, path on the machine, name at the destination) and the
    /// checkpoints `pending` to every destination, within what the job may still upload. When
    /// the machine lists more than that, nothing more is sent (`refusal`).
    async fn send(
        &self,
        job: &JobView<'_>,
        outputs: &Outputs,
        exec: &dyn RemoteExec,
        files: &[(String, String, String)],
        pending: &[CheckpointStatus],
        settings: UploadSettings,
    ) -> Sent {
        let mut sent = Sent::default();
        let settings = self.within_limits(job.status, settings);
        if let Some(s3) = &outputs.s3 {
            let output_dir = job.layout.output_dir();
            let mut items: Vec<UploadItem> = files
                .iter()
                .map(|(name, path, dst)| UploadItem {
                    name: name.clone(),
                    path: path.clone(),
                    object: s3.dest.object(dst),
                })
                .collect();
            let checkpoints: Vec<Checkpoint> = pending
                .iter()
                .map(|c| Checkpoint {
                    path: c.name.clone(),
                    step: Some(c.step),
                    epoch: None,
                    size_bytes: c.size_bytes.unwrap_or(0),
                })
                .collect();
            items.extend(checkpoints.iter().map(|c| checkpoint_item(&s3.dest, &output_dir, c)));
            let uploader = Uploader::new(&s3.store, settings.clone());
            match uploader.upload(exec, &items).await {
                Ok(uploaded) => {
                    sent.files = uploaded.files;
                    sent.bytes = uploaded.bytes;
                    sent.refused_names = uploaded.refused;
                    let statuses = uploaded.artifacts;
                    let (file_statuses, cp_statuses) = statuses.split_at(files.len().min(statuses.len()));
                    sent.artifacts.extend(file_statuses.iter().cloned());
                    for (cp, status) in pending.iter().zip(cp_statuses) {
                        sent.checkpoints.push(CheckpointStatus {
                            uri: Some(status.uri.clone()),
                            size_bytes: Some(status.size_bytes),
                            ..cp.clone()
                        });
                    }
                }
                Err(e) => {
                    warn!(job = %job.name, error = %error_chain(&e), "Upload to S3 failed");
                    sent.failures.push(format!("upload to S3 failed: {}", error_chain(&e)));
                    if is_refusal(&e) {
                        // Not to Hugging Face either: the machine is judged instead.
                        sent.refusal = Some(e);
                        return sent;
                    }
                }
            }
        }
        if let Some(hf) = outputs.hf.as_ref().filter(|_| !files.is_empty()) {
            let upload = HfUpload {
                repo: hf.output.repo.clone(),
                private: hf.output.private,
                files: files.to_vec(),
                commit_message: format!("gpu-trainer: TrainingJob {}", job.name),
                staging_dir: job.layout.join("hf-staging"),
                cli: self.hf_cli.clone(),
            };
            let timeout = settings.step_timeout.min(HF_TIMEOUT);
            match upload_to_hub(exec, &upload, &hf.token, timeout).await {
                Ok(statuses) => sent.artifacts.extend(statuses),
                Err(e) => {
                    warn!(job = %job.name, error = %error_chain(&e), "Upload to Hugging Face failed");
                    sent.failures.push(format!("upload to Hugging Face failed: {}", error_chain(&e)));
                }
            }
        }
        sent
    }
}

async fn write_card(layout: &RemoteLayout, exec: &dyn RemoteExec, text: &str) -> Result<(), StepError> {
    write_to_machine(exec, text, &layout.join(CARD)).await.map_err(|e| {
        StepError::Remote(crate::remote::RemoteError::io("write the model card", error_chain(&e)))
    })
}

/// The final model's file name (the last part of the tool's `finalModel`).
fn model_file_name(tool: &RenderedTool) -> String {
    let final_model = &tool.outputs.final_model;
    final_model.rsplit('/').find(|s| !s.is_empty()).unwrap_or("model").to_string()
}

fn checkpoint_sentence(status: &TrainingJobStatus, fate: &str) -> String {
    match status.checkpoints.iter().max_by_key(|c| c.step) {
        Some(cp) if cp.uri.is_some() => format!(
            "latest checkpoint {} (step {}) is in {}",
            cp.name,
            cp.step,
            cp.uri.clone().unwrap_or_default()
        ),
        Some(cp) => format!("no spec.output: latest checkpoint {} (step {}) {fate}", cp.name, cp.step),
        None => "there was no checkpoint".into(),
    }
}

async fn mark_uploaded(job: &mut JobView<'_>, message: &str) -> Result<(), StepError> {
    set_condition(
        &mut job.status.conditions,
        job_condition::UPLOADED,
        ConditionStatus::True,
        Reason::Uploaded,
        message,
        None,
        job.now,
    );
    job.events.normal(Reason::Uploaded, "Upload", message).await;
    Ok(())
}

/// What bringing a checkpoint back from storage came to.
enum BringBack {
    Restored,
    Failed(String),
}

/// The final model the trainer left on the machine, with size and SHA-256 (computed on the
/// machine). `None` when there is none. (The checkpoints: [`ResultStore::collect_checkpoints`].)
pub async fn final_model(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    tool: &RenderedTool,
) -> Result<Option<ArtifactStatus>, StepError> {
    let model = layout.join(&tool.outputs.final_model);
    let out = exec
        .run(
            &format!(
                "f={}; [ -f \"$f\" ] && sha256sum \"$f\" && stat -c %s \"$f\" || true",
                shell_quote(&model)?
            ),
            RunOptions::default(),
        )
        .await?;
    out.require_complete("hashing the final model")?;
    let text = out.stdout_lossy();
    let mut lines = text.lines();
    let sha = lines.next().and_then(|l| l.split_whitespace().next()).map(str::to_string);
    let size = lines.next().and_then(|l| l.trim().parse::<u64>().ok());
    let artifact = match (sha, size) {
        (Some(sha256), Some(size_bytes)) => Some(ArtifactStatus {
            name: "model".into(),
            uri: format!("file://{model}"),
            size_bytes,
            sha256: Some(sha256),
        }),
        _ => None,
    };
    Ok(artifact)
}

/// `name uri (size bytes)` of each artifact, comma-separated.
fn describe(artifacts: &[ArtifactStatus]) -> String {
    artifacts
        .iter()
        .map(|a| format!("{} {} ({} bytes)", a.name, a.uri, a.size_bytes))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::poller::MonitorError;

    use crate::remote::remote_error_in as remote_in;

    #[test]
    fn refusals_keep_the_remote_error_reachable_for_the_verdict_on_the_machine() {
        let listing = StepError::Monitor(Box::new(MonitorError::Refused {
            path: "/w/output".into(),
            target: "root@h:22".into(),
            source: RemoteError::Refused("the machine reported 5000 checkpoints".into()),
        }));
        assert!(is_refusal(&listing));
        assert_eq!(remote_in(&listing).and_then(RemoteError::machine_fault), Some(MachineFault::Misbehaved));
        assert!(error_chain(&listing).contains("the machine reported 5000 checkpoints"));

        let upload = ArtifactError::Remote {
            step: "inspect",
            source: RemoteError::Refused("the machine listed 1001 files to upload".into()),
        };
        assert!(is_refusal(&upload));
        // The front ends keep it as their error's source (the controller's `Error::Remote`).
        let error = refusal_error(upload);
        assert!(matches!(&error, StepError::Remote(RemoteError::Refused(m)) if m.contains("1001 files")));

        // Other failures are not the machine misbehaving: retried as before.
        let timeout = ArtifactError::Remote {
            step: "upload",
            source: RemoteError::timeout(crate::remote::bounds::Phase::Output, Duration::from_secs(1)),
        };
        assert!(!is_refusal(&timeout));
        assert!(!is_refusal(&ArtifactError::Missing { path: "m".into() }));
    }
}
