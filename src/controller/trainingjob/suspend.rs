//! `spec.suspend`: stop the trainer gracefully, keep the list of what it saved, release the GPU
//! and wait in `Suspended`; clearing the flag rents a new machine and resumes (the engine's
//! `Suspended → AcquireMachine`). The decision is pure; the engine itself does not look at the
//! flag, so the driver asks here first.

use chrono::Utc;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::info;

use super::pass::Pass;
use super::{Error, finish, session};
use crate::api::{ConditionStatus, GpuInstance, Reason, is_condition_true, job_condition, set_condition};
use crate::api::{TrainingJobPhase, TrainingJobSpec, TrainingJobStatus};
use crate::engine::MachineObservation;

/// What the suspend flag asks for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuspendStep {
    /// Not suspended: the engine decides.
    Run,
    /// Stop, release the machine and enter `Suspended`.
    Suspend,
    /// Suspended already: nothing to do until the flag changes.
    StaySuspended,
}

pub fn suspend_step(spec: &TrainingJobSpec, status: &TrainingJobStatus) -> SuspendStep {
    if !spec.suspend || status.phase.is_finished() {
        SuspendStep::Run
    } else if status.phase == TrainingJobPhase::Suspended {
        SuspendStep::StaySuspended
    } else {
        SuspendStep::Suspend
    }
}

impl Pass<'_> {
    /// Stops the trainer (it saves on TERM), lists what it saved, keeps the latest checkpoint in
    /// S3 (with `spec.output.s3`), releases the machine and enters `Suspended`. Resuming rents a
    /// new machine, brings the checkpoint back and starts the tool's resume command.
    pub(super) async fn suspend(
        &mut self,
        runtime: &mut session::JobRuntime,
        instance: Option<&GpuInstance>,
        machine: &MachineObservation,
    ) -> Result<(), Error> {
        let mut kept = None;
        if let MachineObservation::Ready { .. } = machine
            && is_condition_true(&self.status.conditions, job_condition::TRAINING)
        {
            let exec = self.session(runtime, instance).await?;
            finish::stop(exec.as_ref(), &self.layout).await?;
            self.collect_checkpoints(runtime, exec.as_ref()).await?;
            kept = Some(self.keep_latest_checkpoint(runtime, exec.as_ref()).await?);
        }
        runtime.reset();
        let now = Utc::now();
        let message = format!(
            "spec.suspend is set: the GPU is released; {}",
            kept.unwrap_or_else(|| "training had not started".into())
        );
        for c in [job_condition::INSTANCE_READY, job_condition::DATA_STAGED, job_condition::TRAINING] {
            if crate::api::find_condition(&self.status.conditions, c).is_some() {
                set_condition(
                    &mut self.status.conditions,
                    c,
                    ConditionStatus::False,
                    Reason::Suspended,
                    &message,
                    None,
                    now,
                );
            }
        }
        set_condition(
            &mut self.status.conditions,
            job_condition::SUSPENDED,
            ConditionStatus::True,
            Reason::Suspended,
            &message,
            None,
            now,
        );
        self.set_phase(TrainingJobPhase::Suspended, Reason::Suspended, &message);
        if let Some(progress) = self.status.progress.as_mut() {
            progress.eta_seconds = None;
            progress.steps_per_second = None;
        }
        // The status says why the machine goes before it goes (see `Pass::persist`).
        self.release().await?;
        info!(job = %self.job.name_any(), "Suspended");
        self.event(EventType::Normal, Reason::Suspended, "Suspend", &message).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(suspend: bool) -> TrainingJobSpec {
        serde_json::from_value(serde_json::json!({
            "tool": "demo@1", "dataset": {"url": {"href": "http://x/d.tar"}}, "suspend": suspend
        }))
        .unwrap()
    }

    fn status(phase: TrainingJobPhase) -> TrainingJobStatus {
        TrainingJobStatus { phase, ..Default::default() }
    }

    #[test]
    fn suspending_a_running_job_stops_it_once() {
        assert_eq!(suspend_step(&spec(true), &status(TrainingJobPhase::Training)), SuspendStep::Suspend);
        assert_eq!(suspend_step(&spec(true), &status(TrainingJobPhase::Pending)), SuspendStep::Suspend);
        assert_eq!(
            suspend_step(&spec(true), &status(TrainingJobPhase::Suspended)),
            SuspendStep::StaySuspended
        );
    }

    #[test]
    fn finished_or_unsuspended_jobs_are_left_to_the_engine() {
        assert_eq!(suspend_step(&spec(true), &status(TrainingJobPhase::Succeeded)), SuspendStep::Run);
        assert_eq!(suspend_step(&spec(false), &status(TrainingJobPhase::Suspended)), SuspendStep::Run);
        assert_eq!(suspend_step(&spec(false), &status(TrainingJobPhase::Training)), SuspendStep::Run);
    }
}
