//! Controller overhead with a provider that answers at once.
//!
//! 1. Apply to rent: from creating a TrainingJob to the fake receiving its `create_instance`
//!    request. Sampled one job at a time, on machines that never boot.
//! 2. Running to launched: from the moment the fake starts reporting the instance `running` to
//!    the trainer's `launches` file being written on the machine, minus the time the operator
//!    spent in SSH operations in between (connects, commands, transfers; from the operator's own
//!    `SSH operation` debug lines, each with its duration). One job at a time, so every SSH
//!    operation in the window belongs to that job. The wait until the operator next asks the
//!    provider (the boot poll) is reported on its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use gpu_trainer::api::{GpuInstance, TrainingJob};
use gpu_trainer::provider::fake::FakeServer;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};

use crate::bench_util::{self, ms_summary, now, percentile, print_json, round, summary_json};
use crate::common;
use crate::common::operator::{OperatorOptions, OperatorProcess, installation_id, start_fake};

#[derive(Args, Debug)]
pub struct OverheadArgs {
    /// Jobs taken to training, one at a time.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Extra apply-to-rent samples on machines that never boot.
    #[arg(long, default_value_t = 100)]
    create_samples: usize,
    /// Seconds a fake instance takes to report `running`.
    #[arg(long, default_value_t = 2.0)]
    boot_seconds: f64,
    /// More arguments for `gpu-trainer run` (e.g. `--boot-poll-seconds=5`).
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
}

/// One job taken to training.
#[derive(Debug, Default, Clone)]
struct Run {
    apply_to_create: f64,
    running_to_launched: f64,
    /// From `running` to the first provider request after it (the operator's poll wait).
    detection: f64,
    ssh_seconds: f64,
    ssh_operations: usize,
}

/// A namespace, a fake provider whose machines run `running_after` after the rent (with enough
/// offers for `rents`), and a ready operator with its own work folder.
struct Setup {
    ns: String,
    fake: FakeServer,
    base: PathBuf,
    operator: OperatorProcess,
}

impl Setup {
    async fn start(
        client: &kube::Client,
        prefix: &str,
        args: &OverheadArgs,
        running_after: Duration,
        rents: usize,
    ) -> Setup {
        let ns = common::fresh_namespace(client, prefix).await;
        let fake = start_fake(|c| {
            c.loading_after = Duration::ZERO;
            c.running_after = running_after;
            c.generated_offers = bench_util::offers_for(rents);
        })
        .await;
        let base = common::env_dir().join("work").join(&ns);
        std::fs::create_dir_all(&base).unwrap();
        let installation = installation_id();
        let mut options = OperatorOptions::new(&ns, &fake, &installation);
        options.fast_polls = false;
        options.log_format = "json";
        options.env.push(("RUST_LOG", "info,gpu_trainer=debug,kube=warn".into()));
        options.args = vec!["--remote-base".into(), base.display().to_string()];
        options.args.extend_from_slice(&args.operator_args);
        let operator = OperatorProcess::start(&options);
        operator.wait_ready().await;
        Setup { ns, fake, base, operator }
    }
}

/// Waits for the fake's first `create_instance` that arrived at or after `since`; its arrival.
async fn create_arrival(fake: &FakeServer, since: f64) -> Option<f64> {
    bench_util::poll_until(Duration::from_secs(60), Duration::from_millis(2), || async {
        fake.requests()
            .iter()
            .rev()
            .take(50)
            .find(|r| r.endpoint == "create_instance" && r.received_at >= since)
            .map(|r| r.received_at)
    })
    .await
}

