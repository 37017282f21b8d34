//! When open holds expire. Sharded so that reservations made on different threads rarely meet on
//! one lock; each shard keeps its holds in buckets by the millisecond they expire in.
//!
//! Entries are not removed when a reservation resolves early: the sweeper skips those (an `Expire`
//! of a resolved reservation does nothing), which keeps the hot path to one push per reservation.

use std::collections::BTreeMap;

use parking_lot::Mutex;

const SHARDS: usize = 16;

/// Holds, as (environment, seq), by the millisecond they expire in. Holds made at a steady rate with
/// one TTL are appended to a bucket per millisecond, and a sweep takes them bucket by bucket: neither
/// side sorts or compares holds one by one, which a heap would for each.
type Shard<E> = BTreeMap<u64, Vec<(E, u64)>>;

/// The environment is a handle (the ledger's cell), so that the sweep needs no lookup by name.
pub struct ExpiryQueue<E> {
    shards: [Mutex<Shard<E>>; SHARDS],
}

impl<E> ExpiryQueue<E> {
    pub fn new() -> Self {
        Self { shards: std::array::from_fn(|_| Mutex::new(BTreeMap::new())) }
    }

    pub fn push(&self, expires_at_ms: u64, seq: u64, environment: E) {
        let shard = seq as usize % SHARDS;
        self.shards[shard].lock().entry(expires_at_ms).or_default().push((environment, seq));
    }

    /// The earliest expiry queued, if any: the hold there may have resolved since.
    pub fn earliest(&self) -> Option<u64> {
        self.shards.iter().filter_map(|shard| shard.lock().first_key_value().map(|(&at, _)| at)).min()
    }

    /// Removes and returns up to `max` holds, as (environment, seq), whose expiry is at or before `now`.
    pub fn pop_due(&self, now: u64, max: usize) -> Vec<(E, u64)> {
        let mut due = Vec::new();
        for shard in &self.shards {
            let mut buckets = shard.lock();
            while due.len() < max
                && let Some(mut first) = buckets.first_entry()
                && *first.key() <= now
            {
                let bucket = first.get_mut();
                let take = bucket.len().min(max - due.len());
                due.extend(bucket.drain(bucket.len() - take..));
                if bucket.is_empty() {
                    first.remove();
                }
            }
        }
        due
    }
}

impl<E> Default for ExpiryQueue<E> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Due holds come out whatever their environment, each once, and holds not yet due stay.
    #[test]
    fn pops_what_is_due_and_keeps_the_rest() {
        let queue = ExpiryQueue::new();
        for seq in 1..=40u64 {
            queue.push(1_000 + seq % 4, seq, if seq % 2 == 0 { "a" } else { "b" });
        }
        let mut due = queue.pop_due(1_001, usize::MAX);
        due.sort_unstable();
        let mut expected: Vec<_> =
            (1..=40u64).filter(|s| s % 4 <= 1).map(|s| (if s % 2 == 0 { "a" } else { "b" }, s)).collect();
        expected.sort_unstable();
        assert_eq!(due, expected);
        assert_eq!(queue.pop_due(1_001, usize::MAX), []);
        assert_eq!(queue.pop_due(1_003, 5).len(), 5, "at most max");
        assert_eq!(queue.pop_due(1_003, usize::MAX).len(), 15);
    }

    #[test]
    fn the_earliest_expiry_is_the_smallest_across_shards() {
        let queue = ExpiryQueue::new();
        assert_eq!(queue.earliest(), None);
        for (seq, at) in [(1u64, 5_000u64), (2, 3_000), (19, 4_000)] {
            queue.push(at, seq, ());
        }
        assert_eq!(queue.earliest(), Some(3_000));
        queue.pop_due(3_000, usize::MAX);
        assert_eq!(queue.earliest(), Some(4_000));
    }
}
