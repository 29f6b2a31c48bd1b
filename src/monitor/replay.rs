//! Replays a saved log as the monitor would have seen it: fed in the chunks the timestamps
//! sidecar describes, one reading and one stall verdict per poll. Used by `gpu-trainer parse-log`
//! and by the fixture tests, so both judge logs exactly like the live monitor.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::errors::ClassifiedError;
use super::events::LogEvent;
use super::parser::ParserKind;
use super::progress::{LoggedCheckpoint, ProgressSnapshot, ProgressTracker};
use super::stall::{Confidence, Recommendation, StallAssessment, StallSettings, assess_stall};
use super::timestamps::Poll;

/// What the monitor makes of a saved log.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogReport {
    pub parser: &'static str,
    pub bytes: u64,
    pub final_progress: ProgressSnapshot,
    /// Redraws of the training bar seen (they are not listed one by one).
    pub progress_updates: u64,
    /// Every other event, in log order.
    pub events: Vec<LogEvent>,
    pub errors: Vec<ClassifiedError>,
    pub checkpoints: Vec<LoggedCheckpoint>,
    pub samples_started: u64,
    /// Present when the log was replayed with timestamps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall: Option<StallReport>,
}

/// The stall verdicts, poll by poll.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StallReport {
    pub polls: Vec<PollVerdict>,
    /// Index (0-based) of the first poll that flagged a stall.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_flagged_poll: Option<usize>,
    /// Index of the first poll that recommended stopping the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_stop_poll: Option<usize>,
    #[serde(rename = "final")]
    pub last: StallAssessment,
}

/// One poll's verdict, short enough to print hundreds of.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PollVerdict {
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    pub paused: bool,
    pub stalling: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<Confidence>,
    pub recommendation: Recommendation,
    /// A stall flagged at an earlier poll cleared up at this one.
    pub recovered: bool,
    pub reason: String,
}

/// Replays `log`. Without polls the whole log is read at once and no stall analysis is made.
pub fn replay(
    log: &[u8],
    kind: ParserKind,
    polls: Option<&[Poll]>,
    settings: &StallSettings,
    start: DateTime<Utc>,
) -> LogReport {
    let mut parser = kind.parser();
    let mut tracker = ProgressTracker::new(settings.reading_interval);
    let mut events = Vec::new();
    let mut progress_updates = 0u64;
    let mut take = |event: LogEvent, tracker: &mut ProgressTracker| {
        tracker.apply(&event);
        match event {
            LogEvent::Progress(_) => progress_updates += 1,
            other => events.push(other),
        }
    };

    let mut stall = None;
    let mut fed = 0usize;
    if let Some(polls) = polls {
        let mut verdicts = Vec::with_capacity(polls.len());
        let mut flagged_since = None;
        let mut last = None;
        for poll in polls {
            let end = (poll.offset as usize).min(log.len()).max(fed);
            parser.feed(&log[fed..end], &mut |e| take(e, &mut tracker));
            fed = end;
            let now = start + Duration::milliseconds((poll.seconds * 1000.0).round() as i64);
            let observation = tracker.observe(now, parser.live().as_ref());
            let verdict =
                assess_stall(&tracker.history(), tracker.last_progress_at(), flagged_since, settings, now);
            flagged_since = verdict.flagged_since;
            verdicts.push(PollVerdict {
                seconds: poll.seconds,
                step: observation.as_ref().map(|o| o.step),
                eta_seconds: observation.as_ref().and_then(|o| o.eta_seconds),
                paused: observation.as_ref().is_some_and(|o| o.paused),
                stalling: verdict.stalling,
                confidence: verdict.confidence,
                recommendation: verdict.recommendation,
                recovered: verdict.recovered,
                reason: verdict.reason.clone(),
            });
            last = Some(verdict);
        }
        if let Some(last) = last {
            stall = Some(StallReport {
                first_flagged_poll: verdicts.iter().position(|v| v.stalling),
                first_stop_poll: verdicts.iter().position(|v| v.recommendation == Recommendation::StopJob),
                polls: verdicts,
                last,
            });
        }
    }
    parser.feed(&log[fed..], &mut |e| take(e, &mut tracker));
    parser.finish(&mut |e| take(e, &mut tracker));
    if polls.is_none() {
        tracker.observe(start, None);
    }
    LogReport {
        parser: kind.name(),
        bytes: log.len() as u64,
        final_progress: tracker.snapshot(),
        progress_updates,
        errors: tracker.errors().to_vec(),
        checkpoints: tracker.checkpoints().to_vec(),
        samples_started: tracker.samples_started(),
        events,
        stall,
    }
}
