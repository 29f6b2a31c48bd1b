//! The sweeper: a second line of defence that finds rented machines no GpuInstance accounts for
//! and destroys them, and deletes GpuInstances that outlived their purpose. It runs at start-up
//! and then every `interval`, lists the provider's instances once per pass however many there
//! are, and acts with bounded concurrency. The decisions are [`plan::plan_sweep`].

pub mod plan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::events::{Event, EventType};
use tokio::sync::watch;
use tracing::{info, warn};

use self::plan::{GpuInstanceView, JobView, Suspect, SweepAction, SweepPlan, SweepRules, plan_sweep};
use super::Context;
use crate::api::{GpuInstance, Reason, TrainingJob, from_k8s_time};
use crate::metrics::SweepLabels;
use crate::provider::InstanceId;

/// How the sweeper runs.
#[derive(Clone, Debug)]
pub struct SweeperConfig {
    pub interval: Duration,
    pub grace: Duration,
    /// Only report; destroy and delete nothing.
    pub dry_run: bool,
    /// Destroys running at once.
    pub concurrency: usize,
}

impl Default for SweeperConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            grace: Duration::from_secs(120),
            dry_run: false,
            concurrency: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("failed to list {what}")]
    List {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("failed to list the provider's instances")]
    Provider(#[source] crate::provider::Error),
}

/// What one pass did, for the command line's table.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    pub plan: SweepPlan,
    /// (action, outcome) per planned action, in plan order.
    pub outcomes: Vec<(SweepAction, String)>,
}

/// Runs passes until `shutdown` turns true.
pub async fn run(ctx: Arc<Context>, config: SweeperConfig, mut shutdown: watch::Receiver<bool>) {
    let rules = SweepRules {
        installation_id: ctx.config.installation_id.clone(),
        grace: config.grace,
        everything: false,
        single_pass: false,
    };
    let mut suspects = BTreeMap::new();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        match sweep_once(&ctx, &rules, &config, &suspects).await {
            Ok(report) => suspects = report.plan.suspects,
            Err(err) => warn!(error = %crate::error::error_chain(&err), "Sweep pass failed"),
        }
    }
}

/// One pass: observe, plan, act.
pub async fn sweep_once(
    ctx: &Context,
    rules: &SweepRules,
    config: &SweeperConfig,
    suspects: &BTreeMap<InstanceId, Suspect>,
) -> Result<SweepReport, SweepError> {
    let instances = ctx.provider.list_instances().await.map_err(SweepError::Provider)?;
    let gpu_instances: Api<GpuInstance> = ctx.scoped_api();
    let gpu_instances = gpu_instances
        .list(&ListParams::default())
        .await
        .map_err(|source| SweepError::List { what: "GpuInstances", source })?;
    let jobs: Api<TrainingJob> = ctx.scoped_api();
    let jobs = jobs
        .list(&ListParams::default())
        .await
        .map_err(|source| SweepError::List { what: "TrainingJobs", source })?;

    let views: Vec<GpuInstanceView> = gpu_instances.iter().map(view_of).collect();
    let job_views: Vec<JobView> = jobs
        .iter()
        .map(|j| JobView {
            uid: j.uid().unwrap_or_default(),
            finished: j.status.as_ref().is_some_and(|s| s.phase.is_finished()),
        })
        .collect();
    let plan = plan_sweep(&instances, &views, &job_views, suspects, rules, Utc::now());

    let outcomes = futures::stream::iter(plan.actions.clone())
        .map(|action| async move {
            let outcome = act(ctx, &action, config.dry_run).await;
            (action, outcome)
        })
        .buffered(config.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    Ok(SweepReport { plan, outcomes })
}

async fn act(ctx: &Context, action: &SweepAction, dry_run: bool) -> String {
    match action {
        SweepAction::Suspect { id, label, why } => {
            ctx.metrics.orphans.get_or_create(&SweepLabels { action: "found" }).inc();
            info!(instance.id = %id, instance.label = %label, why = %why, "Orphan suspected");
            "suspected".into()
        }
        SweepAction::Destroy { id, label, why } => {
            if dry_run {
                info!(instance.id = %id, why = %why, "Dry run: would destroy orphan");
                return "would destroy (dry run)".into();
            }
            match ctx.provider.destroy_instance(*id).await {
                Ok(()) => {
                    ctx.metrics.orphans.get_or_create(&SweepLabels { action: "destroyed" }).inc();
                    info!(instance.id = %id, instance.label = %label, why = %why, "Orphan destroyed");
                    publish_orphan_event(ctx, *id, label, why).await;
                    "destroyed".into()
                }
                Err(err) => {
                    ctx.metrics.orphans.get_or_create(&SweepLabels { action: "destroy_failed" }).inc();
                    warn!(instance.id = %id, error = %err, "Could not destroy orphan");
                    format!("destroy failed: {err}")
                }
            }
        }
        SweepAction::DeleteGpuInstance { namespace, name, why } => {
            if dry_run {
                return "would delete (dry run)".into();
            }
            let api: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), namespace);
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {
                    ctx.metrics.orphans.get_or_create(&SweepLabels { action: "gpuinstance_deleted" }).inc();
                    info!(gpuinstance = %name, namespace = %namespace, why = %why, "Deleted GpuInstance");
                    if let Ok(obj) = api.get(name).await {
                        ctx.event(
                            &obj,
                            EventType::Normal,
                            Reason::Swept,
                            "Sweep",
                            format!("Deleted by the sweeper: {why}"),
                        )
                        .await;
                    }
                    "deleted".into()
                }
                Err(kube::Error::Api(status)) if status.code == 404 => "already gone".into(),
                Err(err) => format!("delete failed: {err}"),
            }
        }
    }
}

/// An orphan has no object of its own; the event goes to the operator's namespace, about a
/// reference that names the instance.
async fn publish_orphan_event(ctx: &Context, id: InstanceId, label: &str, why: &str) {
    let reference = ObjectReference {
        api_version: Some("gputrainer.dev/v1alpha1".into()),
        kind: Some("GpuInstance".into()),
        name: Some(format!("orphan-{id}")),
        namespace: Some(std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into())),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: Reason::OrphanDestroyed.as_str().into(),
        note: Some(format!("Destroyed instance {id} ({label}): {why}")),
        action: "Sweep".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &reference).await {
        warn!(error = %err, "Could not publish the orphan event");
    }
}

fn view_of(g: &GpuInstance) -> GpuInstanceView {
    GpuInstanceView {
        namespace: g.namespace().unwrap_or_default(),
        name: g.name_any(),
        uid: g.uid().unwrap_or_default(),
        created: g.metadata.creation_timestamp.as_ref().map(from_k8s_time).unwrap_or_else(Utc::now),
        max_lifetime: Duration::from_secs(g.spec.max_lifetime_seconds.max(0) as u64),
        deleting: g.metadata.deletion_timestamp.is_some(),
        owner_job_uid: g
            .owner_references()
            .iter()
            .find(|o| o.kind == "TrainingJob" && o.api_version.starts_with("gputrainer.dev/"))
            .map(|o| o.uid.clone()),
    }
}
