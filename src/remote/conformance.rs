//! One behavioural test suite for every `RemoteExec` implementation: the same cases run against
//! `LocalExec` (always) and `SshExec` (against the loopback sshd that `tests/run.sh` starts).
//! SSH-only behaviour (host-key pinning, resuming after a dropped connection, connection reuse)
//! is at the end.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::local::LocalExec;
use super::ssh::{SshExec, SshKey, SshOptions, SshTarget};
use super::{OutputChunk, Phase, RemoteError, RemoteExec, RunOptions};

/// A machine under test plus a scratch folder on it (`base`, absolute) and one on this side.
pub(crate) struct Fixture {
    pub exec: Arc<dyn RemoteExec>,
    pub base: String,
    pub local: tempfile::TempDir,
    _remote: tempfile::TempDir,
}

impl Fixture {
    pub fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.base)
    }
}

/// Limit for one file request in the fixtures made for the deadline cases.
const QUICK: Duration = Duration::from_secs(2);

pub(crate) async fn local_fixture() -> Fixture {
    local_fixture_with(Duration::from_secs(30))
}

/// A local machine whose file requests time out after [`QUICK`].
pub(crate) async fn quick_local_fixture() -> Fixture {
    local_fixture_with(QUICK)
}

fn local_fixture_with(request_timeout: Duration) -> Fixture {
    let remote = tempfile::tempdir().expect("tempdir");
    let exec = LocalExec::new(remote.path()).expect("local exec").with_request_timeout(request_timeout);
    Fixture {
        exec: Arc::new(exec),
        base: remote.path().display().to_string(),
        local: tempfile::tempdir().expect("tempdir"),
        _remote: remote,
    }
}

/// Connection settings of the test sshd, from the environment `tests/env/up.sh` writes.
pub(crate) struct SshEnv {
    pub target: SshTarget,
    pub key_path: PathBuf,
    pub host_key_pub: PathBuf,
}

pub(crate) fn ssh_env() -> SshEnv {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run the SSH tests through tests/run.sh (or source $GPU_TRAINER_ENV_DIR/env after tests/env/up.sh)")
        })
    };
    SshEnv {
        target: SshTarget {
            host: var("GPU_TRAINER_TEST_SSH_HOST"),
            port: var("GPU_TRAINER_TEST_SSH_PORT").parse().expect("port"),
            user: var("GPU_TRAINER_TEST_SSH_USER"),
        },
        key_path: PathBuf::from(var("GPU_TRAINER_TEST_SSH_KEY")),
        host_key_pub: PathBuf::from(var("GPU_TRAINER_TEST_SSH_HOST_KEY")),
    }
}

pub(crate) fn test_options() -> SshOptions {
    SshOptions { connect_deadline: Duration::from_secs(30), ..Default::default() }
}

pub(crate) async fn ssh_connect(target: SshTarget) -> SshExec {
    let env = ssh_env();
    let key = SshKey::from_file(&env.key_path).expect("key");
    SshExec::connect(target, key, None, test_options()).await.expect("connect to the test sshd")
}

pub(crate) async fn ssh_fixture() -> Fixture {
    ssh_fixture_with(test_options()).await
}

/// The test sshd with file requests that time out after [`QUICK`].
pub(crate) async fn quick_ssh_fixture() -> Fixture {
    ssh_fixture_with(SshOptions { request_timeout: QUICK, ..test_options() }).await
}

async fn ssh_fixture_with(options: SshOptions) -> Fixture {
    let env = ssh_env();
    let key = SshKey::from_file(&env.key_path).expect("key");
    let exec = SshExec::connect(env.target, key, None, options).await.expect("connect to the test sshd");
    let remote = tempfile::tempdir().expect("tempdir");
    Fixture {
        exec: Arc::new(exec),
        base: remote.path().display().to_string(),
        local: tempfile::tempdir().expect("tempdir"),
        _remote: remote,
    }
}

fn opts(secs: u64) -> RunOptions {
    RunOptions::with_timeout(Duration::from_secs(secs))
}

/// Polls `check` until it holds; fails the test after a generous limit (never a timed assertion
/// about how fast something happens).
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gave up waiting for: {what}");
}

/// A file of pseudo-random bytes (incompressible, deterministic per seed).
pub(crate) fn random_file(path: &Path, size: usize, seed: u64) {
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n]).expect("write");
        left -= n;
    }
    file.flush().expect("flush");
}

const BIG: usize = 300 * 1024 * 1024;

pub(crate) mod cases {
    use super::*;

