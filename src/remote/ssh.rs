//! `RemoteExec` over SSH with russh: one connection per machine, reused for every command and
//! transfer, reopened (with the same pinned host key) when it drops.
//!
//! - Authentication: a private key (ed25519 expected) read from a file or from the bytes of a
//!   Kubernetes Secret. The key is never logged; `SshKey`'s `Debug` is redacted.
//! - Connecting retries with backoff until a deadline, because a freshly rented instance refuses,
//!   resets or ignores connections, and rejects the key until its start script has installed it.
//! - The host key is recorded on first contact (`host_key_fingerprint`, stored by the controller
//!   in `status.ssh.hostKeyFingerprint`) and pinned from then on: a different key is
//!   `RemoteError::HostKeyChanged`, never retried.
//! - Commands go to `sh -s` as a script on stdin, so environment values (secrets) never appear on
//!   a command line that `ps` shows, and the script records its pid so a command that runs past
//!   its timeout can be killed with its whole process group.
//! - Uploads stream over a plain exec channel into `cat` (no per-request framing, so they keep
//!   up with `scp`), into `<path>.part`, resumed from the part's size after a dropped connection,
//!   verified with SHA-256 on the machine (OpenSSL when present: several times faster than
//!   coreutils' `sha256sum`), then renamed. An identical file is not sent again. Downloads and
//!   log reads use SFTP with many requests in flight.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use russh_sftp::client::SftpSession;
use russh_sftp::protocol::StatusCode;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{OnceCell, mpsc};

use crate::metrics::TRANSPORT;

use super::{
    ExecOutput, FileChunk, OutputChunk, RemoteError, RemoteExec, RunOptions, TransferReport, shell_quote,
};

/// Where to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
}

impl std::fmt::Display for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.user, self.host, self.port)
    }
}

/// A private key for authentication. `Debug` never shows key material.
#[derive(Clone)]
pub struct SshKey {
    key: Arc<PrivateKey>,
}

impl std::fmt::Debug for SshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshKey").field("algorithm", &self.key.algorithm().as_str()).finish_non_exhaustive()
    }
}

/// Errors of reading a private key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to read the private key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    // The parser's message is left out on purpose: it could quote part of the key.
    #[error("the private key is not a valid unencrypted OpenSSH private key")]
    Parse,
}

impl SshKey {
    /// Reads an OpenSSH private key file (unencrypted).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let bytes =
            std::fs::read(path).map_err(|source| KeyError::Read { path: path.to_path_buf(), source })?;
        Self::from_bytes(&bytes)
    }

    /// Parses the content of an OpenSSH private key, e.g. the `ssh-privatekey` entry of a
    /// Kubernetes Secret.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(bytes).map_err(|_| KeyError::Parse)?;
        let key = russh::keys::decode_secret_key(text, None).map_err(|_| KeyError::Parse)?;
        Ok(Self { key: Arc::new(key) })
    }

    /// The public half in `authorized_keys` format, for the machine's start script.
    pub fn public_key_openssh(&self) -> String {
        self.key.public_key().to_openssh().unwrap_or_default()
    }
}

/// Tuning of the connection. The defaults suit a rented instance that is still booting.
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// Limit for one TCP connect plus handshake plus authentication.
    pub attempt_timeout: Duration,
    /// Give up connecting after this long (all attempts together).
    pub connect_deadline: Duration,
    /// First pause between attempts; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Keepalive interval; the connection is considered dead after `keepalive_max` missed replies.
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    /// How many times a transfer reconnects and resumes before it fails.
    pub transfer_attempts: u32,
}

impl Default for SshOptions {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(20),
            connect_deadline: Duration::from_secs(300),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 4,
            transfer_attempts: 5,
        }
    }
}

/// Runs commands and moves files on one machine over SSH.
pub struct SshExec {
    target: SshTarget,
    key: SshKey,
    options: SshOptions,
    config: Arc<client::Config>,
    /// SHA-256 fingerprint of the host key: given by the caller (pinned) or recorded on first contact.
    host_key: Arc<StdMutex<Option<String>>>,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

struct Connection {
    handle: client::Handle<Client>,
    sftp: OnceCell<Arc<SftpSession>>,
    _counted: OpenConnection,
}

/// Counts a connection in `gputrainer_ssh_connections_opened_total` and, while it lives, in
/// `gputrainer_ssh_connections_open`.
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        TRANSPORT.ssh_connections_opened.inc();
        TRANSPORT.ssh_connections_open.inc();
        Self
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        TRANSPORT.ssh_connections_open.dec();
    }
}

