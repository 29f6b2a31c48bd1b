//! What the driver remembers of a job between passes, in memory only (a restart rebuilds it
//! from status and the machine's files): the trainer's monitor, bound to the machine it
//! follows, and when it last polled.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::monitor::poller::TrainingMonitor;

#[derive(Default)]
pub struct JobMemory {
    /// The monitor and the machine whose trainer it follows.
    pub monitor: Option<(String, TrainingMonitor)>,
    /// When the trainer was last polled.
    pub last_poll: Option<DateTime<Utc>>,
}

impl JobMemory {
    /// Forgets everything read from the machine (it is gone or replaced).
    pub fn forget(&mut self) {
        self.monitor = None;
        self.last_poll = None;
    }

    /// How long until the next poll is due, when the last one was less than `every` ago (give or
    /// take a second). A pass woken early (by the job's own status write, a change of its
    /// machine) then waits instead of polling the machine a second time in the interval.
    pub fn poll_due_in(&self, every: Duration, now: DateTime<Utc>) -> Option<Duration> {
        let since = (now - self.last_poll?).to_std().ok()?;
        every.checked_sub(since).filter(|left| *left > Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_poll_is_not_repeated_within_the_interval() {
        let every = Duration::from_secs(60);
        let start = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let ms = |n: i64| start + chrono::Duration::milliseconds(n);
        let mut memory = JobMemory::default();
        assert_eq!(memory.poll_due_in(every, start), None, "never polled: poll now");
        memory.last_poll = Some(start);
        // Woken by our own status write right after the poll: wait for the rest of the interval.
        assert_eq!(memory.poll_due_in(every, ms(200)), Some(Duration::from_millis(59_800)));
        assert_eq!(memory.poll_due_in(every, ms(59_500)), None, "due within a second");
        assert_eq!(memory.poll_due_in(every, ms(61_000)), None);
        memory.forget();
        assert_eq!(memory.poll_due_in(every, ms(1_000)), None, "a new machine is polled at once");
    }
}
