//! What every reconciler shares: the Kubernetes client, the provider, the SSH reachability
//! check, configuration, metrics and the event recorder.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

use crate::machine::SshProbe;
use crate::metrics::Metrics;
use crate::provider::GpuProvider;
use crate::provider::config::ProviderConfig;

/// Operator-wide settings (flags and environment of `gpu-trainer run`).
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// 8 hex characters that mark this installation's instances at the provider.
    pub installation_id: String,
    /// Watch only this namespace; all namespaces when unset.
    pub watch_namespace: Option<String>,
    /// Boot deadline when the GpuInstance does not set one.
    pub default_boot_timeout: Duration,
    /// Extra boot time per GB of image.
    pub boot_time_per_image_gb: Duration,
    /// How long a create-pending mark without a matching instance is trusted before the rent is
    /// retried (the provider's listing is eventually consistent).
    pub create_pending_grace: Duration,
    /// How often a terminating instance is checked.
    pub termination_poll: Duration,
    /// After this long terminating, `TerminationStuck` is raised (and trying goes on).
    pub termination_stuck_after: Duration,
    /// How often a running instance is checked with the provider.
    pub liveness_poll: Duration,
    /// How often a booting instance is checked: the wait between a machine running and training
    /// starting on it. Cheap, as one shared listing serves every check.
    pub boot_poll: Duration,
    /// Time limit of one GpuInstance reconcile pass (see [`super::pass_limit`]).
    pub instance_pass_timeout: Duration,
    /// Time limit of one TrainingJob reconcile pass; never past the job's hard deadline.
    pub job_pass_timeout: Duration,
}

impl OperatorConfig {
    pub fn new(installation_id: impl Into<String>) -> Self {
        Self {
            installation_id: installation_id.into(),
            watch_namespace: None,
            default_boot_timeout: Duration::from_secs(15 * 60),
            boot_time_per_image_gb: Duration::from_secs(30),
            create_pending_grace: Duration::from_secs(60),
            termination_poll: Duration::from_secs(5),
            termination_stuck_after: Duration::from_secs(10 * 60),
            liveness_poll: Duration::from_secs(60),
            boot_poll: Duration::from_secs(1),
            instance_pass_timeout: Duration::from_secs(300),
            job_pass_timeout: Duration::from_secs(5400),
        }
    }
}

/// Shared by all reconcilers.
pub struct Context {
    pub client: Client,
    pub provider: Arc<dyn GpuProvider>,
    /// Defaults for requirements a spec leaves unset (`VASTAI_*`).
    pub provider_config: ProviderConfig,
    pub ssh_probe: Arc<dyn SshProbe>,
    pub config: OperatorConfig,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// The provider's instances, listed once for all the GpuInstances' state checks.
    pub listing: crate::controller::listing::SharedListing,
    /// UIDs of GpuInstances whose termination is stuck; its size is the `termination_stuck` gauge.
    stuck_terminations: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Context {
    pub fn new(
        client: Client,
        provider: Arc<dyn GpuProvider>,
        provider_config: ProviderConfig,
        ssh_probe: Arc<dyn SshProbe>,
        config: OperatorConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter =
            Reporter { controller: "gpu-trainer".into(), instance: std::env::var("POD_NAME").ok() };
        let recorder = Recorder::new(client.clone(), reporter);
        // A booting machine is checked every `boot_poll`; a listing no older than that serves
        // every check in between.
        let listing = crate::controller::listing::SharedListing::new(
            provider.clone(),
            config.boot_poll.min(config.liveness_poll),
        );
        Self {
            client,
            listing,
            provider,
            provider_config,
            ssh_probe,
            config,
            metrics,
            recorder,
            stuck_terminations: Default::default(),
        }
    }

    /// An API for the watched namespace, or all namespaces.
    pub fn scoped_api<K>(&self) -> kube::Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match &self.config.watch_namespace {
            Some(ns) => kube::Api::namespaced(self.client.clone(), ns),
            None => kube::Api::all(self.client.clone()),
        }
    }

    pub fn stuck_terminations_insert(&self, uid: &str) {
        let mut set = self.stuck_terminations.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(uid.to_string());
        self.metrics.termination_stuck.set(set.len() as i64);
    }

    pub fn stuck_terminations_remove(&self, uid: &str) {
        let mut set = self.stuck_terminations.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(uid);
        self.metrics.termination_stuck.set(set.len() as i64);
    }

    /// Publishes an event about `obj`. Failing to publish is logged, never fatal.
    pub async fn event<K>(
        &self,
        obj: &K,
        type_: EventType,
        reason: crate::api::Reason,
        action: &str,
        note: impl Into<String>,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let mut note: String = note.into();
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = Event {
            type_,
            reason: reason.as_str().into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(reason = reason.as_str(), error = %err, "Could not publish event");
        }
    }
}
