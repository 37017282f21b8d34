//! Fuzz target for the accounting core: arbitrary interleavings of every command, with inputs the
//! property tests of `tests/ledger_properties.rs` keep tame: ids at their length limit, amounts at 0, 1,
//! the largest amount a request may carry and `u64::MAX`, usage items naming unknown scenarios or with
//! quantities that overflow, rate cards at their limits, agent limits, alert thresholds, time zones,
//! clocks jumping by days and months, every cap small enough to be reached.
//!
//! There is no model here (the property tests compare with one); instead, after every step, the
//! ledger's own invariants hold (`Ledger::verify`), a refused command changed nothing anyone can see,
//! and what an accepted one answered adds up: a hold is the amount asked for and its draws add up to
//! it, a commit's charges plus its overage are the use it was given.

mod fuzzing;

use fuzzing::{At, at};
use proptest::{prelude::*, test_runner::TestCaseError};
use quotad::ledger::{
    AgentId, AgentLimit, AgentLimitView, Balance, Command, EnvironmentId, HoldPage, IdempotencyKey, Ledger,
    LedgerError, Limits, MAX_ID_BYTES, Milli, Outcome, ReservationId, TenantCapacity, TenantId, Usage, UsageItem,
    period,
    pricing::{MAX_SCENARIOS, Rate, RateCard},
};

/// 2026-11-30T22:00:00Z: two hours before a month ends (and later still in time zones to the west).
const START_MS: u64 = 1_796_076_000_000;
/// The largest amount a request may carry, in milli, with the default limits.
const MAX_AMOUNT_MILLI: Milli = 1_000_000_000_000;

fn long_id(first: char) -> String {
    std::iter::once(first).chain(std::iter::repeat_n('x', MAX_ID_BYTES - 1)).collect()
}

fn tenants() -> Vec<TenantId> {
    ["t0", "t1", &long_id('t')].iter().map(|t| TenantId::new(t).unwrap()).collect()
}

/// Capacity environments, app environments, and one never created; one id at the length limit.
fn envs() -> Vec<EnvironmentId> {
    ["e0", "e1", &long_id('e'), "app0", "app1", "ghost"].iter().map(|e| EnvironmentId::new(e).unwrap()).collect()
}

fn agents() -> Vec<AgentId> {
    ["a0", "a1", "a2", &long_id('a')].iter().map(|a| AgentId::new(a).unwrap()).collect()
}

fn keys() -> Vec<IdempotencyKey> {
    ["k0", "k1", &long_id('k')].iter().map(|k| IdempotencyKey::new(k).unwrap()).collect()
}

/// Every cap small, so that sequences reach each of them.
fn limits() -> Limits {
    Limits {
        max_open_reservations_per_environment: 4,
        max_open_reservations_total: 6,
        resolved_retention_ms: 3 * 3_600_000,
        max_resolved_per_environment: 3,
        max_purchase_keys_per_tenant: 2,
        max_agents_per_environment: 2,
        max_usage_keys_per_tenant: 3,
        max_rate_card_versions: 4,
        ..Limits::default()
    }
}

// ---------------------------------------------------------------------------------------------------
// Steps.

#[derive(Debug, Clone)]
enum Step {
    Purchase {
        tenant: At,
        amount: Milli,
        key: Option<At>,
    },
    Allocate {
        tenant: At,
        env: At,
        amount: Milli,
        pool: bool,
    },
    SetPayAsYouGo {
        env: At,
        enabled: bool,
        budget: Milli,
    },
    Link {
        app: At,
        target: Option<At>,
    },
    SetTenantPolicy {
        tenant: At,
        grace_percent: u32,
        time_zone: &'static str,
    },
    SetEnvironmentAlerts {
        env: At,
        low_percent: u32,
        thresholds: Vec<u32>,
    },
    SetAgentLimit {
        env: At,
        agent: At,
        limit: Option<AgentLimit>,
    },
    SetRateCard {
        rates: Vec<(String, Rate)>,
        delay_ms: u64,
    },
    Reserve {
        env: At,
        agent: At,
        usage: Usage,
        key: Option<At>,
        ttl_ms: u64,
    },
    Commit {
        pick: At,
        usage: Usage,
    },
    Release {
        pick: At,
    },
    ReleaseAll {
        env: At,
        agent: Option<At>,
    },
    /// Moves the clock; with `sweep`, expires what is due as the server's sweeper does.
    Advance {
        ms: u64,
        sweep: bool,
    },
}

