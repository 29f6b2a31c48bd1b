//! Conversions between `chrono` (used by all decision code, which takes `now` as a parameter) and
//! the `Time` wrapper k8s-openapi uses in object metadata and conditions.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

/// A Kubernetes `Time` for a chrono instant (sub-nanosecond precision is not representable).
pub fn to_k8s_time(t: DateTime<Utc>) -> Time {
    let nanos = t.timestamp_nanos_opt().unwrap_or(i64::MAX);
    Time(Timestamp::from_nanosecond(nanos as i128).unwrap_or(Timestamp::MAX))
}

/// A Kubernetes `MicroTime` (leases, events) for a chrono instant.
pub fn to_k8s_micro_time(t: DateTime<Utc>) -> MicroTime {
    MicroTime(to_k8s_time(t).0)
}

/// A chrono instant for a Kubernetes `MicroTime`.
pub fn from_k8s_micro_time(t: &MicroTime) -> DateTime<Utc> {
    from_k8s_time(&Time(t.0))
}

/// A chrono instant for a Kubernetes `Time`.
pub fn from_k8s_time(t: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(t.0.as_nanosecond().clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_kubernetes_time() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T06:30:00.123456789Z").unwrap().with_timezone(&Utc);
        assert_eq!(from_k8s_time(&to_k8s_time(now)), now);
    }
}
