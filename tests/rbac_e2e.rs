//! The operator's RBAC, end to end: `kubectl apply -k config/default` installs the operator into
//! the real test API server; `gpu-trainer run` then runs as that ServiceAccount (a kubeconfig
//! holding a token the API server issued for the ServiceAccount through the TokenRequest API; not
//! the admin token) and takes a TrainingJob to `Succeeded`, and a
//! stand-alone GpuInstance to `Running` and back. The API server's audit log shows that every
//! permission of the installed roles was used by the ServiceAccount in that run.
//!
//! Then each permission is taken away in turn (one verb of one rule, bound to a fresh
//! ServiceAccount) and the same scenario is run until the API server refuses a request with 403
//! Forbidden: removing any one permission breaks the operator. A table says which request broke
//! and what the operator logged about it (with `--nocapture`; it is also written to
//! `$GPU_TRAINER_ENV_DIR/logs/rbac-mutants.txt`).
//!
//! One permission is not reached by the operator process in any deterministic scenario: `patch`
//! on events, which the kube-rs event recorder uses when the same event repeats (its key holds
//! the object's resourceVersion, and the operator's events come with status changes). Each run
//! therefore also drives the operator's own recorder (`Context::new`, as the account) to publish
//! one event twice.
//!
//! In the cluster the operator watches all namespaces from its Deployment; here it runs on the
//! host with `--namespace` (other tests run their own operators in the same API server), with
//! leader election on (as with several replicas) and without `--installation-id` (so the id is
//! derived from the kube-system namespace, as by default).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::account::{Account, client_from};
use common::dataset::serve_dataset;
use common::operator::{OperatorOptions, OperatorProcess, start_fake};
use futures::StreamExt;
use gpu_trainer::api::{GpuInstance, GpuInstancePhase, TrainingJob, TrainingJobPhase};
use gpu_trainer::provider::fake::FakeServer;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;

const INSTALL_NAMESPACE: &str = "gpu-trainer-system";
const ACCOUNT: &str = "gpu-trainer";
const CLUSTER_ROLE: &str = "gpu-trainer";
const LEASE_ROLE: &str = "gpu-trainer-leader-election";
const LEASE: &str = "gpu-trainer-leader";
/// Mutants run side by side, each with its own ServiceAccount, namespace and operator.
const PARALLEL_MUTANTS: usize = 4;
const BASELINE_TIMEOUT: Duration = Duration::from_secs(180);
const MUTANT_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Permissions

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum RoleKind {
    ClusterRole,
    Role,
}

/// One verb of one rule: what a mutant takes away.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Permission {
    role: RoleKind,
    rule: usize,
    group: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    name: Option<String>,
    verb: String,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() { String::new() } else { format!(".{}", self.group) };
        let name = self.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default();
        write!(f, "{} {}{group}{name}", self.verb, self.resource)
    }
}

fn permissions(role: RoleKind, rules: &[PolicyRule]) -> Vec<Permission> {
    let mut out = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        let names = rule.resource_names.clone().unwrap_or_default();
        assert!(
            groups.len() == 1 && resources.len() == 1 && names.len() <= 1,
            "rule {index} of the {role:?}: one group, one resource and at most one name per rule keep the proof simple"
        );
        for verb in &rule.verbs {
            out.push(Permission {
                role,
                rule: index,
                group: groups[0].clone(),
                resource: resources[0].clone(),
                name: names.first().cloned(),
                verb: verb.clone(),
            });
        }
    }
    out
}

