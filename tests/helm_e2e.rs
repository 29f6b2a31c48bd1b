//! The chart installed with the real Helm CLI, Helm 3 and Helm 4, into the test API server, and
//! the operator run with what Helm installed: the Deployment's own arguments and environment
//! (its Secret references resolved, as the kubelet would) and a token of the chart's
//! ServiceAccount (TokenRequest API, as the kubelet mounts one). The test cluster has no nodes,
//! so `gpu-trainer run` runs as a process on this machine, like in `tests/rbac_e2e.rs`; only the
//! metrics address is changed (the pod's 0.0.0.0:8080 would clash), and the values point the
//! operator at this test's `fake-vastai`, its sshd work dir and this repository's tools.
//!
//! 1. `helm install`: the CRDs are there, the release is deployed, a `demo@1` TrainingJob reaches
//!    `Succeeded` and its machine is released. The operator never hears 403, and its credential
//!    cannot list pods (it is the ServiceAccount's, not the admin's).
//! 2. The documented CRD step (`kubectl apply --server-side -f charts/gpu-trainer/crds/`), then
//!    `helm upgrade` to the same chart with changed values (two replicas, so leader election
//!    through the chart's Role; other log format and settings): revision 2 changes the
//!    Deployment; the operator restarted with the new arguments leads and rents a stand-alone
//!    GpuInstance.
//! 3. Everything deleted as `docs/operating.md` says (objects first, then `helm uninstall`):
//!    no machine is left rented (the fake lists none), no GpuInstance is left, every object of
//!    the release is gone and the ServiceAccount's token no longer works, the CRDs and the
//!    leader Lease stay (as documented), and the namespace deletes without a stuck finalizer.

mod common;

use std::path::Path;
use std::time::Duration;

use common::account::{Account, client_from, service_account_kubeconfig};
use common::dataset::serve_dataset;
use common::helm::{Helm, chart_dir, values_file};
use common::operator::{API_KEY, OperatorProcess, free_port, live_instances, start_fake};
use gpu_trainer::api::{GpuInstance, GpuInstancePhase, TrainingJob, TrainingJobPhase};
use gpu_trainer::provider::fake::FakeServer;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(180);
/// The Secret holding the (fake) Vast.ai API key, created before the install as the chart asks.
const KEY_SECRET: &str = "vastai-account";