struct Client {
    expected: Option<String>,
    seen: Arc<StdMutex<Option<String>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let fingerprint = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.fingerprint(HashAlg::Sha256).to_string(),
            PublicKeyOrCertificate::Certificate(cert) => {
                cert.public_key().fingerprint(HashAlg::Sha256).to_string()
            }
        };
        let accept = self.expected.as_deref().is_none_or(|e| e == fingerprint);
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(fingerprint);
        }
        Ok(accept)
    }
}

/// Marks our upload writers on the machine (an argument of their shell).
const MARKER: &str = "gpu-trainer-upload";

/// Why one connection attempt failed.
enum AttemptError {
    /// Worth another attempt (the machine is still booting).
    Retry(Box<dyn std::error::Error + Send + Sync>),
    /// The key was refused; retried too (the key may not be installed yet), reported as such.
    Auth,
    /// Never retried.
    Fatal(RemoteError),
}

fn sftp_not_found(e: &russh_sftp::client::error::Error) -> bool {
    matches!(e, russh_sftp::client::error::Error::Status(s) if s.status_code == StatusCode::NoSuchFile)
}

impl SshExec {
    /// Connects (retrying while the machine boots) and authenticates. `host_key_fingerprint` is
    /// the pinned fingerprint from an earlier contact (`SHA256:...`), or `None` to record it now.
    pub async fn connect(
        target: SshTarget,
        key: SshKey,
        host_key_fingerprint: Option<String>,
        options: SshOptions,
    ) -> Result<Self, RemoteError> {
        let config = client::Config {
            keepalive_interval: Some(options.keepalive_interval),
            keepalive_max: options.keepalive_max,
            // A larger receive window and TCP_NODELAY keep downloads and short commands fast.
            window_size: 16 * 1024 * 1024,
            nodelay: true,
            preferred: russh::Preferred {
                // AES-GCM first: with AES-NI it is the cheapest cipher per byte (128-bit keys take
                // fewer rounds), which matters for multi-gigabyte transfers on a small controller.
                cipher: std::borrow::Cow::Borrowed(&[
                    russh::cipher::AES_128_GCM,
                    russh::cipher::AES_256_GCM,
                    russh::cipher::CHACHA20_POLY1305,
                    russh::cipher::AES_256_CTR,
                    russh::cipher::AES_128_CTR,
                ]),
                ..Default::default()
            },
            ..Default::default()
        };
        let exec = Self {
            target,
            key,
            options,
            config: Arc::new(config),
            host_key: Arc::new(StdMutex::new(host_key_fingerprint)),
            conn: tokio::sync::Mutex::new(None),
        };
        let started = Instant::now();
        let connected = exec.connection().await;
        exec.timed("connect", started);
        connected?;
        Ok(exec)
    }

