//! The job's machine: a GpuInstance `<job>-<attempt>` owned by the job (so deleting the job
//! releases the GPU through the garbage collector and the GpuInstance finalizer), reached with a
//! per-job key whose Secret the job also owns. Building the GpuInstance and reading it back into
//! a [`MachineObservation`] are pure; the rest are idempotent `ensure_*` calls.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::{Resource, ResourceExt};

use super::Error;
use crate::api::{
    GpuInstance, GpuInstancePhase, GpuInstanceSpec, GpuInstanceStatus, JobInstanceStatus, Reason, SecretRef,
    TrainingJob, describe_gpu, instance_condition, is_condition_true,
};
use crate::controller::gpuinstance::sshkey::{PRIVATE_KEY, PUBLIC_KEY};
use crate::engine::MachineObservation;
use crate::machine::key::generate_key;
use crate::machine::onstart::job_machine_lifetime_seconds;

/// Annotation on a job's GpuInstance: US dollars spent on the job's earlier machines, so the
/// job's cost is that plus this machine's, from status alone after a restart.
pub const PRIOR_COST_ANNOTATION: &str = "gputrainer.dev/prior-cost";

/// Name of the GpuInstance of attempt `attempt` (from 1).
pub fn instance_name(job: &str, attempt: i32) -> String {
    format!("{job}-{attempt}")
}

/// Name of the job's SSH key Secret.
pub fn key_secret_name(job: &str) -> String {
    format!("{job}-ssh-key")
}

/// The GpuInstance to create for `job`'s attempt. `tool_image` is used unless
/// `resources.image` overrides it; `prior_cost` is what the job's earlier machines cost.
pub fn desired_instance(
    job: &TrainingJob,
    attempt: i32,
    tool_image: &str,
    prior_cost: f64,
    avoid_machines: &[i64],
) -> Result<GpuInstance, Error> {
    let name = job.metadata.name.clone().ok_or(Error::Missing("name"))?;
    let owner = job.controller_owner_ref(&()).ok_or(Error::Missing("uid"))?;
    let spec = GpuInstanceSpec {
        provider: job.spec.provider.clone(),
        requirements: job.spec.resources.clone(),
        image: job.spec.resources.image.clone().unwrap_or_else(|| tool_image.to_string()),
        image_size_gb: None,
        boot_timeout_seconds: None,
        env: Vec::new(),
        onstart: None,
        ssh_public_key: None,
        ssh_key_secret_ref: Some(SecretRef { name: key_secret_name(&name) }),
        max_lifetime_seconds: job_machine_lifetime_seconds(job.spec.active_deadline_seconds),
    };
    let mut instance = GpuInstance::new(&instance_name(&name, attempt), spec);
    instance.metadata.namespace = job.namespace();
    instance.metadata.owner_references = Some(vec![owner]);
    let mut annotations: std::collections::BTreeMap<String, String> =
        [(PRIOR_COST_ANNOTATION.to_string(), format!("{:.4}", prior_cost.max(0.0)))].into();
    if !avoid_machines.is_empty() {
        let ids: Vec<String> = avoid_machines.iter().map(i64::to_string).collect();
        annotations.insert(crate::api::AVOID_MACHINES_ANNOTATION.to_string(), ids.join(","));
    }
    instance.metadata.annotations = Some(annotations);
    instance.metadata.labels = Some(
        [
            ("app.kubernetes.io/managed-by".to_string(), "gpu-trainer".to_string()),
            ("gputrainer.dev/trainingjob".to_string(), name),
        ]
        .into(),
    );
    Ok(instance)
}

/// What the GpuInstance says about the machine. Pure.
pub fn observe(instance: Option<&GpuInstance>) -> MachineObservation {
    let Some(instance) = instance else { return MachineObservation::None };
    let status = instance.status.clone().unwrap_or_default();
    if instance.meta().deletion_timestamp.is_some() {
        return MachineObservation::Failed {
            reason: Reason::InstanceLost,
            message: format!("GpuInstance {} is being deleted", instance.name_any()),
        };
    }
    match status.phase {
        GpuInstancePhase::Running
            if status.ssh.is_some() && is_condition_true(&status.conditions, instance_condition::READY) =>
        {
            MachineObservation::Ready {
                price_per_hour: status.offer.as_ref().map(|o| o.price_per_hour).unwrap_or_default(),
            }
        }
        GpuInstancePhase::Failed
        | GpuInstancePhase::Lost
        | GpuInstancePhase::Terminating
        | GpuInstancePhase::Terminated => MachineObservation::Failed {
            reason: status.reason.unwrap_or(Reason::InstanceLost),
            message: status.message.unwrap_or_else(|| format!("GpuInstance is {:?}", status.phase)),
        },
        _ => MachineObservation::Starting,
    }
}

