//! Start-up shared by `gpu-trainer run` and `gpu-trainer sweep`: the Kubernetes client, the
//! provider with its credentials checked, and the installation id.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use k8s_openapi::api::core::v1::Namespace;
use kube::client::ClientBuilder;
use kube::{Api, Client};

use crate::controller::kube_requests::CountRequestsLayer;
use crate::controller::metered::MeteredProvider;
use crate::controller::{Context, OperatorConfig};
use crate::machine::probe::RusshProbe;
use crate::metrics::Metrics;
use crate::provider::GpuProvider;
use crate::provider::config::ProviderConfig;
use crate::provider::vastai::VastClient;

/// Settings of the operator itself.
#[derive(Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "GPU_TRAINER_WATCH_NAMESPACE", value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// 8 hex characters that mark this installation's instances at the provider. Defaults to the
    /// start of the `kube-system` namespace's UID, so each cluster differs.
    #[arg(long, env = "GPU_TRAINER_INSTALLATION_ID", value_name = "HEX8")]
    pub installation_id: Option<String>,
    /// Seconds a machine may take from rent to SSH answering, unless its spec says otherwise.
    #[arg(long, env = "GPU_TRAINER_BOOT_TIMEOUT_SECONDS", default_value_t = 900, value_name = "SECONDS")]
    pub boot_timeout_seconds: u64,
    /// Seconds between checks of a running machine with the provider.
    #[arg(long, env = "GPU_TRAINER_LIVENESS_POLL_SECONDS", default_value_t = 60, value_name = "SECONDS")]
    pub liveness_poll_seconds: u64,
    /// Seconds between checks of a booting machine. One provider listing, shared by every
    /// check, is made at most this often, however many machines boot.
    #[arg(long, env = "GPU_TRAINER_BOOT_POLL_SECONDS", default_value_t = 1, value_name = "SECONDS")]
    pub boot_poll_seconds: u64,
    /// Seconds between checks of a terminating machine (one provider call per machine).
    #[arg(long, env = "GPU_TRAINER_FAST_POLL_SECONDS", default_value_t = 5, value_name = "SECONDS")]
    pub fast_poll_seconds: u64,
    /// Seconds an unconfirmed rent is trusted before it is retried (the provider's listing lags).
    #[arg(
        long,
        env = "GPU_TRAINER_CREATE_PENDING_GRACE_SECONDS",
        default_value_t = 60,
        value_name = "SECONDS"
    )]
    pub create_pending_grace_seconds: u64,
    /// Seconds of trying to release a machine before `TerminationStuck` is raised.
    #[arg(
        long,
        env = "GPU_TRAINER_TERMINATION_STUCK_SECONDS",
        default_value_t = 600,
        value_name = "SECONDS"
    )]
    pub termination_stuck_seconds: u64,
    /// Seconds one GpuInstance reconcile pass may take before it is abandoned and requeued (a
    /// backstop: every remote call has a deadline of its own).
    #[arg(
        long,
        env = "GPU_TRAINER_INSTANCE_PASS_TIMEOUT_SECONDS",
        default_value_t = 300,
        value_name = "SECONDS"
    )]
    pub instance_pass_timeout_seconds: u64,
    /// Seconds one TrainingJob reconcile pass may take before it is abandoned and requeued; a
    /// pass never runs past the job's activeDeadlineSeconds either. Longer than the longest step
    /// (staging a dataset: up to an hour).
    #[arg(
        long,
        env = "GPU_TRAINER_JOB_PASS_TIMEOUT_SECONDS",
        default_value_t = 5400,
        value_name = "SECONDS"
    )]
    pub job_pass_timeout_seconds: u64,
}

/// Everything a controller process needs, checked.
pub struct Operator {
    pub ctx: Arc<Context>,
}