/// Amounts at the edges: nothing, one milli, the most a request may carry and just past it, around
/// where counters overflow, and anything.
fn amount() -> impl Strategy<Value = Milli> {
    prop_oneof![
        2 => Just(0u64),
        2 => Just(1u64),
        6 => 1..=50_000u64,
        1 => Just(MAX_AMOUNT_MILLI),
        1 => Just(MAX_AMOUNT_MILLI + 1),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX / 2 + 1),
        1 => any::<u64>(),
    ]
}

/// Quantities of usage items: every edge of `amount`, and ones whose price overflows.
fn quantity() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..=20u64, 1 => Just(u64::MAX), 1 => Just(1 << 40), 1 => any::<u64>()]
}

const SCENARIOS: [&str; 4] = ["classic_answer", "agent_flow_actions", "fuzz_a", "unknown_here"];

fn usage() -> impl Strategy<Value = Usage> {
    let item = (proptest::sample::select(&SCENARIOS[..]), quantity())
        .prop_map(|(scenario, quantity)| UsageItem { scenario: scenario.into(), quantity });
    prop_oneof![
        3 => amount().prop_map(Usage::Milli),
        1 => proptest::collection::vec(item, 0..=5).prop_map(Usage::Items),
    ]
}

fn rate() -> impl Strategy<Value = Rate> {
    let messages = prop_oneof![Just(0u64), Just(1), 1..=100u64, Just(1_000_000), Just(u64::MAX)];
    let per = prop_oneof![Just(1u64), 1..=1_000u64, Just(u64::MAX)];
    (messages, per).prop_map(|(messages, per)| Rate { messages, per })
}

/// A valid rate card: the core is handed only cards the transport checked. Some have the most
/// scenarios a card may have.
fn rates() -> impl Strategy<Value = Vec<(String, Rate)>> {
    let named = (proptest::sample::select(&SCENARIOS[..3]), rate()).prop_map(|(name, rate)| (name.to_owned(), rate));
    let small = proptest::collection::vec(named, 1..=3);
    let full = rate().prop_map(|rate| (0..MAX_SCENARIOS).map(|i| (format!("s{i}"), rate)).collect());
    prop_oneof![9 => small, 1 => full]
}

const TIME_ZONES: [&str; 4] = ["UTC", "Pacific/Kiritimati", "America/Adak", "Asia/Kathmandu"];

fn agent_limit() -> impl Strategy<Value = Option<AgentLimit>> {
    let limit =
        (prop_oneof![Just(0u64), 1..=50_000u64, Just(1_000_000_000_000_000)], 1..=100u32, any::<bool>(), any::<bool>())
            .prop_map(|(limit_milli, notify_percent, stop_when_exceeded, disabled)| AgentLimit {
                limit_milli,
                notify_percent,
                stop_when_exceeded,
                disabled,
            });
    proptest::option::of(limit)
}

