//! `gpu-trainer parse-log`: what the monitor makes of a saved log (final progress, events,
//! errors, stall analysis), as JSON, for debugging a run after the fact.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;

use crate::monitor::timestamps::parse_timestamps;
use crate::monitor::{ParserKind, StallSettings, replay};

/// Replay a saved training log through the monitor and print the result as JSON.
#[derive(Args, Debug)]
#[command(after_help = "Timestamps file: one poll per line, `<byte offset|end> <seconds since start>`, \
the length the log had at that time; `#` starts a comment. Without it, the whole log is read at once \
and there is no stall analysis.\n\nExample:\n  gpu-trainer parse-log train.log --parser kohya --timestamps train.ts")]
pub struct ParseLogArgs {
    /// The saved log (`train.log`).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Log format: tqdm, ai-toolkit, kohya or diffusers.
    #[arg(long, value_name = "NAME", default_value = "tqdm")]
    parser: String,
    /// When each part of the log was read, for the stall analysis.
    #[arg(long, value_name = "FILE")]
    timestamps: Option<PathBuf>,
}

pub fn run(args: ParseLogArgs) -> anyhow::Result<()> {
    let kind: ParserKind = args.parser.parse()?;
    let log = std::fs::read(&args.file)
        .with_context(|| format!("failed to read the log {}", args.file.display()))?;
    let polls = match &args.timestamps {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read the timestamps file {}", path.display()))?;
            Some(
                parse_timestamps(&text, log.len() as u64)
                    .with_context(|| format!("invalid timestamps file {}", path.display()))?,
            )
        }
        None => None,
    };
    // A fixed origin keeps the output reproducible; the times only matter relative to each other.
    let start = DateTime::<Utc>::UNIX_EPOCH;
    let report = replay(&log, kind, polls.as_deref(), &StallSettings::default(), start);
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report).context("failed to write the report")?;
    writeln!(out).context("failed to write the report")?;
    Ok(())
}
