//! HTTP handlers of the fake: the API routes (matched by hand, so every request, known or not,
//! goes through the same auth, rate-limit, fault and logging steps) and the `/_fake` admin routes.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::faults::Fault;
use super::state::{FakeInstance, ForcedState, instance_row, now_epoch};
use super::{Inner, RequestRecord, Shared, query};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_fake/requests", get(get_requests).delete(clear_requests))
        .route("/_fake/counters", get(get_counters))
        .route("/_fake/faults", get(get_faults).post(post_faults).delete(delete_faults))
        .route("/_fake/instances/{id}/state", post(post_instance_state))
        .route("/_fake/state", get(get_state))
        .fallback(api)
        .with_state(shared)
}

/// An answer, rendered with exactly `application/json` for JSON (the CLI checks it verbatim).
enum Reply {
    Json(StatusCode, Value),
    Text(StatusCode, &'static str, String),
}

impl Reply {
    fn ok(v: Value) -> Self {
        Self::Json(StatusCode::OK, v)
    }

    fn error(status: StatusCode, code: &str, msg: impl Into<String>) -> Self {
        Self::Json(status, json!({"success": false, "error": code, "msg": msg.into()}))
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Json(s, _) | Self::Text(s, _, _) => *s,
        }
    }

    fn into_response(self, retry_after: Option<u64>) -> Response {
        let (status, content_type, body) = match self {
            Self::Json(s, v) => (s, "application/json", v.to_string()),
            Self::Text(s, ct, text) => (s, ct, text),
        };
        let mut response = (status, body).into_response();
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(secs) = retry_after {
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Route {
    GpuNames,
    CurrentUser,
    InstanceFilters,
    SearchOffers,
    SearchOffersGet,
    SearchAsks,
    CreateInstance(i64),
    ShowInstance(i64),
    UpdateInstance(i64),
    DestroyInstance(i64),
    DestroyInstances,
    ListInstances,
    ListInstancesV0,
    RebootInstance(i64),
    AttachSsh(i64),
    ShowInstanceSsh(i64),
    Unknown,
}

impl Route {
    fn parse(method: &Method, path: &str) -> Self {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let id = |s: &str| s.parse::<i64>().ok();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["api", "v0", "gpu_names", "unique"]) => Self::GpuNames,
            ("GET", ["api", "v0", "users", "current"]) => Self::CurrentUser,
            ("GET", ["api", "v0", "instances", "filters"]) => Self::InstanceFilters,
            ("POST", ["api", "v0", "bundles"]) => Self::SearchOffers,
            ("GET", ["api", "v0", "bundles"]) => Self::SearchOffersGet,
            ("PUT", ["api", "v0", "search", "asks"]) => Self::SearchAsks,
            ("PUT", ["api", "v0", "asks", n]) => id(n).map_or(Self::Unknown, Self::CreateInstance),
            ("GET", ["api", "v1", "instances"]) => Self::ListInstances,
            ("GET", ["api", "v0", "instances"]) => Self::ListInstancesV0,
            ("DELETE", ["api", "v0", "instances"]) => Self::DestroyInstances,
            ("GET", ["api", "v0", "instances", n]) => id(n).map_or(Self::Unknown, Self::ShowInstance),
            ("PUT", ["api", "v0", "instances", n]) => id(n).map_or(Self::Unknown, Self::UpdateInstance),
            ("DELETE", ["api", "v0", "instances", n]) => id(n).map_or(Self::Unknown, Self::DestroyInstance),
            ("PUT", ["api", "v0", "instances", "reboot", n]) => {
                id(n).map_or(Self::Unknown, Self::RebootInstance)
            }
            ("POST", ["api", "v0", "instances", n, "ssh"]) => id(n).map_or(Self::Unknown, Self::AttachSsh),
            ("GET", ["api", "v0", "instances", n, "ssh"]) => {
                id(n).map_or(Self::Unknown, Self::ShowInstanceSsh)
            }
            _ => Self::Unknown,
        }
    }

    /// The endpoint name used for rate limits, faults, logs and counters; the same names as the
    /// client's.
    fn name(self) -> &'static str {
        match self {
            Self::GpuNames => "gpu_names",
            Self::CurrentUser => "current_user",
            Self::InstanceFilters => "instance_filters",
            Self::SearchOffers | Self::SearchOffersGet | Self::SearchAsks => "search_offers",
            Self::CreateInstance(_) => "create_instance",
            Self::ShowInstance(_) => "show_instance",
            Self::UpdateInstance(_) => "update_instance",
            Self::DestroyInstance(_) => "destroy_instance",
            Self::DestroyInstances => "destroy_instances",
            Self::ListInstances => "list_instances",
            Self::ListInstancesV0 => "list_instances_v0",
            Self::RebootInstance(_) => "reboot_instance",
            Self::AttachSsh(_) => "attach_ssh",
            Self::ShowInstanceSsh(_) => "show_instance_ssh",
            Self::Unknown => "unknown",
        }
    }

