//! A `RemoteExec` wrapper for tests that records everything sent to the machine: command text,
//! environment, and the bytes of uploaded files.

use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::remote::{
    ExecOutput, FileChunk, OutputChunk, RemoteError, RemoteExec, RunOptions, TransferReport,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub command: String,
    pub env: Vec<(String, String)>,
}

pub struct RecordingExec<R> {
    pub inner: R,
    pub sent: Mutex<Vec<Sent>>,
    pub uploaded: Mutex<Vec<(String, Vec<u8>)>>,
}

impl<R> RecordingExec<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, sent: Mutex::default(), uploaded: Mutex::default() }
    }

    pub fn commands(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    /// Every byte string sent: commands, environment names and values, uploaded files, remote
    /// paths.
    pub fn everything_sent(&self) -> Vec<Vec<u8>> {
        let mut all = Vec::new();
        for s in self.sent.lock().unwrap().iter() {
            all.push(s.command.clone().into_bytes());
            for (k, v) in &s.env {
                all.push(k.clone().into_bytes());
                all.push(v.clone().into_bytes());
            }
        }
        for (path, bytes) in self.uploaded.lock().unwrap().iter() {
            all.push(path.clone().into_bytes());
            all.push(bytes.clone());
        }
        all
    }
}

#[async_trait]
impl<R: RemoteExec> RemoteExec for RecordingExec<R> {
    async fn run(&self, command: &str, opts: RunOptions) -> Result<ExecOutput, RemoteError> {
        self.sent.lock().unwrap().push(Sent { command: command.to_string(), env: opts.env.clone() });
        self.inner.run(command, opts).await
    }

    async fn run_streaming(
        &self,
        command: &str,
        opts: RunOptions,
        output: tokio::sync::mpsc::Sender<OutputChunk>,
    ) -> Result<ExecOutput, RemoteError> {
        self.sent.lock().unwrap().push(Sent { command: command.to_string(), env: opts.env.clone() });
        self.inner.run_streaming(command, opts, output).await
    }

    async fn upload(&self, local_path: &Path, remote_path: &str) -> Result<TransferReport, RemoteError> {
        let bytes = std::fs::read(local_path).unwrap_or_default();
        self.uploaded.lock().unwrap().push((remote_path.to_string(), bytes));
        self.inner.upload(local_path, remote_path).await
    }

    async fn download(
        &self,
        remote_path: &str,
        local_path: &Path,
        max_bytes: u64,
    ) -> Result<TransferReport, RemoteError> {
        self.inner.download(remote_path, local_path, max_bytes).await
    }

    async fn read_from(
        &self,
        remote_path: &str,
        offset: u64,
        max_len: u64,
    ) -> Result<FileChunk, RemoteError> {
        self.inner.read_from(remote_path, offset, max_len).await
    }

    async fn pid_alive(&self, pid: u32) -> Result<bool, RemoteError> {
        self.inner.pid_alive(pid).await
    }

    fn describe(&self) -> String {
        format!("recording:{}", self.inner.describe())
    }
}
