//! Property tests of recovery. A ledger `A` runs random command sequences while a recording sink keeps
//! every event it applies; a ledger `B` is then rebuilt from a snapshot of `A` (taken at one instant, or
//! object by object while commands keep running) and the events logged after the snapshot began, or
//! from the whole log alone, or from both after a round trip through serde. `B` must equal `A` in
//! every object's exported state and in everything the public API reports, and must go on to behave
//! exactly as `A` does: the same further commands give the same outcomes, reservation ids, events and
//! balances on both.
//!
//! The step generator is shared with `tests/ledger_properties.rs` (`tests/ledger_steps`); it reads
//! the state it needs from `A` through the public API instead of from a model, because these tests
//! compare two ledgers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use proptest::prelude::*;
use proptest::sample::Index;
use quotad::ledger::{
    ApiKeyId, Balance, Command, EnvironmentId, Event, EventSink, Ledger, LedgerError, Levels, Limits, Milli, Outcome,
    Quote, ReservationId, RestoreError, SnapshotItem, TenantCapacity, TenantId, Usage,
    api_keys::ApiKeyPage,
    usage::{Dimension, UsageQuery, UsageRange, UsageRow},
};

mod ledger_steps;
use ledger_steps::{
    Actual, Allocation, Amount, Pick, Resolve, START_MS, Shape, Step, TENANTS, agent, command, kept, next_month_start,
    retried, setup,
};

/// e0..e2 are allocated by the setup; e3 may become a capacity environment (or an app environment)
/// later, so objects are created while a snapshot is being taken; `app` is linked by the setup, `app2`
/// is not; `ghost` is never created.
const ENVS: [&str; 7] = ["e0", "e1", "e2", "e3", "app", "app2", "ghost"];
const APP: usize = 4;
const APP2: usize = 5;
const GHOST: usize = 6;

/// Small caps, a short retention and few remembered purchase keys, so that short sequences reach
/// every limit and forgetting is part of what recovery must reproduce.
fn limits() -> Limits {
    Limits {
        max_open_reservations_per_environment: 4,
        max_open_reservations_total: 8,
        resolved_retention_ms: 200,
        max_resolved_per_environment: 4,
        max_purchase_keys_per_tenant: 2,
        max_agents_per_environment: 2,
        // Few usage keys, so that use beyond them, reported under `other`, is part of what is restored.
        max_usage_keys_per_tenant: 3,
        // Few API keys with few holds each, so that both caps are reached.
        max_api_keys_per_tenant: 2,
        max_open_reservations_per_api_key: 2,
        ..Limits::default()
    }
}

