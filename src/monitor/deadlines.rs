//! Deadlines from the job's spec: `softDeadlineSeconds` only warns, `activeDeadlineSeconds`
//! stops the job (provisioning included, so it counts from `status.startTime`). Pure: the
//! caller passes `now`, which keeps the arithmetic testable and the controller's clock in one place.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::api::{TrainingJobSpec, TrainingJobStatus, from_k8s_time};

/// Where a job stands against its deadlines.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadlineCheck {
    pub soft_exceeded: bool,
    pub hard_exceeded: bool,
    /// When the soft deadline passes (or passed), if there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_deadline: Option<DateTime<Utc>>,
    pub hard_deadline: DateTime<Utc>,
    /// Time left before the hard deadline; negative once it passed.
    pub remaining_seconds: i64,
}

/// Checks deadlines counted from `started_at`.
pub fn check_deadlines(
    started_at: DateTime<Utc>,
    active_deadline_seconds: i64,
    soft_deadline_seconds: Option<i64>,
    now: DateTime<Utc>,
) -> DeadlineCheck {
    let hard_deadline = started_at + Duration::seconds(active_deadline_seconds.max(0));
    let soft_deadline = soft_deadline_seconds.map(|s| started_at + Duration::seconds(s.max(0)));
    DeadlineCheck {
        soft_exceeded: soft_deadline.is_some_and(|d| now >= d),
        hard_exceeded: now >= hard_deadline,
        soft_deadline,
        hard_deadline,
        remaining_seconds: (hard_deadline - now).num_seconds(),
    }
}

/// Checks a job's deadlines from its spec and the `startTime` in its status; `None` before the
/// job has started.
pub fn check_job_deadlines(
    spec: &TrainingJobSpec,
    status: &TrainingJobStatus,
    now: DateTime<Utc>,
) -> Option<DeadlineCheck> {
    let started_at = from_k8s_time(status.start_time.as_ref()?);
    Some(check_deadlines(started_at, spec.active_deadline_seconds, spec.soft_deadline_seconds, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn soft_warns_before_hard_stops() {
        let start = at("2026-11-23T06:00:00Z");
        let check = check_deadlines(start, 4 * 3600, Some(3600), at("2026-11-23T06:59:59Z"));
        assert!(!check.soft_exceeded && !check.hard_exceeded);
        let check = check_deadlines(start, 4 * 3600, Some(3600), at("2026-11-23T07:00:00Z"));
        assert!(check.soft_exceeded && !check.hard_exceeded);
        assert_eq!(check.remaining_seconds, 3 * 3600);
        let check = check_deadlines(start, 4 * 3600, Some(3600), at("2026-11-23T10:00:01Z"));
        assert!(check.hard_exceeded);
        assert_eq!(check.remaining_seconds, -1);
    }

    #[test]
    fn no_soft_deadline_never_warns() {
        let start = at("2026-11-23T06:00:00Z");
        let check = check_deadlines(start, 60, None, at("2026-11-24T06:00:00Z"));
        assert!(!check.soft_exceeded && check.hard_exceeded && check.soft_deadline.is_none());
    }

    #[test]
    fn reads_the_start_time_from_status() {
        let spec: TrainingJobSpec = serde_json::from_value(serde_json::json!({
            "tool": "demo@1", "dataset": {"url": {"href": "https://example.com/d.tar"}},
            "activeDeadlineSeconds": 7200, "softDeadlineSeconds": 3600
        }))
        .unwrap();
        let mut status = TrainingJobStatus::default();
        assert!(check_job_deadlines(&spec, &status, at("2026-11-23T06:00:00Z")).is_none());
        status.start_time = Some(crate::api::to_k8s_time(at("2026-11-23T06:00:00Z")));
        let check = check_job_deadlines(&spec, &status, at("2026-11-23T07:30:00Z")).unwrap();
        assert!(check.soft_exceeded && !check.hard_exceeded);
    }
}
