//! Checkpoint inventory from a listing of the output folder: every checkpoint each trainer's
//! naming scheme produces, the latest by step number, and the final model, with sizes. The
//! listing is the output of `find <output> -printf '%y %s %P\n'` (type, size, relative path), so
//! one remote command is enough and folders (diffusers' `checkpoint-500/`) get the size of
//! everything inside them.
//!
//! Schemes:
//! - ai-toolkit: `<name>_<step:09>.safetensors`; final `<name>.safetensors`.
//! - kohya: `<name>-step<step:08>.safetensors` (`at-step…` without `--output_name`); epoch files
//!   `<name>-<epoch:06>.safetensors` have no step and are listed with `epoch`; final
//!   `<name>.safetensors` / `last.safetensors`; `-state` folders are resume state, not models.
//! - diffusers: `checkpoint-<step>/` folders; final `pytorch_lora_weights.safetensors`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::parser::ParserKind;
use crate::api::CheckpointStatus;

/// The command that produces the listing [`parse_listing`] reads.
pub fn listing_command(output_dir: &str) -> String {
    format!(
        "find {} -printf '%y %s %P\\n'",
        shlex::try_quote(output_dir).unwrap_or_else(|_| output_dir.into())
    )
}

/// One line of the listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListingEntry {
    pub is_dir: bool,
    pub size_bytes: u64,
    /// Relative to the output folder, `/`-separated.
    pub path: String,
}

/// Parses `find -printf '%y %s %P\n'` output; malformed lines are skipped.
pub fn parse_listing(text: &str) -> Vec<ListingEntry> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let kind = parts.next()?;
            let size = parts.next()?.parse().ok()?;
            let path = parts.next()?.trim_end_matches('/');
            (!path.is_empty()).then(|| ListingEntry {
                is_dir: kind == "d",
                size_bytes: size,
                path: path.to_owned(),
            })
        })
        .collect()
}

/// A checkpoint on the machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    pub size_bytes: u64,
}

/// What the output folder holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointInventory {
    /// Step checkpoints, by step (epoch-only checkpoints last, by epoch).
    pub checkpoints: Vec<Checkpoint>,
    /// The final model, when the trainer wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_model: Option<Checkpoint>,
}

impl CheckpointInventory {
    /// The checkpoint with the highest step number.
    pub fn latest(&self) -> Option<&Checkpoint> {
        self.checkpoints.iter().filter(|c| c.step.is_some()).max_by_key(|c| c.step)
    }

    /// For `status.checkpoints`, oldest first.
    pub fn to_status(&self) -> Vec<CheckpointStatus> {
        self.checkpoints
            .iter()
            .filter_map(|c| {
                Some(CheckpointStatus {
                    name: c.path.clone(),
                    step: c.step?,
                    size_bytes: Some(c.size_bytes),
                    uri: None,
                })
            })
            .collect()
    }
}

/// Builds the inventory for one trainer's naming scheme (`tqdm` accepts all of them).
pub fn inventory(entries: &[ListingEntry], kind: ParserKind) -> CheckpointInventory {
    let mut found = Vec::new();
    let mut final_model = None;
    let folder_sizes = folder_sizes(entries);
    for entry in entries {
        let file = entry.path.rsplit('/').next().unwrap_or(&entry.path);
        let top_level = !entry.path.contains('/');
        let schemes: &[ParserKind] = match kind {
            ParserKind::Tqdm => &[ParserKind::AiToolkit, ParserKind::Kohya, ParserKind::Diffusers],
            ParserKind::AiToolkit => &[ParserKind::AiToolkit],
            ParserKind::Kohya => &[ParserKind::Kohya],
            ParserKind::Diffusers => &[ParserKind::Diffusers],
        };
        // With several schemes, a step or epoch name from any of them beats another scheme's
        // "any other top-level model is the final one".
        let matches: Vec<Found> =
            schemes.iter().filter_map(|s| classify(file, entry, top_level, *s)).collect();
        let best = matches.iter().find(|f| !matches!(f, Found::Final)).or(matches.first());
        match best {
            Some(Found::Step(step)) => found.push(Checkpoint {
                path: entry.path.clone(),
                step: Some(*step),
                epoch: None,
                size_bytes: folder_sizes.get(entry.path.as_str()).copied().unwrap_or(entry.size_bytes),
            }),
            Some(Found::Epoch(epoch)) => found.push(Checkpoint {
                path: entry.path.clone(),
                step: None,
                epoch: Some(*epoch),
                size_bytes: entry.size_bytes,
            }),
            Some(Found::Final) => {
                final_model = Some(Checkpoint {
                    path: entry.path.clone(),
                    step: None,
                    epoch: None,
                    size_bytes: entry.size_bytes,
                })
            }
            None => {}
        }
    }
    found.sort_by_key(|c| (c.step.is_none(), c.step, c.epoch, c.path.clone()));
    CheckpointInventory { checkpoints: found, final_model }
}

