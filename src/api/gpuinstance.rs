//! `GpuInstance`: one rented machine. Guarded by the `gputrainer.dev/terminate` finalizer, so
//! the machine is released before the object can disappear.
// kube's `printcolumn(...)` repeats keys like `type_` across columns, which clippy misreads as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

use super::{EnvVar, MachineRequirements, ProviderSpec, Reason, SecretRef, schema};

/// One rented GPU machine. Created by the TrainingJob controller (with an owner reference), or
/// by a person for an interactive box. Deleting it releases the machine; the finalizer stays
/// until the provider confirms the machine is gone.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "gputrainer.dev",
    version = "v1alpha1",
    kind = "GpuInstance",
    doc = "One rented GPU machine, released before the object can disappear.",
    plural = "gpuinstances",
    shortname = "gpui",
    category = "gputrainer",
    namespaced,
    status = "GpuInstanceStatus",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase"
    ),
    printcolumn(
        name = "GPU",
        type_ = "string",
        json_path = ".status.offer.gpuName",
        description = "GPU model"
    ),
    printcolumn(
        name = "$/H",
        type_ = "number",
        json_path = ".status.offer.pricePerHour",
        description = "Price per hour in USD"
    ),
    printcolumn(
        name = "Provider-ID",
        type_ = "string",
        json_path = ".status.providerId",
        description = "The provider's instance id"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = spec_schema)]
pub struct GpuInstanceSpec {
    /// Where the machine comes from. Defaults to the Vast.ai marketplace.
    #[serde(default)]
    pub provider: ProviderSpec,
    /// The machine to rent.
    #[serde(default)]
    pub requirements: MachineRequirements,
    /// Container image to run on the machine.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Approximate image size in GB, used to stretch the boot deadline for large images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub image_size_gb: Option<u32>,
    /// Seconds the machine may take from rent to SSH answering before it is released and
    /// reported as `BootTimeout`. Default 900, plus 30 s per GB of `imageSizeGb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 7200))]
    pub boot_timeout_seconds: Option<u32>,
    /// Environment of the container. Values from Secrets are resolved at rent time; no secret is
    /// written into the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
    /// Extra shell commands run when the container starts, inside the dead-man timer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16_384))]
    pub onstart: Option<String>,
    /// An OpenSSH public key to authorise on the machine, for an interactive box. Without it the
    /// operator generates a key pair for this instance and keeps the private half in a Secret
    /// owned by the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521) [A-Za-z0-9+/=]+( .*)?$"))]
    pub ssh_public_key: Option<String>,
    /// Secret with the private key (key `ssh-privatekey`) the operator uses to reach the machine.
    /// Set by the TrainingJob controller; leave unset to have a key pair generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key_secret_ref: Option<SecretRef>,
    /// Hard lifetime in seconds. A timer on the machine stops the workload and the container when
    /// it passes, even if the operator is gone, and the sweeper releases the machine. Default 4.5 h.
    #[serde(default = "default_max_lifetime")]
    #[schemars(range(min = 300, max = 2_678_400))]
    pub max_lifetime_seconds: i64,
}

/// What the API server checks across the spec's fields and between an instance and its previous
/// version. Everything that decides what is rented and how it is reached is used once, when the
/// machine is rented (the lifetime too: the timer on the machine is set then), so it cannot
/// change afterwards; only the boot deadline (`bootTimeoutSeconds`, `imageSizeGb`), which the
/// controller reads on every pass, stays editable.
fn spec_schema(s: &mut Schema) {
    schema::cel_rule(
        s,
        "!has(self.bootTimeoutSeconds) || !has(self.maxLifetimeSeconds) \
         || self.bootTimeoutSeconds < self.maxLifetimeSeconds",
        "bootTimeoutSeconds",
        "spec.bootTimeoutSeconds must be below spec.maxLifetimeSeconds (the machine would stop \
         before it is given up as not booted)",
    );
    for field in [
        "provider",
        "requirements",
        "image",
        "env",
        "onstart",
        "sshPublicKey",
        "sshKeySecretRef",
        "maxLifetimeSeconds",
    ] {
        schema::immutable(s, field, &format!("spec.{field}"), "GpuInstance");
    }
}

fn default_max_lifetime() -> i64 {
    4 * 3600 + 1800
}

/// Lifecycle phase of a `GpuInstance`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum GpuInstancePhase {
    /// Accepted; nothing rented yet.
    #[default]
    Pending,
    /// The rent call is in progress or being confirmed.
    Creating,
    /// Rented; the container is starting.
    Booting,
    /// SSH answers; ready for work.
    Running,
    /// Being released.
    Terminating,
    /// Released; the provider no longer lists it.
    Terminated,
    /// The provider no longer lists a machine that should be running.
    Lost,
    /// Could not be rented or failed to boot; `reason` says why.
    Failed,
}

/// Observed state of a `GpuInstance`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuInstanceStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: GpuInstancePhase,
    /// Why the instance is in this phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// A sentence for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The provider's id for the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// The label set on the machine at the provider:
    /// `gputrainer:<installation id>:<GpuInstance UID>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The marketplace offer that was rented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<OfferStatus>,
    /// How to reach the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshEndpointStatus>,
    /// The provider's own view of the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_status: Option<ProviderStatus>,
    /// Machines that failed this instance (boot failure, bad host); never offered again to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_machine_ids: Vec<i64>,
    /// Conditions: Launched, Reachable, Ready, InstanceTerminating, TerminationStuck.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the provider accepted the rent call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<Time>,
    /// When the provider was last asked about the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_observed_at: Option<Time>,
}

/// The marketplace offer that was rented.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OfferStatus {
    /// Offer (ask) id.
    pub id: i64,
    /// Host machine id.
    pub machine_id: i64,
    /// GPU model.
    pub gpu_name: String,
    /// Number of GPUs.
    pub num_gpus: u32,
    /// Memory per GPU in GB.
    pub vram_gb: f64,
    /// Price in US dollars per hour for the whole machine.
    pub price_per_hour: f64,
    /// Host reliability score from 0 to 1.
    pub reliability: f64,
    /// Where the machine is, as the provider says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geolocation: Option<String>,
}

/// How to reach the machine over SSH.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshEndpointStatus {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// SHA-256 fingerprint of the host key seen on first contact; later connections must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key_fingerprint: Option<String>,
}

/// The provider's own state fields for the machine.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderStatus {
    /// What the machine is doing (`actual_status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<String>,
    /// What it was asked to do (`intended_status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intended: Option<String>,
    /// The provider's current state (`cur_state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// The provider's last status message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
