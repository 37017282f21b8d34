//! The one mapping from errors to gRPC statuses. Every refusal carries a `google.rpc.ErrorInfo`
//! (domain `quotad`) whose reason a client can branch on; bad fields also carry a `BadRequest`.

use std::{collections::HashMap, time::Duration};

use prost::Message;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::ledger::{LedgerError, OpenReservationScope, TenantId};

pub const DOMAIN: &str = "quotad";
/// What a bad field is counted as: its refusal carries a `BadRequest`, not an `ErrorInfo`.
pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
/// The reason of [`log_unavailable`].
pub const LOG_UNAVAILABLE: &str = "LOG_UNAVAILABLE";

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
        HashMap::from([("scope".to_owned(), "server".to_owned()), ("limit".to_owned(), limit.to_string())]),
    )
}

/// Every `WatchAlerts` stream one tenant may have is open.
pub fn too_many_tenant_alert_watches(tenant: &TenantId, limit: usize) -> Status {
    refusal(
        Code::ResourceExhausted,
        format!(
            "tenant {tenant} has {limit} alert watches open, its limit (max_alert_watches_per_tenant): close one, or \
             watch several environments in one"
        ),
        "TOO_MANY_ALERT_WATCHES",
        HashMap::from([
            ("scope".to_owned(), "tenant".to_owned()),
            ("tenant_id".to_owned(), tenant.to_string()),
            ("limit".to_owned(), limit.to_string()),
        ]),
    )
}

/// A call outlived the server's deadline (`request_timeout_seconds`).
pub fn request_timed_out(limit: Duration) -> Status {
    refusal(
        Code::DeadlineExceeded,
        format!(
            "the call took longer than {}, the server's request_timeout_seconds; a change may still have been \
             applied: retry with the same idempotency key or reservation id",
            humantime::format_duration(limit)
        ),
        "REQUEST_TIMEOUT",
        HashMap::from([("limit_ms".to_owned(), limit.as_millis().to_string())]),
    )
}

/// A `Quota` call without valid credentials: missing, malformed, unknown, wrong or revoked all get this
/// one answer, so that it tells a caller nothing about which keys exist.
pub fn invalid_credentials() -> Status {
    refusal(
        Code::Unauthenticated,
        "missing or invalid credentials: send `authorization: Bearer <secret>` with the secret of an API key \
         that is not revoked (or the admin token)"
            .to_owned(),
        "INVALID_CREDENTIALS",
        HashMap::new(),
    )
}

/// A `QuotaAdmin` call without the admin token.
pub fn invalid_admin_token() -> Status {
    refusal(
        Code::Unauthenticated,
        "missing or invalid admin token: send `authorization: Bearer <admin token>`".to_owned(),
        "INVALID_CREDENTIALS",
        HashMap::new(),
    )
}

