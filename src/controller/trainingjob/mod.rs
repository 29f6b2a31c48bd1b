//! The TrainingJob controller: drives each job through the engine's phase machine
//! ([`crate::engine::next_step`]) on a GpuInstance it owns.
//!
//! One reconcile reads the job and its GpuInstance, asks the engine for the next step, does it,
//! and asks again until a step has to wait (for the machine, or until the next poll); then it
//! writes status once, only when it changed. Every step is idempotent and resumable from status
//! alone: the GpuInstance name is deterministic (`<job>-<attempt>`), staging skips what is
//! already verified on the machine, and launching checks `train.pid` first, so training is never
//! started twice. Files: [`validate`] (pure spec checks), [`provision`] (the GpuInstance and the
//! job's key), [`session`] (the cached SSH connection and monitor), [`stage`], [`train`],
//! [`finish`].

pub mod finish;
pub mod provision;
pub mod session;
pub mod stage;
pub mod suspend;
pub mod train;
pub mod validate;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::Context;
use super::gpuinstance::error_chain;
use super::patch::{TRAININGJOB_MANAGER, apply_status};
use crate::api::{
    ConditionStatus, GpuInstance, Reason, TrainingJob, TrainingJobPhase, TrainingJobStatus, from_k8s_time,
    is_condition_true, job_condition, set_condition, to_k8s_time,
};
use crate::engine::{MachineObservation, Observations, Step, TrainingObservation, next_step};
use crate::monitor::poller::{TrainingFiles, TrainingMonitor};
use crate::monitor::stall::Recommendation;
use crate::remote::launch::{self, LaunchOutcome, RemoteLayout};
use crate::remote::tool::{JobContext, RenderedTool, ToolRegistry};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "trainingjob";

/// How often a job waiting for its machine is looked at even without a GpuInstance change.
const MACHINE_WAIT: Duration = Duration::from_secs(15);

/// Steps done in one reconcile before it yields; the engine normally waits long before this.
const MAX_STEPS_PER_PASS: usize = 12;

/// Errors of one reconciliation; the error policy retries them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {operation}")]
    Kube {
        operation: &'static str,
        #[source]
        source: kube::Error,
    },
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
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "Kube",
            Error::Remote(_) => "Remote",
            Error::Tool(_) => "Tool",
            Error::Dataset(_) => "Dataset",
            Error::Monitor(_) => "Monitor",
            Error::Key(_) | Error::SshKey(_) => "SshKey",
            Error::Missing(_) => "InvalidObject",
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
}

/// What one pass works on.
struct Pass<'a> {
    job: &'a TrainingJob,
    ctrl: &'a JobController,
    instances: Api<GpuInstance>,
    secrets: Api<Secret>,
    layout: RemoteLayout,
    tool: RenderedTool,
    status: TrainingJobStatus,
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
        if let Some(instance) = &before.instance {
            provision::ensure_instance_deleted(&instances, &instance.name).await?;
        }
        let completed = before.completion_time.as_ref().map(from_k8s_time);
        return match finish::ttl_left(job.spec.ttl_seconds_after_finished, completed, now) {
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
        };
    }

    let tool = match validate::validate(&job.spec, &ctrl.tools) {
        Ok(tool) => tool,
        Err(invalid) => {
            let mut status = before.clone();
            let message = invalid.to_string();
            finish::finish_status(&mut status, TrainingJobPhase::Failed, Reason::InvalidSpec, &message, now);
            ctx.event(&*job, EventType::Warning, Reason::InvalidSpec.as_str(), "Validate", &message).await;
            info!(job = %job.name_any(), field = invalid.field, "Invalid spec");
            write_status(&jobs, &job, &before, status).await?;
            return Ok(Action::await_change());
        }
    };
    let layout = RemoteLayout::new(&ctrl.remote_base, &uid)?;
    let rendered = tool.render(
        &job.spec.params,
        &JobContext { name: job.name_any(), uid: uid.clone(), layout: layout.clone() },
    )?;
    let mut pass = Pass {
        job: &job,
        ctrl: &ctrl,
        instances,
        secrets: Api::namespaced(ctx.client.clone(), &namespace),
        layout,
        tool: rendered,
        status: before.clone(),
    };
    let slot = ctrl.sessions.slot(&uid);
    let mut runtime = slot.lock().await;
    let result = pass.run(&mut runtime).await;
    if result.is_err() {
        // A broken connection or monitor is rebuilt on the next pass.
        runtime.reset();
    }
    drop(runtime);
    // Whatever was done before an error is recorded, so it is not done again.
    write_status(&jobs, &job, &before, pass.status).await?;
    result
}