pub async fn run(args: OverheadArgs) {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let apply_samples = apply_to_create(&client, &args).await;
    let runs = running_to_launched(&client, &args).await;

    let mut apply: Vec<f64> = apply_samples;
    apply.extend(runs.iter().map(|r| r.apply_to_create));
    let total: Vec<f64> = runs.iter().map(|r| r.running_to_launched).collect();
    let detection: Vec<f64> = runs.iter().map(|r| r.detection).collect();
    let ssh: Vec<f64> = runs.iter().map(|r| r.ssh_seconds).collect();
    let own: Vec<f64> = runs.iter().map(|r| r.running_to_launched - r.ssh_seconds).collect();
    let own_after_detection: Vec<f64> =
        runs.iter().map(|r| r.running_to_launched - r.ssh_seconds - r.detection).collect();
    let ops: Vec<f64> = runs.iter().map(|r| r.ssh_operations as f64).collect();

    println!("controller overhead (fake provider answers at once, demo@1, one job at a time)");
    println!("{:<58} {:>8} {:>8} {:>8}  target", "milliseconds", "p50", "p99", "max");
    println!(
        "{:<58} {}  p50 < 100, p99 < 500",
        format!("apply -> create request ({} samples)", apply.len()),
        ms_summary(&apply)
    );
    println!("{:<58} {}", format!("running -> launched, all ({} runs)", total.len()), ms_summary(&total));
    println!("{:<58} {}", "  of which SSH and transfers (operator side)", ms_summary(&ssh));
    println!("{:<58} {}", "  of which waiting for the next provider poll", ms_summary(&detection));
    println!("{:<58} {}  < 1000", "running -> launched minus SSH and transfers", ms_summary(&own));
    println!("{:<58} {}", "  minus the poll wait as well", ms_summary(&own_after_detection));
    println!(
        "SSH operations per launch: {:.0} (median); each command runs the login shell's ~/.bashrc",
        percentile(&ops, 50.0)
    );
    print_json(&serde_json::json!({
        "bench": "overhead",
        "apply_to_create": summary_json(&apply),
        "running_to_launched": summary_json(&total),
        "ssh_and_transfer": summary_json(&ssh),
        "poll_wait": summary_json(&detection),
        "running_to_launched_minus_ssh": summary_json(&own),
        "running_to_launched_minus_ssh_and_poll_wait": summary_json(&own_after_detection),
        "ssh_operations_per_launch_p50": percentile(&ops, 50.0),
        "operator_args": args.operator_args,
        "targets": {
            "apply_to_create_p50_met": percentile(&apply, 50.0) < 0.1,
            "apply_to_create_p99_met": percentile(&apply, 99.0) < 0.5,
            "running_to_launched_minus_ssh_met": percentile(&own, 99.0) < 1.0,
        },
    }));
}

/// Samples apply -> create on machines that never boot (nothing else runs meanwhile).
async fn apply_to_create(client: &kube::Client, args: &OverheadArgs) -> Vec<f64> {
    if args.create_samples == 0 {
        return Vec::new();
    }
    let Setup { ns, fake, base, operator } =
        Setup::start(client, "bench-apply", args, Duration::from_secs(24 * 3600), args.create_samples).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let mut samples = Vec::new();
    for i in 0..args.create_samples {
        // The provider client spaces calls to one endpoint by 250 ms; samples further apart than
        // that measure the controller, not that limiter.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let job = bench_util::demo_job(
            &format!("apply-{i}"),
            "http://127.0.0.1:9/none.tar",
            &"0".repeat(64),
            10,
            1.0,
            60,
        );
        let started = now();
        jobs.create(&PostParams::default(), &job).await.expect("create job");
        match create_arrival(&fake, started).await {
            Some(at) => samples.push(at - started),
            None => eprintln!("apply-{i}: no create request within 60 s\n{}", operator.log_tail()),
        }
    }
    teardown(client, &ns, &base, &operator).await;
    samples
}