fn env(i: usize) -> EnvironmentId {
    EnvironmentId::new(ENVS[i]).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The recording sink.

/// One logged event: (sequence number, time applied, event, the alert levels logged with it).
type Logged = (u64, u64, Event, Option<Levels>);

/// Numbers events from 1 (or from where a restored ledger's log left off) and keeps them in order.
#[derive(Default)]
struct Recorder {
    last: AtomicU64,
    /// In sequence order: a number is assigned and its event pushed under this one lock.
    log: Mutex<Vec<Logged>>,
}

impl Recorder {
    fn starting_after(last: u64) -> Self {
        Self { last: AtomicU64::new(last), log: Mutex::new(Vec::new()) }
    }

    /// The last sequence number assigned.
    fn last(&self) -> u64 {
        let _in_order = self.log.lock().unwrap();
        self.last.load(Ordering::SeqCst)
    }

    fn events(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    fn events_after(&self, seq: u64) -> Vec<Logged> {
        self.log.lock().unwrap().iter().filter(|(s, ..)| *s > seq).cloned().collect()
    }
}

impl EventSink for Recorder {
    fn record(&self, now: u64, event: &Event, levels: Option<Levels>) -> u64 {
        let mut log = self.log.lock().unwrap();
        let seq = self.last.fetch_add(1, Ordering::SeqCst) + 1;
        log.push((seq, now, event.clone(), levels));
        seq
    }
}

fn recorded() -> (Ledger, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    (Ledger::with_sink(limits(), recorder.clone()), recorder)
}

/// Recovery as a restarting server runs it: import the snapshot, recompute the totals, replay the
/// events logged after `covered` (the last sequence number assigned when the snapshot began, 0
/// without a snapshot), finish. The new ledger's sink numbers on from the last event.
fn restore(items: Vec<SnapshotItem>, covered: u64, events: &[Logged]) -> Result<(Ledger, Arc<Recorder>), RestoreError> {
    let last = events.last().map_or(covered, |(seq, ..)| *seq);
    let recorder = Arc::new(Recorder::starting_after(last));
    let ledger = Ledger::with_sink(limits(), recorder.clone());
    for item in items {
        ledger.import(item)?;
    }
    ledger.recompute_totals();
    for (seq, now, event, levels) in events.iter().filter(|(seq, ..)| *seq > covered) {
        ledger.replay(*seq, *now, event, *levels)?;
    }
    ledger.finish_restore()?;
    Ok((ledger, recorder))
}

fn snapshot(ledger: &Ledger) -> Vec<SnapshotItem> {
    let mut items = Vec::new();
    ledger.export(|item| items.push(item));
    items
}

/// Every object's exported state, by kind and id: the whole ledger except the expiry queue (whose
/// entries for resolved holds are allowed to differ) and the open-hold count (compared separately).
fn state(ledger: &Ledger) -> BTreeMap<String, serde_json::Value> {
    let mut state = BTreeMap::new();
    ledger.export(|item| {
        let name = match &item {
            SnapshotItem::Tenant { id, .. } => format!("tenant {id}"),
            SnapshotItem::Environment { id, .. } => format!("environment {id}"),
            SnapshotItem::App { id, .. } => format!("app {id}"),
            SnapshotItem::RateCard(card) => format!("rate card {}", card.version),
            SnapshotItem::Alerts { tenant, .. } => format!("alerts {tenant}"),
            SnapshotItem::ApiKey(key) => format!("api key {}", key.id),
        };
        let value = serde_json::to_value(&item).expect("a snapshot item serialises");
        assert!(state.insert(name.clone(), value).is_none(), "{name} exported twice");
    });
    state
}

/// Everything the public API reports about the whole ledger at `now`.
#[derive(Debug, PartialEq)]
struct Observed {
    balances: Vec<Result<Balance, LedgerError>>,
    quotes: Vec<Result<Quote, LedgerError>>,
    dry_runs: Vec<Result<Quote, LedgerError>>,
    tenants: Vec<Result<TenantCapacity, LedgerError>>,
    usage: Vec<Result<Vec<UsageRow>, LedgerError>>,
    open: u64,
    /// Each tenant's keys with their open-hold counts.
    api_keys: Vec<Result<ApiKeyPage, LedgerError>>,
    /// The balance of every environment through each key id a scenario may create.
    scoped: Vec<Result<Balance, LedgerError>>,
}

/// The ids `Driver` gives the keys it creates, in order; more than any scenario creates are unused.
fn api_key_id(i: usize) -> ApiKeyId {
    ApiKeyId::new(&format!("k{i}")).unwrap()
}

/// A tenant's usage this month in full detail, without the refusal counts: refusals are not logged,
/// so a restored ledger starts counting them from zero.
fn logged_usage(ledger: &Ledger, tenant: &TenantId, now: u64) -> Result<Vec<UsageRow>, LedgerError> {
    use Dimension::*;
    let range = UsageRange::new(None, None, now).unwrap();
    let group_by = vec![Environment, Agent, Scenario, Source, Day];
    let query = UsageQuery { tenant: tenant.clone(), environment: None, agent: None, range, group_by };
    let mut rows = ledger.usage(&query)?;
    for row in &mut rows {
        row.totals.reservations_refused = 0;
    }
    rows.retain(|row| row.totals != Default::default());
    Ok(rows)
}

fn observe(ledger: &Ledger, now: u64) -> Observed {
    let names = ENVS.map(|e| EnvironmentId::new(e).unwrap());
    let quotes = names
        .iter()
        .flat_map(|name| [1, 1_000, 5_000].map(|amount| (name, amount)))
        .map(|(name, amount)| ledger.quote(name, amount, now))
        .collect();
    Observed {
        balances: names.iter().map(|name| ledger.balance(name, now)).collect(),
        quotes,
        dry_runs: names.iter().map(|name| ledger.dry_run(name, &agent(0), &Usage::Milli(1_000), None, now)).collect(),
        usage: TENANTS.iter().map(|t| logged_usage(ledger, &TenantId::new(t).unwrap(), now)).collect(),
        tenants: TENANTS.iter().map(|t| ledger.tenant(&TenantId::new(t).unwrap(), now)).collect(),
        open: ledger.open_reservations(),
        api_keys: TENANTS.iter().map(|t| ledger.api_keys(&TenantId::new(t).unwrap(), None, 100)).collect(),
        scoped: (0..6)
            .flat_map(|i| names.iter().map(move |name| (api_key_id(i), name)))
            .map(|(key, name)| ledger.balance_for(name, Some(&key), now))
            .collect(),
    }
}

/// `B` equals `A`: the same objects in the same state, the same reports, and both consistent.
fn assert_same(a: &Ledger, b: &Ledger, now: u64) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.verify(), Ok(()), "A is consistent");
    prop_assert_eq!(b.verify(), Ok(()), "B is consistent");
    // A read starts a billing period that has begun, as an event would: A was read along the way and B
    // was not, so both are read before their states are compared.
    let (seen_a, seen_b) = (observe(a, now), observe(b, now));
    prop_assert_eq!(state(b), state(a), "every object's state");
    prop_assert_eq!(seen_b, seen_a, "what the API reports");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Generated steps (their vocabulary is in `ledger_steps`). They become commands against `A`'s
// current state.

/// How steps lean: `admin` weighs admin commands against the hot path, and `fresh` weighs the objects
/// the setup does not create (tenant t2, environments e3 and `app2`) against those it does.
#[derive(Debug, Clone, Copy)]
struct Lean {
    admin: u32,
    fresh: u32,
}

/// Ordinary traffic: mostly the hot path on existing objects.
const ORDINARY: Lean = Lean { admin: 1, fresh: 1 };
/// Traffic during an export: the interesting interleavings create, fund and relink objects while
/// others are being copied.
const BUSY: Lean = Lean { admin: 3, fresh: 6 };

fn tenant_index(lean: Lean) -> impl Strategy<Value = usize> {
    prop_oneof![2 => 0..2usize, lean.fresh => Just(2usize)]
}

/// An environment to allocate to: an existing capacity environment, e3, or `app` (refused).
fn allocation_env_index(lean: Lean) -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0..3usize, lean.fresh => Just(3usize), 1 => Just(APP)]
}

