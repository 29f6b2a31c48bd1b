//! Webhook notifications. Kubernetes Events are the primary channel; when a job names a webhook
//! (its URL comes from a Secret), a small JSON message with the same facts is POSTed on stall
//! detected, terminated, succeeded and failed. Delivery is best effort: a failure is logged
//! (without the URL, which often embeds a token) and returned as an outcome, never as an error
//! that could fail the job.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tracing::{debug, warn};

/// Which moment of a job the message is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EventKind {
    StallDetected,
    Terminated,
    Succeeded,
    Failed,
}

/// The job a message is about.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Progress at the time of the message.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressFacts {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// The latest checkpoint, where it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointFacts {
    pub name: String,
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

/// The JSON body.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub job: JobRef,
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressFacts>,
    /// The `Reason` (PascalCase), as in the job's status and events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<CheckpointFacts>,
    /// US dollars spent so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_so_far: Option<f64>,
    /// RFC 3339.
    pub time: String,
}

/// How a delivery went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotifyOutcome {
    Delivered {
        status: u16,
    },
    /// Gave up; the text never contains the URL.
    Failed {
        error: String,
    },
}

/// A webhook URL (from a Secret). `Debug` hides everything but the scheme and host.
#[derive(Clone)]
pub struct WebhookUrl(url::Url);

impl WebhookUrl {
    /// Accepts `http` and `https` URLs (surrounding whitespace, as Secrets often have, is trimmed).
    pub fn parse(value: &str) -> Option<Self> {
        let url = url::Url::parse(value.trim()).ok()?;
        matches!(url.scheme(), "http" | "https").then_some(Self(url))
    }

    fn host(&self) -> String {
        format!("{}://{}", self.0.scheme(), self.0.host_str().unwrap_or("?"))
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({}/<redacted>)", self.host())
    }
}

/// Sends notifications to one webhook.
#[derive(Clone, Debug)]
pub struct WebhookNotifier {
    client: reqwest::Client,
    url: WebhookUrl,
    attempts: u32,
    retry_delay: Duration,
}

impl WebhookNotifier {
    /// Ten-second timeout per attempt, three attempts.
    pub fn new(url: WebhookUrl) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self { client, url, attempts: 3, retry_delay: Duration::from_secs(1) }
    }

    /// Changes how often and how far apart failed deliveries are retried.
    pub fn with_retries(mut self, attempts: u32, delay: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.retry_delay = delay;
        self
    }

    /// POSTs `message`. Retries connection errors and 5xx; never returns an error.
    pub async fn notify(&self, message: &Notification) -> NotifyOutcome {
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            match self.client.post(self.url.0.clone()).json(message).send().await {
                Ok(resp) if resp.status().is_success() => {
                    debug!(host = %self.url.host(), event = ?message.event, "Delivered webhook");
                    return NotifyOutcome::Delivered { status: resp.status().as_u16() };
                }
                Ok(resp) => {
                    last = format!("HTTP {}", resp.status().as_u16());
                    if !resp.status().is_server_error() {
                        break;
                    }
                }
                // reqwest errors name the URL; keep only what kind of failure it was.
                Err(e) => last = describe(&e),
            }
            if attempt < self.attempts {
                tokio::time::sleep(self.retry_delay).await;
            }
        }
        warn!(host = %self.url.host(), event = ?message.event, error = %last, "Webhook notification failed");
        NotifyOutcome::Failed { error: last }
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else if e.is_request() {
        "request failed".into()
    } else {
        "transport error".into()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;

    use super::*;

    fn message() -> Notification {
        Notification {
            job: JobRef { namespace: "ml".into(), name: "lora".into(), uid: "u-1".into() },
            event: EventKind::StallDetected,
            progress: Some(ProgressFacts { step: 1200, total_steps: Some(4000), percent: Some(30.0) }),
            reason: Some("StallDetected".into()),
            message: Some("no new step for 2h".into()),
            latest_checkpoint: Some(CheckpointFacts {
                name: "lora_000001000.safetensors".into(),
                step: 1000,
                uri: Some("s3://b/lora-u-1/checkpoints/lora_000001000.safetensors".into()),
            }),
            cost_so_far: Some(1.25),
            time: "2026-01-01T00:00:00Z".into(),
        }
    }

    type Seen = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

    async fn listener(status: StatusCode) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let app = Router::new()
            .route(
                "/hook/{token}",
                post(
                    |State((seen, status)): State<(Seen, StatusCode)>,
                     axum::extract::Path(token): axum::extract::Path<String>,
                     axum::Json(body): axum::Json<serde_json::Value>| async move {
                        seen.lock().unwrap().push((token, body));
                        status
                    },
                ),
            )
            .with_state((seen.clone(), status));
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(socket, app).await });
        (format!("http://{addr}/hook/secret-token"), seen)
    }

    #[tokio::test]
    async fn webhook_receives_the_job_facts_as_json() {
        let (url, seen) = listener(StatusCode::NO_CONTENT).await;
        let notifier = WebhookNotifier::new(WebhookUrl::parse(&url).unwrap());
        assert_eq!(notifier.notify(&message()).await, NotifyOutcome::Delivered { status: 204 });
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (token, body) = &seen[0];
        assert_eq!(token, "secret-token");
        assert_eq!(body["job"]["name"], "lora");
        assert_eq!(body["event"], "StallDetected");
        assert_eq!(body["progress"]["step"], 1200);
        assert_eq!(body["progress"]["totalSteps"], 4000);
        assert_eq!(body["reason"], "StallDetected");
        assert_eq!(body["latestCheckpoint"]["step"], 1000);
        assert_eq!(body["costSoFar"], 1.25);
    }

    #[tokio::test]
    async fn server_errors_are_retried_then_reported_without_the_url() {
        let (url, seen) = listener(StatusCode::SERVICE_UNAVAILABLE).await;
        let notifier =
            WebhookNotifier::new(WebhookUrl::parse(&url).unwrap()).with_retries(2, Duration::from_millis(10));
        let outcome = notifier.notify(&message()).await;
        assert_eq!(outcome, NotifyOutcome::Failed { error: "HTTP 503".into() });
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn listener_that_is_down_is_a_logged_failure_not_an_error() {
        // Bind a port, then close it: nothing listens there any more.
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        let url = WebhookUrl::parse(&format!("http://{addr}/hook/secret-token")).unwrap();
        assert!(!format!("{url:?}").contains("secret-token"));
        let notifier = WebhookNotifier::new(url).with_retries(2, Duration::from_millis(10));
        match notifier.notify(&message()).await {
            NotifyOutcome::Failed { error } => assert!(!error.contains("secret-token"), "{error}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(WebhookUrl::parse(" https://hooks.example/x \n").is_some());
        assert!(WebhookUrl::parse("file:///etc/passwd").is_none());
        assert!(WebhookUrl::parse("not a url").is_none());
    }
}
