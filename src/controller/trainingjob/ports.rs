//! The engine's ports over Kubernetes: the status is the TrainingJob's, the machine a
//! GpuInstance the job owns, secrets the namespace's, notifications Kubernetes events (and the
//! job's webhook), artifacts S3 and Hugging Face through the machine.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::machine::GpuInstanceWatch;
use super::pass::Pass;
use super::secrets::NamespaceSecrets;
use super::session::JobRuntime;
use super::{Error, kube_err, provision};
use crate::api::{GpuInstance, Reason, TrainingJobPhase, TrainingJobSpec, TrainingJobStatus, from_k8s_time};
use crate::artifacts::notify::EventKind;
use crate::engine::MachineObservation;
use crate::engine::driver::{
    ArtifactStore, Clock, EngineError, JobEvent, JobMemory, JobPorts, JobSource, LostWatch, Machine,
    Notifier, StatusStore,
};
use crate::engine::env::Secrets;
use crate::engine::outcome::Failure;
use crate::engine::outputs::store::{JobView, OutputEvents, ResultStore};
use crate::remote::RemoteExec;
use crate::remote::launch::RemoteLayout;
use crate::remote::tool::RenderedTool;

impl EngineError for Error {
    fn into_failure(self) -> Result<Failure, Self> {
        match self {
            Error::Failed(failure) => Ok(failure),
            other => Err(other),
        }
    }
}

/// One pass's ports: the pass, the job's runtime kept between passes, and the GpuInstance as
/// last observed.
pub(super) struct ClusterPorts<'p, 'a> {
    pub(super) pass: &'p mut Pass<'a>,
    pub(super) runtime: &'p mut JobRuntime,
    pub(super) secrets: NamespaceSecrets,
    pub(super) instance: Option<GpuInstance>,
    events: KubeEvents<'a>,
    name: String,
    uid: String,
}

impl<'p, 'a> ClusterPorts<'p, 'a> {
    pub(super) fn new(pass: &'p mut Pass<'a>, runtime: &'p mut JobRuntime) -> Self {
        let secrets = NamespaceSecrets(pass.secrets.clone());
        let events = KubeEvents { ctx: &pass.ctrl.ctx, job: pass.job };
        let (name, uid) = (pass.job.name_any(), pass.job.uid().unwrap_or_default());
        Self { pass, runtime, secrets, instance: None, events, name, uid }
    }

    /// The job's result store and what it works on.
    fn results(&mut self) -> (&mut ResultStore, JobView<'_>) {
        let ctrl = self.pass.ctrl;
        let store = self.runtime.results.get_or_insert_with(|| {
            ResultStore::new(ctrl.upload_limits, ctrl.hf_cli.clone(), ctrl.endpoint_policy)
        });
        let pass = &mut *self.pass;
        let view = JobView {
            name: &self.name,
            uid: &self.uid,
            spec: &pass.job.spec,
            layout: &pass.layout,
            tool: &pass.tool,
            status: &mut pass.status,
            secrets: &self.secrets,
            events: &mut self.events,
            now: Utc::now(),
        };
        (store, view)
    }
}

/// The result store's warnings as Kubernetes events on the job.
struct KubeEvents<'a> {
    ctx: &'a crate::controller::Context,
    job: &'a crate::api::TrainingJob,
}

#[async_trait]
impl OutputEvents for KubeEvents<'_> {
    async fn warning(&mut self, reason: Reason, action: &str, message: &str) {
        self.ctx.event(self.job, EventType::Warning, reason, action, message).await;
    }
    async fn normal(&mut self, reason: Reason, action: &str, message: &str) {
        self.ctx.event(self.job, EventType::Normal, reason, action, message).await;
    }
}

impl JobSource for ClusterPorts<'_, '_> {
    fn spec(&self) -> &TrainingJobSpec {
        &self.pass.job.spec
    }
    fn layout(&self) -> &RemoteLayout {
        &self.pass.layout
    }
    fn tool(&self) -> &RenderedTool {
        &self.pass.tool
    }
}

impl Clock for ClusterPorts<'_, '_> {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[async_trait]
impl StatusStore for ClusterPorts<'_, '_> {
    type Error = Error;
    fn status(&self) -> &TrainingJobStatus {
        &self.pass.status
    }
    fn status_mut(&mut self) -> &mut TrainingJobStatus {
        &mut self.pass.status
    }
    async fn persist(&mut self) -> Result<(), Error> {
        self.pass.persist().await
    }
}

#[async_trait]
impl Machine for ClusterPorts<'_, '_> {
    async fn observe(&mut self, now: DateTime<Utc>) -> Result<MachineObservation, Error> {
        self.instance = match &self.pass.status.instance {
            Some(i) => {
                self.pass.instances.get_opt(&i.name).await.map_err(kube_err("read the GpuInstance"))?
            }
            None => None,
        };
        let machine = provision::observe(self.instance.as_ref());
        self.pass.record_machine(self.instance.as_ref(), &machine, now).await;
        Ok(machine)
    }

