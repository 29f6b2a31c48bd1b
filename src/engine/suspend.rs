//! `spec.suspend`: stop the trainer gracefully, keep the list of what it saved, release the GPU
//! and wait in `Suspended`; clearing the flag rents a new machine and resumes (the engine's
//! `Suspended → AcquireMachine`). The decision and the status it leaves are pure; `next_step`
//! does not look at the flag, so the driver asks here first.

use chrono::{DateTime, Utc};

use crate::api::{
    ConditionStatus, Reason, TrainingJobPhase, TrainingJobSpec, TrainingJobStatus, find_condition,
    job_condition, set_condition,
};

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

/// Marks the job `Suspended` (`kept` says what became of its latest checkpoint) and returns the
/// message. Pure.
pub fn record_suspended(status: &mut TrainingJobStatus, kept: Option<String>, now: DateTime<Utc>) -> String {
    let message = format!(
        "spec.suspend is set: the GPU is released; {}",
        kept.unwrap_or_else(|| "training had not started".into())
    );
    for c in [job_condition::INSTANCE_READY, job_condition::DATA_STAGED, job_condition::TRAINING] {
        if find_condition(&status.conditions, c).is_some() {
            set_condition(
                &mut status.conditions,
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
        &mut status.conditions,
        job_condition::SUSPENDED,
        ConditionStatus::True,
        Reason::Suspended,
        &message,
        None,
        now,
    );
    status.phase = TrainingJobPhase::Suspended;
    status.reason = Some(Reason::Suspended);
    status.message = Some(message.clone());
    if let Some(progress) = status.progress.as_mut() {
        progress.eta_seconds = None;
        progress.steps_per_second = None;
    }
    message
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