/// Fields the transport bounds (percentages, time zones) stay within its bounds, at their edges.
fn step() -> impl Strategy<Value = Step> {
    let key = proptest::option::of(at());
    prop_oneof![
        2 => (at(), amount(), key.clone()).prop_map(|(tenant, amount, key)| Step::Purchase { tenant, amount, key }),
        3 => (at(), at(), amount(), any::<bool>())
            .prop_map(|(tenant, env, amount, pool)| Step::Allocate { tenant, env, amount, pool }),
        1 => (at(), any::<bool>(), amount())
            .prop_map(|(env, enabled, budget)| Step::SetPayAsYouGo { env, enabled, budget }),
        1 => (at(), proptest::option::of(at())).prop_map(|(app, target)| Step::Link { app, target }),
        1 => (at(), prop_oneof![Just(100u32), Just(1_000), 100..=1_000u32], proptest::sample::select(&TIME_ZONES[..]))
            .prop_map(|(tenant, grace_percent, time_zone)| Step::SetTenantPolicy { tenant, grace_percent, time_zone }),
        1 => (at(), prop_oneof![Just(1u32), Just(100), 1..=100u32], proptest::collection::btree_set(1..=100u32, 1..=4))
            .prop_map(|(env, low_percent, thresholds)| Step::SetEnvironmentAlerts {
                env,
                low_percent,
                thresholds: thresholds.into_iter().collect(),
            }),
        1 => (at(), at(), agent_limit()).prop_map(|(env, agent, limit)| Step::SetAgentLimit { env, agent, limit }),
        1 => (rates(), prop_oneof![Just(0u64), 0..=7_200_000u64])
            .prop_map(|(rates, delay_ms)| Step::SetRateCard { rates, delay_ms }),
        8 => (at(), at(), usage(), key, prop_oneof![Just(1u64), 1..=7_200_000u64, Just(u64::MAX / 2)])
            .prop_map(|(env, agent, usage, key, ttl_ms)| Step::Reserve { env, agent, usage, key, ttl_ms }),
        5 => (at(), usage()).prop_map(|(pick, usage)| Step::Commit { pick, usage }),
        3 => at().prop_map(|pick| Step::Release { pick }),
        1 => (at(), proptest::option::of(at())).prop_map(|(env, agent)| Step::ReleaseAll { env, agent }),
        3 => (prop_oneof![0..=1_000u64, 0..=7_200_000u64, Just(32 * 86_400_000)], any::<bool>())
            .prop_map(|(ms, sweep)| Step::Advance { ms, sweep }),
    ]
}

/// Tenants with capacity, their environments allocated (one drawing on the pool, one with uncapped
/// pay-as-you-go), and an app environment linked, so that most steps meet objects that exist; amounts
/// drawn from `amount`, so some setups are already at the edges.
fn setup() -> impl Strategy<Value = Vec<Step>> {
    let purchase = prop_oneof![4 => 10_000..=1_000_000u64, 1 => amount()];
    let allocation = prop_oneof![4 => 0..=10_000u64, 1 => amount()];
    ([purchase.clone(), purchase.clone(), purchase], [allocation.clone(), allocation.clone(), allocation]).prop_map(
        |(purchases, allocations)| {
            let mut setup: Vec<Step> =
                (0..3).map(|t| Step::Purchase { tenant: nth(t, 3), amount: purchases[t], key: None }).collect();
            for (e, (t, pool)) in [(0, false), (0, true), (2, false)].into_iter().enumerate() {
                let (tenant, env) = (nth(t, 3), nth(e, ENVS));
                setup.push(Step::Allocate { tenant, env, amount: allocations[e], pool });
            }
            setup.push(Step::SetPayAsYouGo { env: nth(2, ENVS), enabled: true, budget: 0 });
            setup.push(Step::Link { app: nth(3, ENVS), target: Some(nth(1, ENVS)) });
            setup
        },
    )
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    (setup(), proptest::collection::vec(step(), 1..=60)).prop_map(|(mut all, steps)| {
        all.extend(steps);
        all
    })
}

/// How many environments `envs` names.
const ENVS: usize = 6;

/// The position of the `i`-th of `n` elements.
fn nth(i: usize, n: usize) -> At {
    At(((i as u128) << 64).div_ceil(n as u128) as u64)
}

// ---------------------------------------------------------------------------------------------------
// The harness.

/// Everything a refused command must leave as it was, as the public API shows it.
#[derive(Debug, PartialEq)]
struct Visible {
    balances: Vec<Result<Balance, LedgerError>>,
    tenants: Vec<Result<TenantCapacity, LedgerError>>,
    agents: Vec<Result<Vec<AgentLimitView>, LedgerError>>,
    holds: Vec<Result<HoldPage, LedgerError>>,
    open_reservations: u64,
    rate_card_version: u32,
}