    /// The host key's SHA-256 fingerprint (`SHA256:<base64>`), as recorded or pinned.
    pub fn host_key_fingerprint(&self) -> Option<String> {
        self.host_key.lock().ok().and_then(|g| g.clone())
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Records one operation's time (`gputrainer_ssh_operation_duration_seconds`, and a debug
    /// log line that benchmarks use to subtract the SSH time from the controller's own).
    fn timed(&self, operation: &'static str, started: Instant) {
        let took = started.elapsed();
        TRANSPORT.observe(operation, took);
        tracing::debug!(machine = %self.target, operation, seconds = took.as_secs_f64(), "SSH operation");
    }

    /// Closes the connection politely. Later calls reconnect.
    pub async fn close(&self) {
        let conn = self.conn.lock().await.take();
        if let Some(conn) = conn {
            let _ = conn.handle.disconnect(Disconnect::ByApplication, "", "en").await;
        }
    }

    async fn connect_once(&self) -> Result<Connection, AttemptError> {
        let expected = self.host_key_fingerprint();
        let seen = Arc::new(StdMutex::new(None));
        let handler = Client { expected: expected.clone(), seen: seen.clone() };
        let addr = (self.target.host.clone(), self.target.port);
        let connected = tokio::time::timeout(
            self.options.attempt_timeout,
            client::connect(self.config.clone(), addr, handler),
        )
        .await;
        let seen = seen.lock().ok().and_then(|g| g.clone());
        let mut handle = match connected {
            Err(_) => return Err(AttemptError::Retry("timed out".into())),
            Ok(Err(e)) => {
                if let (Some(expected), Some(actual)) = (expected, seen)
                    && expected != actual
                {
                    return Err(AttemptError::Fatal(RemoteError::HostKeyChanged {
                        target: self.target.to_string(),
                        expected,
                        actual,
                    }));
                }
                return Err(AttemptError::Retry(Box::new(e)));
            }
            Ok(Ok(handle)) => handle,
        };
        if let (Ok(mut pinned), Some(seen)) = (self.host_key.lock(), seen)
            && pinned.is_none()
        {
            tracing::info!(target = %self.target, fingerprint = %seen, "Recorded host key");
            *pinned = Some(seen);
        }
        let key = PrivateKeyWithHashAlg::new(self.key.key.clone(), None);
        let auth = tokio::time::timeout(
            self.options.attempt_timeout,
            handle.authenticate_publickey(self.target.user.clone(), key),
        )
        .await;
        match auth {
            Err(_) => Err(AttemptError::Retry("authentication timed out".into())),
            Ok(Err(e)) => Err(AttemptError::Retry(Box::new(e))),
            Ok(Ok(result)) if result.success() => {
                Ok(Connection { handle, sftp: OnceCell::new(), _counted: OpenConnection::new() })
            }
            Ok(Ok(_)) => Err(AttemptError::Auth),
        }
    }

    async fn connect_with_retry(&self) -> Result<Connection, RemoteError> {
        let deadline = tokio::time::Instant::now() + self.options.connect_deadline;
        let mut backoff = self.options.initial_backoff;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let err = match self.connect_once().await {
                Ok(conn) => return Ok(conn),
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(e) => e,
            };
            if tokio::time::Instant::now() + backoff >= deadline {
                return Err(match err {
                    AttemptError::Auth => RemoteError::AuthRefused { target: self.target.to_string() },
                    AttemptError::Retry(source) => {
                        RemoteError::Connect { target: self.target.to_string(), source }
                    }
                    AttemptError::Fatal(e) => e,
                });
            }
            match &err {
                AttemptError::Auth => {
                    tracing::debug!(target = %self.target, attempt, "Key not accepted yet, retrying")
                }
                AttemptError::Retry(e) => {
                    tracing::debug!(target = %self.target, attempt, error = %e, "Connect failed, retrying")
                }
                AttemptError::Fatal(_) => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.options.max_backoff);
        }
    }

    /// The live connection, reconnecting when the last one dropped.
    async fn connection(&self) -> Result<Arc<Connection>, RemoteError> {
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_ref()
            && !conn.handle.is_closed()
        {
            return Ok(conn.clone());
        }
        *guard = None;
        let conn = Arc::new(self.connect_with_retry().await?);
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the current connection so the next call reconnects.
    async fn drop_connection(&self) {
        // Taken out under the lock, closed after it is released.
        let old = self.conn.lock().await.take();
        drop(old);
    }

    /// Forgets `conn` (if still current) so the next call reconnects.
    async fn discard(&self, conn: &Arc<Connection>) {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *guard = None;
        }
    }

    async fn open_channel(&self) -> Result<(Arc<Connection>, russh::Channel<client::Msg>), RemoteError> {
        let conn = self.connection().await?;
        match conn.handle.channel_open_session().await {
            Ok(ch) => Ok((conn, ch)),
            Err(_) => {
                // A connection that died quietly fails here first: reconnect once.
                self.discard(&conn).await;
                let conn = self.connection().await?;
                let ch = conn
                    .handle
                    .channel_open_session()
                    .await
                    .map_err(|e| RemoteError::io(format!("open a channel to {}", self.target), e))?;
                Ok((conn, ch))
            }
        }
    }

    async fn sftp(&self) -> Result<(Arc<Connection>, Arc<SftpSession>), RemoteError> {
        let conn = self.connection().await?;
        let sftp = conn
            .sftp
            .get_or_try_init(|| async {
                let channel = conn.handle.channel_open_session().await?;
                channel.request_subsystem(true, "sftp").await?;
                let cfg = russh_sftp::client::Config {
                    // Many large writes in flight: the transfer is limited by the link, not by
                    // round trips.
                    max_concurrent_writes: 64,
                    max_concurrent_reads: 64,
                    max_write_packet_len: 256 * 1024,
                    max_packet_len: 256 * 1024 + 1024,
                    request_timeout_secs: 60,
                };
                let session = SftpSession::new_with_config(channel.into_stream(), cfg)
                    .await
                    .map_err(|e| russh::Error::IO(std::io::Error::other(e)))?;
                Ok::<_, russh::Error>(Arc::new(session))
            })
            .await
            .map_err(|e| RemoteError::io(format!("start SFTP on {}", self.target), e))?
            .clone();
        Ok((conn, sftp))
    }

