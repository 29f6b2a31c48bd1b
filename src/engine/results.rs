//! What a job's results come to in its status, once for both front ends: which checkpoints are
//! listed (the newest, the rest counted), which need syncing, what the job has uploaded in all,
//! and the model card (marked incomplete for a run stopped early). Pure.

use crate::api::{CheckpointStatus, TrainingJobSpec, TrainingJobStatus};
use crate::artifacts::UploadSettings;
use crate::artifacts::model_card::ModelCard;
use crate::artifacts::upload::{JobUploadLimits, UploadLimits};
use crate::monitor::checkpoints::Checkpoint;
use crate::monitor::remote_names::check_relative_path;

/// Upload settings for saving what a stopped run left: it must not hold the machine for long.
pub fn salvage_settings() -> UploadSettings {
    UploadSettings {
        step_timeout: std::time::Duration::from_secs(10 * 60),
        attempts: 2,
        ..UploadSettings::default()
    }
}

/// How many checkpoints `status.checkpoints` lists: the newest. The machine decides how many
/// there are, and a status is one etcd object (past its size limit no status write succeeds).
pub const STATUS_CHECKPOINTS: usize = 20;

/// Records the checkpoints on the machine (`found`) and those just synced in
/// `status.checkpoints`, keeping the newest [`STATUS_CHECKPOINTS`] and counting the ones that
/// fall out in `status.checkpointsOmitted`. Once some were omitted, nothing older than the oldest
/// listed one comes back (the machine still has them and lists them at every poll; counting them
/// again would inflate the count). Pure.
pub fn record_checkpoints(
    status: &mut TrainingJobStatus,
    found: &[CheckpointStatus],
    synced: &[CheckpointStatus],
) {
    let floor = listed_floor(status);
    let found: Vec<CheckpointStatus> = found
        .iter()
        .filter(|c| above(floor, c.step, &c.name) || status.checkpoints.iter().any(|l| l.name == c.name))
        .cloned()
        .collect();
    let mut merged = merge_checkpoints(&status.checkpoints, &found, synced);
    // Names reach status only from a checked inventory; one written by an older operator that
    // fails the check is dropped rather than uploaded or restored.
    merged.retain(|c| check_relative_path(&c.name).is_ok());
    let excess = merged.len().saturating_sub(STATUS_CHECKPOINTS);
    merged.drain(..excess);
    status.checkpoints = merged;
    status.checkpoints_omitted = status.checkpoints_omitted.saturating_add(excess as u64);
}

/// The checkpoints of the machine's inventory worth syncing: the ones status would list (the
/// newest [`STATUS_CHECKPOINTS`], nothing below the listed ones once older ones were omitted).
/// An old checkpoint synced now would fall out of the list at once and be synced again at the
/// next poll. Pure.
pub fn checkpoints_to_sync(inventory: &[Checkpoint], status: &TrainingJobStatus) -> Vec<Checkpoint> {
    let floor = listed_floor(status);
    let mut candidates: Vec<&Checkpoint> =
        inventory.iter().filter(|c| c.step.is_some_and(|step| above(floor, step, &c.path))).collect();
    candidates.sort_by(|a, b| (a.step, &a.path).cmp(&(b.step, &b.path)));
    let skip = candidates.len().saturating_sub(STATUS_CHECKPOINTS);
    candidates.into_iter().skip(skip).cloned().collect()
}

/// The oldest listed checkpoint, once older ones were omitted.
fn listed_floor(status: &TrainingJobStatus) -> Option<(u64, &str)> {
    if status.checkpoints_omitted == 0 {
        return None;
    }
    status.checkpoints.iter().map(|c| (c.step, c.name.as_str())).min()
}

fn above(floor: Option<(u64, &str)>, step: u64, name: &str) -> bool {
    floor.is_none_or(|floor| (step, name) >= floor)
}

/// Adds an upload's files and bytes to `status.uploaded` (the job's totals). Pure.
pub fn add_uploaded(status: &mut TrainingJobStatus, files: u64, bytes: u64) {
    if files == 0 && bytes == 0 {
        return;
    }
    let total = status.uploaded.get_or_insert_with(Default::default);
    total.files = total.files.saturating_add(files);
    total.bytes = total.bytes.saturating_add(bytes);
}

