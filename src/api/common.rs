//! Building blocks shared by `TrainingJob` and `GpuInstance`: machine requirements, the
//! provider choice, environment variables and Secret references.

use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

use super::schema;

/// A reference to one key of a Secret in the same namespace as the object that names it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's `data`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A reference to a whole Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// One environment variable for the training process. Secrets are referenced, never inlined:
/// a value from a Secret reaches the rented machine only as an environment variable of the
/// process that needs it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = env_var_schema)]
pub struct EnvVar {
    /// Variable name: letters, digits and underscores, not starting with a digit.
    #[schemars(pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"), length(max = 128))]
    pub name: String,
    /// Literal value. Exactly one of `value` and `valueFrom` is set.
    // Bounded so that comparing a whole `env` list (the GpuInstance immutability rule) stays
    // within the API server's CEL cost budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32_768))]
    pub value: Option<String>,
    /// Where to read the value from. Exactly one of `value` and `valueFrom` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

fn env_var_schema(s: &mut Schema) {
    schema::exactly_one_of(s, &["value", "valueFrom"]);
}

/// The source of an environment variable's value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    /// A key of a Secret in the same namespace.
    pub secret_key_ref: SecretKeyRef,
}

/// What kind of GPU to rent and how many.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuRequirements {
    /// Acceptable GPU models in order of preference, as the marketplace names them
    /// (e.g. `RTX 4090`, `A100 SXM4`, `H100 PCIE`). Empty means any model with enough VRAM;
    /// the operator's `VASTAI_PREFERRED_GPUS` then decides the order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub names: Vec<String>,
    /// Number of GPUs on one machine.
    #[serde(default = "default_gpu_count")]
    #[schemars(range(min = 1, max = 16))]
    pub count: u32,
    /// Minimum memory per GPU in GB. Defaults to the operator's `VASTAI_MIN_VRAM_GB` (24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub min_vram_gb: Option<u32>,
}

fn default_gpu_count() -> u32 {
    1
}

impl Default for GpuRequirements {
    fn default() -> Self {
        Self { names: Vec::new(), count: default_gpu_count(), min_vram_gb: None }
    }
}

/// The machine to rent. Unset fields fall back to the operator's defaults (shown per field),
/// then to the training tool's own recommendation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineRequirements {
    /// GPU model, count and memory.
    #[serde(default)]
    pub gpu: GpuRequirements,
    /// Container disk in GB. Defaults to the operator's `VASTAI_DEFAULT_DISK_GB` (64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 8192))]
    pub disk_gb: Option<u32>,
    /// Highest acceptable price in US dollars per hour for the whole machine.
    /// Defaults to the operator's `VASTAI_MAX_BID_PER_HOUR` (4.50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1000.0))]
    pub max_price_per_hour: Option<f64>,
    /// Lowest acceptable host reliability score, from 0 to 1. Defaults to 0.95.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_reliability: Option<f64>,
    /// Acceptable locations as ISO 3166 country codes or continent names (e.g. `US`, `DE`,
    /// `Europe`). Empty means anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 2, max = 64)))]
    pub regions: Vec<String>,
    /// Container image to run, overriding the training tool's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Rent only machines the marketplace has verified. Defaults to true.
    #[serde(default = "default_true")]
    pub verified_only: bool,
}

// By hand rather than derived: an omitted `resources` must mean the same as `resources: {}`,
// and `verifiedOnly` defaults to true (a derived Default would say false).
impl Default for MachineRequirements {
    fn default() -> Self {
        Self {
            gpu: GpuRequirements::default(),
            disk_gb: None,
            max_price_per_hour: None,
            min_reliability: None,
            regions: Vec::new(),
            image: None,
            verified_only: default_true(),
        }
    }
}

pub(crate) fn default_true() -> bool {
    true
}

/// Where the GPU comes from. Exactly one of `vastai` and `ssh` is set; the default is `vastai`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = provider_schema)]
pub struct ProviderSpec {
    /// Rent a machine on the Vast.ai marketplace (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vastai: Option<VastaiProvider>,
    /// Use an existing machine reachable over SSH; nothing is rented or released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshProvider>,
}

fn provider_schema(s: &mut Schema) {
    schema::exactly_one_of(s, &["vastai", "ssh"]);
}

impl Default for ProviderSpec {
    fn default() -> Self {
        Self { vastai: Some(VastaiProvider::default()), ssh: None }
    }
}

/// Options for the Vast.ai marketplace. The API key is the operator's, never the job's.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VastaiProvider {}

/// An existing machine reachable over SSH.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshProvider {
    /// Host name or IP address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// SSH port.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Login user.
    #[serde(default = "default_ssh_user")]
    #[schemars(length(min = 1, max = 64))]
    pub user: String,
    /// Secret key holding the OpenSSH private key (ed25519) for this machine. Required in a
    /// cluster; `gpu-trainer launch --provider ssh` takes `--ssh-key FILE` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_ref: Option<SecretKeyRef>,
}

fn default_ssh_port() -> u16 {
    22
}

fn default_ssh_user() -> String {
    "root".into()
}

/// Machine details as the training job and `kubectl get` show them.
pub fn describe_gpu(count: u32, name: &str) -> String {
    if count <= 1 { name.to_string() } else { format!("{count}x {name}") }
}
