//! Checkpoints synced while the trainer runs, and what every upload shares: sending files and
//! checkpoints to each destination within the job's limits, and recording what went.

use super::*;

impl ResultStore {
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

    /// Records in status what `send` uploaded: synced checkpoints, the job's totals; reports the
    /// names it left out.
    pub(super) async fn record_sent(&mut self, job: &mut JobView<'_>, sent: &Sent) {
        results::record_checkpoints(job.status, &[], &sent.checkpoints);
        results::add_uploaded(job.status, sent.files, sent.bytes);
        self.report_refused_names(job, "the results to upload", &sent.refused_names).await;
    }

    /// Uploads `files` (artifact name, path on the machine, name at the destination) and the
    /// checkpoints `pending` to every destination, within what the job may still upload. When
    /// the machine lists more than that, nothing more is sent (`refusal`).
    pub(super) async fn send(
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
