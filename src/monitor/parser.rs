//! The parser pipeline shared by all trainers: bytes → records (`line.rs`) → prefixes stripped
//! (`prefix.rs`) → a tqdm bar or a message → events. What differs between trainers (which bar is
//! the training bar, how checkpoints and completion are announced, resume offsets) lives in a
//! small [`Dialect`] per trainer.

use std::fmt;
use std::str::FromStr;

use super::errors::{ClassifiedError, ErrorClass, ErrorScanner};
use super::events::{LogEvent, StepReading};
use super::line::LineSplitter;
use super::prefix::{Stripped, strip_prefixes};
use super::tqdm::{Bar, parse_bar};
use super::{ai_toolkit, diffusers, kohya};

/// The parsers that can be chosen by name (`--parser`, the tool's `logFormat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParserKind {
    Tqdm,
    AiToolkit,
    Kohya,
    Diffusers,
}

impl ParserKind {
    pub const ALL: [ParserKind; 4] =
        [ParserKind::Tqdm, ParserKind::AiToolkit, ParserKind::Kohya, ParserKind::Diffusers];

    pub fn name(self) -> &'static str {
        match self {
            ParserKind::Tqdm => "tqdm",
            ParserKind::AiToolkit => "ai-toolkit",
            ParserKind::Kohya => "kohya",
            ParserKind::Diffusers => "diffusers",
        }
    }

    /// A fresh parser of this kind.
    pub fn parser(self) -> LogParser {
        let dialect: Box<dyn Dialect> = match self {
            ParserKind::Tqdm => Box::new(GenericTqdm),
            ParserKind::AiToolkit => Box::new(ai_toolkit::AiToolkit::default()),
            ParserKind::Kohya => Box::new(kohya::Kohya::default()),
            ParserKind::Diffusers => Box::new(diffusers::Diffusers),
        };
        LogParser::new(self, dialect)
    }
}

/// The parser for the log format a tool's definition names.
impl From<crate::remote::tool::Parser> for ParserKind {
    fn from(parser: crate::remote::tool::Parser) -> Self {
        use crate::remote::tool::Parser;
        match parser {
            Parser::Tqdm => ParserKind::Tqdm,
            Parser::AiToolkit => ParserKind::AiToolkit,
            Parser::Kohya => ParserKind::Kohya,
            Parser::Diffusers => ParserKind::Diffusers,
        }
    }
}

impl fmt::Display for ParserKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown parser name; the message lists the valid ones.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown parser {name:?}; valid parsers: tqdm, ai-toolkit, kohya, diffusers")]
pub struct UnknownParser {
    pub name: String,
}

impl FromStr for ParserKind {
    type Err = UnknownParser;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ParserKind::ALL
            .into_iter()
            .find(|kind| kind.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownParser { name: s.to_owned() })
    }
}

