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
//!
//! The machine decides what the folder holds, so the listing is bounded before it is used: at
//! most [`MAX_LISTING_ENTRIES`] entries and [`MAX_CHECKPOINTS`] checkpoints (more is refused: the
//! machine misbehaves), and a checkpoint whose name fails
//! [`check_relative_path`](super::remote_names::check_relative_path) is left out and reported in
//! [`CheckpointInventory::refused`].

use std::collections::BTreeMap;

use serde::Serialize;

use super::parser::ParserKind;
use super::remote_names::{RefusedNames, check_relative_path, records};
use crate::api::CheckpointStatus;

/// Most entries (files and folders, at any depth) accepted in a listing of the output folder.
/// A trainer writes a few per checkpoint and sample; more means the machine floods us.
pub const MAX_LISTING_ENTRIES: usize = 10_000;
/// Most checkpoints accepted in one listing (ai-toolkit and diffusers prune old ones; kohya
/// saving every 100 steps of a 100,000-step run stays below it).
pub const MAX_CHECKPOINTS: usize = 1_000;

/// A listing outside the limits: the machine's fault, refused as a whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListingError {
    #[error(
        "the machine listed {count} entries in its output folder; at most {MAX_LISTING_ENTRIES} are accepted"
    )]
    TooManyEntries { count: usize },
    #[error(
        "the machine reported {count} checkpoints (files or folders named like checkpoints); at most {MAX_CHECKPOINTS} are accepted"
    )]
    TooManyCheckpoints { count: usize },
}

