//! `gpu-trainer launch`: the engine's driver ([`crate::engine::driver`]) without Kubernetes, over
//! ports of its own: the whole state in one JSON file next to the job file ([`state`]), so Ctrl-C and a second `launch` continue where the first
//! stopped (the trainer runs in the background and is not interrupted), and `launch --cancel`
//! stops it. The machine is this one (`--provider local`, work dirs under the state dir), an
//! existing one over SSH (`--provider ssh`, host key pinned on first contact, the model
//! downloaded and verified at the end), or one rented on Vast.ai for the job (`--provider
//! vastai`, see [`machine`] and [`rent`]): rented with the job's own key and a label, followed until SSH
//! answers, used like an SSH machine, and destroyed whenever the job ends (success, failure,
//! stall, deadline, budget, an error of the launcher) and on `launch --cancel`. Only Ctrl-C
//! leaves it running, so that the next `launch` re-attaches to it.

mod machine;
pub mod model;
mod ports;
pub mod rent;
mod results;
mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::api::{Reason, TrainingJob, TrainingJobPhase, TrainingJobStatus};
use crate::artifacts::address::EndpointPolicy;
use crate::engine::MachineObservation;
use crate::engine::driver::{self, JobMemory, Wait};
use crate::engine::env::{EnvError, Secrets, resolve_env};
use crate::engine::finish::finish_status;
use crate::engine::notify::WebhookUrlError;
use crate::engine::outcome::{Failure, StepError};
use crate::engine::outputs::store::ResultStore;
use crate::engine::stage::s3_dataset_settings;
use crate::engine::validate::{FrontEnd, validate};
use crate::error::error_chain;
use crate::monitor::poller::TrainingStatus;
use crate::provider::InstanceId;
use crate::remote::RemoteExec;
use crate::remote::launch::{self, RemoteLayout};
use crate::remote::ssh::{SshKey, SshTarget};
use crate::remote::tool::{JobContext, RenderedTool, ToolRegistry};
use rent::RentSpec;
pub use state::LocalState;

