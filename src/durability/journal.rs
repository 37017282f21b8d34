//! The write-ahead log writer. Request handlers append records while they hold in-memory locks, so an
//! append only copies bytes into a buffer under a short mutex; whatever the buffer holds is then written
//! at once (group commit), and handlers wait, without any lock, until their record is durable in the
//! sense of the configured [`Durability`].
//!
//! Segment files are allocated up front and mapped into memory, so writing a batch is a copy into the
//! page cache: as safe against a killed process as `write(2)`, without a system call.
//!
//! Threads: a writer thread rotates segments, retries after failures, writes records nobody waits for
//! and, in `fsync` mode, writes and syncs every batch. In `write` mode a waiter writes the buffer itself,
//! on its own thread, as soon as it waits (a copy into memory costs less than waking another thread or
//! gathering a larger batch), and a second thread runs the background `fdatasync`, so that a slow disk
//! sync never holds up answers.
//!
//! Sequence numbers start at 1 and are assigned in append order without gaps; records go to segment
//! files `wal-<first seq>.log` in the data directory (see [`format`]).

use std::{
    fs, io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;
use tracing::{debug, error, info};

use super::{
    format::{self, FILE_HEADER_LEN},
    stats::LogStats,
};

/// When an answer may be sent, and so what a crash can lose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// No log: state lives in memory and in snapshots only.
    None,
    /// Answer once the record is written to the OS: a killed process loses nothing; a power loss loses
    /// at most the last fsync interval.
    Write,
    /// Answer once the record is on disk (`fdatasync`): survives power loss and kernel crashes.
    Fsync,
}

/// Why a record is not durable, and will not be soon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("the write-ahead log cannot write to disk (the cause is logged); the change is not durable")]
    Failing,
    #[error("the write-ahead log is closed; the change will not be made durable")]
    Closed,
}

/// The first delay before retrying a failed write, doubled after each failure up to the maximum.
const RETRY_INITIAL: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long `close` keeps retrying a failing disk before it gives up on the records still pending.
const CLOSE_GIVE_UP_AFTER: Duration = Duration::from_secs(5);

const _: () = assert!(RETRY_INITIAL.as_nanos() <= RETRY_MAX.as_nanos());

/// A batch buffer larger than this (a backlog built up while the disk failed) is freed after use
/// rather than kept for the next batch.
const MAX_RETAINED_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// How long records nobody waits for (a bootstrap) may sit in the buffer before the writer takes them on
/// its own, and how often the idle writer looks for them: appends do not wake it, and the expiry sweeper
/// waits for its records like a request.
const UNAWAITED_FLUSH_DELAY: Duration = Duration::from_millis(5);
const IDLE_POLL: Duration = Duration::from_millis(100);

/// The knobs of the writer; tests shorten the retry delays.
#[derive(Clone, Copy, Debug)]
struct Settings {
    fsync_interval: Duration,
    max_segment_bytes: u64,
    retry_initial: Duration,
    retry_max: Duration,
    close_give_up_after: Duration,
}

/// The write-ahead log. Shared as `Arc<Journal>`; dropping the last one closes it.
pub struct Journal {
    shared: Arc<Shared>,
    mode: Durability,
    dir: PathBuf,
    /// In `Write` mode, the writer's state, for a waiter to write a batch on its own thread.
    inline: Option<Arc<dyn InlineWrite>>,
    /// Taken by the first `close`; held while joining so that a second `close` waits for the first.
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Writing the pending records on the caller's thread, which `Journal` needs without knowing the
/// writer's storage type.
trait InlineWrite: Send + Sync {
    /// Writes what is pending, unless the writer thread is needed for it (a rotation, a failing disk,
    /// closing) or busy. Returns `false` if the caller must wake the writer thread instead.
    fn write_pending(&self, leader: bool) -> bool;
}

impl<S: Storage> InlineWrite for Mutex<Writer<S>> {
    fn write_pending(&self, leader: bool) -> bool {
        self.try_lock().is_some_and(|mut writer| writer.write_inline(leader))
    }
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer: a waiter's kick, a rotation, close, a finished sync.
    wake: Condvar,
    progress: watch::Sender<Progress>,
    health: watch::Sender<bool>,
    /// The first sequence number of the segment being written, which is never removed.
    current_segment: AtomicU64,
    /// The sequence number of the last append, readable without the pending lock.
    last_appended: AtomicU64,
    stats: Arc<LogStats>,
}

struct Pending {
    /// The sequence number the next append gets.
    next_seq: u64,
    /// A waiter has woken the writer for what is in `buf`; cleared when the writer takes it.
    kicked: bool,
    /// A waiter will wake the writer once the requests that are ready now have appended theirs.
    kick_scheduled: bool,
    /// Whole records, checksums not yet filled in, for the sequence numbers from the writer's
    /// `written_end` to `next_seq`.
    buf: Vec<u8>,
    /// Where `rotate` asked for a new segment: (first sequence number of the new segment, offset in
    /// `buf`), in order.
    rotations: Vec<(u64, usize)>,
    /// Set by `close` to `next_seq` at that moment; later appends are numbered but never written, so
    /// the writer's last batch ends here.
    closing_at: Option<u64>,
    /// The answer of the background sync thread, for the writer.
    sync_done: Option<SyncDone>,
    /// An inline write left records to sync while the writer thread had no sync due: it must look again.
    sync_wanted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Progress {
    /// Every record before this sequence number is durable in the journal's mode.
    durable_end: u64,
    failing: bool,
    /// The writer has stopped; nothing more becomes durable.
    closed: bool,
}

impl Journal {
    /// Starts a journal whose first record will be `next_seq` (at least 1), in a new segment
    /// `wal-<next_seq>.log` in `dir`, and its writer thread. Segments are rotated once they would grow
    /// past `max_segment_bytes` (a single batch larger than that gets a segment of its own). In
    /// `None` mode nothing is written and no thread is started.
    pub fn open(
        dir: &Path,
        mode: Durability,
        fsync_interval: Duration,
        next_seq: u64,
        max_segment_bytes: u64,
    ) -> io::Result<Arc<Journal>> {
        let settings = Settings {
            fsync_interval,
            max_segment_bytes,
            retry_initial: RETRY_INITIAL,
            retry_max: RETRY_MAX,
            close_give_up_after: CLOSE_GIVE_UP_AFTER,
        };
        let storage = DirStorage { dir: dir.to_owned(), preallocate_bytes: max_segment_bytes };
        Self::open_with(storage, dir, mode, settings, next_seq)
    }

