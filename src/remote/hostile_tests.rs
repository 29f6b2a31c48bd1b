//! `SshExec` and the controller's SSH probe against a machine that misbehaves on purpose
//! (`hostile.rs`, in this process): every mode ends in an error that names what the machine did,
//! within a generous limit, and the next call after a timeout reconnects. One case the hostile
//! server has no mode for (a channel whose window never opens) uses a small server of its own.

use std::sync::Arc;
use std::time::Duration;

use super::hostile::{Authorized, HostileConfig, HostileServer, Mode};
use super::ssh::{SshExec, SshKey, SshOptions, SshTarget};
use super::{OutputChunk, Phase, RemoteError, RemoteExec, RunOptions};
use crate::machine::SshProbe;
use crate::machine::probe::RusshProbe;

fn key() -> SshKey {
    let (private, _) = crate::machine::key::generate_key("hostile-test").unwrap();
    SshKey::from_bytes(private.as_bytes()).unwrap()
}

fn private_key() -> String {
    crate::machine::key::generate_key("hostile-test").unwrap().0
}

/// Short limits everywhere, so each case ends in seconds.
fn options() -> SshOptions {
    SshOptions {
        attempt_timeout: Duration::from_secs(2),
        connect_deadline: Duration::from_secs(3),
        initial_backoff: Duration::from_millis(100),
        request_timeout: Duration::from_secs(2),
        transfer_stall_timeout: Duration::from_secs(2),
        kill_timeout: Duration::from_secs(2),
        ..SshOptions::default()
    }
}

fn target(port: u16) -> SshTarget {
    SshTarget { host: "127.0.0.1".into(), port, user: "root".into() }
}

async fn server(mode: Mode) -> HostileServer {
    HostileServer::start(HostileConfig { mode, ..HostileConfig::new(Authorized::AnyKey) }).await.unwrap()
}

async fn connect(server: &HostileServer) -> SshExec {
    SshExec::connect(target(server.port()), key(), None, options())
        .await
        .expect("connect to the hostile server")
}

fn quick() -> RunOptions {
    RunOptions::with_timeout(Duration::from_secs(2))
}

/// Awaits `op`, which must end within a generous limit (never a measure of speed).
async fn ends<T>(op: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), op).await.expect("the operation outlived its deadline")
}

