//! One pass over one job: ask the engine for the next step, do it, and ask again until a step has
//! to wait. The steps themselves live in the files named after their phase.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{debug, info};

use super::machine::MachineWatch;
use super::{Error, JobController, finish, kube_err, provision, session, stage, suspend, train};
use crate::api::{
    ConditionStatus, GpuInstance, Reason, TrainingJob, TrainingJobPhase, TrainingJobStatus, from_k8s_time,
    is_condition_true, job_condition, set_condition,
};
use crate::controller::pass_limit::StepTracker;
use crate::engine::env::{EnvError, resolve_env};
use crate::engine::outcome::StepError;
use crate::engine::stage::StageInput;
use crate::engine::{MachineObservation, Observations, Step, TrainingObservation, next_step};
use crate::remote::launch::{self, LaunchOutcome, RemoteLayout};
use crate::remote::tool::RenderedTool;

/// How often a job waiting for its machine is looked at even without a GpuInstance change.
const MACHINE_WAIT: Duration = Duration::from_secs(15);

/// Steps done in one reconcile before it yields; the engine normally waits long before this.
const MAX_STEPS_PER_PASS: usize = 12;

/// What one pass works on.
pub(super) struct Pass<'a> {
    pub(super) job: &'a TrainingJob,
    pub(super) ctrl: &'a JobController,
    pub(super) jobs: Api<TrainingJob>,
    /// The status as the API server holds it (written at the end of the pass, or earlier by
    /// [`Pass::persist`]).
    pub(super) written: TrainingJobStatus,
    pub(super) instances: Api<GpuInstance>,
    pub(super) secrets: Api<Secret>,
    pub(super) layout: RemoteLayout,
    pub(super) tool: RenderedTool,
    pub(super) status: TrainingJobStatus,
    /// The step in progress, for a pass abandoned at its time limit.
    pub(super) step: &'a StepTracker,
}

/// The name of a step in logs and in `gputrainer_reconciles_abandoned_total{step}`.
pub(super) fn step_label(step: &Step) -> &'static str {
    match step {
        Step::Done => "done",
        Step::AcquireMachine { .. } => "acquire",
        Step::WaitForMachine => "wait",
        Step::Stage => "stage",
        Step::Launch { .. } => "launch",
        Step::Poll => "poll",
        Step::StopAndFail { .. } => "stop",
        Step::Upload => "upload",
        Step::Finish { .. } => "finish",
    }
}

/// Steps that talk to the machine: a pass abandoned in one of them is the machine's doing.
pub(super) fn is_machine_step(label: &str) -> bool {
    matches!(label, "stage" | "launch" | "poll" | "stop" | "upload" | "finish")
}