/// Takes jobs to training one at a time.
async fn running_to_launched(client: &kube::Client, args: &OverheadArgs) -> Vec<Run> {
    if args.runs == 0 {
        return Vec::new();
    }
    let boot = Duration::from_secs_f64(args.boot_seconds);
    let Setup { ns, fake, base, operator } =
        Setup::start(client, "bench-launch", args, boot, args.runs).await;
    let tmp = tempfile::tempdir().unwrap();
    let (href, sha256) = crate::common::dataset::serve_dataset(tmp.path()).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    struct Window {
        running: f64,
        launched: f64,
    }
    let mut runs = Vec::new();
    let mut windows = Vec::new();
    for i in 0..args.runs {
        let name = format!("launch-{i}");
        let job = bench_util::demo_job(&name, &href, &sha256, 100_000, 3600.0, 60);
        let started = now();
        let created = jobs.create(&PostParams::default(), &job).await.expect("create job");
        let uid = created.uid().expect("uid");
        let Some(create_at) = create_arrival(&fake, started).await else {
            eprintln!("{name}: no create request\n{}", operator.log_tail());
            continue;
        };
        let work_dir = base.join(&uid);
        let launches = work_dir.join("launches");
        let launched = bench_util::poll_until(Duration::from_secs(180), Duration::from_millis(5), || async {
            bench_util::mtime(&launches)
        })
        .await;
        let Some(launched) = launched else {
            eprintln!("{name}: training did not start within 180 s\n{}", operator.log_tail());
            break;
        };
        // The instance rented for this job: the newest one (jobs run one at a time).
        let instance = fake
            .instances()
            .into_iter()
            .max_by_key(|row| row.get("id").and_then(|v| v.as_i64()).unwrap_or_default())
            .expect("an instance");
        let start_date = instance.get("start_date").and_then(|v| v.as_f64()).unwrap_or(create_at);
        let running = start_date + boot.as_secs_f64();
        let detection = fake
            .requests()
            .iter()
            .filter(|r| {
                matches!(r.endpoint.as_str(), "list_instances" | "show_instance") && r.received_at >= running
            })
            .map(|r| r.received_at)
            .fold(f64::INFINITY, f64::min);
        runs.push(Run {
            apply_to_create: create_at - started,
            running_to_launched: launched - running,
            detection: if detection.is_finite() { (detection - running).max(0.0) } else { 0.0 },
            ..Run::default()
        });
        windows.push(Window { running, launched });

        // Release before the next run, so nothing overlaps the next measurement.
        jobs.delete(&name, &DeleteParams::background()).await.expect("delete job");
        bench_util::kill_trainer(&work_dir);
        let gi = format!("{name}-1");
        let gone = bench_util::poll_until(Duration::from_secs(120), Duration::from_millis(100), || async {
            instances.get_opt(&gi).await.ok().flatten().is_none().then_some(())
        })
        .await;
        if gone.is_none() {
            eprintln!("{gi} was not released within 120 s\n{}", operator.log_tail());
        }
    }
    // SSH time per run, from the operator's log: operations that started inside the window.
    let operations = ssh_operations(&operator.log);
    for (run, window) in runs.iter_mut().zip(&windows) {
        let inside: Vec<&(f64, f64)> = operations
            .iter()
            .filter(|(start, _)| *start >= window.running - 0.001 && *start < window.launched)
            .collect();
        run.ssh_seconds = inside.iter().map(|(_, seconds)| seconds).sum();
        run.ssh_operations = inside.len();
    }
    for (i, r) in runs.iter().enumerate() {
        eprintln!(
            "run {i}: apply->create {:.0} ms, running->launched {:.0} ms (poll wait {:.0} ms, SSH {:.0} ms in {} operations)",
            r.apply_to_create * 1e3,
            r.running_to_launched * 1e3,
            r.detection * 1e3,
            r.ssh_seconds * 1e3,
            r.ssh_operations
        );
    }
    teardown(client, &ns, &base, &operator).await;
    runs
}

/// `(start, seconds)` of every SSH operation the operator logged (JSON lines).
fn ssh_operations(log: &PathBuf) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("\"SSH operation\""))
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let end = chrono::DateTime::parse_from_rfc3339(v.get("timestamp")?.as_str()?).ok()?;
            let end = end.timestamp_micros() as f64 / 1e6;
            let seconds = v.get("seconds")?.as_f64()?;
            Some((end - seconds, round(seconds, 6)))
        })
        .collect()
}

/// Deletes the jobs, waits (bounded) for their machines to be released, stops trainers.
async fn teardown(client: &kube::Client, ns: &str, base: &Path, operator: &OperatorProcess) {
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), ns);
    let _ = jobs.delete_collection(&DeleteParams::background(), &Default::default()).await;
    bench_util::kill_all_trainers(base);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), ns);
    let gone = bench_util::poll_until(Duration::from_secs(120), Duration::from_millis(500), || async {
        instances.list(&Default::default()).await.ok().filter(|l| l.items.is_empty()).map(|_| ())
    })
    .await;
    if gone.is_none() {
        eprintln!("GpuInstances in {ns} were not all released within 120 s\n{}", operator.log_tail());
    }
    bench_util::kill_all_trainers(base);
    common::delete_namespace(client, ns).await;
}
