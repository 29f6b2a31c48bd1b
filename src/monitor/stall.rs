//! Stall detection, the approved design (issue 6). A plain "no progress for 10 minutes" rule is
//! wrong: checkpointing and sampling legitimately pause training, and training can slow down
//! without stopping. So the detector looks at the trend of readings taken at each poll:
//!
//! - **ETA not converging**: with at least `minSamples` readings, over the last three readings
//!   the ETA fell by less than `etaConvergenceThreshold` (default 50%) of the time that passed.
//!   A healthy run's ETA falls by about the wall-clock time that passes.
//! - **Speed dropped**: steps per second over the same three readings is more than
//!   `speedDropThreshold` (default 50%) below the peak of any earlier three-reading window.
//!
//! One signal gives medium confidence, both give high. No progress at all for
//! `noProgressTimeoutSeconds` is a stall by itself (high confidence, stop now). After a stall is
//! flagged, `gracePeriodSeconds` (default 15 min) lets training recover before the job is stopped;
//! a reading without either signal clears the flag.
//!
//! Readings are kept every five minutes (or every poll, if polls are further apart): the
//! issue's example judges half an hour, and over a few minutes the noise of counting whole steps
//! is larger than the time that passes.
//!
//! Pauses: an interval during which the trainer saved a checkpoint or generated samples (the
//! observation is `paused`) counts only the time its steps would have taken at the peak rate,
//! so a long save does not look like a slowdown. A pause that never ends is caught by the
//! no-progress timeout. Everything here is pure and takes `now`.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::api::MonitoringSpec;

/// One reading of the training bar, taken by the monitor at a poll.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub at: DateTime<Utc>,
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Our own ETA from the observed training rate (pauses excluded), in seconds; `None` when
    /// no step was made recently.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// A checkpoint save or sampling happened in the interval that ends with this reading.
    pub paused: bool,
}

/// The stall settings of a job, with durations.
#[derive(Clone, Debug, PartialEq)]
pub struct StallSettings {
    pub enabled: bool,
    pub min_samples: usize,
    pub eta_convergence_threshold: f64,
    pub speed_drop_threshold: f64,
    pub grace_period: Duration,
    pub no_progress_timeout: Duration,
    /// Spacing of the readings the trend is judged on: the poll interval, but at least
    /// [`MIN_READING_INTERVAL_SECONDS`], so that over three readings a healthy ETA falls by more
    /// than the noise of measuring a rate from whole steps.
    pub reading_interval: Duration,
}

/// Five minutes: with a step every few seconds and several hours to go, a rate measured over
/// shorter spans moves the ETA by more than the time that passes.
pub const MIN_READING_INTERVAL_SECONDS: i64 = 300;

impl StallSettings {
    pub fn from_spec(spec: &MonitoringSpec) -> Self {
        let stall = &spec.stall_detection;
        Self {
            enabled: stall.enabled,
            // Three readings make the window; fewer could never be judged.
            min_samples: (stall.min_samples as usize).max(3),
            eta_convergence_threshold: stall.eta_convergence_threshold,
            speed_drop_threshold: stall.speed_drop_threshold,
            grace_period: Duration::seconds(i64::from(stall.grace_period_seconds)),
            no_progress_timeout: Duration::seconds(i64::from(spec.no_progress_timeout_seconds)),
            reading_interval: Duration::seconds(
                i64::from(spec.poll_interval_seconds).max(MIN_READING_INTERVAL_SECONDS),
            ),
        }
    }
}

