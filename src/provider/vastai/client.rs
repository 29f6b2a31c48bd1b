//! The Vast.ai REST client: Bearer auth, timeouts, per-endpoint spacing, retries, and the
//! mapping of HTTP outcomes onto [`provider::Error`](crate::provider::Error).
//!
//! Create is the one call that costs money, so it is retried only when the request certainly did
//! not take effect (429, connection refused); after a 5xx or a timeout the caller must look for
//! the instance by label instead of renting twice.

use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::Retryable;
use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tracing::{debug, info, warn};
use url::Url;

use super::limiter::Limiter;
use super::retry::{self, MAX_RETRY_AFTER, RetryPolicy};
use super::wire::{
    CreateRequest, CreateResponse, ListInstancesPage, OffersResponse, ShowInstanceResponse, StatusResponse,
};
use crate::provider::config::{ApiKey, ProviderConfig};
use crate::provider::{
    Error, GpuProvider, Instance, InstanceId, LaunchRequest, Offer, OfferOrder, OfferQuery, Result,
};

/// Endpoint names: limiter keys, log fields and error context.
pub mod endpoint {
    pub const CURRENT_USER: &str = "current_user";
    pub const SEARCH_OFFERS: &str = "search_offers";
    pub const CREATE_INSTANCE: &str = "create_instance";
    pub const SHOW_INSTANCE: &str = "show_instance";
    pub const LIST_INSTANCES: &str = "list_instances";
    pub const DESTROY_INSTANCE: &str = "destroy_instance";
    pub const UPDATE_INSTANCE: &str = "update_instance";
    pub const ATTACH_SSH: &str = "attach_ssh";
}

/// Page size of the v1 instance listing (the API's maximum).
const PAGE_SIZE: u32 = 25;
/// A listing longer than this many pages is a server bug, not an account.
const MAX_PAGES: usize = 10_000;

/// Knobs of the client; the defaults suit the real API.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Whole-request timeout (the official client uses 120 s; listings are fast, so less).
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub retry: RetryPolicy,
    /// Minimum time between two calls to the same endpoint.
    pub min_interval: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            min_interval: Duration::from_millis(250),
        }
    }
}

/// A Vast.ai API client. Cheap to share behind an `Arc`.
pub struct VastClient {
    http: reqwest::Client,
    base_url: Url,
    auth: HeaderValue,
    retry: RetryPolicy,
    limiter: Limiter,
}

impl fmt::Debug for VastClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The Authorization value is deliberately left out.
        f.debug_struct("VastClient").field("base_url", &self.base_url.as_str()).finish_non_exhaustive()
    }
}

/// One HTTP answer, after retries.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Bytes,
}

/// Why one attempt should (maybe) be repeated.
enum AttemptError {
    Response(Reply),
    Transport(reqwest::Error),
}

impl AttemptError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Response(r) => r.retry_after,
            Self::Transport(_) => None,
        }
    }

    /// Whether the request certainly had no effect at the provider.
    fn certainly_not_applied(&self) -> bool {
        match self {
            Self::Response(r) => r.status == StatusCode::TOO_MANY_REQUESTS,
            Self::Transport(e) => e.is_connect(),
        }
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Response(r) => write!(f, "HTTP {}", r.status.as_u16()),
            Self::Transport(e) => write!(f, "{}", describe_transport(e)),
        }
    }
}

fn describe_transport(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    }
}

