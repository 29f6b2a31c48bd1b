//! A hostile machine for the tests: a small SSH server (russh's server side) that behaves like an
//! sshd for what the operator needs, or misbehaves in one of the ways a stranger's machine can
//! ([`Mode`]), switchable at run time.
//!
//! Test tooling only (`#[doc(hidden)]`): it is compiled into the library so that `tests/` can use
//! it, and is never started by the operator.
//!
//! - Listens on `127.0.0.1` (port 0 picks a free one), with its own generated ed25519 host key
//!   and a second one for [`Mode::ChangeHostKey`].
//! - Accepts the public keys listed in an `authorized_keys` file, re-read on every attempt
//!   (fake-vastai appends the keys attached to instances to such a file), or any key.
//! - Normal mode: `exec` runs the command with `sh -c` as this process's user, in `$HOME`, with
//!   stdin, stdout and stderr piped through the channel and the exit status sent; the `sftp`
//!   subsystem is OpenSSH's `sftp-server`, piped the same way. So a job can really stage, train
//!   and upload through it.
//! - A mode can start at once ([`HostileServer::set_mode`]) or after a number of normal exec
//!   requests ([`HostileServer::set_mode_after_execs`]), so that the GpuInstance probe passes and
//!   a later step of the job meets the misbehaviour. Connection-level modes (stalled key
//!   exchange, changed host key) apply to new connections; a connection opened before the mode
//!   started is dropped at its next channel open, so the client has to reconnect and meet it
//!   (as it would after the machine rebooted).
//! - Counters ([`Counters`]) say what the client got that far.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Disconnect};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the machine does. Every mode but [`Mode::Normal`] applies only once armed (at once, or
/// after the configured number of normal exec requests).
///
/// The three hang modes also freeze what was already running when they were armed (a command,
/// an SFTP session): it sends nothing more, not even its exit status, while its input is still
/// read. So a machine that hangs mid-job hangs for a client that keeps one SFTP session open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Behaves like an sshd: commands run, SFTP works.
    Normal,
    /// Channel open requests are never answered (neither confirmed nor refused): the client
    /// waits for a confirmation that never comes. Affects SFTP too (it needs a channel).
    HangOnChannelOpen,
    /// Channels open, but exec (and subsystem) requests are never answered and nothing is ever
    /// sent on the channel. Input is read and thrown away, so the connection stays healthy.
    HangOnExec,
    /// Exec (and subsystem) requests are accepted, input is read and thrown away, and then
    /// nothing: no output, no exit status, no EOF, no close.
    HangAfterExec,
    /// Exec requests are accepted and answered with endless stdout (`y\n` lines) at the speed the
    /// client's window allows; no exit status ever. SFTP still works.
    FloodOutput,
    /// Exec requests are accepted and answered with endless stdout that never contains a
    /// newline; no exit status ever. SFTP still works.
    EndlessLine,
    /// TCP connections are accepted and read from, but the server never sends a byte (not even
    /// its identification string), so the key exchange never finishes.
    StallKeyExchange,
    /// Connections present a second host key, except the server's very first connection (so a
    /// client first records the real key, then finds it changed from the second connection on).
    ChangeHostKey,
}

impl Mode {
    /// Modes that decide how a connection is set up, rather than what a channel does.
    fn is_connection_level(self) -> bool {
        matches!(self, Mode::StallKeyExchange | Mode::ChangeHostKey)
    }
}

/// Which client keys are accepted.
#[derive(Clone, Debug)]
pub enum Authorized {
    /// Keys listed in this `authorized_keys` file (re-read on every attempt; a missing file
    /// accepts nothing).
    File(PathBuf),
    /// Any key.
    AnyKey,
}

/// How the server starts.
#[derive(Clone, Debug)]
pub struct HostileConfig {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    pub authorized: Authorized,
    /// The mode from the start (armed at once, or after `normal_execs_first` exec requests).
    pub mode: Mode,
    /// Exec requests served normally before `mode` is armed.
    pub normal_execs_first: u64,
    /// OpenSSH's SFTP server program; the usual Debian path when unset.
    pub sftp_server: Option<PathBuf>,
}

impl HostileConfig {
    /// A well-behaved server accepting the keys in `authorized_keys`.
    pub fn new(authorized: Authorized) -> Self {
        Self { port: 0, authorized, mode: Mode::Normal, normal_execs_first: 0, sftp_server: None }
    }
}

