//! Micro-benchmarks of the accounting core, without the transport or the log: a `Ledger` in memory
//! with the `Discard` sink, driven directly. They show what one decision costs in the core, how that
//! changes with the number of environments, what contention on one environment's lock costs
//! compared with the same threads spread over separate environments, and what applying pairs in
//! batches costs per pair.
//!
//! Every reservation is committed at once, so holds never pile up, and every environment has an
//! allocation far larger than any run can use. Resolved reservations are kept as in production
//! (default limits), so a long run on one environment reaches the cap on remembered reservations.
//! Nothing is random: environments are picked round-robin.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quotad::ledger::{
    AgentId, Command, Discard, EnvironmentId, Ledger, Limits, MILLI_PER_MESSAGE, Milli, Outcome, TenantId, Usage,
};

/// A fixed clock: every hold expires an hour later, so none expires during a run.
const NOW_MS: u64 = 1_700_000_000_000;
const EXPIRES_AT_MS: u64 = NOW_MS + 3_600_000;
/// One message per reservation, committed in full.
const AMOUNT_MILLI: Milli = MILLI_PER_MESSAGE;
/// Per environment: a billion messages, more than any run reserves.
const ALLOCATION_MILLI: Milli = 1_000_000_000 * MILLI_PER_MESSAGE;
/// Environments per tenant, so that usage reports stay under the per-tenant key limit.
const ENVIRONMENTS_PER_TENANT: usize = 1_000;
const MANY_ENVIRONMENTS: usize = 1_000_000;
const THREADS: [usize; 4] = [1, 2, 4, 8];

/// A ledger with `count` environments, each with an allocation of its own.
fn ledger_with(count: usize) -> (Ledger, Vec<EnvironmentId>) {
    let ledger = Ledger::with_sink(Limits::default(), Arc::new(Discard));
    let environments: Vec<EnvironmentId> =
        (0..count).map(|i| EnvironmentId::new(&format!("env-{i:07}")).expect("a valid id")).collect();
    for (t, chunk) in environments.chunks(ENVIRONMENTS_PER_TENANT).enumerate() {
        let tenant = TenantId::new(&format!("tenant-{t:04}")).expect("a valid id");
        let purchase = Command::PurchaseCapacity {
            tenant: tenant.clone(),
            amount_milli: ALLOCATION_MILLI * chunk.len() as Milli,
            idempotency_key: None,
        };
        ledger.apply(&purchase, NOW_MS).expect("a purchase");
        for environment in chunk {
            let allocate = Command::AllocateCapacity {
                tenant: tenant.clone(),
                environment: environment.clone(),
                amount_milli: ALLOCATION_MILLI,
                draw_from_tenant_pool: false,
            };
            ledger.apply(&allocate, NOW_MS).expect("an allocation");
        }
    }
    (ledger, environments)
}

/// One reservation of a message, committed in full.
fn reserve_commit(ledger: &Ledger, environment: &EnvironmentId, agent: &AgentId) {
    let reserve = Command::Reserve {
        environment: environment.clone(),
        agent: agent.clone(),
        usage: Usage::Milli(AMOUNT_MILLI),
        idempotency_key: None,
        expires_at_ms: EXPIRES_AT_MS,
        api_key: None,
    };
    let Ok(Outcome::Reserved(grant)) = ledger.apply(&reserve, NOW_MS) else { panic!("the reservation is granted") };
    let commit = Command::Commit { reservation: grant.reservation, usage: Usage::Milli(AMOUNT_MILLI), api_key: None };
    black_box(ledger.apply(&commit, NOW_MS).expect("the commit settles"));
}

fn agent() -> AgentId {
    AgentId::new("agent").expect("a valid id")
}

fn one_environment(c: &mut Criterion) {
    let (ledger, environments) = ledger_with(1);
    let agent = agent();
    c.bench_function("reserve_commit/1_environment", |b| b.iter(|| reserve_commit(&ledger, &environments[0], &agent)));
    c.bench_function("balance/1_environment", |b| {
        b.iter(|| black_box(ledger.balance(black_box(&environments[0]), NOW_MS).expect("a balance")))
    });
}