/// `rules` without `removed` (a rule left without verbs is dropped).
fn rules_without(rules: &[PolicyRule], removed: Option<&Permission>) -> Vec<PolicyRule> {
    let mut out = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let mut rule = rule.clone();
        if let Some(p) = removed
            && p.rule == index
        {
            rule.verbs.retain(|v| v != &p.verb);
        }
        if !rule.verbs.is_empty() {
            out.push(rule);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The audit log of the test API server (ServiceAccount requests only, metadata level)

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent {
    verb: String,
    user: AuditUser,
    object_ref: Option<AuditObject>,
    response_status: Option<AuditStatus>,
    request_received_timestamp: DateTime<Utc>,
}

#[derive(Clone, Debug, Deserialize)]
struct AuditUser {
    username: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditObject {
    resource: Option<String>,
    subresource: Option<String>,
    api_group: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct AuditStatus {
    code: Option<u16>,
    message: Option<String>,
}

impl AuditEvent {
    fn code(&self) -> u16 {
        self.response_status.as_ref().and_then(|s| s.code).unwrap_or(0)
    }

    fn resource(&self) -> String {
        let o = self.object_ref.clone().unwrap_or_default();
        match (o.resource, o.subresource) {
            (Some(r), Some(s)) => format!("{r}/{s}"),
            (Some(r), None) => r,
            _ => String::new(),
        }
    }

    fn uses(&self, p: &Permission) -> bool {
        let o = self.object_ref.clone().unwrap_or_default();
        self.verb == p.verb
            && self.resource() == p.resource
            && o.api_group.unwrap_or_default() == p.group
            && p.name.as_ref().is_none_or(|n| o.name.as_ref() == Some(n))
    }

    fn describe(&self) -> String {
        let o = self.object_ref.clone().unwrap_or_default();
        let group = o.api_group.map(|g| format!(".{g}")).unwrap_or_default();
        let name = o.name.map(|n| format!(" {n}")).unwrap_or_default();
        let ns = o.namespace.map(|n| format!(" in {n}")).unwrap_or_default();
        let why = self.response_status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default();
        let why = if why.is_empty() { String::new() } else { format!(": {}", shorten(&why, 160)) };
        format!("{} {}{group}{name}{ns} -> {}{why}", self.verb, self.resource(), self.code())
    }
}

/// Reads the audit log as it grows; shared by the runs going on at the same time.
struct AuditLog {
    path: PathBuf,
    offset: u64,
    partial: String,
    events: Vec<AuditEvent>,
}

impl AuditLog {
    /// Starts at the end of the log: earlier requests are not ours.
    fn open() -> Self {
        let path = PathBuf::from(std::env::var("GPU_TRAINER_TEST_AUDIT_LOG").expect(
            "GPU_TRAINER_TEST_AUDIT_LOG is not set: run through tests/run.sh (tests/env/up.sh writes the audit log)",
        ));
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Self { path, offset, partial: String::new(), events: Vec::new() }
    }

    fn poll(&mut self) {
        let Ok(mut file) = std::fs::File::open(&self.path) else { return };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut text = String::new();
        let Ok(read) = file.read_to_string(&mut text) else { return };
        self.offset += read as u64;
        self.partial.push_str(&text);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            match serde_json::from_str::<AuditEvent>(line.trim()) {
                Ok(event) => self.events.push(event),
                Err(e) => panic!("unreadable audit event ({e}): {line}"),
            }
        }
    }

    /// Requests of `user` received at or after `since`.
    fn of(&self, user: &str, since: DateTime<Utc>) -> Vec<AuditEvent> {
        self.events
            .iter()
            .filter(|e| e.user.username == user && e.request_received_timestamp >= since)
            .cloned()
            .collect()
    }
}

type SharedAudit = Arc<Mutex<AuditLog>>;

fn audit_of(audit: &SharedAudit, user: &str, since: DateTime<Utc>) -> Vec<AuditEvent> {
    let mut log = audit.lock().unwrap();
    log.poll();
    log.of(user, since)
}

// ---------------------------------------------------------------------------------------------
// ServiceAccount credentials

/// Asks the API server (as admin) whether `user` may do `p`.
async fn allowed(client: &Client, user: &str, namespace: &str, p: &Permission) -> bool {
    let (resource, subresource) = match p.resource.split_once('/') {
        Some((r, s)) => (r.to_string(), Some(s.to_string())),
        None => (p.resource.clone(), None),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", user.split(':').nth(2).unwrap_or_default()),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                group: Some(p.group.clone()),
                resource: Some(resource),
                subresource,
                name: p.name.clone(),
                namespace: (p.resource != "namespaces").then(|| namespace.to_string()),
                verb: Some(p.verb.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = reviews.create(&PostParams::default(), &review).await.expect("SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

// ---------------------------------------------------------------------------------------------
// The scenario: a TrainingJob to Succeeded (and deleted by its TTL), a stand-alone GpuInstance to
// Running

fn job(href: &str, sha256: &str) -> TrainingJob {
    let mut job = common::demo_job("lora", href, sha256);
    job.spec.ttl_seconds_after_finished = Some(2);
    job
}

/// No `sshKeySecretRef`: the operator generates a key Secret owned by the GpuInstance.
fn standalone_instance() -> GpuInstance {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gputrainer.dev/v1alpha1",
        "kind": "GpuInstance",
        "metadata": {"name": "box"},
        "spec": {"image": "pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime", "maxLifetimeSeconds": 900}
    }))
    .unwrap()
}

struct Run {
    namespace: String,
    operator: OperatorProcess,
    _fake: FakeServer,
    started: DateTime<Utc>,
    /// Why publishing a repeated event as the account failed, if it did.
    repeated_event: Result<(), String>,
}

/// The operator's event recorder (built by `Context::new` as in `gpu-trainer run`), as `account`,
/// publishing the same event twice: the second becomes a patch of the first's series. No
/// scenario makes the operator itself repeat an event deterministically (the event key holds the
/// object's resourceVersion, and every event comes with a status change), so this drives it.
async fn publish_repeated_event(
    account: &Account,
    fake: &FakeServer,
    job: &TrainingJob,
) -> Result<(), String> {
    use gpu_trainer::controller::{Context, OperatorConfig};
    use gpu_trainer::machine::probe::RusshProbe;
    use kube::Resource;
    use kube::runtime::events::{Event, EventType};
    let client = client_from(&account.kubeconfig).await;
    let provider_config = gpu_trainer::provider::config::ProviderConfig::from_lookup(|name| match name {
        "VASTAI_API_KEY" => Some(common::operator::API_KEY.into()),
        "VASTAI_API_BASE_URL" => Some(fake.url()),
        _ => None,
    })
    .unwrap();
    let ctx = Context::new(
        client,
        Arc::new(common::operator::provider_client(fake)),
        provider_config,
        Arc::new(RusshProbe::default()),
        OperatorConfig::new("0a1b2c3d"),
        Arc::new(gpu_trainer::metrics::Metrics::new()),
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "RbacCheck".into(),
        note: Some("the same event twice".into()),
        action: "Check".into(),
        secondary: None,
    };
    let reference = job.object_ref(&());
    for attempt in ["first", "repeated"] {
        ctx.recorder.publish(&event, &reference).await.map_err(|e| format!("{attempt} event: {e}"))?;
    }
    Ok(())
}

/// Creates the job and the instance in `namespace` (as admin), then starts the operator as
/// `account`, leading through a Lease in the account's namespace.
async fn start_run(client: &Client, account: &Account, namespace: &str, dataset: &(String, String)) -> Run {
    let fake = start_fake(|_| {}).await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), namespace);
    let created = jobs.create(&PostParams::default(), &job(&dataset.0, &dataset.1)).await.unwrap();
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), namespace);
    instances.create(&PostParams::default(), &standalone_instance()).await.unwrap();
    let base = common::env_dir().join("work").join(namespace);
    std::fs::create_dir_all(&base).unwrap();
    let mut options = OperatorOptions::new(namespace, &fake, "");
    options.leader_elect = true;
    options.lease_namespace = Some(account.namespace.clone());
    options.kubeconfig = Some(account.kubeconfig.clone());
    options.env =
        vec![("POD_NAMESPACE", account.namespace.clone()), ("POD_NAME", format!("gpu-trainer-{namespace}"))];
    options.args = vec!["--remote-base".into(), base.display().to_string()];
    // Same clock as the API server's audit timestamps: every request of the operator comes after.
    let started = Utc::now();
    let operator = OperatorProcess::start(&options);
    let repeated_event = publish_repeated_event(account, &fake, &created).await;
    Run { namespace: namespace.to_string(), operator, _fake: fake, started, repeated_event }
}

