//! What a front end gives the driver: narrow ports over its status store, its machine, its
//! secrets, its notifications, its artifact store and its clock. The TrainingJob controller
//! implements them over TrainingJob, GpuInstance and Secret objects; `gpu-trainer launch` over a
//! state file and a local, SSH or rented machine; the driver's tests over memory.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::super::MachineObservation;
use super::super::env::Secrets;
use super::super::outcome::{Failure, StepError};
use super::super::stage::LocalFolders;
use super::memory::JobMemory;
use crate::api::{Reason, TrainingJobPhase, TrainingJobSpec, TrainingJobStatus};
use crate::monitor::poller::{MonitorError, TrainingStatus};
use crate::remote::RemoteExec;
use crate::remote::launch::RemoteLayout;
use crate::remote::tool::RenderedTool;

/// The error type of a front end: every shared step's error converts into it, and it says when
/// it is a job's permanent failure (which the driver turns into `Failed`).
pub trait EngineError: From<StepError> + From<Box<MonitorError>> + Send + 'static {
    /// The failure this error carries, or the error itself when it is worth another try.
    fn into_failure(self) -> Result<Failure, Self>;
}

/// The job, as read by the driver.
pub trait JobSource {
    fn spec(&self) -> &TrainingJobSpec;
    fn layout(&self) -> &RemoteLayout;
    fn tool(&self) -> &RenderedTool;
    /// A `spec.dataset.local` folder's place (only `launch` has one).
    fn local_folders(&self) -> Option<LocalFolders<'_>> {
        None
    }
    /// How often the trainer is polled while it runs: `spec.monitoring.pollIntervalSeconds`.
    fn poll_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.spec().monitoring.poll_interval_seconds))
    }
}

/// Where the status lives (the TrainingJob's status, or a state file).
#[async_trait]
pub trait StatusStore: Send {
    type Error: EngineError;
    fn status(&self) -> &TrainingJobStatus;
    fn status_mut(&mut self) -> &mut TrainingJobStatus;
    /// Writes the status now: before a step that cannot be undone (releasing the machine), so
    /// that a crash right after it finds the status that explains it.
    async fn persist(&mut self) -> Result<(), Self::Error>;
}

/// The clock: one `now` per step, so a step sees one time.
pub trait Clock {
    fn now(&self) -> DateTime<Utc>;
}

/// Checks while a step runs whether the machine was lost (failed, gone, going away).
#[async_trait]
pub trait LostWatch: Send + Sync {
    async fn is_lost(&self) -> bool;
}

/// The job's machine.
#[async_trait]
pub trait Machine: StatusStore {
    /// What is known of the machine now, its facts (instance, price, cost, readiness) written
    /// into status.
    async fn observe(&mut self, now: DateTime<Utc>) -> Result<MachineObservation, Self::Error>;
    /// Asks for the machine of `attempt` (from 1), giving back the previous one; records the
    /// instance in status (the attempt is recorded already: a rent that provably did not happen
    /// takes it back).
    async fn acquire(&mut self, attempt: i32, now: DateTime<Utc>) -> Result<(), Self::Error>;
    /// Gives the machine back (after the status says why); idempotent, nothing held is fine.
    async fn release(&mut self) -> Result<(), Self::Error>;
    /// True while the front end holds a machine that may bill.
    fn holds_machine(&self) -> bool;
    /// The connection to the ready machine (reused while it lasts).
    async fn connect(&mut self) -> Result<Arc<dyn RemoteExec>, Self::Error>;
    /// Drops the connection (the machine is gone, replaced or broke a step).
    fn disconnect(&mut self);
    /// Names the machine in its work dir: a work dir claimed by another machine's run is reset.
    fn machine_name(&self) -> String;
    /// A watch for steps on the machine; `None` when the machine cannot be lost (this one).
    fn lost_watch(&self) -> Option<Box<dyn LostWatch>>;
    /// The driver's memory of this job (monitor, last poll), kept by the front end between passes.
    fn memory(&mut self) -> &mut JobMemory;
}

/// What users are told about (Kubernetes events and webhooks, or the terminal).
#[derive(Clone, Copy, Debug)]
pub enum JobEvent<'a> {
    Staged(&'a str),
    TrainingStarted(&'a str),
    Stalled(&'a str),
    Recovered(&'a str),
    SoftDeadline(&'a str),
    Suspended(&'a str),
    Resumed(&'a str),
    Finished {
        phase: TrainingJobPhase,
        reason: Reason,
        message: &'a str,
    },
    /// A poll's reading (for progress display).
    Polled(&'a TrainingStatus),
    /// A step is beginning (for logs and for a pass abandoned at its time limit).
    Entering(&'static str),
}

#[async_trait]
pub trait Notifier: Send {
    async fn notify(&mut self, event: JobEvent<'_>);
}

/// Where results go and checkpoints come back from.
#[async_trait]
pub trait ArtifactStore: StatusStore {
    /// On a replacement machine, before training: the latest checkpoint brought back and
    /// recorded as `resumedFrom`.
    async fn restore(&mut self, exec: &dyn RemoteExec) -> Result<(), Self::Error>;
    /// While training: complete checkpoints synced.
    async fn sync_checkpoints(&mut self, exec: &dyn RemoteExec) -> Result<(), Self::Error>;
    /// What checkpoints the trainer left, into status.
    async fn collect_checkpoints(&mut self, exec: &dyn RemoteExec) -> Result<(), Self::Error>;
    /// Before a suspend: the latest checkpoint kept where a new machine finds it; a sentence.
    async fn keep_latest_checkpoint(&mut self, exec: &dyn RemoteExec) -> Result<String, Self::Error>;
    /// A run stopped early: the latest checkpoint and an incomplete model card saved; a sentence.
    async fn salvage(&mut self, exec: &dyn RemoteExec, stop_reason: &str) -> Result<String, Self::Error>;
    /// A finished run: the model collected, uploaded and verified, `Uploaded` set. A failure that
    /// no retry mends is an error whose [`EngineError::into_failure`] is the failure.
    async fn upload(&mut self, exec: &dyn RemoteExec) -> Result<(), Self::Error>;
}

/// Everything a front end gives the driver.
pub trait JobPorts: JobSource + Clock + Machine + Notifier + ArtifactStore + Send {
    /// Where `valueFrom` values and storage credentials come from.
    fn secrets(&self) -> &dyn Secrets;
}
