//! Termination.
//!
//! 1. Delete to released: running GpuInstances deleted one at a time; from the delete call to the
//!    fake no longer listing the instance (it drops an instance when its destroy call arrives),
//!    and, for reference, to the object being gone (the finalizer is removed after a second look).
//! 2. Orphan lifetime: instances rented directly at the fake with this installation's label and
//!    a GpuInstance UID that does not exist, spread over one sweep interval; from the rent to the
//!    sweeper's destroy call. Target: at most the grace period plus two sweep intervals.

use std::time::Duration;

use clap::Args;
use gpu_trainer::api::{GpuInstance, GpuInstancePhase};
use gpu_trainer::provider::{GpuProvider, LaunchRequest, OfferQuery};
use kube::api::{Api, DeleteParams, PostParams};

use crate::bench_util::{self, ms_summary, now, percentile, print_json, summary_json};
use crate::common;
use crate::common::operator::{
    OperatorOptions, OperatorProcess, installation_id, provider_client, start_fake,
};

#[derive(Args, Debug)]
pub struct TerminationArgs {
    /// GpuInstances deleted one at a time.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Orphans rented behind the operator's back.
    #[arg(long, default_value_t = 10)]
    orphans: usize,
    /// The sweeper's interval (`--sweep-interval-seconds`).
    #[arg(long, default_value_t = 10)]
    sweep_interval: u64,
    /// The sweeper's grace period (`--sweep-grace-seconds`).
    #[arg(long, default_value_t = 20)]
    sweep_grace: u64,
    /// More arguments for `gpu-trainer run`.
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
}

/// True when a request path ends with this instance id (`/api/v0/instances/<id>/`).
fn names(path: &str, id: i64) -> bool {
    path.trim_end_matches('/').ends_with(&format!("/{id}"))
}

