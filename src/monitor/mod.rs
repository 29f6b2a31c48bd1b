//! The training monitor: what a trainer's own log says about its progress, whether it stalls,
//! how it ended, and which checkpoints it left.
//!
//! The pieces, one concern per file:
//! - `line.rs`: bytes fed in arbitrary chunks → records (`\r` redraws, ANSI escapes, UTF-8 split
//!   across chunks, bounded record length).
//! - `prefix.rs`: launcher and logging prefixes (`[rank0]:`, Python logging, rich).
//! - `tqdm.rs`: the progress-bar grammar; `ai_toolkit.rs`, `kohya.rs`, `diffusers.rs`: what each
//!   trainer adds (which bar is training, checkpoint, sample, resume and completion messages),
//!   wired together in `parser.rs` and chosen by name with [`ParserKind`].
//! - `errors.rs`: classified errors (OOM, CUDA, NCCL, traceback, disk full, gated model, killed).
//! - `progress.rs`: timestamped readings and our own ETA (trainers exclude save and sample time).
//! - `stall.rs`: the stall detector (pure, takes `now`); `deadlines.rs`: soft and hard deadlines.
//! - `checkpoints.rs`: the checkpoint inventory from a listing of the output folder.
//! - `remote_names.rs`: the one check of every name the machine reports (checkpoints, files).
//! - `poller.rs`: the polling and following monitor over `dyn RemoteExec`.
//! - `timestamps.rs` and `replay.rs`: replaying a saved log poll by poll (`parse-log`, fixtures).
//!
//! Parsers never read the clock and emit events only for completed records, so the same bytes
//! give the same events however they were chunked (a property test checks this).

mod ai_toolkit;
pub mod checkpoints;
pub mod deadlines;
mod diffusers;
pub mod errors;
mod events;
mod kohya;
pub mod line;
mod parser;
pub mod poller;
mod prefix;
pub mod progress;
pub mod remote_names;
pub mod replay;
pub mod stall;
pub mod timestamps;
pub mod tqdm;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod poller_tests;

pub use errors::{ClassifiedError, ErrorClass};
pub use events::{LogEvent, StepReading};
pub use parser::{Dialect, LogParser, ParserKind, UnknownParser};
pub use poller::{MonitorError, Outcome, ProcessState, TrainingFiles, TrainingMonitor, TrainingStatus};
pub use progress::{ProgressSnapshot, ProgressTracker};
pub use replay::{LogReport, replay};
pub use stall::{Observation, StallAssessment, StallSettings, assess_stall};
