//! When open holds expire. Sharded so that reservations made on different threads rarely meet on
//! one lock; each shard is a min-heap on expiry time.
//!
//! Entries are not removed when a reservation resolves early: the sweeper skips those (an `Expire`
//! of a resolved reservation does nothing), which keeps the hot path to one push per reservation.

use std::{cmp::Reverse, collections::BinaryHeap};

use parking_lot::Mutex;

use super::ReservationId;

const SHARDS: usize = 16;

/// Holds by expiry time, earliest first.
type Shard = Mutex<BinaryHeap<Reverse<(u64, ReservationId)>>>;

pub struct ExpiryQueue {
    shards: [Shard; SHARDS],
}

impl ExpiryQueue {
    pub fn new() -> Self {
        Self { shards: std::array::from_fn(|_| Mutex::new(BinaryHeap::new())) }
    }

    pub fn push(&self, expires_at_ms: u64, reservation: ReservationId) {
        let shard = reservation.seq as usize % SHARDS;
        self.shards[shard].lock().push(Reverse((expires_at_ms, reservation)));
    }

    /// Removes and returns up to `max` reservations whose expiry is at or before `now`.
    pub fn pop_due(&self, now: u64, max: usize) -> Vec<ReservationId> {
        let mut due = Vec::new();
        for shard in &self.shards {
            let mut heap = shard.lock();
            while due.len() < max {
                match heap.peek() {
                    Some(Reverse((at, _))) if *at <= now => due.push(heap.pop().expect("peeked").0.1),
                    _ => break,
                }
            }
        }
        due
    }
}

impl Default for ExpiryQueue {
    fn default() -> Self {
        Self::new()
    }
}
