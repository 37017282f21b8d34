//! The batch calls of `quota.v1.Quota` (`CheckAndReserveBatch`, `CommitBatch`, `ReleaseBatch`), for
//! gateways that multiplex many agents' calls. Each item is validated as its unary call validates it;
//! the valid ones go to [`Ledger::apply_batch`](crate::ledger::Ledger::apply_batch) together, in request
//! order and at one instant, and the call waits once for the log to hold all of their changes. An item's
//! refusal is its own result, the very `google.rpc.Status` the unary call answers with; only the size of
//! the batch and the log fail a whole call.
//!
//! What a batch saves is what surrounds the items: one call's transport, authentication, span, clock
//! read, log health check and wait for durability for all of them, the environment's lock and key scope
//! check once for consecutive items on one environment (see the ledger's batches), and no `.await` per
//! item. Each item still costs its validation, its decision, its log record and its answer.

use tonic::Status;
use tracing::{Span, instrument};

use super::{
    Context, Refusal,
    convert::{self, Zero},
    status::{self, FieldError},
};
use crate::{
    ledger::{AgentId, ApiKeyId, Command, EnvironmentId, IdError, LedgerError, Outcome, Quote, Usage},
    proto::{
        self, CheckAndReserveRequest, CommitRequest, ReleaseRequest, check_and_reserve_result, commit_result,
        release_result,
    },
};

/// The most items one batch call carries. A result takes at most about 2 KiB (a refusal's message and
/// `BadRequest` description are bounded to 1 KiB each), so a full batch's answer stays within what
/// gRPC clients accept by default (4 MiB).
pub const MAX_BATCH_ITEMS: usize = 1_000;

/// Refuses a batch that is empty or holds more than [`MAX_BATCH_ITEMS`], before any item is looked at.
fn check_size(items: usize) -> Result<(), FieldError> {
    if items == 0 {
        return Err(FieldError::new("items", format!("is empty; a batch holds 1 to {MAX_BATCH_ITEMS} items")));
    }
    if items > MAX_BATCH_ITEMS {
        return Err(FieldError::new("items", format!("has {items} items; the limit is {MAX_BATCH_ITEMS} items")));
    }
    Ok(())
}

/// What an item comes to once validated, in request order.
enum Planned<Q> {
    /// Applied with the batch's other commands (the next one of them, in order).
    Apply,
    /// Answered without changing anything: a dry run.
    Quote(Q),
    /// Refused before it reached the ledger.
    Refused(Refusal),
}

/// The inputs of a dry run, validated.
struct DryRun {
    environment: EnvironmentId,
    agent: AgentId,
    usage: Usage,
}

/// What an item's answer is made from.
enum Answer {
    Applied(Outcome),
    Quoted(Quote),
}

/// The last id parsed for a field, reused while consecutive items repeat it: a gateway's batch often
/// names one environment and agent many times over, and each parse allocates.
struct Repeated<T> {
    last: Option<T>,
}

impl<T: Clone> Repeated<T> {
    fn new() -> Self {
        Self { last: None }
    }

    fn parse(
        &mut self,
        field: &str,
        value: &str,
        parse: fn(&str) -> Result<T, IdError>,
        text: fn(&T) -> &str,
    ) -> Result<T, FieldError> {
        if let Some(last) = &self.last
            && text(last) == value
        {
            return Ok(last.clone());
        }
        let id = convert::id(field, value, parse)?;
        self.last = Some(id.clone());
        Ok(id)
    }
}

impl Context {
    /// Whether the log is failing: a batch with changes to make is then refused whole, as a unary call
    /// is, before anything is applied.
    fn log_failing(&self) -> bool {
        self.store.as_ref().is_some_and(|store| !store.journal().is_healthy())
    }

    /// Waits once for the log to hold every change applied so far, the batch's included.
    async fn wait_durable(&self) -> Result<(), Status> {
        match &self.store {
            Some(store) => store.wait_durable().await.map_err(|_| status::log_unavailable()),
            None => Ok(()),
        }
    }