impl VastClient {
    /// A client for `base_url` (no trailing slash needed) authenticating with `api_key`.
    pub fn new(base_url: Url, api_key: &ApiKey, options: ClientOptions) -> Result<Self> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", api_key.expose())).map_err(|_| {
            Error::Unauthorized {
                message: "the API key contains characters not allowed in an HTTP header".into(),
            }
        })?;
        // Keeps the value out of hyper's and reqwest's own debug output.
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.connect_timeout)
            .user_agent(concat!("gpu-trainer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::InvalidRequest {
                endpoint: "client",
                message: format!("failed to build the HTTP client: {}", e.without_url()),
            })?;
        let base_url = Url::parse(base_url.as_str().trim_end_matches('/')).unwrap_or(base_url);
        Ok(Self { http, base_url, auth, retry: options.retry, limiter: Limiter::new(options.min_interval) })
    }

    /// A client from the `VASTAI_*` configuration.
    pub fn from_config(config: &ProviderConfig) -> Result<Self> {
        Self::new(config.base_url.clone(), &config.api_key, ClientOptions::default())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url.as_str().trim_end_matches('/'))
    }

    /// Sends one call with spacing and retries. HTTP answers of any status come back as a
    /// [`Reply`]; only transport failures that outlived the retries are errors.
    async fn send(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        idempotent: bool,
    ) -> Result<Reply> {
        let url = self.url(path);
        let attempt = || async {
            self.limiter.acquire(endpoint).await;
            let started = Instant::now();
            let mut request =
                self.http.request(method.clone(), &url).header(AUTHORIZATION, self.auth.clone()).query(query);
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(AttemptError::Transport)?;
            let status = response.status();
            let retry_after = retry::retry_after(response.headers());
            let body = response.bytes().await.map_err(AttemptError::Transport)?;
            debug!(
                endpoint,
                status = status.as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Vast.ai call"
            );
            let reply = Reply { status, retry_after, body };
            if retry::is_retryable_status(status) { Err(AttemptError::Response(reply)) } else { Ok(reply) }
        };
        let result = attempt
            .retry(self.retry.backoff())
            .sleep(tokio::time::sleep)
            .when(|e: &AttemptError| idempotent || e.certainly_not_applied())
            .adjust(|e: &AttemptError, backoff: Option<Duration>| match (e.retry_after(), backoff) {
                // Attempts used up.
                (_, None) => None,
                (Some(wait), Some(_)) if wait > MAX_RETRY_AFTER => None,
                (Some(wait), Some(_)) => Some(wait),
                (None, backoff) => backoff,
            })
            .notify(|e: &AttemptError, delay: Duration| {
                warn!(endpoint, error = %e, delay_ms = delay.as_millis() as u64, "Retrying Vast.ai call");
            })
            .await;
        match result {
            Ok(reply) | Err(AttemptError::Response(reply)) => Ok(reply),
            Err(AttemptError::Transport(e)) => Err(Error::Transient {
                endpoint,
                message: describe_transport(&e).to_string(),
                source: Some(Box::new(e.without_url())),
            }),
        }
    }

    async fn get_json(&self, endpoint: &'static str, path: &str, query: &[(&str, String)]) -> Result<Reply> {
        self.send(endpoint, Method::GET, path, query, None, true).await
    }

    /// Current user; the cheapest authenticated call.
    pub async fn current_user(&self) -> Result<Value> {
        let reply = self.get_json(endpoint::CURRENT_USER, "/api/v0/users/current", &[]).await?;
        if !reply.status.is_success() {
            return Err(classify(endpoint::CURRENT_USER, &reply, "user"));
        }
        decode(endpoint::CURRENT_USER, &reply.body)
    }

    async fn list_with_filters(&self, filters: &Value) -> Result<Vec<Instance>> {
        let mut instances = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut query = vec![
                ("select_filters", filters.to_string()),
                ("order_by", json!([{"col": "id", "dir": "asc"}]).to_string()),
                ("limit", PAGE_SIZE.to_string()),
            ];
            if let Some(token) = &token {
                query.push(("after_token", token.clone()));
            }
            let reply = self.get_json(endpoint::LIST_INSTANCES, "/api/v1/instances/", &query).await?;
            if !reply.status.is_success() {
                return Err(classify(endpoint::LIST_INSTANCES, &reply, "instance listing"));
            }
            let page: ListInstancesPage = decode(endpoint::LIST_INSTANCES, &reply.body)?;
            for row in page.instances {
                instances.push(Instance::try_from(row).map_err(|e| unexpected(endpoint::LIST_INSTANCES, e))?);
            }
            match page.next_token.filter(|t| !t.is_empty()) {
                Some(next) if Some(&next) == token.as_ref() => {
                    return Err(unexpected(
                        endpoint::LIST_INSTANCES,
                        "the listing returned the same page token twice",
                    ));
                }
                Some(next) => token = Some(next),
                None => return Ok(instances),
            }
        }
        Err(unexpected(endpoint::LIST_INSTANCES, format!("the listing did not end after {MAX_PAGES} pages")))
    }

    async fn create_contract(&self, request: &LaunchRequest) -> Result<InstanceId> {
        let ep = endpoint::CREATE_INSTANCE;
        let body = CreateRequest {
            client_id: "me",
            image: &request.image,
            disk: f64::from(request.disk_gb),
            label: request.label.as_deref(),
            onstart: request.onstart.as_deref(),
            env: &request.env,
            price: request.bid_price_per_hour,
            // The API spells direct SSH `ssh_direc`; the proxy is the fallback on hosts without
            // open ports.
            runtype: if request.ssh { "ssh_direc ssh_proxy" } else { "args" },
            image_login: None,
            python_utf8: false,
            lang_utf8: false,
            use_jupyter_lab: false,
            jupyter_dir: None,
            force: false,
            cancel_unavail: false,
        };
        let body = serde_json::to_value(&body).map_err(|e| unexpected(ep, e))?;
        let path = format!("/api/v0/asks/{}/", request.offer_id);
        let reply = self.send(ep, Method::PUT, &path, &[], Some(&body), false).await?;
        let parsed: CreateResponse = serde_json::from_slice(&reply.body).unwrap_or_default();
        let failure = if reply.status.is_success() {
            match (parsed.success, parsed.new_contract) {
                (Some(true) | None, Some(id)) => return Ok(InstanceId(id)),
                (Some(true) | None, None) => {
                    return Err(unexpected(ep, "the create response has no new_contract"));
                }
                (Some(false), _) => {
                    create_failure(request.offer_id, reply.status, &parsed).unwrap_or_else(|| {
                        Error::InvalidRequest { endpoint: ep, message: message_of(&reply.body) }
                    })
                }
            }
        } else {
            create_failure(request.offer_id, reply.status, &parsed)
                .unwrap_or_else(|| classify(ep, &reply, "offer"))
        };
        match parsed.new_contract {
            Some(id) => {
                Err(Error::ContractLeftBehind { instance_id: InstanceId(id), source: Box::new(failure) })
            }
            None => Err(failure),
        }
    }
}