fn assert_phase(err: &RemoteError, phase: Phase) {
    assert_eq!(err.timeout_phase(), Some(phase), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_open_never_answered_times_out_and_the_next_call_reconnects() {
    let server = server(Mode::Normal).await;
    let exec = connect(&server).await;
    server.set_mode(Mode::HangOnChannelOpen);
    let err = ends(exec.run("true", quick())).await.unwrap_err();
    assert_phase(&err, Phase::ChannelOpen);
    assert_eq!(err.to_string(), "the machine did not answer the request to open a channel within 2s");
    server.set_mode(Mode::Normal);
    let before = server.counters().connections;
    assert!(ends(exec.run("true", quick())).await.unwrap().success());
    assert_eq!(server.counters().connections, before + 1, "the hung connection was used again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_request_never_answered_times_out_naming_it() {
    let server = server(Mode::HangOnExec).await;
    let exec = connect(&server).await;
    let err = ends(exec.run("true", quick())).await.unwrap_err();
    assert_phase(&err, Phase::ExecRequest);
    assert_eq!(err.to_string(), "the machine opened a channel but never answered the exec request within 2s");
    assert_eq!(err.machine_fault(), Some(super::MachineFault::Unresponsive));
    // SFTP needs a subsystem request, which is not answered either.
    let err = ends(exec.read_from("/etc/hostname", 0, 10)).await.unwrap_err();
    assert_phase(&err, Phase::SftpStart);
    let err = ends(exec.pid_alive(1)).await.unwrap_err();
    assert!(err.timeout_phase().is_some(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_command_still_needs_its_channel_and_exec_request_answered_promptly() {
    // A command allowed ten minutes (a dataset download) still meets the answer deadline: an
    // sshd that leaves the channel or the exec request unanswered is wedged, not busy.
    let long = RunOptions::with_timeout(Duration::from_secs(600));
    let prompt = SshOptions { answer_timeout: Duration::from_secs(1), ..options() };
    for (mode, phase) in
        [(Mode::HangOnExec, Phase::ExecRequest), (Mode::HangOnChannelOpen, Phase::ChannelOpen)]
    {
        let server = server(Mode::Normal).await;
        let exec = SshExec::connect(target(server.port()), key(), None, prompt.clone()).await.unwrap();
        server.set_mode(mode);
        let err = ends(exec.run("sleep 1", long.clone())).await.unwrap_err();
        assert_phase(&err, phase);
        assert!(err.to_string().ends_with("within 1s"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_never_ends_times_out_and_its_kill_is_bounded_too() {
    // Accepts the command, then nothing; the kill that follows meets the same machine.
    let server = server(Mode::HangAfterExec).await;
    let exec = connect(&server).await;
    let err = ends(exec.run("true", quick())).await.unwrap_err();
    assert_phase(&err, Phase::Output);
    assert_eq!(err.to_string(), "the command did not finish within 2s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_kept_within_the_limit_and_streams_no_more_than_it() {
    let server = server(Mode::FloodOutput).await;
    let exec = connect(&server).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let counting = tokio::spawn(async move {
        let mut streamed = 0;
        while let Some(OutputChunk::Stdout(b) | OutputChunk::Stderr(b)) = rx.recv().await {
            streamed += b.len();
        }
        streamed
    });
    // A deadline far off: the flood limit, not the deadline, must end the call.
    let capped = RunOptions { output_limit: 4096, ..RunOptions::with_timeout(Duration::from_secs(50)) };
    let err = ends(exec.run_streaming("yes", capped, tx)).await.unwrap_err();
    // It never exits: the flood is abandoned as the machine's doing once it passes the flood
    // limit; it was not kept, nor streamed past the output limit.
    let flood = crate::remote::bounds::flood_limit(4096);
    assert!(matches!(err, RemoteError::TooLarge { limit, .. } if limit == flood), "{err:?}");
    assert_eq!(err.machine_fault(), Some(crate::remote::MachineFault::Misbehaved));
    assert!(server.counters().bytes_sent > flood);
    assert!(counting.await.unwrap() <= 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_without_end_is_refused_at_the_line_limit() {
    // An upload's writer reports where to continue on its first line; this one never ends it.
    // The first command (which prepares the upload) is served normally.
    let server = server(Mode::Normal).await;
    server.set_mode_after_execs(Mode::EndlessLine, 1);
    let exec = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"data").unwrap();
    let dest = dir.path().join("uploaded").display().to_string();
    let err = ends(exec.upload(&file, &dest)).await.unwrap_err();
    assert!(
        matches!(&err, RemoteError::TooLarge { limit, .. } if *limit == super::bounds::LINE_LIMIT as u64),
        "{err:?}"
    );
    assert_eq!(err.machine_fault(), Some(super::MachineFault::Misbehaved));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_key_exchange_fails_the_connect_naming_the_handshake() {
    let server = server(Mode::StallKeyExchange).await;
    let err = ends(SshExec::connect(target(server.port()), key(), None, options())).await.err().unwrap();
    let chain = crate::error::error_chain(&err);
    assert!(matches!(err, RemoteError::Connect { .. }), "{err:?}");
    assert!(chain.contains("did not finish the SSH handshake"), "{chain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_is_refused() {
    let server = server(Mode::ChangeHostKey).await;
    let exec = connect(&server).await;
    assert_eq!(exec.host_key_fingerprint().as_deref(), Some(server.host_key_fingerprint()));
    exec.close().await;
    let err = ends(exec.run("true", quick())).await.unwrap_err();
    assert!(matches!(err, RemoteError::HostKeyChanged { .. }), "{err:?}");
}

// --- The controller's probe -----------------------------------------------------------------

async fn probe(server: &HostileServer) -> Result<String, String> {
    let probe = RusshProbe { deadline: Duration::from_secs(3) };
    ends(probe.probe(&target(server.port()), &private_key())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_passes_a_good_machine_and_names_what_a_bad_one_did() {
    let good = server(Mode::Normal).await;
    assert_eq!(probe(&good).await.unwrap(), good.host_key_fingerprint());
    for (mode, says) in [
        (Mode::HangOnChannelOpen, "did not answer the request to open a channel"),
        (Mode::HangOnExec, "never answered the exec request"),
        (Mode::HangAfterExec, "did not finish"),
        (Mode::FloodOutput, "output exceeded"),
        (Mode::EndlessLine, "output exceeded"),
        (Mode::StallKeyExchange, "did not finish the SSH handshake"),
    ] {
        let bad = server(mode).await;
        let err = probe(&bad).await.unwrap_err();
        assert!(err.contains(says), "{mode:?}: {err}");
    }
}

// --- A window that never opens --------------------------------------------------------------

/// Accepts any key, opens channels with a window of 0 and answers exec requests, and never reads
/// a byte: the client cannot send its input.
struct ZeroWindow {
    channels: Vec<russh::Channel<russh::server::Msg>>,
}

impl russh::server::Handler for ZeroWindow {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<russh::server::Auth, Self::Error> {
        Ok(russh::server::Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: russh::Channel<russh::server::Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        self.channels.push(channel);
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: russh::ChannelId,
        _data: &[u8],
        session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        let _ = session.channel_success(channel);
        Ok(())
    }
}

async fn zero_window_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let key = russh::keys::PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &rand::random::<[u8; 32]>(),
    ));
    let config = Arc::new(russh::server::Config { keys: vec![key], window_size: 0, ..Default::default() });
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let config = config.clone();
            tokio::spawn(async move {
                if let Ok(session) =
                    russh::server::run_stream(config, socket, ZeroWindow { channels: Vec::new() }).await
                {
                    let _ = session.await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_the_machine_never_takes_times_out_naming_it() {
    let port = zero_window_server().await;
    let exec = SshExec::connect(target(port), key(), None, options()).await.unwrap();
    let err = ends(exec.run("true", quick())).await.unwrap_err();
    assert_phase(&err, Phase::SendInput);
    assert_eq!(err.to_string(), "the machine accepted the command but did not take its input within 2s");
}
