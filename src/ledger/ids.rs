//! Validated identifiers. The core accepts only these types, so every id it sees is already known
//! to be well-formed; the transport turns a bad string into an error naming the field.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};

/// Longest tenant, environment, agent id or idempotency key, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} bytes long; the limit is {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("contains a character outside printable ASCII (0x21..=0x7E) at byte {index}")]
    NotPrintable { index: usize },
}

fn validate(s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > max {
        return Err(IdError::TooLong { len: s.len(), max });
    }
    match s.bytes().position(|b| !(0x21..=0x7E).contains(&b)) {
        Some(index) => Err(IdError::NotPrintable { index }),
        None => Ok(()),
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(Arc<str>);

        /// As its string, borrowed: every log record names several ids, and going through an owned
        /// `String` (serde's `into`) would allocate and copy each one to write it.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl $name {
            pub fn new(s: &str) -> Result<Self, IdError> {
                validate(s, MAX_ID_BYTES)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    };
}

id_type!(
    /// A customer that buys capacity.
    TenantId
);
id_type!(
    /// A capacity environment or an app environment.
    EnvironmentId
);
id_type!(
    /// The consumer billed for a reservation, e.g. `sales-qualification-agent`.
    AgentId
);
id_type!(
    /// A client-chosen key that makes a retried request return the first answer.
    IdempotencyKey
);
id_type!(
    /// An API key, named by an id the server chose when it created the key.
    ApiKeyId
);

/// Lets the key map be searched with the id read from a request, without building an `ApiKeyId`. Sound
/// because the derived `Hash` and `Eq` of the id are those of its `str`.
impl std::borrow::Borrow<str> for ApiKeyId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Longest reservation id: an environment id, a separator and a decimal u64.
pub const MAX_RESERVATION_ID_BYTES: usize = MAX_ID_BYTES + 1 + 20;

/// A reservation, named by the capacity environment that holds it and a sequence number unique within
/// that environment, so a lookup touches no other environment. Written as `<environment>/<seq>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReservationId {
    pub environment: EnvironmentId,
    pub seq: u64,
}

/// Why a reservation id string cannot name any reservation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReservationIdError {
    #[error("{0}")]
    Invalid(IdError),
    /// Well-formed characters, but not an id this server could have issued.
    #[error("is not a reservation id issued by this server")]
    Unknown,
}

impl ReservationId {
    pub fn parse(s: &str) -> Result<Self, ReservationIdError> {
        validate(s, MAX_RESERVATION_ID_BYTES).map_err(ReservationIdError::Invalid)?;
        let (environment, seq) = s.rsplit_once('/').ok_or(ReservationIdError::Unknown)?;
        // Only canonical decimal: "007" would otherwise alias "7".
        if seq.is_empty() || (seq.len() > 1 && seq.starts_with('0')) {
            return Err(ReservationIdError::Unknown);
        }
        let seq = seq.parse().map_err(|_| ReservationIdError::Unknown)?;
        let environment = EnvironmentId::new(environment).map_err(|_| ReservationIdError::Unknown)?;
        Ok(Self { environment, seq })
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.environment, self.seq)
    }
}

impl fmt::Debug for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_length_limit_is_inclusive() {
        assert!(TenantId::new(&"a".repeat(MAX_ID_BYTES - 1)).is_ok());
        assert!(TenantId::new(&"a".repeat(MAX_ID_BYTES)).is_ok());
        assert_eq!(
            TenantId::new(&"a".repeat(MAX_ID_BYTES + 1)),
            Err(IdError::TooLong { len: MAX_ID_BYTES + 1, max: MAX_ID_BYTES })
        );
    }

    #[test]
    fn ids_must_be_printable_and_non_empty() {
        assert_eq!(AgentId::new(""), Err(IdError::Empty));
        assert_eq!(AgentId::new("a b"), Err(IdError::NotPrintable { index: 1 }));
        assert_eq!(AgentId::new("é"), Err(IdError::NotPrintable { index: 0 }));
        assert_eq!(AgentId::new("sales-agent_1.v2").unwrap().as_str(), "sales-agent_1.v2");
    }

    /// Log records and snapshots written before ids were serialized as borrowed strings still read.
    #[test]
    fn ids_encode_as_their_string() {
        let id = AgentId::new("sales-agent").unwrap();
        let encoded = postcard::to_allocvec(&id).unwrap();
        assert_eq!(encoded, postcard::to_allocvec(&String::from("sales-agent")).unwrap());
        assert_eq!(postcard::from_bytes::<AgentId>(&encoded).unwrap(), id);
        let reservation = ReservationId { environment: EnvironmentId::new("env").unwrap(), seq: 7 };
        let encoded = postcard::to_allocvec(&reservation).unwrap();
        assert_eq!(encoded, postcard::to_allocvec(&("env".to_owned(), 7u64)).unwrap());
    }

    #[test]
    fn reservation_ids_round_trip_and_reject_aliases() {
        let id = ReservationId { environment: EnvironmentId::new("org/env-1").unwrap(), seq: 42 };
        assert_eq!(id.to_string(), "org/env-1/42");
        assert_eq!(ReservationId::parse("org/env-1/42").unwrap(), id);
        for bad in ["env", "env/", "/1", "env/042", "env/-1", "env/1x", "env/99999999999999999999"] {
            assert_eq!(ReservationId::parse(bad), Err(ReservationIdError::Unknown), "{bad}");
        }
        assert!(matches!(ReservationId::parse(""), Err(ReservationIdError::Invalid(IdError::Empty))));
    }
}
