//! `RemoteExec` on this machine, in a work dir: used by `gpu-trainer launch` (no SSH at all)
//! and by fast tests. Behaves like the SSH implementation: commands run with `sh -c` (in the
//! work dir), relative paths are relative to the work dir, transfers are copies that are skipped
//! when the destination already has the same SHA-256. The same bounds hold: a command's deadline
//! covers the process and the reading of its output, output is capped (head and tail), file reads
//! have a deadline (a FIFO never answers `open`), and a download stops at its size limit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::bounds::{Capture, flood_limit};
use super::{ExecOutput, FileChunk, OutputChunk, Phase, RemoteError, RemoteExec, RunOptions, TransferReport};

/// Runs commands and holds files on this machine.
#[derive(Clone, Debug)]
pub struct LocalExec {
    work_dir: PathBuf,
    /// Limit for one file read (`read_from`, `pid_alive`), like an SFTP request over SSH.
    request_timeout: Duration,
}

impl LocalExec {
    /// Uses `work_dir` (created if missing) as the current directory of every command.
    pub fn new(work_dir: impl Into<PathBuf>) -> Result<Self, RemoteError> {
        let work_dir = work_dir.into();
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| RemoteError::io(format!("create {}", work_dir.display()), e))?;
        Ok(Self { work_dir, request_timeout: Duration::from_secs(30) })
    }

    /// Sets the limit for one file read (default 30 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() { p.to_path_buf() } else { self.work_dir.join(p) }
    }

    async fn copy_verified(
        &self,
        from: &Path,
        to: &Path,
        max_bytes: u64,
    ) -> Result<TransferReport, RemoteError> {
        // Only regular files: a FIFO or a device would block or never end.
        let meta = tokio::fs::metadata(from).await.map_err(|e| super::open_error(from, e))?;
        if !meta.is_file() {
            return Err(RemoteError::NotFound { path: from.display().to_string() });
        }
        if meta.len() > max_bytes {
            return Err(too_large(from, max_bytes));
        }
        let (sha256, bytes) = super::sha256_file_within(from, max_bytes).await?;
        if tokio::fs::try_exists(to).await.unwrap_or(false)
            && let Ok((existing, _)) = super::sha256_file(to).await
            && existing == sha256
        {
            return Ok(TransferReport { bytes, sha256, skipped: true });
        }
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| RemoteError::io(format!("create {}", parent.display()), e))?;
        }
        // Copy next to the destination and rename, so a reader never sees half a file.
        let part = part_path(to);
        if let Err(e) = copy_capped(from, &part, max_bytes).await {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
        let (copied, _) = super::sha256_file(&part).await?;
        if copied != sha256 {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(RemoteError::ChecksumMismatch {
                path: to.display().to_string(),
                expected: sha256,
                actual: copied,
            });
        }
        tokio::fs::rename(&part, to)
            .await
            .map_err(|e| RemoteError::io(format!("rename {}", part.display()), e))?;
        Ok(TransferReport { bytes, sha256, skipped: false })
    }
}

fn too_large(path: &Path, limit: u64) -> RemoteError {
    RemoteError::TooLarge { what: format!("the file {}", path.display()), limit }
}

/// Copies `from` to `to`, failing as soon as more than `max_bytes` have been read (a file that
/// grows while it is copied is cut off at the limit, not copied first and measured after).
async fn copy_capped(from: &Path, to: &Path, max_bytes: u64) -> Result<u64, RemoteError> {
    use tokio::io::AsyncWriteExt;
    let source = tokio::fs::File::open(from).await.map_err(|e| super::open_error(from, e))?;
    let mut dest = tokio::fs::File::create(to)
        .await
        .map_err(|e| RemoteError::io(format!("create {}", to.display()), e))?;
    // One byte past the limit is enough to know the file is too large.
    let mut limited = source.take(max_bytes.saturating_add(1));
    let copied = tokio::io::copy(&mut limited, &mut dest)
        .await
        .map_err(|e| RemoteError::io(format!("copy {} to {}", from.display(), to.display()), e))?;
    if copied > max_bytes {
        return Err(too_large(from, max_bytes));
    }
    dest.flush().await.map_err(|e| RemoteError::io(format!("write {}", to.display()), e))?;
    Ok(copied)
}

fn part_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".part");
    path.with_file_name(name)
}

/// Kills a whole process group; the command was started as its own group leader so the
/// children it forked go too.
fn kill_group(pgid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Reads one output stream to its end, keeping it within `limit` (head and tail) and streaming
/// no more than the limit on. The caller's deadline bounds the whole read.
async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    limit: usize,
    wrap: fn(Vec<u8>) -> OutputChunk,
    output: Option<mpsc::Sender<OutputChunk>>,
    what: &'static str,
) -> Result<(Vec<u8>, u64), RemoteError> {
    let mut capture = Capture::new(limit);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| RemoteError::io(format!("read {what}"), e))?;
        if n == 0 {
            return Ok(capture.finish());
        }
        let forward = capture.push(&buf[..n]);
        if let Some(tx) = &output
            && !forward.is_empty()
        {
            let _ = tx.send(wrap(forward.to_vec())).await;
        }
        if capture.flooded() {
            // Reading on until the deadline would only cost time (see `flood_limit`).
            let stream = if what == "stderr" { "error output" } else { "output" };
            return Err(RemoteError::TooLarge {
                what: format!("the {stream} of a command"),
                limit: flood_limit(limit),
            });
        }
    }
}

