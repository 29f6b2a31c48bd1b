//! Turns timestamped parser events into progress: the latest step, our own ETA, the phase
//! (training or paused for a save or samples) and the reading history the stall detector judges.
//!
//! The trainer's own rate and ETA exclude save and sample time (tqdm's clock is paused while
//! ai-toolkit saves, and kohya calls `unpause()`), so the monitor measures wall-clock time
//! between its own readings. Two ETAs come out of that:
//! - the *training* ETA, from the rate over recent intervals without pauses; it falls by about
//!   the time that passes while training is healthy, which is what stall detection checks;
//! - the reported ETA, from the wall-clock rate over the last [`REPORT_WINDOW`] readings,
//!   pauses included, which is what a person planning around the job wants.

use std::collections::VecDeque;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::errors::ClassifiedError;
use super::events::{LogEvent, StepReading};
use super::stall::Observation;
use crate::api::{ProgressStatus, to_k8s_time};

/// Readings kept for stall detection and rates (a day at the default 60 s poll).
pub const HISTORY_LIMIT: usize = 1440;
/// Intervals the training ETA looks back over, and how many of them must be free of pauses for
/// the pause-free rate to be used; runs that pause in nearly every interval use all of them.
const TRAINING_RATE_LOOKBACK: usize = 6;
const MIN_CLEAN_INTERVALS: usize = 2;
const ALL_INTERVALS_FALLBACK: usize = 3;
/// Readings the reported rate and ETA are measured over.
pub const REPORT_WINDOW: usize = 30;
/// Errors and checkpoints kept (the first ones explain a failure best, the rest are repeats).
const EVENT_LIMIT: usize = 200;

/// What the monitor currently knows about the training progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressSnapshot {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// From the counts, never from the printed percentage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Observed wall-clock steps per second, pauses included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_per_second: Option<f64>,
    /// Our ETA at the observed wall-clock rate, pauses included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Our ETA at the training rate, pauses excluded (the one stall detection uses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_eta_seconds: Option<f64>,
    /// The trainer's own ETA, shown alongside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trainer_eta_seconds: Option<u64>,
    /// When the step last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<DateTime<Utc>>,
    pub paused: bool,
    /// The trainer printed its completion marker.
    pub completion_marker: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
}

impl ProgressSnapshot {
    /// `status.progress` of the TrainingJob: our wall-clock rate and ETA (pauses included), the
    /// percentage from the counts. `None` before the first training step is seen.
    pub fn to_status(&self) -> Option<ProgressStatus> {
        let step = self.step?;
        let mut status = ProgressStatus {
            loss: self.loss.filter(|l| l.is_finite()),
            steps_per_second: self.steps_per_second,
            eta_seconds: self.eta_seconds.map(|s| s.round() as i64),
            last_update_time: self.last_update_time.map(to_k8s_time),
            ..ProgressStatus::default()
        };
        status.set_step(step, self.total_steps);
        Some(status)
    }
}

/// A checkpoint the log announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggedCheckpoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Accumulates events between polls, and keeps a reading for stall detection whenever
/// `reading_interval` has passed since the last one.
#[derive(Debug, Default)]
pub struct ProgressTracker {
    reading_interval: Duration,
    latest: Option<StepReading>,
    announced_total: Option<u64>,
    resumed_from: Option<u64>,
    in_pause: bool,
    paused_since_last_reading: bool,
    paused_at_last_reading: bool,
    completion_marker: bool,
    started_at: Option<DateTime<Utc>>,
    last_seen_step: Option<u64>,
    last_step_change_at: Option<DateTime<Utc>>,
    history: VecDeque<Observation>,
    checkpoints: Vec<LoggedCheckpoint>,
    samples_started: u64,
    errors: Vec<ClassifiedError>,
}

impl ProgressTracker {
    /// `reading_interval`: the spacing of the readings kept for stall detection (see
    /// [`super::stall::StallSettings::reading_interval`]).
    pub fn new(reading_interval: Duration) -> Self {
        Self { reading_interval, ..Self::default() }
    }

    /// Carries over what an earlier monitor of the same run saw (kept in the job's status): the
    /// step and when it last changed. A reading at the same step then continues the no-progress
    /// clock instead of starting it again.
    pub fn remember_step(&mut self, step: u64, changed_at: DateTime<Utc>) {
        self.last_seen_step = Some(step);
        self.last_step_change_at = Some(changed_at);
    }