/// An environment to link: usually an app environment, sometimes a capacity environment (refused).
fn link_env_index(lean: Lean) -> impl Strategy<Value = usize> {
    prop_oneof![2 => Just(APP), lean.fresh => Just(APP2), lean.fresh => Just(3usize), 1 => 0..3usize]
}

fn step(lean: Lean) -> impl Strategy<Value = Step> {
    ledger_steps::step(Shape {
        admin: lean.admin,
        tenant: tenant_index(lean).boxed(),
        allocation_env: allocation_env_index(lean).boxed(),
        link_env: link_env_index(lean).boxed(),
        reserve_env: prop_oneof![19 => 0..GHOST, 1 => Just(GHOST)].boxed(),
        envs: ENVS.len(),
        ttl_ms: 1..=200,
        near_low: false,
        api_keys: 1,
    })
}

/// Phase 1 runs before the snapshot; `during` are batches run between the items of a mixed-instant
/// export, one batch after each item; phase 2 runs after the export; phase 3 runs on `A` and the
/// restored `B` alike.
#[derive(Debug, Clone)]
struct Scenario {
    phase1: Vec<Step>,
    during: Vec<Vec<Step>>,
    phase2: Vec<Step>,
    phase3: Vec<Step>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    use proptest::collection::vec;
    (
        setup(APP),
        vec(step(ORDINARY), 0..=40),
        vec(vec(step(BUSY), 0..=5), 0..=10),
        vec(step(ORDINARY), 0..=25),
        vec(step(ORDINARY), 1..=30),
    )
        .prop_map(|(mut phase1, rest, during, phase2, phase3)| {
            phase1.extend(rest);
            Scenario { phase1, during, phase2, phase3 }
        })
}

