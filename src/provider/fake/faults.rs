//! Injectable faults. Set at start-up (`--fault JSON`), at run time (`POST /_fake/faults`) or
//! from Rust ([`FakeServer::add_fault`](super::FakeServer::add_fault)). Faults that count down
//! are consumed by matching requests, so a test knows exactly how many requests fail.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::state::ForcedState;

/// One fault, as JSON `{"kind": "...", ...}`. `endpoint` (when given) restricts a fault to one
/// endpoint name (`create_instance`, `show_instance`, `list_instances`, `search_offers`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// The next `count` requests answer `status` (e.g. a burst of 502/503/504, or a 500).
    ErrorBurst {
        status: u16,
        count: u32,
        #[serde(default)]
        endpoint: Option<String>,
    },
    /// The next `count` requests answer 429, with `Retry-After` when given.
    RateLimit {
        count: u32,
        #[serde(default)]
        retry_after_secs: Option<u64>,
        #[serde(default)]
        endpoint: Option<String>,
    },
    /// The next `count` requests are answered only after `delay_ms` (the request takes effect
    /// at once; only the answer is late).
    Slow {
        delay_ms: u64,
        count: u32,
        #[serde(default)]
        endpoint: Option<String>,
    },
    /// The next `count` creates rent the offer yet answer `status`; with `report_contract` the
    /// error body still carries `new_contract` (as Vast.ai sometimes does), without it the
    /// contract can only be found by its label.
    CreateLeavesContract {
        count: u32,
        #[serde(default = "default_fail_status")]
        status: u16,
        #[serde(default = "default_true")]
        report_contract: bool,
    },
    /// Instance `id` takes `state` after `after_secs` (an instance that dies, goes offline or is
    /// outbid mid-run). Applied once, when the fault is added.
    InstanceBecomes {
        id: i64,
        state: ForcedState,
        #[serde(default)]
        after_secs: f64,
    },
    /// Every instance, present and future, takes `state` `after_running_secs` after it started
    /// running. Replaces an earlier fault of this kind.
    InstancesBecome { state: ForcedState, after_running_secs: f64 },
}

fn default_fail_status() -> u16 {
    500
}

fn default_true() -> bool {
    true
}

/// What the faults decide for one request.
#[derive(Debug, Default, PartialEq)]
pub struct Decision {
    pub delay: Option<Duration>,
    pub error_status: Option<u16>,
    pub rate_limited: Option<Option<u64>>,
}

/// The active, counting faults.
#[derive(Debug, Default)]
pub struct Faults {
    pub active: Vec<Fault>,
}

fn applies(endpoint: &Option<String>, name: &str) -> bool {
    endpoint.as_deref().is_none_or(|e| e == name)
}

impl Faults {
    /// Consumes the faults that match a request to `name` and says what to do.
    pub fn decide(&mut self, name: &str) -> Decision {
        let mut decision = Decision::default();
        for fault in &mut self.active {
            let answered = decision.error_status.is_some() || decision.rate_limited.is_some();
            match fault {
                Fault::Slow { delay_ms, count, endpoint }
                    if *count > 0 && applies(endpoint, name) && decision.delay.is_none() =>
                {
                    decision.delay = Some(Duration::from_millis(*delay_ms));
                    *count -= 1;
                }
                Fault::ErrorBurst { status, count, endpoint }
                    if *count > 0 && applies(endpoint, name) && !answered =>
                {
                    decision.error_status = Some(*status);
                    *count -= 1;
                }
                Fault::RateLimit { count, retry_after_secs, endpoint }
                    if *count > 0 && applies(endpoint, name) && !answered =>
                {
                    decision.rate_limited = Some(*retry_after_secs);
                    *count -= 1;
                }
                _ => {}
            }
        }
        self.prune();
        decision
    }

    /// Consumes one create-leaves-contract fault: `(status, report_contract)`.
    pub fn take_create_failure(&mut self) -> Option<(u16, bool)> {
        let found = self.active.iter_mut().find_map(|f| match f {
            Fault::CreateLeavesContract { count, status, report_contract } if *count > 0 => {
                *count -= 1;
                Some((*status, *report_contract))
            }
            _ => None,
        });
        self.prune();
        found
    }

    /// The lifetime fault for every instance, if any.
    pub fn lifetime(&self) -> Option<(ForcedState, Duration)> {
        self.active.iter().rev().find_map(|f| match f {
            Fault::InstancesBecome { state, after_running_secs } => {
                Some((*state, Duration::from_secs_f64(after_running_secs.max(0.0))))
            }
            _ => None,
        })
    }

    fn prune(&mut self) {
        self.active.retain(|f| match f {
            Fault::ErrorBurst { count, .. }
            | Fault::RateLimit { count, .. }
            | Fault::Slow { count, .. }
            | Fault::CreateLeavesContract { count, .. } => *count > 0,
            Fault::InstanceBecomes { .. } => false,
            Fault::InstancesBecome { .. } => true,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_count_down_per_endpoint() {
        let mut faults = Faults {
            active: vec![Fault::ErrorBurst { status: 503, count: 2, endpoint: Some("show_instance".into()) }],
        };
        assert_eq!(faults.decide("list_instances"), Decision::default());
        assert_eq!(faults.decide("show_instance").error_status, Some(503));
        assert_eq!(faults.decide("show_instance").error_status, Some(503));
        assert_eq!(faults.decide("show_instance"), Decision::default());
        assert!(faults.active.is_empty());
    }

    #[test]
    fn faults_parse_from_json() {
        let f: Fault = serde_json::from_str(r#"{"kind":"create_leaves_contract","count":1}"#).unwrap();
        assert_eq!(f, Fault::CreateLeavesContract { count: 1, status: 500, report_contract: true });
        let f: Fault =
            serde_json::from_str(r#"{"kind":"instance_becomes","id":5,"state":"outbid"}"#).unwrap();
        assert_eq!(f, Fault::InstanceBecomes { id: 5, state: ForcedState::Outbid, after_secs: 0.0 });
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"error_burst","status":503}"#).is_err());
    }
}
