//! Scale: many TrainingJobs in `Training` at once against one operator process, with
//! `fake-vastai` and the test sshd (every "machine" is this machine; each job's `demo@1` trainer
//! sleeps through a very long step, so nothing changes while the figures are taken).
//!
//! Measured: the ramp (all jobs from creation to `Training`), the operator's peak resident
//! memory (`VmHWM`), its CPU over a steady window (a whole number of poll intervals), its
//! Kubernetes API writes and reads per job per poll (its own request counter, cross-checked with
//! the API server's), the provider requests per minute by endpoint (the fake's log), the SSH
//! connections opened during the window, and, after a restart, the time until every job's
//! status shows a step that was written to its log while the operator was down.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use gpu_trainer::api::{GpuInstance, TrainingJob, TrainingJobPhase};
use gpu_trainer::provider::fake::FakeServer;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};

use crate::bench_util::{
    self, apiserver_metrics, apiserver_writes, delta, now, parse_metrics, print_json, proc_sample, round,
    sum_series,
};
use crate::common;
use crate::common::operator::{OperatorOptions, OperatorProcess, installation_id, start_fake};

#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// TrainingJobs training at once.
    #[arg(long, default_value_t = 500)]
    jobs: usize,
    /// The jobs' `monitoring.pollIntervalSeconds`.
    #[arg(long, default_value_t = 60)]
    poll_seconds: u32,
    /// Length of the steady window (a multiple of the poll interval).
    #[arg(long, default_value_t = 180)]
    steady_seconds: u64,
    /// Pause between the ramp and the steady window (each job polls once in it).
    #[arg(long, default_value_t = 70)]
    settle_seconds: u64,
    /// Give up waiting for the ramp after this long.
    #[arg(long, default_value_t = 2400)]
    ramp_timeout_seconds: u64,
    /// Jobs created concurrently.
    #[arg(long, default_value_t = 16)]
    create_concurrency: usize,
    /// Jobs created per wave; the next wave starts when these train.
    #[arg(long, default_value_t = 50)]
    wave: usize,
    /// More arguments for `gpu-trainer run`.
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
}

/// The step written into every job's log while the operator is down.
const MARKER_STEP: u64 = 7;
const TOTAL_STEPS: u64 = 100_000;

async fn operator_metrics(operator: &OperatorProcess) -> BTreeMap<String, f64> {
    parse_metrics(&operator.metrics().await)
}

fn phases(jobs: &[TrainingJob]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for job in jobs {
        let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
        *out.entry(format!("{phase:?}")).or_insert(0) += 1;
    }
    out
}