    /// Takes in one event read since the last reading.
    pub fn apply(&mut self, event: &LogEvent) {
        if event.starts_pause() {
            self.in_pause = true;
            self.paused_since_last_reading = true;
        }
        match event {
            LogEvent::Progress(reading) => {
                // A redraw after a save means training resumed; the redraw of the same step
                // right after the save marker does not, or every save would look instant.
                let advanced = self.latest.as_ref().is_none_or(|l| reading.step != l.step);
                if advanced {
                    self.in_pause = false;
                }
                self.latest = Some(reading.clone());
            }
            LogEvent::TotalSteps { total } => self.announced_total = Some(*total),
            LogEvent::Resumed { step } => self.resumed_from = Some(*step),
            LogEvent::CheckpointSaved { step, path } => {
                push_bounded(&mut self.checkpoints, LoggedCheckpoint { step: *step, path: path.clone() })
            }
            LogEvent::SamplingStarted { .. } => self.samples_started += 1,
            LogEvent::SavingStarted { .. } => {}
            LogEvent::Completed { .. } => self.completion_marker = true,
            LogEvent::Error(error) => push_bounded(&mut self.errors, error.clone()),
        }
    }

    /// Looks at the progress at poll time `now`; `live` is the unterminated bar state, newer than
    /// any committed event. Returns the reading for this poll; it joins the stall history only
    /// when the reading interval has passed since the last one kept.
    pub fn observe(&mut self, now: DateTime<Utc>, live: Option<&StepReading>) -> Option<Observation> {
        self.started_at.get_or_insert(now);
        if let Some(live) = live {
            if self.latest.as_ref().is_none_or(|l| live.step != l.step) {
                self.in_pause = false;
            }
            self.latest = Some(live.clone());
        }
        let reading = self.latest.as_ref()?;
        let step = reading.step;
        let total_steps = reading.total_steps.or(self.announced_total);
        if self.last_seen_step != Some(step) {
            self.last_seen_step = Some(step);
            self.last_step_change_at = Some(now);
        }
        // The interval counts as paused if the pause was under way at either end or began and
        // ended inside it.
        let paused = self.in_pause || self.paused_since_last_reading || self.paused_at_last_reading;
        let mut observation = Observation { at: now, step, total_steps, eta_seconds: None, paused };
        observation.eta_seconds = self
            .training_seconds_per_step(&observation)
            .zip(remaining(step, total_steps))
            .map(|(s, left)| left * s);
        let due = self.history.back().is_none_or(|last| now - last.at >= self.reading_interval);
        if due {
            self.paused_since_last_reading = false;
            self.paused_at_last_reading = self.in_pause;
            if self.history.len() == HISTORY_LIMIT {
                self.history.pop_front();
            }
            self.history.push_back(observation.clone());
        }
        Some(observation)
    }

    /// Seconds per step over recent intervals ending with `next`: those without pauses when
    /// there are enough of them (so an isolated long save does not move the ETA), otherwise all
    /// of the last few (a run that saves in every interval is judged with its pauses included).
    fn training_seconds_per_step(&self, next: &Observation) -> Option<f64> {
        let mut intervals = Vec::with_capacity(TRAINING_RATE_LOOKBACK);
        let mut later = next;
        for earlier in self.history.iter().rev().take(TRAINING_RATE_LOOKBACK) {
            let seconds = (later.at - earlier.at).num_milliseconds().max(0) as f64 / 1000.0;
            intervals.push((seconds, later.step.saturating_sub(earlier.step), later.paused));
            later = earlier;
        }
        let clean: Vec<_> = intervals.iter().filter(|(_, _, paused)| !paused).collect();
        let chosen: Vec<_> = if clean.len() >= MIN_CLEAN_INTERVALS {
            clean
        } else {
            intervals.iter().take(ALL_INTERVALS_FALLBACK).collect()
        };
        let seconds: f64 = chosen.iter().map(|(s, _, _)| s).sum();
        let steps: u64 = chosen.iter().map(|(_, n, _)| n).sum();
        (steps > 0 && seconds > 0.0).then(|| seconds / steps as f64)
    }

    pub fn history(&self) -> Vec<Observation> {
        self.history.iter().cloned().collect()
    }

    /// When the step last changed, or when monitoring started if no step was seen yet.
    pub fn last_progress_at(&self) -> Option<DateTime<Utc>> {
        self.last_step_change_at.or(self.started_at)
    }

    pub fn checkpoints(&self) -> &[LoggedCheckpoint] {
        &self.checkpoints
    }

    pub fn errors(&self) -> &[ClassifiedError] {
        &self.errors
    }

    pub fn samples_started(&self) -> u64 {
        self.samples_started
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let Some(reading) = &self.latest else {
            return ProgressSnapshot { paused: self.in_pause, ..ProgressSnapshot::default() };
        };
        let total_steps = reading.total_steps.or(self.announced_total);
        let step_reading = StepReading { total_steps, ..reading.clone() };
        let recent: Vec<&Observation> = self.history.iter().rev().take(REPORT_WINDOW).collect();
        let steps_per_second = match (recent.last(), recent.first()) {
            (Some(oldest), Some(newest)) if newest.at > oldest.at && newest.step > oldest.step => {
                let seconds = (newest.at - oldest.at).num_milliseconds() as f64 / 1000.0;
                Some((newest.step - oldest.step) as f64 / seconds)
            }
            _ => None,
        };
        ProgressSnapshot {
            step: Some(reading.step),
            total_steps,
            percent: step_reading.percent(),
            loss: reading.loss,
            learning_rate: reading.learning_rate,
            steps_per_second,
            eta_seconds: steps_per_second
                .zip(remaining(reading.step, total_steps))
                .map(|(rate, left)| left / rate),
            training_eta_seconds: self.history.back().and_then(|o| o.eta_seconds),
            trainer_eta_seconds: reading.trainer_eta_seconds,
            last_update_time: self.last_step_change_at,
            paused: self.in_pause,
            completion_marker: self.completion_marker,
            resumed_from_step: self.resumed_from,
        }
    }
}