/// The limits of the job's next upload: the operator's per-job limits minus what the job
/// uploaded so far. Pure.
pub fn upload_limits(job: JobUploadLimits, status: &TrainingJobStatus) -> UploadLimits {
    let used = status.uploaded.unwrap_or_default();
    UploadLimits::for_job(job, used.files, used.bytes)
}

/// The job's checkpoint list after looking at the machine: what is there now (`found`), with
/// storage locations from `synced` and from the earlier list (kept even when the machine no
/// longer has them: they are still in storage). Sorted by step. Pure.
pub fn merge_checkpoints(
    earlier: &[CheckpointStatus],
    found: &[CheckpointStatus],
    synced: &[CheckpointStatus],
) -> Vec<CheckpointStatus> {
    let mut merged: Vec<CheckpointStatus> = earlier.iter().filter(|c| c.uri.is_some()).cloned().collect();
    for cp in found.iter().chain(synced) {
        match merged.iter_mut().find(|m| m.name == cp.name) {
            Some(existing) => {
                let uri = cp.uri.clone().or_else(|| existing.uri.clone());
                *existing = CheckpointStatus { uri, ..cp.clone() };
            }
            None => merged.push(cp.clone()),
        }
    }
    merged.sort_by(|a, b| a.step.cmp(&b.step).then_with(|| a.name.cmp(&b.name)));
    merged
}

/// The latest checkpoint that is in storage. Pure.
pub fn latest_synced(checkpoints: &[CheckpointStatus]) -> Option<&CheckpointStatus> {
    checkpoints.iter().filter(|c| c.uri.is_some()).max_by_key(|c| c.step)
}

