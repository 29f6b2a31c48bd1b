//! The driver of the engine behind `gpu-trainer launch`: no Kubernetes, the whole state in one
//! JSON file next to the job file, so Ctrl-C and a second `launch` continue where the first
//! stopped (the trainer runs in the background and is not interrupted), and `launch --cancel`
//! stops it. The machine is this one (`--provider local`, work dirs under the state dir), an
//! existing one over SSH (`--provider ssh`, host key pinned on first contact, the model
//! downloaded and verified at the end), or one rented on Vast.ai for the job (`--provider
//! vastai`, see [`super::rent`]): rented with the job's own key and a label, followed until SSH
//! answers, used like an SSH machine, and destroyed whenever the job ends (success, failure,
//! stall, deadline, budget, an error of the launcher) and on `launch --cancel`. Only Ctrl-C
//! leaves it running, so that the next `launch` re-attaches to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::decide::{MachineObservation, Observations, Step, TrainingObservation, next_step};
use super::env::{EnvError, Secrets, resolve_env};
use super::finish::finish_status;
use super::model::ModelError;
use super::outcome::{Failure, StepError};
use super::progress::{earlier_monitoring, observation, record_progress, record_stall};
use super::rent::{self, RentSpec, RentedMachine};
use super::stage::{LocalFolders, StageInput, s3_dataset_settings, stage};
use super::validate::{FrontEnd, validate};
use crate::api::{
    ArtifactStatus, CheckpointStatus, ConditionStatus, CostStatus, JobInstanceStatus, Reason, TrainingJob,
    TrainingJobPhase, TrainingJobStatus, describe_gpu, find_condition, job_condition, set_condition,
    to_k8s_time,
};
use crate::crash::crash_point;
use crate::error::error_chain;
use crate::machine::adopt::{Adopted, adopt_by_label, pending_grace_left};
use crate::machine::decide::{Verdict, boot_deadline_passed, classify};
use crate::machine::onstart::render_onstart;
use crate::machine::rent::{RentFailure, triage_rent_error};
use crate::monitor::ParserKind;
use crate::monitor::poller::{TrainingFiles, TrainingMonitor, TrainingStatus};
use crate::provider::{Instance, InstanceId, InstanceState, LaunchRequest};
use crate::remote::launch::{self, RemoteLayout};
use crate::remote::local::LocalExec;
use crate::remote::ssh::{SshExec, SshKey, SshOptions, SshTarget};
use crate::remote::tool::{JobContext, RenderedTool, ToolRegistry};
use crate::remote::{RemoteExec, sha256_file};

/// Errors of a local run, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{field}: {message}")]
    InvalidJob { field: &'static str, message: String },
    #[error(transparent)]
    Secret(#[from] super::env::SecretReadError),
    /// A step failed for good.
    #[error(transparent)]
    Failed(#[from] Failure),
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
    #[error("failed to {operation} at the provider")]
    Provider {
        operation: &'static str,
        #[source]
        source: crate::provider::Error,
    },
    #[error("{0}")]
    NoOffers(String),
    #[error(
        "instance {id} is still listed by the provider after it was destroyed; check with `vastai show instance {id}`"
    )]
    StillRented { id: InstanceId },
}

impl From<StepError> for LocalError {
    fn from(err: StepError) -> Self {
        match err {
            StepError::Failed(failure) => LocalError::Failed(failure),
            StepError::Remote(err) => LocalError::Remote(err),
            StepError::Tool(err) => LocalError::Tool(err),
            StepError::Dataset(err) => LocalError::Dataset(err),
            StepError::Secret(err) => LocalError::Secret(err),
        }
    }
}

impl LocalError {
    /// The status reason of a run this error ended.
    pub fn reason(&self) -> Reason {
        match self {
            LocalError::InvalidJob { .. } | LocalError::Tool(_) => Reason::InvalidSpec,
            LocalError::Dataset(_) => Reason::StagingFailed,
            LocalError::Secret(_) => Reason::SecretNotFound,
            LocalError::Failed(failure) => failure.reason,
            LocalError::Remote(crate::remote::RemoteError::HostKeyChanged { .. }) => Reason::HostKeyChanged,
            LocalError::Remote(crate::remote::RemoteError::Connect { .. }) => Reason::SshUnreachable,
            LocalError::Provider { source, .. } => source.reason(),
            LocalError::NoOffers(_) => Reason::NoOffers,
            _ => Reason::TrainingFailed,
        }
    }
}