struct Harness {
    ledger: Ledger,
    now: u64,
    tenants: Vec<TenantId>,
    envs: Vec<EnvironmentId>,
    agents: Vec<AgentId>,
    keys: Vec<IdempotencyKey>,
    /// Every reservation granted, and one never granted.
    reservations: Vec<ReservationId>,
}

impl Harness {
    fn new() -> Self {
        let envs = envs();
        let never_granted = ReservationId { environment: envs[0].clone(), seq: u64::MAX };
        Self {
            ledger: Ledger::new(limits()),
            now: START_MS,
            tenants: tenants(),
            envs,
            agents: agents(),
            keys: keys(),
            reservations: vec![never_granted],
        }
    }

    fn visible(&self) -> Visible {
        Visible {
            balances: self.envs.iter().map(|e| self.ledger.balance(e, self.now)).collect(),
            tenants: self.tenants.iter().map(|t| self.ledger.tenant(t, self.now)).collect(),
            agents: self.envs.iter().map(|e| self.ledger.agent_limits(e, self.now)).collect(),
            holds: self.envs.iter().map(|e| self.ledger.open_holds(e, None, 0, 100)).collect(),
            open_reservations: self.ledger.open_reservations(),
            rate_card_version: self.ledger.rate_card(None, self.now).unwrap().version,
        }
    }

    /// The command a step stands for; `None` for a step that only moves the clock.
    fn command(&self, step: &Step) -> Option<Command> {
        let tenant = |t: &At| t.get(&self.tenants).clone();
        let env = |e: &At| e.get(&self.envs).clone();
        let agent = |a: &At| a.get(&self.agents).clone();
        let key = |k: &Option<At>| k.map(|k| k.get(&self.keys).clone());
        Some(match step {
            Step::Purchase { tenant: t, amount, key: k } => {
                Command::PurchaseCapacity { tenant: tenant(t), amount_milli: *amount, idempotency_key: key(k) }
            }
            Step::Allocate { tenant: t, env: e, amount, pool } => Command::AllocateCapacity {
                tenant: tenant(t),
                environment: env(e),
                amount_milli: *amount,
                draw_from_tenant_pool: *pool,
            },
            Step::SetPayAsYouGo { env: e, enabled, budget } => {
                Command::SetPayAsYouGo { environment: env(e), enabled: *enabled, budget_milli: *budget }
            }
            Step::Link { app, target } => {
                Command::LinkEnvironment { app_environment: env(app), environment: target.as_ref().map(env) }
            }
            Step::SetTenantPolicy { tenant: t, grace_percent, time_zone } => Command::SetTenantPolicy {
                tenant: tenant(t),
                grace_percent: *grace_percent,
                time_zone: period::parse_time_zone(time_zone).unwrap(),
            },
            Step::SetEnvironmentAlerts { env: e, low_percent, thresholds } => Command::SetEnvironmentAlerts {
                environment: env(e),
                low_percent: *low_percent,
                budget_thresholds: thresholds.clone(),
            },
            Step::SetAgentLimit { env: e, agent: a, limit } => {
                Command::SetAgentLimit { environment: env(e), agent: agent(a), limit: *limit }
            }
            Step::SetRateCard { rates, delay_ms } => Command::SetRateCard {
                card: RateCard::new(rates.iter().map(|(name, rate)| (name.as_str(), *rate))).ok()?,
                effective_at_ms: self.now + delay_ms,
            },
            Step::Reserve { env: e, agent: a, usage, key: k, ttl_ms } => Command::Reserve {
                environment: env(e),
                agent: agent(a),
                usage: usage.clone(),
                idempotency_key: key(k),
                expires_at_ms: self.now.saturating_add(*ttl_ms),
                api_key: None,
            },
            Step::Commit { pick, usage } => Command::Commit {
                reservation: pick.get(&self.reservations).clone(),
                usage: usage.clone(),
                api_key: None,
            },
            Step::Release { pick } => {
                Command::Release { reservation: pick.get(&self.reservations).clone(), api_key: None }
            }
            Step::ReleaseAll { env: e, agent: a } => {
                Command::ReleaseAll { environment: env(e), agent: a.as_ref().map(agent) }
            }
            Step::Advance { .. } => return None,
        })
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        if let Step::Advance { ms, sweep } = step {
            self.now += ms;
            if *sweep {
                for reservation in self.ledger.due_expiries(self.now, usize::MAX) {
                    self.apply(&Command::Expire { reservation })?;
                }
            }
        } else if let Some(command) = self.command(step) {
            self.apply(&command)?;
        }
        prop_assert_eq!(self.ledger.verify(), Ok(()), "after {:?} at {}", step, self.now);
        Ok(())
    }

