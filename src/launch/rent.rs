//! Renting a Vast.ai machine for `gpu-trainer launch --provider vastai`: the settings, what is
//! kept in the state file about the machine, and the pure parts (label, offer choice and its
//! explanation, cost). The machine port in [`super::machine`] does the calls, in the order the operator
//! does them: the label and a pending mark are on disk before the rent call, the instance id
//! right after it, so a launcher killed in between finds its machine again by label instead of
//! renting a second one.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::LocalError;
use crate::api::{CostStatus, MachineRequirements, OfferStatus};
use crate::engine::cost::{job_cost, machine_cost};
use crate::provider::config::ProviderConfig;
use crate::provider::select::{Criteria, Rejection, Rejections, Selection, select_offer};
use crate::provider::{GpuProvider, InstanceId, OfferQuery, SshEndpoint};
use crate::remote::ssh::SshKey;

/// How long the launcher waits for a lost rent call's instance to show up in the listing before
/// it concludes the rent never happened (the provider's listing lags behind a rent).
pub const CREATE_PENDING_GRACE: Duration = Duration::from_secs(60);
/// From rent to SSH answering, at most.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Rent calls refused for a reason worth another offer (taken, contract left behind) before
/// the launcher gives up.
pub const MAX_CREATE_FAILURES: u32 = 5;

/// What renting needs. Cheap to clone.
#[derive(Clone)]
pub struct RentSpec {
    pub provider: Arc<dyn GpuProvider>,
    /// Defaults for what `spec.resources` leaves out, as the operator uses them.
    pub config: ProviderConfig,
    /// The job's own key; its public half is attached to the machine at rent.
    pub key: SshKey,
    /// Base of the work dir on the machine.
    pub remote_base: String,
    pub boot_timeout: Duration,
    /// How often the provider is asked about a machine that is booting.
    pub boot_poll: Duration,
    /// How often the provider is asked about a machine that is working.
    pub liveness_poll: Duration,
    pub create_pending_grace: Duration,
}

impl RentSpec {
    pub fn new(
        provider: Arc<dyn GpuProvider>,
        config: ProviderConfig,
        key: SshKey,
        remote_base: String,
    ) -> Self {
        Self {
            provider,
            config,
            key,
            remote_base,
            boot_timeout: BOOT_TIMEOUT,
            boot_poll: Duration::from_secs(3),
            liveness_poll: Duration::from_secs(30),
            create_pending_grace: CREATE_PENDING_GRACE,
        }
    }
}

impl std::fmt::Debug for RentSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RentSpec")
            .field("base_url", &self.config.base_url.as_str())
            .field("remote_base", &self.remote_base)
            .finish_non_exhaustive()
    }
}

/// The rented machine, as kept in the state file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RentedMachine {
    /// Random per job, so no operator's sweeper takes this machine for one of its orphans.
    pub installation_id: String,
    /// `gputrainer:<installation id>:<uid>-<attempt>`, set on the instance at rent.
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<InstanceId>,
    /// Set (and saved) before the rent call, cleared once its result is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_pending_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<OfferStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshEndpoint>,
    /// SSH answered with the job's key.
    #[serde(default)]
    pub ready: bool,
    /// Destroyed (or gone at the provider); nothing bills any more.
    #[serde(default)]
    pub released: bool,
    /// Machines that failed this job; never rented again for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_machine_ids: Vec<i64>,
    /// What earlier machines of this job cost, in US dollars.
    #[serde(default)]
    pub prior_cost: f64,
}

impl RentedMachine {
    /// True while something may bill: a rent whose answer is not recorded, or a live instance.
    pub fn holds_machine(&self) -> bool {
        self.create_pending_since.is_some() || (self.instance_id.is_some() && !self.released)
    }

    /// The running machine's price per hour.
    pub fn price_per_hour(&self) -> f64 {
        self.offer.as_ref().map(|o| o.price_per_hour).unwrap_or_default()
    }

    /// US dollars the current machine has cost by `now` (zero once released).
    pub fn current_cost(&self, now: DateTime<Utc>) -> f64 {
        if self.released || self.instance_id.is_none() {
            return 0.0;
        }
        machine_cost(self.price_per_hour(), self.launched_at, now)
    }

    pub fn exclude_machine(&mut self, machine_id: Option<i64>) {
        crate::machine::decide::exclude_machine(&mut self.excluded_machine_ids, machine_id.unwrap_or(0));
    }
}