/// How far a run got.
#[derive(Default, Debug)]
struct Progress {
    job_succeeded: bool,
    job_deleted_after_success: bool,
    job_instance_deleted: bool,
    box_running: bool,
}

impl Progress {
    fn done(&self) -> bool {
        self.job_succeeded && self.job_deleted_after_success && self.job_instance_deleted && self.box_running
    }
}

async fn observe(client: &Client, namespace: &str, progress: &mut Progress) {
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), namespace);
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), namespace);
    match jobs.get_opt("lora").await.unwrap() {
        Some(job) => {
            let phase = job.status.map(|s| s.phase).unwrap_or_default();
            progress.job_succeeded |= phase == TrainingJobPhase::Succeeded;
        }
        None => progress.job_deleted_after_success |= progress.job_succeeded,
    }
    if progress.job_succeeded {
        progress.job_instance_deleted |= instances.get_opt("lora-1").await.unwrap().is_none();
    }
    if let Some(instance) = instances.get_opt("box").await.unwrap() {
        progress.box_running |= instance.status.is_some_and(|s| s.phase == GpuInstancePhase::Running);
    }
}

/// Operator log lines that name a refused request, without colours and timestamps, cut to the
/// message and the words around "forbidden".
fn forbidden_lines(operator: &OperatorProcess) -> Vec<String> {
    let ansi = regex::Regex::new(r"\x1b\[[0-9;]*m").unwrap();
    let text = std::fs::read_to_string(&operator.log).unwrap_or_default();
    text.lines()
        .map(|l| ansi.replace_all(l, "").into_owned())
        .filter(|l| l.to_ascii_lowercase().contains("forbidden"))
        .map(|l| {
            // Pretty format: `<timestamp> <LEVEL> <target>: <message> <fields>`.
            let l = l.split_once(' ').map_or(l.as_str(), |(_, rest)| rest).trim().to_string();
            let at = l.to_ascii_lowercase().find("forbidden").unwrap_or(0);
            if l.len() <= 200 || at < 100 {
                return shorten(&l, 200);
            }
            let head: String = l.chars().take(80).collect();
            let from = (0..=at - 60).rev().find(|i| l.is_char_boundary(*i)).unwrap_or(0);
            format!("{head} ... {}", shorten(&l[from..], 120))
        })
        .collect()
}

