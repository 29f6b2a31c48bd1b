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
//!   log reads use SFTP with many requests in flight (transfers are in `ssh/transfer.rs`).
//! - Every operation is bounded (see `bounds.rs`): a command's deadline covers opening the channel,
//!   the exec request, sending the script and every read; SFTP reads have one; transfers fail when
//!   no byte moves for `transfer_stall_timeout` and after `transfer_deadline`. An operation that
//!   times out discards its connection (it may be hung), so the next one reconnects. Output is
//!   capped (head and tail), and so is every line read up to a newline. Connecting is bounded on
//!   its own (`attempt_timeout`, `connect_deadline`); an operation's deadline starts once it has a
//!   connection.

mod transfer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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

use super::bounds::{Capture, flood_limit};
use super::{
    ExecOutput, FileChunk, OutputChunk, Phase, RemoteError, RemoteExec, RunOptions, TransferReport,
    shell_quote,
};

pub use transfer::UploadOutcome;

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
    /// Limit for one small file operation over SFTP (reading a log chunk, `/proc/<pid>/stat`,
    /// a file's size), starting SFTP included, and for `pid_alive` as a whole.
    pub request_timeout: Duration,
    /// A transfer fails when no byte moves for this long (opening it, and its end, included): a
    /// machine that answers keepalives but stopped moving data.
    pub transfer_stall_timeout: Duration,
    /// Limit for one whole upload or download, resumptions included: generous, since files can
    /// be tens of gigabytes.
    pub transfer_deadline: Duration,
    /// Limit for killing a command that timed out (on a new connection, reconnecting included).
    pub kill_timeout: Duration,
    /// The machine must confirm a new channel, answer the exec request and take the command's
    /// input within this, however long the command itself may run.
    pub answer_timeout: Duration,
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
            request_timeout: Duration::from_secs(30),
            transfer_stall_timeout: Duration::from_secs(60),
            transfer_deadline: Duration::from_secs(6 * 3600),
            kill_timeout: Duration::from_secs(15),
            answer_timeout: Duration::from_secs(15),
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
    /// Set when an operation on it timed out: never handed out again, even before it is closed.
    discarded: AtomicBool,
    _counted: OpenConnection,
}

impl Connection {
    fn new(handle: client::Handle<Client>) -> Self {
        Self {
            handle,
            sftp: OnceCell::new(),
            discarded: AtomicBool::new(false),
            _counted: OpenConnection::new(),
        }
    }

    fn usable(&self) -> bool {
        !self.discarded.load(Ordering::SeqCst) && !self.handle.is_closed()
    }
}

/// How long closing a connection politely may take: the connection may be the hung one.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

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

