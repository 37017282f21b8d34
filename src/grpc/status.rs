//! The one mapping from errors to gRPC statuses. Every refusal carries a `google.rpc.ErrorInfo`
//! (domain `quotad`) whose reason a client can branch on; bad fields also carry a `BadRequest`.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::ledger::{LedgerError, OpenReservationScope, TenantId};

pub const DOMAIN: &str = "quotad";

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
        let message = format!("{}: {}", error.field, error.description);
        Status::with_error_details(
            Code::InvalidArgument,
            message,
            ErrorDetails::with_bad_request_violation(error.field, error.description),
        )
    }
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
        "LOG_UNAVAILABLE",
        HashMap::new(),
    )
}

fn refusal(code: Code, message: String, reason: &str, metadata: HashMap<String, String>) -> Status {
    Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, DOMAIN, metadata))
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
                            OpenReservationScope::ApiKey => "api_key",
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
            E::UnknownApiKey(_) => refusal(Code::NotFound, message, "UNKNOWN_API_KEY", none()),
            E::ApiKeyNoLongerValid => invalid_credentials(),
            E::TooManyApiKeys { limit, .. } => refusal(
                Code::ResourceExhausted,
                message,
                "TOO_MANY_API_KEYS",
                HashMap::from([("limit".to_owned(), limit.to_string())]),
            ),
            E::ApiKeyIdTaken(_) => refusal(Code::AlreadyExists, message, "API_KEY_ID_TAKEN", none()),
            E::EnvironmentOutsideKeyScope(environment) => refusal(
                Code::PermissionDenied,
                message,
                "OUTSIDE_KEY_SCOPE",
                HashMap::from([("environment_id".to_owned(), environment.to_string())]),
            ),
            E::ReservationOutsideKeyScope(reservation) => refusal(
                Code::PermissionDenied,
                message,
                "OUTSIDE_KEY_SCOPE",
                HashMap::from([("reservation_id".to_owned(), reservation.to_string())]),
            ),
            E::CounterOverflow { .. } => {
                tracing::error!(error = %message, "counter overflow");
                refusal(Code::OutOfRange, message, "COUNTER_OVERFLOW", none())
            }
        }
    }
}
