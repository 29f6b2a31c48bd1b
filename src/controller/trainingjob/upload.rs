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

use chrono::Utc;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::outputs::{self, Outputs};
use super::pass::Pass;
use super::session::JobRuntime;
use super::{Error, finish};
use crate::api::{
    ArtifactStatus, CheckpointStatus, ConditionStatus, Reason, TrainingJobPhase, job_condition, set_condition,
};
use crate::artifacts::checkpoints::{checkpoint_item, restore_items};
use crate::artifacts::download::download;
use crate::artifacts::huggingface::{HfUpload, upload_to_hub};
use crate::artifacts::model_card::write_to_machine;
use crate::artifacts::{ArtifactError, UploadItem, UploadSettings, Uploader};
use crate::engine::outcome::Failure;
use crate::engine::results;
use crate::error::error_chain;
use crate::monitor::checkpoints::{Checkpoint, CheckpointInventory};
use crate::monitor::remote_names::RefusedNames;
use crate::remote::{MachineFault, RemoteError, RemoteExec};

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
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(remote) = e.downcast_ref::<RemoteError>() {
            return remote.machine_fault() == Some(MachineFault::Misbehaved);
        }
        source = e.source();
    }
    false
}

/// The controller's error for a refused upload, with the `RemoteError` kept as its source.
fn refusal_error(error: ArtifactError) -> Error {
    match error {
        ArtifactError::Remote { source, .. } => Error::Remote(source),
        other => Error::Remote(RemoteError::Refused(error_chain(&other))),
    }
}