    /// A small file read to its end over SFTP whatever size it reports (`/proc` files report 0);
    /// `None` when it does not exist.
    async fn read_whole(&self, path: &str) -> Result<Option<String>, RemoteError> {
        let (conn, sftp) = self.sftp().await?;
        let result = async {
            let mut file = match sftp.open(path).await {
                Ok(file) => file,
                Err(e) if sftp_not_found(&e) => return Ok(None),
                Err(e) => return Err(map_sftp(path, "open", e)),
            };
            let mut data = Vec::new();
            (&mut file)
                .take(64 * 1024)
                .read_to_end(&mut data)
                .await
                .map_err(|e| RemoteError::io(format!("read {path}"), e))?;
            let _ = file.shutdown().await;
            Ok(Some(String::from_utf8_lossy(&data).into_owned()))
        }
        .await;
        if matches!(result, Err(RemoteError::Io { .. })) && conn.handle.is_closed() {
            self.discard(&conn).await;
        }
        result
    }

    /// One read of a file over SFTP (timed by the caller).
    async fn read_from_inner(
        &self,
        remote_path: &str,
        offset: u64,
        max_len: u64,
    ) -> Result<FileChunk, RemoteError> {
        let (conn, sftp) = self.sftp().await?;
        let result = async {
            let mut file = sftp.open(remote_path).await.map_err(|e| map_sftp(remote_path, "open", e))?;
            let file_size = file.metadata().await.map_err(|e| map_sftp(remote_path, "stat", e))?.len();
            let mut data = Vec::new();
            if offset < file_size {
                file.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(|e| RemoteError::io(format!("seek {remote_path}"), e))?;
                (&mut file)
                    .take(max_len.min(file_size - offset))
                    .read_to_end(&mut data)
                    .await
                    .map_err(|e| RemoteError::io(format!("read {remote_path}"), e))?;
            }
            let _ = file.shutdown().await;
            Ok(FileChunk { offset, data, file_size })
        }
        .await;
        if matches!(result, Err(RemoteError::Io { .. })) && conn.handle.is_closed() {
            self.discard(&conn).await;
        }
        result
    }