// ---------------------------------------------------------------------------------------------
// The driver: turns steps into commands against `A`, applies them to every ledger given (the first
// is `A`), and checks that all of them answer alike.

struct Driver {
    now: u64,
    /// Every reservation `A` granted (not replays) with its amount, oldest first.
    issued: Vec<(ReservationId, Milli)>,
    /// The first accepted commit of each reservation.
    committed: HashMap<ReservationId, Milli>,
    /// Purchases and reservations sent with an idempotency key, with the reservation's TTL.
    keyed: Vec<(Command, u64)>,
    /// API keys created so far: their ids are `api_key_id(0..api_keys)`.
    api_keys: usize,
}

impl Driver {
    fn new() -> Self {
        Self { now: START_MS, issued: Vec::new(), committed: HashMap::new(), keyed: Vec::new(), api_keys: 0 }
    }

    fn reservation(&self, pick: &Pick) -> ReservationId {
        let never_issued = |app| ReservationId { environment: env(if app { APP } else { 0 }), seq: 1_000_000 };
        match pick {
            _ if self.issued.is_empty() => never_issued(false),
            Pick::Recent(n) => self.issued[self.issued.len() - 1 - (*n).min(self.issued.len() - 1)].0.clone(),
            Pick::Any(i) => i.get(&self.issued).0.clone(),
            Pick::Unknown(app) => never_issued(*app),
        }
    }

    fn actual(&self, r: &ReservationId, actual: &Actual) -> Milli {
        let Some((_, amount)) = self.issued.iter().find(|(issued, _)| issued == r) else { return 1_000 };
        match actual {
            Actual::Quarters(q) => amount * q / 4,
            Actual::Above(extra) => amount + extra,
            Actual::FirstAgain => self.committed.get(r).copied().unwrap_or(*amount),
            Actual::Any(a) => *a,
        }
    }

    fn allocation(&self, a: &Ledger, t: &TenantId, e: &EnvironmentId, amount: &Allocation) -> Milli {
        let (current, taken) = match a.balance(e, self.now) {
            // An estimate of the allocation's use and holds is enough to land near the boundary.
            Ok(b) if b.environment == *e => {
                let free = b.allocated_milli - b.allocation_used_milli;
                (b.allocated_milli, b.allocation_used_milli + b.reserved_milli.min(free))
            }
            _ => (0, 0),
        };
        let room = match a.tenant(t, self.now) {
            Ok(t) => (t.purchased_milli + current)
                .saturating_sub(t.allocated_milli + t.pool_used_milli + t.pool_reserved_milli),
            Err(_) => 0,
        };
        match amount {
            Allocation::Exactly(x) => *x,
            Allocation::NearUse(delta) => taken.saturating_add_signed(*delta),
            Allocation::NearRoom(delta) => room.saturating_add_signed(*delta),
        }
    }

    fn reserve_amount(&self, a: &Ledger, e: &EnvironmentId, amount: &Amount) -> Milli {
        let available = a.balance(e, self.now).map_or(1_000, |b| b.available_milli);
        // The edge refuses reservations of nothing, so the core never sees them; uncapped
        // pay-as-you-go has no boundary to stand near.
        match amount {
            Amount::Exactly(x) => *x,
            Amount::NearAvailable(_) if available > 1_000_000 => 1_000,
            Amount::NearAvailable(delta) => available.saturating_add_signed(*delta).max(1),
            Amount::NearLow(delta) => unreachable!("this suite's steps draw no NearLow amounts, yet drew {delta}"),
        }
    }

