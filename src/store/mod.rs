//! Metadata on disk: atomic writes, the per-domain store, the intent journal.

pub mod atomic;
pub mod journal;
pub mod meta;
pub mod owned;
pub mod record;
pub mod safe_dir;

pub use journal::{Intent, IntentRecord, Journal, RevertRecord};
pub use meta::{DomainStore, Layer, Loaded};

/// Entry point of the `journal` fuzz target and of the corpus test: runs
/// every durable record parser (the intent journal, `layers`,
/// `layers.history`, `pending-tag-deletes`, `frozen`, `made`) over
/// `data`. Panics if one panics, or if something it accepted does not
/// come back the same after being written again.
pub fn check_record_parsers(data: &[u8]) {
    fn round_trip<T: PartialEq + std::fmt::Debug>(
        what: &str,
        parsed: Option<T>,
        encode: impl Fn(&T) -> Vec<u8>,
        parse: impl Fn(&[u8]) -> Option<T>,
    ) {
        if let Some(v) = parsed {
            let again = parse(&encode(&v));
            assert_eq!(
                again.as_ref(),
                Some(&v),
                "{what}: a record read back differs"
            );
        }
    }
    round_trip(
        "intent",
        Intent::from_record(data),
        Intent::to_record,
        Intent::from_record,
    );
    round_trip(
        "layers",
        meta::parse_layers(data),
        meta::encode_layers,
        meta::parse_layers,
    );
    round_trip(
        "layers.history",
        meta::parse_history(data),
        |v| meta::encode_history(v),
        meta::parse_history,
    );
    round_trip(
        "pending-tag-deletes",
        meta::parse_pending_tag_deletes(data),
        |v| meta::encode_pending_tag_deletes(v),
        meta::parse_pending_tag_deletes,
    );
    round_trip(
        "frozen",
        meta::parse_frozen(data),
        meta::encode_frozen,
        meta::parse_frozen,
    );
    round_trip(
        "made",
        meta::parse_made(data),
        |v| meta::encode_made(v),
        meta::parse_made,
    );
}