    async fn run_inner(
        &self,
        command: &str,
        opts: RunOptions,
        output: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<ExecOutput, RemoteError> {
        let nonce = hex::encode(rand::random::<[u8; 12]>());
        let script = command_script(command, &opts.env, &nonce)?;
        let (conn, mut channel) = self.open_channel().await?;
        let io_err = |e: russh::Error| RemoteError::io(format!("run a command on {}", self.target), e);
        channel.exec(true, "sh -s").await.map_err(io_err)?;
        channel.data_bytes(script.into_bytes()).await.map_err(io_err)?;
        channel.eof().await.map_err(io_err)?;

        let deadline = tokio::time::Instant::now() + opts.timeout;
        let mut out = ExecOutput { exit_code: None, stdout: Vec::new(), stderr: Vec::new() };
        loop {
            let msg = match tokio::time::timeout_at(deadline, channel.wait()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(_) => {
                    let _ = channel.close().await;
                    self.kill_command(&nonce).await;
                    return Err(RemoteError::Timeout(opts.timeout));
                }
            };
            match msg {
                ChannelMsg::Data { data } => {
                    out.stdout.extend_from_slice(&data);
                    if let Some(tx) = &output {
                        let _ = tx.send(OutputChunk::Stdout(data.to_vec())).await;
                    }
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    out.stderr.extend_from_slice(&data);
                    if let Some(tx) = &output {
                        let _ = tx.send(OutputChunk::Stderr(data.to_vec())).await;
                    }
                }
                ChannelMsg::ExitStatus { exit_status } => out.exit_code = i32::try_from(exit_status).ok(),
                _ => {}
            }
        }
        if out.exit_code.is_none() && conn.handle.is_closed() {
            // The connection died under the command: its outcome is unknown, not "killed".
            self.discard(&conn).await;
            return Err(RemoteError::io(
                format!("run a command on {}", self.target),
                "the connection was lost before the command finished",
            ));
        }
        Ok(out)
    }

    /// Kills the process group of a command that ran past its timeout, found through the pid
    /// file its script wrote.
    async fn kill_command(&self, nonce: &str) {
        let pid_file = format!("/tmp/.gpu-trainer-run-{nonce}.pid");
        let script = format!(
            "pid=$(cat {pid_file} 2>/dev/null) || exit 0\n\
             pg=$(cut -d' ' -f5 /proc/$pid/stat 2>/dev/null) || pg=\n\
             if [ -n \"$pg\" ] && [ \"$pg\" -gt 1 ]; then kill -TERM -$pg 2>/dev/null; sleep 1; kill -KILL -$pg 2>/dev/null; \
             else kill -KILL $pid 2>/dev/null; fi\n\
             rm -f {pid_file}\n"
        );
        let opts = RunOptions { timeout: Duration::from_secs(30), env: Vec::new() };
        if let Err(e) = Box::pin(self.run_inner(&script, opts, None)).await {
            tracing::warn!(target = %self.target, error = %e, "Failed to kill a timed-out command");
        }
    }

    /// Runs a step of a larger operation (not timed on its own: the operation is).
    async fn run_checked(&self, command: &str, what: &str) -> Result<ExecOutput, RemoteError> {
        let out = self
            .run_inner(command, RunOptions { timeout: Duration::from_secs(600), env: Vec::new() }, None)
            .await?;
        if !out.success() {
            return Err(RemoteError::io(
                format!("{what} on {}", self.target),
                format!("exit code {:?}: {}", out.exit_code, out.stderr_lossy().trim()),
            ));
        }
        Ok(out)
    }

    /// SHA-256 of a remote file, `None` when it does not exist.
    pub async fn remote_sha256(&self, path: &str) -> Result<Option<String>, RemoteError> {
        let q = shell_quote(path)?;
        let out = self
            .run_checked(
                &format!("if [ -f {q} ]; then {}; else echo absent; fi", super::sha256_shell(&q)),
                "hash a file",
            )
            .await?;
        let text = out.stdout_lossy();
        let text = text.trim();
        Ok(if text == "absent" { None } else { Some(text.to_string()) })
    }

    /// Uploads like [`RemoteExec::upload`] and also says where a resumed transfer started.
    pub async fn upload_resumable(
        &self,
        local_path: &Path,
        remote_path: &str,
    ) -> Result<UploadOutcome, RemoteError> {
        let size = tokio::fs::metadata(local_path).await.map_err(|e| super::open_error(local_path, e))?.len();
        let q = shell_quote(remote_path)?;
        let parent =
            Path::new(remote_path).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let mkdir =
            if parent.is_empty() { String::new() } else { format!("mkdir -p {} && ", shell_quote(&parent)?) };
        // One round trip: create the folder and learn the size of any existing file.
        let out = self
            .run_checked(
                &format!("{mkdir}if [ -f {q} ]; then wc -c < {q}; else echo -1; fi"),
                "prepare an upload",
            )
            .await?;
        let existing: i64 = out.stdout_lossy().trim().parse().unwrap_or(-1);
        // Hash the local file on another core while the bytes travel.
        let local_hash = {
            let path = local_path.to_path_buf();
            tokio::spawn(async move { super::sha256_file(&path).await })
        };
        if existing == size as i64 {
            let local = join_hash(local_hash).await?;
            if self.remote_sha256(remote_path).await?.as_deref() == Some(local.as_str()) {
                return Ok(UploadOutcome {
                    report: TransferReport { bytes: size, sha256: local, skipped: true },
                    resumed_from: None,
                });
            }
            return self.transfer_up(local_path, remote_path, size, Some(local), None).await;
        }
        self.transfer_up(local_path, remote_path, size, None, Some(local_hash)).await
    }

    async fn transfer_up(
        &self,
        local_path: &Path,
        remote_path: &str,
        size: u64,
        mut local_sha: Option<String>,
        mut pending_hash: Option<HashTask>,
    ) -> Result<UploadOutcome, RemoteError> {
        let part = format!("{remote_path}.part");
        let mut resumed_from = None;
        let mut restarted = false;
        let started = std::time::Instant::now();
        'transfer: loop {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.send_part(local_path, &part, size).await {
                    Ok(start) => {
                        if start > 0 && resumed_from.is_none() {
                            resumed_from = Some(start);
                        }
                        break;
                    }
                    Err((e, fatal)) if fatal || attempt >= self.options.transfer_attempts => return Err(e),
                    Err((e, _)) => {
                        tracing::warn!(target = %self.target, attempt, error = %e, "Upload interrupted, resuming");
                        self.drop_connection().await;
                    }
                }
            }
            tracing::debug!(target = %self.target, elapsed = ?started.elapsed(), "Upload sent");
            let local = match (local_sha.take(), pending_hash.take()) {
                (Some(sha), _) => sha,
                (None, Some(handle)) => join_hash(handle).await?,
                (None, None) => super::sha256_file(local_path).await?.0,
            };
            tracing::debug!(target = %self.target, elapsed = ?started.elapsed(), "Local hash ready");
            let remote = self.remote_sha256(&part).await?.unwrap_or_default();
            tracing::debug!(target = %self.target, elapsed = ?started.elapsed(), "Remote hash ready");
            if remote != local {
                // A corrupt part must not be resumed again.
                let _ = self.run(&format!("rm -f {}", shell_quote(&part)?), RunOptions::default()).await;
                if resumed_from.is_some() && !restarted {
                    // The part may have come from another file of the same name: start over once.
                    tracing::warn!(target = %self.target, "Resumed upload did not verify, starting over");
                    restarted = true;
                    resumed_from = None;
                    local_sha = Some(local);
                    continue 'transfer;
                }
                return Err(RemoteError::ChecksumMismatch {
                    path: remote_path.to_string(),
                    expected: local,
                    actual: remote,
                });
            }
            let q = shell_quote(&part)?;
            // The size check is cheap insurance against a part that changed after hashing.
            self.run_checked(
                &format!(
                    "[ \"$(wc -c < {q})\" -eq {size} ] && mv -f {q} {} && rm -f {q}.writer",
                    shell_quote(remote_path)?
                ),
                "rename an upload",
            )
            .await?;
            return Ok(UploadOutcome {
                report: TransferReport { bytes: size, sha256: local, skipped: false },
                resumed_from,
            });
        }
    }

    /// Sends the missing tail of `part` over a plain exec channel running `cat` (no SFTP
    /// framing: the bytes go straight into the channel window, which is what keeps up with
    /// `scp`). The remote script first stops a writer left over from a dropped connection, then
    /// reports the part's size, which is where this attempt continues. (Hashing on the machine
    /// while the bytes stream, behind `tee`, was measured slower on a busy 2-core machine than
    /// hashing the finished file with OpenSSL.) Returns the offset; the error says whether
    /// retrying is pointless.
    async fn send_part(&self, local_path: &Path, part: &str, size: u64) -> Result<u64, (RemoteError, bool)> {
        let retry = |op: &str, e: russh::Error| (RemoteError::io(format!("{op} {part}"), e), false);
        let q = shell_quote(part).map_err(|e| (e, true))?;
        // The writer's process group (the session sshd made for this channel) is recorded, so a
        // writer orphaned by a dropped connection is stopped before the next attempt measures
        // the part. The marker argument makes sure we only ever signal our own writers (and is why
        // the shell runs `cat` as a child instead of `exec`ing it: the shell keeps the marker).
        let script = format!(
            "part={q}\nw=\"$part.writer\"\n\
             old=$(cat \"$w\" 2>/dev/null) || old=\n\
             if [ -n \"$old\" ] && grep -q {MARKER} /proc/$old/cmdline 2>/dev/null && kill -TERM -$old 2>/dev/null; then \
             while kill -0 \"$old\" 2>/dev/null; do sleep 0.05; done; fi\n\
             pg=$(cut -d' ' -f5 /proc/$$/stat 2>/dev/null) || pg=$$\n\
             echo \"$pg\" > \"$w\"\n\
             [ -f \"$part\" ] || : > \"$part\"\n\
             size=$(wc -c < \"$part\")\n\
             if [ \"$size\" -gt {size} ]; then : > \"$part\"; size=0; fi\n\
             echo \"$size\"\n\
             cat >> \"$part\"\n"
        );
        let (conn, mut channel) = self.open_channel().await.map_err(|e| (e, false))?;
        let command = format!("sh -c {} {MARKER}", shell_quote(&script).map_err(|e| (e, true))?);
        channel.exec(true, command).await.map_err(|e| retry("start writing", e))?;
        let mut first = Vec::new();
        while !first.contains(&b'\n') {
            match channel.wait().await {
                Some(ChannelMsg::Data { data }) => first.extend_from_slice(&data),
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    let e = RemoteError::io(
                        format!("write {part}"),
                        format!("the writer exited with {exit_status}"),
                    );
                    return Err((e, true));
                }
                Some(_) => {}
                None => return Err((RemoteError::io(format!("write {part}"), "the channel closed"), false)),
            }
        }
        let start: u64 = String::from_utf8_lossy(&first).trim().parse().map_err(|_| {
            (RemoteError::io(format!("write {part}"), "the writer did not report the part's size"), true)
        })?;
        let mut local =
            tokio::fs::File::open(local_path).await.map_err(|e| (super::open_error(local_path, e), true))?;
        if start > 0 {
            local
                .seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| (RemoteError::io("seek the local file", e), true))?;
        }
        let reader = tokio::io::BufReader::with_capacity(1 << 20, local);
        // russh does not wake a sender waiting for window space when the connection dies, so a
        // watchdog ends the send once the connection is gone.
        let dead = async {
            while !conn.handle.is_closed() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        tokio::select! {
            sent = channel.data(reader) => sent.map_err(|e| retry("send", e))?,
            () = dead => return Err((RemoteError::io(format!("write {part}"), "the connection was lost"), false)),
        }
        channel.eof().await.map_err(|e| retry("finish", e))?;
        loop {
            match channel.wait().await {
                Some(ChannelMsg::ExitStatus { exit_status: 0 }) => return Ok(start),
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    let e = RemoteError::io(
                        format!("write {part}"),
                        format!("the writer exited with {exit_status}"),
                    );
                    return Err((e, false));
                }
                Some(_) => {}
                None => return Err((RemoteError::io(format!("write {part}"), "the channel closed"), false)),
            }
        }
    }

    async fn transfer_down(
        &self,
        remote_path: &str,
        local_path: &Path,
    ) -> Result<TransferReport, RemoteError> {
        let remote_sha = self
            .remote_sha256(remote_path)
            .await?
            .ok_or_else(|| RemoteError::NotFound { path: remote_path.to_string() })?;
        if let Ok((local, bytes)) = super::sha256_file(local_path).await
            && local == remote_sha
        {
            return Ok(TransferReport { bytes, sha256: local, skipped: true });
        }
        if let Some(parent) = local_path.parent()
            && !parent.as_os_str().is_empty()
        {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| RemoteError::io(format!("create {}", parent.display()), e))?;
        }
        let mut name = local_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".part");
        let part = local_path.with_file_name(name);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.receive_part(remote_path, &part).await {
                Ok(()) => break,
                Err(e) if attempt >= self.options.transfer_attempts => return Err(e),
                Err(e) => {
                    tracing::warn!(target = %self.target, attempt, error = %e, "Download interrupted, resuming");
                    self.drop_connection().await;
                }
            }
        }
        let (local, bytes) = super::sha256_file(&part).await?;
        if local != remote_sha {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(RemoteError::ChecksumMismatch {
                path: remote_path.to_string(),
                expected: remote_sha,
                actual: local,
            });
        }
        tokio::fs::rename(&part, local_path)
            .await
            .map_err(|e| RemoteError::io(format!("rename {}", part.display()), e))?;
        Ok(TransferReport { bytes, sha256: local, skipped: false })
    }

    async fn receive_part(&self, remote_path: &str, part: &Path) -> Result<(), RemoteError> {
        let (_conn, sftp) = self.sftp().await?;
        let start = tokio::fs::metadata(part).await.map(|m| m.len()).unwrap_or(0);
        let mut remote = sftp.open(remote_path).await.map_err(|e| map_sftp(remote_path, "open", e))?;
        let size = remote.metadata().await.map_err(|e| map_sftp(remote_path, "stat", e))?.len();
        let start = if start > size { 0 } else { start };
        let mut local = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(start == 0)
            .open(part)
            .await
            .map_err(|e| RemoteError::io(format!("open {}", part.display()), e))?;
        if start > 0 {
            local.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| RemoteError::io("seek", e))?;
            remote.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| RemoteError::io("seek", e))?;
        }
        let mut buf = vec![0u8; 4 << 20];
        loop {
            let n =
                remote.read(&mut buf).await.map_err(|e| RemoteError::io(format!("read {remote_path}"), e))?;
            if n == 0 {
                break;
            }
            local
                .write_all(&buf[..n])
                .await
                .map_err(|e| RemoteError::io(format!("write {}", part.display()), e))?;
        }
        local.flush().await.map_err(|e| RemoteError::io(format!("write {}", part.display()), e))?;
        Ok(())
    }
}

