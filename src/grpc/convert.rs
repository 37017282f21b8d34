//! Requests to validated domain values, and domain values to responses. Every bad field becomes a
//! [`FieldError`] naming the field and the limit, before anything reaches the ledger.

use std::fmt;

use super::{Policy, Refusal, status::FieldError};
use crate::{
    ledger::{
        Balance, BalanceState, Draws, Grant, IdError, IdempotencyKey, MAX_ID_BYTES, MILLI_PER_MESSAGE, Milli, Quote,
        ReservationId, ReservationIdError, Settled, Settlement, Source, Usage, UsageItem,
    },
    proto,
};

/// An id as a client sent it, for a span field before it is validated: as is when it is printable
/// ASCII within the id length limit (every valid id is), otherwise quoted with escapes and cut to that
/// limit, so that no request puts control characters or kilobytes into a log line.
pub struct LogId<'a>(pub &'a str);

impl fmt::Display for LogId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.0;
        if id.len() <= MAX_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic()) {
            return f.write_str(id);
        }
        let cut = (0..=MAX_ID_BYTES.min(id.len())).rev().find(|at| id.is_char_boundary(*at)).unwrap_or(0);
        write!(f, "{:?}", &id[..cut])?;
        if cut < id.len() { f.write_str("...") } else { Ok(()) }
    }
}

/// Parses a required id field.
pub fn id<T>(field: &str, value: &str, parse: fn(&str) -> Result<T, IdError>) -> Result<T, FieldError> {
    parse(value).map_err(|e| FieldError::new(field, e.to_string()))
}

/// Parses an optional idempotency key: empty means none.
pub fn idempotency_key(field: &str, value: &str) -> Result<Option<IdempotencyKey>, FieldError> {
    if value.is_empty() { Ok(None) } else { id(field, value, IdempotencyKey::new).map(Some) }
}

/// Parses a reservation id; a well-formed id this server never issued is NOT_FOUND.
pub fn reservation_id(value: &str) -> Result<ReservationId, Refusal> {
    ReservationId::parse(value).map_err(|e| match e {
        ReservationIdError::Invalid(e) => FieldError::new("reservation_id", e.to_string()).into(),
        ReservationIdError::Unknown => crate::ledger::LedgerError::UnknownReservation(value.to_owned()).into(),
    })
}

/// Whether an amount of zero is a valid request (a commit of nothing used) or not (a reservation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zero {
    Allowed,
    Refused,
}

impl Policy {
    /// What a request that carries exactly one of `messages` and `usage` is for. Usage items are
    /// checked here for their count and quantities; the ledger prices them, with the rate card
    /// version that applies, and refuses unknown scenarios.
    pub fn usage(&self, messages: Option<u64>, usage: &[proto::UsageItem], zero: Zero) -> Result<Usage, FieldError> {
        let max_messages = self.max_amount_milli / MILLI_PER_MESSAGE;
        match (messages, usage.is_empty()) {
            (Some(_), false) => Err(FieldError::new("messages", "set exactly one of messages and usage; both are set")),
            (None, true) => Err(FieldError::new("messages", "set exactly one of messages and usage; neither is set")),
            (Some(0), true) if zero == Zero::Refused => Err(FieldError::new("messages", "must be at least 1")),
            (Some(messages), true) => messages
                .checked_mul(MILLI_PER_MESSAGE)
                .filter(|milli| *milli <= self.max_amount_milli)
                .map(Usage::Milli)
                .ok_or_else(|| {
                    FieldError::new("messages", format!("is {messages}; the limit is {max_messages} messages"))
                }),
            (None, false) => self.usage_items(usage),
        }
    }

    fn usage_items(&self, usage: &[proto::UsageItem]) -> Result<Usage, FieldError> {
        if usage.len() > self.max_usage_items {
            return Err(FieldError::new(
                "usage",
                format!("has {} items; the limit is {} items", usage.len(), self.max_usage_items),
            ));
        }
        let items = usage
            .iter()
            .enumerate()
            .map(|(index, item)| {
                if item.quantity == 0 {
                    return Err(FieldError::new(format!("usage[{index}].quantity"), "must be at least 1"));
                }
                Ok(UsageItem { scenario: item.scenario.clone(), quantity: item.quantity })
            })
            .collect::<Result<_, _>>()?;
        Ok(Usage::Items(items))
    }

    /// A hold's lifetime in milliseconds; 0 asks for the default.
    pub fn ttl_ms(&self, ttl_seconds: u32) -> Result<u64, FieldError> {
        let seconds = match ttl_seconds {
            0 => self.default_ttl_seconds,
            s if s > self.max_ttl_seconds => {
                return Err(FieldError::new(
                    "ttl_seconds",
                    format!(
                        "is {s}; the limit is {} seconds (0 = the default of {} seconds)",
                        self.max_ttl_seconds, self.default_ttl_seconds
                    ),
                ));
            }
            s => s,
        };
        Ok(u64::from(seconds) * 1_000)
    }

