//! Open holds as an admin sees them: listed a page at a time, oldest first, and released all at once.

use super::{
    AgentId, ApiKeyId, Books, Draws, EnvironmentId, Event, Hold, Ledger, LedgerError, Milli, ReleaseSummary,
    ReservationId, account::Environment,
};

/// The most open holds one page looks at under the environment's lock. A page filtered by agent may
/// need to pass over many other agents' holds; past this many it stops, short, so that listing never
/// stalls the environment's reservations for long.
pub const MAX_HOLDS_SCANNED_PER_PAGE: usize = 10_000;

/// An open hold, copied out of the books.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenHold {
    pub reservation: ReservationId,
    pub agent: AgentId,
    pub amount_milli: Milli,
    pub draws: Draws,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub rate_card_version: u32,
    /// The API key it was made with.
    pub api_key: Option<ApiKeyId>,
}

/// One page of open holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldPage {
    pub holds: Vec<OpenHold>,
    /// The sequence number the next page starts at; `None` when no open hold is left after this page.
    pub next_seq: Option<u64>,
}

impl Ledger {
    /// Up to `max` open holds of the capacity environment `environment` names (an app environment
    /// names the one it is linked to), of `agent` only if given, from sequence number `from_seq` on,
    /// oldest first. At most [`MAX_HOLDS_SCANNED_PER_PAGE`] holds are looked at, so a page filtered by
    /// agent may come back short, or empty, with a `next_seq` to go on from.
    pub fn open_holds(
        &self,
        environment: &EnvironmentId,
        agent: Option<&AgentId>,
        from_seq: u64,
        max: usize,
    ) -> Result<HoldPage, LedgerError> {
        assert!((1..=MAX_HOLDS_SCANNED_PER_PAGE).contains(&max), "a page of {max} holds");
        let cell = self.capacity_cell(environment)?;
        // Only the environment's own lock: listing touches no tenant counter.
        let env = cell.books.lock();
        let mut holds = Vec::with_capacity(max);
        let mut next_seq = None;
        for (scanned, (&seq, hold)) in env.open.range(from_seq..).enumerate() {
            if holds.len() == max || scanned == MAX_HOLDS_SCANNED_PER_PAGE {
                next_seq = Some(seq);
                break;
            }
            if agent.is_none_or(|agent| hold.agent == *agent) {
                holds.push(open_hold(&cell.id, seq, hold));
            }
        }
        Ok(HoldPage { holds, next_seq })
    }

    /// Decides and applies a release of every open hold of the capacity environment (of `agent` only,
    /// if given) as one event. Releasing nothing logs nothing.
    pub(super) fn release_all(
        &self,
        environment: &EnvironmentId,
        agent: Option<&AgentId>,
        now: u64,
    ) -> Result<ReleaseSummary, LedgerError> {
        let _admin = self.admin.lock();
        let cell = self.named_capacity_cell(environment)?;
        let mut books = Books::lock(&cell, now);
        // Every hold granted so far; the event names this bound so that replay releases exactly these.
        let through_seq = books.env.next_seq - 1;
        let (count, released_milli) = totals(books.env.open_holds_of(agent, through_seq));
        if count > 0 {
            let event = Event::ReleasedAll {
                environment: environment.clone(),
                agent: agent.cloned(),
                through_seq,
                count,
                released_milli,
            };
            self.record(&mut books, &event, now);
        }
        Ok(ReleaseSummary { count, released_milli, balance: books.balance() })
    }
}

fn open_hold(environment: &EnvironmentId, seq: u64, hold: &Hold) -> OpenHold {
    OpenHold {
        reservation: ReservationId { environment: environment.clone(), seq },
        agent: hold.agent.clone(),
        amount_milli: hold.amount,
        draws: hold.draws,
        created_at_ms: hold.created_at_ms,
        expires_at_ms: hold.expires_at_ms,
        rate_card_version: hold.rate_card_version,
        api_key: hold.api_key.clone(),
    }
}

/// How many holds and how many milli they hold.
fn totals<'a>(holds: impl Iterator<Item = (u64, &'a Hold)>) -> (u64, Milli) {
    holds.fold((0, 0), |(count, milli), (_, hold)| (count + 1, add_held(milli, hold)))
}