/// Steps left; unknown without a total (an ETA of 0 would look like perfect convergence).
fn remaining(step: u64, total: Option<u64>) -> Option<f64> {
    total.map(|t| t.saturating_sub(step) as f64)
}

fn push_bounded<T>(items: &mut Vec<T>, item: T) {
    if items.len() < EVENT_LIMIT {
        items.push(item);
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn reading(step: u64) -> LogEvent {
        LogEvent::Progress(StepReading {
            step,
            total_steps: Some(1000),
            loss: Some(0.1),
            learning_rate: None,
            seconds_per_step: Some(0.5),
            trainer_eta_seconds: Some(1),
        })
    }

    #[test]
    fn our_eta_comes_from_the_wall_clock_not_the_trainer() {
        let t0 = DateTime::parse_from_rfc3339("2026-11-23T06:00:00Z").unwrap().with_timezone(&Utc);
        let mut tracker = ProgressTracker::new(Duration::seconds(60));
        for i in 0..4u64 {
            tracker.apply(&reading(i * 60));
            tracker.observe(t0 + Duration::seconds(60 * i as i64), None);
        }
        // One step per second observed, whatever the trainer claims.
        let snap = tracker.snapshot();
        assert_eq!(snap.step, Some(180));
        assert_eq!(snap.training_eta_seconds, Some(820.0));
        assert_eq!(snap.eta_seconds, Some(820.0));
        assert_eq!(snap.trainer_eta_seconds, Some(1));
        assert_eq!(snap.percent, Some(18.0));
        let status = snap.to_status().unwrap();
        assert_eq!(
            (status.step, status.total_steps, status.percent_text.as_deref()),
            (180, Some(1000), Some("18%"))
        );
        assert_eq!((status.eta_seconds, status.steps_per_second), (Some(820), Some(1.0)));
        assert!(ProgressTracker::new(Duration::seconds(60)).snapshot().to_status().is_none());
    }

    #[test]
    fn readings_join_the_history_only_at_the_reading_interval() {
        let t0 = DateTime::parse_from_rfc3339("2026-11-23T06:00:00Z").unwrap().with_timezone(&Utc);
        let mut tracker = ProgressTracker::new(Duration::seconds(300));
        for i in 0..11i64 {
            tracker.apply(&reading(i as u64 * 60));
            tracker.observe(t0 + Duration::seconds(60 * i), None);
        }
        let kept: Vec<u64> = tracker.history().iter().map(|o| o.step).collect();
        assert_eq!(kept, vec![0, 300, 600]);
        assert_eq!(tracker.last_progress_at(), Some(t0 + Duration::seconds(600)));
    }

    #[test]
    fn without_a_total_there_is_no_eta() {
        let t0 = DateTime::parse_from_rfc3339("2026-11-23T06:00:00Z").unwrap().with_timezone(&Utc);
        let mut tracker = ProgressTracker::new(Duration::seconds(60));
        for i in 0..4u64 {
            tracker.apply(&LogEvent::Progress(StepReading {
                step: i * 60,
                total_steps: None,
                loss: None,
                learning_rate: None,
                seconds_per_step: None,
                trainer_eta_seconds: None,
            }));
            assert_eq!(
                tracker.observe(t0 + Duration::seconds(60 * i as i64), None).unwrap().eta_seconds,
                None
            );
        }
        assert_eq!((tracker.snapshot().eta_seconds, tracker.snapshot().steps_per_second), (None, Some(1.0)));
    }

    #[test]
    fn a_save_marks_the_reading_paused_until_the_step_moves() {
        let t0 = DateTime::parse_from_rfc3339("2026-11-23T06:00:00Z").unwrap().with_timezone(&Utc);
        let mut tracker = ProgressTracker::new(Duration::seconds(60));
        tracker.apply(&reading(10));
        tracker.apply(&LogEvent::CheckpointSaved { step: Some(10), path: None });
        tracker.apply(&reading(10));
        assert!(tracker.observe(t0, None).unwrap().paused);
        assert!(tracker.observe(t0 + Duration::seconds(60), None).unwrap().paused);
        tracker.apply(&reading(11));
        assert!(
            tracker.observe(t0 + Duration::seconds(120), None).unwrap().paused,
            "the interval held the pause"
        );
        assert!(!tracker.observe(t0 + Duration::seconds(180), None).unwrap().paused);
    }
}