/// `helm ... -n namespace --kubeconfig <admin>`.
fn helm_in(helm: &Helm, namespace: &str, args: &[&str]) -> String {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(["--namespace".to_string(), namespace.to_string()]);
    all.extend(Helm::kubeconfig_args());
    helm.ok(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The release's (status, revision) as `helm list` reports it; None when it is not listed.
fn release_state(helm: &Helm, namespace: &str, release: &str) -> Option<(String, u64)> {
    let list: serde_json::Value =
        serde_json::from_str(&helm_in(helm, namespace, &["list", "--output", "json"])).unwrap();
    let entry = list.as_array()?.iter().find(|r| r["name"] == release)?;
    let revision = &entry["revision"];
    let revision = revision.as_u64().or_else(|| revision.as_str()?.parse().ok()).expect("a revision");
    Some((entry["status"].as_str().unwrap_or_default().to_string(), revision))
}

/// Values for this test: the fake marketplace, this namespace only, the sshd work dir, the
/// repository's tools, loopback URLs allowed, short polls.
fn install_values(fake: &FakeServer, namespace: &str, work_dir: &Path) -> serde_yaml::Value {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tools");
    serde_yaml::to_value(json!({
        "vastai": {"existingSecret": KEY_SECRET, "existingSecretKey": "key", "endpoint": fake.url()},
        "watchNamespace": namespace,
        "remoteBase": work_dir.display().to_string(),
        "toolsDir": tools.display().to_string(),
        "allowPrivateEndpoints": true,
        "logFormat": "pretty",
        "logLevel": "info,gpu_trainer=debug,kube=warn",
        "sweep": {"intervalSeconds": 2, "graceSeconds": 3},
        "instances": {"livenessPollSeconds": 5, "fastPollSeconds": 1, "createPendingGraceSeconds": 3},
    }))
    .unwrap()
}

/// What `helm upgrade` changes: two replicas (leader election, RollingUpdate), JSON logs, other
/// job defaults, an annotated ServiceAccount.
fn upgrade_values(install: &serde_yaml::Value) -> serde_yaml::Value {
    let mut values = install.clone();
    values["replicaCount"] = 2.into();
    values["logFormat"] = "json".into();
    values["jobDefaults"] = serde_yaml::to_value(json!({"minVramGb": 16, "maxPricePerHour": 3.5})).unwrap();
    values["serviceAccount"] =
        serde_yaml::to_value(json!({"annotations": {"example.com/revision": "second"}})).unwrap();
    values
}

/// The installed Deployment's container as a process: its arguments (only the metrics address
/// moved to a free loopback port) and its environment with Secret and field references resolved
/// as the kubelet does; authenticated as the pod's ServiceAccount.
async fn start_operator_from_deployment(
    admin: &Client,
    namespace: &str,
    deployment: &str,
    pod_name: &str,
) -> (OperatorProcess, Account) {
    let deployment = Api::<Deployment>::namespaced(admin.clone(), namespace).get(deployment).await.unwrap();
    let pod = deployment.spec.template.spec.unwrap();
    let container = &pod.containers[0];
    let metrics_port = free_port();
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap()
        .into_iter()
        .map(|a| {
            if a.starts_with("--metrics-addr=") {
                format!("--metrics-addr=127.0.0.1:{metrics_port}")
            } else {
                a
            }
        })
        .collect();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), namespace);
    let mut env = Vec::new();
    for var in container.env.clone().unwrap_or_default() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => Some(value.clone()),
            (None, Some(from)) => {
                if let Some(r) = &from.secret_key_ref {
                    let secret = secrets.get_opt(&r.name).await.unwrap();
                    let value = secret.and_then(|s| s.data?.get(&r.key).map(|b| b.0.clone()));
                    match value {
                        Some(bytes) => Some(String::from_utf8(bytes).unwrap()),
                        None if r.optional == Some(true) => None,
                        None => {
                            panic!("{}: Secret {}/{} key {} is missing", var.name, namespace, r.name, r.key)
                        }
                    }
                } else if let Some(field) = &from.field_ref {
                    match field.field_path.as_str() {
                        "metadata.namespace" => Some(namespace.to_string()),
                        "metadata.name" => Some(pod_name.to_string()),
                        other => panic!("{}: no value for fieldRef {other}", var.name),
                    }
                } else {
                    panic!("{}: an unexpected valueFrom", var.name)
                }
            }
            (None, None) => Some(String::new()),
        };
        if let Some(value) = value {
            env.push((var.name.clone(), value));
        }
    }
    let account_name = pod.service_account_name.clone().expect("the pod's ServiceAccount");
    let account =
        service_account_kubeconfig(admin, namespace, &account_name, &common::env_dir().join("helm")).await;
    let operator = OperatorProcess::start_with(&args, &env, &account.kubeconfig, metrics_port, pod_name);
    operator.wait_ready().await;
    (operator, account)
}

/// Fails at once when the operator logs a refused request (the chart's RBAC is not enough).
fn assert_not_forbidden(operator: &OperatorProcess) {
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(
        !log.to_ascii_lowercase().contains("forbidden"),
        "the operator was refused a request as the chart's ServiceAccount:\n{}",
        operator.log_tail()
    );
}

