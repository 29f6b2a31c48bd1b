//! The trainer's environment from `spec.env`, once for both front ends: literal values as they
//! are, `valueFrom.secretKeyRef` through a [`Secrets`] port (the job's namespace in a cluster,
//! `--secret` files for `gpu-trainer launch`). Values are never logged; errors name the variable,
//! the Secret and the key, never a value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::api::EnvVar;

/// Where Secrets come from: `valueFrom.secretKeyRef` values and storage credentials.
#[async_trait]
pub trait Secrets: Send + Sync {
    /// Every key of Secret `name`: `Ok(None)` when it does not exist, `Err` when it could not be
    /// read (worth another try).
    async fn secret(&self, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, SecretReadError>;

    /// What to tell the user when Secret `name` is missing, on this front end.
    fn missing_secret(&self, name: &str) -> String {
        format!("Secret {name} does not exist")
    }

    /// What to tell the user when Secret `name` or its `key` is missing, on this front end.
    fn missing(&self, name: &str, key: &str) -> String {
        format!("Secret {name} has no key {key}")
    }
}

/// Reading a Secret failed for a reason that may pass (the API server, a file).
#[derive(Debug, thiserror::Error)]
#[error("failed to read Secret {name}")]
pub struct SecretReadError {
    pub name: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The job cannot run as written: a Secret or key is missing or not text.
    #[error("spec.env {var}: {message}")]
    Unresolvable { var: String, message: String },
    #[error(transparent)]
    Read(#[from] SecretReadError),
}

/// The trainer's environment, in `spec.env` order.
pub async fn resolve_env(secrets: &dyn Secrets, env: &[EnvVar]) -> Result<Vec<(String, String)>, EnvError> {
    let mut resolved = Vec::with_capacity(env.len());
    for var in env {
        if let Some(value) = &var.value {
            resolved.push((var.name.clone(), value.clone()));
            continue;
        }
        let Some(from) = &var.value_from else { continue };
        let r = &from.secret_key_ref;
        let unresolvable = |message: String| EnvError::Unresolvable { var: var.name.clone(), message };
        let value = secrets.secret(&r.name).await?.and_then(|mut keys| keys.remove(&r.key));
        match value.map(String::from_utf8) {
            Some(Ok(value)) => resolved.push((var.name.clone(), value)),
            Some(Err(_)) => {
                return Err(unresolvable(format!("key {} of Secret {} is not UTF-8", r.key, r.name)));
            }
            None => return Err(unresolvable(secrets.missing(&r.name, &r.key))),
        }
    }
    Ok(resolved)
}

/// Secrets read from env files (`KEY=VALUE` lines, the format `kubectl create secret generic
/// NAME --from-env-file=FILE` reads), one file per Secret name: `gpu-trainer launch --secret
/// NAME=FILE`. Held in memory only, never written to the state file.
#[derive(Default)]
pub struct FileSecrets(BTreeMap<String, BTreeMap<String, Vec<u8>>>);

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("--secret {0}: expected NAME=FILE")]
    Syntax(String),
    #[error("--secret {name}: cannot read {path}")]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--secret {name}: {path} line {line}: expected KEY=VALUE")]
    Line { name: String, path: PathBuf, line: usize },
}

impl FileSecrets {
    /// Reads `NAME=FILE` arguments.
    pub fn load(arguments: &[String]) -> Result<Self, SecretFileError> {
        let mut secrets = Self::default();
        for argument in arguments {
            let (name, path) = argument
                .split_once('=')
                .filter(|(n, p)| !n.is_empty() && !p.is_empty())
                .ok_or_else(|| SecretFileError::Syntax(argument.clone()))?;
            let path = PathBuf::from(path);
            let text = std::fs::read_to_string(&path).map_err(|source| SecretFileError::Read {
                name: name.to_string(),
                path: path.clone(),
                source,
            })?;
            let keys = secrets.0.entry(name.to_string()).or_default();
            for (index, line) in text.lines().enumerate() {
                // kubectl's env-file rules: blank lines and `#` comments are skipped, the value is
                // everything after the first `=`, taken literally (no quotes, no expansion).
                let line = line.trim_start();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (key, value) = line.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or_else(|| {
                    SecretFileError::Line { name: name.to_string(), path: path.clone(), line: index + 1 }
                })?;
                keys.insert(key.to_string(), value.as_bytes().to_vec());
            }
        }
        Ok(secrets)
    }

