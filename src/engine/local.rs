//! The driver of the engine behind `gpu-trainer launch`: no Kubernetes, the whole state in one
//! JSON file next to the job file, so Ctrl-C and a second `launch` continue where the first
//! stopped (the trainer runs in the background and is not interrupted), and `launch --cancel`
//! stops it. The machine is this one (`--provider local`, work dirs under the state dir) or an
//! existing one over SSH (`--provider ssh`, host key pinned on first contact, the model
//! downloaded and verified at the end).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::decide::{MachineObservation, Observations, Step, TrainingObservation, next_step};
use crate::api::{
    ArtifactStatus, CheckpointStatus, ConditionStatus, CostStatus, JobInstanceStatus, ProgressStatus, Reason,
    TrainingJob, TrainingJobPhase, TrainingJobStatus, job_condition, set_condition, to_k8s_time,
};
use crate::monitor::poller::{Outcome, TrainingFiles, TrainingMonitor, TrainingStatus};
use crate::monitor::{ParserKind, stall::Recommendation};
use crate::remote::dataset;
use crate::remote::launch::{self, RemoteLayout};
use crate::remote::local::LocalExec;
use crate::remote::ssh::{SshExec, SshKey, SshOptions, SshTarget};
use crate::remote::tool::{JobContext, Parser, RenderedTool, ToolRegistry};
use crate::remote::{RemoteExec, sha256_file};