/// The sequence numbers of the holds a `ReleasedAll` event releases, and what they hold.
pub(super) fn released_by(env: &Environment, agent: Option<&AgentId>, through_seq: u64) -> (Vec<u64>, Milli) {
    let mut milli = 0;
    let seqs = env
        .open_holds_of(agent, through_seq)
        .map(|(seq, hold)| {
            milli = add_held(milli, hold);
            seq
        })
        .collect();
    (seqs, milli)
}

fn add_held(milli: Milli, hold: &Hold) -> Milli {
    // Open holds add up to the environment's held total, which `plan_hold` keeps countable.
    milli.checked_add(hold.amount).expect("open holds add up within one amount")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;
    use crate::ledger::{
        Command, EventSink, Levels, Limits, OVERDUE_HOLDS_EXAMINED, Outcome, RestoreError, TenantId, Usage,
    };

    /// Keeps every event with its time, numbered from 1.
    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, Event, Option<Levels>)>>);

    impl EventSink for Log {
        fn record(&self, now: u64, event: &Event, levels: Option<Levels>) -> u64 {
            let mut log = self.0.lock();
            log.push((now, event.clone(), levels));
            log.len() as u64
        }
    }

    const T0: u64 = 1_000_000;

    fn env() -> EnvironmentId {
        EnvironmentId::new("e").unwrap()
    }

    fn agent(name: &str) -> AgentId {
        AgentId::new(name).unwrap()
    }

    /// A ledger logging to `log`, with tenant `t` and environment `e` holding `milli` of allocation
    /// and the rest of `milli` * 2 in the tenant pool, which `e` draws on.
    fn ledger(log: Arc<Log>, milli: Milli) -> Ledger {
        let ledger = Ledger::with_sink(Limits::default(), log);
        let tenant = TenantId::new("t").unwrap();
        let setup = [
            Command::PurchaseCapacity { tenant: tenant.clone(), amount_milli: 2 * milli, idempotency_key: None },
            Command::AllocateCapacity { tenant, environment: env(), amount_milli: milli, draw_from_tenant_pool: true },
        ];
        for command in &setup {
            ledger.apply(command, T0).unwrap();
        }
        ledger
    }

    fn reserve(ledger: &Ledger, agent_name: &str, amount_milli: Milli, now: u64) -> ReservationId {
        let command = Command::Reserve {
            environment: env(),
            agent: agent(agent_name),
            usage: Usage::Milli(amount_milli),
            idempotency_key: None,
            expires_at_ms: now + 60_000,
            api_key: None,
        };
        let Ok(Outcome::Reserved(grant)) = ledger.apply(&command, now) else { panic!("reserved") };
        grant.reservation
    }

    fn release_all(ledger: &Ledger, agent_name: Option<&str>, now: u64) -> ReleaseSummary {
        let command = Command::ReleaseAll { environment: env(), agent: agent_name.map(agent) };
        let Ok(Outcome::ReleasedAll(summary)) = ledger.apply(&command, now) else { panic!("released") };
        summary
    }

    fn all_open(ledger: &Ledger) -> Vec<OpenHold> {
        ledger.open_holds(&env(), None, 0, 1_000).unwrap().holds
    }

    /// Releasing one agent's holds returns exactly their draws (the pool's included) and resolves them
    /// as a Release would: a later Commit is refused and a Release repeats the amount; the other
    /// agent's holds stay, and a second release-all releases nothing and logs nothing.
    #[test]
    fn releasing_one_agents_holds_leaves_the_others_exactly() {
        let log = Arc::new(Log::default());
        let ledger = ledger(log.clone(), 3_000);
        let a1 = reserve(&ledger, "a", 2_000, T0);
        let b = reserve(&ledger, "b", 1_500, T0 + 1);
        let a2 = reserve(&ledger, "a", 2_000, T0 + 2);

        let summary = release_all(&ledger, Some("a"), T0 + 3);
        assert_eq!((summary.count, summary.released_milli), (2, 4_000));
        assert_eq!(summary.balance.reserved_milli, 1_500);
        assert_eq!(summary.balance.available_milli, 6_000 - 1_500);
        // b drew 1,000 from the allocation and 500 from the pool, which a's second hold drew on too.
        assert_eq!(ledger.tenant(&TenantId::new("t").unwrap(), T0).unwrap().pool_reserved_milli, 500);
        assert_eq!(all_open(&ledger).iter().map(|h| h.reservation.clone()).collect::<Vec<_>>(), [b]);
        assert_eq!(ledger.open_reservations(), 1);
        assert_eq!(ledger.verify(), Ok(()));

        let commit = Command::Commit { reservation: a1.clone(), usage: Usage::Milli(1_000), api_key: None };
        assert_eq!(ledger.apply(&commit, T0 + 4), Err(LedgerError::AlreadyReleased(a1)));
        let Ok(Outcome::Released(release)) = ledger.apply(&Command::Release { reservation: a2, api_key: None }, T0 + 4)
        else {
            panic!("a release of a released hold is answered")
        };
        assert_eq!((release.result, release.replayed), (2_000, true));

        let logged = log.0.lock().len();
        assert_eq!(release_all(&ledger, Some("a"), T0 + 5).count, 0);
        assert_eq!(log.0.lock().len(), logged, "releasing nothing logs nothing");
        assert_eq!(release_all(&ledger, None, T0 + 6).count, 1);
        assert_eq!(ledger.balance(&env(), T0 + 6).unwrap().reserved_milli, 0);
        assert_eq!(ledger.verify(), Ok(()));
    }

    /// A release-all names an app environment's capacity environment only when it is named itself: it
    /// releases every hold of the capacity environment, which an app environment's name does not say.
    #[test]
    fn release_all_needs_the_capacity_environment() {
        let ledger = ledger(Arc::new(Log::default()), 3_000);
        let app = EnvironmentId::new("app").unwrap();
        ledger.apply(&Command::LinkEnvironment { app_environment: app.clone(), environment: Some(env()) }, T0).unwrap();
        reserve(&ledger, "a", 1_000, T0);
        let command = Command::ReleaseAll { environment: app.clone(), agent: None };
        assert_eq!(ledger.apply(&command, T0), Err(LedgerError::NotACapacityEnvironment(app.clone())));
        let ghost = EnvironmentId::new("ghost").unwrap();
        let command = Command::ReleaseAll { environment: ghost.clone(), agent: None };
        assert_eq!(ledger.apply(&command, T0), Err(LedgerError::UnknownEnvironment(ghost)));
        assert_eq!(ledger.balance(&env(), T0).unwrap().reserved_milli, 1_000, "refusals change nothing");
        // Listing follows the link.
        assert_eq!(ledger.open_holds(&app, None, 0, 10).unwrap().holds.len(), 1);
    }

    /// The log replayed into an empty ledger releases exactly the holds the release-all released (not
    /// the one granted after it) and restores every hold's creation time.
    #[test]
    fn replay_releases_exactly_the_same_holds() {
        let log = Arc::new(Log::default());
        let ledger = ledger(log.clone(), 10_000);
        for (i, name) in ["a", "b", "a", "c", "a"].into_iter().enumerate() {
            reserve(&ledger, name, 1_000 + i as u64, T0 + i as u64);
        }
        release_all(&ledger, Some("a"), T0 + 10);
        reserve(&ledger, "a", 700, T0 + 11);

        let replayed = Ledger::new(Limits::default());
        for (seq, (now, event, levels)) in log.0.lock().iter().enumerate() {
            replayed.replay(seq as u64 + 1, *now, event, *levels).unwrap();
        }
        assert_eq!(replayed.finish_restore(), Ok(()));
        assert_eq!(all_open(&replayed), all_open(&ledger));
        assert_eq!(all_open(&replayed).iter().map(|h| h.created_at_ms).collect::<Vec<_>>(), [T0 + 1, T0 + 3, T0 + 11]);
        assert_eq!(replayed.balance(&env(), T0 + 12), ledger.balance(&env(), T0 + 12));
        assert_eq!(replayed.open_reservations(), 3);
    }

    /// A logged release-all that does not find the holds it says it released is corruption, reported
    /// before anything changes.
    #[test]
    fn a_release_all_that_does_not_fit_the_books_fails_replay() {
        let log = Arc::new(Log::default());
        let ledger = ledger(log.clone(), 10_000);
        reserve(&ledger, "a", 1_000, T0);
        reserve(&ledger, "a", 2_000, T0);
        let mut events: Vec<_> = log.0.lock().clone();
        let levels = events.last().unwrap().2;
        events.push((
            T0,
            Event::ReleasedAll { environment: env(), agent: None, through_seq: 2, count: 2, released_milli: 3_001 },
            levels,
        ));
        let replayed = Ledger::new(Limits::default());
        let last = events.len() as u64;
        for (seq, (now, event, levels)) in events.iter().enumerate().take(events.len() - 1) {
            replayed.replay(seq as u64 + 1, *now, event, *levels).unwrap();
        }
        let (now, event, levels) = events.last().unwrap();
        assert!(
            matches!(replayed.replay(last, *now, event, *levels), Err(RestoreError::Event { seq, .. }) if seq == last)
        );
        assert_eq!(replayed.balance(&env(), T0).unwrap().reserved_milli, 3_000);
    }

    /// Pages come oldest first and join up without gaps or repeats; a page filtered by agent stops after
    /// looking at `MAX_HOLDS_SCANNED_PER_PAGE` holds, short, and the next one goes on from there.
    #[test]
    fn pages_are_oldest_first_and_filtered_pages_stop_at_the_scan_limit() {
        let ledger = ledger(Arc::new(Log::default()), 100_000_000);
        let rare = reserve(&ledger, "rare", 1, T0);
        for _ in 0..MAX_HOLDS_SCANNED_PER_PAGE {
            reserve(&ledger, "busy", 1, T0);
        }
        let last = reserve(&ledger, "rare", 1, T0);

        let first = ledger.open_holds(&env(), Some(&agent("rare")), 0, 10).unwrap();
        assert_eq!(first.holds.iter().map(|h| h.reservation.clone()).collect::<Vec<_>>(), [rare]);
        assert_eq!(first.next_seq, Some(MAX_HOLDS_SCANNED_PER_PAGE as u64 + 1));
        let second = ledger.open_holds(&env(), Some(&agent("rare")), first.next_seq.unwrap(), 10).unwrap();
        assert_eq!(second.holds.iter().map(|h| h.reservation.clone()).collect::<Vec<_>>(), [last]);
        assert_eq!(second.next_seq, None);

        let mut seen = Vec::new();
        let mut from = 0;
        loop {
            let page = ledger.open_holds(&env(), None, from, 1_000).unwrap();
            seen.extend(page.holds.iter().map(|h| h.reservation.seq));
            match page.next_seq {
                Some(next) => from = next,
                None => break,
            }
        }
        assert_eq!(seen, (1..=MAX_HOLDS_SCANNED_PER_PAGE as u64 + 2).collect::<Vec<_>>());
    }

    fn allocate(ledger: &Ledger, environment: &EnvironmentId, milli: Milli) {
        let tenant = TenantId::new("t").unwrap();
        let command = Command::AllocateCapacity {
            tenant,
            environment: environment.clone(),
            amount_milli: milli,
            draw_from_tenant_pool: true,
        };
        ledger.apply(&command, T0).unwrap();
    }

    fn replayed(log: &Log) -> Ledger {
        let replayed = Ledger::new(Limits::default());
        for (seq, (now, event, levels)) in log.0.lock().iter().enumerate() {
            replayed.replay(seq as u64 + 1, *now, event, *levels).unwrap();
        }
        assert_eq!(replayed.finish_restore(), Ok(()));
        replayed
    }

    /// The sweep expires an environment's due holds under one event, oldest first, skipping holds
    /// resolved before their time and holds not yet due; what it leaves (balances, the pool, late
    /// commits and releases) is what expiring them one by one leaves, and replay restores it.
    #[test]
    fn due_holds_expire_one_event_per_environment_and_replay_alike() {
        let log = Arc::new(Log::default());
        let ledger = ledger(log.clone(), 10_000);
        let other = EnvironmentId::new("f").unwrap();
        allocate(&ledger, &other, 1_000);
        let e1 = reserve(&ledger, "a", 2_000, T0);
        let e2 = reserve(&ledger, "b", 9_000, T0 + 1);
        let committed = reserve(&ledger, "a", 500, T0 + 2);
        let later = reserve(&ledger, "a", 100, T0 + 5_000);
        let reserve_on_f = Command::Reserve {
            environment: other.clone(),
            agent: agent("c"),
            usage: Usage::Milli(700),
            idempotency_key: None,
            expires_at_ms: T0 + 60_000,
            api_key: None,
        };
        let Ok(Outcome::Reserved(on_f)) = ledger.apply(&reserve_on_f, T0) else { panic!("reserved") };
        let commit = Command::Commit { reservation: committed, usage: Usage::Milli(400), api_key: None };
        ledger.apply(&commit, T0 + 3).unwrap();
        let logged = log.0.lock().len();

        let now = T0 + 60_002;
        assert_eq!(ledger.expire_due(now, usize::MAX), 4, "the committed hold was taken and skipped");
        let events: Vec<Event> = log.0.lock()[logged..].iter().map(|(_, event, _)| event.clone()).collect();
        assert_eq!(
            events,
            [
                Event::ExpiredHolds { environment: env(), seqs: vec![e1.seq, e2.seq] },
                Event::ExpiredHolds { environment: other.clone(), seqs: vec![on_f.reservation.seq] },
            ]
        );
        assert_eq!(all_open(&ledger).iter().map(|h| h.reservation.clone()).collect::<Vec<_>>(), [later]);
        assert_eq!(ledger.balance(&env(), now).unwrap().reserved_milli, 100);
        assert_eq!(ledger.balance(&other, now).unwrap().reserved_milli, 0);
        // The allocation was taken when `later` was made: it holds its 100 in the pool.
        assert_eq!(ledger.tenant(&TenantId::new("t").unwrap(), now).unwrap().pool_reserved_milli, 100);
        assert_eq!(ledger.open_reservations(), 1);
        assert_eq!(ledger.verify(), Ok(()));
        assert_eq!(ledger.expire_due(now, usize::MAX), 0, "nothing is left due");

        // An expired hold settles as one expired one by one does: a late commit charges, a release
        // returns nothing.
        let late = Command::Commit { reservation: e1, usage: Usage::Milli(1_000), api_key: None };
        let Ok(Outcome::Committed(late)) = ledger.apply(&late, now) else { panic!("a late commit is taken") };
        assert!(late.result.late);
        let Ok(Outcome::Released(release)) = ledger.apply(&Command::Release { reservation: e2, api_key: None }, now)
        else {
            panic!("a release of an expired hold is answered")
        };
        assert_eq!(release.result, 0);

        let replayed = replayed(&log);
        assert_eq!(all_open(&replayed), all_open(&ledger));
        for environment in [env(), other] {
            assert_eq!(replayed.balance(&environment, now), ledger.balance(&environment, now));
        }
        assert_eq!(replayed.open_reservations(), 1);
    }

    /// A reservation that finds its environment full expires the overdue holds the sweep has not
    /// reached yet, logged as the sweep logs them, and is granted (a dry run before it answers alike);
    /// replay agrees. While no hold is due the refusal stands and nothing is logged.
    #[test]
    fn a_refused_reservation_first_expires_overdue_holds() {
        let log = Arc::new(Log::default());
        // 1,000 allocated and 1,000 in the pool: the first hold takes both.
        let ledger = ledger(log.clone(), 1_000);
        let first = reserve(&ledger, "a", 2_000, T0);
        let reserve_at = |now: u64| Command::Reserve {
            environment: env(),
            agent: agent("b"),
            usage: Usage::Milli(1_500),
            idempotency_key: None,
            expires_at_ms: now + 60_000,
            api_key: None,
        };
        let logged = log.0.lock().len();
        let not_due = T0 + 59_999;
        assert!(matches!(ledger.apply(&reserve_at(not_due), not_due), Err(LedgerError::QuotaDepleted { .. })));
        assert_eq!(log.0.lock().len(), logged, "a refusal logs nothing");

        let due = T0 + 60_000;
        // A dry run answers as the reservation will, expiring the hold as it would.
        let quote = ledger.dry_run(&env(), &agent("b"), &Usage::Milli(1_500), None, due).unwrap();
        assert_eq!(quote.amount_milli, 1_500);
        let Ok(Outcome::Reserved(grant)) = ledger.apply(&reserve_at(due), due) else { panic!("granted") };
        let events: Vec<Event> = log.0.lock()[logged..].iter().map(|(_, event, _)| event.clone()).collect();
        assert_eq!(events[0], Event::ExpiredHolds { environment: env(), seqs: vec![first.seq] });
        assert!(matches!(&events[1..], [Event::Reserved { reservation, .. }] if *reservation == grant.reservation));
        assert_eq!(all_open(&ledger).iter().map(|h| h.reservation.clone()).collect::<Vec<_>>(), [grant.reservation]);
        assert_eq!(ledger.balance(&env(), due).unwrap().reserved_milli, 1_500);
        assert_eq!(ledger.open_reservations(), 1);
        assert_eq!(ledger.verify(), Ok(()));
        // The sweep takes the first hold's entry and skips it.
        assert_eq!(ledger.expire_due(due, usize::MAX), 1);
        assert_eq!(log.0.lock().len(), logged + 2, "the sweep logs nothing more");

        let replayed = replayed(&log);
        assert_eq!(all_open(&replayed), all_open(&ledger));
        assert_eq!(replayed.balance(&env(), due), ledger.balance(&env(), due));
    }

    /// Only the `OVERDUE_HOLDS_EXAMINED` oldest holds are looked through: an overdue hold behind that
    /// many longer-lived ones is left to the sweep, and the reservation is refused.
    #[test]
    fn a_refused_reservation_examines_only_the_oldest_holds() {
        for (older, granted) in [(OVERDUE_HOLDS_EXAMINED - 1, true), (OVERDUE_HOLDS_EXAMINED, false)] {
            let ledger = ledger(Arc::new(Log::default()), 100_000);
            let hold = |milli: Milli, ttl_ms: u64| Command::Reserve {
                environment: env(),
                agent: agent("a"),
                usage: Usage::Milli(milli),
                idempotency_key: None,
                expires_at_ms: T0 + ttl_ms,
                api_key: None,
            };
            for _ in 0..older {
                ledger.apply(&hold(1, 3_600_000), T0).unwrap();
            }
            // The rest of the allocation and the pool, due at T0 + 60 s.
            ledger.apply(&hold(200_000 - older as Milli, 60_000), T0).unwrap();
            let result = ledger.apply(&hold(1_000, 120_000), T0 + 60_000);
            assert_eq!(result.is_ok(), granted, "{older} older holds: {result:?}");
            assert_eq!(ledger.verify(), Ok(()));
        }
    }

    /// A sweep takes at most `max` holds from the queue; fewer than `max` means none is left due.
    #[test]
    fn a_sweep_takes_at_most_max() {
        let ledger = ledger(Arc::new(Log::default()), 10_000);
        for i in 0..5 {
            reserve(&ledger, "a", 100, T0 + i);
        }
        let now = T0 + 60_010;
        assert_eq!([2, 2, 1, 0].map(|_| ledger.expire_due(now, 2)), [2, 2, 1, 0]);
        assert_eq!(ledger.open_reservations(), 0);
    }

    /// A logged expiry naming a hold that is not open, or one twice, is corruption, found before any
    /// hold expires.
    #[test]
    fn an_expiry_naming_a_hold_not_open_fails_replay_and_changes_nothing() {
        let log = Arc::new(Log::default());
        let ledger = ledger(log.clone(), 10_000);
        let open = reserve(&ledger, "a", 1_000, T0);
        let replayed = replayed(&log);
        let (now, _, levels) = log.0.lock().last().cloned().unwrap();
        let seq = log.0.lock().len() as u64 + 1;
        // Not open, and open but listed twice: a repeat would pass a check of each alone.
        for seqs in [vec![open.seq, open.seq + 1], vec![open.seq, open.seq]] {
            let event = Event::ExpiredHolds { environment: env(), seqs };
            assert!(matches!(replayed.replay(seq, now, &event, levels), Err(RestoreError::Event { .. })));
        }
        assert_eq!(all_open(&replayed), all_open(&ledger));
        assert_eq!(replayed.balance(&env(), now), ledger.balance(&env(), now));
    }
}
