//! The sweep plan, a pure function: from one listing of the provider's instances, the
//! GpuInstances and TrainingJobs that exist, what was suspected on the previous pass, and the
//! time, decide what to destroy and which GpuInstances to delete.
//!
//! Rules (design.md section 4):
//! - Only instances labelled `gputrainer:<this installation>:<uid>` are ever considered; another
//!   installation's instances and unlabelled ones are never touched.
//! - An instance whose GpuInstance UID does not exist, older than the grace period, and seen so
//!   on two passes in a row is destroyed. The first sighting only makes it a suspect.
//! - A GpuInstance whose owning TrainingJob is gone or finished, or whose `maxLifetimeSeconds`
//!   has passed, is deleted (its finalizer then releases the machine).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::machine::parse_instance_label;
use crate::provider::{Instance, InstanceId, InstanceState};

/// What the sweeper knows of one GpuInstance.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuInstanceView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub created: DateTime<Utc>,
    pub max_lifetime: Duration,
    pub deleting: bool,
    /// The owning TrainingJob's UID, when owned by one.
    pub owner_job_uid: Option<String>,
}

/// What the sweeper knows of one TrainingJob.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub uid: String,
    pub finished: bool,
}

/// An instance suspected of being an orphan on an earlier pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspect {
    pub first_seen: DateTime<Utc>,
}

/// One planned action.
#[derive(Clone, Debug, PartialEq)]
pub enum SweepAction {
    /// Orphan seen for the first time (or still too young): remember, do nothing yet.
    Suspect { id: InstanceId, label: String, why: String },
    /// Orphan confirmed: destroy it.
    Destroy { id: InstanceId, label: String, why: String },
    /// Delete this GpuInstance (its finalizer releases the machine).
    DeleteGpuInstance { namespace: String, name: String, why: String },
}

/// The plan and the suspects to remember for the next pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepPlan {
    pub actions: Vec<SweepAction>,
    pub suspects: BTreeMap<InstanceId, Suspect>,
    /// Instances of this installation that were considered.
    pub considered: usize,
}

/// Settings of the sweep.
#[derive(Clone, Debug)]
pub struct SweepRules {
    pub installation_id: String,
    /// Instances younger than this are never destroyed (a rent in progress).
    pub grace: Duration,
    /// Destroy every instance of this installation (`gpu-trainer sweep --all`).
    pub everything: bool,
    /// Destroy confirmed orphans on the first sighting (a person asked with `sweep --force`).
    pub single_pass: bool,
}

/// Plans one pass.
pub fn plan_sweep(
    instances: &[Instance],
    gpu_instances: &[GpuInstanceView],
    jobs: &[JobView],
    previous: &BTreeMap<InstanceId, Suspect>,
    rules: &SweepRules,
    now: DateTime<Utc>,
) -> SweepPlan {
    let mut plan = SweepPlan::default();
    let known_uids: BTreeSet<&str> = gpu_instances.iter().map(|g| g.uid.as_str()).collect();
    for instance in instances {
        let Some(label) = instance.label.as_deref() else { continue };
        let Some((installation, uid)) = parse_instance_label(label) else { continue };
        if installation != rules.installation_id || instance.state == InstanceState::Released {
            continue;
        }
        plan.considered += 1;
        if rules.everything {
            plan.actions.push(SweepAction::Destroy {
                id: instance.id,
                label: label.into(),
                why: "sweep --all destroys every instance of this installation".into(),
            });
            continue;
        }
        if known_uids.contains(uid) {
            continue;
        }
        let first_seen = previous.get(&instance.id).map(|s| s.first_seen).unwrap_or(now);
        // Age from the provider's start time when it reports one, else from our first sighting.
        let born = instance.started_at.unwrap_or(first_seen);
        let age = now.signed_duration_since(born).to_std().unwrap_or_default();
        let seen_before = previous.contains_key(&instance.id);
        if age >= rules.grace && (seen_before || rules.single_pass) {
            plan.actions.push(SweepAction::Destroy {
                id: instance.id,
                label: label.into(),
                why: format!("no GpuInstance with UID {uid} exists; {} s old", age.as_secs()),
            });
        } else {
            plan.suspects.insert(instance.id, Suspect { first_seen });
            plan.actions.push(SweepAction::Suspect {
                id: instance.id,
                label: label.into(),
                why: if age < rules.grace {
                    format!(
                        "no GpuInstance with UID {uid}; {} s old, within the {} s grace period",
                        age.as_secs(),
                        rules.grace.as_secs()
                    )
                } else {
                    format!("no GpuInstance with UID {uid}; destroyed if still so on the next pass")
                },
            });
        }
    }

    plan.actions.extend(gpu_instances_to_delete(gpu_instances, jobs, now));
    plan
}

