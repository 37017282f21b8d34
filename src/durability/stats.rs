//! What the log writer and snapshots have done, counted in plain atomics for whoever reports on them
//! (the metrics endpoint reads them at scrape time). Nothing here knows how they are exported.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Upper bounds of the sync latency buckets, in microseconds: from a fast NVMe flush to a disk that
/// stalls for seconds. A last, unbounded bucket takes anything slower.
pub const SYNC_BUCKETS_MICROS: [u64; 14] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000];

const _: () = {
    let mut i = 1;
    while i < SYNC_BUCKETS_MICROS.len() {
        assert!(SYNC_BUCKETS_MICROS[i - 1] < SYNC_BUCKETS_MICROS[i], "bucket bounds increase");
        i += 1;
    }
};

/// The write-ahead log's counters. Appends update them under the log's append lock; syncs from the
/// writer or the background sync thread.
#[derive(Debug, Default)]
pub struct LogStats {
    records: AtomicU64,
    bytes: AtomicU64,
    syncs: LatencyBuckets,
}

impl LogStats {
    pub(super) fn appended(&self, bytes: usize) {
        self.records.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn synced(&self, took: Duration) {
        self.syncs.observe(took);
    }

    /// Records appended to the log since it was opened.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Bytes of those records, framing included.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// How long each `fdatasync` of a log segment took.
    pub fn syncs(&self) -> &LatencyBuckets {
        &self.syncs
    }
}

/// A latency histogram with the fixed buckets of [`SYNC_BUCKETS_MICROS`], updated without a lock.
#[derive(Debug, Default)]
pub struct LatencyBuckets {
    /// Per bucket, not cumulative; the last one is past every bound.
    counts: [AtomicU64; SYNC_BUCKETS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyBuckets {
    fn observe(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = SYNC_BUCKETS_MICROS.iter().position(|bound| micros <= *bound).unwrap_or(SYNC_BUCKETS_MICROS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The count of each bucket of [`SYNC_BUCKETS_MICROS`], then of the unbounded one; not cumulative.
    pub fn counts(&self) -> [u64; SYNC_BUCKETS_MICROS.len() + 1] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }

    pub fn sum_micros(&self) -> u64 {
        self.sum_micros.load(Ordering::Relaxed)
    }
}

/// The snapshots written since startup, and the last one that succeeded.
#[derive(Debug, Default)]
pub struct SnapshotStats {
    written: AtomicU64,
    failed: AtomicU64,
    last_duration_micros: AtomicU64,
    last_bytes: AtomicU64,
    last_items: AtomicU64,
    last_unix_ms: AtomicU64,
    /// Whether any snapshot succeeded yet: until then the `last_*` values mean nothing.
    any: AtomicBool,
}

/// The last snapshot that succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastSnapshot {
    pub duration: Duration,
    pub bytes: u64,
    pub items: u64,
    /// When it finished, in Unix milliseconds of the wall clock.
    pub unix_ms: u64,
}

impl SnapshotStats {
    pub(super) fn written(&self, duration: Duration, bytes: u64, items: u64) {
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64);
        self.last_duration_micros.store(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.last_bytes.store(bytes, Ordering::Relaxed);
        self.last_items.store(items, Ordering::Relaxed);
        self.last_unix_ms.store(unix_ms, Ordering::Relaxed);
        self.any.store(true, Ordering::Release);
        self.written.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn written_count(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn failed_count(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The last snapshot that succeeded, if any. Its fields are read one by one, so a snapshot that
    /// finishes meanwhile may mix with the one before; a reader sees it whole at its next look.
    pub fn last(&self) -> Option<LastSnapshot> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        Some(LastSnapshot {
            duration: Duration::from_micros(self.last_duration_micros.load(Ordering::Relaxed)),
            bytes: self.last_bytes.load(Ordering::Relaxed),
            items: self.last_items.load(Ordering::Relaxed),
            unix_ms: self.last_unix_ms.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_falls_in_the_first_bucket_whose_bound_it_does_not_pass() {
        let buckets = LatencyBuckets::default();
        buckets.observe(Duration::from_micros(49));
        buckets.observe(Duration::from_micros(50));
        buckets.observe(Duration::from_micros(51));
        buckets.observe(Duration::from_secs(6));
        let counts = buckets.counts();
        assert_eq!(counts[0], 2);
        assert_eq!(counts[1], 1);
        assert_eq!(counts[SYNC_BUCKETS_MICROS.len()], 1);
        assert_eq!(counts.iter().sum::<u64>(), 4);
        assert_eq!(buckets.sum_micros(), 49 + 50 + 51 + 6_000_000);
    }

    #[test]
    fn the_last_snapshot_is_known_only_once_one_succeeded() {
        let stats = SnapshotStats::default();
        stats.failed();
        assert_eq!(stats.last(), None);
        stats.written(Duration::from_millis(3), 4_096, 7);
        let last = stats.last().unwrap();
        assert_eq!((last.duration, last.bytes, last.items), (Duration::from_millis(3), 4_096, 7));
        assert!(last.unix_ms > 0);
        assert_eq!((stats.written_count(), stats.failed_count()), (1, 1));
    }
}
