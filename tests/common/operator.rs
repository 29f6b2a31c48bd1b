//! Starting the operator as a real process (`gpu-trainer run`) against the test API server and an
//! in-process `fake-vastai` whose instances point at the test sshd.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gpu_trainer::provider::config::ApiKey;
use gpu_trainer::provider::fake::{self, FakeConfig, FakeServer};
use gpu_trainer::provider::vastai::{ClientOptions, VastClient};
use gpu_trainer::provider::{Instance, InstanceState};
use url::Url;

use super::{env_dir, kubeconfig_path};

pub const API_KEY: &str = "e2e-key-7d41";

/// The test sshd from `tests/env/up.sh`.
pub struct SshEnv {
    pub host: String,
    pub port: u16,
    pub authorized_keys: PathBuf,
}

pub fn ssh_env() -> SshEnv {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set; run through tests/run.sh"))
    };
    SshEnv {
        host: var("GPU_TRAINER_TEST_SSH_HOST"),
        port: var("GPU_TRAINER_TEST_SSH_PORT").parse().expect("port"),
        authorized_keys: env_dir().join("ssh").join("authorized_keys"),
    }
}

/// A fake Vast.ai whose instances boot in about two seconds and whose SSH is the test sshd, which
/// accepts every key attached to an instance.
pub async fn start_fake(extra: impl FnOnce(&mut FakeConfig)) -> FakeServer {
    let ssh = ssh_env();
    let mut config = FakeConfig {
        api_key: Some(API_KEY.into()),
        ssh_host: ssh.host,
        ssh_port: ssh.port,
        loading_after: Duration::from_millis(500),
        running_after: Duration::from_millis(1500),
        authorized_keys_file: Some(ssh.authorized_keys),
        ..FakeConfig::default()
    };
    extra(&mut config);
    fake::spawn(config).await.expect("fake-vastai starts")
}

/// Our own client for the fake, to see what the provider sees.
pub fn provider_client(fake: &FakeServer) -> VastClient {
    VastClient::new(Url::parse(&fake.url()).unwrap(), &ApiKey::new(API_KEY), ClientOptions::default())
        .unwrap()
}

/// Instances of the fake that are not released, with this label prefix. Read from the fake's
/// own state, converted as the client converts the API's rows: the faults a test injects (429
/// storms, 5xx bursts) are for the operator, not for the test's own checks.
pub async fn live_instances(fake: &FakeServer, label_prefix: &str) -> Vec<Instance> {
    fake.instances()
        .into_iter()
        .map(|row| {
            let wire: gpu_trainer::provider::vastai::wire::WireInstance =
                serde_json::from_value(serde_json::Value::Object(row)).expect("an instance row");
            Instance::try_from(wire).expect("a valid instance row")
        })
        .filter(|i| i.state != InstanceState::Released)
        .filter(|i| i.label.as_deref().is_some_and(|l| l.starts_with(label_prefix)))
        .collect()
}

/// A random installation id, so concurrent tests never see each other's instances.
pub fn installation_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// `gpu-trainer run` as a child process; killed when dropped.
pub struct OperatorProcess {
    child: Child,
    pub log: PathBuf,
    pub metrics_port: u16,
}

pub struct OperatorOptions<'a> {
    pub namespace: &'a str,
    pub fake_url: String,
    /// Empty: not passed, so the operator derives it from the kube-system namespace.
    pub installation_id: &'a str,
    pub env: Vec<(&'a str, String)>,
    pub args: Vec<String>,
    pub leader_elect: bool,
    /// Namespace of the leader Lease; default: `namespace`.
    pub lease_namespace: Option<String>,
    /// Credentials of the operator; default: the admin kubeconfig of `tests/env/up.sh`.
    pub kubeconfig: Option<PathBuf>,
    /// Short poll, grace and sweep intervals so tests finish quickly; off, the operator's
    /// defaults apply unless `args` set them (benchmarks measure the defaults).
    pub fast_polls: bool,
    /// `pretty` (default) or `json` (benchmarks read timestamps from it).
    pub log_format: &'static str,
    /// `--allow-private-endpoints` (default on): Garage and the test webhooks listen on
    /// 127.0.0.1, which the operator refuses otherwise.
    pub allow_private_endpoints: bool,
}

