//! `spec.notify`, once for both front ends: what a finished job's message is about, the message
//! body for the job's status, and the webhook URL read from its Secret (through the front end's
//! [`Secrets`]: the namespace's, or `launch --secret` files). Sending is the front end's (the
//! operator in the background, checked against its address policy; `launch` in the foreground).

use chrono::Utc;

use super::env::{SecretReadError, Secrets};
use crate::api::{Reason, TrainingJobSpec, TrainingJobStatus};
use crate::artifacts::notify::{CheckpointFacts, EventKind, JobRef, Notification, ProgressFacts, WebhookUrl};

/// Why the job's webhook URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WebhookUrlError {
    #[error(transparent)]
    Read(#[from] SecretReadError),
    #[error(
        "spec.notify.webhookSecretRef: key {key} of Secret {secret} is missing or not an http(s) URL; no webhook sent"
    )]
    Unusable { secret: String, key: String },
}

/// The job's webhook URL; `None` without `spec.notify`.
pub async fn webhook_url(
    secrets: &dyn Secrets,
    spec: &TrainingJobSpec,
) -> Result<Option<WebhookUrl>, WebhookUrlError> {
    let Some(notify) = &spec.notify else { return Ok(None) };
    let r = &notify.webhook_secret_ref;
    let value = secrets.secret(&r.name).await?.and_then(|mut keys| keys.remove(&r.key));
    match value.and_then(|v| String::from_utf8(v).ok()).and_then(|v| WebhookUrl::parse(&v)) {
        Some(url) => Ok(Some(url)),
        None => Err(WebhookUrlError::Unusable { secret: r.name.clone(), key: r.key.clone() }),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CheckpointStatus, CostStatus, ProgressStatus};
    use crate::artifacts::notify::JobRef;

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
