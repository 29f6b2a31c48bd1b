//! GPU providers: the narrow trait the controllers and `gpu-trainer launch` talk to, its domain
//! types, and the Vast.ai implementation.
//!
//! - [`GpuProvider`]: search offers, rent, observe, label and destroy instances.
//! - [`vastai`]: the reqwest client for the Vast.ai REST API (retries, rate limiting, wire types).
//! - [`select`]: choosing one offer from a search result, as a pure function with an explanation.
//! - [`config`]: the `VASTAI_*` settings users of earlier Vast.ai tooling know.
//! - [`fake`]: a local HTTP server speaking the Vast.ai API (`gpu-trainer fake-vastai`), used by
//!   the tests and for development without a Vast.ai account.
//!
//! Money is at risk here: an instance that is rented and then forgotten keeps billing. The trait
//! contracts below (idempotent destroy, contracts left behind by failed creates) exist so that
//! callers can always release what they rented.

pub mod config;
pub mod fake;
pub mod select;
pub mod vastai;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A rented instance's id at the provider (Vast.ai calls it a contract; `new_contract` on create,
/// `id` in listings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub i64);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One marketplace offer: a machine (or part of one) that can be rented now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Offer (ask) id; this is what [`LaunchRequest::offer_id`] takes.
    pub id: i64,
    /// The host machine; differs from the offer id. Exclusion lists hold these.
    pub machine_id: i64,
    pub host_id: Option<i64>,
    /// GPU model as the marketplace names it, e.g. `RTX 4090`.
    pub gpu_name: String,
    pub num_gpus: u32,
    /// Memory per GPU in GB (the marketplace's MB divided by 1000, as its own CLI does).
    pub vram_gb: f64,
    /// Total price in US dollars per hour, storage for the searched disk size included.
    pub price_per_hour: f64,
    /// Host reliability from 0 to 1.
    pub reliability: f64,
    /// Free text location, e.g. `Texas, US`.
    pub geolocation: Option<String>,
    /// Two-letter country code taken from the end of `geolocation`.
    pub country_code: Option<String>,
    pub verified: bool,
    /// Disk space available to the container in GB.
    pub disk_gb: f64,
    /// Highest CUDA version the driver supports.
    pub cuda_max_good: Option<f64>,
    /// Download bandwidth in Mb/s.
    pub inet_down_mbps: Option<f64>,
    /// Ports that can be mapped directly (0 means SSH only through the provider's proxy).
    pub direct_port_count: Option<i64>,
    pub score: Option<f64>,
}

/// How search results are ordered by the provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OfferOrder {
    /// Cheapest first.
    #[default]
    PriceAsc,
    /// Best marketplace score first.
    ScoreDesc,
    /// Most reliable first.
    ReliabilityDesc,
}

/// Server-side filters for an offer search. Everything optional narrows the search; the
/// provider applies them, and [`select`] checks the results again before choosing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OfferQuery {
    /// Exact GPU model names (`RTX 4090`; `_` is read as a space). Empty means any.
    pub gpu_names: Vec<String>,
    /// Exact number of GPUs on the machine.
    pub num_gpus: Option<u32>,
    /// Minimum memory per GPU in GB.
    pub min_vram_gb: Option<f64>,
    /// Highest total price in US dollars per hour.
    pub max_price_per_hour: Option<f64>,
    /// Lowest host reliability from 0 to 1.
    pub min_reliability: Option<f64>,
    /// Only machines the marketplace has verified.
    pub verified_only: bool,
    /// Two-letter country codes. Empty means anywhere.
    pub regions: Vec<String>,
    /// Minimum disk space in GB; also the disk size the search prices storage for.
    pub min_disk_gb: Option<f64>,
    /// Minimum CUDA version the driver supports.
    pub min_cuda: Option<f64>,
    /// Minimum download bandwidth in Mb/s.
    pub min_inet_down_mbps: Option<f64>,
    pub order: OfferOrder,
    /// At most this many offers.
    pub limit: Option<u32>,
}

/// What to run on a rented machine.
#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LaunchRequest {
    /// The offer to rent ([`Offer::id`]).
    pub offer_id: i64,
    /// Container image.
    pub image: String,
    /// Container disk in GB.
    pub disk_gb: u32,
    /// Environment of the container. May hold values that must not be logged, so `Debug`
    /// prints only the names.
    pub env: BTreeMap<String, String>,
    /// Shell script run when the container starts.
    pub onstart: Option<String>,
    /// Label set at creation, so a lost response can be recovered by listing by label.
    pub label: Option<String>,
    /// Reachable over SSH (direct port when the host has one, the provider's proxy otherwise).
    pub ssh: bool,
    /// Public key attached to the instance after creation.
    pub ssh_public_key: Option<String>,
    /// Bid in US dollars per hour for an interruptible instance; `None` rents on demand.
    pub bid_price_per_hour: Option<f64>,
}

