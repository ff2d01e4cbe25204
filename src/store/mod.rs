//! Metadata on disk: atomic writes, the per-domain store, the intent journal.

pub mod atomic;
pub mod journal;
pub mod meta;
pub mod owned;

pub use journal::{Intent, IntentRecord, Journal};
pub use meta::{DomainStore, Layer, Loaded};