fn provider_err(operation: &'static str) -> impl FnOnce(crate::provider::Error) -> LocalError {
    move |source| LocalError::Provider { operation, source }
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
    /// SSH host key seen on first contact (`--provider ssh`, `vastai`); later connections must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// The machine rented for the job (`--provider vastai`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rented: Option<RentedMachine>,
}

/// Where a launched job runs.
#[derive(Clone, Debug)]
pub enum MachineSpec {
    /// This machine; work dirs under the state dir.
    Local,
    /// An existing machine over SSH; work dirs under `remote_base` there.
    Ssh { target: SshTarget, key: SshKey, remote_base: String },
    /// A machine rented on Vast.ai for this job and destroyed when it ends.
    Vastai(Box<RentSpec>),
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
    /// Where `valueFrom` values and storage credentials come from (`--secret` files).
    secrets: Arc<dyn Secrets>,
    /// The last word from the provider about the rented machine, and when it came.
    last_machine: Option<(tokio::time::Instant, MachineObservation)>,
    /// Rent calls refused in this process (offer taken, contract left behind).
    create_failures: u32,
    /// Notes for the observer, not yet reported.
    notes: Vec<String>,
    /// The trainer's environment, resolved by [`LocalRun::prepare`]; in memory only (it may
    /// hold Secret values, which never go to the state file).
    env: Vec<(String, String)>,
    /// Limit for downloading the final model (`--max-download-gb`); `None`: a few times the size
    /// the machine reports (see [`super::model::download_limit`]).
    max_download_bytes: Option<u64>,
}

/// Called after every step and poll, for progress display.
pub type Observer<'a> = dyn FnMut(Update<'_>) + Send + 'a;

