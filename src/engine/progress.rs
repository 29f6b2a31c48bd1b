//! What a poll of the trainer means, once for both front ends: progress folded into status (a
//! total the trainer stopped printing is kept), what the engine should make of the poll, the
//! monitoring memory a rebuilt monitor continues from (so a restart or a resumed launch does
//! not start the stall clock again), and the soft deadline. Pure.

use chrono::{DateTime, Utc};

use super::TrainingObservation;
use crate::api::{
    ConditionStatus, ProgressStatus, Reason, TrainingJobSpec, TrainingJobStatus, from_k8s_time,
    is_condition_true, job_condition, set_condition, to_k8s_time, true_condition,
};
use crate::monitor::poller::{EarlierMonitoring, Outcome, TrainingStatus};
use crate::monitor::stall::Recommendation;

/// Folds one poll into `status.progress`. Pure. `lastUpdateTime` moves only when the step does,
/// so an unchanged reading writes nothing.
pub fn record_progress(status: &mut TrainingJobStatus, polled: &TrainingStatus, now: DateTime<Utc>) {
    let snapshot = &polled.progress;
    let mut progress: ProgressStatus = status.progress.clone().unwrap_or_default();
    if let Some(step) = snapshot.step {
        if progress.step != step || progress.last_update_time.is_none() {
            progress.last_update_time = Some(to_k8s_time(now));
        }
        progress.set_step(step, snapshot.total_steps.or(progress.total_steps));
    }
    progress.loss = snapshot.loss.or(progress.loss);
    progress.steps_per_second = snapshot.steps_per_second.map(round3);
    progress.eta_seconds = snapshot.eta_seconds.map(|e| e.round() as i64);
    status.progress = Some(progress);
}

/// How a poll changed the `Stalled` condition, for events and notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallChange {
    Flagged,
    Cleared,
}

/// Sets the `Stalled` condition when the monitor flags a stall and clears it when progress
/// resumes; the flag's time is what a rebuilt monitor continues from. Pure.
pub fn record_stall(
    status: &mut TrainingJobStatus,
    polled: &TrainingStatus,
    now: DateTime<Utc>,
) -> Option<StallChange> {
    let stalled = is_condition_true(&status.conditions, job_condition::STALLED);
    let (value, reason, change) = match polled.stall.recommendation {
        Recommendation::WaitForRecovery | Recommendation::StopJob if !stalled => {
            (ConditionStatus::True, Reason::Stalled, StallChange::Flagged)
        }
        Recommendation::Continue if stalled => {
            (ConditionStatus::False, Reason::Recovered, StallChange::Cleared)
        }
        _ => return None,
    };
    set_condition(
        &mut status.conditions,
        job_condition::STALLED,
        value,
        reason,
        &polled.stall.reason,
        None,
        now,
    );
    Some(change)
}

/// What the status keeps of the monitoring of the run on the current machine, so a monitor
/// rebuilt after an operator restart continues the no-progress clock and a flagged stall's
/// grace period instead of starting both again. Only what happened since training started on
/// this machine counts (the `Training` condition's transition). Pure.
pub fn earlier_monitoring(status: &TrainingJobStatus) -> EarlierMonitoring {
    let Some(training) = true_condition(&status.conditions, job_condition::TRAINING) else {
        return EarlierMonitoring::default();
    };
    let launched = from_k8s_time(&training.last_transition_time);
    let step = status.progress.as_ref().map(|p| {
        let changed = p.last_update_time.as_ref().map(from_k8s_time).unwrap_or(launched);
        (p.step, changed.max(launched))
    });
    let stall_flagged_since = true_condition(&status.conditions, job_condition::STALLED)
        .map(|c| from_k8s_time(&c.last_transition_time))
        .filter(|since| *since >= launched);
    EarlierMonitoring { step, stall_flagged_since }
}

/// What one poll means for the engine. Pure.
pub fn observation(polled: &TrainingStatus) -> TrainingObservation {
    match (&polled.outcome, polled.stall.recommendation) {
        (Some(Outcome::Succeeded), _) => TrainingObservation::Finished,
        (Some(Outcome::Failed { reason, message }), _) => {
            TrainingObservation::Crashed { reason: *reason, message: message.clone() }
        }
        (None, Recommendation::StopJob) => {
            TrainingObservation::Stalled { message: polled.stall.reason.clone() }
        }
        (None, _) => TrainingObservation::Running,
    }
}

/// Condition raised when `softDeadlineSeconds` passes (a warning; the job keeps running).
pub const SOFT_DEADLINE_CONDITION: &str = "SoftDeadlineExceeded";

/// True when the soft deadline has passed since the job started. Pure.
pub fn soft_deadline_passed(spec: &TrainingJobSpec, status: &TrainingJobStatus, now: DateTime<Utc>) -> bool {
    let (Some(limit), Some(started)) = (spec.soft_deadline_seconds, status.start_time.as_ref()) else {
        return false;
    };
    (now - crate::api::from_k8s_time(started)).num_seconds() >= limit
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn condition(status: &mut TrainingJobStatus, type_: &str, value: ConditionStatus, at_: DateTime<Utc>) {
        set_condition(&mut status.conditions, type_, value, Reason::Training, "m", None, at_);
    }

    #[test]
    fn the_monitoring_memory_is_taken_from_the_run_on_the_current_machine() {
        let mut status = TrainingJobStatus::default();
        assert_eq!(earlier_monitoring(&status), EarlierMonitoring::default(), "nothing launched yet");
        // Training launched at 100; step 40 last changed at 500; a stall flagged at 700.
        condition(&mut status, job_condition::TRAINING, ConditionStatus::True, at(100));
        let mut progress = ProgressStatus::default();
        progress.set_step(40, Some(100));
        progress.last_update_time = Some(to_k8s_time(at(500)));
        status.progress = Some(progress);
        condition(&mut status, job_condition::STALLED, ConditionStatus::True, at(700));
        assert_eq!(
            earlier_monitoring(&status),
            EarlierMonitoring { step: Some((40, at(500))), stall_flagged_since: Some(at(700)) }
        );
        // On a replacement machine launched at 900, the step and flag of the earlier machine
        // do not count against the new run: its clock starts at its launch.
        condition(&mut status, job_condition::TRAINING, ConditionStatus::False, at(800));
        condition(&mut status, job_condition::TRAINING, ConditionStatus::True, at(900));
        assert_eq!(
            earlier_monitoring(&status),
            EarlierMonitoring { step: Some((40, at(900))), stall_flagged_since: None }
        );
        // A stall that cleared is not carried.
        condition(&mut status, job_condition::STALLED, ConditionStatus::False, at(1000));
        assert_eq!(earlier_monitoring(&status).stall_flagged_since, None);
    }

    #[test]
    fn the_soft_deadline_counts_from_the_start() {
        let spec: TrainingJobSpec = serde_json::from_value(serde_json::json!({
            "tool": "demo@1", "dataset": {"url": {"href": "http://x/d.tar"}}, "softDeadlineSeconds": 600
        }))
        .unwrap();
        let mut status = TrainingJobStatus::default();
        assert!(!soft_deadline_passed(&spec, &status, at(10_000)));
        status.start_time = Some(to_k8s_time(at(0)));
        assert!(!soft_deadline_passed(&spec, &status, at(599)));
        assert!(soft_deadline_passed(&spec, &status, at(600)));
    }
}
