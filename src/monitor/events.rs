//! What the parsers report. Parsers never read the clock: the monitor timestamps events when it
//! reads them, because the trainer's own timers skip save and sample time.

use serde::Serialize;

use super::errors::ClassifiedError;

/// One state of the training progress bar, already translated to global steps.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReading {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// The trainer's own rate (smoothed by tqdm, excluding pauses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_per_step: Option<f64>,
    /// The trainer's own remaining time, shown alongside ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trainer_eta_seconds: Option<u64>,
}

impl StepReading {
    /// Percent from the counts, never from the printed (rounded) percentage.
    pub fn percent(&self) -> Option<f64> {
        self.total_steps.filter(|t| *t > 0).map(|t| self.step.min(t) as f64 * 100.0 / t as f64)
    }
}

/// Something the trainer's log says happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum LogEvent {
    /// A redraw of the training bar.
    Progress(StepReading),
    /// The trainer announced its total step count in a banner.
    TotalSteps { total: u64 },
    /// The run resumed from a checkpoint at this global step.
    Resumed { step: u64 },
    /// The trainer started saving a checkpoint (a legitimate pause until the bar moves again).
    SavingStarted {
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
    },
    /// A checkpoint was written (the step is unknown for epoch-named checkpoints).
    CheckpointSaved {
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// The trainer started generating samples or running validation (a legitimate pause).
    SamplingStarted {
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
    },
    /// The trainer's own completion marker (final model saved).
    Completed {
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// A classified error or warning.
    Error(ClassifiedError),
}

impl LogEvent {
    /// Events that mean the trainer is saving or sampling, so slow progress is expected.
    pub fn starts_pause(&self) -> bool {
        matches!(
            self,
            LogEvent::SavingStarted { .. }
                | LogEvent::CheckpointSaved { .. }
                | LogEvent::SamplingStarted { .. }
        )
    }
}