/// Errors of a local run, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{field}: {message}")]
    InvalidJob { field: &'static str, message: String },
    #[error(transparent)]
    Secret(#[from] crate::engine::env::SecretReadError),
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
            StepError::Monitor(err) => LocalError::Monitor(err),
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

impl From<Box<crate::monitor::poller::MonitorError>> for LocalError {
    fn from(err: Box<crate::monitor::poller::MonitorError>) -> Self {
        LocalError::Monitor(err)
    }
}

impl driver::EngineError for LocalError {
    fn into_failure(self) -> Result<Failure, Self> {
        match self {
            LocalError::Failed(failure) => Ok(failure),
            other => Err(other),
        }
    }
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
    /// Where a `spec.dataset.local` folder is packed before it is sent.
    archive: PathBuf,
    state_path: PathBuf,
    pub state: LocalState,
    machine: MachineSpec,
    state_dir: PathBuf,
    exec: Option<Arc<dyn RemoteExec>>,
    layout: RemoteLayout,
    tool: RenderedTool,
    /// The driver's memory (monitor, last poll).
    memory: JobMemory,
    /// Where `valueFrom` values and storage credentials come from (`--secret` files).
    secrets: Arc<dyn Secrets>,
    /// The last word from the provider about the rented machine, and when it came.
    last_machine: Option<(tokio::time::Instant, MachineObservation)>,
    /// Rent calls refused in this process (offer taken, contract left behind).
    create_failures: u32,
    /// Notes for the observer, not yet reported.
    notes: ports::Notes,
    /// Where results go when the job names `spec.output` (as in a cluster).
    results: ResultStore,
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
        check_before_renting(&job, &job_dir, secrets.as_ref()).await?;
        let state_path = state_dir.join(format!("{name}.json"));
        let state = state::load(&state_path, &name)?;
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
        Ok(Self {
            job,
            archive: state_path.with_extension("dataset.tar"),
            job_dir,
            state_path,
            state,
            machine,
            state_dir: state_dir.to_path_buf(),
            exec: None,
            layout,
            tool: rendered,
            memory: JobMemory::default(),
            secrets,
            last_machine: None,
            create_failures: 0,
            notes: ports::Notes::default(),
            // The user's own network is theirs to reach; `hf` is looked up on the machine.
            results: ResultStore::new(Default::default(), "hf".into(), EndpointPolicy::AllowPrivate),
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

    pub(super) fn save(&self) -> Result<(), LocalError> {
        state::save(&self.state_path, &self.state)
    }

    /// Runs the job to the end, calling `observer` after every step. Returns the final status.
    /// A rented machine is destroyed at the end, and also when the run stops with an error (the
    /// job is then marked failed with it).
    pub async fn run(
        &mut self,
        poll_every: Duration,
        observer: &mut Observer<'_>,
    ) -> Result<TrainingJobStatus, LocalError> {
        match self.run_passes(poll_every, observer).await {
            Ok(status) => Ok(status),
            Err(err) if self.holds_machine() => {
                if !self.state.status.phase.is_finished() {
                    let message =
                        format!("stopped by an error, the machine was released: {}", error_chain(&err));
                    finish_status(
                        &mut self.state.status,
                        TrainingJobPhase::Failed,
                        err.reason(),
                        &message,
                        Utc::now(),
                    );
                }
                self.save()?;
                self.release().await?;
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    /// Passes of the driver until the job ends (or is suspended), the state saved after each.
    async fn run_passes(
        &mut self,
        poll_every: Duration,
        observer: &mut Observer<'_>,
    ) -> Result<TrainingJobStatus, LocalError> {
        loop {
            let wait = driver::pass(&mut ports::LaunchPorts { run: self, observer, poll_every }).await;
            // Whatever a pass did is kept, an error or not.
            self.save()?;
            for note in self.notes.take() {
                observer(Update::Note(&note));
            }
            let wait = wait?;
            observer(Update::Step(&self.state.status));
            match wait {
                Wait::Finished | Wait::Change => return Ok(self.state.status.clone()),
                Wait::Poll(after) => tokio::time::sleep(after.min(poll_every)).await,
                Wait::Machine => {
                    let wait = self.rent_spec().map(|r| r.boot_poll).unwrap_or(Duration::ZERO);
                    tokio::time::sleep(wait).await;
                }
                Wait::Again => {}
            }
        }
    }

    /// Stops a running trainer and marks the job failed (`launch --cancel`); a rented machine is
    /// destroyed. Returns the destroyed instance.
    pub async fn cancel(&mut self) -> Result<Option<InstanceId>, LocalError> {
        if self.rent_spec().is_some() {
            // The trainer is stopped first when the machine answers (it goes with the machine
            // anyway); a machine that does not answer is destroyed all the same.
            if self.state.rented.as_ref().is_some_and(|r| r.live_instance().is_some() && r.ssh().is_some()) {
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
            let message = "cancelled with `launch --cancel`";
            finish_status(
                &mut self.state.status,
                TrainingJobPhase::Failed,
                Reason::Deleted,
                message,
                Utc::now(),
            );
        }
        self.save()?;
        self.release().await
    }
}

/// What would fail the job later is checked before anything is rented: the environment, the
/// webhook, the dataset folder and the storage of an `s3` dataset. Without a cluster the
/// Secrets are the `--secret` files, and the operator's default storage is this process's.
async fn check_before_renting(
    job: &TrainingJob,
    job_dir: &Path,
    secrets: &dyn Secrets,
) -> Result<(), LocalError> {
    // Checked before anything is rented; the launch step resolves it again on the machine.
    resolve_env(secrets, &job.spec.env).await.map_err(|e| match e {
        EnvError::Unresolvable { var, message } => {
            LocalError::InvalidJob { field: "spec.env", message: format!("{var}: {message}") }
        }
        EnvError::Read(e) => LocalError::Secret(e),
    })?;
    match crate::engine::notify::webhook_url(secrets, &job.spec).await {
        Ok(_) => {}
        Err(WebhookUrlError::Read(err)) => return Err(LocalError::Secret(err)),
        Err(WebhookUrlError::Unusable { secret, key }) => {
            return Err(LocalError::InvalidJob {
                field: "spec.notify.webhookSecretRef",
                message: format!(
                    "key {key} of Secret {secret} is missing or not an http(s) URL; give the Secret with --secret {secret}=FILE"
                ),
            });
        }
    }
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
        s3_dataset_settings(&job.spec, s3, secrets).await?;
    }
    Ok(())
}
