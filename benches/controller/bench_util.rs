//! What the benchmarks share: percentiles, the operator's `/proc` figures and metrics, the API
//! server's request counts, a served dataset, TrainingJob manifests, and stopping trainers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpu_trainer::api::TrainingJob;

/// How many offers the fake should generate so that `rents` machines can be rented with a job's
/// default requirements (about a quarter of the generated catalogue matches them, and a rented
/// offer is taken).
pub fn offers_for(rents: usize) -> usize {
    6 * rents + 100
}

/// Seconds since the Unix epoch (the fake stamps requests with the same clock).
pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// Modification time of a file in seconds since the epoch.
pub fn mtime(path: &Path) -> Option<f64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(modified.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
}

/// The `p`-th percentile (0..=100) by nearest rank; `NaN` for no values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// `p50 / p99 / max` in milliseconds, for tables.
pub fn ms_summary(values: &[f64]) -> String {
    format!(
        "{:>8.0} {:>8.0} {:>8.0}",
        percentile(values, 50.0) * 1e3,
        percentile(values, 99.0) * 1e3,
        percentile(values, 100.0) * 1e3
    )
}

/// `{p50, p99, max, n}` in seconds, for the JSON line.
pub fn summary_json(values: &[f64]) -> serde_json::Value {
    serde_json::json!({
        "n": values.len(),
        "p50_s": round(percentile(values, 50.0), 4),
        "p99_s": round(percentile(values, 99.0), 4),
        "max_s": round(percentile(values, 100.0), 4),
    })
}

pub fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// CPU time and memory of a process, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub at: f64,
    /// User plus system CPU seconds.
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    /// Peak resident set size (`VmHWM`).
    pub peak_rss_kib: u64,
}

pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn proc_sample(pid: u32) -> ProcSample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu_seconds = (ticks(11) + ticks(12)) / clock_ticks_per_second();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ProcSample { at: now(), cpu_seconds, rss_kib: kib("VmRSS:"), peak_rss_kib: kib("VmHWM:") }
}

/// Prometheus text format as `series -> value` (`name{labels}` as written).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of the series of metric `name` whose labels contain every `needle`.
pub fn sum_series(metrics: &BTreeMap<String, f64>, name: &str, needles: &[&str]) -> f64 {
    metrics
        .iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name) && needles.iter().all(|n| series.contains(n))
        })
        .map(|(_, v)| v)
        .fold(0.0, |a, b| a + b)
}

/// `after - before` per series.
pub fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0))).collect()
}

/// The API server's own request counters (`apiserver_request_total`), read with the admin
/// token: an independent count of the operator's writes.
pub async fn apiserver_metrics(client: &kube::Client) -> BTreeMap<String, f64> {
    let request = http::Request::get("/metrics").body(Vec::new()).expect("request");
    match client.request_text(request).await {
        Ok(text) => parse_metrics(&text)
            .into_iter()
            .filter(|(k, _)| k.starts_with("apiserver_request_total{"))
            .collect(),
        Err(err) => {
            eprintln!("could not read the API server's metrics: {err}");
            BTreeMap::new()
        }
    }
}

/// Writes to one of our resources counted by the API server: `(resource, verb, subresource)`.
pub fn apiserver_writes(delta: &BTreeMap<String, f64>, group_filter: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (series, value) in delta {
        if *value <= 0.0 || !series.contains(group_filter) {
            continue;
        }
        let label = |name: &str| {
            let key = format!("{name}=\"");
            series.split(&key).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string()
        };
        let verb = label("verb");
        if !matches!(verb.as_str(), "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY" | "CREATE" | "UPDATE") {
            continue;
        }
        let sub = label("subresource");
        let key = if sub.is_empty() {
            format!("{} {}", verb, label("resource"))
        } else {
            format!("{} {}/{}", verb, label("resource"), sub)
        };
        *out.entry(key).or_insert(0.0) += value;
    }
    out
}

/// A `demo@1` job that trains `steps` steps of `seconds_per_step`, polled every `poll` seconds,
/// with stall detection off (a benchmark's trainer is idle on purpose).
pub fn demo_job(
    name: &str,
    href: &str,
    sha256: &str,
    steps: u64,
    seconds_per_step: f64,
    poll: u32,
) -> TrainingJob {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gputrainer.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "tool": "demo@1",
            "params": {"steps": steps, "secondsPerStep": seconds_per_step},
            "dataset": {"url": {"href": href, "sha256": sha256}},
            "activeDeadlineSeconds": 14_400,
            "monitoring": {
                "pollIntervalSeconds": poll,
                "noProgressTimeoutSeconds": 86_400,
                "stallDetection": {"enabled": false}
            }
        }
    }))
    .unwrap()
}

/// Stops a trainer left running in a job's work dir (see [`crate::common::kill_trainer`]).
pub fn kill_trainer(work_dir: &Path) {
    crate::common::kill_trainer(work_dir);
}

/// Stops the trainers of every work dir under `base`.
pub fn kill_all_trainers(base: &Path) {
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            kill_trainer(&entry.path());
        }
    }
}

/// Polls `check` every `every` until it returns `Some` or `timeout` passes.
pub async fn poll_until<T, F, Fut>(timeout: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Prints the JSON line of a benchmark.
pub fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string(value).expect("JSON"));
}
