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

/// Where the job's rented machine is in its life.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum MachineState {
    /// Nothing rented: not yet, or the last rent provably never happened.
    #[default]
    None,
    /// The rent call is out (this is saved before it): its answer may be lost, and the label
    /// decides whether it happened.
    #[serde(rename_all = "camelCase")]
    RentPending { since: DateTime<Utc> },
    /// Rented; SSH has not answered yet.
    #[serde(rename_all = "camelCase")]
    Booting {
        id: InstanceId,
        at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ssh: Option<SshEndpoint>,
    },
    /// SSH answered with the job's key.
    #[serde(rename_all = "camelCase")]
    Ready { id: InstanceId, at: DateTime<Utc>, ssh: SshEndpoint },
    /// Destroyed and confirmed gone (or gone at the provider): nothing bills any more.
    #[serde(rename_all = "camelCase")]
    Released {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<InstanceId>,
    },
}

/// The rented machine, as kept in the state file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RentedMachine {
    /// Random per job, so no operator's sweeper takes this machine for one of its orphans.
    pub installation_id: String,
    /// `gputrainer:<installation id>:<uid>-<attempt>`, set on the instance at rent.
    pub label: String,
    #[serde(default)]
    pub machine: MachineState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<OfferStatus>,
    /// Machines that failed this job; never rented again for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_machine_ids: Vec<i64>,
    /// What earlier machines of this job cost, in US dollars.
    #[serde(default)]
    pub prior_cost: f64,
    /// How state files written before the typed state said where the machine was: read once
    /// (see [`RentedMachine::upgrade`]), never written, so an upgraded launcher still finds and
    /// releases a machine an older one rented.
    #[serde(default, rename = "instanceId", skip_serializing)]
    pub(super) legacy_instance_id: Option<InstanceId>,
    #[serde(default, rename = "createPendingSince", skip_serializing)]
    pub(super) legacy_pending_since: Option<DateTime<Utc>>,
    #[serde(default, rename = "launchedAt", skip_serializing)]
    pub(super) legacy_launched_at: Option<DateTime<Utc>>,
    #[serde(default, rename = "released", skip_serializing)]
    pub(super) legacy_released: bool,
    #[serde(default, rename = "ssh", skip_serializing)]
    pub(super) legacy_ssh: Option<SshEndpoint>,
}

impl RentedMachine {
    /// Turns what an older state file said into the typed state (a ready machine comes back as
    /// booting: the next look checks SSH again).
    pub fn upgrade(&mut self, now: DateTime<Utc>) {
        if self.machine != MachineState::None {
            return;
        }
        self.machine = match (self.legacy_pending_since, self.legacy_instance_id) {
            (Some(since), _) => MachineState::RentPending { since },
            (None, Some(id)) if self.legacy_released => MachineState::Released { id: Some(id) },
            (None, Some(id)) => MachineState::Booting {
                id,
                at: self.legacy_launched_at.unwrap_or(now),
                ssh: self.legacy_ssh.clone(),
            },
            (None, None) => MachineState::None,
        };
    }

    /// True while something may bill: a rent whose answer is not recorded, or a live instance.
    pub fn holds_machine(&self) -> bool {
        matches!(self.machine, MachineState::RentPending { .. }) || self.live_instance().is_some()
    }

    /// The instance while it lives (booting or ready).
    pub fn live_instance(&self) -> Option<InstanceId> {
        match self.machine {
            MachineState::Booting { id, .. } | MachineState::Ready { id, .. } => Some(id),
            _ => None,
        }
    }

    /// The instance rented last, live or released.
    pub fn instance_id(&self) -> Option<InstanceId> {
        match self.machine {
            MachineState::Released { id } => id,
            _ => self.live_instance(),
        }
    }

    /// When the live instance was rented.
    pub fn launched_at(&self) -> Option<DateTime<Utc>> {
        match self.machine {
            MachineState::Booting { at, .. } | MachineState::Ready { at, .. } => Some(at),
            _ => None,
        }
    }

    /// Where the live instance answers SSH.
    pub fn ssh(&self) -> Option<SshEndpoint> {
        match &self.machine {
            MachineState::Booting { ssh, .. } => ssh.clone(),
            MachineState::Ready { ssh, .. } => Some(ssh.clone()),
            _ => None,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.machine, MachineState::Ready { .. })
    }

    /// The SSH address the provider gave the booting instance.
    pub fn set_ssh(&mut self, endpoint: SshEndpoint) {
        match &mut self.machine {
            MachineState::Booting { ssh, .. } => *ssh = Some(endpoint),
            MachineState::Ready { ssh, .. } => *ssh = endpoint,
            _ => {}
        }
    }

    /// SSH answered: the booting instance (with an address) is ready.
    pub fn mark_ready(&mut self) {
        if let MachineState::Booting { id, at, ssh: Some(ssh) } = &self.machine {
            self.machine = MachineState::Ready { id: *id, at: *at, ssh: ssh.clone() };
        }
    }

    /// The live instance is gone: its cost is booked into `prior_cost`.
    pub fn release(&mut self, now: DateTime<Utc>) {
        if let Some(id) = self.live_instance() {
            self.prior_cost += self.current_cost(now);
            self.machine = MachineState::Released { id: Some(id) };
        }
    }

    /// The running machine's price per hour.
    pub fn price_per_hour(&self) -> f64 {
        self.offer.as_ref().map(|o| o.price_per_hour).unwrap_or_default()
    }

    /// US dollars the live machine has cost by `now` (zero once released).
    pub fn current_cost(&self, now: DateTime<Utc>) -> f64 {
        match self.launched_at() {
            Some(at) => machine_cost(self.price_per_hour(), Some(at), now),
            None => 0.0,
        }
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
    let eta = if rented.holds_machine() { eta_seconds } else { eta_seconds.map(|_| 0) };
    job_cost(rented.price_per_hour(), rented.launched_at(), eta, rented.prior_cost, previous, now)
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
            machine: MachineState::Booting { id: InstanceId(7), at: at(0), ssh: None },
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
        rented.release(at(3600));
        assert!(!rented.holds_machine());
        assert_eq!(rented.instance_id(), Some(InstanceId(7)));
        let after = cost(&rented, Some(1800), None, at(7200));
        assert_eq!((after.accrued, after.estimated_total), (0.75, Some(0.75)));
    }

    #[test]
    fn a_state_file_of_an_older_launcher_keeps_its_machine() {
        let old = |fields: serde_json::Value| {
            let mut rented: RentedMachine = serde_json::from_value(fields).unwrap();
            rented.upgrade(at(100));
            rented
        };
        let live = old(serde_json::json!({"installationId": "i", "label": "l", "instanceId": 7,
            "launchedAt": "2027-01-15T08:00:00Z", "ready": true}));
        assert_eq!(live.live_instance(), Some(InstanceId(7)));
        assert!(live.holds_machine());
        let pending = old(
            serde_json::json!({"installationId": "i", "label": "l", "createPendingSince": "2027-01-15T08:00:00Z"}),
        );
        assert!(matches!(pending.machine, MachineState::RentPending { .. }));
        let released =
            old(serde_json::json!({"installationId": "i", "label": "l", "instanceId": 7, "released": true}));
        assert!(!released.holds_machine());
        // What is written is the typed state only.
        let written = serde_json::to_value(&live).unwrap();
        assert_eq!(written["machine"]["state"], "booting");
        assert!(written.get("instanceId").is_none(), "{written}");
    }

    #[test]
    fn a_pending_rent_holds_a_machine() {
        let pending =
            RentedMachine { machine: MachineState::RentPending { since: at(0) }, ..Default::default() };
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
