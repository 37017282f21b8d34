//! What the fuzz targets (`tests/fuzz_*.rs`) share: running a proptest strategy until a time budget
//! runs out instead of for a fixed number of cases, and a bound on how long one case may take.
//!
//! The budget is `QUOTAD_FUZZ_SECONDS` per target ([`DEFAULT_FUZZ_SECONDS`] when unset, so that a plain
//! `cargo nextest run` stays quick; `scripts/test` sets it for CI). A failing case is shrunk by proptest,
//! printed, and its seed saved in the target's `.proptest-regressions` file, which is replayed first on
//! every later run. A directory module, so that cargo does not build it as a test of its own.
#![allow(dead_code)]

use std::{
    cell::Cell,
    fmt::Debug,
    panic::Location,
    sync::mpsc,
    time::{Duration, Instant},
};

use proptest::{
    prelude::{Just, any, prop_oneof},
    strategy::Strategy,
    test_runner::{Config, FileFailurePersistence, TestCaseError, TestCaseResult, TestError, TestRunner},
};

/// The environment variable holding each fuzz target's budget in seconds.
pub const FUZZ_SECONDS_VAR: &str = "QUOTAD_FUZZ_SECONDS";
/// Seconds per target when the variable is unset.
pub const DEFAULT_FUZZ_SECONDS: u64 = 2;
/// A failing case is shrunk for at most this long, past the budget, so that a failure found late is
/// still reported minimal.
const MAX_SHRINK: Duration = Duration::from_secs(300);

/// How long each fuzz target runs.
pub fn budget() -> Duration {
    match std::env::var(FUZZ_SECONDS_VAR) {
        Err(_) => Duration::from_secs(DEFAULT_FUZZ_SECONDS),
        Ok(text) => Duration::from_secs(
            text.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{FUZZ_SECONDS_VAR}={text:?}: expected a whole number of seconds")),
        ),
    }
}

/// Runs `test` on inputs from `strategy`, in rounds of `cases_per_round` fresh cases, until the budget
/// is spent; panics with the minimal failing input if a case fails. Returns how many cases ran. The
/// regressions file is the caller's source file with `.proptest-regressions` for `.rs`.
#[track_caller]
pub fn fuzz<S>(strategy: S, cases_per_round: u32, test: impl Fn(S::Value) -> TestCaseResult) -> u64
where
    S: Strategy,
    S::Value: Debug,
{
    let source_file = Location::caller().file();
    let budget = budget();
    let deadline = Instant::now() + budget;
    // Once a case fails (or panics, which proptest catches), every later call is part of shrinking it
    // and must run for real.
    let failed = Cell::new(false);
    let ran = Cell::new(0u64);
    let bounded = |value: S::Value| {
        if !failed.get() && Instant::now() >= deadline {
            return Ok(());
        }
        ran.set(ran.get() + 1);
        let failed_before = failed.replace(true);
        let result = test(value);
        if result.is_ok() {
            failed.set(failed_before);
        }
        result
    };
    while Instant::now() < deadline {
        let config = Config {
            cases: cases_per_round,
            source_file: Some(source_file),
            failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
            max_shrink_time: MAX_SHRINK.as_millis() as u32,
            ..Config::default()
        };
        match TestRunner::new(config).run(&strategy, bounded) {
            Ok(()) => {}
            Err(TestError::Fail(reason, minimal)) => {
                panic!("fuzz case failed: {reason}\nminimal failing input: {minimal:#?}")
            }
            Err(TestError::Abort(reason)) => panic!("fuzzing aborted: {reason}"),
        }
    }
    eprintln!("{source_file}: {} cases in {budget:?}", ran.get());
    ran.get()
}

/// Runs `work` on a thread of its own and fails the case if it takes longer than `limit`: an input that
/// makes code loop forever is reported with the input, rather than hanging the suite. (The thread is
/// left behind on a timeout; the test fails anyway.)
pub fn within<T: Send + 'static>(
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TestCaseError> {
    let (done, result) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = done.send(work());
    });
    match result.recv_timeout(limit) {
        Ok(value) => {
            let _ = worker.join();
            Ok(value)
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(TestCaseError::fail(format!("did not finish within {limit:?}"))),
        // The worker panicked before sending: re-raise its panic so that proptest reports it.
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker sends before it returns"),
        },
    }
}

/// A position in a collection or buffer of any size, as a fraction of its size (`At(0)` is the start,
/// `At(u64::MAX)` the end). Like proptest's `Index`, but printed as a plain number and written as a
/// literal in a regression test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At(pub u64);