    pub fn purchase_milli(&self, packs: u64) -> Result<Milli, FieldError> {
        if packs == 0 || packs > self.max_packs_per_purchase {
            return Err(FieldError::new(
                "packs",
                format!("is {packs}; it must be between 1 and {} packs", self.max_packs_per_purchase),
            ));
        }
        Ok(packs * self.pack_milli)
    }

    pub fn budget_milli(&self, messages: u64) -> Result<Milli, FieldError> {
        messages.checked_mul(MILLI_PER_MESSAGE).filter(|milli| *milli <= self.max_budget_milli).ok_or_else(|| {
            FieldError::new(
                "monthly_budget_messages",
                format!("is {messages}; the limit is {} messages", self.max_budget_milli / MILLI_PER_MESSAGE),
            )
        })
    }
}

/// An allocation in whole messages, to milli; the ledger checks it against purchases.
pub fn allocation_milli(messages: u64) -> Result<Milli, FieldError> {
    messages.checked_mul(MILLI_PER_MESSAGE).ok_or_else(|| {
        FieldError::new("messages", format!("is {messages}; the limit is {} messages", u64::MAX / MILLI_PER_MESSAGE))
    })
}

/// What CheckAndReserve answers for a grant (a new hold or an idempotent retry's first one).
pub fn granted(grant: Grant) -> proto::CheckAndReserveResponse {
    proto::CheckAndReserveResponse {
        reservation_id: reservation_text(&grant.reservation),
        reserved_milli: grant.amount_milli,
        draws: draws(&grant.draws),
        expires_at_unix_ms: grant.expires_at_ms,
        balance: Some(balance(grant.balance)),
    }
}

/// A reservation id as its `Display` writes it (`<environment>/<seq>`), built into one allocation of
/// the right size: every grant answers with one, and `to_string` formats it through `fmt` in pieces.
fn reservation_text(id: &ReservationId) -> String {
    let environment = id.environment.as_str();
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut seq = id.seq;
    loop {
        start -= 1;
        digits[start] = b'0' + (seq % 10) as u8;
        seq /= 10;
        if seq == 0 {
            break;
        }
    }
    let mut text = String::with_capacity(environment.len() + 1 + digits.len() - start);
    text.push_str(environment);
    text.push('/');
    text.extend(digits[start..].iter().map(|digit| char::from(*digit)));
    text
}

/// What CheckAndReserve answers for a dry run: no reservation id, no expiry.
pub fn quoted(quote: Quote) -> proto::CheckAndReserveResponse {
    proto::CheckAndReserveResponse {
        reservation_id: String::new(),
        reserved_milli: quote.amount_milli,
        draws: draws(&quote.draws),
        expires_at_unix_ms: 0,
        balance: Some(balance(quote.balance)),
    }
}

pub fn committed(settled: Settled<Settlement>) -> proto::CommitResponse {
    let settlement = settled.result;
    proto::CommitResponse {
        charged_milli: settlement.charged.total(),
        draws: draws(&settlement.charged),
        released_milli: settlement.released_milli,
        overage_milli: settlement.overage_milli,
        late: settlement.late,
        balance: Some(balance(settled.balance)),
    }
}

pub fn released(settled: Settled<Milli>) -> proto::ReleaseResponse {
    proto::ReleaseResponse { released_milli: settled.result, balance: Some(balance(settled.balance)) }
}

pub fn draws(draws: &Draws) -> Vec<proto::Draw> {
    draws.iter().map(|(source, amount_milli)| proto::Draw { source: source_of(source) as i32, amount_milli }).collect()
}

pub fn source_of(source: Source) -> proto::Source {
    match source {
        Source::EnvironmentAllocation => proto::Source::EnvironmentAllocation,
        Source::TenantPool => proto::Source::TenantPool,
        Source::PayAsYouGo => proto::Source::PayAsYouGo,
    }
}

