//! Choosing one offer from a search result: a pure function, so the rules are unit-tested and
//! the choice can be explained in status messages and events.
//!
//! Every offer is checked against the criteria in a fixed order and rejected for the first rule
//! it breaks, so the rejection counts add up to the number of rejected offers. Among the rest the
//! winner is the one with the most preferred GPU model, then the lowest price, then the highest
//! reliability, then the lowest offer id (so ties are decided the same way every time).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use super::Offer;
use super::config::{DEFAULT_MIN_RELIABILITY, ProviderConfig};
use crate::api::MachineRequirements;

/// What an acceptable offer looks like.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Criteria {
    /// Acceptable GPU models, most preferred first. Empty accepts any model; `preferred_gpus`
    /// then orders them.
    pub gpu_names: Vec<String>,
    /// Models to prefer when `gpu_names` is empty; other models rank after these.
    pub preferred_gpus: Vec<String>,
    /// Exact number of GPUs.
    pub num_gpus: u32,
    pub min_vram_gb: f64,
    pub max_price_per_hour: f64,
    pub min_reliability: f64,
    /// Country codes or continent names; empty means anywhere.
    pub regions: Vec<String>,
    pub verified_only: bool,
    pub min_disk_gb: f64,
    /// Machines that failed us before; never chosen again.
    pub excluded_machine_ids: Vec<i64>,
}

impl Criteria {
    /// Criteria for a job's requirements, with the operator's defaults for what it leaves out.
    pub fn from_requirements(
        req: &MachineRequirements,
        config: &ProviderConfig,
        excluded_machine_ids: &[i64],
    ) -> Self {
        Self {
            gpu_names: req.gpu.names.clone(),
            preferred_gpus: config.preferred_gpus.clone(),
            num_gpus: req.gpu.count,
            min_vram_gb: f64::from(req.gpu.min_vram_gb.unwrap_or(config.min_vram_gb)),
            max_price_per_hour: req.max_price_per_hour.unwrap_or(config.max_bid_per_hour),
            min_reliability: req.min_reliability.unwrap_or(DEFAULT_MIN_RELIABILITY),
            regions: req.regions.clone(),
            verified_only: req.verified_only,
            min_disk_gb: f64::from(req.disk_gb.unwrap_or(config.default_disk_gb)),
            excluded_machine_ids: excluded_machine_ids.to_vec(),
        }
    }
}

/// Why an offer was not chosen, in the order the rules are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    ExcludedMachine,
    GpuModel,
    GpuCount,
    Vram,
    Disk,
    Unverified,
    Region,
    Reliability,
    Price,
}

/// Counts of rejected offers per reason, printed as `3 price above $1.00/h, 1 excluded machine`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejections(pub BTreeMap<Rejection, usize>);

impl Rejections {
    pub fn total(&self) -> usize {
        self.0.values().sum()
    }

    pub fn count(&self, reason: Rejection) -> usize {
        self.0.get(&reason).copied().unwrap_or(0)
    }
}

/// The chosen offer and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub offer: Offer,
    /// Offers that passed every rule, the winner included.
    pub candidates: usize,
    pub rejected: Rejections,
    /// One line for status messages and events.
    pub explanation: String,
}

/// No offer passed the rules.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("no offer matches the requirements: {}", describe_empty(*.considered, .criteria, .rejected))]
pub struct NoMatch {
    pub considered: usize,
    pub rejected: Rejections,
    criteria: Box<Criteria>,
}

