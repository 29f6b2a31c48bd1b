//! The polling monitor against a fake machine: files in memory, pids that are alive or not,
//! and a record of every read so the tests can check that only new bytes are asked for.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};

use super::poller::{
    EarlierMonitoring, Outcome, PollerSettings, ProcessState, TrainingFiles, TrainingMonitor,
    checkpoint_inventory,
};
use super::stall::Recommendation;
use super::{LogEvent, ParserKind};
use crate::api::{MonitoringSpec, Reason};
use crate::remote::{ExecOutput, FileChunk, RemoteError, RemoteExec, RunOptions, TransferReport};

#[derive(Default)]
struct FakeMachine {
    files: Mutex<HashMap<String, Vec<u8>>>,
    alive: Mutex<HashSet<u32>>,
    /// (path, offset, max_len) of every read.
    reads: Mutex<Vec<(String, u64, u64)>>,
}

impl FakeMachine {
    fn write(&self, path: &str, data: &[u8]) {
        self.files.lock().unwrap().insert(path.to_owned(), data.to_vec());
    }

    fn append(&self, path: &str, data: &[u8]) {
        self.files.lock().unwrap().entry(path.to_owned()).or_default().extend_from_slice(data);
    }

    fn log_reads(&self, path: &str) -> Vec<(u64, u64)> {
        self.reads.lock().unwrap().iter().filter(|(p, _, _)| p == path).map(|(_, o, l)| (*o, *l)).collect()
    }
}

fn unsupported(operation: &str) -> RemoteError {
    RemoteError::Io { operation: operation.to_owned(), source: "not supported by the fake".into() }
}

#[async_trait]
impl RemoteExec for FakeMachine {
    async fn run(&self, command: &str, _opts: RunOptions) -> Result<ExecOutput, RemoteError> {
        // Only the output listing is supported: `find <dir> -printf ...`.
        let dir = command
            .strip_prefix("find ")
            .and_then(|rest| rest.split(' ').next())
            .ok_or_else(|| unsupported("run"))?;
        let prefix = format!("{dir}/");
        let files = self.files.lock().unwrap();
        let listing: String = files
            .iter()
            .filter_map(|(path, data)| {
                path.strip_prefix(&prefix).map(|rel| format!("f {} {rel}\n", data.len()))
            })
            .collect();
        Ok(ExecOutput::new(Some(0), listing, Vec::new()))
    }

    async fn upload(&self, _local: &Path, _remote: &str) -> Result<TransferReport, RemoteError> {
        Err(unsupported("upload"))
    }

    async fn download(&self, _remote: &str, _local: &Path, _max: u64) -> Result<TransferReport, RemoteError> {
        Err(unsupported("download"))
    }

    async fn read_from(&self, path: &str, offset: u64, max_len: u64) -> Result<FileChunk, RemoteError> {
        self.reads.lock().unwrap().push((path.to_owned(), offset, max_len));
        let files = self.files.lock().unwrap();
        let data = files.get(path).ok_or_else(|| RemoteError::NotFound { path: path.to_owned() })?;
        let start = (offset as usize).min(data.len());
        let end = (start + max_len as usize).min(data.len());
        Ok(FileChunk { offset, data: data[start..end].to_vec(), file_size: data.len() as u64 })
    }

    async fn pid_alive(&self, pid: u32) -> Result<bool, RemoteError> {
        Ok(self.alive.lock().unwrap().contains(&pid))
    }

    fn describe(&self) -> String {
        "fake:/work".into()
    }
}

const DIR: &str = "/work/job";

fn files() -> TrainingFiles {
    TrainingFiles::in_work_dir(DIR)
}

fn t(seconds: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-23T06:00:00Z").unwrap().with_timezone(&Utc)
        + Duration::seconds(seconds)
}

fn bar(n: u64) -> String {
    format!(
        "\rmy_lora:  {:>2}%|          | {n}/100 [00:{:02}<00:10,  1.00it/s, lr: 1.0e-04 loss: 4.0e-01]",
        n,
        n % 60
    )
}

fn running_machine() -> FakeMachine {
    let machine = FakeMachine::default();
    machine.write(&format!("{DIR}/train.pid"), b"4242\n");
    machine.alive.lock().unwrap().insert(4242);
    machine.write(&format!("{DIR}/train.log"), format!("# Running job: my_lora\n{}", bar(10)).as_bytes());
    machine
}