/// Setting up a million environments takes about two seconds, once, outside the timed loop.
fn many_environments(c: &mut Criterion) {
    let (ledger, environments) = ledger_with(MANY_ENVIRONMENTS);
    let agent = agent();
    let mut next = 0;
    c.bench_function("reserve_commit/1000000_environments", |b| {
        b.iter(|| {
            reserve_commit(&ledger, &environments[next], &agent);
            next = (next + 1) % environments.len();
        })
    });
}

/// Each of `threads` threads does `iters` reserve+commit pairs on `environments` (its own, or one
/// shared); the time returned is the wall time of the whole round, so criterion's time per iteration
/// is what one pair takes as one caller sees it, and its throughput counts the pairs of all threads.
fn round(ledger: &Ledger, environments: &[EnvironmentId], threads: usize, iters: u64) -> Duration {
    let start = Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (start, environment, agent) = (&start, &environments[t % environments.len()], agent());
            scope.spawn(move || {
                start.wait();
                for _ in 0..iters {
                    reserve_commit(ledger, environment, &agent);
                }
            });
        }
        start.wait();
        Instant::now()
    })
    .elapsed()
}

fn contention(c: &mut Criterion) {
    let (ledger, environments) = ledger_with(*THREADS.iter().max().expect("thread counts"));
    let mut group = c.benchmark_group("contention");
    for threads in THREADS {
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_with_input(BenchmarkId::new("one_environment", threads), &threads, |b, &threads| {
            b.iter_custom(|iters| round(&ledger, &environments[..1], threads, iters))
        });
        group.bench_with_input(BenchmarkId::new("own_environment", threads), &threads, |b, &threads| {
            b.iter_custom(|iters| round(&ledger, &environments[..threads], threads, iters))
        });
    }
    group.finish();
}

/// Items in one batch of the batch benchmarks.
const BATCH: usize = 100;

/// `BATCH` reservations applied as one batch, then their commits as another, the items taking
/// `environments` round-robin: consecutive items on one environment share its lock, items on
/// different ones do not.
fn batch_pairs(ledger: &Ledger, environments: &[EnvironmentId], agent: &AgentId, next: &mut usize) {
    let reserves: Vec<Command> = (0..BATCH)
        .map(|_| {
            let environment = environments[*next % environments.len()].clone();
            *next += 1;
            Command::Reserve {
                environment,
                agent: agent.clone(),
                usage: Usage::Milli(AMOUNT_MILLI),
                idempotency_key: None,
                expires_at_ms: EXPIRES_AT_MS,
                api_key: None,
            }
        })
        .collect();
    let commits: Vec<Command> = ledger
        .apply_batch(&reserves, NOW_MS)
        .into_iter()
        .map(|result| {
            let Ok(Outcome::Reserved(grant)) = result else { panic!("the reservation is granted") };
            Command::Commit { reservation: grant.reservation, usage: Usage::Milli(AMOUNT_MILLI), api_key: None }
        })
        .collect();
    black_box(ledger.apply_batch(&commits, NOW_MS));
}

/// Pairs applied in batches of `BATCH`, on one environment (runs share its lock) and over 64 (no two
/// consecutive items share one): what a batch saves in the core alone, against `reserve_commit`.
fn batches(c: &mut Criterion) {
    let mut group = c.benchmark_group("reserve_commit_batch_of_100");
    group.throughput(Throughput::Elements(BATCH as u64));
    let agent = agent();
    for count in [1, 64] {
        let (ledger, environments) = ledger_with(count);
        let mut next = 0;
        group.bench_function(BenchmarkId::new("environments", count), |b| {
            b.iter(|| batch_pairs(&ledger, &environments, &agent, &mut next))
        });
    }
    group.finish();
}

criterion_group!(benches, one_environment, many_environments, contention, batches);
criterion_main!(benches);
