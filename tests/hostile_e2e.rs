//! A hostile or broken machine cannot hang, flood or crash the operator (issue #15), end to end:
//! `gpu-trainer run` as a real process, the real API server, `fake-vastai` (in this process)
//! whose machines' SSH goes to a hostile server under the test's control
//! (`gpu_trainer::remote::hostile`), `demo@1` as the trainer.
//!
//! For every way the machine misbehaves ([`Mode`]), met by the GpuInstance probe (from the first
//! exec), during staging (after the probe) or during training: with `backoffLimit: 0` and a boot
//! timeout of 40 s the operator stays up, its peak memory stays under 256 MiB, the job ends
//! `Failed` with a message naming what the machine did, and the provider no longer lists the
//! machine, all within the boot timeout plus 60 s. With `backoffLimit: 1` the job gets a second,
//! good machine and succeeds. Deleting a job whose machine hangs releases the machine within
//! 30 s. A hanging machine does not delay another job. A machine reporting thousands of
//! checkpoints with hostile names is refused.
//!
//! The "machine" is this machine: the hostile server runs commands as this user, so a job's work
//! dir is a folder under the operator's `--remote-base`, which the tests read and write.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::dataset::serve_dataset;
use common::operator::{
    OperatorOptions, OperatorProcess, installation_id, live_instances, ssh_env, start_fake,
};
use gpu_trainer::api::{GpuInstance, TrainingJob, TrainingJobPhase, TrainingJobStatus};
use gpu_trainer::provider::fake::FakeServer;
use gpu_trainer::remote::hostile::{Authorized, Counters, HostileConfig, HostileServer, Mode};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tokio::time::Instant;

/// The boot timeout the operator is started with (`--boot-timeout-seconds`).
const BOOT_TIMEOUT_SECS: u64 = 40;
/// A misbehaving machine's job is failed and the machine released within this long.
const VERDICT_LIMIT: Duration = Duration::from_secs(BOOT_TIMEOUT_SECS + 60);
/// Deleting a job whose machine hangs releases the machine within this long.
const DELETE_LIMIT: Duration = Duration::from_secs(30);
/// A job on a good machine (or a replacement after a bad one) succeeds within this long.
const SUCCESS_LIMIT: Duration = Duration::from_secs(BOOT_TIMEOUT_SECS + 60 + 90);
/// The operator's peak resident memory stays under this.
const PEAK_MEMORY_LIMIT: u64 = 256 << 20;

// ---------------------------------------------------------------------------------------------
// The operator's memory.

/// Peak resident memory (`VmHWM`) of a process, in bytes.
fn peak_memory(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// True while the process runs (a child that exited and was not waited for is a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("State:") && !l.contains("zombie")))
}

