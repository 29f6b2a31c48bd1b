//! The upload engine: results on the machine → verified objects in storage → `ArtifactStatus`.
//!
//! 1. Inspect: one command lists every file under each requested path with its size.
//! 2. Plan: single PUT up to the multipart threshold, parts above it (multipart uploads are
//!    created by the operator, which holds the credentials).
//! 3. Presign (short-lived) and run the rendered script over `RemoteExec`; the URLs travel in
//!    that command's environment.
//! 4. Multipart: compare the parts storage has (ListParts) with the MD5s the machine computed;
//!    missing or wrong parts are presigned again and the script re-run for just those
//!    (resumable), then the upload is completed.
//! 5. HEAD every object and compare with the machine's report; only then is it an artifact.

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::{info, warn};

use super::plan::{Transfer, choose_transfer, join_key};
use super::script::{self, FileReport, ScriptFile};
use super::store::Validity;
use super::verify::verify_object;
use super::{ArtifactError, ObjectRef, ObjectStore};
use crate::api::ArtifactStatus;
use crate::remote::{RemoteExec, RunOptions};

/// Tunables of an upload.
#[derive(Clone, Debug)]
pub struct UploadSettings {
    /// Lifetime of each presigned URL. Default 15 minutes.
    pub url_ttl: Duration,
    /// Files above this size go up in parts. Default 64 MiB.
    pub multipart_threshold: u64,
    /// Part size (rounded up to whole MiB, at least 5 MiB). Default 16 MiB.
    pub part_size: u64,
    /// Longest one run of the upload script may take. Default 2 hours.
    pub step_timeout: Duration,
    /// Runs of the upload script before giving up (each resumes where the last stopped).
    /// Default 3.
    pub attempts: u32,
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            url_ttl: Duration::from_secs(15 * 60),
            multipart_threshold: 64 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
            step_timeout: Duration::from_secs(2 * 3600),
            attempts: 3,
        }
    }
}

/// One result to upload: a file, or a folder (every file under it, keys below `object.key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadItem {
    /// Artifact name in status: `model`, `checkpoint-<step>`, `samples`, `model-card`.
    pub name: String,
    /// Path on the machine.
    pub path: String,
    pub object: ObjectRef,
}

/// One file being uploaded.
#[derive(Clone, Debug)]
struct Planned {
    item: usize,
    path: String,
    object: ObjectRef,
    size: u64,
    transfer: Transfer,
    upload_id: Option<String>,
    /// Parts still to send (multipart).
    pending_parts: Vec<u64>,
    report: Option<FileReport>,
    done: bool,
}

/// Uploads through presigned URLs from any `RemoteExec`.
pub struct Uploader<'a> {
    store: &'a dyn ObjectStore,
    settings: UploadSettings,
}

impl<'a> Uploader<'a> {
    pub fn new(store: &'a dyn ObjectStore, settings: UploadSettings) -> Self {
        Self { store, settings }
    }

