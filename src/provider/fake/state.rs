//! What the fake server remembers: the offer catalogue and the rented instances, saved to a file
//! so a restart does not forget them. Instance state is derived from timestamps when asked, so
//! `created → loading → running` needs no background task.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Seconds since the epoch, as the API's `start_date` uses.
pub fn now_epoch() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A state forced onto an instance by a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForcedState {
    /// The container stopped on its own (`actual_status` exited).
    Exited,
    /// The host stopped reporting (`actual_status` offline).
    Offline,
    /// Outbid or interrupted: `stopped` in `actual_status`, `intended_status` and `cur_state`.
    Outbid,
    /// Back to normal.
    Running,
}

/// One rented instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FakeInstance {
    pub id: i64,
    /// The offer as it was when rented.
    pub offer: Map<String, Value>,
    pub created_at: f64,
    pub label: Option<String>,
    pub image: Option<String>,
    pub disk: f64,
    pub env: BTreeMap<String, String>,
    pub onstart: Option<String>,
    pub runtype: Option<String>,
    pub args: Option<Value>,
    pub bid_price: Option<f64>,
    /// `running` or `stopped`, as asked with `PUT /instances/{id}/ {"state": ...}`.
    pub intended_status: String,
    /// A fault's state and when it takes effect.
    pub forced: Option<(ForcedState, f64)>,
    pub ssh_keys: Vec<String>,
    /// The instance's own SSH port (`FakeConfig::ssh_per_instance`); the shared one otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// Where this instance's SSH goes when it is not the configured endpoint
    /// (`FakeConfig::ssh_endpoints`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_upstream: Option<u16>,
}

/// Everything saved to the state file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub next_id: i64,
    pub offers: Vec<Map<String, Value>>,
    pub instances: BTreeMap<i64, FakeInstance>,
}

impl Persisted {
    pub fn load(path: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes atomically (temporary file, then rename), so a crash never leaves half a file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    }

    pub fn offer(&self, id: i64) -> Option<&Map<String, Value>> {
        self.offers.iter().find(|o| o.get("id").and_then(Value::as_i64) == Some(id))
    }

    /// Marks offers rented while an instance holds them (after loading or a catalogue change).
    pub fn mark_rented(&mut self) {
        let rented: Vec<i64> = self.instances.values().filter_map(|i| i.offer.get("id")?.as_i64()).collect();
        for offer in &mut self.offers {
            let taken = offer.get("id").and_then(Value::as_i64).is_some_and(|id| rented.contains(&id));
            offer.insert("rented".into(), json!(taken));
            offer.insert("rentable".into(), json!(!taken));
        }
    }
}

const GPUS: &[(&str, u32, f64, u32)] = &[
    // name, MB per GPU, $/h per GPU, compute capability ×100
    ("RTX 4090", 24564, 0.34, 890),
    ("RTX 3090", 24576, 0.19, 860),
    ("A100 SXM4", 81920, 1.10, 800),
    ("H100 PCIE", 81559, 2.05, 900),
    ("RTX A6000", 49140, 0.47, 860),
    ("RTX 4060 Ti", 16380, 0.11, 890),
    ("A100 PCIE", 40960, 0.82, 800),
];
const PLACES: &[&str] = &["Texas, US", "Quebec, CA", "Bavaria, DE", "Utrecht, NL", "Tokyo, JP", "Oregon, US"];

/// A deterministic catalogue of `count` offers covering several GPU models, prices,
/// reliabilities, locations and unverified hosts.
pub fn generated_catalogue(count: usize) -> Vec<Map<String, Value>> {
    (0..count).map(|i| default_offer(i, &Map::new())).collect()
}

