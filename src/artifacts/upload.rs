//! The upload engine: results on the machine → verified objects in storage → `ArtifactStatus`.
//!
//! 1. Inspect: one command lists every file under each requested path with its size.
//! 2. Check what the machine listed, before anything is presigned: a file whose name fails
//!    [`check_relative_path`] is left out (and reported); more files or bytes than the
//!    [`UploadLimits`] allow refuse the whole upload as the machine's fault
//!    ([`RemoteError::Refused`]).
//! 3. Plan: single PUT up to the multipart threshold, parts above it (multipart uploads are
//!    created by the operator, which holds the credentials).
//! 4. Presign (short-lived, each with its exact length signed in) and run the rendered script
//!    over `RemoteExec`; the URLs travel in that command's environment.
//! 5. Multipart: compare the parts storage has (ListParts) with the MD5s the machine computed;
//!    missing or wrong parts are presigned again and the script re-run for just those
//!    (resumable), then the upload is completed.
//! 6. HEAD every object and compare with the machine's report; only then is it an artifact.

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::{info, warn};

use super::plan::{Transfer, choose_transfer, join_key, part_length};
use super::script::{self, FileReport, ScriptFile};
use super::store::Validity;
use super::verify::verify_object;
use super::{ArtifactError, ObjectRef, ObjectStore};
use crate::api::ArtifactStatus;
use crate::monitor::remote_names::{RefusedNames, check_relative_path, records};
use crate::remote::{RemoteError, RemoteExec, RunOptions};

/// Most files one upload step sends (a folder checkpoint holds a handful).
pub const MAX_FILES_PER_UPLOAD: u64 = 1_000;
const GIB: u64 = 1024 * 1024 * 1024;

/// What one job may upload in all, over all its machines: operator settings (`gpu-trainer run
/// --max-upload-files-per-job`, `--max-upload-gib-per-job`), counted in `status.uploaded`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobUploadLimits {
    /// Default 10,000.
    pub max_files: u64,
    /// Default 200 GiB.
    pub max_bytes: u64,
}

impl Default for JobUploadLimits {
    fn default() -> Self {
        Self { max_files: 10_000, max_bytes: 200 * GIB }
    }
}

/// The limits of one upload step: [`MAX_FILES_PER_UPLOAD`] files, and what the job has left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadLimits {
    pub files_per_upload: u64,
    pub job: JobUploadLimits,
    /// Files and bytes the job uploaded before this step.
    pub used_files: u64,
    pub used_bytes: u64,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self::for_job(JobUploadLimits::default(), 0, 0)
    }
}

impl UploadLimits {
    /// The next step's limits for a job that uploaded `used_files` and `used_bytes` so far.
    pub fn for_job(job: JobUploadLimits, used_files: u64, used_bytes: u64) -> Self {
        Self { files_per_upload: MAX_FILES_PER_UPLOAD, job, used_files, used_bytes }
    }

    /// Checks the number of files the machine listed for `what`. Pure.
    pub fn check_files(&self, files: u64, what: &str) -> Result<(), RemoteError> {
        let left = self.job.max_files.saturating_sub(self.used_files);
        if files > self.files_per_upload {
            return Err(RemoteError::Refused(format!(
                "the machine listed {files} files to upload ({what}); at most {} are accepted in one upload",
                self.files_per_upload
            )));
        }
        if files > left {
            return Err(RemoteError::Refused(format!(
                "the machine listed {files} files to upload ({what}); this job has uploaded {} of the {} files \
                 it may upload, so at most {left} more are accepted",
                self.used_files, self.job.max_files
            )));
        }
        Ok(())
    }

    /// Checks the total size the machine listed for `what`. Pure.
    pub fn check_bytes(&self, bytes: u64, what: &str) -> Result<(), RemoteError> {
        let left = self.job.max_bytes.saturating_sub(self.used_bytes);
        if bytes > left {
            return Err(RemoteError::Refused(format!(
                "the machine listed {} to upload ({what}); this job has uploaded {} of the {} it may upload, \
                 so at most {} more are accepted",
                human_bytes(bytes),
                human_bytes(self.used_bytes),
                human_bytes(self.job.max_bytes),
                human_bytes(left)
            )));
        }
        Ok(())
    }
}

/// `123 bytes`, `1.5 GiB`.
fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    match bytes {
        b if b >= GIB => format!("{:.1} GiB ({b} bytes)", b as f64 / GIB as f64),
        b if b >= MIB => format!("{:.1} MiB ({b} bytes)", b as f64 / MIB as f64),
        b => format!("{b} bytes"),
    }
}