impl Pass<'_> {
    /// The job's destinations, resolved once per connection. `Ok(Err)` names what is missing.
    async fn outputs(&self, runtime: &mut JobRuntime) -> Result<Result<Arc<Outputs>, String>, Error> {
        if let Some(outputs) = &runtime.outputs {
            return Ok(Ok(outputs.clone()));
        }
        let uid = self.job.uid().ok_or(Error::Missing("uid"))?;
        let policy = self.ctrl.endpoint_policy;
        let resolved =
            outputs::resolve(&self.secrets, &self.job.spec, &self.job.name_any(), &uid, policy).await?;
        Ok(resolved.map(|o| {
            let o = Arc::new(o);
            runtime.outputs = Some(o.clone());
            o
        }))
    }

    /// The machine as events name it: `GpuInstance <name> (provider id <id>)`.
    fn machine_named(&self) -> String {
        match &self.status.instance {
            Some(i) => match &i.provider_id {
                Some(id) => format!("GpuInstance {} (provider id {id})", i.name),
                None => format!("GpuInstance {}", i.name),
            },
            None => "the machine".into(),
        }
    }

    /// Reports names the machine listed in `place` that were refused and left out: a Warning
    /// event naming the machine, once per name (not at every poll).
    async fn report_refused_names(&self, runtime: &mut JobRuntime, place: &str, refused: &RefusedNames) {
        if refused.is_empty() {
            return;
        }
        let Some(fresh) = runtime.checkpoint_sync.reported.fresh(refused) else { return };
        let machine = self.machine_named();
        warn!(job = %self.job.name_any(), %machine, refused = fresh.count, "Refused names the machine listed");
        let message = format!("{machine} listed names that are not accepted in {place}: {fresh}");
        self.event(EventType::Warning, Reason::MachineMisbehaved, "Inspect", &message).await;
    }

    /// A listing outside the limits: a Warning event naming the machine (the error itself holds
    /// the `RemoteError` for the verdict on the machine).
    async fn report_refusal(&self, error: &(dyn std::error::Error + Send + Sync + 'static)) {
        let machine = self.machine_named();
        let why = error_chain(error);
        warn!(job = %self.job.name_any(), %machine, error = %why, "Refused what the machine listed");
        let message = format!("{machine}: {why}");
        self.event(EventType::Warning, Reason::MachineMisbehaved, "Inspect", &message).await;
    }

    /// The checkpoints on the machine, with refused names reported; a listing outside the
    /// limits is refused (event and error).
    async fn list_checkpoints(
        &self,
        runtime: &mut JobRuntime,
        exec: &dyn RemoteExec,
    ) -> Result<CheckpointInventory, Error> {
        let kind = crate::monitor::ParserKind::from(self.tool.parser);
        match crate::monitor::poller::checkpoint_inventory(exec, &self.layout.output_dir(), kind).await {
            Ok(inventory) => {
                self.report_refused_names(runtime, "its output folder", &inventory.refused).await;
                Ok(inventory)
            }
            Err(e) => {
                let error = Error::Monitor(Box::new(e));
                if is_refusal(&error) {
                    self.report_refusal(&error).await;
                }
                Err(error)
            }
        }
    }

    /// Lists the checkpoints on the machine into `status.checkpoints` (the newest of them).
    pub(super) async fn collect_checkpoints(
        &mut self,
        runtime: &mut JobRuntime,
        exec: &dyn RemoteExec,
    ) -> Result<(), Error> {
        let inventory = self.list_checkpoints(runtime, exec).await?;
        results::record_checkpoints(&mut self.status, &inventory.to_status(), &[]);
        Ok(())
    }

    /// Upload settings within what the job may still upload.
    fn within_limits(&self, settings: UploadSettings) -> UploadSettings {
        UploadSettings { limits: results::upload_limits(self.ctrl.upload_limits, &self.status), ..settings }
    }

    /// After a poll of a running trainer: lists the checkpoints and syncs the complete ones to
    /// S3 when the job asks for it. A failed sync is a Warning, not a failed job; a sync refused
    /// because the machine listed more than the limits allow is the machine's fault (an error).
    pub(super) async fn sync_checkpoints(
        &mut self,
        runtime: &mut JobRuntime,
        exec: &dyn RemoteExec,
    ) -> Result<(), Error> {
        let Ok(outputs) = self.outputs(runtime).await? else { return Ok(()) };
        let Some(s3) = outputs.s3.as_ref().filter(|s| s.sync_checkpoints) else { return Ok(()) };
        let inventory = self.list_checkpoints(runtime, exec).await?;
        let candidates = results::checkpoints_to_sync(&inventory.checkpoints, &self.status);
        let ready = runtime.checkpoint_sync.ready(&candidates, &self.status.checkpoints);
        let mut synced = Vec::new();
        let mut refusal = None;
        if !ready.is_empty() {
            let settings = self.within_limits(UploadSettings::default());
            let output_dir = self.layout.output_dir();
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
                info!(job = %self.job.name_any(), checkpoint = %cp.name, step = cp.step, "Checkpoint synced");
            }
            results::add_uploaded(&mut self.status, done.files, done.bytes);
            self.report_refused_names(runtime, "its checkpoint folders", &done.refused).await;
            synced = done.checkpoints;
            match failure {
                Some(e) if is_refusal(&e) => {
                    self.report_refusal(&e).await;
                    refusal = Some(e);
                }
                Some(e) => {
                    let message = format!("checkpoint sync to S3 failed (will retry): {}", error_chain(&e));
                    warn!(job = %self.job.name_any(), error = %message, "Checkpoint sync failed");
                    self.event(EventType::Warning, Reason::CheckpointSyncFailed, "Sync", &message).await;
                }
                None => {}
            }
        }
        // What was synced before a refusal is kept in status either way.
        results::record_checkpoints(&mut self.status, &inventory.to_status(), &synced);
        match refusal {
            Some(e) => Err(refusal_error(e)),
            None => Ok(()),
        }
    }

    /// The end of a successful run: upload and verify the model, its card and the checkpoints
    /// to every destination, then mark the job `Uploaded` (or failed, naming what was lost).
    pub(super) async fn upload(
        &mut self,
        runtime: &mut JobRuntime,
        exec: &dyn RemoteExec,
    ) -> Result<(), Error> {
        // Its time is when uploading began: the engine gives up after `UPLOAD_GRACE`.
        set_condition(
            &mut self.status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::False,
            Reason::Uploading,
            "uploading the results",
            None,
            Utc::now(),
        );
        self.collect_checkpoints(runtime, exec).await?;
        let model = finish::final_model(exec, &self.layout, &self.tool).await?;
        let Some(model) = model else {
            let message =
                format!("the trainer finished but left no model at {}", self.tool.outputs.final_model);
            return Err(Error::Failed(Failure::new(Reason::UploadFailed, message)));
        };
        let listed = format!(
            "model {} ({} bytes, sha256 {})",
            model.uri,
            model.size_bytes,
            model.sha256.clone().unwrap_or_default()
        );
        self.status.artifacts = vec![model];
        let outputs = match self.outputs(runtime).await? {
            Ok(outputs) => outputs,
            Err(why) => {
                let message = format!("{why}; {listed} was not uploaded");
                return Err(Error::Failed(Failure::new(Reason::UploadFailed, message)));
            }
        };
        if outputs.is_empty() {
            let message = format!("no spec.output: results listed, not uploaded: {listed}");
            return self.mark_uploaded(&message).await;
        }
        let model_file = self.model_file_name();
        let card = results::model_card(
            &self.job.name_any(),
            &self.job.spec,
            &self.status,
            None,
            vec![model_file.clone()],
        );
        self.write_card(exec, &card.render()).await?;
        let unsynced: Vec<CheckpointStatus> =
            self.status.checkpoints.iter().filter(|c| c.uri.is_none()).cloned().collect();
        let files = vec![
            ("model".to_string(), self.layout.join(&self.tool.outputs.final_model), model_file),
            ("model-card".to_string(), self.layout.join(CARD), CARD.to_string()),
        ];
        let sent = self.send(&outputs, exec, &files, &unsynced, UploadSettings::default()).await;
        self.record_sent(runtime, &sent).await;
        if let Some(e) = sent.refusal {
            self.report_refusal(&e).await;
            return Err(refusal_error(e));
        }
        let uploaded = describe(&sent.artifacts);
        if sent.artifacts.iter().any(|a| a.name == "model") {
            self.status.artifacts = sent.artifacts;
        }
        if !sent.failures.is_empty() {
            let saved = if uploaded.is_empty() {
                String::new()
            } else {
                format!("uploaded and verified: {uploaded}; ")
            };
            let message = format!("{saved}{}; {listed} was not uploaded there", sent.failures.join("; "));
            return Err(Error::Failed(Failure::new(Reason::UploadFailed, message)));
        }
        self.mark_uploaded(&format!("uploaded and verified: {uploaded}")).await
    }

    async fn mark_uploaded(&mut self, message: &str) -> Result<(), Error> {
        set_condition(
            &mut self.status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::True,
            Reason::Uploaded,
            message,
            None,
            Utc::now(),
        );
        self.event(EventType::Normal, Reason::Uploaded, "Upload", message).await;
        Ok(())
    }

    /// A run stopped early: saves the latest checkpoint and a model card marked incomplete to
    /// every destination, within a bounded time. Returns a sentence for the final message.
    pub(super) async fn salvage(
        &mut self,
        runtime: &mut JobRuntime,
        exec: &dyn RemoteExec,
        stop_reason: &str,
    ) -> Result<String, Error> {
        let outputs = match self.outputs(runtime).await? {
            Ok(outputs) if !outputs.is_empty() => outputs,
            Ok(_) => return Ok(self.checkpoint_sentence("stays on the machine and is lost with it")),
            Err(why) => return Ok(format!("nothing was saved: {why}")),
        };
        let Some(latest) = self.status.checkpoints.iter().max_by_key(|c| c.step).cloned() else {
            return Ok("there was no checkpoint to save".into());
        };
        self.set_phase(TrainingJobPhase::Uploading, Reason::Uploading, "saving the latest checkpoint");
        let path_in_repo = format!("checkpoints/{}", latest.name);
        let card = results::model_card(
            &self.job.name_any(),
            &self.job.spec,
            &self.status,
            Some(stop_reason),
            vec![path_in_repo.clone()],
        );
        self.write_card(exec, &card.render()).await?;
        let mut files = vec![("model-card".to_string(), self.layout.join(CARD), CARD.to_string())];
        // Hugging Face takes files: a folder checkpoint (no extension, e.g. `checkpoint-500`)
        // goes to S3 only.
        if outputs.hf.is_some() && latest.name.contains('.') {
            let path = format!("{}/{}", self.layout.output_dir(), latest.name);
            files.push((format!("checkpoint-{}", latest.step), path, path_in_repo));
        }
        let pending: Vec<CheckpointStatus> =
            std::iter::once(latest.clone()).filter(|c| c.uri.is_none()).collect();
        let sent = self.send(&outputs, exec, &files, &pending, results::salvage_settings()).await;
        // The run failed already: a refusal is reported and said in the message, no more.
        self.record_sent(runtime, &sent).await;
        if let Some(e) = &sent.refusal {
            self.report_refusal(e).await;
        }
        self.status.artifacts.extend(sent.artifacts.iter().cloned());
        let saved = describe(&sent.artifacts);
        let mut sentence = match self
            .status
            .checkpoints
            .iter()
            .find(|c| c.name == latest.name)
            .and_then(|c| c.uri.clone())
        {
            Some(uri) => format!("latest checkpoint {} (step {}) saved to {uri}", latest.name, latest.step),
            None => format!("latest checkpoint {} (step {}) was not saved to S3", latest.name, latest.step),
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
    pub(super) async fn keep_latest_checkpoint(
        &mut self,
        runtime: &mut JobRuntime,
        exec: &dyn RemoteExec,
    ) -> Result<String, Error> {
        let Some(latest) = self.status.checkpoints.iter().max_by_key(|c| c.step).cloned() else {
            return Ok("there is no checkpoint: training will start over".into());
        };
        let outputs = match self.outputs(runtime).await? {
            Ok(outputs) if outputs.s3.is_some() => outputs,
            Ok(_) => return Ok(self.checkpoint_sentence("stays on this machine only")),
            Err(why) => return Ok(format!("the latest checkpoint was not saved: {why}")),
        };
        if latest.uri.is_none() {
            let sent = self
                .send(&outputs, exec, &[], std::slice::from_ref(&latest), results::salvage_settings())
                .await;
            self.record_sent(runtime, &sent).await;
            if let Some(e) = &sent.refusal {
                self.report_refusal(e).await;
            }
            if let Some(failure) = sent.failures.first() {
                return Ok(format!(
                    "latest checkpoint {} (step {}) was not saved: {failure}",
                    latest.name, latest.step
                ));
            }
        }
        Ok(self.checkpoint_sentence("stays on this machine only"))
    }

    /// On a replacement machine, before the trainer starts: the latest checkpoint is found on the
    /// machine or brought back from S3, and recorded as `resumedFrom`. Without one, training
    /// starts over (with a Warning saying so).
    pub(super) async fn restore(
        &mut self,
        runtime: &mut JobRuntime,
        exec: &dyn RemoteExec,
    ) -> Result<(), Error> {
        self.status.resumed_from = None;
        if self.status.attempts <= 1 || self.status.checkpoints.is_empty() {
            return Ok(());
        }
        let on_machine = self.list_checkpoints(runtime, exec).await?.to_status();
        let wanted = results::latest_synced(&self.status.checkpoints).cloned();
        let newest_here = on_machine.iter().max_by_key(|c| c.step).cloned();
        let from = match (wanted, newest_here) {
            (Some(w), Some(h)) if h.step >= w.step => Some(h),
            (None, here) => here,
            (Some(w), here) => match self.bring_back(runtime, exec, &w).await? {
                Ok(()) => Some(w),
                Err(why) => {
                    let message = format!(
                        "could not bring checkpoint {} (step {}) back from storage: {why}",
                        w.name, w.step
                    );
                    warn!(job = %self.job.name_any(), error = %message, "Restore failed");
                    self.event(EventType::Warning, Reason::RestoreFailed, "Restore", &message).await;
                    here
                }
            },
        };
        match &from {
            Some(cp) => {
                let message = format!("resuming from checkpoint {} (step {})", cp.name, cp.step);
                self.event(EventType::Normal, Reason::Restored, "Restore", &message).await;
            }
            None => {
                let message = "no checkpoint reached this machine: training starts over (sync checkpoints with spec.output.s3 to resume on a new machine)";
                self.event(EventType::Warning, Reason::NoCheckpoint, "Restore", message).await;
            }
        }
        self.status.resumed_from = from;
        Ok(())
    }

    /// Downloads the synced checkpoint `cp` into the output folder.
    async fn bring_back(
        &mut self,
        runtime: &mut JobRuntime,
        exec: &dyn RemoteExec,
        cp: &CheckpointStatus,
    ) -> Result<Result<(), String>, Error> {
        let outputs = match self.outputs(runtime).await? {
            Ok(outputs) => outputs,
            Err(why) => return Ok(Err(why)),
        };
        let Some(s3) = outputs.s3.as_ref() else { return Ok(Err("spec.output.s3 is not set".into())) };
        let output_dir = self.layout.output_dir();
        let items = match restore_items(&s3.store, &s3.dest, &output_dir, &cp.name).await {
            Ok(items) if items.is_empty() => {
                return Ok(Err(format!("nothing stored under {}", cp.uri.clone().unwrap_or_default())));
            }
            Ok(items) => items,
            Err(e) => return Ok(Err(error_chain(&e))),
        };
        let ttl = UploadSettings::default().url_ttl;
        Ok(download(&s3.store, exec, &items, ttl, RESTORE_TIMEOUT).await.map_err(|e| error_chain(&e)))
    }

    /// Records in status what `send` uploaded: synced checkpoints, the job's totals; reports the
    /// names it left out.
    async fn record_sent(&mut self, runtime: &mut JobRuntime, sent: &Sent) {
        results::record_checkpoints(&mut self.status, &[], &sent.checkpoints);
        results::add_uploaded(&mut self.status, sent.files, sent.bytes);
        self.report_refused_names(runtime, "the results to upload", &sent.refused_names).await;
    }

    /// Uploads `files` (artifact name, path on the machine, name at the destination) and the
    /// checkpoints `pending` to every destination, within what the job may still upload. When
    /// the machine lists more than that, nothing more is sent (`refusal`).
    async fn send(
        &self,
        outputs: &Outputs,
        exec: &dyn RemoteExec,
        files: &[(String, String, String)],
        pending: &[CheckpointStatus],
        settings: UploadSettings,
    ) -> Sent {
        let mut sent = Sent::default();
        let settings = self.within_limits(settings);
        if let Some(s3) = &outputs.s3 {
            let output_dir = self.layout.output_dir();
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
                    warn!(job = %self.job.name_any(), error = %error_chain(&e), "Upload to S3 failed");
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
                commit_message: format!("gpu-trainer: TrainingJob {}", self.job.name_any()),
                staging_dir: self.layout.join("hf-staging"),
                cli: self.ctrl.hf_cli.clone(),
            };
            let timeout = settings.step_timeout.min(HF_TIMEOUT);
            match upload_to_hub(exec, &upload, &hf.token, timeout).await {
                Ok(statuses) => sent.artifacts.extend(statuses),
                Err(e) => {
                    warn!(job = %self.job.name_any(), error = %error_chain(&e), "Upload to Hugging Face failed");
                    sent.failures.push(format!("upload to Hugging Face failed: {}", error_chain(&e)));
                }
            }
        }
        sent
    }

    async fn write_card(&self, exec: &dyn RemoteExec, text: &str) -> Result<(), Error> {
        write_to_machine(exec, text, &self.layout.join(CARD)).await.map_err(|e| {
            Error::Remote(crate::remote::RemoteError::io("write the model card", error_chain(&e)))
        })
    }

    /// The final model's file name (the last part of the tool's `finalModel`).
    fn model_file_name(&self) -> String {
        let final_model = &self.tool.outputs.final_model;
        final_model.rsplit('/').find(|s| !s.is_empty()).unwrap_or("model").to_string()
    }

    fn checkpoint_sentence(&self, fate: &str) -> String {
        match self.status.checkpoints.iter().max_by_key(|c| c.step) {
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

    /// The `RemoteError` the verdict on the machine looks for, found through `source()`.
    use super::super::verdict::remote_error_in as remote_in;

    #[test]
    fn refusals_keep_the_remote_error_reachable_for_the_verdict_on_the_machine() {
        let listing = Error::Monitor(Box::new(MonitorError::Refused {
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
        let error = refusal_error(upload);
        assert!(matches!(remote_in(&error), Some(RemoteError::Refused(m)) if m.contains("1001 files")));

        // Other failures are not the machine misbehaving: retried as before.
        let timeout = ArtifactError::Remote {
            step: "upload",
            source: RemoteError::timeout(crate::remote::bounds::Phase::Output, Duration::from_secs(1)),
        };
        assert!(!is_refusal(&timeout));
        assert!(!is_refusal(&ArtifactError::Missing { path: "m".into() }));
    }
}
