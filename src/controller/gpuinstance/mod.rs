//! The GpuInstance controller: one rented machine per GpuInstance, released before the object
//! can disappear.
//!
//! Phases, each in its own file: [`launch`] (finalizer first, the create-pending gate, offer
//! selection, rent with the label), [`liveness`] (follow the provider's state until SSH answers,
//! fail fast on dead machines, boot deadline, loss), [`terminate`] (the delete protocol: destroy,
//! confirm twice, only then drop the finalizer; never give up). Pure decisions live in
//! [`decide`]. Every reconcile reads the object, decides, acts, and writes status once, only when
//! it changed.

pub mod launch;
pub mod liveness;
pub mod sshkey;
pub mod terminate;
pub mod verdict;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::Context;
use super::pass_limit::{StepTracker, within};
use super::patch::{GPUINSTANCE_MANAGER, apply_status, set_finalizers_locked};
use crate::api::{GPUINSTANCE_FINALIZER, GpuInstance, GpuInstancePhase, GpuInstanceStatus};
use crate::error::error_chain;
use crate::provider;

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "gpuinstance";

/// Errors of one reconciliation; the error policy retries them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {operation}")]
    Kube {
        operation: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("provider call failed: {operation}")]
    Provider {
        operation: &'static str,
        #[source]
        source: provider::Error,
    },
    #[error(transparent)]
    Key(#[from] sshkey::KeyError),
    #[error("the object has no {0}")]
    Missing(&'static str),
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "Kube",
            Error::Provider { source, .. } => source.category(),
            Error::Key(_) => "SshKey",
            Error::Missing(_) => "InvalidObject",
        }
    }
}

pub(crate) fn kube_err(operation: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { operation, source }
}

pub(crate) fn provider_err(operation: &'static str) -> impl FnOnce(provider::Error) -> Error {
    move |source| Error::Provider { operation, source }
}

/// One reconciliation of one GpuInstance, within the operator's pass time limit: a pass past it
/// is abandoned and requeued (the delete protocol and the boot deadline are then judged again
/// on the next pass, which nothing on the machine can hold up).
pub async fn reconcile(instance: Arc<GpuInstance>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let step = StepTracker::new("start");
    match within(ctx.config.instance_pass_timeout, &step, reconcile_pass(&instance, &ctx, &step)).await {
        Ok(result) => result,
        Err(abandoned) => {
            ctx.metrics.reconcile_abandoned(CONTROLLER, abandoned.step);
            warn!(
                gpuinstance = %instance.name_any(),
                namespace = ?instance.namespace(),
                step = abandoned.step,
                after_s = abandoned.after.as_secs(),
                "Reconcile pass abandoned at its time limit"
            );
            Ok(Action::requeue(Duration::from_secs(1)))
        }
    }
}

async fn reconcile_pass(instance: &GpuInstance, ctx: &Context, step: &StepTracker) -> Result<Action, Error> {
    let namespace = instance.namespace().ok_or(Error::Missing("namespace"))?;
    let api: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &namespace);

    if instance.meta().deletion_timestamp.is_some() {
        step.enter("terminate");
        return terminate::cleanup(&api, instance, ctx).await;
    }
    // Finalizer first: nothing is rented before it is persisted, so no machine can outlive a
    // deleted object.
    if !instance.finalizers().iter().any(|f| f == GPUINSTANCE_FINALIZER) {
        let mut finalizers = instance.finalizers().to_vec();
        finalizers.push(GPUINSTANCE_FINALIZER.to_string());
        step.enter("finalizer");
        return match set_finalizers_locked(&api, instance, finalizers).await {
            // The update triggers a new reconciliation with the fresh object.
            Ok(_) => Ok(Action::await_change()),
            Err(err) if super::patch::is_conflict(&err) => Ok(Action::requeue(Duration::ZERO)),
            Err(err) => Err(kube_err("add the finalizer")(err)),
        };
    }

    let now = Utc::now();
    let before = instance.status.clone().unwrap_or_default();
    let mut status = before.clone();
    let action = match status.phase {
        GpuInstancePhase::Failed | GpuInstancePhase::Lost | GpuInstancePhase::Terminated => {
            step.enter("release");
            terminate::ensure_released(instance, &mut status, ctx).await?
        }
        _ if status.provider_id.is_none() => {
            step.enter("launch");
            launch::ensure_launched(&api, instance, &mut status, ctx, now).await?
        }
        _ => match verdict::requested(instance) {
            Some(requested) => {
                step.enter("verdict");
                verdict::release(instance, &mut status, ctx, requested, now).await?
            }
            None => {
                step.enter("observe");
                liveness::observe(instance, &mut status, ctx, step, now).await?
            }
        },
    };
    step.enter("write-status");
    write_status(&api, instance, &before, status).await?;
    Ok(action)
}

