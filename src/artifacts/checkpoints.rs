//! Checkpoint sync while training (optional per job): every new checkpoint goes to
//! `<job prefix>/checkpoints/<name>` so a replacement machine can resume from it. A checkpoint is
//! only synced once its size has stayed the same across two observations, so one still being
//! written waits for the next poll instead of being uploaded half-done.
//!
//! Names come from the machine: checkpoint names were checked when the inventory was built, and
//! are checked again before a restore turns them (and the keys below them) into paths on the
//! next machine; an upload refuses more files or bytes than the job's limits allow.

use std::collections::BTreeMap;

use super::download::DownloadItem;
use super::plan::Destination;
use super::upload::{MAX_FILES_PER_UPLOAD, UploadLimits};
use super::{ArtifactError, ObjectRef, ObjectStore, UploadItem, UploadSettings, Uploader};
use crate::api::CheckpointStatus;
use crate::monitor::checkpoints::Checkpoint;
use crate::monitor::remote_names::{RefusedNames, ReportedNames, check_relative_path, quoted};
use crate::remote::RemoteExec;

/// Remembers sizes between polls to tell finished checkpoints from ones being written, and which
/// refused names were reported already.
#[derive(Clone, Debug, Default)]
pub struct CheckpointSync {
    last_sizes: BTreeMap<String, u64>,
    /// Refused names already reported for this job (in this operator's lifetime).
    pub reported: ReportedNames,
}

impl CheckpointSync {
    pub fn new() -> Self {
        Self::default()
    }

    /// The checkpoints to upload now, out of `candidates` (the ones status keeps): with a step,
    /// not yet synced (no `uri` in `synced`), and the same size as at the previous call. Oldest
    /// first. Only the candidates' sizes are remembered.
    pub fn ready(&mut self, candidates: &[Checkpoint], synced: &[CheckpointStatus]) -> Vec<Checkpoint> {
        let mut ready = Vec::new();
        let mut sizes = BTreeMap::new();
        for cp in candidates.iter().filter(|c| c.step.is_some()) {
            sizes.insert(cp.path.clone(), cp.size_bytes);
            let already = synced.iter().any(|s| s.name == cp.path && s.uri.is_some());
            let stable = self.last_sizes.get(&cp.path) == Some(&cp.size_bytes);
            if !already && stable && cp.size_bytes > 0 {
                ready.push(cp.clone());
            }
        }
        self.last_sizes = sizes;
        ready.sort_by_key(|c| c.step);
        ready
    }
}

/// The upload item of one checkpoint (`output_dir` is the trainer's output folder on the machine).
pub fn checkpoint_item(dest: &Destination, output_dir: &str, cp: &Checkpoint) -> UploadItem {
    UploadItem {
        name: format!("checkpoint-{}", cp.step.unwrap_or(0)),
        path: format!("{}/{}", output_dir.trim_end_matches('/'), cp.path),
        object: dest.object(&format!("checkpoints/{}", cp.path)),
    }
}

/// What a checkpoint sync sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Status entries of the synced checkpoints, `uri` set.
    pub checkpoints: Vec<CheckpointStatus>,
    /// Files and bytes sent, for the job's totals.
    pub files: u64,
    pub bytes: u64,
    /// Files inside checkpoint folders left out because their names are refused.
    pub refused: RefusedNames,
}

