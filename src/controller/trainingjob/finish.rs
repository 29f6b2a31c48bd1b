//! The controller's part of a job's end (the end itself is the engine driver's): the finish
//! metrics, and the release (status written first, then
//! the GpuInstance deleted; its finalizer gives the machine back). Releasing is idempotent, so a
//! finish interrupted by a restart is simply done again.

use chrono::{DateTime, Utc};
use kube::Resource;

use super::pass::Pass;
use super::{Error, phase_label, provision};
use crate::api::{Reason, TrainingJobPhase, from_k8s_time};

impl Pass<'_> {
    pub(super) fn record_finish_metrics(&self, phase: TrainingJobPhase, reason: Reason, now: DateTime<Utc>) {
        let metrics = &self.ctrl.ctx.metrics;
        let label = crate::metrics::PhaseLabels { phase: phase_label(phase) };
        if let Some(created) = self.job.meta().creation_timestamp.as_ref() {
            let seconds = (now - from_k8s_time(created)).num_milliseconds().max(0) as f64 / 1000.0;
            metrics.job_duration.get_or_create(&label).observe(seconds);
        }
        if let Some(cost) = &self.status.cost {
            metrics.job_cost.observe(cost.accrued);
        }
        if phase == TrainingJobPhase::Failed {
            metrics
                .job_failures
                .get_or_create(&crate::metrics::ReasonLabels { reason: reason.as_str() })
                .inc();
        }
    }

    /// Writes the status (which must already say why the machine goes), then deletes the
    /// GpuInstance; its finalizer releases the machine.
    pub(super) async fn release(&mut self) -> Result<(), Error> {
        self.persist().await?;
        if let Some(instance) = &self.status.instance {
            provision::ensure_instance_deleted(&self.instances, &instance.name).await?;
            crate::crash::crash_point("after-job-release");
        }
        Ok(())
    }
}
