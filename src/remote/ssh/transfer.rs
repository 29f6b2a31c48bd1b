//! Uploads and downloads of `SshExec`: resumable, verified with SHA-256, and bounded for files of
//! any size: a transfer fails when no byte moves for `transfer_stall_timeout` (opening it and
//! finishing it included) and after `transfer_deadline` as a whole; a download stops at its size
//! limit. A timeout or a size refusal is not retried (the machine, not the network, is at fault);
//! other errors reconnect and resume up to `transfer_attempts` times.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use russh::ChannelMsg;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::super::bounds::{LINE_LIMIT, LineError, read_line_capped};
use super::super::{Phase, RemoteError, TransferReport, shell_quote};
use super::{MARKER, SshExec, map_sftp};

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

/// Errors a new attempt cannot fix: the machine stopped answering, or sent what is refused.
fn not_worth_retrying(e: &RemoteError) -> bool {
    matches!(e, RemoteError::Timeout(_) | RemoteError::TooLarge { .. } | RemoteError::NotFound { .. })
}

/// Counts the bytes read through it: how far a transfer got, for the stall watchdog.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            self.count.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        }
        polled
    }
}

/// Why the upload watchdog ended a send.
enum Watchdog {
    ConnectionLost,
    Stalled,
    Deadline,
}

/// Ends when the connection is gone, when `moved` has not changed for `stall`, or at `deadline`.
async fn watch(
    is_closed: impl Fn() -> bool,
    moved: &AtomicU64,
    stall: Duration,
    deadline: Instant,
) -> Watchdog {
    let mut last = moved.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if is_closed() {
            return Watchdog::ConnectionLost;
        }
        let now = Instant::now();
        let current = moved.load(Ordering::Relaxed);
        if current != last {
            last = current;
            last_change = now;
        } else if now.duration_since(last_change) >= stall {
            return Watchdog::Stalled;
        }
        if now >= deadline {
            return Watchdog::Deadline;
        }
    }
}