/// An upload's report and, when it continued a part left by a dropped connection, the offset it
/// continued from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadOutcome {
    pub report: TransferReport,
    pub resumed_from: Option<u64>,
}

type HashTask = tokio::task::JoinHandle<Result<(String, u64), RemoteError>>;

async fn join_hash(handle: HashTask) -> Result<String, RemoteError> {
    Ok(handle.await.map_err(|e| RemoteError::io("hash the local file", e))??.0)
}

fn map_sftp(path: &str, op: &str, e: russh_sftp::client::error::Error) -> RemoteError {
    if sftp_not_found(&e) {
        RemoteError::NotFound { path: path.to_string() }
    } else {
        RemoteError::io(format!("{op} {path}"), e)
    }
}

/// The script fed to `sh -s` on the machine: records its pid (for killing on timeout), exports
/// the environment (values quoted, never on a command line) and runs `command` with `sh -c`,
/// stdin closed.
fn command_script(command: &str, env: &[(String, String)], nonce: &str) -> Result<String, RemoteError> {
    let pid_file = format!("/tmp/.gpu-trainer-run-{nonce}.pid");
    let mut script = format!("echo $$ > {pid_file}\ntrap 'rm -f {pid_file}' EXIT\n");
    for (name, value) in env {
        super::check_env_name(name)?;
        script.push_str(&format!("{name}={}\nexport {name}\n", shell_quote(value)?));
    }
    script.push_str(&format!("sh -c {} </dev/null\n", shell_quote(command)?));
    Ok(script)
}