pub fn balance(balance: Balance) -> proto::Balance {
    let state = match balance.state {
        BalanceState::Ok => proto::State::Ok,
        BalanceState::Low => proto::State::Low,
        BalanceState::Depleted => proto::State::Depleted,
    };
    proto::Balance {
        // `as_str` copies the bytes once; `to_string` would go through `fmt`.
        environment_id: balance.environment.as_str().to_owned(),
        tenant_id: balance.tenant.as_str().to_owned(),
        allocated_milli: balance.allocated_milli,
        allocation_used_milli: balance.allocation_used_milli,
        tenant_pool_used_milli: balance.tenant_pool_used_milli,
        payg_enabled: balance.payg_enabled,
        payg_budget_milli: balance.payg_budget_milli,
        payg_used_milli: balance.payg_used_milli,
        reserved_milli: balance.reserved_milli,
        overage_milli: balance.overage_milli,
        available_milli: balance.available_milli,
        state: state as i32,
        period: balance.period,
        draw_from_tenant_pool: balance.draw_from_tenant_pool,
        low_percent: balance.low_percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn usage(items: &[(&str, u64)]) -> Vec<proto::UsageItem> {
        items.iter().map(|(s, q)| proto::UsageItem { scenario: s.to_string(), quantity: *q }).collect()
    }

    #[test]
    fn ids_are_logged_as_sent_unless_unprintable_or_too_long() {
        let log = |id: &str| LogId(id).to_string();
        assert_eq!(log("acme-prod"), "acme-prod");
        assert_eq!(log(""), "");
        let longest = "a".repeat(MAX_ID_BYTES);
        assert_eq!(log(&longest), longest);
        assert_eq!(log(&"a".repeat(MAX_ID_BYTES + 1)), format!("\"{longest}\"..."));
        assert_eq!(log("a\nb"), "\"a\\nb\"");
        assert_eq!(log(&"é".repeat(MAX_ID_BYTES)), format!("\"{}\"...", "é".repeat(MAX_ID_BYTES / 2)));
    }

    #[test]
    fn reservation_ids_are_answered_as_displayed() {
        for seq in [0, 1, 9, 10, 42, 1_000_000, u64::MAX] {
            let id = ReservationId { environment: crate::ledger::EnvironmentId::new("org/env-1").unwrap(), seq };
            assert_eq!(reservation_text(&id), id.to_string());
        }
    }

    #[test]
    fn amount_needs_exactly_one_of_messages_and_usage() {
        let policy = Config::default().policy;
        let field = |r: Result<Usage, FieldError>| r.unwrap_err().field;
        assert_eq!(field(policy.usage(Some(1), &usage(&[("classic_answer", 1)]), Zero::Refused)), "messages");
        assert_eq!(field(policy.usage(None, &[], Zero::Refused)), "messages");
        assert_eq!(field(policy.usage(Some(0), &[], Zero::Refused)), "messages");
        assert_eq!(policy.usage(Some(0), &[], Zero::Allowed), Ok(Usage::Milli(0)));
        let items = vec![UsageItem { scenario: "agent_flow_actions".into(), quantity: 1 }];
        assert_eq!(policy.usage(None, &usage(&[("agent_flow_actions", 1)]), Zero::Refused), Ok(Usage::Items(items)));
    }

    #[test]
    fn amount_limits_are_inclusive() {
        let policy = Config::default().policy;
        let max = policy.max_amount_milli / MILLI_PER_MESSAGE;
        assert!(policy.usage(Some(max - 1), &[], Zero::Refused).is_ok());
        assert!(policy.usage(Some(max), &[], Zero::Refused).is_ok());
        let err = policy.usage(Some(max + 1), &[], Zero::Refused).unwrap_err();
        assert!(err.description.contains("limit is 1000000000 messages"), "{err:?}");
        assert!(policy.usage(Some(u64::MAX), &[], Zero::Refused).is_err());
    }

    #[test]
    fn usage_item_count_limit_is_inclusive() {
        let policy = Config::default().policy;
        let n = policy.max_usage_items;
        assert!(policy.usage(None, &usage(&vec![("classic_answer", 1); n - 1]), Zero::Refused).is_ok());
        assert!(policy.usage(None, &usage(&vec![("classic_answer", 1); n]), Zero::Refused).is_ok());
        let err = policy.usage(None, &usage(&vec![("classic_answer", 1); n + 1]), Zero::Refused).unwrap_err();
        assert_eq!(err.field, "usage");
        let err = policy.usage(None, &usage(&[("classic_answer", 1), ("x", 0)]), Zero::Refused).unwrap_err();
        assert_eq!(err.field, "usage[1].quantity");
    }

    #[test]
    fn ttl_limit_is_inclusive_and_zero_means_default() {
        let policy = Config::default().policy;
        assert_eq!(policy.ttl_ms(0), Ok(60_000));
        assert_eq!(policy.ttl_ms(3_599), Ok(3_599_000));
        assert_eq!(policy.ttl_ms(3_600), Ok(3_600_000));
        assert_eq!(policy.ttl_ms(3_601).unwrap_err().field, "ttl_seconds");
    }

    #[test]
    fn pack_count_limit_is_inclusive() {
        let policy = Config::default().policy;
        assert!(policy.purchase_milli(0).is_err());
        assert!(policy.purchase_milli(999_999).is_ok());
        assert!(policy.purchase_milli(1_000_000).is_ok());
        assert_eq!(policy.purchase_milli(1_000_001).unwrap_err().field, "packs");
    }
}
