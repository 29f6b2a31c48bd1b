//! Where a job's results go (`spec.output`), resolved once per connection, for both front ends:
//! the S3 store with its credentials (from `credentialsSecretRef` or the process's environment)
//! and the Hugging Face token, read through the front end's [`Secrets`] (the pure bookkeeping of checkpoints and artifacts is [`crate::engine::results`]).
//! Credentials stay in the operator; messages name Secrets and fields, never values.

pub mod store;

use super::env::{SecretReadError, Secrets};
use crate::api::{HuggingFaceOutput, TrainingJobSpec};
use crate::artifacts::S3Settings;
use crate::artifacts::address::EndpointPolicy;
use crate::artifacts::huggingface::HfToken;
use crate::artifacts::plan::Destination;
use crate::artifacts::s3::S3Store;
use crate::artifacts::settings::output_endpoint_field;
use crate::error::error_chain;

/// The S3 destination of one job.
pub struct S3Target {
    pub store: S3Store,
    pub dest: Destination,
    pub sync_checkpoints: bool,
}

/// The Hugging Face destination of one job.
pub struct HfTarget {
    pub token: HfToken,
    pub output: HuggingFaceOutput,
}

/// Every destination the spec names. Both `None` means results stay on the machine.
#[derive(Default)]
pub struct Outputs {
    pub s3: Option<S3Target>,
    pub hf: Option<HfTarget>,
}

impl Outputs {
    pub fn is_empty(&self) -> bool {
        self.s3.is_none() && self.hf.is_none()
    }
}

/// Why `spec.output` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutputsError {
    /// A Secret could not be read: worth another try.
    #[error(transparent)]
    Read(#[from] SecretReadError),
    /// The job cannot upload (a missing Secret or key, bad settings, an endpoint the policy
    /// refuses); the message names the field.
    #[error("{0}")]
    Unusable(String),
}

/// Resolves `spec.output`.
pub async fn resolve(
    secrets: &dyn Secrets,
    spec: &TrainingJobSpec,
    job_name: &str,
    job_uid: &str,
    policy: EndpointPolicy,
) -> Result<Outputs, OutputsError> {
    let unusable = |message: String| Err(OutputsError::Unusable(message));
    let Some(output) = &spec.output else { return Ok(Outputs::default()) };
    let mut outputs = Outputs::default();
    if let Some(s3) = &output.s3 {
        let secret_data = match &s3.credentials_secret_ref {
            Some(secret_ref) => match secrets.secret(&secret_ref.name).await? {
                Some(data) => Some(data),
                None => {
                    return unusable(format!(
                        "spec.output.s3.credentialsSecretRef: Secret {} not found",
                        secret_ref.name
                    ));
                }
            },
            None => None,
        };
        let defaults = S3Settings::from_env().ok();
        let store = match S3Settings::for_output(s3, secret_data.as_ref(), defaults.as_ref()) {
            Ok(settings) => S3Store::connect(&settings, policy, output_endpoint_field(s3)).await,
            Err(e) => Err(e),
        };
        match store {
            Ok(store) => {
                outputs.s3 = Some(S3Target {
                    store,
                    dest: Destination::for_job(s3, job_name, job_uid),
                    sync_checkpoints: s3.sync_checkpoints,
                })
            }
            Err(e) => return unusable(format!("spec.output.s3: {}", error_chain(&e))),
        }
    }
    if let Some(hf) = &output.hugging_face {
        let r = &hf.token_secret_ref;
        let value = secrets.secret(&r.name).await?.and_then(|mut keys| keys.remove(&r.key));
        let Some(value) = value else {
            return unusable(format!(
                "spec.output.huggingFace.tokenSecretRef: Secret {} has no key {}",
                r.name, r.key
            ));
        };
        match std::str::from_utf8(&value)
            .map_err(|_| "is not UTF-8".to_string())
            .and_then(|v| HfToken::new(v).map_err(|e| e.to_string()))
        {
            Ok(token) => outputs.hf = Some(HfTarget { token, output: hf.clone() }),
            Err(why) => {
                return unusable(format!(
                    "spec.output.huggingFace.tokenSecretRef: key {} of Secret {} {why}",
                    r.key, r.name
                ));
            }
        }
    }
    Ok(outputs)
}
