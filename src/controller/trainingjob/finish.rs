//! The end of a job: stop the trainer gracefully, record what it left, release the machine and
//! write the final phase with its conditions. Stopping and releasing are idempotent, so a
//! finish interrupted by a restart is simply done again.

use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::info;

use super::pass::Pass;
use super::{phase_label, provision, session};
use crate::api::from_k8s_time;

use chrono::{DateTime, Utc};

use super::Error;
use crate::api::{ArtifactStatus, Reason, TrainingJobPhase};
use crate::engine::finish::finish_status;
use crate::remote::launch::{self, RemoteLayout, StopOutcome};
use crate::remote::tool::RenderedTool;
use crate::remote::{RemoteExec, RunOptions, shell_quote};

/// Stops the trainer if it runs (TERM, grace, KILL).
pub async fn stop(exec: &dyn RemoteExec, layout: &RemoteLayout) -> Result<StopOutcome, Error> {
    Ok(launch::stop(exec, layout, launch::STOP_GRACE).await?)
}

/// The final model the trainer left on the machine, with size and SHA-256 (computed on the
/// machine). `None` when there is none. (The checkpoints: `Pass::collect_checkpoints`.)
pub async fn final_model(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    tool: &RenderedTool,
) -> Result<Option<ArtifactStatus>, Error> {
    let model = layout.join(&tool.outputs.final_model);
    let out = exec
        .run(
            &format!(
                "f={}; [ -f \"$f\" ] && sha256sum \"$f\" && stat -c %s \"$f\" || true",
                shell_quote(&model)?
            ),
            RunOptions::default(),
        )
        .await?;
    out.require_complete("hashing the final model")?;
    let text = out.stdout_lossy();
    let mut lines = text.lines();
    let sha = lines.next().and_then(|l| l.split_whitespace().next()).map(str::to_string);
    let size = lines.next().and_then(|l| l.trim().parse::<u64>().ok());
    let artifact = match (sha, size) {
        (Some(sha256), Some(size_bytes)) => Some(ArtifactStatus {
            name: "model".into(),
            uri: format!("file://{model}"),
            size_bytes,
            sha256: Some(sha256),
        }),
        _ => None,
    };
    Ok(artifact)
}

impl Pass<'_> {
    /// Marks the job finished; the next step (`Finish` is decided from the phase) releases the
    /// machine.
    pub(super) async fn record_finish(
        &mut self,
        phase: TrainingJobPhase,
        reason: Reason,
        message: &str,
    ) -> Result<(), Error> {
        let now = Utc::now();
        finish_status(&mut self.status, phase, reason, message, now);
        self.record_finish_metrics(phase, reason, now);
        self.release().await?;
        let type_ = if phase == TrainingJobPhase::Succeeded { EventType::Normal } else { EventType::Warning };
        let event_reason =
            if phase == TrainingJobPhase::Succeeded { Reason::Succeeded } else { Reason::Failed };
        self.event(type_, event_reason, "Finish", message).await;
        self.notify(super::notify::finish_kind(reason), message).await;
        Ok(())
    }

    pub(super) async fn finish(
        &mut self,
        runtime: &mut session::JobRuntime,
        phase: TrainingJobPhase,
        reason: Reason,
        message: &str,
    ) -> Result<(), Error> {
        runtime.reset();
        info!(job = %self.job.name_any(), ?phase, %reason, "Finished");
        self.record_finish(phase, reason, message).await
    }

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