/// GpuInstances whose job is gone or finished, or that outlived `maxLifetimeSeconds`: deleted
/// (their finalizer releases the machine). Pure.
fn gpu_instances_to_delete(
    gpu_instances: &[GpuInstanceView],
    jobs: &[JobView],
    now: DateTime<Utc>,
) -> Vec<SweepAction> {
    let mut actions = Vec::new();
    let jobs_by_uid: BTreeMap<&str, &JobView> = jobs.iter().map(|j| (j.uid.as_str(), j)).collect();
    for gpu_instance in gpu_instances.iter().filter(|g| !g.deleting) {
        let why = match gpu_instance.owner_job_uid.as_deref() {
            Some(owner) => match jobs_by_uid.get(owner) {
                None => Some("its TrainingJob no longer exists".to_string()),
                Some(job) if job.finished => Some("its TrainingJob has finished".to_string()),
                Some(_) => None,
            },
            None => None,
        }
        .or_else(|| {
            let age = now.signed_duration_since(gpu_instance.created).to_std().unwrap_or_default();
            (age >= gpu_instance.max_lifetime)
                .then(|| format!("maxLifetimeSeconds ({} s) has passed", gpu_instance.max_lifetime.as_secs()))
        });
        if let Some(why) = why {
            actions.push(SweepAction::DeleteGpuInstance {
                namespace: gpu_instance.namespace.clone(),
                name: gpu_instance.name.clone(),
                why,
            });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const ME: &str = "0a1b2c3d";

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn instance(id: i64, label: Option<&str>, started: Option<i64>) -> Instance {
        let mut i: Instance = serde_json::from_value(serde_json::json!({
            "id": id, "label": label, "state": "running", "actual_status": "running", "intended_status": "running",
            "cur_state": "running", "next_state": null, "status_msg": null, "machine_id": 1, "host_id": null,
            "gpu_name": "RTX 4090", "num_gpus": 1, "vram_gb": 24.0, "price_per_hour": 0.4, "reliability": 0.99,
            "geolocation": null, "image": null, "disk_gb": 64.0, "ssh": null, "started_at": null, "env": {}
        }))
        .unwrap();
        i.started_at = started.map(at);
        i
    }

    fn rules() -> SweepRules {
        SweepRules {
            installation_id: ME.into(),
            grace: Duration::from_secs(120),
            everything: false,
            single_pass: false,
        }
    }

    fn gi(uid: &str, owner: Option<&str>) -> GpuInstanceView {
        GpuInstanceView {
            namespace: "ns".into(),
            name: format!("gi-{uid}"),
            uid: uid.into(),
            created: at(0),
            max_lifetime: Duration::from_secs(3600),
            deleting: false,
            owner_job_uid: owner.map(str::to_string),
        }
    }

    fn destroyed(plan: &SweepPlan) -> Vec<i64> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                SweepAction::Destroy { id, .. } => Some(id.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn orphan_is_destroyed_only_on_the_second_sighting_after_grace() {
        let orphan = [instance(1, Some(&format!("gputrainer:{ME}:gone-uid")), Some(0))];
        let first = plan_sweep(&orphan, &[], &[], &BTreeMap::new(), &rules(), at(200));
        assert!(destroyed(&first).is_empty(), "first sighting only suspects");
        assert!(first.suspects.contains_key(&InstanceId(1)));
        let second = plan_sweep(&orphan, &[], &[], &first.suspects, &rules(), at(260));
        assert_eq!(destroyed(&second), vec![1]);
    }

    #[test]
    fn young_orphans_wait_for_the_grace_period() {
        let orphan = [instance(1, Some(&format!("gputrainer:{ME}:gone-uid")), Some(100))];
        let first = plan_sweep(&orphan, &[], &[], &BTreeMap::new(), &rules(), at(150));
        let second = plan_sweep(&orphan, &[], &[], &first.suspects, &rules(), at(210));
        assert!(destroyed(&second).is_empty(), "110 s old is within the 120 s grace");
        let third = plan_sweep(&orphan, &[], &[], &second.suspects, &rules(), at(230));
        assert_eq!(destroyed(&third), vec![1]);
    }

    #[test]
    fn other_installations_and_unlabelled_instances_are_never_touched() {
        let others = [
            instance(1, Some("gputrainer:ffffffff:uid"), Some(0)),
            instance(2, None, Some(0)),
            instance(3, Some("my-own-box"), Some(0)),
        ];
        let mut suspects = BTreeMap::new();
        for id in 1..=3 {
            suspects.insert(InstanceId(id), Suspect { first_seen: at(0) });
        }
        let plan = plan_sweep(&others, &[], &[], &suspects, &rules(), at(10_000));
        assert!(plan.actions.is_empty(), "{plan:?}");
        let all =
            plan_sweep(&others, &[], &[], &suspects, &SweepRules { everything: true, ..rules() }, at(10_000));
        assert!(destroyed(&all).is_empty(), "--all is limited to this installation too");
    }

    #[test]
    fn instances_with_a_gpuinstance_are_kept() {
        let owned = [instance(1, Some(&format!("gputrainer:{ME}:live-uid")), Some(0))];
        let mut suspects = BTreeMap::new();
        suspects.insert(InstanceId(1), Suspect { first_seen: at(0) });
        let plan = plan_sweep(&owned, &[gi("live-uid", None)], &[], &suspects, &rules(), at(10_000));
        assert!(destroyed(&plan).is_empty());
    }

    #[test]
    fn gpuinstances_of_finished_or_missing_jobs_and_past_lifetime_are_deleted() {
        let gis = [
            gi("a", Some("job-done")),
            gi("b", Some("job-gone")),
            gi("c", Some("job-running")),
            gi("d", None),
        ];
        let jobs = [
            JobView { uid: "job-done".into(), finished: true },
            JobView { uid: "job-running".into(), finished: false },
        ];
        let plan = plan_sweep(&[], &gis, &jobs, &BTreeMap::new(), &rules(), at(100));
        let deleted: Vec<_> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                SweepAction::DeleteGpuInstance { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, vec!["gi-a", "gi-b"]);
        let later = plan_sweep(&[], &gis[3..], &jobs, &BTreeMap::new(), &rules(), at(3600));
        assert_eq!(later.actions.len(), 1, "lifetime passed for the unowned box");
    }
}
