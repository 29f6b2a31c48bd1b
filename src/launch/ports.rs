//! The engine's ports for `launch`: the state file is the status store, the machine is this
//! one, an SSH machine or a rented one, notifications go to the terminal (and the job's
//! webhook), results come to this machine.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::machine::RentedWatch;
use super::{LocalError, LocalRun, MachineSpec, Observer, Update};
use crate::api::{Reason, TrainingJobSpec, TrainingJobStatus};
use crate::artifacts::address::EndpointPolicy;
use crate::artifacts::notify::{EventKind, JobRef, NotifyOutcome, WebhookNotifier};
use crate::engine::MachineObservation;
use crate::engine::driver::{
    ArtifactStore, Clock, JobEvent, JobMemory, JobPorts, JobSource, LostWatch, Machine, Notifier, StatusStore,
};
use crate::engine::env::Secrets;
use crate::engine::notify::{finish_kind, notification, webhook_url};
use crate::engine::outputs::store::{JobView, OutputEvents, ResultStore};
use crate::engine::stage::LocalFolders;
use crate::error::error_chain;
use crate::remote::RemoteExec;
use crate::remote::launch::RemoteLayout;
use crate::remote::tool::RenderedTool;

/// One pass's ports: the run and the terminal's observer.
pub(super) struct LaunchPorts<'r, 'o> {
    pub(super) run: &'r mut LocalRun,
    pub(super) observer: &'r mut Observer<'o>,
    /// How often the trainer is read (a terminal wants a live bar, not the operator's minute).
    pub(super) poll_every: Duration,
}

impl LaunchPorts<'_, '_> {
    fn flush_notes(&mut self) {
        for note in self.run.notes.take() {
            (self.observer)(Update::Note(&note));
        }
    }

    /// Sends `kind` to the job's webhook (`spec.notify`), waiting for the delivery: a launcher
    /// that exits right after the job ends must not drop the message. Failures are told, never
    /// with the URL.
    async fn webhook(&mut self, kind: EventKind, message: &str) {
        let note = match webhook_url(self.run.secrets.as_ref(), &self.run.job.spec).await {
            Ok(None) => return,
            Err(err) => format!("no webhook sent: {}", error_chain(&err)),
            Ok(Some(url)) => {
                let job = JobRef {
                    namespace: String::new(),
                    name: self.run.name(),
                    uid: self.run.state.uid.clone(),
                };
                let body = notification(job, kind, &self.run.state.status, message);
                // No cluster to protect here: the user's own network is theirs to reach.
                match WebhookNotifier::new(url, EndpointPolicy::AllowPrivate, "the spec.notify webhook URL")
                    .await
                {
                    Ok(notifier) => match notifier.notify(&body).await {
                        NotifyOutcome::Delivered { .. } => return,
                        NotifyOutcome::Failed { error } => format!("the webhook was not delivered: {error}"),
                    },
                    Err(err) => format!("no webhook sent: {}", error_chain(&err)),
                }
            }
        };
        (self.observer)(Update::Note(&note));
    }
}

impl JobSource for LaunchPorts<'_, '_> {
    fn spec(&self) -> &TrainingJobSpec {
        &self.run.job.spec
    }
    fn layout(&self) -> &RemoteLayout {
        &self.run.layout
    }
    fn tool(&self) -> &RenderedTool {
        &self.run.tool
    }
    fn local_folders(&self) -> Option<LocalFolders<'_>> {
        Some(LocalFolders { job_dir: &self.run.job_dir, archive: &self.run.archive })
    }
    fn poll_every(&self) -> Duration {
        self.poll_every
    }
}

impl Clock for LaunchPorts<'_, '_> {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[async_trait]
impl StatusStore for LaunchPorts<'_, '_> {
    type Error = LocalError;
    fn status(&self) -> &TrainingJobStatus {
        &self.run.state.status
    }
    fn status_mut(&mut self) -> &mut TrainingJobStatus {
        &mut self.run.state.status
    }
    async fn persist(&mut self) -> Result<(), LocalError> {
        self.run.save()
    }
}

#[async_trait]
impl Machine for LaunchPorts<'_, '_> {
    async fn observe(&mut self, now: DateTime<Utc>) -> Result<MachineObservation, LocalError> {
        let machine = self.run.observe_machine(now).await?;
        if let Some(rented) = &self.run.state.rented {
            let status = &mut self.run.state.status;
            let eta = status.progress.as_ref().and_then(|p| p.eta_seconds);
            status.cost = Some(super::rent::cost(rented, eta, status.cost.as_ref(), now));
        }
        self.flush_notes();
        Ok(machine)
    }

    async fn acquire(&mut self, attempt: i32, now: DateTime<Utc>) -> Result<(), LocalError> {
        let acquired = self.run.acquire(attempt, now).await;
        self.flush_notes();
        acquired
    }

    async fn release(&mut self) -> Result<(), LocalError> {
        // The state file says why the machine goes before it goes.
        self.run.save()?;
        let released = self.run.release().await.map(|_| ());
        self.flush_notes();
        released
    }

    fn holds_machine(&self) -> bool {
        self.run.holds_machine()
    }

    async fn connect(&mut self) -> Result<Arc<dyn RemoteExec>, LocalError> {
        self.run.connection().await
    }

