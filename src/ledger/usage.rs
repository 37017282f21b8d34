//! Usage roll-ups: what each capacity environment charged, by day and by month, per agent and
//! scenario and source, and how many reservations it granted and refused. Plain data under the
//! environment's lock, changed only by applying events (refusals aside, see [`UsageBook::refused`]),
//! so replay rebuilds the same roll-ups.
//!
//! Bounded: daily rows for the current and the two previous months, monthly rows for twelve months
//! (older rows are dropped as new events arrive, and never reported), and at most a configured number
//! of distinct (environment, agent, scenario) keys per tenant and month; use beyond that is attributed
//! to the agent [`OTHER_AGENT`] rather than refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{AgentId, Draws, EnvironmentId, Milli, Source, TenantId, period};

pub const DEFAULT_MAX_USAGE_KEYS_PER_TENANT: u64 = 100_000;
/// Months with daily rows: the current one and the two before it.
pub const DAILY_RETENTION_MONTHS: i64 = 3;
/// Months with monthly rows, the current one included.
pub const MONTHLY_RETENTION_MONTHS: i64 = 12;
/// Where use is attributed once a tenant has used its distinct keys for the month.
pub const OTHER_AGENT: &str = "other";
/// Reservation counts have no scenario: they are kept under this empty one.
pub(super) const COUNTS_SCENARIO: &str = "";

const _: () = assert!(DAILY_RETENTION_MONTHS >= 1 && DAILY_RETENTION_MONTHS <= MONTHLY_RETENTION_MONTHS);

/// One usage item of a commit, priced: the rate-card scenario (or `messages`) and its price in milli.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricedItem {
    pub scenario: String,
    pub amount_milli: Milli,
}

/// A part of a commit's use: an item's share of one source, or of the overage (`source: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeLine<'a> {
    pub scenario: &'a str,
    pub source: Option<Source>,
    pub amount_milli: Milli,
}

/// Splits a commit's use across its items: the sources in draw order, then the overage, are handed to
/// the items in request order, so the lines of each source sum exactly to what the source was charged.
/// The items' prices must sum to the charge plus the overage.
pub fn split(items: &[PricedItem], charged: Draws, overage_milli: Milli) -> Vec<ChargeLine<'_>> {
    let priced: Milli = items.iter().map(|item| item.amount_milli).sum();
    assert_eq!(priced, charged.total() + overage_milli, "a commit's items price to its use");
    let mut pieces = Source::DRAW_ORDER
        .into_iter()
        .map(|source| (Some(source), charged.get(source)))
        .chain([(None, overage_milli)])
        .filter(|(_, amount)| *amount > 0);
    let mut lines = Vec::new();
    let mut current = pieces.next();
    for item in items {
        let mut left = item.amount_milli;
        while left > 0 {
            let (source, available) = current.as_mut().expect("the pieces cover every item");
            let take = left.min(*available);
            lines.push(ChargeLine { scenario: &item.scenario, source: *source, amount_milli: take });
            left -= take;
            *available -= take;
            if *available == 0 {
                current = pieces.next();
            }
        }
    }
    lines
}

/// What one key used in one day or month.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub charged: Draws,
    pub overage_milli: Milli,
    pub reservations_granted: u64,
}

/// Agent → scenario → tally.
type Keys = BTreeMap<AgentId, BTreeMap<String, Tally>>;

/// Refused reservations by period (a day or a month), then agent.
type RefusalCounts = BTreeMap<String, BTreeMap<AgentId, u64>>;

/// One capacity environment's usage roll-ups.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UsageBook {
    /// `YYYY-MM-DD` → keys; only the days of the last [`DAILY_RETENTION_MONTHS`] months.
    daily: BTreeMap<String, Keys>,
    /// `YYYY-MM` → keys; only the last [`MONTHLY_RETENTION_MONTHS`] months.
    monthly: BTreeMap<String, Keys>,
    /// Refusals are not logged events, so these are counted in memory only: not in snapshots, and
    /// from zero again after a restart.
    #[serde(skip)]
    refused: Refusals,
    /// The keys of the day last seen, derived from time alone (so not kept in snapshots): events of the
    /// same day format no keys, and rows are pruned once a month.
    #[serde(skip)]
    calendar: Calendar,
}

