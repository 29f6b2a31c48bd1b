//! Condition types of both resources and a pure helper that merges a new observation into a
//! condition list, keeping `lastTransitionTime` unless the status actually flips.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::{Reason, to_k8s_time};

/// Declares a module of condition-type constants plus `ALL`: every type with its description
/// (the doc comment), for documentation and checks.
macro_rules! condition_types {
    ($(#[doc = $module_doc:literal])* pub mod $module:ident {
        $( $(#[doc = $doc:literal])+ $name:ident = $value:literal; )+
    }) => {
        $(#[doc = $module_doc])*
        pub mod $module {
            $( $(#[doc = $doc])+ pub const $name: &str = $value; )+

            /// Every condition type and its description, in declaration order.
            pub const ALL: &[(&str, &str)] = &[$(($value, concat!($($doc),+))),+];
        }
    };
}

condition_types! {
    /// Condition types of a `TrainingJob`.
    pub mod job_condition {
        /// The job's GpuInstance is `Ready`.
        INSTANCE_READY = "InstanceReady";
        /// Dataset and recipe are on the machine and verified.
        DATA_STAGED = "DataStaged";
        /// The trainer is running.
        TRAINING = "Training";
        /// A stall was detected; True until training recovers or the job is stopped.
        STALLED = "Stalled";
        /// `softDeadlineSeconds` passed; a warning only, the job keeps running.
        SOFT_DEADLINE_EXCEEDED = "SoftDeadlineExceeded";
        /// Artifacts are uploaded and verified.
        UPLOADED = "Uploaded";
        /// The job is suspended.
        SUSPENDED = "Suspended";
        /// The job finished successfully.
        SUCCEEDED = "Succeeded";
        /// The job failed; the reason says why.
        FAILED = "Failed";
    }
}

condition_types! {
    /// Condition types of a `GpuInstance`.
    pub mod instance_condition {
        /// The provider accepted the rent call and returned an instance id.
        LAUNCHED = "Launched";
        /// SSH answers on the machine.
        REACHABLE = "Reachable";
        /// The machine is ready for work.
        READY = "Ready";
        /// The machine is being released.
        INSTANCE_TERMINATING = "InstanceTerminating";
        /// Releasing the machine has taken more than 10 minutes (`--termination-stuck-seconds`);
        /// the operator keeps trying.
        TERMINATION_STUCK = "TerminationStuck";
    }
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

/// The condition of the given type when it is present with status `True`.
pub fn true_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    find_condition(conditions, type_).filter(|c| c.status == "True")
}

/// True when the condition of the given type is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    true_condition(conditions, type_).is_some()
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
