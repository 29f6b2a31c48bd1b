//! `spec.suspend`: stop the trainer gracefully, keep the list of what it saved, release the GPU
//! and wait in `Suspended`; clearing the flag rents a new machine and resumes (the engine's
//! `Suspended → AcquireMachine`). The decision is pure; the engine itself does not look at the
//! flag, so the driver asks here first.

use crate::api::{TrainingJobPhase, TrainingJobSpec, TrainingJobStatus};

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