pub async fn run(args: ScaleArgs) {
    let n = args.jobs;
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "bench-scale").await;
    let fake = start_fake(|c| {
        c.loading_after = Duration::ZERO;
        c.running_after = Duration::from_secs(1);
        c.generated_offers = bench_util::offers_for(n);
    })
    .await;
    let installation = installation_id();
    let base = common::env_dir().join("work").join(&ns);
    std::fs::create_dir_all(&base).unwrap();
    let mut options = OperatorOptions::new(&ns, &fake, &installation);
    options.fast_polls = false;
    options.log_format = "json";
    options.env.push(("RUST_LOG", "info,kube=warn".into()));
    options.args = vec!["--remote-base".into(), base.display().to_string()];
    options.args.extend(args.operator_args.iter().cloned());
    let mut operator = OperatorProcess::start(&options);
    operator.wait_ready().await;
    let tmp = tempfile::tempdir().unwrap();
    let (href, sha256) = crate::common::dataset::serve_dataset(tmp.path()).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);

    // Ramp, in waves: every "machine" is this machine, so all jobs staging at once would measure
    // this machine's sshd, not the operator.
    let ramp_started = now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.ramp_timeout_seconds);
    let mut ramp_phases = BTreeMap::new();
    let mut ramp_done = true;
    for first in (0..n).step_by(args.wave.max(1)) {
        let last = (first + args.wave.max(1)).min(n);
        futures::stream::iter(first..last)
            .map(|i| {
                let jobs = jobs.clone();
                let job = bench_util::demo_job(
                    &format!("scale-{i}"),
                    &href,
                    &sha256,
                    TOTAL_STEPS,
                    3600.0,
                    args.poll_seconds,
                );
                async move { jobs.create(&PostParams::default(), &job).await.expect("create job") }
            })
            .buffer_unordered(args.create_concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let wave_done = bench_util::poll_until(left, Duration::from_secs(5), || async {
            let list = jobs.list(&ListParams::default()).await.ok()?;
            let phases = phases(&list.items);
            let settled = list.items.iter().all(|j| {
                j.status
                    .as_ref()
                    .is_some_and(|s| s.phase == TrainingJobPhase::Training || s.phase.is_finished())
            });
            if settled {
                let sample = proc_sample(operator.pid());
                eprintln!(
                    "{:>6.0} s: {last} jobs created: {phases:?}; operator RSS {} MiB",
                    now() - ramp_started,
                    sample.rss_kib / 1024
                );
            }
            settled.then_some(phases)
        })
        .await;
        match wave_done {
            Some(phases) => ramp_phases = phases,
            None => {
                let list = jobs.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
                ramp_phases = phases(&list);
                eprintln!(
                    "the ramp did not finish in {} s: {ramp_phases:?}\n{}",
                    args.ramp_timeout_seconds,
                    operator.log_tail()
                );
                ramp_done = false;
                break;
            }
        }
    }
    let ramp_seconds = if ramp_done { now() - ramp_started } else { f64::NAN };
    let training = ramp_phases.get("Training").copied().unwrap_or(0);
    let after_ramp = operator_metrics(&operator).await;
    let ramp_ssh_opened = sum_series(&after_ramp, "gputrainer_ssh_connections_opened_total", &[]);

    // Steady window.
    eprintln!("settling for {} s, then measuring for {} s", args.settle_seconds, args.steady_seconds);
    tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;
    let before_proc = proc_sample(operator.pid());
    let before = operator_metrics(&operator).await;
    let before_api = apiserver_metrics(&client).await;
    let window_start = now();
    tokio::time::sleep(Duration::from_secs(args.steady_seconds)).await;
    let after_proc = proc_sample(operator.pid());
    let after = operator_metrics(&operator).await;
    let after_api = apiserver_metrics(&client).await;
    let window_end = now();
    let window = window_end - window_start;
    let d = delta(&before, &after);
    let polls = training.max(1) as f64 * window / f64::from(args.poll_seconds);
    let cpu_cores = (after_proc.cpu_seconds - before_proc.cpu_seconds) / (after_proc.at - before_proc.at);

    let kube = |verb: &str, resource: &str, sub: &str| {
        let mut needles = vec![format!("verb=\"{verb}\""), format!("resource=\"{resource}\"")];
        needles.push(format!("subresource=\"{sub}\""));
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        sum_series(&d, "gputrainer_kube_requests_total", &needles)
    };
    let writes_total: f64 = ["create", "update", "patch", "delete"]
        .iter()
        .map(|verb| sum_series(&d, "gputrainer_kube_requests_total", &[&format!("verb=\"{verb}\"")]))
        .sum();
    let tj_status = kube("patch", "trainingjobs", "status");
    let gi_status = kube("patch", "gpuinstances", "status");
    let events = kube("create", "events", "");
    let reads = sum_series(&d, "gputrainer_kube_requests_total", &["verb=\"get\""]);
    let api_writes = apiserver_writes(&delta(&before_api, &after_api), "");
    let api_writes_ours: f64 = api_writes
        .iter()
        .filter(|(k, _)| k.contains("trainingjobs") || k.contains("gpuinstances") || k.contains("events"))
        .map(|(_, v)| v)
        .sum();

    let mut provider_by_endpoint: BTreeMap<String, usize> = BTreeMap::new();
    for r in fake.requests() {
        if r.received_at >= window_start && r.received_at < window_end {
            *provider_by_endpoint.entry(r.endpoint.clone()).or_insert(0) += 1;
        }
    }
    let provider_total: usize = provider_by_endpoint.values().sum();
    let per_minute = |count: f64| count * 60.0 / window;
    let ssh_opened = sum_series(&d, "gputrainer_ssh_connections_opened_total", &[]);
    let ssh_open = sum_series(&after, "gputrainer_ssh_connections_open", &[]);
    let ssh_runs = sum_series(&d, "gputrainer_ssh_operation_duration_seconds_count", &["operation=\"run\""]);
    let ssh_run_seconds =
        sum_series(&d, "gputrainer_ssh_operation_duration_seconds_sum", &["operation=\"run\""]);
    let ssh_reads =
        sum_series(&d, "gputrainer_ssh_operation_duration_seconds_count", &["operation=\"read\""]);
    let reconciles_tj = sum_series(&d, "gputrainer_reconcile_runs_total", &["controller=\"trainingjob\""]);
    let reconciles_gi = sum_series(&d, "gputrainer_reconcile_runs_total", &["controller=\"gpuinstance\""]);
    let errors = sum_series(&d, "gputrainer_reconcile_errors_total", &[]);
    let peak_rss_mib = after_proc.peak_rss_kib as f64 / 1024.0;

    // Restart: stop the operator, move every job's log on by one step, start a new one.
    operator.terminate();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while operator.is_running() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited = (!operator.is_running()).then_some(());
    if exited.is_none() {
        operator.kill();
    }
    let list = jobs.list(&ListParams::default()).await.expect("list jobs");
    let uids: Vec<String> = list.items.iter().filter_map(|j| j.uid()).collect();
    for uid in &uids {
        append_step(&base.join(uid).join("train.log"), MARKER_STEP);
    }
    let restarted_at = now();
    let mut operator = OperatorProcess::start(&options);
    let up_to_date = bench_util::poll_until(Duration::from_secs(900), Duration::from_secs(2), || async {
        let list = jobs.list(&ListParams::default()).await.ok()?;
        let current = list
            .items
            .iter()
            .filter(|j| {
                j.status.as_ref().and_then(|s| s.progress.as_ref()).is_some_and(|p| p.step == MARKER_STEP)
            })
            .count();
        (current >= training).then(|| now() - restarted_at)
    })
    .await;
    let restart_proc = proc_sample(operator.pid());
    let restart_seconds = up_to_date.unwrap_or(f64::NAN);
    if up_to_date.is_none() {
        eprintln!("the restarted operator did not bring every status up to date\n{}", operator.log_tail());
    }

    println!(
        "scale: {n} TrainingJobs (demo@1) against one operator process, poll every {} s",
        args.poll_seconds
    );
    println!("{:<62} {:>14}  target", "", "value");
    let row = |what: &str, value: String, target: &str| println!("{what:<62} {value:>14}  {target}");
    row("jobs in Training", format!("{training}/{n}"), "");
    row(
        &format!("ramp: creation to all in Training (waves of {})", args.wave),
        format!("{ramp_seconds:.0} s"),
        "",
    );
    row("operator peak RSS (VmHWM, ramp and steady)", format!("{peak_rss_mib:.1} MiB"), "< 200 MB");
    row(
        "operator RSS at the end of the window",
        format!("{:.1} MiB", after_proc.rss_kib as f64 / 1024.0),
        "",
    );
    row(&format!("operator CPU, steady window of {window:.0} s"), format!("{cpu_cores:.3} cores"), "< 0.25");
    row("Kubernetes writes per job per poll (all)", format!("{:.3}", writes_total / polls), "0");
    row("  TrainingJob status patches per job per poll", format!("{:.3}", tj_status / polls), "");
    row("  GpuInstance status patches per job per poll", format!("{:.3}", gi_status / polls), "");
    row("  events per job per poll", format!("{:.3}", events / polls), "");
    row("  per the API server (our resources and events)", format!("{:.3}", api_writes_ours / polls), "");
    row("Kubernetes reads (GET) per job per poll", format!("{:.2}", reads / polls), "");
    row(
        "provider requests per minute (all)",
        format!("{:.1}", per_minute(provider_total as f64)),
        "independent of jobs",
    );
    for (endpoint, count) in &provider_by_endpoint {
        row(&format!("  {endpoint}"), format!("{:.1}", per_minute(*count as f64)), "");
    }
    row("SSH connections opened during the ramp", format!("{ramp_ssh_opened:.0}"), "");
    row("SSH connections opened during the window", format!("{ssh_opened:.0}"), "0 (reused)");
    row("SSH connections open", format!("{ssh_open:.0}"), "");
    row("SSH commands per job per poll", format!("{:.2}", ssh_runs / polls), "");
    row("SFTP reads per job per poll", format!("{:.2}", ssh_reads / polls), "");
    row(
        "SSH command time (mean, incl. the login shell)",
        format!("{:.0} ms", 1e3 * ssh_run_seconds / ssh_runs.max(1.0)),
        "",
    );
    row(
        "reconciles in the window: trainingjob / gpuinstance",
        format!("{reconciles_tj:.0} / {reconciles_gi:.0}"),
        "",
    );
    row("reconcile errors in the window", format!("{errors:.0}"), "");
    row("restart: all statuses up to date", format!("{restart_seconds:.1} s"), "");
    row(
        "restarted operator: CPU / peak RSS",
        format!("{:.1} s / {:.0} MiB", restart_proc.cpu_seconds, restart_proc.peak_rss_kib as f64 / 1024.0),
        "",
    );
    print_json(&serde_json::json!({
        "bench": "scale",
        "jobs": n,
        "jobs_training": training,
        "wave": args.wave,
        "poll_seconds": args.poll_seconds,
        "ramp_seconds": round(ramp_seconds, 1),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "rss_mib": round(after_proc.rss_kib as f64 / 1024.0, 1),
        "window_seconds": round(window, 1),
        "cpu_cores": round(cpu_cores, 4),
        "kube_writes_per_job_per_poll": round(writes_total / polls, 4),
        "trainingjob_status_patches_per_job_per_poll": round(tj_status / polls, 4),
        "gpuinstance_status_patches_per_job_per_poll": round(gi_status / polls, 4),
        "events_per_job_per_poll": round(events / polls, 4),
        "apiserver_writes": api_writes,
        "kube_reads_per_job_per_poll": round(reads / polls, 3),
        "provider_requests_per_minute": round(per_minute(provider_total as f64), 1),
        "provider_requests_per_minute_by_endpoint": provider_by_endpoint
            .iter()
            .map(|(k, v)| (k.clone(), round(per_minute(*v as f64), 1)))
            .collect::<BTreeMap<_, _>>(),
        "ssh_connections_opened_ramp": ramp_ssh_opened,
        "ssh_connections_opened_window": ssh_opened,
        "ssh_connections_open": ssh_open,
        "ssh_commands_per_job_per_poll": round(ssh_runs / polls, 3),
        "ssh_command_mean_ms": round(1e3 * ssh_run_seconds / ssh_runs.max(1.0), 1),
        "reconcile_errors_window": errors,
        "restart_up_to_date_seconds": round(restart_seconds, 1),
        "restart_cpu_seconds": round(restart_proc.cpu_seconds, 1),
        "restart_peak_rss_mib": round(restart_proc.peak_rss_kib as f64 / 1024.0, 1),
        "operator_args": args.operator_args,
        "targets": {
            "peak_rss_met": peak_rss_mib * 1.048_576 < 200.0,
            "cpu_met": cpu_cores < 0.25,
            "no_writes_when_idle_met": writes_total == 0.0,
            "ssh_reused_met": ssh_opened == 0.0,
        },
    }));

    teardown(&client, &ns, &base, &mut operator, &fake).await;
}