/// A finished upload: one verified `ArtifactStatus` per item, what it sent in all (counted
/// against the job's limits), and the files it left out because their names are refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uploaded {
    pub artifacts: Vec<ArtifactStatus>,
    pub files: u64,
    pub bytes: u64,
    pub refused: RefusedNames,
}

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
    /// Files and bytes this upload may send (checked before anything is presigned).
    pub limits: UploadLimits,
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            url_ttl: Duration::from_secs(15 * 60),
            multipart_threshold: 64 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
            step_timeout: Duration::from_secs(2 * 3600),
            attempts: 3,
            limits: UploadLimits::default(),
        }
    }
}

/// A presigned GET of a dataset archive, for the machine to download (default lifetime: pass
/// [`UploadSettings::url_ttl`]). The URL goes to the machine in a command's environment.
pub async fn presign_dataset(
    store: &dyn ObjectStore,
    dataset: &crate::api::S3Dataset,
    ttl: Duration,
) -> Result<super::PresignedRequest, ArtifactError> {
    store.presign_get(&ObjectRef::new(&dataset.bucket, &dataset.key), Validity::from_now(ttl)).await
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
    /// A listing outside the limits is an [`ArtifactError::Remote`] holding
    /// [`RemoteError::Refused`], returned before anything is presigned.
    pub async fn upload(
        &self,
        remote: &dyn RemoteExec,
        items: &[UploadItem],
    ) -> Result<Uploaded, ArtifactError> {
        let (mut planned, refused) = self.inspect(remote, items).await?;
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
            // The verified size is the one the machine hashed, which HEAD just confirmed.
            let verified_size = |p: &Planned| p.report.as_ref().map_or(p.size, |r| r.size);
            let single_file = files.len() == 1 && files[0].object == item.object;
            let status = if single_file {
                ArtifactStatus {
                    name: item.name.clone(),
                    uri: item.object.uri(),
                    size_bytes: verified_size(files[0]),
                    sha256: files[0].report.as_ref().map(|r| r.sha256.clone()),
                }
            } else {
                ArtifactStatus {
                    name: item.name.clone(),
                    uri: format!("{}/", item.object.uri().trim_end_matches('/')),
                    size_bytes: files.iter().map(|p| verified_size(p)).sum(),
                    sha256: None,
                }
            };
            info!(artifact = %status.name, uri = %status.uri, bytes = status.size_bytes, "Verified artifact");
            statuses.push(status);
        }
        let bytes = planned
            .iter()
            .fold(0u64, |sum, p| sum.saturating_add(p.report.as_ref().map_or(p.size, |r| r.size)));
        Ok(Uploaded { artifacts: statuses, files: planned.len() as u64, bytes, refused })
    }

    /// Lists the files of `items` on the machine and plans them, refusing a listing outside the
    /// limits; files with refused names are left out and returned.
    async fn inspect(
        &self,
        remote: &dyn RemoteExec,
        items: &[UploadItem],
    ) -> Result<(Vec<Planned>, RefusedNames), ArtifactError> {
        let paths: Vec<String> = items.iter().map(|i| i.path.clone()).collect();
        let command = script::render_inspect(&paths)?;
        let out = remote
            .run(
                &command,
                RunOptions { timeout: Duration::from_secs(120), env: Vec::new(), ..Default::default() },
            )
            .await
            .map_err(|e| ArtifactError::remote("inspect", e))?;
        if !out.success() {
            return Err(ArtifactError::StepFailed {
                step: "inspect",
                exit_code: out.exit_code,
                message: script::failure_message(&out.stderr_lossy()),
            });
        }
        let stdout = out.stdout_lossy();
        let limits = &self.settings.limits;
        let what = describe_items(items);
        let refuse = |source| ArtifactError::remote("inspect", source);
        // Counted before they are parsed: a flood is never held as planned files.
        limits.check_files(records(&stdout).count() as u64, &what).map_err(refuse)?;
        let (files, missing) = script::parse_inspect(&stdout)?;
        if let Some(i) = missing.first() {
            let path = items.get(*i).map(|it| it.path.clone()).unwrap_or_default();
            return Err(ArtifactError::Missing { path });
        }
        let total = files.iter().fold(0u64, |sum, f| sum.saturating_add(f.size));
        limits.check_bytes(total, &what).map_err(refuse)?;
        let mut planned = Vec::new();
        let mut refused = RefusedNames::default();
        for f in files {
            let item = items.get(f.index).ok_or_else(|| ArtifactError::Report {
                step: "inspect",
                message: format!("unknown index {}", f.index),
            })?;
            if !f.rel.is_empty()
                && let Err(why) = check_relative_path(&f.rel)
            {
                refused.add(&format!("{}/{}", item.path.trim_end_matches('/'), f.rel), why);
                continue;
            }
            let (path, object) = if f.rel.is_empty() {
                (item.path.clone(), item.object.clone())
            } else {
                (
                    format!("{}/{}", item.path.trim_end_matches('/'), f.rel),
                    ObjectRef::new(&item.object.bucket, join_key(&item.object.key, &f.rel)),
                )
            };
            let transfer =
                choose_transfer(f.size, self.settings.multipart_threshold, self.settings.part_size)?;
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
        if !refused.is_empty() {
            warn!(refused = %refused, "Files with refused names are left out of the upload");
        }
        for (i, item) in items.iter().enumerate() {
            if !planned.iter().any(|p| p.item == i) {
                let why = if refused.is_empty() { "no files" } else { "no files with accepted names" };
                return Err(ArtifactError::Missing { path: format!("{} ({why})", item.path) });
            }
        }
        Ok((planned, refused))
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
                .run(
                    &rendered.script,
                    RunOptions {
                        timeout: self.settings.step_timeout,
                        env: rendered.env,
                        ..Default::default()
                    },
                )
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
                requests.insert(1, self.store.presign_put(&p.object, p.size, validity).await?);
            }
            Transfer::Multipart { part_size, .. } => {
                let upload_id = match &p.upload_id {
                    Some(id) => id.clone(),
                    None => {
                        let id = self.store.create_multipart(&p.object).await?;
                        p.upload_id = Some(id.clone());
                        id
                    }
                };
                for &n in &p.pending_parts {
                    let number =
                        i32::try_from(n).map_err(|_| ArtifactError::Invalid("too many parts".into()))?;
                    let length = part_length(p.size, part_size, n);
                    requests.insert(
                        n,
                        self.store.presign_part(&p.object, &upload_id, number, length, validity).await?,
                    );
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
                if report.complete {
                    p.report = Some(report);
                    p.done = true;
                }
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
                let complete = report.complete;
                p.report = Some(report);
                if complete && pending.is_empty() {
                    self.store.complete_multipart(&p.object, upload_id, &completed).await?;
                    p.done = true;
                } else {
                    if !pending.is_empty() {
                        warn!(object = %p.object.uri(), missing = pending.len(), "Parts missing or different; sending them again");
                    }
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

/// The items of an upload for messages: their names, at most three.
fn describe_items(items: &[UploadItem]) -> String {
    let mut names: Vec<&str> = items.iter().take(3).map(|i| i.name.as_str()).collect();
    if items.len() > 3 {
        names.push("…");
    }
    names.join(", ")
}

fn is_md5(etag: &str) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::fake::FakeObjectStore;
    use crate::remote::local::LocalExec;

    const MIB: usize = 1024 * 1024;

    fn settings() -> UploadSettings {
        UploadSettings {
            multipart_threshold: 8 * MIB as u64,
            part_size: 5 * MIB as u64,
            ..Default::default()
        }
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[tokio::test]
    async fn files_and_folders_are_uploaded_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalExec::new(dir.path().join("work")).unwrap();
        std::fs::create_dir_all(dir.path().join("work/output/ckpt-5/sub")).unwrap();
        std::fs::write(dir.path().join("work/output/m.safetensors"), b"model bytes").unwrap();
        std::fs::write(dir.path().join("work/output/ckpt-5/a.bin"), b"aaa").unwrap();
        std::fs::write(dir.path().join("work/output/ckpt-5/sub/b.bin"), b"bb").unwrap();
        let store = FakeObjectStore::new(&dir.path().join("store"));
        let items = vec![
            UploadItem {
                name: "model".into(),
                path: "output/m.safetensors".into(),
                object: ObjectRef::new("b", "job/m.safetensors"),
            },
            UploadItem {
                name: "checkpoint-5".into(),
                path: "output/ckpt-5".into(),
                object: ObjectRef::new("b", "job/checkpoints/ckpt-5"),
            },
        ];
        let uploaded = Uploader::new(&store, settings()).upload(&remote, &items).await.unwrap();
        assert_eq!((uploaded.files, uploaded.bytes), (3, 16));
        let statuses = uploaded.artifacts;
        assert_eq!(statuses[0].uri, "s3://b/job/m.safetensors");
        assert_eq!(statuses[0].size_bytes, 11);
        use sha2::Digest;
        assert_eq!(
            statuses[0].sha256.as_deref(),
            Some(hex::encode(sha2::Sha256::digest(b"model bytes")).as_str())
        );
        assert_eq!(statuses[1].uri, "s3://b/job/checkpoints/ckpt-5/");
        assert_eq!(statuses[1].size_bytes, 5);
        let stored =
            std::fs::read(store.object_path(&ObjectRef::new("b", "job/checkpoints/ckpt-5/sub/b.bin")))
                .unwrap();
        assert_eq!(stored, b"bb");
    }

    #[tokio::test]
    async fn multipart_upload_resumes_only_the_failed_part() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalExec::new(dir.path().join("work")).unwrap();
        let content = data(12 * MIB + 123, 7);
        std::fs::write(dir.path().join("work/big.bin"), &content).unwrap();
        let store = FakeObjectStore::new(&dir.path().join("store"));
        store.fail_part_once(2);
        let object = ObjectRef::new("b", "job/big.bin");
        let items = vec![UploadItem { name: "model".into(), path: "big.bin".into(), object: object.clone() }];
        let statuses = Uploader::new(&store, settings()).upload(&remote, &items).await.unwrap().artifacts;
        assert_eq!(statuses[0].size_bytes, content.len() as u64);
        // Three parts of 5 MiB; the script stops at the failed part 2, the retry sends 2 and 3.
        assert_eq!(store.presigned_parts(), [1, 2, 3, 2, 3]);
        assert_eq!(std::fs::read(store.object_path(&object)).unwrap(), content);
    }

    #[tokio::test]
    async fn a_part_that_keeps_failing_aborts_the_multipart_upload() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalExec::new(dir.path().join("work")).unwrap();
        std::fs::write(dir.path().join("work/big.bin"), data(9 * MIB, 1)).unwrap();
        let store = FakeObjectStore::new(&dir.path().join("store"));
        for _ in 0..2 {
            store.fail_part_once(1);
        }
        let items =
            vec![UploadItem { name: "m".into(), path: "big.bin".into(), object: ObjectRef::new("b", "k") }];
        let s = UploadSettings { attempts: 2, ..settings() };
        let err = Uploader::new(&store, s).upload(&remote, &items).await.unwrap_err();
        assert!(matches!(err, ArtifactError::StepFailed { .. }), "{err}");
        assert_eq!(store.aborted(), ["upload-1"]);
        assert!(store.head(&ObjectRef::new("b", "k")).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_missing_result_is_an_error_before_anything_is_presigned() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalExec::new(dir.path().join("work")).unwrap();
        let store = FakeObjectStore::new(&dir.path().join("store"));
        let items = vec![UploadItem {
            name: "m".into(),
            path: "output/none".into(),
            object: ObjectRef::new("b", "k"),
        }];
        let err = Uploader::new(&store, settings()).upload(&remote, &items).await.unwrap_err();
        assert!(matches!(err, ArtifactError::Missing { ref path } if path == "output/none"), "{err}");
        assert!(store.presigned_parts().is_empty());
    }

    fn folder_item(name: &str) -> UploadItem {
        UploadItem {
            name: name.into(),
            path: format!("output/{name}"),
            object: ObjectRef::new("b", format!("job/checkpoints/{name}")),
        }
    }

    /// The refusal is the machine's fault: a `RemoteError::Refused` in the source chain.
    fn refusal(err: &ArtifactError) -> String {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(RemoteError::Refused(message)) = e.downcast_ref::<RemoteError>() {
                return message.clone();
            }
            source = e.source();
        }
        panic!("no RemoteError::Refused in {err}");
    }

    #[tokio::test]
    async fn a_flood_of_files_is_refused_before_anything_is_presigned() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalExec::new(dir.path().join("work")).unwrap();
        let folder = dir.path().join("work/output/checkpoint-5");
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..=MAX_FILES_PER_UPLOAD {
            std::fs::write(folder.join(format!("shard-{i}.bin")), b"x").unwrap();
        }
        let store = FakeObjectStore::new(&dir.path().join("store"));
        let err = Uploader::new(&store, settings())
            .upload(&remote, &[folder_item("checkpoint-5")])
            .await
            .unwrap_err();
        assert_eq!(
            refusal(&err),
            "the machine listed 1001 files to upload (checkpoint-5); at most 1000 are accepted in one upload"
        );
        assert_eq!(err.category(), "remote");
        assert!(store.nothing_presigned(), "nothing may be presigned for a refused listing");
    }

    #[tokio::test]
    async fn the_jobs_file_and_byte_totals_are_enforced_before_anything_is_presigned() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalExec::new(dir.path().join("work")).unwrap();
        std::fs::create_dir_all(dir.path().join("work/output/checkpoint-5")).unwrap();
        for f in ["a.bin", "b.bin"] {
            std::fs::write(dir.path().join("work/output/checkpoint-5").join(f), [0u8; 600]).unwrap();
        }
        let store = FakeObjectStore::new(&dir.path().join("store"));
        let job = JobUploadLimits { max_files: 10, max_bytes: 2000 };
        let upload = |limits: UploadLimits| {
            let settings = UploadSettings { limits, ..settings() };
            let remote = &remote;
            let store = &store;
            async move { Uploader::new(store, settings).upload(remote, &[folder_item("checkpoint-5")]).await }
        };
        let err = upload(UploadLimits::for_job(job, 9, 0)).await.unwrap_err();
        assert!(
            refusal(&err)
                .contains("this job has uploaded 9 of the 10 files it may upload, so at most 1 more"),
            "{err}"
        );
        let err = upload(UploadLimits::for_job(job, 0, 1000)).await.unwrap_err();
        assert!(
            refusal(&err).contains("listed 1200 bytes to upload (checkpoint-5); this job has uploaded 1000 bytes of the 2000 bytes"),
            "{err}"
        );
        assert!(store.nothing_presigned());
        // Within the limits the same upload goes through and says what it sent.
        let uploaded = upload(UploadLimits::for_job(job, 8, 800)).await.unwrap();
        assert_eq!((uploaded.files, uploaded.bytes), (2, 1200));
    }

    #[tokio::test]
    async fn files_with_refused_names_are_left_out_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalExec::new(dir.path().join("work")).unwrap();
        let folder = dir.path().join("work/output/checkpoint-5");
        std::fs::create_dir_all(folder.join(".git")).unwrap();
        std::fs::write(folder.join("optimizer.bin"), b"good").unwrap();
        std::fs::write(folder.join("evil\nname"), b"bad").unwrap();
        std::fs::write(folder.join(".git/config"), b"bad").unwrap();
        let store = FakeObjectStore::new(&dir.path().join("store"));
        let uploaded =
            Uploader::new(&store, settings()).upload(&remote, &[folder_item("checkpoint-5")]).await.unwrap();
        assert_eq!((uploaded.files, uploaded.bytes), (1, 4));
        assert_eq!(uploaded.refused.count, 2);
        assert_eq!(
            store.signed_lengths(),
            [("job/checkpoints/checkpoint-5/optimizer.bin".to_string(), 0, 4)],
            "only the accepted file was presigned"
        );
        // A folder holding nothing acceptable is not an artifact.
        std::fs::remove_file(folder.join("optimizer.bin")).unwrap();
        let err = Uploader::new(&store, settings())
            .upload(&remote, &[folder_item("checkpoint-5")])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no files with accepted names"), "{err}");
    }

    #[tokio::test]
    async fn every_presigned_put_carries_the_length_it_may_store() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalExec::new(dir.path().join("work")).unwrap();
        std::fs::write(dir.path().join("work/small.bin"), b"0123456789").unwrap();
        std::fs::write(dir.path().join("work/big.bin"), data(12 * MIB + 123, 3)).unwrap();
        let store = FakeObjectStore::new(&dir.path().join("store"));
        let items = vec![
            UploadItem { name: "s".into(), path: "small.bin".into(), object: ObjectRef::new("b", "s") },
            UploadItem { name: "l".into(), path: "big.bin".into(), object: ObjectRef::new("b", "l") },
        ];
        Uploader::new(&store, settings()).upload(&remote, &items).await.unwrap();
        let five = 5 * MIB as u64;
        assert_eq!(
            store.signed_lengths(),
            [
                ("s".to_string(), 0, 10),
                ("l".to_string(), 1, five),
                ("l".to_string(), 2, five),
                ("l".to_string(), 3, 2 * MIB as u64 + 123)
            ]
        );
    }

    #[tokio::test]
    async fn a_file_that_changed_size_since_it_was_planned_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let remote = LocalExec::new(&work).unwrap();
        std::fs::write(work.join("m.bin"), b"0123456789").unwrap();
        let store = FakeObjectStore::new(&dir.path().join("store"));
        let items = [UploadItem { name: "m".into(), path: "m.bin".into(), object: ObjectRef::new("b", "m") }];
        let uploader = Uploader::new(&store, UploadSettings { attempts: 1, ..settings() });
        let (planned, _) = uploader.inspect(&remote, &items).await.unwrap();
        std::fs::write(work.join("m.bin"), b"0123456789 and more").unwrap();
        let mut planned = planned;
        let err = uploader.transfer(&remote, &mut planned).await.unwrap_err();
        assert!(err.to_string().contains("changed size since it was planned (10 then 19 bytes)"), "{err}");
    }
}
