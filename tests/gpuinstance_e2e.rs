//! The GpuInstance controller end to end: `gpu-trainer run` as a real process, the real API
//! server, `fake-vastai` (in this process) and the test sshd.

mod common;

use std::time::Duration;

use common::operator::{
    OperatorOptions, OperatorProcess, installation_id, live_instances, provider_client, start_fake,
};
use gpu_trainer::api::{GPUINSTANCE_FINALIZER, GpuInstance, GpuInstancePhase};
use gpu_trainer::provider::fake::{FakeServer, Fault, ForcedState};
use gpu_trainer::provider::{GpuProvider, LaunchRequest, OfferQuery};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};

const TIMEOUT: Duration = Duration::from_secs(90);

async fn wait_ready(api: &Api<GpuInstance>, name: &str, operator: &OperatorProcess) -> GpuInstance {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Ok(gi) = api.get(name).await {
            let status = gi.status.clone().unwrap_or_default();
            if status.phase == GpuInstancePhase::Running {
                return gi;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("{name} not Running in time: {status:?}\noperator log:\n{}", operator.log_tail());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_deleted(api: &Api<GpuInstance>, name: &str, operator: &OperatorProcess) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while api.get_opt(name).await.unwrap().is_some() {
        if tokio::time::Instant::now() >= deadline {
            panic!("{name} still exists\noperator log:\n{}", operator.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn label_of(installation: &str, gi: &GpuInstance) -> String {
    format!("gputrainer:{installation}:{}", gi.uid().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn instance_becomes_ready_and_deleting_it_releases_the_machine_first() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "gpui-ready").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let operator = OperatorProcess::start(&OperatorOptions::new(&ns, &fake, &installation));
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);

    api.create(&PostParams::default(), &common::gpu_instance("box")).await.unwrap();
    let ready = wait_ready(&api, "box", &operator).await;
    let status = ready.status.clone().unwrap();
    let ssh = status.ssh.clone().expect("ssh endpoint in status");
    assert_eq!(ssh.port, common::operator::ssh_env().port);
    assert!(ssh.host_key_fingerprint.as_deref().is_some_and(|f| f.starts_with("SHA256:")), "{ssh:?}");
    assert!(ready.finalizers().contains(&GPUINSTANCE_FINALIZER.to_string()));
    assert!(status.offer.is_some() && status.provider_id.is_some(), "{status:?}");
    let conditions: Vec<_> =
        status.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str())).collect();
    for expected in [("Launched", "True"), ("Reachable", "True"), ("Ready", "True")] {
        assert!(conditions.contains(&expected), "{conditions:?}");
    }
    // The generated key lives in a Secret owned by the GpuInstance.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret = secrets.get("box-ssh-key").await.expect("generated key Secret");
    assert_eq!(secret.owner_references()[0].uid, ready.uid().unwrap());

    let label = label_of(&installation, &ready);
    let live = live_instances(&fake, &label).await;
    assert_eq!(live.len(), 1, "exactly one instance rented: {live:?}");
    assert_eq!(live[0].id.to_string(), status.provider_id.clone().unwrap());

    let table = common::kubectl(&["get", "gpui", "-n", &ns]);
    let row = table.lines().find(|l| l.starts_with("box")).unwrap();
    assert!(row.contains("Running") && row.contains(status.provider_id.as_deref().unwrap()), "{table}");

    api.delete("box", &DeleteParams::default()).await.unwrap();
    wait_deleted(&api, "box", &operator).await;
    assert!(live_instances(&fake, &label).await.is_empty(), "the machine is released before the object goes");
    let destroys = fake.requests().iter().filter(|r| r.endpoint == "destroy_instance").count();
    assert!(destroys >= 1, "a destroy call was made");

    let reasons = common::event_reasons(&client, &ns, "box").await;
    for expected in ["Launched", "Ready", "Terminating", "Terminated"] {
        assert!(reasons.iter().any(|r| r == expected), "event {expected} missing: {reasons:?}");
    }
    assert!(operator.metrics().await.contains("gputrainer_instance_launches_total{outcome=\"success\"} 1"));
    common::delete_namespace(&client, &ns).await;
}

/// The controller is killed at each step of the create protocol and restarted; every time there
/// ends up exactly one instance for the GpuInstance, and none after deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn crash_at_every_step_of_the_create_protocol_leaves_exactly_one_instance() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "gpui-crash").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);
    let mut table = vec![format!(
        "{:<22} {:>16} {:>16} {:>16}",
        "CRASH AT", "AFTER CRASH", "AFTER RESTART", "AFTER DELETE"
    )];

    for step in ["before-pending-mark", "after-pending-mark", "after-rent", "after-recording-id"] {
        let name = format!("crash-{step}");
        let mut options = OperatorOptions::new(&ns, &fake, &installation);
        options.env.push(("GPU_TRAINER_CRASH_AT", step.to_string()));
        let mut crashing = OperatorProcess::start(&options);
        api.create(&PostParams::default(), &common::gpu_instance(&name)).await.unwrap();
        let exit = crashing.wait_exit(TIMEOUT).await;
        assert!(!exit.success(), "{step}: the operator aborted at the crash point");
        let created = api.get(&name).await.unwrap();
        let label = label_of(&installation, &created);
        let after_crash = live_instances(&fake, &label).await.len();

        let operator = OperatorProcess::start(&OperatorOptions::new(&ns, &fake, &installation));
        let ready = wait_ready(&api, &name, &operator).await;
        let live = live_instances(&fake, &label).await;
        assert_eq!(live.len(), 1, "{step}: exactly one instance after restart: {live:?}");
        assert_eq!(Some(live[0].id.to_string()), ready.status.unwrap().provider_id, "{step}");

        api.delete(&name, &DeleteParams::default()).await.unwrap();
        wait_deleted(&api, &name, &operator).await;
        let after_delete = live_instances(&fake, &label).await.len();
        assert_eq!(after_delete, 0, "{step}: no instance after deletion");
        table.push(format!("{step:<22} {after_crash:>16} {:>16} {after_delete:>16}", live.len()));
    }
    println!("{}", table.join("\n"));
    common::delete_namespace(&client, &ns).await;
}

async fn rent_directly(fake: &FakeServer, label: Option<String>) -> i64 {
    let client = provider_client(fake);
    let offers = client.search_offers(&OfferQuery::default()).await.unwrap();
    let request = LaunchRequest {
        offer_id: offers[0].id,
        image: "ubuntu:22.04".into(),
        disk_gb: 16,
        label,
        ssh: true,
        ..LaunchRequest::default()
    };
    client.create_instance(&request).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn sweeper_destroys_only_this_installations_orphans_on_the_second_sighting() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "sweep").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let orphan = rent_directly(&fake, Some(format!("gputrainer:{installation}:no-such-uid"))).await;
    let foreign = rent_directly(&fake, Some("gputrainer:ffffffff:someone-elses".into())).await;
    let unlabelled = rent_directly(&fake, None).await;
    let handmade = rent_directly(&fake, Some("my-notebook".into())).await;

    let started = tokio::time::Instant::now();
    let operator = OperatorProcess::start(&OperatorOptions::new(&ns, &fake, &installation));
    let provider = provider_client(&fake);
    common::wait_until(TIMEOUT, "the orphan to be destroyed", || {
        let provider = &provider;
        async move {
            let gone = provider
                .get_instance(gpu_trainer::provider::InstanceId(orphan))
                .await
                .is_err_and(|e| e.is_not_found());
            gone.then_some(())
        }
    })
    .await;
    let window = started.elapsed();
    // Grace 3 s and a 2 s interval: destroyed on the second sighting, not the first.
    assert!(
        window >= Duration::from_secs(2),
        "destroyed after {window:?}, before a second sighting was possible"
    );
    let destroys: Vec<_> = fake.requests().into_iter().filter(|r| r.endpoint == "destroy_instance").collect();
    assert_eq!(destroys.len(), 1, "only the orphan is destroyed: {destroys:?}");
    // Several more passes later, the others are still there.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for id in [foreign, unlabelled, handmade] {
        let instance = provider.get_instance(gpu_trainer::provider::InstanceId(id)).await;
        assert!(instance.is_ok(), "instance {id} must never be touched: {instance:?}");
    }
    println!(
        "orphan destroyed {:.1} s after the operator started (grace 3 s, interval 2 s)",
        window.as_secs_f64()
    );
    assert!(operator.metrics().await.contains("gputrainer_sweeper_orphans_total{action=\"destroyed\"} 1"));
    common::delete_namespace(&client, &ns).await;
}