    /// Uploads `items` from `remote`, verifies them, and returns one `ArtifactStatus` per item.
    /// An error means at least one item is not verified in storage; nothing is reported then.
    pub async fn upload(
        &self,
        remote: &dyn RemoteExec,
        items: &[UploadItem],
    ) -> Result<Vec<ArtifactStatus>, ArtifactError> {
        let mut planned = self.inspect(remote, items).await?;
        let result = self.transfer(remote, &mut planned).await;
        if result.is_err() {
            for p in planned.iter().filter(|p| !p.done) {
                if let Some(id) = &p.upload_id
                    && let Err(e) = self.store.abort_multipart(&p.object, id).await
                {
                    warn!(object = %p.object.uri(), error = %e, "Failed to abort a multipart upload");
                }
            }
        }
        result?;
        let mut statuses = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let files: Vec<&Planned> = planned.iter().filter(|p| p.item == i).collect();
            for p in &files {
                let head = self.store.head(&p.object).await?;
                let report = p.report.as_ref().ok_or_else(|| ArtifactError::Report {
                    step: "upload",
                    message: format!("no report for {}", p.path),
                })?;
                verify_object(&p.object.uri(), head.as_ref(), report)?;
            }
            let single_file = files.len() == 1 && files[0].object == item.object;
            let status = if single_file {
                ArtifactStatus {
                    name: item.name.clone(),
                    uri: item.object.uri(),
                    size_bytes: files[0].size,
                    sha256: files[0].report.as_ref().map(|r| r.sha256.clone()),
                }
            } else {
                ArtifactStatus {
                    name: item.name.clone(),
                    uri: format!("{}/", item.object.uri().trim_end_matches('/')),
                    size_bytes: files.iter().map(|p| p.size).sum(),
                    sha256: None,
                }
            };
            info!(artifact = %status.name, uri = %status.uri, bytes = status.size_bytes, "Verified artifact");
            statuses.push(status);
        }
        Ok(statuses)
    }

    async fn inspect(&self, remote: &dyn RemoteExec, items: &[UploadItem]) -> Result<Vec<Planned>, ArtifactError> {
        let paths: Vec<String> = items.iter().map(|i| i.path.clone()).collect();
        let command = script::render_inspect(&paths)?;
        let out = remote
            .run(&command, RunOptions { timeout: Duration::from_secs(120), env: Vec::new() })
            .await
            .map_err(|e| ArtifactError::remote("inspect", e))?;
        if !out.success() {
            return Err(ArtifactError::StepFailed {
                step: "inspect",
                exit_code: out.exit_code,
                message: script::failure_message(&out.stderr_lossy()),
            });
        }
        let (files, missing) = script::parse_inspect(&out.stdout_lossy())?;
        if let Some(i) = missing.first() {
            let path = items.get(*i).map(|it| it.path.clone()).unwrap_or_default();
            return Err(ArtifactError::Missing { path });
        }
        let mut planned = Vec::new();
        for f in files {
            let item = items.get(f.index).ok_or_else(|| ArtifactError::Report {
                step: "inspect",
                message: format!("unknown index {}", f.index),
            })?;
            let (path, object) = if f.rel.is_empty() {
                (item.path.clone(), item.object.clone())
            } else {
                (
                    format!("{}/{}", item.path.trim_end_matches('/'), f.rel),
                    ObjectRef::new(&item.object.bucket, join_key(&item.object.key, &f.rel)),
                )
            };
            let transfer = choose_transfer(f.size, self.settings.multipart_threshold, self.settings.part_size)?;
            let pending_parts = match transfer {
                Transfer::Multipart { parts, .. } => (1..=parts).collect(),
                Transfer::Single => Vec::new(),
            };
            planned.push(Planned {
                item: f.index,
                path,
                object,
                size: f.size,
                transfer,
                upload_id: None,
                pending_parts,
                report: None,
                done: false,
            });
        }
        for (i, item) in items.iter().enumerate() {
            if !planned.iter().any(|p| p.item == i) {
                return Err(ArtifactError::Missing { path: format!("{} (no files)", item.path) });
            }
        }
        Ok(planned)
    }

    async fn transfer(&self, remote: &dyn RemoteExec, planned: &mut [Planned]) -> Result<(), ArtifactError> {
        let mut last_error = None;
        for attempt in 1..=self.settings.attempts.max(1) {
            let todo: Vec<usize> = (0..planned.len()).filter(|i| !planned[*i].done).collect();
            if todo.is_empty() {
                return Ok(());
            }
            let mut files = Vec::new();
            for &i in &todo {
                files.push(self.presign(&mut planned[i]).await?);
            }
            let rendered = script::render_upload(&files)?;
            let out = remote
                .run(&rendered.script, RunOptions { timeout: self.settings.step_timeout, env: rendered.env })
                .await;
            let (reports, failure) = match out {
                Ok(out) => {
                    let reports = script::parse_upload(&out.stdout_lossy())?;
                    let failure = (!out.success()).then(|| ArtifactError::StepFailed {
                        step: "upload",
                        exit_code: out.exit_code,
                        message: script::failure_message(&out.stderr_lossy()),
                    });
                    (reports, failure)
                }
                Err(e) => (BTreeMap::new(), Some(ArtifactError::remote("upload", e))),
            };
            for (pos, &i) in todo.iter().enumerate() {
                if let Some(report) = reports.get(&pos) {
                    self.settle(&mut planned[i], report.clone()).await?;
                }
            }
            if let Some(e) = failure {
                warn!(attempt, error = %e, "Upload step failed; resuming");
                last_error = Some(e);
            }
        }
        if planned.iter().all(|p| p.done) {
            return Ok(());
        }
        Err(last_error.unwrap_or_else(|| ArtifactError::StepFailed {
            step: "upload",
            exit_code: None,
            message: "parts were still missing after every attempt".into(),
        }))
    }

    /// Presigns what `p` still needs, creating its multipart upload on first use.
    async fn presign(&self, p: &mut Planned) -> Result<ScriptFile, ArtifactError> {
        let validity = Validity::from_now(self.settings.url_ttl);
        let mut requests = BTreeMap::new();
        match p.transfer {
            Transfer::Single => {
                requests.insert(1, self.store.presign_put(&p.object, validity).await?);
            }
            Transfer::Multipart { .. } => {
                let upload_id = match &p.upload_id {
                    Some(id) => id.clone(),
                    None => {
                        let id = self.store.create_multipart(&p.object).await?;
                        p.upload_id = Some(id.clone());
                        id
                    }
                };
                for &n in &p.pending_parts {
                    let number = i32::try_from(n).map_err(|_| ArtifactError::Invalid("too many parts".into()))?;
                    requests.insert(n, self.store.presign_part(&p.object, &upload_id, number, validity).await?);
                }
            }
        }
        Ok(ScriptFile { path: p.path.clone(), size: p.size, transfer: p.transfer.clone(), requests })
    }

    /// Records the machine's report for `p`; for multipart, checks the stored parts and either
    /// completes the upload or leaves the bad parts pending.
    async fn settle(&self, p: &mut Planned, report: FileReport) -> Result<(), ArtifactError> {
        match (&p.transfer, &p.upload_id) {
            (Transfer::Single, _) => {
                p.report = Some(report);
                p.done = true;
            }
            (Transfer::Multipart { parts, .. }, Some(upload_id)) => {
                let stored: BTreeMap<i64, String> = self
                    .store
                    .list_parts(&p.object, upload_id)
                    .await?
                    .into_iter()
                    .map(|part| (i64::from(part.number), part.etag))
                    .collect();
                let mut pending = Vec::new();
                let mut completed = Vec::new();
                for n in 1..=*parts {
                    let sent = report.parts.get(&n).map(|(md5, _)| md5.as_str());
                    match (stored.get(&(n as i64)), sent) {
                        // A server whose part ETags are not MD5s can only be trusted on presence.
                        (Some(etag), Some(md5)) if etag.eq_ignore_ascii_case(md5) || !is_md5(etag) => {
                            completed.push((n as i32, etag.clone()))
                        }
                        _ => pending.push(n),
                    }
                }
                p.report = Some(report);
                if pending.is_empty() {
                    self.store.complete_multipart(&p.object, upload_id, &completed).await?;
                    p.done = true;
                } else {
                    warn!(object = %p.object.uri(), missing = pending.len(), "Parts missing or different; sending them again");
                    p.pending_parts = pending;
                }
            }
            (Transfer::Multipart { .. }, None) => {
                return Err(ArtifactError::Invalid(format!("no multipart upload for {}", p.path)));
            }
        }
        Ok(())
    }
}

fn is_md5(etag: &str) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}
