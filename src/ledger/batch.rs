//! Batches of hot-path commands from one caller, such as a gateway that multiplexes many agents' calls.
//! Every command is applied as [`Ledger::apply`] applies it, in order and at one instant; a batch saves
//! the work around the commands: consecutive commands on the same environment with the same API key
//! find the environment and check the key's scope once, and run under one lock of the environment.

use std::sync::Arc;

use super::{
    ApiKeyId, Books, CapacityCell, Command, EnvironmentId, Ledger, LedgerError, Outcome, ReserveRequest,
    api_keys::ApiKey,
};

/// The most commands applied under one lock of an environment, so that a long run of one caller's
/// commands keeps the environment's other callers (and its tenant's, when it draws on the pool)
/// waiting for a few tens of microseconds at most.
pub const MAX_COMMANDS_PER_LOCK: usize = 64;

/// What a hot-path command is applied to. Consecutive commands with equal targets share one lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target<'a> {
    /// A reservation: the environment it names (capacity or app), and the key it comes with.
    Environment(&'a EnvironmentId, Option<&'a ApiKeyId>),
    /// A commit or release: the environment in the reservation id, and the key.
    Reservation(&'a EnvironmentId, Option<&'a ApiKeyId>),
}

fn target(command: &Command) -> Option<Target<'_>> {
    match command {
        Command::Reserve { environment, api_key, .. } => Some(Target::Environment(environment, api_key.as_ref())),
        Command::Commit { reservation, api_key, .. } | Command::Release { reservation, api_key } => {
            Some(Target::Reservation(&reservation.environment, api_key.as_ref()))
        }
        _ => None,
    }
}

impl Ledger {
    /// Applies `commands` in order at `now`, each as [`Ledger::apply`] would, and returns their results
    /// in the same order: a refused command changes nothing (but for the overdue holds a reservation
    /// may expire first, as alone) and does not keep the others from being applied. Consecutive
    /// reservations (or commits and releases) naming the same environment with the same API key are
    /// applied under one lock of it, at most [`MAX_COMMANDS_PER_LOCK`] at a time, so nothing comes
    /// between them; any other command is applied on its own.
    pub fn apply_batch(&self, commands: &[Command], now: u64) -> Vec<Result<Outcome, LedgerError>> {
        let mut results = Vec::with_capacity(commands.len());
        let mut rest = commands;
        while let Some(first) = rest.first() {
            let length = match target(first) {
                None => 1,
                Some(run_target) => {
                    let same = |command: &&Command| target(command) == Some(run_target);
                    1 + rest[1..].iter().take(MAX_COMMANDS_PER_LOCK - 1).take_while(same).count()
                }
            };
            let (run, after) = rest.split_at(length);
            self.apply_run(run, now, &mut results);
            rest = after;
        }
        results
    }

    /// Applies commands of one target under one lock of their environment. When the environment cannot
    /// be used (unknown, outside the key's scope), each command is applied alone, so that each gets the
    /// refusal, naming its own ids, that `apply` gives it.
    fn apply_run(&self, run: &[Command], now: u64, results: &mut Vec<Result<Outcome, LedgerError>>) {
        let Ok((cell, key)) = self.resolve(&run[0]) else {
            results.extend(run.iter().map(|command| self.apply(command, now)));
            return;
        };
        let mut books = Books::lock(&cell, now);
        for command in run {
            results.push(self.apply_locked(&mut books, key.as_deref(), command, now));
            // A command that started the period, or released the last pool hold of an environment that no
            // longer draws on the pool, leaves the tenant locked where the next command alone would not lock it.
            books.release_tenant_unless_needed(now);
        }
    }