#[tokio::test]
async fn each_poll_reads_only_the_bytes_written_since_the_last_one() {
    let machine = running_machine();
    let mut monitor = TrainingMonitor::new(files(), ParserKind::AiToolkit, &MonitoringSpec::default());
    let first = monitor.poll(&machine, t(0)).await.unwrap();
    assert_eq!(first.process, ProcessState::Running { pid: 4242 });
    assert_eq!(first.progress.step, Some(10), "the live bar state counts");
    let size_after_first = monitor.offset();

    machine.append(&format!("{DIR}/train.log"), format!("{}\nSaving at step 20\n", bar(20)).as_bytes());
    let second = monitor.poll(&machine, t(60)).await.unwrap();
    assert_eq!(second.progress.step, Some(20));
    assert!(second.progress.paused);
    assert_eq!(second.outcome, None);

    let reads = machine.log_reads(&format!("{DIR}/train.log"));
    // First poll: the size probe, then from 0. Second poll: from where the first stopped.
    assert_eq!(reads.first(), Some(&(0, 0)));
    assert_eq!(reads.last().map(|r| r.0), Some(size_after_first));
    assert!(reads.iter().filter(|(offset, len)| *offset == 0 && *len > 0).count() == 1, "{reads:?}");
}

#[tokio::test]
async fn a_truncated_log_is_read_again_from_the_start() {
    let machine = running_machine();
    let mut monitor = TrainingMonitor::new(files(), ParserKind::AiToolkit, &MonitoringSpec::default());
    machine.append(&format!("{DIR}/train.log"), bar(50).as_bytes());
    assert_eq!(monitor.poll(&machine, t(0)).await.unwrap().progress.step, Some(50));

    machine.write(&format!("{DIR}/train.log"), format!("# Running job: my_lora\n{}", bar(3)).as_bytes());
    let status = monitor.poll(&machine, t(60)).await.unwrap();
    assert!(status.log_restarted);
    assert_eq!(status.progress.step, Some(3));
}

#[tokio::test]
async fn a_large_existing_log_is_only_read_from_its_tail_on_the_first_poll() {
    let machine = running_machine();
    let filler = "noise line that the monitor never needs to read\n".repeat(200_000);
    machine.append(&format!("{DIR}/train.log"), format!("\n{filler}{}", bar(77)).as_bytes());
    let settings = PollerSettings { read_bytes: 64 * 1024, reads_per_poll: 4, initial_tail_bytes: 16 * 1024 };
    let mut monitor =
        TrainingMonitor::with_settings(files(), ParserKind::AiToolkit, &MonitoringSpec::default(), settings);
    let status = monitor.poll(&machine, t(0)).await.unwrap();
    let total: u64 = machine.files.lock().unwrap()[&format!("{DIR}/train.log")].len() as u64;
    let reads = machine.log_reads(&format!("{DIR}/train.log"));
    assert_eq!(reads[1].0, total - 16 * 1024, "skipped to the tail");
    assert_eq!(status.log_offset, total);
    // The job name banner was skipped, so any non-loading bar is the training bar.
    assert_eq!(status.progress.step, Some(77));
}

#[tokio::test]
async fn exit_code_zero_with_the_final_save_succeeds_and_flushes_the_last_bar() {
    let machine = running_machine();
    machine.append(
        &format!("{DIR}/train.log"),
        format!("{}\nSaved checkpoint to output/my_lora/my_lora.safetensors\n{}", bar(100), bar(100))
            .as_bytes(),
    );
    machine.alive.lock().unwrap().clear();
    machine.write(&format!("{DIR}/exit_code"), b"0\n");
    let mut monitor = TrainingMonitor::new(files(), ParserKind::AiToolkit, &MonitoringSpec::default());
    let status = monitor.poll(&machine, t(0)).await.unwrap();
    assert_eq!(status.process, ProcessState::Exited { code: 0 });
    assert_eq!(status.outcome, Some(Outcome::Succeeded));
    assert!(status.new_events.iter().any(|e| matches!(e, LogEvent::Completed { .. })));
    assert!(!status.stall.stalling);
}

#[tokio::test]
async fn sigkill_exit_code_with_a_silent_log_fails_with_an_explanation() {
    let machine = running_machine();
    machine.alive.lock().unwrap().clear();
    machine.write(&format!("{DIR}/exit_code"), b"137");
    let mut monitor = TrainingMonitor::new(files(), ParserKind::AiToolkit, &MonitoringSpec::default());
    let status = monitor.poll(&machine, t(0)).await.unwrap();
    let Some(Outcome::Failed { reason, message }) = status.outcome else { panic!("failed: {status:?}") };
    assert_eq!(reason, Reason::TrainingFailed);
    assert!(message.contains("SIGKILL") && message.contains("step 10 of 100"), "{message}");
}

#[tokio::test]
async fn a_dead_pid_without_exit_code_is_a_vanished_trainer() {
    let machine = running_machine();
    machine.alive.lock().unwrap().clear();
    let mut monitor = TrainingMonitor::new(files(), ParserKind::AiToolkit, &MonitoringSpec::default());
    let status = monitor.poll(&machine, t(0)).await.unwrap();
    assert_eq!(status.process, ProcessState::Vanished { pid: 4242 });
    assert!(matches!(status.outcome, Some(Outcome::Failed { reason: Reason::TrainingFailed, .. })));
}

