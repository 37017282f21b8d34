//! Durability: the write-ahead log and snapshots that let quotad restart without losing an
//! acknowledged change.

pub mod format;
pub mod journal;
pub mod stats;
pub mod store;