/// Appends a progress bar at `step` to a demo trainer's log, in its own format.
fn append_step(log: &Path, step: u64) {
    use std::io::Write;
    let line = format!(
        "\rdemo:   0%|          | {step}/{TOTAL_STEPS} [00:{step:02}<?, ?it/s, lr: 1.0e-04 loss: 9.000e-01]"
    );
    match std::fs::OpenOptions::new().append(true).open(log) {
        Ok(mut f) => {
            let _ = f.write_all(line.as_bytes());
        }
        Err(err) => eprintln!("cannot append to {}: {err}", log.display()),
    }
}

/// Stops the trainers, deletes the jobs and waits (bounded) for the machines to be released.
async fn teardown(
    client: &kube::Client,
    ns: &str,
    base: &Path,
    operator: &mut OperatorProcess,
    fake: &FakeServer,
) {
    bench_util::kill_all_trainers(base);
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let _ = jobs.delete_collection(&kube::api::DeleteParams::background(), &ListParams::default()).await;
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), ns);
    let started = now();
    let released = bench_util::poll_until(Duration::from_secs(600), Duration::from_secs(5), || async {
        let left = instances.list(&ListParams::default()).await.ok()?.items.len();
        (left == 0).then_some(())
    })
    .await;
    eprintln!(
        "teardown: {} after {:.0} s; {} instances still listed by the fake",
        if released.is_some() { "all GpuInstances released" } else { "gave up waiting for the GpuInstances" },
        now() - started,
        fake.instances().len()
    );
    bench_util::kill_all_trainers(base);
    operator.kill();
    common::delete_namespace(client, ns).await;
}
