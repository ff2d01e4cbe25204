//! Runs the seed corpus of the `qcow2_image` fuzz target as a test: every
//! file in `tests/corpus/qcow2/` goes through `views::check_image`, the
//! reader's fuzzing entry point. Files named `ok-*` must read (and hold
//! data, except `ok-empty*`), files named `bad-*` must be refused; any
//! other file (one a fuzzer found) only must not panic.
//! `scripts/make-qcow2-corpus.py` makes the seed files.

mod common;

#[test]
fn every_corpus_image_reads_or_is_refused_as_named() {
    let (mut ok, mut bad) = (0, 0);
    for (name, bytes) in common::corpus("qcow2") {
        let name = name.as_str();
        let result = std::panic::catch_unwind(|| vmsnapfs::views::check_image(&bytes))
            .unwrap_or_else(|_| panic!("{name}: the reader panicked"));
        if name.starts_with("ok-") {
            let read = result.unwrap_or_else(|e| panic!("{name}: refused: {e}"));
            assert_eq!(
                read == 0,
                name.starts_with("ok-empty"),
                "{name}: {read} bytes"
            );
            ok += 1;
        } else if name.starts_with("bad-") {
            let e = result.expect_err(name);
            eprintln!("{name}: {e}");
            assert_eq!(e.raw_os_error(), None, "{name}: {e}");
            bad += 1;
        }
    }
    assert!(ok >= 5 && bad >= 10, "{ok} ok, {bad} bad files");
}
