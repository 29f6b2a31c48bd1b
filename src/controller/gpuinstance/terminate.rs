//! Releasing the machine: the delete protocol. Destroy by provider id (and by label, which also
//! finds a rent whose result was never recorded); "no such instance" counts as gone; requeue
//! until the provider no longer lists it, check once more, and only then remove the finalizer.
//! Never give up: after `termination_stuck_after`, raise `TerminationStuck`, a Warning event and
//! a metric, and keep trying.

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::info;

use super::launch::set_reason;
use super::liveness::provider_id;
use super::{Error, kube_err, provider_err, write_status};
use crate::api::{
    ConditionStatus, GPUINSTANCE_FINALIZER, GpuInstance, GpuInstancePhase, GpuInstanceStatus, Reason,
    find_condition, from_k8s_time, instance_condition, is_condition_true, set_condition,
};
use crate::controller::Context;
use crate::controller::patch::{is_conflict, set_finalizers_locked};
use crate::machine::destroy::destroy_pass;
use crate::machine::instance_label;
use crate::metrics::OutcomeLabels;
use crate::provider::InstanceId;

/// Runs the delete protocol for a GpuInstance being deleted.
pub async fn cleanup(api: &Api<GpuInstance>, instance: &GpuInstance, ctx: &Context) -> Result<Action, Error> {
    if !instance.finalizers().iter().any(|f| f == GPUINSTANCE_FINALIZER) {
        return Ok(Action::await_change());
    }
    let now = Utc::now();
    let before = instance.status.clone().unwrap_or_default();
    let mut status = before.clone();
    mark_terminating(instance, &mut status, ctx, now).await;
    let since = find_condition(&status.conditions, instance_condition::INSTANCE_TERMINATING)
        .map(|c| from_k8s_time(&c.last_transition_time))
        .unwrap_or(now);

    // A provider error must not stop the escalation below: record it and keep trying.
    let gone = match destroy_everything(instance, &status, ctx).await {
        Ok(gone) => gone,
        Err(err) => {
            let message = format!(
                "releasing the machine; the last attempt failed: {}",
                crate::error::error_chain(&err)
            );
            tracing::warn!(gpuinstance = %instance.name_any(), error = %message, "Destroy attempt failed");
            ctx.metrics.reconcile_failed(super::CONTROLLER, err.category());
            set_reason(&mut status, Reason::Terminating, &message);
            false
        }
    };
    // A second look before the finalizer goes: an instance must not reappear in the listing
    // after it seemed gone.
    if gone && destroy_everything(instance, &status, ctx).await? {
        return released(api, instance, before, status, ctx, (now - since).to_std().unwrap_or_default())
            .await;
    }

    if stuck(since, now, ctx) && !is_condition_true(&status.conditions, instance_condition::TERMINATION_STUCK)
    {
        let message = format!(
            "instance {} is still listed {} min after the first destroy call; still trying. Check it in the provider's console",
            status_id(instance),
            (now - since).num_minutes()
        );
        set_condition(
            &mut status.conditions,
            instance_condition::TERMINATION_STUCK,
            ConditionStatus::True,
            Reason::TerminationStuck,
            message.clone(),
            None,
            now,
        );
        ctx.event(instance, EventType::Warning, Reason::TerminationStuck, "Terminate", message).await;
    }
    if is_condition_true(&status.conditions, instance_condition::TERMINATION_STUCK) {
        ctx.stuck_terminations_insert(&instance.uid().unwrap_or_default());
    }
    write_status(api, instance, &before, status).await?;
    Ok(Action::requeue(ctx.config.termination_poll))
}