impl fmt::Debug for LaunchRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaunchRequest")
            .field("offer_id", &self.offer_id)
            .field("image", &self.image)
            .field("disk_gb", &self.disk_gb)
            .field("env_names", &self.env.keys().collect::<Vec<_>>())
            .field("onstart_len", &self.onstart.as_ref().map(String::len))
            .field("label", &self.label)
            .field("ssh", &self.ssh)
            .field("ssh_public_key", &self.ssh_public_key.is_some())
            .field("bid_price_per_hour", &self.bid_price_per_hour)
            .finish()
    }
}

/// The lifecycle of an instance, normalised from the provider's three state fields
/// (`actual_status`, `intended_status`, `cur_state`/`next_state`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum InstanceState {
    /// Rented; the host is preparing the container (`actual_status` null, `created`, `scheduling`).
    #[default]
    Creating,
    /// Pulling the image and starting the container.
    Loading,
    /// The container runs.
    Running,
    /// Being restarted by the host.
    Rebooting,
    /// The container stopped on its own (the workload ended or crashed); still billed for disk.
    Exited,
    /// Stopped in all three state fields without us asking: outbid or interrupted.
    Interrupted,
    /// Stopped on request (`intended_status` stopped); still billed for disk.
    Stopped,
    /// The host stopped reporting; the machine may come back or be lost.
    Offline,
    /// The contract is released (`cur_state` unloaded); nothing is billed any more.
    Released,
    /// A state this code does not know, kept verbatim.
    Unknown(String),
}

impl InstanceState {
    /// Normalises the provider's state fields. "Stopped everywhere" is how Vast.ai shows an
    /// outbid or interrupted instance (dstack reads it the same way); a stop we asked for differs
    /// only in that we asked, and this operator never stops instances, it destroys them.
    pub fn from_fields(
        actual: Option<&str>,
        intended: Option<&str>,
        current: Option<&str>,
        next: Option<&str>,
    ) -> Self {
        if current == Some("unloaded") {
            return Self::Released;
        }
        if actual == Some("stopped") && intended == Some("stopped") && current == Some("stopped") {
            return if next.is_none_or(|n| n == "stopped") { Self::Interrupted } else { Self::Stopped };
        }
        match actual {
            None | Some("") | Some("created") | Some("scheduling") => Self::Creating,
            Some("loading") => Self::Loading,
            Some("running") => Self::Running,
            Some("rebooting") => Self::Rebooting,
            Some("exited") => Self::Exited,
            Some("offline") => Self::Offline,
            Some("stopped") | Some("frozen") => Self::Stopped,
            Some(other) => Self::Unknown(other.to_string()),
        }
    }

    /// True for states from which the instance will not run our workload again without help.
    pub fn is_lost(&self) -> bool {
        matches!(self, Self::Exited | Self::Interrupted | Self::Offline | Self::Released)
    }
}

/// Where to reach an instance over SSH.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshEndpoint {
    pub host: String,
    pub port: u16,
}

/// One rented instance, with the provider's inconsistent field names normalised.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub id: InstanceId,
    pub label: Option<String>,
    pub state: InstanceState,
    /// The provider's raw fields, kept for status display (`providerStatus` in the CRDs).
    pub actual_status: Option<String>,
    pub intended_status: Option<String>,
    pub cur_state: Option<String>,
    pub next_state: Option<String>,
    pub status_msg: Option<String>,
    pub machine_id: Option<i64>,
    pub host_id: Option<i64>,
    pub gpu_name: Option<String>,
    pub num_gpus: Option<u32>,
    /// Memory per GPU in GB.
    pub vram_gb: Option<f64>,
    pub price_per_hour: Option<f64>,
    pub reliability: Option<f64>,
    pub geolocation: Option<String>,
    pub image: Option<String>,
    pub disk_gb: Option<f64>,
    /// Direct SSH (public address and mapped port 22) when the host offers it, else the proxy.
    /// The proxy address is assigned at rent time; the machine answers on it only once `state`
    /// is [`InstanceState::Running`].
    pub ssh: Option<SshEndpoint>,
    /// When the contract started.
    pub started_at: Option<DateTime<Utc>>,
    /// Container environment as the provider reports it (port mappings appear as `-p ...` keys).
    pub env: BTreeMap<String, String>,
}

