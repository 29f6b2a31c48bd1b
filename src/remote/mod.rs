//! Remote execution: running commands and moving files on the machine that trains, over SSH
//! (`ssh.rs`, russh) or on this machine (`local.rs`, for `gpu-trainer launch` and fast tests).
//!
//! The trait is deliberately narrow; the job engine, the monitor and the artifact uploader only
//! ever see `dyn RemoteExec`.
//!
//! Around the trait: `dataset` (validate and pack a folder, stage it on the machine), `tool`
//! (declarative training recipes rendered with shell-quoted values), `launch` (background start,
//! idempotent, graceful stop) and `layout` (the remote work dir of one job).

pub mod bounds;
pub mod dataset;
#[doc(hidden)]
pub mod hostile;
pub mod launch;
pub mod local;
pub mod ssh;
pub mod tool;

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod hostile_tests;

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;

pub use bounds::{DEFAULT_OUTPUT_LIMIT, Phase, TimedOut};

/// What a finished command left behind. Each stream is kept within `RunOptions::output_limit`:
/// past it, its first and last halves are kept and the bytes in between counted as dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status; `None` when the command was killed by a signal or the channel closed without one.
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Bytes of stdout dropped between the kept head and tail (0: `stdout` is complete).
    pub stdout_dropped: u64,
    /// Bytes of stderr dropped between the kept head and tail (0: `stderr` is complete).
    pub stderr_dropped: u64,
}

impl ExecOutput {
    /// A complete output (nothing dropped), e.g. for a fake machine in tests.
    pub fn new(exit_code: Option<i32>, stdout: impl Into<Vec<u8>>, stderr: impl Into<Vec<u8>>) -> Self {
        Self { exit_code, stdout: stdout.into(), stderr: stderr.into(), ..Default::default() }
    }

    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// Stdout as text; where bytes were dropped, a marker between head and tail says how many.
    pub fn stdout_lossy(&self) -> String {
        lossy_with_gap(&self.stdout, self.stdout_dropped)
    }

    /// Stderr as text; where bytes were dropped, a marker between head and tail says how many.
    pub fn stderr_lossy(&self) -> String {
        lossy_with_gap(&self.stderr, self.stderr_dropped)
    }

    /// Fails with [`RemoteError::TooLarge`] when stdout was cut: a caller that parses the output
    /// must not parse half of it. (Stderr is only ever shown, where its head and tail suffice: a
    /// command that warns a lot still succeeds.)
    pub fn require_complete(&self, what: &str) -> Result<(), RemoteError> {
        if self.stdout_dropped == 0 {
            return Ok(());
        }
        Err(RemoteError::TooLarge {
            what: format!("the output of {what} ({} bytes)", self.stdout.len() as u64 + self.stdout_dropped),
            // When bytes were dropped, what is kept is exactly the limit.
            limit: self.stdout.len() as u64,
        })
    }
}

/// A kept head and tail (of equal halves, the tail one byte longer for an odd limit) as text.
fn lossy_with_gap(kept: &[u8], dropped: u64) -> String {
    if dropped == 0 {
        return String::from_utf8_lossy(kept).into_owned();
    }
    let (head, tail) = kept.split_at(kept.len() / 2);
    format!(
        "{}\n[... {dropped} bytes dropped ...]\n{}",
        String::from_utf8_lossy(head),
        String::from_utf8_lossy(tail)
    )
}

/// Options for one command.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The command is abandoned (and its process killed where possible) after this long.
    pub timeout: Duration,
    /// Extra environment for this command only. Values never appear on the command line, so
    /// `ps` on the machine does not show them.
    pub env: Vec<(String, String)>,
    /// Most bytes kept of each of stdout and stderr (head and tail halves); streaming forwards no
    /// more than this per stream either.
    pub output_limit: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        // A quick command: a working machine answers within seconds, and a job gives up on a
        // machine after two passes of silence, so this bounds how long a dead one is kept.
        Self { timeout: Duration::from_secs(30), env: Vec::new(), output_limit: DEFAULT_OUTPUT_LIMIT }
    }
}

