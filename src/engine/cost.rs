//! What a job has cost: its earlier machines plus the one that bills now, never less than was
//! reported before, and when a status write that only moved the cost can wait. Pure; one copy
//! for the controller and `gpu-trainer launch`.

use chrono::{DateTime, Utc};

use crate::api::{CostStatus, TrainingJobStatus};

/// US dollars a machine at `price_per_hour` has cost from `since` (None: it has not started
/// billing) to `now`.
pub fn machine_cost(price_per_hour: f64, since: Option<DateTime<Utc>>, now: DateTime<Utc>) -> f64 {
    let hours = since.map(|t| (now - t).num_milliseconds().max(0) as f64 / 3_600_000.0).unwrap_or(0.0);
    price_per_hour * hours
}

/// The job's cost: `prior` (its earlier machines) plus the current machine since it was rented,
/// and the expected total at the current ETA. Pure.
pub fn job_cost(
    price: f64,
    launched_at: Option<DateTime<Utc>>,
    eta_seconds: Option<i64>,
    prior: f64,
    previous: Option<&CostStatus>,
    now: DateTime<Utc>,
) -> CostStatus {
    // Never report less than before: the clock of a restarted operator may differ slightly.
    let accrued = round4(
        (prior + machine_cost(price, launched_at, now)).max(previous.map(|c| c.accrued).unwrap_or(0.0)),
    );
    let estimated_total = eta_seconds.map(|eta| round4(accrued + price * eta.max(0) as f64 / 3600.0));
    CostStatus { price_per_hour: Some(price), accrued, estimated_total }
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ProgressStatus;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn cost_accrues_from_the_rent_time_and_estimates_the_rest() {
        let c = job_cost(0.36, Some(at(0)), Some(1800), 0.0, None, at(3600));
        assert_eq!(c.accrued, 0.36);
        assert_eq!(c.estimated_total, Some(0.54));
    }

    #[test]
    fn a_status_that_only_accrued_cost_is_written_every_ten_minutes_of_machine_time() {
        let before = TrainingJobStatus {
            cost: Some(job_cost(0.36, Some(at(0)), None, 0.0, None, at(3600))),
            ..TrainingJobStatus::default()
        };
        let after_minutes = |minutes: i64| TrainingJobStatus {
            cost: Some(job_cost(0.36, Some(at(0)), None, 0.0, before.cost.as_ref(), at(3600 + minutes * 60))),
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
        assert_eq!(job_cost(0.5, Some(at(0)), None, 0.25, None, at(1800)).accrued, 0.5);
    }

    #[test]
    fn cost_never_goes_down() {
        let before = CostStatus { accrued: 1.0, ..Default::default() };
        assert_eq!(job_cost(0.36, Some(at(0)), None, 0.0, Some(&before), at(3600)).accrued, 1.0);
    }
}