/// What a run reports while it goes, for display.
#[derive(Clone, Copy, Debug)]
pub enum Update<'a> {
    /// A step was done; the job's status after it.
    Step(&'a TrainingJobStatus),
    /// The trainer was polled.
    Polled(&'a TrainingJobStatus, &'a TrainingStatus),
    /// Something worth telling that status does not keep (an instance adopted or destroyed).
    Note(&'a str),
}

impl LocalRun {
    /// Prepares a run: checks the job (tool, parameters, dataset; nothing runs for an invalid
    /// job) and resolves its environment (`valueFrom` through `secrets`) before anything is
    /// rented, then loads earlier state. `state_dir` holds the state file and the work dirs.
    pub async fn prepare(
        job: TrainingJob,
        job_file: &Path,
        state_dir: &Path,
        tools_dir: &Path,
        machine: MachineSpec,
        secrets: Arc<dyn Secrets>,
    ) -> Result<Self, LocalError> {
        let name = job.metadata.name.clone().ok_or(LocalError::InvalidJob {
            field: "metadata.name",
            message: "the job needs a name".into(),
        })?;
        let job_dir = job_file.parent().map(Path::to_path_buf).unwrap_or_default();
        let registry = ToolRegistry::load(tools_dir)?;
        let tool = validate(&job.spec, &registry, FrontEnd::Launch)
            .map_err(|e| LocalError::InvalidJob { field: e.field, message: e.message })?;
        let env = resolve_env(secrets.as_ref(), &job.spec.env).await.map_err(|e| match e {
            EnvError::Unresolvable { var, message } => {
                LocalError::InvalidJob { field: "spec.env", message: format!("{var}: {message}") }
            }
            EnvError::Read(e) => LocalError::Secret(e),
        })?;
        let dataset = &job.spec.dataset;
        if let Some(local) = &dataset.local
            && !job_dir.join(&local.path).is_dir()
        {
            return Err(LocalError::InvalidJob {
                field: "spec.dataset.local.path",
                message: format!("{} is not a folder", job_dir.join(&local.path).display()),
            });
        }
        // Nothing is rented for a dataset no connection can read. Without a cluster the Secrets
        // are the `--secret` files, and the operator's default storage is this process's.
        if let Some(s3) = &dataset.s3 {
            s3_dataset_settings(&job.spec, s3, secrets.as_ref()).await?;
        }
        let state_path = state_dir.join(format!("{name}.json"));
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| LocalError::State { path: state_path.clone(), source: Box::new(e) })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LocalState {
                uid: format!("{name}-{:08x}", rand::random::<u32>()),
                status: TrainingJobStatus::default(),
                host_key: None,
                rented: None,
            },
            Err(e) => return Err(LocalError::State { path: state_path.clone(), source: Box::new(e) }),
        };
        let base = match &machine {
            MachineSpec::Local => state_dir.join("work").to_string_lossy().into_owned(),
            MachineSpec::Ssh { remote_base, .. } => remote_base.clone(),
            MachineSpec::Vastai(rent) => rent.remote_base.clone(),
        };
        let layout = RemoteLayout::new(&base, &state.uid)?;
        let rendered = tool.render(
            &job.spec.params,
            &JobContext { name: name.clone(), uid: state.uid.clone(), layout: layout.clone() },
        )?;
        let parser = ParserKind::from(rendered.parser);
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
            secrets,
            last_machine: None,
            create_failures: 0,
            notes: Vec::new(),
            env,
            max_download_bytes: None,
        })
    }

    /// Sets the limit for downloading the final model from an SSH or rented machine.
    pub fn with_max_download_bytes(mut self, limit: Option<u64>) -> Self {
        self.max_download_bytes = limit;
        self
    }

    /// The job as read from its file.
    pub fn job(&self) -> &TrainingJob {
        &self.job
    }

    /// The job's name.
    pub fn name(&self) -> String {
        self.job.metadata.name.clone().unwrap_or_default()
    }

    /// The image the machine runs: `spec.resources.image`, else the tool's.
    pub fn image(&self) -> String {
        self.job.spec.resources.image.clone().unwrap_or_else(|| self.tool.image.clone())
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
            MachineSpec::Vastai(rent) => {
                let endpoint = self.state.rented.as_ref().and_then(|r| r.ssh.clone()).ok_or_else(|| {
                    crate::remote::RemoteError::InvalidRequest(
                        "the rented machine has no SSH address yet".into(),
                    )
                })?;
                let target = SshTarget { host: endpoint.host, port: endpoint.port, user: "root".into() };
                // A machine that booted answers quickly; the boot deadline covers the rest.
                let options =
                    SshOptions { connect_deadline: Duration::from_secs(60), ..SshOptions::default() };
                let ssh =
                    SshExec::connect(target, rent.key.clone(), self.state.host_key.clone(), options).await?;
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
            MachineSpec::Vastai(_) => "a Vast.ai machine".into(),
        }
    }

    fn rent_spec(&self) -> Option<RentSpec> {
        match &self.machine {
            MachineSpec::Vastai(rent) => Some((**rent).clone()),
            _ => None,
        }
    }

    /// True while a rented machine may bill (nothing is rented for `local` and `ssh`).
    pub fn holds_machine(&self) -> bool {
        self.state.rented.as_ref().is_some_and(RentedMachine::holds_machine)
    }

    /// The rented instance, when there is one.
    pub fn rented_instance(&self) -> Option<InstanceId> {
        self.state.rented.as_ref().and_then(|r| r.instance_id)
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

    /// What is known of the machine now. For `local` and `ssh` the machine is simply there once
    /// acquired; a rented one is asked about (not more often than its poll interval).
    async fn observe_machine(&mut self, now: DateTime<Utc>) -> Result<MachineObservation, LocalError> {
        let Some(rent) = self.rent_spec() else {
            return Ok(if self.state.status.attempts > 0 && !self.state.status.phase.is_finished() {
                MachineObservation::Ready { price_per_hour: 0.0 }
            } else {
                MachineObservation::None
            });
        };
        if self.state.rented.as_ref().is_some_and(|r| r.create_pending_since.is_some()) {
            self.resolve_pending(&rent).await?;
        }
        let Some(rented) = self.state.rented.clone() else { return Ok(MachineObservation::None) };
        let Some(id) = rented.instance_id.filter(|_| !rented.released) else {
            // Released: a failure recorded below, until the engine rents the next machine.
            return Ok(match &self.last_machine {
                Some((_, failed @ MachineObservation::Failed { .. })) => failed.clone(),
                _ => MachineObservation::None,
            });
        };
        if let Some((at, last)) = &self.last_machine {
            let every = if rented.ready { rent.liveness_poll } else { rent.boot_poll };
            if at.elapsed() < every {
                return Ok(last.clone());
            }
        }
        let observed = match rent.provider.get_instance(id).await {
            Ok(instance) => Some(instance),
            Err(err) if err.is_not_found() => None,
            // A provider hiccup says nothing about the machine: keep the last word.
            Err(err) if err.is_retryable() => {
                return Ok(self
                    .last_machine
                    .as_ref()
                    .map(|(_, m)| m.clone())
                    .unwrap_or(MachineObservation::Starting));
            }
            Err(err) => return Err(provider_err("look at the instance")(err)),
        };
        let observation = match observed {
            None => {
                self.forget_machine(now);
                MachineObservation::Failed {
                    reason: Reason::InstanceLost,
                    message: format!("the provider no longer lists instance {id}"),
                }
            }
            Some(instance) => self.judge(&rent, id, &instance, now).await?,
        };
        self.last_machine = Some((tokio::time::Instant::now(), observation.clone()));
        Ok(observation)
    }

    /// What one observation of the instance means; a machine that will not work for us is
    /// destroyed here.
    async fn judge(
        &mut self,
        rent: &RentSpec,
        id: InstanceId,
        instance: &Instance,
        now: DateTime<Utc>,
    ) -> Result<MachineObservation, LocalError> {
        let Some(rented) = self.state.rented.clone() else { return Ok(MachineObservation::None) };
        let launched = rented.launched_at.unwrap_or(now);
        let booting = |what: String| {
            if boot_deadline_passed(launched, rent.boot_timeout, now) {
                Err((Reason::BootTimeout, format!("{what} after {} s", rent.boot_timeout.as_secs()), true))
            } else {
                Ok(what)
            }
        };
        let verdict = match classify(instance, rented.ready) {
            Verdict::Booting => {
                let state = instance.actual_status.clone().unwrap_or_else(|| "created".into());
                let detail = instance.status_msg.clone().map(|m| format!(": {m}")).unwrap_or_default();
                booting(format!("instance {id} is booting ({state}{detail})"))
            }
            Verdict::Running => match instance.ssh.clone() {
                None => booting(format!("instance {id} runs; waiting for its SSH address")),
                Some(endpoint) => {
                    if let Some(r) = self.state.rented.as_mut() {
                        r.ssh = Some(endpoint);
                    }
                    if rented.ready {
                        return Ok(MachineObservation::Ready { price_per_hour: rented.price_per_hour() });
                    }
                    match self.connection().await {
                        Ok(_) => return Ok(self.machine_ready(id, now)),
                        Err(LocalError::Remote(err @ crate::remote::RemoteError::HostKeyChanged { .. })) => {
                            return Err(LocalError::Remote(err));
                        }
                        Err(err) => {
                            self.exec = None;
                            booting(format!(
                                "instance {id} runs but SSH does not answer yet: {}",
                                error_chain(&err)
                            ))
                        }
                    }
                }
            },
            Verdict::Release { reason, exclude_machine, message, .. } => {
                Err((reason, format!("instance {id}: {message}"), exclude_machine))
            }
        };
        match verdict {
            Ok(message) => {
                self.state.status.reason = Some(Reason::Booting);
                self.state.status.message = Some(message);
                Ok(MachineObservation::Starting)
            }
            Err((reason, message, exclude)) => {
                if exclude && let Some(r) = self.state.rented.as_mut() {
                    r.exclude_machine(instance.machine_id);
                }
                self.destroy_rented(now).await?;
                Ok(MachineObservation::Failed { reason, message: format!("{message}; it was destroyed") })
            }
        }
    }

    /// Records that SSH answers: the machine is ready for work.
    fn machine_ready(&mut self, id: InstanceId, now: DateTime<Utc>) -> MachineObservation {
        let Some(rented) = self.state.rented.as_mut() else { return MachineObservation::None };
        rented.ready = true;
        let price = rented.price_per_hour();
        let gpu = rented.offer.as_ref().map(|o| describe_gpu(o.num_gpus, &o.gpu_name)).unwrap_or_default();
        let at = rented.ssh.as_ref().map(|e| format!("{}:{}", e.host, e.port)).unwrap_or_default();
        let message = format!("instance {id} ({gpu}, ${price:.3}/h) is ready at {at}");
        set_condition(
            &mut self.state.status.conditions,
            job_condition::INSTANCE_READY,
            ConditionStatus::True,
            Reason::Ready,
            &message,
            None,
            now,
        );
        self.state.status.reason = Some(Reason::Ready);
        self.state.status.message = Some(message);
        MachineObservation::Ready { price_per_hour: price }
    }

    /// Forgets the connection and what was read from the machine (it is gone or replaced).
    fn forget_machine(&mut self, now: DateTime<Utc>) {
        self.exec = None;
        self.monitor = None;
        self.last_training = TrainingObservation::Unknown;
        if let Some(rented) = self.state.rented.as_mut()
            && !rented.released
        {
            rented.prior_cost += rented.current_cost(now);
            rented.released = true;
        }
    }

    /// Destroys the rented instance (gone already counts) and books its cost.
    async fn destroy_rented(&mut self, now: DateTime<Utc>) -> Result<Option<InstanceId>, LocalError> {
        let Some(rent) = self.rent_spec() else { return Ok(None) };
        let Some(id) = self.state.rented.as_ref().filter(|r| !r.released).and_then(|r| r.instance_id) else {
            return Ok(None);
        };
        rent.provider.destroy_instance(id).await.map_err(provider_err("destroy the instance"))?;
        self.forget_machine(now);
        self.save()?;
        self.notes.push(format!("destroyed instance {id}"));
        Ok(Some(id))
    }

    /// A rent call whose answer was lost (the launcher died, or the call failed in a way after
    /// which the provider may have rented anyway): the instance carrying the label is adopted
    /// (of several the oldest, the rest destroyed); when none shows up within the grace period
    /// the rent never happened.
    async fn resolve_pending(&mut self, rent: &RentSpec) -> Result<(), LocalError> {
        loop {
            let Some(rented) = self.state.rented.clone() else { return Ok(()) };
            let Some(since) = rented.create_pending_since else { return Ok(()) };
            let adopted = adopt_by_label(&*rent.provider, &rented.label, &rent.key.public_key_openssh())
                .await
                .map_err(|e| provider_err(e.operation)(e.source))?;
            if let Some(Adopted { survivor, .. }) = adopted {
                let message = format!("adopted instance {} found by its label {}", survivor.id, rented.label);
                if let Some(r) = self.state.rented.as_mut() {
                    r.instance_id = Some(survivor.id);
                    r.launched_at = Some(survivor.started_at.unwrap_or(since));
                    r.create_pending_since = None;
                }
                if let Some(i) = self.state.status.instance.as_mut() {
                    i.provider_id = Some(survivor.id.to_string());
                }
                self.state.status.message = Some(message.clone());
                self.notes.push(message);
                return self.save();
            }
            if pending_grace_left(since, rent.create_pending_grace, Utc::now()).is_none() {
                // Never rented: this attempt does not count.
                if let Some(r) = self.state.rented.as_mut() {
                    r.create_pending_since = None;
                    r.released = true;
                }
                self.state.status.attempts = (self.state.status.attempts - 1).max(0);
                return self.save();
            }
            tokio::time::sleep(rent.boot_poll).await;
        }
    }

    /// Destroys whatever this job has rented and waits until the provider no longer lists it.
    /// Returns the destroyed instance. Nothing happens for `local` and `ssh`, or when nothing is
    /// rented; repeating it is harmless.
    pub async fn release(&mut self) -> Result<Option<InstanceId>, LocalError> {
        let Some(rent) = self.rent_spec() else { return Ok(None) };
        let now = Utc::now();
        let mut destroyed = None;
        if let Some(rented) = self.state.rented.clone()
            && rented.create_pending_since.is_some()
        {
            // The rent's answer was lost: whatever carries the label is this job's.
            let found = rent
                .provider
                .list_instances_by_label(&rented.label)
                .await
                .map_err(provider_err("list instances by label"))?;
            for instance in found.iter().filter(|i| i.state != InstanceState::Released) {
                rent.provider
                    .destroy_instance(instance.id)
                    .await
                    .map_err(provider_err("destroy the instance"))?;
                destroyed = Some(instance.id);
            }
            if let Some(r) = self.state.rented.as_mut() {
                r.create_pending_since = None;
                if let Some(id) = destroyed {
                    r.instance_id = Some(id);
                    r.released = true;
                }
            }
            self.save()?;
        }
        if let Some(id) = self.destroy_rented(now).await? {
            destroyed = Some(id);
        }
        if let Some(rented) = self.state.rented.clone() {
            self.state.status.cost = Some(rent::cost(&rented, None, self.state.status.cost.as_ref(), now));
            self.save()?;
        }
        if let Some(id) = destroyed {
            self.confirm_gone(&rent, id).await?;
        }
        Ok(destroyed)
    }

    /// Waits until the provider no longer lists `id` (or lists it as released), destroying it
    /// again meanwhile.
    async fn confirm_gone(&self, rent: &RentSpec, id: InstanceId) -> Result<(), LocalError> {
        for _ in 0..15 {
            match rent.provider.get_instance(id).await {
                Err(err) if err.is_not_found() => return Ok(()),
                Ok(instance) if instance.state == InstanceState::Released => return Ok(()),
                Ok(_) => {
                    rent.provider.destroy_instance(id).await.map_err(provider_err("destroy the instance"))?
                }
                Err(err) if err.is_retryable() => {}
                Err(err) => return Err(provider_err("look at the instance")(err)),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Err(LocalError::StillRented { id })
    }

    /// Runs the job to the end, calling `observer` after every step. Returns the final status.
    /// A rented machine is destroyed at the end, and also when the run stops with an error (the
    /// job is then marked failed with it).
    pub async fn run(
        &mut self,
        poll_every: Duration,
        observer: &mut Observer<'_>,
    ) -> Result<TrainingJobStatus, LocalError> {
        match self.run_steps(poll_every, observer).await {
            Ok(status) => Ok(status),
            Err(err) if self.holds_machine() => {
                if !self.state.status.phase.is_finished() {
                    let message =
                        format!("stopped by an error, the machine was released: {}", error_chain(&err));
                    self.finish(TrainingJobPhase::Failed, err.reason(), &message, Utc::now());
                }
                self.save()?;
                self.release().await?;
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    async fn run_steps(
        &mut self,
        poll_every: Duration,
        observer: &mut Observer<'_>,
    ) -> Result<TrainingJobStatus, LocalError> {
        loop {
            let now = Utc::now();
            let machine = self.observe_machine(now).await?;
            for note in std::mem::take(&mut self.notes) {
                observer(Update::Note(&note));
            }
            if let Some(rented) = &self.state.rented {
                let eta = self.state.status.progress.as_ref().and_then(|p| p.eta_seconds);
                self.state.status.cost = Some(rent::cost(rented, eta, self.state.status.cost.as_ref(), now));
            }
            let observed = Observations { machine, training: self.last_training.clone() };
            let step = next_step(&self.job.spec, &self.state.status, &observed, now);
            let polled = matches!(step, Step::Poll);
            match step {
                Step::Done => {
                    self.release().await?;
                    for note in std::mem::take(&mut self.notes) {
                        observer(Update::Note(&note));
                    }
                    return Ok(self.state.status.clone());
                }
                Step::AcquireMachine { attempt } => self.acquire(attempt, now).await?,
                Step::WaitForMachine => {
                    let wait = self.rent_spec().map(|r| r.boot_poll).unwrap_or(poll_every);
                    tokio::time::sleep(wait).await;
                }
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
                    launch::stop(&*exec, &self.layout, launch::STOP_GRACE).await?;
                    self.finish(TrainingJobPhase::Failed, reason, &message, Utc::now());
                }
                Step::Upload => self.collect(now).await?,
                Step::Finish { phase, reason, message } => self.finish(phase, reason, &message, now),
            }
            self.save()?;
            for note in std::mem::take(&mut self.notes) {
                observer(Update::Note(&note));
            }
            if !polled {
                observer(Update::Step(&self.state.status));
            }
        }
    }

    /// Stops a running trainer and marks the job failed (`launch --cancel`); a rented machine is
    /// destroyed. Returns the destroyed instance.
    pub async fn cancel(&mut self) -> Result<Option<InstanceId>, LocalError> {
        if self.rent_spec().is_some() {
            // The trainer is stopped first when the machine answers (it goes with the machine
            // anyway); a machine that does not answer is destroyed all the same.
            if self.state.rented.as_ref().is_some_and(|r| r.ready && !r.released) {
                let stopped = tokio::time::timeout(Duration::from_secs(90), async {
                    let exec = self.connection().await?;
                    launch::stop(&*exec, &self.layout, launch::STOP_GRACE).await?;
                    Ok::<_, LocalError>(())
                })
                .await;
                if !matches!(stopped, Ok(Ok(()))) {
                    tracing::warn!(
                        "the rented machine did not answer; destroying it without stopping the trainer"
                    );
                }
            }
        } else {
            let exec = self.connection().await?;
            launch::stop(&*exec, &self.layout, launch::STOP_GRACE).await?;
        }
        if !self.state.status.phase.is_finished() {
            self.finish(
                TrainingJobPhase::Failed,
                Reason::Deleted,
                "cancelled with `launch --cancel`",
                Utc::now(),
            );
        }
        self.save()?;
        self.release().await
    }

    async fn acquire(&mut self, attempt: i32, now: DateTime<Utc>) -> Result<(), LocalError> {
        if let Some(rent) = self.rent_spec() {
            return self.rent(&rent, attempt, now).await;
        }
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
        Ok(())
    }

    /// Rents a machine for `attempt`: the previous one (lost, failed to boot) is destroyed
    /// first; the label and a pending mark are saved before the rent call and the instance id
    /// right after it.
    async fn rent(&mut self, rent: &RentSpec, attempt: i32, now: DateTime<Utc>) -> Result<(), LocalError> {
        self.release().await?;
        self.forget_machine(now);
        self.last_machine = None;
        // A new machine has a new host key, pinned on first contact again.
        self.state.host_key = None;
        let previous = self.state.rented.clone().unwrap_or_default();
        let selection = rent::choose_offer(
            &*rent.provider,
            &self.job.spec.resources,
            &rent.config,
            &previous.excluded_machine_ids,
        )
        .await?;
        let offer = selection.offer.clone();
        let installation_id = if previous.installation_id.is_empty() {
            crate::machine::label::random_installation_id()
        } else {
            previous.installation_id.clone()
        };
        let label = crate::machine::label::launch_label(&installation_id, &self.state.uid, attempt);
        self.state.rented = Some(RentedMachine {
            installation_id,
            label: label.clone(),
            create_pending_since: Some(now),
            offer: Some(crate::machine::offer::offer_status(&offer)),
            excluded_machine_ids: previous.excluded_machine_ids.clone(),
            prior_cost: previous.prior_cost,
            ..RentedMachine::default()
        });
        let status = &mut self.state.status;
        status.attempts = attempt;
        status.phase = TrainingJobPhase::Provisioning;
        status.start_time.get_or_insert_with(|| to_k8s_time(now));
        status.instance = Some(JobInstanceStatus {
            name: label.clone(),
            provider_id: None,
            gpu: Some(describe_gpu(offer.num_gpus, &offer.gpu_name)),
            price_per_hour: Some(offer.price_per_hour),
        });
        // A new machine has nothing on it: stage and launch again there.
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
        status.reason = Some(Reason::Launching);
        status.message = Some(format!("renting {}", crate::machine::offer::describe_offer(&offer)));
        self.save()?;
        crash_point("launch-before-rent");

        let lifetime =
            crate::machine::onstart::job_machine_lifetime_seconds(self.job.spec.active_deadline_seconds);
        let request = LaunchRequest {
            offer_id: offer.id,
            image: self.image(),
            disk_gb: self.job.spec.resources.disk_gb.unwrap_or(rent.config.default_disk_gb),
            env: Default::default(),
            onstart: Some(render_onstart(lifetime, None)),
            label: Some(label),
            ssh: true,
            ssh_public_key: Some(rent.key.public_key_openssh()),
            bid_price_per_hour: None,
        };
        match rent.provider.create_instance(&request).await {
            Ok(id) => {
                crash_point("launch-after-rent");
                if let Some(r) = self.state.rented.as_mut() {
                    r.instance_id = Some(id);
                    r.launched_at = Some(Utc::now());
                    r.create_pending_since = None;
                }
                if let Some(i) = self.state.status.instance.as_mut() {
                    i.provider_id = Some(id.to_string());
                }
                self.state.status.message =
                    Some(format!("rented instance {id}: {}", crate::machine::offer::describe_offer(&offer)));
                self.save()
            }
            Err(err) => {
                let triage = triage_rent_error(&err);
                if let RentFailure::LeftContract(contract) = triage {
                    // The rent failed but left a billing contract: destroy it first.
                    rent.provider
                        .destroy_instance(contract)
                        .await
                        .map_err(provider_err("destroy a contract left by a failed rent"))?;
                    if let Some(r) = self.state.rented.as_mut() {
                        r.exclude_machine(Some(offer.machine_id));
                    }
                }
                let retry_elsewhere =
                    matches!(triage, RentFailure::LeftContract(_) | RentFailure::OfferTaken);
                if retry_elsewhere {
                    self.create_failures += 1;
                    if let Some(r) = self.state.rented.as_mut() {
                        r.create_pending_since = None;
                        r.released = true;
                    }
                    self.state.status.attempts = attempt - 1;
                    self.save()?;
                    if self.create_failures >= rent::MAX_CREATE_FAILURES {
                        return Err(provider_err("rent an instance")(err));
                    }
                    return Ok(());
                }
                if triage == RentFailure::MaybeRented {
                    // The rent may have happened: the pending mark stays, and the label decides.
                    return self.resolve_pending(rent).await;
                }
                if let Some(r) = self.state.rented.as_mut() {
                    r.create_pending_since = None;
                    r.released = true;
                }
                self.state.status.attempts = attempt - 1;
                self.save()?;
                Err(provider_err("rent an instance")(err))
            }
        }
    }

    async fn stage(&mut self, now: DateTime<Utc>) -> Result<(), LocalError> {
        self.state.status.phase = TrainingJobPhase::Staging;
        self.state.status.reason = Some(Reason::Staging);
        self.state.status.message = Some("staging dataset and recipe".into());
        let exec = self.connection().await?;
        let archive = self.state_path.with_extension("dataset.tar");
        let input = StageInput {
            exec: &*exec,
            layout: &self.layout,
            spec: &self.job.spec,
            tool: &self.tool,
            secrets: self.secrets.as_ref(),
            local: Some(LocalFolders { job_dir: &self.job_dir, archive: &archive }),
        };
        let message = match stage(&input).await {
            Ok(message) => message,
            Err(StepError::Failed(failure)) => {
                self.finish(TrainingJobPhase::Failed, failure.reason, &failure.message, now);
                return Ok(());
            }
            Err(err) => return Err(err.into()),
        };
        set_condition(
            &mut self.state.status.conditions,
            job_condition::DATA_STAGED,
            ConditionStatus::True,
            Reason::Staged,
            &message,
            None,
            now,
        );
        self.state.status.message = Some(message);
        Ok(())
    }

    async fn launch(&mut self, resume: bool, now: DateTime<Utc>) -> Result<(), LocalError> {
        let exec = self.connection().await?;
        launch::launch(&*exec, &self.layout, &self.tool.launch_spec(resume, self.env.clone())).await?;
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
            self.monitor = Some(
                TrainingMonitor::new(
                    TrainingFiles::in_work_dir(self.layout.work_dir()),
                    self.parser,
                    &self.job.spec.monitoring,
                )
                // A resumed launch continues the no-progress clock and a flagged stall's grace.
                .resume_from(&earlier_monitoring(&self.state.status)),
            );
        }
        let Some(monitor) = self.monitor.as_mut() else { return Ok(()) };
        let polled = monitor.poll(&*exec, now).await?;
        record_progress(&mut self.state.status, &polled, now);
        record_stall(&mut self.state.status, &polled, now);
        self.last_training = observation(&polled);
        observer(Update::Polled(&self.state.status, &polled));
        Ok(())
    }

    /// Without a cluster "upload" means bringing the final model to this machine (or finding
    /// it here) and recording it, with size and checksum, as a `file://` artifact.
    async fn collect(&mut self, now: DateTime<Utc>) -> Result<(), LocalError> {
        self.state.status.phase = TrainingJobPhase::Uploading;
        let remote_model = self.final_model_path();
        let model = match &self.machine {
            MachineSpec::Local => PathBuf::from(&remote_model),
            MachineSpec::Ssh { .. } | MachineSpec::Vastai(_) => {
                let file_name =
                    Path::new(&remote_model).file_name().map(|n| n.to_os_string()).unwrap_or_default();
                let local = self.state_dir.join("results").join(&self.state.uid).join(file_name);
                if let Some(dir) = local.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(|e| {
                        crate::remote::RemoteError::io(format!("create {}", dir.display()), e)
                    })?;
                }
                let exec = self.connection().await?;
                match super::model::fetch_model(&*exec, &remote_model, &local, self.max_download_bytes).await
                {
                    Ok(model) => model,
                    Err(ModelError::Remote(err)) => return Err(err.into()),
                    // Not on the machine, or larger than allowed: the job failed, said how.
                    Err(err) => {
                        self.finish(TrainingJobPhase::Failed, Reason::UploadFailed, &err.to_string(), now);
                        return Ok(());
                    }
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
        finish_status(&mut self.state.status, phase, reason, message, now);
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
