//! `next_step`: what a job should do now. Pure: no I/O, `now` passed in.

use chrono::{DateTime, Utc};

use crate::api::{
    Reason, TrainingJobPhase, TrainingJobSpec, TrainingJobStatus, from_k8s_time, is_condition_true,
    job_condition,
};

/// What is known of the job's machine.
#[derive(Clone, Debug, PartialEq)]
pub enum MachineObservation {
    /// No machine asked for yet (or the last one was released).
    None,
    /// Asked for; not ready yet.
    Starting,
    /// Ready for work at this price per hour.
    Ready { price_per_hour: f64 },
    /// Lost, failed to boot, or outbid; a replacement may be rented within `backoffLimit`.
    Failed { reason: Reason, message: String },
}

/// What the last poll of the trainer said.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainingObservation {
    /// Not polled since the last step.
    Unknown,
    /// Running normally (or waiting out a stall's grace period).
    Running,
    /// The stall detector recommends stopping.
    Stalled { message: String },
    /// The trainer finished successfully.
    Finished,
    /// The trainer failed.
    Crashed { reason: Reason, message: String },
}

/// Everything a decision needs besides the spec and status.
#[derive(Clone, Debug, PartialEq)]
pub struct Observations {
    pub machine: MachineObservation,
    pub training: TrainingObservation,
}

/// The next thing to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Rent (or take over) a machine; `attempt` counts from 1.
    AcquireMachine { attempt: i32 },
    /// Wait for the machine; ask again later.
    WaitForMachine,
    /// Copy dataset and recipe, verify, bootstrap.
    Stage,
    /// Start the trainer in the background (`resume` after a replacement machine).
    Launch { resume: bool },
    /// Read the trainer's log and process state.
    Poll,
    /// Stop the trainer gracefully, keep what it saved, then fail with `reason`.
    StopAndFail { reason: Reason, message: String },
    /// Upload and verify the results.
    Upload,
    /// Release the machine and finish in `phase`.
    Finish { phase: TrainingJobPhase, reason: Reason, message: String },
    /// Nothing more to do.
    Done,
}

/// How long the upload step may keep failing (connection lost, storage down) before the machine
/// is released anyway.
pub const UPLOAD_GRACE: chrono::Duration = chrono::Duration::minutes(60);

/// Decides the next step.
pub fn next_step(
    spec: &TrainingJobSpec,
    status: &TrainingJobStatus,
    observed: &Observations,
    now: DateTime<Utc>,
) -> Step {
    if status.phase.is_finished() {
        return Step::Done;
    }
    let training = is_condition_true(&status.conditions, job_condition::TRAINING);
    if let Some(stop) = stop_for_limits(spec, status, observed, training, now) {
        return stop;
    }
    match status.phase {
        TrainingJobPhase::Pending | TrainingJobPhase::Suspended => {
            Step::AcquireMachine { attempt: status.attempts + 1 }
        }
        TrainingJobPhase::Provisioning | TrainingJobPhase::Staging | TrainingJobPhase::Training => {
            match &observed.machine {
                MachineObservation::None => Step::AcquireMachine { attempt: status.attempts + 1 },
                MachineObservation::Starting => Step::WaitForMachine,
                MachineObservation::Failed { message, .. } => replace_machine(spec, status, message),
                MachineObservation::Ready { .. } => {
                    if !is_condition_true(&status.conditions, job_condition::DATA_STAGED) {
                        Step::Stage
                    } else if !training {
                        Step::Launch { resume: status.attempts > 1 && status.resumed_from.is_some() }
                    } else {
                        match &observed.training {
                            TrainingObservation::Unknown | TrainingObservation::Running => Step::Poll,
                            TrainingObservation::Stalled { message } => {
                                Step::StopAndFail { reason: Reason::Stalled, message: message.clone() }
                            }
                            TrainingObservation::Finished => Step::Upload,
                            TrainingObservation::Crashed { reason, message } => Step::Finish {
                                phase: TrainingJobPhase::Failed,
                                reason: *reason,
                                message: message.clone(),
                            },
                        }
                    }
                }
            }
        }
        TrainingJobPhase::Uploading => {
            let uploading_since = crate::api::find_condition(&status.conditions, job_condition::UPLOADED)
                .filter(|c| c.status == "False")
                .map(|c| from_k8s_time(&c.last_transition_time));
            if is_condition_true(&status.conditions, job_condition::UPLOADED) {
                Step::Finish {
                    phase: TrainingJobPhase::Succeeded,
                    reason: Reason::Succeeded,
                    message: "training finished and its results are verified".into(),
                }
            } else if let MachineObservation::Failed { message, .. } = &observed.machine {
                // The results were on the machine: they are lost with it. Train again on a
                // replacement (from the latest synced checkpoint, if any) within backoffLimit.
                replace_machine(spec, status, &format!("lost while uploading: {message}"))
            } else if observed.machine == MachineObservation::None {
                Step::AcquireMachine { attempt: status.attempts + 1 }
            } else if uploading_since.is_some_and(|since| now - since >= UPLOAD_GRACE) {
                // Uploads that keep failing must not keep the GPU rented.
                Step::Finish {
                    phase: TrainingJobPhase::Failed,
                    reason: Reason::UploadFailed,
                    message: format!(
                        "the results could not be uploaded within {} minutes; they are lost with the machine",
                        UPLOAD_GRACE.num_minutes()
                    ),
                }
            } else {
                Step::Upload
            }
        }
        TrainingJobPhase::Succeeded | TrainingJobPhase::Failed => Step::Done,
    }
}

