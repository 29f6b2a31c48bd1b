//! The job's namespace's Secrets, where `spec.env[].valueFrom` and storage credentials are read
//! from (the engine's [`Secrets`] port).

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::artifacts::settings::secret_bytes;
use crate::engine::env::{SecretReadError, Secrets};

pub struct NamespaceSecrets(pub Api<Secret>);

#[async_trait]
impl Secrets for NamespaceSecrets {
    async fn secret(&self, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, SecretReadError> {
        let secret = self
            .0
            .get_opt(name)
            .await
            .map_err(|source| SecretReadError { name: name.to_string(), source: Box::new(source) })?;
        Ok(secret.as_ref().map(secret_bytes))
    }
}