/// Offer `i` of the generated catalogue with `overrides` laid over it, so a catalogue file only
/// needs the fields it cares about.
pub fn default_offer(i: usize, overrides: &Map<String, Value>) -> Map<String, Value> {
    let (gpu, ram, price, cap) = GPUS[i % GPUS.len()];
    let num_gpus: u32 = [1, 1, 2, 1, 4, 1, 1, 8][i % 8];
    let place = PLACES[(i / 2) % PLACES.len()];
    let dph_base = ((price * f64::from(num_gpus) * (1.0 + (i % 5) as f64 * 0.07)) * 1000.0).round() / 1000.0;
    let reliability = 0.90 + ((i * 37) % 100) as f64 / 1000.0;
    let verified = i % 6 != 5;
    let id = 4_000_000 + (i as i64) * 17;
    let start = 1_760_000_000.0;
    let mut offer = json!({
        "id": id, "ask_contract_id": id, "bundle_id": id + 1, "bundled_results": null,
        "machine_id": 10_000 + (i as i64) * 3, "host_id": 200 + (i as i64) % 9,
        "num_gpus": num_gpus, "gpu_name": gpu, "gpu_ram": ram, "gpu_total_ram": ram * num_gpus,
        "gpu_frac": 1.0, "gpu_arch": "nvidia", "gpu_lanes": 16, "gpu_mem_bw": 900.0, "gpu_max_power": 450.0,
        "gpu_max_temp": 90.0, "gpu_display_active": false, "compute_cap": cap, "cuda_max_good": 12.4,
        "driver_version": "550.54.14", "driver_vers": 550_054_014,
    });
    let part2 = json!({
        "cpu_name": "AMD EPYC 7543", "cpu_arch": "amd64", "cpu_cores": 64, "cpu_cores_effective": 16.0,
        "cpu_ghz": 3.7, "cpu_ram": 128_000, "disk_space": 200.0 + (i % 4) as f64 * 150.0, "disk_bw": 3000.0,
        "disk_name": "nvme", "inet_up": 600.0 + (i % 3) as f64 * 100.0, "inet_down": 900.0,
        "inet_up_cost": 0.0, "inet_down_cost": 0.0, "dph_base": dph_base, "dph_total": dph_base,
        "min_bid": (dph_base * 0.5 * 1000.0).round() / 1000.0, "storage_cost": 0.15, "storage_total_cost": 0.0,
        "vram_costperhour": 0.0, "credit_discount_max": 0.0,
    });
    let part3 = json!({
        "reliability": reliability, "reliability2": reliability,
        "dlperf": 30.0 * f64::from(num_gpus), "dlperf_per_dphtotal": 30.0 / price,
        "flops_per_dphtotal": 200.0 / price, "total_flops": 80.0 * f64::from(num_gpus),
        "score": 200.0 - (i % 50) as f64, "geolocation": place, "geolocode": 840 + i as i64 % 5,
        "duration": 864_000.0, "start_date": start, "end_date": start + 864_000.0,
        "verification": if verified { "verified" } else { "unverified" }, "vericode": if verified { 1 } else { 0 },
        "rentable": true, "rented": false, "is_bid": false, "external": false, "hosting_type": 0,
        "static_ip": true, "vms_enabled": false, "direct_port_count": 100, "pci_gen": 4.0, "pcie_bw": 25.0,
        "public_ipaddr": format!("203.0.113.{}", 10 + i % 200), "hostname": null, "cluster_id": null,
        "time_remaining": "", "time_remaining_isbid": "",
    });
    merge_into(&mut offer, [part2, part3]);
    if let Some(map) = offer.as_object_mut() {
        for (k, v) in overrides {
            map.insert(k.clone(), v.clone());
        }
        // Keep the id pair consistent when a catalogue gives only one of them.
        if overrides.contains_key("id") && !overrides.contains_key("ask_contract_id") {
            map.insert("ask_contract_id".into(), overrides["id"].clone());
        }
        return std::mem::take(map);
    }
    Map::new()
}

/// Reads a catalogue file: a JSON list of (partial) offers, or `{"offers": [...]}`.
pub fn load_catalogue(path: &Path) -> std::io::Result<Vec<Map<String, Value>>> {
    let value: Value = serde_json::from_slice(&std::fs::read(path)?).map_err(std::io::Error::other)?;
    let list = match value {
        Value::Array(list) => list,
        Value::Object(mut map) => match map.remove("offers") {
            Some(Value::Array(list)) => list,
            _ => return Err(std::io::Error::other("expected a list of offers or {\"offers\": [...]}")),
        },
        _ => return Err(std::io::Error::other("expected a list of offers or {\"offers\": [...]}")),
    };
    list.into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(map) => Ok(default_offer(i, &map)),
            _ => Err(std::io::Error::other(format!("offer {i} is not an object"))),
        })
        .collect()
}

/// Timing and SSH settings that shape instance rows.
#[derive(Clone, Debug)]
pub struct RowSettings {
    pub loading_after: Duration,
    pub running_after: Duration,
    pub ssh_host: String,
    pub ssh_port: u16,
    /// Every instance takes this state this long after it started running.
    pub lifetime: Option<(ForcedState, Duration)>,
}