    /// Runs one step on every ledger in `ledgers`, then checks they are consistent and alike.
    fn run(&mut self, ledgers: &[&Ledger], step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Advance { ms, sweep } => {
                self.now += ms;
                if *sweep {
                    self.sweep(ledgers);
                }
            }
            Step::NextMonth { ms } => self.now = next_month_start(self.now) + ms,
            Step::Retry { pick, changed } => {
                if let Some(command) = retried(&self.keyed, pick, *changed, self.now) {
                    self.apply(ledgers, &command)?;
                }
            }
            _ => {
                let command = command(&Against { driver: self, a: ledgers[0] }, step);
                self.keyed.extend(kept(step, &command));
                // Every creation takes an id, granted or not, so ids are never reused.
                self.api_keys += usize::from(matches!(command, Command::CreateApiKey { .. }));
                self.apply(ledgers, &command)?;
            }
        }
        for ledger in ledgers {
            prop_assert_eq!(ledger.verify(), Ok(()), "after {:?}", step);
        }
        let first = observe(ledgers[0], self.now);
        for other in &ledgers[1..] {
            prop_assert_eq!(&observe(other, self.now), &first, "after {:?} at {}", step, self.now);
        }
        Ok(())
    }

    fn run_all(&mut self, ledgers: &[&Ledger], steps: &[Step]) -> Result<(), TestCaseError> {
        steps.iter().try_for_each(|step| self.run(ledgers, step))
    }

    fn apply(&mut self, ledgers: &[&Ledger], command: &Command) -> Result<(), TestCaseError> {
        self.outcome(ledgers, command).map(drop)
    }

    /// Applies `command` to every ledger, checks they answer alike, and returns `A`'s answer.
    fn outcome(
        &mut self,
        ledgers: &[&Ledger],
        command: &Command,
    ) -> Result<Result<Outcome, LedgerError>, TestCaseError> {
        let first = ledgers[0].apply(command, self.now);
        for other in &ledgers[1..] {
            prop_assert_eq!(other.apply(command, self.now), first.clone(), "outcome of {:?} at {}", command, self.now);
        }
        match (&first, command) {
            (Ok(Outcome::Reserved(g)), _) if !g.replayed => {
                self.issued.push((g.reservation.clone(), g.amount_milli));
            }
            (Ok(Outcome::Committed(s)), Command::Commit { reservation, usage: Usage::Milli(actual_milli), .. })
                if !s.replayed =>
            {
                self.committed.entry(reservation.clone()).or_insert(*actual_milli);
            }
            _ => {}
        }
        Ok(first)
    }

    /// Expires what is due on every ledger, as the server's sweep does. A restored ledger also queues
    /// the holds of its snapshot afresh, some of them resolved since, which expire to nothing; the
    /// ledgers are compared after the step.
    fn sweep(&self, ledgers: &[&Ledger]) {
        for ledger in ledgers {
            ledger.expire_due(self.now, usize::MAX);
        }
    }
}

/// The driver's state read together with `A`'s: what a step's picks and relative amounts come to.
struct Against<'a> {
    driver: &'a Driver,
    a: &'a Ledger,
}

impl Resolve for Against<'_> {
    fn env(&self, i: usize) -> EnvironmentId {
        env(i)
    }

    fn now(&self) -> u64 {
        self.driver.now
    }

    fn reservation(&self, pick: &Pick) -> ReservationId {
        self.driver.reservation(pick)
    }

    fn actual(&self, r: &ReservationId, actual: &Actual) -> Milli {
        self.driver.actual(r, actual)
    }

    fn allocation(&self, t: &TenantId, e: &EnvironmentId, amount: &Allocation) -> Milli {
        self.driver.allocation(self.a, t, e, amount)
    }

    fn reserve_amount(&self, e: &EnvironmentId, amount: &Amount) -> Milli {
        self.driver.reserve_amount(self.a, e, amount)
    }

    fn api_key(&self, pick: &Index) -> Option<ApiKeyId> {
        (self.driver.api_keys > 0).then(|| api_key_id(pick.index(self.driver.api_keys)))
    }

    fn next_api_key_id(&self) -> ApiKeyId {
        api_key_id(self.driver.api_keys)
    }
}

