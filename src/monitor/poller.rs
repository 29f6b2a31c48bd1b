//! The polling monitor: one call per poll interval reads what the trainer wrote since the last
//! call, checks the process and returns one [`TrainingStatus`]. Everything goes through
//! `dyn RemoteExec`, so it works the same over SSH and locally, and tests use a fake.
//!
//! Cost stays flat however long the run: only the bytes after the last offset are read (capped
//! per poll; the rest comes at the next poll), and on the first poll of an existing large log
//! (an operator restart) only its last [`PollerSettings::initial_tail_bytes`] are read. A log
//! shorter than the offset was truncated or replaced (the trainer restarted): reading starts
//! again from 0 with fresh parser state.
//!
//! The decisions (stall verdict, outcome) are the pure functions of `stall.rs` and
//! [`decide_outcome`]; this file only gathers their inputs. The final-artifact check belongs to
//! the caller, with the checkpoint inventory (`checkpoints.rs`).

use std::time::Duration as StdDuration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::checkpoints::{CheckpointInventory, inventory, listing_command, parse_listing};
use super::errors::ClassifiedError;
use super::events::LogEvent;
use super::parser::{LogParser, ParserKind};
use super::progress::{ProgressSnapshot, ProgressTracker};
use super::stall::{Recommendation, StallAssessment, StallSettings, assess_stall};
use crate::api::{MonitoringSpec, Reason};
use crate::remote::{RemoteError, RemoteExec, RunOptions};

/// Errors of the polling monitor.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("failed to read {path} on {target}")]
    Read {
        path: String,
        target: String,
        #[source]
        source: RemoteError,
    },
    #[error("failed to list the output folder {path} on {target}: {detail}")]
    List { path: String, target: String, detail: String },
    /// The listing is outside the limits ([`super::checkpoints::ListingError`]): the machine's fault.
    #[error("refused the listing of the output folder {path} on {target}")]
    Refused {
        path: String,
        target: String,
        #[source]
        source: RemoteError,
    },
    #[error("failed to check whether pid {pid} is alive on {target}")]
    PidCheck {
        pid: u32,
        target: String,
        #[source]
        source: RemoteError,
    },
}

/// The files the launcher leaves in the remote work dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainingFiles {
    pub log: String,
    pub pid: String,
    pub exit_code: String,
}

impl TrainingFiles {
    /// `train.log`, `train.pid` and `exit_code` in `work_dir` (design section 2).
    pub fn in_work_dir(work_dir: &str) -> Self {
        let dir = work_dir.trim_end_matches('/');
        Self {
            log: format!("{dir}/train.log"),
            pid: format!("{dir}/train.pid"),
            exit_code: format!("{dir}/exit_code"),
        }
    }
}

/// Read limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollerSettings {
    /// Bytes asked for per `read_from` call.
    pub read_bytes: u64,
    /// Calls per poll; what is left is read at the next poll.
    pub reads_per_poll: usize,
    /// On the first poll, skip to this many bytes before the end of an existing log.
    pub initial_tail_bytes: u64,
}

impl Default for PollerSettings {
    fn default() -> Self {
        Self { read_bytes: 4 << 20, reads_per_poll: 8, initial_tail_bytes: 4 << 20 }
    }
}

/// What the trainer process is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum ProcessState {
    /// No pid file yet.
    NotStarted,
    Running {
        pid: u32,
    },
    /// The wrapper wrote the exit code.
    Exited {
        code: i32,
    },
    /// The pid is gone and no exit code was written (the wrapper died too, or the box rebooted).
    Vanished {
        pid: u32,
    },
}

/// How the run ended, when it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Outcome {
    Succeeded,
    Failed { reason: Reason, message: String },
}

/// One poll's result.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainingStatus {
    pub at: DateTime<Utc>,
    pub process: ProcessState,
    pub progress: ProgressSnapshot,
    /// Events other than bar redraws read in this poll, in log order.
    pub new_events: Vec<LogEvent>,
    pub stall: StallAssessment,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Bytes of the log consumed so far.
    pub log_offset: u64,
    /// The log shrank since the last poll and was read again from the start.
    pub log_restarted: bool,
}

