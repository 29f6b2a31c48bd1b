//! Whole jobs run by the driver against in-memory ports: a fake status store that keeps what a
//! crash would keep, a fake clock the test moves, fake rented machines (the trainer runs for
//! real, as the demo tool on this machine's shell), a fake artifact store. No service runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};

use super::*;
use crate::api::{
    ArtifactStatus, CheckpointStatus, ConditionStatus, JobInstanceStatus, Reason, TrainingJobSpec,
    TrainingJobStatus, is_condition_true, job_condition, set_condition,
};
use crate::engine::env::{SecretReadError, Secrets};
use crate::engine::outcome::{Failure, StepError};
use crate::engine::stage::LocalFolders;
use crate::monitor::poller::MonitorError;
use crate::remote::RemoteExec;
use crate::remote::launch::RemoteLayout;
use crate::remote::local::LocalExec;
use crate::remote::tool::{JobContext, RenderedTool, ToolRegistry};

#[derive(Debug, thiserror::Error)]
enum FakeError {
    /// The process died here: nothing after the last persisted status is kept.
    #[error("crashed")]
    Crash,
    #[error(transparent)]
    Step(#[from] StepError),
    #[error("monitor: {0}")]
    Monitor(#[from] Box<MonitorError>),
}

impl EngineError for FakeError {
    fn into_failure(self) -> Result<Failure, Self> {
        match self {
            FakeError::Step(StepError::Failed(failure)) => Ok(failure),
            other => Err(other),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum MachineState {
    Booting(u32),
    Ready,
    Lost,
    Released,
}

#[derive(Clone, Debug)]
struct Rented {
    name: String,
    state: MachineState,
    launched_at: DateTime<Utc>,
    trainings_started: u32,
}

/// What outlives a crash: the machines (and what runs on them), the stored checkpoints.
#[derive(Default)]
struct World {
    machines: Vec<Rented>,
    /// The most machines held at once.
    most_held: usize,
    salvaged: Vec<String>,
    kept: u32,
    restored: u32,
}

impl World {
    fn held(&self) -> usize {
        self.machines.iter().filter(|m| !matches!(m.state, MachineState::Released)).count()
    }
}

struct NoSecrets;

#[async_trait]
impl Secrets for NoSecrets {
    async fn secret(
        &self,
        _: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, Vec<u8>>>, SecretReadError> {
        Ok(None)
    }
}

struct FakeJob {
    spec: TrainingJobSpec,
    layout: RemoteLayout,
    tool: RenderedTool,
    root: tempfile::TempDir,
    archive: PathBuf,
    status: TrainingJobStatus,
    /// What the status store holds (what a crash keeps).
    persisted: TrainingJobStatus,
    clock: DateTime<Utc>,
    world: Arc<Mutex<World>>,
    memory: JobMemory,
    connected: bool,
    price_per_hour: f64,
    events: Vec<String>,
    /// Port calls so far, and the one at which the process dies.
    calls: usize,
    crash_at: Option<usize>,
    /// The step being done, and the port calls so far as `step/call`.
    step: &'static str,
    trace: Vec<String>,
    /// Loses the machine once the trainer reports this step.
    lose_at_step: Option<u64>,
}

fn job(params: serde_json::Value, extra: serde_json::Value) -> FakeJob {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("data")).unwrap();
    std::fs::write(root.path().join("data/a.txt"), "hello").unwrap();
    let mut spec = serde_json::json!({
        "tool": "demo@1",
        "dataset": {"local": {"path": "data"}},
        "params": params,
        "monitoring": {"pollIntervalSeconds": 5, "noProgressTimeoutSeconds": 60},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let spec: TrainingJobSpec = serde_json::from_value(spec).unwrap();
    let registry = ToolRegistry::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tools")).unwrap();
    let tool = crate::engine::validate::validate(&spec, &registry, crate::engine::validate::FrontEnd::Launch)
        .unwrap();
    let layout = RemoteLayout::new(&root.path().join("machine").to_string_lossy(), "uid-1").unwrap();
    let context = JobContext { name: "job".into(), uid: "uid-1".into(), layout: layout.clone() };
    let tool = tool.render(&spec.params, &context).unwrap();
    FakeJob {
        spec,
        layout,
        tool,
        archive: root.path().join("dataset.tar"),
        root,
        status: TrainingJobStatus::default(),
        persisted: TrainingJobStatus::default(),
        clock: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
        world: Arc::default(),
        memory: JobMemory::default(),
        connected: false,
        price_per_hour: 0.5,
        events: Vec::new(),
        calls: 0,
        crash_at: None,
        step: "",
        trace: Vec::new(),
        lose_at_step: None,
    }
}

impl FakeJob {
    /// One port call; the process dies at the chosen one.
    fn call(&mut self, what: &'static str) -> Result<(), FakeError> {
        self.calls += 1;
        self.trace.push(format!("{}/{what}", self.step));
        if self.crash_at == Some(self.calls) { Err(FakeError::Crash) } else { Ok(()) }
    }

    fn machine_name(&self) -> Option<String> {
        self.status.instance.as_ref().map(|i| i.name.clone())
    }

    fn with_machine<T>(&self, f: impl FnOnce(&mut Rented) -> T) -> Option<T> {
        let name = self.machine_name()?;
        let mut world = self.world.lock().unwrap();
        world.machines.iter_mut().find(|m| m.name == name).map(f)
    }

    fn output_dir(&self) -> PathBuf {
        PathBuf::from(self.layout.output_dir())
    }

    /// Checkpoint files the trainer left, oldest first.
    fn checkpoints_on_machine(&self) -> Vec<CheckpointStatus> {
        let mut found: Vec<CheckpointStatus> = std::fs::read_dir(self.output_dir())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step = name.strip_suffix(".safetensors")?.rsplit_once('_')?.1.parse().ok()?;
                Some(CheckpointStatus { name, step, size_bytes: None, uri: None })
            })
            .collect();
        found.sort_by_key(|c| c.step);
        found
    }

    /// Waits (in real time, up to 10 s) for the trainer's first step or its end, so that the
    /// fake clock does not run past a trainer still starting.
    async fn trainer_started(&self) {
        for _ in 0..1000 {
            let log = std::fs::read_to_string(self.layout.log()).unwrap_or_default();
            if log.contains("it/s")
                || log.contains("s/it")
                || Path::new(&self.layout.exit_code_file()).exists()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The machine dies: its trainer goes with it.
    fn lose_machine(&mut self) {
        let pid = std::fs::read_to_string(self.layout.pid_file()).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        self.with_machine(|m| m.state = MachineState::Lost);
        // The next machine has a disk of its own.
        let _ = std::fs::remove_dir_all(self.root.path().join("machine"));
    }
}

impl JobSource for FakeJob {
    fn spec(&self) -> &TrainingJobSpec {
        &self.spec
    }
    fn layout(&self) -> &RemoteLayout {
        &self.layout
    }
    fn tool(&self) -> &RenderedTool {
        &self.tool
    }
    fn local_folders(&self) -> Option<LocalFolders<'_>> {
        Some(LocalFolders { job_dir: self.root.path(), archive: &self.archive })
    }
}

impl Clock for FakeJob {
    fn now(&self) -> DateTime<Utc> {
        self.clock
    }
}

#[async_trait]
impl StatusStore for FakeJob {
    type Error = FakeError;
    fn status(&self) -> &TrainingJobStatus {
        &self.status
    }
    fn status_mut(&mut self) -> &mut TrainingJobStatus {
        &mut self.status
    }
    async fn persist(&mut self) -> Result<(), FakeError> {
        self.call("persist")?;
        self.persisted = self.status.clone();
        Ok(())
    }
}

struct FakeWatch {
    world: Arc<Mutex<World>>,
    name: String,
}

#[async_trait]
impl LostWatch for FakeWatch {
    async fn is_lost(&self) -> bool {
        let world = self.world.lock().unwrap();
        world
            .machines
            .iter()
            .find(|m| m.name == self.name)
            .is_none_or(|m| matches!(m.state, MachineState::Lost | MachineState::Released))
    }
}

#[async_trait]
impl Machine for FakeJob {
    async fn observe(&mut self, now: DateTime<Utc>) -> Result<MachineObservation, FakeError> {
        self.call("observe")?;
        let Some(machine) = self.with_machine(|m| {
            if let MachineState::Booting(left) = m.state {
                m.state = if left == 0 { MachineState::Ready } else { MachineState::Booting(left - 1) };
            }
            m.clone()
        }) else {
            return Ok(MachineObservation::None);
        };
        let eta = self.status.progress.as_ref().and_then(|p| p.eta_seconds);
        if machine.state != MachineState::Released {
            self.status.cost = Some(crate::engine::cost::job_cost(
                self.price_per_hour,
                Some(machine.launched_at),
                eta,
                0.0,
                self.status.cost.as_ref(),
                now,
            ));
        }
        Ok(match machine.state {
            MachineState::Booting(_) => MachineObservation::Starting,
            MachineState::Ready => MachineObservation::Ready { price_per_hour: self.price_per_hour },
            MachineState::Lost => MachineObservation::Failed {
                reason: Reason::InstanceLost,
                message: "the host vanished".into(),
            },
            MachineState::Released => MachineObservation::None,
        })
    }

    async fn acquire(&mut self, attempt: i32, now: DateTime<Utc>) -> Result<(), FakeError> {
        self.call("acquire")?;
        let name = format!("job-{attempt}");
        let mut world = self.world.lock().unwrap();
        for m in world.machines.iter_mut().filter(|m| m.name != name) {
            m.state = MachineState::Released;
        }
        // The name is the attempt's: a rent repeated after a crash finds its machine.
        if !world.machines.iter().any(|m| m.name == name) {
            world.machines.push(Rented {
                name: name.clone(),
                state: MachineState::Booting(1),
                launched_at: now,
                trainings_started: 0,
            });
        }
        world.most_held = world.most_held.max(world.held());
        drop(world);
        self.status.instance = Some(JobInstanceStatus { name, ..Default::default() });
        Ok(())
    }

    async fn release(&mut self) -> Result<(), FakeError> {
        // The status says why the machine goes before it goes (as every front end's does).
        self.persist().await?;
        self.call("release")?;
        self.with_machine(|m| m.state = MachineState::Released);
        Ok(())
    }

    fn holds_machine(&self) -> bool {
        self.with_machine(|m| m.state != MachineState::Released).unwrap_or(false)
    }

    async fn connect(&mut self) -> Result<Arc<dyn RemoteExec>, FakeError> {
        self.call("connect")?;
        self.connected = true;
        let exec = LocalExec::new(self.root.path().join("machine")).map_err(StepError::from)?;
        Ok(Arc::new(exec))
    }

    fn disconnect(&mut self) {
        self.connected = false;
    }

    fn machine_name(&self) -> String {
        FakeJob::machine_name(self).unwrap_or_default()
    }

    fn lost_watch(&self) -> Option<Box<dyn LostWatch>> {
        Some(Box::new(FakeWatch { world: self.world.clone(), name: FakeJob::machine_name(self)? }))
    }

    fn memory(&mut self) -> &mut JobMemory {
        &mut self.memory
    }
}

#[async_trait]
impl Notifier for FakeJob {
    async fn notify(&mut self, event: JobEvent<'_>) {
        match event {
            JobEvent::Entering(step) => self.step = step,
            JobEvent::Polled(polled) => {
                if let (Some(at), Some(step)) = (self.lose_at_step, polled.progress.step)
                    && step >= at
                {
                    self.lose_at_step = None;
                    self.lose_machine();
                }
            }
            JobEvent::TrainingStarted(message) => {
                self.with_machine(|m| m.trainings_started += 1);
                self.events.push(format!("TrainingStarted: {message}"));
            }
            JobEvent::Finished { phase, reason, message } => {
                self.events.push(format!("Finished {phase:?} {reason}: {message}"))
            }
            other => self.events.push(format!("{other:?}")),
        }
    }
}

#[async_trait]
impl ArtifactStore for FakeJob {
    async fn restore(&mut self, _exec: &dyn RemoteExec) -> Result<(), FakeError> {
        self.call("restore")?;
        self.status.resumed_from = None;
        if self.status.attempts > 1 {
            self.world.lock().unwrap().restored += 1;
            self.status.resumed_from = self.status.checkpoints.iter().max_by_key(|c| c.step).cloned();
        }
        Ok(())
    }
    async fn sync_checkpoints(&mut self, _exec: &dyn RemoteExec) -> Result<(), FakeError> {
        self.call("sync_checkpoints")?;
        for mut found in self.checkpoints_on_machine() {
            if !self.status.checkpoints.iter().any(|c| c.name == found.name) {
                found.uri = Some(format!("s3://store/{}", found.name));
                self.status.checkpoints.push(found);
            }
        }
        Ok(())
    }
    async fn collect_checkpoints(&mut self, exec: &dyn RemoteExec) -> Result<(), FakeError> {
        self.sync_checkpoints(exec).await
    }
    async fn keep_latest_checkpoint(&mut self, _exec: &dyn RemoteExec) -> Result<String, FakeError> {
        self.call("keep_latest_checkpoint")?;
        self.world.lock().unwrap().kept += 1;
        Ok("the latest checkpoint is kept".into())
    }
    async fn salvage(&mut self, _exec: &dyn RemoteExec, stop_reason: &str) -> Result<String, FakeError> {
        self.call("salvage")?;
        self.world.lock().unwrap().salvaged.push(stop_reason.to_string());
        Ok(match self.status.checkpoints.iter().max_by_key(|c| c.step) {
            Some(latest) => format!("latest checkpoint {} saved", latest.name),
            None => "there was no checkpoint to save".into(),
        })
    }
    async fn upload(&mut self, _exec: &dyn RemoteExec) -> Result<(), FakeError> {
        self.call("upload")?;
        let model = PathBuf::from(self.layout.join(&self.tool.outputs.final_model));
        let Ok(meta) = std::fs::metadata(&model) else {
            return Err(StepError::Failed(Failure::new(Reason::UploadFailed, "no model")).into());
        };
        self.status.artifacts = vec![ArtifactStatus {
            name: "model".into(),
            uri: format!("s3://store/{}", model.display()),
            size_bytes: meta.len(),
            sha256: None,
        }];
        set_condition(
            &mut self.status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::True,
            Reason::Uploaded,
            "uploaded",
            None,
            self.clock,
        );
        Ok(())
    }
}

impl JobPorts for FakeJob {
    fn secrets(&self) -> &dyn Secrets {
        &NoSecrets
    }
}

/// How a run of the harness ended.
#[derive(Debug, PartialEq)]
enum Ended {
    Finished,
    Suspended,
}

/// Runs passes until the job finishes or waits for a change, moving the clock as the driver
/// asks. A crash loses what was not persisted (the store keeps the status written at the end
/// of each pass, as the controller does, and at `persist`) and the driver's memory.
async fn run(job: &mut FakeJob) -> Ended {
    for _ in 0..3000 {
        let result = pass(job).await;
        if let Err(FakeError::Crash) = result {
            job.status = job.persisted.clone();
            job.memory = JobMemory::default();
            job.connected = false;
            job.crash_at = None;
            continue;
        }
        // Whatever a pass did is written at its end, an error or not.
        job.persisted = job.status.clone();
        match result {
            Ok(Wait::Finished) => return Ended::Finished,
            Ok(Wait::Change) => return Ended::Suspended,
            Ok(Wait::Poll(after)) => {
                // The trainer runs in real time: time moves on once it has started.
                job.trainer_started().await;
                job.clock += chrono::Duration::from_std(after).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(Wait::Machine) => job.clock += chrono::Duration::seconds(1),
            Ok(Wait::Again) => {}
            Err(err) => panic!("pass failed: {err}"),
        }
    }
    panic!("the job did not end: {:?}", job.status);
}

fn quick() -> serde_json::Value {
    serde_json::json!({"steps": 6, "secondsPerStep": 0.0, "saveEvery": 2})
}

fn phase_reason(job: &FakeJob) -> (TrainingJobPhase, Option<Reason>) {
    (job.status.phase, job.status.reason)
}

fn trainings(job: &FakeJob) -> Vec<u32> {
    job.world.lock().unwrap().machines.iter().map(|m| m.trainings_started).collect()
}

fn assert_nothing_held(job: &FakeJob) {
    let world = job.world.lock().unwrap();
    assert_eq!(world.held(), 0, "a machine is still held: {:?}", world.machines);
    assert!(world.most_held <= 1, "two machines were held at once");
}

#[tokio::test]
async fn a_job_trains_uploads_and_gives_the_machine_back() {
    let mut job = job(quick(), serde_json::json!({}));
    assert_eq!(run(&mut job).await, Ended::Finished);
    assert_eq!(phase_reason(&job), (TrainingJobPhase::Succeeded, Some(Reason::Succeeded)));
    assert_eq!(job.status.artifacts.len(), 1);
    assert_eq!(job.status.progress.as_ref().map(|p| p.step), Some(6));
    assert_eq!(trainings(&job), [1]);
    assert!(job.status.completion_time.is_some());
    assert!(job.events.iter().any(|e| e.starts_with("Staged")), "{:?}", job.events);
    assert_nothing_held(&job);
    assert_eq!(job.persisted, job.status, "the final status is written");
}

#[tokio::test]
async fn a_stalled_trainer_is_stopped_and_its_latest_checkpoint_salvaged() {
    let params = serde_json::json!({"steps": 1000, "secondsPerStep": 0.0, "saveEvery": 2, "stallAtStep": 4});
    let mut job = job(params, serde_json::json!({}));
    assert_eq!(run(&mut job).await, Ended::Finished);
    assert_eq!(phase_reason(&job), (TrainingJobPhase::Failed, Some(Reason::Stalled)));
    let salvaged = job.world.lock().unwrap().salvaged.clone();
    assert_eq!(salvaged.len(), 1);
    assert!(salvaged[0].starts_with("Stalled: "), "{salvaged:?}");
    let message = job.status.message.clone().unwrap_or_default();
    assert!(message.starts_with("no progress for 1 min"), "{message}");
    assert!(message.ends_with("latest checkpoint demo_000000002.safetensors saved"), "{message}");
    assert!(is_condition_true(&job.status.conditions, job_condition::STALLED));
    assert_nothing_held(&job);
}

#[tokio::test]
async fn a_job_past_its_deadline_is_stopped_and_salvaged() {
    let params = serde_json::json!({"steps": 100000, "secondsPerStep": 0.01, "saveEvery": 5});
    let mut job = job(params, serde_json::json!({"activeDeadlineSeconds": 30}));
    assert_eq!(run(&mut job).await, Ended::Finished);
    assert_eq!(phase_reason(&job), (TrainingJobPhase::Failed, Some(Reason::DeadlineExceeded)));
    let salvaged = job.world.lock().unwrap().salvaged.clone();
    assert!(salvaged.len() == 1 && salvaged[0].starts_with("DeadlineExceeded: "), "{salvaged:?}");
    assert_nothing_held(&job);
}

#[tokio::test]
async fn a_job_stops_before_its_next_poll_would_cross_the_budget() {
    let params = serde_json::json!({"steps": 100000, "secondsPerStep": 0.01, "saveEvery": 5});
    let mut job = job(params, serde_json::json!({"budget": {"maxTotalCost": 1.0}}));
    job.price_per_hour = 72.0; // $0.10 a poll interval
    assert_eq!(run(&mut job).await, Ended::Finished);
    assert_eq!(phase_reason(&job), (TrainingJobPhase::Failed, Some(Reason::BudgetExceeded)));
    let accrued = job.status.cost.as_ref().map(|c| c.accrued).unwrap_or_default();
    assert!(accrued <= 1.0, "spent ${accrued} of a $1 budget");
    assert_eq!(job.world.lock().unwrap().salvaged.len(), 1);
    assert_nothing_held(&job);
}

#[tokio::test]
async fn a_lost_machine_is_replaced_and_training_resumes_from_the_latest_checkpoint() {
    let params = serde_json::json!({"steps": 40, "secondsPerStep": 0.02, "saveEvery": 4});
    let mut job = job(params, serde_json::json!({"backoffLimit": 1}));
    job.lose_at_step = Some(8);
    assert_eq!(run(&mut job).await, Ended::Finished);
    assert_eq!(phase_reason(&job), (TrainingJobPhase::Succeeded, Some(Reason::Succeeded)));
    assert_eq!(job.status.attempts, 2);
    assert_eq!(trainings(&job), [1, 1], "one training on each machine");
    assert!(job.status.resumed_from.is_some(), "resumed from a checkpoint");
    assert_eq!(job.world.lock().unwrap().restored, 1);
    assert_nothing_held(&job);
}

#[tokio::test]
async fn a_suspended_job_gives_its_machine_back_and_resumes_on_a_new_one() {
    let params = serde_json::json!({"steps": 40, "secondsPerStep": 0.02, "saveEvery": 4});
    let mut job = job(params, serde_json::json!({}));
    // Run until the trainer runs, then suspend.
    while job.status.phase != TrainingJobPhase::Training {
        let wait = pass(&mut job).await.unwrap();
        if wait == Wait::Machine {
            job.clock += chrono::Duration::seconds(1);
        }
    }
    job.spec.suspend = true;
    assert_eq!(run(&mut job).await, Ended::Suspended);
    assert_eq!(phase_reason(&job), (TrainingJobPhase::Suspended, Some(Reason::Suspended)));
    assert!(is_condition_true(&job.status.conditions, job_condition::SUSPENDED));
    assert_eq!(job.world.lock().unwrap().kept, 1);
    assert_nothing_held(&job);
    // Staying suspended does nothing.
    assert_eq!(pass(&mut job).await.unwrap(), Wait::Change);
    job.spec.suspend = false;
    assert_eq!(run(&mut job).await, Ended::Finished);
    assert_eq!(phase_reason(&job), (TrainingJobPhase::Succeeded, Some(Reason::Succeeded)));
    assert_eq!(job.status.attempts, 2);
    assert!(!is_condition_true(&job.status.conditions, job_condition::SUSPENDED));
    assert!(job.events.iter().any(|e| e.starts_with("Resumed")), "{:?}", job.events);
    assert_nothing_held(&job);
}

/// The process dies at every port call of a job in turn: the next process continues from the
/// status it finds, and the job still succeeds with one training per machine, one machine at a
/// time, and nothing left held.
#[tokio::test]
async fn a_crash_at_any_step_neither_trains_twice_nor_leaves_a_machine() {
    let mut clean = job(quick(), serde_json::json!({}));
    run(&mut clean).await;
    // The first call of each kind in each step (`stage/connect`, `finish/release`, ...).
    let mut seen = std::collections::HashSet::new();
    let crash_points: Vec<(usize, String)> =
        (1..).zip(clean.trace.iter().cloned()).filter(|(_, what)| seen.insert(what.clone())).collect();
    for step in
        ["observe/observe", "acquire/acquire", "stage/connect", "stage/restore", "poll/sync_checkpoints"]
    {
        assert!(crash_points.iter().any(|(_, what)| what == step), "no {step} in {crash_points:?}");
    }
    for step in ["upload/upload", "finish/persist", "finish/release"] {
        assert!(crash_points.iter().any(|(_, what)| what == step), "no {step} in {crash_points:?}");
    }
    let runs = crash_points.iter().map(|(crash_at, what)| async move {
        let mut job = job(quick(), serde_json::json!({}));
        job.crash_at = Some(*crash_at);
        assert_eq!(run(&mut job).await, Ended::Finished);
        assert_eq!(
            phase_reason(&job),
            (TrainingJobPhase::Succeeded, Some(Reason::Succeeded)),
            "crash at {what}: {:?}",
            job.status
        );
        assert!(trainings(&job).iter().all(|n| *n <= 1), "crash at {what}: trained twice");
        assert_nothing_held(&job);
    });
    futures::future::join_all(runs).await;
}

#[tokio::test]
async fn a_step_on_a_machine_that_is_lost_meanwhile_is_abandoned() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let every = Duration::from_millis(10);
    // A step that would hang (SSH reconnecting to a dead machine) ends at the third look.
    let looks = AtomicU32::new(0);
    let hanging = std::future::pending::<()>();
    let is_lost = || async { looks.fetch_add(1, Ordering::SeqCst) >= 2 };
    assert_eq!(unless_lost_every(hanging, is_lost, every).await, None);
    assert_eq!(looks.load(Ordering::SeqCst), 3);
    // A step that ends while the machine is fine gives its result.
    let quick = async {
        tokio::time::sleep(Duration::from_millis(35)).await;
        7
    };
    assert_eq!(unless_lost_every(quick, || async { false }, every).await, Some(7));
}