/// The write-ahead log cannot be written: nothing new is granted until it can.
pub fn log_unavailable() -> Status {
    refusal(
        Code::Unavailable,
        "the write-ahead log cannot be written, so the change is not known to be durable; retry with the same \
         idempotency key or reservation id"
            .to_owned(),
        LOG_UNAVAILABLE,
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

/// A refusal as a batch item carries it: the `google.rpc.Status` that the unary call's answer carries
/// in its `grpc-status-details-bin` trailer, so an item's code, message and details are exactly those
/// of the unary refusal. (Every status above has details; one without keeps its code and message.)
pub fn item_error(status: &Status) -> tonic_types::pb::Status {
    match tonic_types::pb::Status::decode(status.details()) {
        Ok(carried) if carried.code == status.code() as i32 => carried,
        _ => tonic_types::pb::Status {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: Vec::new(),
        },
    }
}

fn refusal(code: Code, message: String, reason: &str, metadata: HashMap<String, String>) -> Status {
    Status::with_error_details(code, bounded(message), ErrorDetails::with_error_info(reason, DOMAIN, metadata))
}

/// The `ErrorInfo` reason a ledger error is answered with, or `INVALID_ARGUMENT` for those answered
/// with a `BadRequest`: what clients branch on, and what refusals are counted by.
pub fn reason(error: &LedgerError) -> &'static str {
    use LedgerError as E;
    match error {
        E::UnknownTenant(_) => "UNKNOWN_TENANT",
        E::UnknownEnvironment(_) => "UNKNOWN_ENVIRONMENT",
        E::UnknownReservation(_) => "UNKNOWN_RESERVATION",
        E::AppEnvironmentNotLinked(_) => "APP_ENVIRONMENT_NOT_LINKED",
        E::NotACapacityEnvironment(_) => "NOT_A_CAPACITY_ENVIRONMENT",
        E::AlreadyACapacityEnvironment(_) => "ALREADY_A_CAPACITY_ENVIRONMENT",
        E::EnvironmentOfAnotherTenant { .. } => "ENVIRONMENT_OF_ANOTHER_TENANT",
        E::OverAllocation { .. } => "OVER_ALLOCATION",
        E::AllocationBelowUse { .. } => "ALLOCATION_BELOW_USE",
        E::QuotaDepleted { .. } => "QUOTA_DEPLETED",
        E::TooManyOpenReservations { .. } => "TOO_MANY_OPEN_RESERVATIONS",
        E::AlreadyCommitted { .. } | E::ReleaseAfterCommit(_) => "ALREADY_COMMITTED",
        E::AlreadyReleased(_) => "ALREADY_RELEASED",
        E::IdempotencyKeyReused { .. } => "IDEMPOTENCY_KEY_REUSED",
        E::GraceBelowUse { .. } => "GRACE_BELOW_USE",
        E::AgentDisabled { .. } => "AGENT_DISABLED",
        E::AgentLimitReached { .. } => "AGENT_LIMIT_REACHED",
        E::AgentLimitAboveAllocation { .. } => "AGENT_LIMIT_ABOVE_ALLOCATION",
        E::TooManyAgents { .. } => "TOO_MANY_AGENTS",
        E::UnknownScenario { .. } | E::ZeroQuantity { .. } | E::UsageTooLarge { .. } => INVALID_ARGUMENT,
        E::RateCardEffectiveTooEarly { .. } => INVALID_ARGUMENT,
        E::UnknownRateCardVersion(_) => "UNKNOWN_RATE_CARD_VERSION",
        E::TooManyRateCardVersions { .. } => "TOO_MANY_RATE_CARD_VERSIONS",
        E::UnknownApiKey(_) => "UNKNOWN_API_KEY",
        E::ApiKeyNoLongerValid => "INVALID_CREDENTIALS",
        E::TooManyApiKeys { .. } => "TOO_MANY_API_KEYS",
        E::ApiKeyIdTaken(_) => "API_KEY_ID_TAKEN",
        E::EnvironmentOutsideKeyScope(_) | E::ReservationOutsideKeyScope(_) => "OUTSIDE_KEY_SCOPE",
        E::CounterOverflow { .. } => "COUNTER_OVERFLOW",
    }
}

impl From<LedgerError> for Status {
    fn from(error: LedgerError) -> Status {
        use LedgerError as E;
        let message = error.to_string();
        let reason = reason(&error);
        let none = HashMap::new;
        match error {
            E::UnknownTenant(_) => refusal(Code::NotFound, message, reason, none()),
            E::UnknownEnvironment(_) => refusal(Code::NotFound, message, reason, none()),
            E::UnknownReservation(_) => refusal(Code::NotFound, message, reason, none()),
            E::AppEnvironmentNotLinked(_) => refusal(Code::FailedPrecondition, message, reason, none()),
            E::NotACapacityEnvironment(_) => refusal(Code::FailedPrecondition, message, reason, none()),
            E::AlreadyACapacityEnvironment(_) => refusal(Code::FailedPrecondition, message, reason, none()),
            E::EnvironmentOfAnotherTenant { .. } => refusal(Code::FailedPrecondition, message, reason, none()),
            E::OverAllocation { purchased_milli, .. } => refusal(
                Code::FailedPrecondition,
                message,
                reason,
                HashMap::from([("purchased_milli".to_owned(), purchased_milli.to_string())]),
            ),
            E::AllocationBelowUse { taken_milli, .. } => refusal(
                Code::FailedPrecondition,
                message,
                reason,
                HashMap::from([("used_and_held_milli".to_owned(), taken_milli.to_string())]),
            ),
            E::QuotaDepleted { environment, requested_milli, available_milli } => refusal(
                Code::ResourceExhausted,
                message,
                reason,
                HashMap::from([
                    ("environment_id".to_owned(), environment.to_string()),
                    ("requested_milli".to_owned(), requested_milli.to_string()),
                    ("available_milli".to_owned(), available_milli.to_string()),
                ]),
            ),
            E::TooManyOpenReservations { scope, limit } => refusal(
                Code::ResourceExhausted,
                message,
                reason,
                HashMap::from([
                    (
                        "scope".to_owned(),
                        match scope {
                            OpenReservationScope::Environment => "environment",
                            OpenReservationScope::ApiKey => "api_key",
                            OpenReservationScope::Server => "server",
                        }
                        .to_owned(),
                    ),
                    ("limit".to_owned(), limit.to_string()),
                ]),
            ),
            E::AlreadyCommitted { .. } => refusal(Code::FailedPrecondition, message, reason, none()),
            E::AlreadyReleased(_) => refusal(Code::FailedPrecondition, message, reason, none()),
            E::ReleaseAfterCommit(_) => refusal(Code::FailedPrecondition, message, reason, none()),
            E::IdempotencyKeyReused { .. } => refusal(Code::FailedPrecondition, message, reason, none()),
            E::GraceBelowUse { limit_milli, taken_milli, .. } => refusal(
                Code::FailedPrecondition,
                message,
                reason,
                HashMap::from([
                    ("limit_milli".to_owned(), limit_milli.to_string()),
                    ("taken_milli".to_owned(), taken_milli.to_string()),
                ]),
            ),
            E::AgentDisabled { environment, agent } => refusal(
                Code::PermissionDenied,
                message,
                reason,
                HashMap::from([
                    ("environment_id".to_owned(), environment.to_string()),
                    ("agent_id".to_owned(), agent.to_string()),
                ]),
            ),
            E::AgentLimitReached { environment, agent, limit_milli, used_milli, held_milli, requested_milli } => {
                refusal(
                    Code::ResourceExhausted,
                    message,
                    reason,
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
                reason,
                HashMap::from([("allocated_milli".to_owned(), allocated_milli.to_string())]),
            ),
            E::TooManyAgents { limit, .. } => refusal(
                Code::ResourceExhausted,
                message,
                reason,
                HashMap::from([("limit".to_owned(), limit.to_string())]),
            ),
            E::UnknownScenario { index, .. } => FieldError::new(format!("usage[{index}].scenario"), message).into(),
            E::ZeroQuantity { index } => FieldError::new(format!("usage[{index}].quantity"), message).into(),
            E::UsageTooLarge { .. } => FieldError::new("usage", message).into(),
            E::RateCardEffectiveTooEarly { .. } => FieldError::new("effective_at_unix_ms", message).into(),
            E::UnknownRateCardVersion(_) => refusal(Code::NotFound, message, reason, none()),
            E::TooManyRateCardVersions { limit } => refusal(
                Code::ResourceExhausted,
                message,
                reason,
                HashMap::from([("limit".to_owned(), limit.to_string())]),
            ),
            E::UnknownApiKey(_) => refusal(Code::NotFound, message, reason, none()),
            E::ApiKeyNoLongerValid => invalid_credentials(),
            E::TooManyApiKeys { limit, .. } => refusal(
                Code::ResourceExhausted,
                message,
                reason,
                HashMap::from([("limit".to_owned(), limit.to_string())]),
            ),
            E::ApiKeyIdTaken(_) => refusal(Code::AlreadyExists, message, reason, none()),
            E::EnvironmentOutsideKeyScope(environment) => refusal(
                Code::PermissionDenied,
                message,
                reason,
                HashMap::from([("environment_id".to_owned(), environment.to_string())]),
            ),
            E::ReservationOutsideKeyScope(reservation) => refusal(
                Code::PermissionDenied,
                message,
                reason,
                HashMap::from([("reservation_id".to_owned(), reservation.to_string())]),
            ),
            E::CounterOverflow { .. } => {
                tracing::error!(error = %message, "counter overflow");
                refusal(Code::OutOfRange, message, reason, none())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;
    use crate::ledger::EnvironmentId;

    #[test]
    fn a_refusal_carries_the_reason_it_is_counted_by() {
        let environment = EnvironmentId::new("env").unwrap();
        let depleted = LedgerError::QuotaDepleted { environment, requested_milli: 2, available_milli: 1 };
        let counted = reason(&depleted);
        let status = Status::from(depleted);
        assert_eq!(status.get_details_error_info().unwrap().reason, counted);
        assert_eq!(counted, "QUOTA_DEPLETED");
    }

    #[test]
    fn a_bad_field_is_counted_as_invalid_argument() {
        let error = LedgerError::ZeroQuantity { index: 0 };
        assert_eq!(reason(&error), INVALID_ARGUMENT);
        assert_eq!(Status::from(error).code(), Code::InvalidArgument);
    }

    #[test]
    fn a_batch_items_error_is_the_status_a_unary_call_sends() {
        let environment = EnvironmentId::new("env").unwrap();
        let status = Status::from(LedgerError::QuotaDepleted { environment, requested_milli: 2, available_milli: 1 });
        let item = item_error(&status);
        assert_eq!((item.code, item.message.as_str()), (Code::ResourceExhausted as i32, status.message()));
        let info = tonic_types::RpcStatusExt::get_details_error_info(&item).unwrap();
        assert_eq!((info.reason.as_str(), info.metadata["available_milli"].as_str()), ("QUOTA_DEPLETED", "1"));
        let field = item_error(&Status::from(FieldError::new("agent_id", "must not be empty")));
        let bad_request = tonic_types::RpcStatusExt::get_details_bad_request(&field).unwrap();
        assert_eq!(bad_request.field_violations[0].field, "agent_id");
        let bare = item_error(&Status::internal("no details"));
        assert_eq!((bare.code, bare.message.as_str(), bare.details.len()), (Code::Internal as i32, "no details", 0));
    }

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