/// The model card of a job. `stop_reason` marks a run that stopped early as incomplete.
pub fn model_card(
    job_name: &str,
    spec: &TrainingJobSpec,
    status: &TrainingJobStatus,
    stop_reason: Option<&str>,
    files: Vec<String>,
) -> ModelCard {
    let progress = status.progress.clone().unwrap_or_default();
    let base_model = ["baseModel", "base_model", "model"]
        .iter()
        .find_map(|k| spec.params.get(*k).and_then(|v| v.as_str()).map(str::to_string));
    let params = spec
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
        .collect();
    ModelCard {
        title: spec
            .output
            .as_ref()
            .and_then(|o| o.hugging_face.as_ref())
            .map_or(job_name.to_string(), |h| h.repo.rsplit('/').next().unwrap_or(&h.repo).to_string()),
        tool: spec.tool.clone(),
        base_model,
        extra_tags: vec![],
        target_steps: progress.total_steps,
        completed_steps: progress.step,
        stop_reason: stop_reason.map(str::to_string),
        params,
        files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ProgressStatus;

    fn cp(name: &str, step: u64, uri: Option<&str>) -> CheckpointStatus {
        CheckpointStatus { name: name.into(), step, size_bytes: Some(1), uri: uri.map(str::to_string) }
    }

    #[test]
    fn synced_checkpoints_stay_listed_after_the_machine_is_gone() {
        let earlier = vec![cp("a_10", 10, Some("s3://b/a_10")), cp("a_20", 20, None)];
        // A new machine has only what was restored plus a newer one.
        let found = vec![cp("a_10", 10, None), cp("a_30", 30, None)];
        let synced = vec![cp("a_30", 30, Some("s3://b/a_30"))];
        let merged = merge_checkpoints(&earlier, &found, &synced);
        assert_eq!(
            merged.iter().map(|c| (c.name.as_str(), c.uri.is_some())).collect::<Vec<_>>(),
            [("a_10", true), ("a_30", true)]
        );
        assert_eq!(latest_synced(&merged).map(|c| c.step), Some(30));
        assert_eq!(latest_synced(&[cp("x", 5, None)]), None);
    }

    fn found(steps: std::ops::RangeInclusive<u64>) -> Vec<CheckpointStatus> {
        steps.map(|s| cp(&format!("c_{s:09}"), s, None)).collect()
    }

    #[test]
    fn status_lists_the_newest_checkpoints_and_counts_the_rest_once() {
        let mut status = TrainingJobStatus::default();
        // A machine reports 5000 checkpoints at once.
        record_checkpoints(&mut status, &found(1..=5000), &[]);
        assert_eq!(status.checkpoints.len(), STATUS_CHECKPOINTS);
        assert_eq!(status.checkpoints.first().map(|c| c.step), Some(4981));
        assert_eq!(status.checkpoints.last().map(|c| c.step), Some(5000));
        assert_eq!(status.checkpoints_omitted, 4980);
        // The same listing at the next poll changes nothing, and is not counted again.
        let before = status.clone();
        record_checkpoints(&mut status, &found(1..=5000), &[]);
        assert_eq!(status, before);
        // One newer checkpoint pushes the oldest listed one out.
        record_checkpoints(&mut status, &found(1..=5001), &[]);
        assert_eq!(status.checkpoints.first().map(|c| c.step), Some(4982));
        assert_eq!(status.checkpoints_omitted, 4981);
        // A synced checkpoint the machine deleted stays listed (it is in storage)...
        let synced = vec![cp("c_000005002", 5002, Some("s3://b/c"))];
        record_checkpoints(&mut status, &found(1..=5001), &synced);
        record_checkpoints(&mut status, &found(1..=5001), &[]);
        assert!(status.checkpoints.iter().any(|c| c.step == 5002 && c.uri.is_some()));
        // ...and a machine that deleted unsynced ones does not bring back the omitted ones.
        record_checkpoints(&mut status, &found(1..=4990), &[]);
        assert_eq!(status.checkpoints.iter().map(|c| c.step).min(), Some(4983));
        assert_eq!(status.checkpoints_omitted, 4982);
        // The status stays small however many checkpoints the machine reports.
        assert!(serde_json::to_string(&status).unwrap().len() < 4096);
    }

    #[test]
    fn a_status_name_that_fails_the_check_is_dropped() {
        let mut status = TrainingJobStatus {
            checkpoints: vec![cp("../../etc/x_000000010", 10, Some("s3://b/x")), cp("a_000000020", 20, None)],
            ..Default::default()
        };
        record_checkpoints(&mut status, &[cp("a_000000020", 20, None)], &[]);
        assert_eq!(status.checkpoints.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a_000000020"]);
    }

    #[test]
    fn only_checkpoints_that_stay_listed_are_synced() {
        let inventory = |steps: std::ops::RangeInclusive<u64>| -> Vec<Checkpoint> {
            steps
                .map(|s| Checkpoint { path: format!("c_{s:09}"), step: Some(s), epoch: None, size_bytes: 1 })
                .collect()
        };
        let mut status = TrainingJobStatus::default();
        let to_sync = checkpoints_to_sync(&inventory(1..=5000), &status);
        assert_eq!(to_sync.len(), STATUS_CHECKPOINTS);
        assert_eq!(to_sync.first().and_then(|c| c.step), Some(4981));
        record_checkpoints(&mut status, &found(1..=5000), &[]);
        // The 4980 omitted ones are never synced, whatever the order of the listing.
        let mut reversed = inventory(1..=5000);
        reversed.reverse();
        assert!(checkpoints_to_sync(&reversed, &status).iter().all(|c| c.step >= Some(4981)));
    }

    #[test]
    fn the_jobs_upload_totals_add_up_and_set_the_next_limits() {
        let mut status = TrainingJobStatus::default();
        add_uploaded(&mut status, 0, 0);
        assert_eq!(status.uploaded, None, "nothing uploaded: nothing written");
        add_uploaded(&mut status, 2, 100);
        add_uploaded(&mut status, 3, u64::MAX);
        assert_eq!(status.uploaded, Some(crate::api::UploadedStatus { files: 5, bytes: u64::MAX }));
        let limits = upload_limits(JobUploadLimits { max_files: 10, max_bytes: 1000 }, &status);
        assert!(limits.check_files(5, "x").is_ok());
        assert!(limits.check_files(6, "x").is_err());
        assert!(limits.check_bytes(1, "x").is_err());
    }

    #[test]
    fn the_card_of_a_stopped_run_is_incomplete() {
        let spec: TrainingJobSpec = serde_json::from_value(serde_json::json!({
            "tool": "demo@1", "dataset": {"url": {"href": "http://x/d.tar"}}, "params": {"steps": 40}
        }))
        .unwrap();
        let status = TrainingJobStatus {
            progress: Some(ProgressStatus { step: 12, total_steps: Some(40), ..Default::default() }),
            ..Default::default()
        };
        let card = model_card("j", &spec, &status, Some("Stalled: no progress"), vec![]);
        assert!(card.incomplete());
        assert!(card.render().contains("incomplete"));
        assert!(!model_card("j", &spec, &TrainingJobStatus::default(), None, vec![]).incomplete());
        assert_eq!(card.params, [("steps".to_string(), "40".to_string())]);
    }
}