impl Pass<'_> {
    pub(super) async fn run(&mut self, runtime: &mut session::JobRuntime) -> Result<Action, Error> {
        let mut training = TrainingObservation::Unknown;
        for _ in 0..MAX_STEPS_PER_PASS {
            self.step.enter("observe");
            let now = Utc::now();
            let instance = match &self.status.instance {
                Some(i) => self.instances.get_opt(&i.name).await.map_err(kube_err("read the GpuInstance"))?,
                None => None,
            };
            let machine = provision::observe(instance.as_ref());
            self.record_machine(instance.as_ref(), &machine, now).await;
            match suspend::suspend_step(&self.job.spec, &self.status) {
                suspend::SuspendStep::Run => {}
                suspend::SuspendStep::StaySuspended => {
                    // A release interrupted after the status was written is finished here.
                    if instance.is_some() {
                        self.release().await?;
                    }
                    return Ok(Action::await_change());
                }
                suspend::SuspendStep::Suspend => {
                    self.suspend(runtime, instance.as_ref(), &machine).await?;
                    return Ok(Action::await_change());
                }
            }
            if crate::engine::progress::soft_deadline_passed(&self.job.spec, &self.status, now)
                && !is_condition_true(
                    &self.status.conditions,
                    crate::engine::progress::SOFT_DEADLINE_CONDITION,
                )
            {
                let message = format!(
                    "softDeadlineSeconds ({} s) passed; the job keeps running",
                    self.job.spec.soft_deadline_seconds.unwrap_or_default()
                );
                set_condition(
                    &mut self.status.conditions,
                    crate::engine::progress::SOFT_DEADLINE_CONDITION,
                    ConditionStatus::True,
                    Reason::SoftDeadlineExceeded,
                    &message,
                    None,
                    now,
                );
                self.event(EventType::Warning, Reason::SoftDeadlineExceeded, "Monitor", &message).await;
            }
            let observed = Observations { machine: machine.clone(), training: training.clone() };
            let step = next_step(&self.job.spec, &self.status, &observed, now);
            debug!(job = %self.job.name_any(), ?step, "Next step");
            self.step.enter(step_label(&step));
            // Steps on the machine are abandoned if it is lost meanwhile (the next step then
            // sees the loss): SSH to a dead machine only gives up after minutes of retrying.
            let watch = MachineWatch::new(&self.instances, instance.as_ref());
            match step {
                Step::Done => return Ok(Action::await_change()),
                Step::AcquireMachine { attempt } => {
                    runtime.reset();
                    self.acquire(attempt, now).await?;
                    // The GpuInstance's changes wake the job (`owns`); the requeue is a fallback.
                    return Ok(Action::requeue(MACHINE_WAIT));
                }
                Step::WaitForMachine => return Ok(Action::requeue(MACHINE_WAIT)),
                Step::Stage => match watch.run(self.stage(runtime, instance.as_ref())).await {
                    Some(staged) => staged?,
                    None => self.machine_lost(runtime),
                },
                Step::Launch { resume } => {
                    match watch.run(self.launch(runtime, instance.as_ref(), resume)).await {
                        Some(launched) => launched?,
                        None => self.machine_lost(runtime),
                    }
                }
                Step::Poll => {
                    let every =
                        Duration::from_secs(u64::from(self.job.spec.monitoring.poll_interval_seconds));
                    // A pass woken by the job's own status write does not poll the machine again.
                    if let Some(left) = runtime.poll_due_in(every, std::time::Instant::now()) {
                        return Ok(Action::requeue(left));
                    }
                    match watch.run(self.poll_step(runtime, instance.as_ref())).await {
                        Some(polled) => {
                            training = polled?;
                            if training == TrainingObservation::Running {
                                return Ok(Action::requeue(every));
                            }
                        }
                        None => self.machine_lost(runtime),
                    }
                }
                Step::StopAndFail { reason, message } => {
                    let saved =
                        watch.run(self.stop_and_save(runtime, instance.as_ref(), reason, &message)).await;
                    let message = match saved {
                        Some(Ok(Some(saved))) => format!("{message}; {saved}"),
                        Some(Ok(None)) => message,
                        Some(Err(err)) => return Err(err),
                        None => format!("{message}; the machine was lost before what it saved could be kept"),
                    };
                    self.finish(runtime, TrainingJobPhase::Failed, reason, &message).await?;
                }
                Step::Upload => {
                    let uploaded = watch
                        .run(async {
                            let exec = self.session(runtime, instance.as_ref()).await?;
                            self.upload(runtime, exec.as_ref()).await
                        })
                        .await;
                    match uploaded {
                        Some(uploaded) => uploaded?,
                        None => self.machine_lost(runtime),
                    }
                }
                Step::Finish { phase, reason, message } => {
                    if let MachineObservation::Ready { .. } = machine {
                        // Best effort: a machine lost meanwhile has no trainer to stop.
                        let stopped = watch
                            .run(async {
                                match self.session(runtime, instance.as_ref()).await {
                                    Ok(exec) => finish::stop(exec.as_ref(), &self.layout).await.map(|_| ()),
                                    Err(_) => Ok(()),
                                }
                            })
                            .await;
                        if let Some(stopped) = stopped {
                            stopped?;
                        }
                    }
                    self.finish(runtime, phase, reason, &message).await?;
                }
            }
        }
        Ok(Action::requeue(Duration::from_secs(1)))
    }

    /// Staging: claim the work dir, stage dataset and recipe, restore a checkpoint.
    async fn stage(
        &mut self,
        runtime: &mut session::JobRuntime,
        instance: Option<&GpuInstance>,
    ) -> Result<(), Error> {
        let exec = self.session(runtime, instance).await?;
        self.set_phase(TrainingJobPhase::Staging, Reason::Staging, "staging dataset and recipe");
        if let Some(instance) = instance {
            stage::claim_work_dir(exec.as_ref(), &self.layout, &instance.name_any()).await?;
        }
        let input = StageInput {
            exec: exec.as_ref(),
            layout: &self.layout,
            spec: &self.job.spec,
            tool: &self.tool,
            secrets: &train::NamespaceSecrets(&self.secrets),
            local: None,
        };
        match crate::engine::stage::stage(&input).await {
            Ok(message) => {
                // A replacement machine gets its checkpoint before it counts as staged.
                self.restore(runtime, exec.as_ref()).await?;
                set_condition(
                    &mut self.status.conditions,
                    job_condition::DATA_STAGED,
                    ConditionStatus::True,
                    Reason::Staged,
                    &message,
                    None,
                    Utc::now(),
                );
                self.event(EventType::Normal, Reason::Staged, "Stage", &message).await;
                Ok(())
            }
            Err(StepError::Failed(failure)) => {
                self.finish(runtime, TrainingJobPhase::Failed, failure.reason, &failure.message).await
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Starts the trainer unless it already runs or ran (launch is idempotent).
    async fn launch(
        &mut self,
        runtime: &mut session::JobRuntime,
        instance: Option<&GpuInstance>,
        resume: bool,
    ) -> Result<(), Error> {
        let exec = self.session(runtime, instance).await?;
        let env = match resolve_env(&train::NamespaceSecrets(&self.secrets), &self.job.spec.env).await {
            Ok(env) => env,
            Err(EnvError::Read(err)) => return Err(err.into()),
            Err(unresolvable @ EnvError::Unresolvable { .. }) => {
                let message = unresolvable.to_string();
                return self
                    .finish(runtime, TrainingJobPhase::Failed, Reason::SecretNotFound, &message)
                    .await;
            }
        };
        let outcome =
            launch::launch(exec.as_ref(), &self.layout, &self.tool.launch_spec(resume, env)).await?;
        let message = match outcome {
            LaunchOutcome::Started { pid } => format!("{} started (pid {pid})", self.tool.tool),
            LaunchOutcome::AlreadyRunning { pid } => format!("{} is running (pid {pid})", self.tool.tool),
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
                let waited = (Utc::now() - from_k8s_time(created)).num_milliseconds().max(0) as f64 / 1000.0;
                self.ctrl.ctx.metrics.apply_to_training_seconds.observe(waited);
            }
            self.event(EventType::Normal, Reason::TrainingStarted, "Launch", &message).await;
        }
        Ok(())
    }

    /// Reads the trainer's progress; syncs complete checkpoints while it runs.
    async fn poll_step(
        &mut self,
        runtime: &mut session::JobRuntime,
        instance: Option<&GpuInstance>,
    ) -> Result<TrainingObservation, Error> {
        let exec = self.session(runtime, instance).await?;
        runtime.last_poll = Some(std::time::Instant::now());
        let training = self.poll(runtime, exec.as_ref(), instance).await?;
        if training == TrainingObservation::Running {
            self.sync_checkpoints(runtime, exec.as_ref()).await?;
        }
        Ok(training)
    }

    /// Stops the trainer, lists what it saved and keeps the latest checkpoint with a model card
    /// marked incomplete; what was kept, for the message (`None` without a connection).
    async fn stop_and_save(
        &mut self,
        runtime: &mut session::JobRuntime,
        instance: Option<&GpuInstance>,
        reason: Reason,
        message: &str,
    ) -> Result<Option<String>, Error> {
        let Ok(exec) = self.session(runtime, instance).await else { return Ok(None) };
        finish::stop(exec.as_ref(), &self.layout).await?;
        self.collect_checkpoints(runtime, exec.as_ref()).await?;
        let stop_reason = format!("{reason}: {message}");
        let saved = self.salvage(runtime, exec.as_ref(), &stop_reason).await?;
        Ok(Some(saved))
    }

    /// The machine was found lost during a step: its connection goes; the next step sees the loss.
    fn machine_lost(&self, runtime: &mut session::JobRuntime) {
        info!(job = %self.job.name_any(), "The machine was lost during a step; abandoning it");
        runtime.reset();
    }

    pub(super) async fn session(
        &self,
        runtime: &mut session::JobRuntime,
        instance: Option<&GpuInstance>,
    ) -> Result<Arc<crate::remote::ssh::SshExec>, Error> {
        let instance = instance.ok_or(Error::Missing("GpuInstance"))?;
        session::ensure_session(runtime, &self.secrets, instance).await
    }

    pub(super) async fn event(&self, type_: EventType, reason: Reason, action: &str, note: &str) {
        self.ctrl.ctx.event(self.job, type_, reason, action, note).await;
    }

    /// Writes the status now, before a step that cannot be undone. Releasing the machine is one:
    /// were the operator to die after the release but before the status that explains it was
    /// written, the next pass would find the job's machine going away, take it for lost and
    /// rent another, training a finished job again.
    pub(super) async fn persist(&mut self) -> Result<(), Error> {
        self.written = super::write_status(&self.jobs, self.job, &self.written, self.status.clone()).await?;
        Ok(())
    }

    pub(super) fn set_phase(&mut self, phase: TrainingJobPhase, reason: Reason, message: &str) {
        self.status.phase = phase;
        self.status.reason = Some(reason);
        self.status.message = Some(message.to_string());
    }
}
