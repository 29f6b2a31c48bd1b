//! One provider listing shared by every GpuInstance's state check, so the provider sees a
//! number of requests per minute that does not grow with the number of rented machines: each
//! check reads a listing at most `max_age` old, and only one check at a time refreshes it.
//! A check says how old a listing it accepts: a booting machine wants a fresh one (the boot
//! poll), a running one is checked once per liveness poll and accepts half of that. Otherwise
//! the running machines' checks, spread over the liveness interval, would refresh the listing
//! every boot poll, and with Vast.ai's 25 instances per page a listing of hundreds of machines
//! takes seconds of paging.
//!
//! A machine missing from the listing is confirmed with a direct call before anything is
//! concluded from its absence: listings are eventually consistent, and "gone" makes the
//! operator rent a replacement.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::provider::{GpuProvider, Instance, InstanceId, Result};

/// Instances by id, as of one listing.
type Listing = Arc<HashMap<InstanceId, Instance>>;

/// A cached `list_instances`, refreshed on demand.
pub struct SharedListing {
    provider: Arc<dyn GpuProvider>,
    max_age: Duration,
    cached: Mutex<Option<(Instant, Listing)>>,
}

impl SharedListing {
    pub fn new(provider: Arc<dyn GpuProvider>, max_age: Duration) -> Self {
        Self { provider, max_age, cached: Mutex::new(None) }
    }

    /// The instance as the provider reports it; `None` when the provider does not know it.
    pub async fn get(&self, id: InstanceId) -> Result<Option<Instance>> {
        self.get_within(id, self.max_age).await
    }

    /// Like [`Self::get`], from a listing at most `max_age` old.
    pub async fn get_within(&self, id: InstanceId, max_age: Duration) -> Result<Option<Instance>> {
        if let Some(instance) = self.listing(max_age).await?.get(&id) {
            return Ok(Some(instance.clone()));
        }
        match self.provider.get_instance(id).await {
            Ok(instance) => Ok(Some(instance)),
            Err(err) if err.is_not_found() => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn listing(&self, max_age: Duration) -> Result<Listing> {
        // Held across the request: concurrent checks wait for one refresh instead of each
        // listing on their own.
        let mut cached = self.cached.lock().await;
        if let Some((at, listing)) = cached.as_ref()
            && at.elapsed() < max_age
        {
            return Ok(listing.clone());
        }
        let listing: Listing =
            Arc::new(self.provider.list_instances().await?.into_iter().map(|i| (i.id, i)).collect());
        *cached = Some((Instant::now(), listing.clone()));
        Ok(listing)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use async_trait::async_trait;

    use super::*;
    use crate::provider::{Error, InstanceState, LaunchRequest, Offer, OfferQuery};

    /// A provider that knows some instances and counts calls.
    #[derive(Default)]
    struct Counting {
        instances: StdMutex<Vec<InstanceId>>,
        calls: StdMutex<Vec<&'static str>>,
    }

    impl Counting {
        fn add(&self, id: i64) -> InstanceId {
            self.instances.lock().unwrap().push(InstanceId(id));
            InstanceId(id)
        }
        fn calls(&self, name: &str) -> usize {
            self.calls.lock().unwrap().iter().filter(|c| **c == name).count()
        }
        fn instance(id: InstanceId) -> Instance {
            Instance { id, state: InstanceState::Running, ..Instance::default() }
        }
    }

    #[async_trait]
    impl GpuProvider for Counting {
        async fn check_credentials(&self) -> Result<()> {
            Ok(())
        }
        async fn search_offers(&self, _: &OfferQuery) -> Result<Vec<Offer>> {
            Ok(vec![])
        }
        async fn create_instance(&self, _: &LaunchRequest) -> Result<InstanceId> {
            Err(Error::NotFound { what: "create".into() })
        }
        async fn get_instance(&self, id: InstanceId) -> Result<Instance> {
            self.calls.lock().unwrap().push("get_instance");
            let known = self.instances.lock().unwrap().contains(&id);
            if known {
                Ok(Self::instance(id))
            } else {
                Err(Error::NotFound { what: format!("instance {id}") })
            }
        }
        async fn list_instances(&self) -> Result<Vec<Instance>> {
            self.calls.lock().unwrap().push("list_instances");
            Ok(self.instances.lock().unwrap().iter().map(|id| Self::instance(*id)).collect())
        }
        async fn list_instances_by_label(&self, _: &str) -> Result<Vec<Instance>> {
            Ok(vec![])
        }
        async fn destroy_instance(&self, _: InstanceId) -> Result<()> {
            Ok(())
        }
        async fn set_label(&self, _: InstanceId, _: &str) -> Result<()> {
            Ok(())
        }
        async fn attach_ssh_key(&self, _: InstanceId, _: &str) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn many_checks_share_one_listing_until_it_is_too_old() {
        let provider = Arc::new(Counting::default());
        let ids: Vec<InstanceId> = (0..50).map(|i| provider.add(i)).collect();
        let listing = SharedListing::new(provider.clone(), Duration::from_millis(300));
        for id in &ids {
            assert_eq!(listing.get(*id).await.unwrap().map(|i| i.state), Some(InstanceState::Running));
        }
        assert_eq!(provider.calls("list_instances"), 1);
        assert_eq!(provider.calls("get_instance"), 0);
        tokio::time::sleep(Duration::from_millis(400)).await;
        listing.get(ids[0]).await.unwrap();
        assert_eq!(provider.calls("list_instances"), 2);
    }

    #[tokio::test]
    async fn a_check_that_accepts_an_older_listing_does_not_refresh_it() {
        let provider = Arc::new(Counting::default());
        let id = provider.add(1);
        let listing = SharedListing::new(provider.clone(), Duration::from_millis(100));
        listing.get(id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A running machine's check accepts it...
        listing.get_within(id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(provider.calls("list_instances"), 1);
        // ...a booting machine's does not.
        listing.get(id).await.unwrap();
        assert_eq!(provider.calls("list_instances"), 2);
    }

    #[tokio::test]
    async fn an_instance_missing_from_the_listing_is_confirmed_directly() {
        let provider = Arc::new(Counting::default());
        let listing = SharedListing::new(provider.clone(), Duration::from_secs(5));
        listing.get(InstanceId(1)).await.unwrap();
        // Rented after the listing was taken: not in it, but the provider knows it.
        let late = provider.add(7);
        assert!(listing.get(late).await.unwrap().is_some());
        assert!(listing.get(InstanceId(999_999)).await.unwrap().is_none());
        assert_eq!(provider.calls("list_instances"), 1);
        assert_eq!(provider.calls("get_instance"), 3, "each id missing from the listing is asked for once");
    }
}