    /// Applies the planned commands in order, answering dry runs where they stand among them: the
    /// commands before a dry run are applied before it is quoted, so that it sees the state the unary
    /// calls in that order would. Returns the answers of the items that are not `Refused`, in order.
    fn decide<Q>(
        &self,
        plan: &[Planned<Q>],
        commands: &[Command],
        now: u64,
        quote: impl Fn(&Q) -> Result<Quote, LedgerError>,
    ) -> Vec<Result<Answer, LedgerError>> {
        let mut answers = Vec::with_capacity(plan.len());
        let mut applied = 0;
        let mut pending = 0;
        for item in plan {
            match item {
                Planned::Apply => pending += 1,
                Planned::Quote(dry_run) => {
                    let outcomes = self.ledger.apply_batch(&commands[applied..applied + pending], now);
                    answers.extend(outcomes.into_iter().map(|outcome| outcome.map(Answer::Applied)));
                    (applied, pending) = (applied + pending, 0);
                    answers.push(quote(dry_run).map(Answer::Quoted));
                }
                Planned::Refused(_) => {}
            }
        }
        let outcomes = self.ledger.apply_batch(&commands[applied..applied + pending], now);
        answers.extend(outcomes.into_iter().map(|outcome| outcome.map(Answer::Applied)));
        answers
    }
}

/// The result of each item in request order: its refusal from `plan`, or its answer from `answers`.
fn merged<Q>(
    plan: Vec<Planned<Q>>,
    answers: Vec<Result<Answer, LedgerError>>,
) -> impl Iterator<Item = Result<Answer, Refusal>> {
    let mut answers = answers.into_iter();
    plan.into_iter().map(move |item| match item {
        Planned::Refused(refusal) => Err(refusal),
        Planned::Apply | Planned::Quote(_) => {
            answers.next().expect("one answer per item that is not refused").map_err(Refusal::Ledger)
        }
    })
}

/// Whether an item's answer is a change the log must hold before the call is answered (a retry's
/// answer repeats one, which it must hold too).
fn applied<T>(result: &Result<Answer, T>) -> bool {
    matches!(result, Ok(Answer::Applied(_)))
}

/// A refusal as an item's `error`: the status the unary call would answer with, as it travels.
fn item_error(refusal: Refusal) -> tonic_types::pb::Status {
    status::item_error(&Status::from(refusal))
}

/// Validates a reservation item as CheckAndReserve does, field by field in the same order, so that an
/// item with several bad fields is refused for the same one.
struct Reservations<'a> {
    context: &'a Context,
    api_key: Option<&'a ApiKeyId>,
    now: u64,
    environments: Repeated<EnvironmentId>,
    agents: Repeated<AgentId>,
}

impl Reservations<'_> {
    /// The item's plan; a reservation's command goes to `commands`.
    fn plan(&mut self, request: &CheckAndReserveRequest, commands: &mut Vec<Command>) -> Planned<DryRun> {
        match self.validate(request) {
            Ok(Validated::Reserve(command)) => {
                commands.push(command);
                Planned::Apply
            }
            Ok(Validated::DryRun(dry_run)) => Planned::Quote(dry_run),
            Err(error) => Planned::Refused(error.into()),
        }
    }

    fn validate(&mut self, request: &CheckAndReserveRequest) -> Result<Validated, FieldError> {
        let policy = &self.context.policy;
        let environment = self.environments.parse(
            "environment_id",
            &request.environment_id,
            EnvironmentId::new,
            EnvironmentId::as_str,
        )?;
        let agent = self.agents.parse("agent_id", &request.agent_id, AgentId::new, AgentId::as_str)?;
        let usage = policy.usage(request.messages, &request.usage, Zero::Refused)?;
        let idempotency_key = convert::idempotency_key("idempotency_key", &request.idempotency_key)?;
        let ttl_ms = policy.ttl_ms(request.ttl_seconds)?;
        if request.dry_run {
            return Ok(Validated::DryRun(DryRun { environment, agent, usage }));
        }
        let api_key = self.api_key.cloned();
        let expires_at_ms = self.now.saturating_add(ttl_ms);
        Ok(Validated::Reserve(Command::Reserve { environment, agent, usage, idempotency_key, expires_at_ms, api_key }))
    }
}

/// A valid reservation item.
enum Validated {
    Reserve(Command),
    DryRun(DryRun),
}

/// Counts an item of a reservation batch as CheckAndReserve counts its call: a new hold as granted, a
/// refusal by its reason; dry runs hold nothing and are not counted.
fn count_reservation(
    context: &Context,
    request: &CheckAndReserveRequest,
    api_key: Option<&ApiKeyId>,
    result: &Result<Answer, Refusal>,
) {
    match result {
        Ok(Answer::Applied(Outcome::Reserved(grant))) if !grant.replayed => {
            context.metrics.reservation_granted(&grant.balance.tenant);
        }
        Ok(_) => {}
        Err(_) if request.dry_run => {}
        Err(refusal) => context.count_refused_reservation(refusal.reason(), &request.environment_id, api_key),
    }
}

