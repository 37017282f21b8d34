//! Snapshots written while events go on. A snapshot copies objects one at a time, so those it copies
//! late hold events appended after the sequence number it covers. These tests prove that every such
//! event is in the log once the snapshot is in place, and that recovery numbers new events after
//! everything a snapshot's objects hold, so that replay never takes a new event for one they hold.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use quotad::{
    durability::{
        format,
        journal::Durability,
        store::{StorageConfig, Store, StoreError},
    },
    ledger::{
        AgentId, Command, EnvironmentId, Ledger, Limits, Outcome, SnapshotItem, TenantId, Usage, pricing::RateCard,
    },
};

const NOW_MS: u64 = 1_790_000_000_000;
const ENVIRONMENTS: [&str; 4] = ["env-a", "env-b", "env-c", "env-d"];
/// Enough for every commit of the traffic below.
const ALLOCATED_MILLI: u64 = 1_000_000_000_000;
/// How many snapshots holding events past the one they cover the first test wants, and how long it
/// may take to see them.
const SNAPSHOTS_AHEAD_WANTED: usize = 10;
const SEARCH_LIMIT: Duration = Duration::from_secs(60);

fn storage(dir: &Path) -> StorageConfig {
    StorageConfig {
        dir: dir.to_owned(),
        durability: Durability::Write,
        fsync_interval: Duration::from_secs(1),
        snapshot_interval: Duration::from_secs(3_600),
        recover_from_older_snapshot: false,
        max_segment_bytes: 1 << 20,
    }
}

fn open(dir: &Path) -> (Ledger, std::sync::Arc<Store>) {
    let opened = Store::open(storage(dir), Limits::default(), RateCard::default()).unwrap();
    (opened.ledger, opened.store)
}

fn environment(id: &str) -> EnvironmentId {
    EnvironmentId::new(id).unwrap()
}

/// One tenant whose capacity is allocated to every environment.
fn set_up(ledger: &Ledger) {
    let tenant = TenantId::new("tenant").unwrap();
    let purchase = Command::PurchaseCapacity {
        tenant: tenant.clone(),
        amount_milli: ALLOCATED_MILLI * ENVIRONMENTS.len() as u64,
        idempotency_key: None,
    };
    ledger.apply(&purchase, NOW_MS).unwrap();
    for id in ENVIRONMENTS {
        let allocate = Command::AllocateCapacity {
            tenant: tenant.clone(),
            environment: environment(id),
            amount_milli: ALLOCATED_MILLI,
            draw_from_tenant_pool: false,
        };
        ledger.apply(&allocate, NOW_MS).unwrap();
    }
}

/// Reserves and commits `milli` on `id`, without waiting for the log: two events.
fn reserve_and_commit(ledger: &Ledger, id: &str, milli: u64) {
    let reserve = Command::Reserve {
        environment: environment(id),
        agent: AgentId::new("agent").unwrap(),
        usage: Usage::Milli(milli),
        idempotency_key: None,
        expires_at_ms: NOW_MS + 60_000,
        api_key: None,
    };
    let Outcome::Reserved(grant) = ledger.apply(&reserve, NOW_MS).unwrap() else { panic!("not a grant") };
    let commit = Command::Commit { reservation: grant.reservation, usage: Usage::Milli(milli), api_key: None };
    ledger.apply(&commit, NOW_MS).unwrap();
}

/// The sequence numbers of the records the log segments in `dir` hold, as a new process would read them.
fn logged(dir: &Path) -> BTreeSet<u64> {
    let segments = format::list_data_dir(dir).unwrap().segments;
    segments.iter().flat_map(|(_, path)| format::read_segment(path).unwrap().records).map(|(seq, _)| seq).collect()
}

/// The event a snapshot covers, and the last one any of its objects holds.
fn reach(snapshot: &Path) -> (u64, u64) {
    let (covered, items) = format::read_snapshot(snapshot).unwrap();
    let holds_up_to =
        items.iter().map(|bytes| postcard::from_bytes::<SnapshotItem>(bytes).unwrap().applied_seq()).max().unwrap_or(0);
    (covered, holds_up_to)
}

fn data_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn every_event_a_snapshot_holds_is_in_the_log_once_the_snapshot_is_in_place() {
    // Proves that a snapshot is put in place only once the log holds every event its objects hold,
    // also those appended while it copied them: a process killed right after would otherwise leave
    // a snapshot holding events the log lacks, whose numbers the next process gives to new events.
    // Traffic runs on another thread without waiting for the log, as requests in flight do.
    let dir = data_dir("snapshot-under-traffic-");
    let (ledger, store) = open(dir.path());
    set_up(&ledger);
    let stop = AtomicBool::new(false);
    let mut ahead = 0;
    let mut snapshots = 0;
    thread::scope(|scope| {
        scope.spawn(|| {
            for id in ENVIRONMENTS.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                reserve_and_commit(&ledger, id, 1_000);
            }
        });
        // Stops the traffic also when an assertion fails, so that the scope ends and the failure shows.
        let _stop = StopOnDrop(&stop);
        let started = Instant::now();
        while ahead < SNAPSHOTS_AHEAD_WANTED && started.elapsed() < SEARCH_LIMIT {
            let path = store.snapshot(&ledger).unwrap();
            snapshots += 1;
            let (covered, holds_up_to) = reach(&path);
            let logged = logged(dir.path());
            let missing: Vec<u64> = (covered + 1..=holds_up_to).filter(|seq| !logged.contains(seq)).collect();
            assert!(
                missing.is_empty(),
                "snapshot {snapshots} covers {covered}, its objects hold up to {holds_up_to}, the log lacks {missing:?}"
            );
            ahead += usize::from(holds_up_to > covered);
        }
    });
    assert!(
        ahead >= SNAPSHOTS_AHEAD_WANTED,
        "only {ahead} of {snapshots} snapshots copied an object after an event past the one they cover"
    );
    store.close();
}