impl<'a> OperatorOptions<'a> {
    pub fn new(namespace: &'a str, fake: &FakeServer, installation_id: &'a str) -> Self {
        Self {
            namespace,
            fake_url: fake.url(),
            installation_id,
            env: Vec::new(),
            args: Vec::new(),
            leader_elect: false,
            lease_namespace: None,
            kubeconfig: None,
            fast_polls: true,
            log_format: "pretty",
            allow_private_endpoints: true,
        }
    }
}

impl OperatorOptions<'_> {
    /// The operator's remote work dirs (`--remote-base`) in `base`.
    pub fn remote_base(mut self, base: &std::path::Path) -> Self {
        self.args.extend(["--remote-base".to_string(), base.display().to_string()]);
        self
    }
}

/// A fresh remote base for namespace `ns` under the environment folder (the test sshd's
/// machine is this machine).
pub fn work_base(ns: &str) -> PathBuf {
    let base = super::env_dir().join("work").join(ns);
    std::fs::create_dir_all(&base).unwrap();
    base
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl OperatorProcess {
    pub fn start(options: &OperatorOptions<'_>) -> Self {
        let metrics_port = free_port();
        let log = env_dir().join("logs").join(format!(
            "operator-{}-{}.log",
            options.namespace,
            rand::random::<u16>()
        ));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_gpu-trainer"));
        command.arg("run").args(["--namespace", options.namespace]);
        if !options.installation_id.is_empty() {
            command.args(["--installation-id", options.installation_id]);
        }
        command
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--log-format", options.log_format])
            .arg(format!("--leader-elect={}", options.leader_elect))
            .args(["--lease-namespace", options.lease_namespace.as_deref().unwrap_or(options.namespace)]);
        if options.fast_polls {
            command
                .args([
                    "--fast-poll-seconds",
                    "1",
                    "--liveness-poll-seconds",
                    "5",
                    "--create-pending-grace-seconds",
                    "3",
                ])
                .args(["--sweep-interval-seconds", "2", "--sweep-grace-seconds", "3"]);
        }
        if options.allow_private_endpoints {
            command.arg("--allow-private-endpoints");
        }
        command
            .args(&options.args)
            .env("KUBECONFIG", options.kubeconfig.clone().unwrap_or_else(kubeconfig_path))
            .env("VASTAI_API_KEY", API_KEY)
            .env("VASTAI_API_BASE_URL", &options.fake_url)
            .env("RUST_LOG", "info,gpu_trainer=debug,kube=warn")
            .env_remove("GPU_TRAINER_CRASH_AT")
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in &options.env {
            command.env(k, v);
        }
        let child = command.spawn().expect("gpu-trainer run starts");
        Self { child, log, metrics_port }
    }

    /// `gpu-trainer` with exactly `args` and `env`, as a container runs it, authenticated by
    /// `kubeconfig`; `args` must listen on 127.0.0.1:`metrics_port`. Nothing of the test's own
    /// environment reaches it but `PATH`, `HOME` and `TMPDIR`.
    pub fn start_with(
        args: &[String],
        env: &[(String, String)],
        kubeconfig: &std::path::Path,
        metrics_port: u16,
        name: &str,
    ) -> Self {
        let log = env_dir().join("logs").join(format!("operator-{name}-{}.log", rand::random::<u16>()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_gpu-trainer"));
        command.args(args).env_clear();
        for keep in ["PATH", "HOME", "TMPDIR"] {
            if let Some(value) = std::env::var_os(keep) {
                command.env(keep, value);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v))).env("KUBECONFIG", kubeconfig);
        let child = command.stdout(Stdio::null()).stderr(log_file).spawn().expect("gpu-trainer starts");
        Self { child, log, metrics_port }
    }

    /// Waits for the process to end by itself (e.g. at a crash point).
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("operator did not exit within {timeout:?}; log: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process id (benchmarks read its CPU time and memory from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// SIGKILL, as a crashed node would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as Kubernetes stops a pod.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until `/readyz` answers 200 (start-up checks done).
    pub async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        super::wait_until(Duration::from_secs(60), "the operator to be ready", || {
            let url = url.clone();
            async move { reqwest::get(url).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .expect("metrics endpoint")
            .text()
            .await
            .expect("metrics body")
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
