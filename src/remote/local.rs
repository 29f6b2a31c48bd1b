//! `RemoteExec` on this machine, in a work dir: used by `gpu-trainer launch` (no SSH at all)
//! and by fast tests. Behaves like the SSH implementation: commands run with `sh -c` (in the
//! work dir), relative paths are relative to the work dir, transfers are copies that are skipped
//! when the destination already has the same SHA-256.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::{ExecOutput, FileChunk, OutputChunk, RemoteError, RemoteExec, RunOptions, TransferReport};

/// Runs commands and holds files on this machine.
#[derive(Clone, Debug)]
pub struct LocalExec {
    work_dir: PathBuf,
}

impl LocalExec {
    /// Uses `work_dir` (created if missing) as the current directory of every command.
    pub fn new(work_dir: impl Into<PathBuf>) -> Result<Self, RemoteError> {
        let work_dir = work_dir.into();
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| RemoteError::io(format!("create {}", work_dir.display()), e))?;
        Ok(Self { work_dir })
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() { p.to_path_buf() } else { self.work_dir.join(p) }
    }

    async fn copy_verified(&self, from: &Path, to: &Path) -> Result<TransferReport, RemoteError> {
        let (sha256, bytes) = super::sha256_file(from).await?;
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
        tokio::fs::copy(from, &part)
            .await
            .map_err(|e| RemoteError::io(format!("copy {} to {}", from.display(), part.display()), e))?;
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

async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    wrap: fn(Vec<u8>) -> OutputChunk,
    output: Option<mpsc::Sender<OutputChunk>>,
) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(all);
        }
        all.extend_from_slice(&buf[..n]);
        if let Some(tx) = &output {
            let _ = tx.send(wrap(buf[..n].to_vec())).await;
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
        let work = async {
            let out = async {
                match stdout {
                    Some(s) => pump(s, OutputChunk::Stdout, output.clone()).await,
                    None => Ok(Vec::new()),
                }
            };
            let err = async {
                match stderr {
                    Some(s) => pump(s, OutputChunk::Stderr, output.clone()).await,
                    None => Ok(Vec::new()),
                }
            };
            let (out, err, status) = tokio::join!(out, err, child.wait());
            let status = status.map_err(|e| RemoteError::io("wait for sh", e))?;
            Ok::<_, RemoteError>(ExecOutput {
                exit_code: status.code(),
                stdout: out.map_err(|e| RemoteError::io("read stdout", e))?,
                stderr: err.map_err(|e| RemoteError::io("read stderr", e))?,
            })
        };
        match tokio::time::timeout(opts.timeout, work).await {
            Ok(result) => result,
            Err(_) => {
                if let Some(pgid) = pgid {
                    kill_group(pgid);
                }
                Err(RemoteError::Timeout(opts.timeout))
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
        self.copy_verified(local_path, &to).await
    }

    async fn download(&self, remote_path: &str, local_path: &Path) -> Result<TransferReport, RemoteError> {
        let from = self.resolve(remote_path);
        self.copy_verified(&from, local_path).await
    }

    async fn read_from(
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

    async fn pid_alive(&self, pid: u32) -> Result<bool, RemoteError> {
        if pid == 0 {
            return Ok(false);
        }
        if let Some(alive) = proc_alive(pid) {
            return Ok(alive);
        }
        let out = self
            .run(
                &format!("kill -0 {pid}"),
                RunOptions { timeout: Duration::from_secs(10), ..Default::default() },
            )
            .await?;
        Ok(out.success())
    }

    fn describe(&self) -> String {
        format!("local:{}", self.work_dir.display())
    }
}
