//! The rate card: how many messages an event costs, by scenario. Prices are exact in milli
//! (thousandths of a message), so fractional rates such as 13 messages per 100 flow actions are
//! charged without rounding drift.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{MILLI_PER_MESSAGE, Milli};

/// The version of the rate card every hold is charged at. The rate card is not versioned yet; holds
/// and their events already record it, so that versioning it changes no log or snapshot format.
pub const RATE_CARD_VERSION: u32 = 1;

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
        for (name, rate) in &rates {
            let good_name = (1..=64).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !good_name {
                return Err(RateCardError::BadName(name.clone()));
            }
            if rate.per == 0 {
                return Err(RateCardError::ZeroPer(name.clone()));
            }
            if rate.messages / rate.per > 1_000_000 {
                return Err(RateCardError::TooExpensive(name.clone()));
            }
        }
        Ok(Self { rates })
    }

    /// The exact price of a list of (scenario, quantity) items. A fractional milli is rounded up, so
    /// usage is never under-billed.
    pub fn price<'a>(&self, items: impl IntoIterator<Item = (&'a str, u64)>) -> Result<Milli, PricingError> {
        let mut total: u128 = 0;
        for (index, (scenario, quantity)) in items.into_iter().enumerate() {
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
            // u64 × u64 × 1000 fits in u128, so only the sum can overflow, and it is checked below.
            let milli =
                (quantity as u128 * rate.messages as u128 * MILLI_PER_MESSAGE as u128).div_ceil(rate.per as u128);
            total = total.checked_add(milli).ok_or(PricingError::Overflow)?;
        }
        u64::try_from(total).map_err(|_| PricingError::Overflow)
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
    fn invalid_cards_are_refused() {
        assert_eq!(RateCard::new([]), Err(RateCardError::Empty));
        assert!(matches!(RateCard::new([("x", Rate { messages: 1, per: 0 })]), Err(RateCardError::ZeroPer(_))));
        assert!(matches!(RateCard::new([("Bad Name", Rate { messages: 1, per: 1 })]), Err(RateCardError::BadName(_))));
    }
}
