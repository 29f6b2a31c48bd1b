//! Launching the trainer in the background and following it: environment from the spec (values
//! from Secrets resolved here, passed only to the training process), one launch per machine
//! (a live `train.pid` or an `exit_code` means it is not started again), and polls that turn
//! the monitor's reading into `status.progress`, `status.cost` and a [`TrainingObservation`].

use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::pass::Pass;
use super::session;
use crate::api::{
    ConditionStatus, GpuInstance, Reason, from_k8s_time, is_condition_true, job_condition, set_condition,
    true_condition,
};
use crate::monitor::poller::{EarlierMonitoring, TrainingFiles, TrainingMonitor};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use super::Error;
use crate::api::{CostStatus, ProgressStatus, TrainingJobSpec, TrainingJobStatus, to_k8s_time};
use crate::engine::TrainingObservation;
use crate::monitor::ParserKind;
use crate::monitor::poller::{Outcome, TrainingStatus};
use crate::monitor::stall::Recommendation;
use crate::remote::tool::Parser;

/// The trainer's environment. `Ok(Err(message))` when a referenced Secret or key is missing
/// (the job fails with `SecretNotFound`); values are never logged.
pub async fn resolve_env(
    secrets: &Api<Secret>,
    spec: &TrainingJobSpec,
) -> Result<Result<Vec<(String, String)>, String>, Error> {
    let mut env = Vec::with_capacity(spec.env.len());
    for var in &spec.env {
        if let Some(value) = &var.value {
            env.push((var.name.clone(), value.clone()));
            continue;
        }
        let Some(from) = &var.value_from else { continue };
        let r = &from.secret_key_ref;
        let secret = secrets.get_opt(&r.name).await.map_err(super::kube_err("read a Secret for env"))?;
        let value = secret.and_then(|s| s.data).and_then(|d| d.get(&r.key).map(|v| v.0.clone()));
        match value.map(String::from_utf8) {
            Some(Ok(value)) => env.push((var.name.clone(), value)),
            Some(Err(_)) => {
                return Ok(Err(format!(
                    "spec.env {}: key {} of Secret {} is not UTF-8",
                    var.name, r.key, r.name
                )));
            }
            None => {
                return Ok(Err(format!("spec.env {}: Secret {} has no key {}", var.name, r.name, r.key)));
            }
        }
    }
    Ok(Ok(env))
}

/// The monitor's parser for the tool's log format.
pub fn parser_kind(parser: Parser) -> ParserKind {
    match parser {
        Parser::Tqdm => ParserKind::Tqdm,
        Parser::AiToolkit => ParserKind::AiToolkit,
        Parser::Kohya => ParserKind::Kohya,
        Parser::Diffusers => ParserKind::Diffusers,
    }
}

/// Folds one poll into `status.progress`. Pure. `lastUpdateTime` moves only when the step does,
/// so an unchanged reading writes nothing.
pub fn record_progress(status: &mut TrainingJobStatus, polled: &TrainingStatus, now: DateTime<Utc>) {
    let snapshot = &polled.progress;
    let mut progress: ProgressStatus = status.progress.clone().unwrap_or_default();
    if let Some(step) = snapshot.step {
        if progress.step != step || progress.last_update_time.is_none() {
            progress.last_update_time = Some(to_k8s_time(now));
        }
        progress.set_step(step, snapshot.total_steps.or(progress.total_steps));
    }
    progress.loss = snapshot.loss.or(progress.loss);
    progress.steps_per_second = snapshot.steps_per_second.map(round3);
    progress.eta_seconds = snapshot.eta_seconds.map(|e| e.round() as i64);
    status.progress = Some(progress);
}

/// What the status keeps of the monitoring of the run on the current machine, so a monitor
/// rebuilt after an operator restart continues the no-progress clock and a flagged stall's
/// grace period instead of starting both again. Only what happened since training started on
/// this machine counts (the `Training` condition's transition). Pure.
pub fn earlier_monitoring(status: &TrainingJobStatus) -> EarlierMonitoring {
    let Some(training) = true_condition(&status.conditions, job_condition::TRAINING) else {
        return EarlierMonitoring::default();
    };
    let launched = from_k8s_time(&training.last_transition_time);
    let step = status.progress.as_ref().map(|p| {
        let changed = p.last_update_time.as_ref().map(from_k8s_time).unwrap_or(launched);
        (p.step, changed.max(launched))
    });
    let stall_flagged_since = true_condition(&status.conditions, job_condition::STALLED)
        .map(|c| from_k8s_time(&c.last_transition_time))
        .filter(|since| *since >= launched);
    EarlierMonitoring { step, stall_flagged_since }
}

/// What one poll means for the engine. Pure.
pub fn observation(polled: &TrainingStatus) -> TrainingObservation {
    match (&polled.outcome, polled.stall.recommendation) {
        (Some(Outcome::Succeeded), _) => TrainingObservation::Finished,
        (Some(Outcome::Failed { reason, message }), _) => {
            TrainingObservation::Crashed { reason: *reason, message: message.clone() }
        }
        (None, Recommendation::StopJob) => {
            TrainingObservation::Stalled { message: polled.stall.reason.clone() }
        }
        (None, _) => TrainingObservation::Running,
    }
}