impl RunOptions {
    /// Default options with this timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self { timeout, ..Default::default() }
    }
}

/// Bytes read from a remote file starting at an offset, for following a growing log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileChunk {
    /// Offset of the first byte of `data` in the file.
    pub offset: u64,
    pub data: Vec<u8>,
    /// Size of the file when it was read; smaller than `offset` means the file was truncated or
    /// replaced, and the reader should start again from 0.
    pub file_size: u64,
}

/// Outcome of a file transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferReport {
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the file's content.
    pub sha256: String,
    /// True when the destination already had identical content and nothing was sent.
    pub skipped: bool,
}

/// One piece of a running command's output, as it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputChunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Errors of remote execution.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("failed to connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the host key of {target} changed: expected {expected}, got {actual}")]
    HostKeyChanged { target: String, expected: String, actual: String },
    #[error("authentication to {target} was refused")]
    AuthRefused { target: String },
    /// The operation passed its deadline; says at which step (what the machine did).
    #[error("{0}")]
    Timeout(TimedOut),
    /// The machine sent more than a limit allows (output, a line, a file).
    #[error("{what} exceeded the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// The machine reported something that is refused (an invalid name, too many files).
    #[error("refused what the machine reported: {0}")]
    Refused(String),
    #[error("checksum mismatch for {path}: expected {expected}, got {actual}")]
    ChecksumMismatch { path: String, expected: String, actual: String },
    #[error("{path} does not exist")]
    NotFound { path: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("{operation} failed")]
    Io {
        operation: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A machine that runs commands and holds files. Implementations: SSH and local.
#[async_trait]
pub trait RemoteExec: Send + Sync {
    /// Runs `command` with `sh -c` and waits for it, up to `opts.timeout`.
    async fn run(&self, command: &str, opts: RunOptions) -> Result<ExecOutput, RemoteError>;

    /// Like [`RemoteExec::run`], and also sends each piece of output to `output` as it arrives
    /// (the full output is still returned). The default sends everything at the end; both
    /// implementations here stream for real.
    async fn run_streaming(
        &self,
        command: &str,
        opts: RunOptions,
        output: tokio::sync::mpsc::Sender<OutputChunk>,
    ) -> Result<ExecOutput, RemoteError> {
        let out = self.run(command, opts).await?;
        // A closed receiver only means nobody listens any more; the result still counts.
        let _ = output.send(OutputChunk::Stdout(out.stdout.clone())).await;
        let _ = output.send(OutputChunk::Stderr(out.stderr.clone())).await;
        Ok(out)
    }

    /// Uploads a local file to `remote_path` (parent folders are created). Skipped when the
    /// remote file already has the same SHA-256.
    async fn upload(&self, local_path: &Path, remote_path: &str) -> Result<TransferReport, RemoteError>;

    /// Downloads `remote_path` into a local file, refusing ([`RemoteError::TooLarge`]) a file
    /// larger than `max_bytes`: checked against the size the machine reports before anything is
    /// sent, and enforced while the bytes arrive (a file that grows is cut off at the limit).
    async fn download(
        &self,
        remote_path: &str,
        local_path: &Path,
        max_bytes: u64,
    ) -> Result<TransferReport, RemoteError>;

    /// Reads at most `max_len` bytes of `remote_path` starting at `offset`.
    async fn read_from(&self, remote_path: &str, offset: u64, max_len: u64)
    -> Result<FileChunk, RemoteError>;

    /// True when a process with this pid exists on the machine.
    async fn pid_alive(&self, pid: u32) -> Result<bool, RemoteError>;

    /// A short description for logs and errors, e.g. `root@1.2.3.4:22` or `local:/tmp/work`.
    fn describe(&self) -> String;
}

/// What a remote error says about the machine itself, as opposed to our side or the network in
/// general. The job engine turns repeated or deterministic faults into a verdict on the machine
/// (released, replaced within `backoffLimit`) instead of retrying against it forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineFault {
    /// A connection or command passed its deadline.
    Unresponsive,
    /// Output or reports outside the limits.
    Misbehaved,
    /// The host key is not the one recorded on first contact.
    HostKeyChanged,
}