    /// The capacity environment a hot-path command is applied to, if its key may use it, with the key.
    pub(super) fn resolve(&self, command: &Command) -> Result<(Arc<CapacityCell>, Option<Arc<ApiKey>>), LedgerError> {
        match command {
            Command::Reserve { environment, api_key, .. } => self.scoped_cell(environment, api_key.as_ref()),
            Command::Commit { reservation, api_key, .. } | Command::Release { reservation, api_key } => {
                self.scoped_reservation_cell(reservation, api_key.as_ref()).map(|cell| (cell, None))
            }
            _ => unreachable!("only reservations, commits and releases are applied to locked books"),
        }
    }

    /// A hot-path command on the books of the environment it resolved to, locked.
    pub(super) fn apply_locked(
        &self,
        books: &mut Books<'_>,
        key: Option<&ApiKey>,
        command: &Command,
        now: u64,
    ) -> Result<Outcome, LedgerError> {
        match command {
            Command::Reserve { environment: _, agent, usage, idempotency_key, expires_at_ms, api_key: _ } => {
                let request = ReserveRequest { agent, usage, idempotency_key: idempotency_key.as_ref(), expires_at_ms };
                self.reserve_in(books, key, &request, now).map(Outcome::Reserved)
            }
            Command::Commit { reservation, usage, api_key: _ } => {
                self.commit_in(books, reservation, usage, now).map(Outcome::Committed)
            }
            Command::Release { reservation, api_key: _ } => {
                self.release_in(books, reservation, now).map(Outcome::Released)
            }
            _ => unreachable!("only reservations, commits and releases are applied in runs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;
    use proptest::prelude::*;

    use super::*;
    use crate::ledger::{
        AgentId, Event, EventSink, IdempotencyKey, Levels, Limits, MILLI_PER_MESSAGE, ReservationId, TenantId, Usage,
        api_keys::SecretHash,
    };

    /// Keeps every event, to compare what a batch logs with what the same commands log one by one.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Event, Option<Levels>)>>);

    impl EventSink for Recorder {
        fn record(&self, now: u64, event: &Event, levels: Option<Levels>) -> u64 {
            let mut events = self.0.lock();
            events.push((now, event.clone(), levels));
            events.len() as u64
        }
    }

    const KEY: &str = "key-a";
    const ENVIRONMENTS: [&str; 4] = ["a", "b", "app", "unknown"];

    fn environment(id: &str) -> EnvironmentId {
        EnvironmentId::new(id).unwrap()
    }

    /// Tenant `t`: `a` (5 messages, draws on the pool, `app` linked to it) and `b` (3 messages, no pool),
    /// 2 messages left in the pool; a key for `a` alone. Caps small enough for commands to reach them.
    fn ledger() -> (Ledger, Arc<Recorder>) {
        let limits = Limits {
            max_open_reservations_per_environment: 4,
            max_open_reservations_per_api_key: 3,
            max_open_reservations_total: 6,
            ..Limits::default()
        };
        let recorder = Arc::new(Recorder::default());
        let ledger = Ledger::with_sink(limits, recorder.clone());
        let tenant = TenantId::new("t").unwrap();
        let setup = [
            Command::PurchaseCapacity { tenant: tenant.clone(), amount_milli: 10_000, idempotency_key: None },
            Command::AllocateCapacity {
                tenant: tenant.clone(),
                environment: environment("a"),
                amount_milli: 5_000,
                draw_from_tenant_pool: true,
            },
            Command::AllocateCapacity {
                tenant: tenant.clone(),
                environment: environment("b"),
                amount_milli: 3_000,
                draw_from_tenant_pool: false,
            },
            Command::LinkEnvironment { app_environment: environment("app"), environment: Some(environment("a")) },
            Command::CreateApiKey {
                id: ApiKeyId::new(KEY).unwrap(),
                tenant,
                environments: vec![environment("a")],
                description: String::new(),
                secret_hash: SecretHash([7; 32]),
            },
        ];
        for command in &setup {
            ledger.apply(command, 0).unwrap();
        }
        (ledger, recorder)
    }

    fn reserve(environment_id: &str, messages: u64, key: Option<&str>) -> Command {
        Command::Reserve {
            environment: environment(environment_id),
            agent: AgentId::new("agent").unwrap(),
            usage: Usage::Milli(messages * MILLI_PER_MESSAGE),
            idempotency_key: None,
            expires_at_ms: 60_000,
            api_key: key.map(|key| ApiKeyId::new(key).unwrap()),
        }
    }

    fn reservation(environment_id: &str, seq: u64) -> ReservationId {
        ReservationId { environment: environment(environment_id), seq }
    }

    fn granted(result: &Result<Outcome, LedgerError>) -> &ReservationId {
        match result {
            Ok(Outcome::Reserved(grant)) => &grant.reservation,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    /// More commands on one environment than one lock applies are applied in order all the same.
    #[test]
    fn a_run_longer_than_one_lock_is_applied_in_order() {
        let ledger = Ledger::new(Limits::default());
        let tenant = TenantId::new("t").unwrap();
        ledger
            .apply(
                &Command::PurchaseCapacity { tenant: tenant.clone(), amount_milli: 1_000_000, idempotency_key: None },
                0,
            )
            .unwrap();
        let allocate = Command::AllocateCapacity {
            tenant,
            environment: environment("a"),
            amount_milli: 1_000_000,
            draw_from_tenant_pool: false,
        };
        ledger.apply(&allocate, 0).unwrap();
        let count = 2 * MAX_COMMANDS_PER_LOCK + 1;
        let results = ledger.apply_batch(&vec![reserve("a", 1, None); count], 0);
        let seqs: Vec<u64> = results.iter().map(|result| granted(result).seq).collect();
        assert_eq!(seqs, (1..=count as u64).collect::<Vec<_>>());
        assert_eq!(ledger.open_reservations(), count as u64);
        assert_eq!(ledger.verify(), Ok(()));
    }

    /// A run whose first command starts a new billing period locks the tenant for that command only, as
    /// the commands one by one would: the later ones log no tenant levels.
    #[test]
    fn a_run_that_starts_a_period_logs_as_its_commands_one_by_one() {
        let (batched, batched_log) = ledger();
        let (single, single_log) = ledger();
        let next_month = 40 * 24 * 60 * 60 * 1_000;
        let step = Step::Reserve { environment: 1, messages: 1, idempotency_key: None, with_key: false };
        let commands = vec![command(&step, next_month + 1_000); 3];
        let one_by_one: Vec<_> = commands.iter().map(|command| single.apply(command, next_month)).collect();
        assert_eq!(batched.apply_batch(&commands, next_month), one_by_one);
        let logged = batched_log.0.lock();
        assert!(logged.iter().rev().take(2).all(|(_, _, levels)| levels.is_some_and(|l| l.tenant.is_none())));
        assert_eq!(&*logged, &*single_log.0.lock());
    }

    /// A refused command in the middle of a run changes nothing, and the commands after it are applied.
    #[test]
    fn a_refusal_within_a_run_stops_nothing() {
        let (ledger, _) = ledger();
        let results = ledger.apply_batch(&[reserve("b", 2, None), reserve("b", 2, None), reserve("b", 1, None)], 0);
        assert_eq!(granted(&results[0]).seq, 1);
        assert!(matches!(
            results[1],
            Err(LedgerError::QuotaDepleted { requested_milli: 2_000, available_milli: 1_000, .. })
        ));
        assert_eq!(granted(&results[2]).seq, 2, "the refusal took no sequence number");
        assert_eq!(ledger.balance(&environment("b"), 0).unwrap().available_milli, 0);
        assert_eq!(ledger.verify(), Ok(()));
    }

    /// Commands on an environment that cannot be used get the refusal each would get alone, naming its
    /// own ids, and the others are applied.
    #[test]
    fn commands_on_an_unusable_environment_are_refused_one_by_one() {
        let (ledger, _) = ledger();
        let commit =
            |seq| Command::Commit { reservation: reservation("nowhere", seq), usage: Usage::Milli(0), api_key: None };
        let commands = [reserve("b", 1, Some(KEY)), commit(1), commit(2), reserve("a", 1, Some(KEY))];
        let results = ledger.apply_batch(&commands, 0);
        assert_eq!(results[0], Err(LedgerError::EnvironmentOutsideKeyScope(environment("b"))));
        assert_eq!(results[1], Err(LedgerError::UnknownReservation("nowhere/1".into())));
        assert_eq!(results[2], Err(LedgerError::UnknownReservation("nowhere/2".into())));
        assert_eq!(granted(&results[3]), &reservation("a", 1));
        assert_eq!(ledger.open_reservations(), 1);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Reserve { environment: usize, messages: u64, idempotency_key: Option<u8>, with_key: bool },
        Commit { environment: usize, seq: u64, messages: u64, with_key: bool },
        Release { environment: usize, seq: u64, with_key: bool },
    }

    fn step() -> impl Strategy<Value = Step> {
        let environment = 0..ENVIRONMENTS.len();
        prop_oneof![
            (environment.clone(), 1..4u64, proptest::option::of(0..3u8), any::<bool>()).prop_map(
                |(environment, messages, idempotency_key, with_key)| Step::Reserve {
                    environment,
                    messages,
                    idempotency_key,
                    with_key
                }
            ),
            (environment.clone(), 1..6u64, 0..4u64, any::<bool>()).prop_map(
                |(environment, seq, messages, with_key)| { Step::Commit { environment, seq, messages, with_key } }
            ),
            (environment, 1..6u64, any::<bool>()).prop_map(|(environment, seq, with_key)| Step::Release {
                environment,
                seq,
                with_key
            }),
        ]
    }

    fn command(step: &Step, expires_at_ms: u64) -> Command {
        let key = |with_key: bool| with_key.then(|| ApiKeyId::new(KEY).unwrap());
        match *step {
            Step::Reserve { environment: index, messages, idempotency_key, with_key } => Command::Reserve {
                environment: environment(ENVIRONMENTS[index]),
                agent: AgentId::new("agent").unwrap(),
                usage: Usage::Milli(messages * MILLI_PER_MESSAGE),
                idempotency_key: idempotency_key.map(|k| IdempotencyKey::new(&format!("k{k}")).unwrap()),
                expires_at_ms,
                api_key: key(with_key),
            },
            Step::Commit { environment, seq, messages, with_key } => Command::Commit {
                reservation: reservation(ENVIRONMENTS[environment], seq),
                usage: Usage::Milli(messages * MILLI_PER_MESSAGE),
                api_key: key(with_key),
            },
            Step::Release { environment, seq, with_key } => {
                Command::Release { reservation: reservation(ENVIRONMENTS[environment], seq), api_key: key(with_key) }
            }
        }
    }

    proptest! {
        /// A batch decides, answers and logs exactly what its commands do one by one at the same
        /// instants: refusals, key scope, caps, idempotent retries and late commits included.
        #[test]
        fn a_batch_is_its_commands_one_by_one(
            batches in proptest::collection::vec((0..2_000u64, proptest::collection::vec(step(), 1..40)), 1..6)
        ) {
            let (batched, batched_log) = ledger();
            let (single, single_log) = ledger();
            let mut now = 0;
            for (elapsed_ms, steps) in &batches {
                now += elapsed_ms;
                let commands: Vec<Command> = steps.iter().map(|step| command(step, now + 1_000)).collect();
                let one_by_one: Vec<_> = commands.iter().map(|command| single.apply(command, now)).collect();
                prop_assert_eq!(batched.apply_batch(&commands, now), one_by_one);
            }
            prop_assert_eq!(&*batched_log.0.lock(), &*single_log.0.lock());
            for id in ["a", "b"] {
                prop_assert_eq!(batched.balance(&environment(id), now), single.balance(&environment(id), now));
            }
            prop_assert_eq!(batched.verify(), Ok(()));
        }
    }
}