/// The command that produces the listing [`parse_listing`] reads. Records end with NUL: a file
/// name may hold a newline.
pub fn listing_command(output_dir: &str) -> String {
    format!(
        "find {} -printf '%y %s %P\\0'",
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

/// Parses `find -printf '%y %s %P\0'` output (see [`records`]); malformed records are skipped.
/// More than [`MAX_LISTING_ENTRIES`] records are refused, and never held in memory.
pub fn parse_listing(text: &str) -> Result<Vec<ListingEntry>, ListingError> {
    let count = records(text).count();
    if count > MAX_LISTING_ENTRIES {
        return Err(ListingError::TooManyEntries { count });
    }
    Ok(records(text)
        .filter_map(|record| {
            let mut parts = record.splitn(3, ' ');
            let kind = parts.next()?;
            let size = parts.next()?.parse().ok()?;
            let path = parts.next()?.trim_end_matches('/');
            (!path.is_empty()).then(|| ListingEntry {
                is_dir: kind == "d",
                size_bytes: size,
                path: path.to_owned(),
            })
        })
        .collect())
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
    /// Entries named like checkpoints whose names are refused: left out of everything above.
    #[serde(skip)]
    pub refused: RefusedNames,
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

/// Builds the inventory for one trainer's naming scheme (`tqdm` accepts all of them). Refuses
/// more than [`MAX_CHECKPOINTS`] checkpoints, counting those with refused names.
pub fn inventory(entries: &[ListingEntry], kind: ParserKind) -> Result<CheckpointInventory, ListingError> {
    let mut found = Vec::new();
    let mut final_model = None;
    let mut refused = RefusedNames::default();
    let mut reported = 0;
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
        if best.is_some_and(|f| !matches!(f, Found::Final)) {
            reported += 1;
            if reported > MAX_CHECKPOINTS {
                // Count the rest without keeping them.
                continue;
            }
        }
        if best.is_some()
            && let Err(why) = check_relative_path(&entry.path)
        {
            refused.add(&entry.path, why);
            continue;
        }
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
    if reported > MAX_CHECKPOINTS {
        return Err(ListingError::TooManyCheckpoints { count: reported });
    }
    found.sort_by_key(|c| (c.step.is_none(), c.step, c.epoch, c.path.clone()));
    Ok(CheckpointInventory { checkpoints: found, final_model, refused })
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
            // Sizes are the machine's word: a sum must not overflow.
            let size = sizes.entry(top).or_insert(0u64);
            *size = size.saturating_add(entry.size_bytes);
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
        let inv = inventory(&parse_listing(listing).unwrap(), ParserKind::AiToolkit).unwrap();
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
        let inv = inventory(&parse_listing(listing).unwrap(), ParserKind::Kohya).unwrap();
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
        let inv = inventory(&parse_listing(listing).unwrap(), ParserKind::Diffusers).unwrap();
        let found: Vec<_> = inv.checkpoints.iter().map(|c| (c.step, c.size_bytes)).collect();
        assert_eq!(found, vec![(Some(500), 120), (Some(1000), 130)]);
        assert_eq!(inv.final_model.unwrap().size_bytes, 999);
    }

    #[test]
    fn hostile_names_are_left_out_and_reported_while_good_ones_stay() {
        let listing = "f 10 my_lora_000000250.safetensors\0\
                       f 11 ../escape_000000300.safetensors\0\
                       f 12 a\nf 9 forged_000000400.safetensors\0\
                       f 13 $(reboot)_000000500.safetensors\0\
                       f 14 .hidden_000000600.safetensors\0";
        let inv = inventory(&parse_listing(listing).unwrap(), ParserKind::AiToolkit).unwrap();
        assert_eq!(
            inv.checkpoints.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
            ["my_lora_000000250.safetensors"],
            "a newline inside a NUL-terminated record forges nothing"
        );
        assert_eq!(inv.refused.count, 4);
        let text = inv.refused.to_string();
        assert!(text.contains(r#""a\nf 9 forged_000000400.safetensors" contains '\n'"#), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert_eq!(inv.to_status().len(), 1);
    }

    #[test]
    fn a_flood_of_checkpoints_is_refused_whatever_their_names() {
        let listing = |n: usize| -> String { (0..n).map(|i| format!("d 4096 checkpoint-{i}\0")).collect() };
        let inv =
            inventory(&parse_listing(&listing(MAX_CHECKPOINTS)).unwrap(), ParserKind::Diffusers).unwrap();
        assert_eq!(inv.checkpoints.len(), MAX_CHECKPOINTS);
        let err = inventory(&parse_listing(&listing(MAX_CHECKPOINTS + 1)).unwrap(), ParserKind::Diffusers)
            .unwrap_err();
        assert_eq!(err, ListingError::TooManyCheckpoints { count: MAX_CHECKPOINTS + 1 });
        assert!(err.to_string().contains("reported 1001 checkpoints"), "{err}");
        // Hostile names count too: refusing a name does not make a flood acceptable.
        let hostile: String =
            (0..MAX_CHECKPOINTS + 1).map(|i| format!("f 1 $(x) y_{i:09}.safetensors\0")).collect();
        assert_eq!(
            inventory(&parse_listing(&hostile).unwrap(), ParserKind::AiToolkit).unwrap_err(),
            ListingError::TooManyCheckpoints { count: MAX_CHECKPOINTS + 1 }
        );
    }

    #[test]
    fn a_listing_with_too_many_entries_is_refused_before_it_is_parsed() {
        let listing: String = (0..MAX_LISTING_ENTRIES).map(|i| format!("f 1 samples/{i}.jpg\0")).collect();
        assert_eq!(parse_listing(&listing).unwrap().len(), MAX_LISTING_ENTRIES);
        let listing = format!("{listing}f 1 one-more\0");
        assert_eq!(
            parse_listing(&listing).unwrap_err(),
            ListingError::TooManyEntries { count: MAX_LISTING_ENTRIES + 1 }
        );
    }

    #[test]
    fn folder_sizes_reported_by_the_machine_cannot_overflow() {
        let listing =
            format!("d 1 checkpoint-5\0f {max} checkpoint-5/a\0f {max} checkpoint-5/b\0", max = u64::MAX);
        let inv = inventory(&parse_listing(&listing).unwrap(), ParserKind::Diffusers).unwrap();
        assert_eq!(inv.checkpoints[0].size_bytes, u64::MAX);
    }

    #[tokio::test]
    async fn the_real_listing_command_keeps_a_name_with_a_newline_in_one_record() {
        use crate::remote::RemoteExec as _;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("output");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("my_lora_000000250.safetensors"), b"12345").unwrap();
        std::fs::write(out.join("x\nf 7 forged_000000900.safetensors"), b"1").unwrap();
        let machine = crate::remote::local::LocalExec::new(dir.path()).unwrap();
        let listed = machine.run(&listing_command("output"), Default::default()).await.unwrap();
        let inv = inventory(&parse_listing(&listed.stdout_lossy()).unwrap(), ParserKind::AiToolkit).unwrap();
        assert_eq!(
            inv.checkpoints.iter().map(|c| (c.path.as_str(), c.size_bytes)).collect::<Vec<_>>(),
            [("my_lora_000000250.safetensors", 5)]
        );
        assert_eq!(inv.refused.count, 1);
    }
}