#[derive(Debug, Clone, Default)]
struct Calendar {
    day_start_ms: u64,
    day_end_ms: u64,
    day: String,
    month: String,
    /// The month whose retention was last applied.
    pruned_month: String,
}

impl Calendar {
    fn advance(&mut self, now: u64) {
        if (self.day_start_ms..self.day_end_ms).contains(&now) {
            return;
        }
        self.day_start_ms = now - now % MS_PER_DAY;
        self.day_end_ms = self.day_start_ms.saturating_add(MS_PER_DAY);
        self.day = period::day_of(now);
        self.month = period::period_of(now);
    }
}

const MS_PER_DAY: u64 = 86_400_000;

/// The entry of `key` in a map keyed by `String`, made only when missing.
fn entry<'a, V: Default>(map: &'a mut BTreeMap<String, V>, key: &str) -> &'a mut V {
    if is_last(map, key) {
        return map.last_entry().expect("the map has a last key").into_mut();
    }
    if !map.contains_key(key) {
        map.insert(key.to_owned(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

/// The value of `key` in a map keyed by `String`.
fn get<'a, V>(map: &'a BTreeMap<String, V>, key: &str) -> Option<&'a V> {
    match map.last_key_value() {
        Some((last, value)) if same(last, key) => Some(value),
        _ => map.get(key),
    }
}

/// Whether `key` is the last key of `map`. Every grant and commit looks up the current month's and day's
/// rows, nearly always the last ones, and in them an agent's scenarios, most often the one counting
/// reservations alone: one comparison with the last key then replaces the searches (each a few
/// comparisons of strings on cold cache lines) that were a tenth of a reservation's cost.
fn is_last<V>(map: &BTreeMap<String, V>, key: &str) -> bool {
    map.last_key_value().is_some_and(|(last, _)| same(last, key))
}

/// `a == b`, without a call to `memcmp` for empty strings: the scenario counting reservations is `""`, an
/// empty `String` points nowhere, and glibc's AVX-512 `memcmp` still issues a (masked) load from it,
/// which profiles showed costing as much as a cache miss on every grant.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

#[derive(Debug, Clone, Default)]
struct Refusals {
    daily: RefusalCounts,
    monthly: RefusalCounts,
}

impl UsageBook {
    /// No use recorded: what an environment never used holds (refusals are not kept in snapshots).
    pub fn is_empty(&self) -> bool {
        self.daily.is_empty() && self.monthly.is_empty()
    }

    /// How many of `(agent, scenario)` keys are not yet in the month of `now`.
    pub fn new_keys<'a>(&self, now: u64, agent: &AgentId, scenarios: impl IntoIterator<Item = &'a str>) -> u64 {
        let cached = (self.calendar.day_start_ms..self.calendar.day_end_ms).contains(&now);
        let month = if cached {
            std::borrow::Cow::Borrowed(self.calendar.month.as_str())
        } else {
            period::period_of(now).into()
        };
        let known = get(&self.monthly, month.as_ref()).and_then(|keys| keys.get(agent));
        // Allocates only for keys that are new, which is rare: this runs for every reservation and commit.
        let mut fresh: Vec<&str> = Vec::new();
        for scenario in scenarios {
            if known.is_none_or(|k| get(k, scenario).is_none()) && !fresh.contains(&scenario) {
                fresh.push(scenario);
            }
        }
        fresh.len() as u64
    }

    /// Counts a granted reservation at `now`; returns how many keys were new this month.
    pub fn record_grant(&mut self, now: u64, agent: &AgentId) -> u64 {
        self.prune(now);
        self.add(now, agent, COUNTS_SCENARIO, |tally| tally.reservations_granted += 1)
    }

    /// Adds a commit's lines at `now`; returns how many keys were new this month.
    pub fn record_charge(&mut self, now: u64, agent: &AgentId, lines: &[ChargeLine<'_>]) -> u64 {
        self.prune(now);
        let mut new_keys = 0;
        for line in lines {
            new_keys += self.add(now, agent, line.scenario, |tally| match line.source {
                Some(source) => tally.charged.add(source, line.amount_milli),
                None => tally.overage_milli = tally.overage_milli.saturating_add(line.amount_milli),
            });
        }
        new_keys
    }

    /// Counts a refused reservation at `now`. At most `max_agents` agents a day and a month are
    /// counted by name; the others are counted as [`OTHER_AGENT`].
    pub fn record_refusal(&mut self, now: u64, agent: &AgentId, max_agents: u64) {
        // Only the refusal counts: refusals are not logged, so the logged rows must change only with
        // logged events, or a restored ledger would differ.
        self.prune_refused(now);
        self.calendar.advance(now);
        let other = AgentId::new(OTHER_AGENT).expect("a valid id");
        let Self { refused, calendar, .. } = self;
        for (counts, key) in [(&mut refused.daily, &calendar.day), (&mut refused.monthly, &calendar.month)] {
            let agents = entry(counts, key);
            let named = agents.contains_key(agent) || (agents.len() as u64) < max_agents;
            let count = agents.entry(if named { agent.clone() } else { other.clone() }).or_default();
            *count = count.saturating_add(1);
        }
    }

    /// Distinct keys per month, for the tenant's count.
    pub fn keys_per_month(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.monthly.iter().map(|(month, keys)| (month.as_str(), keys.values().map(|s| s.len() as u64).sum()))
    }

    fn add(&mut self, now: u64, agent: &AgentId, scenario: &str, change: impl Fn(&mut Tally)) -> u64 {
        self.calendar.advance(now);
        let Self { daily, monthly, calendar, .. } = self;
        let month = entry(monthly, &calendar.month).entry(agent.clone()).or_default();
        let new_key = get(month, scenario).is_none();
        change(entry(month, scenario));
        let day = entry(daily, &calendar.day).entry(agent.clone()).or_default();
        change(entry(day, scenario));
        u64::from(new_key)
    }

    /// Drops the rows older than what is kept at `now`. What is kept depends on the month alone, so
    /// this runs once a month (and after a restart, on the first event).
    fn prune(&mut self, now: u64) {
        self.calendar.advance(now);
        if self.calendar.pruned_month == self.calendar.month {
            return;
        }
        self.calendar.pruned_month.clone_from(&self.calendar.month);
        let (first_day, first_month) = retained_from(now);
        drop_before(&mut self.daily, &first_day);
        drop_before(&mut self.monthly, &first_month);
        self.prune_refused(now);
    }

    fn prune_refused(&mut self, now: u64) {
        if self.refused.daily.is_empty() && self.refused.monthly.is_empty() {
            return;
        }
        let (first_day, first_month) = retained_from(now);
        drop_before(&mut self.refused.daily, &first_day);
        drop_before(&mut self.refused.monthly, &first_month);
    }

    /// Adds this environment's rows in `range` (and of `agent`, if given) to `report`.
    pub fn collect(
        &self,
        environment: &EnvironmentId,
        range: &UsageRange,
        agent: Option<&AgentId>,
        report: &mut Report,
    ) {
        let spans =
            [(&self.monthly, &self.refused.monthly, &range.monthly), (&self.daily, &self.refused.daily, &range.daily)];
        for (rows, refusals, span) in spans {
            let Some((first, last)) = span else { continue };
            for (label, keys) in rows.range(first.clone()..=last.clone()) {
                for (key_agent, scenarios) in keys.iter().filter(|(a, _)| agent.is_none_or(|wanted| wanted == *a)) {
                    for (scenario, tally) in scenarios {
                        let at = Cell { environment, day: label, agent: key_agent, scenario };
                        report.add_tally(&at, tally);
                    }
                }
            }
            for (label, agents) in refusals.range(first.clone()..=last.clone()) {
                for (key_agent, count) in agents.iter().filter(|(a, _)| agent.is_none_or(|wanted| wanted == *a)) {
                    let at = Cell { environment, day: label, agent: key_agent, scenario: COUNTS_SCENARIO };
                    report.add(&at, None, UsageTotals { reservations_refused: *count, ..UsageTotals::default() });
                }
            }
        }
    }
}

/// The first day and the first month kept at `now`.
fn retained_from(now: u64) -> (String, String) {
    let current = period::period_of(now);
    let first_day = period::first_day(&period::shift_period(&current, 1 - DAILY_RETENTION_MONTHS));
    (first_day, period::shift_period(&current, 1 - MONTHLY_RETENTION_MONTHS))
}

fn drop_before<V>(rows: &mut BTreeMap<String, V>, first_kept: &str) {
    while rows.first_key_value().is_some_and(|(label, _)| label.as_str() < first_kept) {
        rows.pop_first();
    }
}

/// What a report reads, resolved against the retention at the time of the request: whole months from
/// monthly rows where the range reaches beyond daily retention, days from daily rows after that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRange {
    /// The first and last day served (a month served from monthly rows is served whole).
    pub from: String,
    pub to: String,
    /// First and last `YYYY-MM` served from monthly rows.
    monthly: Option<(String, String)>,
    /// First and last `YYYY-MM-DD` served from daily rows.
    daily: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("is {from}, after to ({to})")]
    FromAfterTo { from: String, to: String },
    #[error("is {from}; usage is kept for {MONTHLY_RETENTION_MONTHS} months, from {oldest} on")]
    TooOld { from: String, oldest: String },
}

