//! What one pass over one job works on: the job, its Kubernetes APIs, the rendered tool and the
//! status being built. The pass itself is the engine's driver ([`crate::engine::driver::pass`])
//! run over [`super::ports::ClusterPorts`].

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::events::EventType;

use super::{Error, JobController, session};
use crate::api::{GpuInstance, Reason, TrainingJob, TrainingJobStatus};
use crate::controller::pass_limit::StepTracker;
use crate::remote::launch::RemoteLayout;
use crate::remote::tool::RenderedTool;

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

impl Pass<'_> {
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
}