    fn disconnect(&mut self) {
        self.run.exec = None;
    }

    fn machine_name(&self) -> String {
        match self.run.rented_instance() {
            Some(id) => format!("instance-{id}"),
            None => "launch".into(),
        }
    }

    fn lost_watch(&self) -> Option<Box<dyn LostWatch>> {
        let MachineSpec::Vastai(rent) = &self.run.machine else { return None };
        let id = self.run.rented_instance()?;
        Some(Box::new(RentedWatch { provider: rent.provider.clone(), id }))
    }

    fn memory(&mut self) -> &mut JobMemory {
        &mut self.run.memory
    }
}

#[async_trait]
impl Notifier for LaunchPorts<'_, '_> {
    async fn notify(&mut self, event: JobEvent<'_>) {
        let note = match event {
            JobEvent::Entering(_) => {
                // What each step did is on disk before the next begins, so a launcher killed
                // mid-pass (Ctrl-C, a closed terminal) loses at most the step it was in. A
                // failed write shows at the end of the pass, where the state is written again.
                let _ = self.run.save();
                return;
            }
            JobEvent::Polled(polled) => {
                (self.observer)(Update::Polled(&self.run.state.status, polled));
                return;
            }
            JobEvent::Stalled(message) => {
                self.webhook(EventKind::StallDetected, message).await;
                format!("stall detected: {message}")
            }
            JobEvent::Recovered(message) => format!("progress resumed: {message}"),
            JobEvent::SoftDeadline(message) => message.to_string(),
            JobEvent::Staged(_) | JobEvent::TrainingStarted(_) => return,
            JobEvent::Suspended(message) | JobEvent::Resumed(message) => message.to_string(),
            JobEvent::Finished { reason, message, .. } => {
                self.webhook(finish_kind(reason), message).await;
                return;
            }
        };
        (self.observer)(Update::Note(&note));
    }
}

/// Things to tell the terminal that status does not keep (an instance adopted or destroyed, the
/// result store's warnings), told after the step that found them.
#[derive(Default)]
pub(super) struct Notes(Vec<String>);

impl Notes {
    pub(super) fn push(&mut self, note: String) {
        self.0.push(note);
    }
    pub(super) fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.0)
    }
}

#[async_trait]
impl OutputEvents for Notes {
    async fn warning(&mut self, _reason: Reason, _action: &str, message: &str) {
        self.push(format!("warning: {message}"));
    }
    async fn normal(&mut self, _reason: Reason, _action: &str, message: &str) {
        self.push(message.to_string());
    }
}

impl LaunchPorts<'_, '_> {
    /// True when the job names where its results go (then they go there, as in a cluster).
    fn has_outputs(&self) -> bool {
        self.run.job.spec.output.is_some()
    }

    /// The shared result store and what it works on.
    fn results(&mut self) -> (&mut ResultStore, JobView<'_>) {
        let run = &mut *self.run;
        let view = JobView {
            name: run.job.metadata.name.as_deref().unwrap_or_default(),
            uid: &run.state.uid,
            spec: &run.job.spec,
            layout: &run.layout,
            tool: &run.tool,
            status: &mut run.state.status,
            secrets: run.secrets.as_ref(),
            events: &mut run.notes,
            now: Utc::now(),
        };
        (&mut run.results, view)
    }
}

#[async_trait]
impl ArtifactStore for LaunchPorts<'_, '_> {
    async fn restore(&mut self, exec: &dyn RemoteExec) -> Result<(), LocalError> {
        let (store, mut job) = self.results();
        Ok(store.restore(&mut job, exec).await?)
    }
    async fn sync_checkpoints(&mut self, exec: &dyn RemoteExec) -> Result<(), LocalError> {
        let (store, mut job) = self.results();
        Ok(store.sync_checkpoints(&mut job, exec).await?)
    }
    async fn collect_checkpoints(&mut self, exec: &dyn RemoteExec) -> Result<(), LocalError> {
        let (store, mut job) = self.results();
        Ok(store.collect_checkpoints(&mut job, exec).await?)
    }
    async fn keep_latest_checkpoint(&mut self, exec: &dyn RemoteExec) -> Result<String, LocalError> {
        if !self.has_outputs() {
            return Ok(self.run.keep_latest_checkpoint());
        }
        let (store, mut job) = self.results();
        Ok(store.keep_latest_checkpoint(&mut job, exec).await?)
    }
    async fn salvage(&mut self, exec: &dyn RemoteExec, stop_reason: &str) -> Result<String, LocalError> {
        if !self.has_outputs() {
            return self.run.salvage(exec, stop_reason).await;
        }
        let (store, mut job) = self.results();
        Ok(store.salvage(&mut job, exec, stop_reason).await?)
    }
    async fn upload(&mut self, exec: &dyn RemoteExec) -> Result<(), LocalError> {
        if !self.has_outputs() {
            return self.run.collect(exec).await;
        }
        let (store, mut job) = self.results();
        Ok(store.upload(&mut job, exec).await?)
    }
}

impl JobPorts for LaunchPorts<'_, '_> {
    fn secrets(&self) -> &dyn Secrets {
        self.run.secrets.as_ref()
    }
}
