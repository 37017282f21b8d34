//! The generated steps that `tests/ledger_properties.rs` and `tests/restore_properties.rs` both drive
//! a `Ledger` with: the `Step` vocabulary and its strategies, the ids steps name by index, and the
//! turning of a step into a `Command`. It lives here so that the two suites draw from one definition
//! rather than from copies that drift apart.
//!
//! The suites differ in their environment tables and in how their steps lean, so those stay in each
//! suite and come in as arguments: a `Shape` for the step strategy, the app environment's index for
//! the setup, and a `Resolve` for what a step's relative amounts and picks mean against the state
//! the suite tracks. A directory module, so that cargo does not build it as a test of its own.

use std::ops::RangeInclusive;

use proptest::prelude::*;
use proptest::sample::Index;
use quotad::ledger::{
    AgentId, ApiKeyId, Command, EnvironmentId, IdempotencyKey, Milli, ReservationId, TenantId, Usage,
    api_keys::SecretHash,
};

pub const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
pub const AGENTS: [&str; 3] = ["a0", "a1", "a2"];
pub const KEYS: [&str; 3] = ["k0", "k1", "k2"];
pub const START_MS: u64 = 1_700_000_000_000;

pub fn tenant(i: usize) -> TenantId {
    TenantId::new(TENANTS[i]).unwrap()
}
pub fn agent(i: usize) -> AgentId {
    AgentId::new(AGENTS[i]).unwrap()
}
pub fn key(i: usize) -> IdempotencyKey {
    IdempotencyKey::new(KEYS[i]).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Generated steps. They name things by index and are turned into commands against the current
// state, so that shrinking keeps them meaningful.

#[derive(Debug, Clone)]
pub enum Pick {
    /// The n-th most recent grant, so that retries of one reservation are common.
    Recent(usize),
    Any(Index),
    /// A reservation id that was never issued, in a capacity environment or an app environment.
    Unknown(bool),
}

#[derive(Debug, Clone)]
pub enum Actual {
    /// `quarters`/4 of the reserved amount: 0 to all of it.
    Quarters(u64),
    Above(Milli),
    /// The amount of the first commit, if any: a faithful retry.
    FirstAgain,
    Any(Milli),
}

/// An allocation as drawn, or relative to a boundary it is refused beyond, so that N−1, N and N+1
/// all occur: the allocation's use and holds, or the most the tenant's purchase leaves room for.
#[derive(Debug, Clone)]
pub enum Allocation {
    Exactly(Milli),
    NearUse(i64),
    NearRoom(i64),
}

/// A reservation amount as drawn, or relative to what the environment has available.
#[derive(Debug, Clone)]
pub enum Amount {
    Exactly(Milli),
    NearAvailable(i64),
    /// Leaves about a fifth of allocation plus budget available: where the balance turns `Low`.
    /// Drawn only by `reserve_amount(true)`.
    NearLow(i64),
}

#[derive(Debug, Clone)]
pub enum Step {
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
        /// One of the API keys created so far (revoked ones included), or none: an operator.
        api_key: Option<Index>,
    },
    /// Creates an API key of a tenant for some environments (none: all of the tenant's).
    CreateApiKey {
        tenant: usize,
        envs: Vec<usize>,
    },
    /// Revokes one of the API keys created so far (revoked ones included).
    RevokeApiKey {
        pick: Index,
    },
    /// Sends an earlier purchase or reservation that carried an idempotency key again, as it was
    /// or with its amount changed.
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
    /// Releases every open hold of an environment, or of one agent in it.
    ReleaseAll {
        env: usize,
        agent: Option<usize>,
    },
    /// Advances the clock; with `sweep`, expires what is due as the server's sweeper would.
    Advance {
        ms: u64,
        sweep: bool,
    },
    /// Moves the clock to `ms` after the start of the next billing month (UTC).
    NextMonth {
        ms: u64,
    },
    /// Sets a tenant's overage grace, in percent.
    SetGrace {
        tenant: usize,
        percent: u32,
    },
}

