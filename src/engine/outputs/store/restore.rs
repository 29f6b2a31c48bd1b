//! A replacement machine gets the latest checkpoint back before training resumes.

use super::*;

impl ResultStore {
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
}

/// What bringing a checkpoint back from storage came to.
enum BringBack {
    Restored,
    Failed(String),
}