/// Sends a disconnect, waiting at most `CLOSE_TIMEOUT` (best effort: the connection may be hung).
async fn close_politely(conn: &Connection) {
    if !conn.handle.is_closed() {
        let bye = conn.handle.disconnect(Disconnect::ByApplication, "", "en");
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, bye).await;
    }
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
            // Keepalives start after authentication: before it (a key exchange that stalls) only
            // this ends a silent connection, including one whose attempt we gave up on.
            inactivity_timeout: Some(
                options.keepalive_interval * (options.keepalive_max as u32 + 1) + options.attempt_timeout,
            ),
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

    /// Closes the connection politely (bounded: it may be a hung one). Later calls reconnect.
    pub async fn close(&self) {
        let conn = match tokio::time::timeout(CLOSE_TIMEOUT, self.conn.lock()).await {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        if let Some(conn) = conn {
            close_politely(&conn).await;
        }
    }

    async fn connect_once(&self) -> Result<Connection, AttemptError> {
        let expected = self.host_key_fingerprint();
        let seen = Arc::new(StdMutex::new(None));
        let handler = Client { expected: expected.clone(), seen: seen.clone() };
        let limit = self.options.attempt_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let addr = (self.target.host.clone(), self.target.port);
        // TCP first, then the handshake, so the error says which one the machine did not do.
        let socket = match tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(AttemptError::Retry(
                    format!("nothing accepted a TCP connection within {limit:?}").into(),
                ));
            }
            Ok(Err(e)) => return Err(AttemptError::Retry(Box::new(e))),
            Ok(Ok(socket)) => socket,
        };
        let _ = socket.set_nodelay(true);
        let connected =
            tokio::time::timeout_at(deadline, client::connect_stream(self.config.clone(), socket, handler))
                .await;
        let seen = seen.lock().ok().and_then(|g| g.clone());
        let mut handle = match connected {
            Err(_) => {
                return Err(AttemptError::Retry(
                    format!("the machine accepted the TCP connection but did not finish the SSH handshake within {limit:?}")
                        .into(),
                ));
            }
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
            Err(_) => Err(AttemptError::Retry(
                format!("the machine did not answer the authentication within {limit:?}").into(),
            )),
            Ok(Err(e)) => Err(AttemptError::Retry(Box::new(e))),
            Ok(Ok(result)) if result.success() => Ok(Connection::new(handle)),
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

    /// The live connection, reconnecting when the last one dropped or was discarded.
    async fn connection(&self) -> Result<Arc<Connection>, RemoteError> {
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_ref()
            && conn.usable()
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
        // Bounded: the lock is held for long only by a reconnect, which replaced the old one.
        let old = match tokio::time::timeout(CLOSE_TIMEOUT, self.conn.lock()).await {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        if let Some(old) = old {
            old.discarded.store(true, Ordering::SeqCst);
        }
    }

    /// Forgets `conn` so the next call reconnects, and closes it: after a timeout it may be hung,
    /// and every other operation on it would wait for its own deadline. Never waits long.
    async fn discard(&self, conn: &Arc<Connection>) {
        conn.discarded.store(true, Ordering::SeqCst);
        if let Ok(mut guard) = tokio::time::timeout(CLOSE_TIMEOUT, self.conn.lock()).await
            && guard.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn))
        {
            *guard = None;
        }
        close_politely(conn).await;
    }

    /// Awaits one step of an operation until its deadline; past it the connection is discarded
    /// and the error names the step (`limit` is the operation's whole limit, for the message).
    async fn within<T>(
        &self,
        conn: &Arc<Connection>,
        deadline: tokio::time::Instant,
        phase: Phase,
        limit: Duration,
        step: impl Future<Output = T>,
    ) -> Result<T, RemoteError> {
        match tokio::time::timeout_at(deadline, step).await {
            Ok(value) => Ok(value),
            Err(_) => {
                tracing::warn!(machine = %self.target, ?phase, limit = ?limit, "Remote operation timed out; dropping the connection");
                self.discard(conn).await;
                Err(RemoteError::timeout(phase, limit))
            }
        }
    }

    /// A new session channel, within `limit` from the moment a connection is at hand (the
    /// returned deadline, for the rest of the operation).
    async fn open_channel(
        &self,
        limit: Duration,
    ) -> Result<(Arc<Connection>, russh::Channel<client::Msg>, tokio::time::Instant), RemoteError> {
        let conn = self.connection().await?;
        let deadline = tokio::time::Instant::now() + limit;
        // Confirming a channel takes a working sshd a moment, whatever the command will take.
        let open_limit = limit.min(self.options.answer_timeout);
        let open = |conn: Arc<Connection>| async move {
            let open_by = tokio::time::Instant::now() + open_limit;
            let opened = self
                .within(&conn, open_by, Phase::ChannelOpen, open_limit, conn.handle.channel_open_session())
                .await;
            (conn, opened)
        };
        match open(conn).await {
            (conn, Ok(Ok(ch))) => Ok((conn, ch, deadline)),
            (_, Err(timeout)) => Err(timeout),
            (conn, Ok(Err(_))) => {
                // A connection that died quietly fails here first: reconnect once.
                self.discard(&conn).await;
                let (conn, opened) = open(self.connection().await?).await;
                let ch =
                    opened?.map_err(|e| RemoteError::io(format!("open a channel to {}", self.target), e))?;
                Ok((conn, ch, deadline))
            }
        }
    }

    /// The connection's SFTP session (started on first use), within `limit` from the moment a
    /// connection is at hand (the returned deadline, for the rest of the operation).
    async fn sftp(
        &self,
        limit: Duration,
    ) -> Result<(Arc<Connection>, Arc<SftpSession>, tokio::time::Instant), RemoteError> {
        let conn = self.connection().await?;
        let deadline = tokio::time::Instant::now() + limit;
        let opened = AtomicBool::new(false);
        let backstop =
            self.options.request_timeout.max(self.options.transfer_stall_timeout) + Duration::from_secs(10);
        let start = conn.sftp.get_or_try_init(|| async {
            let channel = conn.handle.channel_open_session().await?;
            opened.store(true, Ordering::SeqCst);
            channel.request_subsystem(true, "sftp").await?;
            let cfg = russh_sftp::client::Config {
                // Many large writes in flight: the transfer is limited by the link, not by
                // round trips.
                max_concurrent_writes: 64,
                max_concurrent_reads: 64,
                max_write_packet_len: 256 * 1024,
                max_packet_len: 256 * 1024 + 1024,
                // Only a backstop: our own deadlines cover every request, and must fire first
                // (theirs is an I/O error, which a transfer would retry).
                request_timeout_secs: backstop.as_secs(),
            };
            let session = SftpSession::new_with_config(channel.into_stream(), cfg)
                .await
                .map_err(|e| russh::Error::IO(std::io::Error::other(e)))?;
            Ok::<_, russh::Error>(Arc::new(session))
        });
        let started = match tokio::time::timeout_at(deadline, start).await {
            Ok(started) => started,
            Err(_) => {
                let phase = if opened.load(Ordering::SeqCst) { Phase::SftpStart } else { Phase::ChannelOpen };
                tracing::warn!(machine = %self.target, ?phase, "SFTP did not start; dropping the connection");
                self.discard(&conn).await;
                return Err(RemoteError::timeout(phase, limit));
            }
        };
        let sftp = started.map_err(|e| RemoteError::io(format!("start SFTP on {}", self.target), e))?.clone();
        Ok((conn, sftp, deadline))
    }

    /// One small SFTP operation, bounded as a whole by `request_timeout`. An I/O error on a
    /// connection that closed meanwhile discards it.
    async fn sftp_op<T, F, Fut>(&self, op: F) -> Result<T, RemoteError>
    where
        F: FnOnce(Arc<SftpSession>) -> Fut,
        Fut: Future<Output = Result<T, RemoteError>>,
    {
        let limit = self.options.request_timeout;
        let (conn, sftp, deadline) = self.sftp(limit).await?;
        let result = self.within(&conn, deadline, Phase::FileRequest, limit, op(sftp)).await?;
        if matches!(result, Err(RemoteError::Io { .. })) && conn.handle.is_closed() {
            self.discard(&conn).await;
        }
        result
    }

    /// A small file read to its end over SFTP whatever size it reports (`/proc` files report 0);
    /// `None` when it does not exist.
    async fn read_whole(&self, path: &str) -> Result<Option<String>, RemoteError> {
        self.sftp_op(|sftp| async move {
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
        })
        .await
    }

    /// One read of a file over SFTP (timed by the caller).
    async fn read_from_inner(
        &self,
        remote_path: &str,
        offset: u64,
        max_len: u64,
    ) -> Result<FileChunk, RemoteError> {
        self.sftp_op(|sftp| async move {
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
        })
        .await
    }

    /// The size of a regular file as the machine reports it; `NotFound` for anything else (a
    /// FIFO or a device would never end).
    async fn remote_size(&self, path: &str) -> Result<u64, RemoteError> {
        self.sftp_op(|sftp| async move {
            let meta = sftp.metadata(path).await.map_err(|e| map_sftp(path, "stat", e))?;
            if !meta.is_regular() {
                return Err(RemoteError::NotFound { path: path.to_string() });
            }
            Ok(meta.len())
        })
        .await
    }

    /// Runs one command within `opts.timeout` from the moment a connection is at hand: opening
    /// the channel, the exec request, sending the script and reading to the end share that one
    /// deadline. Past it the connection is discarded and, when the command was started, it is
    /// killed (`kill_on_timeout`, bounded, over a new connection).
    async fn run_inner(
        &self,
        command: &str,
        opts: RunOptions,
        output: Option<mpsc::Sender<OutputChunk>>,
        kill_on_timeout: bool,
    ) -> Result<ExecOutput, RemoteError> {
        let nonce = hex::encode(rand::random::<[u8; 12]>());
        let script = command_script(command, &opts.env, &nonce)?;
        let (conn, channel, deadline) = self.open_channel(opts.timeout).await?;
        let io_err = |e: russh::Error| RemoteError::io(format!("run a command on {}", self.target), e);
        let (mut read, write) = channel.split();
        // What the machine has done so far, to name the step it stopped at.
        let mut answered = false;
        let mut input_sent = false;
        let mut stdout = Capture::new(opts.output_limit);
        let mut stderr = Capture::new(opts.output_limit);
        let mut exit_code = None;
        // However long the command may run, the machine must take it promptly: an sshd that
        // leaves an exec request or our input unanswered is wedged, not busy.
        let answer_by =
            (tokio::time::Instant::now() + self.options.answer_timeout.min(opts.timeout)).min(deadline);
        let flood = |what: &str, limit: usize| RemoteError::TooLarge {
            what: format!("the {what} of a command on {}", self.target),
            limit: flood_limit(limit),
        };
        let work = async {
            write.exec(true, "sh -s").await.map_err(io_err)?;
            // The script goes out while replies are read: a machine that never opens its window
            // must not keep us from seeing what it answered.
            let input = async {
                write.data_bytes(script.into_bytes()).await?;
                write.eof().await
            };
            tokio::pin!(input);
            loop {
                tokio::select! {
                    sent = &mut input, if !input_sent => {
                        sent.map_err(io_err)?;
                        input_sent = true;
                    }
                    () = tokio::time::sleep_until(answer_by), if !(answered && input_sent) => {
                        return Ok(Ended::AnswerLate);
                    }
                    msg = read.wait() => {
                        let Some(msg) = msg else { break };
                        match msg {
                            ChannelMsg::Success => answered = true,
                            ChannelMsg::Failure => {
                                return Err(RemoteError::io(
                                    format!("run a command on {}", self.target),
                                    "the machine refused the exec request",
                                ));
                            }
                            ChannelMsg::Data { data } => {
                                answered = true;
                                let forward = stdout.push(&data);
                                if let Some(tx) = &output && !forward.is_empty() {
                                    let _ = tx.send(OutputChunk::Stdout(forward.to_vec())).await;
                                }
                                if stdout.flooded() {
                                    return Err(flood("output", opts.output_limit));
                                }
                            }
                            ChannelMsg::ExtendedData { data, ext: 1 } => {
                                answered = true;
                                let forward = stderr.push(&data);
                                if let Some(tx) = &output && !forward.is_empty() {
                                    let _ = tx.send(OutputChunk::Stderr(forward.to_vec())).await;
                                }
                                if stderr.flooded() {
                                    return Err(flood("error output", opts.output_limit));
                                }
                            }
                            ChannelMsg::ExitStatus { exit_status } => {
                                answered = true;
                                exit_code = i32::try_from(exit_status).ok();
                            }
                            _ => {}
                        }
                    }
                }
            }
            Ok(Ended::Closed)
        };
        let finished = tokio::time::timeout_at(deadline, work).await;
        let late = matches!(finished, Ok(Ok(Ended::AnswerLate)));
        if late || finished.is_err() {
            let phase = match (answered, input_sent) {
                (false, _) => Phase::ExecRequest,
                (true, false) => Phase::SendInput,
                (true, true) => Phase::Output,
            };
            let limit = if late { self.options.answer_timeout.min(opts.timeout) } else { opts.timeout };
            tracing::warn!(machine = %self.target, ?phase, limit = ?limit, "Command timed out; dropping the connection");
            // The hung connection goes first, so the kill does not wait on it. Only a command the
            // machine started can need killing (a script not sent whole runs nothing).
            self.discard(&conn).await;
            if kill_on_timeout && phase == Phase::Output {
                self.kill_command(&nonce).await;
            }
            return Err(RemoteError::timeout(phase, limit));
        }
        if let Ok(Err(err @ RemoteError::TooLarge { .. })) = &finished {
            // A flooding machine keeps sending on this connection: it goes.
            tracing::warn!(machine = %self.target, error = %err, "Command output flooded; dropping the connection");
            self.discard(&conn).await;
        }
        finished.unwrap_or(Ok(Ended::Closed))?;
        if exit_code.is_none() && conn.handle.is_closed() {
            // The connection died under the command: its outcome is unknown, not "killed".
            self.discard(&conn).await;
            return Err(RemoteError::io(
                format!("run a command on {}", self.target),
                "the connection was lost before the command finished",
            ));
        }
        let (stdout, stdout_dropped) = stdout.finish();
        let (stderr, stderr_dropped) = stderr.finish();
        if stdout_dropped + stderr_dropped > 0 {
            tracing::warn!(machine = %self.target, stdout_dropped, stderr_dropped, "Command output past its limit; kept head and tail");
        }
        Ok(ExecOutput { exit_code, stdout, stderr, stdout_dropped, stderr_dropped })
    }

    /// Kills the process group of a command that ran past its timeout, found through the pid
    /// file its script wrote. Best effort and bounded by `kill_timeout` as a whole (reconnecting
    /// included): the machine may be the reason the command hung.
    async fn kill_command(&self, nonce: &str) {
        let pid_file = format!("/tmp/.gpu-trainer-run-{nonce}.pid");
        let script = format!(
            "pid=$(cat {pid_file} 2>/dev/null) || exit 0\n\
             pg=$(cut -d' ' -f5 /proc/$pid/stat 2>/dev/null) || pg=\n\
             if [ -n \"$pg\" ] && [ \"$pg\" -gt 1 ]; then kill -TERM -$pg 2>/dev/null; sleep 1; kill -KILL -$pg 2>/dev/null; \
             else kill -KILL $pid 2>/dev/null; fi\n\
             rm -f {pid_file}\n"
        );
        let limit = self.options.kill_timeout;
        let kill = Box::pin(self.run_inner(&script, RunOptions::with_timeout(limit), None, false));
        match tokio::time::timeout(limit, kill).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(target = %self.target, error = %e, "Failed to kill a timed-out command")
            }
            Err(_) => {
                tracing::warn!(target = %self.target, limit = ?limit, "Gave up killing a timed-out command")
            }
        }
    }

    /// Runs a step of a larger operation (not timed on its own: the operation is) whose stdout
    /// the caller parses: it must be complete.
    async fn run_checked(&self, command: &str, what: &str) -> Result<ExecOutput, RemoteError> {
        let out =
            self.run_inner(command, RunOptions::with_timeout(Duration::from_secs(600)), None, true).await?;
        if !out.success() {
            return Err(RemoteError::io(
                format!("{what} on {}", self.target),
                format!("exit code {:?}: {}", out.exit_code, out.stderr_lossy().trim()),
            ));
        }
        out.require_complete(&format!("the command to {what}"))?;
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

    /// `pid_alive` (bounded by the caller). `/proc/<pid>/stat` over SFTP starts no process on
    /// the machine (a command starts the login shell, at every poll of every job). Without
    /// `/proc` the command decides.
    async fn pid_alive_within(&self, pid: u32, limit: Duration) -> Result<bool, RemoteError> {
        let started = Instant::now();
        let from_proc = match self.read_whole(&format!("/proc/{pid}/stat")).await {
            Ok(Some(stat)) => stat_says_alive(&stat),
            // A machine that does not answer is not asked again another way.
            Err(e @ RemoteError::Timeout(_)) => return Err(e),
            Ok(None) => match self.read_whole("/proc/self/stat").await {
                Ok(Some(_)) => Some(false),
                Err(e @ RemoteError::Timeout(_)) => return Err(e),
                _ => None,
            },
            _ => None,
        };
        self.timed("read", started);
        if let Some(alive) = from_proc {
            return Ok(alive);
        }
        let out = self.run(&pid_alive_command(pid), RunOptions::with_timeout(limit)).await?;
        match out.exit_code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(RemoteError::io("check a pid", out.stderr_lossy())),
        }
    }
}