    /// The CLI's start-up request and the documented search GET go without a key.
    fn anonymous(self) -> bool {
        matches!(self, Self::GpuNames | Self::SearchOffersGet)
    }
}

/// How the request authenticated: `bearer`, `query`, `invalid` or `none`, and whether it may
/// proceed.
fn authenticate(shared: &Shared, headers: &HeaderMap, params: &[(String, String)]) -> (&'static str, bool) {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let query_key = params.iter().find(|(k, _)| k == "api_key").map(|(_, v)| v.trim());
    let (kind, key) = match (bearer, query_key) {
        (Some(k), _) => ("bearer", k),
        (None, Some(k)) => ("query", k),
        (None, None) => return ("none", false),
    };
    let valid = match &shared.config.api_key {
        Some(expected) => key == expected,
        None => !key.is_empty(),
    };
    if valid { (kind, true) } else { ("invalid", false) }
}

async fn api(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let raw_query = uri.query().map(str::to_string);
    let params: Vec<(String, String)> = raw_query
        .as_deref()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let route = Route::parse(&method, &path);
    let endpoint = route.name();
    let body_json: Option<Value> = serde_json::from_slice(&body).ok();
    let (auth, authorized) = authenticate(&shared, &headers, &params);
    let authorized = authorized || route.anonymous();

    // Record the request on arrival, so one the client gave up on (and whose handler was dropped)
    // still shows, with status 0. Decide rate limit and faults under the lock; sleep (slow
    // fault) outside it.
    let (seq, decision, too_frequent) = {
        let mut inner = shared.lock();
        let seq = inner.log.len() as u64 + 1;
        inner.counters.total += 1;
        *inner.counters.arrived.entry(endpoint.to_string()).or_default() += 1;
        inner.log.push(RequestRecord {
            seq,
            method: method.to_string(),
            path,
            query: raw_query,
            endpoint: endpoint.to_string(),
            auth: auth.to_string(),
            status: 0,
            body: body_json.clone(),
            user_agent: headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_string),
            received_at: super::state::now_epoch(),
        });
        let (decision, too_frequent) = if !authorized {
            (Default::default(), false)
        } else {
            let interval = shared.config.rate_limit_interval;
            let now = tokio::time::Instant::now();
            let too_frequent = !interval.is_zero()
                && inner.last_call.get(endpoint).is_some_and(|last| now.duration_since(*last) < interval);
            if !too_frequent && !interval.is_zero() {
                inner.last_call.insert(endpoint.to_string(), now);
            }
            let decision = if too_frequent { Default::default() } else { inner.faults.decide(endpoint) };
            (decision, too_frequent)
        };
        (seq, decision, too_frequent)
    };
    let super::faults::Decision { delay, error_status, rate_limited } = decision;

    let mut retry_after = None;
    let reply = if !authorized {
        Reply::error(StatusCode::UNAUTHORIZED, "auth_error", "Invalid user key")
    } else if too_frequent {
        // Vast.ai's usual 429: plain text, no Retry-After.
        Reply::Text(
            StatusCode::TOO_MANY_REQUESTS,
            "text/plain",
            format!(
                "API requests too frequent: endpoint threshold={}",
                shared.config.rate_limit_interval.as_secs_f64()
            ),
        )
    } else if let Some(after) = rate_limited {
        retry_after = after;
        Reply::error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "API requests too frequent")
    } else if let Some(status) = error_status {
        injected_error(status)
    } else {
        dispatch(&shared, route, &params, body_json.as_ref())
    };

    // A slow answer: the work is done at once and only the answer is held back, which is the
    // case that matters for create (the client times out, yet the instance exists).
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let status = reply.status().as_u16();
    {
        let mut inner = shared.lock();
        *inner.counters.by_endpoint.entry(endpoint.to_string()).or_default().entry(status).or_default() += 1;
        // The log may have been cleared meanwhile; then there is nothing to update.
        if let Some(record) = inner.log.iter_mut().rev().find(|r| r.seq == seq) {
            record.status = status;
        }
    }
    tracing::debug!(endpoint, status, auth, "Fake Vast.ai request");
    reply.into_response(retry_after)
}

