//! The TrainingJob controller: drives each job through the engine's phase machine
//! ([`crate::engine::next_step`]) on a GpuInstance it owns.
//!
//! One reconcile reads the job and its GpuInstance, asks the engine for the next step, does it,
//! and asks again until a step has to wait (for the machine, or until the next poll); then it
//! writes status once, only when it changed. Every step is idempotent and resumable from status
//! alone: the GpuInstance name is deterministic (`<job>-<attempt>`), staging skips what is
//! already verified on the machine, and launching checks `train.pid` first, so training is never
//! started twice. The pass is the engine's driver ([`crate::engine::driver`]); this module is
//! the Kubernetes side of it: `ports` (the driver's ports over the job's objects), `pass` (what a
//! pass works on), `machine` and [`provision`] (the GpuInstance and the job's key), [`session`]
//! (the cached SSH connection, the driver's memory and the job's result store), [`secrets`],
//! `notify` (webhooks), [`verdict`] (a misbehaving machine), [`finish`].

pub mod finish;
mod machine;
mod notify;
mod pass;
mod ports;
pub mod provision;
pub mod secrets;
pub mod session;
pub mod verdict;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::Context;
use super::pass_limit;
use super::patch::{TRAININGJOB_MANAGER, apply_status};
use crate::api::{GpuInstance, Reason, TrainingJob, TrainingJobPhase, TrainingJobStatus, from_k8s_time};
use crate::artifacts::address::EndpointPolicy;
use crate::engine::cost::only_cost_accrued;
use crate::engine::driver::Wait;
use crate::engine::validate::{FrontEnd, validate};
use crate::error::error_chain;
use crate::remote::launch::RemoteLayout;
use crate::remote::tool::{JobContext, ToolRegistry};
use pass::Pass;

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "trainingjob";