/// 429 storms, 5xx bursts, slow answers, a failed create that left a contract, and an instance
/// going offline: never an instance without a GpuInstance, never a GpuInstance left unreleased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn provider_faults_never_leak_an_instance() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "faults").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let operator = OperatorProcess::start(&OperatorOptions::new(&ns, &fake, &installation));
    operator.wait_ready().await;
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);
    let prefix = format!("gputrainer:{installation}:");

    let faults = [
        ("rate-limit-storm", vec![Fault::RateLimit { count: 20, retry_after_secs: None, endpoint: None }]),
        ("5xx-burst", vec![Fault::ErrorBurst { status: 503, count: 6, endpoint: None }]),
        ("slow", vec![Fault::Slow { delay_ms: 1500, count: 4, endpoint: None }]),
        (
            "create-leaves-contract",
            vec![Fault::CreateLeavesContract { count: 1, status: 500, report_contract: true }],
        ),
        (
            "create-fails-silently",
            vec![Fault::CreateLeavesContract { count: 1, status: 502, report_contract: false }],
        ),
    ];
    let mut table = vec![format!("{:<24} {:>10} {:>14}", "FAULT", "READY", "LEFT AFTER")];
    for (name, fault_list) in faults {
        for fault in fault_list {
            fake.add_fault(fault);
        }
        api.create(&PostParams::default(), &common::gpu_instance(name)).await.unwrap();
        let ready = wait_ready(&api, name, &operator).await;
        let label = label_of(&installation, &ready);
        assert_eq!(live_instances(&fake, &label).await.len(), 1, "{name}: one instance for the GpuInstance");
        api.delete(name, &DeleteParams::default()).await.unwrap();
        wait_deleted(&api, name, &operator).await;
        fake.clear_faults();
        let left = live_instances(&fake, &prefix).await.len();
        assert_eq!(left, 0, "{name}: nothing of this installation left");
        table.push(format!("{name:<24} {:>10} {left:>14}", "yes"));
    }

    // An instance that goes offline while running: released, the GpuInstance reports it.
    api.create(&PostParams::default(), &common::gpu_instance("goes-offline")).await.unwrap();
    let ready = wait_ready(&api, "goes-offline", &operator).await;
    let id: i64 = ready.status.as_ref().unwrap().provider_id.as_ref().unwrap().parse().unwrap();
    fake.set_instance_state(id, ForcedState::Offline);
    common::wait_until(TIMEOUT, "goes-offline to be Lost", || {
        let api = api.clone();
        async move {
            let gi = api.get("goes-offline").await.ok()?;
            (gi.status?.phase == GpuInstancePhase::Lost).then_some(())
        }
    })
    .await;
    common::wait_until(TIMEOUT, "the offline instance to be destroyed", || {
        let fake = &fake;
        let prefix = prefix.clone();
        async move { live_instances(fake, &prefix).await.is_empty().then_some(()) }
    })
    .await;
    table.push(format!("{:<24} {:>10} {:>14}", "instance-offline", "lost", 0));
    api.delete("goes-offline", &DeleteParams::default()).await.unwrap();
    wait_deleted(&api, "goes-offline", &operator).await;
    println!("{}", table.join("\n"));
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn of_two_replicas_exactly_one_acts() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "replicas").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let mut options = OperatorOptions::new(&ns, &fake, &installation);
    options.leader_elect = true;
    let first = OperatorProcess::start(&options);
    let second = OperatorProcess::start(&options);
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);
    for i in 0..3 {
        api.create(&PostParams::default(), &common::gpu_instance(&format!("r{i}"))).await.unwrap();
    }
    for i in 0..3 {
        wait_ready(&api, &format!("r{i}"), &first).await;
    }
    let prefix = format!("gputrainer:{installation}:");
    assert_eq!(live_instances(&fake, &prefix).await.len(), 3, "one instance per GpuInstance, never two");
    // Exactly one replica reconciled: only the leader's metrics count launches.
    let launches = |m: String| m.contains("gputrainer_instance_launches_total{outcome=\"success\"} 3");
    let (a, b) = (launches(first.metrics().await), launches(second.metrics().await));
    assert!(a ^ b, "exactly one replica rented (first: {a}, second: {b})");

    // The leader goes away; the standby takes over and releases what is deleted.
    let (mut leader, standby) = if a { (first, second) } else { (second, first) };
    leader.terminate();
    let exit = leader.wait_exit(TIMEOUT).await;
    assert!(exit.success(), "SIGTERM is a graceful shutdown: {exit:?}");
    for i in 0..3 {
        api.delete(&format!("r{i}"), &DeleteParams::default()).await.unwrap();
    }
    for i in 0..3 {
        wait_deleted(&api, &format!("r{i}"), &standby).await;
    }
    assert!(live_instances(&fake, &prefix).await.is_empty());
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn termination_stuck_is_raised_and_trying_goes_on() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "stuck").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let mut options = OperatorOptions::new(&ns, &fake, &installation);
    options.args = vec!["--termination-stuck-seconds".into(), "2".into()];
    let operator = OperatorProcess::start(&options);
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &common::gpu_instance("stuck")).await.unwrap();
    let ready = wait_ready(&api, "stuck", &operator).await;
    let label = label_of(&installation, &ready);

    // The provider refuses every destroy.
    fake.add_fault(Fault::ErrorBurst {
        status: 500,
        count: 100_000,
        endpoint: Some("destroy_instance".into()),
    });
    api.delete("stuck", &DeleteParams::default()).await.unwrap();
    common::wait_until(TIMEOUT, "TerminationStuck", || {
        let api = api.clone();
        async move {
            let gi = api.get("stuck").await.ok()?;
            let stuck =
                gi.status?.conditions.iter().any(|c| c.type_ == "TerminationStuck" && c.status == "True");
            stuck.then_some(())
        }
    })
    .await;
    assert!(api.get("stuck").await.unwrap().finalizers().contains(&GPUINSTANCE_FINALIZER.to_string()));
    assert_eq!(live_instances(&fake, &label).await.len(), 1, "still rented while the provider refuses");
    assert!(common::event_reasons(&client, &ns, "stuck").await.iter().any(|r| r == "TerminationStuck"));
    assert!(operator.metrics().await.contains("gputrainer_instance_termination_stuck 1"));

    // The provider recovers: the operator never gave up.
    fake.clear_faults();
    wait_deleted(&api, "stuck", &operator).await;
    assert!(live_instances(&fake, &label).await.is_empty());
    assert!(operator.metrics().await.contains("gputrainer_instance_termination_stuck 0"));
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_machine_that_never_boots_is_released_and_excluded() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "boot").await;
    let fake = start_fake(|c| {
        c.loading_after = Duration::from_millis(200);
        c.running_after = Duration::from_secs(3600);
    })
    .await;
    let installation = installation_id();
    let mut options = OperatorOptions::new(&ns, &fake, &installation);
    options.args = vec!["--boot-timeout-seconds".into(), "3".into()];
    let operator = OperatorProcess::start(&options);
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &common::gpu_instance("slow-boot")).await.unwrap();
    let failed = common::wait_until(TIMEOUT, "BootTimeout", || {
        let api = api.clone();
        async move {
            let gi = api.get("slow-boot").await.ok()?;
            let status = gi.status.clone()?;
            (status.phase == GpuInstancePhase::Failed).then_some(gi)
        }
    })
    .await;
    let status = failed.status.clone().unwrap();
    assert_eq!(status.reason, Some(gpu_trainer::api::Reason::BootTimeout), "{status:?}");
    assert_eq!(status.excluded_machine_ids.len(), 1, "the slow host is excluded");
    let label = label_of(&installation, &failed);
    common::wait_until(TIMEOUT, "the slow instance to be destroyed", || {
        let fake = &fake;
        let label = label.clone();
        async move { live_instances(fake, &label).await.is_empty().then_some(()) }
    })
    .await;
    assert!(
        common::event_reasons(&client, &ns, "slow-boot").await.iter().any(|r| r == "BootTimeout"),
        "{}",
        operator.log_tail()
    );
    common::delete_namespace(&client, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn sweep_command_reports_then_destroys_with_force() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "sweep-cli").await;
    let fake = start_fake(|_| {}).await;
    let installation = installation_id();
    let orphan = rent_directly(&fake, Some(format!("gputrainer:{installation}:no-such-uid"))).await;
    let foreign = rent_directly(&fake, Some("gputrainer:ffffffff:other".into())).await;
    let sweep = |extra: &'static [&'static str]| {
        let url = fake.url();
        let installation = installation.clone();
        let ns = ns.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_gpu-trainer"))
                    .args([
                        "sweep",
                        "--grace-seconds",
                        "0",
                        "--namespace",
                        &ns,
                        "--installation-id",
                        &installation,
                    ])
                    .args(extra)
                    .env("KUBECONFIG", common::kubeconfig_path())
                    .env("VASTAI_API_KEY", common::operator::API_KEY)
                    .env("VASTAI_API_BASE_URL", url)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let dry = sweep(&[]).await;
    let dry_text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(dry.status.success(), "{dry_text}{}", String::from_utf8_lossy(&dry.stderr));
    assert!(dry_text.contains("dry run") && dry_text.contains(&orphan.to_string()), "{dry_text}");
    assert!(dry_text.contains("would destroy"), "{dry_text}");
    assert!(
        !dry_text.contains(&foreign.to_string()),
        "another installation's instance is not listed: {dry_text}"
    );
    let provider = provider_client(&fake);
    assert!(
        provider.get_instance(gpu_trainer::provider::InstanceId(orphan)).await.is_ok(),
        "a dry run changes nothing"
    );

    let forced = sweep(&["--force"]).await;
    let forced_text = String::from_utf8_lossy(&forced.stdout).into_owned();
    assert!(forced.status.success(), "{forced_text}");
    assert!(forced_text.contains("destroyed"), "{forced_text}");
    let gone = provider.get_instance(gpu_trainer::provider::InstanceId(orphan)).await;
    assert!(gone.is_err_and(|e| e.is_not_found()));
    assert!(provider.get_instance(gpu_trainer::provider::InstanceId(foreign)).await.is_ok());
    common::delete_namespace(&client, &ns).await;
}

/// A provider that answers the start-up key check with nothing but 429s does not hold the
/// controllers back: the operator starts after its bounded check, and once the provider answers
/// again a GpuInstance becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_rate_limited_provider_does_not_hold_back_start_up() {
    let client = common::kube_client().await;
    common::install_crds(&client).await;
    let ns = common::fresh_namespace(&client, "gpui-busy").await;
    let fake = start_fake(|_| {}).await;
    fake.add_fault(Fault::RateLimit {
        count: 1000,
        retry_after_secs: None,
        endpoint: Some("current_user".into()),
    });
    let installation = installation_id();
    let operator = OperatorProcess::start(&OperatorOptions::new(&ns, &fake, &installation));
    operator.wait_ready().await;
    let log = std::fs::read_to_string(&operator.log).unwrap();
    assert!(log.contains("starting anyway"), "{}", operator.log_tail());
    let api: Api<GpuInstance> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &common::gpu_instance("box")).await.unwrap();
    wait_ready(&api, "box", &operator).await;
    api.delete("box", &DeleteParams::default()).await.unwrap();
    common::wait_until(TIMEOUT, "the box to be released and gone", || async {
        api.get_opt("box").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(live_instances(&fake, "").await.is_empty(), "nothing is left rented");
}
