//! `QuotaAdmin` calls about open holds: listing them and releasing them at once.

use tonic::Status;

use super::{Context, convert, status::FieldError};
use crate::{
    ledger::{AgentId, Command, EnvironmentId, MAX_HOLDS_SCANNED_PER_PAGE, OpenHold, Outcome},
    proto,
};

/// Holds per page when the request leaves `page_size` at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The largest `page_size`, as the contract states.
pub const MAX_PAGE_SIZE: u32 = 1_000;

const _: () = assert!(DEFAULT_PAGE_SIZE <= MAX_PAGE_SIZE);
// An unfiltered page must never come back short.
const _: () = assert!(MAX_PAGE_SIZE as usize <= MAX_HOLDS_SCANNED_PER_PAGE);

pub fn list_reservations(
    context: &Context,
    request: proto::ListReservationsRequest,
) -> Result<proto::ListReservationsResponse, Status> {
    let environment = convert::id("environment_id", &request.environment_id, EnvironmentId::new)?;
    let agent = optional_agent(&request.agent_id)?;
    let page_size = page_size(request.page_size)?;
    let from_seq = page_start(&request.page_token)?;
    let page = context.ledger.open_holds(&environment, agent.as_ref(), from_seq, page_size)?;
    // The page is a copy: the response is built with no lock held.
    Ok(proto::ListReservationsResponse {
        reservations: page.holds.into_iter().map(reservation).collect(),
        next_page_token: page.next_seq.map(|seq| seq.to_string()).unwrap_or_default(),
    })
}

pub async fn release_all(
    context: &Context,
    request: proto::ReleaseAllRequest,
) -> Result<proto::ReleaseAllResponse, Status> {
    let environment = convert::id("environment_id", &request.environment_id, EnvironmentId::new)?;
    let agent = optional_agent(&request.agent_id)?;
    let command = Command::ReleaseAll { environment, agent };
    let Outcome::ReleasedAll(summary) = context.execute(&command).await? else {
        unreachable!("a release-all yields a summary")
    };
    tracing::info!(released_count = summary.count, released_milli = summary.released_milli, "holds released");
    Ok(proto::ReleaseAllResponse {
        released_count: summary.count,
        released_milli: summary.released_milli,
        balance: Some(convert::balance(summary.balance)),
    })
}

/// An optional agent id: empty means every agent.
fn optional_agent(value: &str) -> Result<Option<AgentId>, FieldError> {
    if value.is_empty() { Ok(None) } else { convert::id("agent_id", value, AgentId::new).map(Some) }
}

pub(super) fn page_size(requested: u32) -> Result<usize, FieldError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        size if size > MAX_PAGE_SIZE => Err(FieldError::new(
            "page_size",
            format!("is {size}; the limit is {MAX_PAGE_SIZE} (0 = the default of {DEFAULT_PAGE_SIZE})"),
        )),
        size => Ok(size as usize),
    }
}

/// The sequence number a page token stands for; the first page starts at the beginning. Tokens are the
/// decimal sequence number of the next hold to look at, but clients are told only to pass them back.
fn page_start(token: &str) -> Result<u64, FieldError> {
    if token.is_empty() {
        return Ok(0);
    }
    let digits = token.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| token.parse::<u64>().ok()).flatten().ok_or_else(|| {
        FieldError::new(
            "page_token",
            "is not a token this server issued: pass the previous response's next_page_token, or nothing for \
             the first page",
        )
    })
}

fn reservation(hold: OpenHold) -> proto::Reservation {
    proto::Reservation {
        reservation_id: hold.reservation.to_string(),
        agent_id: hold.agent.to_string(),
        reserved_milli: hold.amount_milli,
        draws: convert::draws(&hold.draws),
        created_at_unix_ms: hold.created_at_ms,
        expires_at_unix_ms: hold.expires_at_ms,
        rate_card_version: hold.rate_card_version,
        api_key_id: hold.api_key.map(String::from).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_limit_is_inclusive_and_zero_means_default() {
        assert_eq!(page_size(0), Ok(100));
        assert_eq!(page_size(999), Ok(999));
        assert_eq!(page_size(1_000), Ok(1_000));
        let error = page_size(1_001).unwrap_err();
        assert_eq!(error.field, "page_size");
        assert!(error.description.contains("limit is 1000"), "{error:?}");
    }

    #[test]
    fn page_tokens_are_decimal_sequence_numbers() {
        assert_eq!(page_start(""), Ok(0));
        assert_eq!(page_start("101"), Ok(101));
        for bad in ["+1", "-1", "x", "1 ", "18446744073709551616"] {
            assert_eq!(page_start(bad).unwrap_err().field, "page_token", "{bad:?}");
        }
    }
}
