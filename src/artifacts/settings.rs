//! Where the operator's S3-compatible storage is and how it signs: endpoint, region (R2 uses
//! `auto`), path-style addressing and credentials. Credentials come from a Kubernetes Secret or
//! the operator's environment and stay in the operator: nothing in this module is ever rendered
//! into anything sent to the machine, and `Debug` never shows the secret parts.

use std::collections::BTreeMap;
use std::fmt;

use super::ArtifactError;
use crate::api::S3Output;

/// Region used when none is configured. R2 ignores the region ("auto"); S3 needs a real one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// An access key pair (and optional session token).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Keys accepted in a credentials Secret: the AWS environment names, or camelCase.
const ACCESS_KEY_NAMES: [&str; 2] = ["AWS_ACCESS_KEY_ID", "accessKeyId"];
const SECRET_KEY_NAMES: [&str; 2] = ["AWS_SECRET_ACCESS_KEY", "secretAccessKey"];
const SESSION_TOKEN_NAMES: [&str; 2] = ["AWS_SESSION_TOKEN", "sessionToken"];

impl S3Credentials {
    /// Reads `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or `accessKeyId` / `secretAccessKey`)
    /// and optionally `AWS_SESSION_TOKEN` (`sessionToken`) from a Secret's decoded data.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, ArtifactError> {
        let get = |names: &[&str]| -> Result<Option<String>, ArtifactError> {
            for name in names {
                if let Some(bytes) = data.get(*name) {
                    let value = String::from_utf8(bytes.clone())
                        .map_err(|_| ArtifactError::Settings(format!("secret key {name} is not UTF-8")))?;
                    return Ok(Some(value.trim().to_string()));
                }
            }
            Ok(None)
        };
        let access_key_id = get(&ACCESS_KEY_NAMES)?.ok_or_else(|| {
            ArtifactError::Settings("the credentials Secret has no AWS_ACCESS_KEY_ID".into())
        })?;
        let secret_access_key = get(&SECRET_KEY_NAMES)?.ok_or_else(|| {
            ArtifactError::Settings("the credentials Secret has no AWS_SECRET_ACCESS_KEY".into())
        })?;
        let session_token = get(&SESSION_TOKEN_NAMES)?.filter(|t| !t.is_empty());
        Self::checked(access_key_id, secret_access_key, session_token)
    }

    /// Reads the keys above from a Secret (`data`, and `stringData` as written by hand).
    pub fn from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Result<Self, ArtifactError> {
        Self::from_secret_data(&secret_bytes(secret))
    }

    /// Reads the standard AWS variables from the operator's environment.
    pub fn from_env() -> Result<Self, ArtifactError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ArtifactError> {
        let access_key_id = lookup("AWS_ACCESS_KEY_ID")
            .ok_or_else(|| ArtifactError::Settings("AWS_ACCESS_KEY_ID is not set".into()))?;
        let secret_access_key = lookup("AWS_SECRET_ACCESS_KEY")
            .ok_or_else(|| ArtifactError::Settings("AWS_SECRET_ACCESS_KEY is not set".into()))?;
        let session_token = lookup("AWS_SESSION_TOKEN").filter(|t| !t.is_empty());
        Self::checked(access_key_id, secret_access_key, session_token)
    }

    fn checked(
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    ) -> Result<Self, ArtifactError> {
        if access_key_id.is_empty() || secret_access_key.is_empty() {
            return Err(ArtifactError::Settings("empty S3 access key id or secret".into()));
        }
        Ok(Self { access_key_id, secret_access_key, session_token })
    }
}

/// A Secret's values as bytes, `stringData` overriding `data` as the API server would.
pub fn secret_bytes(secret: &k8s_openapi::api::core::v1::Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> =
        secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// Where the operator's default endpoint comes from, for messages.
pub const OPERATOR_ENDPOINT_FIELD: &str = "the operator's AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL)";

/// Where the endpoint of [`S3Settings::for_output`] comes from, for messages: the spec's field
/// when it is set, else the operator's environment.
pub fn output_endpoint_field(output: &S3Output) -> &'static str {
    match output.endpoint {
        Some(_) => "spec.output.s3.endpoint",
        None => OPERATOR_ENDPOINT_FIELD,
    }
}