/// What an earlier monitor of the same run had concluded, as the job's status keeps it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EarlierMonitoring {
    /// The last step seen and when it last changed.
    pub step: Option<(u64, DateTime<Utc>)>,
    /// When the stall that is still flagged was first flagged.
    pub stall_flagged_since: Option<DateTime<Utc>>,
}

/// Follows one training run.
pub struct TrainingMonitor {
    files: TrainingFiles,
    kind: ParserKind,
    parser: LogParser,
    tracker: ProgressTracker,
    offset: u64,
    first_poll: bool,
    log_finished: bool,
    flagged_since: Option<DateTime<Utc>>,
    stall_settings: StallSettings,
    settings: PollerSettings,
}

impl TrainingMonitor {
    pub fn new(files: TrainingFiles, kind: ParserKind, monitoring: &MonitoringSpec) -> Self {
        Self::with_settings(files, kind, monitoring, PollerSettings::default())
    }

    pub fn with_settings(
        files: TrainingFiles,
        kind: ParserKind,
        monitoring: &MonitoringSpec,
        settings: PollerSettings,
    ) -> Self {
        let stall_settings = StallSettings::from_spec(monitoring);
        Self {
            files,
            kind,
            parser: kind.parser(),
            tracker: ProgressTracker::new(stall_settings.reading_interval),
            offset: 0,
            first_poll: true,
            log_finished: false,
            flagged_since: None,
            stall_settings,
            settings,
        }
    }

    /// Continues the judgement of an earlier monitor of the same run (lost with an operator
    /// restart), from what the job's status kept of it.
    pub fn resume_from(mut self, earlier: &EarlierMonitoring) -> Self {
        if let Some((step, changed_at)) = earlier.step {
            self.tracker.remember_step(step, changed_at);
        }
        self.flagged_since = earlier.stall_flagged_since;
        self
    }

    /// Bytes of the log consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// One poll at `now`.
    pub async fn poll(
        &mut self,
        remote: &dyn RemoteExec,
        now: DateTime<Utc>,
    ) -> Result<TrainingStatus, MonitorError> {
        // The pid is checked before the exit code: a process that exits in between is then seen
        // as exited, never as vanished.
        let pid = self
            .read_small(remote, &self.files.pid.clone())
            .await?
            .and_then(|t| t.trim().parse::<u32>().ok());
        let alive = match pid {
            Some(pid) => remote.pid_alive(pid).await.map_err(|source| MonitorError::PidCheck {
                pid,
                target: remote.describe(),
                source,
            })?,
            None => false,
        };
        let exit_code = self
            .read_small(remote, &self.files.exit_code.clone())
            .await?
            .and_then(|t| t.trim().parse::<i32>().ok());
        let process = match (exit_code, pid) {
            (Some(code), _) => ProcessState::Exited { code },
            (None, Some(pid)) if alive => ProcessState::Running { pid },
            (None, Some(pid)) => ProcessState::Vanished { pid },
            (None, None) => ProcessState::NotStarted,
        };

        let mut new_events = Vec::new();
        let (log_restarted, caught_up) = self.read_log(remote, &mut new_events).await?;
        let ended = matches!(process, ProcessState::Exited { .. } | ProcessState::Vanished { .. });
        if ended && caught_up && !self.log_finished {
            // The process is gone and the log read to its end: its last bar (diffusers never
            // closes it) is final.
            self.log_finished = true;
            let tracker = &mut self.tracker;
            self.parser.finish(&mut |event| keep(event, tracker, &mut new_events));
        }

        let live = self.parser.live();
        self.tracker.observe(now, live.as_ref());
        let progress = self.tracker.snapshot();
        let stall = if ended {
            StallAssessment {
                stalling: false,
                reason: "the trainer is no longer running".into(),
                ..assess_stall(&[], None, None, &self.stall_settings, now)
            }
        } else {
            assess_stall(
                &self.tracker.history(),
                self.tracker.last_progress_at(),
                self.flagged_since,
                &self.stall_settings,
                now,
            )
        };
        self.flagged_since = stall.flagged_since;
        let outcome = decide_outcome(&process, &progress, self.tracker.errors());
        Ok(TrainingStatus {
            at: now,
            process,
            progress,
            new_events,
            stall,
            outcome,
            log_offset: self.offset,
            log_restarted,
        })
    }

