//! ostris/ai-toolkit: the training bar's description is the job name (learned from the
//! `# Running job: NAME` banner), checkpoints are `<name>_<step:09>.safetensors`, and the final
//! `Saved checkpoint to .../<name>.safetensors` (no step suffix) is the completion marker.

use super::events::LogEvent;
use super::parser::{Dialect, is_non_training_desc, number_after, step_in_file_name};
use super::prefix::Stripped;
use super::tqdm::Bar;

#[derive(Debug, Default)]
pub struct AiToolkit {
    job_name: Option<String>,
    /// Inside a sampling session (from its first `Generating Samples` bar to the next training bar).
    sampling: bool,
}

impl Dialect for AiToolkit {
    fn is_training_bar(&self, bar: &Bar<'_>) -> bool {
        if bar.scaled || bar.total.is_none() {
            return false;
        }
        match &self.job_name {
            Some(name) => bar.desc == name,
            None => !bar.desc.is_empty() && !is_non_training_desc(bar.desc),
        }
    }

    fn on_other_bar(&mut self, bar: &Bar<'_>, last_step: Option<u64>, out: &mut dyn FnMut(LogEvent)) {
        if bar.desc.starts_with("Generating Samples") && !self.sampling {
            self.sampling = true;
            out(LogEvent::SamplingStarted { step: last_step });
        }
    }

    fn on_training_bar(&mut self, _out: &mut dyn FnMut(LogEvent)) {
        self.sampling = false;
    }

    fn on_message(&mut self, line: Stripped<'_>, last_step: Option<u64>, out: &mut dyn FnMut(LogEvent)) {
        let text = line.text.trim();
        if let Some(name) = text.strip_prefix("# Running job:").map(|n| n.trim_end_matches('#').trim()) {
            self.job_name = Some(name.to_owned());
        } else if let Some(path) =
            text.strip_prefix("Saved checkpoint to ").or_else(|| text.strip_prefix("Saved to "))
        {
            let path = path.trim();
            match step_in_file_name(path, "_", 9) {
                Some(step) => {
                    out(LogEvent::CheckpointSaved { step: Some(step), path: Some(path.to_owned()) })
                }
                None if path.ends_with(".safetensors") => {
                    out(LogEvent::Completed { path: Some(path.to_owned()) })
                }
                None => {}
            }
        } else if let Some(rest) = text.strip_prefix("Saving at step ") {
            out(LogEvent::SavingStarted { step: rest.trim().parse().ok().or(last_step) });
        } else if text.starts_with("Found step ") && text.contains("in metadata") {
            if let Some(step) = number_after(text, "Found step ") {
                out(LogEvent::Resumed { step });
            }
        } else if text.starts_with("Generating baseline samples") || text.starts_with("Sampling at step") {
            self.sampling = true;
            out(LogEvent::SamplingStarted { step: number_after(text, "step ").or(last_step) });
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::monitor::{LogEvent, ParserKind};

    #[test]
    fn learns_the_job_name_and_ignores_other_bars() {
        let log = "# Running job: my_lora\n\
                   Caching latents to disk: 100%|██████████| 24/24 [00:31<00:00,  1.30s/it]\n\
                   my_lora:  12%|█▎        | 250/2000 [05:12<36:27,  1.25s/it, lr: 1.0e-04 loss: 4.512e-01]\n\
                   Saving at step 250\n\
                   Saved checkpoint to output/my_lora/my_lora_000000250.safetensors\n\
                   Generating Samples:  10%|█         | 1/10 [00:04<00:38,  4.20s/it]\r\
                   Generating Samples:  20%|██        | 2/10 [00:08<00:33,  4.20s/it]\n\
                   Saved checkpoint to output/my_lora/my_lora.safetensors\n";
        let mut events = Vec::new();
        let mut parser = ParserKind::AiToolkit.parser();
        parser.feed(log.as_bytes(), &mut |e| events.push(e));
        let expected = vec![
            LogEvent::Progress(crate::monitor::StepReading {
                step: 250,
                total_steps: Some(2000),
                loss: Some(0.4512),
                learning_rate: Some(1e-4),
                seconds_per_step: Some(1.25),
                trainer_eta_seconds: Some(36 * 60 + 27),
            }),
            LogEvent::SavingStarted { step: Some(250) },
            LogEvent::CheckpointSaved {
                step: Some(250),
                path: Some("output/my_lora/my_lora_000000250.safetensors".into()),
            },
            LogEvent::SamplingStarted { step: Some(250) },
            LogEvent::Completed { path: Some("output/my_lora/my_lora.safetensors".into()) },
        ];
        assert_eq!(events, expected);
    }
}
