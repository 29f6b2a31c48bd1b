//! Pure decisions of the GpuInstance controller: what a provider observation means, when the
//! boot deadline passes, what to make of a create-pending mark, and which duplicate survives.
//! Everything here takes `now` and touches nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::api::{GpuInstanceSpec, Reason};
use crate::provider::{Instance, InstanceState};

/// What an observed provider state means for the GpuInstance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Still starting; keep waiting (within the boot deadline).
    Booting,
    /// The container runs; check SSH.
    Running,
    /// It will not run our work: release it. `exclude_machine` bans the host for this instance.
    Release { reason: Reason, lost: bool, exclude_machine: bool, message: String },
}

/// Marker the provider puts in `status_msg` when the container could not be created.
const OCI_FAILURE: &str = "OCI runtime create failed";

/// Classifies an observation. `was_ready` tells a machine that failed to boot (Failed) from one
/// that died while working (Lost).
pub fn classify(instance: &Instance, was_ready: bool) -> Verdict {
    let msg = instance.status_msg.clone().unwrap_or_default();
    if msg.contains(OCI_FAILURE) {
        return Verdict::Release {
            reason: Reason::BootFailed,
            lost: false,
            exclude_machine: true,
            message: format!("the container could not be created: {}", first_line(&msg)),
        };
    }
    let dead = |reason: Reason, what: &str| Verdict::Release {
        reason,
        lost: was_ready,
        exclude_machine: true,
        message: if msg.is_empty() { what.to_string() } else { format!("{what}: {}", first_line(&msg)) },
    };
    match &instance.state {
        InstanceState::Creating | InstanceState::Loading | InstanceState::Rebooting => Verdict::Booting,
        InstanceState::Running => Verdict::Running,
        InstanceState::Interrupted => Verdict::Release {
            reason: Reason::Outbid,
            lost: true,
            exclude_machine: false,
            message: "the instance was outbid or interrupted by its host (stopped in all state fields)"
                .into(),
        },
        InstanceState::Exited => {
            dead(if was_ready { Reason::InstanceLost } else { Reason::BootFailed }, "the container exited")
        }
        InstanceState::Offline => {
            dead(if was_ready { Reason::InstanceLost } else { Reason::BootFailed }, "the host went offline")
        }
        InstanceState::Stopped => dead(Reason::InstanceLost, "the instance stopped"),
        InstanceState::Released => Verdict::Release {
            reason: Reason::InstanceLost,
            lost: true,
            exclude_machine: false,
            message: "the provider released the instance".into(),
        },
        InstanceState::Unknown(state) => dead(
            if was_ready { Reason::InstanceLost } else { Reason::BootFailed },
            &format!("unknown state {state:?}"),
        ),
    }
}

fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or_default();
    let mut end = line.len().min(300);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// How long the machine may take from rent to SSH answering.
pub fn boot_timeout(spec: &GpuInstanceSpec, default: Duration, per_image_gb: Duration) -> Duration {
    let base = spec.boot_timeout_seconds.map(|s| Duration::from_secs(u64::from(s))).unwrap_or(default);
    base + per_image_gb * spec.image_size_gb.unwrap_or(0)
}

/// True when the boot deadline has passed.
pub fn boot_deadline_passed(launched_at: DateTime<Utc>, timeout: Duration, now: DateTime<Utc>) -> bool {
    now.signed_duration_since(launched_at).to_std().is_ok_and(|elapsed| elapsed >= timeout)
}

/// How long until the boot deadline; zero once it has passed. An SSH probe gets no more than
/// this, so it never holds up the release of a machine that did not boot.
pub fn boot_time_left(launched_at: DateTime<Utc>, timeout: Duration, now: DateTime<Utc>) -> Duration {
    let elapsed = now.signed_duration_since(launched_at).to_std().unwrap_or_default();
    timeout.saturating_sub(elapsed)
}

/// What a create-pending mark means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingCreate {
    /// No rent call is unaccounted for.
    None,
    /// A rent call was started and its result never recorded: look the instance up by label.
    Unresolved { since: DateTime<Utc> },
}

/// Reads the two annotations: pending newer than succeeded (or succeeded missing) is unresolved.
pub fn pending_create(pending: Option<&str>, succeeded: Option<&str>) -> PendingCreate {
    let parse = |s: &str| DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc));
    let Some(pending) = pending.and_then(parse) else { return PendingCreate::None };
    match succeeded.and_then(parse) {
        Some(done) if done >= pending => PendingCreate::None,
        _ => PendingCreate::Unresolved { since: pending },
    }
}

/// Of several instances carrying one GpuInstance's label, the one to keep: the oldest contract
/// (earliest start, then lowest id). The rest are duplicates to destroy.
pub fn choose_survivor(instances: &[Instance]) -> Option<&Instance> {
    instances.iter().filter(|i| i.state != InstanceState::Released).min_by(|a, b| {
        let start = |i: &Instance| i.started_at.unwrap_or(DateTime::<Utc>::MAX_UTC);
        start(a).cmp(&start(b)).then(a.id.cmp(&b.id))
    })
}