/// The first instant of the UTC month after the one that contains `now`.
pub fn next_month_start(now: u64) -> u64 {
    quotad::ledger::period::period_at(now, "UTC").end_ms
}

pub fn budget() -> impl Strategy<Value = Milli> {
    prop_oneof![Just(0), 1..=12_000u64]
}

pub fn near() -> impl Strategy<Value = i64> {
    prop_oneof![-1..=1i64, -3_000..=3_000i64]
}

pub fn allocation() -> impl Strategy<Value = Allocation> {
    prop_oneof![
        3 => (0..=25_000u64).prop_map(Allocation::Exactly),
        1 => near().prop_map(Allocation::NearUse),
        1 => near().prop_map(Allocation::NearRoom),
    ]
}

/// Reservation amounts; with `near_low`, also amounts near where the balance turns `Low`.
pub fn reserve_amount(near_low: bool) -> BoxedStrategy<Amount> {
    if near_low {
        prop_oneof![
            3 => (1..=8_000u64).prop_map(Amount::Exactly),
            1 => near().prop_map(Amount::NearAvailable),
            1 => (-1..=1i64).prop_map(Amount::NearLow),
        ]
        .boxed()
    } else {
        prop_oneof![
            3 => (1..=8_000u64).prop_map(Amount::Exactly),
            1 => near().prop_map(Amount::NearAvailable),
        ]
        .boxed()
    }
}

pub fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        6 => (0..3usize).prop_map(Pick::Recent),
        3 => any::<Index>().prop_map(Pick::Any),
        1 => any::<bool>().prop_map(Pick::Unknown),
    ]
}

pub fn actual() -> impl Strategy<Value = Actual> {
    prop_oneof![
        4 => (0..=4u64).prop_map(Actual::Quarters),
        2 => (1..=6_000u64).prop_map(Actual::Above),
        3 => Just(Actual::FirstAgain),
        1 => (0..=12_000u64).prop_map(Actual::Any),
    ]
}

/// What a suite's steps name and how they lean: the parts of `step` that differ between suites.
pub struct Shape {
    /// The weight of purchases, pay-as-you-go settings and links; allocations weigh twice this.
    pub admin: u32,
    /// The tenant a purchase or an allocation names.
    pub tenant: BoxedStrategy<usize>,
    /// The environment an allocation names.
    pub allocation_env: BoxedStrategy<usize>,
    /// The environment a link names as the app environment.
    pub link_env: BoxedStrategy<usize>,
    /// The environment a reservation names.
    pub reserve_env: BoxedStrategy<usize>,
    /// How many environments the suite names: pay-as-you-go settings and link targets name any.
    pub envs: usize,
    pub ttl_ms: RangeInclusive<u64>,
    /// Whether reservations also draw `Amount::NearLow`.
    pub near_low: bool,
    /// The weight of API key creations and revocations, and whether reservations use keys; 0: never.
    pub api_keys: u32,
}