impl At {
    /// The position in a collection of `size` elements: below `size` when `size` is not zero.
    pub fn of(self, size: usize) -> usize {
        ((u128::from(self.0) * size as u128) >> 64) as usize
    }

    /// The element at this position of a non-empty slice.
    pub fn get<T>(self, slice: &[T]) -> &T {
        &slice[self.of(slice.len())]
    }
}

pub fn at() -> impl Strategy<Value = At> + Clone {
    proptest::prelude::any::<u64>().prop_map(At)
}

/// One change to a byte string: what damage to a file, or a corrupted or hostile request body, looks
/// like. Positions are fractions of the current length, so every mutation applies to any input.
#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit {
        at: At,
        bit: u8,
    },
    SetByte {
        at: At,
        value: u8,
    },
    /// Overwrites four bytes, such as a length field, with a value at an edge.
    SetU32 {
        at: At,
        value: u32,
    },
    Truncate {
        at: At,
    },
    Zero {
        at: At,
        len: usize,
    },
    Insert {
        at: At,
        bytes: Vec<u8>,
    },
    Remove {
        at: At,
        len: usize,
    },
    /// Copies a range over another place, as a misdirected write of valid records would.
    Overwrite {
        from: At,
        len: usize,
        to: At,
    },
    /// Inserts a copy of a range elsewhere: records or items spliced in twice.
    Duplicate {
        from: At,
        len: usize,
        to: At,
    },
    AppendZeros {
        len: usize,
    },
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    let edge_u32 = prop_oneof![
        Just(0u32),
        Just(1),
        Just(u32::MAX),
        Just(1 << 20),
        Just((1 << 20) + 1),
        Just(1 << 30),
        0..4_096u32,
        any::<u32>()
    ];
    prop_oneof![
        4 => (at(), 0..8u8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (at(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        2 => (at(), edge_u32).prop_map(|(at, value)| Mutation::SetU32 { at, value }),
        2 => at().prop_map(|at| Mutation::Truncate { at }),
        1 => (at(), 1..64usize).prop_map(|(at, len)| Mutation::Zero { at, len }),
        1 => (at(), proptest::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (at(), 1..64usize).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => (at(), 1..512usize, at()).prop_map(|(from, len, to)| Mutation::Overwrite { from, len, to }),
        1 => (at(), 1..512usize, at()).prop_map(|(from, len, to)| Mutation::Duplicate { from, len, to }),
        1 => (1..4_096usize).prop_map(|len| Mutation::AppendZeros { len }),
    ]
}

pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..=4)
}

/// The range of `len` bytes from `at` that fits in a buffer of `size` bytes.
fn range(at: At, len: usize, size: usize) -> std::ops::Range<usize> {
    let start = at.of(size);
    start..(start + len).min(size)
}

fn apply_mutation(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let mutation = mutation.clone();
    let size = bytes.len();
    if size == 0 {
        if let Mutation::Insert { bytes: new, .. } = mutation {
            bytes.extend_from_slice(&new);
        }
        return;
    }
    match mutation {
        Mutation::FlipBit { at, bit } => bytes[at.of(size)] ^= 1 << bit,
        Mutation::SetByte { at, value } => bytes[at.of(size)] = value,
        Mutation::SetU32 { at, value } => {
            let r = range(at, 4, size);
            let len = r.len();
            bytes[r].copy_from_slice(&value.to_le_bytes()[..len]);
        }
        Mutation::Truncate { at } => bytes.truncate(at.of(size)),
        Mutation::Zero { at, len } => bytes[range(at, len, size)].fill(0),
        Mutation::Insert { at, bytes: new } => {
            let at = at.of(size + 1);
            bytes.splice(at..at, new);
        }
        Mutation::Remove { at, len } => {
            bytes.drain(range(at, len, size));
        }
        Mutation::Overwrite { from, len, to } => {
            let copied = bytes[range(from, len, size)].to_vec();
            let target = range(to, copied.len(), size);
            let n = target.len();
            bytes[target].copy_from_slice(&copied[..n]);
        }
        Mutation::Duplicate { from, len, to } => {
            let copied = bytes[range(from, len, size)].to_vec();
            let at = to.of(size + 1);
            bytes.splice(at..at, copied);
        }
        Mutation::AppendZeros { len } => bytes.resize(size + len, 0),
    }
}

/// `original` with `mutations` applied in order.
pub fn damaged(original: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for mutation in mutations {
        apply_mutation(&mut bytes, mutation);
    }
    bytes
}