/// What the clients did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// TCP connections accepted.
    pub connections: u64,
    /// Sessions that passed authentication.
    pub authenticated: u64,
    /// Session channel open requests (answered or not).
    pub channel_opens: u64,
    /// Exec requests (answered or not).
    pub exec_requests: u64,
    /// Subsystem requests (SFTP).
    pub subsystem_requests: u64,
    /// Channel data sent to clients (stdout and stderr of commands, SFTP replies, floods).
    pub bytes_sent: u64,
    /// Channel data received from clients.
    pub bytes_received: u64,
}

#[derive(Default)]
struct AtomicCounters {
    connections: AtomicU64,
    authenticated: AtomicU64,
    channel_opens: AtomicU64,
    exec_requests: AtomicU64,
    subsystem_requests: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        Counters {
            connections: get(&self.connections),
            authenticated: get(&self.authenticated),
            channel_opens: get(&self.channel_opens),
            exec_requests: get(&self.exec_requests),
            subsystem_requests: get(&self.subsystem_requests),
            bytes_sent: get(&self.bytes_sent),
            bytes_received: get(&self.bytes_received),
        }
    }
}

/// The mode and when it takes effect.
struct ModeState {
    mode: Mode,
    /// Exec requests still to serve normally before `mode` is armed.
    normal_execs_left: u64,
    /// Connections numbered up to this one were opened before the mode was armed.
    armed_after_connection: u64,
    /// Counts the times a mode was armed: a channel started before the latest arming of a hang
    /// mode freezes.
    epoch: u64,
}

struct Shared {
    authorized: Authorized,
    sftp_server: PathBuf,
    state: Mutex<ModeState>,
    counters: AtomicCounters,
    config: Arc<russh::server::Config>,
    /// The same with the second host key.
    other_config: Arc<russh::server::Config>,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, ModeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The misbehaviour in force now, if any.
    fn armed(&self) -> Option<(Mode, u64)> {
        let state = self.lock();
        (state.normal_execs_left == 0 && state.mode != Mode::Normal)
            .then_some((state.mode, state.armed_after_connection))
    }

    /// Counts an exec request and says how to answer it: `None` to serve it normally.
    fn on_exec(&self) -> Option<Mode> {
        self.counters.exec_requests.fetch_add(1, Ordering::SeqCst);
        let mut state = self.lock();
        if state.normal_execs_left > 0 {
            state.normal_execs_left -= 1;
            if state.normal_execs_left == 0 {
                state.armed_after_connection = self.counters.connections.load(Ordering::SeqCst);
                state.epoch += 1;
            }
            return None;
        }
        // A connection-level mode has done its part when the connection was set up.
        (state.mode != Mode::Normal && !state.mode.is_connection_level()).then_some(state.mode)
    }

    /// The current epoch, recorded by a channel when it starts.
    fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// True when a channel started in `epoch` must freeze: a hang mode was armed since.
    fn frozen(&self, epoch: u64) -> bool {
        let state = self.lock();
        let hangs = matches!(state.mode, Mode::HangOnChannelOpen | Mode::HangOnExec | Mode::HangAfterExec);
        hangs && state.normal_execs_left == 0 && state.epoch != epoch
    }

    fn sent(&self, n: usize) {
        self.counters.bytes_sent.fetch_add(n as u64, Ordering::SeqCst);
    }

    fn received(&self, n: usize) {
        self.counters.bytes_received.fetch_add(n as u64, Ordering::SeqCst);
    }

    fn is_authorized(&self, key: &PublicKey) -> bool {
        match &self.authorized {
            Authorized::AnyKey => true,
            Authorized::File(path) => authorized_keys(path).iter().any(|k| k.key_data() == key.key_data()),
        }
    }
}

/// The keys in an `authorized_keys` file; lines that do not parse (options, garbage) are skipped
/// (a line with options is tried again from its second field).
fn authorized_keys(path: &Path) -> Vec<PublicKey> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            PublicKey::from_openssh(line).ok().or_else(|| {
                let rest = line.split_once(char::is_whitespace)?.1.trim_start();
                PublicKey::from_openssh(rest).ok()
            })
        })
        .collect()
}