pub fn step(shape: Shape) -> BoxedStrategy<Step> {
    let Shape { admin, tenant, allocation_env, link_env, reserve_env, envs, ttl_ms, near_low, api_keys } = shape;
    let api_key = if api_keys == 0 { Just(None).boxed() } else { proptest::option::of(any::<Index>()).boxed() };
    let steps = prop_oneof![
        admin => (tenant.clone(), 0..=20_000u64, proptest::option::of(0..3usize))
            .prop_map(|(tenant, amount, key)| Step::Purchase { tenant, amount, key }),
        2 * admin => (tenant, allocation_env, allocation(), any::<bool>())
            .prop_map(|(tenant, env, amount, pool)| Step::Allocate { tenant, env, amount, pool }),
        admin => (0..envs, any::<bool>(), budget())
            .prop_map(|(env, enabled, budget)| Step::SetPayAsYouGo { env, enabled, budget }),
        admin => (link_env, proptest::option::of(0..envs))
            .prop_map(|(app, target)| Step::Link { app, target }),
        7 => (reserve_env, 0..3usize, reserve_amount(near_low), proptest::option::of(0..3usize), ttl_ms, api_key)
            .prop_map(|(env, agent, amount, key, ttl_ms, api_key)| Step::Reserve {
                env,
                agent,
                amount,
                key,
                ttl_ms,
                api_key
            }),
        2 => (any::<Index>(), any::<bool>()).prop_map(|(pick, changed)| Step::Retry { pick, changed }),
        5 => (pick(), actual()).prop_map(|(pick, actual)| Step::Commit { pick, actual }),
        3 => pick().prop_map(|pick| Step::Release { pick }),
        admin => (0..envs, proptest::option::of(0..3usize)).prop_map(|(env, agent)| Step::ReleaseAll { env, agent }),
        3 => (0..=80u64, prop_oneof![3 => Just(true), 1 => Just(false)])
            .prop_map(|(ms, sweep)| Step::Advance { ms, sweep }),
        1 => (0..=80u64).prop_map(|ms| Step::NextMonth { ms }),
        admin => (0..TENANTS.len(), prop_oneof![Just(100u32), 100..=200u32])
            .prop_map(|(tenant, percent)| Step::SetGrace { tenant, percent }),
    ];
    if api_keys == 0 {
        return steps.boxed();
    }
    // Keys come second, so that shrinking leans towards the steps without them.
    prop_oneof![
        30 => steps,
        2 * api_keys => (0..TENANTS.len(), proptest::collection::vec(0..envs, 0..=2))
            .prop_map(|(tenant, envs)| Step::CreateApiKey { tenant, envs }),
        api_keys => any::<Index>().prop_map(|pick| Step::RevokeApiKey { pick }),
    ]
    .boxed()
}

/// Two tenants with capacity, e0 without the pool, e1 and e2 perhaps with it, pay-as-you-go perhaps
/// on e1 and e2 (capped, or uncapped when the budget is 0), and the environment at index `app`
/// linked to e1.
pub fn setup(app: usize) -> impl Strategy<Value = Vec<Step>> {
    (
        20_000..=40_000u64,
        10_000..=30_000u64,
        [0..=10_000u64, 0..=10_000, 0..=10_000],
        any::<bool>(),
        [budget(), budget()],
        [any::<bool>(), any::<bool>()],
    )
        .prop_map(move |(p0, p1, alloc, pool2, budgets, payg)| {
            vec![
                Step::Purchase { tenant: 0, amount: p0, key: None },
                Step::Purchase { tenant: 1, amount: p1, key: None },
                Step::Allocate { tenant: 0, env: 0, amount: Allocation::Exactly(alloc[0]), pool: false },
                Step::Allocate { tenant: 0, env: 1, amount: Allocation::Exactly(alloc[1]), pool: true },
                Step::Allocate { tenant: 1, env: 2, amount: Allocation::Exactly(alloc[2]), pool: pool2 },
                Step::SetPayAsYouGo { env: 1, enabled: payg[0], budget: budgets[0] },
                Step::SetPayAsYouGo { env: 2, enabled: payg[1], budget: budgets[1] },
                Step::Link { app, target: Some(1) },
            ]
        })
}

// ---------------------------------------------------------------------------------------------
// Turning steps into commands.

/// What turning a step into a command needs from a suite: its environment names, its clock, and
/// what relative amounts and picks come to against the state it tracks.
pub trait Resolve {
    fn env(&self, i: usize) -> EnvironmentId;
    fn now(&self) -> u64;
    fn reservation(&self, pick: &Pick) -> ReservationId;
    fn actual(&self, r: &ReservationId, actual: &Actual) -> Milli;
    fn allocation(&self, t: &TenantId, e: &EnvironmentId, amount: &Allocation) -> Milli;
    fn reserve_amount(&self, e: &EnvironmentId, amount: &Amount) -> Milli;
    /// One of the API keys created so far; `None` when there is none.
    fn api_key(&self, pick: &Index) -> Option<ApiKeyId> {
        let _ = pick;
        None
    }
    /// The id the next created key gets.
    fn next_api_key_id(&self) -> ApiKeyId {
        unreachable!("this suite creates no API keys")
    }
}