/// A job past its `activeDeadlineSeconds`, or whose next poll would cross its budget, stops:
/// a running trainer is stopped (and what it saved kept), anything else just fails. Pure.
fn stop_for_limits(
    spec: &TrainingJobSpec,
    status: &TrainingJobStatus,
    observed: &Observations,
    training: bool,
    now: DateTime<Utc>,
) -> Option<Step> {
    let stop = |reason: Reason, message: String| {
        Some(if training {
            Step::StopAndFail { reason, message }
        } else {
            Step::Finish { phase: TrainingJobPhase::Failed, reason, message }
        })
    };
    if let Some(started) = status.start_time.as_ref().map(from_k8s_time) {
        let elapsed = now.signed_duration_since(started).num_seconds();
        if elapsed >= spec.active_deadline_seconds {
            let message = format!("activeDeadlineSeconds ({} s) passed", spec.active_deadline_seconds);
            return stop(Reason::DeadlineExceeded, message);
        }
    }
    if let Some(budget) = &spec.budget {
        let accrued = status.cost.as_ref().map(|c| c.accrued).unwrap_or_default();
        let price = match observed.machine {
            MachineObservation::Ready { price_per_hour } => price_per_hour,
            _ => 0.0,
        };
        // Stop before the next poll would cross the budget.
        let next_poll = accrued + price * f64::from(spec.monitoring.poll_interval_seconds) / 3600.0;
        if next_poll > budget.max_total_cost {
            let message = format!(
                "the next poll would cross budget.maxTotalCost ${:.2} (spent ${accrued:.2})",
                budget.max_total_cost
            );
            return stop(Reason::BudgetExceeded, message);
        }
    }
    None
}