fn shorten(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.chars().count() <= max {
        return text.to_string();
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}...")
}

/// Releases what a run left behind: the operator, the finalizers it can no longer remove, the
/// namespace.
async fn clean_up(client: &Client, mut run: Run) {
    run.operator.kill();
    let instances: Api<GpuInstance> = Api::namespaced(client.clone(), &run.namespace);
    for instance in instances.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
        let patch = serde_json::json!({"metadata": {"finalizers": null}});
        let _ = instances.patch(&instance.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await;
    }
    common::delete_namespace(client, &run.namespace).await;
}

// ---------------------------------------------------------------------------------------------
// Installing config/default and reading its roles back

async fn install_kustomize_base(client: &Client) -> (Vec<PolicyRule>, Vec<PolicyRule>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/default");
    common::kubectl(&["apply", "-k", dir.to_str().unwrap()]);
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let roles: Api<Role> = Api::namespaced(client.clone(), INSTALL_NAMESPACE);
    let cluster_rules = cluster_roles.get(CLUSTER_ROLE).await.expect("ClusterRole installed").rules.unwrap();
    let lease_rules = roles.get(LEASE_ROLE).await.expect("leader-election Role installed").rules.unwrap();
    (cluster_rules, lease_rules)
}

/// A ServiceAccount in `namespace` with the given rules: a ClusterRole bound cluster-wide and a
/// Role in `namespace` (for the Lease), shaped like config/default.
async fn bind_account(
    client: &Client,
    namespace: &str,
    cluster_rules: Vec<PolicyRule>,
    lease_rules: Vec<PolicyRule>,
) {
    let pp = PostParams::default();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ACCOUNT}})).unwrap();
    accounts.create(&pp, &account).await.unwrap();
    let subject = serde_json::json!([{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": namespace}]);
    let name = format!("rbac-mutant-{namespace}");
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let mut cluster_role: ClusterRole =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    cluster_role.rules = Some(cluster_rules);
    cluster_roles.create(&pp, &cluster_role).await.unwrap();
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let binding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": subject,
    }))
    .unwrap();
    bindings.create(&pp, &binding).await.unwrap();
    let roles: Api<Role> = Api::namespaced(client.clone(), namespace);
    let mut role: Role =
        serde_json::from_value(serde_json::json!({"metadata": {"name": LEASE_ROLE}})).unwrap();
    role.rules = Some(lease_rules);
    roles.create(&pp, &role).await.unwrap();
    let role_bindings: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
    let role_binding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": LEASE_ROLE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LEASE_ROLE},
        "subjects": subject,
    }))
    .unwrap();
    role_bindings.create(&pp, &role_binding).await.unwrap();
}

async fn unbind_account(client: &Client, namespace: &str) {
    let name = format!("rbac-mutant-{namespace}");
    let _ = Api::<ClusterRoleBinding>::all(client.clone()).delete(&name, &DeleteParams::default()).await;
    let _ = Api::<ClusterRole>::all(client.clone()).delete(&name, &DeleteParams::default()).await;
}