/// Offer-specific create failures (`no_such_ask`: the offer is gone).
fn create_failure(offer_id: i64, status: StatusCode, parsed: &CreateResponse) -> Option<Error> {
    let text = format!("{} {}", parsed.error.as_deref().unwrap_or(""), parsed.msg.as_deref().unwrap_or(""));
    let gone = text.contains("no_such_ask") || status == StatusCode::GONE;
    gone.then(|| Error::OfferUnavailable { offer_id, message: parsed.msg.clone().unwrap_or_default() })
}

/// Maps a non-success HTTP answer to an error. `what` names the object for NotFound.
fn classify(endpoint: &'static str, reply: &Reply, what: &str) -> Error {
    let message = message_of(&reply.body);
    match reply.status.as_u16() {
        401 | 403 => Error::Unauthorized { message },
        404 | 410 => Error::NotFound { what: what.to_string() },
        429 => Error::RateLimited { endpoint, retry_after: reply.retry_after },
        400..=499 => Error::InvalidRequest { endpoint, message },
        code => Error::Transient { endpoint, message: format!("HTTP {code}: {message}"), source: None },
    }
}

/// The human part of an error body: `msg`, `message`, `detail` or `error`, else the start of the
/// text.
fn message_of(body: &[u8]) -> String {
    if let Ok(parsed) = serde_json::from_slice::<StatusResponse>(body)
        && let Some(text) = parsed.msg.or(parsed.error)
    {
        return truncate(&text);
    }
    truncate(String::from_utf8_lossy(body).trim())
}