#[tokio::test]
async fn before_the_trainer_starts_nothing_is_decided() {
    let machine = FakeMachine::default();
    let mut monitor = TrainingMonitor::new(files(), ParserKind::AiToolkit, &MonitoringSpec::default());
    let status = monitor.poll(&machine, t(0)).await.unwrap();
    assert_eq!(status.process, ProcessState::NotStarted);
    assert_eq!((status.outcome, status.progress.step), (None, None));
}

#[tokio::test]
async fn follow_streams_statuses_until_the_run_ends() {
    let machine = running_machine();
    machine.alive.lock().unwrap().clear();
    machine.write(&format!("{DIR}/exit_code"), b"1");
    machine.append(
        &format!("{DIR}/train.log"),
        b"\nRuntimeError: CUDA error: an illegal memory access was encountered\n",
    );
    let mut monitor = TrainingMonitor::new(files(), ParserKind::AiToolkit, &MonitoringSpec::default());
    let mut seen = Vec::new();
    let last = monitor
        .follow(&machine, StdDuration::from_millis(1), &mut |status| seen.push(status.new_events.len()))
        .await
        .unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        matches!(last.outcome, Some(Outcome::Failed { reason: Reason::TrainingFailed, ref message }) if message.contains("illegal memory access"))
    );
}

#[tokio::test]
async fn a_log_that_stops_growing_is_reported_as_a_stall_through_the_poller() {
    let machine = running_machine();
    let mut monitor = TrainingMonitor::new(files(), ParserKind::AiToolkit, &MonitoringSpec::default());
    // Healthy: 10 steps per 5-minute reading.
    for i in 0..5u64 {
        machine.append(&format!("{DIR}/train.log"), bar(10 + 10 * i).as_bytes());
        let status = monitor.poll(&machine, t(300 * i as i64)).await.unwrap();
        assert!(!status.stall.stalling, "poll {i}: {}", status.stall.reason);
    }
    // Then nothing new.
    let mut stalled = None;
    for i in 5..8i64 {
        let status = monitor.poll(&machine, t(300 * i)).await.unwrap();
        if status.stall.stalling {
            stalled.get_or_insert(i);
        }
    }
    // The first reading without a new step already shows an ETA that did not fall.
    assert_eq!(stalled, Some(5));
}

#[tokio::test]
async fn a_monitor_rebuilt_after_a_restart_continues_the_no_progress_clock_and_the_flag() {
    let machine = running_machine();
    let spec = MonitoringSpec::default();
    let timeout = i64::from(spec.no_progress_timeout_seconds);
    // The earlier monitor saw step 10 last change at t(0) and had flagged a stall at t(600).
    let earlier = EarlierMonitoring { step: Some((10, t(0))), stall_flagged_since: Some(t(600)) };
    let mut monitor = TrainingMonitor::new(files(), ParserKind::AiToolkit, &spec).resume_from(&earlier);
    let first = monitor.poll(&machine, t(900)).await.unwrap();
    assert!(first.stall.stalling && !first.stall.recovered, "the flag stands: {:?}", first.stall);
    assert_eq!(first.stall.flagged_since, Some(t(600)));
    assert_eq!(first.stall.recommendation, Recommendation::WaitForRecovery);
    // Still at step 10 when the timeout counted from t(0) is over: stopped then, not a full
    // timeout after the restart.
    let late = monitor.poll(&machine, t(timeout)).await.unwrap();
    assert!(late.stall.no_progress, "{:?}", late.stall);
    assert_eq!(late.stall.recommendation, Recommendation::StopJob);

    // A fresh monitor without that memory would wait a whole timeout from its first poll.
    let mut fresh = TrainingMonitor::new(files(), ParserKind::AiToolkit, &spec);
    fresh.poll(&machine, t(900)).await.unwrap();
    let status = fresh.poll(&machine, t(timeout)).await.unwrap();
    assert!(!status.stall.no_progress);

    // A step other than the remembered one is progress: the clock starts at this poll.
    let earlier = EarlierMonitoring { step: Some((9, t(0))), stall_flagged_since: None };
    let mut moved = TrainingMonitor::new(files(), ParserKind::AiToolkit, &spec).resume_from(&earlier);
    moved.poll(&machine, t(900)).await.unwrap();
    assert!(!moved.poll(&machine, t(timeout)).await.unwrap().stall.no_progress);
}

#[tokio::test]
async fn the_checkpoint_inventory_comes_from_one_listing_of_the_output_folder() {
    let machine = FakeMachine::default();
    machine.write("/work/job/output/my_lora/my_lora_000000250.safetensors", &[0; 10]);
    machine.write("/work/job/output/my_lora/my_lora_000000500.safetensors", &[0; 12]);
    machine.write("/work/job/output/my_lora/samples/1__000000250_0.jpg", &[0; 3]);
    let inventory =
        checkpoint_inventory(&machine, "/work/job/output/my_lora", ParserKind::AiToolkit).await.unwrap();
    let latest = inventory.latest().unwrap();
    assert_eq!((latest.step, latest.size_bytes), (Some(500), 12));
    assert_eq!(inventory.checkpoints.len(), 2);
    assert!(inventory.final_model.is_none());
}