/// The operator's log without its debug lines and colours: what a failure message needs.
fn log_summary(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let plain = regex::Regex::new("\x1b\\[[0-9;]*m").unwrap().replace_all(&text, "").into_owned();
    let lines: Vec<&str> = plain.lines().filter(|l| !l.contains(" DEBUG ")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Samples the operator's peak memory while the test runs. An operator past the limit is
/// killed at once (the test fails on it): a flood must not take this shared machine down too.
struct MemoryWatch {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl MemoryWatch {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let seen = peak.clone();
        let task = tokio::spawn(async move {
            while let Some(bytes) = peak_memory(pid) {
                seen.fetch_max(bytes, Ordering::SeqCst);
                if bytes >= PEAK_MEMORY_LIMIT {
                    let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { peak, task }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// One test's world.

/// When the machine starts to misbehave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// From its first exec request: the GpuInstance probe meets it.
    FirstExec,
    /// After the probe's one exec: staging meets it.
    AfterProbe,
    /// Once the job is `Training`: the monitor's polls meet it.
    InTraining,
}

/// Where the rented machines' SSH goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Machines {
    /// Every machine is the hostile server.
    AllHostile,
    /// The first machine is the hostile server, every later one the good test sshd.
    HostileThenGood,
    /// Every machine is the good test sshd (the hostile server is there but unused).
    AllGood,
}

struct HostileTest {
    client: kube::Client,
    ns: String,
    fake: FakeServer,
    installation: String,
    operator: OperatorProcess,
    memory: MemoryWatch,
    base: PathBuf,
    hostile: HostileServer,
    href: String,
    sha256: String,
    jobs: Api<TrainingJob>,
    instances: Api<GpuInstance>,
    _dataset_dir: tempfile::TempDir,
}

impl HostileTest {
    async fn start(prefix: &str, mode: Mode, start: Start, machines: Machines) -> Self {
        let client = common::kube_client().await;
        common::install_crds(&client).await;
        let ns = common::fresh_namespace(&client, prefix).await;
        let ssh = ssh_env();
        let config = HostileConfig {
            // A mode meant for later starts as Normal; `begin` switches it on.
            mode: if start == Start::InTraining { Mode::Normal } else { mode },
            normal_execs_first: if start == Start::AfterProbe { 1 } else { 0 },
            ..HostileConfig::new(Authorized::File(ssh.authorized_keys.clone()))
        };
        let hostile = HostileServer::start(config).await.expect("the hostile SSH server starts");
        let endpoints = match machines {
            Machines::AllHostile => vec![hostile.port()],
            Machines::HostileThenGood => vec![hostile.port(), ssh.port],
            Machines::AllGood => vec![ssh.port],
        };
        let fake = start_fake(|c| c.ssh_endpoints = endpoints).await;
        let installation = installation_id();
        let base = common::env_dir().join("work").join(&ns);
        std::fs::create_dir_all(&base).unwrap();
        let mut options = OperatorOptions::new(&ns, &fake, &installation);
        options.args = vec![
            "--remote-base".into(),
            base.display().to_string(),
            "--boot-timeout-seconds".into(),
            BOOT_TIMEOUT_SECS.to_string(),
        ];
        let operator = OperatorProcess::start(&options);
        let memory = MemoryWatch::start(operator.pid());
        let dataset_dir = tempfile::tempdir().unwrap();
        let (href, sha256) = serve_dataset(dataset_dir.path()).await;
        HostileTest {
            jobs: Api::namespaced(client.clone(), &ns),
            instances: Api::namespaced(client.clone(), &ns),
            client,
            ns,
            fake,
            installation,
            operator,
            memory,
            base,
            hostile,
            href,
            sha256,
            _dataset_dir: dataset_dir,
        }
    }

    fn label_prefix(&self) -> String {
        format!("gputrainer:{}:", self.installation)
    }

    fn job(&self, name: &str, params: serde_json::Value, backoff_limit: i32) -> TrainingJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gputrainer.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": name},
            "spec": {
                "tool": "demo@1",
                "params": params,
                "dataset": {"url": {"href": self.href, "sha256": self.sha256}},
                "activeDeadlineSeconds": 900,
                "backoffLimit": backoff_limit,
                "monitoring": {"pollIntervalSeconds": 5}
            }
        }))
        .unwrap()
    }

    async fn create(&self, name: &str, params: serde_json::Value, backoff_limit: i32) {
        self.jobs.create(&PostParams::default(), &self.job(name, params, backoff_limit)).await.unwrap();
    }

    /// Everything a failure message needs: the job's status (its checkpoint list cut short),
    /// the machines, the hostile server, the operator's log.
    async fn story(&self, name: &str) -> String {
        let mut status = self.jobs.get_opt(name).await.ok().flatten().and_then(|j| j.status);
        if let Some(status) = status.as_mut()
            && status.checkpoints.len() > 5
        {
            let total = status.checkpoints.len();
            status.checkpoints.truncate(5);
            status.message = Some(format!(
                "{} [{total} checkpoints in status]",
                status.message.clone().unwrap_or_default()
            ));
        }
        let instances: Vec<String> = self
            .instances
            .list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .map(|gi| {
                        let s = gi.status.clone().unwrap_or_default();
                        format!(
                            "{} {:?} {:?}: {}",
                            gi.name_any(),
                            s.phase,
                            s.reason,
                            s.message.unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "job status: {status:#?}\nGpuInstances: {instances:#?}\nhostile server: {:?} {:?}\nprovider: {:?}\noperator log:\n{}",
            self.hostile.mode(),
            self.hostile.counters(),
            live_instances(&self.fake, &self.label_prefix()).await.iter().map(|i| i.id).collect::<Vec<_>>(),
            log_summary(&self.operator.log)
        )
    }

    /// Fails the test at once when the operator is down or past the memory limit.
    async fn check_operator(&self, name: &str) {
        let peak = self.memory.peak();
        if peak >= PEAK_MEMORY_LIMIT {
            panic!(
                "the operator's peak memory reached {} MiB (limit {} MiB); it was killed\n{}",
                peak >> 20,
                PEAK_MEMORY_LIMIT >> 20,
                self.story(name).await
            );
        }
        if !alive(self.operator.pid()) {
            panic!("the operator exited\n{}", self.story(name).await);
        }
    }

    /// Waits until job `name` is in a phase that `done` accepts, at most until `deadline`.
    async fn wait_job(
        &self,
        name: &str,
        deadline: Instant,
        what: &str,
        done: impl Fn(&TrainingJobStatus) -> bool,
    ) -> TrainingJob {
        loop {
            if let Ok(Some(job)) = self.jobs.get_opt(name).await
                && done(&job.status.clone().unwrap_or_default())
            {
                return job;
            }
            self.check_operator(name).await;
            if Instant::now() >= deadline {
                panic!("{name}: {what} did not happen in time\n{}", self.story(name).await);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_finished(&self, name: &str, deadline: Instant) -> TrainingJob {
        self.wait_job(name, deadline, "finishing", |s| s.phase.is_finished()).await
    }

    /// Waits until the provider lists none of this test's machines, at most until `deadline`.
    async fn wait_released(&self, name: &str, deadline: Instant) {
        loop {
            if live_instances(&self.fake, &self.label_prefix()).await.is_empty() {
                return;
            }
            self.check_operator(name).await;
            if Instant::now() >= deadline {
                panic!("{name}: the machine was not released in time\n{}", self.story(name).await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the hostile server's counters satisfy `met` (the misbehaviour is under way).
    async fn wait_hostile(&self, what: &str, met: impl Fn(&Counters) -> bool) {
        let deadline = Instant::now() + SUCCESS_LIMIT;
        while !met(&self.hostile.counters()) {
            self.check_operator(what).await;
            if Instant::now() >= deadline {
                panic!(
                    "the hostile server never saw {what}: {:?}\n{}",
                    self.hostile.counters(),
                    self.story("-").await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The operator is still up and its peak memory stayed under the limit.
    fn assert_held_up(&mut self) {
        let peak = self.memory.peak().max(peak_memory(self.operator.pid()).unwrap_or(0));
        assert!(
            peak < PEAK_MEMORY_LIMIT,
            "the operator's peak memory was {} MiB (limit {} MiB); it was killed\n{}",
            peak >> 20,
            PEAK_MEMORY_LIMIT >> 20,
            log_summary(&self.operator.log)
        );
        assert!(self.operator.is_running(), "the operator exited:\n{}", log_summary(&self.operator.log));
    }

    /// Events in the namespace: (object, type, reason, note).
    async fn events(&self) -> Vec<(String, String, String, String)> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        api.list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .map(|e| {
                (
                    e.regarding.and_then(|r| r.name).unwrap_or_default(),
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Stops trainers left running in the job's work dir and deletes the namespace.
    async fn finish(self, job_names: &[&str]) {
        for name in job_names {
            if let Ok(Some(job)) = self.jobs.get_opt(name).await {
                common::kill_trainer(&self.base.join(job.uid().unwrap_or_default()));
            }
        }
        for name in job_names {
            let _ = self.jobs.delete(name, &DeleteParams::background()).await;
        }
        common::delete_namespace(&self.client, &self.ns).await;
    }
}

/// Switches the hostile mode on once the job trains (for [`Start::InTraining`]). Returns the
/// server's counters from the moment the mode took effect, for [`met`].
async fn begin(t: &HostileTest, name: &str, mode: Mode, start: Start, deadline: Instant) -> Counters {
    if start != Start::InTraining {
        return Counters::default();
    }
    t.wait_job(name, deadline, "training", |s| {
        s.phase == TrainingJobPhase::Training || s.phase.is_finished()
    })
    .await;
    let before = t.hostile.counters();
    t.hostile.set_mode(mode);
    before
}

/// Words of which the job's message must contain one: what the machine did, in plain terms.
fn what_it_did(mode: Mode) -> &'static [&'static str] {
    match mode {
        Mode::HangOnChannelOpen | Mode::HangOnExec | Mode::HangAfterExec => {
            &["did not answer", "timed out", "unresponsive", "not reachable", "no answer"]
        }
        Mode::StallKeyExchange => {
            &["did not answer", "timed out", "unresponsive", "not reachable", "handshake"]
        }
        Mode::FloodOutput => &["output", "exceeded"],
        Mode::EndlessLine => &["line", "output", "exceeded"],
        Mode::ChangeHostKey => &["host key"],
        Mode::Normal => &[],
    }
}

/// The hostile server saw the misbehaviour happen since `before` (the counters when the mode
/// took effect): the test met what it meant to.
fn met(mode: Mode, start: Start, before: &Counters, now: &Counters) -> bool {
    // After the probe, its one connection and exec were still served normally.
    let normal = u64::from(start == Start::AfterProbe);
    let hangs = matches!(mode, Mode::HangOnChannelOpen | Mode::HangOnExec | Mode::HangAfterExec);
    if start == Start::InTraining && hangs {
        // The machine froze under the running SFTP session: a request reached it since.
        return now.bytes_received > before.bytes_received;
    }
    match mode {
        Mode::HangOnChannelOpen => now.channel_opens > before.channel_opens + normal,
        Mode::StallKeyExchange => now.connections > before.connections + normal,
        Mode::ChangeHostKey => now.connections >= 2,
        _ => now.exec_requests > before.exec_requests + normal,
    }
}

// ---------------------------------------------------------------------------------------------
// The verdict on a misbehaving machine, backoffLimit 0.

/// Runs a job on a machine misbehaving in `mode` from `start` and checks the verdict; returns
/// the test for further checks.
async fn a_hostile_machine_fails_the_job(mode: Mode, start: Start) -> HostileTest {
    let mut t = HostileTest::start(&prefix("hostile", mode, start), mode, start, Machines::AllHostile).await;
    let created = Instant::now();
    let deadline = created + VERDICT_LIMIT;
    t.create("bad", serde_json::json!({"steps": 200, "secondsPerStep": 0.25}), 0).await;
    let before = begin(&t, "bad", mode, start, deadline).await;
    let switched = Instant::now();
    // In training the clock starts when the machine turns bad.
    let deadline = if start == Start::InTraining { switched + VERDICT_LIMIT } else { deadline };

    let failed = t.wait_finished("bad", deadline).await;
    let status = failed.status.clone().unwrap_or_default();
    assert_eq!(status.phase, TrainingJobPhase::Failed, "{}", t.story("bad").await);
    let message = status.message.clone().unwrap_or_default().to_lowercase();
    let words = what_it_did(mode);
    assert!(
        words.iter().any(|w| message.contains(w)),
        "the message does not say what the machine did ({mode:?}: one of {words:?}): {message:?}\n{}",
        t.story("bad").await
    );
    assert!(
        met(mode, start, &before, &t.hostile.counters()),
        "{mode:?} was not met: {:?}",
        t.hostile.counters()
    );
    t.wait_released("bad", deadline).await;
    t.assert_held_up();
    t
}

/// A namespace prefix naming the case (a DNS label).
fn prefix(kind: &str, mode: Mode, start: Start) -> String {
    let short = |d: String| d.to_lowercase().chars().take(14).collect::<String>();
    format!("{kind}-{}-{}", short(format!("{mode:?}")), short(format!("{start:?}")))
}

macro_rules! verdict {
    ($($name:ident: $mode:ident, $start:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "needs tests/ environment"]
        async fn $name() {
            a_hostile_machine_fails_the_job(Mode::$mode, Start::$start).await.finish(&["bad"]).await;
        }
    )*};
}

verdict! {
    the_probe_meets_a_hang_on_channel_open: HangOnChannelOpen, FirstExec;
    the_probe_meets_a_hang_on_exec: HangOnExec, FirstExec;
    the_probe_meets_a_hang_after_exec: HangAfterExec, FirstExec;
    the_probe_meets_a_flood_of_output: FloodOutput, FirstExec;
    the_probe_meets_an_endless_line: EndlessLine, FirstExec;
    the_probe_meets_a_stalled_key_exchange: StallKeyExchange, FirstExec;
    staging_meets_a_hang_on_channel_open: HangOnChannelOpen, AfterProbe;
    staging_meets_a_hang_on_exec: HangOnExec, AfterProbe;
    staging_meets_a_hang_after_exec: HangAfterExec, AfterProbe;
    staging_meets_a_flood_of_output: FloodOutput, AfterProbe;
    staging_meets_an_endless_line: EndlessLine, AfterProbe;
    staging_meets_a_stalled_key_exchange: StallKeyExchange, AfterProbe;
    training_meets_a_hang_on_channel_open: HangOnChannelOpen, InTraining;
    training_meets_a_hang_after_exec: HangAfterExec, InTraining;
    training_meets_a_flood_of_output: FloodOutput, InTraining;
}

/// The host key changes from the job's connection on (the probe's was the first): the job fails
/// at once, and a Warning event names the old and the new fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_changed_host_key_fails_the_job_naming_both_fingerprints() {
    let mut t = a_hostile_machine_fails_the_job(Mode::ChangeHostKey, Start::FirstExec).await;
    let (old, new) =
        (t.hostile.host_key_fingerprint().to_string(), t.hostile.other_host_key_fingerprint().to_string());
    let events = t.events().await;
    assert!(
        events
            .iter()
            .any(|(_, type_, _, note)| type_ == "Warning" && note.contains(&old) && note.contains(&new)),
        "no Warning event names both fingerprints ({old}, {new}): {events:#?}"
    );
    t.assert_held_up();
    t.finish(&["bad"]).await;
}

// ---------------------------------------------------------------------------------------------
// backoffLimit 1: a second, good machine, and success.

async fn a_hostile_machine_is_replaced_by_a_good_one(mode: Mode, start: Start) {
    let mut t =
        HostileTest::start(&prefix("replace", mode, start), mode, start, Machines::HostileThenGood).await;
    t.create("again", serde_json::json!({"steps": 12, "secondsPerStep": 0.25, "saveEvery": 5}), 1).await;
    let deadline = Instant::now() + SUCCESS_LIMIT;
    let before = begin(&t, "again", mode, start, deadline).await;
    // The first machine goes (its GpuInstance is deleted before the replacement is created). A
    // trainer it started on "the machine" (this machine, the same work dir) dies with it, as on
    // a real one, before the replacement can get as far as launching.
    loop {
        let first_gone = t.instances.get_opt("again-1").await.ok().flatten().is_none();
        let second = t.instances.get_opt("again-2").await.ok().flatten().is_some();
        if first_gone || second || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Ok(Some(job)) = t.jobs.get_opt("again").await {
        common::kill_trainer(&t.base.join(job.uid().unwrap_or_default()));
    }
    let done = t.wait_finished("again", deadline).await;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{}", t.story("again").await);
    assert_eq!(status.attempts, 2, "{}", t.story("again").await);
    assert_eq!(status.instance.as_ref().map(|i| i.name.as_str()), Some("again-2"));
    assert!(
        met(mode, start, &before, &t.hostile.counters()),
        "{mode:?} was not met: {:?}",
        t.hostile.counters()
    );
    let creates = t.fake.requests().iter().filter(|r| r.endpoint == "create_instance").count();
    assert_eq!(creates, 2, "one bad machine, one good one");
    t.wait_released("again", Instant::now() + VERDICT_LIMIT).await;
    t.assert_held_up();
    t.finish(&["again"]).await;
}

macro_rules! replaced {
    ($($name:ident: $mode:ident, $start:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "needs tests/ environment"]
        async fn $name() {
            a_hostile_machine_is_replaced_by_a_good_one(Mode::$mode, Start::$start).await;
        }
    )*};
}

replaced! {
    with_backoff_a_machine_hanging_in_the_probe_is_replaced: HangOnChannelOpen, FirstExec;
    with_backoff_a_machine_stalling_the_key_exchange_is_replaced: StallKeyExchange, FirstExec;
    with_backoff_a_machine_hanging_in_staging_is_replaced: HangAfterExec, AfterProbe;
    with_backoff_a_flooding_machine_is_replaced: FloodOutput, AfterProbe;
    with_backoff_a_machine_with_a_new_host_key_is_replaced: ChangeHostKey, FirstExec;
}

// ---------------------------------------------------------------------------------------------
// Deleting a job whose machine hangs.

async fn deleting_a_job_releases_its_hanging_machine(mode: Mode, start: Start) {
    let mut t = HostileTest::start(&prefix("delete", mode, start), mode, start, Machines::AllHostile).await;
    t.create("stuck", serde_json::json!({"steps": 2000, "secondsPerStep": 0.25}), 0).await;
    let before = begin(&t, "stuck", mode, start, Instant::now() + SUCCESS_LIMIT).await;
    t.wait_hostile("the misbehaviour", |c| met(mode, start, &before, c)).await;
    // Let the operator get properly stuck in it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !live_instances(&t.fake, &t.label_prefix()).await.is_empty(),
        "the machine should still be rented here\n{}",
        t.story("stuck").await
    );
    t.jobs.delete("stuck", &DeleteParams::background()).await.unwrap();
    let deleted = Instant::now();
    t.wait_released("stuck", deleted + DELETE_LIMIT).await;
    t.assert_held_up();
    t.finish(&["stuck"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn deleting_a_job_whose_machine_hangs_in_the_probe_releases_it_within_30_s() {
    deleting_a_job_releases_its_hanging_machine(Mode::HangOnChannelOpen, Start::FirstExec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn deleting_a_job_whose_machine_hangs_in_staging_releases_it_within_30_s() {
    deleting_a_job_releases_its_hanging_machine(Mode::HangAfterExec, Start::AfterProbe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn deleting_a_job_whose_machine_hangs_in_training_releases_it_within_30_s() {
    deleting_a_job_releases_its_hanging_machine(Mode::HangOnChannelOpen, Start::InTraining).await;
}

// ---------------------------------------------------------------------------------------------
// One bad host does not delay others.

async fn a_hanging_machine_does_not_delay_another_job(mode: Mode, start: Start) {
    let mut t =
        HostileTest::start(&prefix("neighbour", mode, start), mode, start, Machines::HostileThenGood).await;
    t.create("stuck", serde_json::json!({"steps": 200, "secondsPerStep": 0.25}), 0).await;
    // The first rent is the hostile machine; wait until the operator is caught in it.
    t.wait_hostile("the misbehaviour", |c| met(mode, start, &Counters::default(), c)).await;
    let second = Instant::now();
    t.create("fine", serde_json::json!({"steps": 12, "secondsPerStep": 0.25, "saveEvery": 5}), 0).await;
    let done = t.wait_finished("fine", second + SUCCESS_LIMIT).await;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{}", t.story("fine").await);
    assert_eq!(status.instance.as_ref().map(|i| i.name.as_str()), Some("fine-1"));
    // The bad one is judged too, in its own time.
    let failed = t.wait_finished("stuck", second + VERDICT_LIMIT + VERDICT_LIMIT).await;
    assert_eq!(failed.status.unwrap_or_default().phase, TrainingJobPhase::Failed);
    t.wait_released("stuck", Instant::now() + VERDICT_LIMIT).await;
    t.assert_held_up();
    t.finish(&["stuck", "fine"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_machine_hanging_in_the_probe_does_not_delay_another_job() {
    a_hanging_machine_does_not_delay_another_job(Mode::HangOnChannelOpen, Start::FirstExec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_machine_hanging_in_staging_does_not_delay_another_job() {
    a_hanging_machine_does_not_delay_another_job(Mode::HangAfterExec, Start::AfterProbe).await;
}

// ---------------------------------------------------------------------------------------------
// A well-behaved hostile server is a working machine: the other tests fail for the mode alone.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn a_job_trains_through_the_hostile_server_in_normal_mode() {
    let mut t =
        HostileTest::start("hostile-normal", Mode::Normal, Start::FirstExec, Machines::AllHostile).await;
    t.create("good", serde_json::json!({"steps": 12, "secondsPerStep": 0.25, "saveEvery": 5}), 0).await;
    let done = t.wait_finished("good", Instant::now() + SUCCESS_LIMIT).await;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{}", t.story("good").await);
    assert!(!status.checkpoints.is_empty() && !status.artifacts.is_empty(), "{status:#?}");
    let c = t.hostile.counters();
    assert!(c.exec_requests > 3 && c.subsystem_requests > 0, "the job went through the server: {c:?}");
    t.wait_released("good", Instant::now() + VERDICT_LIMIT).await;
    t.assert_held_up();
    t.finish(&["good"]).await;
}

// ---------------------------------------------------------------------------------------------
// Thousands of checkpoints with hostile names.

/// Plants 5,000 checkpoints in `output` as a hostile machine would report them: 4,000 plain
/// `checkpoint-<step>` folders (a count no status can hold) and 1,000 step-named files whose
/// names carry newlines (one forging a listing line), `..`, terminal escapes, shell syntax, a
/// right-to-left override, carriage returns and the longest name the file system allows.
/// Returns how many were planted.
fn plant_hostile_checkpoints(output: &Path) -> usize {
    std::fs::create_dir_all(output).unwrap();
    let mut planted = 0;
    for i in 1..=4000u64 {
        let dir = output.join(format!("checkpoint-{}", 100_000 + i));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adapter.bin"), b"x").unwrap();
        planted += 1;
    }
    for i in 1..=1000u64 {
        let step = 200_000 + i;
        let name = match i % 8 {
            0 => format!("..\n_{step:09}.safetensors"),
            1 => format!("x\nd 4096 checkpoint-{}", 900_000 + i),
            2 => format!("\x1b[31mred\x07_{step:09}.safetensors"),
            3 => format!("{}_{step:09}.safetensors", "a".repeat(230)),
            4 => format!("$(touch pwned)_{step:09}.safetensors"),
            5 => format!("'; rm -rf ~; '_{step:09}.safetensors"),
            6 => format!("\u{202e}fdp.exe_{step:09}.safetensors"),
            _ => format!("checkpoint-{step}\r"),
        };
        assert!(name.len() <= 255 && !name.contains('/'), "{name:?}");
        std::fs::write(output.join(&name), b"DEMO").unwrap();
        planted += 1;
    }
    planted
}

/// Removes what [`plant_hostile_checkpoints`] planted (the demo trainer's own files stay).
fn remove_hostile_checkpoints(output: &Path) {
    let Ok(entries) = std::fs::read_dir(output) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("demo");
        if !ours {
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

/// Status stays small and holds no name that is not one plain path component.
fn assert_status_sane(status: &TrainingJobStatus) {
    let size = serde_json::to_vec(status).unwrap().len();
    assert!(size < 64 * 1024, "status is {size} bytes");
    assert!(status.checkpoints.len() <= 100, "{} checkpoints in status", status.checkpoints.len());
    for cp in &status.checkpoints {
        let n = &cp.name;
        let plain = !n.is_empty()
            && n != "."
            && n != ".."
            && n.len() <= 255
            && !n.contains('/')
            && !n.chars().any(char::is_control)
            && !n.contains('\u{202e}');
        assert!(plain, "a hostile checkpoint name reached status: {n:?}");
    }
}

async fn hostile_checkpoint_names(backoff_limit: i32) {
    // The machine is the good test sshd; what it reports comes from its files.
    let mut t = HostileTest::start(
        &format!("hostile-ckpt-{backoff_limit}"),
        Mode::Normal,
        Start::FirstExec,
        Machines::AllGood,
    )
    .await;
    t.create(
        "ckpt",
        serde_json::json!({"steps": 120, "secondsPerStep": 0.25, "saveEvery": 10}),
        backoff_limit,
    )
    .await;
    let training = t
        .wait_job("ckpt", Instant::now() + SUCCESS_LIMIT, "training", |s| {
            s.phase == TrainingJobPhase::Training || s.phase.is_finished()
        })
        .await;
    let uid = training.uid().unwrap();
    let work = t.base.join(&uid);
    let planted = plant_hostile_checkpoints(&work.join("output"));
    assert_eq!(planted, 5000);
    let deadline = Instant::now() + VERDICT_LIMIT;

    if backoff_limit == 0 {
        let failed = t.wait_finished("ckpt", deadline).await;
        let status = failed.status.clone().unwrap_or_default();
        assert_eq!(status.phase, TrainingJobPhase::Failed, "{}", t.story("ckpt").await);
        assert_status_sane(&status);
        let message = status.message.clone().unwrap_or_default().to_lowercase();
        assert!(
            ["refused", "checkpoint", "name"].iter().any(|w| message.contains(w)),
            "the message does not say what was refused: {message:?}"
        );
    } else {
        // The first machine goes; the replacement finds an output folder without the planted
        // names (a real replacement would find an empty one) and trains to the end.
        loop {
            let gone = t.instances.get_opt("ckpt-1").await.ok().flatten().is_none();
            let replaced = t.instances.get_opt("ckpt-2").await.ok().flatten().is_some();
            if gone || replaced {
                break;
            }
            if Instant::now() >= deadline {
                panic!("the machine was not replaced in time\n{}", t.story("ckpt").await);
            }
            let job = t.jobs.get("ckpt").await.unwrap();
            assert_status_sane(&job.status.unwrap_or_default());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        common::kill_trainer(&work);
        remove_hostile_checkpoints(&work.join("output"));
        let done = t.wait_finished("ckpt", Instant::now() + SUCCESS_LIMIT).await;
        let status = done.status.clone().unwrap_or_default();
        assert_eq!(status.phase, TrainingJobPhase::Succeeded, "{}", t.story("ckpt").await);
        assert_eq!(status.attempts, 2);
        assert_status_sane(&status);
    }
    // The refusal is a Warning event naming the machine.
    let events = t.events().await;
    let machine_named = |note: &str| note.contains("ckpt-1");
    assert!(
        events.iter().any(|(_, type_, reason, note)| type_ == "Warning"
            && machine_named(note)
            && (reason == "MachineMisbehaved" || note.to_lowercase().contains("refused"))),
        "no Warning event names the machine and the refusal: {events:#?}"
    );
    t.wait_released("ckpt", Instant::now() + VERDICT_LIMIT).await;
    t.assert_held_up();
    t.finish(&["ckpt"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn thousands_of_hostile_checkpoint_names_are_refused_and_fail_the_job() {
    hostile_checkpoint_names(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn thousands_of_hostile_checkpoint_names_get_the_machine_replaced() {
    hostile_checkpoint_names(1).await;
}