/// Everything needed to talk to one S3-compatible service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Settings {
    /// Custom endpoint (R2: `https://<account>.r2.cloudflarestorage.com`; Garage, MinIO). `None`
    /// is AWS S3.
    pub endpoint: Option<String>,
    pub region: String,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key`. Needed by most
    /// self-hosted servers; harmless on R2.
    pub force_path_style: bool,
    pub credentials: S3Credentials,
}

impl S3Settings {
    /// Reads the operator's defaults: credentials as above, `AWS_ENDPOINT_URL_S3` or
    /// `AWS_ENDPOINT_URL`, `AWS_REGION` or `AWS_DEFAULT_REGION`, and
    /// `GPU_TRAINER_S3_FORCE_PATH_STYLE` (`true`/`1`).
    pub fn from_env() -> Result<Self, ArtifactError> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ArtifactError> {
        let credentials = S3Credentials::from_lookup(&lookup)?;
        let endpoint = lookup("AWS_ENDPOINT_URL_S3").or_else(|| lookup("AWS_ENDPOINT_URL"));
        let region = lookup("AWS_REGION")
            .or_else(|| lookup("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let force_path_style = lookup("GPU_TRAINER_S3_FORCE_PATH_STYLE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
            .unwrap_or(false);
        let settings = Self { endpoint, region, force_path_style, credentials };
        settings.validate()?;
        Ok(settings)
    }

    /// The settings for one job's output: fields set in the spec override `defaults`, and
    /// `secret_data` (the Secret named by `credentialsSecretRef`, already read) replaces the
    /// default credentials.
    pub fn for_output(
        output: &S3Output,
        secret_data: Option<&BTreeMap<String, Vec<u8>>>,
        defaults: Option<&S3Settings>,
    ) -> Result<Self, ArtifactError> {
        let credentials = match (secret_data, defaults) {
            (Some(data), _) => S3Credentials::from_secret_data(data)?,
            (None, Some(d)) => d.credentials.clone(),
            (None, None) => {
                return Err(ArtifactError::Settings(
                    "no S3 credentials: set output.s3.credentialsSecretRef or the operator's AWS_* variables"
                        .into(),
                ));
            }
        };
        let settings = Self {
            endpoint: output.endpoint.clone().or_else(|| defaults.and_then(|d| d.endpoint.clone())),
            region: output
                .region
                .clone()
                .or_else(|| defaults.map(|d| d.region.clone()))
                .unwrap_or_else(|| DEFAULT_REGION.to_string()),
            force_path_style: output
                .force_path_style
                .unwrap_or_else(|| defaults.map(|d| d.force_path_style).unwrap_or(false)),
            credentials,
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ArtifactError> {
        if let Some(endpoint) = &self.endpoint {
            let url = url::Url::parse(endpoint)
                .map_err(|e| ArtifactError::Settings(format!("invalid S3 endpoint {endpoint:?}: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(ArtifactError::Settings(format!("invalid S3 endpoint {endpoint:?}")));
            }
        }
        if self.region.is_empty() {
            return Err(ArtifactError::Settings("empty S3 region".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn settings_from_environment_use_endpoint_region_and_path_style() {
        let s = S3Settings::from_lookup(lookup(&[
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "SECRET"),
            ("AWS_ENDPOINT_URL_S3", "https://acct.r2.cloudflarestorage.com"),
            ("AWS_REGION", "auto"),
            ("GPU_TRAINER_S3_FORCE_PATH_STYLE", "true"),
        ]))
        .unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("https://acct.r2.cloudflarestorage.com"));
        assert_eq!(s.region, "auto");
        assert!(s.force_path_style);
    }

    #[test]
    fn missing_secret_key_is_an_error() {
        assert!(S3Settings::from_lookup(lookup(&[("AWS_ACCESS_KEY_ID", "AKID")])).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = S3Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("tok-secret".into()),
        };
        let text = format!("{c:?}");
        assert!(!text.contains("very-secret") && !text.contains("tok-secret"), "{text}");
    }

    #[test]
    fn output_fields_override_defaults_and_secret_replaces_credentials() {
        let defaults = S3Settings::from_lookup(lookup(&[
            ("AWS_ACCESS_KEY_ID", "DEFAULT"),
            ("AWS_SECRET_ACCESS_KEY", "DEFAULT-SECRET"),
        ]))
        .unwrap();
        let output = S3Output {
            bucket: "models".into(),
            prefix: None,
            sync_checkpoints: true,
            endpoint: Some("http://127.0.0.1:3900".into()),
            region: Some("garage".into()),
            force_path_style: Some(true),
            credentials_secret_ref: None,
        };
        let secret: BTreeMap<String, Vec<u8>> = [
            ("accessKeyId".to_string(), b"JOBKEY".to_vec()),
            ("secretAccessKey".to_string(), b"JOBSECRET\n".to_vec()),
        ]
        .into();
        let s = S3Settings::for_output(&output, Some(&secret), Some(&defaults)).unwrap();
        assert_eq!(s.credentials.access_key_id, "JOBKEY");
        assert_eq!(s.credentials.secret_access_key, "JOBSECRET");
        assert_eq!(s.region, "garage");
        assert!(s.force_path_style);
        let s = S3Settings::for_output(&output, None, Some(&defaults)).unwrap();
        assert_eq!(s.credentials.access_key_id, "DEFAULT");
        assert!(S3Settings::for_output(&output, None, None).is_err());
        assert_eq!(output_endpoint_field(&output), "spec.output.s3.endpoint");
        let without = S3Output { endpoint: None, ..output };
        assert_eq!(output_endpoint_field(&without), OPERATOR_ENDPOINT_FIELD);
    }

    #[test]
    fn credentials_are_read_from_a_secret() {
        use k8s_openapi::ByteString;
        let secret = k8s_openapi::api::core::v1::Secret {
            data: Some([("AWS_ACCESS_KEY_ID".to_string(), ByteString(b"AK".to_vec()))].into()),
            string_data: Some([("AWS_SECRET_ACCESS_KEY".to_string(), "SK".to_string())].into()),
            ..Default::default()
        };
        let c = S3Credentials::from_secret(&secret).unwrap();
        assert_eq!((c.access_key_id.as_str(), c.secret_access_key.as_str()), ("AK", "SK"));
    }

    #[test]
    fn endpoint_must_be_an_http_url() {
        let r = S3Settings::from_lookup(lookup(&[
            ("AWS_ACCESS_KEY_ID", "A"),
            ("AWS_SECRET_ACCESS_KEY", "B"),
            ("AWS_ENDPOINT_URL", "not a url"),
        ]));
        assert!(r.is_err());
    }
}