#[async_trait]
impl RemoteExec for SshExec {
    async fn run(&self, command: &str, opts: RunOptions) -> Result<ExecOutput, RemoteError> {
        let started = Instant::now();
        let result = self.run_inner(command, opts, None).await;
        self.timed("run", started);
        result
    }

    async fn run_streaming(
        &self,
        command: &str,
        opts: RunOptions,
        output: mpsc::Sender<OutputChunk>,
    ) -> Result<ExecOutput, RemoteError> {
        let started = Instant::now();
        let result = self.run_inner(command, opts, Some(output)).await;
        self.timed("run", started);
        result
    }

    async fn upload(&self, local_path: &Path, remote_path: &str) -> Result<TransferReport, RemoteError> {
        let started = Instant::now();
        let result = self.upload_resumable(local_path, remote_path).await;
        self.timed("upload", started);
        Ok(result?.report)
    }

    async fn download(&self, remote_path: &str, local_path: &Path) -> Result<TransferReport, RemoteError> {
        let started = Instant::now();
        let result = self.transfer_down(remote_path, local_path).await;
        self.timed("download", started);
        result
    }

    async fn read_from(
        &self,
        remote_path: &str,
        offset: u64,
        max_len: u64,
    ) -> Result<FileChunk, RemoteError> {
        let started = Instant::now();
        let result = self.read_from_inner(remote_path, offset, max_len).await;
        self.timed("read", started);
        result
    }

