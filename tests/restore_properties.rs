//! Property tests of recovery. A ledger `A` runs random command sequences while a recording sink keeps
//! every event it applies; a ledger `B` is then rebuilt from a snapshot of `A` (taken at one instant, or
//! object by object while commands keep running) and the events logged after the snapshot began, or
//! from the whole log alone, or from both after a round trip through serde. `B` must equal `A` in
//! every object's exported state and in everything the public API reports, and must go on to behave
//! exactly as `A` does: the same further commands give the same outcomes, reservation ids, events and
//! balances on both.
//!
//! The generator is adapted from `tests/ledger_properties.rs`; it reads the state it needs from `A`
//! through the public API instead of from a model, because these tests compare two ledgers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use proptest::prelude::*;
use proptest::sample::Index;
use quotad::ledger::{
    AgentId, Balance, Command, EnvironmentId, Event, EventSink, IdempotencyKey, Ledger, LedgerError, Limits, Milli,
    Outcome, Quote, ReservationId, RestoreError, SnapshotItem, TenantCapacity, TenantId,
};

const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
/// e0..e2 are allocated by the setup; e3 may become a capacity environment (or an app environment)
/// later, so objects are created while a snapshot is being taken; `app` is linked by the setup, `app2`
/// is not; `ghost` is never created.
const ENVS: [&str; 7] = ["e0", "e1", "e2", "e3", "app", "app2", "ghost"];
const APP: usize = 4;
const APP2: usize = 5;
const GHOST: usize = 6;
const AGENTS: [&str; 3] = ["a0", "a1", "a2"];
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const START_MS: u64 = 1_700_000_000_000;

/// Small caps, a short retention and few remembered purchase keys, so that short sequences reach
/// every limit and forgetting is part of what recovery must reproduce.
fn limits() -> Limits {
    Limits {
        max_open_reservations_per_environment: 4,
        max_open_reservations_total: 8,
        resolved_retention_ms: 200,
        max_resolved_per_environment: 4,
        max_purchase_keys_per_tenant: 2,
    }
}

fn tenant(i: usize) -> TenantId {
    TenantId::new(TENANTS[i]).unwrap()
}
fn env(i: usize) -> EnvironmentId {
    EnvironmentId::new(ENVS[i]).unwrap()
}
fn agent(i: usize) -> AgentId {
    AgentId::new(AGENTS[i]).unwrap()
}
fn key(i: usize) -> IdempotencyKey {
    IdempotencyKey::new(KEYS[i]).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The recording sink.

/// One logged event: (sequence number, time applied, event).
type Logged = (u64, u64, Event);

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
        self.log.lock().unwrap().iter().filter(|(s, _, _)| *s > seq).cloned().collect()
    }
}

impl EventSink for Recorder {
    fn record(&self, now: u64, event: &Event) -> u64 {
        let mut log = self.log.lock().unwrap();
        let seq = self.last.fetch_add(1, Ordering::SeqCst) + 1;
        log.push((seq, now, event.clone()));
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
    let last = events.last().map_or(covered, |(seq, _, _)| *seq);
    let recorder = Arc::new(Recorder::starting_after(last));
    let ledger = Ledger::with_sink(limits(), recorder.clone());
    for item in items {
        ledger.import(item)?;
    }
    ledger.recompute_totals();
    for (seq, now, event) in events.iter().filter(|(seq, _, _)| *seq > covered) {
        ledger.replay(*seq, *now, event)?;
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
    open: u64,
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
        dry_runs: names.iter().map(|name| ledger.dry_run(name, 1_000, now)).collect(),
        tenants: TENANTS.iter().map(|t| ledger.tenant(&TenantId::new(t).unwrap())).collect(),
        open: ledger.open_reservations(),
    }
}

/// `B` equals `A`: the same objects in the same state, the same reports, and both consistent.
fn assert_same(a: &Ledger, b: &Ledger, now: u64) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.verify(), Ok(()), "A is consistent");
    prop_assert_eq!(b.verify(), Ok(()), "B is consistent");
    prop_assert_eq!(state(b), state(a), "every object's state");
    prop_assert_eq!(observe(b, now), observe(a, now), "what the API reports");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Generated steps. They name things by index and become commands against `A`'s current state, so