impl Pass<'_> {
    async fn run(&mut self, runtime: &mut session::JobRuntime) -> Result<Action, Error> {
        let mut training = TrainingObservation::Unknown;
        for _ in 0..MAX_STEPS_PER_PASS {
            let now = Utc::now();
            let instance = match &self.status.instance {
                Some(i) => self.instances.get_opt(&i.name).await.map_err(kube_err("read the GpuInstance"))?,
                None => None,
            };
            let machine = provision::observe(instance.as_ref());
            self.record_machine(instance.as_ref(), &machine, now).await;
            match suspend::suspend_step(&self.job.spec, &self.status) {
                suspend::SuspendStep::Run => {}
                suspend::SuspendStep::StaySuspended => return Ok(Action::await_change()),
                suspend::SuspendStep::Suspend => {
                    self.suspend(runtime, instance.as_ref(), &machine).await?;
                    return Ok(Action::await_change());
                }
            }
            if train::soft_deadline_passed(&self.job.spec, &self.status, now)
                && !is_condition_true(&self.status.conditions, train::SOFT_DEADLINE_CONDITION)
            {
                let message = format!(
                    "softDeadlineSeconds ({} s) passed; the job keeps running",
                    self.job.spec.soft_deadline_seconds.unwrap_or_default()
                );
                set_condition(
                    &mut self.status.conditions,
                    train::SOFT_DEADLINE_CONDITION,
                    ConditionStatus::True,
                    Reason::SoftDeadlineExceeded,
                    &message,
                    None,
                    now,
                );
                self.event(EventType::Warning, Reason::SoftDeadlineExceeded.as_str(), "Monitor", &message)
                    .await;
            }
            let observed = Observations { machine: machine.clone(), training: training.clone() };
            let step = next_step(&self.job.spec, &self.status, &observed, now);
            debug!(job = %self.job.name_any(), ?step, "Next step");
            match step {
                Step::Done => return Ok(Action::await_change()),
                Step::AcquireMachine { attempt } => {
                    runtime.reset();
                    self.acquire(attempt, now).await?;
                    // The GpuInstance's changes wake the job (`owns`); the requeue is a fallback.
                    return Ok(Action::requeue(MACHINE_WAIT));
                }
                Step::WaitForMachine => return Ok(Action::requeue(MACHINE_WAIT)),
                Step::Stage => {
                    let exec = self.session(runtime, instance.as_ref()).await?;
                    self.set_phase(TrainingJobPhase::Staging, Reason::Staging, "staging dataset and recipe");
                    if let Some(instance) = instance.as_ref() {
                        stage::claim_work_dir(exec.as_ref(), &self.layout, &instance.name_any()).await?;
                    }
                    match stage::stage(exec.as_ref(), &self.layout, &self.job.spec, &self.tool).await? {
                        Ok(message) => {
                            set_condition(
                                &mut self.status.conditions,
                                job_condition::DATA_STAGED,
                                ConditionStatus::True,
                                Reason::Staged,
                                &message,
                                None,
                                Utc::now(),
                            );
                            self.event(EventType::Normal, "Staged", "Stage", &message).await;
                        }
                        Err((reason, message)) => {
                            self.finish(runtime, TrainingJobPhase::Failed, reason, &message).await?
                        }
                    }
                }
                Step::Launch { resume } => {
                    let exec = self.session(runtime, instance.as_ref()).await?;
                    let env = match train::resolve_env(&self.secrets, &self.job.spec).await? {
                        Ok(env) => env,
                        Err(message) => {
                            self.finish(runtime, TrainingJobPhase::Failed, Reason::SecretNotFound, &message)
                                .await?;
                            continue;
                        }
                    };
                    let outcome =
                        launch::launch(exec.as_ref(), &self.layout, &self.tool.launch_spec(resume, env))
                            .await?;
                    let message = match outcome {
                        LaunchOutcome::Started { pid } => format!("{} started (pid {pid})", self.tool.tool),
                        LaunchOutcome::AlreadyRunning { pid } => {
                            format!("{} is running (pid {pid})", self.tool.tool)
                        }
                        LaunchOutcome::AlreadyExited { exit_code } => {
                            format!("{} already ran (exit code {exit_code})", self.tool.tool)
                        }
                    };
                    self.set_phase(TrainingJobPhase::Training, Reason::Training, &message);
                    set_condition(
                        &mut self.status.conditions,
                        job_condition::TRAINING,
                        ConditionStatus::True,
                        Reason::Training,
                        &message,
                        None,
                        Utc::now(),
                    );
                    if matches!(outcome, LaunchOutcome::Started { .. }) {
                        if self.status.attempts == 1
                            && let Some(created) = self.job.meta().creation_timestamp.as_ref()
                        {
                            let waited = (Utc::now() - from_k8s_time(created)).num_milliseconds().max(0)
                                as f64
                                / 1000.0;
                            self.ctrl.ctx.metrics.apply_to_training_seconds.observe(waited);
                        }
                        self.event(EventType::Normal, "TrainingStarted", "Launch", &message).await;
                    }
                }
                Step::Poll => {
                    let exec = self.session(runtime, instance.as_ref()).await?;
                    training = self.poll(runtime, exec.as_ref(), instance.as_ref()).await?;
                    if training == TrainingObservation::Running {
                        let every =
                            Duration::from_secs(u64::from(self.job.spec.monitoring.poll_interval_seconds));
                        return Ok(Action::requeue(every));
                    }
                }
                Step::StopAndFail { reason, message } => {
                    if let Ok(exec) = self.session(runtime, instance.as_ref()).await {
                        finish::stop(exec.as_ref(), &self.layout).await?;
                        // What the trainer saved is listed before the machine goes (uploading the
                        // latest checkpoint needs the artifacts module).
                        let kind = train::parser_kind(self.tool.parser);
                        let (_, checkpoints) =
                            finish::collect(exec.as_ref(), &self.layout, &self.tool, kind).await?;
                        self.status.checkpoints = checkpoints;
                    }
                    self.finish(runtime, TrainingJobPhase::Failed, reason, &message).await?;
                }
                Step::Upload => {
                    let exec = self.session(runtime, instance.as_ref()).await?;
                    self.upload(exec.as_ref()).await?;
                }
                Step::Finish { phase, reason, message } => {
                    if let MachineObservation::Ready { .. } = machine
                        && let Ok(exec) = self.session(runtime, instance.as_ref()).await
                    {
                        finish::stop(exec.as_ref(), &self.layout).await?;
                    }
                    self.finish(runtime, phase, reason, &message).await?;
                }
            }
        }
        Ok(Action::requeue(Duration::from_secs(1)))
    }

    async fn session(
        &self,
        runtime: &mut session::JobRuntime,
        instance: Option<&GpuInstance>,
    ) -> Result<Arc<crate::remote::ssh::SshExec>, Error> {
        let instance = instance.ok_or(Error::Missing("GpuInstance"))?;
        session::ensure_session(runtime, &self.secrets, instance).await
    }

    async fn event(&self, type_: EventType, reason: &str, action: &str, note: &str) {
        self.ctrl.ctx.event(self.job, type_, reason, action, note).await;
    }

    fn set_phase(&mut self, phase: TrainingJobPhase, reason: Reason, message: &str) {
        self.status.phase = phase;
        self.status.reason = Some(reason);
        self.status.message = Some(message.to_string());
    }

    /// Instance details, cost and the InstanceReady condition from the GpuInstance.
    async fn record_machine(
        &mut self,
        instance: Option<&GpuInstance>,
        machine: &MachineObservation,
        now: DateTime<Utc>,
    ) {
        let Some(instance) = instance else { return };
        let name = instance.name_any();
        self.status.instance = Some(provision::instance_status(&name, Some(instance)));
        let gi_status = instance.status.clone().unwrap_or_default();
        let eta = self.status.progress.as_ref().and_then(|p| p.eta_seconds);
        if let Some(cost) = train::cost(
            gi_status.offer.as_ref().map(|o| o.price_per_hour),
            gi_status.launched_at.as_ref().map(from_k8s_time),
            eta,
            provision::prior_cost(instance),
            self.status.cost.as_ref(),
            now,
        ) {
            self.status.cost = Some(cost);
        }
        if let MachineObservation::Ready { .. } = machine
            && !is_condition_true(&self.status.conditions, job_condition::INSTANCE_READY)
        {
            let gpu = self.status.instance.as_ref().and_then(|i| i.gpu.clone()).unwrap_or_default();
            let message = format!("GpuInstance {name} is ready ({gpu})");
            set_condition(
                &mut self.status.conditions,
                job_condition::INSTANCE_READY,
                ConditionStatus::True,
                Reason::Ready,
                &message,
                None,
                now,
            );
            self.event(EventType::Normal, "InstanceReady", "Provision", &message).await;
        }
    }

    /// Creates the key Secret and the GpuInstance of `attempt`, releasing the previous machine.
    async fn acquire(&mut self, attempt: i32, now: DateTime<Utc>) -> Result<(), Error> {
        let job_name = self.job.name_any();
        let name = provision::instance_name(&job_name, attempt);
        if let Some(previous) = self.status.instance.as_ref().filter(|i| i.name != name) {
            provision::ensure_instance_deleted(&self.instances, &previous.name).await?;
        }
        provision::ensure_key_secret(&self.secrets, self.job).await?;
        let tool_image = self.tool.image.clone();
        let spent = self.status.cost.as_ref().map(|c| c.accrued).unwrap_or(0.0);
        let desired = provision::desired_instance(self.job, attempt, &tool_image, spent)?;
        let created = provision::ensure_instance(&self.instances, &desired).await?;
        let status = &mut self.status;
        status.attempts = attempt;
        status.start_time.get_or_insert_with(|| to_k8s_time(now));
        status.instance = Some(provision::instance_status(&name, None));
        // A new machine has nothing on it: stage and launch again there.
        for c in [job_condition::INSTANCE_READY, job_condition::DATA_STAGED, job_condition::TRAINING] {
            if crate::api::find_condition(&status.conditions, c).is_some() {
                set_condition(
                    &mut status.conditions,
                    c,
                    ConditionStatus::False,
                    Reason::Launching,
                    "new machine",
                    None,
                    now,
                );
            }
        }
        if self.status.phase == TrainingJobPhase::Suspended {
            set_condition(
                &mut self.status.conditions,
                job_condition::SUSPENDED,
                ConditionStatus::False,
                Reason::Resumed,
                "spec.suspend was cleared",
                None,
                now,
            );
            if created {
                self.event(
                    EventType::Normal,
                    "Resumed",
                    "Resume",
                    "spec.suspend was cleared: renting a new machine",
                )
                .await;
            }
        }
        let message = format!("renting a machine: GpuInstance {name} (attempt {attempt})");
        self.set_phase(TrainingJobPhase::Provisioning, Reason::Launching, &message);
        if created {
            info!(job = %job_name, gpuinstance = %name, attempt, "Created GpuInstance");
            self.event(EventType::Normal, "Provisioning", "Provision", &message).await;
        }
        Ok(())
    }

    /// Stops the trainer (it saves on TERM), lists what it saved, releases the machine and
    /// enters `Suspended`. Resuming rents a new machine and starts the tool's resume command when
    /// checkpoints were listed (they reach a new machine only once checkpoint sync is wired in).
    async fn suspend(
        &mut self,
        runtime: &mut session::JobRuntime,
        instance: Option<&GpuInstance>,
        machine: &MachineObservation,
    ) -> Result<(), Error> {
        if let MachineObservation::Ready { .. } = machine
            && is_condition_true(&self.status.conditions, job_condition::TRAINING)
        {
            let exec = self.session(runtime, instance).await?;
            finish::stop(exec.as_ref(), &self.layout).await?;
            let kind = train::parser_kind(self.tool.parser);
            let (_, checkpoints) = finish::collect(exec.as_ref(), &self.layout, &self.tool, kind).await?;
            self.status.checkpoints = checkpoints;
        }
        runtime.reset();
        self.release().await?;
        let now = Utc::now();
        let latest =
            self.status.checkpoints.last().map(|c| format!("; latest checkpoint at step {}", c.step));
        let message = format!("spec.suspend is set: the GPU is released{}", latest.unwrap_or_default());
        for c in [job_condition::INSTANCE_READY, job_condition::DATA_STAGED, job_condition::TRAINING] {
            if crate::api::find_condition(&self.status.conditions, c).is_some() {
                set_condition(
                    &mut self.status.conditions,
                    c,
                    ConditionStatus::False,
                    Reason::Suspended,
                    &message,
                    None,
                    now,
                );
            }
        }
        set_condition(
            &mut self.status.conditions,
            job_condition::SUSPENDED,
            ConditionStatus::True,
            Reason::Suspended,
            &message,
            None,
            now,
        );
        self.set_phase(TrainingJobPhase::Suspended, Reason::Suspended, &message);
        if let Some(progress) = self.status.progress.as_mut() {
            progress.eta_seconds = None;
            progress.steps_per_second = None;
        }
        info!(job = %self.job.name_any(), "Suspended");
        self.event(EventType::Normal, "Suspended", "Suspend", &message).await;
        Ok(())
    }

    /// One poll: progress, stall condition and events, and what the engine should make of it.
    async fn poll(
        &mut self,
        runtime: &mut session::JobRuntime,
        exec: &dyn crate::remote::RemoteExec,
        instance: Option<&GpuInstance>,
    ) -> Result<TrainingObservation, Error> {
        let instance_name = instance.map(|i| i.name_any()).unwrap_or_default();
        if runtime.monitor.as_ref().is_none_or(|(n, _)| *n != instance_name) {
            let monitor = TrainingMonitor::new(
                TrainingFiles::in_work_dir(self.layout.work_dir()),
                train::parser_kind(self.tool.parser),
                &self.job.spec.monitoring,
            );
            runtime.monitor = Some((instance_name, monitor));
        }
        let Some((_, monitor)) = runtime.monitor.as_mut() else { return Ok(TrainingObservation::Unknown) };
        let now = Utc::now();
        let polled = monitor.poll(exec, now).await.map_err(Box::new)?;
        train::record_progress(&mut self.status, &polled, now);
        let stalled = is_condition_true(&self.status.conditions, job_condition::STALLED);
        match polled.stall.recommendation {
            Recommendation::WaitForRecovery | Recommendation::StopJob if !stalled => {
                set_condition(
                    &mut self.status.conditions,
                    job_condition::STALLED,
                    ConditionStatus::True,
                    Reason::Stalled,
                    &polled.stall.reason,
                    None,
                    now,
                );
                self.ctrl.ctx.metrics.stalls_detected.inc();
                self.event(EventType::Warning, "Stalled", "Monitor", &polled.stall.reason).await;
            }
            Recommendation::Continue if stalled => {
                set_condition(
                    &mut self.status.conditions,
                    job_condition::STALLED,
                    ConditionStatus::False,
                    Reason::Recovered,
                    &polled.stall.reason,
                    None,
                    now,
                );
                self.event(EventType::Normal, "Recovered", "Monitor", &polled.stall.reason).await;
            }
            _ => {}
        }
        Ok(train::observation(&polled))
    }

    /// Records the results. Without `output` they stay listed in status (and are lost with the
    /// machine). With `output.s3` the final model is uploaded through presigned URLs and verified
    /// with HEAD before the job succeeds; a failed upload fails the job. Either way the finish
    /// path releases the machine afterwards. Hugging Face output is not wired in yet.
    async fn upload(&mut self, exec: &dyn crate::remote::RemoteExec) -> Result<(), Error> {
        self.set_phase(TrainingJobPhase::Uploading, Reason::Uploading, "collecting results");
        let kind = train::parser_kind(self.tool.parser);
        let (model, checkpoints) = finish::collect(exec, &self.layout, &self.tool, kind).await?;
        self.status.checkpoints = checkpoints;
        let Some(model) = model else {
            let message =
                format!("the trainer finished but left no model at {}", self.tool.outputs.final_model);
            self.status.phase = TrainingJobPhase::Failed;
            return self.record_finish(TrainingJobPhase::Failed, Reason::UploadFailed, &message).await;
        };
        let listed = format!(
            "model {} ({} bytes, sha256 {})",
            model.uri,
            model.size_bytes,
            model.sha256.clone().unwrap_or_default()
        );
        self.status.artifacts = vec![model];
        let output = self.job.spec.output.clone();
        let message = match output.as_ref().map(|o| (o.s3.as_ref(), o.hugging_face.is_some())) {
            None => format!("no spec.output: results listed, not uploaded: {listed}"),
            Some((Some(s3), also_hf)) => match self.upload_to_s3(exec, s3).await? {
                Ok(artifacts) => {
                    let uploaded = artifacts
                        .iter()
                        .map(|a| format!("{} {} ({} bytes)", a.name, a.uri, a.size_bytes))
                        .collect::<Vec<_>>()
                        .join(", ");
                    self.status.artifacts = artifacts;
                    if also_hf {
                        // The model is safe in S3, but a destination the spec asked for was not
                        // served: say so rather than succeed silently.
                        let message = format!(
                            "uploaded and verified: {uploaded}; uploading to spec.output.huggingFace is not supported by this build yet"
                        );
                        return self
                            .record_finish(TrainingJobPhase::Failed, Reason::UploadFailed, &message)
                            .await;
                    }
                    format!("uploaded and verified: {uploaded}")
                }
                Err(reason) => {
                    let message = format!("upload to S3 failed: {reason}; {listed} was not uploaded");
                    return self
                        .record_finish(TrainingJobPhase::Failed, Reason::UploadFailed, &message)
                        .await;
                }
            },
            Some((None, _)) => {
                let message = format!(
                    "uploading to spec.output.huggingFace is not supported by this build yet; {listed} was not uploaded"
                );
                return self.record_finish(TrainingJobPhase::Failed, Reason::UploadFailed, &message).await;
            }
        };
        set_condition(
            &mut self.status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::True,
            Reason::Uploaded,
            &message,
            None,
            Utc::now(),
        );
        self.event(EventType::Normal, "Uploaded", "Upload", &message).await;
        Ok(())
    }

    /// Uploads the final model to `s3` and returns the verified artifacts, or (inner `Err`) why
    /// the upload failed. The outer `Err` is a transient API error (the pass is retried).
    /// Messages never contain credentials or presigned URLs.
    async fn upload_to_s3(
        &mut self,
        exec: &dyn crate::remote::RemoteExec,
        s3: &crate::api::S3Output,
    ) -> Result<Result<Vec<crate::api::ArtifactStatus>, String>, Error> {
        use crate::artifacts::plan::Destination;
        use crate::artifacts::s3::S3Store;
        use crate::artifacts::settings::secret_bytes;
        use crate::artifacts::{S3Settings, UploadItem, UploadSettings, Uploader};

        let secret_data = match &s3.credentials_secret_ref {
            Some(secret_ref) => {
                let secret = self
                    .secrets
                    .get_opt(&secret_ref.name)
                    .await
                    .map_err(kube_err("read the S3 credentials Secret"))?;
                match secret {
                    Some(secret) => Some(secret_bytes(&secret)),
                    None => return Ok(Err(format!("credentials Secret {} not found", secret_ref.name))),
                }
            }
            None => None,
        };
        let defaults = S3Settings::from_env().ok();
        let settings = match S3Settings::for_output(s3, secret_data.as_ref(), defaults.as_ref()) {
            Ok(settings) => settings,
            Err(e) => return Ok(Err(error_chain(&e))),
        };
        let store = S3Store::new(&settings);
        let uid = self.job.uid().ok_or(Error::Missing("uid"))?;
        let final_model = &self.tool.outputs.final_model;
        let file_name = final_model.rsplit('/').find(|s| !s.is_empty()).unwrap_or("model");
        let item = UploadItem {
            name: "model".into(),
            path: self.layout.join(final_model),
            object: Destination::for_job(s3, &self.job.name_any(), &uid).object(file_name),
        };
        self.set_phase(
            TrainingJobPhase::Uploading,
            Reason::Uploading,
            &format!("uploading to {}", item.object.uri()),
        );
        let uploader = Uploader::new(&store, UploadSettings::default());
        match uploader.upload(exec, std::slice::from_ref(&item)).await {
            Ok(artifacts) => Ok(Ok(artifacts)),
            Err(e) => {
                warn!(job = %self.job.name_any(), error = %error_chain(&e), "Upload failed");
                Ok(Err(error_chain(&e)))
            }
        }
    }

    /// Marks the job finished; the next step (`Finish` is decided from the phase) releases the
    /// machine.
    async fn record_finish(
        &mut self,
        phase: TrainingJobPhase,
        reason: Reason,
        message: &str,
    ) -> Result<(), Error> {
        let now = Utc::now();
        finish::finish_status(&mut self.status, phase, reason, message, now);
        self.record_finish_metrics(phase, reason, now);
        self.release().await?;
        let type_ = if phase == TrainingJobPhase::Succeeded { EventType::Normal } else { EventType::Warning };
        let event_reason = if phase == TrainingJobPhase::Succeeded { "Succeeded" } else { "Failed" };
        self.event(type_, event_reason, "Finish", message).await;
        Ok(())
    }

    async fn finish(
        &mut self,
        runtime: &mut session::JobRuntime,
        phase: TrainingJobPhase,
        reason: Reason,
        message: &str,
    ) -> Result<(), Error> {
        runtime.reset();
        info!(job = %self.job.name_any(), ?phase, %reason, "Finished");
        self.record_finish(phase, reason, message).await
    }

    fn record_finish_metrics(&self, phase: TrainingJobPhase, reason: Reason, now: DateTime<Utc>) {
        let metrics = &self.ctrl.ctx.metrics;
        let label = crate::metrics::PhaseLabels { phase: phase_label(phase) };
        if let Some(created) = self.job.meta().creation_timestamp.as_ref() {
            let seconds = (now - from_k8s_time(created)).num_milliseconds().max(0) as f64 / 1000.0;
            metrics.job_duration.get_or_create(&label).observe(seconds);
        }
        if let Some(cost) = &self.status.cost {
            metrics.job_cost.observe(cost.accrued);
        }
        if phase == TrainingJobPhase::Failed {
            metrics
                .job_failures
                .get_or_create(&crate::metrics::ReasonLabels { reason: reason.as_str() })
                .inc();
        }
    }

    /// Deletes the GpuInstance; its finalizer releases the machine.
    async fn release(&mut self) -> Result<(), Error> {
        if let Some(instance) = &self.status.instance {
            provision::ensure_instance_deleted(&self.instances, &instance.name).await?;
        }
        Ok(())
    }
}

/// Writes `status` when it differs from what was read.
async fn write_status(
    api: &Api<TrainingJob>,
    job: &TrainingJob,
    before: &TrainingJobStatus,
    mut status: TrainingJobStatus,
) -> Result<(), Error> {
    status.observed_generation = job.metadata.generation;
    if &status == before {
        return Ok(());
    }
    apply_status(api, &job.name_any(), TRAININGJOB_MANAGER, &status)
        .await
        .map(|_| ())
        .map_err(kube_err("write TrainingJob status"))
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
        .owns(instances, watcher::Config::default().any_semantic());
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
fn phase_label(phase: TrainingJobPhase) -> &'static str {
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
