//! A bounded memory of what was accepted lately, so a captured stamp or datagram is accepted
//! once: anything outside a freshness window around this host's clock is stale, anything
//! inside it is accepted only if its (time, nonce) has not been seen.
//!
//! Memory is bounded by a capacity, not by the senders' good behaviour. When more fresh items
//! arrive than it holds, the oldest are forgotten and everything at or before the newest
//! forgotten time is refused from then on (it might be one of the forgotten ones). So a flood
//! can make this host refuse late but honest items early; it can never make it accept a
//! replay. It does not check macs: callers only remember items whose mac they checked.

use std::collections::BTreeSet;

use super::auth::Refusal;

pub struct ReplayCache {
    /// How far an item's time may be from now, in the caller's unit (seconds or milliseconds).
    window: u64,
    capacity: usize,
    /// Accepted items in time order, so both expiry and eviction take from the front.
    seen: BTreeSet<(u64, [u8; 16])>,
    /// Items at or before this time may have been forgotten early: they are refused.
    floor: Option<u64>,
}

impl ReplayCache {
    pub fn new(window: u64, capacity: usize) -> Self {
        Self {
            window,
            capacity: capacity.max(1),
            seen: BTreeSet::new(),
            floor: None,
        }
    }

    /// Accepts the item made at `when` with `nonce` if it is fresh at `now` and new.
    pub fn admit(&mut self, when: u64, nonce: [u8; 16], now: u64) -> Result<(), Refusal> {
        if when.abs_diff(now) > self.window {
            return Err(Refusal::Stale);
        }
        // Whatever is older than the window would be refused as stale anyway.
        self.seen = self
            .seen
            .split_off(&(now.saturating_sub(self.window), [0; 16]));
        if self.floor.is_some_and(|floor| when <= floor) {
            return Err(Refusal::Stale);
        }
        if !self.seen.insert((when, nonce)) {
            return Err(Refusal::Replayed);
        }
        if self.seen.len() > self.capacity {
            if let Some((oldest, _)) = self.seen.pop_first() {
                self.floor = Some(self.floor.map_or(oldest, |f| f.max(oldest)));
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonce(i: u8) -> [u8; 16] {
        [i; 16]
    }

    #[test]
    fn an_item_is_accepted_once_and_only_while_fresh() {
        let mut cache = ReplayCache::new(60, 100);
        assert_eq!(cache.admit(1000, nonce(1), 1000), Ok(()));
        assert_eq!(cache.admit(1000, nonce(1), 1030), Err(Refusal::Replayed));
        assert_eq!(cache.admit(1000, nonce(2), 1030), Ok(()), "another nonce");
        assert_eq!(cache.admit(1000, nonce(1), 1061), Err(Refusal::Stale));
        assert_eq!(cache.admit(1200, nonce(3), 1100), Err(Refusal::Stale));
        assert_eq!(cache.len(), 2);
        cache.admit(1100, nonce(4), 1100).unwrap();
        assert_eq!(cache.len(), 1, "expired items are forgotten");
    }

    #[test]
    fn a_full_cache_refuses_what_it_may_have_forgotten() {
        let mut cache = ReplayCache::new(60, 3);
        for (i, t) in [10u64, 11, 12, 13].into_iter().enumerate() {
            cache.admit(t, nonce(i as u8), 20).unwrap();
        }
        assert_eq!(cache.len(), 3, "bounded");
        // The item at 10 was forgotten to make room: its replay is refused all the same.
        assert_eq!(cache.admit(10, nonce(0), 20), Err(Refusal::Stale));
        assert_eq!(cache.admit(10, nonce(9), 20), Err(Refusal::Stale));
        assert_eq!(cache.admit(11, nonce(1), 20), Err(Refusal::Replayed));
        assert_eq!(cache.admit(14, nonce(9), 20), Ok(()));
    }
}