// ---------------------------------------------------------------------------------------------
// The tests

/// What one mutant run showed.
struct Verdict {
    removed: Permission,
    forbidden: Option<AuditEvent>,
    operator_log: Option<String>,
    progress: Progress,
    exited: bool,
}

async fn run_mutant(
    client: Client,
    audit: SharedAudit,
    dataset: Arc<(String, String)>,
    all: Arc<(Vec<PolicyRule>, Vec<PolicyRule>, Vec<Permission>)>,
    removed: Permission,
) -> Verdict {
    let (cluster_rules, lease_rules, permissions) = &*all;
    let namespace = common::fresh_namespace(&client, "rbac-m").await;
    let (cluster, lease) = match removed.role {
        RoleKind::ClusterRole => (rules_without(cluster_rules, Some(&removed)), lease_rules.clone()),
        RoleKind::Role => (cluster_rules.clone(), rules_without(lease_rules, Some(&removed))),
    };
    bind_account(&client, &namespace, cluster, lease).await;
    let account = common::account::service_account_kubeconfig(
        &client,
        &namespace,
        ACCOUNT,
        &common::env_dir().join("rbac"),
    )
    .await;
    // The authorizer's cache follows the new bindings within moments; start only once it says
    // what the roles say, so that a refusal can only come from the removed permission.
    common::wait_until(Duration::from_secs(30), "RBAC to take effect for the mutant", || {
        let (client, account, namespace, removed) = (&client, &account, &namespace, &removed);
        async move {
            for p in permissions.iter() {
                if allowed(client, &account.user, namespace, p).await != (p != removed) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;

    let mut run = start_run(&client, &account, &namespace, &dataset).await;
    let deadline = tokio::time::Instant::now() + MUTANT_TIMEOUT;
    let mut progress = Progress::default();
    let mut forbidden: Option<AuditEvent> = None;
    let mut exited = false;
    let operator_log = loop {
        if forbidden.is_none() {
            forbidden = audit_of(&audit, &account.user, run.started).into_iter().find(|e| e.code() == 403);
        }
        if let Some(seen) = &forbidden {
            // Give the operator a moment to log what it made of the refusal; only when it never
            // does, the error of the recorder driven by this test names it.
            let waited = Utc::now() - seen.request_received_timestamp;
            let logged = forbidden_lines(&run.operator).into_iter().next().or_else(|| {
                let recorder = run.repeated_event.clone().err();
                recorder
                    .filter(|_| waited > chrono::Duration::seconds(10))
                    .map(|e| format!("(recorder in the test) {e}"))
            });
            if logged.is_some() || waited > chrono::Duration::seconds(20) {
                break logged;
            }
        } else {
            observe(&client, &namespace, &mut progress).await;
            if progress.done() || tokio::time::Instant::now() >= deadline {
                break Some(run.operator.log_tail().replace('\n', " | "));
            }
        }
        exited |= !run.operator.is_running();
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    clean_up(&client, run).await;
    unbind_account(&client, &namespace).await;
    Verdict { removed, forbidden, operator_log, progress, exited }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn the_installed_rbac_is_enough_and_every_permission_is_needed() {
    let admin = common::kube_client().await;
    let (cluster_rules, lease_rules) = install_kustomize_base(&admin).await;
    let mut all_permissions = permissions(RoleKind::ClusterRole, &cluster_rules);
    all_permissions.extend(permissions(RoleKind::Role, &lease_rules));
    let audit: SharedAudit = Arc::new(Mutex::new(AuditLog::open()));
    let tmp = tempfile::tempdir().unwrap();
    let dataset = serve_dataset(tmp.path()).await;

    // --- The operator as the installed ServiceAccount, not as admin.
    let account = common::account::service_account_kubeconfig(
        &admin,
        INSTALL_NAMESPACE,
        ACCOUNT,
        &common::env_dir().join("rbac"),
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let _ = leases.delete(LEASE, &DeleteParams::default()).await;
    let namespace = common::fresh_namespace(&admin, "rbac-ok").await;
    let run = start_run(&admin, &account, &namespace, &dataset).await;
    let deadline = tokio::time::Instant::now() + BASELINE_TIMEOUT;
    let mut progress = Progress::default();
    while !progress.done() {
        observe(&admin, &namespace, &mut progress).await;
        let refused: Vec<String> = audit_of(&audit, &account.user, run.started)
            .iter()
            .filter(|e| e.code() == 403)
            .map(AuditEvent::describe)
            .collect();
        assert!(
            refused.is_empty(),
            "requests refused: {refused:#?}\noperator log:\n{}",
            run.operator.log_tail()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job did not succeed as the ServiceAccount: {progress:?}\noperator log:\n{}",
            run.operator.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Releasing a machine works as the ServiceAccount too.
    let instances: Api<GpuInstance> = Api::namespaced(admin.clone(), &namespace);
    instances.delete("box", &DeleteParams::default()).await.unwrap();
    common::wait_until(Duration::from_secs(60), "GpuInstance box to be released and deleted", || async {
        instances.get_opt("box").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(run.repeated_event, Ok(()), "a repeated event as the ServiceAccount");
    // Watches are audited when they end.
    let mut run = run;
    run.operator.terminate();
    let _ = run.operator.wait_exit(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = audit_of(&audit, &account.user, run.started);
    assert!(events.iter().all(|e| e.code() != 403), "a request was refused");
    // Every permission appears as a request. (Should `update */finalizers` ever be needed, for
    // owner references that block the owner's deletion, it would not: the
    // OwnerReferencesPermissionEnforcement admission plugin, which the test API server runs, asks
    // the authorizer for it inside another request. Only the mutants below would show it.)
    let unused: Vec<String> = all_permissions
        .iter()
        .filter(|p| !events.iter().any(|e| e.uses(p) && e.code() < 400))
        .map(|p| p.to_string())
        .collect();
    let requests: BTreeSet<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {}{}",
                e.verb,
                e.resource(),
                e.object_ref
                    .as_ref()
                    .and_then(|o| o.api_group.clone())
                    .map(|g| format!(".{g}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    assert!(
        unused.is_empty(),
        "permissions the ServiceAccount never used in a successful run: {unused:?}\nrequests it made: {requests:#?}"
    );
    clean_up(&admin, run).await;
    // The credential really is the ServiceAccount's, not the admin's.
    let as_account = client_from(&account.kubeconfig).await;
    match Api::<Pod>::all(as_account).list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("the ServiceAccount should not list pods; got {other:?}"),
    }

    // --- Take each permission away in turn.
    let shared = Arc::new((cluster_rules, lease_rules, all_permissions.clone()));
    let dataset = Arc::new(dataset);
    let verdicts: Vec<Verdict> = futures::stream::iter(all_permissions.clone())
        .map(|p| run_mutant(admin.clone(), audit.clone(), dataset.clone(), shared.clone(), p))
        .buffer_unordered(PARALLEL_MUTANTS)
        .collect()
        .await;
    let mut verdicts = verdicts;
    verdicts.sort_by(|a, b| a.removed.cmp(&b.removed));

    let mut table =
        String::from("\nremoved permission | first refused request (audit log) | what the operator logged\n");
    let mut survivors = Vec::new();
    let mut unrelated = Vec::new();
    for v in &verdicts {
        let refused = v.forbidden.as_ref().map(AuditEvent::describe);
        let logged = v.operator_log.as_deref().map(|l| shorten(l, 220)).unwrap_or_else(|| "(nothing)".into());
        table.push_str(&format!(
            "{} | {} | {}{}\n",
            v.removed,
            refused.clone().unwrap_or_else(|| format!("none; progress {:?}", v.progress)),
            logged,
            if v.exited { " [operator exited]" } else { "" }
        ));
        match &v.forbidden {
            None => survivors.push(v.removed.to_string()),
            // Authorization is per verb and resource: the refusal must be of the removed one.
            Some(event) if !event.uses(&v.removed) => unrelated.push(v.removed.to_string()),
            Some(_) => {}
        }
    }
    println!("{table}");
    let _ = std::fs::write(common::env_dir().join("logs").join("rbac-mutants.txt"), &table);
    assert!(survivors.is_empty(), "the operator worked without these permissions: {survivors:?}\n{table}");
    assert!(
        unrelated.is_empty(),
        "refused requests that the removed permission does not explain: {unrelated:?}\n{table}"
    );
    let silent: Vec<String> =
        verdicts.iter().filter(|v| v.operator_log.is_none()).map(|v| v.removed.to_string()).collect();
    assert!(silent.is_empty(), "the operator's log does not name the refusal for: {silent:?}\n{table}");
}
