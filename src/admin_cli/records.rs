//! The `quota.v1` answers as printable records: one function per message, fields in proto order and
//! named as in the proto, so that JSON output reads like the contract.

use super::render::{Record, Value};
use crate::proto;

fn text(value: &str) -> Value {
    Value::Text(value.to_owned())
}

/// A proto enum field by its name; a number the contract does not know (a newer server) stays a number.
fn enum_value<E>(raw: i32, prefix: &'static str, name: impl Fn(E) -> &'static str) -> Value
where
    E: TryFrom<i32>,
{
    match E::try_from(raw) {
        Ok(known) => Value::Enum { name: name(known), prefix },
        Err(_) => Value::Number(u64::try_from(raw).unwrap_or_default()),
    }
}

fn source(raw: i32) -> Value {
    enum_value(raw, "SOURCE_", |source: proto::Source| source.as_str_name())
}

pub fn balance(balance: &proto::Balance) -> Record {
    Record::new()
        .with("environment_id", text(&balance.environment_id))
        .with("tenant_id", text(&balance.tenant_id))
        .with("allocated_milli", Value::Milli(balance.allocated_milli))
        .with("allocation_used_milli", Value::Milli(balance.allocation_used_milli))
        .with("tenant_pool_used_milli", Value::Milli(balance.tenant_pool_used_milli))
        .with("payg_enabled", Value::Flag(balance.payg_enabled))
        .with("payg_budget_milli", Value::Milli(balance.payg_budget_milli))
        .with("payg_used_milli", Value::Milli(balance.payg_used_milli))
        .with("reserved_milli", Value::Milli(balance.reserved_milli))
        .with("overage_milli", Value::Milli(balance.overage_milli))
        .with("available_milli", Value::Milli(balance.available_milli))
        .with("state", enum_value(balance.state, "STATE_", |state: proto::State| state.as_str_name()))
        .with("period", text(&balance.period))
        .with("draw_from_tenant_pool", Value::Flag(balance.draw_from_tenant_pool))
        .with("low_percent", Value::Number(balance.low_percent.into()))
}

pub fn tenant(tenant: &proto::TenantCapacity) -> Record {
    Record::new()
        .with("tenant_id", text(&tenant.tenant_id))
        .with("purchased_milli", Value::Milli(tenant.purchased_milli))
        .with("allocated_milli", Value::Milli(tenant.allocated_milli))
        .with("unallocated_milli", Value::Milli(tenant.unallocated_milli))
        .with("tenant_pool_used_milli", Value::Milli(tenant.tenant_pool_used_milli))
        .with("tenant_pool_reserved_milli", Value::Milli(tenant.tenant_pool_reserved_milli))
        .with("overage_grace_percent", Value::Number(tenant.overage_grace_percent.into()))
        .with("time_zone", text(&tenant.time_zone))
        .with("period", text(&tenant.period))
        .with("grace_used_milli", Value::Milli(tenant.grace_used_milli))
}

pub fn link(link: &proto::LinkEnvironmentResponse) -> Record {
    Record::new()
        .with("app_environment_id", text(&link.app_environment_id))
        .with("environment_id", text(&link.environment_id))
        .with("tenant_id", text(&link.tenant_id))
}

pub fn agent_limit(limit: &proto::AgentLimit) -> Record {
    Record::new()
        .with("environment_id", text(&limit.environment_id))
        .with("agent_id", text(&limit.agent_id))
        .with("monthly_limit_messages", Value::Number(limit.monthly_limit_messages))
        .with("notify_percent", Value::Number(limit.notify_percent.into()))
        .with("stop_when_exceeded", Value::Flag(limit.stop_when_exceeded))
        .with("disabled", Value::Flag(limit.disabled))
        .with("used_milli", Value::Milli(limit.used_milli))
        .with("reserved_milli", Value::Milli(limit.reserved_milli))
        .with("period", text(&limit.period))
}

pub fn usage_row(row: &proto::UsageRow) -> Record {
    Record::new()
        .with("environment_id", text(&row.environment_id))
        .with("agent_id", text(&row.agent_id))
        .with("scenario", text(&row.scenario))
        .with("source", source(row.source))
        .with("day", text(&row.day))
        .with("charged_milli", Value::Milli(row.charged_milli))
        .with("prepaid_milli", Value::Milli(row.prepaid_milli))
        .with("payg_milli", Value::Milli(row.payg_milli))
        .with("overage_milli", Value::Milli(row.overage_milli))
        .with("reservations_granted", Value::Number(row.reservations_granted))
        .with("reservations_refused", Value::Number(row.reservations_refused))
}

/// One row per scenario, each carrying the card's version and effective time, so that a list of rows
/// is the whole card in every format.
pub fn rate_card_rows(card: &proto::RateCard) -> Vec<Record> {
    card.rates.iter().map(|rate| rate_row(card, rate)).collect()
}