impl SshExec {
    /// Uploads like [`super::super::RemoteExec::upload`] and also says where a resumed transfer
    /// started.
    pub async fn upload_resumable(
        &self,
        local_path: &Path,
        remote_path: &str,
    ) -> Result<UploadOutcome, RemoteError> {
        let deadline = Instant::now() + self.options.transfer_deadline;
        let size =
            tokio::fs::metadata(local_path).await.map_err(|e| super::super::open_error(local_path, e))?.len();
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
            tokio::spawn(async move { super::super::sha256_file(&path).await })
        };
        if existing == size as i64 {
            let local = join_hash(local_hash).await?;
            if self.remote_sha256(remote_path).await?.as_deref() == Some(local.as_str()) {
                return Ok(UploadOutcome {
                    report: TransferReport { bytes: size, sha256: local, skipped: true },
                    resumed_from: None,
                });
            }
            return self.transfer_up(local_path, remote_path, size, Some(local), None, deadline).await;
        }
        self.transfer_up(local_path, remote_path, size, None, Some(local_hash), deadline).await
    }

    async fn transfer_up(
        &self,
        local_path: &Path,
        remote_path: &str,
        size: u64,
        mut local_sha: Option<String>,
        mut pending_hash: Option<HashTask>,
        deadline: Instant,
    ) -> Result<UploadOutcome, RemoteError> {
        let part = format!("{remote_path}.part");
        let mut resumed_from = None;
        let mut restarted = false;
        let started = std::time::Instant::now();
        'transfer: loop {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.send_part(local_path, &part, size, deadline).await {
                    Ok(start) => {
                        if start > 0 && resumed_from.is_none() {
                            resumed_from = Some(start);
                        }
                        break;
                    }
                    Err((e, fatal))
                        if fatal || not_worth_retrying(&e) || attempt >= self.options.transfer_attempts =>
                    {
                        return Err(e);
                    }
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
                (None, None) => super::super::sha256_file(local_path).await?.0,
            };
            tracing::debug!(target = %self.target, elapsed = ?started.elapsed(), "Local hash ready");
            let remote = self.remote_sha256(&part).await?.unwrap_or_default();
            tracing::debug!(target = %self.target, elapsed = ?started.elapsed(), "Remote hash ready");
            if remote != local {
                // A corrupt part must not be resumed again.
                let _ = self
                    .run_inner(&format!("rm -f {}", shell_quote(&part)?), Default::default(), None, true)
                    .await;
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
    /// reports the part's size on one line, which is where this attempt continues. (Hashing on
    /// the machine while the bytes stream, behind `tee`, was measured slower on a busy 2-core
    /// machine than hashing the finished file with OpenSSL.) Returns the offset; the error says
    /// whether retrying is pointless.
    async fn send_part(
        &self,
        local_path: &Path,
        part: &str,
        size: u64,
        deadline: Instant,
    ) -> Result<u64, (RemoteError, bool)> {
        let stall = self.options.transfer_stall_timeout;
        let retry = |op: &str, e: russh::Error| (RemoteError::io(format!("{op} {part}"), e), false);
        let fatal = |e: RemoteError| (e, true);
        let q = shell_quote(part).map_err(fatal)?;
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
        let command = format!("sh -c {} {MARKER}", shell_quote(&script).map_err(fatal)?);
        // Opening the channel and the writer's first line: no progress for `stall` ends it.
        let (conn, channel, setup_deadline) = self.open_channel(stall).await.map_err(|e| (e, false))?;
        let setup_deadline = setup_deadline.min(deadline);
        let (mut read, write) = channel.split();
        let mut answered = false;
        let first_line = async {
            write.exec(true, command).await.map_err(|e| retry("start writing", e))?;
            let mut line = Vec::new();
            loop {
                match read.wait().await {
                    Some(ChannelMsg::Success) => answered = true,
                    Some(ChannelMsg::Data { data }) => {
                        answered = true;
                        match read_line_capped(&mut line, &data, LINE_LIMIT) {
                            Ok(Some(line)) => return Ok(line),
                            Ok(None) => {}
                            Err(LineError::TooLong) => {
                                let what = format!("the first line of the writer of {part}");
                                return Err(fatal(RemoteError::TooLarge { what, limit: LINE_LIMIT as u64 }));
                            }
                        }
                    }
                    Some(ChannelMsg::Failure) => {
                        let e =
                            RemoteError::io(format!("write {part}"), "the machine refused the exec request");
                        return Err(fatal(e));
                    }
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        let e = RemoteError::io(
                            format!("write {part}"),
                            format!("the writer exited with {exit_status}"),
                        );
                        return Err(fatal(e));
                    }
                    Some(_) => {}
                    None => {
                        return Err((RemoteError::io(format!("write {part}"), "the channel closed"), false));
                    }
                }
            }
        };
        let first = match tokio::time::timeout_at(setup_deadline, first_line).await {
            Ok(first) => first?,
            Err(_) => {
                let phase = if answered { Phase::TransferStalled } else { Phase::ExecRequest };
                self.discard(&conn).await;
                return Err(fatal(RemoteError::timeout(phase, stall)));
            }
        };
        let start: u64 = String::from_utf8_lossy(&first).trim().parse().map_err(|_| {
            fatal(RemoteError::io(format!("write {part}"), "the writer did not report the part's size"))
        })?;
        if start > size {
            let e = RemoteError::Refused(format!("the writer of {part} reported {start} bytes of {size}"));
            return Err(fatal(e));
        }
        let mut local = tokio::fs::File::open(local_path)
            .await
            .map_err(|e| fatal(super::super::open_error(local_path, e)))?;
        if start > 0 {
            local
                .seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| fatal(RemoteError::io("seek the local file", e)))?;
        }
        let moved = Arc::new(AtomicU64::new(0));
        let reader =
            Counting { inner: tokio::io::BufReader::with_capacity(1 << 20, local), count: moved.clone() };
        // russh does not wake a sender waiting for window space when the connection dies, so a
        // watchdog ends the send once the connection is gone, or when the window stays shut.
        tokio::select! {
            sent = write.data(reader) => sent.map_err(|e| retry("send", e))?,
            why = watch(|| conn.handle.is_closed(), &moved, stall, deadline) => {
                let e = match why {
                    Watchdog::ConnectionLost => {
                        return Err((RemoteError::io(format!("write {part}"), "the connection was lost"), false));
                    }
                    Watchdog::Stalled => RemoteError::timeout(Phase::TransferStalled, stall),
                    Watchdog::Deadline => RemoteError::timeout(Phase::TransferDeadline, self.options.transfer_deadline),
                };
                tracing::warn!(machine = %self.target, error = %e, "Upload timed out; dropping the connection");
                self.discard(&conn).await;
                return Err(fatal(e));
            }
        }
        // The writer ends once it has the rest: within `stall` of the last byte.
        let finish = async {
            write.eof().await.map_err(|e| retry("finish", e))?;
            loop {
                match read.wait().await {
                    Some(ChannelMsg::ExitStatus { exit_status: 0 }) => return Ok(start),
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        let e = RemoteError::io(
                            format!("write {part}"),
                            format!("the writer exited with {exit_status}"),
                        );
                        return Err((e, false));
                    }
                    Some(_) => {}
                    None => {
                        return Err((RemoteError::io(format!("write {part}"), "the channel closed"), false));
                    }
                }
            }
        };
        let finish_deadline = (Instant::now() + stall).min(deadline);
        match tokio::time::timeout_at(finish_deadline, finish).await {
            Ok(finished) => finished,
            Err(_) => {
                self.discard(&conn).await;
                Err(fatal(RemoteError::timeout(Phase::TransferStalled, stall)))
            }
        }
    }

    /// Downloads `remote_path` to `local_path` (through `<local_path>.part`), refusing a file
    /// larger than `max_bytes`: by the size the machine reports before anything else is asked of
    /// it, and while the bytes arrive.
    pub(super) async fn transfer_down(
        &self,
        remote_path: &str,
        local_path: &Path,
        max_bytes: u64,
    ) -> Result<TransferReport, RemoteError> {
        let deadline = Instant::now() + self.options.transfer_deadline;
        let reported = self.remote_size(remote_path).await?;
        if reported > max_bytes {
            return Err(too_large(remote_path, max_bytes));
        }
        let remote_sha = self
            .remote_sha256(remote_path)
            .await?
            .ok_or_else(|| RemoteError::NotFound { path: remote_path.to_string() })?;
        if let Ok((local, bytes)) = super::super::sha256_file(local_path).await
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
            match self.receive_part(remote_path, &part, max_bytes, deadline).await {
                Ok(()) => break,
                Err(e) if not_worth_retrying(&e) => {
                    if matches!(e, RemoteError::TooLarge { .. }) {
                        let _ = tokio::fs::remove_file(&part).await;
                    }
                    return Err(e);
                }
                Err(e) if attempt >= self.options.transfer_attempts => return Err(e),
                Err(e) => {
                    tracing::warn!(target = %self.target, attempt, error = %e, "Download interrupted, resuming");
                    self.drop_connection().await;
                }
            }
        }
        let (local, bytes) = super::super::sha256_file(&part).await?;
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

    /// Appends the rest of `remote_path` to `part` over SFTP. Every request must be answered
    /// within the stall limit, and the part never grows past `max_bytes`.
    pub(super) async fn receive_part(
        &self,
        remote_path: &str,
        part: &Path,
        max_bytes: u64,
        deadline: Instant,
    ) -> Result<(), RemoteError> {
        let stall = self.options.transfer_stall_timeout;
        let step_deadline = || (Instant::now() + stall).min(deadline);
        let (conn, sftp, _) = self.sftp(stall).await?;
        let start = tokio::fs::metadata(part).await.map(|m| m.len()).unwrap_or(0);
        let mut remote = self
            .within(&conn, step_deadline(), Phase::FileRequest, stall, sftp.open(remote_path))
            .await?
            .map_err(|e| map_sftp(remote_path, "open", e))?;
        let size = self
            .within(&conn, step_deadline(), Phase::FileRequest, stall, remote.metadata())
            .await?
            .map_err(|e| map_sftp(remote_path, "stat", e))?
            .len();
        if size > max_bytes {
            return Err(too_large(remote_path, max_bytes));
        }
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
            self.within(
                &conn,
                step_deadline(),
                Phase::FileRequest,
                stall,
                remote.seek(std::io::SeekFrom::Start(start)),
            )
            .await?
            .map_err(|e| RemoteError::io("seek", e))?;
        }
        let mut received = start;
        let mut buf = vec![0u8; 4 << 20];
        loop {
            let read = tokio::time::timeout_at(step_deadline(), remote.read(&mut buf)).await;
            let n = match read {
                Ok(n) => n.map_err(|e| RemoteError::io(format!("read {remote_path}"), e))?,
                Err(_) => {
                    let e = if Instant::now() >= deadline {
                        RemoteError::timeout(Phase::TransferDeadline, self.options.transfer_deadline)
                    } else {
                        RemoteError::timeout(Phase::TransferStalled, stall)
                    };
                    tracing::warn!(machine = %self.target, error = %e, "Download timed out; dropping the connection");
                    self.discard(&conn).await;
                    return Err(e);
                }
            };
            if n == 0 {
                break;
            }
            // The file may grow while it is read: what passes the limit is never written.
            received += n as u64;
            if received > max_bytes {
                return Err(too_large(remote_path, max_bytes));
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

fn too_large(remote_path: &str, limit: u64) -> RemoteError {
    RemoteError::TooLarge { what: format!("the file {remote_path}"), limit }
}