    async fn pid_alive(&self, pid: u32) -> Result<bool, RemoteError> {
        if pid == 0 {
            return Ok(false);
        }
        // `/proc/<pid>/stat` over SFTP starts no process on the machine (a command starts the
        // login shell, at every poll of every job). Without `/proc` the command decides.
        let started = Instant::now();
        let from_proc = match self.read_whole(&format!("/proc/{pid}/stat")).await {
            Ok(Some(stat)) => stat_says_alive(&stat),
            Ok(None) if matches!(self.read_whole("/proc/self/stat").await, Ok(Some(_))) => Some(false),
            _ => None,
        };
        self.timed("read", started);
        if let Some(alive) = from_proc {
            return Ok(alive);
        }
        let out = self
            .run(&pid_alive_command(pid), RunOptions { timeout: Duration::from_secs(30), env: Vec::new() })
            .await?;
        match out.exit_code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(RemoteError::io("check a pid", out.stderr_lossy())),
        }
    }

    fn describe(&self) -> String {
        self.target.to_string()
    }
}

/// From the content of `/proc/<pid>/stat`: alive unless a zombie (`Z`) or dead (`X`); `None`
/// when it cannot be read that way. The state follows the command name, which is in parentheses
/// and may itself hold spaces and parentheses.
fn stat_says_alive(stat: &str) -> Option<bool> {
    let (_, rest) = stat.rsplit_once(") ")?;
    let state = rest.chars().next()?;
    Some(!matches!(state, 'Z' | 'X'))
}

/// Exit 0 when `pid` runs and is not a zombie, 1 otherwise (Linux `/proc`, else `kill -0`).
pub(crate) fn pid_alive_command(pid: u32) -> String {
    format!(
        "if [ -r /proc/self/stat ]; then s=$(cat /proc/{pid}/stat 2>/dev/null) || exit 1; \
         case \"${{s##*) }}\" in Z*|X*) exit 1;; esac; exit 0; fi; kill -0 {pid} 2>/dev/null || exit 1"
    )
}

#[cfg(test)]
mod stat_tests {
    #[test]
    fn proc_stat_tells_running_from_zombie() {
        assert_eq!(super::stat_says_alive("4242 (python3) S 1 4242 4242 0 -1"), Some(true));
        assert_eq!(super::stat_says_alive("4242 (odd) name (x)) R 1 2"), Some(true));
        assert_eq!(super::stat_says_alive("4242 (python3) Z 1 4242"), Some(false));
        assert_eq!(super::stat_says_alive("4242 (python3) X 1"), Some(false));
        assert_eq!(super::stat_says_alive(""), None);
    }
}