fn injected_error(status: u16) -> Reply {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match status.as_u16() {
        // What a proxy in front of the API answers: HTML, not JSON.
        502 | 504 => Reply::Text(status, "text/html", format!("<html><body><h1>{status}</h1></body></html>")),
        _ => Reply::error(status, "server_error", format!("injected fault {}", status.as_u16())),
    }
}

fn dispatch(shared: &Shared, route: Route, params: &[(String, String)], body: Option<&Value>) -> Reply {
    let mut inner = shared.lock();
    let settings = shared.row_settings(&inner);
    let now = now_epoch();
    let empty = Map::new();
    let body_map = body.and_then(Value::as_object).unwrap_or(&empty);
    match route {
        Route::GpuNames => {
            let mut names: Vec<&str> =
                inner.data.offers.iter().filter_map(|o| o.get("gpu_name")?.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            Reply::ok(json!({ "gpu_names": names }))
        }
        Route::CurrentUser => Reply::ok(json!({
            "id": 1, "username": "fake", "email": "fake@example.invalid", "fullname": "Fake User",
            "balance": 100.0, "credit": 100.0, "has_billing": true, "host_agreement_accepted": false,
            "ssh_key": null,
        })),
        Route::InstanceFilters => {
            let filters: Vec<Value> = inner
                .data
                .instances
                .values()
                .map(|i| instance_row(i, now, &settings))
                .map(|r| json!({"actual_status": r["actual_status"], "verification": r["verification"], "gpu_name": r["gpu_name"]}))
                .collect();
            Reply::ok(json!({ "filters": filters }))
        }
        Route::SearchOffers => search(&inner, body_map),
        Route::SearchAsks => match body_map.get("q").and_then(Value::as_object) {
            Some(q) => search(&inner, q),
            None => Reply::error(StatusCode::BAD_REQUEST, "invalid_args", "missing q"),
        },
        Route::SearchOffersGet => {
            let q = params
                .iter()
                .find(|(k, _)| k == "q")
                .and_then(|(_, v)| serde_json::from_str::<Value>(v).ok());
            match q.as_ref().and_then(Value::as_object) {
                Some(q) => search(&inner, q),
                None => search(&inner, &Map::new()),
            }
        }
        Route::CreateInstance(offer_id) => {
            let next = inner.data.next_id;
            let reply = create(&mut inner, offer_id, body_map, now);
            if inner.data.next_id != next {
                shared.assign_ssh_endpoint(&mut inner, next);
                shared.open_ssh_endpoint(&mut inner, next);
            }
            shared.persist(&inner);
            reply
        }
        Route::ShowInstance(id) => {
            // A missing or destroyed instance is `{"instances": null}` with 200, which both the
            // CLI and our client read as gone.
            let row = inner.data.instances.get(&id).map(|i| Value::Object(instance_row(i, now, &settings)));
            Reply::ok(json!({ "instances": row }))
        }
        Route::ListInstances => list_v1(&inner, &settings, params, shared.config.page_size, now),
        Route::ListInstancesV0 => {
            let rows: Vec<Value> = inner
                .data
                .instances
                .values()
                .map(|i| Value::Object(instance_row(i, now, &settings)))
                .collect();
            Reply::ok(json!({ "instances_found": rows.len(), "instances": rows }))
        }
        Route::UpdateInstance(id) => {
            let Some(inst) = inner.data.instances.get_mut(&id) else {
                return no_such_instance();
            };
            if let Some(label) = body_map.get("label") {
                match label {
                    Value::String(s) if s.chars().count() > 1024 => {
                        return Reply::error(StatusCode::BAD_REQUEST, "input_too_long", "label too long");
                    }
                    Value::String(s) => inst.label = Some(s.clone()),
                    Value::Null => inst.label = None,
                    _ => {
                        return Reply::error(
                            StatusCode::BAD_REQUEST,
                            "invalid_args",
                            "label must be a string",
                        );
                    }
                }
            }
            if let Some(state) = body_map.get("state").and_then(Value::as_str) {
                match state {
                    "running" | "stopped" => inst.intended_status = state.to_string(),
                    _ => return Reply::error(StatusCode::BAD_REQUEST, "invalid_args", "unknown state"),
                }
            }
            shared.persist(&inner);
            Reply::ok(json!({ "success": true }))
        }
        Route::DestroyInstance(id) => {
            if inner.data.instances.remove(&id).is_none() {
                return no_such_instance();
            }
            inner.data.mark_rented();
            shared.persist(&inner);
            Reply::ok(json!({ "success": true, "msg": format!("Instance {id} destroyed.") }))
        }
        Route::DestroyInstances => {
            let ids: Vec<i64> = body_map
                .get("instance_ids")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default();
            let destroyed: Vec<i64> =
                ids.into_iter().filter(|id| inner.data.instances.remove(id).is_some()).collect();
            inner.data.mark_rented();
            shared.persist(&inner);
            Reply::ok(json!({ "success": true, "destroyed": destroyed }))
        }
        Route::RebootInstance(id) => {
            if !inner.data.instances.contains_key(&id) {
                return no_such_instance();
            }
            Reply::ok(json!({ "success": true }))
        }
        Route::AttachSsh(id) => {
            let key = body_map.get("ssh_key").and_then(Value::as_str).map(str::trim).unwrap_or("");
            let looks_like_key = ["ssh-", "ecdsa-", "sk-"].iter().any(|p| key.starts_with(p));
            let Some(inst) = inner.data.instances.get_mut(&id) else {
                return no_such_instance();
            };
            if !looks_like_key {
                return Reply::error(StatusCode::BAD_REQUEST, "invalid_args", "Invalid SSH key");
            }
            inst.ssh_keys.push(key.to_string());
            if let Some(path) = &shared.config.authorized_keys_file {
                let written = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| writeln!(f, "{key}"));
                if let Err(error) = written {
                    tracing::error!(path = %path.display(), %error, "Failed to append to authorized_keys");
                }
            }
            shared.persist(&inner);
            Reply::ok(json!({ "success": true, "msg": "SSH key attached successfully" }))
        }
        Route::ShowInstanceSsh(id) => {
            let Some(inst) = inner.data.instances.get(&id) else {
                return no_such_instance();
            };
            let keys: Vec<Value> = inst
                .ssh_keys
                .iter()
                .enumerate()
                .map(|(n, k)| json!({"id": n + 1, "public_key": k}))
                .collect();
            // The API returns this list as a JSON-encoded string.
            Reply::ok(json!({ "success": true, "ssh_keys": Value::Array(keys).to_string() }))
        }
        Route::Unknown => Reply::error(StatusCode::NOT_FOUND, "not_found", "Unknown endpoint"),
    }
}

