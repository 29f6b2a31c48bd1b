//! Webhook notifications. Kubernetes Events are the primary channel; when a job names a webhook
//! (its URL comes from a Secret), a small JSON message with the same facts is POSTed on stall
//! detected, terminated, succeeded and failed. Delivery is best effort: a failure is logged
//! (without the URL, which often embeds a token) and returned as an outcome, never as an error
//! that could fail the job.
//!
//! The URL is the job author's, the connection the operator's: under the address policy
//! (`address`) a URL whose host is or resolves to a non-public address is refused, the client
//! connects only to the addresses checked (pinned, so a DNS answer cannot change in between),
//! and redirects are not followed (a public URL could otherwise send the operator anywhere).
//! Response bodies are never read, so their size does not matter.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tracing::{debug, warn};

use super::address::EndpointPolicy;
use super::endpoint::{self, Checked, EndpointError};

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
        endpoint::origin(&self.0)
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({}/<redacted>)", self.host())
    }
}

/// Why no notifier could be made for a webhook.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot set up the webhook's HTTP client")]
    Client(#[source] reqwest::Error),
}

impl WebhookError {
    /// The address policy refused the URL (worth a Warning event on the job).
    pub fn is_refusal(&self) -> bool {
        matches!(self, WebhookError::Endpoint(e) if e.is_refusal())
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
    /// Ten-second timeout per attempt, three attempts. The URL is checked under `policy` first
    /// (`what` names where it came from, e.g. a Secret and key, for the message); a refused or
    /// unresolvable URL is an error and nothing is sent.
    pub async fn new(url: WebhookUrl, policy: EndpointPolicy, what: &str) -> Result<Self, WebhookError> {
        let checked = endpoint::check_url(&url.0, policy, what).await?;
        Self::connecting_to(url, checked)
    }

    /// The notifier for a URL already checked: a name connects only to the addresses checked.
    fn connecting_to(url: WebhookUrl, checked: Checked) -> Result<Self, WebhookError> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none());
        if let (Checked::Resolved(addresses), Some(host)) = (checked, url.0.host_str()) {
            // Port 0: the URL's port (or the scheme's) is used.
            let pinned: Vec<_> = addresses.into_iter().map(|ip| std::net::SocketAddr::new(ip, 0)).collect();
            builder = builder.resolve_to_addrs(host, &pinned);
        }
        let client = builder.build().map_err(WebhookError::Client)?;
        Ok(Self { client, url, attempts: 3, retry_delay: Duration::from_secs(1) })
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
                Ok(resp) if resp.status().is_redirection() => {
                    last = format!("HTTP {} (redirects are not followed)", resp.status().as_u16());
                    break;
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

    /// A notifier for a test listener on 127.0.0.1, which only `AllowPrivate` reaches.
    async fn local(url: &str) -> WebhookNotifier {
        WebhookNotifier::new(WebhookUrl::parse(url).unwrap(), EndpointPolicy::AllowPrivate, "the test URL")
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn webhook_receives_the_job_facts_as_json() {
        let (url, seen) = listener(StatusCode::NO_CONTENT).await;
        let notifier = local(&url).await;
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
        let notifier = local(&url).await.with_retries(2, Duration::from_millis(10));
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
        let url = format!("http://{addr}/hook/secret-token");
        assert!(!format!("{:?}", WebhookUrl::parse(&url).unwrap()).contains("secret-token"));
        let notifier = local(&url).await.with_retries(2, Duration::from_millis(10));
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

    #[tokio::test]
    async fn redirects_are_not_followed() {
        // The redirect target counts every request, whatever its method or path.
        let reached = Arc::new(Mutex::new(0));
        let count = reached.clone();
        let target = Router::new().fallback(move || {
            *count.lock().unwrap() += 1;
            async { StatusCode::NO_CONTENT }
        });
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_url = format!("http://{}/elsewhere", socket.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(socket, target).await });
        for status in [StatusCode::FOUND, StatusCode::TEMPORARY_REDIRECT] {
            let location = target_url.clone();
            let app = Router::new().route(
                "/hook/{token}",
                post(move || async move { (status, [(axum::http::header::LOCATION, location)]) }),
            );
            let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = socket.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(socket, app).await });
            let notifier = local(&format!("http://{addr}/hook/secret-token")).await;
            let outcome = notifier.notify(&message()).await;
            let expected = format!("HTTP {} (redirects are not followed)", status.as_u16());
            assert_eq!(outcome, NotifyOutcome::Failed { error: expected });
        }
        assert_eq!(*reached.lock().unwrap(), 0, "the redirect target got a request");
    }

    #[tokio::test]
    async fn a_private_url_is_refused_by_default_and_nothing_is_sent() {
        let (url, seen) = listener(StatusCode::NO_CONTENT).await;
        let what = "the webhook URL in Secret ml/hook key `url`";
        let err = WebhookNotifier::new(WebhookUrl::parse(&url).unwrap(), EndpointPolicy::PublicOnly, what)
            .await
            .unwrap_err();
        assert!(err.is_refusal());
        let text = err.to_string();
        assert!(text.starts_with(what) && text.contains("127.0.0.1, a loopback address"), "{text}");
        assert!(text.contains("--allow-private-endpoints") && !text.contains("secret-token"), "{text}");
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_checked_name_connects_to_the_checked_address_only() {
        let (url, seen) = listener(StatusCode::NO_CONTENT).await;
        let port = url::Url::parse(&url).unwrap().port().unwrap();
        // `.invalid` never resolves (RFC 6761): only the pinned address can be reached.
        let named = WebhookUrl::parse(&format!("http://webhook.invalid:{port}/hook/secret-token")).unwrap();
        let pinned = Checked::Resolved(vec!["127.0.0.1".parse().unwrap()]);
        let notifier = WebhookNotifier::connecting_to(named, pinned).unwrap();
        assert_eq!(notifier.notify(&message()).await, NotifyOutcome::Delivered { status: 204 });
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}
