//! Condition types of both resources and a pure helper that merges a new observation into a
//! condition list, keeping `lastTransitionTime` unless the status actually flips.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::{Reason, to_k8s_time};

/// Condition types of a `TrainingJob`.
pub mod job_condition {
    /// The job's GpuInstance is `Ready`.
    pub const INSTANCE_READY: &str = "InstanceReady";
    /// Dataset and recipe are on the machine and verified.
    pub const DATA_STAGED: &str = "DataStaged";
    /// The trainer is running.
    pub const TRAINING: &str = "Training";
    /// A stall was detected; True until training recovers or the job is stopped.
    pub const STALLED: &str = "Stalled";
    /// Artifacts are uploaded and verified.
    pub const UPLOADED: &str = "Uploaded";
    /// The job is suspended.
    pub const SUSPENDED: &str = "Suspended";
    /// The job finished successfully.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The job failed; the reason says why.
    pub const FAILED: &str = "Failed";
}

/// Condition types of a `GpuInstance`.
pub mod instance_condition {
    /// The provider accepted the rent call and returned an instance id.
    pub const LAUNCHED: &str = "Launched";
    /// SSH answers on the machine.
    pub const REACHABLE: &str = "Reachable";
    /// The machine is ready for work.
    pub const READY: &str = "Ready";
    /// The machine is being released.
    pub const INSTANCE_TERMINATING: &str = "InstanceTerminating";
    /// Releasing the machine has taken more than 10 minutes; the operator keeps trying.
    pub const TERMINATION_STUCK: &str = "TerminationStuck";
}

/// Condition status values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { ConditionStatus::True } else { ConditionStatus::False }
    }
}

/// Sets condition `type_` in `conditions`. `lastTransitionTime` moves to `now` only when the
/// status changes (or the condition is new), so watchers see real transitions, not re-writes.
/// Returns true when anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: Reason,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: DateTime<Utc>,
) -> bool {
    let message = message.into();
    let status = status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let changed = existing.status != status
                || existing.reason != reason.as_str()
                || existing.message != message
                || existing.observed_generation != observed_generation;
            if existing.status != status {
                existing.last_transition_time = to_k8s_time(now);
            }
            existing.status = status.to_string();
            existing.reason = reason.as_str().to_string();
            existing.message = message;
            existing.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.as_str().to_string(),
                message,
                observed_generation,
                last_transition_time: to_k8s_time(now),
            });
            true
        }
    }
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of the given type is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::from_k8s_time;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = Vec::new();
        let ready = instance_condition::READY;
        assert!(set_condition(
            &mut conds,
            ready,
            ConditionStatus::False,
            Reason::Booting,
            "booting",
            None,
            at(0)
        ));
        assert!(set_condition(
            &mut conds,
            ready,
            ConditionStatus::False,
            Reason::Booting,
            "still",
            None,
            at(10)
        ));
        assert_eq!(from_k8s_time(&conds[0].last_transition_time), at(0));
        assert!(set_condition(&mut conds, ready, ConditionStatus::True, Reason::Ready, "ok", None, at(20)));
        assert_eq!(from_k8s_time(&conds[0].last_transition_time), at(20));
        assert!(is_condition_true(&conds, ready));
    }

    #[test]
    fn identical_observation_reports_no_change() {
        let mut conds = Vec::new();
        let t = job_condition::TRAINING;
        set_condition(&mut conds, t, ConditionStatus::True, Reason::Training, "step 5", Some(1), at(0));
        assert!(!set_condition(
            &mut conds,
            t,
            ConditionStatus::True,
            Reason::Training,
            "step 5",
            Some(1),
            at(5)
        ));
        assert_eq!(conds.len(), 1);
    }
}
