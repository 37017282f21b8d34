//! The one mapping from errors to gRPC statuses. Every refusal carries a `google.rpc.ErrorInfo`
//! (domain `quotad`) whose reason a client can branch on; bad fields also carry a `BadRequest`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::ledger::{LedgerError, OpenReservationScope};

pub const DOMAIN: &str = "quotad";

/// The longest message, and `BadRequest` description, a status carries. Messages quote what the client
/// sent (a day, a scenario, a time zone) and list what the server knows (a rate card's scenarios); a
/// status travels as HTTP/2 headers, and a header list past what the client accepts (8 KiB in gRPC's
/// own clients, 16 KiB in tonic's) is reset as a protocol error instead of delivered.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// A request field that fails validation: INVALID_ARGUMENT naming the field and the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub description: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

impl From<FieldError> for Status {
    fn from(error: FieldError) -> Status {
        let message = bounded(format!("{}: {}", error.field, error.description));
        Status::with_error_details(
            Code::InvalidArgument,
            message,
            ErrorDetails::with_bad_request_violation(error.field, bounded(error.description)),
        )
    }
}

/// `text`, cut to [`MAX_STATUS_MESSAGE_BYTES`] with a note of its full length if it is longer.
fn bounded(text: String) -> String {
    if text.len() <= MAX_STATUS_MESSAGE_BYTES {
        return text;
    }
    let suffix = format!("… ({} bytes in all)", text.len());
    let mut end = MAX_STATUS_MESSAGE_BYTES - suffix.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", &text[..end])
}

/// Every `WatchAlerts` stream the server allows is open.
pub fn too_many_alert_watches(limit: usize) -> Status {
    refusal(
        Code::ResourceExhausted,
        format!("{limit} alert watches are open, the server's limit: close one, or watch several environments in one"),
        "TOO_MANY_ALERT_WATCHES",
        HashMap::from([("limit".to_owned(), limit.to_string())]),
    )
}

/// The write-ahead log cannot be written: nothing new is granted until it can.
pub fn log_unavailable() -> Status {
    refusal(
        Code::Unavailable,
        "the write-ahead log cannot be written, so the change is not known to be durable; retry with the same \
         idempotency key or reservation id"
            .to_owned(),
        "LOG_UNAVAILABLE",
        HashMap::new(),
    )
}

/// An HTTP request with a method other than POST: not a gRPC call.
pub fn method_not_allowed(method: &str) -> Status {
    refusal(
        Code::InvalidArgument,
        format!("method {method} is not allowed: gRPC calls are POST requests"),
        "METHOD_NOT_ALLOWED",
        HashMap::new(),
    )
}

/// An HTTP request whose content type is not `application/grpc` (or that has none): not a gRPC call.
pub fn unsupported_content_type(found: Option<&str>) -> Status {
    let found = found.map_or_else(|| "no content-type".to_owned(), |value| format!("content-type {value:?}"));
    refusal(
        Code::InvalidArgument,
        format!("{found} is not application/grpc: quotad serves gRPC only"),
        "UNSUPPORTED_CONTENT_TYPE",
        HashMap::new(),
    )
}

/// A request body that does not decode as the message its method takes. The fault is the client's, so
/// INVALID_ARGUMENT, not the INTERNAL that prost's codec answers; prost's reason often names the field.
pub fn malformed_request(message_type: &str, error: &prost::DecodeError) -> Status {
    refusal(
        Code::InvalidArgument,
        format!("the request is not a valid {message_type}: {error}"),
        "MALFORMED_REQUEST",
        HashMap::from([("message_type".to_owned(), message_type.to_owned())]),
    )
}

fn refusal(code: Code, message: String, reason: &str, metadata: HashMap<String, String>) -> Status {
    Status::with_error_details(code, bounded(message), ErrorDetails::with_error_info(reason, DOMAIN, metadata))
}