enum Found {
    Step(u64),
    Epoch(u64),
    Final,
}

fn classify(file: &str, entry: &ListingEntry, top_level: bool, scheme: ParserKind) -> Option<Found> {
    match scheme {
        ParserKind::AiToolkit => {
            let stem = file.strip_suffix(".safetensors")?;
            if entry.is_dir {
                return None;
            }
            match stem.rsplit_once('_') {
                Some((_, digits)) if digits.len() == 9 && digits.bytes().all(|b| b.is_ascii_digit()) => {
                    digits.parse().ok().map(Found::Step)
                }
                // Samples and other files live in subfolders; the final model is at the top.
                _ if top_level => Some(Found::Final),
                _ => None,
            }
        }
        ParserKind::Kohya => {
            if entry.is_dir || !top_level {
                return None;
            }
            let stem = file.strip_suffix(".safetensors")?;
            if let Some(i) = stem.rfind("step") {
                let digits = &stem[i + 4..];
                if digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()) {
                    return digits.parse().ok().map(Found::Step);
                }
            }
            match stem.rsplit_once('-') {
                Some((_, digits)) if digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit()) => {
                    digits.parse().ok().map(Found::Epoch)
                }
                _ => Some(Found::Final),
            }
        }
        _ => {
            if entry.is_dir && top_level {
                let digits = file.strip_prefix("checkpoint-")?;
                return digits.parse().ok().map(Found::Step);
            }
            (file == "pytorch_lora_weights.safetensors" && top_level).then_some(Found::Final)
        }
    }
}

/// Total size of the files under each top-level folder.
fn folder_sizes(entries: &[ListingEntry]) -> BTreeMap<&str, u64> {
    let mut sizes = BTreeMap::new();
    for entry in entries.iter().filter(|e| !e.is_dir) {
        if let Some((top, _)) = entry.path.split_once('/') {
            *sizes.entry(top).or_insert(0) += entry.size_bytes;
        }
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ai_toolkit_steps_final_model_and_samples_ignored() {
        let listing = "d 4096 \nf 1200 config.yaml\nf 170000 my_lora_000000250.safetensors\n\
                       f 170001 my_lora_000000500.safetensors\nf 170002 my_lora.safetensors\n\
                       f 90000 samples/1732345678__000000250_0.jpg\nf 5 optimizer.pt\n";
        let inv = inventory(&parse_listing(listing), ParserKind::AiToolkit);
        let steps: Vec<_> = inv.checkpoints.iter().map(|c| (c.step, c.size_bytes)).collect();
        assert_eq!(steps, vec![(Some(250), 170000), (Some(500), 170001)]);
        assert_eq!(inv.latest().unwrap().path, "my_lora_000000500.safetensors");
        assert_eq!(inv.final_model.unwrap().path, "my_lora.safetensors");
    }

    #[test]
    fn kohya_step_epoch_and_final_names() {
        let listing = "f 10 mylora-step00000500.safetensors\nf 11 mylora-step00001000.safetensors\n\
                       f 12 mylora-000004.safetensors\nf 13 mylora.safetensors\nd 4096 mylora-step00000500-state\n\
                       f 7 sample/mylora_000500_00_20250301102207_42.png\n";
        let inv = inventory(&parse_listing(listing), ParserKind::Kohya);
        let found: Vec<_> = inv.checkpoints.iter().map(|c| (c.step, c.epoch)).collect();
        assert_eq!(found, vec![(Some(500), None), (Some(1000), None), (None, Some(4))]);
        assert_eq!(inv.latest().unwrap().step, Some(1000));
        assert_eq!(inv.final_model.as_ref().unwrap().path, "mylora.safetensors");
        assert_eq!(inv.to_status().len(), 2);
    }

    #[test]
    fn diffusers_checkpoint_folders_sum_their_files() {
        let listing = "d 4096 checkpoint-500\nf 100 checkpoint-500/optimizer.bin\nf 20 checkpoint-500/scheduler.bin\n\
                       d 4096 checkpoint-1000\nf 130 checkpoint-1000/optimizer.bin\nf 999 pytorch_lora_weights.safetensors\n";
        let inv = inventory(&parse_listing(listing), ParserKind::Diffusers);
        let found: Vec<_> = inv.checkpoints.iter().map(|c| (c.step, c.size_bytes)).collect();
        assert_eq!(found, vec![(Some(500), 120), (Some(1000), 130)]);
        assert_eq!(inv.final_model.unwrap().size_bytes, 999);
    }
}