    /// Follows the log until the run ends or a stop is recommended, calling `on_status` after
    /// every poll (`launch --watch`). Returns the last status.
    pub async fn follow(
        &mut self,
        remote: &dyn RemoteExec,
        interval: StdDuration,
        on_status: &mut (dyn FnMut(&TrainingStatus) + Send),
    ) -> Result<TrainingStatus, MonitorError> {
        loop {
            let status = self.poll(remote, Utc::now()).await?;
            on_status(&status);
            if status.outcome.is_some() || status.stall.recommendation == Recommendation::StopJob {
                return Ok(status);
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Reads new log bytes; returns (log restarted, read up to the end).
    async fn read_log(
        &mut self,
        remote: &dyn RemoteExec,
        new_events: &mut Vec<LogEvent>,
    ) -> Result<(bool, bool), MonitorError> {
        let path = self.files.log.clone();
        let read_error =
            |source| MonitorError::Read { path: path.clone(), target: remote.describe(), source };
        if self.first_poll {
            self.first_poll = false;
            match remote.read_from(&path, 0, 0).await {
                Ok(chunk) if chunk.file_size > self.settings.initial_tail_bytes => {
                    self.offset = chunk.file_size - self.settings.initial_tail_bytes;
                }
                Ok(_) | Err(RemoteError::NotFound { .. }) => {}
                Err(source) => return Err(read_error(source)),
            }
        }
        let mut restarted = false;
        for _ in 0..self.settings.reads_per_poll {
            let chunk = match remote.read_from(&path, self.offset, self.settings.read_bytes).await {
                Ok(chunk) => chunk,
                Err(RemoteError::NotFound { .. }) => return Ok((restarted, true)),
                Err(source) => return Err(read_error(source)),
            };
            if chunk.file_size < self.offset && !restarted {
                restarted = true;
                self.offset = 0;
                self.parser = self.kind.parser();
                self.tracker = ProgressTracker::new(self.stall_settings.reading_interval);
                self.flagged_since = None;
                self.log_finished = false;
                continue;
            }
            let tracker = &mut self.tracker;
            self.parser.feed(&chunk.data, &mut |event| keep(event, tracker, new_events));
            self.offset += chunk.data.len() as u64;
            if (chunk.data.len() as u64) < self.settings.read_bytes || self.offset >= chunk.file_size {
                return Ok((restarted, true));
            }
        }
        Ok((restarted, false))
    }

    /// A small file's content, `None` when it does not exist.
    async fn read_small(&self, remote: &dyn RemoteExec, path: &str) -> Result<Option<String>, MonitorError> {
        match remote.read_from(path, 0, 64).await {
            Ok(chunk) => Ok(Some(String::from_utf8_lossy(&chunk.data).into_owned())),
            Err(RemoteError::NotFound { .. }) => Ok(None),
            Err(source) => {
                Err(MonitorError::Read { path: path.to_owned(), target: remote.describe(), source })
            }
        }
    }
}

/// Largest listing of the output folder read from the machine.
const LISTING_OUTPUT_LIMIT: usize = 8 << 20;

/// Lists `output_dir` on the machine with one command and builds the checkpoint inventory for
/// the trainer's naming scheme. A missing folder is an empty inventory (nothing saved yet).
pub async fn checkpoint_inventory(
    remote: &dyn RemoteExec,
    output_dir: &str,
    kind: ParserKind,
) -> Result<CheckpointInventory, MonitorError> {
    let command = format!("{} 2>/dev/null || true", listing_command(output_dir));
    // Room for the most entries the listing accepts (10,000 of up to 512-byte paths), so an
    // honest listing is judged by its count, not cut by the output cap.
    let opts = RunOptions { output_limit: LISTING_OUTPUT_LIMIT, ..RunOptions::default() };
    let output = remote.run(&command, opts).await.map_err(|source| MonitorError::Read {
        path: output_dir.to_owned(),
        target: remote.describe(),
        source,
    })?;
    if !output.success() {
        return Err(MonitorError::List {
            path: output_dir.to_owned(),
            target: remote.describe(),
            detail: output.stderr_lossy(),
        });
    }
    output.require_complete("listing the checkpoints").map_err(|source| MonitorError::Read {
        path: output_dir.to_owned(),
        target: remote.describe(),
        source,
    })?;
    let refused = |e: super::checkpoints::ListingError| MonitorError::Refused {
        path: output_dir.to_owned(),
        target: remote.describe(),
        source: RemoteError::Refused(e.to_string()),
    };
    let entries = parse_listing(&output.stdout_lossy()).map_err(refused)?;
    inventory(&entries, kind).map_err(refused)
}

fn keep(event: LogEvent, tracker: &mut ProgressTracker, new_events: &mut Vec<LogEvent>) {
    tracker.apply(&event);
    if !matches!(event, LogEvent::Progress(_)) && new_events.len() < 1000 {
        new_events.push(event);
    }
}

/// How the run ended, from the process state, the progress and the errors seen. Pure.
///
/// Success needs exit code 0 and either the trainer's completion marker or the last step
/// (`total - 1` counts: builds of ai-toolkit before 2026-08 stop there). A failure's reason is
/// taken from the most specific fatal error in the log; a signal exit with a silent log is
/// explained by its exit code.
pub fn decide_outcome(
    process: &ProcessState,
    progress: &ProgressSnapshot,
    errors: &[ClassifiedError],
) -> Option<Outcome> {
    let finished_steps = matches!((progress.step, progress.total_steps), (Some(s), Some(t)) if s + 1 >= t);
    let worst = errors.iter().filter(|e| e.fatal).max_by_key(|e| e.class.specificity());
    match process {
        ProcessState::NotStarted | ProcessState::Running { .. } => None,
        ProcessState::Exited { code: 0 } if progress.completion_marker || finished_steps => {
            Some(Outcome::Succeeded)
        }
        ProcessState::Exited { code: 0 } => Some(Outcome::Failed {
            reason: Reason::TrainingFailed,
            message: format!("the trainer exited with code 0 before finishing ({})", describe_step(progress)),
        }),
        ProcessState::Exited { code } => Some(match worst {
            Some(error) => Outcome::Failed {
                reason: error.class.reason(),
                message: format!("{} (exit code {code})", error.message),
            },
            None => Outcome::Failed {
                reason: Reason::TrainingFailed,
                message: explain_exit_code(*code, progress),
            },
        }),
        ProcessState::Vanished { pid } => Some(Outcome::Failed {
            reason: worst.map_or(Reason::TrainingFailed, |e| e.class.reason()),
            message: format!(
                "the trainer (pid {pid}) is gone and left no exit code ({})",
                describe_step(progress)
            ),
        }),
    }
}

fn describe_step(progress: &ProgressSnapshot) -> String {
    match (progress.step, progress.total_steps) {
        (Some(step), Some(total)) => format!("step {step} of {total}"),
        (Some(step), None) => format!("step {step}"),
        _ => "no training step seen".into(),
    }
}

fn explain_exit_code(code: i32, progress: &ProgressSnapshot) -> String {
    let cause = match code {
        137 => "killed by SIGKILL, most likely the host's out-of-memory killer; nothing in the log",
        139 => "crashed with a segmentation fault",
        143 => "terminated by SIGTERM",
        130 => "interrupted by SIGINT",
        _ => "failed without a recognised error in the log",
    };
    format!("the trainer {cause} (exit code {code}, {})", describe_step(progress))
}