pub async fn start(args: &OperatorArgs, metrics: Arc<Metrics>) -> anyhow::Result<Operator> {
    let kube_config = kube::Config::infer()
        .await
        .context("failed to connect to Kubernetes (in a pod: the service account; elsewhere: KUBECONFIG)")?;
    // Every request is counted by verb and resource (`gputrainer_kube_requests_total`).
    let client = ClientBuilder::try_from(kube_config)
        .context("failed to set up the Kubernetes client")?
        .with_layer(&CountRequestsLayer::new(metrics.clone()))
        .build();
    let provider_config = ProviderConfig::from_env().context("invalid provider configuration")?;
    let provider =
        VastClient::from_config(&provider_config).context("failed to set up the Vast.ai client")?;
    check_credentials(&provider).await?;
    let installation_id = match &args.installation_id {
        Some(id) => validate_installation_id(id)?,
        None => installation_id_from_cluster(&client).await?,
    };
    let mut config = OperatorConfig::new(installation_id);
    config.watch_namespace = args.namespace.clone();
    config.default_boot_timeout = Duration::from_secs(args.boot_timeout_seconds);
    config.liveness_poll = Duration::from_secs(args.liveness_poll_seconds);
    config.boot_poll = Duration::from_secs(args.boot_poll_seconds.max(1));
    config.termination_poll = Duration::from_secs(args.fast_poll_seconds);
    config.create_pending_grace = Duration::from_secs(args.create_pending_grace_seconds);
    config.termination_stuck_after = Duration::from_secs(args.termination_stuck_seconds);
    config.instance_pass_timeout = Duration::from_secs(args.instance_pass_timeout_seconds.max(1));
    config.job_pass_timeout = Duration::from_secs(args.job_pass_timeout_seconds.max(1));
    let provider: Arc<dyn GpuProvider> = Arc::new(MeteredProvider::new(Arc::new(provider), metrics.clone()));
    let ctx =
        Context::new(client, provider, provider_config, Arc::new(RusshProbe::default()), config, metrics);
    Ok(Operator { ctx: Arc::new(ctx) })
}

/// How long start-up waits for a busy or unreachable provider to answer the key check. The
/// controllers keep finalizers, deadlines and status going without the provider, so they are
/// never held back longer than this by it.
const CREDENTIAL_CHECK_BUDGET: Duration = Duration::from_secs(15);

/// A rejected key stops start-up with a clear error (a crash loop is the right signal for a
/// wrong Secret). A provider that is only busy or briefly down is asked again for up to
/// [`CREDENTIAL_CHECK_BUDGET`]; then the operator starts anyway and its provider calls retry
/// like any other.
async fn check_credentials(provider: &VastClient) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + CREDENTIAL_CHECK_BUDGET;
    let mut delay = Duration::from_secs(1);
    loop {
        match provider.check_credentials().await {
            Ok(()) => return Ok(()),
            Err(err) if err.is_retryable() => {
                let wait = err.retry_after().unwrap_or(delay);
                if tokio::time::Instant::now() + wait >= deadline {
                    tracing::warn!(
                        error = %err,
                        "Could not check the Vast.ai API key: starting anyway, provider calls retry"
                    );
                    return Ok(());
                }
                tracing::warn!(error = %err, retry_in_s = wait.as_secs(), "Could not check the Vast.ai API key yet");
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(err) => {
                return Err(
                    anyhow::Error::new(err).context("the Vast.ai API key was not accepted (VASTAI_API_KEY)")
                );
            }
        }
    }
}

fn validate_installation_id(id: &str) -> anyhow::Result<String> {
    let id = id.trim().to_ascii_lowercase();
    if id.len() != 8 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("--installation-id (GPU_TRAINER_INSTALLATION_ID) must be 8 hex characters, got {id:?}");
    }
    Ok(id)
}

async fn installation_id_from_cluster(client: &Client) -> anyhow::Result<String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let kube_system = namespaces.get("kube-system").await.context(
        "failed to read the kube-system namespace for the default installation id; set --installation-id",
    )?;
    let uid = kube_system.metadata.uid.unwrap_or_default().replace('-', "");
    validate_installation_id(uid.get(..8).unwrap_or_default())
        .context("the kube-system namespace has no usable UID; set --installation-id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installation_id_is_eight_hex_characters() {
        assert_eq!(validate_installation_id("0A1B2C3D").unwrap(), "0a1b2c3d");
        assert!(validate_installation_id("xyz").is_err());
        assert!(validate_installation_id("0a1b2c3d4").is_err());
    }
}
