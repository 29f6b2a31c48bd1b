//! The end of a job in its status, once for both front ends: the final phase, reason, message
//! and conditions, a completion time that a later pass never moves, the estimates closed; and
//! how long a finished job is kept. Pure.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::api::{
    ConditionStatus, Reason, TrainingJobPhase, TrainingJobStatus, job_condition, set_condition, to_k8s_time,
};

/// Sets the final phase, reason, message, completion time and conditions. Pure.
pub fn finish_status(
    status: &mut TrainingJobStatus,
    phase: TrainingJobPhase,
    reason: Reason,
    message: &str,
    now: DateTime<Utc>,
) {
    status.phase = phase;
    status.reason = Some(reason);
    status.message = Some(message.to_string());
    status.completion_time.get_or_insert_with(|| to_k8s_time(now));
    let (done, other) = if phase == TrainingJobPhase::Succeeded {
        (job_condition::SUCCEEDED, job_condition::FAILED)
    } else {
        (job_condition::FAILED, job_condition::SUCCEEDED)
    };
    set_condition(&mut status.conditions, done, ConditionStatus::True, reason, message, None, now);
    set_condition(&mut status.conditions, other, ConditionStatus::False, reason, message, None, now);
    for running in [job_condition::TRAINING, job_condition::INSTANCE_READY] {
        if crate::api::find_condition(&status.conditions, running).is_some() {
            set_condition(
                &mut status.conditions,
                running,
                ConditionStatus::False,
                reason,
                "the machine is released",
                None,
                now,
            );
        }
    }
    if crate::api::find_condition(&status.conditions, job_condition::UPLOADED).is_some()
        && !crate::api::is_condition_true(&status.conditions, job_condition::UPLOADED)
    {
        set_condition(
            &mut status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::False,
            reason,
            message,
            None,
            now,
        );
    }
    if let Some(progress) = status.progress.as_mut() {
        progress.eta_seconds = None;
        progress.steps_per_second = None;
    }
    if let Some(cost) = status.cost.as_mut() {
        cost.estimated_total = Some(cost.accrued);
    }
}

/// Time left before a finished job is deleted (`ttlSecondsAfterFinished`); zero when due, `None`
/// when the job is kept. Pure.
pub fn ttl_left(
    ttl_seconds: Option<i64>,
    completed: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<Duration> {
    let due = completed? + chrono::Duration::seconds(ttl_seconds?.max(0));
    Some((due - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CostStatus, is_condition_true};

    #[test]
    fn a_finished_job_is_kept_until_its_ttl_passes() {
        let done = Utc::now();
        assert_eq!(ttl_left(None, Some(done), done), None);
        assert_eq!(ttl_left(Some(60), None, done), None);
        assert_eq!(
            ttl_left(Some(60), Some(done), done + chrono::Duration::seconds(20)),
            Some(Duration::from_secs(40))
        );
        assert_eq!(
            ttl_left(Some(60), Some(done), done + chrono::Duration::seconds(90)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn finishing_sets_one_final_condition_and_clears_training() {
        let now = Utc::now();
        let mut status = TrainingJobStatus::default();
        set_condition(
            &mut status.conditions,
            job_condition::TRAINING,
            ConditionStatus::True,
            Reason::Training,
            "",
            None,
            now,
        );
        status.cost =
            Some(CostStatus { accrued: 0.2, estimated_total: Some(0.9), price_per_hour: Some(0.4) });
        finish_status(&mut status, TrainingJobPhase::Succeeded, Reason::Succeeded, "done", now);
        assert!(is_condition_true(&status.conditions, job_condition::SUCCEEDED));
        assert!(!is_condition_true(&status.conditions, job_condition::FAILED));
        assert!(!is_condition_true(&status.conditions, job_condition::TRAINING));
        assert_eq!(status.cost.unwrap().estimated_total, Some(0.2));
        assert!(status.completion_time.is_some());
    }
}