/// A running hostile machine. Dropping it stops the server and every session.
pub struct HostileServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    host_key: String,
    other_host_key: String,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for HostileServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

fn random_host_key() -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&rand::random::<[u8; 32]>()))
}

fn server_config(key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        keys: vec![key],
        // A refused key is retried by a booting client: no need to make it wait long.
        auth_rejection_time: std::time::Duration::from_millis(50),
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        // A hanging machine keeps its connections (the client's keepalives are still answered).
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    }
}

impl HostileServer {
    /// Starts the server on `127.0.0.1:config.port`. Must be called inside a Tokio runtime.
    pub async fn start(config: HostileConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", config.port)).await?;
        let addr = listener.local_addr()?;
        let (key, other) = (random_host_key(), random_host_key());
        let fingerprint = |k: &PrivateKey| k.public_key().fingerprint(HashAlg::Sha256).to_string();
        let (host_key, other_host_key) = (fingerprint(&key), fingerprint(&other));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let sftp_server = config.sftp_server.clone().unwrap_or_else(default_sftp_server);
        let armed_now = config.normal_execs_first == 0;
        let shared = Arc::new(Shared {
            authorized: config.authorized,
            sftp_server,
            state: Mutex::new(ModeState {
                mode: config.mode,
                normal_execs_left: if armed_now { 0 } else { config.normal_execs_first },
                armed_after_connection: 0,
                epoch: 0,
            }),
            counters: AtomicCounters::default(),
            config: Arc::new(server_config(key)),
            other_config: Arc::new(server_config(other)),
            shutdown: shutdown_rx,
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        tracing::debug!(%addr, mode = ?config.mode, "Hostile SSH server listening");
        Ok(Self { addr, shared, host_key, other_host_key, shutdown })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// SHA-256 fingerprint (`SHA256:...`) of the host key normally presented.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.host_key
    }

    /// SHA-256 fingerprint of the key presented in [`Mode::ChangeHostKey`].
    pub fn other_host_key_fingerprint(&self) -> &str {
        &self.other_host_key
    }

    /// Switches to `mode` now. Connections opened before are dropped at their next channel open
    /// when the mode is connection-level.
    pub fn set_mode(&self, mode: Mode) {
        self.set_mode_after_execs(mode, 0);
    }

    /// Switches to `mode` after `normal_execs` more exec requests served normally (0: now).
    pub fn set_mode_after_execs(&self, mode: Mode, normal_execs: u64) {
        let mut state = self.shared.lock();
        state.mode = mode;
        state.normal_execs_left = normal_execs;
        if normal_execs == 0 {
            state.armed_after_connection = self.shared.counters.connections.load(Ordering::SeqCst);
            state.epoch += 1;
        }
    }

    /// The configured mode and whether it is in force yet.
    pub fn mode(&self) -> (Mode, bool) {
        let state = self.shared.lock();
        (state.mode, state.normal_execs_left == 0)
    }

    pub fn counters(&self) -> Counters {
        self.shared.counters.snapshot()
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Where Debian's openssh-server installs the SFTP server (tests/env/install.sh installs it).
fn default_sftp_server() -> PathBuf {
    ["/usr/lib/openssh/sftp-server", "/usr/lib/sftp-server", "/usr/libexec/openssh/sftp-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/usr/lib/openssh/sftp-server"))
}

/// Resolves when the server is told to stop (or dropped).
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = stopped(shared.shutdown.clone()) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((socket, _peer)) = accepted else { continue };
        let number = shared.counters.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let armed = shared.armed();
        let shared = shared.clone();
        match armed {
            Some((Mode::StallKeyExchange, _)) => {
                tokio::spawn(stall(socket, shared));
            }
            armed => {
                let other_key =
                    matches!(armed, Some((Mode::ChangeHostKey, after)) if number > after && number > 1);
                tokio::spawn(serve(socket, number, other_key, shared));
            }
        }
    }
}

/// Reads (and throws away) what the client sends and never answers, until it hangs up.
async fn stall(mut socket: TcpStream, shared: Arc<Shared>) {
    let mut buf = [0u8; 4096];
    let read = async {
        while let Ok(n) = socket.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = stopped(shared.shutdown.clone()) => {}
        _ = read => {}
    }
}

async fn serve(socket: TcpStream, number: u64, other_key: bool, shared: Arc<Shared>) {
    let config = if other_key { shared.other_config.clone() } else { shared.config.clone() };
    let handler =
        Connection { number, shared: shared.clone(), channels: HashMap::new(), pending: Vec::new() };
    let Ok(session) = russh::server::run_stream(config, socket, handler).await else { return };
    let handle = session.handle();
    tokio::select! {
        _ = session => {}
        _ = stopped(shared.shutdown.clone()) => {
            let _ = handle.disconnect(Disconnect::ByApplication, "server stopped".into(), "en".into()).await;
        }
    }
}

/// One client connection.
struct Connection {
    number: u64,
    shared: Arc<Shared>,
    /// Opened channels waiting for their request.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Channel opens never answered ([`Mode::HangOnChannelOpen`]); dropping one would refuse it.
    pending: Vec<ChannelOpenHandle>,
}

impl Connection {
    /// Serves or misbehaves on a channel whose exec or subsystem request came in.
    fn start(
        &mut self,
        id: ChannelId,
        misbehaviour: Option<Mode>,
        program: tokio::process::Command,
        session: &mut Session,
    ) {
        let Some(channel) = self.channels.remove(&id) else {
            let _ = session.channel_failure(id);
            return;
        };
        let shared = self.shared.clone();
        let shutdown = stopped(shared.shutdown.clone());
        match misbehaviour {
            None => {
                let _ = session.channel_success(id);
                let epoch = shared.epoch();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = shutdown => {}
                        _ = run_program(program, channel, epoch, shared.clone()) => {}
                    }
                });
            }
            Some(Mode::HangOnExec) => {
                tokio::spawn(async move {
                    let (read, _write) = channel.split();
                    tokio::select! {
                        _ = shutdown => {}
                        _ = drain(read, shared.clone()) => {}
                    }
                });
            }
            Some(mode @ (Mode::FloodOutput | Mode::EndlessLine)) => {
                let pattern: &'static [u8] = if mode == Mode::FloodOutput { b"y\n" } else { b"y" };
                let _ = session.channel_success(id);
                tokio::spawn(async move {
                    let (read, write) = channel.split();
                    tokio::select! {
                        _ = shutdown => {}
                        _ = drain(read, shared.clone()) => {}
                        _ = flood(&write, pattern, &shared) => {}
                    }
                });
            }
            Some(_) => {
                let _ = session.channel_success(id);
                tokio::spawn(async move {
                    let (read, _write) = channel.split();
                    tokio::select! {
                        _ = shutdown => {}
                        _ = drain(read, shared.clone()) => {}
                    }
                });
            }
        }
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey(&mut self, _user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        if self.shared.is_authorized(key.public_key) {
            self.shared.counters.authenticated.fetch_add(1, Ordering::SeqCst);
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.shared.counters.channel_opens.fetch_add(1, Ordering::SeqCst);
        match self.shared.armed() {
            Some((Mode::HangOnChannelOpen, _)) => {
                self.pending.push(reply);
                Ok(())
            }
            Some((mode, armed_after)) if mode.is_connection_level() && self.number <= armed_after => {
                // Opened before the mode started: gone, as after a reboot; the client reconnects.
                let _ = session.disconnect(Disconnect::ByApplication, "machine restarted", "en");
                Err(russh::Error::Disconnect)
            }
            _ => {
                self.channels.insert(channel.id(), channel);
                reply.accept().await;
                Ok(())
            }
        }
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let misbehaviour = self.shared.on_exec();
        let mut program = tokio::process::Command::new("sh");
        program.arg("-c").arg(String::from_utf8_lossy(data).into_owned());
        self.start(id, misbehaviour, program, session);
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.shared.counters.subsystem_requests.fetch_add(1, Ordering::SeqCst);
        if name != "sftp" {
            let _ = session.channel_failure(id);
            return Ok(());
        }
        // A wedged machine wedges SFTP too; a flooding one only floods command output.
        let misbehaviour = self
            .shared
            .armed()
            .map(|(mode, _)| mode)
            .filter(|m| matches!(m, Mode::HangOnExec | Mode::HangAfterExec));
        let program = tokio::process::Command::new(&self.shared.sftp_server);
        self.start(id, misbehaviour, program, session);
        Ok(())
    }

    async fn env_request(
        &mut self,
        id: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let _ = session.channel_failure(id);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        id: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let _ = session.channel_failure(id);
        Ok(())
    }

    async fn shell_request(&mut self, id: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        let _ = session.channel_failure(id);
        Ok(())
    }

    async fn channel_close(&mut self, id: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.channels.remove(&id);
        Ok(())
    }
}