/// Uploads and verifies `checkpoints`, one upload each, every one within what `settings.limits`
/// leaves after the ones before it. On an error, what was synced before it is returned with it.
pub async fn sync_checkpoints(
    store: &dyn ObjectStore,
    settings: &UploadSettings,
    remote: &dyn RemoteExec,
    dest: &Destination,
    output_dir: &str,
    checkpoints: &[Checkpoint],
) -> Result<Synced, (Synced, ArtifactError)> {
    let mut out = Synced::default();
    for cp in checkpoints {
        let item = checkpoint_item(dest, output_dir, cp);
        let limits = settings.limits;
        let limits = UploadLimits {
            used_files: limits.used_files.saturating_add(out.files),
            used_bytes: limits.used_bytes.saturating_add(out.bytes),
            ..limits
        };
        let uploader = Uploader::new(store, UploadSettings { limits, ..settings.clone() });
        let uploaded = match uploader.upload(remote, std::slice::from_ref(&item)).await {
            Ok(uploaded) => uploaded,
            Err(e) => return Err((out, e)),
        };
        let Some(artifact) = uploaded.artifacts.into_iter().next() else {
            let message = format!("no status for {}", cp.path);
            return Err((out, ArtifactError::Report { step: "upload", message }));
        };
        out.files += uploaded.files;
        out.bytes = out.bytes.saturating_add(uploaded.bytes);
        out.refused.extend(&uploaded.refused);
        out.checkpoints.push(CheckpointStatus {
            name: cp.path.clone(),
            step: cp.step.unwrap_or(0),
            size_bytes: Some(artifact.size_bytes),
            uri: Some(artifact.uri),
        });
    }
    Ok(out)
}

/// What to download to bring the synced checkpoint `name` (a file or a folder, as listed in
/// status) back into `output_dir` on a new machine. Empty when storage has nothing under it.
/// A name that fails the check of machine-reported names (a status written before the check
/// existed) is refused before storage is listed.
pub async fn restore_items(
    store: &dyn ObjectStore,
    dest: &Destination,
    output_dir: &str,
    name: &str,
) -> Result<Vec<DownloadItem>, ArtifactError> {
    check_relative_path(name)
        .map_err(|why| ArtifactError::Invalid(format!("checkpoint name {} {why}", quoted(name))))?;
    let key = dest.object(&format!("checkpoints/{name}")).key;
    let listed = store.list(&dest.bucket, &key).await?;
    restore_plan(&key, output_dir, name, listed)
}

