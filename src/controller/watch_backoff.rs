//! How soon the controllers watch again after the API server went away.
//!
//! kube-rs follows client-go: waits from 0.8 s doubling up to 30 s, kind to an API server that is
//! struggling under many clients. This operator is one client with one leader, and a job applied
//! while it waits is not seen: after a restart of the API server (an upgrade of a managed
//! control plane) new jobs waited up to half a minute. Waits here double from 0.5 s up to 5 s,
//! and start over once a watch delivers again.

use std::time::Duration;

use kube::runtime::utils::Backoff;

const FIRST: Duration = Duration::from_millis(500);
const LONGEST: Duration = Duration::from_secs(5);

/// Doubling waits from [`FIRST`] to [`LONGEST`]; never gives up.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next;
        self.next = (self.next * 2).min(LONGEST);
        Some(wait)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_five_seconds_and_start_over_after_a_reset() {
        let mut backoff = WatchBackoff::default();
        let waits: Vec<u64> = backoff.by_ref().take(6).map(|d| d.as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(FIRST));
    }
}
