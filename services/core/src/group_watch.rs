//! Watchdog for a consumer that is subscribed but never gets back into its group.
//!
//! When the broker stops answering for longer than the session timeout, librdkafka loses its
//! assignment and rejoins. Should that join never settle (first seen on the former local
//! broker, whose coordinator kept the consumer's previous member id as leader so that every
//! SyncGroup failed, for over 9 minutes measured), the consumer would sit subscribed with no
//! partitions and no error. A fresh consumer (new client, new member id) gets assigned. So when
//! the group has been unsettled with an empty assignment for longer than `stall`, the runner
//! replaces its consumer; a member legitimately left without partitions (more members than
//! partitions) is settled (`steady`) and never triggers it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::statistics::ConsumerGroup;

pub struct GroupWatch {
    stall: Duration,
    unsettled_since: Mutex<Option<Instant>>,
}

impl GroupWatch {
    pub fn new(stall: Duration) -> Self {
        GroupWatch {
            stall,
            unsettled_since: Mutex::new(None),
        }
    }

    /// Records what librdkafka's statistics say about the group membership.
    pub fn observe(&self, cgrp: &ConsumerGroup, now: Instant) {
        let settled = cgrp.join_state == "steady" || cgrp.assignment_size > 0;
        let mut since = self.since();
        *since = match (settled, *since) {
            (true, _) => None,
            (false, Some(t)) => Some(t),
            (false, None) => Some(now),
        };
    }

    /// True when the membership has been unsettled without partitions for longer than the
    /// stall limit.
    pub fn stalled(&self, now: Instant) -> bool {
        self.since()
            .is_some_and(|t| now.saturating_duration_since(t) > self.stall)
    }

    /// Forgets the observation, for a consumer that was just replaced.
    pub fn reset(&self) {
        *self.since() = None;
    }

    fn since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.unsettled_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cgrp(join_state: &str, assigned: i32) -> ConsumerGroup {
        ConsumerGroup {
            join_state: join_state.to_string(),
            assignment_size: assigned,
            ..ConsumerGroup::default()
        }
    }

    #[test]
    fn only_a_long_unsettled_empty_membership_is_a_stall() {
        let w = GroupWatch::new(Duration::from_secs(60));
        let t0 = Instant::now();
        w.observe(&cgrp("wait-sync", 0), t0);
        assert!(!w.stalled(t0 + Duration::from_secs(59)));
        // Still cycling through join states: the first observation counts.
        w.observe(&cgrp("wait-join", 0), t0 + Duration::from_secs(30));
        assert!(w.stalled(t0 + Duration::from_secs(61)));
        // Settling clears it, and a new episode starts from its own first observation.
        w.observe(&cgrp("steady", 0), t0 + Duration::from_secs(62));
        assert!(!w.stalled(t0 + Duration::from_secs(200)));
        w.observe(&cgrp("wait-join", 0), t0 + Duration::from_secs(200));
        assert!(!w.stalled(t0 + Duration::from_secs(250)));
        w.reset();
        assert!(!w.stalled(t0 + Duration::from_secs(1000)));
    }

    #[test]
    fn a_rebalance_that_keeps_partitions_or_settles_empty_is_no_stall() {
        let w = GroupWatch::new(Duration::from_secs(1));
        let t0 = Instant::now();
        w.observe(&cgrp("wait-sync", 3), t0);
        assert!(!w.stalled(t0 + Duration::from_secs(10)));
        w.observe(&cgrp("steady", 0), t0);
        assert!(!w.stalled(t0 + Duration::from_secs(10)));
    }
}