impl UsageRange {
    /// The range from `from` to `to` (both `YYYY-MM-DD`, checked by the caller) as served at `now`;
    /// `None` for `from` is the first day of the current month, for `to` today.
    pub fn new(from: Option<&str>, to: Option<&str>, now: u64) -> Result<Self, RangeError> {
        let current = period::period_of(now);
        let from = from.map_or_else(|| period::first_day(&current), str::to_owned);
        let to = to.map_or_else(|| period::day_of(now), str::to_owned);
        let oldest = period::first_day(&period::shift_period(&current, 1 - MONTHLY_RETENTION_MONTHS));
        if from < oldest {
            return Err(RangeError::TooOld { from, oldest });
        }
        if from > to {
            return Err(RangeError::FromAfterTo { from, to });
        }
        let first_daily_month = period::shift_period(&current, 1 - DAILY_RETENTION_MONTHS);
        let (from_month, to_month) = (period::period_of_day(&from), period::period_of_day(&to));
        let monthly = (from_month < first_daily_month.as_str()).then(|| {
            let last = to_month.min(&period::shift_period(&first_daily_month, -1)).to_owned();
            (from_month.to_owned(), last)
        });
        let daily_from = from.clone().max(period::first_day(&first_daily_month));
        let daily = (daily_from <= to).then(|| (daily_from, to.clone()));
        Ok(Self {
            from: if monthly.is_some() { period::first_day(from_month) } else { from.clone() },
            to: if daily.is_none() { period::last_day(to_month) } else { to.clone() },
            monthly,
            daily,
        })
    }
}