    pub fn insert(&mut self, name: &str, key: &str, value: &[u8]) {
        self.0.entry(name.to_string()).or_default().insert(key.to_string(), value.to_vec());
    }
}

#[async_trait]
impl Secrets for FileSecrets {
    async fn secret(&self, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, SecretReadError> {
        Ok(self.0.get(name).cloned())
    }

    fn missing_secret(&self, name: &str) -> String {
        format!("Secret {name} is not given: pass --secret {name}=FILE (a file of KEY=VALUE lines)")
    }

    fn missing(&self, name: &str, key: &str) -> String {
        if self.0.contains_key(name) {
            format!("the --secret file for Secret {name} has no key {key}")
        } else {
            format!(
                "Secret {name} is not given: pass --secret {name}=FILE (a file of KEY=VALUE lines with {key})"
            )
        }
    }
}

impl std::fmt::Debug for FileSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: values are secret.
        f.debug_list().entries(self.0.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(json: serde_json::Value) -> Vec<EnvVar> {
        serde_json::from_value(json).unwrap()
    }

    fn secrets() -> FileSecrets {
        let mut s = FileSecrets::default();
        s.insert("hf", "token", b"hf_secret");
        s.insert("hf", "binary", &[0xff, 0xfe]);
        s
    }

    #[tokio::test]
    async fn values_and_secret_keys_resolve_in_order() {
        let env = vars(serde_json::json!([
            {"name": "A", "value": "1"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        ]));
        let resolved = resolve_env(&secrets(), &env).await.unwrap();
        assert_eq!(resolved, [("A".into(), "1".into()), ("HF_TOKEN".into(), "hf_secret".into())]);
    }

    #[tokio::test]
    async fn a_missing_key_or_binary_value_names_the_variable_and_never_a_value() {
        for (key, words) in [
            ("nope", "the --secret file for Secret hf has no key nope"),
            ("binary", "key binary of Secret hf is not UTF-8"),
        ] {
            let env = vars(
                serde_json::json!([{"name": "T", "valueFrom": {"secretKeyRef": {"name": "hf", "key": key}}}]),
            );
            let err = resolve_env(&secrets(), &env).await.unwrap_err();
            assert_eq!(err.to_string(), format!("spec.env T: {words}"));
        }
        let env = vars(
            serde_json::json!([{"name": "T", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]),
        );
        let err = resolve_env(&FileSecrets::default(), &env).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.env T: Secret hf is not given: pass --secret hf=FILE (a file of KEY=VALUE lines with token)"
        );
        assert!(
            format!("{:?}", secrets()).contains("hf") && !format!("{:?}", secrets()).contains("hf_secret")
        );
    }

    #[test]
    fn secret_files_follow_kubectl_env_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hf.env");
        std::fs::write(&file, "# a comment\n\ntoken=hf_a=b \"q\"\n  other=x\n").unwrap();
        let secrets = FileSecrets::load(&[format!("hf={}", file.display())]).unwrap();
        assert_eq!(secrets.0["hf"]["token"], b"hf_a=b \"q\"");
        assert_eq!(secrets.0["hf"]["other"], b"x");
        std::fs::write(&file, "no equals sign\n").unwrap();
        let err = FileSecrets::load(&[format!("hf={}", file.display())]).unwrap_err();
        assert!(err.to_string().ends_with("line 1: expected KEY=VALUE"), "{err}");
        assert!(matches!(FileSecrets::load(&["hf".into()]), Err(SecretFileError::Syntax(_))));
    }
}
