//! A per-endpoint minimum-interval limiter. Vast.ai rate-limits each endpoint separately by
//! enforcing a minimum time between calls, so spacing our own calls avoids most 429s instead of
//! provoking them and backing off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Hands out send slots at least `interval` apart per endpoint. Slots are reserved under a short
/// lock and waited for outside it, so concurrent callers queue in order without holding the lock
/// across an await.
#[derive(Debug)]
pub struct Limiter {
    interval: Duration,
    next_free: Mutex<HashMap<&'static str, Instant>>,
}

impl Limiter {
    pub fn new(interval: Duration) -> Self {
        Self { interval, next_free: Mutex::new(HashMap::new()) }
    }

    /// Waits until a call to `endpoint` may be sent.
    pub async fn acquire(&self, endpoint: &'static str) {
        if self.interval.is_zero() {
            return;
        }
        let slot = {
            // A poisoned lock only means another caller panicked mid-update; the map is still a
            // valid set of instants.
            let mut next_free = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = next_free.get(endpoint).copied().filter(|t| *t > now).unwrap_or(now);
            next_free.insert(endpoint, slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_to_one_endpoint_are_spaced() {
        let interval = Duration::from_millis(100);
        let limiter = Limiter::new(interval);
        let start = Instant::now();
        limiter.acquire("a").await;
        limiter.acquire("a").await;
        limiter.acquire("a").await;
        // A lower bound only: sleeping never ends early.
        assert!(start.elapsed() >= 2 * interval, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn other_endpoints_are_not_held_up() {
        let limiter = Limiter::new(Duration::from_secs(3600));
        limiter.acquire("a").await;
        // Sharing slots with "a" would wait an hour; the generous timeout only catches that.
        tokio::time::timeout(Duration::from_secs(30), limiter.acquire("b")).await.unwrap();
    }
}