/// A usage report request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub tenant: TenantId,
    /// Only this environment (an app environment stands for the one it is linked to).
    pub environment: Option<EnvironmentId>,
    pub agent: Option<AgentId>,
    pub range: UsageRange,
    /// Each dimension at most once.
    pub group_by: Vec<Dimension>,
}

/// A dimension a report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    Environment,
    Agent,
    Scenario,
    Source,
    Day,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Charged to the environment allocation and the tenant pool.
    pub prepaid_milli: Milli,
    pub payg_milli: Milli,
    pub overage_milli: Milli,
    pub reservations_granted: u64,
    pub reservations_refused: u64,
}

impl UsageTotals {
    /// What the sources covered: prepaid plus pay-as-you-go.
    pub fn charged_milli(&self) -> Milli {
        self.prepaid_milli.saturating_add(self.payg_milli)
    }

    fn plus(self, other: Self) -> Self {
        Self {
            prepaid_milli: self.prepaid_milli.saturating_add(other.prepaid_milli),
            payg_milli: self.payg_milli.saturating_add(other.payg_milli),
            overage_milli: self.overage_milli.saturating_add(other.overage_milli),
            reservations_granted: self.reservations_granted.saturating_add(other.reservations_granted),
            reservations_refused: self.reservations_refused.saturating_add(other.reservations_refused),
        }
    }

    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// One report row: the grouped dimensions set, the others `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub environment: Option<EnvironmentId>,
    pub agent: Option<AgentId>,
    pub scenario: Option<String>,
    pub source: Option<Source>,
    /// `YYYY-MM-DD`, or `YYYY-MM` for a month served from monthly rows.
    pub day: Option<String>,
    pub totals: UsageTotals,
}