/// Chooses the best offer for `criteria`, or explains why none fits.
pub fn select_offer(offers: &[Offer], criteria: &Criteria) -> Result<Selection, NoMatch> {
    let mut rejected = Rejections::default();
    let mut candidates: Vec<(usize, &Offer)> = Vec::new();
    for offer in offers {
        match check(offer, criteria) {
            Ok(rank) => candidates.push((rank, offer)),
            Err(reason) => *rejected.0.entry(reason).or_default() += 1,
        }
    }
    candidates.sort_by(|(rank_a, a), (rank_b, b)| {
        rank_a
            .cmp(rank_b)
            .then_with(|| a.price_per_hour.partial_cmp(&b.price_per_hour).unwrap_or(Ordering::Equal))
            .then_with(|| b.reliability.partial_cmp(&a.reliability).unwrap_or(Ordering::Equal))
            .then_with(|| a.id.cmp(&b.id))
    });
    let Some(&(rank, winner)) = candidates.first() else {
        return Err(NoMatch { considered: offers.len(), rejected, criteria: Box::new(criteria.clone()) });
    };
    let same_rank = candidates.iter().filter(|(r, _)| *r == rank).count();
    let explanation = explain(winner, rank, same_rank, candidates.len(), offers.len(), criteria, &rejected);
    Ok(Selection { offer: winner.clone(), candidates: candidates.len(), rejected, explanation })
}

/// The offer's preference rank (0 is best) when it passes every rule.
fn check(offer: &Offer, c: &Criteria) -> Result<usize, Rejection> {
    if c.excluded_machine_ids.contains(&offer.machine_id) {
        return Err(Rejection::ExcludedMachine);
    }
    let rank = if c.gpu_names.is_empty() {
        position(&c.preferred_gpus, &offer.gpu_name).unwrap_or(c.preferred_gpus.len())
    } else {
        position(&c.gpu_names, &offer.gpu_name).ok_or(Rejection::GpuModel)?
    };
    if offer.num_gpus != c.num_gpus {
        return Err(Rejection::GpuCount);
    }
    if offer.vram_gb < c.min_vram_gb {
        return Err(Rejection::Vram);
    }
    if offer.disk_gb < c.min_disk_gb {
        return Err(Rejection::Disk);
    }
    if c.verified_only && !offer.verified {
        return Err(Rejection::Unverified);
    }
    if !c.regions.is_empty() && !c.regions.iter().any(|r| in_region(offer.country_code.as_deref(), r)) {
        return Err(Rejection::Region);
    }
    if offer.reliability < c.min_reliability {
        return Err(Rejection::Reliability);
    }
    if offer.price_per_hour > c.max_price_per_hour {
        return Err(Rejection::Price);
    }
    Ok(rank)
}

/// Index of the first wanted model that names this GPU.
fn position(wanted: &[String], gpu_name: &str) -> Option<usize> {
    wanted.iter().position(|w| gpu_matches(w, gpu_name))
}

/// Whether a wanted model (`4090`, `RTX_4090`, `a100`) names a marketplace GPU (`RTX 4090`,
/// `A100 SXM4`): every word of the wanted name is a whole word of the GPU's name, so `A10` does
/// not match `A100`.
pub fn gpu_matches(wanted: &str, gpu_name: &str) -> bool {
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| c.is_whitespace() || c == '_' || c == '-')
            .filter(|w| !w.is_empty())
            .map(str::to_ascii_uppercase)
            .collect()
    };
    let have = words(gpu_name);
    let want = words(wanted);
    !want.is_empty() && want.iter().all(|w| have.contains(w))
}

/// Whether a country code lies in a region (a country code or a continent name).
pub fn in_region(country_code: Option<&str>, region: &str) -> bool {
    let Some(cc) = country_code else { return false };
    if cc.eq_ignore_ascii_case(region) {
        return true;
    }
    let members: &[&str] = match region.to_ascii_lowercase().as_str() {
        "europe" | "eu" => &[
            "AT", "BE", "BG", "CH", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GB", "GR", "HR", "HU",
            "IE", "IS", "IT", "LT", "LU", "LV", "MT", "NL", "NO", "PL", "PT", "RO", "RS", "SE", "SI", "SK",
            "UA", "UK",
        ],
        "north america" | "northamerica" | "na" => &["US", "CA", "MX"],
        "south america" | "southamerica" | "sa" => &["AR", "BR", "CL", "CO", "PE", "UY"],
        "asia" => &["CN", "HK", "ID", "IN", "IL", "JP", "KR", "MY", "PH", "SG", "TH", "TW", "VN", "AE", "TR"],
        "oceania" => &["AU", "NZ"],
        "africa" => &["ZA", "EG", "KE", "NG", "MA"],
        _ => &[],
    };
    members.iter().any(|m| m.eq_ignore_ascii_case(cc))
}