fn no_such_instance() -> Reply {
    Reply::error(StatusCode::NOT_FOUND, "no_such_instance", "Instance not found")
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Runs a search query: filters, price for the requested storage, order, limit.
fn search(inner: &Inner, q: &Map<String, Value>) -> Reply {
    let storage_gb = q.get("allocated_storage").and_then(number).unwrap_or(5.0);
    let mut rows: Vec<Map<String, Value>> = inner
        .data
        .offers
        .iter()
        .map(|offer| {
            let mut offer = offer.clone();
            let base = offer.get("dph_base").and_then(number).unwrap_or(0.0);
            let storage = offer.get("storage_cost").and_then(number).unwrap_or(0.0);
            // $/GB/month for the requested disk, per hour.
            let total = base + storage * storage_gb / 720.0;
            offer.insert("dph_total".into(), json!((total * 10_000.0).round() / 10_000.0));
            offer
        })
        .filter(|offer| query::matches(offer, q))
        .collect();
    let aliases = |f: &str| match f {
        "dph" => "dph_total".to_string(),
        "cuda_vers" => "cuda_max_good".to_string(),
        other => other.to_string(),
    };
    let order: Vec<(String, bool)> = match q.get("order").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter_map(|item| {
                let pair = item.as_array()?;
                let field = aliases(pair.first()?.as_str()?);
                let desc = pair.get(1).and_then(Value::as_str) == Some("desc");
                Some((field, desc))
            })
            .collect(),
        None => vec![("score".to_string(), true)],
    };
    query::sort(&mut rows, &order);
    if let Some(limit) = q.get("limit").and_then(number).filter(|l| *l > 0.0) {
        rows.truncate(limit as usize);
    }
    Reply::ok(json!({ "offers": rows }))
}