/// Errors of a local run, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{field}: {message}")]
    InvalidJob { field: &'static str, message: String },
    #[error("failed to read or write the state file {path}")]
    State {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Tool(#[from] crate::remote::tool::ToolError),
    #[error(transparent)]
    Dataset(#[from] crate::remote::dataset::DatasetError),
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    // Boxed: the monitor's error is large and every `Result` here would carry its size.
    #[error(transparent)]
    Monitor(Box<crate::monitor::poller::MonitorError>),
}

impl From<crate::monitor::poller::MonitorError> for LocalError {
    fn from(err: crate::monitor::poller::MonitorError) -> Self {
        LocalError::Monitor(Box::new(err))
    }
}

/// What is kept between invocations.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalState {
    /// Stands in for the Kubernetes UID: names the work dir.
    pub uid: String,
    pub status: TrainingJobStatus,
    /// SSH host key seen on first contact (`--provider ssh`); later connections must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
}

/// Where a launched job runs.
#[derive(Clone, Debug)]
pub enum MachineSpec {
    /// This machine; work dirs under the state dir.
    Local,
    /// An existing machine over SSH; work dirs under `remote_base` there.
    Ssh { target: SshTarget, key: SshKey, remote_base: String },
}

/// One job run on this machine.
pub struct LocalRun {
    job: TrainingJob,
    job_dir: PathBuf,
    state_path: PathBuf,
    pub state: LocalState,
    machine: MachineSpec,
    state_dir: PathBuf,
    exec: Option<Arc<dyn RemoteExec>>,
    layout: RemoteLayout,
    tool: RenderedTool,
    parser: ParserKind,
    monitor: Option<TrainingMonitor>,
    last_training: TrainingObservation,
}

/// Called after every poll, for progress display.
pub type Observer<'a> = dyn FnMut(&TrainingJobStatus, Option<&TrainingStatus>) + Send + 'a;

impl LocalRun {
    /// Prepares a run: validates the tool and parameters (nothing runs for an invalid job) and
    /// loads earlier state. `state_dir` holds the state file and the work dirs.
    pub fn prepare(
        job: TrainingJob,
        job_file: &Path,
        state_dir: &Path,
        tools_dir: &Path,
        machine: MachineSpec,
    ) -> Result<Self, LocalError> {
        let name = job.metadata.name.clone().ok_or(LocalError::InvalidJob {
            field: "metadata.name",
            message: "the job needs a name".into(),
        })?;
        if job.spec.dataset.local.is_none() {
            return Err(LocalError::InvalidJob {
                field: "spec.dataset",
                message: "`gpu-trainer launch` needs `dataset.local.path` (a folder next to the job file)"
                    .into(),
            });
        }
        let job_dir = job_file.parent().map(Path::to_path_buf).unwrap_or_default();
        let state_path = state_dir.join(format!("{name}.json"));
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| LocalError::State { path: state_path.clone(), source: Box::new(e) })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LocalState {
                uid: format!("{name}-{:08x}", rand::random::<u32>()),
                status: TrainingJobStatus::default(),
                host_key: None,
            },
            Err(e) => return Err(LocalError::State { path: state_path.clone(), source: Box::new(e) }),
        };
        let registry = ToolRegistry::load(tools_dir)?;
        let tool = registry.get(&job.spec.tool)?;
        let base = match &machine {
            MachineSpec::Local => state_dir.join("work").to_string_lossy().into_owned(),
            MachineSpec::Ssh { remote_base, .. } => remote_base.clone(),
        };
        let layout = RemoteLayout::new(&base, &state.uid)?;
        let rendered = tool.render(
            &job.spec.params,
            &JobContext { name: name.clone(), uid: state.uid.clone(), layout: layout.clone() },
        )?;
        let parser = match rendered.parser {
            Parser::Tqdm => ParserKind::Tqdm,
            Parser::AiToolkit => ParserKind::AiToolkit,
            Parser::Kohya => ParserKind::Kohya,
            Parser::Diffusers => ParserKind::Diffusers,
        };
        Ok(Self {
            job,
            job_dir,
            state_path,
            state,
            machine,
            state_dir: state_dir.to_path_buf(),
            exec: None,
            layout,
            tool: rendered,
            parser,
            monitor: None,
            last_training: TrainingObservation::Unknown,
        })
    }

    /// The rendered tool (for `--dry-run`).
    pub fn tool(&self) -> &RenderedTool {
        &self.tool
    }

    pub fn layout(&self) -> &RemoteLayout {
        &self.layout
    }

    /// Where the final model is (or will be).
    pub fn final_model_path(&self) -> String {
        self.layout.join(&self.tool.outputs.final_model)
    }

    /// The machine's `RemoteExec`, connected on first use (and the host key recorded).
    async fn connection(&mut self) -> Result<Arc<dyn RemoteExec>, LocalError> {
        if let Some(exec) = &self.exec {
            return Ok(exec.clone());
        }
        let exec: Arc<dyn RemoteExec> = match &self.machine {
            MachineSpec::Local => Arc::new(LocalExec::new(self.state_dir.join("work"))?),
            MachineSpec::Ssh { target, key, .. } => {
                let ssh = SshExec::connect(
                    target.clone(),
                    key.clone(),
                    self.state.host_key.clone(),
                    SshOptions::default(),
                )
                .await?;
                self.state.host_key = ssh.host_key_fingerprint();
                Arc::new(ssh)
            }
        };
        self.exec = Some(exec.clone());
        Ok(exec)
    }

    fn machine_description(&self) -> String {
        match &self.machine {
            MachineSpec::Local => "this machine".into(),
            MachineSpec::Ssh { target, .. } => target.to_string(),
        }
    }

    fn save(&self) -> Result<(), LocalError> {
        let err = |e: Box<dyn std::error::Error + Send + Sync>| LocalError::State {
            path: self.state_path.clone(),
            source: e,
        };
        if let Some(dir) = self.state_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(Box::new(e)))?;
        }
        let json = serde_json::to_vec_pretty(&self.state).map_err(|e| err(Box::new(e)))?;
        let tmp = self.state_path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(|e| err(Box::new(e)))?;
        std::fs::rename(&tmp, &self.state_path).map_err(|e| err(Box::new(e)))
    }

    fn observations(&self) -> Observations {
        let machine = if self.state.status.attempts > 0 && !self.state.status.phase.is_finished() {
            MachineObservation::Ready { price_per_hour: 0.0 }
        } else {
            MachineObservation::None
        };
        Observations { machine, training: self.last_training.clone() }
    }

    /// Runs the job to the end (or until `interrupted` resolves), calling `observer` after every
    /// poll. Returns the final status.
    pub async fn run(
        &mut self,
        poll_every: Duration,
        observer: &mut Observer<'_>,
    ) -> Result<TrainingJobStatus, LocalError> {
        loop {
            let now = Utc::now();
            let step = next_step(&self.job.spec, &self.state.status, &self.observations(), now);
            match step {
                Step::Done => return Ok(self.state.status.clone()),
                Step::AcquireMachine { attempt } => self.acquire(attempt, now),
                Step::WaitForMachine => tokio::time::sleep(poll_every).await,
                Step::Stage => self.stage(now).await?,
                Step::Launch { resume } => self.launch(resume, now).await?,
                Step::Poll => {
                    self.poll(now, observer).await?;
                    if matches!(self.last_training, TrainingObservation::Running) {
                        tokio::time::sleep(poll_every).await;
                    }
                }
                Step::StopAndFail { reason, message } => {
                    let exec = self.connection().await?;
                    launch::stop(&*exec, &self.layout, Duration::from_secs(30)).await?;
                    self.finish(TrainingJobPhase::Failed, reason, &message, Utc::now());
                }
                Step::Upload => self.collect(now).await?,
                Step::Finish { phase, reason, message } => self.finish(phase, reason, &message, now),
            }
            self.save()?;
        }
    }

    /// Stops a running trainer and marks the job failed (`launch --cancel`).
    pub async fn cancel(&mut self) -> Result<(), LocalError> {
        let exec = self.connection().await?;
        launch::stop(&*exec, &self.layout, Duration::from_secs(30)).await?;
        if !self.state.status.phase.is_finished() {
            self.finish(
                TrainingJobPhase::Failed,
                Reason::Deleted,
                "cancelled with `launch --cancel`",
                Utc::now(),
            );
        }
        self.save()
    }

    fn acquire(&mut self, attempt: i32, now: DateTime<Utc>) {
        let machine = self.machine_description();
        let status = &mut self.state.status;
        status.attempts = attempt;
        status.phase = TrainingJobPhase::Provisioning;
        status.start_time.get_or_insert_with(|| to_k8s_time(now));
        status.instance = Some(JobInstanceStatus {
            name: "launch".into(),
            provider_id: None,
            gpu: Some(machine.clone()),
            price_per_hour: Some(0.0),
        });
        status.cost =
            Some(CostStatus { price_per_hour: Some(0.0), accrued: 0.0, estimated_total: Some(0.0) });
        set_condition(
            &mut status.conditions,
            job_condition::INSTANCE_READY,
            ConditionStatus::True,
            Reason::Ready,
            format!("running on {machine}"),
            None,
            now,
        );
        status.reason = Some(Reason::Ready);
        status.message = Some(format!("running on {machine}"));
    }

    async fn stage(&mut self, now: DateTime<Utc>) -> Result<(), LocalError> {
        self.state.status.phase = TrainingJobPhase::Staging;
        let folder =
            self.job.spec.dataset.local.as_ref().map(|l| self.job_dir.join(&l.path)).unwrap_or_default();
        if !folder.is_dir() {
            return Err(LocalError::InvalidJob {
                field: "spec.dataset.local.path",
                message: format!("{} is not a folder", folder.display()),
            });
        }
        let archive = self.state_path.with_extension("dataset.tar");
        let packed = dataset::pack(&folder, &archive)?;
        let exec = self.connection().await?;
        let staged = dataset::stage_archive(&*exec, &self.layout, &archive, &packed.sha256).await?;
        self.tool.install_files(&*exec, &self.layout).await?;
        self.tool.bootstrap(&*exec, &self.layout, &[], Duration::from_secs(1800)).await?;
        let message =
            format!("dataset {} ({} files, sha256 {})", folder.display(), packed.files, &staged.sha256[..12]);
        set_condition(
            &mut self.state.status.conditions,
            job_condition::DATA_STAGED,
            ConditionStatus::True,
            Reason::Staged,
            message,
            None,
            now,
        );
        Ok(())
    }

    async fn launch(&mut self, resume: bool, now: DateTime<Utc>) -> Result<(), LocalError> {
        let env: Vec<(String, String)> =
            self.job.spec.env.iter().filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v))).collect();
        let exec = self.connection().await?;
        launch::launch(&*exec, &self.layout, &self.tool.launch_spec(resume, env)).await?;
        let status = &mut self.state.status;
        status.phase = TrainingJobPhase::Training;
        status.reason = Some(Reason::Training);
        status.message = Some(format!("training with {}", self.tool.tool));
        set_condition(
            &mut status.conditions,
            job_condition::TRAINING,
            ConditionStatus::True,
            Reason::Training,
            "the trainer runs",
            None,
            now,
        );
        Ok(())
    }

    async fn poll(&mut self, now: DateTime<Utc>, observer: &mut Observer<'_>) -> Result<(), LocalError> {
        let exec = self.connection().await?;
        if self.monitor.is_none() {
            self.monitor = Some(TrainingMonitor::new(
                TrainingFiles::in_work_dir(self.layout.work_dir()),
                self.parser,
                &self.job.spec.monitoring,
            ));
        }
        let Some(monitor) = self.monitor.as_mut() else { return Ok(()) };
        let polled = monitor.poll(&*exec, now).await?;
        let snapshot = &polled.progress;
        let mut progress = self.state.status.progress.clone().unwrap_or_default();
        if let Some(step) = snapshot.step {
            if progress.step != step || progress.last_update_time.is_none() {
                progress.last_update_time = Some(to_k8s_time(now));
            }
            progress.set_step(step, snapshot.total_steps);
        }
        progress.loss = snapshot.loss.or(progress.loss);
        progress.steps_per_second = snapshot.steps_per_second;
        progress.eta_seconds = snapshot.eta_seconds.map(|e| e.round() as i64);
        self.state.status.progress = Some(ProgressStatus { ..progress });
        self.last_training = match (&polled.outcome, polled.stall.recommendation) {
            (Some(Outcome::Succeeded), _) => TrainingObservation::Finished,
            (Some(Outcome::Failed { reason, message }), _) => {
                TrainingObservation::Crashed { reason: *reason, message: message.clone() }
            }
            (None, Recommendation::StopJob) => {
                TrainingObservation::Stalled { message: polled.stall.reason.clone() }
            }
            (None, _) => TrainingObservation::Running,
        };
        observer(&self.state.status, Some(&polled));
        Ok(())
    }

    /// Without a cluster "upload" means bringing the final model to this machine (or finding
    /// it here) and recording it, with size and checksum, as a `file://` artifact.
    async fn collect(&mut self, now: DateTime<Utc>) -> Result<(), LocalError> {
        self.state.status.phase = TrainingJobPhase::Uploading;
        let remote_model = self.final_model_path();
        let model = match &self.machine {
            MachineSpec::Local => PathBuf::from(&remote_model),
            MachineSpec::Ssh { .. } => {
                let file_name =
                    Path::new(&remote_model).file_name().map(|n| n.to_os_string()).unwrap_or_default();
                let local = self.state_dir.join("results").join(&self.state.uid).join(file_name);
                if let Some(dir) = local.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(|e| {
                        crate::remote::RemoteError::io(format!("create {}", dir.display()), e)
                    })?;
                }
                let exec = self.connection().await?;
                match exec.download(&remote_model, &local).await {
                    Ok(_) => local,
                    Err(crate::remote::RemoteError::NotFound { .. }) => PathBuf::from(&remote_model),
                    Err(err) => return Err(err.into()),
                }
            }
        };
        if !model.is_file() {
            let message = format!("the trainer finished but left no model at {remote_model}");
            self.finish(TrainingJobPhase::Failed, Reason::UploadFailed, &message, now);
            return Ok(());
        }
        let (sha256, size) = sha256_file(&model).await?;
        self.state.status.artifacts = vec![ArtifactStatus {
            name: "model".into(),
            uri: format!("file://{}", model.display()),
            size_bytes: size,
            sha256: Some(sha256),
        }];
        if matches!(self.machine, MachineSpec::Local) {
            self.state.status.checkpoints = checkpoints_in(&self.layout.output_dir());
        }
        set_condition(
            &mut self.state.status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::True,
            Reason::Uploaded,
            format!("model at {}", model.display()),
            None,
            now,
        );
        Ok(())
    }

    fn finish(&mut self, phase: TrainingJobPhase, reason: Reason, message: &str, now: DateTime<Utc>) {
        let status = &mut self.state.status;
        status.phase = phase;
        status.reason = Some(reason);
        status.message = Some(message.to_string());
        status.completion_time = Some(to_k8s_time(now));
        let (type_, other) = if phase == TrainingJobPhase::Succeeded {
            (job_condition::SUCCEEDED, job_condition::FAILED)
        } else {
            (job_condition::FAILED, job_condition::SUCCEEDED)
        };
        set_condition(&mut status.conditions, type_, ConditionStatus::True, reason, message, None, now);
        set_condition(&mut status.conditions, other, ConditionStatus::False, reason, message, None, now);
        set_condition(
            &mut status.conditions,
            job_condition::TRAINING,
            ConditionStatus::False,
            reason,
            message,
            None,
            now,
        );
    }
}

/// Checkpoint files (`<name>_<step>.<ext>`) in the output folder, oldest first.
fn checkpoints_in(dir: &str) -> Vec<CheckpointStatus> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<CheckpointStatus> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.rsplit_once('.').map(|(s, _)| s).unwrap_or(&name);
            let step = stem.rsplit_once('_')?.1.parse::<u64>().ok()?;
            Some(CheckpointStatus { name, step, size_bytes: e.metadata().ok().map(|m| m.len()), uri: None })
        })
        .collect();
    found.sort_by_key(|c| c.step);
    found
}