/// The command a step stands for. `Retry`, `Advance` and `NextMonth` are not commands of their own.
pub fn command(r: &impl Resolve, step: &Step) -> Command {
    let env = |i: usize| r.env(i);
    match step {
        Step::Purchase { tenant: t, amount, key: k } => {
            Command::PurchaseCapacity { tenant: tenant(*t), amount_milli: *amount, idempotency_key: k.map(key) }
        }
        Step::Allocate { tenant: t, env: e, amount, pool } => Command::AllocateCapacity {
            tenant: tenant(*t),
            environment: env(*e),
            amount_milli: r.allocation(&tenant(*t), &env(*e), amount),
            draw_from_tenant_pool: *pool,
        },
        Step::SetPayAsYouGo { env: e, enabled, budget } => {
            Command::SetPayAsYouGo { environment: env(*e), enabled: *enabled, budget_milli: *budget }
        }
        Step::Link { app, target } => {
            Command::LinkEnvironment { app_environment: env(*app), environment: target.map(env) }
        }
        Step::Reserve { env: e, agent: g, amount, key: k, ttl_ms, api_key } => Command::Reserve {
            environment: env(*e),
            agent: agent(*g),
            usage: Usage::Milli(r.reserve_amount(&env(*e), amount)),
            idempotency_key: k.map(key),
            expires_at_ms: r.now() + ttl_ms,
            api_key: api_key.as_ref().and_then(|pick| r.api_key(pick)),
        },
        Step::Commit { pick, actual } => {
            let reservation = r.reservation(pick);
            let actual_milli = r.actual(&reservation, actual);
            Command::Commit { reservation, usage: Usage::Milli(actual_milli), api_key: None }
        }
        Step::Release { pick } => Command::Release { reservation: r.reservation(pick), api_key: None },
        Step::CreateApiKey { tenant: t, envs } => Command::CreateApiKey {
            id: r.next_api_key_id(),
            tenant: tenant(*t),
            environments: envs.iter().map(|e| env(*e)).collect(),
            description: String::new(),
            secret_hash: SecretHash([0; 32]),
        },
        Step::RevokeApiKey { pick } => match r.api_key(pick) {
            Some(id) => Command::RevokeApiKey { id },
            // Before any key exists: a revocation of one that never did.
            None => Command::RevokeApiKey { id: ApiKeyId::new("never-created").unwrap() },
        },
        Step::ReleaseAll { env: e, agent: g } => Command::ReleaseAll { environment: env(*e), agent: g.map(agent) },
        Step::SetGrace { tenant: t, percent } => {
            Command::SetTenantPolicy { tenant: tenant(*t), grace_percent: *percent, time_zone: "UTC".into() }
        }
        Step::Retry { .. } | Step::Advance { .. } | Step::NextMonth { .. } => unreachable!("not a command of its own"),
    }
}

/// What to keep of a step's command for later retries: the command with the reservation's TTL (0
/// for a purchase), for keyed purchases and reservations only.
pub fn kept(step: &Step, command: &Command) -> Option<(Command, u64)> {
    match step {
        Step::Reserve { key: Some(_), ttl_ms, .. } => Some((command.clone(), *ttl_ms)),
        Step::Purchase { key: Some(_), .. } => Some((command.clone(), 0)),
        _ => None,
    }
}

/// A kept command sent again at `now`, with its amount one more when `changed`; `None` when nothing
/// was kept.
pub fn retried(keyed: &[(Command, u64)], pick: &Index, changed: bool, now: u64) -> Option<Command> {
    if keyed.is_empty() {
        return None;
    }
    let (mut command, ttl_ms) = pick.get(keyed).clone();
    match &mut command {
        Command::Reserve { usage: Usage::Milli(amount_milli), expires_at_ms, .. } => {
            *expires_at_ms = now + ttl_ms;
            *amount_milli += u64::from(changed);
        }
        Command::PurchaseCapacity { amount_milli, .. } => *amount_milli += u64::from(changed),
        _ => unreachable!("only purchases and reservations are kept"),
    }
    Some(command)
}