fn create(inner: &mut Inner, offer_id: i64, body: &Map<String, Value>, now: f64) -> Reply {
    let Some(offer) =
        inner.data.offer(offer_id).filter(|o| o.get("rented") != Some(&Value::Bool(true))).cloned()
    else {
        return Reply::Json(
            StatusCode::NOT_FOUND,
            json!({"success": false, "error": "invalid_args", "ask_id": offer_id,
                   "msg": format!("error 404/3603: no_such_ask  Instance type by id {offer_id} is not available.")}),
        );
    };
    let image = body.get("image").and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty());
    let template = body.get("template_hash_id").and_then(Value::as_str);
    if image.is_none() && template.is_none() {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "invalid_args",
            "Invalid image: an image or template is required",
        );
    }
    let disk = body.get("disk").and_then(number).unwrap_or(10.0);
    if disk <= 0.0 {
        return Reply::error(StatusCode::BAD_REQUEST, "invalid_args", "disk must be positive");
    }
    let env: BTreeMap<String, String> = body
        .get("env")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    let id = inner.data.next_id;
    inner.data.next_id += 1;
    inner.data.instances.insert(
        id,
        FakeInstance {
            id,
            offer,
            created_at: now,
            label: text("label"),
            image: image.map(str::to_string).or_else(|| template.map(str::to_string)),
            disk,
            env,
            onstart: text("onstart"),
            runtype: text("runtype"),
            args: body.get("args").cloned(),
            bid_price: body.get("price").and_then(number),
            intended_status: "running".into(),
            forced: None,
            ssh_keys: Vec::new(),
            ssh_port: None,
            ssh_upstream: None,
        },
    );
    inner.data.mark_rented();
    tracing::info!(instance.id = id, offer.id = offer_id, "Fake Vast.ai rented an offer");
    if let Some((status, report_contract)) = inner.faults.take_create_failure() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = json!({"success": false, "error": "internal_error",
                              "msg": "Internal error while starting the instance"});
        if report_contract {
            body["new_contract"] = json!(id);
        }
        return Reply::Json(status, body);
    }
    Reply::ok(json!({ "success": true, "new_contract": id }))
}

fn list_v1(
    inner: &Inner,
    settings: &super::state::RowSettings,
    params: &[(String, String)],
    page_size: usize,
    now: f64,
) -> Reply {
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let bad = |msg: String| {
        Reply::Json(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "msg": format!("Error in query parameters: {msg}")}),
        )
    };
    let filters = match param("select_filters").map(serde_json::from_str::<Value>) {
        None => Map::new(),
        Some(Ok(Value::Object(map))) => map,
        Some(_) => return bad("select_filters must be a JSON object".into()),
    };
    let order: Vec<(String, bool)> = match param("order_by").map(serde_json::from_str::<Value>) {
        None => vec![("id".into(), false)],
        Some(Ok(Value::Array(items))) => items
            .iter()
            .filter_map(|i| {
                Some((
                    i.get("col")?.as_str()?.to_string(),
                    i.get("dir").and_then(Value::as_str) == Some("desc"),
                ))
            })
            .collect(),
        Some(_) => return bad("order_by must be a JSON list".into()),
    };
    let limit = match param("limit").map(str::parse::<i64>) {
        None => page_size,
        Some(Ok(n)) if n <= 0 => 5,
        Some(Ok(n)) => (n as usize).min(page_size),
        Some(Err(_)) => return bad("limit must be an integer".into()),
    };
    let offset = match param("after_token") {
        None | Some("") => 0,
        Some(token) => match decode_token(token) {
            Some(offset) => offset,
            None => {
                return Reply::Json(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_token", "msg": "Error in query parameters: invalid after_token"}),
                );
            }
        },
    };
    let all: Vec<Map<String, Value>> =
        inner.data.instances.values().map(|i| instance_row(i, now, settings)).collect();
    let mut label_counts: BTreeMap<String, u64> = BTreeMap::new();
    for row in &all {
        *label_counts
            .entry(row.get("label").and_then(Value::as_str).unwrap_or("").to_string())
            .or_default() += 1;
    }
    let mut rows: Vec<Map<String, Value>> = all.into_iter().filter(|r| query::matches(r, &filters)).collect();
    query::sort(&mut rows, &order);
    let total = rows.len();
    let page: Vec<Value> = rows.into_iter().skip(offset).take(limit).map(Value::Object).collect();
    let next = offset + page.len();
    let next_token = (next < total).then(|| encode_token(next));
    Reply::ok(json!({
        "success": true, "instances_found": page.len(), "total_instances": total,
        "label_counts": label_counts, "next_token": next_token, "instances": page,
    }))
}

