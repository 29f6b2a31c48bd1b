//! Checkpoint sync while training (optional per job): every new checkpoint goes to
//! `<job prefix>/checkpoints/<name>` so a replacement machine can resume from it. A checkpoint is
//! only synced once its size has stayed the same across two observations, so one still being
//! written waits for the next poll instead of being uploaded half-done.

use std::collections::BTreeMap;

use super::download::DownloadItem;
use super::plan::Destination;
use super::{ArtifactError, ObjectRef, ObjectStore, UploadItem, Uploader};
use crate::api::CheckpointStatus;
use crate::monitor::checkpoints::{Checkpoint, CheckpointInventory};
use crate::remote::RemoteExec;

/// Remembers sizes between polls to tell finished checkpoints from ones being written.
#[derive(Clone, Debug, Default)]
pub struct CheckpointSync {
    last_sizes: BTreeMap<String, u64>,
}

impl CheckpointSync {
    pub fn new() -> Self {
        Self::default()
    }

    /// The checkpoints to upload now: with a step, not yet synced (no `uri` in `synced`), and the
    /// same size as at the previous call. Oldest first.
    pub fn ready(&mut self, inventory: &CheckpointInventory, synced: &[CheckpointStatus]) -> Vec<Checkpoint> {
        let mut ready = Vec::new();
        let mut sizes = BTreeMap::new();
        for cp in inventory.checkpoints.iter().filter(|c| c.step.is_some()) {
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

/// Uploads and verifies `checkpoints`, returning their status entries with `uri` set.
pub async fn sync_checkpoints(
    uploader: &Uploader<'_>,
    remote: &dyn RemoteExec,
    dest: &Destination,
    output_dir: &str,
    checkpoints: &[Checkpoint],
) -> Result<Vec<CheckpointStatus>, ArtifactError> {
    let mut out = Vec::new();
    for cp in checkpoints {
        let item = checkpoint_item(dest, output_dir, cp);
        let status = uploader.upload(remote, std::slice::from_ref(&item)).await?;
        let artifact = status.into_iter().next().ok_or_else(|| ArtifactError::Report {
            step: "upload",
            message: format!("no status for {}", cp.path),
        })?;
        out.push(CheckpointStatus {
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
pub async fn restore_items(
    store: &dyn ObjectStore,
    dest: &Destination,
    output_dir: &str,
    name: &str,
) -> Result<Vec<DownloadItem>, ArtifactError> {
    let key = dest.object(&format!("checkpoints/{name}")).key;
    let listed = store.list(&dest.bucket, &key).await?;
    Ok(restore_plan(&key, output_dir, name, listed))
}

/// Pure part of [`restore_items`]: keeps the object `key` itself and the objects below
/// `key/` (not `key` as a mere prefix: `demo_10` must not bring back `demo_100`).
pub fn restore_plan(
    key: &str,
    output_dir: &str,
    name: &str,
    listed: Vec<(ObjectRef, u64)>,
) -> Vec<DownloadItem> {
    let base = format!("{}/{}", output_dir.trim_end_matches('/'), name.trim_end_matches('/'));
    let folder = format!("{}/", key.trim_end_matches('/'));
    listed
        .into_iter()
        .filter_map(|(object, size)| {
            let path = if object.key == key {
                base.clone()
            } else {
                format!("{base}/{}", object.key.strip_prefix(&folder)?)
            };
            Some(DownloadItem { object, size, path })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(entries: &[(&str, u64, u64)]) -> CheckpointInventory {
        CheckpointInventory {
            checkpoints: entries
                .iter()
                .map(|(p, step, size)| Checkpoint {
                    path: p.to_string(),
                    step: Some(*step),
                    epoch: None,
                    size_bytes: *size,
                })
                .collect(),
            ..Default::default()
        }
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
        );
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
        );
        assert_eq!(
            folder.iter().map(|i| i.path.as_str()).collect::<Vec<_>>(),
            ["/w/output/checkpoint-5/a.bin", "/w/output/checkpoint-5/o/s.bin"]
        );
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
