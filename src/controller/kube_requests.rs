//! Counts every request the operator's Kubernetes client sends, by verb, resource and
//! subresource (`gputrainer_kube_requests_total`), as a layer of the client's middleware stack.
//! It shows how hard the operator leans on the API server, and in particular that an idle job
//! causes no writes: status is patched only when it changed.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use http::{Method, Request};

use crate::metrics::{KubeRequestLabels, Metrics};

/// Resources named in the metric; any other is `other`, so the label stays bounded.
const RESOURCES: [&str; 9] = [
    "trainingjobs",
    "gpuinstances",
    "events",
    "secrets",
    "leases",
    "namespaces",
    "customresourcedefinitions",
    "pods",
    "configmaps",
];

/// `(verb, resource, subresource)` of a request to the API server. Pure.
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> KubeRequestLabels {
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    // `/api/v1/...` or `/apis/<group>/<version>/...`
    let rest: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    // `namespaces/<ns>/<resource>/...`, except the namespaces themselves.
    let rest = match rest {
        ["namespaces", _ns, resource, more @ ..] => {
            let mut v = vec![*resource];
            v.extend_from_slice(more);
            v
        }
        other => other.to_vec(),
    };
    let resource =
        rest.first().and_then(|r| RESOURCES.iter().find(|k| **k == *r).copied()).unwrap_or("other");
    let named = rest.len() >= 2;
    let subresource = match rest.get(2) {
        None => "",
        Some(&"status") => "status",
        Some(_) => "other",
    };
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    };
    KubeRequestLabels { verb, resource, subresource }
}

/// The [`tower_layer::Layer`] that counts requests.
#[derive(Clone)]
pub struct CountRequestsLayer {
    metrics: Arc<Metrics>,
}

impl CountRequestsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower_layer::Layer<S> for CountRequestsLayer {
    type Service = CountRequests<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountRequests { inner, metrics: self.metrics.clone() }
    }
}

/// Counts each request, then passes it on unchanged.
#[derive(Clone)]
pub struct CountRequests<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> tower_service::Service<Request<B>> for CountRequests<S>
where
    S: tower_service::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let labels = classify(request.method(), request.uri().path(), request.uri().query());
        self.metrics.kube_requests.get_or_create(&labels).inc();
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: Method, path: &str, query: Option<&str>) -> (&'static str, &'static str, &'static str) {
        let l = classify(&method, path, query);
        (l.verb, l.resource, l.subresource)
    }

    #[test]
    fn requests_are_classified_by_verb_resource_and_subresource() {
        let jobs = "/apis/gputrainer.dev/v1alpha1/namespaces/ml/trainingjobs";
        assert_eq!(c(Method::GET, jobs, Some("watch=true&resourceVersion=5")), ("watch", "trainingjobs", ""));
        assert_eq!(c(Method::GET, jobs, None), ("list", "trainingjobs", ""));
        assert_eq!(c(Method::GET, &format!("{jobs}/lora"), None), ("get", "trainingjobs", ""));
        assert_eq!(
            c(Method::PATCH, &format!("{jobs}/lora/status"), Some("fieldManager=x&force=true")),
            ("patch", "trainingjobs", "status")
        );
        assert_eq!(
            c(Method::PATCH, "/apis/gputrainer.dev/v1alpha1/namespaces/ml/gpuinstances/lora-1", None),
            ("patch", "gpuinstances", "")
        );
        assert_eq!(
            c(Method::POST, "/apis/events.k8s.io/v1/namespaces/ml/events", None),
            ("create", "events", "")
        );
        assert_eq!(c(Method::GET, "/api/v1/namespaces/ml/secrets/lora-ssh", None), ("get", "secrets", ""));
        assert_eq!(c(Method::GET, "/api/v1/namespaces/kube-system", None), ("get", "namespaces", ""));
        assert_eq!(
            c(Method::PUT, "/apis/coordination.k8s.io/v1/namespaces/ml/leases/gpu-trainer", None),
            ("update", "leases", "")
        );
        assert_eq!(
            c(Method::GET, "/apis/gputrainer.dev/v1alpha1/trainingjobs", None),
            ("list", "trainingjobs", "")
        );
        assert_eq!(c(Method::DELETE, "/api/v1/namespaces/ml/services/x", None), ("delete", "other", ""));
        assert_eq!(c(Method::GET, "/version", None), ("list", "other", ""));
    }
}