/// Reads a channel's input and throws it away, until the client closes the channel.
async fn drain(mut read: ChannelReadHalf, shared: Arc<Shared>) {
    while let Some(msg) = read.wait().await {
        match msg {
            ChannelMsg::Data { data } => shared.received(data.len()),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
}

/// Sends `pattern` over and over, as fast as the client's window allows.
async fn flood(write: &ChannelWriteHalf<Msg>, pattern: &[u8], shared: &Shared) {
    let block = Bytes::from(pattern.repeat(32 * 1024 / pattern.len()));
    while write.data_bytes(block.clone()).await.is_ok() {
        shared.sent(block.len());
    }
}

/// Runs `program` with the channel as its stdin, stdout and stderr, like sshd: the exit status
/// is sent when it ends, then EOF and close. A client that closes the channel first only loses
/// the output (the process is not killed, as with sshd without a terminal). Started in `epoch`:
/// a hang mode armed later freezes it.
async fn run_program(
    mut program: tokio::process::Command,
    channel: Channel<Msg>,
    epoch: u64,
    shared: Arc<Shared>,
) {
    let (mut read, write) = channel.split();
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    program
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
        .env("HOME", &home)
        .env("USER", std::env::var_os("USER").unwrap_or_else(|| "root".into()))
        .env("LANG", "C.UTF-8")
        .current_dir(&home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match program.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = format!("hostile test sshd: cannot start the command: {e}\n");
            let _ = write.extended_data_bytes(1, message.into_bytes()).await;
            let _ = write.exit_status(127).await;
            let _ = write.eof().await;
            let _ = write.close().await;
            return;
        }
    };
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return;
    };
    let input = {
        let shared = shared.clone();
        async move {
            // Dropped at EOF: only closing the pipe tells the process its input ended.
            let mut stdin = Some(stdin);
            while let Some(msg) = read.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        shared.received(data.len());
                        if let Some(pipe) = stdin.as_mut()
                            && pipe.write_all(&data).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    ChannelMsg::Eof => stdin = None,
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
        }
    };
    let output = async {
        let _ = tokio::join!(
            pipe(stdout, &write, None, epoch, &shared),
            pipe(stderr, &write, Some(1), epoch, &shared)
        );
        let status = child.wait().await;
        if shared.frozen(epoch) {
            std::future::pending::<()>().await;
        }
        status
    };
    tokio::pin!(input);
    tokio::select! {
        status = output => {
            if let Some(code) = status.ok().and_then(|s| s.code()) {
                let _ = write.exit_status(code as u32).await;
            }
            let _ = write.eof().await;
            let _ = write.close().await;
        }
        // The client closed the channel: nobody reads the output any more.
        _ = &mut input => {}
    }
}

