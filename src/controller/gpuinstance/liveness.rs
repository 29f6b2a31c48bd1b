//! Following a rented machine: the provider's state until SSH answers (`Reachable`, then
//! `Ready`), failing fast on machines that will not run our work, the boot deadline, and loss.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::launch::set_reason;
use super::{Error, provider_err, sshkey};
use crate::api::{
    ConditionStatus, GpuInstance, GpuInstancePhase, GpuInstanceStatus, ProviderStatus, Reason,
    SshEndpointStatus, from_k8s_time, instance_condition, is_condition_true, set_condition, to_k8s_time,
};
use crate::controller::Context;
use crate::controller::pass_limit::StepTracker;
use crate::machine::decide::{
    Verdict, boot_deadline_passed, boot_time_left, boot_timeout, classify, exclude_machine,
};
use crate::provider::{Instance, InstanceId};
use crate::remote::ssh::SshTarget;

/// Observes the instance once and updates `status`.
pub async fn observe(
    instance: &GpuInstance,
    status: &mut GpuInstanceStatus,
    ctx: &Context,
    step: &StepTracker,
    now: DateTime<Utc>,
) -> Result<Action, Error> {
    let id = provider_id(status)?;
    let was_ready = is_condition_true(&status.conditions, instance_condition::READY);
    // A ready machine is checked once per liveness poll; a listing half that old is recent
    // enough for it (see `listing`). A booting one needs a fresh listing to be seen running soon.
    let max_age = if was_ready {
        (ctx.config.liveness_poll / 2).max(ctx.config.boot_poll)
    } else {
        ctx.config.boot_poll.min(ctx.config.liveness_poll)
    };
    let observed = ctx.listing.get_within(id, max_age).await.map_err(provider_err("get the instance"))?;
    status.last_observed_at = Some(to_k8s_time(now));

    let Some(observed) = observed else {
        let message = format!("the provider no longer lists instance {id}");
        mark_released(status, GpuInstancePhase::Lost, Reason::InstanceLost, &message, now);
        ctx.event(instance, EventType::Warning, Reason::InstanceLost, "Observe", message).await;
        return Ok(Action::await_change());
    };
    status.provider_status = Some(ProviderStatus {
        actual: observed.actual_status.clone(),
        intended: observed.intended_status.clone(),
        current: observed.cur_state.clone(),
        message: observed.status_msg.clone(),
    });

    match classify(&observed, was_ready) {
        Verdict::Booting => {
            if status.phase != GpuInstancePhase::Running {
                status.phase = GpuInstancePhase::Booting;
                let detail = observed.status_msg.clone().unwrap_or_else(|| "starting".into());
                set_reason(
                    status,
                    Reason::Booting,
                    &format!("{}: {detail}", observed.actual_status.as_deref().unwrap_or("created")),
                );
            }
            check_boot_deadline(instance, status, ctx, &observed, now).await
        }
        Verdict::Running if was_ready => {
            status.phase = GpuInstancePhase::Running;
            Ok(Action::requeue(ctx.config.liveness_poll))
        }
        // The boot deadline is judged before the machine is asked anything: a machine that
        // hangs our probe cannot hold its own deadline up.
        Verdict::Running if boot_deadline_due(instance, status, ctx, now) => {
            check_boot_deadline(instance, status, ctx, &observed, now).await
        }
        Verdict::Running => {
            step.enter("probe");
            probe_ssh(instance, status, ctx, &observed, now).await
        }
        Verdict::Release { reason, lost, exclude_machine: exclude, message } => {
            ctx.provider.destroy_instance(id).await.map_err(provider_err("destroy a failed instance"))?;
            if let (true, Some(machine)) = (exclude, observed.machine_id) {
                exclude_machine(&mut status.excluded_machine_ids, machine);
            }
            let phase = if lost { GpuInstancePhase::Lost } else { GpuInstancePhase::Failed };
            mark_released(status, phase, reason, &message, now);
            ctx.event(
                instance,
                EventType::Warning,
                reason,
                "Observe",
                format!("Instance {id}: {message}; released it"),
            )
            .await;
            Ok(Action::requeue(ctx.config.termination_poll))
        }
    }
}

