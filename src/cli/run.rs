//! `gpu-trainer run`: the controllers, a health and metrics server, leader election and
//! graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::sync::watch;
use tracing::info;

use super::operator::{OperatorArgs, start};
use crate::artifacts::address::EndpointPolicy;
use crate::artifacts::upload::JobUploadLimits;
use crate::controller::gpuinstance;
use crate::controller::http::{self, HealthState};
use crate::controller::leader::{LeaderConfig, run_elector};
use crate::controller::sweeper::{self, SweeperConfig};
use crate::controller::trainingjob::{self, JobController};
use crate::metrics::Metrics;
use crate::remote::launch::DEFAULT_REMOTE_BASE;
use crate::remote::tool::ToolRegistry;
use crate::telemetry::{self, LogFormat};

/// Run the operator: the TrainingJob and GpuInstance controllers and the sweeper.
#[derive(Args, Debug)]
#[command(
    after_help = "Reads VASTAI_API_KEY (required) and the other VASTAI_* settings from the environment.\n\
    Example:\n  VASTAI_API_KEY=... gpu-trainer run --log-format pretty --leader-elect=false"
)]
pub struct RunArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "GPU_TRAINER_METRICS_ADDR", default_value = "0.0.0.0:8080", value_name = "ADDR")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, value_enum, env = "GPU_TRAINER_LOG_FORMAT", default_value = "json")]
    log_format: LogFormat,
    /// Elect a leader through a Lease so that of several replicas exactly one acts.
    #[arg(long, env = "GPU_TRAINER_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "gpu-trainer-leader")]
    lease_name: String,
    /// This replica's identity in the Lease (in a pod: its name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds between sweeps for orphaned instances.
    #[arg(long, env = "GPU_TRAINER_SWEEP_INTERVAL_SECONDS", default_value_t = 60, value_name = "SECONDS")]
    sweep_interval_seconds: u64,
    /// Age in seconds below which an unaccounted instance is never destroyed.
    #[arg(long, env = "GPU_TRAINER_SWEEP_GRACE_SECONDS", default_value_t = 120, value_name = "SECONDS")]
    sweep_grace_seconds: u64,
    /// Only report orphans; destroy nothing.
    #[arg(long, env = "GPU_TRAINER_SWEEP_DRY_RUN")]
    sweep_dry_run: bool,
    /// Folder on the rented machines that holds the jobs' work dirs (`<base>/<job UID>/`).
    #[arg(long, env = "GPU_TRAINER_REMOTE_BASE", default_value = DEFAULT_REMOTE_BASE, value_name = "PATH")]
    remote_base: String,
    /// Folder of the tool registry (`<name>/tool.yaml`). Default: `$GPU_TRAINER_TOOLS_DIR`, else
    /// `config/tools`.
    #[arg(long, value_name = "DIR")]
    tools_dir: Option<PathBuf>,
    /// The Hugging Face CLI the machines run for `spec.output.huggingFace` (installed there with
    /// pip when missing).
    #[arg(long, env = "GPU_TRAINER_HF_CLI", default_value = "hf", value_name = "COMMAND")]
    hf_cli: String,
    /// Most files one job may upload to S3, over all its machines (checkpoints, model, card).
    /// A machine listing more is refused before anything is presigned.
    #[arg(long, env = "GPU_TRAINER_MAX_UPLOAD_FILES_PER_JOB", default_value_t = JobUploadLimits::default().max_files, value_name = "FILES")]
    max_upload_files_per_job: u64,
    /// Most data one job may upload to S3, over all its machines, in GiB. A machine listing more
    /// is refused before anything is presigned.
    #[arg(long, env = "GPU_TRAINER_MAX_UPLOAD_GIB_PER_JOB", default_value_t = 200, value_name = "GIB")]
    max_upload_gib_per_job: u64,
    /// Let the URLs jobs name (webhooks, S3 endpoints) reach loopback, link-local (cloud
    /// metadata), private and cluster-internal addresses. Off: such URLs are refused.
    #[arg(long, env = "GPU_TRAINER_ALLOW_PRIVATE_ENDPOINTS")]
    allow_private_endpoints: bool,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format, "info,kube=warn,hyper=warn,russh=warn");
    let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(forward_signals(stop.clone()));

    let listener = http::bind(args.metrics_addr)
        .await
        .with_context(|| format!("failed to listen on {} (--metrics-addr)", args.metrics_addr))?;
    let http_state = HealthState { metrics: metrics.clone(), ready: ready.clone() };
    let http_task = tokio::spawn(http::serve(listener, http_state, stop_rx.clone()));

    // Tools are read once at start-up: a broken registry stops the operator before it leads.
    let tools_dir = ToolRegistry::default_dir(args.tools_dir.as_deref());
    let tools = ToolRegistry::load(&tools_dir)
        .with_context(|| format!("failed to load the tools in {} (--tools-dir)", tools_dir.display()))?;
    let operator = start(&args.operator, metrics).await?;
    let ctx = operator.ctx;
    info!(installation_id = %ctx.config.installation_id, "Operator started");
    ready.store(true, Ordering::Relaxed);

    let (leader_tx, mut is_leader) = watch::channel(!args.leader_elect);
    let elector = if args.leader_elect {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &args.lease_namespace);
        let config = LeaderConfig::new(&args.lease_name, &args.lease_namespace, identity);
        Some(tokio::spawn(run_elector(leases, config, leader_tx, stop_rx.clone())))
    } else {
        drop(leader_tx);
        None
    };

    // Standby until we lead (or are asked to stop).
    let mut stopping = stop_rx.clone();
    tokio::select! {
        _ = is_leader.wait_for(|lead| *lead) => {}
        _ = stopping.wait_for(|s| *s) => {}
    }
    if *stop_rx.borrow() {
        return finish(http_task, elector).await;
    }
    info!("Leading: starting the controllers");

    let shutdown = || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let controllers = tokio::spawn(gpuinstance::run(ctx.clone(), shutdown()));
    let jobs = job_controller(&args, ctx.clone(), tools);
    let job_controller = tokio::spawn(trainingjob::run(Arc::new(jobs), shutdown()));
    let sweeper_config = SweeperConfig {
        interval: Duration::from_secs(args.sweep_interval_seconds),
        grace: Duration::from_secs(args.sweep_grace_seconds),
        dry_run: args.sweep_dry_run,
        ..SweeperConfig::default()
    };
    let sweeper = tokio::spawn(sweeper::run(ctx.clone(), sweeper_config, stop_rx.clone()));

    if let Some(elector) = elector {
        // Losing the lease means another replica may act now: stop at once.
        match elector.await {
            Ok(Ok(())) => {}
            Ok(Err(lost)) => {
                stop.send_replace(true);
                bail!(lost);
            }
            Err(join) => bail!("the leader elector crashed: {join}"),
        }
    }
    let _ = controllers.await;
    let _ = job_controller.await;
    let _ = sweeper.await;
    finish(http_task, None).await
}