/// Whether an instance is gone for good (destroy confirmed).
pub fn is_gone(instance: Option<&Instance>) -> bool {
    instance.is_none_or(|i| i.state == InstanceState::Released)
}

/// Adds a machine that failed a job (or an instance) to its exclusion list, so it is never
/// rented for it again. Id 0 (unknown) and repeats are left out.
pub fn exclude_machine(excluded: &mut Vec<i64>, machine_id: i64) {
    if machine_id != 0 && !excluded.contains(&machine_id) {
        excluded.push(machine_id);
    }
}

/// The timestamp format of the create-pending and create-succeeded annotations.
pub fn annotation_time(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The machine ids in a GpuInstance's `gputrainer.dev/avoid-machines` annotation. Pure.
pub fn avoided_machines(instance: &crate::api::GpuInstance) -> Vec<i64> {
    kube::ResourceExt::annotations(instance)
        .get(crate::api::AVOID_MACHINES_ANNOTATION)
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::InstanceId;
    use chrono::TimeZone;
    use std::collections::BTreeMap;

    fn instance(id: i64, state: InstanceState, msg: Option<&str>) -> Instance {
        Instance {
            id: InstanceId(id),
            label: None,
            state,
            actual_status: None,
            intended_status: None,
            cur_state: None,
            next_state: None,
            status_msg: msg.map(str::to_string),
            machine_id: Some(7),
            host_id: None,
            gpu_name: None,
            num_gpus: None,
            vram_gb: None,
            price_per_hour: None,
            reliability: None,
            geolocation: None,
            image: None,
            disk_gb: None,
            ssh: None,
            started_at: None,
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn classification_table() {
        use InstanceState as S;
        let cases: Vec<(S, Option<&str>, bool, Verdict)> = vec![
            (S::Creating, None, false, Verdict::Booting),
            (S::Loading, None, false, Verdict::Booting),
            (S::Running, None, false, Verdict::Running),
            (S::Running, None, true, Verdict::Running),
        ];
        for (state, msg, ready, expected) in cases {
            assert_eq!(classify(&instance(1, state.clone(), msg), ready), expected, "{state:?}");
        }
        let release =
            |state: S, msg: Option<&str>, ready: bool| match classify(&instance(1, state, msg), ready) {
                Verdict::Release { reason, lost, exclude_machine, .. } => (reason, lost, exclude_machine),
                other => panic!("expected release, got {other:?}"),
            };
        assert_eq!(release(S::Exited, None, false), (Reason::BootFailed, false, true));
        assert_eq!(release(S::Exited, None, true), (Reason::InstanceLost, true, true));
        assert_eq!(release(S::Offline, None, true), (Reason::InstanceLost, true, true));
        assert_eq!(release(S::Interrupted, None, true), (Reason::Outbid, true, false));
        assert_eq!(release(S::Unknown("weird".into()), None, false), (Reason::BootFailed, false, true));
        assert_eq!(
            release(S::Loading, Some("Error: OCI runtime create failed: runc create failed"), false),
            (Reason::BootFailed, false, true)
        );
    }

    #[test]
    fn boot_timeout_grows_with_image_size() {
        let spec: GpuInstanceSpec =
            serde_json::from_value(serde_json::json!({"image": "x", "imageSizeGb": 10})).unwrap();
        let t = boot_timeout(&spec, Duration::from_secs(900), Duration::from_secs(30));
        assert_eq!(t, Duration::from_secs(1200));
        let at = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap();
        assert!(!boot_deadline_passed(at(0), t, at(1199)));
        assert!(boot_deadline_passed(at(0), t, at(1200)));
        assert_eq!(boot_time_left(at(0), t, at(1190)), Duration::from_secs(10));
        assert_eq!(boot_time_left(at(0), t, at(1200)), Duration::ZERO);
        assert_eq!(boot_time_left(at(0), t, at(5000)), Duration::ZERO);
        // A clock that went back leaves the whole timeout.
        assert_eq!(boot_time_left(at(10), t, at(0)), t);
    }

    #[test]
    fn pending_mark_newer_than_success_is_unresolved() {
        let t1 = "2026-11-23T10:00:00.000000Z";
        let t2 = "2026-11-23T10:00:05.000000Z";
        assert_eq!(pending_create(None, None), PendingCreate::None);
        assert!(matches!(pending_create(Some(t1), None), PendingCreate::Unresolved { .. }));
        assert_eq!(pending_create(Some(t1), Some(t2)), PendingCreate::None);
        assert!(matches!(pending_create(Some(t2), Some(t1)), PendingCreate::Unresolved { .. }));
    }

    #[test]
    fn oldest_duplicate_survives() {
        let mut a = instance(30, InstanceState::Running, None);
        let mut b = instance(20, InstanceState::Running, None);
        let c = instance(10, InstanceState::Released, None);
        a.started_at = Some(Utc.timestamp_opt(100, 0).unwrap());
        b.started_at = Some(Utc.timestamp_opt(200, 0).unwrap());
        let all = [a, b, c];
        assert_eq!(choose_survivor(&all).unwrap().id, InstanceId(30));
    }
}