    async fn acquire(&mut self, attempt: i32, _now: DateTime<Utc>) -> Result<(), Error> {
        self.pass.acquire(attempt).await
    }

    async fn release(&mut self) -> Result<(), Error> {
        self.pass.release().await
    }

    fn holds_machine(&self) -> bool {
        // A GpuInstance being deleted was given back already: its finalizer releases the machine.
        self.instance.as_ref().is_some_and(|i| i.metadata.deletion_timestamp.is_none())
    }

    async fn connect(&mut self) -> Result<Arc<dyn RemoteExec>, Error> {
        let exec = self.pass.session(self.runtime, self.instance.as_ref()).await?;
        Ok(exec)
    }

    fn disconnect(&mut self) {
        self.runtime.disconnect();
    }

    fn machine_name(&self) -> String {
        self.instance.as_ref().map(|i| i.name_any()).unwrap_or_default()
    }

    fn lost_watch(&self) -> Option<Box<dyn LostWatch>> {
        let name = self.instance.as_ref()?.name_any();
        Some(Box::new(GpuInstanceWatch { api: self.pass.instances.clone(), name }))
    }

    fn memory(&mut self) -> &mut JobMemory {
        &mut self.runtime.memory
    }
}

#[async_trait]
impl Notifier for ClusterPorts<'_, '_> {
    async fn notify(&mut self, event: JobEvent<'_>) {
        let pass = &*self.pass;
        let metrics = &pass.ctrl.ctx.metrics;
        match event {
            JobEvent::Entering(step) => pass.step.enter(step),
            JobEvent::Polled(_) => {}
            JobEvent::Staged(message) => {
                pass.event(EventType::Normal, Reason::Staged, "Stage", message).await
            }
            JobEvent::TrainingStarted(message) => {
                if pass.status.attempts == 1
                    && let Some(created) = pass.job.metadata.creation_timestamp.as_ref()
                {
                    let waited =
                        (Utc::now() - from_k8s_time(created)).num_milliseconds().max(0) as f64 / 1000.0;
                    metrics.apply_to_training_seconds.observe(waited);
                }
                pass.event(EventType::Normal, Reason::TrainingStarted, "Launch", message).await;
            }
            JobEvent::Stalled(message) => {
                metrics.stalls_detected.inc();
                pass.event(EventType::Warning, Reason::Stalled, "Monitor", message).await;
                pass.notify(EventKind::StallDetected, message).await;
            }
            JobEvent::Recovered(message) => {
                pass.event(EventType::Normal, Reason::Recovered, "Monitor", message).await;
            }
            JobEvent::SoftDeadline(message) => {
                pass.event(EventType::Warning, Reason::SoftDeadlineExceeded, "Monitor", message).await;
            }
            JobEvent::Suspended(message) => {
                pass.event(EventType::Normal, Reason::Suspended, "Suspend", message).await;
            }
            JobEvent::Resumed(message) => {
                pass.event(EventType::Normal, Reason::Resumed, "Resume", message).await
            }
            JobEvent::Finished { phase, reason, message } => {
                pass.record_finish_metrics(phase, reason, Utc::now());
                let (type_, event_reason) = if phase == TrainingJobPhase::Succeeded {
                    (EventType::Normal, Reason::Succeeded)
                } else {
                    (EventType::Warning, Reason::Failed)
                };
                pass.event(type_, event_reason, "Finish", message).await;
                pass.notify(crate::engine::notify::finish_kind(reason), message).await;
            }
        }
    }
}

#[async_trait]
impl ArtifactStore for ClusterPorts<'_, '_> {
    async fn restore(&mut self, exec: &dyn RemoteExec) -> Result<(), Error> {
        let (store, mut job) = self.results();
        Ok(store.restore(&mut job, exec).await?)
    }
    async fn sync_checkpoints(&mut self, exec: &dyn RemoteExec) -> Result<(), Error> {
        let (store, mut job) = self.results();
        Ok(store.sync_checkpoints(&mut job, exec).await?)
    }
    async fn collect_checkpoints(&mut self, exec: &dyn RemoteExec) -> Result<(), Error> {
        let (store, mut job) = self.results();
        Ok(store.collect_checkpoints(&mut job, exec).await?)
    }
    async fn keep_latest_checkpoint(&mut self, exec: &dyn RemoteExec) -> Result<String, Error> {
        let (store, mut job) = self.results();
        Ok(store.keep_latest_checkpoint(&mut job, exec).await?)
    }
    async fn salvage(&mut self, exec: &dyn RemoteExec, stop_reason: &str) -> Result<String, Error> {
        let (store, mut job) = self.results();
        Ok(store.salvage(&mut job, exec, stop_reason).await?)
    }
    async fn upload(&mut self, exec: &dyn RemoteExec) -> Result<(), Error> {
        let (store, mut job) = self.results();
        Ok(store.upload(&mut job, exec).await?)
    }
}

impl JobPorts for ClusterPorts<'_, '_> {
    fn secrets(&self) -> &dyn Secrets {
        &self.secrets
    }
}
