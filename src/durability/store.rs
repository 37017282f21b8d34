//! The data directory: recovery at startup (newest valid snapshot, then the log after it), the event
//! sink that feeds the write-ahead log, and snapshots that let old log segments go.

use std::{
    any::Any,
    fs::File,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use super::{
    format::{self, DataDirListing, FormatError, SnapshotWriter},
    journal::{Durability, Journal, Unavailable},
    stats::SnapshotStats,
};
use crate::ledger::{Event, EventSink, Ledger, Levels, Limits, RestoreError, SnapshotItem, pricing::RateCard};

/// Log segments are rotated at this size.
pub const DEFAULT_MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const LOCK_FILE: &str = "LOCK";

/// Where and how state is kept.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub dir: PathBuf,
    pub durability: Durability,
    pub fsync_interval: Duration,
    pub snapshot_interval: Duration,
    pub recover_from_older_snapshot: bool,
    pub max_segment_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {}: {source}", dir.display())]
    Io { dir: PathBuf, source: std::io::Error },
    #[error("data directory {} is in use by another quotad process", .0.display())]
    Locked(PathBuf),
    #[error("{0} (start with --recover-from-older-snapshot to fall back to an older snapshot)")]
    Format(#[from] FormatError),
    #[error("{}: record {seq} cannot be decoded: {reason}", path.display())]
    Decode { path: PathBuf, seq: u64, reason: String },
    #[error(
        "the log is missing events {from}..={to}: the newest usable snapshot covers up to {covered} and the \
         log resumes at {resumes}; refusing to start from incomplete state"
    )]
    Gap { covered: u64, resumes: u64, from: u64, to: u64 },
    #[error(
        "{}: a record is cut short at byte offset {offset}, but later log segments follow; the log is \
         damaged, not torn by a crash", path.display()
    )]
    TornBeforeEnd { path: PathBuf, offset: u64 },
    #[error(
        "recovery reaches event {recovered}, but this directory's files show the state had reached event \
         {reached_before}; refusing to start from older state (is a snapshot unreadable and the log it \
         covered already removed?)"
    )]
    Incomplete { recovered: u64, reached_before: u64 },
    #[error("recovery: {0}")]
    Restore(#[from] RestoreError),
    #[error(
        "{}: {what} contradicts the state recovered before it ({reason}); the file is damaged although \
         its checksums hold", path.display()
    )]
    Contradiction { path: PathBuf, what: String, reason: String },
}

/// The log and snapshots of one data directory, locked for this process.
pub struct Store {
    dir: PathBuf,
    journal: Arc<Journal>,
    config: StorageConfig,
    /// One snapshot at a time: two of the same sequence number would share a temporary file.
    snapshotting: parking_lot::Mutex<()>,
    snapshot_stats: Arc<SnapshotStats>,
    /// Held for the life of the process: a second quotad on the same directory refuses to start.
    _lock: File,
}

/// Feeds applied events to the journal. Set once recovery has replayed the old log.
#[derive(Default)]
pub struct JournalSink {
    journal: OnceLock<Arc<Journal>>,
}