    fn open_with<S: Storage>(
        mut storage: S,
        dir: &Path,
        mode: Durability,
        settings: Settings,
        next_seq: u64,
    ) -> io::Result<Arc<Journal>> {
        if next_seq == 0 {
            return Err(invalid_input("log sequence numbers start at 1"));
        }
        if settings.max_segment_bytes <= FILE_HEADER_LEN as u64 {
            return Err(invalid_input("the maximum segment size must exceed the segment header"));
        }
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                next_seq,
                kicked: false,
                kick_scheduled: false,
                buf: Vec::new(),
                rotations: Vec::new(),
                closing_at: None,
                sync_done: None,
                sync_wanted: false,
            }),
            wake: Condvar::new(),
            progress: watch::Sender::new(Progress { durable_end: next_seq, failing: false, closed: false }),
            health: watch::Sender::new(true),
            current_segment: AtomicU64::new(next_seq),
            last_appended: AtomicU64::new(next_seq - 1),
            stats: Arc::default(),
        });
        let (inline, writer) = match mode {
            Durability::None => (None, None),
            Durability::Write | Durability::Fsync => {
                let file = storage.create_segment(next_seq)?;
                let writer = Writer::new(Arc::clone(&shared), storage, dir, mode, settings, file, next_seq)?;
                let writer = Arc::new(Mutex::new(writer));
                let inline = (mode == Durability::Write).then(|| Arc::clone(&writer) as Arc<dyn InlineWrite>);
                let for_thread = Arc::clone(&shared);
                let thread =
                    thread::Builder::new().name("quotad-wal".into()).spawn(move || run(&writer, for_thread))?;
                (inline, Some(thread))
            }
        };
        Ok(Arc::new(Journal { shared, mode, dir: dir.to_owned(), inline, writer: Mutex::new(writer) }))
    }

    /// Numbers `payload` and queues it for the writer; never touches the disk or waits for it.
    ///
    /// # Panics
    /// If `payload` is longer than [`format::MAX_RECORD_PAYLOAD`], which only a bug can cause.
    pub fn append(&self, payload: &[u8]) -> u64 {
        assert!(payload.len() <= format::MAX_RECORD_PAYLOAD, "log record of {} bytes over the limit", payload.len());
        let mut pending = self.shared.pending.lock();
        let seq = pending.next_seq;
        pending.next_seq += 1;
        // Stored under the lock, so it only grows.
        self.shared.last_appended.store(seq, Ordering::Release);
        if self.mode == Durability::None || pending.closing_at.is_some() {
            return seq;
        }
        // The writer is not woken here but by the first waiter, once the runtime has run the other
        // ready requests: waking it per record would, on a busy core, write one record per batch.
        let before = pending.buf.len();
        format::encode_record_unsealed(seq, payload, &mut pending.buf);
        self.shared.stats.appended(pending.buf.len() - before);
        seq
    }

    /// Whether this waiter is the one to wake the writer: none is due to yet, and none is scheduled.
    /// A record appended before this check is taken by the wake that is due or scheduled, if any.
    fn lead_kick(&self) -> bool {
        let mut pending = self.shared.pending.lock();
        let lead = !pending.kicked && !pending.kick_scheduled;
        pending.kick_scheduled |= lead;
        lead
    }

    /// Wakes the writer for what the buffer holds.
    fn kick(&self) {
        let mut pending = self.shared.pending.lock();
        pending.kick_scheduled = false;
        if pending.kicked || pending.buf.is_empty() {
            return;
        }
        pending.kicked = true;
        drop(pending);
        self.shared.wake.notify_one();
    }

    /// The sequence number of the last append, or one less than the first if nothing was appended.
    pub fn last_appended(&self) -> u64 {
        self.shared.last_appended.load(Ordering::Acquire)
    }

    /// Resolves once every record up to `seq` is durable (written to the OS in `Write` mode, on disk in
    /// `Fsync` mode, at once in `None` mode). Fails at once while the log cannot write, and when it is
    /// closed before `seq` became durable.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), Unavailable> {
        if self.mode == Durability::None {
            return Ok(());
        }
        if let Some(inline) = &self.inline
            && self.shared.progress.borrow().durable_end <= seq
            && inline.write_pending(false)
            && self.shared.progress.borrow().durable_end > seq
        {
            return Ok(());
        }
        let mut progress = self.shared.progress.subscribe();
        if progress.borrow().durable_end <= seq && self.lead_kick() {
            // If this waiter is dropped while it yields (a cancelled call), the guard still wakes the
            // writer: the others wait for this kick, and no later waiter may lead while one is scheduled.
            let lead = KickOnDrop(Some(self));
            // Let the requests that are ready now append theirs first, so that one write serves them all.
            tokio::task::yield_now().await;
            if self.inline.as_ref().is_some_and(|inline| inline.write_pending(true)) {
                lead.written();
            }
        }
        let progress = *progress
            .wait_for(|p| p.durable_end > seq || p.failing || p.closed)
            .await
            .expect("the sender lives as long as the journal");
        match progress {
            Progress { durable_end, .. } if durable_end > seq => Ok(()),
            Progress { closed: true, .. } => Err(Unavailable::Closed),
            _ => Err(Unavailable::Failing),
        }
    }

    /// [`Journal::wait_durable`] for a thread outside the async runtime (a snapshot's).
    pub fn wait_durable_blocking(&self, seq: u64) -> Result<(), Unavailable> {
        futures_executor::block_on(self.wait_durable(seq))
    }

    pub fn is_healthy(&self) -> bool {
        *self.shared.health.borrow()
    }

    /// Records and bytes appended, and sync latencies.
    pub fn stats(&self) -> Arc<LogStats> {
        Arc::clone(&self.shared.stats)
    }

    /// `true` while the log writes, `false` from its first failure until it writes again.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.shared.health.subscribe()
    }

    /// Starts a new segment at the next record, and returns that record's sequence number: every
    /// record before it is in older segments, which a snapshot covering it makes removable.
    pub fn rotate(&self) -> u64 {
        let mut pending = self.shared.pending.lock();
        let seq = pending.next_seq;
        if self.mode == Durability::None || pending.closing_at.is_some() {
            return seq;
        }
        if pending.rotations.last().map(|&(at, _)| at) != Some(seq) {
            let offset = pending.buf.len();
            pending.rotations.push((seq, offset));
        }
        drop(pending);
        self.shared.wake.notify_one();
        seq
    }

    /// Deletes the segments whose records all have sequence numbers up to `covered_seq`, never the one
    /// being written, and returns how many. The snapshot covering them must be durable first.
    pub fn remove_segments_covered_by(&self, covered_seq: u64) -> io::Result<usize> {
        if self.mode == Durability::None {
            return Ok(0);
        }
        let segments = format::list_data_dir(&self.dir)?.segments;
        // Read after listing: the writer only moves forward, so every listed segment before this one is
        // finished, and a segment created since the listing is not in it.
        let current = self.shared.current_segment.load(Ordering::SeqCst);
        let mut removed = 0;
        for pair in segments.windows(2) {
            let ((first_seq, path), (next_first_seq, _)) = (&pair[0], &pair[1]);
            if *first_seq >= current || *next_first_seq > covered_seq.saturating_add(1) {
                break;
            }
            fs::remove_file(path)?;
            removed += 1;
        }
        if removed > 0 {
            format::sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Writes everything appended so far, syncs it to disk (in every mode), and stops the writer; returns
    /// once that is done. Records appended afterwards are numbered but never written. If the disk keeps
    /// failing, the writer gives up after a few seconds and logs how many records it could not write;
    /// `wait_durable` then answers `Closed` for those. Idempotent.
    pub fn close(&self) {
        let mut writer = self.writer.lock();
        if let Some(handle) = writer.take() {
            let mut pending = self.shared.pending.lock();
            let next_seq = pending.next_seq;
            pending.closing_at.get_or_insert(next_seq);
            drop(pending);
            self.shared.wake.notify_one();
            if handle.join().is_err() {
                error!("the write-ahead log writer panicked");
            }
        }
    }
}

/// The scheduled wake of the writer by the waiter that leads a batch, made when it is dropped unless
/// the leader wrote the batch itself.
struct KickOnDrop<'a>(Option<&'a Journal>);

impl KickOnDrop<'_> {
    fn written(mut self) {
        self.0 = None;
    }
}

impl Drop for KickOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(journal) = self.0 {
            journal.kick();
        }
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("mode", &self.mode)
            .field("dir", &self.dir)
            .field("last_appended", &self.last_appended())
            .field("progress", &*self.shared.progress.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

fn invalid_input(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

// ---------------------------------------------------------------------------------------------------
// Storage, behind traits so that tests can make the disk fail

/// Where segments are created.
trait Storage: Send + 'static {
    type File: SegmentFile;
    /// Creates `wal-<first_seq>.log` holding its header, durably: it appears under that name only
    /// complete, and the name survives a crash.
    fn create_segment(&mut self, first_seq: u64) -> io::Result<Self::File>;
}

/// The operations the writer needs on a segment file; shared with the sync thread.
trait SegmentFile: Send + Sync + 'static {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Cuts off what a failed write may have left after `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
    /// The bytes before `len` are synced and will not be written again: they need not stay in memory.
    fn forget_synced(&self, _len: u64) {}
    /// The segment is complete at `len` bytes: drops the space reserved beyond it, durably.
    fn finish(&self, len: u64) -> io::Result<()>;
}

struct DirStorage {
    dir: PathBuf,
    /// Space reserved for each new segment, so that appends are copies into memory.
    preallocate_bytes: u64,
}

impl Storage for DirStorage {
    type File = MappedSegment;