/// Phase 3: `A` and `B` take the same further commands with the same outcomes after every step, log
/// the same events under the same sequence numbers, and end in the same state.
fn behave_alike(
    driver: &mut Driver,
    (a, a_log): (&Ledger, &Recorder),
    (b, b_log): (&Ledger, &Recorder),
    steps: &[Step],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(b_log.last(), a_log.last(), "B numbers on from A's last event");
    let mark = a_log.last();
    driver.run_all(&[a, b], steps)?;
    prop_assert_eq!(b_log.events(), a_log.events_after(mark), "events logged in phase 3");
    assert_same(a, b, driver.now)
}

/// Runs phase 1 on a fresh `A`, then a mixed-instant export that runs each `during` batch after one
/// item, then phase 2. Returns `A`, its log, the export and `S`, the last sequence number assigned
/// when the export began.
fn run_with_mixed_snapshot(
    driver: &mut Driver,
    scenario: &Scenario,
) -> Result<(Ledger, Arc<Recorder>, Vec<SnapshotItem>, u64), TestCaseError> {
    let (a, a_log) = recorded();
    driver.run_all(&[&a], &scenario.phase1)?;
    let s = a_log.last();
    let mut items = Vec::new();
    let mut batches = scenario.during.iter();
    let mut failure = None;
    // `emit` runs outside every lock of `A`, as a snapshot writer does while requests keep coming:
    // the commands below would deadlock here if `export` held a lock they need.
    a.export(|item| {
        items.push(item);
        for step in batches.next().into_iter().flatten() {
            if failure.is_none()
                && let Err(e) = driver.run(&[&a], step)
            {
                failure = Some(e);
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    driver.run_all(&[&a], &scenario.phase2)?;
    Ok((a, a_log, items, s))
}

fn restored(
    items: Vec<SnapshotItem>,
    covered: u64,
    events: &[Logged],
) -> Result<(Ledger, Arc<Recorder>), TestCaseError> {
    restore(items, covered, events).map_err(|e| TestCaseError::fail(format!("restore failed: {e}")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Proves that a snapshot taken between commands plus the events logged after it restores a ledger
    /// equal to the original, which then behaves exactly as the original does.
    #[test]
    fn a_snapshot_and_the_later_log_restore_the_ledger_exactly(scenario in scenario()) {
        let mut driver = Driver::new();
        let (a, a_log) = recorded();
        driver.run_all(&[&a], &scenario.phase1)?;
        let s = a_log.last();
        let items = snapshot(&a);
        driver.run_all(&[&a], &scenario.phase2)?;

        let (b, b_log) = restored(items, s, &a_log.events_after(s))?;
        assert_same(&a, &b, driver.now)?;
        behave_alike(&mut driver, (&a, &a_log), (&b, &b_log), &scenario.phase3)?;
    }

    /// Proves that a snapshot copied object by object while commands keep running (a mixed-instant
    /// snapshot), plus every event logged after it began, restores a ledger equal to the original,
    /// which then behaves exactly as the original does.
    #[test]
    fn a_mixed_instant_snapshot_and_the_later_log_restore_the_ledger_exactly(scenario in scenario()) {
        let mut driver = Driver::new();
        let (a, a_log, items, s) = run_with_mixed_snapshot(&mut driver, &scenario)?;

        let (b, b_log) = restored(items, s, &a_log.events_after(s))?;
        assert_same(&a, &b, driver.now)?;
        behave_alike(&mut driver, (&a, &a_log), (&b, &b_log), &scenario.phase3)?;
    }

    /// Proves that replaying the whole log from its first event onto an empty ledger, with no
    /// snapshot, rebuilds a ledger equal to the original, which then behaves exactly as it does.
    #[test]
    fn the_whole_log_alone_restores_the_ledger_exactly(scenario in scenario()) {
        let mut driver = Driver::new();
        let (a, a_log, _, _) = run_with_mixed_snapshot(&mut driver, &scenario)?;

        let (b, b_log) = restored(Vec::new(), 0, &a_log.events())?;
        assert_same(&a, &b, driver.now)?;
        behave_alike(&mut driver, (&a, &a_log), (&b, &b_log), &scenario.phase3)?;
    }

    /// Proves that snapshot items and events survive a serde round trip unchanged, and that a mixed-
    /// instant snapshot and log restored from their decoded forms still rebuild the ledger exactly.
    #[test]
    fn a_decoded_snapshot_and_log_restore_the_ledger_exactly(scenario in scenario()) {
        let mut driver = Driver::new();
        let (a, a_log, items, s) = run_with_mixed_snapshot(&mut driver, &scenario)?;

        let mut decoded_items = Vec::new();
        for item in &items {
            let encoded = serde_json::to_string(item).expect("a snapshot item serialises");
            let decoded: SnapshotItem = serde_json::from_str(&encoded).expect("a snapshot item deserialises");
            // Compared as values: maps are unordered, so the encodings may list entries differently.
            prop_assert_eq!(serde_json::to_value(&decoded).unwrap(), serde_json::to_value(item).unwrap());
            decoded_items.push(decoded);
        }
        let mut decoded_events = Vec::new();
        for logged in a_log.events_after(s) {
            let encoded = serde_json::to_string(&logged).expect("an event serialises");
            let decoded: Logged = serde_json::from_str(&encoded).expect("an event deserialises");
            prop_assert_eq!(&decoded, &logged, "event round trip");
            decoded_events.push(decoded);
        }

        let (b, b_log) = restored(decoded_items, s, &decoded_events)?;
        assert_same(&a, &b, driver.now)?;
        behave_alike(&mut driver, (&a, &a_log), (&b, &b_log), &scenario.phase3)?;
    }
}

/// Proves that a tenant bought and an environment allocated to it after an export has begun copying
/// items (here, right after the first tenant) are restored from the log, and that the restored
/// ledger goes on to behave as the original.
#[test]
fn a_tenant_and_environment_created_mid_export_are_restored() {
    let mut driver = Driver::new();
    let setup = vec![
        Step::Purchase { tenant: 0, amount: 20_000, key: None },
        Step::Purchase { tenant: 1, amount: 10_000, key: None },
        Step::Allocate { tenant: 0, env: 0, amount: Allocation::Exactly(5_000), pool: false },
        Step::Allocate { tenant: 1, env: 2, amount: Allocation::Exactly(5_000), pool: false },
    ];
    let onboarding = vec![
        Step::Purchase { tenant: 2, amount: 10_000, key: None },
        Step::Allocate { tenant: 2, env: 3, amount: Allocation::Exactly(4_000), pool: false },
    ];
    let use_it = vec![
        Step::Reserve { env: 3, agent: 0, amount: Amount::Exactly(3_000), key: None, ttl_ms: 100, api_key: None },
        Step::Commit { pick: Pick::Recent(0), actual: Actual::Above(2_000) },
    ];
    let scenario = Scenario { phase1: setup, during: vec![onboarding], phase2: vec![], phase3: use_it };
    let (a, a_log, items, s) = run_with_mixed_snapshot(&mut driver, &scenario).unwrap();
    let (b, b_log) = restore(items, s, &a_log.events()).expect("the snapshot restores");
    assert_same(&a, &b, driver.now).unwrap();
    behave_alike(&mut driver, (&a, &a_log), (&b, &b_log), &scenario.phase3).unwrap();
    assert_eq!(b.balance(&env(3), driver.now).unwrap().overage_milli, 1_000);
}

/// Proves that an environment created mid-export keeps the alert level it was last alerted at when
/// another environment takes their tenant's whole pool later in the export: restoring replays its
/// events against the pool as it was when they were applied, not as the other environment's copy
/// left it, so it is neither marked nor alerted depleted when the original was not.
#[test]
fn an_environment_replayed_mid_export_keeps_its_level_when_a_sibling_takes_the_pool_later() {
    let mut driver = Driver::new();
    let setup = vec![
        Step::Purchase { tenant: 0, amount: 10_000, key: None },
        Step::Allocate { tenant: 0, env: 1, amount: Allocation::Exactly(0), pool: false },
    ];
    // Run right after the tenant is copied: e3 is created on the pool, which e1's allocation then takes.
    let busy = vec![
        Step::Allocate { tenant: 0, env: 3, amount: Allocation::Exactly(0), pool: true },
        Step::Allocate { tenant: 0, env: 1, amount: Allocation::Exactly(10_000), pool: false },
    ];
    // The pool comes back and e3 changes: it was never alerted as depleted, so no RESTORED alert fires.
    let after = vec![
        Step::Allocate { tenant: 0, env: 1, amount: Allocation::Exactly(0), pool: false },
        Step::SetPayAsYouGo { env: 3, enabled: false, budget: 0 },
    ];
    let scenario = Scenario { phase1: setup, during: vec![busy], phase2: vec![], phase3: after };
    let (a, a_log, items, s) = run_with_mixed_snapshot(&mut driver, &scenario).unwrap();
    assert!(matches!(items.first(), Some(SnapshotItem::Tenant { .. })), "the busy steps ran after the tenant's copy");
    let level = |ledger: &Ledger| state(ledger)["environment e3"]["Environment"]["books"]["alert_level"].clone();
    assert_eq!(level(&a), "Ok", "e3 was last alerted with the pool available");
    assert_eq!(a.balance(&env(3), driver.now).unwrap().available_milli, 0, "e1 has taken the pool since");

    let (b, b_log) = restore(items, s, &a_log.events_after(s)).expect("the snapshot restores");
    assert_eq!(level(&b), "Ok");
    assert_same(&a, &b, driver.now).unwrap();
    behave_alike(&mut driver, (&a, &a_log), (&b, &b_log), &scenario.phase3).unwrap();
    let tenant = TenantId::new(TENANTS[0]).unwrap();
    assert_eq!(b.recent_alerts(&tenant, Some(&env(3)), 10), Vec::new(), "e3 never alerted");
}

/// Proves that a tenant's capacity alert fires after a restore exactly where it fired live. Here e3,
/// created mid-export, takes half the purchase and gives it back before e1, copied after both, takes
/// more than half: live the tenant never reaches its purchase, but replaying e3's allocation against
/// e1's copy would find it over, so the tenant level logged with the event must be the one replay takes.
#[test]
fn a_tenant_replayed_mid_export_alerts_only_where_it_crossed_live() {
    let mut driver = Driver::new();
    let setup = vec![
        Step::Purchase { tenant: 0, amount: 10_000, key: None },
        Step::Allocate { tenant: 0, env: 1, amount: Allocation::Exactly(0), pool: true },
    ];
    // Run right after the tenant is copied; e1 is copied after them, e3 is replayed from the log.
    let busy = vec![
        Step::Allocate { tenant: 0, env: 3, amount: Allocation::Exactly(5_000), pool: true },
        Step::Allocate { tenant: 0, env: 3, amount: Allocation::Exactly(0), pool: true },
        Step::Allocate { tenant: 0, env: 1, amount: Allocation::Exactly(6_000), pool: true },
    ];
    let after = vec![Step::SetPayAsYouGo { env: 3, enabled: false, budget: 0 }];
    let scenario = Scenario { phase1: setup, during: vec![busy], phase2: vec![], phase3: after };
    let (a, a_log, items, s) = run_with_mixed_snapshot(&mut driver, &scenario).unwrap();
    assert!(matches!(items.first(), Some(SnapshotItem::Tenant { .. })), "the busy steps ran after the tenant's copy");
    let tenant = TenantId::new(TENANTS[0]).unwrap();
    assert_eq!(a.recent_alerts(&tenant, None, 10), Vec::new(), "nothing alerted live");

    let (b, b_log) = restore(items, s, &a_log.events_after(s)).expect("the snapshot restores");
    assert_eq!(b.recent_alerts(&tenant, None, 10), Vec::new(), "nothing alerted at replay");
    assert_same(&a, &b, driver.now).unwrap();
    behave_alike(&mut driver, (&a, &a_log), (&b, &b_log), &scenario.phase3).unwrap();
}
