//! Leader election against the real API server: of two replicas exactly one leads, and the
//! standby takes over when the leader shuts down (and releases the lease).

mod common;

use std::time::Duration;

use gpu_trainer::controller::leader::{LeaderConfig, run_elector};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::sync::watch;

struct Replica {
    is_leader: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), gpu_trainer::controller::leader::LeaderError>>,
}

fn start(leases: &Api<Lease>, ns: &str, identity: &str) -> Replica {
    let mut config = LeaderConfig::new("gpu-trainer-leader", ns, identity);
    config.lease_duration = Duration::from_secs(4);
    config.renew_deadline = Duration::from_secs(3);
    config.retry_period = Duration::from_millis(200);
    let (leader_tx, is_leader) = watch::channel(false);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(run_elector(leases.clone(), config, leader_tx, shutdown_rx));
    Replica { is_leader, shutdown, task }
}

#[tokio::test]
#[ignore = "needs tests/ environment"]
async fn exactly_one_replica_leads_and_the_standby_takes_over() {
    let client = common::kube_client().await;
    let ns = common::fresh_namespace(&client, "leader").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);

    let a = start(&leases, &ns, "replica-a");
    let b = start(&leases, &ns, "replica-b");
    let first = common::wait_until(Duration::from_secs(20), "a leader", || {
        let (a, b) = (*a.is_leader.borrow(), *b.is_leader.borrow());
        async move { (a || b).then_some(if a { "replica-a" } else { "replica-b" }) }
    })
    .await;

    // For a while, never both: sample the two flags over several renewal periods.
    for _ in 0..30 {
        assert!(!(*a.is_leader.borrow() && *b.is_leader.borrow()), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = leases.get("gpu-trainer-leader").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some(first));

    let (leader, standby) = if first == "replica-a" { (a, b) } else { (b, a) };
    leader.shutdown.send_replace(true);
    leader.task.await.unwrap().unwrap();
    assert!(!*leader.is_leader.borrow(), "a stopped replica no longer leads");
    common::wait_until(Duration::from_secs(20), "the standby to take over", || {
        let lead = *standby.is_leader.borrow();
        async move { lead.then_some(()) }
    })
    .await;
    let lease = leases.get("gpu-trainer-leader").await.unwrap();
    assert_ne!(lease.spec.unwrap().holder_identity.as_deref(), Some(first));

    standby.shutdown.send_replace(true);
    standby.task.await.unwrap().unwrap();
    common::delete_namespace(&client, &ns).await;
}