// that shrinking keeps them meaningful.

#[derive(Debug, Clone)]
enum Pick {
    /// The n-th most recent grant, so that retries of one reservation are common.
    Recent(usize),
    Any(Index),
    /// A reservation id that was never issued, in a capacity environment or an app environment.
    Unknown(bool),
}

#[derive(Debug, Clone)]
enum Actual {
    /// `quarters`/4 of the reserved amount: 0 to all of it.
    Quarters(u64),
    Above(Milli),
    /// The amount of the first commit, if any: a faithful retry.
    FirstAgain,
    Any(Milli),
}

/// An allocation as drawn, or relative to the allocation's use or the tenant's room.
#[derive(Debug, Clone)]
enum Allocation {
    Exactly(Milli),
    NearUse(i64),
    NearRoom(i64),
}

/// A reservation amount as drawn, or relative to what the environment has available.
#[derive(Debug, Clone)]
enum Amount {
    Exactly(Milli),
    NearAvailable(i64),
}

#[derive(Debug, Clone)]
enum Step {
    Purchase {
        tenant: usize,
        amount: Milli,
        key: Option<usize>,
    },
    Allocate {
        tenant: usize,
        env: usize,
        amount: Allocation,
        pool: bool,
    },
    SetPayAsYouGo {
        env: usize,
        enabled: bool,
        budget: Milli,
    },
    /// Links (or with `None` unlinks) an environment, usually an app environment.
    Link {
        app: usize,
        target: Option<usize>,
    },
    Reserve {
        env: usize,
        agent: usize,
        amount: Amount,
        key: Option<usize>,
        ttl_ms: u64,
    },
    /// Sends an earlier keyed purchase or reservation again, as it was or with its amount changed.
    Retry {
        pick: Index,
        changed: bool,
    },
    Commit {
        pick: Pick,
        actual: Actual,
    },
    Release {
        pick: Pick,
    },
    /// Advances the clock; with `sweep`, expires what is due as the server's sweeper would.
    Advance {
        ms: u64,
        sweep: bool,
    },
}

fn budget() -> impl Strategy<Value = Milli> {
    prop_oneof![Just(0), 1..=12_000u64]
}

fn near() -> impl Strategy<Value = i64> {
    prop_oneof![-1..=1i64, -3_000..=3_000i64]
}

fn allocation() -> impl Strategy<Value = Allocation> {
    prop_oneof![
        3 => (0..=25_000u64).prop_map(Allocation::Exactly),
        1 => near().prop_map(Allocation::NearUse),
        1 => near().prop_map(Allocation::NearRoom),
    ]
}

fn reserve_amount() -> impl Strategy<Value = Amount> {
    prop_oneof![
        3 => (1..=8_000u64).prop_map(Amount::Exactly),
        1 => near().prop_map(Amount::NearAvailable),
    ]
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        6 => (0..3usize).prop_map(Pick::Recent),
        3 => any::<Index>().prop_map(Pick::Any),
        1 => any::<bool>().prop_map(Pick::Unknown),
    ]
}

