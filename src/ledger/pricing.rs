//! The rate card: how many messages an event costs, by scenario. Prices are exact in milli
//! (thousandths of a message), so fractional rates such as 13 messages per 100 flow actions are
//! charged without rounding drift.
//!
//! The card is versioned: version 1 is the configured card, in force from time 0, and each later
//! version takes effect at its own time. A hold records the version in force when it was made, and its
//! commit is priced with that version, so a price change never reprices a call already under way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{MILLI_PER_MESSAGE, Milli};

/// Most scenarios on one card.
pub const MAX_SCENARIOS: usize = 256;
/// The most a scenario may cost per unit, in messages.
pub const MAX_MESSAGES_PER_UNIT: u64 = 1_000_000;
/// The scenario that use given in messages is reported under; no card may name it.
pub const MESSAGES_SCENARIO: &str = "messages";

/// `messages` per block of `per` units of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub messages: u64,
    pub per: u64,
}

/// Scenario names mapped to their rates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateCard {
    rates: BTreeMap<String, Rate>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("unknown scenario {scenario:?}; known scenarios: {}", known.join(", "))]
    UnknownScenario { index: usize, scenario: String, known: Vec<String> },
    #[error("quantity must be at least 1")]
    ZeroQuantity { index: usize },
    #[error("the priced total does not fit in 64 bits of milli")]
    Overflow,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateCardError {
    #[error("the rate card has no scenarios")]
    Empty,
    #[error("the rate card has {count} scenarios; the limit is {MAX_SCENARIOS}")]
    TooMany { count: usize },
    #[error("scenario {0:?}: the name is reserved for use given in messages")]
    ReservedName(String),
    #[error("scenario {0:?}: `per` must be at least 1")]
    ZeroPer(String),
    #[error("scenario {0:?}: the name must be 1 to 64 bytes of [a-z0-9_]")]
    BadName(String),
    #[error("scenario {0:?}: the rate must not exceed 1,000,000 messages per unit")]
    TooExpensive(String),
}

impl Default for RateCard {
    fn default() -> Self {
        let rate = |messages, per| Rate { messages, per };
        Self::new([
            ("classic_answer", rate(1, 1)),
            ("generative_answer", rate(2, 1)),
            ("agent_action", rate(5, 1)),
            ("tenant_graph_grounding", rate(10, 1)),
            ("agent_flow_actions", rate(13, 100)),
            ("ai_tools_basic", rate(1, 10)),
            ("ai_tools_standard", rate(15, 10)),
            ("ai_tools_premium", rate(100, 10)),
            ("content_processing", rate(8, 1)),
        ])
        .expect("the default rate card is valid")
    }
}

impl RateCard {
    pub fn new<'a>(rates: impl IntoIterator<Item = (&'a str, Rate)>) -> Result<Self, RateCardError> {
        let rates: BTreeMap<String, Rate> = rates.into_iter().map(|(name, rate)| (name.to_owned(), rate)).collect();
        if rates.is_empty() {
            return Err(RateCardError::Empty);
        }
        if rates.len() > MAX_SCENARIOS {
            return Err(RateCardError::TooMany { count: rates.len() });
        }
        for (name, rate) in &rates {
            check_rate(name, *rate)?;
        }
        Ok(Self { rates })
    }

    /// The scenarios and their rates, ordered by scenario.
    pub fn rates(&self) -> impl Iterator<Item = (&str, Rate)> + '_ {
        self.rates.iter().map(|(name, rate)| (name.as_str(), *rate))
    }

    /// The exact price of `quantity` units of one item, the `index`-th of its request.
    pub fn price_item(&self, index: usize, scenario: &str, quantity: u64) -> Result<Milli, PricingError> {
        let Some(rate) = self.rates.get(scenario) else {
            return Err(PricingError::UnknownScenario {
                index,
                scenario: scenario.to_owned(),
                known: self.rates.keys().cloned().collect(),
            });
        };
        if quantity == 0 {
            return Err(PricingError::ZeroQuantity { index });
        }
        // u64 × u64 fits in u128, but not always times 1000 (a rate of u64::MAX messages per u64::MAX units
        // is valid); the quotient may not fit in u64 either. Both are checked.
        let units = u128::from(quantity) * u128::from(rate.messages);
        let milli = units.checked_mul(u128::from(MILLI_PER_MESSAGE)).ok_or(PricingError::Overflow)?;
        u64::try_from(milli.div_ceil(u128::from(rate.per))).map_err(|_| PricingError::Overflow)
    }

    /// The exact price of a list of (scenario, quantity) items. A fractional milli is rounded up, so
    /// usage is never under-billed.
    pub fn price<'a>(&self, items: impl IntoIterator<Item = (&'a str, u64)>) -> Result<Milli, PricingError> {
        let mut total: Milli = 0;
        for (index, (scenario, quantity)) in items.into_iter().enumerate() {
            let milli = self.price_item(index, scenario, quantity)?;
            total = total.checked_add(milli).ok_or(PricingError::Overflow)?;
        }
        Ok(total)
    }
}