/// What the job's earlier machines cost, as recorded on this one. Pure.
/// The job's message while its machine is being rented: the GpuInstance's own reason and
/// message (`NoOffers: ...`, `Booting: ...`), so a job that waits says why. Pure.
pub fn provisioning_message(name: &str, attempt: i32, status: &GpuInstanceStatus) -> Option<String> {
    let reason = status.reason?;
    let detail = status.message.as_deref().filter(|m| !m.is_empty()).unwrap_or("");
    Some(format!("renting a machine: GpuInstance {name} (attempt {attempt}): {reason}: {detail}"))
}

/// Machines a replacement for `previous` must not use: those it excluded (boot failures), those
/// it was told to avoid, and its own machine when that was lost or failed. Pure.
pub fn machines_to_avoid(previous: &GpuInstance) -> Vec<i64> {
    let status = previous.status.clone().unwrap_or_default();
    let mut ids = crate::machine::decide::avoided_machines(previous);
    ids.extend(status.excluded_machine_ids.iter().copied());
    if matches!(status.phase, GpuInstancePhase::Lost | GpuInstancePhase::Failed)
        && let Some(machine) = status.offer.as_ref().map(|o| o.machine_id).filter(|m| *m != 0)
    {
        ids.push(machine);
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

pub fn prior_cost(instance: &GpuInstance) -> f64 {
    instance.annotations().get(PRIOR_COST_ANNOTATION).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// `status.instance` of the job from its GpuInstance. Pure.
pub fn instance_status(name: &str, instance: Option<&GpuInstance>) -> JobInstanceStatus {
    let status = instance.and_then(|i| i.status.clone()).unwrap_or_default();
    JobInstanceStatus {
        name: name.to_string(),
        provider_id: status.provider_id.clone(),
        gpu: status.offer.as_ref().map(|o| describe_gpu(o.num_gpus, &o.gpu_name)),
        price_per_hour: status.offer.as_ref().map(|o| o.price_per_hour),
    }
}

/// Creates the job's key Secret (owned by the job) unless it exists. The key material is
/// generated here and only ever written to the Secret.
pub async fn ensure_key_secret(secrets: &Api<Secret>, job: &TrainingJob) -> Result<(), Error> {
    let job_name = job.metadata.name.clone().ok_or(Error::Missing("name"))?;
    let name = key_secret_name(&job_name);
    let found = secrets.get_opt(&name).await.map_err(super::kube_err("read the SSH key Secret"))?;
    if found.is_some() {
        return Ok(());
    }
    let (private, public) = generate_key(&format!("gpu-trainer:{job_name}"))
        .map_err(crate::controller::gpuinstance::sshkey::KeyError::from)?;
    let owner = job.controller_owner_ref(&()).map(|mut o| {
        // The GpuInstance, not the Secret, is the job's controlled child.
        o.controller = Some(false);
        o
    });
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: job.namespace(),
            owner_references: owner.map(|o| vec![o]),
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "gpu-trainer".to_string())].into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/ssh-auth".into()),
        data: Some(
            [
                (PRIVATE_KEY.to_string(), ByteString(private.into_bytes())),
                (PUBLIC_KEY.to_string(), ByteString(public.into_bytes())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        // A previous pass created it and its answer was lost.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => Err(Error::Kube { operation: "create the SSH key Secret", source }),
    }
}

/// Creates the GpuInstance unless it exists (the name is deterministic, so a repeated pass after
/// a crash adopts the one already created instead of renting twice).
pub async fn ensure_instance(api: &Api<GpuInstance>, desired: &GpuInstance) -> Result<bool, Error> {
    match api.create(&PostParams::default(), desired).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(source) => Err(Error::Kube { operation: "create the GpuInstance", source }),
    }
}

/// Deletes the GpuInstance; gone already is fine. Its finalizer releases the machine.
pub async fn ensure_instance_deleted(api: &Api<GpuInstance>, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube { operation: "delete the GpuInstance", source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConditionStatus, GpuInstanceStatus, OfferStatus, SshEndpointStatus, set_condition};

    fn job() -> TrainingJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gputrainer.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "lora", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "tool": "demo@1",
                "dataset": {"url": {"href": "http://x/d.tar"}},
                "resources": {"gpu": {"names": ["RTX 4090"]}, "maxPricePerHour": 0.8},
                "activeDeadlineSeconds": 3600
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_instance_is_owned_by_the_job_and_uses_its_key() {
        let gi = desired_instance(&job(), 2, "python:3.12-slim", 0.25, &[]).unwrap();
        assert_eq!(gi.name_any(), "lora-2");
        assert_eq!(gi.namespace().as_deref(), Some("ml"));
        let owner = &gi.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("TrainingJob", "u-1", Some(true))
        );
        assert_eq!(gi.spec.image, "python:3.12-slim");
        assert_eq!(gi.spec.requirements.gpu.names, ["RTX 4090"]);
        assert_eq!(gi.spec.ssh_key_secret_ref.as_ref().unwrap().name, "lora-ssh-key");
        assert_eq!(gi.spec.max_lifetime_seconds, 3600 + crate::machine::onstart::LIFETIME_MARGIN_SECONDS);
        assert_eq!(prior_cost(&gi), 0.25);
    }

    #[test]
    fn resources_image_overrides_the_tool_image() {
        let mut j = job();
        j.spec.resources.image = Some("mine:1".into());
        assert_eq!(desired_instance(&j, 1, "python:3.12-slim", 0.0, &[]).unwrap().spec.image, "mine:1");
    }

    fn with_status(status: GpuInstanceStatus) -> GpuInstance {
        let mut gi = desired_instance(&job(), 1, "img", 0.0, &[]).unwrap();
        gi.status = Some(status);
        gi
    }

    #[test]
    fn a_machine_is_ready_only_when_running_reachable_and_ready() {
        assert_eq!(observe(None), MachineObservation::None);
        let mut status = GpuInstanceStatus { phase: GpuInstancePhase::Booting, ..Default::default() };
        assert_eq!(observe(Some(&with_status(status.clone()))), MachineObservation::Starting);
        status.phase = GpuInstancePhase::Running;
        status.ssh = Some(SshEndpointStatus { host: "h".into(), port: 22, host_key_fingerprint: None });
        assert_eq!(observe(Some(&with_status(status.clone()))), MachineObservation::Starting);
        set_condition(
            &mut status.conditions,
            instance_condition::READY,
            ConditionStatus::True,
            Reason::Ready,
            "",
            None,
            chrono::Utc::now(),
        );
        status.offer = Some(OfferStatus { price_per_hour: 0.4, ..Default::default() });
        assert_eq!(observe(Some(&with_status(status))), MachineObservation::Ready { price_per_hour: 0.4 });
    }

    #[test]
    fn a_job_that_waits_for_a_machine_says_why() {
        let status = GpuInstanceStatus {
            reason: Some(Reason::NoOffers),
            message: Some("no offer matches: 0 of 64 have RTX 4090".into()),
            ..Default::default()
        };
        assert_eq!(
            provisioning_message("lora-1", 1, &status).unwrap(),
            "renting a machine: GpuInstance lora-1 (attempt 1): NoOffers: no offer matches: 0 of 64 have RTX 4090"
        );
        assert_eq!(provisioning_message("lora-1", 1, &GpuInstanceStatus::default()), None);
    }

    #[test]
    fn a_replacement_avoids_the_machines_that_failed_the_job() {
        let mut status = GpuInstanceStatus {
            phase: GpuInstancePhase::Lost,
            excluded_machine_ids: vec![7, 3],
            ..Default::default()
        };
        status.offer = Some(OfferStatus { machine_id: 42, ..Default::default() });
        let mut lost = with_status(status.clone());
        lost.annotations_mut().insert(crate::api::AVOID_MACHINES_ANNOTATION.into(), "3, 9".into());
        assert_eq!(machines_to_avoid(&lost), [3, 7, 9, 42]);
        // The replacement carries them, and the GpuInstance controller reads them back.
        let next = desired_instance(&job(), 2, "img", 0.0, &machines_to_avoid(&lost)).unwrap();
        assert_eq!(crate::machine::decide::avoided_machines(&next), [3, 7, 9, 42]);
        // A machine that merely finished (the job was suspended) is fine to rent again.
        status.phase = GpuInstancePhase::Terminated;
        assert_eq!(machines_to_avoid(&with_status(status)), [3, 7]);
    }

    #[test]
    fn a_lost_machine_is_a_failure_with_its_reason() {
        let status = GpuInstanceStatus {
            phase: GpuInstancePhase::Lost,
            reason: Some(Reason::InstanceLost),
            message: Some("gone".into()),
            ..Default::default()
        };
        assert_eq!(
            observe(Some(&with_status(status))),
            MachineObservation::Failed { reason: Reason::InstanceLost, message: "gone".into() }
        );
    }
}