impl From<LedgerError> for Status {
    fn from(error: LedgerError) -> Status {
        use LedgerError as E;
        let message = error.to_string();
        let none = HashMap::new;
        match error {
            E::UnknownTenant(_) => refusal(Code::NotFound, message, "UNKNOWN_TENANT", none()),
            E::UnknownEnvironment(_) => refusal(Code::NotFound, message, "UNKNOWN_ENVIRONMENT", none()),
            E::UnknownReservation(_) => refusal(Code::NotFound, message, "UNKNOWN_RESERVATION", none()),
            E::AppEnvironmentNotLinked(_) => {
                refusal(Code::FailedPrecondition, message, "APP_ENVIRONMENT_NOT_LINKED", none())
            }
            E::NotACapacityEnvironment(_) => {
                refusal(Code::FailedPrecondition, message, "NOT_A_CAPACITY_ENVIRONMENT", none())
            }
            E::AlreadyACapacityEnvironment(_) => {
                refusal(Code::FailedPrecondition, message, "ALREADY_A_CAPACITY_ENVIRONMENT", none())
            }
            E::EnvironmentOfAnotherTenant { .. } => {
                refusal(Code::FailedPrecondition, message, "ENVIRONMENT_OF_ANOTHER_TENANT", none())
            }
            E::OverAllocation { purchased_milli, .. } => refusal(
                Code::FailedPrecondition,
                message,
                "OVER_ALLOCATION",
                HashMap::from([("purchased_milli".to_owned(), purchased_milli.to_string())]),
            ),
            E::AllocationBelowUse { taken_milli, .. } => refusal(
                Code::FailedPrecondition,
                message,
                "ALLOCATION_BELOW_USE",
                HashMap::from([("used_and_held_milli".to_owned(), taken_milli.to_string())]),
            ),
            E::QuotaDepleted { environment, requested_milli, available_milli } => refusal(
                Code::ResourceExhausted,
                message,
                "QUOTA_DEPLETED",
                HashMap::from([
                    ("environment_id".to_owned(), environment.to_string()),
                    ("requested_milli".to_owned(), requested_milli.to_string()),
                    ("available_milli".to_owned(), available_milli.to_string()),
                ]),
            ),
            E::TooManyOpenReservations { scope, limit } => refusal(
                Code::ResourceExhausted,
                message,
                "TOO_MANY_OPEN_RESERVATIONS",
                HashMap::from([
                    (
                        "scope".to_owned(),
                        match scope {
                            OpenReservationScope::Environment => "environment",
                            OpenReservationScope::Server => "server",
                        }
                        .to_owned(),
                    ),
                    ("limit".to_owned(), limit.to_string()),
                ]),
            ),
            E::AlreadyCommitted { .. } => refusal(Code::FailedPrecondition, message, "ALREADY_COMMITTED", none()),
            E::AlreadyReleased(_) => refusal(Code::FailedPrecondition, message, "ALREADY_RELEASED", none()),
            E::ReleaseAfterCommit(_) => refusal(Code::FailedPrecondition, message, "ALREADY_COMMITTED", none()),
            E::IdempotencyKeyReused { .. } => {
                refusal(Code::FailedPrecondition, message, "IDEMPOTENCY_KEY_REUSED", none())
            }
            E::GraceBelowUse { limit_milli, taken_milli, .. } => refusal(
                Code::FailedPrecondition,
                message,
                "GRACE_BELOW_USE",
                HashMap::from([
                    ("limit_milli".to_owned(), limit_milli.to_string()),
                    ("taken_milli".to_owned(), taken_milli.to_string()),
                ]),
            ),
            E::AgentDisabled { environment, agent } => refusal(
                Code::PermissionDenied,
                message,
                "AGENT_DISABLED",
                HashMap::from([
                    ("environment_id".to_owned(), environment.to_string()),
                    ("agent_id".to_owned(), agent.to_string()),
                ]),
            ),
            E::AgentLimitReached { environment, agent, limit_milli, used_milli, held_milli, requested_milli } => {
                refusal(
                    Code::ResourceExhausted,
                    message,
                    "AGENT_LIMIT_REACHED",
                    HashMap::from([
                        ("environment_id".to_owned(), environment.to_string()),
                        ("agent_id".to_owned(), agent.to_string()),
                        ("limit_milli".to_owned(), limit_milli.to_string()),
                        ("used_milli".to_owned(), used_milli.to_string()),
                        ("held_milli".to_owned(), held_milli.to_string()),
                        ("requested_milli".to_owned(), requested_milli.to_string()),
                    ]),
                )
            }
            E::AgentLimitAboveAllocation { allocated_milli, .. } => refusal(
                Code::FailedPrecondition,
                message,
                "AGENT_LIMIT_ABOVE_ALLOCATION",
                HashMap::from([("allocated_milli".to_owned(), allocated_milli.to_string())]),
            ),
            E::TooManyAgents { limit, .. } => refusal(
                Code::ResourceExhausted,
                message,
                "TOO_MANY_AGENTS",
                HashMap::from([("limit".to_owned(), limit.to_string())]),
            ),
            E::UnknownScenario { index, .. } => FieldError::new(format!("usage[{index}].scenario"), message).into(),
            E::ZeroQuantity { index } => FieldError::new(format!("usage[{index}].quantity"), message).into(),
            E::UsageTooLarge { .. } => FieldError::new("usage", message).into(),
            E::RateCardEffectiveTooEarly { .. } => FieldError::new("effective_at_unix_ms", message).into(),
            E::UnknownRateCardVersion(_) => refusal(Code::NotFound, message, "UNKNOWN_RATE_CARD_VERSION", none()),
            E::TooManyRateCardVersions { limit } => refusal(
                Code::ResourceExhausted,
                message,
                "TOO_MANY_RATE_CARD_VERSIONS",
                HashMap::from([("limit".to_owned(), limit.to_string())]),
            ),
            E::CounterOverflow { .. } => {
                tracing::error!(error = %message, "counter overflow");
                refusal(Code::OutOfRange, message, "COUNTER_OVERFLOW", none())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_bounded_at_a_character_boundary() {
        let at_limit = "x".repeat(MAX_STATUS_MESSAGE_BYTES);
        assert_eq!(bounded(at_limit.clone()), at_limit);
        let over = "é".repeat(MAX_STATUS_MESSAGE_BYTES);
        let cut = bounded(over);
        assert!(cut.len() <= MAX_STATUS_MESSAGE_BYTES, "{}", cut.len());
        assert!(cut.ends_with("… (2048 bytes in all)"), "{cut}");
        let status = Status::from(FieldError::new("from", "y".repeat(MAX_STATUS_MESSAGE_BYTES + 1)));
        assert!(status.message().len() <= MAX_STATUS_MESSAGE_BYTES);
        let description = &status.get_details_bad_request().unwrap().field_violations[0].description;
        assert!(description.len() <= MAX_STATUS_MESSAGE_BYTES);
    }
}