/// Pure part of [`restore_items`]: keeps the object `key` itself and the objects below
/// `key/` (not `key` as a mere prefix: `demo_10` must not bring back `demo_100`). Every key
/// below the folder becomes a path on the machine, so it must pass the name check too; more
/// files than one upload could have stored are refused.
pub fn restore_plan(
    key: &str,
    output_dir: &str,
    name: &str,
    listed: Vec<(ObjectRef, u64)>,
) -> Result<Vec<DownloadItem>, ArtifactError> {
    let base = format!("{}/{}", output_dir.trim_end_matches('/'), name.trim_end_matches('/'));
    let folder = format!("{}/", key.trim_end_matches('/'));
    let mut items = Vec::new();
    for (object, size) in listed {
        let path = if object.key == key {
            base.clone()
        } else {
            let Some(rel) = object.key.strip_prefix(&folder) else { continue };
            check_relative_path(rel).map_err(|why| {
                ArtifactError::Invalid(format!("stored object {} {why}", quoted(&object.key)))
            })?;
            format!("{base}/{rel}")
        };
        if items.len() as u64 >= MAX_FILES_PER_UPLOAD {
            return Err(ArtifactError::Invalid(format!(
                "more than {MAX_FILES_PER_UPLOAD} objects are stored under {key}"
            )));
        }
        items.push(DownloadItem { object, size, path });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(entries: &[(&str, u64, u64)]) -> Vec<Checkpoint> {
        entries
            .iter()
            .map(|(p, step, size)| Checkpoint {
                path: p.to_string(),
                step: Some(*step),
                epoch: None,
                size_bytes: *size,
            })
            .collect()
    }

    #[test]
    fn a_checkpoint_is_ready_once_its_size_is_stable_and_only_once() {
        let mut sync = CheckpointSync::new();
        assert!(sync.ready(&inv(&[("a_500.safetensors", 500, 10)]), &[]).is_empty());
        // Still growing.
        assert!(sync.ready(&inv(&[("a_500.safetensors", 500, 20)]), &[]).is_empty());
        let ready = sync.ready(&inv(&[("a_500.safetensors", 500, 20), ("a_1000.safetensors", 1000, 5)]), &[]);
        assert_eq!(ready.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(), ["a_500.safetensors"]);
        let synced = vec![CheckpointStatus {
            name: "a_500.safetensors".into(),
            step: 500,
            size_bytes: Some(20),
            uri: Some("s3://b/k".into()),
        }];
        let ready =
            sync.ready(&inv(&[("a_500.safetensors", 500, 20), ("a_1000.safetensors", 1000, 5)]), &synced);
        assert_eq!(ready.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(), ["a_1000.safetensors"]);
    }

    #[test]
    fn restoring_takes_the_file_or_the_folder_and_nothing_that_only_shares_a_prefix() {
        let listed = |keys: &[&str]| keys.iter().map(|k| (ObjectRef::new("b", *k), 5)).collect::<Vec<_>>();
        let file = restore_plan(
            "p/checkpoints/demo_10.safetensors",
            "/w/output",
            "demo_10.safetensors",
            listed(&["p/checkpoints/demo_10.safetensors", "p/checkpoints/demo_10.safetensors.bak"]),
        )
        .unwrap();
        assert_eq!(
            file.iter().map(|i| i.path.as_str()).collect::<Vec<_>>(),
            ["/w/output/demo_10.safetensors"]
        );
        let folder = restore_plan(
            "p/checkpoints/checkpoint-5",
            "/w/output/",
            "checkpoint-5",
            listed(&[
                "p/checkpoints/checkpoint-5/a.bin",
                "p/checkpoints/checkpoint-5/o/s.bin",
                "p/checkpoints/checkpoint-50/a.bin",
            ]),
        )
        .unwrap();
        assert_eq!(
            folder.iter().map(|i| i.path.as_str()).collect::<Vec<_>>(),
            ["/w/output/checkpoint-5/a.bin", "/w/output/checkpoint-5/o/s.bin"]
        );
    }

    #[test]
    fn a_restore_never_writes_outside_the_checkpoint_folder() {
        let listed = |keys: &[&str]| keys.iter().map(|k| (ObjectRef::new("b", *k), 5)).collect::<Vec<_>>();
        let escape = restore_plan(
            "p/checkpoints/checkpoint-5",
            "/w/output",
            "checkpoint-5",
            listed(&[
                "p/checkpoints/checkpoint-5/a.bin",
                "p/checkpoints/checkpoint-5/../../../../root/.ssh/x",
            ]),
        );
        assert!(
            matches!(escape, Err(ArtifactError::Invalid(ref m)) if m.contains("starts with '.'")),
            "{escape:?}"
        );
        let many: Vec<String> =
            (0..=MAX_FILES_PER_UPLOAD).map(|i| format!("p/checkpoints/checkpoint-5/f{i}")).collect();
        let many = restore_plan(
            "p/checkpoints/checkpoint-5",
            "/w/output",
            "checkpoint-5",
            listed(&many.iter().map(String::as_str).collect::<Vec<_>>()),
        );
        assert!(matches!(many, Err(ArtifactError::Invalid(_))), "{many:?}");
    }

    #[tokio::test]
    async fn a_status_name_that_fails_the_check_is_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::artifacts::fake::FakeObjectStore::new(dir.path());
        let dest = Destination { bucket: "b".into(), job_prefix: "j".into() };
        let err = restore_items(&store, &dest, "/w/output", "../../etc").await.unwrap_err();
        assert!(err.to_string().contains("checkpoint name \"../../etc\""), "{err}");
    }

    #[test]
    fn checkpoint_items_go_under_the_checkpoints_folder() {
        let dest = Destination { bucket: "b".into(), job_prefix: "runs/j-u".into() };
        let cp = Checkpoint { path: "checkpoint-500".into(), step: Some(500), epoch: None, size_bytes: 1 };
        let item = checkpoint_item(&dest, "/w/u/output/", &cp);
        assert_eq!(item.path, "/w/u/output/checkpoint-500");
        assert_eq!(item.object.uri(), "s3://b/runs/j-u/checkpoints/checkpoint-500");
        assert_eq!(item.name, "checkpoint-500");
    }
}