impl RemoteError {
    /// The machine's part in this error, if it is the machine's doing.
    pub fn machine_fault(&self) -> Option<MachineFault> {
        match self {
            // A ready machine that no longer takes connections (or our key) is as good as gone.
            RemoteError::Timeout(_) | RemoteError::Connect { .. } | RemoteError::AuthRefused { .. } => {
                Some(MachineFault::Unresponsive)
            }
            RemoteError::TooLarge { .. } | RemoteError::Refused(_) => Some(MachineFault::Misbehaved),
            RemoteError::HostKeyChanged { .. } => Some(MachineFault::HostKeyChanged),
            _ => None,
        }
    }

    pub(crate) fn io(
        operation: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        RemoteError::Io { operation: operation.into(), source: source.into() }
    }
}

/// Checks that `name` can be an environment variable name (letters, digits, `_`, not starting
/// with a digit), so it can be written into a shell script without quoting.
pub(crate) fn check_env_name(name: &str) -> Result<(), RemoteError> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(RemoteError::InvalidRequest(format!("invalid environment variable name {name:?}")))
    }
}

/// Quotes `value` for a POSIX shell. Fails only on NUL bytes, which no shell word can hold.
pub fn shell_quote(value: &str) -> Result<String, RemoteError> {
    shlex::try_quote(value)
        .map(|q| q.into_owned())
        .map_err(|_| RemoteError::InvalidRequest("a value contains a NUL byte".to_string()))
}

/// Shell snippet printing the lower-case hex SHA-256 of the file `quoted_path` (already quoted
/// or a quoted variable reference). Prefers OpenSSL, which uses the CPU's SHA instructions and is
/// several times faster than coreutils' `sha256sum` on multi-gigabyte files.
pub(crate) fn sha256_shell(quoted_path: &str) -> String {
    format!(
        "if command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 -r < {quoted_path} | cut -d' ' -f1; \
         else sha256sum < {quoted_path} | cut -d' ' -f1; fi"
    )
}

/// Lower-case hex SHA-256 of a local file, computed off the async runtime.
pub async fn sha256_file(path: &Path) -> Result<(String, u64), RemoteError> {
    sha256_file_within(path, u64::MAX).await
}

/// Like [`sha256_file`], failing with [`RemoteError::TooLarge`] once more than `max_bytes` were
/// read (a file that keeps growing is not read for ever).
pub(crate) async fn sha256_file_within(path: &Path, max_bytes: u64) -> Result<(String, u64), RemoteError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        use std::io::Read;
        let mut file = std::fs::File::open(&path).map_err(|e| open_error(&path, e))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n =
                file.read(&mut buf).map_err(|e| RemoteError::io(format!("read {}", path.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
            if total > max_bytes {
                return Err(RemoteError::TooLarge {
                    what: format!("the file {}", path.display()),
                    limit: max_bytes,
                });
            }
        }
        Ok((hex::encode(hasher.finalize()), total))
    })
    .await
    .map_err(|e| RemoteError::io("hash a file", e))?
}

fn open_error(path: &Path, e: std::io::Error) -> RemoteError {
    if e.kind() == std::io::ErrorKind::NotFound {
        RemoteError::NotFound { path: path.display().to_string() }
    } else {
        RemoteError::io(format!("open {}", path.display()), e)
    }
}

/// The first [`RemoteError`] in `error`'s source chain.
pub fn remote_error_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a RemoteError> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(remote) = e.downcast_ref::<RemoteError>() {
            return Some(remote);
        }
        current = e.source();
    }
    None
}