fn truncate(text: &str) -> String {
    const MAX: usize = 300;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(endpoint: &'static str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| unexpected(endpoint, e))
}

fn unexpected(endpoint: &'static str, e: impl fmt::Display) -> Error {
    Error::UnexpectedResponse { endpoint, message: e.to_string() }
}

/// The search body, shaped like the official CLI's query object.
pub fn search_body(q: &OfferQuery) -> Value {
    let mut body = serde_json::Map::new();
    let mut put = |field: &str, op: &str, value: Value| {
        body.insert(field.to_string(), json!({ op: value }));
    };
    if q.verified_only {
        put("verified", "eq", json!(true));
    }
    put("external", "eq", json!(false));
    put("rentable", "eq", json!(true));
    put("rented", "eq", json!(false));
    if !q.gpu_names.is_empty() {
        put("gpu_name", "in", json!(q.gpu_names.iter().map(|n| n.replace('_', " ")).collect::<Vec<_>>()));
    }
    if let Some(n) = q.num_gpus {
        put("num_gpus", "eq", json!(n));
    }
    if let Some(gb) = q.min_vram_gb {
        // The API's own CLI converts GB to MB by ×1000.
        put("gpu_ram", "gte", json!(gb * 1000.0));
    }
    if let Some(max) = q.max_price_per_hour {
        put("dph_total", "lte", json!(max));
    }
    if let Some(min) = q.min_reliability {
        put("reliability", "gte", json!(min));
    }
    // The filter takes country codes only; continent names are left to offer selection.
    if !q.regions.is_empty() && q.regions.iter().all(|r| r.len() == 2) {
        put("geolocation", "in", json!(q.regions.iter().map(|r| r.to_ascii_uppercase()).collect::<Vec<_>>()));
    }
    if let Some(disk) = q.min_disk_gb {
        put("disk_space", "gte", json!(disk));
    }
    if let Some(cuda) = q.min_cuda {
        put("cuda_max_good", "gte", json!(cuda));
    }
    if let Some(down) = q.min_inet_down_mbps {
        put("inet_down", "gte", json!(down));
    }
    let order = match q.order {
        OfferOrder::PriceAsc => json!([["dph_total", "asc"]]),
        OfferOrder::ScoreDesc => json!([["score", "desc"]]),
        OfferOrder::ReliabilityDesc => json!([["reliability", "desc"]]),
    };
    body.insert("order".into(), order);
    body.insert("type".into(), json!("on-demand"));
    if let Some(limit) = q.limit {
        body.insert("limit".into(), json!(limit));
    }
    body.insert("allocated_storage".into(), json!(q.min_disk_gb.unwrap_or(5.0)));
    Value::Object(body)
}

/// A `{"success": false, "error": "no_such_instance"}` answer.
fn says_no_such_instance(body: &[u8]) -> bool {
    serde_json::from_slice::<StatusResponse>(body).is_ok_and(|r| {
        let text =
            format!("{} {}", r.error.unwrap_or_default(), r.msg.unwrap_or_default()).to_ascii_lowercase();
        text.contains("no_such_instance") || text.contains("not_found") || text.contains("not found")
    })
}

/// Maps an instance mutation's answer: 2xx with `success` not false is done.
fn mutation_result(endpoint: &'static str, reply: &Reply, id: InstanceId) -> Result<()> {
    let what = format!("instance {id}");
    if reply.status == StatusCode::NOT_FOUND {
        return Err(Error::NotFound { what });
    }
    if !reply.status.is_success() {
        return Err(classify(endpoint, reply, &what));
    }
    match serde_json::from_slice::<StatusResponse>(&reply.body) {
        Ok(StatusResponse { success: Some(false), .. }) if says_no_such_instance(&reply.body) => {
            Err(Error::NotFound { what })
        }
        Ok(StatusResponse { success: Some(false), .. }) => {
            Err(Error::InvalidRequest { endpoint, message: message_of(&reply.body) })
        }
        _ => Ok(()),
    }
}

#[async_trait]
impl GpuProvider for VastClient {
    async fn check_credentials(&self) -> Result<()> {
        match self.current_user().await {
            Err(Error::Unauthorized { message }) => Err(Error::Unauthorized {
                message: format!("Vast.ai rejected the API key (VASTAI_API_KEY): {message}"),
            }),
            Err(Error::NotFound { .. }) => Err(Error::Unauthorized {
                message: "Vast.ai does not know the user of this API key (VASTAI_API_KEY)".into(),
            }),
            other => other.map(|_| ()),
        }
    }

    async fn search_offers(&self, query: &OfferQuery) -> Result<Vec<Offer>> {
        let ep = endpoint::SEARCH_OFFERS;
        let body = search_body(query);
        let reply = self.send(ep, Method::POST, "/api/v0/bundles/", &[], Some(&body), true).await?;
        if !reply.status.is_success() {
            return Err(classify(ep, &reply, "offer search"));
        }
        let parsed: OffersResponse = decode(ep, &reply.body)?;
        let total = parsed.offers.len();
        let offers: Vec<Offer> = parsed.offers.into_iter().filter_map(|w| Offer::try_from(w).ok()).collect();
        if offers.len() < total {
            warn!(
                endpoint = ep,
                skipped = total - offers.len(),
                "Skipped offers without id, machine, GPU or price"
            );
        }
        debug!(endpoint = ep, offers = offers.len(), "Searched offers");
        Ok(offers)
    }

    async fn create_instance(&self, request: &LaunchRequest) -> Result<InstanceId> {
        let id = self.create_contract(request).await?;
        info!(instance.id = %id, offer.id = request.offer_id, label = request.label.as_deref(), "Created Vast.ai instance");
        if let Some(key) = &request.ssh_public_key
            && let Err(source) = self.attach_ssh_key(id, key).await
        {
            return Err(Error::ContractLeftBehind { instance_id: id, source: Box::new(source) });
        }
        Ok(id)
    }

    async fn get_instance(&self, id: InstanceId) -> Result<Instance> {
        let ep = endpoint::SHOW_INSTANCE;
        let path = format!("/api/v0/instances/{id}/");
        let reply = self.get_json(ep, &path, &[("owner", "me".to_string())]).await?;
        let what = format!("instance {id}");
        if !reply.status.is_success() {
            return Err(classify(ep, &reply, &what));
        }
        let parsed: ShowInstanceResponse = decode(ep, &reply.body)?;
        // A destroyed instance comes back as `{"instances": null}`.
        let row = parsed.instances.ok_or(Error::NotFound { what })?;
        Instance::try_from(row).map_err(|e| unexpected(ep, e))
    }

    async fn list_instances(&self) -> Result<Vec<Instance>> {
        self.list_with_filters(&json!({})).await
    }

    async fn list_instances_by_label(&self, label: &str) -> Result<Vec<Instance>> {
        let mut instances = self.list_with_filters(&json!({"label": {"eq": label}})).await?;
        // The server filters too; this guards against a filter it ignored.
        instances.retain(|i| i.label.as_deref() == Some(label));
        Ok(instances)
    }

    async fn destroy_instance(&self, id: InstanceId) -> Result<()> {
        let ep = endpoint::DESTROY_INSTANCE;
        let path = format!("/api/v0/instances/{id}/");
        let reply = self.send(ep, Method::DELETE, &path, &[], Some(&json!({})), true).await?;
        match mutation_result(ep, &reply, id) {
            Ok(()) => {
                info!(instance.id = %id, "Destroyed Vast.ai instance");
                Ok(())
            }
            Err(e) if e.is_not_found() => {
                debug!(instance.id = %id, "Vast.ai instance already gone");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn set_label(&self, id: InstanceId, label: &str) -> Result<()> {
        let ep = endpoint::UPDATE_INSTANCE;
        let path = format!("/api/v0/instances/{id}/");
        let reply = self.send(ep, Method::PUT, &path, &[], Some(&json!({ "label": label })), true).await?;
        mutation_result(ep, &reply, id)
    }

    async fn attach_ssh_key(&self, id: InstanceId, public_key: &str) -> Result<()> {
        let ep = endpoint::ATTACH_SSH;
        let path = format!("/api/v0/instances/{id}/ssh/");
        let reply =
            self.send(ep, Method::POST, &path, &[], Some(&json!({ "ssh_key": public_key })), true).await?;
        mutation_result(ep, &reply, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_body_matches_the_cli_shape() {
        let q = OfferQuery {
            gpu_names: vec!["RTX_4090".into()],
            num_gpus: Some(1),
            min_vram_gb: Some(20.0),
            min_reliability: Some(0.98),
            regions: vec!["us".into(), "CA".into()],
            verified_only: true,
            limit: Some(5),
            ..OfferQuery::default()
        };
        let body = search_body(&q);
        assert_eq!(body["gpu_name"], json!({"in": ["RTX 4090"]}));
        assert_eq!(body["gpu_ram"], json!({"gte": 20000.0}));
        assert_eq!(body["geolocation"], json!({"in": ["US", "CA"]}));
        assert_eq!(body["verified"], json!({"eq": true}));
        assert_eq!(body["order"], json!([["dph_total", "asc"]]));
        assert_eq!(body["type"], json!("on-demand"));
        assert_eq!(body["limit"], json!(5));
        assert_eq!(body["allocated_storage"], json!(5.0));
    }

    #[test]
    fn continents_are_not_sent_as_country_filters() {
        let q = OfferQuery { regions: vec!["Europe".into()], ..OfferQuery::default() };
        assert!(search_body(&q).get("geolocation").is_none());
    }

    #[test]
    fn error_messages_come_from_any_known_key_or_text() {
        assert_eq!(
            message_of(br#"{"success":false,"error":"x","msg":"Invalid user key"}"#),
            "Invalid user key"
        );
        assert_eq!(message_of(br#"{"detail":"API requests too frequent"}"#), "API requests too frequent");
        assert_eq!(
            message_of(b"API requests too frequent: endpoint threshold=4.5"),
            "API requests too frequent: endpoint threshold=4.5"
        );
        assert_eq!(message_of(&[b'a'; 400]).len(), 303);
    }
}
