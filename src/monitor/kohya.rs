//! kohya-ss/sd-scripts: the training bar is `steps`, and after a resume it counts from 0 to the
//! remaining steps, so the offset from `skipping N steps` is added back. Messages go through
//! rich, which wraps them at 80 columns when there is no terminal: wrapped lines are joined back
//! into one message before matching (a break inside a word, as in a long path, is joined without
//! a space; rich pads the column with spaces when it breaks between words).

use super::events::LogEvent;
use super::parser::{Dialect, number_after};
use super::prefix::{RichLayout, Stripped};
use super::tqdm::Bar;

/// Longest joined message: a log of endless continuation lines cannot grow memory; the message
/// is matched as it stands and the rest starts a new one.
const MAX_MESSAGE_BYTES: usize = super::line::MAX_RECORD_BYTES;

#[derive(Debug, Default)]
pub struct Kohya {
    /// Steps already done before a resume; the bar counts from 0 after it.
    step_offset: u64,
    /// A rich message that may continue on the next physical line, and whether its last piece
    /// was padded (a break between words).
    pending: Option<(String, bool)>,
    sampling: bool,
}

impl Kohya {
    fn take_pending(&mut self, last_step: Option<u64>, out: &mut dyn FnMut(LogEvent)) {
        if let Some((message, _)) = self.pending.take() {
            self.on_full_message(&message, last_step, out);
        }
    }

    fn on_full_message(&mut self, text: &str, last_step: Option<u64>, out: &mut dyn FnMut(LogEvent)) {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("saving checkpoint:") {
            let path = path.trim();
            out(LogEvent::CheckpointSaved { step: checkpoint_step(path), path: Some(path.to_owned()) });
        } else if text.starts_with("saving state at step") {
            out(LogEvent::SavingStarted { step: number_after(text, "step").or(last_step) });
        } else if text.starts_with("model saved.") {
            out(LogEvent::Completed { path: None });
        } else if text.starts_with("generating sample images at step") {
            self.sampling = true;
            let step = text.rsplit(':').next().and_then(|s| s.trim().parse().ok()).or(last_step);
            out(LogEvent::SamplingStarted { step });
        } else if text.contains("total optimization steps") {
            if let Some(total) = text.rsplit(':').next().and_then(|s| s.trim().parse().ok()) {
                out(LogEvent::TotalSteps { total });
            }
        } else if text.starts_with("skipping ")
            && let Some(steps) = number_after(text, "skipping ")
        {
            self.step_offset = steps;
            out(LogEvent::Resumed { step: steps });
        }
    }
}

/// `mylora-step00000500.safetensors` or `at-step00000500.safetensors`; epoch files have no step.
fn checkpoint_step(path: &str) -> Option<u64> {
    let file = path.rsplit('/').next()?;
    let digits = &file[file.rfind("step")? + 4..];
    let len = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    (len == 8).then(|| digits[..len].parse().ok())?
}

impl Dialect for Kohya {
    fn is_training_bar(&self, bar: &Bar<'_>) -> bool {
        bar.desc == "steps" && !bar.scaled
    }

    fn globalise(&self, bar: &Bar<'_>) -> (u64, Option<u64>) {
        (bar.n + self.step_offset, bar.total.map(|t| t + self.step_offset))
    }

    fn on_other_bar(&mut self, _bar: &Bar<'_>, last_step: Option<u64>, out: &mut dyn FnMut(LogEvent)) {
        self.take_pending(last_step, out);
    }

    fn on_training_bar(&mut self, out: &mut dyn FnMut(LogEvent)) {
        self.sampling = false;
        self.take_pending(None, out);
    }

    fn on_message(&mut self, line: Stripped<'_>, last_step: Option<u64>, out: &mut dyn FnMut(LogEvent)) {
        match line.rich {
            RichLayout::Continuation { padded } => match self.pending.as_mut() {
                Some((message, _)) if message.len() + line.text.len() >= MAX_MESSAGE_BYTES => {
                    self.take_pending(last_step, out);
                    self.pending = Some((line.text.to_owned(), padded));
                }
                Some((message, previous_padded)) => {
                    if *previous_padded {
                        message.push(' ');
                    }
                    message.push_str(line.text);
                    *previous_padded = padded;
                }
                None => self.on_full_message(line.text, last_step, out),
            },
            RichLayout::Header { padded } => {
                self.take_pending(last_step, out);
                self.pending = Some((line.text.to_owned(), padded));
            }
            RichLayout::None => {
                self.take_pending(last_step, out);
                self.on_full_message(line.text, last_step, out);
            }
        }
    }

    fn flush(&mut self, out: &mut dyn FnMut(LogEvent)) {
        self.take_pending(None, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_continuation_lines_stay_within_the_message_limit() {
        let mut kohya = Kohya::default();
        let text = "x".repeat(80);
        let mut events = 0;
        let mut out = |_: LogEvent| events += 1;
        let header = Stripped { text: "INFO start", logger: None, rich: RichLayout::Header { padded: true } };
        kohya.on_message(header, None, &mut out);
        for _ in 0..100_000 {
            let line =
                Stripped { text: &text, logger: None, rich: RichLayout::Continuation { padded: true } };
            kohya.on_message(line, None, &mut out);
            let held = kohya.pending.as_ref().map_or(0, |(m, _)| m.len());
            assert!(held <= MAX_MESSAGE_BYTES, "{held}");
        }
    }

    #[test]
    fn checkpoint_steps_from_kohya_names() {
        assert_eq!(checkpoint_step("/out/mylora-step00000500.safetensors"), Some(500));
        assert_eq!(checkpoint_step("/out/at-step00001000.safetensors"), Some(1000));
        assert_eq!(checkpoint_step("/out/mylora-000004.safetensors"), None);
    }
}