async fn probe_ssh(
    instance: &GpuInstance,
    status: &mut GpuInstanceStatus,
    ctx: &Context,
    observed: &Instance,
    now: DateTime<Utc>,
) -> Result<Action, Error> {
    let Some(endpoint) = observed.ssh.clone() else {
        status.phase = GpuInstancePhase::Booting;
        set_reason(status, Reason::Booting, "running; waiting for the provider to publish the SSH address");
        return check_boot_deadline(instance, status, ctx, observed, now).await;
    };
    let namespace = instance.namespace().ok_or(Error::Missing("namespace"))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = sshkey::ensure_key(&secrets, instance).await?;
    let target = SshTarget { host: endpoint.host.clone(), port: endpoint.port, user: "root".into() };
    // The probe is an input to the boot deadline, never a reason to pass it.
    let timeout =
        boot_timeout(&instance.spec, ctx.config.default_boot_timeout, ctx.config.boot_time_per_image_gb);
    let launched = status.launched_at.as_ref().map(from_k8s_time).unwrap_or(now);
    let left = boot_time_left(launched, timeout, now);
    let probed = match tokio::time::timeout(left, ctx.ssh_probe.probe(&target, &key.private_openssh)).await {
        Ok(probed) => probed,
        Err(_) => Err("the boot deadline came while the SSH probe ran".to_string()),
    };
    match probed {
        Ok(fingerprint) => {
            status.ssh = Some(SshEndpointStatus {
                host: endpoint.host,
                port: endpoint.port,
                host_key_fingerprint: Some(fingerprint),
            });
            set_condition(
                &mut status.conditions,
                instance_condition::REACHABLE,
                ConditionStatus::True,
                Reason::Reachable,
                format!("SSH answers at {}:{}", target.host, target.port),
                None,
                now,
            );
            set_condition(
                &mut status.conditions,
                instance_condition::READY,
                ConditionStatus::True,
                Reason::Ready,
                "ready for work",
                None,
                now,
            );
            status.phase = GpuInstancePhase::Running;
            let took = status
                .launched_at
                .as_ref()
                .map(|t| (now - from_k8s_time(t)).num_seconds())
                .unwrap_or_default();
            set_reason(status, Reason::Ready, &format!("SSH answers at {}:{}", target.host, target.port));
            ctx.event(
                instance,
                EventType::Normal,
                Reason::Ready,
                "Observe",
                format!(
                    "Instance {} is ready; SSH answers at {}:{} ({took} s after rent)",
                    observed.id, target.host, target.port
                ),
            )
            .await;
            Ok(Action::requeue(ctx.config.liveness_poll))
        }
        Err(message) => {
            status.phase = GpuInstancePhase::Booting;
            set_condition(
                &mut status.conditions,
                instance_condition::REACHABLE,
                ConditionStatus::False,
                Reason::SshUnreachable,
                message.clone(),
                None,
                now,
            );
            set_reason(
                status,
                Reason::SshUnreachable,
                &format!("running; SSH does not answer yet: {message}"),
            );
            check_boot_deadline(instance, status, ctx, observed, now).await
        }
    }
}

fn boot_deadline_due(
    instance: &GpuInstance,
    status: &GpuInstanceStatus,
    ctx: &Context,
    now: DateTime<Utc>,
) -> bool {
    let timeout =
        boot_timeout(&instance.spec, ctx.config.default_boot_timeout, ctx.config.boot_time_per_image_gb);
    let launched = status.launched_at.as_ref().map(from_k8s_time).unwrap_or(now);
    boot_deadline_passed(launched, timeout, now)
}

async fn check_boot_deadline(
    instance: &GpuInstance,
    status: &mut GpuInstanceStatus,
    ctx: &Context,
    observed: &Instance,
    now: DateTime<Utc>,
) -> Result<Action, Error> {
    let timeout =
        boot_timeout(&instance.spec, ctx.config.default_boot_timeout, ctx.config.boot_time_per_image_gb);
    if !boot_deadline_due(instance, status, ctx, now) {
        return Ok(Action::requeue(ctx.config.boot_poll));
    }
    ctx.provider
        .destroy_instance(observed.id)
        .await
        .map_err(provider_err("destroy an instance that did not boot"))?;
    if let Some(machine) = observed.machine_id {
        exclude_machine(&mut status.excluded_machine_ids, machine);
    }
    // What the machine last did when asked (the probe's failure) says why it never became ready.
    let last_check = status
        .conditions
        .iter()
        .find(|c| c.type_ == instance_condition::REACHABLE && c.status == ConditionStatus::False.as_str())
        .map(|c| format!("; the last SSH check: {}", c.message))
        .unwrap_or_default();
    let message = format!(
        "instance {} was not reachable within {} s of rent{last_check}; released it",
        observed.id,
        timeout.as_secs()
    );
    mark_released(status, GpuInstancePhase::Failed, Reason::BootTimeout, &message, now);
    ctx.event(instance, EventType::Warning, Reason::BootTimeout, "Observe", message).await;
    Ok(Action::requeue(ctx.config.termination_poll))
}

pub(super) fn mark_released(
    status: &mut GpuInstanceStatus,
    phase: GpuInstancePhase,
    reason: Reason,
    message: &str,
    now: DateTime<Utc>,
) {
    status.phase = phase;
    set_reason(status, reason, message);
    set_condition(
        &mut status.conditions,
        instance_condition::READY,
        ConditionStatus::False,
        reason,
        message,
        None,
        now,
    );
}

pub(crate) fn provider_id(status: &GpuInstanceStatus) -> Result<InstanceId, Error> {
    status
        .provider_id
        .as_deref()
        .and_then(|s| s.parse::<i64>().ok())
        .map(InstanceId)
        .ok_or(Error::Missing("numeric status.providerId"))
}