/// The status says the machine is being released (the first time with an event).
async fn mark_terminating(
    instance: &GpuInstance,
    status: &mut GpuInstanceStatus,
    ctx: &Context,
    now: DateTime<Utc>,
) {
    if !is_condition_true(&status.conditions, instance_condition::INSTANCE_TERMINATING) {
        set_condition(
            &mut status.conditions,
            instance_condition::INSTANCE_TERMINATING,
            ConditionStatus::True,
            Reason::Terminating,
            "releasing the machine",
            None,
            now,
        );
        ctx.event(
            instance,
            EventType::Normal,
            Reason::Terminating,
            "Terminate",
            format!("Releasing instance {}", status.provider_id.as_deref().unwrap_or("(not rented yet)")),
        )
        .await;
    }
    status.phase = GpuInstancePhase::Terminating;
    if status.reason != Some(Reason::Terminating) {
        set_reason(status, Reason::Terminating, "releasing the machine");
    }
}

/// The provider no longer lists the machine (looked twice): the status says so, the event is
/// published while the object still exists, and the finalizer goes.
async fn released(
    api: &Api<GpuInstance>,
    instance: &GpuInstance,
    before: GpuInstanceStatus,
    mut status: GpuInstanceStatus,
    ctx: &Context,
    took: std::time::Duration,
) -> Result<Action, Error> {
    status.phase = GpuInstancePhase::Terminated;
    set_reason(&mut status, Reason::Terminated, "the provider no longer lists the machine");
    write_status(api, instance, &before, status).await?;
    // Published while the object still exists, so whoever sees it gone finds the event.
    ctx.event(
        instance,
        EventType::Normal,
        Reason::Terminated,
        "Terminate",
        format!("Released instance {} ({:.0} s)", status_id(instance), took.as_secs_f64()),
    )
    .await;
    let finalizers = instance.finalizers().iter().filter(|f| *f != GPUINSTANCE_FINALIZER).cloned().collect();
    match set_finalizers_locked(api, instance, finalizers).await {
        Ok(_) => {}
        Err(err) if is_conflict(&err) => return Ok(Action::requeue(std::time::Duration::ZERO)),
        Err(err) if crate::controller::patch::is_not_found(&err) => {}
        Err(err) => return Err(kube_err("remove the finalizer")(err)),
    }
    ctx.metrics.terminations.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
    ctx.metrics.termination_duration.observe(took.as_secs_f64());
    ctx.stuck_terminations_remove(&instance.uid().unwrap_or_default());
    info!(gpuinstance = %instance.name_any(), seconds = took.as_secs_f64(), "Instance released");
    Ok(Action::await_change())
}

/// For an instance that failed or was lost while its GpuInstance stays: make sure the machine
/// is destroyed, checking until the provider no longer lists it.
pub async fn ensure_released(
    instance: &GpuInstance,
    status: &mut GpuInstanceStatus,
    ctx: &Context,
) -> Result<Action, Error> {
    if destroy_everything(instance, status, ctx).await? {
        Ok(Action::await_change())
    } else {
        Ok(Action::requeue(ctx.config.termination_poll))
    }
}

/// Destroys the recorded instance and every instance carrying this GpuInstance's label, then
/// reports whether all of them are gone.
async fn destroy_everything(
    instance: &GpuInstance,
    status: &GpuInstanceStatus,
    ctx: &Context,
) -> Result<bool, Error> {
    let recorded: Vec<InstanceId> = provider_id(status).ok().into_iter().collect();
    let label = instance
        .uid()
        .map(|uid| status.label.clone().unwrap_or_else(|| instance_label(&ctx.config.installation_id, &uid)));
    let pass = destroy_pass(&*ctx.provider, &recorded, label.as_deref())
        .await
        .map_err(|e| provider_err(e.operation)(e.source))?;
    Ok(pass.all_gone)
}

fn stuck(since: DateTime<Utc>, now: DateTime<Utc>, ctx: &Context) -> bool {
    now.signed_duration_since(since).to_std().is_ok_and(|d| d >= ctx.config.termination_stuck_after)
}

fn status_id(instance: &GpuInstance) -> String {
    instance.status.as_ref().and_then(|s| s.provider_id.clone()).unwrap_or_else(|| "(none)".into())
}