/// The job's cost ([`crate::engine::cost::job_cost`]) with what the state file knows: nothing
/// more is expected once the machine is released. Pure.
pub fn cost(
    rented: &RentedMachine,
    eta_seconds: Option<i64>,
    previous: Option<&CostStatus>,
    now: DateTime<Utc>,
) -> CostStatus {
    let billing = rented.instance_id.is_some() && !rented.released;
    let eta = if rented.holds_machine() { eta_seconds } else { eta_seconds.map(|_| 0) };
    let since = if billing { rented.launched_at } else { None };
    job_cost(rented.price_per_hour(), since, eta, rented.prior_cost, previous, now)
}

/// The offer `spec.resources` (with the operator's defaults) rents now. When the filtered search
/// finds nothing, a broad search says which requirement ruled the marketplace out.
pub async fn choose_offer(
    provider: &dyn GpuProvider,
    resources: &MachineRequirements,
    config: &ProviderConfig,
    excluded_machine_ids: &[i64],
) -> Result<Selection, LocalError> {
    let criteria = Criteria::from_requirements(resources, config, excluded_machine_ids);
    let offers = provider
        .search_offers(&criteria.offer_query())
        .await
        .map_err(|source| LocalError::Provider { operation: "search offers", source })?;
    if let Ok(selection) = select_offer(&offers, &criteria) {
        return Ok(selection);
    }
    let broad = OfferQuery { limit: Some(1000), ..OfferQuery::default() };
    let everything = provider
        .search_offers(&broad)
        .await
        .map_err(|source| LocalError::Provider { operation: "search offers", source })?;
    match select_offer(&everything, &criteria) {
        Ok(selection) => Ok(selection),
        Err(no_match) => {
            Err(LocalError::NoOffers(explain_no_offers(&criteria, everything.len(), &no_match.rejected)))
        }
    }
}

