//! Launching the trainer in the background and following it: environment from the spec (values
//! from Secrets resolved here, passed only to the training process), one launch per machine
//! (a live `train.pid` or an `exit_code` means it is not started again), and polls that turn
//! the monitor's reading into `status.progress`, `status.cost` and a [`TrainingObservation`].

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;

use super::pass::Pass;
use super::{Error, session};
use crate::api::{GpuInstance, Reason};
use crate::artifacts::settings::secret_bytes;
use crate::engine::TrainingObservation;
use crate::engine::env::{SecretReadError, Secrets};
use crate::engine::progress::{StallChange, earlier_monitoring, observation, record_progress, record_stall};
use crate::monitor::ParserKind;
use crate::monitor::poller::{TrainingFiles, TrainingMonitor};

/// The job's namespace's Secrets, where `spec.env[].valueFrom` reads from.
pub struct NamespaceSecrets<'a>(pub &'a Api<Secret>);

#[async_trait]
impl Secrets for NamespaceSecrets<'_> {
    async fn secret(&self, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, SecretReadError> {
        let secret = self
            .0
            .get_opt(name)
            .await
            .map_err(|source| SecretReadError { name: name.to_string(), source: Box::new(source) })?;
        Ok(secret.as_ref().map(secret_bytes))
    }
}

impl Pass<'_> {
    /// One poll: progress, stall condition and events, and what the engine should make of it.
    pub(super) async fn poll(
        &mut self,
        runtime: &mut session::JobRuntime,
        exec: &dyn crate::remote::RemoteExec,
        instance: Option<&GpuInstance>,
    ) -> Result<TrainingObservation, Error> {
        let instance_name = instance.map(|i| i.name_any()).unwrap_or_default();
        if runtime.monitor.as_ref().is_none_or(|(n, _)| *n != instance_name) {
            let monitor = TrainingMonitor::new(
                TrainingFiles::in_work_dir(self.layout.work_dir()),
                ParserKind::from(self.tool.parser),
                &self.job.spec.monitoring,
            )
            .resume_from(&earlier_monitoring(&self.status));
            runtime.monitor = Some((instance_name, monitor));
        }
        let Some((_, monitor)) = runtime.monitor.as_mut() else { return Ok(TrainingObservation::Unknown) };
        let now = Utc::now();
        let polled = monitor.poll(exec, now).await.map_err(Box::new)?;
        record_progress(&mut self.status, &polled, now);
        match record_stall(&mut self.status, &polled, now) {
            Some(StallChange::Flagged) => {
                self.ctrl.ctx.metrics.stalls_detected.inc();
                self.event(EventType::Warning, Reason::Stalled, "Monitor", &polled.stall.reason).await;
                self.notify(crate::artifacts::notify::EventKind::StallDetected, &polled.stall.reason).await;
            }
            Some(StallChange::Cleared) => {
                self.event(EventType::Normal, Reason::Recovered, "Monitor", &polled.stall.reason).await;
            }
            None => {}
        }
        Ok(observation(&polled))
    }
}
