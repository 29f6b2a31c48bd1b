//! The SSH key pair of a GpuInstance: generated per instance, private half in a Secret owned by
//! the GpuInstance (so it is deleted with it), public half given to the machine at rent. A key
//! the spec names (`sshKeySecretRef`, set by the TrainingJob controller) is used instead.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Resource, ResourceExt};

use russh::keys::ssh_key::PrivateKey;

use crate::api::GpuInstance;
use crate::machine::key::{GenerateKeyError, generate_key};

/// Secret key holding the OpenSSH private key.
pub const PRIVATE_KEY: &str = "ssh-privatekey";
/// Secret key holding the OpenSSH public key line.
pub const PUBLIC_KEY: &str = "ssh-publickey";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to read Secret {name}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to create Secret {name}")]
    Create {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {name} has no usable {PRIVATE_KEY} (an OpenSSH ed25519 private key)")]
    Unusable { name: String },
    #[error(transparent)]
    Generate(#[from] GenerateKeyError),
}

/// The key pair to use for a machine.
#[derive(Clone)]
pub struct KeyPair {
    pub private_openssh: String,
    pub public_openssh: String,
    pub secret_name: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("secret_name", &self.secret_name).finish_non_exhaustive()
    }
}

/// The name of the generated key's Secret.
pub fn generated_secret_name(instance: &GpuInstance) -> String {
    format!("{}-ssh-key", instance.name_any())
}

/// Returns the instance's key pair, creating the generated Secret when needed.
pub async fn ensure_key(secrets: &Api<Secret>, instance: &GpuInstance) -> Result<KeyPair, KeyError> {
    let name = instance
        .spec
        .ssh_key_secret_ref
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_else(|| generated_secret_name(instance));
    if let Some(secret) =
        secrets.get_opt(&name).await.map_err(|source| KeyError::Read { name: name.clone(), source })?
    {
        return key_from_secret(&secret, &name);
    }
    if instance.spec.ssh_key_secret_ref.is_some() {
        return Err(KeyError::Unusable { name });
    }
    let (private, public) = generate_key(&format!("gpu-trainer:{}", instance.name_any()))?;
    let owner = instance.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o
    });
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: instance.namespace(),
            owner_references: owner.map(|o| vec![o]),
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "gpu-trainer".to_string())].into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/ssh-auth".into()),
        data: Some(
            [
                (PRIVATE_KEY.to_string(), ByteString(private.clone().into_bytes())),
                (PUBLIC_KEY.to_string(), ByteString(public.clone().into_bytes())),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(KeyPair { private_openssh: private, public_openssh: public, secret_name: name }),
        // Created concurrently (a previous reconcile whose response was lost): use what is stored.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret =
                secrets.get(&name).await.map_err(|source| KeyError::Read { name: name.clone(), source })?;
            key_from_secret(&secret, &name)
        }
        Err(source) => Err(KeyError::Create { name, source }),
    }
}

fn key_from_secret(secret: &Secret, name: &str) -> Result<KeyPair, KeyError> {
    let unusable = || KeyError::Unusable { name: name.to_string() };
    let data = secret.data.as_ref().ok_or_else(unusable)?;
    let private = data.get(PRIVATE_KEY).ok_or_else(unusable)?;
    let private = String::from_utf8(private.0.clone()).map_err(|_| unusable())?;
    let key = PrivateKey::from_openssh(&private).map_err(|_| unusable())?;
    let public = key.public_key().to_openssh().map_err(|_| unusable())?;
    Ok(KeyPair { private_openssh: private, public_openssh: public, secret_name: name.to_string() })
}