    pub async fn commands_report_exit_codes_and_output(f: Fixture) {
        let out = f.exec.run("echo hello; echo oops >&2; exit 3", opts(30)).await.unwrap();
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.stdout_lossy(), "hello\n");
        assert_eq!(out.stderr_lossy(), "oops\n");
        let out = f.exec.run("true", opts(30)).await.unwrap();
        assert!(out.success());
        let out = f.exec.run("printf 'a\\nb\\n' | wc -l", opts(30)).await.unwrap();
        assert_eq!(out.stdout_lossy().trim(), "2");
        // stdin is closed: a command that reads it gets EOF instead of hanging.
        let out = f.exec.run("cat; echo done", opts(30)).await.unwrap();
        assert_eq!(out.stdout_lossy(), "done\n");
        // Output bigger than any window or pipe buffer arrives whole (within its limit).
        let big = RunOptions { output_limit: 4_000_000, ..opts(60) };
        let out = f.exec.run("head -c 3000000 /dev/zero", big).await.unwrap();
        assert_eq!((out.stdout.len(), out.stdout_dropped), (3_000_000, 0));
        out.require_complete("a big output").unwrap();
    }

    pub async fn output_past_its_limit_keeps_head_and_tail_and_says_so(f: Fixture) {
        // 2 MB between a head and a tail marker, on both streams; 1000 bytes kept of each.
        let cmd = "for s in 1 2; do { printf HEAD; head -c 2000000 /dev/zero | tr '\\0' x; printf TAIL; } >&$s; done";
        let capped = RunOptions { output_limit: 1000, ..opts(60) };
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let exec = f.exec.clone();
        let running = tokio::spawn(async move { exec.run_streaming(cmd, capped, tx).await });
        let (mut streamed_out, mut streamed_err) = (0, 0);
        while let Some(chunk) = rx.recv().await {
            match chunk {
                OutputChunk::Stdout(b) => streamed_out += b.len(),
                OutputChunk::Stderr(b) => streamed_err += b.len(),
            }
        }
        let out = running.await.unwrap().unwrap();
        assert!(out.success());
        let total = 2_000_008u64;
        for (kept, dropped) in [(&out.stdout, out.stdout_dropped), (&out.stderr, out.stderr_dropped)] {
            assert_eq!(kept.len(), 1000);
            assert!(kept.starts_with(b"HEADxxx") && kept.ends_with(b"xxxTAIL"));
            assert_eq!(dropped, total - 1000);
        }
        // Streaming passed on no more than the limit either.
        assert!(streamed_out <= 1000 && streamed_err <= 1000, "{streamed_out} {streamed_err}");
        assert!(out.stdout_lossy().contains(&format!("[... {} bytes dropped ...]", total - 1000)));
        let refused = out.require_complete("a flood").unwrap_err();
        assert!(matches!(refused, RemoteError::TooLarge { limit: 1000, .. }), "{refused:?}");
        assert!(refused.to_string().contains("a flood"), "{refused}");
    }

    pub async fn an_endless_flood_is_abandoned_long_before_the_deadline(f: Fixture) {
        // An endless stream never exits: without the flood limit the call would last its whole
        // (ten-minute) deadline. The limit is 64 MiB here, a second or so over loopback.
        let started = std::time::Instant::now();
        let capped = RunOptions { output_limit: 1000, ..opts(600) };
        let err = f.exec.run("cat /dev/zero", capped.clone()).await.unwrap_err();
        assert!(
            matches!(err, RemoteError::TooLarge { limit, .. } if limit == crate::remote::bounds::flood_limit(1000)),
            "{err:?}"
        );
        assert_eq!(err.machine_fault(), Some(crate::remote::MachineFault::Misbehaved));
        let err = f.exec.run("cat /dev/zero >&2", capped).await.unwrap_err();
        assert!(err.to_string().contains("error output"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(300), "took {:?}", started.elapsed());
        // The next call works.
        assert!(f.exec.run("true", opts(30)).await.unwrap().success());
    }

    pub async fn a_file_read_that_is_never_answered_times_out_and_the_next_one_works(f: Fixture) {
        // Opening a FIFO nobody writes never returns: the read must end at its deadline.
        let fifo = f.path("fifo");
        assert!(f.exec.run(&format!("mkfifo {fifo}"), opts(30)).await.unwrap().success());
        let read = tokio::time::timeout(Duration::from_secs(60), f.exec.read_from(&fifo, 0, 100)).await;
        let err = read.expect("the read outlived its deadline").unwrap_err();
        assert_eq!(err.timeout_phase(), Some(Phase::FileRequest), "{err:?}");
        assert!(err.to_string().contains("did not answer a file request"), "{err}");
        // The next call works (over SSH: on a new connection; the old SFTP server is stuck).
        let log = f.path("log");
        f.exec.run(&format!("printf ok > {log}"), opts(30)).await.unwrap();
        assert_eq!(f.exec.read_from(&log, 0, 10).await.unwrap().data, b"ok");
        // Unblocks the stuck open (on either side) so nothing is left waiting.
        let _ = f.exec.run(&format!(": > {fifo}"), opts(5)).await;
    }

    pub async fn a_download_stops_at_its_limit(f: Fixture) {
        let remote = f.path("model.bin");
        f.exec.run(&format!("head -c 1000 /dev/zero > {remote}"), opts(30)).await.unwrap();
        let local = f.local.path().join("model.bin");
        let err = f.exec.download(&remote, &local, 999).await.unwrap_err();
        assert!(matches!(err, RemoteError::TooLarge { limit: 999, .. }), "{err:?}");
        assert!(std::fs::read_dir(f.local.path()).unwrap().next().is_none(), "something was left behind");
        assert_eq!(f.exec.download(&remote, &local, 1000).await.unwrap().bytes, 1000);
        // A file that reports less than it holds (`/proc` reports 0) is cut off while it is read.
        let status = f.local.path().join("status");
        let err = f.exec.download("/proc/self/status", &status, 64).await.unwrap_err();
        assert!(matches!(err, RemoteError::TooLarge { limit: 64, .. }), "{err:?}");
        assert!(!status.exists());
        // Not a regular file: not downloaded at all.
        let err = f.exec.download("/dev/zero", &status, u64::MAX).await.unwrap_err();
        assert!(matches!(err, RemoteError::NotFound { .. }), "{err:?}");
    }

    pub async fn timeout_kills_the_command_and_its_children(f: Fixture) {
        let pids = f.path("pids");
        let cmd =
            format!("echo $$ > {pids}.tmp; sleep 300 & echo $! >> {pids}.tmp; mv {pids}.tmp {pids}; wait");
        let err = f.exec.run(&cmd, opts(2)).await.unwrap_err();
        assert_eq!(err.timeout_phase(), Some(Phase::Output), "{err:?}");
        assert_eq!(err.to_string(), "the command did not finish within 2s");
        let listed = f.exec.run(&format!("cat {pids}"), opts(30)).await.unwrap().stdout_lossy();
        let pids: Vec<u32> = listed.split_whitespace().map(|p| p.parse().unwrap()).collect();
        assert_eq!(pids.len(), 2, "{listed}");
        for pid in pids {
            let exec = f.exec.clone();
            eventually("the timed-out command's processes to die", || {
                let exec = exec.clone();
                async move { !exec.pid_alive(pid).await.unwrap() }
            })
            .await;
        }
    }

    pub async fn output_streams_while_the_command_runs(f: Fixture) {
        let go = f.path("go");
        let cmd = format!("echo first; while [ ! -f {go} ]; do sleep 0.05; done; echo second >&2");
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let exec = f.exec.clone();
        let running = tokio::spawn(async move { exec.run_streaming(&cmd, opts(120), tx).await });
        // The first line must arrive before the command can finish (it waits for `go`).
        let first =
            tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("no output streamed");
        assert_eq!(first, Some(OutputChunk::Stdout(b"first\n".to_vec())));
        f.exec.run(&format!("touch {go}"), opts(30)).await.unwrap();
        let out = running.await.unwrap().unwrap();
        assert_eq!(out.stdout_lossy(), "first\n");
        assert_eq!(out.stderr_lossy(), "second\n");
        let mut rest = Vec::new();
        while let Some(chunk) = rx.recv().await {
            rest.push(chunk);
        }
        assert_eq!(rest, vec![OutputChunk::Stderr(b"second\n".to_vec())]);
    }

    pub async fn env_reaches_the_command_but_no_command_line(f: Fixture) {
        let secret = format!("s3cr3t-{}-'q\"$(x)`y`\nline2", rand::random::<u32>());
        let env = vec![("GT_SECRET".to_string(), secret.clone())];
        let out = f
            .exec
            .run(
                "printf '%s' \"$GT_SECRET\"",
                RunOptions { timeout: Duration::from_secs(30), env: env.clone(), ..Default::default() },
            )
            .await
            .unwrap();
        assert_eq!(out.stdout_lossy(), secret);
        // Every command line on the machine while the command runs (including our own).
        let marker = secret.lines().next().unwrap().to_string();
        let cmd = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < \"$f\" 2>/dev/null; echo; done";
        let out = f
            .exec
            .run(cmd, RunOptions { timeout: Duration::from_secs(30), env, ..Default::default() })
            .await
            .unwrap();
        assert!(out.success());
        assert!(out.stdout_lossy().lines().count() > 2);
        assert!(!out.stdout_lossy().contains(&marker), "the secret is visible on a command line");
        let bad = f
            .exec
            .run(
                "true",
                RunOptions {
                    timeout: Duration::from_secs(30),
                    env: vec![("A;B".into(), "x".into())],
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(bad, Err(RemoteError::InvalidRequest(_))));
    }

    pub async fn big_files_round_trip_with_checksums_and_skip_when_present(f: Fixture) {
        let src = f.local.path().join("big.bin");
        random_file(&src, BIG, 7);
        let (sha, _) = super::super::sha256_file(&src).await.unwrap();
        let remote = f.path("nested/dir/big.bin");
        let up = f.exec.upload(&src, &remote).await.unwrap();
        assert_eq!((up.bytes, up.sha256.as_str(), up.skipped), (BIG as u64, sha.as_str(), false));
        let out = f.exec.run(&format!("sha256sum < {remote}"), opts(120)).await.unwrap();
        assert!(out.stdout_lossy().starts_with(&sha));
        // The same content again is not sent.
        let again = f.exec.upload(&src, &remote).await.unwrap();
        assert!(again.skipped);
        assert_eq!(again.sha256, sha);

        let back = f.local.path().join("back/big.bin");
        let down = f.exec.download(&remote, &back, u64::MAX).await.unwrap();
        assert_eq!((down.bytes, down.sha256.as_str(), down.skipped), (BIG as u64, sha.as_str(), false));
        assert_eq!(super::super::sha256_file(&back).await.unwrap().0, sha);
        assert!(f.exec.download(&remote, &back, u64::MAX).await.unwrap().skipped);

        // Different content of the same size is sent again.
        random_file(&src, BIG, 8);
        let changed = f.exec.upload(&src, &remote).await.unwrap();
        assert!(!changed.skipped);
        assert_ne!(changed.sha256, sha);
        assert!(matches!(
            f.exec.download(&f.path("missing"), &back, u64::MAX).await,
            Err(RemoteError::NotFound { .. })
        ));
    }

    pub async fn read_from_follows_offsets(f: Fixture) {
        let log = f.path("log.txt");
        f.exec.run(&format!("printf 'hello world' > {log}"), opts(30)).await.unwrap();
        let c = f.exec.read_from(&log, 0, 5).await.unwrap();
        assert_eq!((c.offset, c.data.as_slice(), c.file_size), (0, &b"hello"[..], 11));
        let c = f.exec.read_from(&log, 6, 100).await.unwrap();
        assert_eq!(c.data, b"world");
        let c = f.exec.read_from(&log, 11, 100).await.unwrap();
        assert!(c.data.is_empty());
        let c = f.exec.read_from(&log, 50, 100).await.unwrap();
        assert_eq!((c.data.len(), c.file_size), (0, 11));
        f.exec.run(&format!("printf '!!' >> {log}"), opts(30)).await.unwrap();
        let c = f.exec.read_from(&log, 11, 100).await.unwrap();
        assert_eq!((c.data.as_slice(), c.file_size), (&b"!!"[..], 13));
        assert!(matches!(f.exec.read_from(&f.path("nope"), 0, 10).await, Err(RemoteError::NotFound { .. })));
    }

    pub async fn pid_alive_tells_running_from_gone(f: Fixture) {
        let out = f.exec.run("sleep 300 >/dev/null 2>&1 & echo $!", opts(30)).await.unwrap();
        let pid: u32 = out.stdout_lossy().trim().parse().unwrap();
        assert!(f.exec.pid_alive(pid).await.unwrap());
        f.exec.run(&format!("kill {pid}"), opts(30)).await.unwrap();
        let exec = f.exec.clone();
        eventually("the killed process to be gone", || {
            let exec = exec.clone();
            async move { !exec.pid_alive(pid).await.unwrap() }
        })
        .await;
        assert!(!f.exec.pid_alive(0).await.unwrap());
        assert!(!f.exec.pid_alive(4_000_000_000).await.unwrap());
    }
}

/// Declares one test per case for an implementation.
macro_rules! conformance_suite {
    ($module:ident, $fixture:path, $quick:path $(, #[$attr:meta])*) => {
        mod $module {
            use super::*;
            conformance_suite!(@case $fixture, output_past_its_limit_keeps_head_and_tail_and_says_so $(, #[$attr])*);
            conformance_suite!(@case $quick, a_file_read_that_is_never_answered_times_out_and_the_next_one_works $(, #[$attr])*);
            conformance_suite!(@case $fixture, a_download_stops_at_its_limit $(, #[$attr])*);
            conformance_suite!(@case $fixture, an_endless_flood_is_abandoned_long_before_the_deadline $(, #[$attr])*);
            conformance_suite!(@case $fixture, commands_report_exit_codes_and_output $(, #[$attr])*);
            conformance_suite!(@case $fixture, timeout_kills_the_command_and_its_children $(, #[$attr])*);
            conformance_suite!(@case $fixture, output_streams_while_the_command_runs $(, #[$attr])*);
            conformance_suite!(@case $fixture, env_reaches_the_command_but_no_command_line $(, #[$attr])*);
            conformance_suite!(@case $fixture, big_files_round_trip_with_checksums_and_skip_when_present $(, #[$attr])*);
            conformance_suite!(@case $fixture, read_from_follows_offsets $(, #[$attr])*);
            conformance_suite!(@case $fixture, pid_alive_tells_running_from_gone $(, #[$attr])*);
            conformance_suite!(@case $fixture, launch_runs_in_the_background_and_is_idempotent $(, #[$attr])*);
            conformance_suite!(@case $fixture, launch_stop_terms_then_kills_the_group $(, #[$attr])*);
        }
    };
    (@case $fixture:path, launch_runs_in_the_background_and_is_idempotent $(, #[$attr:meta])*) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn launch_runs_in_the_background_and_is_idempotent() {
            crate::remote::launch::tests::runs_in_the_background_and_is_idempotent($fixture().await).await
        }
    };
    (@case $fixture:path, launch_stop_terms_then_kills_the_group $(, #[$attr:meta])*) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn launch_stop_terms_then_kills_the_group() {
            crate::remote::launch::tests::stop_terms_then_kills_the_group($fixture().await).await
        }
    };
    (@case $fixture:path, $case:ident $(, #[$attr:meta])*) => {
        $(#[$attr])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            cases::$case($fixture().await).await
        }
    };
}

conformance_suite!(local, local_fixture, quick_local_fixture);
conformance_suite!(ssh, ssh_fixture, quick_ssh_fixture, #[ignore = "needs tests/ environment"]);

/// A TCP relay in front of sshd that can be retargeted and can cut connections mid-stream.
struct Proxy {
    port: u16,
    target: Arc<std::sync::Mutex<SocketAddr>>,
    /// Bytes relayed (both directions) over all connections so far.
    total: Arc<AtomicU64>,
    /// Cut the connection that carries the byte at this total (one-shot; `u64::MAX` = off).
    cut_at: Arc<AtomicU64>,
    /// Client-to-server bytes of the connections opened after the cut.
    after_cut: Arc<AtomicU64>,
    /// Stop relaying (connections stay open, bytes are held) once the total reaches this
    /// (`u64::MAX` = off): a machine that stopped answering but did not hang up.
    freeze_at: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            target: Arc::new(std::sync::Mutex::new(target)),
            total: Arc::new(AtomicU64::new(0)),
            cut_at: Arc::new(AtomicU64::new(u64::MAX)),
            after_cut: Arc::new(AtomicU64::new(0)),
            freeze_at: Arc::new(AtomicU64::new(u64::MAX)),
        };
        let (target, total, cut_at, after_cut) =
            (proxy.target.clone(), proxy.total.clone(), proxy.cut_at.clone(), proxy.after_cut.clone());
        let freeze_at = proxy.freeze_at.clone();
        let cut_happened = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let addr = *target.lock().unwrap();
                let (total, cut_at, after_cut) = (total.clone(), cut_at.clone(), after_cut.clone());
                let freeze_at = freeze_at.clone();
                let opened_after_cut = cut_happened.load(Ordering::SeqCst);
                let cut_happened = cut_happened.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(addr).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let relay = |mut from: tokio::net::tcp::OwnedReadHalf,
                                 mut to: tokio::net::tcp::OwnedWriteHalf,
                                 upstream: bool| {
                        let (total, cut_at, after_cut, cut_happened) =
                            (total.clone(), cut_at.clone(), after_cut.clone(), cut_happened.clone());
                        let freeze_at = freeze_at.clone();
                        async move {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = match from.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                let now = total.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                                if opened_after_cut && upstream {
                                    after_cut.fetch_add(n as u64, Ordering::SeqCst);
                                }
                                let limit = cut_at.load(Ordering::SeqCst);
                                if now >= limit
                                    && cut_at
                                        .compare_exchange(limit, u64::MAX, Ordering::SeqCst, Ordering::SeqCst)
                                        .is_ok()
                                {
                                    cut_happened.store(true, Ordering::SeqCst);
                                    return;
                                }
                                while now >= freeze_at.load(Ordering::SeqCst) {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                if to.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    };
                    // Whichever direction ends first ends the connection: both halves drop.
                    tokio::select! {
                        _ = relay(cr, sw, true) => {}
                        _ = relay(sr, cw, false) => {}
                    }
                });
            }
        });
        proxy
    }

    fn target(&self) -> SshTarget {
        SshTarget { host: "127.0.0.1".into(), port: self.port, user: ssh_env().target.user }
    }

    /// Cuts the connection once `bytes` more bytes have passed.
    fn cut_after(&self, bytes: u64) {
        self.cut_at.store(self.total.load(Ordering::SeqCst) + bytes, Ordering::SeqCst);
    }

    /// Stops relaying once `bytes` more bytes have passed (0: now).
    fn freeze_after(&self, bytes: u64) {
        self.freeze_at.store(self.total.load(Ordering::SeqCst) + bytes, Ordering::SeqCst);
    }

    /// Relays again; connections frozen meanwhile carry on with what they held.
    fn thaw(&self) {
        self.freeze_at.store(u64::MAX, Ordering::SeqCst);
    }
}

/// A second sshd with a freshly generated host key, accepting the test user key.
struct OtherSshd {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OtherSshd {
    async fn start() -> Self {
        let env = ssh_env();
        let dir = tempfile::tempdir().unwrap();
        let host_key = dir.path().join("host_ed25519_key");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(&host_key)
            .status()
            .unwrap();
        assert!(status.success());
        let authorized = env.key_path.parent().unwrap().join("authorized_keys");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PidFile {}\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
                host_key.display(),
                authorized.display(),
                dir.path().join("sshd.pid").display()
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        eventually("the second sshd to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        OtherSshd { child, port, _dir: dir }
    }
}

impl Drop for OtherSshd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn fingerprint_of(pub_key_file: &Path) -> String {
    let text = std::fs::read_to_string(pub_key_file).unwrap();
    let key = russh::keys::PublicKey::from_openssh(text.trim()).unwrap();
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

fn sshd_addr() -> SocketAddr {
    let t = ssh_env().target;
    format!("{}:{}", t.host, t.port).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_host_key_is_recorded_then_pinned() {
    let env = ssh_env();
    let expected = fingerprint_of(&env.host_key_pub);
    let other = OtherSshd::start().await;
    let proxy = Proxy::start(sshd_addr()).await;

    let exec = ssh_connect(proxy.target()).await;
    assert_eq!(exec.host_key_fingerprint(), Some(expected.clone()));
    assert!(exec.run("true", opts(30)).await.unwrap().success());

    // The same address now answers with another host key: reconnecting must refuse it.
    *proxy.target.lock().unwrap() = format!("127.0.0.1:{}", other.port).parse().unwrap();
    exec.close().await;
    let err = exec.run("true", opts(30)).await.unwrap_err();
    match &err {
        RemoteError::HostKeyChanged { expected: e, actual, .. } => {
            assert_eq!(e, &expected);
            assert_ne!(actual, &expected);
        }
        other => panic!("expected HostKeyChanged, got {other:?}"),
    }
    assert!(err.to_string().contains("host key"), "{err}");

    // Connecting with a pinned fingerprint to a machine with another key fails at once.
    let key = SshKey::from_file(&env.key_path).unwrap();
    let target = SshTarget { host: "127.0.0.1".into(), port: other.port, user: env.target.user.clone() };
    let err = SshExec::connect(target.clone(), key.clone(), Some(expected.clone()), test_options())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, RemoteError::HostKeyChanged { .. }), "{err:?}");
    // Without a pin the other machine is fine (recorded on first contact).
    let fresh = SshExec::connect(target, key, None, test_options()).await.unwrap();
    assert_ne!(fresh.host_key_fingerprint(), Some(expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_upload_resumes_after_the_connection_drops() {
    let proxy = Proxy::start(sshd_addr()).await;
    let exec = ssh_connect(proxy.target()).await;
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let src = local.path().join("big.bin");
    random_file(&src, BIG, 11);
    let (sha, _) = super::sha256_file(&src).await.unwrap();
    let dest = remote.path().join("big.bin").display().to_string();

    proxy.cut_after(120 * 1024 * 1024);
    let outcome = exec.upload_resumable(&src, &dest).await.unwrap();
    assert_eq!(outcome.report.sha256, sha);
    assert!(!outcome.report.skipped);
    let resumed = outcome.resumed_from.expect("the upload should have resumed");
    assert!(resumed > 0 && resumed < BIG as u64, "{resumed}");
    // Only the missing part travelled over the new connection (plus protocol overhead).
    let after = proxy.after_cut.load(Ordering::SeqCst);
    assert!(after < BIG as u64 - resumed / 2, "sent {after} bytes after the cut, resumed at {resumed}");
    assert_eq!(super::sha256_file(Path::new(&dest)).await.unwrap().0, sha);
    assert!(!Path::new(&format!("{dest}.part")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_download_resumes_after_the_connection_drops() {
    let proxy = Proxy::start(sshd_addr()).await;
    let exec = ssh_connect(proxy.target()).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("remote.bin");
    random_file(&src, 64 * 1024 * 1024, 12);
    let (sha, _) = super::sha256_file(&src).await.unwrap();
    proxy.cut_after(20 * 1024 * 1024);
    let dest = dir.path().join("local.bin");
    let report = exec.download(&src.display().to_string(), &dest, u64::MAX).await.unwrap();
    assert_eq!(report.sha256, sha);
    assert_eq!(super::sha256_file(&dest).await.unwrap().0, sha);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_reuses_one_connection_for_many_commands() {
    let f = ssh_fixture().await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let out = f.exec.run("echo \"$SSH_CLIENT\"", opts(30)).await.unwrap();
        seen.insert(out.stdout_lossy());
    }
    assert_eq!(seen.len(), 1, "commands used several connections: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_wrong_key_is_refused_after_retries_and_key_bytes_work() {
    let env = ssh_env();
    let dir = tempfile::tempdir().unwrap();
    let other_key = dir.path().join("other");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&other_key)
        .status()
        .unwrap();
    assert!(status.success());
    let options = SshOptions {
        connect_deadline: Duration::from_secs(2),
        initial_backoff: Duration::from_millis(200),
        ..Default::default()
    };
    let key = SshKey::from_file(&other_key).unwrap();
    let err = SshExec::connect(env.target.clone(), key, None, options.clone()).await.err().unwrap();
    assert!(matches!(err, RemoteError::AuthRefused { .. }), "{err:?}");
    // A closed port is retried until the deadline, then reported as a connect failure.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let target = SshTarget { port: closed, ..env.target.clone() };
    let key = SshKey::from_bytes(&std::fs::read(&env.key_path).unwrap()).unwrap();
    assert!(!format!("{key:?}").contains("PRIVATE"));
    let err = SshExec::connect(target, key.clone(), None, options).await.err().unwrap();
    assert!(matches!(err, RemoteError::Connect { .. }), "{err:?}");
    // The key from bytes (as from a Kubernetes Secret) authenticates.
    let exec = SshExec::connect(env.target, key, None, test_options()).await.unwrap();
    assert!(exec.run("true", opts(30)).await.unwrap().success());
    assert!(SshKey::from_bytes(b"not a key").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_connect_waits_for_a_booting_machine() {
    // Nothing listens yet; the relay appears a moment later, like sshd on a booting instance.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let target = SshTarget { host: "127.0.0.1".into(), port, user: ssh_env().target.user };
    let connecting = tokio::spawn(ssh_connect(target));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(sshd_addr()).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    let exec = connecting.await.unwrap();
    assert!(exec.run("true", opts(30)).await.unwrap().success());
}

/// `$SSH_CLIENT` of a new command: names the TCP connection it came over.
async fn ssh_client_of(exec: &SshExec) -> String {
    exec.run("echo \"$SSH_CLIENT\"", opts(30)).await.unwrap().stdout_lossy()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_a_timed_out_command_drops_its_connection_and_the_next_call_reconnects() {
    let exec = ssh_connect(ssh_env().target).await;
    let before = ssh_client_of(&exec).await;
    assert_eq!(ssh_client_of(&exec).await, before, "commands should share a connection");
    let err = exec.run("sleep 30", opts(1)).await.unwrap_err();
    assert_eq!(err.timeout_phase(), Some(Phase::Output), "{err:?}");
    assert_ne!(ssh_client_of(&exec).await, before, "the timed-out connection was used again");
}

/// Options for the frozen-machine tests: short limits, no retries of transfers.
fn frozen_options() -> SshOptions {
    SshOptions {
        request_timeout: Duration::from_secs(2),
        transfer_stall_timeout: Duration::from_secs(2),
        kill_timeout: Duration::from_secs(2),
        ..test_options()
    }
}

async fn ssh_connect_with(target: SshTarget, options: SshOptions) -> SshExec {
    let key = SshKey::from_file(&ssh_env().key_path).expect("key");
    SshExec::connect(target, key, None, options).await.expect("connect to the test sshd")
}

/// Runs `op`, which must fail with a timeout at `phase` well before a generous limit.
async fn times_out_at<T: std::fmt::Debug>(
    phase: Phase,
    op: impl std::future::Future<Output = Result<T, RemoteError>>,
) -> RemoteError {
    let result =
        tokio::time::timeout(Duration::from_secs(60), op).await.expect("the operation outlived its deadline");
    let err = result.unwrap_err();
    assert_eq!(err.timeout_phase(), Some(phase), "{err:?}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_a_machine_that_stops_answering_fails_each_operation_at_its_deadline() {
    let proxy = Proxy::start(sshd_addr()).await;
    let exec = ssh_connect_with(proxy.target(), frozen_options()).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    std::fs::write(&log, b"hello").unwrap();
    let log = log.display().to_string();

    // A live connection, then silence: the channel is never opened.
    proxy.freeze_after(0);
    let err = times_out_at(Phase::ChannelOpen, exec.run("true", opts(2))).await;
    assert!(err.to_string().starts_with("the machine did not answer the request to open a channel"), "{err}");
    proxy.thaw();
    // The next command reconnects and works.
    assert!(exec.run("true", opts(30)).await.unwrap().success());

    // SFTP on a fresh connection: never started.
    exec.close().await;
    assert!(exec.run("true", opts(30)).await.unwrap().success());
    proxy.freeze_after(0);
    times_out_at(Phase::ChannelOpen, exec.read_from(&log, 0, 10)).await;
    proxy.thaw();
    assert_eq!(exec.read_from(&log, 0, 10).await.unwrap().data, b"hello");
    // SFTP started, then a request is never answered; pid_alive likewise.
    proxy.freeze_after(0);
    times_out_at(Phase::FileRequest, exec.read_from(&log, 0, 10)).await;
    proxy.thaw();
    assert_eq!(exec.read_from(&log, 0, 10).await.unwrap().data, b"hello");
    proxy.freeze_after(0);
    times_out_at(Phase::FileRequest, exec.pid_alive(std::process::id())).await;
    proxy.thaw();
    assert!(exec.pid_alive(std::process::id()).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_a_transfer_that_stops_moving_fails_at_the_stall_limit() {
    let proxy = Proxy::start(sshd_addr()).await;
    let exec = ssh_connect_with(proxy.target(), frozen_options()).await;
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let src = local.path().join("big.bin");
    random_file(&src, 64 * 1024 * 1024, 13);
    let dest = remote.path().join("big.bin").display().to_string();

    proxy.freeze_after(8 * 1024 * 1024);
    let err = times_out_at(Phase::TransferStalled, exec.upload(&src, &dest)).await;
    assert_eq!(err.to_string(), "the transfer made no progress for 2s");
    proxy.thaw();

    proxy.freeze_after(8 * 1024 * 1024);
    let back = local.path().join("back.bin");
    times_out_at(Phase::TransferStalled, exec.download(&src.display().to_string(), &back, u64::MAX)).await;
    proxy.thaw();
    // Both work once the machine answers again.
    exec.upload(&src, &dest).await.unwrap();
    exec.download(&dest, &back, u64::MAX).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tests/ environment"]
async fn ssh_a_transfer_that_outlasts_its_overall_limit_fails_at_it() {
    // A stall limit far away, an overall limit near: the overall one ends the transfer.
    let options = SshOptions {
        transfer_stall_timeout: Duration::from_secs(120),
        transfer_deadline: Duration::from_secs(3),
        ..frozen_options()
    };
    let proxy = Proxy::start(sshd_addr()).await;
    let exec = ssh_connect_with(proxy.target(), options).await;
    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let src = local.path().join("big.bin");
    random_file(&src, 64 * 1024 * 1024, 14);
    let dest = remote.path().join("big.bin").display().to_string();

    proxy.freeze_after(8 * 1024 * 1024);
    let err = times_out_at(Phase::TransferDeadline, exec.upload(&src, &dest)).await;
    assert_eq!(err.to_string(), "the transfer did not finish within 3s");
    proxy.thaw();

    proxy.freeze_after(8 * 1024 * 1024);
    let back = local.path().join("back.bin");
    times_out_at(Phase::TransferDeadline, exec.download(&src.display().to_string(), &back, u64::MAX)).await;
    proxy.thaw();
}