impl Default for StallSettings {
    fn default() -> Self {
        Self::from_spec(&MonitoringSpec::default())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Confidence {
    Medium,
    High,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Recommendation {
    /// Nothing to do.
    Continue,
    /// Flagged: give training until `stopAt` to recover.
    WaitForRecovery,
    /// Stop the job (keep the latest checkpoint).
    StopJob,
}

/// The verdict of one poll.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StallAssessment {
    pub stalling: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<Confidence>,
    /// One line for people.
    pub reason: String,
    pub recommendation: Recommendation,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    pub eta_not_converging: bool,
    pub speed_dropped: bool,
    pub no_progress: bool,
    /// When the current stall was first flagged; carry it to the next call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flagged_since: Option<DateTime<Utc>>,
    /// When the job should be stopped unless training recovers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_at: Option<DateTime<Utc>>,
    /// A stall flagged earlier cleared up with this reading.
    pub recovered: bool,
}

/// Judges the readings so far. `last_progress_at` is when the step last changed (or when
/// monitoring started, if no step was ever seen); `flagged_since` is the previous verdict's.
pub fn assess_stall(
    history: &[Observation],
    last_progress_at: Option<DateTime<Utc>>,
    flagged_since: Option<DateTime<Utc>>,
    settings: &StallSettings,
    now: DateTime<Utc>,
) -> StallAssessment {
    let current = history.last();
    let mut verdict = StallAssessment {
        stalling: false,
        confidence: None,
        reason: String::new(),
        recommendation: Recommendation::Continue,
        current_step: current.map(|o| o.step),
        total_steps: current.and_then(|o| o.total_steps),
        eta_not_converging: false,
        speed_dropped: false,
        no_progress: false,
        flagged_since: None,
        stop_at: None,
        recovered: false,
    };
    if let Some(o) = current
        && o.total_steps.is_some_and(|t| o.step >= t)
    {
        verdict.reason = "training reached its last step; finalising".into();
        verdict.recovered = flagged_since.is_some();
        return verdict;
    }

    let mut reasons = Vec::new();
    if let Some(since) = last_progress_at
        && now - since >= settings.no_progress_timeout
    {
        verdict.no_progress = true;
        let step =
            current.map_or_else(|| "no step seen yet".to_owned(), |o| format!("still at step {}", o.step));
        reasons
            .push(format!("no progress for {} ({step})", human_duration((now - since).num_seconds() as f64)));
    }

    if settings.enabled && history.len() >= settings.min_samples {
        let window = Window::last(history);
        if let Some(window) = window.filter(|w| w.effective_seconds >= 1.0) {
            if let Some(reason) = eta_signal(&window, settings) {
                verdict.eta_not_converging = true;
                reasons.push(reason);
            }
            if let Some(reason) = speed_signal(history, &window, settings) {
                verdict.speed_dropped = true;
                reasons.push(reason);
            }
        }
    }

    if let Some(since) = flagged_since
        && settings.enabled
        && history.len() < settings.min_samples
        && !verdict.no_progress
    {
        // A stall flagged before a restart of the monitor: too few readings yet to say whether
        // it recovered. The flag stands (no false recovery, no new grace period) and the job is
        // not stopped without readings that confirm it.
        verdict.stalling = true;
        verdict.confidence = Some(Confidence::Medium);
        verdict.flagged_since = Some(since);
        verdict.stop_at = Some((since + settings.grace_period).max(now));
        verdict.recommendation = Recommendation::WaitForRecovery;
        verdict.reason = format!(
            "stall flagged {} ago; judging it again once {} readings are taken ({} so far)",
            human_duration((now - since).num_seconds().max(0) as f64),
            settings.min_samples,
            history.len()
        );
        return verdict;
    }
    let signals = usize::from(verdict.eta_not_converging) + usize::from(verdict.speed_dropped);
    if !verdict.no_progress && signals == 0 {
        verdict.recovered = flagged_since.is_some();
        verdict.reason = healthy_reason(history, verdict.recovered);
        return verdict;
    }
    verdict.stalling = true;
    verdict.confidence =
        Some(if verdict.no_progress || signals == 2 { Confidence::High } else { Confidence::Medium });
    let since = flagged_since.unwrap_or(now);
    verdict.flagged_since = Some(since);
    if verdict.no_progress {
        verdict.recommendation = Recommendation::StopJob;
        verdict.stop_at = Some(now);
    } else {
        let stop_at = since + settings.grace_period;
        verdict.stop_at = Some(stop_at);
        verdict.recommendation =
            if now >= stop_at { Recommendation::StopJob } else { Recommendation::WaitForRecovery };
    }
    verdict.reason = reasons.join("; ");
    verdict
}

/// The last three readings, with the time that counts (pauses discounted).
struct Window<'a> {
    first: &'a Observation,
    last: &'a Observation,
    wall_seconds: f64,
    effective_seconds: f64,
}

impl<'a> Window<'a> {
    fn last(history: &'a [Observation]) -> Option<Self> {
        Self::ending_at(history, history.len().checked_sub(1)?, peak_interval_speed(history))
    }

