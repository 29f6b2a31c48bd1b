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

mod restore;
mod sync;
mod upload;

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