thread_local! {
    /// Reused for every event a thread encodes: the hot path allocates nothing for its log record.
    static ENCODED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl EventSink for JournalSink {
    fn record(&self, now: u64, event: &Event, levels: Option<Levels>) -> u64 {
        let journal = self.journal.get().expect("events are recorded only after recovery");
        ENCODED.with_borrow_mut(|buffer| {
            buffer.clear();
            let encoded =
                postcard::to_extend(&(now, event, levels), std::mem::take(buffer)).expect("events always encode");
            let seq = journal.append(&encoded);
            *buffer = encoded;
            seq
        })
    }
}

struct WrittenSnapshot {
    path: PathBuf,
    bytes: u64,
    items: u64,
}

/// What startup found in the data directory.
pub struct Opened {
    pub ledger: Ledger,
    pub store: Arc<Store>,
    /// The directory held no state: the caller may apply its bootstrap.
    pub fresh: bool,
}

impl Store {
    /// Locks the directory, restores the newest valid snapshot and replays the log after it.
    /// `rate_card` is version 1 of the rate card; later versions come from the snapshot and the log.
    pub fn open(config: StorageConfig, limits: Limits, rate_card: RateCard) -> Result<Opened, StoreError> {
        let dir = config.dir.clone();
        let io = |source| StoreError::Io { dir: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let lock = File::options().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE)).map_err(io)?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(dir.clone()));
        }
        let listing = format::list_data_dir(&dir).map_err(io)?;
        for stray in &listing.stray_tmp {
            tracing::warn!(file = %stray.display(), "removing a file left unfinished by a crash");
            std::fs::remove_file(stray).map_err(io)?;
        }
        let started = Instant::now();
        let sink = Arc::new(JournalSink::default());
        let ledger = Ledger::with_rate_card(limits, rate_card, sink.clone());
        let Restored { covered, holds_up_to } =
            restore_snapshot(&ledger, &listing, config.recover_from_older_snapshot)?;
        trusting(&dir, || "the snapshot".into(), || ledger.recompute_totals())?;
        let (last_seq, replayed) = replay_log(&ledger, &listing, covered, holds_up_to)?;
        // New events are numbered after everything the state holds, never again a number an object
        // of the snapshot holds.
        let resume_after = last_seq.max(holds_up_to);
        // Every snapshot file, readable or not, and every log segment's name says how far the state had
        // got; recovering less than that would hand out capacity that was already spent.
        let reached_before = listing
            .snapshots
            .iter()
            .map(|(covered, _)| *covered)
            .chain(listing.segments.iter().map(|(first_seq, _)| first_seq - 1))
            .max()
            .unwrap_or(0);
        if resume_after < reached_before {
            return Err(StoreError::Incomplete { recovered: resume_after, reached_before });
        }
        trusting(&dir, || "the recovered state".into(), || ledger.finish_restore())??;
        // Empty segments alone (a crash before anything was written) still count as a fresh start.
        let fresh = covered == 0 && resume_after == 0;
        if !fresh {
            tracing::info!(
                snapshot_seq = covered,
                replayed,
                last_seq,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "state recovered"
            );
        }
        let next_seq = resume_after.checked_add(1).ok_or_else(|| {
            StoreError::Restore(RestoreError::Invariant(format!(
                "the state claims event {resume_after}, the last there is"
            )))
        })?;
        let journal = Journal::open(&dir, config.durability, config.fsync_interval, next_seq, config.max_segment_bytes)
            .map_err(io)?;
        sink.journal.set(journal.clone()).unwrap_or_else(|_| unreachable!("set once"));
        let store = Arc::new(Store {
            dir: dir.clone(),
            journal,
            config,
            snapshotting: Default::default(),
            snapshot_stats: Arc::default(),
            _lock: lock,
        });
        Ok(Opened { ledger, store, fresh })
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn snapshot_interval(&self) -> Duration {
        self.config.snapshot_interval
    }

    /// Snapshots written and failed, and the last one's duration and size.
    pub fn snapshot_stats(&self) -> Arc<SnapshotStats> {
        Arc::clone(&self.snapshot_stats)
    }

    /// Waits until every event applied so far is as durable as the mode promises.
    pub async fn wait_durable(&self) -> Result<(), Unavailable> {
        self.journal.wait_durable(self.journal.last_appended()).await
    }

    /// Writes a snapshot of `ledger`, then removes the older snapshot and the log it no longer needs.
    /// Blocking: run it off the async runtime.
    pub fn snapshot(&self, ledger: &Ledger) -> Result<PathBuf, StoreError> {
        let _one_at_a_time = self.snapshotting.lock();
        let started = Instant::now();
        let written = self.write_snapshot(ledger, started);
        match &written {
            Ok(snapshot) => self.snapshot_stats.written(started.elapsed(), snapshot.bytes, snapshot.items),
            Err(_) => self.snapshot_stats.failed(),
        }
        written.map(|snapshot| snapshot.path)
    }

    fn write_snapshot(&self, ledger: &Ledger, started: Instant) -> Result<WrittenSnapshot, StoreError> {
        let io = |source| StoreError::Io { dir: self.dir.clone(), source };
        // Every event up to `covered` was applied before its object is copied below, so the snapshot
        // holds at least all of them; replay skips whatever else an object already holds.
        self.journal.rotate();
        let covered = self.journal.last_appended();
        let mut writer = SnapshotWriter::create(&self.dir, covered).map_err(io)?;
        let mut result = Ok(());
        let mut items = 0u64;
        ledger.export(|item| {
            if result.is_ok() {
                let bytes = postcard::to_stdvec(&item).expect("snapshot items always encode");
                result = writer.append(&bytes);
                items += 1;
            }
        });
        result.map_err(io)?;
        // Objects copied late hold events appended after `covered`, perhaps not yet written. Were the
        // process killed before they are, the snapshot would hold events the log lacks, and the next
        // process would give their sequence numbers to new events, which replay then skips.
        let holds_up_to = self.journal.last_appended();
        self.journal.wait_durable_blocking(holds_up_to).map_err(|e| io(std::io::Error::other(e)))?;
        let path = writer.finish().map_err(io)?;
        let bytes = std::fs::metadata(&path).map_err(io)?.len();
        let removed = self.prune(covered).map_err(io)?;
        tracing::info!(
            covered_seq = covered,
            items,
            bytes,
            removed_files = removed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            file = %path.display(),
            "snapshot written"
        );
        Ok(WrittenSnapshot { path, bytes, items })
    }

    /// Keeps the newest snapshot and the one before it (for `--recover-from-older-snapshot`), and the
    /// log the older one needs.
    fn prune(&self, newest: u64) -> std::io::Result<usize> {
        let listing = format::list_data_dir(&self.dir)?;
        let older: Vec<_> = listing.snapshots.iter().filter(|(seq, _)| *seq < newest).collect();
        let keep_from = older.last().map_or(newest, |(seq, _)| *seq);
        let mut removed = 0;
        for (seq, path) in &listing.snapshots {
            if *seq < keep_from {
                std::fs::remove_file(path)?;
                removed += 1;
            }
        }
        format::sync_dir(&self.dir)?;
        Ok(removed + self.journal.remove_segments_covered_by(keep_from)?)
    }

    /// Flushes and syncs the log. Called once, at shutdown, after the last request.
    pub fn close(&self) {
        self.journal.close();
    }
}