/// The job's cost: `prior` (its earlier machines) plus the current machine since it was rented,
/// and the expected total at the current ETA. Pure.
pub fn cost(
    price_per_hour: Option<f64>,
    launched_at: Option<DateTime<Utc>>,
    eta_seconds: Option<i64>,
    prior: f64,
    previous: Option<&CostStatus>,
    now: DateTime<Utc>,
) -> Option<CostStatus> {
    let price = price_per_hour?;
    let hours = launched_at.map(|t| (now - t).num_milliseconds().max(0) as f64 / 3_600_000.0).unwrap_or(0.0);
    // Never report less than before: the clock of a restarted operator may differ slightly.
    let accrued = round4((prior + price * hours).max(previous.map(|c| c.accrued).unwrap_or(0.0)));
    let estimated_total = eta_seconds.map(|eta| round4(accrued + price * eta.max(0) as f64 / 3600.0));
    Some(CostStatus { price_per_hour: Some(price), accrued, estimated_total })
}

/// Machine time whose cost is worth a status write of its own. The accrued cost grows at every
/// poll; written each time, an idle job would patch its status every poll. A write that changes
/// nothing but the accrued cost is skipped until the cost has grown by this much machine time;
/// any other change writes the current cost with it.
pub const COST_REFRESH_SECONDS: f64 = 600.0;

/// True when `after` differs from `before` only in a cost that accrued by less than
/// [`COST_REFRESH_SECONDS`] of the same hourly price (so the write can wait). Pure.
pub fn only_cost_accrued(before: &TrainingJobStatus, after: &TrainingJobStatus) -> bool {
    let (Some(was), Some(now)) = (&before.cost, &after.cost) else { return false };
    if was.price_per_hour != now.price_per_hour {
        return false;
    }
    let mut rest = after.clone();
    rest.cost = before.cost.clone();
    if &rest != before {
        return false;
    }
    let grown = now.accrued - was.accrued;
    let price = now.price_per_hour.unwrap_or(0.0);
    (0.0..price * COST_REFRESH_SECONDS / 3600.0).contains(&grown)
}

/// Condition raised when `softDeadlineSeconds` passes (a warning; the job keeps running).
pub const SOFT_DEADLINE_CONDITION: &str = "SoftDeadlineExceeded";