    fn create_segment(&mut self, first_seq: u64) -> io::Result<MappedSegment> {
        let name = format::segment_file_name(first_seq);
        let path = self.dir.join(&name);
        // A segment with only a header (a previous run that appended nothing) may be replaced; one with
        // records may not.
        if fs::metadata(&path).is_ok_and(|meta| meta.len() > FILE_HEADER_LEN as u64) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already holds log records; the log must start after them", path.display()),
            ));
        }
        let tmp = self.dir.join(format::tmp_file_name(&name));
        let file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
        let mut header = Vec::with_capacity(FILE_HEADER_LEN);
        format::encode_segment_header(first_seq, &mut header);
        FileExt::write_all_at(&file, &header, 0)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        format::sync_dir(&self.dir)?;
        MappedSegment::new(file, self.preallocate_bytes)
    }
}

/// A segment file whose first `map.len()` bytes are allocated on disk and mapped into memory, so that
/// an append is a copy into the page cache rather than a system call: as durable against a killed
/// process as a `write`, and synced by the same `fdatasync`. Writes past the mapping (a batch larger
/// than a segment) go through `pwrite`. Where the file system cannot allocate the space up front (it
/// is full, or does not support it), there is no mapping and every write is a `pwrite`.
///
/// Readers see the unused, zeroed end of the allocation as the end of the log; `finish` cuts it off.
struct MappedSegment {
    file: fs::File,
    map: Option<memmap2::MmapRaw>,
    /// The mapping's pages before this were dropped from memory.
    forgotten: AtomicU64,
}

impl MappedSegment {
    fn new(file: fs::File, preallocate_bytes: u64) -> io::Result<Self> {
        // Allocated, not sparse: a page of a mapping that the disk cannot back would be a SIGBUS.
        if preallocate_bytes <= FILE_HEADER_LEN as u64
            || rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, preallocate_bytes).is_err()
        {
            debug!(preallocate_bytes, "log segment not preallocated; appends are written with pwrite");
            return Ok(Self { file, map: None, forgotten: AtomicU64::new(0) });
        }
        let map = memmap2::MmapOptions::new().len(preallocate_bytes as usize).map_raw(&file)?;
        Ok(Self { file, map: Some(map), forgotten: AtomicU64::new(0) })
    }

    fn mapped_len(&self) -> u64 {
        self.map.as_ref().map_or(0, |map| map.len() as u64)
    }
}

/// Copies `src` to `dst` front to back, each store after the one before it, so that a process killed
/// mid-copy leaves a prefix of `src` in the page cache and zeros after it: what recovery reads as a
/// torn tail. (`memcpy` may store the end first, which would leave bytes after a gap.)
///
/// # Safety
/// `dst..dst + src.len()` must be valid for writes and not overlap `src`.
unsafe fn copy_in_order(src: &[u8], dst: *mut u8) {
    // Volatile stores are neither reordered nor merged by the compiler; the CPU retires them in order,
    // so a kill at any instruction leaves exactly the stores before it.
    let head = dst.align_offset(8).min(src.len());
    let (bytes, rest) = src.split_at(head);
    let mut at = 0;
    for &byte in bytes {
        // SAFETY: within `dst..dst + src.len()`, per the caller.
        unsafe { dst.add(at).write_volatile(byte) };
        at += 1;
    }
    let mut words = rest.chunks_exact(8);
    for word in &mut words {
        let word = u64::from_ne_bytes(word.try_into().expect("chunks of 8"));
        // SAFETY: as above, and `dst + at` is 8-byte aligned after the head.
        unsafe { dst.add(at).cast::<u64>().write_volatile(word) };
        at += 8;
    }
    for &byte in words.remainder() {
        // SAFETY: as above.
        unsafe { dst.add(at).write_volatile(byte) };
        at += 1;
    }
}