/// Checks one scenario of a card: its name, `per` at least 1, and at most
/// [`MAX_MESSAGES_PER_UNIT`] messages per unit.
pub fn check_rate(name: &str, rate: Rate) -> Result<(), RateCardError> {
    let good_name = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !good_name {
        return Err(RateCardError::BadName(name.to_owned()));
    }
    if name == MESSAGES_SCENARIO {
        return Err(RateCardError::ReservedName(name.to_owned()));
    }
    if rate.per == 0 {
        return Err(RateCardError::ZeroPer(name.to_owned()));
    }
    if rate.messages / rate.per > MAX_MESSAGES_PER_UNIT {
        return Err(RateCardError::TooExpensive(name.to_owned()));
    }
    Ok(())
}

/// One version of the rate card and the time it takes effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateCardVersion {
    pub version: u32,
    pub effective_at_ms: u64,
    pub card: RateCard,
}

/// Every version of the rate card, oldest first.
///
/// Invariant: versions are numbered 1, 2, 3… without gaps and their effective times never decrease,
/// so the version in force at a time is the newest one whose time has come.
#[derive(Debug, Clone)]
pub struct RateCards {
    versions: Vec<RateCardVersion>,
}

impl RateCards {
    /// Version 1 alone: the configured card, in force from time 0.
    pub fn new(configured: RateCard) -> Self {
        Self { versions: vec![RateCardVersion { version: 1, effective_at_ms: 0, card: configured }] }
    }

    pub fn in_force(&self, now: u64) -> &RateCardVersion {
        let later = self.versions.partition_point(|v| v.effective_at_ms <= now);
        &self.versions[later.max(1) - 1]
    }

    pub fn version(&self, version: u32) -> Option<&RateCardVersion> {
        self.versions.get((version as usize).checked_sub(1)?)
    }

    pub fn newest(&self) -> &RateCardVersion {
        self.versions.last().expect("version 1 is always there")
    }