/// The TrainingJob controller's settings from the flags.
fn job_controller(
    args: &RunArgs,
    ctx: Arc<crate::controller::Context>,
    tools: ToolRegistry,
) -> JobController {
    JobController {
        ctx,
        tools,
        remote_base: args.remote_base.clone(),
        sessions: Default::default(),
        hf_cli: args.hf_cli.clone(),
        upload_limits: JobUploadLimits {
            max_files: args.max_upload_files_per_job,
            max_bytes: args.max_upload_gib_per_job.saturating_mul(1024 * 1024 * 1024),
        },
        endpoint_policy: if args.allow_private_endpoints {
            EndpointPolicy::AllowPrivate
        } else {
            EndpointPolicy::PublicOnly
        },
    }
}

async fn finish(
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
    elector: Option<tokio::task::JoinHandle<Result<(), crate::controller::leader::LeaderError>>>,
) -> anyhow::Result<()> {
    if let Some(elector) = elector {
        let _ = elector.await;
    }
    http_task.await.context("the HTTP server crashed")?.context("the HTTP server failed")?;
    info!("Stopped");
    Ok(())
}

/// SIGTERM (Kubernetes) and Ctrl-C both start a graceful shutdown.
async fn forward_signals(stop: watch::Sender<bool>) {
    super::shutdown_signal().await;
    info!("Shutting down");
    stop.send_replace(true);
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{}-{:08x}", if host.is_empty() { "gpu-trainer" } else { &host }, rand::random::<u32>())
}
