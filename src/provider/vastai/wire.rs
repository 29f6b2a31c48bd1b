//! Serde types for the Vast.ai wire format, as loose as the API is: numbers that are sometimes
//! strings, fields that are sometimes null or missing, and unknown fields ignored. Conversion to
//! the domain types is in `convert.rs`.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `{"offers": [...]}` from `POST /api/v0/bundles/`.
#[derive(Debug, Deserialize)]
pub struct OffersResponse {
    #[serde(default, deserialize_with = "null_as_default")]
    pub offers: Vec<WireOffer>,
}

/// One offer; only the fields this client reads.
#[derive(Debug, Default, Deserialize)]
pub struct WireOffer {
    #[serde(default, deserialize_with = "lenient_i64")]
    pub id: Option<i64>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub ask_contract_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub machine_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub host_id: Option<i64>,
    #[serde(default)]
    pub gpu_name: Option<String>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub num_gpus: Option<i64>,
    /// MB per GPU.
    #[serde(default, deserialize_with = "lenient_f64")]
    pub gpu_ram: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub dph_total: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub dph_base: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub reliability: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub reliability2: Option<f64>,
    #[serde(default)]
    pub geolocation: Option<String>,
    #[serde(default)]
    pub verification: Option<String>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub verified: Option<bool>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub disk_space: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub cuda_max_good: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub inet_down: Option<f64>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub direct_port_count: Option<i64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub score: Option<f64>,
}

/// `{"instances": {...}}` or `{"instances": null}` from `GET /api/v0/instances/{id}/`: the key
/// is plural although it holds one object.
#[derive(Debug, Deserialize)]
pub struct ShowInstanceResponse {
    #[serde(default)]
    pub instances: Option<WireInstance>,
}

/// One page of `GET /api/v1/instances/`.
#[derive(Debug, Deserialize)]
pub struct ListInstancesPage {
    #[serde(default, deserialize_with = "null_as_default")]
    pub instances: Vec<WireInstance>,
    #[serde(default)]
    pub next_token: Option<String>,
}

/// One instance row; only the fields this client reads.
#[derive(Debug, Default, Deserialize)]
pub struct WireInstance {
    #[serde(default, deserialize_with = "lenient_i64")]
    pub id: Option<i64>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub actual_status: Option<String>,
    #[serde(default)]
    pub intended_status: Option<String>,
    #[serde(default)]
    pub cur_state: Option<String>,
    #[serde(default)]
    pub next_state: Option<String>,
    #[serde(default)]
    pub status_msg: Option<String>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub machine_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub host_id: Option<i64>,
    #[serde(default)]
    pub gpu_name: Option<String>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub num_gpus: Option<i64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub gpu_ram: Option<f64>,
    /// Instances spell it without the underscore that offers use.
    #[serde(default, alias = "gpu_total_ram", deserialize_with = "lenient_f64")]
    pub gpu_totalram: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub dph_total: Option<f64>,
    /// Instances carry `reliability2`; offers carry both.
    #[serde(default, alias = "reliability", deserialize_with = "lenient_f64")]
    pub reliability2: Option<f64>,
    #[serde(default)]
    pub geolocation: Option<String>,
    #[serde(default)]
    pub image_uuid: Option<String>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub disk_space: Option<f64>,
    #[serde(default)]
    pub ssh_host: Option<String>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub ssh_port: Option<i64>,
    #[serde(default)]
    pub public_ipaddr: Option<String>,
    /// Docker-style `{"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40022"}]}`; only when running.
    #[serde(default)]
    pub ports: Option<Value>,
    #[serde(default, deserialize_with = "lenient_f64")]
    pub start_date: Option<f64>,
    /// A list of `[key, value]` pairs on the wire.
    #[serde(default)]
    pub extra_env: Option<Value>,
}

/// `{"success": true, "new_contract": N}` from `PUT /api/v0/asks/{id}/`; failures may still
/// carry `new_contract`.
#[derive(Debug, Default, Deserialize)]
pub struct CreateResponse {
    #[serde(default, deserialize_with = "lenient_bool")]
    pub success: Option<bool>,
    #[serde(default, deserialize_with = "lenient_i64")]
    pub new_contract: Option<i64>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default, alias = "message")]
    pub msg: Option<String>,
}

/// The common `{"success": bool, "error": code, "msg": text}` shape. Some endpoints leave out
/// `success` or `error`, and some say `message` or `detail` instead of `msg`.
#[derive(Debug, Default, Deserialize)]
pub struct StatusResponse {
    #[serde(default, deserialize_with = "lenient_bool")]
    pub success: Option<bool>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default, alias = "message", alias = "detail")]
    pub msg: Option<String>,
}

/// Body of `PUT /api/v0/asks/{offer_id}/`, shaped as the official CLI sends it.
#[derive(Debug, Serialize)]
pub struct CreateRequest<'a> {
    pub client_id: &'static str,
    pub image: &'a str,
    pub disk: f64,
    pub label: Option<&'a str>,
    pub onstart: Option<&'a str>,
    pub env: &'a std::collections::BTreeMap<String, String>,
    pub price: Option<f64>,
    pub runtype: &'static str,
    pub image_login: Option<&'a str>,
    pub python_utf8: bool,
    pub lang_utf8: bool,
    pub use_jupyter_lab: bool,
    pub jupyter_dir: Option<&'a str>,
    pub force: bool,
    pub cancel_unavail: bool,
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A number that may arrive as a JSON number, a numeric string, or null.
pub fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        Value::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
        _ => None,
    })
}

/// An integer that may arrive as a number (possibly `20.0`), a numeric string, or null.
pub fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        Value::Null => None,
        other => return Err(de::Error::custom(format!("expected an integer, got {other}"))),
    })
}

/// A boolean that may arrive as `true`, `1`, `"true"` or null.
pub fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Bool(b) => Some(b),
        Value::Number(n) => n.as_f64().map(|f| f != 0.0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" => Some(false),
            _ => None,
        },
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_rows_tolerate_strings_nulls_and_drift() {
        let row: WireInstance = serde_json::from_value(serde_json::json!({
            "id": "42", "actual_status": null, "ssh_port": "40022", "gpu_total_ram": 24564,
            "reliability": 0.98, "disk_space": 20, "extra_env": [["A", "1"]], "unknown_field": {"x": 1}
        }))
        .unwrap();
        assert_eq!(row.id, Some(42));
        assert_eq!(row.ssh_port, Some(40022));
        assert_eq!(row.gpu_totalram, Some(24564.0));
        assert_eq!(row.reliability2, Some(0.98));
        assert_eq!(row.disk_space, Some(20.0));
    }

    #[test]
    fn single_instance_null_is_none() {
        let r: ShowInstanceResponse = serde_json::from_str(r#"{"instances": null}"#).unwrap();
        assert!(r.instances.is_none());
        let page: ListInstancesPage =
            serde_json::from_str(r#"{"instances": null, "next_token": null}"#).unwrap();
        assert!(page.instances.is_empty());
    }
}