    fn ending_at(history: &'a [Observation], end: usize, peak: Option<f64>) -> Option<Self> {
        let start = end.checked_sub(2)?;
        let effective_seconds =
            (start + 1..=end).map(|i| effective_seconds(&history[i - 1], &history[i], peak)).sum();
        Some(Self {
            first: &history[start],
            last: &history[end],
            wall_seconds: seconds_between(&history[start], &history[end]),
            effective_seconds,
        })
    }

    fn steps(&self) -> u64 {
        self.last.step.saturating_sub(self.first.step)
    }

    fn speed(&self) -> f64 {
        self.steps() as f64 / self.effective_seconds
    }
}

fn seconds_between(a: &Observation, b: &Observation) -> f64 {
    (b.at - a.at).num_milliseconds().max(0) as f64 / 1000.0
}

/// The time an interval counts for: all of it, unless the trainer paused in it, then only the
/// time its steps would have taken at the peak rate.
fn effective_seconds(prev: &Observation, cur: &Observation, peak: Option<f64>) -> f64 {
    let wall = seconds_between(prev, cur);
    if !cur.paused {
        return wall;
    }
    let steps = cur.step.saturating_sub(prev.step) as f64;
    match peak {
        Some(speed) if speed > 0.0 => wall.min(steps / speed),
        _ => 0.0,
    }
}

/// The fastest step rate seen over one interval without a pause (over any interval when every
/// one had a pause, as in runs that save every few dozen steps).
fn peak_interval_speed(history: &[Observation]) -> Option<f64> {
    let any_clean = history.windows(2).any(|pair| !pair[1].paused);
    history
        .windows(2)
        .filter(|pair| !any_clean || !pair[1].paused)
        .filter_map(|pair| {
            let wall = seconds_between(&pair[0], &pair[1]);
            (wall > 0.0).then(|| pair[1].step.saturating_sub(pair[0].step) as f64 / wall)
        })
        .fold(None, |peak: Option<f64>, speed| Some(peak.map_or(speed, |p| p.max(speed))))
}

fn eta_signal(window: &Window<'_>, settings: &StallSettings) -> Option<String> {
    let over = human_duration(window.wall_seconds);
    match (window.first.eta_seconds, window.last.eta_seconds) {
        (Some(before), Some(after)) => {
            let fell = before - after;
            if fell >= settings.eta_convergence_threshold * window.effective_seconds {
                return None;
            }
            let trend = if (after - before).abs() <= 0.1 * before.max(1.0) {
                format!("stayed near {}", human_duration(after))
            } else if after > before {
                format!("rose from {} to {}", human_duration(before), human_duration(after))
            } else {
                format!("fell only from {} to {}", human_duration(before), human_duration(after))
            };
            Some(format!("ETA not converging: {trend} over the last {over} despite {} steps", window.steps()))
        }
        // The rate became unknown: no step in the recent readings.
        (Some(before), None) => Some(format!(
            "ETA not converging: was {} and is now unknown, {} steps over the last {over}",
            human_duration(before),
            window.steps()
        )),
        (None, _) => None,
    }
}

fn speed_signal(history: &[Observation], window: &Window<'_>, settings: &StallSettings) -> Option<String> {
    let peak_interval = peak_interval_speed(history);
    let peak = (2..history.len())
        .filter_map(|end| Window::ending_at(history, end, peak_interval))
        .filter(|w| w.effective_seconds >= 1.0)
        .map(|w| w.speed())
        .fold(0.0f64, f64::max);
    if peak <= 0.0 {
        return None;
    }
    let current = window.speed();
    let drop = 1.0 - current / peak;
    (drop > settings.speed_drop_threshold).then(|| {
        format!("speed {current:.3} steps/s is {:.0}% below its peak of {peak:.3} steps/s", drop * 100.0)
    })
}

fn healthy_reason(history: &[Observation], recovered: bool) -> String {
    let prefix = if recovered { "recovered: " } else { "" };
    match history.last().and_then(|o| o.eta_seconds) {
        Some(eta) => format!("{prefix}training progressing, ETA {}", human_duration(eta)),
        None if history.is_empty() => "no training progress seen yet".into(),
        None => format!("{prefix}training progressing"),
    }
}

/// `2h`, `1h 5m`, `30 min`, `45s`: short durations for one-line reasons.
pub fn human_duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    let (hours, minutes, secs) = (seconds / 3600, (seconds % 3600) / 60, seconds % 60);
    match (hours, minutes) {
        (0, 0) => format!("{secs}s"),
        (0, m) => format!("{m} min"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T06:00:00Z").unwrap().with_timezone(&Utc)
    }

    /// Readings every 60 s: (step, eta, paused).
    fn history(points: &[(u64, Option<f64>, bool)]) -> Vec<Observation> {
        points
            .iter()
            .enumerate()
            .map(|(i, (step, eta, paused))| Observation {
                at: t0() + Duration::seconds(60 * i as i64),
                step: *step,
                total_steps: Some(10_000),
                eta_seconds: *eta,
                paused: *paused,
            })
            .collect()
    }

    fn assess(h: &[Observation], flagged: Option<DateTime<Utc>>) -> StallAssessment {
        let now = h.last().unwrap().at;
        assess_stall(h, Some(now), flagged, &StallSettings::default(), now)
    }

    #[test]
    fn a_steadily_converging_run_is_not_stalling() {
        let h = history(&[
            (0, Some(6000.0), false),
            (100, Some(5940.0), false),
            (200, Some(5880.0), false),
            (300, Some(5820.0), false),
        ]);
        let v = assess(&h, None);
        assert!(!v.stalling, "{v:?}");
        assert_eq!(v.recommendation, Recommendation::Continue);
    }

    #[test]
    fn a_flag_carried_over_a_restart_stands_until_readings_judge_it() {
        let settings = StallSettings::default();
        // A new monitor's first readings look fine, but they are too few to judge the trend.
        let fresh = history(&[(500, Some(5000.0), false), (600, Some(4940.0), false)]);
        let now = fresh.last().unwrap().at;
        for flagged in [now - Duration::minutes(5), now - Duration::hours(1)] {
            let v = assess_stall(&fresh, Some(now), Some(flagged), &settings, now);
            assert!(v.stalling && !v.recovered, "no recovery without readings: {v:?}");
            assert_eq!(v.flagged_since, Some(flagged), "the grace period is not started again");
            assert_eq!(v.recommendation, Recommendation::WaitForRecovery, "no stop without readings");
            assert!(
                v.reason.contains("judging it again once 4 readings are taken (2 so far)"),
                "{}",
                v.reason
            );
        }
        // Once there are enough readings the flag is judged: recovered...
        let healthy = history(&[
            (500, Some(5000.0), false),
            (600, Some(4940.0), false),
            (700, Some(4880.0), false),
            (800, Some(4820.0), false),
        ]);
        let now = healthy.last().unwrap().at;
        let v = assess_stall(&healthy, Some(now), Some(now - Duration::hours(1)), &settings, now);
        assert!(!v.stalling && v.recovered, "{v:?}");
        // ...or still stalling, and then stopped at once when the grace period is over.
        let stalled = history(&[
            (500, Some(5000.0), false),
            (600, Some(4940.0), false),
            (700, Some(5000.0), false),
            (800, Some(5100.0), false),
        ]);
        let v = assess_stall(&stalled, Some(now), Some(now - Duration::hours(1)), &settings, now);
        assert_eq!(v.recommendation, Recommendation::StopJob, "{v:?}");
        // A detector switched off meanwhile keeps nothing flagged.
        let off = StallSettings { enabled: false, ..StallSettings::default() };
        let v = assess_stall(&fresh, Some(now), Some(now - Duration::hours(1)), &off, now);
        assert!(!v.stalling && v.recovered, "{v:?}");
    }

    #[test]
    fn too_few_readings_are_never_judged() {
        let h = history(&[(0, Some(6000.0), false), (1, Some(7000.0), false), (1, Some(9000.0), false)]);
        assert!(!assess(&h, None).stalling);
    }

    #[test]
    fn eta_staying_flat_while_steps_trickle_is_a_stall_with_high_confidence_when_speed_dropped() {
        let h = history(&[
            (0, Some(6000.0), false),
            (100, Some(5940.0), false),
            (200, Some(5880.0), false),
            (210, Some(5870.0), false),
            (220, Some(5865.0), false),
        ]);
        let v = assess(&h, None);
        assert!(v.stalling && v.eta_not_converging && v.speed_dropped, "{v:?}");
        assert_eq!(v.confidence, Some(Confidence::High));
        assert_eq!(v.recommendation, Recommendation::WaitForRecovery);
        assert!(
            v.reason
                .starts_with("ETA not converging: stayed near 1h 37m over the last 2 min despite 20 steps"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn eta_rising_at_full_speed_is_medium_confidence() {
        let h = history(&[
            (0, Some(6000.0), false),
            (100, Some(5940.0), false),
            (200, Some(6000.0), false),
            (300, Some(6100.0), false),
        ]);
        let v = assess(&h, None);
        assert!(v.stalling && v.eta_not_converging && !v.speed_dropped, "{v:?}");
        assert_eq!(v.confidence, Some(Confidence::Medium));
    }

    #[test]
    fn a_pause_for_saving_is_not_a_stall() {
        let h = history(&[
            (0, Some(6000.0), false),
            (100, Some(5940.0), false),
            (200, Some(5880.0), false),
            (205, Some(5877.0), true),
            (210, Some(5874.0), true),
        ]);
        assert!(!assess(&h, None).stalling);
    }

    #[test]
    fn the_grace_period_decides_when_to_stop_and_recovery_clears_the_flag() {
        let h = history(&[
            (0, Some(6000.0), false),
            (100, Some(5940.0), false),
            (200, Some(5880.0), false),
            (200, Some(5880.0), false),
            (200, None, false),
        ]);
        let now = h.last().unwrap().at;
        let settings = StallSettings::default();
        let flagged = now - Duration::seconds(100);
        let v = assess_stall(&h, Some(now), Some(flagged), &settings, now);
        assert_eq!((v.recommendation, v.flagged_since), (Recommendation::WaitForRecovery, Some(flagged)));
        let late = now - Duration::seconds(901);
        let v = assess_stall(&h, Some(now), Some(late), &settings, now);
        assert_eq!(v.recommendation, Recommendation::StopJob);

        let recovered = history(&[
            (0, Some(6000.0), false),
            (100, Some(5940.0), false),
            (200, Some(5880.0), false),
            (300, Some(5820.0), false),
            (400, Some(5760.0), false),
        ]);
        let v = assess(&recovered, Some(late));
        assert!(!v.stalling && v.recovered && v.flagged_since.is_none(), "{v:?}");
    }

    #[test]
    fn no_progress_for_the_timeout_is_a_stall_by_itself() {
        let h = history(&[(5, Some(100.0), false)]);
        let now = h[0].at + Duration::seconds(7200);
        let v = assess_stall(&h, Some(h[0].at), None, &StallSettings::default(), now);
        assert!(v.stalling && v.no_progress);
        assert_eq!((v.confidence, v.recommendation), (Some(Confidence::High), Recommendation::StopJob));
        let v = assess_stall(&h, Some(h[0].at), None, &StallSettings::default(), now - Duration::seconds(1));
        assert!(!v.stalling);
    }

    #[test]
    fn a_finished_run_is_never_stalling() {
        let mut h = history(&[
            (9_000, Some(60.0), false),
            (10_000, Some(0.0), false),
            (10_000, None, false),
            (10_000, None, false),
        ]);
        h.iter_mut().for_each(|o| o.total_steps = Some(10_000));
        assert!(!assess(&h, None).stalling);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(7200.0), "2h");
        assert_eq!(human_duration(1800.0), "30 min");
        assert_eq!(human_duration(3900.0), "1h 5m");
        assert_eq!(human_duration(45.0), "45s");
    }
}
