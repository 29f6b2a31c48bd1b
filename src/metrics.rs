//! Prometheus metrics of the operator, exposed on `/metrics`. Every label has a small, closed set
//! of values (phases, outcomes, controller names, error categories, `Reason`s), never names or ids.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub category: &'static str,
}

/// A reconcile pass abandoned at its time limit, and the step it was in (a closed set of names).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AbandonedLabels {
    pub controller: &'static str,
    pub step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub operation: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SweepLabels {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// One request to the Kubernetes API server, as [`crate::controller::kube_requests`] classifies it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeRequestLabels {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or `other`.
    pub verb: &'static str,
    /// `trainingjobs`, `gpuinstances`, `events`, `secrets`, `leases`, ... or `other`.
    pub resource: &'static str,
    /// `status`, `other`, or empty for the object itself.
    pub subresource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SshOperationLabels {
    /// `connect`, `run`, `upload`, `download` or `read`.
    pub operation: &'static str,
}

/// Metrics of the SSH transport. Process-wide, because connections are opened from several
/// places (the GpuInstance probe, the job engine, the command line) and counting them in the
/// transport itself means no caller can forget; [`Metrics::new`] registers them.
pub struct TransportMetrics {
    pub ssh_connections_opened: Counter,
    pub ssh_connections_open: Gauge,
    pub ssh_operation_duration: Family<SshOperationLabels, Histogram, fn() -> Histogram>,
}

/// The SSH transport's metrics of this process.
pub static TRANSPORT: LazyLock<TransportMetrics> = LazyLock::new(|| TransportMetrics {
    ssh_connections_opened: Counter::default(),
    ssh_connections_open: Gauge::default(),
    ssh_operation_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
});

impl TransportMetrics {
    /// Records how long one SSH operation took.
    pub fn observe(&self, operation: &'static str, took: std::time::Duration) {
        self.ssh_operation_duration
            .get_or_create(&SshOperationLabels { operation })
            .observe(took.as_secs_f64());
    }
}

fn duration_histogram() -> Histogram {
    // 5 ms .. ~80 s
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn long_duration_histogram() -> Histogram {
    // 1 s .. ~9 h
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// All metrics of the operator.
pub struct Metrics {
    registry: Registry,
    pub reconcile_runs: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    pub reconciles_abandoned: Family<AbandonedLabels, Counter>,
    /// Machines released because of what they did (unresponsive, misbehaving, host key changed).
    pub machine_verdicts: Family<ReasonLabels, Counter>,
    pub instances_by_phase: Family<PhaseLabels, Gauge>,
    pub launches: Family<OutcomeLabels, Counter>,
    pub terminations: Family<OutcomeLabels, Counter>,
    pub termination_duration: Histogram,
    pub termination_stuck: Gauge,
    pub orphans: Family<SweepLabels, Counter>,
    pub provider_requests: Family<ProviderLabels, Counter>,
    pub provider_request_duration: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    /// US dollars per hour of all running instances, as the provider prices them.
    pub hourly_spend: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub jobs_by_phase: Family<PhaseLabels, Gauge>,
    pub job_duration: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    pub stalls_detected: Counter,
    pub job_cost: Histogram,
    pub apply_to_training_seconds: Histogram,
    pub job_failures: Family<ReasonLabels, Counter>,
    pub kube_requests: Family<KubeRequestLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gputrainer");
        let m = Self {
            reconcile_runs: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            reconciles_abandoned: Family::default(),
            machine_verdicts: Family::default(),
            instances_by_phase: Family::default(),
            launches: Family::default(),
            terminations: Family::default(),
            termination_duration: long_duration_histogram(),
            termination_stuck: Gauge::default(),
            orphans: Family::default(),
            provider_requests: Family::default(),
            provider_request_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            hourly_spend: Gauge::default(),
            jobs_by_phase: Family::default(),
            job_duration: Family::new_with_constructor(long_duration_histogram as fn() -> Histogram),
            stalls_detected: Counter::default(),
            job_cost: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            apply_to_training_seconds: long_duration_histogram(),
            job_failures: Family::default(),
            kube_requests: Family::default(),
            registry: Registry::default(),
        };
        registry.register("reconcile_runs", "Reconciliations started", m.reconcile_runs.clone());
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error category",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "reconciles_abandoned",
            "Reconcile passes abandoned at their time limit, by controller and the step they were in",
            m.reconciles_abandoned.clone(),
        );
        registry.register(
            "machine_verdicts",
            "Machines released for what they did (did not answer, sent too much, changed host key), by reason",
            m.machine_verdicts.clone(),
        );
        registry.register("instances", "GpuInstances by phase", m.instances_by_phase.clone());
        registry.register("instance_launches", "Rent calls by outcome", m.launches.clone());
        registry.register("instance_terminations", "Instance releases by outcome", m.terminations.clone());
        registry.register(
            "instance_termination_duration_seconds",
            "From the first destroy call to the provider no longer listing the instance",
            m.termination_duration.clone(),
        );
        registry.register(
            "instance_termination_stuck",
            "Instances whose release has taken more than 10 minutes",
            m.termination_stuck.clone(),
        );
        registry.register("sweeper_orphans", "Orphaned instances found and destroyed", m.orphans.clone());
        registry.register(
            "provider_requests",
            "Provider API calls by operation and outcome",
            m.provider_requests.clone(),
        );
        registry.register(
            "provider_request_duration_seconds",
            "Provider API call latency",
            m.provider_request_duration.clone(),
        );
        registry.register(
            "hourly_spend_dollars",
            "US dollars per hour of all running instances",
            m.hourly_spend.clone(),
        );
        registry.register("jobs", "TrainingJobs by phase", m.jobs_by_phase.clone());
        registry.register(
            "job_duration_seconds",
            "From creation to completion, by final phase",
            m.job_duration.clone(),
        );
        registry.register("job_stalls_detected", "Stalls detected in training", m.stalls_detected.clone());
        registry.register("job_cost_dollars", "Total cost of finished jobs", m.job_cost.clone());
        registry.register(
            "job_apply_to_training_seconds",
            "From the job's creation to training starting",
            m.apply_to_training_seconds.clone(),
        );
        registry.register("job_failures", "Failed jobs by reason", m.job_failures.clone());
        registry.register(
            "kube_requests",
            "Requests to the Kubernetes API server by verb, resource and subresource",
            m.kube_requests.clone(),
        );
        let transport = &*TRANSPORT;
        registry.register(
            "ssh_connections_opened",
            "SSH connections opened (connections are kept per machine and reused)",
            transport.ssh_connections_opened.clone(),
        );
        registry.register(
            "ssh_connections_open",
            "SSH connections open now",
            transport.ssh_connections_open.clone(),
        );
        registry.register(
            "ssh_operation_duration_seconds",
            "Time of SSH operations (connect, run, upload, download, read) by operation",
            transport.ssh_operation_duration.clone(),
        );
        Self { registry, ..m }
    }

    /// The text exposition format served on `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts a reconciliation and returns a guard that records its duration when dropped, so
    /// early returns cannot skip the measurement.
    pub fn reconcile_started(self: &Arc<Self>, controller: &'static str) -> ReconcileTimer {
        self.reconcile_runs.get_or_create(&ControllerLabels { controller }).inc();
        ReconcileTimer { metrics: self.clone(), controller, start: Instant::now() }
    }

    pub fn reconcile_failed(&self, controller: &'static str, category: &'static str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { controller, category }).inc();
    }

    pub fn reconcile_abandoned(&self, controller: &'static str, step: &'static str) {
        self.reconciles_abandoned.get_or_create(&AbandonedLabels { controller, step }).inc();
    }
}

/// Records a reconciliation's duration on drop.
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    controller: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .get_or_create(&ControllerLabels { controller: self.controller })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_prefixed_names_and_bounded_labels() {
        let metrics = Arc::new(Metrics::new());
        drop(metrics.reconcile_started("gpuinstance"));
        metrics.reconcile_failed("gpuinstance", "Transient");
        metrics.orphans.get_or_create(&SweepLabels { action: "destroyed" }).inc();
        let text = metrics.encode();
        assert!(text.contains("gputrainer_reconcile_runs_total{controller=\"gpuinstance\"} 1"), "{text}");
        assert!(text.contains(
            "gputrainer_reconcile_errors_total{controller=\"gpuinstance\",category=\"Transient\"} 1"
        ));
        assert!(text.contains("gputrainer_reconcile_duration_seconds_count{controller=\"gpuinstance\"} 1"));
        assert!(text.contains("gputrainer_sweeper_orphans_total{action=\"destroyed\"} 1"));
    }
}