pub fn rate_row(card: &proto::RateCard, rate: &proto::ScenarioRate) -> Record {
    Record::new()
        .with("version", Value::Number(card.version.into()))
        .with("effective_at_unix_ms", Value::UnixMs(card.effective_at_unix_ms))
        .with("scenario", text(&rate.scenario))
        .with("messages", Value::Number(rate.messages))
        .with("per", Value::Number(rate.per))
}

pub fn reservation(hold: &proto::Reservation) -> Record {
    let draws = hold
        .draws
        .iter()
        .map(|draw| {
            Record::new().with("source", source(draw.source)).with("amount_milli", Value::Milli(draw.amount_milli))
        })
        .collect();
    Record::new()
        .with("reservation_id", text(&hold.reservation_id))
        .with("agent_id", text(&hold.agent_id))
        .with("reserved_milli", Value::Milli(hold.reserved_milli))
        .with("draws", Value::List(draws))
        .with("created_at_unix_ms", Value::UnixMs(hold.created_at_unix_ms))
        .with("expires_at_unix_ms", Value::UnixMs(hold.expires_at_unix_ms))
        .with("rate_card_version", Value::Number(hold.rate_card_version.into()))
        .with("api_key_id", text(&hold.api_key_id))
}

pub fn release_all(released: &proto::ReleaseAllResponse) -> Record {
    let record = Record::new()
        .with("released_count", Value::Number(released.released_count))
        .with("released_milli", Value::Milli(released.released_milli));
    match &released.balance {
        Some(after) => record.with("balance", Value::Record(balance(after))),
        None => record,
    }
}

/// An API key; its secret only when the server sent one, which it does once, when the key is created.
pub fn api_key(key: &proto::ApiKey) -> Record {
    let record = Record::new().with("key_id", text(&key.key_id));
    let record = if key.secret.is_empty() { record } else { record.with("secret", text(&key.secret)) };
    record
        .with("tenant_id", text(&key.tenant_id))
        .with("environment_ids", Value::Texts(key.environment_ids.clone()))
        .with("description", text(&key.description))
        .with("created_at_unix_ms", Value::UnixMs(key.created_at_unix_ms))
        .with("last_used_unix_ms", Value::UnixMs(key.last_used_unix_ms))
        .with("open_reservations", Value::Number(key.open_reservations))
}

/// An alert as one row; its balance is too wide for a row and is printed in JSON only.
pub fn alert(alert: &proto::Alert) -> Record {
    let record = Record::new()
        .with("at_unix_ms", Value::UnixMs(alert.at_unix_ms))
        .with("tenant_id", text(&alert.tenant_id))
        .with("environment_id", text(&alert.environment_id))
        .with("agent_id", text(&alert.agent_id))
        .with("kind", enum_value(alert.kind, "ALERT_KIND_", |kind: proto::AlertKind| kind.as_str_name()))
        .with("threshold_percent", Value::Number(alert.threshold_percent.into()))
        .with("used_milli", Value::Milli(alert.used_milli))
        .with("limit_milli", Value::Milli(alert.limit_milli))
        .with("initial", Value::Flag(alert.initial))
        .with("message", text(&alert.message));
    match &alert.balance {
        Some(at_alert) => record.with_json_only("balance", Value::Record(balance(at_alert))),
        None => record,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin_cli::render::{Format, Output};

    #[test]
    fn enum_values_lose_their_prefix_in_tables_and_unknown_ones_stay_numbers() {
        let known = proto::Balance { state: proto::State::Depleted.into(), ..Default::default() };
        let table = Output::Record(balance(&known)).render(Format::Table);
        let state_line = table.lines().find(|line| line.starts_with("state ")).expect("a state line");
        assert_eq!(state_line.split_whitespace().collect::<Vec<_>>(), ["state", "depleted"]);
        let json: serde_json::Value =
            serde_json::from_str(&Output::Record(balance(&known)).render(Format::Json)).unwrap();
        assert_eq!(json["state"], "STATE_DEPLETED");

        let unknown = proto::Balance { state: 42, ..Default::default() };
        let json: serde_json::Value =
            serde_json::from_str(&Output::Record(balance(&unknown)).render(Format::Json)).unwrap();
        assert_eq!(json["state"], 42);
    }

    #[test]
    fn a_rate_card_is_one_row_per_scenario() {
        let card = proto::RateCard {
            version: 2,
            effective_at_unix_ms: 1_794_744_000_000,
            rates: vec![proto::ScenarioRate { scenario: "agent_flow_actions".into(), messages: 13, per: 100 }],
        };
        let output = Output::Rows {
            template: rate_row(&proto::RateCard::default(), &proto::ScenarioRate::default()),
            rows: rate_card_rows(&card),
        };
        assert_eq!(
            output.render(Format::Csv),
            "version,effective_at,scenario,messages,per\n2,2026-11-15T12:00:00.000Z,agent_flow_actions,13,100\n"
        );
    }
}