#[instrument(
    level = "debug",
    name = "CheckAndReserveBatch",
    skip_all,
    fields(rpc = "quota.v1.Quota/CheckAndReserveBatch", api_key, items, granted, refused)
)]
pub async fn check_and_reserve(
    context: &Context,
    api_key: Option<ApiKeyId>,
    items: Vec<CheckAndReserveRequest>,
) -> Result<proto::CheckAndReserveBatchResponse, Status> {
    record_call(&items, api_key.as_ref());
    check_size(items.len())?;
    let now = context.clock.now_ms();
    let api_key = api_key.as_ref();
    let mut reservations =
        Reservations { context, api_key, now, environments: Repeated::new(), agents: Repeated::new() };
    let mut commands = Vec::with_capacity(items.len());
    let plan: Vec<_> = items.iter().map(|item| reservations.plan(item, &mut commands)).collect();
    let count = |item, result: &_| count_reservation(context, item, api_key, result);
    if !commands.is_empty() && context.log_failing() {
        // Each item counts as its own call would: refused for its bad field, or up front for the log.
        for (item, planned) in items.iter().zip(plan) {
            match planned {
                Planned::Apply => count(item, &Err(Refusal::LogUnavailable)),
                Planned::Refused(refusal) => count(item, &Err(refusal)),
                Planned::Quote(_) => {}
            }
        }
        return Err(status::log_unavailable());
    }
    let dry_run = |d: &DryRun| context.ledger.dry_run(&d.environment, &d.agent, &d.usage, api_key, now);
    let answers = context.decide(&plan, &commands, now, dry_run);
    let results: Vec<_> = merged(plan, answers).collect();
    for (item, result) in items.iter().zip(&results) {
        count(item, result);
    }
    if results.iter().any(applied)
        && let Err(unavailable) = context.wait_durable().await
    {
        // Each change happened and was counted; its item is answered UNAVAILABLE, as its call would be.
        for (item, _) in items.iter().zip(&results).filter(|(_, result)| applied(result)) {
            count(item, &Err(Refusal::LogUnavailable));
        }
        return Err(unavailable);
    }
    record_outcomes("granted", &results);
    Ok(proto::CheckAndReserveBatchResponse { results: results.into_iter().map(reservation_result).collect() })
}

fn reservation_result(result: Result<Answer, Refusal>) -> proto::CheckAndReserveResult {
    use check_and_reserve_result::Outcome as Item;
    let outcome = match result {
        Ok(Answer::Applied(Outcome::Reserved(grant))) => Item::Ok(convert::granted(grant)),
        Ok(Answer::Quoted(quote)) => Item::Ok(convert::quoted(quote)),
        Ok(Answer::Applied(_)) => unreachable!("a reservation yields a grant"),
        Err(refusal) => Item::Error(item_error(refusal)),
    };
    proto::CheckAndReserveResult { outcome: Some(outcome) }
}

/// Validates and applies settlements (commits or releases), counts what they charged, and waits once for
/// the log: what `CommitBatch` and `ReleaseBatch` share. Returns each item's outcome or refusal.
async fn settle<R>(
    context: &Context,
    items: &[R],
    validate: impl Fn(&R) -> Result<Command, Refusal>,
) -> Result<Vec<Result<Outcome, Refusal>>, Status> {
    check_size(items.len())?;
    let mut commands = Vec::with_capacity(items.len());
    let plan: Vec<Planned<()>> = items
        .iter()
        .map(|item| match validate(item) {
            Ok(command) => {
                commands.push(command);
                Planned::Apply
            }
            Err(refusal) => Planned::Refused(refusal),
        })
        .collect();
    if !commands.is_empty() && context.log_failing() {
        return Err(status::log_unavailable());
    }
    let no_dry_runs = |_: &()| unreachable!("settlements have no dry runs");
    let answers = context.decide(&plan, &commands, context.clock.now_ms(), no_dry_runs);
    let results: Vec<_> = merged(plan, answers).collect();
    for result in &results {
        if let Ok(Answer::Applied(Outcome::Committed(settled))) = result
            && !settled.replayed
        {
            let settlement = &settled.result;
            context.metrics.committed(&settled.balance.tenant, &settlement.charged, settlement.overage_milli);
        }
    }
    if results.iter().any(applied) {
        context.wait_durable().await?;
    }
    record_outcomes("settled", &results);
    let settled = |result| match result {
        Ok(Answer::Applied(outcome)) => Ok(outcome),
        Ok(Answer::Quoted(_)) => unreachable!("settlements have no dry runs"),
        Err(refusal) => Err(refusal),
    };
    Ok(results.into_iter().map(settled).collect())
}

