//! The operator's HTTP endpoints: `/healthz` (the process is alive), `/readyz` (start-up
//! finished: credentials checked, watches started) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// What the endpoints report on.
#[derive(Clone)]
pub struct HealthState {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
}

/// The router, separate from binding so tests can call it without a port.
pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HealthState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(State(state): State<HealthState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.encode())
}

/// Binds the endpoints' listener; a separate step so start-up fails early on a busy port and
/// tests can bind port 0.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves the endpoints until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HealthState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_report_health_readiness_and_metrics() {
        let state =
            HealthState { metrics: Arc::new(Metrics::new()), ready: Arc::new(AtomicBool::new(false)) };
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, state.clone(), stop_rx));
        let http = reqwest::Client::new();
        let get = |path: &str| http.get(format!("http://{addr}{path}")).send();

        assert_eq!(get("/healthz").await.unwrap().status(), 200);
        assert_eq!(get("/readyz").await.unwrap().status(), 503);
        state.ready.store(true, Ordering::Relaxed);
        assert_eq!(get("/readyz").await.unwrap().status(), 200);
        let body = get("/metrics").await.unwrap().text().await.unwrap();
        assert!(body.contains("gputrainer_instance_termination_stuck"), "{body}");

        stop.send_replace(true);
        server.await.unwrap().unwrap();
    }
}
