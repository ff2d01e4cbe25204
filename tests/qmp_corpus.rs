//! Runs the seed corpus of the `qmp_line` fuzz target as a test.
//!
//! Every file in `tests/corpus/qmp/` goes through
//! `backend::qmp_message::check_lines`, the fuzz target's entry point
//! (each line decoded as the QMP session reads it, and what is accepted
//! written back and decoded again). Files named `ok-*` (lines captured
//! from QEMU 7.2 and 10.0, and shapes QEMU sends) must be accepted line
//! by line; files named `bad-*` must have a line refused; any other file
//! (one a fuzzer found) only must not panic.

mod common;

use vmsnapfs::backend::qmp_message::check_lines;

#[test]
fn qmp_corpus() {
    let files = common::corpus("qmp");
    assert!(files.len() >= 40, "tests/corpus/qmp holds too few files");
    let (mut ok, mut bad) = (0, 0);
    for (name, bytes) in files {
        let accepted = check_lines(&bytes);
        if name.starts_with("ok-") {
            assert!(accepted.iter().all(|a| *a), "{name}: a line is refused");
            ok += 1;
        } else if name.starts_with("bad-") {
            assert!(accepted.iter().any(|a| !a), "{name} is accepted");
            bad += 1;
        }
    }
    assert!(ok >= 20 && bad >= 15, "{ok} ok, {bad} bad");
}