/// `(actual_status, intended_status, cur_state, next_state, status_msg)` at `now`.
pub fn statuses(
    inst: &FakeInstance,
    now: f64,
    s: &RowSettings,
) -> (&'static str, String, &'static str, &'static str, String) {
    let running_since = inst.created_at + s.running_after.as_secs_f64();
    let forced = inst.forced.filter(|(_, at)| now >= *at).map(|(state, _)| state).or_else(|| {
        let (state, after) = s.lifetime?;
        (now >= running_since + after.as_secs_f64()).then_some(state)
    });
    match forced {
        Some(ForcedState::Outbid) => (
            "stopped",
            "stopped".into(),
            "stopped",
            "stopped",
            "Instance stopped: outbid by a higher bid".into(),
        ),
        Some(ForcedState::Exited) => {
            ("exited", inst.intended_status.clone(), "running", "running", "exited with code 137".into())
        }
        Some(ForcedState::Offline) => {
            ("offline", inst.intended_status.clone(), "running", "running", "host offline".into())
        }
        Some(ForcedState::Running) | None => {
            if inst.intended_status == "stopped" {
                return ("stopped", "stopped".into(), "stopped", "stopped", "stopped on request".into());
            }
            let elapsed = now - inst.created_at;
            let image = inst.image.clone().unwrap_or_default();
            if elapsed < s.loading_after.as_secs_f64() {
                ("created", "running".into(), "running", "running", "Instance created".into())
            } else if elapsed < s.running_after.as_secs_f64() {
                ("loading", "running".into(), "running", "running", format!("Pulling image {image}"))
            } else {
                ("running", "running".into(), "running", "running", format!("success, running {image}/ssh"))
            }
        }
    }
}