/// Where a tally was recorded.
struct Cell<'a> {
    environment: &'a EnvironmentId,
    day: &'a str,
    agent: &'a AgentId,
    scenario: &'a str,
}

/// A part of a row's sort key: rows are ordered by the grouped dimensions, in the order given.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Text(String),
    /// Unspecified first, then the draw order.
    Source(Option<Source>),
}

/// Rows being summed, by group.
#[derive(Debug)]
pub struct Report {
    group_by: Vec<Dimension>,
    rows: BTreeMap<Vec<Part>, UsageRow>,
}

impl Report {
    /// `group_by` holds each dimension at most once (checked by the caller).
    pub fn new(group_by: Vec<Dimension>) -> Self {
        Self { group_by, rows: BTreeMap::new() }
    }

    fn add_tally(&mut self, at: &Cell<'_>, tally: &Tally) {
        for (source, amount) in tally.charged.iter() {
            let totals = match source {
                Source::PayAsYouGo => UsageTotals { payg_milli: amount, ..UsageTotals::default() },
                Source::EnvironmentAllocation | Source::TenantPool => {
                    UsageTotals { prepaid_milli: amount, ..UsageTotals::default() }
                }
            };
            self.add(at, Some(source), totals);
        }
        let rest = UsageTotals {
            overage_milli: tally.overage_milli,
            reservations_granted: tally.reservations_granted,
            ..UsageTotals::default()
        };
        if !rest.is_zero() {
            self.add(at, None, rest);
        }
    }

    fn add(&mut self, at: &Cell<'_>, source: Option<Source>, totals: UsageTotals) {
        let key = self
            .group_by
            .iter()
            .map(|dimension| match dimension {
                Dimension::Environment => Part::Text(at.environment.to_string()),
                Dimension::Agent => Part::Text(at.agent.to_string()),
                Dimension::Scenario => Part::Text(at.scenario.to_owned()),
                Dimension::Source => Part::Source(source),
                Dimension::Day => Part::Text(at.day.to_owned()),
            })
            .collect();
        let grouped = |dimension| self.group_by.contains(&dimension);
        let row = self.rows.entry(key).or_insert_with(|| UsageRow {
            environment: grouped(Dimension::Environment).then(|| at.environment.clone()),
            agent: grouped(Dimension::Agent).then(|| at.agent.clone()),
            scenario: grouped(Dimension::Scenario).then(|| at.scenario.to_owned()),
            source: if grouped(Dimension::Source) { source } else { None },
            day: grouped(Dimension::Day).then(|| at.day.to_owned()),
            totals: UsageTotals::default(),
        });
        row.totals = row.totals.plus(totals);
    }