async fn wait_job_succeeded(admin: &Client, namespace: &str, name: &str, operator: &mut OperatorProcess) {
    let jobs: Api<TrainingJob> = Api::namespaced(admin.clone(), namespace);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let job = jobs.get(name).await.unwrap();
        let status = job.status.unwrap_or_default();
        if status.phase == TrainingJobPhase::Succeeded {
            return;
        }
        assert_ne!(
            status.phase,
            TrainingJobPhase::Failed,
            "job {name} failed: {:?}\n{}",
            status.message,
            operator.log_tail()
        );
        assert!(operator.is_running(), "the operator exited:\n{}", operator.log_tail());
        assert_not_forbidden(operator);
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {name} did not succeed within {TIMEOUT:?} (phase {:?}):\n{}",
            status.phase,
            operator.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_no_gpu_instances(admin: &Client, namespace: &str, operator: &OperatorProcess) {
    let instances: Api<GpuInstance> = Api::namespaced(admin.clone(), namespace);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let left = instances.list(&ListParams::default()).await.unwrap().items;
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GpuInstances left: {:?}\n{}",
            left.iter().map(|i| i.name_any()).collect::<Vec<_>>(),
            operator.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn install_job_upgrade_uninstall(helm: Helm) {
    let admin = common::kube_client().await;
    let namespace = common::fresh_namespace(&admin, &format!("helm{}", helm.major)).await;
    // Cluster-scoped objects (ClusterRole, ClusterRoleBinding) are named after the release.
    let release = format!("h{}-{}", helm.major, namespace.rsplit('-').next().unwrap());
    let fullname = format!("{release}-gpu-trainer");
    let tmp = tempfile::tempdir().unwrap();
    let dataset = serve_dataset(tmp.path()).await;
    let fake = start_fake(|_| {}).await;
    let work_dir = common::env_dir().join("work").join(&namespace);
    std::fs::create_dir_all(&work_dir).unwrap();

    // The API key Secret the chart refers to exists before the install (values never hold it).
    let key: Secret = serde_json::from_value(json!({
        "metadata": {"name": KEY_SECRET},
        "stringData": {"key": API_KEY},
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), &namespace).create(&PostParams::default(), &key).await.unwrap();

    // --- 1. helm install, then a job as the chart's ServiceAccount.
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let values = install_values(&fake, &namespace, &work_dir);
    let install = values_file(tmp.path(), "install.yaml", &values);
    helm_in(&helm, &namespace, &["install", &release, chart, "--values", install.to_str().unwrap()]);
    assert_eq!(release_state(&helm, &namespace, &release), Some(("deployed".into(), 1)), "after install");
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in ["trainingjobs.gputrainer.dev", "gpuinstances.gputrainer.dev"] {
        assert!(crds.get_opt(crd).await.unwrap().is_some(), "CRD {crd} after helm install");
    }
    common::wait_until(Duration::from_secs(30), "the TrainingJob CRD to be served", || async {
        Api::<TrainingJob>::namespaced(admin.clone(), &namespace).list(&ListParams::default()).await.ok()
    })
    .await;

    let (mut operator, account) =
        start_operator_from_deployment(&admin, &namespace, &fullname, &format!("{fullname}-0")).await;
    let jobs: Api<TrainingJob> = Api::namespaced(admin.clone(), &namespace);
    jobs.create(&PostParams::default(), &common::demo_job("lora", &dataset.0, &dataset.1)).await.unwrap();
    wait_job_succeeded(&admin, &namespace, "lora", &mut operator).await;
    wait_no_gpu_instances(&admin, &namespace, &operator).await;
    assert_eq!(live_instances(&fake, "").await.len(), 0, "the job's machine is released");
    // The credential really is the ServiceAccount's, not the admin's.
    match Api::<Pod>::all(client_from(&account.kubeconfig).await).list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("the chart's ServiceAccount should not list pods; got {other:?}"),
    }

    // --- 2. helm upgrade with changed values; the operator restarted with the new Deployment.
    // First the CRD step docs/operating.md gives (Helm never upgrades crds/): server-side apply
    // of the chart's CRDs over what helm install made.
    let crd_dir = chart_dir().join("crds");
    common::kubectl(&["apply", "--server-side", "-f", crd_dir.to_str().unwrap()]);
    let upgraded = values_file(tmp.path(), "upgrade.yaml", &upgrade_values(&values));
    helm_in(&helm, &namespace, &["upgrade", &release, chart, "--values", upgraded.to_str().unwrap()]);
    assert_eq!(release_state(&helm, &namespace, &release), Some(("deployed".into(), 2)), "after upgrade");
    let deployment = Api::<Deployment>::namespaced(admin.clone(), &namespace).get(&fullname).await.unwrap();
    let spec = deployment.spec.clone();
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("RollingUpdate"));
    let new_args = spec.template.spec.unwrap().containers[0].args.clone().unwrap();
    for arg in ["--leader-elect=true", "--log-format=json"] {
        assert!(new_args.contains(&arg.to_string()), "upgraded arguments {new_args:?} lack {arg}");
    }
    let sa = Api::<ServiceAccount>::namespaced(admin.clone(), &namespace).get(&fullname).await.unwrap();
    assert_eq!(sa.annotations().get("example.com/revision").map(String::as_str), Some("second"));
    operator.terminate();
    operator.wait_exit(Duration::from_secs(30)).await;
    assert_not_forbidden(&operator);
    let pod_name = format!("{fullname}-1");
    let (mut operator, account) =
        start_operator_from_deployment(&admin, &namespace, &fullname, &pod_name).await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &namespace);
    common::wait_until(Duration::from_secs(60), "the upgraded operator to lead", || async {
        let lease = leases.get_opt("gpu-trainer-leader").await.ok()??;
        (lease.spec?.holder_identity.as_deref() == Some(pod_name.as_str())).then_some(())
    })
    .await;
    let instances: Api<GpuInstance> = Api::namespaced(admin.clone(), &namespace);
    instances.create(&PostParams::default(), &common::gpu_instance("box")).await.unwrap();
    common::wait_until(TIMEOUT, "GpuInstance box to run after the upgrade", || async {
        assert_not_forbidden(&operator);
        let instance = instances.get("box").await.ok()?;
        instance.status.filter(|s| s.phase == GpuInstancePhase::Running).map(|_| ())
    })
    .await;
    assert_eq!(live_instances(&fake, "").await.len(), 1, "the box is rented");

    // --- 3. Uninstall as docs/operating.md says: the objects first, while the operator runs.
    jobs.delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    instances.delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    wait_no_gpu_instances(&admin, &namespace, &operator).await;
    assert_eq!(live_instances(&fake, "").await.len(), 0, "no machine is left rented");
    // Checked before the uninstall: `helm uninstall` deletes the RBAC objects while the pod is
    // still stopping, so a sweep pass in that window is refused, on a real cluster as here.
    assert_not_forbidden(&operator);
    helm_in(&helm, &namespace, &["uninstall", &release]);
    // The Deployment is gone, so is its pod.
    operator.terminate();
    operator.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(release_state(&helm, &namespace, &release), None, "after uninstall");
    macro_rules! gone {
        ($api:expr, $name:expr) => {
            assert!($api.get_opt($name).await.unwrap().is_none(), "{} is left after helm uninstall", $name)
        };
    }
    gone!(Api::<Deployment>::namespaced(admin.clone(), &namespace), &fullname);
    gone!(Api::<Service>::namespaced(admin.clone(), &namespace), &format!("{fullname}-metrics"));
    gone!(Api::<ServiceAccount>::namespaced(admin.clone(), &namespace), &fullname);
    gone!(Api::<Role>::namespaced(admin.clone(), &namespace), &format!("{fullname}-leader-election"));
    gone!(Api::<RoleBinding>::namespaced(admin.clone(), &namespace), &format!("{fullname}-leader-election"));
    gone!(Api::<ClusterRole>::all(admin.clone()), &fullname);
    gone!(Api::<ClusterRoleBinding>::all(admin.clone()), &fullname);
    // The token died with its ServiceAccount (the API server caches a token's authentication for
    // a few seconds; until then the account has no permission left).
    let as_account = client_from(&account.kubeconfig).await;
    common::wait_until(Duration::from_secs(60), "the ServiceAccount's token to be refused", || async {
        let answer =
            Api::<TrainingJob>::namespaced(as_account.clone(), &namespace).list(&ListParams::default()).await;
        match answer {
            Err(kube::Error::Api(s)) if s.code == 401 => Some(()),
            Err(kube::Error::Api(s)) if s.code == 403 => None,
            other => panic!("the ServiceAccount's token still works after uninstall: {other:?}"),
        }
    })
    .await;
    // What uninstall leaves, as documented: the CRDs and the operator's leader Lease.
    for crd in ["trainingjobs.gputrainer.dev", "gpuinstances.gputrainer.dev"] {
        assert!(crds.get_opt(crd).await.unwrap().is_some(), "CRD {crd} after helm uninstall");
    }
    assert!(leases.get_opt("gpu-trainer-leader").await.unwrap().is_some(), "the leader Lease stays");
    assert_eq!(live_instances(&fake, "").await.len(), 0, "no machine is rented");
    assert!(instances.list(&ListParams::default()).await.unwrap().items.is_empty(), "no GpuInstance is left");

    // Nothing holds the namespace: it deletes.
    common::delete_namespace(&admin, &namespace).await;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    common::wait_until(Duration::from_secs(120), &format!("namespace {namespace} to be deleted"), || async {
        namespaces.get_opt(&namespace).await.unwrap().is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn helm3_install_job_upgrade_uninstall() {
    install_job_upgrade_uninstall(Helm::new(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn helm4_install_job_upgrade_uninstall() {
    install_job_upgrade_uninstall(Helm::new(4)).await;
}