fn map_sftp(path: &str, op: &str, e: russh_sftp::client::error::Error) -> RemoteError {
    if sftp_not_found(&e) {
        RemoteError::NotFound { path: path.to_string() }
    } else {
        RemoteError::io(format!("{op} {path}"), e)
    }
}

/// How the reading of a command's channel ended (short of its deadline or an error).
enum Ended {
    /// The channel closed: the command is done.
    Closed,
    /// The machine left the exec request or the input unanswered past `answer_timeout`.
    AnswerLate,
}

/// The script fed to `sh -s` on the machine: records its pid (for killing on timeout), exports
/// the environment (values quoted, never on a command line) and runs `command` with `sh -c`,
/// stdin closed. It is one `{ ... }` group, which the shell parses whole before running any of
/// it: a script cut short (the connection dropped while it was sent) runs nothing, rather than
/// a prefix of the command.
fn command_script(command: &str, env: &[(String, String)], nonce: &str) -> Result<String, RemoteError> {
    let pid_file = format!("/tmp/.gpu-trainer-run-{nonce}.pid");
    let mut script = format!("{{\necho $$ > {pid_file}\ntrap 'rm -f {pid_file}' EXIT\n");
    for (name, value) in env {
        super::check_env_name(name)?;
        script.push_str(&format!("{name}={}\nexport {name}\n", shell_quote(value)?));
    }
    script.push_str(&format!("sh -c {} </dev/null\n}}\n", shell_quote(command)?));
    Ok(script)
}

