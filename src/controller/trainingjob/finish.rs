//! The end of a job: stop the trainer gracefully, record what it left, release the machine and
//! write the final phase with its conditions. Stopping and releasing are idempotent, so a
//! finish interrupted by a restart is simply done again.

use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::info;

use super::pass::Pass;
use super::{phase_label, provision, session};
use crate::api::from_k8s_time;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Error;
use crate::api::{
    ArtifactStatus, ConditionStatus, Reason, TrainingJobPhase, TrainingJobStatus, job_condition,
    set_condition, to_k8s_time,
};
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

/// Sets the final phase, reason, message, completion time and conditions. Pure.
pub fn finish_status(
    status: &mut TrainingJobStatus,
    phase: TrainingJobPhase,
    reason: Reason,
    message: &str,
    now: DateTime<Utc>,
) {
    status.phase = phase;
    status.reason = Some(reason);
    status.message = Some(message.to_string());
    status.completion_time.get_or_insert_with(|| to_k8s_time(now));
    let (done, other) = if phase == TrainingJobPhase::Succeeded {
        (job_condition::SUCCEEDED, job_condition::FAILED)
    } else {
        (job_condition::FAILED, job_condition::SUCCEEDED)
    };
    set_condition(&mut status.conditions, done, ConditionStatus::True, reason, message, None, now);
    set_condition(&mut status.conditions, other, ConditionStatus::False, reason, message, None, now);
    for running in [job_condition::TRAINING, job_condition::INSTANCE_READY] {
        if crate::api::find_condition(&status.conditions, running).is_some() {
            set_condition(
                &mut status.conditions,
                running,
                ConditionStatus::False,
                reason,
                "the machine is released",
                None,
                now,
            );
        }
    }
    if crate::api::find_condition(&status.conditions, job_condition::UPLOADED).is_some()
        && !crate::api::is_condition_true(&status.conditions, job_condition::UPLOADED)
    {
        set_condition(
            &mut status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::False,
            reason,
            message,
            None,
            now,
        );
    }
    if let Some(progress) = status.progress.as_mut() {
        progress.eta_seconds = None;
        progress.steps_per_second = None;
    }
    if let Some(cost) = status.cost.as_mut() {
        cost.estimated_total = Some(cost.accrued);
    }
}

/// Time left before a finished job is deleted (`ttlSecondsAfterFinished`); zero when due, `None`
/// when the job is kept. Pure.
pub fn ttl_left(
    ttl_seconds: Option<i64>,
    completed: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<Duration> {
    let due = completed? + chrono::Duration::seconds(ttl_seconds?.max(0));
    Some((due - now).to_std().unwrap_or(Duration::ZERO))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CostStatus, is_condition_true};

    #[test]
    fn a_finished_job_is_kept_until_its_ttl_passes() {
        let done = Utc::now();
        assert_eq!(ttl_left(None, Some(done), done), None);
        assert_eq!(ttl_left(Some(60), None, done), None);
        assert_eq!(
            ttl_left(Some(60), Some(done), done + chrono::Duration::seconds(20)),
            Some(Duration::from_secs(40))
        );
        assert_eq!(
            ttl_left(Some(60), Some(done), done + chrono::Duration::seconds(90)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn finishing_sets_one_final_condition_and_clears_training() {
        let now = Utc::now();
        let mut status = TrainingJobStatus::default();
        set_condition(
            &mut status.conditions,
            job_condition::TRAINING,
            ConditionStatus::True,
            Reason::Training,
            "",
            None,
            now,
        );
        status.cost =
            Some(CostStatus { accrued: 0.2, estimated_total: Some(0.9), price_per_hour: Some(0.4) });
        finish_status(&mut status, TrainingJobPhase::Succeeded, Reason::Succeeded, "done", now);
        assert!(is_condition_true(&status.conditions, job_condition::SUCCEEDED));
        assert!(!is_condition_true(&status.conditions, job_condition::FAILED));
        assert!(!is_condition_true(&status.conditions, job_condition::TRAINING));
        assert_eq!(status.cost.unwrap().estimated_total, Some(0.2));
        assert!(status.completion_time.is_some());
    }
}