impl SegmentFile for MappedSegment {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mapped = self.mapped_len();
        let (in_map, rest) = buf.split_at(mapped.saturating_sub(offset).min(buf.len() as u64) as usize);
        if let Some(map) = &self.map
            && !in_map.is_empty()
        {
            // SAFETY: `offset..offset + in_map.len()` lies inside the mapping, and the file keeps the
            // mapped length until `finish`, after which nothing is written. Only the writer writes to
            // the mapping (under the journal's writer lock), and no reference to its bytes exists.
            unsafe { copy_in_order(in_map, map.as_mut_ptr().add(offset as usize)) };
        }
        if rest.is_empty() {
            return Ok(());
        }
        FileExt::write_all_at(&self.file, rest, offset + in_map.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // The mapped part must stay in the file; what a failed write left there is zeroed instead.
        let mapped = self.mapped_len();
        if len < mapped {
            let zeros = vec![0; (mapped - len) as usize];
            self.write_all_at(&zeros, len)?;
        }
        self.file.set_len(len.max(mapped))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Unmaps the whole pages before `len`: the log is append-only, so they are never written again, and
    /// they stay in the page cache. Without this, every byte ever logged to a segment counts in quotad's
    /// resident memory until the segment is full.
    fn forget_synced(&self, len: u64) {
        let Some(map) = &self.map else { return };
        let page = rustix::param::page_size() as u64;
        let end = len.min(map.len() as u64) / page * page;
        let start = self.forgotten.fetch_max(end, Ordering::Relaxed);
        if end > start {
            // SAFETY: the mapping is shared, so MADV_DONTNEED drops only this process's view of the
            // pages; a later access reads them back from the file. No reference into these pages is held.
            let advised = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start as usize, (end - start) as usize)
            };
            if let Err(error) = advised {
                debug!(%error, "could not release synced log pages");
            }
        }
    }

    fn finish(&self, len: u64) -> io::Result<()> {
        if self.map.is_some() {
            self.file.set_len(len)?;
            self.file.sync_data()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------
// The writer thread

/// What the writer took from `Pending` in one go.
struct Work {
    records: Vec<u8>,
    first_seq: u64,
    end_seq: u64,
    rotations: Vec<(u64, usize)>,
    closing: bool,
    sync_done: Option<SyncDone>,
}

struct SyncJob {
    file: Arc<dyn SegmentFile>,
    segment: u64,
    len: u64,
}

struct SyncDone {
    segment: u64,
    len: u64,
    result: io::Result<()>,
}

/// The background sync thread of `Write` mode.
struct Syncer {
    jobs: mpsc::Sender<SyncJob>,
    thread: JoinHandle<()>,
    in_flight: bool,
    /// The segment length the last job covered, and when it was sent.
    requested_len: u64,
    requested_at: Instant,
}

/// The writer stopped retrying because the journal is closing.
struct GaveUp;

struct Writer<S: Storage> {
    shared: Arc<Shared>,
    storage: S,
    dir: PathBuf,
    mode: Durability,
    settings: Settings,
    file: Arc<S::File>,
    segment: u64,
    /// The bytes of the current segment that hold whole records, all written successfully.
    segment_len: u64,
    /// A copy of the segment's bytes from `unsynced_from` to `segment_len`, kept until a sync covers
    /// them: after a failed `fdatasync` the kernel may have dropped those pages, so they are written
    /// again before the next attempt.
    unsynced: Vec<u8>,
    unsynced_from: u64,
    /// A failed write may have left part of a batch after `segment_len`.
    dirty_tail: bool,
    /// The last `fdatasync` failed; `unsynced` must be written again.
    resync: bool,
    /// Every record before this is written to the current or an older segment.
    written_end: u64,
    /// Every record before this is synced.
    synced_end: u64,
    failing: bool,
    retry_delay: Duration,
    close_deadline: Option<Instant>,
    /// The buffer handed back to `Pending` at the next take, so that appends rarely allocate.
    spare: Vec<u8>,
    syncer: Option<Syncer>,
}

impl<S: Storage> Writer<S> {
    fn new(
        shared: Arc<Shared>,
        storage: S,
        dir: &Path,
        mode: Durability,
        settings: Settings,
        file: S::File,
        next_seq: u64,
    ) -> io::Result<Self> {
        let syncer = match mode {
            Durability::Write => {
                let (jobs, queue) = mpsc::channel();
                let for_thread = Arc::clone(&shared);
                let thread = thread::Builder::new()
                    .name("quotad-wal-sync".into())
                    .spawn(move || run_syncer(queue, &for_thread))?;
                let requested_len = FILE_HEADER_LEN as u64;
                Some(Syncer { jobs, thread, in_flight: false, requested_len, requested_at: Instant::now() })
            }
            Durability::None | Durability::Fsync => None,
        };
        Ok(Self {
            shared,
            storage,
            dir: dir.to_owned(),
            mode,
            settings,
            file: Arc::new(file),
            segment: next_seq,
            segment_len: FILE_HEADER_LEN as u64,
            unsynced: Vec::new(),
            unsynced_from: FILE_HEADER_LEN as u64,
            dirty_tail: false,
            resync: false,
            written_end: next_seq,
            synced_end: next_seq,
            failing: false,
            retry_delay: settings.retry_initial,
            close_deadline: None,
            spare: Vec::new(),
            syncer,
        })
    }

    /// Takes everything pending and does it; returns `true` once the journal is closed.
    fn step(&mut self) -> Result<bool, GaveUp> {
        let mut work = self.take_work();
        if let Some(done) = work.sync_done.take() {
            self.on_sync_done(done);
        }
        if self.resync {
            self.retry("fdatasync", Self::try_sync)?;
            self.recovered();
        }
        if !work.records.is_empty() || !work.rotations.is_empty() {
            self.write_batch(&mut work)?;
        }
        self.keep_spare(work.records);
        if work.closing {
            self.await_sync_in_flight();
            self.retry("fdatasync", Self::try_sync)?;
            self.retry("finish segment", |writer| writer.file.finish(writer.segment_len))?;
            self.recovered();
            return Ok(true);
        }
        self.request_sync_if_due();
        Ok(false)
    }

    fn take_work(&mut self) -> Work {
        let mut pending = self.shared.pending.lock();
        pending.kicked = false;
        self.spare.clear();
        Work {
            records: std::mem::replace(&mut pending.buf, std::mem::take(&mut self.spare)),
            first_seq: self.written_end,
            end_seq: pending.closing_at.unwrap_or(pending.next_seq),
            rotations: std::mem::take(&mut pending.rotations),
            closing: pending.closing_at.is_some(),
            sync_done: pending.sync_done.take(),
        }
    }

    fn keep_spare(&mut self, records: Vec<u8>) {
        if records.capacity() <= MAX_RETAINED_BATCH_BYTES {
            self.spare = records;
        }
    }

    /// Writes the pending records with one call on the caller's thread, for [`InlineWrite`]. Anything
    /// that may block for long (a rotation, retries) is left to the writer thread: then, or when the
    /// write fails, the records stay pending and this returns `false`.
    fn write_inline(&mut self, leader: bool) -> bool {
        let mut pending = self.shared.pending.lock();
        let segment_full = self.segment_len > FILE_HEADER_LEN as u64
            && self.segment_len + pending.buf.len() as u64 > self.settings.max_segment_bytes;
        let needs_thread = self.failing || self.resync || segment_full || !pending.rotations.is_empty();
        if needs_thread || pending.closing_at.is_some() {
            return false;
        }
        if leader {
            pending.kick_scheduled = false;
        }
        if pending.buf.is_empty() {
            // Taken by the writer thread, which publishes it.
            return true;
        }
        self.spare.clear();
        let mut records = std::mem::replace(&mut pending.buf, std::mem::take(&mut self.spare));
        let end_seq = pending.next_seq;
        // The writer thread sleeps without a timer when nothing was left to sync and no sync is in flight.
        let wake_for_sync = self.syncer.as_ref().is_some_and(|s| !s.in_flight && self.segment_len <= s.requested_len);
        pending.sync_wanted |= wake_for_sync;
        drop(pending);

        format::seal_records(&mut records);
        match self.try_write(&records) {
            Ok(()) => {
                self.segment_len += records.len() as u64;
                self.unsynced.extend_from_slice(&records);
                self.written_end = end_seq;
                self.publish();
                self.keep_spare(records);
                if wake_for_sync {
                    self.shared.wake.notify_one();
                }
                true
            }
            Err(e) => {
                self.failed("write", &e);
                // Back in front of what was appended meanwhile, for the writer thread to retry.
                let mut pending = self.shared.pending.lock();
                let moved = records.len();
                records.extend_from_slice(&pending.buf);
                pending.buf = records;
                for (_, offset) in &mut pending.rotations {
                    *offset += moved;
                }
                pending.kicked = true;
                drop(pending);
                self.shared.wake.notify_one();
                true
            }
        }
    }

    /// Writes a batch, split where rotations were asked for, then syncs it in `Fsync` mode.
    fn write_batch(&mut self, work: &mut Work) -> Result<(), GaveUp> {
        format::seal_records(&mut work.records);
        let mut seq = work.first_seq;
        let mut at = 0;
        let cuts = work.rotations.iter().map(|&(seq, offset)| (seq, offset, true));
        for (cut_seq, cut_offset, rotate) in cuts.chain([(work.end_seq, work.records.len(), false)]) {
            if cut_offset > at {
                self.write_chunk(&work.records[at..cut_offset], seq, cut_seq)?;
            }
            if rotate {
                self.rotate_to(cut_seq)?;
            }
            (seq, at) = (cut_seq, cut_offset);
        }
        if self.mode == Durability::Fsync {
            self.retry("fdatasync", Self::try_sync)?;
        }
        self.recovered();
        Ok(())
    }

    fn write_chunk(&mut self, chunk: &[u8], first_seq: u64, end_seq: u64) -> Result<(), GaveUp> {
        let has_records = self.segment_len > FILE_HEADER_LEN as u64;
        if has_records && self.segment_len + chunk.len() as u64 > self.settings.max_segment_bytes {
            self.rotate_to(first_seq)?;
        }
        self.retry("write", |writer| writer.try_write(chunk))?;
        self.segment_len += chunk.len() as u64;
        self.unsynced.extend_from_slice(chunk);
        self.written_end = end_seq;
        self.publish();
        Ok(())
    }

    fn try_write(&mut self, chunk: &[u8]) -> io::Result<()> {
        // Cut off what a failed attempt left, so that the file never holds half a record followed by
        // a whole copy of it, even if the process dies before the retry.
        if self.dirty_tail {
            self.file.set_len(self.segment_len)?;
            self.dirty_tail = false;
        }
        self.dirty_tail = true;
        self.file.write_all_at(chunk, self.segment_len)?;
        self.dirty_tail = false;
        Ok(())
    }

    /// Syncs the current segment in this thread.
    fn try_sync(&mut self) -> io::Result<()> {
        if self.resync {
            self.file.write_all_at(&self.unsynced, self.unsynced_from)?;
        }
        let started = Instant::now();
        if let Err(e) = self.file.sync_data() {
            self.resync = true;
            return Err(e);
        }
        self.shared.stats.synced(started.elapsed());
        self.file.forget_synced(self.segment_len);
        self.resync = false;
        self.synced(self.segment_len);
        Ok(())
    }

    /// Records that the current segment is on disk up to `len`, which is a record boundary.
    fn synced(&mut self, len: u64) {
        let covered = (len - self.unsynced_from) as usize;
        self.unsynced.drain(..covered);
        self.unsynced_from = len;
        if len == self.segment_len {
            self.synced_end = self.written_end;
        }
        if let Some(syncer) = &mut self.syncer {
            syncer.requested_len = syncer.requested_len.max(len);
        }
    }

    /// Closes the current segment durably and starts one whose first record is `first_seq`.
    fn rotate_to(&mut self, first_seq: u64) -> Result<(), GaveUp> {
        if first_seq == self.segment {
            // The current segment holds no record yet: it already starts there.
            return Ok(());
        }
        self.await_sync_in_flight();
        self.retry("fdatasync", Self::try_sync)?;
        self.retry("finish segment", |writer| writer.file.finish(writer.segment_len))?;
        let file = self.retry("create segment", |writer| writer.storage.create_segment(first_seq))?;
        self.file = Arc::new(file);
        self.segment = first_seq;
        self.segment_len = FILE_HEADER_LEN as u64;
        self.unsynced_from = self.segment_len;
        self.dirty_tail = false;
        if let Some(syncer) = &mut self.syncer {
            syncer.requested_len = self.segment_len;
        }
        self.shared.current_segment.store(first_seq, Ordering::SeqCst);
        self.publish();
        Ok(())
    }

    /// Retries `op` with exponential backoff until it succeeds, or until the journal has been closing
    /// for too long.
    fn retry<T>(&mut self, what: &'static str, mut op: impl FnMut(&mut Self) -> io::Result<T>) -> Result<T, GaveUp> {
        loop {
            match op(self) {
                Ok(value) => return Ok(value),
                Err(e) => {
                    self.failed(what, &e);
                    self.back_off()?;
                }
            }
        }
    }

    fn failed(&mut self, what: &'static str, error: &io::Error) {
        if self.failing {
            debug!(%error, operation = what, "write-ahead log still failing");
            return;
        }
        error!(
            %error, operation = what, dir = %self.dir.display(), segment = self.segment,
            "write-ahead log cannot write; requests that need it fail until it recovers"
        );
        self.failing = true;
        self.retry_delay = self.settings.retry_initial;
        // Health turns first, so that whoever sees a waiter fail also sees the journal unhealthy.
        self.shared.health.send_replace(false);
        self.publish();
    }

    /// Called once a whole step (a batch, or a sync) has succeeded.
    fn recovered(&mut self) {
        let was_failing = std::mem::replace(&mut self.failing, false);
        // Waiters may succeed before health says so, never after: the reverse of `failed`.
        self.publish();
        if was_failing {
            info!(dir = %self.dir.display(), "write-ahead log writes again");
            self.shared.health.send_replace(true);
        }
    }

    /// Sleeps for the retry delay (appends arriving meanwhile do not cut it short) and doubles it.
    fn back_off(&mut self) -> Result<(), GaveUp> {
        let until = Instant::now() + self.retry_delay;
        let mut pending = self.shared.pending.lock();
        while !self.shared.wake.wait_until(&mut pending, until).timed_out() {}
        let closing = pending.closing_at.is_some();
        drop(pending);
        if closing {
            let now = Instant::now();
            if now >= *self.close_deadline.get_or_insert(now + self.settings.close_give_up_after) {
                return Err(GaveUp);
            }
        }
        self.retry_delay = (self.retry_delay * 2).min(self.settings.retry_max);
        Ok(())
    }

    fn publish(&self) {
        let durable_end = match self.mode {
            Durability::Fsync => self.synced_end,
            Durability::None | Durability::Write => self.written_end,
        };
        let next = Progress { durable_end, failing: self.failing, closed: false };
        self.shared.progress.send_if_modified(|progress| std::mem::replace(progress, next) != next);
    }

    // --- the background sync of `Write` mode

    fn sync_due_at(&self) -> Option<Instant> {
        let syncer = self.syncer.as_ref()?;
        let unsynced = self.segment_len > syncer.requested_len;
        (unsynced && !syncer.in_flight).then(|| syncer.requested_at + self.settings.fsync_interval)
    }

    fn request_sync_if_due(&mut self) {
        if self.sync_due_at().is_none_or(|at| at > Instant::now()) {
            return;
        }
        let job = SyncJob { file: Arc::clone(&self.file) as _, segment: self.segment, len: self.segment_len };
        let syncer = self.syncer.as_mut().expect("a sync is due only in write mode");
        syncer.in_flight = true;
        syncer.requested_len = self.segment_len;
        syncer.requested_at = Instant::now();
        // The sync thread outlives the writer's loop, so the send cannot fail.
        let _ = syncer.jobs.send(job);
    }

    fn on_sync_done(&mut self, done: SyncDone) {
        if let Some(syncer) = &mut self.syncer {
            syncer.in_flight = false;
        }
        // A rotation waits for the sync in flight, so a result always concerns the current segment.
        debug_assert_eq!(done.segment, self.segment);
        match done.result {
            Ok(()) if done.segment == self.segment && !self.resync => self.synced(done.len),
            Ok(()) => {}
            Err(e) => {
                self.resync = true;
                self.failed("fdatasync", &e);
            }
        }
    }

    fn await_sync_in_flight(&mut self) {
        if !self.syncer.as_ref().is_some_and(|syncer| syncer.in_flight) {
            return;
        }
        let mut pending = self.shared.pending.lock();
        while pending.sync_done.is_none() {
            self.shared.wake.wait(&mut pending);
        }
        let done = pending.sync_done.take().expect("checked above");
        drop(pending);
        self.on_sync_done(done);
    }
}

/// The writer thread.
fn run<S: Storage>(writer: &Mutex<Writer<S>>, shared: Arc<Shared>) {
    let _closed = MarkClosedOnExit(Arc::clone(&shared));
    let served = serve(writer, &shared);
    let mut writer = writer.lock();
    if served.is_err() {
        let closing_at = shared.pending.lock().closing_at.expect("the writer gives up only when closing");
        let unwritten = closing_at - writer.written_end;
        error!(dir = %writer.dir.display(), unwritten, "closing with records the write-ahead log could not write");
    }
    if let Some(syncer) = writer.syncer.take() {
        drop(syncer.jobs);
        let _ = syncer.thread.join();
    }
}

fn serve<S: Storage>(writer: &Mutex<Writer<S>>, shared: &Shared) -> Result<(), GaveUp> {
    loop {
        // Waits without the writer's lock, so that waiters can write inline meanwhile.
        let sync_due_at = writer.lock().sync_due_at();
        wait_for_work(shared, sync_due_at);
        if writer.lock().step()? {
            return Ok(());
        }
    }
}

/// Waits until there is something for the writer thread to do, or until `sync_due_at`. Appends do not
/// wake the writer (the first waiter does), so it also looks at the buffer every [`IDLE_POLL`] on its
/// own: records nobody waits for are written within about that long, even if they were appended while
/// it slept.
fn wait_for_work(shared: &Shared, sync_due_at: Option<Instant>) {
    let mut pending = shared.pending.lock();
    let mut unawaited_since: Option<Instant> = None;
    loop {
        let has_work = (pending.kicked && !pending.buf.is_empty()) || !pending.rotations.is_empty();
        if has_work || pending.closing_at.is_some() || pending.sync_done.is_some() || pending.sync_wanted {
            break;
        }
        let now = Instant::now();
        unawaited_since = if pending.buf.is_empty() { None } else { Some(unawaited_since.unwrap_or(now)) };
        let flush_at = unawaited_since.map(|since| since + UNAWAITED_FLUSH_DELAY);
        if [sync_due_at, flush_at].into_iter().flatten().any(|at| at <= now) {
            break;
        }
        let deadline = [sync_due_at, flush_at, Some(now + IDLE_POLL)].into_iter().flatten().min();
        shared.wake.wait_until(&mut pending, deadline.expect("the poll is always there"));
    }
    pending.sync_wanted = false;
}

fn run_syncer(jobs: mpsc::Receiver<SyncJob>, shared: &Shared) {
    for job in jobs {
        let started = Instant::now();
        let result = job.file.sync_data();
        if result.is_ok() {
            shared.stats.synced(started.elapsed());
            job.file.forget_synced(job.len);
        }
        shared.pending.lock().sync_done = Some(SyncDone { segment: job.segment, len: job.len, result });
        shared.wake.notify_one();
    }
}

/// Tells waiters that nothing more will become durable when the writer stops, even by a panic, so that
/// none waits forever.
struct MarkClosedOnExit(Arc<Shared>);

impl Drop for MarkClosedOnExit {
    fn drop(&mut self) {
        self.0.progress.send_modify(|progress| progress.closed = true);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::Future,
        pin::pin,
        sync::atomic::{AtomicBool, AtomicUsize},
        task::{Context, Waker},
    };

    use proptest::prelude::*;

    use super::*;

    /// Holds the writer inside a file operation until the test lets it go.
    #[derive(Default)]
    struct Gate {
        /// (closed, threads waiting at the gate)
        state: Mutex<(bool, usize)>,
        changed: Condvar,
    }

    impl Gate {
        fn close(&self) {
            self.state.lock().0 = true;
        }

        fn open(&self) {
            self.state.lock().0 = false;
            self.changed.notify_all();
        }

        fn pass(&self) {
            let mut state = self.state.lock();
            state.1 += 1;
            self.changed.notify_all();
            while state.0 {
                self.changed.wait(&mut state);
            }
            state.1 -= 1;
        }

        fn wait_until_held(&self) {
            let mut state = self.state.lock();
            while state.1 == 0 {
                self.changed.wait(&mut state);
            }
        }
    }

    /// Failures and pauses injected into the segment files, and a count of the writes that reached them.
    #[derive(Default)]
    struct Faults {
        fail_writes: AtomicBool,
        fail_syncs: AtomicBool,
        writes: AtomicUsize,
        injected: AtomicUsize,
        write_gate: Gate,
        sync_gate: Gate,
    }

    struct TestStorage {
        inner: DirStorage,
        faults: Arc<Faults>,
    }

    struct TestFile {
        file: MappedSegment,
        faults: Arc<Faults>,
    }

    impl Storage for TestStorage {
        type File = TestFile;

        fn create_segment(&mut self, first_seq: u64) -> io::Result<TestFile> {
            Ok(TestFile { file: self.inner.create_segment(first_seq)?, faults: Arc::clone(&self.faults) })
        }
    }

    impl SegmentFile for TestFile {
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.faults.write_gate.pass();
            if self.faults.fail_writes.load(Ordering::SeqCst) {
                self.faults.injected.fetch_add(1, Ordering::SeqCst);
                // A full disk often takes part of a write before refusing the rest.
                self.file.write_all_at(&buf[..buf.len() / 2], offset)?;
                return Err(io::Error::new(io::ErrorKind::StorageFull, "injected: no space left on device"));
            }
            self.faults.writes.fetch_add(1, Ordering::SeqCst);
            self.file.write_all_at(buf, offset)
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }

        fn sync_data(&self) -> io::Result<()> {
            self.faults.sync_gate.pass();
            if self.faults.fail_syncs.load(Ordering::SeqCst) {
                self.faults.injected.fetch_add(1, Ordering::SeqCst);
                return Err(io::Error::other("injected: fdatasync failed"));
            }
            self.file.sync_data()
        }

        fn finish(&self, len: u64) -> io::Result<()> {
            self.file.finish(len)
        }
    }

    fn test_settings(max_segment_bytes: u64) -> Settings {
        Settings {
            fsync_interval: Duration::from_millis(1),
            max_segment_bytes,
            retry_initial: Duration::from_millis(1),
            retry_max: Duration::from_millis(4),
            close_give_up_after: Duration::from_millis(20),
        }
    }

    fn open_test(dir: &Path, mode: Durability, max_segment_bytes: u64) -> (Arc<Journal>, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        let inner = DirStorage { dir: dir.to_owned(), preallocate_bytes: max_segment_bytes };
        let storage = TestStorage { inner, faults: Arc::clone(&faults) };
        let journal = Journal::open_with(storage, dir, mode, test_settings(max_segment_bytes), 1).unwrap();
        (journal, faults)
    }

    /// Larger than any test writes, so that segments rotate only when asked.
    const LARGE: u64 = 4 << 20;

    /// Every record in the directory's segments, checking that they are clean and contiguous.
    fn read_all(dir: &Path) -> Vec<(u64, Vec<u8>)> {
        let mut records: Vec<(u64, Vec<u8>)> = Vec::new();
        for (first_seq, path) in format::list_data_dir(dir).unwrap().segments {
            let segment = format::read_segment(&path).unwrap();
            // The segment being written ends in the unused part of its preallocated space.
            assert!(segment.torn_tail.is_none() || segment.tail_is_zero, "{}", path.display());
            let expected_first = records.last().map_or(first_seq, |(seq, _)| seq + 1);
            assert_eq!(first_seq, expected_first, "segments must be contiguous");
            records.extend(segment.records);
        }
        records
    }

    fn payload(seq_hint: u64) -> Vec<u8> {
        format!("record {seq_hint}").into_bytes()
    }

    fn is_pending<F: Future>(future: std::pin::Pin<&mut F>) -> bool {
        future.poll(&mut Context::from_waker(Waker::noop())).is_pending()
    }

    #[tokio::test]
    async fn appends_from_many_threads_are_all_written_in_sequence_order() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [Durability::Write, Durability::Fsync] {
            let dir = tempfile::tempdir_in(dir.path()).unwrap();
            let journal = Journal::open(dir.path(), mode, Duration::from_millis(1), 1, LARGE).unwrap();
            let mut expected: Vec<(u64, Vec<u8>)> = thread::scope(|scope| {
                let threads: Vec<_> = (0..8)
                    .map(|t| {
                        let journal = &journal;
                        scope.spawn(move || {
                            (0..250)
                                .map(|i| payload(t * 1_000 + i))
                                .map(|p| (journal.append(&p), p))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
            });
            expected.sort();
            assert_eq!(journal.last_appended(), 2_000);
            journal.wait_durable(2_000).await.unwrap();
            journal.close();
            assert_eq!(read_all(dir.path()), expected, "{mode:?}");
        }
    }

    #[test]
    fn forgetting_synced_pages_keeps_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = DirStorage { dir: dir.path().to_owned(), preallocate_bytes: 1 << 20 };
        let segment = storage.create_segment(1).unwrap();
        let page = rustix::param::page_size();
        let bytes: Vec<u8> = (0..3 * page + 100).map(|i| (i % 251) as u8).collect();
        segment.write_all_at(&bytes, FILE_HEADER_LEN as u64).unwrap();
        segment.sync_data().unwrap();
        let end = (FILE_HEADER_LEN + bytes.len()) as u64;
        segment.forget_synced(end);
        // Only whole pages go; the page being appended to stays.
        assert_eq!(segment.forgotten.load(Ordering::Relaxed), end / page as u64 * page as u64);
        segment.forget_synced(FILE_HEADER_LEN as u64);
        assert_eq!(segment.forgotten.load(Ordering::Relaxed), end / page as u64 * page as u64, "never moves back");
        let map = segment.map.as_ref().unwrap();
        // SAFETY: the range is within the mapping, and nothing writes it meanwhile.
        let mapped = unsafe { std::slice::from_raw_parts(map.as_ptr().add(FILE_HEADER_LEN), bytes.len()) };
        assert_eq!(mapped, &bytes[..], "the pages read back from the file");
        segment.write_all_at(b"after", end).unwrap();
        let on_disk = fs::read(dir.path().join(format::segment_file_name(1))).unwrap();
        assert_eq!(&on_disk[FILE_HEADER_LEN..end as usize], &bytes[..]);
        assert_eq!(&on_disk[end as usize..end as usize + 5], b"after");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_waiters_all_see_their_records_durable() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), Durability::Fsync, Duration::from_millis(1), 1, LARGE).unwrap();
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let journal = Arc::clone(&journal);
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    for i in 0..20 {
                        let p = payload(t * 100 + i);
                        let seq = journal.append(&p);
                        journal.wait_durable(seq).await.unwrap();
                        mine.push((seq, p));
                    }
                    mine
                })
            })
            .collect();
        let mut expected = Vec::new();
        for task in tasks {
            expected.extend(task.await.unwrap());
        }
        expected.sort();
        // Durable means readable now, before close.
        assert_eq!(read_all(dir.path()), expected);
    }

    /// While the writer is busy with one write, every append that arrives joins the next batch: one
    /// write call serves them all.
    #[tokio::test]
    async fn group_commit_writes_concurrent_appends_in_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, faults) = open_test(dir.path(), Durability::Fsync, LARGE);
        faults.write_gate.close();
        journal.append(b"first");
        faults.write_gate.wait_until_held();
        thread::scope(|scope| {
            for t in 0..8 {
                let journal = &journal;
                scope.spawn(move || {
                    for i in 0..100 {
                        journal.append(&payload(t * 100 + i));
                    }
                });
            }
        });
        faults.write_gate.open();
        journal.wait_durable(801).await.unwrap();
        assert_eq!(faults.writes.load(Ordering::SeqCst), 2, "801 appends, one write for the first, one for the rest");
        journal.close();
        assert_eq!(read_all(dir.path()).len(), 801);
    }

    #[tokio::test]
    async fn stats_count_records_bytes_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = open_test(dir.path(), Durability::Fsync, LARGE);
        journal.append(b"hold 1");
        let seq = journal.append(b"hold 22");
        journal.wait_durable(seq).await.unwrap();
        let stats = journal.stats();
        assert_eq!(stats.records(), 2);
        assert_eq!(stats.bytes(), (2 * format::RECORD_HEADER_LEN + 6 + 7) as u64);
        assert!(stats.syncs().counts().iter().sum::<u64>() >= 1, "a durable record in fsync mode was synced");
    }

    #[tokio::test]
    async fn in_fsync_mode_a_record_is_durable_only_once_synced_and_then_readable() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, faults) = open_test(dir.path(), Durability::Fsync, LARGE);
        faults.sync_gate.close();
        let seq = journal.append(b"hold 42");
        let mut wait = pin!(journal.wait_durable(seq));
        faults.sync_gate.wait_until_held();
        // Written, but the writer is held inside fdatasync: not durable yet.
        assert!(is_pending(wait.as_mut()));
        faults.sync_gate.open();
        wait.await.unwrap();
        assert_eq!(read_all(dir.path()), vec![(1, b"hold 42".to_vec())]);
    }

    #[tokio::test]
    async fn in_write_mode_a_record_is_durable_once_written_and_synced_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, faults) = open_test(dir.path(), Durability::Write, LARGE);
        faults.sync_gate.close();
        let seq = journal.append(b"hold 42");
        // The answer does not wait for fdatasync, which is held.
        journal.wait_durable(seq).await.unwrap();
        assert_eq!(read_all(dir.path()), vec![(1, b"hold 42".to_vec())]);
        faults.sync_gate.wait_until_held();
        faults.sync_gate.open();
        journal.close();
    }

    #[tokio::test]
    async fn segments_rotate_by_size_and_read_back_contiguously() {
        let dir = tempfile::tempdir().unwrap();
        // A header and three records of 8-byte payloads fill a segment; a fourth goes to a new one.
        let three = FILE_HEADER_LEN + 3 * (format::RECORD_HEADER_LEN + 8);
        let (journal, _) = open_test(dir.path(), Durability::Write, three as u64);
        let mut expected = Vec::new();
        for i in 0..50 {
            let p = format!("rec {i:04}").into_bytes();
            let seq = journal.append(&p);
            journal.wait_durable(seq).await.unwrap();
            expected.push((seq, p));
        }
        journal.close();
        let segments = format::list_data_dir(dir.path()).unwrap().segments;
        assert_eq!(
            segments.iter().map(|(first, _)| *first).collect::<Vec<_>>(),
            (1..=50).step_by(3).collect::<Vec<_>>()
        );
        assert_eq!(read_all(dir.path()), expected);
    }

    /// Segments are preallocated and written through a memory mapping; a finished segment (rotated away
    /// from, or closed) is cut to its records.
    #[tokio::test]
    async fn segments_are_preallocated_and_cut_to_their_records_once_finished() {
        const SEGMENT: u64 = 64 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let path = |seq| dir.path().join(format::segment_file_name(seq));
        let len = |seq| fs::metadata(path(seq)).unwrap().len();
        let (journal, _) = open_test(dir.path(), Durability::Write, SEGMENT);
        journal.wait_durable(journal.append(b"in the first segment")).await.unwrap();
        assert_eq!(len(1), SEGMENT, "the space is reserved up front");
        let first = format::read_segment(&path(1)).unwrap();
        assert_eq!(first.records, vec![(1, b"in the first segment".to_vec())]);
        assert!(first.tail_is_zero);

        let second = journal.rotate();
        journal.wait_durable(journal.append(b"in the second")).await.unwrap();
        assert_eq!(len(1), first.valid_len, "cut to its records once finished");
        assert_eq!(len(second), SEGMENT);
        journal.close();
        assert_eq!(len(second), format::read_segment(&path(second)).unwrap().valid_len);
        assert_eq!(read_all(dir.path()).len(), 2);
    }

    #[test]
    fn copying_in_order_copies_every_byte_at_every_alignment() {
        let src: Vec<u8> = (1..=40).collect();
        for offset in 0..9 {
            for len in 0..=src.len() {
                let mut dst = vec![0u8; 64];
                // SAFETY: `offset + len` <= 49 < 64, and `dst` does not overlap `src`.
                unsafe { copy_in_order(&src[..len], dst.as_mut_ptr().add(offset)) };
                let mut expected = vec![0u8; 64];
                expected[offset..offset + len].copy_from_slice(&src[..len]);
                assert_eq!(dst, expected, "offset {offset}, len {len}");
            }
        }
    }

    /// `rotate` cuts the log exactly at the sequence number it returns, even in the middle of a batch.
    #[tokio::test]
    async fn rotate_starts_a_segment_at_the_returned_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, faults) = open_test(dir.path(), Durability::Fsync, LARGE);
        faults.write_gate.close();
        journal.append(b"1");
        faults.write_gate.wait_until_held();
        journal.append(b"2");
        assert_eq!(journal.rotate(), 3);
        assert_eq!(journal.rotate(), 3, "a second rotate at the same point is the same rotation");
        journal.append(b"3");
        faults.write_gate.open();
        journal.wait_durable(3).await.unwrap();
        let firsts: Vec<_> = format::list_data_dir(dir.path()).unwrap().segments.into_iter().map(|(s, _)| s).collect();
        assert_eq!(firsts, vec![1, 3]);
        // A rotation with nothing pending makes an empty segment at once, so the older one is covered.
        assert_eq!(journal.rotate(), 4);
        journal.append(b"4");
        journal.wait_durable(4).await.unwrap();
        let firsts: Vec<_> = format::list_data_dir(dir.path()).unwrap().segments.into_iter().map(|(s, _)| s).collect();
        assert_eq!(firsts, vec![1, 3, 4]);
        journal.close();
        assert_eq!(read_all(dir.path()).len(), 4);
    }

    #[tokio::test]
    async fn removing_covered_segments_removes_exactly_those_and_never_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = open_test(dir.path(), Durability::Write, LARGE);
        for i in 1..=6 {
            if i == 3 || i == 5 {
                assert_eq!(journal.rotate(), i);
            }
            let seq = journal.append(&payload(i));
            journal.wait_durable(seq).await.unwrap();
        }
        let firsts = || -> Vec<u64> {
            format::list_data_dir(dir.path()).unwrap().segments.into_iter().map(|(s, _)| s).collect()
        };
        assert_eq!(firsts(), vec![1, 3, 5]);
        assert_eq!(journal.remove_segments_covered_by(1).unwrap(), 0, "wal-1 still holds record 2");
        assert_eq!(firsts(), vec![1, 3, 5]);
        assert_eq!(journal.remove_segments_covered_by(2).unwrap(), 1);
        assert_eq!(firsts(), vec![3, 5]);
        assert_eq!(journal.remove_segments_covered_by(100).unwrap(), 1, "wal-5 is being written");
        assert_eq!(firsts(), vec![5]);
        journal.close();
        assert_eq!(read_all(dir.path()), vec![(5, payload(5)), (6, payload(6))]);
    }

    /// A disk that refuses writes turns the journal unhealthy and fails waiters; once it works again the
    /// journal recovers by itself, and the log holds every record exactly once.
    #[tokio::test]
    async fn a_failing_write_fails_waiters_then_recovers_without_loss_or_duplicates() {
        for mode in [Durability::Write, Durability::Fsync] {
            let dir = tempfile::tempdir().unwrap();
            let (journal, faults) = open_test(dir.path(), mode, LARGE);
            let mut health = journal.health();
            journal.wait_durable(journal.append(b"before")).await.unwrap();

            faults.fail_writes.store(true, Ordering::SeqCst);
            let during = journal.append(b"during");
            assert_eq!(journal.wait_durable(during).await, Err(Unavailable::Failing), "{mode:?}");
            assert!(!journal.is_healthy());
            assert!(!*health.wait_for(|healthy| !healthy).await.unwrap());
            let later = journal.append(b"later");
            assert_eq!(journal.wait_durable(later).await, Err(Unavailable::Failing), "new waiters fail too");

            faults.fail_writes.store(false, Ordering::SeqCst);
            health.wait_for(|healthy| *healthy).await.unwrap();
            journal.wait_durable(later).await.unwrap();
            assert!(journal.is_healthy());
            journal.close();
            assert!(faults.injected.load(Ordering::SeqCst) > 0);
            let records = vec![(1, b"before".to_vec()), (2, b"during".to_vec()), (3, b"later".to_vec())];
            assert_eq!(read_all(dir.path()), records, "{mode:?}");
        }
    }

    /// After a failed fdatasync the kernel may have dropped the written pages, so the journal writes
    /// them again before it trusts a sync; the log still holds every record once.
    #[tokio::test]
    async fn a_failing_sync_fails_waiters_then_recovers_without_loss_or_duplicates() {
        for mode in [Durability::Write, Durability::Fsync] {
            let dir = tempfile::tempdir().unwrap();
            let (journal, faults) = open_test(dir.path(), mode, LARGE);
            let mut health = journal.health();
            faults.fail_syncs.store(true, Ordering::SeqCst);
            let first = journal.append(b"first");
            let first_result = journal.wait_durable(first).await;
            health.wait_for(|healthy| !healthy).await.unwrap();
            let second = journal.append(b"second");
            assert_eq!(journal.wait_durable(second).await, Err(Unavailable::Failing), "{mode:?}");

            faults.fail_syncs.store(false, Ordering::SeqCst);
            health.wait_for(|healthy| *healthy).await.unwrap();
            journal.wait_durable(second).await.unwrap();
            // Write mode answers before the sync; fsync mode only after it, so not while it fails.
            match mode {
                Durability::Write => assert_eq!(first_result, Ok(())),
                _ => assert_eq!(first_result, Err(Unavailable::Failing)),
            }
            journal.close();
            assert_eq!(read_all(dir.path()), vec![(1, b"first".to_vec()), (2, b"second".to_vec())], "{mode:?}");
        }
    }

    #[tokio::test]
    async fn close_gives_up_on_a_disk_that_keeps_failing_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, faults) = open_test(dir.path(), Durability::Fsync, LARGE);
        journal.wait_durable(journal.append(b"kept")).await.unwrap();
        faults.fail_writes.store(true, Ordering::SeqCst);
        let lost = journal.append(b"lost");
        journal.close();
        assert_eq!(journal.wait_durable(lost).await, Err(Unavailable::Closed));
        assert_eq!(journal.wait_durable(1).await, Ok(()));
        // The half-written batch is a torn tail for recovery to cut off; what was durable is intact.
        let (_, path) = format::list_data_dir(dir.path()).unwrap().segments.remove(0);
        let segment = format::read_segment(&path).unwrap();
        assert_eq!(segment.records, vec![(1, b"kept".to_vec())]);
    }

    #[tokio::test]
    async fn close_and_drop_write_everything_pending() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), Durability::Write, Duration::from_secs(3600), 1, LARGE).unwrap();
        let expected: Vec<_> = (0..1_000).map(payload).map(|p| (journal.append(&p), p)).collect();
        drop(journal);
        assert_eq!(read_all(dir.path()), expected);

        let journal = Journal::open(dir.path(), Durability::Fsync, Duration::ZERO, 1_001, LARGE).unwrap();
        let seq = journal.append(b"last");
        journal.close();
        journal.close();
        journal.wait_durable(seq).await.unwrap();
        assert_eq!(journal.append(b"after close"), seq + 1, "numbered, never written");
        assert_eq!(journal.wait_durable(seq + 1).await, Err(Unavailable::Closed));
        journal.wait_durable(seq).await.unwrap();
        assert_eq!(read_all(dir.path()).len(), 1_001);
    }

    /// An append that races with `close` is either in the last batch or numbered and never written, and
    /// then reported as such: the writer never counts it as written.
    #[tokio::test]
    async fn an_append_after_close_began_is_never_reported_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, faults) = open_test(dir.path(), Durability::Write, LARGE);
        faults.write_gate.close();
        journal.append(b"before");
        faults.write_gate.wait_until_held();
        journal.append(b"pending");
        // The first half of `close`, while the writer is busy: the flag is up, the join has not begun.
        {
            let mut pending = journal.shared.pending.lock();
            pending.closing_at = Some(pending.next_seq);
        }
        let after = journal.append(b"after");
        faults.write_gate.open();
        journal.close();
        assert_eq!(journal.wait_durable(after).await, Err(Unavailable::Closed));
        journal.wait_durable(after - 1).await.unwrap();
        assert_eq!(read_all(dir.path()), vec![(1, b"before".to_vec()), (2, b"pending".to_vec())]);
    }

    /// Appends do not wake the writer, so a record nobody waits for, appended while the writer sleeps
    /// with nothing to do, used to stay in memory until some later waiter came.
    #[tokio::test]
    async fn a_record_nobody_waits_for_is_written_even_when_the_writer_sleeps() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = open_test(dir.path(), Durability::Fsync, LARGE);
        // Written and synced by the writer thread, which then has nothing left to do.
        journal.wait_durable(journal.append(b"awaited")).await.unwrap();
        let unawaited = journal.append(b"unawaited");
        let mut progress = journal.shared.progress.subscribe();
        let written = progress.wait_for(|p| p.durable_end > unawaited);
        tokio::time::timeout(Duration::from_secs(5), written).await.expect("written without a waiter").unwrap();
        journal.close();
        assert_eq!(read_all(dir.path()), vec![(1, b"awaited".to_vec()), (2, b"unawaited".to_vec())]);
    }

    /// A leader dropped while it yields (its call cancelled) used to leave the wake scheduled for good:
    /// no later waiter led, and batches waited for the writer's periodic look.
    #[tokio::test]
    async fn a_cancelled_leader_still_wakes_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = open_test(dir.path(), Durability::Fsync, LARGE);
        let first = journal.append(b"first");
        {
            let mut cancelled = pin!(journal.wait_durable(first));
            assert!(is_pending(cancelled.as_mut()), "the leader yields before it wakes the writer");
        }
        {
            let pending = journal.shared.pending.lock();
            assert!(!pending.kick_scheduled, "no wake is left scheduled by a leader that is gone");
            assert!(pending.kicked || pending.buf.is_empty(), "the writer was woken for the batch");
        }
        journal.wait_durable(journal.append(b"second")).await.unwrap();
        journal.close();
        assert_eq!(read_all(dir.path()).len(), 2);
    }

    #[tokio::test]
    async fn none_mode_numbers_records_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), Durability::None, Duration::ZERO, 7, LARGE).unwrap();
        assert_eq!(journal.last_appended(), 6);
        assert_eq!((journal.append(b"a"), journal.append(b"b")), (7, 8));
        journal.wait_durable(8).await.unwrap();
        assert_eq!(journal.rotate(), 9);
        assert_eq!(journal.remove_segments_covered_by(8).unwrap(), 0);
        journal.close();
        assert_eq!(format::list_data_dir(dir.path()).unwrap(), format::DataDirListing::default());
    }

    #[test]
    fn open_refuses_bad_arguments_and_a_segment_that_holds_records() {
        let dir = tempfile::tempdir().unwrap();
        let open = |next_seq, max| Journal::open(dir.path(), Durability::Write, Duration::ZERO, next_seq, max);
        assert_eq!(open(0, LARGE).err().unwrap().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(open(1, FILE_HEADER_LEN as u64).err().unwrap().kind(), io::ErrorKind::InvalidInput);
        // An empty segment left by a run that appended nothing is replaced...
        open(1, FILE_HEADER_LEN as u64 + 1).unwrap().close();
        let journal = open(1, LARGE).unwrap();
        journal.append(b"x");
        journal.close();
        // ...but one with records is not.
        assert_eq!(open(1, LARGE).err().unwrap().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(read_all(dir.path()), vec![(1, b"x".to_vec())]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the payloads, segment size and rotation points, the log reads back as exactly what
        /// was appended, in order, across contiguous segments.
        #[test]
        fn the_log_reads_back_as_appended(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 0..40),
            rotate_before in prop::collection::vec(any::<bool>(), 40),
            max_segment_bytes in 25u64..400,
            fsync in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mode = if fsync { Durability::Fsync } else { Durability::Write };
            let (journal, _) = open_test(dir.path(), mode, max_segment_bytes);
            let mut expected = Vec::new();
            for (payload, rotate) in payloads.into_iter().zip(rotate_before) {
                if rotate {
                    journal.rotate();
                }
                expected.push((journal.append(&payload), payload));
            }
            journal.close();
            prop_assert_eq!(read_all(dir.path()), expected);
        }
    }
}