#[async_trait]
impl RemoteExec for SshExec {
    async fn run(&self, command: &str, opts: RunOptions) -> Result<ExecOutput, RemoteError> {
        let started = Instant::now();
        let result = self.run_inner(command, opts, None, true).await;
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
        let result = self.run_inner(command, opts, Some(output), true).await;
        self.timed("run", started);
        result
    }

    async fn upload(&self, local_path: &Path, remote_path: &str) -> Result<TransferReport, RemoteError> {
        let started = Instant::now();
        let result = self.upload_resumable(local_path, remote_path).await;
        self.timed("upload", started);
        Ok(result?.report)
    }

    async fn download(
        &self,
        remote_path: &str,
        local_path: &Path,
        max_bytes: u64,
    ) -> Result<TransferReport, RemoteError> {
        let started = Instant::now();
        let result = self.transfer_down(remote_path, local_path, max_bytes).await;
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
        // One limit for the whole check, the fallback command included, from the moment a
        // connection is at hand (connecting has its own limits).
        self.connection().await?;
        let limit = self.options.request_timeout;
        match tokio::time::timeout(limit, self.pid_alive_within(pid, limit)).await {
            Ok(alive) => alive,
            Err(_) => {
                self.drop_connection().await;
                Err(RemoteError::timeout(Phase::FileRequest, limit))
            }
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