/// Rewrites the newest snapshot of `dir` to say it covers `covered` only, and cuts the log after
/// `covered`: what a power loss in `write` mode can leave, the snapshot synced and the log's tail not.
fn lose_log_after(dir: &Path, covered: u64) {
    let listing = format::list_data_dir(dir).unwrap();
    let (_, newest) = listing.snapshots.last().unwrap();
    let (_, items) = format::read_snapshot(newest).unwrap();
    std::fs::remove_file(newest).unwrap();
    let mut writer = format::SnapshotWriter::create(dir, covered).unwrap();
    for item in &items {
        writer.append(item).unwrap();
    }
    writer.finish().unwrap();
    for (first_seq, path) in &listing.segments {
        let segment = format::read_segment(path).unwrap();
        let mut bytes = Vec::new();
        format::encode_segment_header(*first_seq, &mut bytes);
        for (seq, payload) in segment.records.iter().filter(|(seq, _)| *seq <= covered) {
            format::encode_record(*seq, payload, &mut bytes);
        }
        std::fs::write(path, bytes).unwrap();
    }
}

/// Replaces the log segment of `dir` that starts at `first_seq` with one that starts after its first
/// record: the record is gone, and no segment claims it.
fn drop_first_record(dir: &Path, first_seq: u64) {
    let path = dir.join(format::segment_file_name(first_seq));
    let segment = format::read_segment(&path).unwrap();
    let mut bytes = Vec::new();
    format::encode_segment_header(first_seq + 1, &mut bytes);
    for (seq, payload) in &segment.records[1..] {
        format::encode_record(*seq, payload, &mut bytes);
    }
    std::fs::write(dir.join(format::segment_file_name(first_seq + 1)), bytes).unwrap();
    std::fs::remove_file(path).unwrap();
}

fn used(ledger: &Ledger, id: &str) -> u64 {
    ledger.balance(&environment(id), NOW_MS).unwrap().allocation_used_milli
}

#[test]
fn after_a_snapshot_that_holds_events_the_log_lost_new_events_are_numbered_after_them() {
    // Proves that recovery numbers new events after the last one any object of the snapshot holds,
    // not after the end of the log, and that the next recovery replays them past the gap: with the
    // numbers of events env-a holds given to new events on env-a, replay would skip those. A gap past
    // what the snapshot's objects hold still stops recovery.
    let tmp = data_dir("snapshot-ahead-of-log-");
    let dir = tmp.path();
    let (ledger, store) = open(dir);
    set_up(&ledger);
    let set_up_events = store.journal().last_appended();
    reserve_and_commit(&ledger, "env-a", 2_000);
    reserve_and_commit(&ledger, "env-a", 3_000);
    store.snapshot(&ledger).unwrap();
    let holds_up_to = store.journal().last_appended();
    store.close();
    drop((ledger, store));
    lose_log_after(dir, set_up_events);

    let (ledger, store) = open(dir);
    assert_eq!(used(&ledger, "env-a"), 5_000, "the snapshot's env-a holds both commits");
    assert_eq!(store.journal().last_appended(), holds_up_to, "new events follow the snapshot's");
    reserve_and_commit(&ledger, "env-a", 7_000);
    reserve_and_commit(&ledger, "env-b", 11_000);
    store.close();
    drop((ledger, store));

    let (ledger, store) = open(dir);
    assert_eq!(used(&ledger, "env-a"), 12_000, "the new commit on env-a is replayed");
    assert_eq!(used(&ledger, "env-b"), 11_000, "and the one on env-b");
    assert_eq!(store.journal().last_appended(), holds_up_to + 4);
    store.close();
    drop((ledger, store));

    // A gap past what the snapshot's objects hold is still damage, and stops recovery.
    let lost = holds_up_to + 1;
    drop_first_record(dir, lost);
    match Store::open(storage(dir), Limits::default(), RateCard::default()) {
        Err(StoreError::Gap { from, to, .. }) => assert_eq!((from, to), (set_up_events + 1, lost)),
        Err(other) => panic!("expected a gap at {lost}, got {other}"),
        Ok(_) => panic!("recovered past a gap at {lost} that no snapshot object holds"),
    }
}
