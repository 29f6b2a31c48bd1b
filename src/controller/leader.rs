//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas exactly one
//! rents and releases machines.
//!
//! The rules follow client-go's leader election: a lease is held for `lease_duration`; the holder
//! renews it every `retry_period`; a candidate takes it over only once `renewTime +
//! leaseDuration` has passed. A holder that has failed to renew for `renew_deadline` (shorter than
//! the lease duration) steps down on its own, before anyone else can acquire the lease, so two
//! replicas never act at once even when the API server is unreachable. Every write is a
//! `replace` carrying the `resourceVersion` that was read, so two candidates racing for an
//! expired lease cannot both win. The decision itself is the pure function [`decide`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{from_k8s_micro_time, to_k8s_micro_time};

/// Where the lease lives and how long it is held.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// This replica's identity, usually the pod name.
    pub identity: String,
    /// How long a lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down. Must be below `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the leader renews and candidates retry.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(
        lease_name: impl Into<String>,
        namespace: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            lease_name: lease_name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a replica should do with the lease it just read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// Nobody holds a valid lease: take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds a valid lease.
    Follow { holder: String },
}

/// Decides from the lease as read (None when it does not exist yet) and the time now.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: DateTime<Utc>) -> LeaseDecision {
    let Some(spec) = spec else { return LeaseDecision::Acquire };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return LeaseDecision::Acquire;
    }
    if holder == identity {
        return LeaseDecision::Renew;
    }
    let duration = chrono::Duration::seconds(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let expired = match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(renewed) => from_k8s_micro_time(renewed) + duration <= now,
        None => true,
    };
    if expired { LeaseDecision::Acquire } else { LeaseDecision::Follow { holder } }
}

/// Errors of the elector itself (API errors while trying are retried, not returned).
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader lease {lease}: could not renew it for {elapsed:?}")]
    Lost { lease: String, elapsed: Duration },
}

/// Runs leader election until `shutdown` fires. `is_leader` is set to true once the lease is
/// ours. If the lease is lost after being held, returns `LeaderError::Lost`: the caller must stop
/// acting at once (the binary exits and Kubernetes restarts it as a candidate). On shutdown the
/// lease is released so a standby replica takes over without waiting for it to expire.
pub async fn run_elector(
    leases: Api<Lease>,
    config: LeaderConfig,
    is_leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LeaderError> {
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        let held = try_acquire_or_renew(&leases, &config).await;
        let now = tokio::time::Instant::now();
        match held {
            Ok(true) => {
                if last_renewal.is_none() {
                    info!(lease = %config.lease_name, identity = %config.identity, "Became leader");
                }
                last_renewal = Some(now);
                is_leader.send_replace(true);
            }
            Ok(false) | Err(_) => {
                if let Some(last) = last_renewal {
                    let elapsed = now.duration_since(last);
                    if elapsed >= config.renew_deadline {
                        is_leader.send_replace(false);
                        return Err(LeaderError::Lost { lease: config.lease_name.clone(), elapsed });
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.retry_period) => {}
            _ = shutdown.changed() => {
                if last_renewal.is_some() {
                    is_leader.send_replace(false);
                    release(&leases, &config).await;
                }
                return Ok(());
            }
        }
    }
}

/// One round: read the lease and acquire or renew it when [`decide`] says so. Returns whether
/// we hold the lease afterwards.
async fn try_acquire_or_renew(leases: &Api<Lease>, config: &LeaderConfig) -> Result<bool, kube::Error> {
    let now = Utc::now();
    let current = match leases.get_opt(&config.lease_name).await {
        Ok(current) => current,
        Err(err) => {
            warn!(lease = %config.lease_name, error = %err, "Could not read the leader lease");
            return Err(err);
        }
    };
    let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), &config.identity, now);
    let mut spec = current.as_ref().and_then(|l| l.spec.clone()).unwrap_or_default();
    match decision {
        LeaseDecision::Follow { .. } => return Ok(false),
        LeaseDecision::Acquire => {
            spec.holder_identity = Some(config.identity.clone());
            spec.acquire_time = Some(to_k8s_micro_time(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + i32::from(current.is_some()));
        }
        LeaseDecision::Renew => {}
    }
    spec.renew_time = Some(to_k8s_micro_time(now));
    spec.lease_duration_seconds = Some(config.lease_duration.as_secs().try_into().unwrap_or(i32::MAX));
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.lease_name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            leases.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            // The resourceVersion from the read makes this a compare-and-swap.
            lease.spec = Some(spec);
            leases.replace(&config.lease_name, &PostParams::default(), &lease).await
        }
    };
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => {
            warn!(lease = %config.lease_name, error = %err, "Could not update the leader lease");
            Err(err)
        }
    }
}

/// Gives the lease up (best effort) by clearing the holder.
async fn release(leases: &Api<Lease>, config: &LeaderConfig) {
    let Ok(Some(mut lease)) = leases.get_opt(&config.lease_name).await else { return };
    let Some(spec) = lease.spec.as_mut() else { return };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    match leases.replace(&config.lease_name, &PostParams::default(), &lease).await {
        Ok(_) => info!(lease = %config.lease_name, "Released the leader lease"),
        Err(err) => warn!(lease = %config.lease_name, error = %err, "Could not release the leader lease"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn lease(holder: &str, renewed_at: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(to_k8s_micro_time(at(renewed_at))),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }
    }

    #[test]
    fn missing_or_empty_lease_is_acquired() {
        assert_eq!(decide(None, "a", at(0)), LeaseDecision::Acquire);
        assert_eq!(decide(Some(&LeaseSpec::default()), "a", at(0)), LeaseDecision::Acquire);
    }

    #[test]
    fn our_lease_is_renewed() {
        assert_eq!(decide(Some(&lease("a", 0)), "a", at(100)), LeaseDecision::Renew);
    }

    #[test]
    fn someone_elses_valid_lease_is_followed_until_it_expires() {
        let l = lease("b", 0);
        assert_eq!(decide(Some(&l), "a", at(14)), LeaseDecision::Follow { holder: "b".into() });
        assert_eq!(decide(Some(&l), "a", at(15)), LeaseDecision::Acquire);
    }
}