/// What one trainer's log adds to the tqdm grammar. `Sync` because the TrainingJob controller keeps
/// a monitor per job across awaits in its (multi-threaded) reconciles.
pub trait Dialect: Send + Sync {
    /// Whether this bar is the training loop's bar (not loading, caching, sampling or downloads).
    fn is_training_bar(&self, bar: &Bar<'_>) -> bool;

    /// Global step and total for a training bar (kohya counts from 0 after a resume).
    fn globalise(&self, bar: &Bar<'_>) -> (u64, Option<u64>) {
        (bar.n, bar.total)
    }

    /// A bar that is not the training bar (sampling, caching).
    fn on_other_bar(&mut self, _bar: &Bar<'_>, _last_step: Option<u64>, _out: &mut dyn FnMut(LogEvent)) {}

    /// A training bar was seen; dialects that buffer messages flush them first.
    fn on_training_bar(&mut self, _out: &mut dyn FnMut(LogEvent)) {}

    /// A record that is not a bar.
    fn on_message(&mut self, line: Stripped<'_>, last_step: Option<u64>, out: &mut dyn FnMut(LogEvent));

    /// End of the log: emit anything held back.
    fn flush(&mut self, _out: &mut dyn FnMut(LogEvent)) {}
}

/// Bars that are never the training bar, by the start of their description.
const NON_TRAINING_BARS: &[&str] = &[
    "Generating Samples",
    "Generating",
    "Caching",
    "Loading checkpoint shards",
    "Loading",
    "Fetching",
    "Downloading",
    "Map",
    "Sampling",
    "Validation",
];

pub(crate) fn is_non_training_desc(desc: &str) -> bool {
    NON_TRAINING_BARS.iter().any(|prefix| desc.starts_with(prefix)) || desc.ends_with(".safetensors")
}

/// Plain tqdm: any step bar that is not a known loading, caching or sampling bar.
struct GenericTqdm;

impl Dialect for GenericTqdm {
    fn is_training_bar(&self, bar: &Bar<'_>) -> bool {
        !bar.scaled && !is_non_training_desc(bar.desc)
    }

    fn on_message(&mut self, _line: Stripped<'_>, _last_step: Option<u64>, _out: &mut dyn FnMut(LogEvent)) {}
}

/// A parser fed raw byte chunks; emits events for completed records only, so results do not
/// depend on how the bytes were chunked. The unterminated tail is available as [`Self::live`].
pub struct LogParser {
    kind: ParserKind,
    splitter: LineSplitter,
    state: RecordState,
}

struct RecordState {
    dialect: Box<dyn Dialect>,
    errors: ErrorScanner,
    last_step: Option<u64>,
    loss_was_finite: bool,
}

impl LogParser {
    fn new(kind: ParserKind, dialect: Box<dyn Dialect>) -> Self {
        Self {
            kind,
            splitter: LineSplitter::new(),
            state: RecordState {
                dialect,
                errors: ErrorScanner::default(),
                last_step: None,
                loss_was_finite: true,
            },
        }
    }

    pub fn kind(&self) -> ParserKind {
        self.kind
    }

    /// Feeds the next bytes of the log.
    pub fn feed(&mut self, chunk: &[u8], out: &mut dyn FnMut(LogEvent)) {
        let state = &mut self.state;
        self.splitter.feed(chunk, &mut |record| state.on_record(record, out));
    }

    /// End of a saved log: commits the unterminated tail and anything the dialect held back.
    pub fn finish(&mut self, out: &mut dyn FnMut(LogEvent)) {
        let state = &mut self.state;
        self.splitter.finish(&mut |record| {
            // A bar the writer was cut off in the middle of (`521/30`) would give wrong counts.
            let cut_bar = parse_bar(strip_prefixes(record).text).is_some() && !record.contains(']');
            if !cut_bar {
                state.on_record(record, out);
            }
        });
        state.dialect.flush(out);
    }

    /// The live bar state in the unterminated tail, when it is a complete training bar.
    pub fn live(&self) -> Option<StepReading> {
        let text = self.splitter.live()?;
        let stripped = strip_prefixes(&text);
        if !stripped.text.contains(']') {
            // A bar cut in the middle by the read (`1800/40`) would give wrong counts.
            return None;
        }
        let (bar, _) = parse_bar(stripped.text)?;
        self.state.dialect.is_training_bar(&bar).then(|| self.state.reading(&bar))
    }

    /// Bytes held between calls (bounded by the longest record).
    pub fn buffered_bytes(&self) -> usize {
        self.splitter.buffered_bytes()
    }
}

impl RecordState {
    fn on_record(&mut self, record: &str, out: &mut dyn FnMut(LogEvent)) {
        let stripped = strip_prefixes(record);
        if let Some((bar, glued)) = parse_bar(stripped.text) {
            self.on_bar(&bar, out);
            // A bar that was never closed is often followed directly by a log message.
            if !glued.trim().is_empty() {
                self.on_record(glued, out);
            }
            return;
        }
        self.errors.scan(stripped.text, &mut |error| out(LogEvent::Error(error)));
        self.dialect.on_message(stripped, self.last_step, out);
    }

    fn on_bar(&mut self, bar: &Bar<'_>, out: &mut dyn FnMut(LogEvent)) {
        if !self.dialect.is_training_bar(bar) {
            self.dialect.on_other_bar(bar, self.last_step, out);
            return;
        }
        self.dialect.on_training_bar(out);
        let reading = self.reading(bar);
        self.last_step = Some(reading.step);
        if let Some(loss) = reading.loss {
            // Report the transition, not every redraw of a NaN loss.
            if !loss.is_finite() && self.loss_was_finite {
                let message = format!("loss is {loss} at step {}", reading.step);
                out(LogEvent::Error(ClassifiedError::new(ErrorClass::NonFiniteLoss, &message)));
            }
            self.loss_was_finite = loss.is_finite();
        }
        out(LogEvent::Progress(reading));
    }

    fn reading(&self, bar: &Bar<'_>) -> StepReading {
        let (step, total_steps) = self.dialect.globalise(bar);
        StepReading {
            step,
            total_steps,
            loss: bar.loss,
            learning_rate: bar.learning_rate,
            seconds_per_step: bar.seconds_per_step,
            trainer_eta_seconds: bar.remaining_seconds,
        }
    }
}

/// The first number in `text` after `marker`, e.g. `step_after("Saving at step 250", "step ")`.
pub(crate) fn number_after(text: &str, marker: &str) -> Option<u64> {
    let start = text.find(marker)? + marker.len();
    let digits: &str = text[start..].trim_start();
    let len = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..len].parse().ok()
}

/// The digits right before `suffix` at the end of a file name, e.g. `_000000250` in
/// `my_lora_000000250.safetensors` with separator `_` and width 9.
pub(crate) fn step_in_file_name(path: &str, separator: &str, width: usize) -> Option<u64> {
    let file = path.rsplit('/').next()?;
    let stem = file.split('.').next()?;
    let (_, digits) = stem.rsplit_once(separator)?;
    (digits.len() == width && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_names_round_trip_and_unknown_names_list_the_valid_ones() {
        for kind in ParserKind::ALL {
            assert_eq!(kind.name().parse::<ParserKind>(), Ok(kind));
        }
        let err = "axolotl".parse::<ParserKind>().unwrap_err().to_string();
        assert!(err.contains("axolotl") && err.contains("ai-toolkit") && err.contains("kohya"), "{err}");
    }

    #[test]
    fn generic_tqdm_ignores_loading_and_download_bars() {
        let mut parser = ParserKind::Tqdm.parser();
        let mut events = Vec::new();
        parser.feed(
            "Loading checkpoint shards: 100%|██████████| 2/2 [00:03<00:00,  1.50s/it]\n\
             model.safetensors:  45%|████▌     | 4.19G/9.29G [01:23<01:41, 54.2MB/s]\n\
             train:  10%|█         | 10/100 [00:10<01:30,  1.00it/s]\n"
                .as_bytes(),
            &mut |e| events.push(e),
        );
        assert_eq!(events.len(), 1);
        assert!(matches!(&events[0], LogEvent::Progress(r) if r.step == 10 && r.total_steps == Some(100)));
    }

    #[test]
    fn helpers_find_steps_in_text_and_file_names() {
        assert_eq!(number_after("Saving at step 250", "step "), Some(250));
        assert_eq!(step_in_file_name("out/my_lora/my_lora_000000250.safetensors", "_", 9), Some(250));
        assert_eq!(step_in_file_name("out/my_lora/my_lora.safetensors", "_", 9), None);
    }
}
