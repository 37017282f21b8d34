//! `QuotaAdmin` calls about usage and prices: usage reports and the versioned rate card.

use std::collections::BTreeMap;

use tonic::Status;

use super::{Context, convert, status::FieldError};
use crate::{
    ledger::{
        AgentId, Command, EnvironmentId, Outcome, TenantId, period,
        pricing::{self, MAX_SCENARIOS, Rate, RateCard, RateCardError, RateCardVersion},
        usage::{Dimension, RangeError, UsageQuery, UsageRange, UsageRow},
    },
    proto,
};

pub fn get_usage(context: &Context, request: proto::GetUsageRequest) -> Result<proto::GetUsageResponse, Status> {
    let tenant = convert::id("tenant_id", &request.tenant_id, TenantId::new)?;
    let environment = optional_id("environment_id", &request.environment_id, EnvironmentId::new)?;
    let agent = optional_id("agent_id", &request.agent_id, AgentId::new)?;
    let from = optional_day("from", &request.from)?;
    let to = optional_day("to", &request.to)?;
    let group_by = group_by(&request.group_by)?;
    let from_given = from.is_some();
    let range = UsageRange::new(from, to, context.clock.now_ms()).map_err(|error| match error {
        // With `from` left out, the start of the month is after the `to` the client gave.
        RangeError::FromAfterTo { from, to } if !from_given => {
            FieldError::new("to", format!("is {to}, before {from}, the start of the current month `from` defaults to"))
        }
        RangeError::FromAfterTo { .. } | RangeError::TooOld { .. } => FieldError::new("from", error.to_string()),
    })?;
    let query = UsageQuery { tenant, environment, agent, range, group_by };
    let rows = context.ledger.usage(&query)?;
    Ok(proto::GetUsageResponse {
        rows: rows.into_iter().map(usage_row).collect(),
        from: query.range.from,
        to: query.range.to,
    })
}

pub fn get_rate_card(context: &Context, request: proto::GetRateCardRequest) -> Result<proto::RateCard, Status> {
    let version = (request.version != 0).then_some(request.version);
    Ok(rate_card(context.ledger.rate_card(version, context.clock.now_ms())?))
}

pub async fn set_rate_card(context: &Context, request: proto::SetRateCardRequest) -> Result<proto::RateCard, Status> {
    let card = requested_card(&request.rates)?;
    let now = context.clock.now_ms();
    let effective_at_ms = if request.effective_at_unix_ms == 0 { now } else { request.effective_at_unix_ms };
    let Outcome::RateCard(added) = context.execute_at(&Command::SetRateCard { card, effective_at_ms }, now).await?
    else {
        unreachable!("setting the rate card yields the version added")
    };
    tracing::info!(version = added.version, effective_at_ms, "rate card version added");
    Ok(rate_card(added))
}

fn optional_id<T>(
    field: &str,
    value: &str,
    parse: fn(&str) -> Result<T, crate::ledger::IdError>,
) -> Result<Option<T>, FieldError> {
    if value.is_empty() { Ok(None) } else { convert::id(field, value, parse).map(Some) }
}

fn optional_day<'a>(field: &str, value: &'a str) -> Result<Option<&'a str>, FieldError> {
    match value {
        "" => Ok(None),
        day if period::is_day(day) => Ok(Some(day)),
        other => {
            Err(FieldError::new(field, format!("is {other:?}; it must be a calendar day written YYYY-MM-DD, or empty")))
        }
    }
}

fn group_by(values: &[i32]) -> Result<Vec<Dimension>, FieldError> {
    let mut dimensions = Vec::with_capacity(values.len());
    for (index, value) in values.iter().enumerate() {
        let field = || format!("group_by[{index}]");
        let dimension = match proto::GroupBy::try_from(*value) {
            Ok(proto::GroupBy::Environment) => Dimension::Environment,
            Ok(proto::GroupBy::Agent) => Dimension::Agent,
            Ok(proto::GroupBy::Scenario) => Dimension::Scenario,
            Ok(proto::GroupBy::Source) => Dimension::Source,
            Ok(proto::GroupBy::Day) => Dimension::Day,
            Ok(proto::GroupBy::Unspecified) | Err(_) => {
                return Err(FieldError::new(
                    field(),
                    format!("is {value}; it must be one of ENVIRONMENT, AGENT, SCENARIO, SOURCE and DAY"),
                ));
            }
        };
        if let Some(first) = dimensions.iter().position(|d| *d == dimension) {
            return Err(FieldError::new(field(), format!("repeats group_by[{first}]; each dimension may appear once")));
        }
        dimensions.push(dimension);
    }
    Ok(dimensions)
}

fn usage_row(row: UsageRow) -> proto::UsageRow {
    let totals = row.totals;
    proto::UsageRow {
        environment_id: row.environment.map(|e| e.to_string()).unwrap_or_default(),
        agent_id: row.agent.map(|a| a.to_string()).unwrap_or_default(),
        scenario: row.scenario.unwrap_or_default(),
        source: row.source.map_or(proto::Source::Unspecified, convert::source_of) as i32,
        day: row.day.unwrap_or_default(),
        charged_milli: totals.charged_milli(),
        prepaid_milli: totals.prepaid_milli,
        payg_milli: totals.payg_milli,
        overage_milli: totals.overage_milli,
        reservations_granted: totals.reservations_granted,
        reservations_refused: totals.reservations_refused,
    }
}

/// The card a SetRateCard request asks for, checked as the configured card is, each refusal naming
/// the rate it is about.
fn requested_card(rates: &[proto::ScenarioRate]) -> Result<RateCard, FieldError> {
    if rates.is_empty() || rates.len() > MAX_SCENARIOS {
        return Err(FieldError::new(
            "rates",
            format!("has {} scenarios; a rate card has 1 to {MAX_SCENARIOS}", rates.len()),
        ));
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, rate) in rates.iter().enumerate() {
        let field = |name: &str| format!("rates[{index}].{name}");
        if let Some(first) = seen.insert(rate.scenario.as_str(), index) {
            return Err(FieldError::new(field("scenario"), format!("repeats the scenario of rates[{first}]")));
        }
        let checked = pricing::check_rate(&rate.scenario, Rate { messages: rate.messages, per: rate.per });
        if let Err(error) = checked {
            let name = match error {
                RateCardError::ZeroPer(_) => "per",
                RateCardError::TooExpensive(_) => "messages",
                RateCardError::BadName(_) | RateCardError::ReservedName(_) => "scenario",
                RateCardError::Empty | RateCardError::TooMany { .. } => unreachable!("checked above"),
            };
            return Err(FieldError::new(field(name), error.to_string()));
        }
    }
    let card = RateCard::new(rates.iter().map(|r| (r.scenario.as_str(), Rate { messages: r.messages, per: r.per })));
    Ok(card.expect("every rate was checked"))
}

fn rate_card(version: RateCardVersion) -> proto::RateCard {
    proto::RateCard {
        version: version.version,
        effective_at_unix_ms: version.effective_at_ms,
        rates: version
            .card
            .rates()
            .map(|(scenario, rate)| proto::ScenarioRate {
                scenario: scenario.to_owned(),
                messages: rate.messages,
                per: rate.per,
            })
            .collect(),
    }
}