/// Why nothing matched, naming the `spec.resources` field behind each rule. Pure.
pub fn explain_no_offers(criteria: &Criteria, considered: usize, rejected: &Rejections) -> String {
    let wanted = requirements_text(criteria);
    if considered == 0 {
        return format!(
            "no offer matches spec.resources ({wanted}): the marketplace returned no offers at all"
        );
    }
    let reasons = rejected
        .0
        .iter()
        .map(|(rule, n)| format!("{n} {}", rule_text(*rule, criteria)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "no offer matches spec.resources ({wanted}): of {considered} offers on the marketplace, {reasons} \
         (each offer counted under the first rule it breaks)"
    )
}

/// The requirements in one line, with the defaults filled in.
pub fn requirements_text(c: &Criteria) -> String {
    let mut parts = vec![format!("{} GPU{}", c.num_gpus, if c.num_gpus == 1 { "" } else { "s" })];
    if !c.gpu_names.is_empty() {
        parts.push(format!("model in [{}]", c.gpu_names.join(", ")));
    }
    parts.push(format!("at least {} GB VRAM", c.min_vram_gb));
    parts.push(format!("at most ${:.2}/h", c.max_price_per_hour));
    parts.push(format!("reliability at least {}", c.min_reliability));
    parts.push(format!("disk at least {} GB", c.min_disk_gb));
    if !c.regions.is_empty() {
        parts.push(format!("in [{}]", c.regions.join(", ")));
    }
    if c.verified_only {
        parts.push("verified only".into());
    }
    parts.join(", ")
}

fn rule_text(rule: Rejection, c: &Criteria) -> String {
    match rule {
        Rejection::ExcludedMachine => "on machines that failed this job before".into(),
        Rejection::GpuModel => {
            format!("GPU model not in [{}] (spec.resources.gpu.names)", c.gpu_names.join(", "))
        }
        Rejection::GpuCount => format!("GPU count not {} (spec.resources.gpu.count)", c.num_gpus),
        Rejection::Vram => format!("VRAM below {} GB (spec.resources.gpu.minVramGb)", c.min_vram_gb),
        Rejection::Disk => format!("disk below {} GB (spec.resources.diskGb)", c.min_disk_gb),
        Rejection::Unverified => "unverified (spec.resources.verifiedOnly)".into(),
        Rejection::Region => format!("outside [{}] (spec.resources.regions)", c.regions.join(", ")),
        Rejection::Reliability => {
            format!("reliability below {} (spec.resources.minReliability)", c.min_reliability)
        }
        Rejection::Price => {
            format!("price above ${:.2}/h (spec.resources.maxPricePerHour)", c.max_price_per_hour)
        }
    }
}

/// The most a run can cost at `price_per_hour`: the whole `activeDeadlineSeconds`, or the budget
/// when that is lower. Returns (dollars, explanation). Pure.
pub fn cost_ceiling(price_per_hour: f64, active_deadline_seconds: i64, budget: Option<f64>) -> (f64, String) {
    let deadline_cost = price_per_hour * active_deadline_seconds.max(0) as f64 / 3600.0;
    let hours = active_deadline_seconds.max(0) / 3600;
    let minutes = (active_deadline_seconds.max(0) % 3600) / 60;
    let deadline = format!("activeDeadlineSeconds {hours}h{minutes:02}m at ${price_per_hour:.3}/h");
    match budget {
        Some(b) if b < deadline_cost => {
            (b, format!("budget.maxTotalCost; {deadline} would be ${deadline_cost:.2}"))
        }
        _ => (deadline_cost, deadline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::sample_offer;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn cost_accrues_from_the_rent_and_stops_at_release() {
        let mut rented = RentedMachine {
            instance_id: Some(InstanceId(7)),
            launched_at: Some(at(0)),
            offer: Some(OfferStatus {
                id: 1,
                machine_id: 2,
                gpu_name: "RTX 4090".into(),
                num_gpus: 1,
                vram_gb: 24.0,
                price_per_hour: 0.5,
                reliability: 0.99,
                geolocation: None,
            }),
            prior_cost: 0.25,
            ..Default::default()
        };
        let c = cost(&rented, Some(1800), None, at(3600));
        assert_eq!((c.accrued, c.estimated_total, c.price_per_hour), (0.75, Some(1.0), Some(0.5)));
        // A restarted launcher's clock never makes the cost go down.
        let again = cost(&rented, None, Some(&CostStatus { accrued: 0.8, ..Default::default() }), at(3600));
        assert_eq!(again.accrued, 0.8);
        rented.prior_cost += rented.current_cost(at(3600));
        rented.released = true;
        assert!(!rented.holds_machine());
        let after = cost(&rented, Some(1800), None, at(7200));
        assert_eq!((after.accrued, after.estimated_total), (0.75, Some(0.75)));
    }

    #[test]
    fn a_pending_rent_holds_a_machine() {
        let pending = RentedMachine { create_pending_since: Some(at(0)), ..Default::default() };
        assert!(pending.holds_machine());
        assert!(!RentedMachine::default().holds_machine());
    }

    #[test]
    fn no_offers_names_the_fields_that_ruled_them_out() {
        let criteria = Criteria {
            gpu_names: vec!["H100".into()],
            num_gpus: 1,
            min_vram_gb: 24.0,
            max_price_per_hour: 0.5,
            min_reliability: 0.9,
            min_disk_gb: 10.0,
            ..Criteria::default()
        };
        let offers = [
            sample_offer(1, "RTX 4090", 0.4, 24.0),
            sample_offer(2, "H100 SXM", 2.5, 80.0),
            sample_offer(3, "H100 PCIE", 1.9, 80.0),
        ];
        let no_match = select_offer(&offers, &criteria).unwrap_err();
        let text = explain_no_offers(&criteria, offers.len(), &no_match.rejected);
        assert!(text.contains("of 3 offers"), "{text}");
        assert!(text.contains("1 GPU model not in [H100] (spec.resources.gpu.names)"), "{text}");
        assert!(text.contains("2 price above $0.50/h (spec.resources.maxPricePerHour)"), "{text}");
        assert!(text.contains("at most $0.50/h"), "{text}");
        let empty = explain_no_offers(&criteria, 0, &Rejections::default());
        assert!(empty.contains("no offers at all"), "{empty}");
    }

    #[test]
    fn the_cost_ceiling_is_the_deadline_or_the_lower_budget() {
        let (dollars, why) = cost_ceiling(0.5, 4 * 3600, None);
        assert_eq!(dollars, 2.0);
        assert!(why.contains("4h00m at $0.500/h"), "{why}");
        let (dollars, why) = cost_ceiling(0.5, 4 * 3600, Some(1.25));
        assert_eq!(dollars, 1.25);
        assert!(why.starts_with("budget.maxTotalCost") && why.contains("$2.00"), "{why}");
        assert_eq!(cost_ceiling(0.5, 4 * 3600, Some(5.0)).0, 2.0);
    }
}