fn actual() -> impl Strategy<Value = Actual> {
    prop_oneof![
        4 => (0..=4u64).prop_map(Actual::Quarters),
        2 => (1..=6_000u64).prop_map(Actual::Above),
        3 => Just(Actual::FirstAgain),
        1 => (0..=12_000u64).prop_map(Actual::Any),
    ]
}

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
    let Lean { admin, .. } = lean;
    prop_oneof![
        admin => (tenant_index(lean), 0..=20_000u64, proptest::option::of(0..3usize))
            .prop_map(|(tenant, amount, key)| Step::Purchase { tenant, amount, key }),
        2 * admin => (tenant_index(lean), allocation_env_index(lean), allocation(), any::<bool>())
            .prop_map(|(tenant, env, amount, pool)| Step::Allocate { tenant, env, amount, pool }),
        admin => (0..ENVS.len(), any::<bool>(), budget())
            .prop_map(|(env, enabled, budget)| Step::SetPayAsYouGo { env, enabled, budget }),
        admin => (link_env_index(lean), proptest::option::of(0..ENVS.len()))
            .prop_map(|(app, target)| Step::Link { app, target }),
        7 => (prop_oneof![19 => 0..GHOST, 1 => Just(GHOST)], 0..3usize, reserve_amount(),
              proptest::option::of(0..3usize), 1..=200u64)
            .prop_map(|(env, agent, amount, key, ttl_ms)| Step::Reserve { env, agent, amount, key, ttl_ms }),
        2 => (any::<Index>(), any::<bool>()).prop_map(|(pick, changed)| Step::Retry { pick, changed }),
        5 => (pick(), actual()).prop_map(|(pick, actual)| Step::Commit { pick, actual }),
        3 => pick().prop_map(|pick| Step::Release { pick }),
        3 => (0..=80u64, prop_oneof![3 => Just(true), 1 => Just(false)])
            .prop_map(|(ms, sweep)| Step::Advance { ms, sweep }),
    ]
}

