//! Runs the seed corpus of the XML fuzz targets as a test.
//!
//! Every file in `tests/corpus/domain/` goes through `parse_domain_def` and
//! `redact_secrets`, every file in `tests/corpus/snapshot/` through
//! `parse_snapshot_xml` (and a write/parse round trip when it describes a
//! complete snapshot). Files named `ok-*.xml` must parse, files named
//! `bad-*.xml` must be refused; any other file (e.g. one a fuzzer found)
//! only must not panic.

use std::fs;
use std::path::{Path, PathBuf};

use vmsnapfs::xml::{
    parse_domain_def, parse_snapshot_xml, redact_secrets, snapshot_from_spec, write_snapshot_xml,
    XmlError,
};

/// What a corpus file's name promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Ok,
    Err,
    Anything,
}

/// The files of `tests/corpus/<dir>`, sorted, with their expected outcome.
fn corpus(dir: &str) -> Vec<(PathBuf, Expect, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut paths: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "{} is empty", root.display());
    paths
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let expect = if name.starts_with("ok-") {
                Expect::Ok
            } else if name.starts_with("bad-") {
                Expect::Err
            } else {
                Expect::Anything
            };
            let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, expect, bytes)
        })
        .collect()
}

/// Checks an outcome against the file name's promise.
fn check<T: std::fmt::Debug>(path: &Path, expect: Expect, result: &Result<T, XmlError>) {
    match (expect, result) {
        (Expect::Ok, Err(e)) => panic!("{}: expected Ok, got: {e}", path.display()),
        (Expect::Err, Ok(v)) => panic!("{}: expected an error, got: {v:?}", path.display()),
        (_, Err(e)) => assert!(!e.to_string().is_empty(), "{}", path.display()),
        _ => {}
    }
}

#[test]
fn domain_corpus() {
    let files = corpus("domain");
    assert!(files.iter().any(|(_, e, _)| *e == Expect::Ok));
    assert!(files.iter().any(|(_, e, _)| *e == Expect::Err));
    for (path, expect, bytes) in files {
        let Ok(text) = std::str::from_utf8(&bytes) else {
            assert_ne!(expect, Expect::Ok, "{}: not UTF-8", path.display());
            continue;
        };
        let result = parse_domain_def(text);
        check(&path, expect, &result);
        let redacted = redact_secrets(text);
        if let Ok(def) = result {
            assert_eq!(def.xml, text);
            // Redaction keeps a definition readable and its meaning intact.
            let again = parse_domain_def(&redacted)
                .unwrap_or_else(|e| panic!("{}: redacted XML: {e}", path.display()));
            assert_eq!(again.name, def.name);
            assert_eq!(again.monitor, def.monitor);
            assert_eq!(again.disks, def.disks);
            assert_eq!(again.commandline, def.commandline);
            assert_eq!(again.policy, def.policy);
        }
        for secret in ["s3cret", "other'secret", "other&apos;secret"] {
            assert!(
                !redacted.contains(secret),
                "{}: {secret} survived redaction",
                path.display()
            );
        }
    }
}

#[test]
fn snapshot_corpus() {
    let files = corpus("snapshot");
    assert!(files.iter().any(|(_, e, _)| *e == Expect::Ok));
    assert!(files.iter().any(|(_, e, _)| *e == Expect::Err));
    let mut complete = 0;
    for (path, expect, bytes) in files {
        let Ok(text) = std::str::from_utf8(&bytes) else {
            assert_ne!(expect, Expect::Ok, "{}: not UTF-8", path.display());
            continue;
        };
        let result = parse_snapshot_xml(text);
        check(&path, expect, &result);
        let Ok(spec) = result else { continue };
        let Ok((snap, parent_name)) = snapshot_from_spec(spec) else {
            continue;
        };
        complete += 1;
        let written = write_snapshot_xml(&snap, parent_name.as_deref());
        let spec = parse_snapshot_xml(&written)
            .unwrap_or_else(|e| panic!("{}: written XML: {e}\n{written}", path.display()));
        let (again, again_parent) = snapshot_from_spec(spec)
            .unwrap_or_else(|e| panic!("{}: written XML: {e}\n{written}", path.display()));
        assert_eq!(again, snap, "{}", path.display());
        assert_eq!(again_parent, parent_name, "{}", path.display());
        assert_eq!(
            write_snapshot_xml(&again, again_parent.as_deref()),
            written,
            "{}",
            path.display()
        );
    }
    assert!(complete > 0, "no complete snapshot in the corpus");
}
