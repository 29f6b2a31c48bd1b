//! The steps of a job, written once for both front ends: each does its work on the machine
//! through [`RemoteExec`] and records what it did in status; where results go and where the
//! machine comes from are the front end's ports.

use std::sync::Arc;

use super::super::TrainingObservation;
use super::super::env::{EnvError, resolve_env};
use super::super::finish::finish_status;
use super::super::outcome::StepError;
use super::super::progress::{StallChange, earlier_monitoring, observation, record_progress, record_stall};
use super::super::stage::{StageInput, claim_work_dir, stage};
use super::ports::{EngineError, JobEvent, JobPorts};
use crate::api::{ConditionStatus, Reason, TrainingJobPhase, job_condition, set_condition};
use crate::monitor::ParserKind;
use crate::monitor::poller::{TrainingFiles, TrainingMonitor};
use crate::remote::RemoteExec;
use crate::remote::launch::{self, LaunchOutcome};

type Result<T, P> = std::result::Result<T, <P as super::ports::StatusStore>::Error>;

/// Sets phase, reason and message together.
pub(super) fn set_phase<P: JobPorts>(ports: &mut P, phase: TrainingJobPhase, reason: Reason, message: &str) {
    let status = ports.status_mut();
    status.phase = phase;
    status.reason = Some(reason);
    status.message = Some(message.to_string());
}

/// Ends the job in `phase`: status first (written before the machine goes), then the release,
/// then the users are told.
pub(super) async fn finish<P: JobPorts>(
    ports: &mut P,
    phase: TrainingJobPhase,
    reason: Reason,
    message: &str,
) -> Result<(), P> {
    forget_machine(ports);
    let now = ports.now();
    finish_status(ports.status_mut(), phase, reason, message, now);
    tracing::info!(?phase, %reason, "Finished");
    ports.release().await?;
    ports.notify(JobEvent::Finished { phase, reason, message }).await;
    Ok(())
}

/// A step's error: a permanent failure ends the job, anything else is for the next pass.
pub(super) async fn settle<P: JobPorts>(ports: &mut P, result: Result<(), P>) -> Result<(), P> {
    match result {
        Ok(()) => Ok(()),
        Err(err) => match err.into_failure() {
            Ok(failure) => finish(ports, TrainingJobPhase::Failed, failure.reason, &failure.message).await,
            Err(err) => Err(err),
        },
    }
}

/// Forgets the connection and what was read from the machine.
pub(super) fn forget_machine<P: JobPorts>(ports: &mut P) {
    ports.disconnect();
    ports.memory().forget();
}

/// Asks for the machine of `attempt`. The status says so first (a front end that rents before
/// it writes anything else finds the attempt there after a crash); the port may take the attempt
/// back when the rent provably did not happen.
pub(super) async fn acquire_step<P: JobPorts>(ports: &mut P, attempt: i32) -> Result<(), P> {
    forget_machine(ports);
    let now = ports.now();
    let resumed = record_acquiring(ports.status_mut(), attempt, now);
    if resumed {
        ports.notify(JobEvent::Resumed("spec.suspend was cleared: renting a new machine")).await;
    }
    ports.acquire(attempt, now).await
}

