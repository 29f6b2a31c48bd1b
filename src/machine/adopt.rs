//! Finding the machine of a rent whose answer was lost, once for both front ends: the rent call
//! was made with the machine's label, so the label finds it. Of several (a rent retried while
//! the first one's answer was lost), the oldest is kept and the rest destroyed; the key, attached
//! after the rent call, is attached again. A machine that does not show up within the grace
//! period was never rented.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::decide::choose_survivor;
use crate::provider::{Error, GpuProvider, Instance, InstanceId, InstanceState};

/// A provider call of the adoption failed.
#[derive(Debug, thiserror::Error)]
#[error("failed to {operation}")]
pub struct AdoptError {
    pub operation: &'static str,
    #[source]
    pub source: Error,
}

fn adopt_err(operation: &'static str) -> impl FnOnce(Error) -> AdoptError {
    move |source| AdoptError { operation, source }
}

/// The machine kept, and the duplicates destroyed.
#[derive(Clone, Debug)]
pub struct Adopted {
    pub survivor: Instance,
    pub destroyed: Vec<InstanceId>,
}

/// Looks for the machines carrying `label`; keeps the oldest (its key attached again), destroys
/// the others. `None` when the provider lists none.
pub async fn adopt_by_label(
    provider: &dyn GpuProvider,
    label: &str,
    public_key_openssh: &str,
) -> Result<Option<Adopted>, AdoptError> {
    let found =
        provider.list_instances_by_label(label).await.map_err(adopt_err("list instances by label"))?;
    let live: Vec<Instance> = found.into_iter().filter(|i| i.state != InstanceState::Released).collect();
    let Some(survivor) = choose_survivor(&live).cloned() else { return Ok(None) };
    let mut destroyed = Vec::new();
    for duplicate in live.iter().filter(|i| i.id != survivor.id) {
        provider.destroy_instance(duplicate.id).await.map_err(adopt_err("destroy a duplicate instance"))?;
        destroyed.push(duplicate.id);
    }
    provider
        .attach_ssh_key(survivor.id, public_key_openssh)
        .await
        .map_err(adopt_err("attach the SSH key to an adopted instance"))?;
    Ok(Some(Adopted { survivor, destroyed }))
}

/// Time left before a rent that no listing shows is taken as never made; `None` once the grace
/// period has passed. Pure.
pub fn pending_grace_left(since: DateTime<Utc>, grace: Duration, now: DateTime<Utc>) -> Option<Duration> {
    let elapsed = (now - since).to_std().unwrap_or_default();
    grace.checked_sub(elapsed).filter(|left| !left.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn an_unseen_rent_is_given_up_after_the_grace_period() {
        let since = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let grace = Duration::from_secs(60);
        assert_eq!(
            pending_grace_left(since, grace, since + chrono::Duration::seconds(20)),
            Some(Duration::from_secs(40))
        );
        assert_eq!(pending_grace_left(since, grace, since + chrono::Duration::seconds(60)), None);
        assert_eq!(pending_grace_left(since, grace, since + chrono::Duration::seconds(90)), None);
        // A clock that went back does not end the wait early.
        assert_eq!(pending_grace_left(since, grace, since - chrono::Duration::seconds(5)), Some(grace));
    }
}
