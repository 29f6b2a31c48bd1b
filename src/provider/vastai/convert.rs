//! Wire types to domain types: one place that knows the API's naming drift (`gpu_totalram` vs
//! `gpu_total_ram`, `reliability2` vs `reliability`, `new_contract` vs `id`), its units (MB of
//! VRAM, country codes at the end of free-text locations), its sentinels and stray whitespace.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::wire::{WireInstance, WireOffer};
use crate::provider::{Instance, InstanceId, InstanceState, Offer, SshEndpoint};

/// Why a wire object could not become a domain object.
#[derive(Debug, thiserror::Error)]
#[error("{what} without {field}")]
pub struct ConvertError {
    pub what: &'static str,
    pub field: &'static str,
}

/// Trims a string and treats empty as missing (the official client trims every string too).
fn clean(s: Option<String>) -> Option<String> {
    s.map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// The two-letter country code at the end of `"Texas, US"`; `"US"` alone also works.
pub fn country_code(geolocation: &str) -> Option<String> {
    let last = geolocation.rsplit(',').next()?.trim();
    (last.len() == 2 && last.chars().all(|c| c.is_ascii_alphabetic())).then(|| last.to_ascii_uppercase())
}

impl TryFrom<WireOffer> for Offer {
    type Error = ConvertError;

    fn try_from(w: WireOffer) -> Result<Self, Self::Error> {
        let id = w.id.or(w.ask_contract_id).ok_or(ConvertError { what: "offer", field: "id" })?;
        let geolocation = clean(w.geolocation);
        let verified =
            w.verified.unwrap_or_else(|| w.verification.as_deref().map(str::trim) == Some("verified"));
        Ok(Offer {
            id,
            machine_id: w.machine_id.ok_or(ConvertError { what: "offer", field: "machine_id" })?,
            host_id: w.host_id,
            gpu_name: clean(w.gpu_name).ok_or(ConvertError { what: "offer", field: "gpu_name" })?,
            num_gpus: w.num_gpus.and_then(|n| u32::try_from(n).ok()).unwrap_or(1),
            vram_gb: w.gpu_ram.unwrap_or(0.0) / 1000.0,
            price_per_hour: w
                .dph_total
                .or(w.dph_base)
                .ok_or(ConvertError { what: "offer", field: "dph_total" })?,
            reliability: w.reliability.or(w.reliability2).unwrap_or(0.0),
            country_code: geolocation.as_deref().and_then(country_code),
            geolocation,
            verified,
            disk_gb: w.disk_space.unwrap_or(0.0),
            cuda_max_good: w.cuda_max_good,
            inet_down_mbps: w.inet_down,
            direct_port_count: w.direct_port_count,
            score: w.score,
        })
    }
}

impl TryFrom<WireInstance> for Instance {
    type Error = ConvertError;

    fn try_from(w: WireInstance) -> Result<Self, Self::Error> {
        let id = w.id.ok_or(ConvertError { what: "instance", field: "id" })?;
        let actual_status = clean(w.actual_status);
        let intended_status = clean(w.intended_status);
        let cur_state = clean(w.cur_state);
        let next_state = clean(w.next_state);
        let state = InstanceState::from_fields(
            actual_status.as_deref(),
            intended_status.as_deref(),
            cur_state.as_deref(),
            next_state.as_deref(),
        );
        let public_ip = clean(w.public_ipaddr);
        let ssh = direct_ssh(public_ip.as_deref(), w.ports.as_ref()).or_else(|| {
            let host = clean(w.ssh_host)?;
            let port = u16::try_from(w.ssh_port?).ok().filter(|p| *p > 0)?;
            Some(SshEndpoint { host, port })
        });
        let num_gpus = w.num_gpus.and_then(|n| u32::try_from(n).ok());
        let vram_gb = w
            .gpu_ram
            .or_else(|| w.gpu_totalram.zip(num_gpus).map(|(t, n)| t / f64::from(n.max(1))))
            .map(|mb| mb / 1000.0);
        Ok(Instance {
            id: InstanceId(id),
            label: clean(w.label),
            state,
            actual_status,
            intended_status,
            cur_state,
            next_state,
            status_msg: clean(w.status_msg),
            machine_id: w.machine_id,
            host_id: w.host_id,
            gpu_name: clean(w.gpu_name),
            num_gpus,
            vram_gb,
            price_per_hour: w.dph_total,
            reliability: w.reliability2,
            geolocation: clean(w.geolocation),
            image: clean(w.image_uuid),
            disk_gb: w.disk_space,
            ssh,
            started_at: w.start_date.filter(|s| *s > 0.0).and_then(epoch_to_utc),
            env: extra_env(w.extra_env.as_ref()),
        })
    }
}

fn epoch_to_utc(secs: f64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(secs.trunc() as i64, (secs.fract() * 1e9) as u32)
}

/// Direct SSH: the public address and the host port mapped to container port 22. `HostPort` is a
/// string on the wire.
fn direct_ssh(public_ip: Option<&str>, ports: Option<&Value>) -> Option<SshEndpoint> {
    let host = public_ip?;
    let mapping = ports?.get("22/tcp")?.as_array()?.first()?;
    let port = match mapping.get("HostPort")? {
        Value::String(s) => s.trim().parse::<u16>().ok()?,
        Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        _ => return None,
    };
    Some(SshEndpoint { host: host.to_string(), port })
}

/// `extra_env` is a list of `[key, value]` pairs on the wire; the CLI's `--raw` output turns it
/// into an object, so accept both.
fn extra_env(value: Option<&Value>) -> BTreeMap<String, String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    };
    match value {
        Some(Value::Array(pairs)) => pairs
            .iter()
            .filter_map(|p| {
                let p = p.as_array()?;
                Some((text(p.first()?), p.get(1).map(text).unwrap_or_default()))
            })
            .collect(),
        Some(Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
        _ => BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn instance(v: Value) -> Instance {
        Instance::try_from(serde_json::from_value::<WireInstance>(v).unwrap()).unwrap()
    }

    #[test]
    fn offer_units_and_location() {
        let w: WireOffer = serde_json::from_value(json!({
            "id": 7, "ask_contract_id": 7, "machine_id": 70, "gpu_name": "RTX 4090", "num_gpus": 1,
            "gpu_ram": 24564, "dph_total": 0.41, "reliability": 0.991, "geolocation": "Texas, US",
            "verification": "verified", "disk_space": 120.5
        }))
        .unwrap();
        let o = Offer::try_from(w).unwrap();
        assert_eq!((o.id, o.machine_id), (7, 70));
        assert!((o.vram_gb - 24.564).abs() < 1e-9);
        assert_eq!(o.country_code.as_deref(), Some("US"));
        assert!(o.verified);
    }

    #[test]
    fn direct_ssh_wins_over_proxy_and_strings_are_trimmed() {
        let i = instance(json!({
            "id": 5, "actual_status": "running", "intended_status": "running", "cur_state": "running",
            "ssh_host": "ssh5.vast.ai", "ssh_port": 12345, "public_ipaddr": " 1.2.3.4\n",
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40022"}]}, "label": " job \n",
            "extra_env": [["FOO", "bar"], ["-p 8080:8080", "1"]], "start_date": 1700000000.5,
            "gpu_totalram": 49128, "num_gpus": 2
        }));
        assert_eq!(i.ssh, Some(SshEndpoint { host: "1.2.3.4".into(), port: 40022 }));
        assert_eq!(i.label.as_deref(), Some("job"));
        assert_eq!(i.env.get("FOO").map(String::as_str), Some("bar"));
        assert_eq!(i.state, InstanceState::Running);
        assert!((i.vram_gb.unwrap() - 24.564).abs() < 1e-9);
        assert_eq!(i.started_at.unwrap().timestamp(), 1_700_000_000);
    }

    #[test]
    fn proxy_ssh_when_no_port_mapping() {
        let i = instance(json!({"id": 5, "ssh_host": "ssh5.vast.ai", "ssh_port": "12345", "ports": null}));
        assert_eq!(i.ssh, Some(SshEndpoint { host: "ssh5.vast.ai".into(), port: 12345 }));
        assert_eq!(i.state, InstanceState::Creating);
    }

    #[test]
    fn states_from_the_three_fields() {
        let cases = [
            (json!({"id": 1, "actual_status": "loading"}), InstanceState::Loading),
            (
                json!({"id": 1, "actual_status": "stopped", "intended_status": "stopped", "cur_state": "stopped", "next_state": "stopped"}),
                InstanceState::Interrupted,
            ),
            (
                json!({"id": 1, "actual_status": "exited", "intended_status": "running", "cur_state": "running"}),
                InstanceState::Exited,
            ),
            (json!({"id": 1, "actual_status": "offline"}), InstanceState::Offline),
            (json!({"id": 1, "actual_status": "running", "cur_state": "unloaded"}), InstanceState::Released),
            (json!({"id": 1, "actual_status": "weird"}), InstanceState::Unknown("weird".into())),
        ];
        for (row, want) in cases {
            assert_eq!(instance(row.clone()).state, want, "{row}");
        }
    }
}