    /// The rows in order. Without grouping there is always exactly one row, the total.
    pub fn into_rows(self) -> Vec<UsageRow> {
        if self.group_by.is_empty() && self.rows.is_empty() {
            return vec![UsageRow {
                environment: None,
                agent: None,
                scenario: None,
                source: None,
                day: None,
                totals: UsageTotals::default(),
            }];
        }
        self.rows.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 86_400_000;
    /// 2026-11-15T12:00:00Z.
    const NOV_15: u64 = 1_794_744_000_000;

    fn item(scenario: &str, amount_milli: Milli) -> PricedItem {
        PricedItem { scenario: scenario.to_owned(), amount_milli }
    }

    fn draws(allocation: Milli, pool: Milli, payg: Milli) -> Draws {
        let mut draws = Draws::default();
        draws.add(Source::EnvironmentAllocation, allocation);
        draws.add(Source::TenantPool, pool);
        draws.add(Source::PayAsYouGo, payg);
        draws
    }

    fn agent(name: &str) -> AgentId {
        AgentId::new(name).unwrap()
    }

    fn line(scenario: &str, source: Option<Source>, amount_milli: Milli) -> ChargeLine<'_> {
        ChargeLine { scenario, source, amount_milli }
    }

    #[test]
    fn sources_are_handed_to_items_in_draw_order_then_request_order() {
        let items = [item("a", 3_000), item("b", 5_000), item("c", 2_000)];
        let lines = split(&items, draws(4_000, 2_000, 1_000), 3_000);
        assert_eq!(
            lines,
            [
                line("a", Some(Source::EnvironmentAllocation), 3_000),
                line("b", Some(Source::EnvironmentAllocation), 1_000),
                line("b", Some(Source::TenantPool), 2_000),
                line("b", Some(Source::PayAsYouGo), 1_000),
                line("b", None, 1_000),
                line("c", None, 2_000),
            ]
        );
        for source in Source::DRAW_ORDER {
            let sum: Milli = lines.iter().filter(|l| l.source == Some(source)).map(|l| l.amount_milli).sum();
            assert_eq!(sum, draws(4_000, 2_000, 1_000).get(source));
        }
    }

    #[test]
    fn a_commit_of_nothing_splits_into_nothing() {
        assert!(split(&[item("a", 0)], Draws::default(), 0).is_empty());
        assert!(split(&[], Draws::default(), 0).is_empty());
    }

    #[test]
    #[should_panic(expected = "price to its use")]
    fn items_that_do_not_price_to_the_use_are_a_bug() {
        split(&[item("a", 1)], draws(2, 0, 0), 0);
    }

    #[test]
    fn daily_rows_last_three_months_and_monthly_rows_twelve() {
        let mut book = UsageBook::default();
        let a = agent("a");
        // 2025-11-15 onwards, one charge on the 15th of each month for thirteen months.
        let months_ago = |n: u64| NOV_15 - n * 30 * DAY_MS - (n / 2) * DAY_MS;
        for n in (0..=12).rev() {
            book.record_charge(months_ago(n), &a, &[line("x", Some(Source::EnvironmentAllocation), 1)]);
        }
        let days: Vec<&str> = book.daily.keys().map(String::as_str).collect();
        assert!(days.iter().all(|d| d >= &"2026-09-01"), "{days:?}");
        assert_eq!(days.len(), 3);
        let months: Vec<&str> = book.monthly.keys().map(String::as_str).collect();
        assert_eq!(months.len(), 12);
        assert_eq!(months.first(), Some(&"2025-12"));
        assert_eq!(months.last(), Some(&"2026-11"));
    }