#[instrument(
    level = "debug",
    name = "CommitBatch",
    skip_all,
    fields(rpc = "quota.v1.Quota/CommitBatch", api_key, items, settled, refused)
)]
pub async fn commit(
    context: &Context,
    api_key: Option<ApiKeyId>,
    items: Vec<CommitRequest>,
) -> Result<proto::CommitBatchResponse, Status> {
    record_call(&items, api_key.as_ref());
    let validate = |item: &CommitRequest| {
        let reservation = convert::reservation_id(&item.reservation_id)?;
        let usage = context.policy.usage(item.messages, &item.usage, Zero::Allowed)?;
        Ok(Command::Commit { reservation, usage, api_key: api_key.clone() })
    };
    let results = settle(context, &items, validate).await?;
    let results = results
        .into_iter()
        .map(|result| {
            let outcome = match result {
                Ok(Outcome::Committed(settled)) => commit_result::Outcome::Ok(convert::committed(settled)),
                Ok(_) => unreachable!("a commit yields a settlement"),
                Err(refusal) => commit_result::Outcome::Error(item_error(refusal)),
            };
            proto::CommitResult { outcome: Some(outcome) }
        })
        .collect();
    Ok(proto::CommitBatchResponse { results })
}

#[instrument(
    level = "debug",
    name = "ReleaseBatch",
    skip_all,
    fields(rpc = "quota.v1.Quota/ReleaseBatch", api_key, items, settled, refused)
)]
pub async fn release(
    context: &Context,
    api_key: Option<ApiKeyId>,
    items: Vec<ReleaseRequest>,
) -> Result<proto::ReleaseBatchResponse, Status> {
    record_call(&items, api_key.as_ref());
    let validate = |item: &ReleaseRequest| {
        let reservation = convert::reservation_id(&item.reservation_id)?;
        Ok(Command::Release { reservation, api_key: api_key.clone() })
    };
    let results = settle(context, &items, validate).await?;
    let results = results
        .into_iter()
        .map(|result| {
            let outcome = match result {
                Ok(Outcome::Released(settled)) => release_result::Outcome::Ok(convert::released(settled)),
                Ok(_) => unreachable!("a release yields a settlement"),
                Err(refusal) => release_result::Outcome::Error(item_error(refusal)),
            };
            proto::ReleaseResult { outcome: Some(outcome) }
        })
        .collect();
    Ok(proto::ReleaseBatchResponse { results })
}

/// Records the item count and the caller's key on the call's span.
fn record_call<R>(items: &[R], api_key: Option<&ApiKeyId>) {
    let span = Span::current();
    span.record("items", items.len());
    if let Some(id) = api_key {
        span.record("api_key", id.as_str());
    }
}

/// Records on the call's span how many items were answered (under `ok_field`) and how many refused.
fn record_outcomes<T, E>(ok_field: &str, results: &[Result<T, E>]) {
    let ok = results.iter().filter(|result| result.is_ok()).count();
    Span::current().record(ok_field, ok).record("refused", results.len() - ok);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_item_count_limit_is_inclusive() {
        assert_eq!(check_size(0).unwrap_err().field, "items");
        assert!(check_size(1).is_ok());
        assert!(check_size(MAX_BATCH_ITEMS - 1).is_ok());
        assert!(check_size(MAX_BATCH_ITEMS).is_ok());
        let over = check_size(MAX_BATCH_ITEMS + 1).unwrap_err();
        assert_eq!(over.field, "items");
        assert_eq!(over.description, "has 1001 items; the limit is 1000 items");
    }

    #[test]
    fn a_repeated_id_is_parsed_once_and_a_new_one_replaces_it() {
        let mut environments = Repeated::new();
        let mut parse =
            |value: &str| environments.parse("environment_id", value, EnvironmentId::new, EnvironmentId::as_str);
        let first = parse("env-a").unwrap();
        let again = parse("env-a").unwrap();
        assert!(std::ptr::eq(first.as_str(), again.as_str()), "the same id, not a new one");
        assert_eq!(parse("env-b").unwrap().as_str(), "env-b");
        assert_eq!(parse("").unwrap_err().field, "environment_id");
        assert_eq!(parse("env-b").unwrap().as_str(), "env-b", "a refused value leaves the last id");
    }
}