/// A machine failed: rent a replacement within `backoffLimit`, else fail the job.
fn replace_machine(spec: &TrainingJobSpec, status: &TrainingJobStatus, message: &str) -> Step {
    if status.attempts > spec.backoff_limit {
        Step::Finish {
            phase: TrainingJobPhase::Failed,
            reason: Reason::BackoffLimitExceeded,
            message: format!(
                "{} failed (backoffLimit {}); the last: {message}",
                if status.attempts == 1 {
                    "1 machine".to_string()
                } else {
                    format!("{} machines", status.attempts)
                },
                spec.backoff_limit
            ),
        }
    } else {
        Step::AcquireMachine { attempt: status.attempts + 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConditionStatus, CostStatus, set_condition, to_k8s_time};
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn spec(extra: serde_json::Value) -> TrainingJobSpec {
        let mut base = serde_json::json!({"tool": "demo@1", "dataset": {"local": {"path": "d"}}});
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(base).unwrap()
    }

    fn ready() -> Observations {
        Observations {
            machine: MachineObservation::Ready { price_per_hour: 0.5 },
            training: TrainingObservation::Unknown,
        }
    }

    fn status(phase: TrainingJobPhase, conditions: &[&str]) -> TrainingJobStatus {
        let mut s = TrainingJobStatus {
            phase,
            attempts: 1,
            start_time: Some(to_k8s_time(at(0))),
            ..Default::default()
        };
        for c in conditions {
            set_condition(&mut s.conditions, c, ConditionStatus::True, Reason::Training, "", None, at(0));
        }
        s
    }

    #[test]
    fn the_happy_path_in_order() {
        let spec = spec(serde_json::json!({}));
        let none = Observations { machine: MachineObservation::None, training: TrainingObservation::Unknown };
        assert_eq!(
            next_step(&spec, &TrainingJobStatus::default(), &none, at(0)),
            Step::AcquireMachine { attempt: 1 }
        );
        let starting = Observations { machine: MachineObservation::Starting, ..none.clone() };
        assert_eq!(
            next_step(&spec, &status(TrainingJobPhase::Provisioning, &[]), &starting, at(1)),
            Step::WaitForMachine
        );
        assert_eq!(
            next_step(&spec, &status(TrainingJobPhase::Provisioning, &[]), &ready(), at(2)),
            Step::Stage
        );
        let staged = status(TrainingJobPhase::Staging, &[job_condition::DATA_STAGED]);
        assert_eq!(next_step(&spec, &staged, &ready(), at(3)), Step::Launch { resume: false });
        // A replacement machine resumes only from a checkpoint that is really there.
        let replacement = TrainingJobStatus { attempts: 2, ..staged.clone() };
        assert_eq!(next_step(&spec, &replacement, &ready(), at(3)), Step::Launch { resume: false });
        let restored = TrainingJobStatus {
            resumed_from: Some(crate::api::CheckpointStatus {
                name: "a_10".into(),
                step: 10,
                ..Default::default()
            }),
            ..replacement
        };
        assert_eq!(next_step(&spec, &restored, &ready(), at(3)), Step::Launch { resume: true });
        let training =
            status(TrainingJobPhase::Training, &[job_condition::DATA_STAGED, job_condition::TRAINING]);
        assert_eq!(next_step(&spec, &training, &ready(), at(4)), Step::Poll);
        let finished = Observations { training: TrainingObservation::Finished, ..ready() };
        assert_eq!(next_step(&spec, &training, &finished, at(5)), Step::Upload);
        let mut uploading = status(TrainingJobPhase::Uploading, &[]);
        set_condition(
            &mut uploading.conditions,
            job_condition::UPLOADED,
            ConditionStatus::False,
            Reason::Uploading,
            "",
            None,
            at(10),
        );
        assert_eq!(next_step(&spec, &uploading, &ready(), at(10 + 59 * 60)), Step::Upload);
        assert!(matches!(
            next_step(&spec, &uploading, &ready(), at(10 + 60 * 60)),
            Step::Finish { phase: TrainingJobPhase::Failed, reason: Reason::UploadFailed, .. }
        ));
        let uploaded = status(TrainingJobPhase::Uploading, &[job_condition::UPLOADED]);
        assert!(matches!(
            next_step(&spec, &uploaded, &ready(), at(6)),
            Step::Finish { phase: TrainingJobPhase::Succeeded, .. }
        ));
        assert_eq!(next_step(&spec, &status(TrainingJobPhase::Succeeded, &[]), &ready(), at(7)), Step::Done);
    }

    #[test]
    fn a_stall_stops_the_trainer_and_fails_the_job() {
        let spec = spec(serde_json::json!({}));
        let training =
            status(TrainingJobPhase::Training, &[job_condition::DATA_STAGED, job_condition::TRAINING]);
        let stalled =
            Observations { training: TrainingObservation::Stalled { message: "flat".into() }, ..ready() };
        assert_eq!(
            next_step(&spec, &training, &stalled, at(10)),
            Step::StopAndFail { reason: Reason::Stalled, message: "flat".into() }
        );
    }

    #[test]
    fn the_deadline_counts_from_the_start_provisioning_included() {
        let spec = spec(serde_json::json!({"activeDeadlineSeconds": 600}));
        let provisioning = status(TrainingJobPhase::Provisioning, &[]);
        let starting =
            Observations { machine: MachineObservation::Starting, training: TrainingObservation::Unknown };
        assert_eq!(next_step(&spec, &provisioning, &starting, at(599)), Step::WaitForMachine);
        assert!(matches!(
            next_step(&spec, &provisioning, &starting, at(600)),
            Step::Finish { reason: Reason::DeadlineExceeded, .. }
        ));
        let training =
            status(TrainingJobPhase::Training, &[job_condition::DATA_STAGED, job_condition::TRAINING]);
        assert!(matches!(
            next_step(&spec, &training, &ready(), at(600)),
            Step::StopAndFail { reason: Reason::DeadlineExceeded, .. }
        ));
    }

    #[test]
    fn the_budget_stops_before_the_next_poll_would_cross_it() {
        let spec = spec(
            serde_json::json!({"budget": {"maxTotalCost": 1.0}, "monitoring": {"pollIntervalSeconds": 360}}),
        );
        let mut training =
            status(TrainingJobPhase::Training, &[job_condition::DATA_STAGED, job_condition::TRAINING]);
        // $0.50/h for 360 s is $0.05: at $0.94 the next poll ends at $0.99, at $0.96 at $1.01.
        training.cost = Some(CostStatus { accrued: 0.94, ..Default::default() });
        assert_eq!(next_step(&spec, &training, &ready(), at(10)), Step::Poll);
        training.cost = Some(CostStatus { accrued: 0.96, ..Default::default() });
        assert!(matches!(
            next_step(&spec, &training, &ready(), at(10)),
            Step::StopAndFail { reason: Reason::BudgetExceeded, .. }
        ));
    }

    #[test]
    fn failed_machines_are_replaced_within_the_backoff_limit() {
        let spec = spec(serde_json::json!({"backoffLimit": 1}));
        let lost = Observations {
            machine: MachineObservation::Failed { reason: Reason::InstanceLost, message: "gone".into() },
            training: TrainingObservation::Unknown,
        };
        let mut s =
            status(TrainingJobPhase::Training, &[job_condition::DATA_STAGED, job_condition::TRAINING]);
        assert_eq!(next_step(&spec, &s, &lost, at(10)), Step::AcquireMachine { attempt: 2 });
        s.attempts = 2;
        assert!(matches!(
            next_step(&spec, &s, &lost, at(10)),
            Step::Finish { reason: Reason::BackoffLimitExceeded, .. }
        ));
    }

    #[test]
    fn a_machine_lost_while_uploading_is_replaced_within_the_backoff_limit() {
        let spec = spec(serde_json::json!({"backoffLimit": 1}));
        let lost = Observations {
            machine: MachineObservation::Failed { reason: Reason::InstanceLost, message: "gone".into() },
            training: TrainingObservation::Unknown,
        };
        let mut uploading = status(TrainingJobPhase::Uploading, &[job_condition::DATA_STAGED]);
        set_condition(
            &mut uploading.conditions,
            job_condition::UPLOADED,
            ConditionStatus::False,
            Reason::Uploading,
            "",
            None,
            at(10),
        );
        // Not an upload retried for an hour against a machine that is gone.
        assert_eq!(next_step(&spec, &uploading, &lost, at(11)), Step::AcquireMachine { attempt: 2 });
        uploading.attempts = 2;
        match next_step(&spec, &uploading, &lost, at(11)) {
            Step::Finish {
                phase: TrainingJobPhase::Failed,
                reason: Reason::BackoffLimitExceeded,
                message,
            } => {
                assert!(message.contains("lost while uploading"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // Results verified before the machine went: the job succeeded.
        let uploaded = status(TrainingJobPhase::Uploading, &[job_condition::UPLOADED]);
        assert!(matches!(
            next_step(&spec, &uploaded, &lost, at(12)),
            Step::Finish { phase: TrainingJobPhase::Succeeded, .. }
        ));
    }
}