/// Writes `status` when it differs from what was read. `lastObservedAt` alone is not a change,
/// so an idle instance causes no writes.
pub(crate) async fn write_status(
    api: &Api<GpuInstance>,
    instance: &GpuInstance,
    before: &GpuInstanceStatus,
    mut status: GpuInstanceStatus,
) -> Result<(), Error> {
    status.observed_generation = instance.metadata.generation;
    let mut comparable = status.clone();
    comparable.last_observed_at = before.last_observed_at.clone();
    if &comparable == before {
        return Ok(());
    }
    apply_status(api, &instance.name_any(), GPUINSTANCE_MANAGER, &status)
        .await
        .map(|_| ())
        .map_err(kube_err("write GpuInstance status"))
}

/// Retry policy: the provider's Retry-After when it gave one, otherwise a short requeue.
pub fn error_policy(instance: Arc<GpuInstance>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(CONTROLLER, error.category());
    warn!(gpuinstance = %instance.name_any(), namespace = ?instance.namespace(), error = %error_chain(error), "Reconcile failed");
    let retry_after = match error {
        Error::Provider { source, .. } => source.retry_after(),
        _ => None,
    };
    Action::requeue(retry_after.unwrap_or(Duration::from_secs(5)))
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let api: Api<GpuInstance> = ctx.scoped_api();
    info!(controller = CONTROLLER, "Starting controller");
    let controller = Controller::new(api, watcher::Config::default().any_semantic())
        .trigger_backoff(crate::controller::watch_backoff::WatchBackoff::default());
    tokio::spawn(refresh_gauges(controller.store(), ctx.clone()));
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Ok((object, _)) = result {
                debug!(gpuinstance = %object.name, "Reconciled");
            }
        })
        .await;
}

/// Keeps `instances{phase}` and `hourly_spend_dollars` current from the controller's cache, so
/// the gauges cost no API calls.
async fn refresh_gauges(store: kube::runtime::reflector::Store<GpuInstance>, ctx: Arc<Context>) {
    use crate::metrics::PhaseLabels;
    const PHASES: [(GpuInstancePhase, &str); 8] = [
        (GpuInstancePhase::Pending, "Pending"),
        (GpuInstancePhase::Creating, "Creating"),
        (GpuInstancePhase::Booting, "Booting"),
        (GpuInstancePhase::Running, "Running"),
        (GpuInstancePhase::Terminating, "Terminating"),
        (GpuInstancePhase::Terminated, "Terminated"),
        (GpuInstancePhase::Lost, "Lost"),
        (GpuInstancePhase::Failed, "Failed"),
    ];
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    loop {
        ticker.tick().await;
        let objects = store.state();
        for (phase, label) in PHASES {
            let count = objects
                .iter()
                .filter(|o| o.status.as_ref().map(|s| s.phase).unwrap_or_default() == phase)
                .count();
            ctx.metrics.instances_by_phase.get_or_create(&PhaseLabels { phase: label }).set(count as i64);
        }
        let spend: f64 = objects
            .iter()
            .filter_map(|o| o.status.as_ref())
            .filter(|s| {
                matches!(
                    s.phase,
                    GpuInstancePhase::Booting | GpuInstancePhase::Running | GpuInstancePhase::Terminating
                )
            })
            .filter_map(|s| s.offer.as_ref().map(|o| o.price_per_hour))
            .sum();
        ctx.metrics.hourly_spend.set(spend);
    }
}