/// Errors of one reconciliation; the error policy retries them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {operation}")]
    Kube {
        operation: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Secret(#[from] crate::engine::env::SecretReadError),
    #[error("remote operation failed")]
    Remote(#[from] crate::remote::RemoteError),
    #[error("tool failed")]
    Tool(#[from] crate::remote::tool::ToolError),
    #[error("dataset failed")]
    Dataset(crate::remote::dataset::DatasetError),
    // Boxed: the monitor's error is large and every `Result` here would carry its size.
    #[error("monitoring failed")]
    Monitor(#[from] Box<crate::monitor::poller::MonitorError>),
    #[error("failed to make the job's SSH key")]
    Key(#[from] super::gpuinstance::sshkey::KeyError),
    #[error("the job's SSH key is unusable")]
    SshKey(#[from] crate::remote::ssh::KeyError),
    #[error("the object has no {0}")]
    Missing(&'static str),
    #[error("the pass was abandoned after {} s in the {} step", .0.after.as_secs(), .0.step)]
    Abandoned(crate::controller::pass_limit::Abandoned),
    /// A step failed for good where its caller did not expect it (a bug): retried like any error.
    #[error("{0}")]
    Failed(crate::engine::outcome::Failure),
    /// The machine's host key was never recorded: connecting would trust whatever key it shows.
    #[error("{0}")]
    UnpinnedHostKey(String),
}

/// A shared step's retryable error (its `Failed` outcome is handled where the step is run).
impl From<crate::engine::outcome::StepError> for Error {
    fn from(err: crate::engine::outcome::StepError) -> Self {
        use crate::engine::outcome::StepError;
        match err {
            StepError::Remote(err) => Error::Remote(err),
            StepError::Tool(err) => Error::Tool(err),
            StepError::Dataset(err) => Error::Dataset(err),
            StepError::Secret(err) => Error::Secret(err),
            StepError::Failed(failure) => Error::Failed(failure),
            StepError::Monitor(err) => Error::Monitor(err),
        }
    }
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { .. } | Error::Secret(_) => "Kube",
            Error::Remote(_) => "Remote",
            Error::Tool(_) => "Tool",
            Error::Dataset(_) => "Dataset",
            Error::Monitor(_) => "Monitor",
            Error::Key(_) | Error::SshKey(_) => "SshKey",
            Error::Missing(_) => "InvalidObject",
            Error::Abandoned(_) => "Abandoned",
            Error::Failed(_) => "Failed",
            Error::UnpinnedHostKey(_) => "SshKey",
        }
    }
}

pub(crate) fn kube_err(operation: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { operation, source }
}

/// The controller's own state next to the shared [`Context`].
pub struct JobController {
    pub ctx: Arc<Context>,
    pub tools: ToolRegistry,
    /// Base of the remote work dirs (`/workspace/gputrainer`; tests use a temporary folder).
    pub remote_base: String,
    pub sessions: session::Sessions,
    /// The Hugging Face CLI run on the machine (`hf`; tests substitute a stand-in).
    pub hf_cli: String,
    /// What one job may upload in all (the machine listing more is refused).
    pub upload_limits: crate::artifacts::upload::JobUploadLimits,
    /// Which addresses the URLs a job names (webhook, S3 endpoint) may reach
    /// (`--allow-private-endpoints`).
    pub endpoint_policy: EndpointPolicy,
}

/// One reconciliation of one TrainingJob.
pub async fn reconcile(job: Arc<TrainingJob>, ctrl: Arc<JobController>) -> Result<Action, Error> {
    let ctx = &ctrl.ctx;
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let namespace = job.namespace().ok_or(Error::Missing("namespace"))?;
    let uid = job.uid().ok_or(Error::Missing("uid"))?;
    let jobs: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let instances: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &namespace);
    // The cache can lag behind our own last status write (a GpuInstance change may wake us
    // first); acting on an old phase could rent a second machine for a finished job. All state
    // is in status, so it is read fresh.
    let Some(job) = jobs.get_opt(&job.name_any()).await.map_err(kube_err("read the TrainingJob"))? else {
        ctrl.sessions.remove(&uid);
        return Ok(Action::await_change());
    };
    if job.uid().as_deref() != Some(uid.as_str()) {
        // Deleted and created again under the same name: the new object gets its own pass.
        ctrl.sessions.remove(&uid);
        return Ok(Action::await_change());
    }
    let job = Arc::new(job);
    let before = job.status.clone().unwrap_or_default();
    let now = Utc::now();

    if job.meta().deletion_timestamp.is_some() {
        // The garbage collector deletes the owned GpuInstance, whose finalizer releases the GPU.
        ctrl.sessions.remove(&uid);
        return Ok(Action::await_change());
    }
    if before.phase.is_finished() {
        ctrl.sessions.remove(&uid);
        return finished(&job, &jobs, &instances, &before, now).await;
    }

    let tool = match validate(&job.spec, &ctrl.tools, FrontEnd::Cluster) {
        Ok(tool) => tool,
        Err(invalid) => return refuse_invalid(&job, &jobs, ctx, &before, &invalid, now).await,
    };
    let layout = RemoteLayout::new(&ctrl.remote_base, &uid)?;
    let step = pass_limit::StepTracker::new("start");
    let rendered = tool.render(
        &job.spec.params,
        &JobContext { name: job.name_any(), uid: uid.clone(), layout: layout.clone() },
    )?;
    let mut pass = Pass {
        job: &job,
        ctrl: &ctrl,
        jobs: jobs.clone(),
        written: before.clone(),
        instances,
        secrets: Api::namespaced(ctx.client.clone(), &namespace),
        layout,
        tool: rendered,
        status: before.clone(),
        step: &step,
    };
    let slot = ctrl.sessions.slot(&uid);
    let mut runtime = slot.lock().await;
    let limit = job_pass_limit(ctx, &job.spec, &before, now);
    let driven = async {
        let mut ports = ports::ClusterPorts::new(&mut pass, &mut runtime);
        crate::engine::driver::pass(&mut ports).await.map(action)
    };
    let result = match pass_limit::within(limit, &step, driven).await {
        Ok(result) => result,
        Err(abandoned) => {
            ctx.metrics.reconcile_abandoned(CONTROLLER, abandoned.step);
            warn!(job = %job.name_any(), namespace = %namespace, step = abandoned.step, after_s = abandoned.after.as_secs(), "Reconcile pass abandoned at its time limit");
            Err(Error::Abandoned(abandoned))
        }
    };
    let machine = pass.status.instance.as_ref().map(|i| i.name.clone());
    after_pass(&ctrl, &job, &mut runtime, machine.as_deref(), &result).await;
    drop(runtime);
    // Whatever was done before an error is recorded, so it is not done again.
    write_status(&jobs, &job, &pass.written, pass.status).await?;
    result
}

/// After a pass: a clean one clears the machine's fault count; after an error the connection is
/// reopened on the next pass (the monitor keeps its readings) and the machine is judged (best
/// effort: a failed request is made again after the next failed pass, and the status is written
/// either way).
async fn after_pass(
    ctrl: &JobController,
    job: &TrainingJob,
    runtime: &mut session::JobRuntime,
    machine: Option<&str>,
    result: &Result<Action, Error>,
) {
    let Err(err) = result else {
        runtime.faults.clear();
        return;
    };
    runtime.disconnect();
    let (Some(machine), Some(namespace)) = (machine, job.namespace()) else { return };
    let instances: Api<GpuInstance> = Api::namespaced(ctrl.ctx.client.clone(), &namespace);
    if let Err(failed) = verdict::judge(ctrl, job, &instances, &mut runtime.faults, machine, err).await {
        warn!(job = %job.name_any(), error = %error_chain(&failed), "Could not request the machine's release");
    }
}

/// A finished job: its machine is given back (again, should a release have been interrupted)
/// and the job deleted once `ttlSecondsAfterFinished` has passed.
async fn finished(
    job: &TrainingJob,
    jobs: &Api<TrainingJob>,
    instances: &Api<GpuInstance>,
    before: &TrainingJobStatus,
    now: chrono::DateTime<Utc>,
) -> Result<Action, Error> {
    if let Some(instance) = &before.instance {
        provision::ensure_instance_deleted(instances, &instance.name).await?;
    }
    let completed = before.completion_time.as_ref().map(from_k8s_time);
    match crate::engine::finish::ttl_left(job.spec.ttl_seconds_after_finished, completed, now) {
        Some(left) if left.is_zero() => {
            info!(job = %job.name_any(), "Deleting finished job (ttlSecondsAfterFinished)");
            match jobs.delete(&job.name_any(), &kube::api::DeleteParams::background()).await {
                Ok(_) => Ok(Action::await_change()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(Action::await_change()),
                Err(source) => Err(Error::Kube { operation: "delete the finished job", source }),
            }
        }
        Some(left) => Ok(Action::requeue(left)),
        None => Ok(Action::await_change()),
    }
}

/// An invalid spec fails the job at once (nothing is rented), with an event naming the field.
async fn refuse_invalid(
    job: &TrainingJob,
    jobs: &Api<TrainingJob>,
    ctx: &Context,
    before: &TrainingJobStatus,
    invalid: &crate::engine::validate::Invalid,
    now: chrono::DateTime<Utc>,
) -> Result<Action, Error> {
    let mut status = before.clone();
    let message = invalid.to_string();
    crate::engine::finish::finish_status(
        &mut status,
        TrainingJobPhase::Failed,
        Reason::InvalidSpec,
        &message,
        now,
    );
    ctx.event(job, EventType::Warning, Reason::InvalidSpec, "Validate", &message).await;
    info!(job = %job.name_any(), field = invalid.field, "Invalid spec");
    write_status(jobs, job, before, status).await?;
    Ok(Action::await_change())
}

/// How often a job waiting for its machine is looked at even without a GpuInstance change
/// (whose changes wake the job through `owns`).
const MACHINE_WAIT: Duration = Duration::from_secs(15);

/// When the driver's wait becomes the next reconcile.
fn action(wait: Wait) -> Action {
    match wait {
        Wait::Machine => Action::requeue(MACHINE_WAIT),
        Wait::Poll(after) => Action::requeue(after),
        Wait::Change | Wait::Finished => Action::await_change(),
        Wait::Again => Action::requeue(Duration::from_secs(1)),
    }
}

/// How long this pass may take: the configured limit, never far past the job's deadline.
fn job_pass_limit(
    ctx: &Context,
    spec: &crate::api::TrainingJobSpec,
    status: &TrainingJobStatus,
    now: chrono::DateTime<Utc>,
) -> Duration {
    pass_limit::job_pass_limit(ctx.config.job_pass_timeout, deadline_left(spec, status, now), STOP_GRACE)
}

/// Time a pass gets past the job's hard deadline to stop the trainer and save its latest
/// checkpoint (the salvage upload has a 10-minute step deadline of its own).
const STOP_GRACE: Duration = Duration::from_secs(15 * 60);

/// Time until the job's `activeDeadlineSeconds` passes; `None` before it started. Pure.
fn deadline_left(
    spec: &crate::api::TrainingJobSpec,
    status: &TrainingJobStatus,
    now: chrono::DateTime<Utc>,
) -> Option<Duration> {
    let started = from_k8s_time(status.start_time.as_ref()?);
    let deadline = started + chrono::Duration::seconds(spec.active_deadline_seconds);
    Some((deadline - now).to_std().unwrap_or(Duration::ZERO))
}

/// Writes `status` when it differs from `before` (what the API server holds); a cost that only
/// accrued waits until it is worth a write ([`only_cost_accrued`]). Returns what the API
/// server holds afterwards.
pub(super) async fn write_status(
    api: &Api<TrainingJob>,
    job: &TrainingJob,
    before: &TrainingJobStatus,
    mut status: TrainingJobStatus,
) -> Result<TrainingJobStatus, Error> {
    status.observed_generation = job.metadata.generation;
    if &status == before || only_cost_accrued(before, &status) {
        return Ok(before.clone());
    }
    apply_status(api, &job.name_any(), TRAININGJOB_MANAGER, &status)
        .await
        .map_err(kube_err("write TrainingJob status"))?;
    Ok(status)
}

/// Retry policy: a short requeue; the connection is rebuilt on the next pass.
pub fn error_policy(job: Arc<TrainingJob>, error: &Error, ctrl: Arc<JobController>) -> Action {
    ctrl.ctx.metrics.reconcile_failed(CONTROLLER, error.category());
    warn!(job = %job.name_any(), namespace = ?job.namespace(), error = %error_chain(error), "Reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctrl: Arc<JobController>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let jobs: Api<TrainingJob> = ctrl.ctx.scoped_api();
    let instances: Api<GpuInstance> = ctrl.ctx.scoped_api();
    info!(controller = CONTROLLER, "Starting controller");
    let controller = Controller::new(jobs, watcher::Config::default().any_semantic())
        .owns(instances, watcher::Config::default().any_semantic())
        .trigger_backoff(crate::controller::watch_backoff::WatchBackoff::default());
    tokio::spawn(housekeeping(controller.store(), ctrl.clone()));
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctrl)
        .for_each(|result| async move {
            if let Ok((object, _)) = result {
                debug!(job = %object.name, "Reconciled");
            }
        })
        .await;
}

const PHASES: [TrainingJobPhase; 8] = [
    TrainingJobPhase::Pending,
    TrainingJobPhase::Provisioning,
    TrainingJobPhase::Staging,
    TrainingJobPhase::Training,
    TrainingJobPhase::Uploading,
    TrainingJobPhase::Succeeded,
    TrainingJobPhase::Failed,
    TrainingJobPhase::Suspended,
];

/// The metric label of a phase (its name in the API).
pub(super) fn phase_label(phase: TrainingJobPhase) -> &'static str {
    match phase {
        TrainingJobPhase::Pending => "Pending",
        TrainingJobPhase::Provisioning => "Provisioning",
        TrainingJobPhase::Staging => "Staging",
        TrainingJobPhase::Training => "Training",
        TrainingJobPhase::Uploading => "Uploading",
        TrainingJobPhase::Succeeded => "Succeeded",
        TrainingJobPhase::Failed => "Failed",
        TrainingJobPhase::Suspended => "Suspended",
    }
}

/// From the controller's cache, with no API calls: drops the connections of deleted jobs (they
/// are never reconciled again) and keeps the `jobs{phase}` gauge current.
async fn housekeeping(store: kube::runtime::reflector::Store<TrainingJob>, ctrl: Arc<JobController>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let jobs = store.state();
        let live: HashSet<String> = jobs.iter().filter_map(|j| j.uid()).collect();
        ctrl.sessions.retain(&live);
        for phase in PHASES {
            let count = jobs
                .iter()
                .filter(|j| j.status.as_ref().map(|s| s.phase).unwrap_or_default() == phase)
                .count();
            ctrl.ctx
                .metrics
                .jobs_by_phase
                .get_or_create(&crate::metrics::PhaseLabels { phase: phase_label(phase) })
                .set(count as i64);
        }
    }
}
