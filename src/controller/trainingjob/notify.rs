//! `spec.notify`: the same facts as the job's events, POSTed as JSON to a webhook when a stall is
//! detected and when the job is stopped, succeeds or fails. Best effort: delivery runs in the
//! background and a failure is logged (never with the URL), so a webhook can neither slow down
//! nor fail a job. A URL the operator's address policy refuses (a private or cluster-internal
//! address, see `artifacts::address`) is a Warning event on the job, naming the Secret and key.

use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::warn;

use super::pass::Pass;
use super::secrets::NamespaceSecrets;
use crate::api::Reason;
use crate::artifacts::notify::{EventKind, JobRef, WebhookNotifier};
use crate::engine::notify::{WebhookUrlError, notification, webhook_url};
use crate::error::error_chain;

impl Pass<'_> {
    /// Sends `event` to the job's webhook, if it has one, in the background.
    pub(super) async fn notify(&self, event: EventKind, message: &str) {
        let url = match webhook_url(&NamespaceSecrets(self.secrets.clone()), &self.job.spec).await {
            Ok(Some(url)) => url,
            Ok(None) => return,
            Err(WebhookUrlError::Read(e)) => {
                warn!(job = %self.job.name_any(), error = %error_chain(&e), "Cannot read the webhook Secret");
                return;
            }
            Err(unusable @ WebhookUrlError::Unusable { .. }) => {
                let note = unusable.to_string();
                self.event(EventType::Warning, Reason::NotifyFailed, "Notify", &note).await;
                return;
            }
        };
        let Some(r) = self.job.spec.notify.as_ref().map(|n| &n.webhook_secret_ref) else { return };
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