/// What the imported snapshot holds.
#[derive(Default)]
struct Restored {
    /// Every event up to this one; replay starts after it.
    covered: u64,
    /// The last event any object holds, at least `covered`: a snapshot copies objects one at a time
    /// while events go on, and those it copied late hold events after `covered`.
    holds_up_to: u64,
}

/// Imports the newest snapshot that reads back whole.
fn restore_snapshot(ledger: &Ledger, listing: &DataDirListing, fall_back: bool) -> Result<Restored, StoreError> {
    for (covered, path) in listing.snapshots.iter().rev() {
        let items = match format::read_snapshot(path) {
            Ok((_, items)) => items,
            Err(error) if fall_back => {
                tracing::warn!(%error, "skipping an unreadable snapshot; trying an older one");
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let mut holds_up_to = *covered;
        for (index, bytes) in items.iter().enumerate() {
            let item: SnapshotItem = postcard::from_bytes(bytes).map_err(|e| StoreError::Decode {
                path: path.clone(),
                seq: index as u64,
                reason: e.to_string(),
            })?;
            holds_up_to = holds_up_to.max(item.applied_seq());
            trusting(path, || format!("snapshot item {index}"), || ledger.import(item))??;
        }
        return Ok(Restored { covered: *covered, holds_up_to });
    }
    Ok(Restored::default())
}

/// Replays every logged event after `covered`; returns the last sequence number and how many were
/// replayed. A torn record at the very end of the log is cut off; anything else unreadable stops.
/// Records missing up to `holds_up_to` are a gap the snapshot explains: its objects hold events whose
/// records a power loss took in `write` mode, and the next process numbered its events after them.
fn replay_log(
    ledger: &Ledger,
    listing: &DataDirListing,
    covered: u64,
    holds_up_to: u64,
) -> Result<(u64, u64), StoreError> {
    let mut last = covered;
    let mut replayed = 0;
    let segments = &listing.segments;
    for (index, (_, path)) in segments.iter().enumerate() {
        let segment = format::read_segment(path)?;
        if let Some(offset) = segment.torn_tail {
            if index + 1 != segments.len() {
                return Err(StoreError::TornBeforeEnd { path: path.clone(), offset });
            }
            if segment.tail_is_zero {
                tracing::info!(file = %path.display(), offset, "cutting off the unused end of the last log segment");
            } else {
                tracing::warn!(file = %path.display(), offset, "cutting off a record torn by a crash mid-write");
            }
            format::truncate_segment(path, segment.valid_len)
                .map_err(|source| StoreError::Io { dir: path.clone(), source })?;
        }
        for (seq, payload) in &segment.records {
            if *seq <= last {
                continue;
            }
            if *seq != last + 1 {
                if *seq - 1 > holds_up_to {
                    return Err(StoreError::Gap { covered, resumes: *seq, from: last + 1, to: seq - 1 });
                }
                tracing::warn!(
                    from = last + 1,
                    to = seq - 1,
                    "the log lacks events that the snapshot's objects hold, as after a power loss in write mode; \
                     objects copied before them recover without them"
                );
            }
            let (now, event, levels): (u64, Event, Option<Levels>) = postcard::from_bytes(payload)
                .map_err(|e| StoreError::Decode { path: path.clone(), seq: *seq, reason: e.to_string() })?;
            trusting(path, || format!("record {seq}"), || ledger.replay(*seq, now, &event, levels))??;
            last = *seq;
            replayed += 1;
        }
    }
    Ok((last, replayed))
}

/// Runs one step of recovery on data that passed its checksums. Replay trusts the decisions an event
/// records, as the live ledger made them, so an event or snapshot item that contradicts the state before
/// it (written by a bug, or altered with its checksums recomputed) can trip one of the ledger's bug
/// assertions; recovery then names the file and the record instead of panicking. The ledger is
/// discarded with the error, so whatever the interrupted step left half done is never used.
fn trusting<T>(path: &Path, what: impl FnOnce() -> String, step: impl FnOnce() -> T) -> Result<T, StoreError> {
    std::panic::catch_unwind(AssertUnwindSafe(step)).map_err(|panic| StoreError::Contradiction {
        path: path.to_owned(),
        what: what(),
        reason: panic_message(panic.as_ref()),
    })
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "a bug assertion failed".to_owned(),
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).field("durability", &self.config.durability).finish()
    }
}
