//! A time limit on every reconcile pass. Each remote call has a deadline of its own; this is the
//! backstop that makes "no pass waits for ever" true even for a call someone forgot to bound. A
//! pass past its limit is abandoned (its future dropped, which closes whatever it held open),
//! logged with the object and the step it was in, counted in
//! `gputrainer_reconciles_abandoned_total{controller, step}`, and requeued. Steps are idempotent
//! and resumable from status, so abandoning one loses nothing but time.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

/// Which step a pass is in, readable after the pass was abandoned. Step names are a small
/// closed set of `&'static str` (they become a metric label).
#[derive(Debug)]
pub struct StepTracker {
    step: Mutex<&'static str>,
}

impl StepTracker {
    pub fn new(first: &'static str) -> Self {
        Self { step: Mutex::new(first) }
    }

    /// Marks the start of `step`.
    pub fn enter(&self, step: &'static str) {
        *self.step.lock().unwrap_or_else(|p| p.into_inner()) = step;
    }

    pub fn current(&self) -> &'static str {
        *self.step.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A pass that ran past its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abandoned {
    pub step: &'static str,
    pub after: Duration,
}

/// Runs `pass` for at most `limit`; `Err(Abandoned)` names the step it was in when the limit
/// passed.
pub async fn within<T>(
    limit: Duration,
    tracker: &StepTracker,
    pass: impl Future<Output = T>,
) -> Result<T, Abandoned> {
    tokio::time::timeout(limit, pass).await.map_err(|_| Abandoned { step: tracker.current(), after: limit })
}

/// How long a TrainingJob pass may take: the operator's limit, and never past the job's hard
/// deadline (plus `grace` to stop and save), so a step stuck on a machine cannot carry a job past
/// `activeDeadlineSeconds`. `left` is the time until that deadline (`None`: no deadline). Pure.
pub fn job_pass_limit(operator_limit: Duration, left: Option<Duration>, grace: Duration) -> Duration {
    match left {
        Some(left) => operator_limit.min(left + grace),
        None => operator_limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pass_past_its_limit_is_abandoned_in_the_step_it_was_in() {
        let tracker = StepTracker::new("read");
        let limit = Duration::from_millis(50);
        let pass = async {
            tracker.enter("probe");
            // A remote call that never answers.
            std::future::pending::<()>().await;
        };
        let outcome = within(limit, &tracker, pass).await;
        assert_eq!(outcome, Err(Abandoned { step: "probe", after: limit }));
    }

    #[tokio::test]
    async fn a_pass_within_its_limit_returns_its_result() {
        let tracker = StepTracker::new("read");
        let pass = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            7
        };
        assert_eq!(within(Duration::from_secs(30), &tracker, pass).await, Ok(7));
    }

    #[test]
    fn a_job_pass_never_runs_past_the_jobs_deadline() {
        let hour = Duration::from_secs(3600);
        let grace = Duration::from_secs(60);
        assert_eq!(job_pass_limit(hour, None, grace), hour);
        assert_eq!(job_pass_limit(hour, Some(Duration::from_secs(120)), grace), Duration::from_secs(180));
        assert_eq!(job_pass_limit(hour, Some(Duration::ZERO), grace), grace, "deadline passed: time to stop");
        assert_eq!(job_pass_limit(hour, Some(2 * hour), grace), hour);
    }
}