/// True when the soft deadline has passed since the job started. Pure.
pub fn soft_deadline_passed(spec: &TrainingJobSpec, status: &TrainingJobStatus, now: DateTime<Utc>) -> bool {
    let (Some(limit), Some(started)) = (spec.soft_deadline_seconds, status.start_time.as_ref()) else {
        return false;
    };
    (now - crate::api::from_k8s_time(started)).num_seconds() >= limit
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

impl Pass<'_> {
    /// One poll: progress, stall condition and events, and what the engine should make of it.
    pub(super) async fn poll(
        &mut self,
        runtime: &mut session::JobRuntime,
        exec: &dyn crate::remote::RemoteExec,
        instance: Option<&GpuInstance>,
    ) -> Result<TrainingObservation, Error> {
        let instance_name = instance.map(|i| i.name_any()).unwrap_or_default();
        if runtime.monitor.as_ref().is_none_or(|(n, _)| *n != instance_name) {
            let monitor = TrainingMonitor::new(
                TrainingFiles::in_work_dir(self.layout.work_dir()),
                parser_kind(self.tool.parser),
                &self.job.spec.monitoring,
            )
            .resume_from(&earlier_monitoring(&self.status));
            runtime.monitor = Some((instance_name, monitor));
        }
        let Some((_, monitor)) = runtime.monitor.as_mut() else { return Ok(TrainingObservation::Unknown) };
        let now = Utc::now();
        let polled = monitor.poll(exec, now).await.map_err(Box::new)?;
        record_progress(&mut self.status, &polled, now);
        let stalled = is_condition_true(&self.status.conditions, job_condition::STALLED);
        match polled.stall.recommendation {
            Recommendation::WaitForRecovery | Recommendation::StopJob if !stalled => {
                set_condition(
                    &mut self.status.conditions,
                    job_condition::STALLED,
                    ConditionStatus::True,
                    Reason::Stalled,
                    &polled.stall.reason,
                    None,
                    now,
                );
                self.ctrl.ctx.metrics.stalls_detected.inc();
                self.event(EventType::Warning, Reason::Stalled, "Monitor", &polled.stall.reason).await;
                self.notify(crate::artifacts::notify::EventKind::StallDetected, &polled.stall.reason).await;
            }
            Recommendation::Continue if stalled => {
                set_condition(
                    &mut self.status.conditions,
                    job_condition::STALLED,
                    ConditionStatus::False,
                    Reason::Recovered,
                    &polled.stall.reason,
                    None,
                    now,
                );
                self.event(EventType::Normal, Reason::Recovered, "Monitor", &polled.stall.reason).await;
            }
            _ => {}
        }
        Ok(observation(&polled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn condition(status: &mut TrainingJobStatus, type_: &str, value: ConditionStatus, at_: DateTime<Utc>) {
        set_condition(&mut status.conditions, type_, value, Reason::Training, "m", None, at_);
    }

    #[test]
    fn the_monitoring_memory_is_taken_from_the_run_on_the_current_machine() {
        let mut status = TrainingJobStatus::default();
        assert_eq!(earlier_monitoring(&status), EarlierMonitoring::default(), "nothing launched yet");
        // Training launched at 100; step 40 last changed at 500; a stall flagged at 700.
        condition(&mut status, job_condition::TRAINING, ConditionStatus::True, at(100));
        let mut progress = ProgressStatus::default();
        progress.set_step(40, Some(100));
        progress.last_update_time = Some(to_k8s_time(at(500)));
        status.progress = Some(progress);
        condition(&mut status, job_condition::STALLED, ConditionStatus::True, at(700));
        assert_eq!(
            earlier_monitoring(&status),
            EarlierMonitoring { step: Some((40, at(500))), stall_flagged_since: Some(at(700)) }
        );
        // On a replacement machine launched at 900, the step and flag of the earlier machine
        // do not count against the new run: its clock starts at its launch.
        condition(&mut status, job_condition::TRAINING, ConditionStatus::False, at(800));
        condition(&mut status, job_condition::TRAINING, ConditionStatus::True, at(900));
        assert_eq!(
            earlier_monitoring(&status),
            EarlierMonitoring { step: Some((40, at(900))), stall_flagged_since: None }
        );
        // A stall that cleared is not carried.
        condition(&mut status, job_condition::STALLED, ConditionStatus::False, at(1000));
        assert_eq!(earlier_monitoring(&status).stall_flagged_since, None);
    }

    #[test]
    fn cost_accrues_from_the_rent_time_and_estimates_the_rest() {
        let c = cost(Some(0.36), Some(at(0)), Some(1800), 0.0, None, at(3600)).unwrap();
        assert_eq!(c.accrued, 0.36);
        assert_eq!(c.estimated_total, Some(0.54));
        assert_eq!(cost(None, Some(at(0)), None, 0.0, None, at(10)), None);
    }

    #[test]
    fn the_soft_deadline_counts_from_the_start() {
        let spec: TrainingJobSpec = serde_json::from_value(serde_json::json!({
            "tool": "demo@1", "dataset": {"url": {"href": "http://x/d.tar"}}, "softDeadlineSeconds": 600
        }))
        .unwrap();
        let mut status = TrainingJobStatus::default();
        assert!(!soft_deadline_passed(&spec, &status, at(10_000)));
        status.start_time = Some(to_k8s_time(at(0)));
        assert!(!soft_deadline_passed(&spec, &status, at(599)));
        assert!(soft_deadline_passed(&spec, &status, at(600)));
    }

    #[test]
    fn a_status_that_only_accrued_cost_is_written_every_ten_minutes_of_machine_time() {
        let before = TrainingJobStatus {
            cost: cost(Some(0.36), Some(at(0)), None, 0.0, None, at(3600)),
            ..TrainingJobStatus::default()
        };
        let after_minutes = |minutes: i64| TrainingJobStatus {
            cost: cost(Some(0.36), Some(at(0)), None, 0.0, before.cost.as_ref(), at(3600 + minutes * 60)),
            ..before.clone()
        };
        assert!(only_cost_accrued(&before, &after_minutes(1)), "one poll later: no write");
        assert!(only_cost_accrued(&before, &after_minutes(9)));
        assert!(!only_cost_accrued(&before, &after_minutes(10)), "ten minutes later: written");
        // Any other change is written at once, with the current cost.
        let mut progressed = after_minutes(1);
        progressed.progress = Some(ProgressStatus { step: 3, ..ProgressStatus::default() });
        assert!(!only_cost_accrued(&before, &progressed));
        // A new price (another machine) is written at once.
        let mut repriced = after_minutes(1);
        repriced.cost.as_mut().unwrap().price_per_hour = Some(0.5);
        assert!(!only_cost_accrued(&before, &repriced));
        assert!(!only_cost_accrued(&TrainingJobStatus::default(), &after_minutes(1)), "the first cost");
    }

    #[test]
    fn earlier_machines_are_added() {
        assert_eq!(cost(Some(0.5), Some(at(0)), None, 0.25, None, at(1800)).unwrap().accrued, 0.5);
    }

    #[test]
    fn cost_never_goes_down() {
        let before = CostStatus { accrued: 1.0, ..Default::default() };
        assert_eq!(cost(Some(0.36), Some(at(0)), None, 0.0, Some(&before), at(3600)).unwrap().accrued, 1.0);
    }
}