    #[test]
    fn a_range_beyond_daily_retention_is_served_from_whole_months() {
        let range = UsageRange::new(Some("2026-02-10"), Some("2026-10-05"), NOV_15).unwrap();
        assert_eq!(range.monthly, Some(("2026-02".into(), "2026-08".into())));
        assert_eq!(range.daily, Some(("2026-09-01".into(), "2026-10-05".into())));
        assert_eq!((range.from.as_str(), range.to.as_str()), ("2026-02-01", "2026-10-05"));

        let old = UsageRange::new(Some("2026-03-10"), Some("2026-04-02"), NOV_15).unwrap();
        assert_eq!(old.daily, None);
        assert_eq!((old.from.as_str(), old.to.as_str()), ("2026-03-01", "2026-04-30"));

        let current = UsageRange::new(None, None, NOV_15).unwrap();
        assert_eq!(current.monthly, None);
        assert_eq!(current.daily, Some(("2026-11-01".into(), "2026-11-15".into())));
    }

    #[test]
    fn a_range_is_bounded_by_what_is_kept() {
        assert!(UsageRange::new(Some("2025-12-01"), None, NOV_15).is_ok());
        assert!(matches!(
            UsageRange::new(Some("2025-11-30"), None, NOV_15),
            Err(RangeError::TooOld { oldest, .. }) if oldest == "2025-12-01"
        ));
        assert!(matches!(UsageRange::new(Some("2026-11-16"), None, NOV_15), Err(RangeError::FromAfterTo { .. })));
        assert!(UsageRange::new(Some("2026-11-15"), None, NOV_15).is_ok());
    }

    #[test]
    fn refusals_name_a_bounded_number_of_agents() {
        let mut book = UsageBook::default();
        for name in ["a", "b", "c", "a"] {
            book.record_refusal(NOV_15, &agent(name), 2);
        }
        let today = &book.refused.daily["2026-11-15"];
        assert_eq!(today.get(&agent("a")), Some(&2));
        assert_eq!(today.get(&agent("b")), Some(&1));
        assert_eq!(today.get(&agent(OTHER_AGENT)), Some(&1));
    }

    #[test]
    fn reports_group_and_order_by_the_dimensions_given() {
        let mut book = UsageBook::default();
        let env = EnvironmentId::new("e").unwrap();
        book.record_charge(NOV_15, &agent("b"), &[line("x", Some(Source::PayAsYouGo), 5)]);
        book.record_charge(NOV_15, &agent("a"), &[line("y", Some(Source::EnvironmentAllocation), 7)]);
        book.record_charge(NOV_15 + DAY_MS, &agent("a"), &[line("x", None, 2)]);
        book.record_grant(NOV_15, &agent("a"));
        let range = UsageRange::new(None, Some("2026-11-30"), NOV_15 + DAY_MS).unwrap();

        let mut by_agent = Report::new(vec![Dimension::Agent]);
        book.collect(&env, &range, None, &mut by_agent);
        let rows = by_agent.into_rows();
        assert_eq!(rows.iter().map(|r| r.agent.as_ref().unwrap().as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let a = rows[0].totals;
        assert_eq!((a.prepaid_milli, a.overage_milli, a.reservations_granted), (7, 2, 1));
        assert_eq!((rows[1].totals.payg_milli, rows[1].scenario.as_deref()), (5, None));

        let mut by_day_source = Report::new(vec![Dimension::Day, Dimension::Source]);
        book.collect(&env, &range, Some(&agent("a")), &mut by_day_source);
        let rows = by_day_source.into_rows();
        let keys: Vec<_> = rows.iter().map(|r| (r.day.as_deref().unwrap(), r.source)).collect();
        assert_eq!(
            keys,
            [("2026-11-15", None), ("2026-11-15", Some(Source::EnvironmentAllocation)), ("2026-11-16", None)]
        );

        let mut total = Report::new(Vec::new());
        book.collect(&env, &UsageRange::new(Some("2026-10-01"), Some("2026-10-31"), NOV_15).unwrap(), None, &mut total);
        assert_eq!(total.into_rows().len(), 1, "one total row even when nothing was used");
    }
}
