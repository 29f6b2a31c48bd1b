//! `gpu-trainer fake-vastai`: run the local server that speaks the Vast.ai API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::provider::fake::{self, FakeConfig, Fault};
use crate::telemetry::{self, LogFormat};

/// Serve a fake Vast.ai API for development and tests (the official `vastai` CLI works against
/// it with `VAST_URL=http://ADDR`).
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  gpu-trainer fake-vastai --listen 127.0.0.1:8181 --ssh-port 2222\n  \
    VAST_URL=http://127.0.0.1:8181 VAST_API_KEY=any vastai search offers\n  \
    curl -X POST localhost:8181/_fake/faults -d '{\"kind\":\"error_burst\",\"status\":503,\"count\":3}'")]
pub struct FakeVastaiArgs {
    /// Address to listen on; port 0 picks a free one (the address is printed on stdout).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8181")]
    listen: SocketAddr,
    /// Save instances here after every change and load them at start.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Offers to serve: a JSON list of (partial) offer objects. Default: a generated catalogue.
    #[arg(long, value_name = "FILE")]
    catalogue: Option<PathBuf>,
    /// Size of the generated catalogue.
    #[arg(long, value_name = "N", default_value_t = 48)]
    offers: usize,
    /// SSH host that instances report.
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    ssh_host: String,
    /// SSH port that instances report.
    #[arg(long, value_name = "PORT", default_value_t = 22)]
    ssh_port: u16,
    /// Append attached SSH public keys to this authorized_keys file.
    #[arg(long, value_name = "FILE")]
    authorized_keys: Option<PathBuf>,
    /// Accept only this API key (default: any non-empty key).
    #[arg(long, value_name = "KEY", env = "FAKE_VASTAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Seconds from create to `loading`.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    loading_after: f64,
    /// Seconds from create to `running`.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    running_after: f64,
    /// Minimum milliseconds between calls to one endpoint; faster calls get 429 (0: off).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    rate_limit_ms: u64,
    /// Largest page of the instance listing.
    #[arg(long, value_name = "N", default_value_t = 25)]
    page_size: usize,
    /// A fault active from the start, as JSON (repeatable), e.g.
    /// '{"kind":"instances_become","state":"offline","after_running_secs":60}'.
    #[arg(long = "fault", value_name = "JSON")]
    faults: Vec<String>,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "pretty")]
    log_format: LogFormat,
}

pub fn run(args: FakeVastaiArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format, "info");
    let faults = args
        .faults
        .iter()
        .map(|f| serde_json::from_str::<Fault>(f).with_context(|| format!("invalid --fault {f}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let secs = |name: &str, v: f64| -> anyhow::Result<Duration> {
        Duration::try_from_secs_f64(v)
            .with_context(|| format!("--{name} must be a non-negative number of seconds"))
    };
    let config = FakeConfig {
        api_key: args.api_key,
        ssh_host: args.ssh_host,
        ssh_port: args.ssh_port,
        loading_after: secs("loading-after", args.loading_after)?,
        running_after: secs("running-after", args.running_after)?,
        rate_limit_interval: Duration::from_millis(args.rate_limit_ms),
        page_size: args.page_size.max(1),
        state_file: args.state,
        catalogue: args.catalogue,
        generated_offers: args.offers,
        faults,
        authorized_keys_file: args.authorized_keys,
        ssh_per_instance: false,
        ssh_endpoints: Vec::new(),
    };
    let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("failed to listen on {}", args.listen))?;
        let server = fake::start(listener, config)?;
        println!("{}", server.url());
        super::shutdown_signal().await;
        server.shutdown().await?;
        Ok(())
    })
}
