//! The one driver of a job, run by both front ends: a pass observes the machine, asks
//! [`next_step`] what to do, does it with the shared [`steps`], and asks again until a step has
//! to wait; the front end then waits as [`Wait`] says (the controller requeues, `launch`
//! sleeps). Everything the driver touches outside memory goes through the [`ports`].

pub mod memory;
pub mod ports;
mod steps;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::time::Duration;

use super::suspend::{SuspendStep, suspend_step};
use super::{MachineObservation, Observations, Step, TrainingObservation, next_step};
use crate::api::TrainingJobPhase;
pub use memory::JobMemory;
pub use ports::{
    ArtifactStore, Clock, EngineError, JobEvent, JobPorts, JobSource, LostWatch, Machine, Notifier,
    StatusStore,
};
pub use steps::{record_acquiring, record_machine_ready};

/// Steps done in one pass before it yields; the engine normally waits long before this.
const MAX_STEPS_PER_PASS: usize = 12;

/// How often a step on the machine checks that the machine is still there.
const MACHINE_CHECK: Duration = Duration::from_secs(2);

/// What the front end should wait for after a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The machine is being rented or booting: look again soon (or when it changes).
    Machine,
    /// The trainer runs: poll again after this long.
    Poll(Duration),
    /// Nothing to do until the job changes (suspended).
    Change,
    /// The job is finished and its machine released.
    Finished,
    /// The pass used its step budget: run another at once.
    Again,
}

/// The name of a step in logs and in `gputrainer_reconciles_abandoned_total{step}`.
pub fn step_label(step: &Step) -> &'static str {
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
pub fn is_machine_step(label: &str) -> bool {
    matches!(label, "stage" | "launch" | "poll" | "stop" | "upload" | "finish")
}

/// One pass over one job.
pub async fn pass<P: JobPorts>(ports: &mut P) -> Result<Wait, P::Error> {
    let mut training = TrainingObservation::Unknown;
    for _ in 0..MAX_STEPS_PER_PASS {
        ports.notify(JobEvent::Entering("observe")).await;
        let now = ports.now();
        let machine = ports.observe(now).await?;
        match suspend_step(ports.spec(), ports.status()) {
            SuspendStep::Run => {}
            SuspendStep::StaySuspended => {
                // A release interrupted after the status was written is finished here.
                if ports.holds_machine() {
                    ports.release().await?;
                }
                return Ok(Wait::Change);
            }
            SuspendStep::Suspend => {
                let ready = matches!(machine, MachineObservation::Ready { .. });
                steps::suspend_step(ports, ready).await?;
                return Ok(Wait::Change);
            }
        }
        steps::check_soft_deadline(ports, now).await;
        let observed = Observations { machine: machine.clone(), training: training.clone() };
        let step = next_step(ports.spec(), ports.status(), &observed, now);
        tracing::debug!(?step, "Next step");
        ports.notify(JobEvent::Entering(step_label(&step))).await;
        // Steps on the machine are abandoned if it is lost meanwhile (the next step then sees
        // the loss): SSH to a dead machine only gives up after minutes of retrying.
        let watch = ports.lost_watch();
        match step {
            Step::Done => {
                // A release interrupted after the final status was written is finished here.
                if ports.holds_machine() {
                    ports.release().await?;
                }
                return Ok(Wait::Finished);
            }
            Step::AcquireMachine { attempt } => {
                steps::acquire_step(ports, attempt).await?;
                return Ok(Wait::Machine);
            }
            Step::WaitForMachine => return Ok(Wait::Machine),
            Step::Stage => match unless_lost(watch, steps::stage_step(ports)).await {
                Some(staged) => steps::settle(ports, staged).await?,
                None => machine_lost(ports),
            },
            Step::Launch { resume } => match unless_lost(watch, steps::launch_step(ports, resume)).await {
                Some(launched) => steps::settle(ports, launched).await?,
                None => machine_lost(ports),
            },
            Step::Poll => {
                let every = ports.poll_every();
                if let Some(left) = ports.memory().poll_due_in(every, now) {
                    return Ok(Wait::Poll(left));
                }
                match unless_lost(watch, steps::poll_step(ports)).await {
                    Some(polled) => {
                        training = polled?;
                        if training == TrainingObservation::Running {
                            return Ok(Wait::Poll(every));
                        }
                    }
                    None => machine_lost(ports),
                }
            }
            Step::StopAndFail { reason, message } => {
                let saved = unless_lost(watch, steps::stop_and_save(ports, reason, &message)).await;
                let message = match saved {
                    Some(Ok(Some(saved))) => format!("{message}; {saved}"),
                    Some(Ok(None)) => message,
                    Some(Err(err)) => return Err(err),
                    None => format!("{message}; the machine was lost before what it saved could be kept"),
                };
                steps::finish(ports, TrainingJobPhase::Failed, reason, &message).await?;
            }
            Step::Upload => match unless_lost(watch, steps::upload_step(ports)).await {
                Some(uploaded) => steps::settle(ports, uploaded).await?,
                None => machine_lost(ports),
            },
            Step::Finish { phase, reason, message } => {
                if let MachineObservation::Ready { .. } = machine
                    && let Some(stopped) = unless_lost(watch, steps::stop_if_reachable(ports)).await
                {
                    stopped?;
                }
                steps::finish(ports, phase, reason, &message).await?;
            }
        }
    }
    Ok(Wait::Again)
}

/// The machine was found lost during a step: its connection goes; the next step sees the loss.
fn machine_lost<P: JobPorts>(ports: &mut P) {
    tracing::info!("The machine was lost during a step; abandoning it");
    steps::forget_machine(ports);
}

/// Runs `step`, asking `watch` every [`MACHINE_CHECK`]; `None` (and `step` dropped) once the
/// machine is lost.
async fn unless_lost<T>(watch: Option<Box<dyn LostWatch>>, step: impl Future<Output = T>) -> Option<T> {
    let Some(watch) = watch else { return Some(step.await) };
    unless_lost_every(step, || watch.is_lost(), MACHINE_CHECK).await
}

async fn unless_lost_every<T, F, Fut>(
    step: impl Future<Output = T>,
    mut is_lost: F,
    every: Duration,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let watch = async {
        loop {
            tokio::time::sleep(every).await;
            if is_lost().await {
                return;
            }
        }
    };
    tokio::select! {
        done = step => Some(done),
        () = watch => None,
    }
}