/// The instance as the API shows it: every field the official CLI reads, numbers as numbers,
/// `extra_env` as pairs, `ports` only while running.
pub fn instance_row(inst: &FakeInstance, now: f64, s: &RowSettings) -> Map<String, Value> {
    let (actual, intended, cur, next, msg) = statuses(inst, now, s);
    let o = |k: &str| inst.offer.get(k).cloned().unwrap_or(Value::Null);
    let num_gpus = inst.offer.get("num_gpus").and_then(Value::as_f64).unwrap_or(1.0);
    let gpu_ram = inst.offer.get("gpu_ram").and_then(Value::as_f64).unwrap_or(0.0);
    let dph = inst.bid_price.or_else(|| inst.offer.get("dph_total").and_then(Value::as_f64)).unwrap_or(0.0);
    let running = actual == "running";
    let ssh_port = inst.ssh_port.unwrap_or(s.ssh_port);
    let ports = running.then(|| json!({"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": ssh_port.to_string()}]}));
    let extra_env: Vec<Value> = inst.env.iter().map(|(k, v)| json!([k, v])).collect();
    let mut row = json!({
        "id": inst.id, "machine_id": o("machine_id"), "host_id": o("host_id"), "bundle_id": o("id"),
        "actual_status": actual, "intended_status": intended, "cur_state": cur, "next_state": next,
        "status_msg": msg, "label": inst.label,
        "image_uuid": inst.image, "image_args": inst.args.clone().unwrap_or(json!([])),
        "image_runtype": inst.runtype, "onstart": inst.onstart, "jupyter_token": "fake-jupyter-token",
        "template_id": null, "template_hash_id": null, "template_name": null,
        "extra_env": extra_env,
    });
    let part2 = json!({
        "ssh_host": s.ssh_host, "ssh_port": ssh_port, "ssh_idx": "1", "machine_dir_ssh_port": ssh_port,
        "public_ipaddr": s.ssh_host, "local_ipaddrs": "10.0.0.2 172.17.0.1\n",
        "ports": ports, "direct_port_start": if running { 40000 } else { -1 },
        "direct_port_end": if running { 40099 } else { -1 }, "direct_port_count": 100,
        "start_date": inst.created_at, "end_date": inst.created_at + 864_000.0,
        "duration": -1.0, "uptime_mins": if running { Some((now - inst.created_at) / 60.0) } else { None },
        "num_gpus": num_gpus, "gpu_name": o("gpu_name"), "gpu_arch": o("gpu_arch"), "gpu_ram": gpu_ram,
        "gpu_totalram": gpu_ram * num_gpus, "gpu_util": if running { Some(0.0) } else { None },
        "gpu_temp": if running { Some(35.0) } else { None }, "gpu_frac": 1.0, "gpu_lanes": o("gpu_lanes"),
        "gpu_mem_bw": o("gpu_mem_bw"), "bw_nvlink": 0.0,
    });
    let part3 = json!({
        "cpu_name": o("cpu_name"), "cpu_arch": o("cpu_arch"), "cpu_cores": o("cpu_cores"),
        "cpu_cores_effective": o("cpu_cores_effective"), "cpu_ram": o("cpu_ram"), "cpu_util": 0.0,
        "mem_limit": null, "mem_usage": null, "vmem_usage": null,
        "disk_space": inst.disk, "disk_usage": -1, "disk_util": -1, "disk_bw": o("disk_bw"),
        "disk_name": o("disk_name"), "dph_base": o("dph_base"), "dph_total": dph, "min_bid": o("min_bid"),
        "is_bid": inst.bid_price.is_some(), "storage_cost": o("storage_cost"), "storage_total_cost": 0.0,
        "vram_costperhour": 0.0, "credit_balance": null, "credit_discount": null, "credit_discount_max": 0.0,
    });
    let part4 = json!({
        "inet_up": o("inet_up"), "inet_down": o("inet_down"), "reliability2": o("reliability2"),
        "dlperf": o("dlperf"), "dlperf_per_dphtotal": o("dlperf_per_dphtotal"),
        "flops_per_dphtotal": o("flops_per_dphtotal"), "total_flops": o("total_flops"), "score": o("score"),
        "geolocation": o("geolocation"), "country_code": null, "verification": o("verification"),
        "rentable": true, "static_ip": true, "hosting_type": 0, "external": false, "os_version": null,
        "mobo_name": null, "pci_gen": o("pci_gen"), "pcie_bw": o("pcie_bw"), "time_remaining": "",
        "time_remaining_isbid": "", "client_run_time": 0.0, "host_run_time": 0.0, "volume_info": [],
    });
    merge_into(&mut row, [part2, part3, part4]);
    match row {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// Adds the fields of `parts` to `target` (the objects are built in parts because one `json!`
/// of this size exceeds the macro recursion limit).
fn merge_into<const N: usize>(target: &mut Value, parts: [Value; N]) {
    if let Value::Object(map) = target {
        for part in parts {
            if let Value::Object(more) = part {
                map.extend(more);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> FakeInstance {
        FakeInstance {
            id: 1,
            offer: generated_catalogue(1).remove(0),
            created_at: 1000.0,
            label: None,
            image: Some("img".into()),
            disk: 10.0,
            env: BTreeMap::new(),
            onstart: None,
            runtype: None,
            args: None,
            bid_price: None,
            intended_status: "running".into(),
            forced: None,
            ssh_keys: vec![],
            ssh_port: None,
            ssh_upstream: None,
        }
    }

    fn settings() -> RowSettings {
        RowSettings {
            loading_after: Duration::from_secs(2),
            running_after: Duration::from_secs(5),
            ssh_host: "127.0.0.1".into(),
            ssh_port: 2222,
            lifetime: None,
        }
    }

    #[test]
    fn created_then_loading_then_running_by_time() {
        let (inst, s) = (instance(), settings());
        assert_eq!(statuses(&inst, 1001.0, &s).0, "created");
        assert_eq!(statuses(&inst, 1003.0, &s).0, "loading");
        assert_eq!(statuses(&inst, 1005.0, &s).0, "running");
        let row = instance_row(&inst, 1001.0, &s);
        assert_eq!(row["ports"], Value::Null, "ports appear only when running");
        let row = instance_row(&inst, 1006.0, &s);
        assert_eq!(row["ports"]["22/tcp"][0]["HostPort"], json!("2222"));
        assert_eq!(row["ssh_port"], json!(2222));
    }

    #[test]
    fn forced_states_take_effect_at_their_time() {
        let mut inst = instance();
        inst.forced = Some((ForcedState::Outbid, 1010.0));
        let s = settings();
        assert_eq!(statuses(&inst, 1009.0, &s).0, "running");
        let (actual, intended, cur, next, _) = statuses(&inst, 1010.0, &s);
        assert_eq!((actual, intended.as_str(), cur, next), ("stopped", "stopped", "stopped", "stopped"));
        let lifetime =
            RowSettings { lifetime: Some((ForcedState::Offline, Duration::from_secs(60))), ..settings() };
        assert_eq!(statuses(&instance(), 1064.0, &lifetime).0, "running");
        assert_eq!(statuses(&instance(), 1065.0, &lifetime).0, "offline");
    }

    #[test]
    fn catalogue_overrides_keep_defaults_for_the_rest() {
        let offer = default_offer(3, &serde_json::from_value(json!({"id": 9, "gpu_name": "X"})).unwrap());
        assert_eq!(offer["id"], json!(9));
        assert_eq!(offer["ask_contract_id"], json!(9));
        assert_eq!(offer["gpu_name"], json!("X"));
        assert!(offer["dph_total"].is_number());
    }
}