/// True when `/proc/<pid>` shows a process that is not a zombie. Zombies count as dead: a
/// background trainer reparented to a PID 1 that never reaps would otherwise look alive forever.
pub(crate) fn proc_alive(pid: u32) -> Option<bool> {
    if !Path::new("/proc/self/stat").exists() {
        return None;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            Some(!matches!(state, Some('Z') | Some('X') | None))
        }
        Err(_) => Some(false),
    }
}

impl LocalExec {
    async fn run_inner(
        &self,
        command: &str,
        opts: RunOptions,
        output: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<ExecOutput, RemoteError> {
        for (name, _) in &opts.env {
            super::check_env_name(name)?;
        }
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .current_dir(&self.work_dir)
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| RemoteError::io("start sh", e))?;
        let pgid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let limit = opts.output_limit;
        // The deadline covers the process and both pumps: a child that keeps the pipes open after
        // the shell exits cannot hold the call past it either.
        let work = async {
            let out = async {
                match stdout {
                    Some(s) => pump(s, limit, OutputChunk::Stdout, output.clone(), "stdout").await,
                    None => Ok((Vec::new(), 0)),
                }
            };
            let err = async {
                match stderr {
                    Some(s) => pump(s, limit, OutputChunk::Stderr, output.clone(), "stderr").await,
                    None => Ok((Vec::new(), 0)),
                }
            };
            // A flood ends its pump first; the command is then stopped rather than waited for.
            let stop_on_flood = |pumped: Result<(Vec<u8>, u64), RemoteError>| {
                if pumped.is_err()
                    && let Some(pgid) = pgid
                {
                    kill_group(pgid);
                }
                pumped
            };
            let (out, err) =
                tokio::join!(async { stop_on_flood(out.await) }, async { stop_on_flood(err.await) });
            let status = child.wait().await.map_err(|e| RemoteError::io("wait for sh", e))?;
            let (stdout, stdout_dropped) = out?;
            let (stderr, stderr_dropped) = err?;
            Ok::<_, RemoteError>(ExecOutput {
                exit_code: status.code(),
                stdout,
                stderr,
                stdout_dropped,
                stderr_dropped,
            })
        };
        match tokio::time::timeout(opts.timeout, work).await {
            Ok(result) => result,
            Err(_) => {
                if let Some(pgid) = pgid {
                    kill_group(pgid);
                }
                Err(RemoteError::timeout(Phase::Output, opts.timeout))
            }
        }
    }
}

#[async_trait]
impl RemoteExec for LocalExec {
    async fn run(&self, command: &str, opts: RunOptions) -> Result<ExecOutput, RemoteError> {
        self.run_inner(command, opts, None).await
    }

    async fn run_streaming(
        &self,
        command: &str,
        opts: RunOptions,
        output: mpsc::Sender<OutputChunk>,
    ) -> Result<ExecOutput, RemoteError> {
        self.run_inner(command, opts, Some(output)).await
    }

    async fn upload(&self, local_path: &Path, remote_path: &str) -> Result<TransferReport, RemoteError> {
        let to = self.resolve(remote_path);
        // Our own file: no limit but the disk.
        self.copy_verified(local_path, &to, u64::MAX).await
    }

    async fn download(
        &self,
        remote_path: &str,
        local_path: &Path,
        max_bytes: u64,
    ) -> Result<TransferReport, RemoteError> {
        let from = self.resolve(remote_path);
        self.copy_verified(&from, local_path, max_bytes).await
    }

    async fn read_from(
        &self,
        remote_path: &str,
        offset: u64,
        max_len: u64,
    ) -> Result<FileChunk, RemoteError> {
        match tokio::time::timeout(self.request_timeout, self.read_from_inner(remote_path, offset, max_len))
            .await
        {
            Ok(result) => result,
            Err(_) => Err(RemoteError::timeout(Phase::FileRequest, self.request_timeout)),
        }
    }

    async fn pid_alive(&self, pid: u32) -> Result<bool, RemoteError> {
        if pid == 0 {
            return Ok(false);
        }
        if let Some(alive) = proc_alive(pid) {
            return Ok(alive);
        }
        let out = self.run(&format!("kill -0 {pid}"), RunOptions::with_timeout(self.request_timeout)).await?;
        Ok(out.success())
    }

    fn describe(&self) -> String {
        format!("local:{}", self.work_dir.display())
    }
}

impl LocalExec {
    async fn read_from_inner(
        &self,
        remote_path: &str,
        offset: u64,
        max_len: u64,
    ) -> Result<FileChunk, RemoteError> {
        let path = self.resolve(remote_path);
        let mut file = tokio::fs::File::open(&path).await.map_err(|e| super::open_error(&path, e))?;
        let file_size =
            file.metadata().await.map_err(|e| RemoteError::io(format!("stat {}", path.display()), e))?.len();
        let mut data = Vec::new();
        if offset < file_size {
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| RemoteError::io(format!("seek {}", path.display()), e))?;
            file.take(max_len.min(file_size - offset))
                .read_to_end(&mut data)
                .await
                .map_err(|e| RemoteError::io(format!("read {}", path.display()), e))?;
        }
        Ok(FileChunk { offset, data, file_size })
    }
}