    pub fn len(&self) -> usize {
        self.versions.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Adds the next version; the caller has checked its number and time.
    pub fn push(&mut self, next: RateCardVersion) {
        assert_eq!(next.version, self.newest().version + 1, "rate card versions are numbered without gaps");
        assert!(next.effective_at_ms >= self.newest().effective_at_ms, "effective times never decrease");
        self.versions.push(next);
    }

    /// The versions after the configured one, which snapshots keep.
    pub fn added(&self) -> &[RateCardVersion] {
        &self.versions[1..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rates_are_exact_in_milli() {
        let card = RateCard::default();
        let price = |s, q| card.price([(s, q)]).unwrap();
        assert_eq!(price("classic_answer", 1), 1_000);
        assert_eq!(price("generative_answer", 3), 6_000);
        assert_eq!(price("agent_flow_actions", 1), 130);
        assert_eq!(price("agent_flow_actions", 100), 13_000);
        assert_eq!(price("ai_tools_basic", 1), 100);
        assert_eq!(price("ai_tools_standard", 1), 1_500);
        assert_eq!(price("ai_tools_premium", 1), 10_000);
        assert_eq!(price("content_processing", 2), 16_000);
        assert_eq!(card.price([("agent_action", 2), ("classic_answer", 1)]).unwrap(), 11_000);
    }

    #[test]
    fn fractional_milli_rounds_up() {
        let card = RateCard::new([("odd", Rate { messages: 1, per: 3 })]).unwrap();
        assert_eq!(card.price([("odd", 1)]).unwrap(), 334);
        assert_eq!(card.price([("odd", 3)]).unwrap(), 1_000);
    }

    #[test]
    fn bad_items_are_named() {
        let card = RateCard::default();
        let err = card.price([("classic_answer", 1), ("nope", 1)]).unwrap_err();
        assert!(matches!(err, PricingError::UnknownScenario { index: 1, .. }));
        assert!(err.to_string().contains("generative_answer"));
        assert_eq!(card.price([("classic_answer", 0)]), Err(PricingError::ZeroQuantity { index: 0 }));
        assert_eq!(card.price([("ai_tools_premium", u64::MAX)]), Err(PricingError::Overflow));
    }

    #[test]
    fn the_largest_quantity_at_the_largest_rate_overflows_without_a_panic() {
        // u64::MAX × u64::MAX × 1000 does not fit in u128; the rate itself (1 message per unit) is valid.
        let card = RateCard::new([("wide", Rate { messages: u64::MAX, per: u64::MAX })]).unwrap();
        assert_eq!(card.price([("wide", u64::MAX)]), Err(PricingError::Overflow));
        assert_eq!(card.price([("wide", 1)]), Ok(1_000));
        assert_eq!(card.price([("wide", u64::MAX / 1_000)]), Ok(u64::MAX / 1_000 * 1_000));
    }

    #[test]
    fn invalid_cards_are_refused() {
        assert_eq!(RateCard::new([]), Err(RateCardError::Empty));
        assert!(matches!(RateCard::new([("x", Rate { messages: 1, per: 0 })]), Err(RateCardError::ZeroPer(_))));
        assert!(matches!(RateCard::new([("Bad Name", Rate { messages: 1, per: 1 })]), Err(RateCardError::BadName(_))));
        let reserved = RateCard::new([(MESSAGES_SCENARIO, Rate { messages: 1, per: 1 })]);
        assert!(matches!(reserved, Err(RateCardError::ReservedName(_))));
        let names: Vec<String> = (0..=MAX_SCENARIOS).map(|i| format!("s{i}")).collect();
        let card =
            |n: usize| RateCard::new(names[..n].iter().map(|name| (name.as_str(), Rate { messages: 1, per: 1 })));
        assert!(card(MAX_SCENARIOS - 1).is_ok());
        assert!(card(MAX_SCENARIOS).is_ok());
        assert_eq!(card(MAX_SCENARIOS + 1), Err(RateCardError::TooMany { count: MAX_SCENARIOS + 1 }));
    }

    #[test]
    fn the_version_in_force_is_the_newest_whose_time_has_come() {
        let mut cards = RateCards::new(RateCard::default());
        let cheap = RateCard::new([("classic_answer", Rate { messages: 1, per: 2 })]).unwrap();
        cards.push(RateCardVersion { version: 2, effective_at_ms: 100, card: cheap.clone() });
        cards.push(RateCardVersion { version: 3, effective_at_ms: 100, card: cheap });
        assert_eq!(cards.in_force(0).version, 1);
        assert_eq!(cards.in_force(99).version, 1);
        assert_eq!(cards.in_force(100).version, 3);
        assert_eq!(cards.version(0), None);
        assert_eq!(cards.version(2).map(|v| v.effective_at_ms), Some(100));
        assert_eq!(cards.version(4), None);
        assert_eq!(cards.added().len(), 2);
    }
}