/// Page tokens are opaque to clients: hex of a small JSON object.
fn encode_token(offset: usize) -> String {
    hex::encode(json!({ "offset": offset }).to_string())
}

fn decode_token(token: &str) -> Option<usize> {
    let bytes = hex::decode(token).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    usize::try_from(value.get("offset")?.as_u64()?).ok()
}

// Admin routes.

async fn get_requests(State(shared): State<Arc<Shared>>) -> Response {
    Reply::ok(json!(shared.lock().log)).into_response(None)
}

async fn clear_requests(State(shared): State<Arc<Shared>>) -> Response {
    let mut inner = shared.lock();
    inner.log.clear();
    inner.counters = Default::default();
    Reply::ok(json!({"success": true})).into_response(None)
}

async fn get_counters(State(shared): State<Arc<Shared>>) -> Response {
    Reply::ok(json!(shared.lock().counters)).into_response(None)
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Response {
    Reply::ok(json!(shared.lock().faults.active)).into_response(None)
}

/// Accepts one fault or a list of them.
async fn post_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let faults = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(list)) => {
            list.into_iter().map(serde_json::from_value::<Fault>).collect::<Result<Vec<_>, _>>()
        }
        Ok(other) => serde_json::from_value::<Fault>(other).map(|f| vec![f]),
        Err(e) => Err(e),
    };
    match faults {
        Ok(faults) => {
            let added = faults.len();
            for fault in faults {
                shared.add_fault(fault);
            }
            Reply::ok(json!({"success": true, "added": added})).into_response(None)
        }
        Err(e) => Reply::error(StatusCode::BAD_REQUEST, "invalid_fault", e.to_string()).into_response(None),
    }
}

async fn delete_faults(State(shared): State<Arc<Shared>>) -> Response {
    shared.lock().faults.active.clear();
    Reply::ok(json!({"success": true})).into_response(None)
}

async fn post_instance_state(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<i64>,
    body: Bytes,
) -> Response {
    #[derive(serde::Deserialize)]
    struct Body {
        state: ForcedState,
        #[serde(default)]
        after_secs: f64,
    }
    match serde_json::from_slice::<Body>(&body) {
        Ok(Body { state, after_secs }) => {
            if !shared.lock().data.instances.contains_key(&id) {
                return no_such_instance().into_response(None);
            }
            shared.add_fault(Fault::InstanceBecomes { id, state, after_secs });
            Reply::ok(json!({"success": true})).into_response(None)
        }
        Err(e) => Reply::error(StatusCode::BAD_REQUEST, "invalid_args", e.to_string()).into_response(None),
    }
}

async fn get_state(State(shared): State<Arc<Shared>>) -> Response {
    let inner = shared.lock();
    let settings = shared.row_settings(&inner);
    let now = now_epoch();
    let instances: Vec<Value> =
        inner.data.instances.values().map(|i| Value::Object(instance_row(i, now, &settings))).collect();
    Reply::ok(json!({"instances": instances, "offers": inner.data.offers, "next_id": inner.data.next_id}))
        .into_response(None)
}
