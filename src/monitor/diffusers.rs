//! huggingface/diffusers training scripts (accelerate): the bar is `Steps` with `initial=` the
//! resumed global step, messages use Python logging, checkpoints are `checkpoint-<step>` folders
//! announced by `Saved state to`. There is no completion line: completion is the bar reaching its
//! total plus exit code 0 and `pytorch_lora_weights.safetensors` in the output.

use super::events::LogEvent;
use super::parser::{Dialect, number_after};
use super::prefix::Stripped;
use super::tqdm::Bar;

#[derive(Debug, Default)]
pub struct Diffusers;

impl Dialect for Diffusers {
    fn is_training_bar(&self, bar: &Bar<'_>) -> bool {
        bar.desc == "Steps" && !bar.scaled
    }

    fn on_message(&mut self, line: Stripped<'_>, last_step: Option<u64>, out: &mut dyn FnMut(LogEvent)) {
        let text = line.text.trim();
        if let Some(path) = text.strip_prefix("Saved state to ") {
            let path = path.trim();
            out(LogEvent::CheckpointSaved {
                step: number_after(path, "checkpoint-"),
                path: Some(path.to_owned()),
            });
        } else if let Some(path) = text.strip_prefix("Saving current state to ") {
            out(LogEvent::SavingStarted { step: number_after(path, "checkpoint-").or(last_step) });
        } else if text.starts_with("Running validation") {
            out(LogEvent::SamplingStarted { step: last_step });
        } else if text.starts_with("Total optimization steps") {
            if let Some(total) = number_after(text, "= ") {
                out(LogEvent::TotalSteps { total });
            }
        } else if text.starts_with("Resuming from checkpoint")
            && let Some(step) = number_after(text, "checkpoint-")
        {
            out(LogEvent::Resumed { step });
        }
    }
}
