//! Provider settings read from the environment, with the names users of earlier Vast.ai tooling
//! know. They are the defaults a job falls back to when its `resources` do not say.
//!
//! | variable | default |
//! | --- | --- |
//! | `VASTAI_API_KEY` | required |
//! | `VASTAI_API_BASE_URL` | `https://console.vast.ai` |
//! | `VASTAI_PREFERRED_GPUS` | empty (comma-separated preference order, e.g. `4090,A100`) |
//! | `VASTAI_MAX_BID_PER_HOUR` | 4.50 |
//! | `VASTAI_MIN_VRAM_GB` | 24 |
//! | `VASTAI_DEFAULT_DISK_GB` | 64 |

use std::fmt;

use url::Url;

pub const ENV_API_KEY: &str = "VASTAI_API_KEY";
pub const ENV_BASE_URL: &str = "VASTAI_API_BASE_URL";
pub const ENV_PREFERRED_GPUS: &str = "VASTAI_PREFERRED_GPUS";
pub const ENV_MAX_BID_PER_HOUR: &str = "VASTAI_MAX_BID_PER_HOUR";
pub const ENV_MIN_VRAM_GB: &str = "VASTAI_MIN_VRAM_GB";
pub const ENV_DEFAULT_DISK_GB: &str = "VASTAI_DEFAULT_DISK_GB";

pub const DEFAULT_BASE_URL: &str = "https://console.vast.ai";
pub const DEFAULT_MAX_BID_PER_HOUR: f64 = 4.50;
pub const DEFAULT_MIN_VRAM_GB: u32 = 24;
pub const DEFAULT_DISK_GB: u32 = 64;
/// Reliability floor when neither the job nor the operator says (the CRD documents 0.95).
pub const DEFAULT_MIN_RELIABILITY: f64 = 0.95;

/// An API key. It has no `Display`, and `Debug` prints a placeholder, so it cannot end up in a
/// log line or error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The secret itself, for the Authorization header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Errors reading the provider configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{ENV_API_KEY} is not set; the operator needs a Vast.ai API key (from a Secret in the cluster)")]
    MissingApiKey,
    #[error("{var} is invalid ({value:?}): {reason}")]
    Invalid { var: &'static str, value: String, reason: String },
}

/// The provider settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderConfig {
    pub api_key: ApiKey,
    pub base_url: Url,
    /// GPU models in preference order, used when a job names none.
    pub preferred_gpus: Vec<String>,
    pub max_bid_per_hour: f64,
    pub min_vram_gb: u32,
    pub default_disk_gb: u32,
}

impl ProviderConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (the environment, the operator's config, or a test map).
    /// Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let api_key = get(ENV_API_KEY).map(ApiKey::new).ok_or(ConfigError::MissingApiKey)?;
        let base_url = match get(ENV_BASE_URL) {
            None => parse_base_url(DEFAULT_BASE_URL)?,
            Some(value) => parse_base_url(&value)?,
        };
        let preferred_gpus = get(ENV_PREFERRED_GPUS)
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        let max_bid_per_hour = match get(ENV_MAX_BID_PER_HOUR) {
            None => DEFAULT_MAX_BID_PER_HOUR,
            Some(value) => match value.parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => v,
                _ => {
                    return Err(invalid(
                        ENV_MAX_BID_PER_HOUR,
                        value,
                        "expected a positive number of dollars",
                    ));
                }
            },
        };
        let min_vram_gb = parse_u32(&get, ENV_MIN_VRAM_GB, DEFAULT_MIN_VRAM_GB)?;
        let default_disk_gb = parse_u32(&get, ENV_DEFAULT_DISK_GB, DEFAULT_DISK_GB)?;
        Ok(Self { api_key, base_url, preferred_gpus, max_bid_per_hour, min_vram_gb, default_disk_gb })
    }
}

fn parse_u32(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: u32,
) -> Result<u32, ConfigError> {
    match get(var) {
        None => Ok(default),
        Some(value) => match value.parse::<u32>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(invalid(var, value, "expected a positive whole number")),
        },
    }
}

fn invalid(var: &'static str, value: String, reason: &str) -> ConfigError {
    ConfigError::Invalid { var, value, reason: reason.to_string() }
}

/// Parses a base URL and drops a trailing slash: the API paths start with one, and `//api/...`
/// is a different path.
pub fn parse_base_url(value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value.trim_end_matches('/'))
        .map_err(|e| invalid(ENV_BASE_URL, value.to_string(), &e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(invalid(ENV_BASE_URL, value.to_string(), "expected an http or https URL"));
    }
    if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(ENV_BASE_URL, value.to_string(), "no query or credentials in the URL"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_apply_when_only_the_key_is_set() {
        let config = ProviderConfig::from_lookup(lookup(&[(ENV_API_KEY, "k")])).unwrap();
        assert_eq!(config.base_url.as_str(), "https://console.vast.ai/");
        assert_eq!(config.max_bid_per_hour, 4.50);
        assert_eq!(config.min_vram_gb, 24);
        assert_eq!(config.default_disk_gb, 64);
        assert!(config.preferred_gpus.is_empty());
    }

    #[test]
    fn missing_or_empty_key_is_a_clear_error() {
        for pairs in [&[][..], &[(ENV_API_KEY, "  ")][..]] {
            let err = ProviderConfig::from_lookup(lookup(pairs)).unwrap_err();
            assert!(matches!(err, ConfigError::MissingApiKey));
            assert!(err.to_string().contains("VASTAI_API_KEY is not set"), "{err}");
        }
    }

    #[test]
    fn every_variable_is_read() {
        let config = ProviderConfig::from_lookup(lookup(&[
            (ENV_API_KEY, "k"),
            (ENV_BASE_URL, "http://127.0.0.1:8080/"),
            (ENV_PREFERRED_GPUS, "4090, A100,,"),
            (ENV_MAX_BID_PER_HOUR, "1.25"),
            (ENV_MIN_VRAM_GB, "40"),
            (ENV_DEFAULT_DISK_GB, "100"),
        ]))
        .unwrap();
        assert_eq!(config.base_url.as_str(), "http://127.0.0.1:8080/");
        assert_eq!(config.preferred_gpus, vec!["4090", "A100"]);
        assert_eq!(config.max_bid_per_hour, 1.25);
        assert_eq!((config.min_vram_gb, config.default_disk_gb), (40, 100));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            (ENV_MAX_BID_PER_HOUR, "cheap"),
            (ENV_MAX_BID_PER_HOUR, "-1"),
            (ENV_MIN_VRAM_GB, "0"),
            (ENV_DEFAULT_DISK_GB, "1.5"),
            (ENV_BASE_URL, "ftp://example.com"),
            (ENV_BASE_URL, "not a url"),
        ];
        for (var, value) in cases {
            let err = ProviderConfig::from_lookup(lookup(&[(ENV_API_KEY, "k"), (var, value)])).unwrap_err();
            assert!(err.to_string().starts_with(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn debug_output_hides_the_key() {
        let config = ProviderConfig::from_lookup(lookup(&[(ENV_API_KEY, "sekrit-key-123")])).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("sekrit-key-123"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }
}
