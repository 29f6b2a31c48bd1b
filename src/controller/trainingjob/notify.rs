//! `spec.notify`: the same facts as the job's events, POSTed as JSON to a webhook when a stall is
//! detected and when the job is stopped, succeeds or fails. Best effort: delivery runs in the
//! background and a failure is logged (never with the URL), so a webhook can neither slow down
//! nor fail a job. A URL the operator's address policy refuses (a private or cluster-internal
//! address, see `artifacts::address`) is a Warning event on the job, naming the Secret and key.

use chrono::Utc;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::warn;

use super::pass::Pass;
use crate::api::{Reason, TrainingJobStatus};
use crate::artifacts::notify::{
    CheckpointFacts, EventKind, JobRef, Notification, ProgressFacts, WebhookNotifier, WebhookUrl,
};
use crate::error::error_chain;

/// What a finished job's message is about: stopped by the operator, succeeded, or failed. Pure.
pub fn finish_kind(reason: Reason) -> EventKind {
    match reason {
        Reason::Succeeded => EventKind::Succeeded,
        Reason::Stalled | Reason::DeadlineExceeded | Reason::BudgetExceeded => EventKind::Terminated,
        _ => EventKind::Failed,
    }
}

/// The message body for the job's current status. Pure.
pub fn notification(
    job: JobRef,
    event: EventKind,
    status: &TrainingJobStatus,
    message: &str,
) -> Notification {
    Notification {
        job,
        event,
        progress: status.progress.as_ref().map(|p| ProgressFacts {
            step: p.step,
            total_steps: p.total_steps,
            percent: p.percent,
        }),
        reason: status.reason.map(|r| r.as_str().to_string()),
        message: Some(message.to_string()),
        latest_checkpoint: status.checkpoints.iter().max_by_key(|c| c.step).map(|c| CheckpointFacts {
            name: c.name.clone(),
            step: c.step,
            uri: c.uri.clone(),
        }),
        cost_so_far: status.cost.as_ref().map(|c| c.accrued),
        time: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }
}

impl Pass<'_> {
    /// Sends `event` to the job's webhook, if it has one, in the background.
    pub(super) async fn notify(&self, event: EventKind, message: &str) {
        let Some(spec) = &self.job.spec.notify else { return };
        let r = &spec.webhook_secret_ref;
        let value = match self.secrets.get_opt(&r.name).await {
            Ok(secret) => secret.and_then(|s| s.data).and_then(|d| d.get(&r.key).map(|v| v.0.clone())),
            Err(e) => {
                warn!(job = %self.job.name_any(), error = %e, "Cannot read the webhook Secret");
                return;
            }
        };
        let Some(url) = value.and_then(|v| String::from_utf8(v).ok()).and_then(|v| WebhookUrl::parse(&v))
        else {
            let note = format!(
                "spec.notify.webhookSecretRef: key {} of Secret {} is missing or not an http(s) URL; no webhook sent",
                r.key, r.name
            );
            self.event(EventType::Warning, Reason::NotifyFailed, "Notify", &note).await;
            return;
        };
        let job = JobRef {
            namespace: self.job.namespace().unwrap_or_default(),
            name: self.job.name_any(),
            uid: self.job.uid().unwrap_or_default(),
        };
        let body = notification(job, event, &self.status, message);
        let what = format!("the webhook URL in Secret {}/{} key `{}`", body.job.namespace, r.name, r.key);
        let (ctx, owner, policy) = (self.ctrl.ctx.clone(), self.job.clone(), self.ctrl.endpoint_policy);
        // The host is resolved and checked in the background too: a slow DNS answer must not
        // hold the pass.
        tokio::spawn(async move {
            match WebhookNotifier::new(url, policy, &what).await {
                Ok(notifier) => {
                    notifier.notify(&body).await;
                }
                Err(e) if e.is_refusal() => {
                    let note = format!("{}; no webhook sent", error_chain(&e));
                    ctx.event(&owner, EventType::Warning, Reason::NotifyFailed, "Notify", note).await;
                }
                Err(e) => {
                    warn!(job = %owner.name_any(), error = %error_chain(&e), "Webhook notification failed")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CheckpointStatus, CostStatus, ProgressStatus};

    #[test]
    fn stops_by_the_operator_are_terminations() {
        assert_eq!(finish_kind(Reason::Succeeded), EventKind::Succeeded);
        assert_eq!(finish_kind(Reason::Stalled), EventKind::Terminated);
        assert_eq!(finish_kind(Reason::BudgetExceeded), EventKind::Terminated);
        assert_eq!(finish_kind(Reason::UploadFailed), EventKind::Failed);
    }

    #[test]
    fn the_message_carries_progress_cost_and_the_latest_checkpoint() {
        let status = TrainingJobStatus {
            reason: Some(Reason::Stalled),
            progress: Some(ProgressStatus {
                step: 12,
                total_steps: Some(40),
                percent: Some(30.0),
                ..Default::default()
            }),
            cost: Some(CostStatus { accrued: 0.12, ..Default::default() }),
            checkpoints: vec![
                CheckpointStatus {
                    name: "a_10".into(),
                    step: 10,
                    size_bytes: None,
                    uri: Some("s3://b/a_10".into()),
                },
                CheckpointStatus { name: "a_5".into(), step: 5, size_bytes: None, uri: None },
            ],
            ..Default::default()
        };
        let n = notification(JobRef::default(), EventKind::Terminated, &status, "stopped");
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["event"], "Terminated");
        assert_eq!(json["reason"], "Stalled");
        assert_eq!(json["progress"]["step"], 12);
        assert_eq!(json["latestCheckpoint"]["uri"], "s3://b/a_10");
        assert_eq!(json["costSoFar"], 0.12);
    }
}