    fn apply(&mut self, command: &Command) -> Result<(), TestCaseError> {
        let before = self.visible();
        // A commit or release of a hold whose time has come expires it first, refused or not: the
        // expiry is the sweeper's change, due anyway.
        let due = before.holds.iter().flatten().flat_map(|page| &page.holds).any(|h| h.expires_at_ms <= self.now);
        match self.ledger.apply(command, self.now) {
            Err(error) => {
                if !due {
                    prop_assert_eq!(
                        &before,
                        &self.visible(),
                        "{:?} was refused ({}) and changed the books",
                        command,
                        error
                    );
                }
            }
            Ok(outcome) => self.check_outcome(command, outcome)?,
        }
        Ok(())
    }

    /// What an accepted command answered adds up.
    fn check_outcome(&mut self, command: &Command, outcome: Outcome) -> Result<(), TestCaseError> {
        match (command, outcome) {
            (Command::Reserve { usage, .. }, Outcome::Reserved(grant)) => {
                prop_assert_eq!(grant.draws.total(), grant.amount_milli, "a hold's draws add up to it");
                if let Usage::Milli(amount) = usage {
                    prop_assert_eq!(grant.amount_milli, *amount, "a hold is the amount asked for");
                }
                if !grant.replayed {
                    self.reservations.push(grant.reservation);
                }
            }
            (Command::Commit { usage, .. }, Outcome::Committed(settled)) => {
                let result = settled.result;
                if let (Usage::Milli(actual), false) = (usage, settled.replayed) {
                    prop_assert_eq!(result.charged.total() + result.overage_milli, *actual, "charges plus overage");
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[test]
fn arbitrary_command_sequences_keep_the_ledger_consistent() {
    // Proves that any sequence of commands with inputs at their edges leaves the ledger's invariants
    // intact after every step, that refused commands change nothing visible, and that grants and
    // commits add up.
    fuzzing::fuzz(steps(), 32, |steps| {
        let mut harness = Harness::new();
        for step in &steps {
            harness.step(step)?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------------
// Inputs fuzzing found, kept as named tests.

#[test]
fn the_largest_quantity_at_a_rate_of_u64_max_per_u64_max_is_too_large_not_a_panic() {
    // Proves that a reservation whose price overflows even 128 bits (u64::MAX units at a valid rate of
    // u64::MAX messages per u64::MAX units, times 1000 milli) is refused as too large; pricing used to
    // overflow its u128 product, a panic in debug builds and a wrong, wrapped price in release builds.
    let mut harness = Harness::new();
    let rate = Rate { messages: u64::MAX, per: u64::MAX };
    let steps = [
        Step::SetRateCard { rates: vec![("agent_flow_actions".into(), rate)], delay_ms: 0 },
        Step::Purchase { tenant: At(0), amount: 43_455, key: None },
        Step::Allocate { tenant: At(0), env: At(0), amount: 0, pool: true },
    ];
    for step in &steps {
        harness.step(step).unwrap();
    }
    let reserve = Command::Reserve {
        environment: harness.envs[0].clone(),
        agent: harness.agents[0].clone(),
        usage: Usage::Items(vec![UsageItem { scenario: "agent_flow_actions".into(), quantity: u64::MAX }]),
        idempotency_key: None,
        expires_at_ms: START_MS + 60_000,
        api_key: None,
    };
    let refused = harness.ledger.apply(&reserve, harness.now);
    assert_eq!(refused, Err(LedgerError::UsageTooLarge { max_milli: MAX_AMOUNT_MILLI }));
    assert_eq!(harness.ledger.verify(), Ok(()));
}