fn reason_text(reason: Rejection, c: &Criteria) -> String {
    match reason {
        Rejection::ExcludedMachine => "excluded machine".to_string(),
        Rejection::GpuModel => format!("GPU model not in [{}]", c.gpu_names.join(", ")),
        Rejection::GpuCount => format!("GPU count not {}", c.num_gpus),
        Rejection::Vram => format!("VRAM below {} GB", c.min_vram_gb),
        Rejection::Disk => format!("disk below {} GB", c.min_disk_gb),
        Rejection::Unverified => "unverified machine".to_string(),
        Rejection::Region => format!("outside [{}]", c.regions.join(", ")),
        Rejection::Reliability => format!("reliability below {}", c.min_reliability),
        Rejection::Price => format!("price above ${:.2}/h", c.max_price_per_hour),
    }
}

fn describe_rejections(rejected: &Rejections, c: &Criteria) -> String {
    rejected
        .0
        .iter()
        .map(|(reason, n)| format!("{n} {}", reason_text(*reason, c)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_empty(considered: usize, c: &Criteria, rejected: &Rejections) -> String {
    if considered == 0 {
        return "the search returned no offers".to_string();
    }
    format!("all {considered} offers rejected: {}", describe_rejections(rejected, c))
}

fn explain(
    o: &Offer,
    rank: usize,
    same_rank: usize,
    candidates: usize,
    considered: usize,
    c: &Criteria,
    rejected: &Rejections,
) -> String {
    let wanted = if c.gpu_names.is_empty() { &c.preferred_gpus } else { &c.gpu_names };
    let why_model = match wanted.get(rank) {
        Some(name) if rank == 0 => format!("first-choice GPU {name}"),
        Some(name) => format!("choice {} GPU {name} (no offer for a more preferred model)", rank + 1),
        None => "any GPU model".to_string(),
    };
    let mut text = format!(
        "offer {} ({}x {}, {:.0} GB, ${:.3}/h, reliability {:.3}, {}) won: {why_model}, cheapest of {same_rank}; \
         {candidates} of {considered} offers matched",
        o.id,
        o.num_gpus,
        o.gpu_name,
        o.vram_gb,
        o.price_per_hour,
        o.reliability,
        o.geolocation.as_deref().unwrap_or("unknown location"),
    );
    if rejected.total() > 0 {
        text.push_str(&format!(", rejected {}", describe_rejections(rejected, c)));
    }
    text
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(id: i64, gpu: &str, price: f64, reliability: f64) -> Offer {
        Offer {
            id,
            machine_id: id * 10,
            host_id: Some(1),
            gpu_name: gpu.to_string(),
            num_gpus: 1,
            vram_gb: 24.0,
            price_per_hour: price,
            reliability,
            geolocation: Some("Texas, US".to_string()),
            country_code: Some("US".to_string()),
            verified: true,
            disk_gb: 200.0,
            cuda_max_good: Some(12.4),
            inet_down_mbps: Some(1000.0),
            direct_port_count: Some(10),
            score: Some(100.0),
        }
    }

    fn criteria() -> Criteria {
        Criteria {
            gpu_names: vec![],
            preferred_gpus: vec![],
            num_gpus: 1,
            min_vram_gb: 24.0,
            max_price_per_hour: 4.5,
            min_reliability: 0.95,
            regions: vec![],
            verified_only: true,
            min_disk_gb: 64.0,
            excluded_machine_ids: vec![],
        }
    }

    struct Case {
        name: &'static str,
        offers: Vec<Offer>,
        criteria: Criteria,
        want: Result<i64, &'static [(Rejection, usize)]>,
    }

    fn with(mut o: Offer, f: impl FnOnce(&mut Offer)) -> Offer {
        f(&mut o);
        o
    }

    fn cases() -> Vec<Case> {
        let c = criteria();
        vec![
            Case {
                name: "cheapest wins without preferences",
                offers: vec![offer(1, "RTX 4090", 0.6, 0.99), offer(2, "A100 SXM4", 0.5, 0.99)],
                criteria: c.clone(),
                want: Ok(2),
            },
            Case {
                name: "job's GPU order beats price",
                offers: vec![offer(1, "RTX 4090", 0.6, 0.99), offer(2, "A100 SXM4", 0.5, 0.99)],
                criteria: Criteria { gpu_names: vec!["4090".into(), "A100".into()], ..c.clone() },
                want: Ok(1),
            },
            Case {
                name: "second choice when the first has no offer",
                offers: vec![offer(2, "A100 SXM4", 0.9, 0.99), offer(3, "RTX 3090", 0.2, 0.99)],
                criteria: Criteria { gpu_names: vec!["RTX_4090".into(), "A100".into()], ..c.clone() },
                want: Ok(2),
            },
            Case {
                name: "operator preference orders models when the job names none",
                offers: vec![offer(1, "RTX 3090", 0.2, 0.99), offer(2, "A100 PCIE", 0.9, 0.99)],
                criteria: Criteria { preferred_gpus: vec!["A100".into()], ..c.clone() },
                want: Ok(2),
            },
            Case {
                name: "A10 does not match A100",
                offers: vec![offer(1, "A100 SXM4", 0.2, 0.99), offer(2, "A10", 0.3, 0.99)],
                criteria: Criteria { gpu_names: vec!["A10".into()], ..c.clone() },
                want: Ok(2),
            },
            Case {
                name: "tie on price goes to higher reliability",
                offers: vec![offer(1, "RTX 4090", 0.5, 0.96), offer(2, "RTX 4090", 0.5, 0.99)],
                criteria: c.clone(),
                want: Ok(2),
            },
            Case {
                name: "full tie goes to the lowest offer id, whatever the input order",
                offers: vec![offer(9, "RTX 4090", 0.5, 0.99), offer(4, "RTX 4090", 0.5, 0.99)],
                criteria: c.clone(),
                want: Ok(4),
            },
            Case {
                name: "excluded machine is skipped even when cheapest",
                offers: vec![offer(1, "RTX 4090", 0.3, 0.99), offer(2, "RTX 4090", 0.5, 0.99)],
                criteria: Criteria { excluded_machine_ids: vec![10], ..c.clone() },
                want: Ok(2),
            },
            Case {
                name: "region by country code and by continent",
                offers: vec![
                    offer(1, "RTX 4090", 0.3, 0.99),
                    with(offer(2, "RTX 4090", 0.5, 0.99), |o| o.country_code = Some("DE".into())),
                ],
                criteria: Criteria { regions: vec!["Europe".into()], ..c.clone() },
                want: Ok(2),
            },
            Case {
                name: "nothing matches: one reason per offer",
                offers: vec![
                    offer(1, "RTX 4090", 9.0, 0.99),
                    offer(2, "RTX 4090", 0.5, 0.5),
                    with(offer(3, "RTX 4090", 0.5, 0.99), |o| o.vram_gb = 12.0),
                    with(offer(4, "RTX 4090", 0.5, 0.99), |o| o.num_gpus = 2),
                    with(offer(5, "RTX 4090", 0.5, 0.99), |o| o.verified = false),
                    with(offer(6, "RTX 4090", 0.5, 0.99), |o| o.disk_gb = 10.0),
                    offer(7, "RTX 4090", 0.5, 0.99),
                ],
                criteria: Criteria { excluded_machine_ids: vec![70], ..c.clone() },
                want: Err(&[
                    (Rejection::ExcludedMachine, 1),
                    (Rejection::GpuCount, 1),
                    (Rejection::Vram, 1),
                    (Rejection::Disk, 1),
                    (Rejection::Unverified, 1),
                    (Rejection::Reliability, 1),
                    (Rejection::Price, 1),
                ]),
            },
            Case {
                name: "the first broken rule counts, not every broken rule",
                offers: vec![offer(1, "RTX 3090", 9.0, 0.1)],
                criteria: Criteria { gpu_names: vec!["4090".into()], ..c.clone() },
                want: Err(&[(Rejection::GpuModel, 1)]),
            },
            Case { name: "empty search", offers: vec![], criteria: c.clone(), want: Err(&[]) },
        ]
    }

    #[test]
    fn table() {
        for case in cases() {
            let got = select_offer(&case.offers, &case.criteria);
            match (got, case.want) {
                (Ok(sel), Ok(id)) => {
                    assert_eq!(sel.offer.id, id, "{}: {}", case.name, sel.explanation);
                    assert_eq!(sel.candidates + sel.rejected.total(), case.offers.len(), "{}", case.name);
                }
                (Err(err), Err(want)) => {
                    let want: BTreeMap<_, _> = want.iter().copied().collect();
                    assert_eq!(err.rejected.0, want, "{}", case.name);
                    assert_eq!(err.considered, case.offers.len(), "{}", case.name);
                }
                (got, want) => panic!("{}: got {got:?}, want {want:?}", case.name),
            }
        }
    }

    #[test]
    fn nothing_matches_lists_why() {
        let offers = vec![
            offer(1, "RTX 4090", 9.0, 0.99),
            offer(2, "RTX 4090", 8.0, 0.99),
            offer(3, "RTX 4090", 1.0, 0.5),
        ];
        let err = select_offer(&offers, &criteria()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no offer matches the requirements: all 3 offers rejected: 1 reliability below 0.95, \
             2 price above $4.50/h"
        );
        let err = select_offer(&[], &criteria()).unwrap_err();
        assert_eq!(err.to_string(), "no offer matches the requirements: the search returned no offers");
    }

    #[test]
    fn explanation_says_why_it_won_and_what_was_rejected() {
        let offers = vec![
            offer(1, "RTX 4090", 0.40, 0.99),
            offer(2, "RTX 4090", 0.45, 0.99),
            offer(3, "A100 SXM4", 0.30, 0.99),
            offer(4, "RTX 4090", 9.0, 0.99),
        ];
        let c = Criteria { gpu_names: vec!["4090".into(), "A100".into()], ..criteria() };
        let sel = select_offer(&offers, &c).unwrap();
        assert_eq!(
            sel.explanation,
            "offer 1 (1x RTX 4090, 24 GB, $0.400/h, reliability 0.990, Texas, US) won: first-choice GPU 4090, \
             cheapest of 2; 3 of 4 offers matched, rejected 1 price above $4.50/h"
        );
    }

    #[test]
    fn criteria_take_operator_defaults() {
        let config =
            ProviderConfig::from_lookup(|k| (k == "VASTAI_API_KEY").then(|| "k".to_string())).unwrap();
        let req = MachineRequirements::default();
        let c = Criteria::from_requirements(&req, &config, &[7]);
        assert_eq!(c.max_price_per_hour, 4.5);
        assert_eq!(c.min_vram_gb, 24.0);
        assert_eq!(c.min_disk_gb, 64.0);
        assert_eq!(c.min_reliability, 0.95);
        assert_eq!(c.excluded_machine_ids, vec![7]);
    }

    #[test]
    fn gpu_names_match_by_whole_words() {
        assert!(gpu_matches("4090", "RTX 4090"));
        assert!(gpu_matches("rtx_4090", "RTX 4090"));
        assert!(gpu_matches("A100", "A100 SXM4"));
        assert!(!gpu_matches("A10", "A100 SXM4"));
        assert!(!gpu_matches("", "RTX 4090"));
    }
}