pub async fn run(args: TerminationArgs) {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "bench-term").await;
    let fake = start_fake(|c| {
        c.loading_after = Duration::ZERO;
        c.running_after = Duration::from_millis(500);
        c.generated_offers = bench_util::offers_for(args.runs + args.orphans);
    })
    .await;
    let installation = installation_id();
    let mut options = OperatorOptions::new(&ns, &fake, &installation);
    options.fast_polls = false;
    options.env.push(("RUST_LOG", "info,kube=warn".into()));
    options.args = vec![
        format!("--sweep-interval-seconds={}", args.sweep_interval),
        format!("--sweep-grace-seconds={}", args.sweep_grace),
    ];
    options.args.extend(args.operator_args.iter().cloned());
    let operator = OperatorProcess::start(&options);
    operator.wait_ready().await;
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    // 1. Delete to released.
    for i in 0..args.runs {
        api.create(&PostParams::default(), &common::gpu_instance(&format!("box-{i}"))).await.expect("create");
    }
    for i in 0..args.runs {
        let name = format!("box-{i}");
        let running =
            bench_util::poll_until(Duration::from_secs(120), Duration::from_millis(200), || async {
                let gi = api.get(&name).await.ok()?;
                (gi.status?.phase == GpuInstancePhase::Running).then_some(())
            })
            .await;
        if running.is_none() {
            eprintln!("{name} not Running within 120 s\n{}", operator.log_tail());
        }
    }
    let mut released = Vec::new();
    let mut object_gone = Vec::new();
    for i in 0..args.runs {
        let name = format!("box-{i}");
        let Some(id) = api.get(&name).await.ok().and_then(|g| g.status?.provider_id) else { continue };
        let id: i64 = id.parse().expect("numeric provider id");
        let listed = |fake: &gpu_trainer::provider::fake::FakeServer| {
            fake.instances().iter().any(|row| row.get("id").and_then(|v| v.as_i64()) == Some(id))
        };
        let started = now();
        api.delete(&name, &DeleteParams::default()).await.expect("delete");
        let gone = bench_util::poll_until(Duration::from_secs(120), Duration::from_millis(2), || async {
            (!listed(&fake)).then(now)
        })
        .await;
        // The destroy call's arrival is the moment the fake stopped listing it.
        let destroyed = fake
            .requests()
            .iter()
            .filter(|r| r.endpoint == "destroy_instance" && names(&r.path, id))
            .map(|r| r.received_at)
            .fold(f64::INFINITY, f64::min);
        match gone {
            Some(seen) => released.push(if destroyed.is_finite() { destroyed } else { seen } - started),
            None => eprintln!("{name}: still listed 120 s after delete\n{}", operator.log_tail()),
        }
        let deleted = bench_util::poll_until(Duration::from_secs(120), Duration::from_millis(20), || async {
            api.get_opt(&name).await.ok().flatten().is_none().then(now)
        })
        .await;
        if let Some(at) = deleted {
            object_gone.push(at - started);
        }
    }

    // 2. Orphans, rented at even offsets over one sweep interval.
    let provider = provider_client(&fake);
    let offers = provider.search_offers(&OfferQuery::default()).await.expect("offers");
    let mut orphans = Vec::new();
    let spacing = Duration::from_secs_f64(args.sweep_interval as f64 / args.orphans.max(1) as f64);
    for i in 0..args.orphans {
        let request = LaunchRequest {
            offer_id: offers[i % offers.len()].id,
            image: "ubuntu:22.04".into(),
            disk_gb: 16,
            label: Some(format!("gputrainer:{installation}:00000000-0000-4000-8000-{i:012}")),
            ssh: true,
            ..LaunchRequest::default()
        };
        let rented = now();
        let id = provider.create_instance(&request).await.expect("rent an orphan").0;
        orphans.push((id, rented));
        tokio::time::sleep(spacing).await;
    }
    let bound = args.sweep_grace as f64 + 2.0 * args.sweep_interval as f64;
    let limit = Duration::from_secs_f64(bound * 2.0 + 30.0);
    let _ = bench_util::poll_until(limit, Duration::from_millis(200), || async {
        let live = fake.instances();
        let left = orphans
            .iter()
            .filter(|(id, _)| live.iter().any(|r| r.get("id").and_then(|v| v.as_i64()) == Some(*id)))
            .count();
        (left == 0).then_some(())
    })
    .await;
    let requests = fake.requests();
    let mut windows = Vec::new();
    let mut survivors = 0;
    for (id, rented) in &orphans {
        let destroyed = requests
            .iter()
            .filter(|r| r.endpoint == "destroy_instance" && names(&r.path, *id))
            .map(|r| r.received_at)
            .fold(f64::INFINITY, f64::min);
        if destroyed.is_finite() {
            windows.push(destroyed - rented);
        } else {
            survivors += 1;
        }
    }
    let in_intervals: Vec<f64> =
        windows.iter().map(|w| (w - args.sweep_grace as f64) / args.sweep_interval as f64).collect();

    println!("termination (fake provider answers at once)");
    println!("{:<52} {:>8} {:>8} {:>8}", "milliseconds", "p50", "p99", "max");
    println!(
        "{:<52} {}",
        format!("delete -> provider no longer lists ({} runs)", released.len()),
        ms_summary(&released)
    );
    println!("{:<52} {}", "delete -> GpuInstance object gone", ms_summary(&object_gone));
    println!(
        "orphan lifetime ({} orphans, grace {} s, sweep every {} s): p50 {:.1} s, max {:.1} s, bound {:.0} s; \
         (lifetime - grace) / interval: max {:.2} (target <= 2); never destroyed: {survivors}",
        orphans.len(),
        args.sweep_grace,
        args.sweep_interval,
        percentile(&windows, 50.0),
        percentile(&windows, 100.0),
        bound,
        percentile(&in_intervals, 100.0),
    );
    print_json(&serde_json::json!({
        "bench": "termination",
        "delete_to_unlisted": summary_json(&released),
        "delete_to_object_gone": summary_json(&object_gone),
        "orphan_lifetime": summary_json(&windows),
        "orphan_lifetime_in_sweep_intervals_after_grace_max": percentile(&in_intervals, 100.0),
        "orphans_never_destroyed": survivors,
        "sweep_grace_s": args.sweep_grace,
        "sweep_interval_s": args.sweep_interval,
        "targets": {
            "orphan_within_grace_plus_two_intervals": survivors == 0 && percentile(&windows, 100.0) <= bound,
        },
    }));

    let _ = api.delete_collection(&DeleteParams::default(), &Default::default()).await;
    let _ = bench_util::poll_until(Duration::from_secs(60), Duration::from_millis(500), || async {
        api.list(&Default::default()).await.ok().filter(|l| l.items.is_empty()).map(|_| ())
    })
    .await;
    drop(operator);
    common::delete_namespace(&client, &ns).await;
}
