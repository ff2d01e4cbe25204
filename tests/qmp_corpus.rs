//! Runs the seed corpus of the `qmp_line` fuzz target as a test.
//!
//! Every file in `tests/corpus/qmp/` goes through
//! `backend::qmp_message::check_lines`, the fuzz target's entry point
//! (each line decoded as the QMP session reads it, and what is accepted
//! written back and decoded again). Files named `ok-*` (lines captured
//! from QEMU 7.2 and 10.0, and shapes QEMU sends) must be accepted line
//! by line; files named `bad-*` must have a line refused; any other file
//! (one a fuzzer found) only must not panic.

use std::fs;
use std::path::{Path, PathBuf};

use vmsnapfs::backend::qmp_message::check_lines;

#[test]
fn qmp_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/qmp");
    let mut paths: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    assert!(paths.len() >= 40, "{} holds too few files", root.display());
    let (mut ok, mut bad) = (0, 0);
    for path in paths {
        let bytes = fs::read(&path).unwrap();
        let accepted = check_lines(&bytes);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
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