/// Records that the machine of `attempt` is being asked for: a new machine has nothing on it, so
/// staging and launching start again there. True when this resumes a suspended job. Pure.
pub fn record_acquiring(
    status: &mut crate::api::TrainingJobStatus,
    attempt: i32,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    use crate::api::{find_condition, to_k8s_time};
    status.attempts = attempt;
    status.start_time.get_or_insert_with(|| to_k8s_time(now));
    for c in [job_condition::INSTANCE_READY, job_condition::DATA_STAGED, job_condition::TRAINING] {
        if find_condition(&status.conditions, c).is_some() {
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
    let resumed = status.phase == TrainingJobPhase::Suspended;
    if resumed {
        set_condition(
            &mut status.conditions,
            job_condition::SUSPENDED,
            ConditionStatus::False,
            Reason::Resumed,
            "spec.suspend was cleared",
            None,
            now,
        );
    }
    status.phase = TrainingJobPhase::Provisioning;
    status.reason = Some(Reason::Launching);
    status.message = Some(format!("renting a machine (attempt {attempt})"));
    resumed
}

/// Records that the machine is ready for work (`InstanceReady`). Pure.
pub fn record_machine_ready(
    status: &mut crate::api::TrainingJobStatus,
    message: &str,
    now: chrono::DateTime<chrono::Utc>,
) {
    set_condition(
        &mut status.conditions,
        job_condition::INSTANCE_READY,
        ConditionStatus::True,
        Reason::Ready,
        message,
        None,
        now,
    );
}

/// Staging: claim the work dir, stage dataset and recipe, restore a checkpoint.
pub(super) async fn stage_step<P: JobPorts>(ports: &mut P) -> Result<(), P> {
    let exec = ports.connect().await?;
    set_phase(ports, TrainingJobPhase::Staging, Reason::Staging, "staging dataset and recipe");
    claim_work_dir(exec.as_ref(), ports.layout(), &ports.machine_name()).await?;
    let staged = {
        let input = StageInput {
            exec: exec.as_ref(),
            layout: ports.layout(),
            spec: ports.spec(),
            tool: ports.tool(),
            secrets: ports.secrets(),
            local: ports.local_folders(),
        };
        stage(&input).await
    };
    let message = staged?;
    // A replacement machine gets its checkpoint before it counts as staged.
    ports.restore(exec.as_ref()).await?;
    let now = ports.now();
    set_condition(
        &mut ports.status_mut().conditions,
        job_condition::DATA_STAGED,
        ConditionStatus::True,
        Reason::Staged,
        &message,
        None,
        now,
    );
    ports.notify(JobEvent::Staged(&message)).await;
    Ok(())
}

/// Starts the trainer unless it already runs or ran (launch is idempotent).
pub(super) async fn launch_step<P: JobPorts>(ports: &mut P, resume: bool) -> Result<(), P> {
    let exec = ports.connect().await?;
    let env = match resolve_env(ports.secrets(), &ports.spec().env).await {
        Ok(env) => env,
        Err(EnvError::Read(err)) => return Err(StepError::Secret(err).into()),
        Err(unresolvable @ EnvError::Unresolvable { .. }) => {
            let failure =
                super::super::outcome::Failure::new(Reason::SecretNotFound, unresolvable.to_string());
            return Err(StepError::Failed(failure).into());
        }
    };
    let spec = ports.tool().launch_spec(resume, env);
    let outcome = launch::launch(exec.as_ref(), ports.layout(), &spec).await.map_err(StepError::from)?;
    let tool = ports.tool().tool.clone();
    let message = match outcome {
        LaunchOutcome::Started { pid } => format!("{tool} started (pid {pid})"),
        LaunchOutcome::AlreadyRunning { pid } => format!("{tool} is running (pid {pid})"),
        LaunchOutcome::AlreadyExited { exit_code } => format!("{tool} already ran (exit code {exit_code})"),
    };
    set_phase(ports, TrainingJobPhase::Training, Reason::Training, &message);
    let now = ports.now();
    set_condition(
        &mut ports.status_mut().conditions,
        job_condition::TRAINING,
        ConditionStatus::True,
        Reason::Training,
        &message,
        None,
        now,
    );
    if matches!(outcome, LaunchOutcome::Started { .. }) {
        ports.notify(JobEvent::TrainingStarted(&message)).await;
    }
    Ok(())
}

/// Reads the trainer's progress (the monitor continues the stall clock kept in status); syncs
/// complete checkpoints while it runs.
pub(super) async fn poll_step<P: JobPorts>(ports: &mut P) -> Result<TrainingObservation, P> {
    let exec = ports.connect().await?;
    let now = ports.now();
    let machine = ports.machine_name();
    let files = TrainingFiles::in_work_dir(ports.layout().work_dir());
    let parser = ParserKind::from(ports.tool().parser);
    let monitoring = ports.spec().monitoring.clone();
    let earlier = earlier_monitoring(ports.status());
    let memory = ports.memory();
    memory.last_poll = Some(now);
    if memory.monitor.as_ref().is_none_or(|(on, _)| *on != machine) {
        let monitor = TrainingMonitor::new(files, parser, &monitoring).resume_from(&earlier);
        memory.monitor = Some((machine, monitor));
    }
    let Some((_, monitor)) = memory.monitor.as_mut() else { return Ok(TrainingObservation::Unknown) };
    let polled = monitor.poll(exec.as_ref(), now).await.map_err(Box::new)?;
    record_progress(ports.status_mut(), &polled, now);
    match record_stall(ports.status_mut(), &polled, now) {
        Some(StallChange::Flagged) => ports.notify(JobEvent::Stalled(&polled.stall.reason)).await,
        Some(StallChange::Cleared) => ports.notify(JobEvent::Recovered(&polled.stall.reason)).await,
        None => {}
    }
    ports.notify(JobEvent::Polled(&polled)).await;
    let training = observation(&polled);
    if training == TrainingObservation::Running {
        ports.sync_checkpoints(exec.as_ref()).await?;
    }
    Ok(training)
}

/// Stops the trainer, lists what it saved and keeps the latest checkpoint with a model card
/// marked incomplete; what was kept, for the message (`None` without a connection).
pub(super) async fn stop_and_save<P: JobPorts>(
    ports: &mut P,
    reason: Reason,
    message: &str,
) -> Result<Option<String>, P> {
    let Ok(exec) = ports.connect().await else { return Ok(None) };
    stop(exec.as_ref(), ports).await?;
    ports.collect_checkpoints(exec.as_ref()).await?;
    let saved = ports.salvage(exec.as_ref(), &format!("{reason}: {message}")).await?;
    Ok(Some(saved))
}

/// The end of a successful run: the results collected and verified by the artifact store.
pub(super) async fn upload_step<P: JobPorts>(ports: &mut P) -> Result<(), P> {
    let exec = ports.connect().await?;
    set_phase(ports, TrainingJobPhase::Uploading, Reason::Uploading, "collecting results");
    ports.upload(exec.as_ref()).await
}

/// Stops the trainer of a job that ends, when the machine still answers (best effort: a
/// machine that does not has no trainer to stop that anyone pays for after the release).
pub(super) async fn stop_if_reachable<P: JobPorts>(ports: &mut P) -> Result<(), P> {
    match ports.connect().await {
        Ok(exec) => stop(exec.as_ref(), ports).await,
        Err(_) => Ok(()),
    }
}

async fn stop<P: JobPorts>(exec: &dyn RemoteExec, ports: &P) -> Result<(), P> {
    launch::stop(exec, ports.layout(), launch::STOP_GRACE).await.map_err(StepError::from)?;
    Ok(())
}

/// `spec.suspend` on a job that runs: the trainer is stopped (it saves on TERM), what it saved
/// listed, the latest checkpoint kept where a new machine finds it, the machine released.
pub(super) async fn suspend_step<P: JobPorts>(ports: &mut P, machine_ready: bool) -> Result<(), P> {
    let mut kept = None;
    if machine_ready && crate::api::is_condition_true(&ports.status().conditions, job_condition::TRAINING) {
        let exec: Arc<dyn RemoteExec> = ports.connect().await?;
        stop(exec.as_ref(), ports).await?;
        ports.collect_checkpoints(exec.as_ref()).await?;
        kept = Some(ports.keep_latest_checkpoint(exec.as_ref()).await?);
    }
    forget_machine(ports);
    let now = ports.now();
    let message = super::super::suspend::record_suspended(ports.status_mut(), kept, now);
    // The status says why the machine goes before it goes.
    ports.release().await?;
    tracing::info!("Suspended");
    ports.notify(JobEvent::Suspended(&message)).await;
    Ok(())
}

/// Raises the soft-deadline condition once, with an event.
pub(super) async fn check_soft_deadline<P: JobPorts>(ports: &mut P, now: chrono::DateTime<chrono::Utc>) {
    use super::super::progress::{SOFT_DEADLINE_CONDITION, soft_deadline_passed};
    if !soft_deadline_passed(ports.spec(), ports.status(), now)
        || crate::api::is_condition_true(&ports.status().conditions, SOFT_DEADLINE_CONDITION)
    {
        return;
    }
    let message = format!(
        "softDeadlineSeconds ({} s) passed; the job keeps running",
        ports.spec().soft_deadline_seconds.unwrap_or_default()
    );
    set_condition(
        &mut ports.status_mut().conditions,
        SOFT_DEADLINE_CONDITION,
        ConditionStatus::True,
        Reason::SoftDeadlineExceeded,
        &message,
        None,
        now,
    );
    ports.notify(JobEvent::SoftDeadline(&message)).await;
}
