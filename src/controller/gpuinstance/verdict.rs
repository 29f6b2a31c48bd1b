//! A verdict on a machine from whoever talks to it: the TrainingJob controller finds that a
//! machine stopped answering, sent more than any honest machine would, or presented another host
//! key, and asks for its release with [`RELEASE_REQUESTED_ANNOTATION`]. This controller then
//! destroys the instance, marks the GpuInstance `Lost` with that reason (so the job replaces it
//! within `backoffLimit`, like any lost machine) and keeps the machine off later rents.

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::info;

use super::liveness::{mark_released, provider_id};
use super::{Error, provider_err};
use crate::api::{GpuInstance, GpuInstancePhase, GpuInstanceStatus, RELEASE_REQUESTED_ANNOTATION, Reason};
use crate::controller::Context;
use crate::machine::decide::exclude_machine;

/// Reasons a release may be requested for; anything else in the annotation reads as
/// `InstanceLost`, so the annotation cannot make up a reason.
const VERDICT_REASONS: [Reason; 3] =
    [Reason::MachineUnresponsive, Reason::MachineMisbehaved, Reason::HostKeyChanged];

/// Longest message kept from the annotation.
const MAX_MESSAGE: usize = 1024;

/// A release asked for, read from the annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseRequest {
    pub reason: Reason,
    pub message: String,
}

/// The annotation's value for a request.
pub fn annotation_value(reason: Reason, message: &str) -> String {
    format!("{reason}: {}", truncate(message))
}

/// The release requested on `instance`, if any. Pure.
pub fn requested(instance: &GpuInstance) -> Option<ReleaseRequest> {
    let value = instance.annotations().get(RELEASE_REQUESTED_ANNOTATION)?;
    let (reason, message) = value.split_once(": ").unwrap_or(("", value.as_str()));
    let reason = VERDICT_REASONS.into_iter().find(|r| r.as_str() == reason).unwrap_or(Reason::InstanceLost);
    let message = if message.trim().is_empty() { "release requested".to_string() } else { truncate(message) };
    Some(ReleaseRequest { reason, message })
}

fn truncate(message: &str) -> String {
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].replace(['\n', '\r'], " ")
}

/// Asks for the release of GpuInstance `name` (a metadata patch: it never races the status the
/// GpuInstance controller writes). NotFound is success: the machine is going anyway.
pub async fn request_release(
    api: &Api<GpuInstance>,
    name: &str,
    reason: Reason,
    message: &str,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({
        "metadata": {"annotations": {RELEASE_REQUESTED_ANNOTATION: annotation_value(reason, message)}}
    });
    match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

/// Destroys the instance and marks the GpuInstance `Lost` with the requested reason.
pub async fn release(
    instance: &GpuInstance,
    status: &mut GpuInstanceStatus,
    ctx: &Context,
    request: ReleaseRequest,
    now: DateTime<Utc>,
) -> Result<Action, Error> {
    let id = provider_id(status)?;
    ctx.provider
        .destroy_instance(id)
        .await
        .map_err(provider_err("destroy a machine released for what it did"))?;
    if let Some(machine) = status.offer.as_ref().map(|o| o.machine_id) {
        exclude_machine(&mut status.excluded_machine_ids, machine);
    }
    let message = format!("instance {id}: {}; released it", request.message);
    mark_released(status, GpuInstancePhase::Lost, request.reason, &message, now);
    ctx.metrics
        .machine_verdicts
        .get_or_create(&crate::metrics::ReasonLabels { reason: request.reason.as_str() })
        .inc();
    info!(gpuinstance = %instance.name_any(), reason = %request.reason, "Released a machine for what it did");
    ctx.event(instance, EventType::Warning, request.reason, "Release", message).await;
    Ok(Action::requeue(ctx.config.termination_poll))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_annotation(value: &str) -> GpuInstance {
        let mut instance =
            GpuInstance::new("x", serde_json::from_value(serde_json::json!({"image": "i"})).unwrap());
        instance.annotations_mut().insert(RELEASE_REQUESTED_ANNOTATION.into(), value.into());
        instance
    }

    #[test]
    fn a_requested_release_carries_its_reason_and_message() {
        let value = annotation_value(Reason::MachineUnresponsive, "a command did not answer within 30 s");
        let request = requested(&with_annotation(&value)).unwrap();
        assert_eq!(request.reason, Reason::MachineUnresponsive);
        assert_eq!(request.message, "a command did not answer within 30 s");
        let host_key =
            requested(&with_annotation("HostKeyChanged: recorded SHA256:a, now SHA256:b")).unwrap();
        assert_eq!(host_key.reason, Reason::HostKeyChanged);
    }

    #[test]
    fn the_annotation_cannot_make_up_a_reason_or_a_huge_message() {
        let request = requested(&with_annotation("Succeeded: trust me")).unwrap();
        assert_eq!(request.reason, Reason::InstanceLost);
        let request =
            requested(&with_annotation(&format!("MachineMisbehaved: {}", "é".repeat(4000)))).unwrap();
        assert!(request.message.len() <= MAX_MESSAGE);
        assert!(requested(&GpuInstance::new("y", with_annotation("").spec.clone())).is_none());
        assert_eq!(
            requested(&with_annotation("MachineMisbehaved:   ")).unwrap().message,
            "release requested"
        );
        assert!(!annotation_value(Reason::MachineMisbehaved, "a\nb").contains('\n'));
    }
}