/// Copies a process's output into the channel (stdout, or extended data `ext`), until a hang
/// mode armed after `epoch` freezes it.
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    write: &ChannelWriteHalf<Msg>,
    ext: Option<u32>,
    epoch: u64,
    shared: &Shared,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if shared.frozen(epoch) {
            std::future::pending::<()>().await;
        }
        let data = Bytes::copy_from_slice(&buf[..n]);
        let sent = match ext {
            None => write.data_bytes(data).await,
            Some(ext) => write.extended_data_bytes(ext, data).await,
        };
        if sent.is_err() {
            return;
        }
        shared.sent(n);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use russh::keys::ssh_key::LineEnding;

    use super::*;
    use crate::remote::ssh::{SshExec, SshKey, SshOptions, SshTarget};
    use crate::remote::{OutputChunk, RemoteError, RemoteExec, RunOptions};

    /// A client key pair: the key, and its public half in `authorized_keys` format.
    fn client_key() -> (SshKey, String) {
        let key = random_host_key();
        let private = key.to_openssh(LineEnding::LF).unwrap();
        let public = key.public_key().to_openssh().unwrap();
        (SshKey::from_bytes(private.as_bytes()).unwrap(), public)
    }

    struct Fixture {
        server: HostileServer,
        key: SshKey,
        _dir: tempfile::TempDir,
    }

    async fn fixture(mode: Mode, normal_execs_first: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = client_key();
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, format!("{public}\n")).unwrap();
        let config =
            HostileConfig { mode, normal_execs_first, ..HostileConfig::new(Authorized::File(authorized)) };
        let server = HostileServer::start(config).await.unwrap();
        Fixture { server, key, _dir: dir }
    }

    /// Short deadlines: every misbehaviour shows within a second or two.
    fn options() -> SshOptions {
        SshOptions {
            attempt_timeout: Duration::from_millis(700),
            connect_deadline: Duration::from_millis(1500),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(200),
            ..SshOptions::default()
        }
    }

    impl Fixture {
        fn target(&self) -> SshTarget {
            SshTarget { host: "127.0.0.1".into(), port: self.server.port(), user: "test".into() }
        }

        async fn connect(&self, pinned: Option<String>) -> Result<SshExec, RemoteError> {
            SshExec::connect(self.target(), self.key.clone(), pinned, options()).await
        }
    }

    fn quick() -> RunOptions {
        RunOptions { timeout: Duration::from_secs(1), ..Default::default() }
    }

    /// What a command run against a misbehaving machine came to within `limit`: `None` when it
    /// was still waiting (a client without deadlines), else its result.
    async fn within<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::time::timeout(limit, f).await.ok()
    }

    #[tokio::test]
    async fn normal_mode_runs_commands_and_serves_sftp() {
        let f = fixture(Mode::Normal, 0).await;
        let exec = f.connect(None).await.unwrap();
        assert_eq!(exec.host_key_fingerprint().as_deref(), Some(f.server.host_key_fingerprint()));

        let out = exec.run("echo out; echo err >&2; exit 3", quick()).await.unwrap();
        assert_eq!(
            (out.exit_code, out.stdout_lossy(), out.stderr_lossy()),
            (Some(3), "out\n".into(), "err\n".into())
        );
        let env = RunOptions { env: vec![("GREETING".into(), "hello there".into())], ..quick() };
        assert_eq!(exec.run("printf %s \"$GREETING\"", env).await.unwrap().stdout_lossy(), "hello there");

        // Upload (exec into cat), download and read_from (SFTP) through the real sftp-server.
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("up.bin");
        std::fs::write(&local, vec![7u8; 300_000]).unwrap();
        let remote = dir.path().join("remote/up.bin");
        let remote = remote.to_str().unwrap();
        let up = exec.upload(&local, remote).await.unwrap();
        assert_eq!(std::fs::read(remote).unwrap(), vec![7u8; 300_000]);
        let back = dir.path().join("back.bin");
        let down = exec.download(remote, &back, u64::MAX).await.unwrap();
        assert_eq!(down.sha256, up.sha256);
        let chunk = exec.read_from(remote, 299_990, 100).await.unwrap();
        assert_eq!((chunk.data.len(), chunk.file_size), (10, 300_000));

        let c = f.server.counters();
        assert_eq!((c.connections, c.authenticated), (1, 1));
        assert!(c.exec_requests >= 4 && c.subsystem_requests == 1, "{c:?}");
        assert!(c.bytes_sent > 0 && c.bytes_received >= 300_000, "{c:?}");
    }

    #[tokio::test]
    async fn keys_come_from_the_authorized_keys_file_read_on_each_attempt() {
        let f = fixture(Mode::Normal, 0).await;
        let (other_key, other_public) = client_key();
        let stranger = SshExec::connect(f.target(), other_key.clone(), None, options()).await.map(|_| ());
        assert!(matches!(stranger, Err(RemoteError::AuthRefused { .. })), "{stranger:?}");
        assert_eq!(f.server.counters().authenticated, 0);

        let Authorized::File(path) = &f.server.shared.authorized else { unreachable!() };
        let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        std::io::Write::write_all(&mut file, format!("{other_public}\n").as_bytes()).unwrap();
        let now_known = SshExec::connect(f.target(), other_key, None, options()).await.unwrap();
        assert!(now_known.run("true", quick()).await.unwrap().success());
    }

    #[tokio::test]
    async fn any_key_mode_accepts_a_stranger() {
        let server = HostileServer::start(HostileConfig::new(Authorized::AnyKey)).await.unwrap();
        let target = SshTarget { host: "127.0.0.1".into(), port: server.port(), user: "x".into() };
        let exec = SshExec::connect(target, client_key().0, None, options()).await.unwrap();
        assert_eq!(exec.run("echo hi", quick()).await.unwrap().stdout_lossy(), "hi\n");
    }

    #[tokio::test]
    async fn hang_on_channel_open_never_confirms_the_channel() {
        let f = fixture(Mode::HangOnChannelOpen, 0).await;
        let exec = f.connect(None).await.unwrap();
        let result = within(Duration::from_secs(3), exec.run("echo hi", quick())).await;
        assert!(!matches!(result, Some(Ok(_))), "{result:?}");
        let c = f.server.counters();
        assert!(c.channel_opens >= 1 && c.exec_requests == 0 && c.bytes_sent == 0, "{c:?}");
    }

    #[tokio::test]
    async fn hang_on_exec_opens_the_channel_and_never_answers_the_request() {
        let f = fixture(Mode::HangOnExec, 0).await;
        let exec = f.connect(None).await.unwrap();
        let result = within(Duration::from_secs(3), exec.run("echo hi", quick())).await;
        assert!(!matches!(result, Some(Ok(_))), "{result:?}");
        let c = f.server.counters();
        assert!(c.exec_requests >= 1 && c.bytes_sent == 0, "{c:?}");
        // The script was still read (and thrown away): the connection itself is healthy.
        assert!(c.bytes_received > 0, "{c:?}");
    }

    #[tokio::test]
    async fn hang_after_exec_reads_input_and_never_sends_anything() {
        let f = fixture(Mode::HangAfterExec, 0).await;
        let exec = f.connect(None).await.unwrap();
        let result = within(Duration::from_secs(3), exec.run("echo hi", quick())).await;
        assert!(!matches!(result, Some(Ok(_))), "{result:?}");
        let c = f.server.counters();
        assert!(c.exec_requests >= 1 && c.bytes_received > 0 && c.bytes_sent == 0, "{c:?}");
    }

    /// Runs a command against a flooding machine, watching the stream for 1 s; returns the bytes
    /// seen and whether any was a newline.
    async fn watch_flood(f: &Fixture) -> (u64, bool) {
        let exec = f.connect(None).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let watcher = tokio::spawn(async move {
            let (mut bytes, mut newline) = (0u64, false);
            while let Some(OutputChunk::Stdout(data) | OutputChunk::Stderr(data)) = rx.recv().await {
                bytes += data.len() as u64;
                newline |= data.contains(&b'\n');
                // Enough seen: stop listening (the command's own deadline ends it).
                if bytes > 4 << 20 {
                    break;
                }
            }
            (bytes, newline)
        });
        // Streaming stops at the output limit: a limit above what the watcher wants to see.
        let opts = RunOptions { output_limit: 8 << 20, ..quick() };
        let result = within(Duration::from_secs(3), exec.run_streaming("echo hi", opts, tx)).await;
        assert!(!matches!(result, Some(Ok(ref out)) if out.exit_code.is_some()), "{result:?}");
        watcher.await.unwrap()
    }

    #[tokio::test]
    async fn flood_output_sends_endless_lines() {
        let f = fixture(Mode::FloodOutput, 0).await;
        let (bytes, newline) = watch_flood(&f).await;
        assert!(bytes > 1 << 20 && newline, "{bytes} bytes, newline {newline}");
        assert!(f.server.counters().bytes_sent > 1 << 20);
    }

    #[tokio::test]
    async fn endless_line_never_sends_a_newline() {
        let f = fixture(Mode::EndlessLine, 0).await;
        let (bytes, newline) = watch_flood(&f).await;
        assert!(bytes > 1 << 20 && !newline, "{bytes} bytes, newline {newline}");
    }

    #[tokio::test]
    async fn stall_key_exchange_accepts_tcp_and_never_finishes_the_handshake() {
        let f = fixture(Mode::StallKeyExchange, 0).await;
        let result = within(Duration::from_secs(5), f.connect(None)).await.map(|r| r.map(|_| ()));
        assert!(matches!(result, Some(Err(RemoteError::Connect { .. }))), "{result:?}");
        let c = f.server.counters();
        assert!(c.connections >= 1 && c.authenticated == 0, "{c:?}");
        // The server sends nothing at all, not even its identification string.
        let mut raw = TcpStream::connect(f.server.addr()).await.unwrap();
        let mut buf = [0u8; 16];
        assert!(within(Duration::from_millis(500), raw.read(&mut buf)).await.is_none());
    }

    #[tokio::test]
    async fn change_host_key_presents_another_key_from_the_second_connection_on() {
        let f = fixture(Mode::ChangeHostKey, 0).await;
        let first = f.connect(None).await.unwrap();
        let pinned = first.host_key_fingerprint().unwrap();
        assert_eq!(pinned, f.server.host_key_fingerprint());
        assert!(first.run("true", quick()).await.unwrap().success());
        match f.connect(Some(pinned.clone())).await.map(|_| ()) {
            Err(RemoteError::HostKeyChanged { expected, actual, .. }) => {
                assert_eq!(
                    (expected.as_str(), actual.as_str()),
                    (pinned.as_str(), f.server.other_host_key_fingerprint())
                );
            }
            other => panic!("expected HostKeyChanged, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_mode_can_start_after_normal_execs() {
        let f = fixture(Mode::HangOnExec, 2).await;
        let exec = f.connect(None).await.unwrap();
        assert_eq!(f.server.mode(), (Mode::HangOnExec, false));
        for _ in 0..2 {
            assert!(exec.run("true", quick()).await.unwrap().success());
        }
        assert_eq!(f.server.mode(), (Mode::HangOnExec, true));
        let result = within(Duration::from_secs(3), exec.run("true", quick())).await;
        assert!(!matches!(result, Some(Ok(_))), "{result:?}");
        assert!(f.server.counters().exec_requests >= 3);
    }

    #[tokio::test]
    async fn a_connection_level_mode_set_at_run_time_drops_the_open_connection() {
        let f = fixture(Mode::Normal, 0).await;
        let exec = f.connect(None).await.unwrap();
        assert!(exec.run("true", quick()).await.unwrap().success());
        f.server.set_mode(Mode::ChangeHostKey);
        // The old connection is dropped; the reconnect meets the other key.
        let result = within(Duration::from_secs(5), exec.run("true", quick())).await;
        assert!(matches!(result, Some(Err(RemoteError::HostKeyChanged { .. }))), "{result:?}");

        f.server.set_mode(Mode::Normal);
        let exec = f.connect(None).await.unwrap();
        f.server.set_mode_after_execs(Mode::StallKeyExchange, 1);
        assert!(exec.run("true", quick()).await.unwrap().success());
        let result = within(Duration::from_secs(5), exec.run("true", quick())).await;
        assert!(matches!(result, Some(Err(RemoteError::Connect { .. }))), "{result:?}");
    }

    #[tokio::test]
    async fn a_hang_mode_freezes_what_already_runs() {
        let f = fixture(Mode::Normal, 0).await;
        let exec = f.connect(None).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log");
        std::fs::write(&file, b"line\n").unwrap();
        let file = file.to_str().unwrap();
        // The SFTP session is open and answers.
        assert_eq!(exec.read_from(file, 0, 100).await.unwrap().data, b"line\n");
        f.server.set_mode(Mode::HangAfterExec);
        let received = f.server.counters().bytes_received;
        let result = within(Duration::from_secs(3), exec.read_from(file, 0, 100)).await;
        assert!(!matches!(result, Some(Ok(_))), "{result:?}");
        // The same session, its requests still read by the frozen machine.
        let c = f.server.counters();
        assert!(c.subsystem_requests == 1 && c.bytes_received > received, "{c:?}");
    }

    #[tokio::test]
    async fn the_exec_that_arms_a_hang_mode_still_completes() {
        let f = fixture(Mode::HangAfterExec, 1).await;
        let exec = f.connect(None).await.unwrap();
        let out = within(Duration::from_secs(3), exec.run("echo last", quick())).await;
        assert_eq!(out.and_then(Result::ok).map(|o| o.stdout_lossy()).as_deref(), Some("last\n"));
        assert_eq!(f.server.mode(), (Mode::HangAfterExec, true));
    }

    #[tokio::test]
    async fn the_server_stops_when_dropped() {
        let f = fixture(Mode::Normal, 0).await;
        let addr = f.server.addr();
        drop(f);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
