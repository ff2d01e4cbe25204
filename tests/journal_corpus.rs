//! Runs the seed corpus of the `journal` fuzz target as a test.
//!
//! Every file in `tests/corpus/journal/` goes through
//! `store::check_record_parsers`, the fuzz target's entry point (every
//! record parser, and a write/read round trip of what it accepts). The
//! extension says which record the file is (`.intent`, `.layers`,
//! `.history`, `.pending`, `.frozen`, `.made`): files named `ok-*` must be
//! read as that record, files named `bad-*` must be refused by it; any
//! other file (one a fuzzer found) only must not panic. `ok-old-*` files
//! are records in the line format of earlier versions.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use vmsnapfs::store::{check_record_parsers, meta, Intent, RevertRecord};

/// Whether the record parser for `kind` accepts `bytes`.
fn accepts(kind: &str, bytes: &[u8]) -> bool {
    match kind {
        "intent" => Intent::from_record(bytes).is_some(),
        "layers" => meta::parse_layers(bytes).is_some(),
        "history" => meta::parse_history(bytes).is_some(),
        "pending" => meta::parse_pending_tag_deletes(bytes).is_some(),
        "frozen" => meta::parse_frozen(bytes).is_some(),
        "made" => meta::parse_made(bytes).is_some(),
        other => panic!("unknown record kind {other:?}"),
    }
}

#[test]
fn journal_corpus() {
    let files = common::corpus("journal");
    assert!(
        files.len() >= 20,
        "tests/corpus/journal holds too few files"
    );
    let (mut ok, mut bad) = (0, 0);
    for (name, bytes) in files {
        check_record_parsers(&bytes);
        let kind = Path::new(&name)
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("ok-") {
            assert!(accepts(&kind, &bytes), "{name} is not read as {kind}");
            ok += 1;
        } else if name.starts_with("bad-") {
            assert!(!accepts(&kind, &bytes), "{name} is read as {kind}");
            bad += 1;
        }
    }
    assert!(ok > 0 && bad > 0);
}

/// The old records in the corpus read as what the earlier version meant.
#[test]
fn old_records_mean_what_they_said() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/journal");
    let read = |name: &str| Intent::from_record(&fs::read(root.join(name)).unwrap());
    assert_eq!(
        read("ok-old-create-external.intent"),
        Some(Intent::CreateExternal {
            id: "vs-18f3a-1".into(),
            name: "ext".into(),
            overlays: vec![
                ("vda".into(), "/img/vm1-vda.ext.qcow2".into()),
                ("vdb".into(), "/img/a\tb.qcow2".into()),
            ],
            plan: "<domainsnapshot>\n  <name>ext</name>\n</domainsnapshot>".into(),
        })
    );
    assert_eq!(
        read("ok-old-revert-relocate.intent"),
        Some(Intent::RevertRelocate {
            revert: RevertRecord {
                id: "vs-18f3a-3".into(),
                target: "shutoff".into(),
                left: None,
                discard: vec!["/img/x.qcow2".into()],
            },
            moved: vec![(
                "/img/base.qcow2".into(),
                "/img/base.moved-1795315805-1.qcow2".into()
            )],
        })
    );
    let layers = meta::parse_layers(&fs::read(root.join("ok-old.layers")).unwrap()).unwrap();
    assert_eq!(layers["vdb"].path, PathBuf::from("/img/b\\c.raw"));
    assert_eq!(layers["vdb"].format, "raw");
}