impl From<&Offer> for crate::api::OfferStatus {
    fn from(o: &Offer) -> Self {
        Self {
            id: o.id,
            machine_id: o.machine_id,
            gpu_name: o.gpu_name.clone(),
            num_gpus: o.num_gpus,
            vram_gb: o.vram_gb,
            price_per_hour: o.price_per_hour,
            reliability: o.reliability,
            geolocation: o.geolocation.clone(),
        }
    }
}

impl From<&Instance> for crate::api::ProviderStatus {
    fn from(i: &Instance) -> Self {
        Self {
            actual: i.actual_status.clone(),
            intended: i.intended_status.clone(),
            current: i.cur_state.clone(),
            message: i.status_msg.clone(),
        }
    }
}

impl From<&SshEndpoint> for crate::api::SshEndpointStatus {
    fn from(s: &SshEndpoint) -> Self {
        Self { host: s.host.clone(), port: s.port, host_key_fingerprint: None }
    }
}

/// Errors of a provider operation, classified so callers can branch on them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The instance (or other object) does not exist, or no longer does.
    #[error("{what} not found")]
    NotFound { what: String },
    /// The offer was rented by someone else or withdrawn; choose another.
    #[error("offer {offer_id} is no longer available: {message}")]
    OfferUnavailable { offer_id: i64, message: String },
    /// The provider refused the call because of its rate limit, even after retrying.
    #[error("rate limited by the provider on {endpoint}")]
    RateLimited { endpoint: &'static str, retry_after: Option<Duration> },
    /// The API key is missing, wrong, revoked or lacks a permission.
    #[error("the provider rejected the API key: {message}")]
    Unauthorized { message: String },
    /// The provider refused the request as invalid; retrying will not help.
    #[error("the provider refused the request to {endpoint}: {message}")]
    InvalidRequest { endpoint: &'static str, message: String },
    /// A failure that may go away: 5xx, timeout, connection error. Retries were exhausted (or,
    /// for create, not attempted because the request may have taken effect).
    #[error("temporary provider failure on {endpoint}: {message}")]
    Transient {
        endpoint: &'static str,
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The provider answered with something this client cannot read.
    #[error("unexpected response from {endpoint}: {message}")]
    UnexpectedResponse { endpoint: &'static str, message: String },
    /// Create failed after the provider had already made a contract. The contract bills until
    /// destroyed: the caller must destroy `instance_id`.
    #[error("failed to create the instance, and contract {instance_id} was left behind")]
    ContractLeftBehind {
        instance_id: InstanceId,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// Not found counts as done for cleanup.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// Whether calling again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::RateLimited { .. } | Self::Transient { .. } => true,
            Self::ContractLeftBehind { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    /// The contract a failed create left behind, which the caller must destroy.
    pub fn left_contract(&self) -> Option<InstanceId> {
        match self {
            Self::ContractLeftBehind { instance_id, .. } => Some(*instance_id),
            _ => None,
        }
    }

    /// How long the provider asked us to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => *retry_after,
            Self::ContractLeftBehind { source, .. } => source.retry_after(),
            _ => None,
        }
    }

    /// The status reason shared by conditions, events and metrics.
    pub fn reason(&self) -> crate::api::Reason {
        use crate::api::Reason;
        match self {
            Self::NotFound { .. } => Reason::InstanceLost,
            Self::OfferUnavailable { .. } => Reason::OfferUnavailable,
            Self::Unauthorized { .. } => Reason::Unauthorized,
            Self::ContractLeftBehind { source, .. } => source.reason(),
            Self::RateLimited { .. }
            | Self::InvalidRequest { .. }
            | Self::Transient { .. }
            | Self::UnexpectedResponse { .. } => Reason::ProviderError,
        }
    }

    /// A short, bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "NotFound",
            Self::OfferUnavailable { .. } => "OfferUnavailable",
            Self::RateLimited { .. } => "RateLimited",
            Self::Unauthorized { .. } => "Unauthorized",
            Self::InvalidRequest { .. } => "InvalidRequest",
            Self::Transient { .. } => "Transient",
            Self::UnexpectedResponse { .. } => "UnexpectedResponse",
            Self::ContractLeftBehind { .. } => "ContractLeftBehind",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A GPU marketplace. Implementations are cheap to share (`Arc<dyn GpuProvider>`).
///
/// Contracts every implementation keeps:
/// - [`destroy_instance`](Self::destroy_instance) of an instance that does not exist (any more)
///   is success, so cleanup can be repeated until the instance is gone from listings.
/// - [`create_instance`](Self::create_instance) is not retried on failures after which the
///   provider may have rented anyway (5xx, timeouts). It may still leave a contract behind: when
///   the provider reports one, the error is [`Error::ContractLeftBehind`] with its id, which the
///   caller must destroy; when it does not, only [`list_instances_by_label`](Self::list_instances_by_label)
///   with the label from the request can find it.
/// - [`get_instance`](Self::get_instance) returns [`Error::NotFound`] once an instance is
///   destroyed, whether the provider says 404 or returns an empty object.
/// - No error message, log line or `Debug` output contains the API key.
#[async_trait]
pub trait GpuProvider: Send + Sync {
    /// Checks that the API key is accepted; called at start-up so a bad key fails early.
    async fn check_credentials(&self) -> Result<()>;

    /// Offers matching the query, in the query's order.
    async fn search_offers(&self, query: &OfferQuery) -> Result<Vec<Offer>>;

    /// Rents an offer and, when the request carries one, attaches the SSH public key.
    async fn create_instance(&self, request: &LaunchRequest) -> Result<InstanceId>;

    /// One instance; [`Error::NotFound`] when it does not exist (any more).
    async fn get_instance(&self, id: InstanceId) -> Result<Instance>;

    /// Every instance of the account, all pages.
    async fn list_instances(&self) -> Result<Vec<Instance>>;

    /// Instances whose label is exactly `label`.
    async fn list_instances_by_label(&self, label: &str) -> Result<Vec<Instance>>;

    /// Releases an instance. Success when it is already gone.
    async fn destroy_instance(&self, id: InstanceId) -> Result<()>;

    /// Replaces the instance's label.
    async fn set_label(&self, id: InstanceId, label: &str) -> Result<()>;

    /// Adds an SSH public key to the instance's authorized keys.
    async fn attach_ssh_key(&self, id: InstanceId, public_key: &str) -> Result<()>;
}

/// An offer for unit tests: one GPU in Texas, reliability 0.99, machine id = offer id + 1.
#[cfg(test)]
pub(crate) fn sample_offer(id: i64, gpu: &str, price: f64, vram: f64) -> Offer {
    Offer {
        id,
        machine_id: id + 1,
        host_id: None,
        gpu_name: gpu.into(),
        num_gpus: 1,
        vram_gb: vram,
        price_per_hour: price,
        reliability: 0.99,
        geolocation: Some("Texas, US".into()),
        country_code: Some("US".into()),
        verified: true,
        disk_gb: 200.0,
        cuda_max_good: None,
        inet_down_mbps: None,
        direct_port_count: None,
        score: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Reason;

    #[test]
    fn classification_follows_the_wrapped_error() {
        let left = Error::ContractLeftBehind {
            instance_id: InstanceId(7),
            source: Box::new(Error::RateLimited {
                endpoint: "create_instance",
                retry_after: Some(Duration::from_secs(3)),
            }),
        };
        assert_eq!(left.left_contract(), Some(InstanceId(7)));
        assert!(left.is_retryable());
        assert!(!left.is_not_found());
        assert_eq!(left.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(left.reason(), Reason::ProviderError);
        assert_eq!(left.category(), "ContractLeftBehind");
        let gone = Error::NotFound { what: "instance 7".into() };
        assert!(gone.is_not_found() && !gone.is_retryable());
        assert_eq!(gone.reason(), Reason::InstanceLost);
        let taken = Error::OfferUnavailable { offer_id: 1, message: String::new() };
        assert_eq!((taken.reason(), taken.category()), (Reason::OfferUnavailable, "OfferUnavailable"));
    }

    #[test]
    fn stopped_everywhere_is_an_interruption() {
        let s = |a, i, c, n| InstanceState::from_fields(a, i, c, n);
        assert_eq!(
            s(Some("stopped"), Some("stopped"), Some("stopped"), Some("stopped")),
            InstanceState::Interrupted
        );
        assert_eq!(
            s(Some("stopped"), Some("stopped"), Some("stopped"), Some("running")),
            InstanceState::Stopped
        );
        assert_eq!(s(None, Some("running"), Some("running"), None), InstanceState::Creating);
        assert_eq!(s(Some("running"), None, Some("unloaded"), None), InstanceState::Released);
    }
}
