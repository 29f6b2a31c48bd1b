//! A [`GpuProvider`] decorator that counts every call by operation and outcome and measures its
//! latency, so `/metrics` shows how hard the operator leans on the provider.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::metrics::{Metrics, ProviderLabels};
use crate::provider::{GpuProvider, Instance, InstanceId, LaunchRequest, Offer, OfferQuery, Result};

pub struct MeteredProvider {
    inner: Arc<dyn GpuProvider>,
    metrics: Arc<Metrics>,
}

impl MeteredProvider {
    pub fn new(inner: Arc<dyn GpuProvider>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn measure<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        let result = call.await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(err) => err.category(),
        };
        let labels = ProviderLabels { operation, outcome };
        self.metrics.provider_requests.get_or_create(&labels).inc();
        self.metrics.provider_request_duration.get_or_create(&labels).observe(start.elapsed().as_secs_f64());
        result
    }
}

#[async_trait]
impl GpuProvider for MeteredProvider {
    async fn check_credentials(&self) -> Result<()> {
        self.measure("check_credentials", self.inner.check_credentials()).await
    }

    async fn search_offers(&self, query: &OfferQuery) -> Result<Vec<Offer>> {
        self.measure("search_offers", self.inner.search_offers(query)).await
    }

    async fn create_instance(&self, request: &LaunchRequest) -> Result<InstanceId> {
        self.measure("create_instance", self.inner.create_instance(request)).await
    }

    async fn get_instance(&self, id: InstanceId) -> Result<Instance> {
        self.measure("get_instance", self.inner.get_instance(id)).await
    }

    async fn list_instances(&self) -> Result<Vec<Instance>> {
        self.measure("list_instances", self.inner.list_instances()).await
    }

    async fn list_instances_by_label(&self, label: &str) -> Result<Vec<Instance>> {
        self.measure("list_instances_by_label", self.inner.list_instances_by_label(label)).await
    }

    async fn destroy_instance(&self, id: InstanceId) -> Result<()> {
        self.measure("destroy_instance", self.inner.destroy_instance(id)).await
    }

    async fn set_label(&self, id: InstanceId, label: &str) -> Result<()> {
        self.measure("set_label", self.inner.set_label(id, label)).await
    }

    async fn attach_ssh_key(&self, id: InstanceId, public_key: &str) -> Result<()> {
        self.measure("attach_ssh_key", self.inner.attach_ssh_key(id, public_key)).await
    }
}