/// Two tenants with capacity, e0 without the pool, e1 and e2 perhaps with it, pay-as-you-go perhaps
/// on e1 and e2 (capped, or uncapped when the budget is 0), and `app` linked to e1.
fn setup() -> impl Strategy<Value = Vec<Step>> {
    (
        20_000..=40_000u64,
        10_000..=30_000u64,
        [0..=10_000u64, 0..=10_000, 0..=10_000],
        any::<bool>(),
        [budget(), budget()],
        [any::<bool>(), any::<bool>()],
    )
        .prop_map(|(p0, p1, alloc, pool2, budgets, payg)| {
            vec![
                Step::Purchase { tenant: 0, amount: p0, key: None },
                Step::Purchase { tenant: 1, amount: p1, key: None },
                Step::Allocate { tenant: 0, env: 0, amount: Allocation::Exactly(alloc[0]), pool: false },
                Step::Allocate { tenant: 0, env: 1, amount: Allocation::Exactly(alloc[1]), pool: true },
                Step::Allocate { tenant: 1, env: 2, amount: Allocation::Exactly(alloc[2]), pool: pool2 },
                Step::SetPayAsYouGo { env: 1, enabled: payg[0], budget: budgets[0] },
                Step::SetPayAsYouGo { env: 2, enabled: payg[1], budget: budgets[1] },
                Step::Link { app: APP, target: Some(1) },
            ]
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
        setup(),
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
}

impl Driver {
    fn new() -> Self {
        Self { now: START_MS, issued: Vec::new(), committed: HashMap::new(), keyed: Vec::new() }
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
        let room = match a.tenant(t) {
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
        }
    }

    fn command(&self, a: &Ledger, step: &Step) -> Command {
        match step {
            Step::Purchase { tenant: t, amount, key: k } => {
                Command::PurchaseCapacity { tenant: tenant(*t), amount_milli: *amount, idempotency_key: k.map(key) }
            }
            Step::Allocate { tenant: t, env: e, amount, pool } => Command::AllocateCapacity {
                tenant: tenant(*t),
                environment: env(*e),
                amount_milli: self.allocation(a, &tenant(*t), &env(*e), amount),
                draw_from_tenant_pool: *pool,
            },
            Step::SetPayAsYouGo { env: e, enabled, budget } => {
                Command::SetPayAsYouGo { environment: env(*e), enabled: *enabled, budget_milli: *budget }
            }
            Step::Link { app, target } => {
                Command::LinkEnvironment { app_environment: env(*app), environment: target.map(env) }
            }
            Step::Reserve { env: e, agent: g, amount, key: k, ttl_ms } => Command::Reserve {
                environment: env(*e),
                agent: agent(*g),
                amount_milli: self.reserve_amount(a, &env(*e), amount),
                idempotency_key: k.map(key),
                expires_at_ms: self.now + ttl_ms,
            },
            Step::Commit { pick, actual } => {
                let reservation = self.reservation(pick);
                let actual_milli = self.actual(&reservation, actual);
                Command::Commit { reservation, actual_milli }
            }
            Step::Release { pick } => Command::Release { reservation: self.reservation(pick) },
            Step::Retry { .. } | Step::Advance { .. } => unreachable!("not a command of its own"),
        }
    }

    fn retry(&self, pick: &Index, changed: bool) -> Option<Command> {
        if self.keyed.is_empty() {
            return None;
        }
        let (mut command, ttl_ms) = pick.get(&self.keyed).clone();
        match &mut command {
            Command::Reserve { amount_milli, expires_at_ms, .. } => {
                *expires_at_ms = self.now + ttl_ms;
                *amount_milli += u64::from(changed);
            }
            Command::PurchaseCapacity { amount_milli, .. } => *amount_milli += u64::from(changed),
            _ => unreachable!("only purchases and reservations are kept"),
        }
        Some(command)
    }

    /// Runs one step on every ledger in `ledgers`, then checks they are consistent and alike.
    fn run(&mut self, ledgers: &[&Ledger], step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Advance { ms, sweep } => {
                self.now += ms;
                if *sweep {
                    self.sweep(ledgers)?;
                }
            }
            Step::Retry { pick, changed } => {
                if let Some(command) = self.retry(pick, *changed) {
                    self.apply(ledgers, &command)?;
                }
            }
            _ => {
                let command = self.command(ledgers[0], step);
                match step {
                    Step::Reserve { key: Some(_), ttl_ms, .. } => self.keyed.push((command.clone(), *ttl_ms)),
                    Step::Purchase { key: Some(_), .. } => self.keyed.push((command.clone(), 0)),
                    _ => {}
                }
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
            (Ok(Outcome::Committed(s)), Command::Commit { reservation, actual_milli }) if !s.replayed => {
                self.committed.entry(reservation.clone()).or_insert(*actual_milli);
            }
            _ => {}
        }
        Ok(first)
    }

    /// Expires what any ledger lists as due, on every ledger. The lists may differ in holds that have
    /// already resolved (a restored ledger queues the holds of its snapshot afresh), which expire to
    /// nothing; every hold that does expire must be listed as due by every ledger.
    fn sweep(&mut self, ledgers: &[&Ledger]) -> Result<(), TestCaseError> {
        let due: Vec<BTreeSet<ReservationId>> =
            ledgers.iter().map(|l| l.due_expiries(self.now, usize::MAX).into_iter().collect()).collect();
        let all: BTreeSet<ReservationId> = due.iter().flatten().cloned().collect();
        for reservation in all {
            let outcome = self.outcome(ledgers, &Command::Expire { reservation: reservation.clone() })?;
            if let Ok(Outcome::Expired(Some(_))) = outcome {
                for (i, listed) in due.iter().enumerate() {
                    prop_assert!(listed.contains(&reservation), "ledger {} did not list {} as due", i, reservation);
                }
            }
        }
        Ok(())
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
        Step::Reserve { env: 3, agent: 0, amount: Amount::Exactly(3_000), key: None, ttl_ms: 100 },
        Step::Commit { pick: Pick::Recent(0), actual: Actual::Above(2_000) },
    ];
    let scenario = Scenario { phase1: setup, during: vec![onboarding], phase2: vec![], phase3: use_it };
    let (a, a_log, items, s) = run_with_mixed_snapshot(&mut driver, &scenario).unwrap();
    let (b, b_log) = restore(items, s, &a_log.events()).expect("the snapshot restores");
    assert_same(&a, &b, driver.now).unwrap();
    behave_alike(&mut driver, (&a, &a_log), (&b, &b_log), &scenario.phase3).unwrap();
    assert_eq!(b.balance(&env(3), driver.now).unwrap().overage_milli, 1_000);
}
