//! Runs the seed corpus of the `guest_disk` fuzz target as a test: every
//! disk image in `tests/corpus/guestfs/` goes through
//! `guestfs::disk::check_image`, which reads it as `files/` would. Files
//! named `ok-*` must show at least one filesystem with data; files named
//! `bad-*` must show none, or say why in the notes `.log` would get; any
//! other file (one a fuzzer found) only must not panic.
//! `scripts/make-guestfs-corpus.sh` makes the seed images.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use vmsnapfs::guestfs::disk::{check_image, Disk};
use vmsnapfs::guestfs::source::MemView;
use vmsnapfs::guestfs::Kind;

fn corpus(name: &str) -> Vec<u8> {
    fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/corpus/guestfs")
            .join(name),
    )
    .unwrap()
}

#[test]
fn every_corpus_image_reads_or_is_refused_as_named() {
    let (mut ok, mut bad) = (0, 0);
    for (name, bytes) in common::corpus("guestfs") {
        let name = name.as_str();
        let checked = std::panic::catch_unwind(|| check_image(&bytes))
            .unwrap_or_else(|_| panic!("{name}: the reader panicked"));
        eprintln!("{name}: {checked:?}");
        if name.starts_with("ok-") {
            assert!(
                checked.filesystems >= 1 && checked.bytes > 0 && checked.entries >= 5,
                "{name}: {checked:?}"
            );
            ok += 1;
        } else if name.starts_with("bad-") {
            assert!(
                checked.filesystems == 0 || !checked.notes.is_empty(),
                "{name}: read without a word: {checked:?}"
            );
            bad += 1;
        }
    }
    assert!(ok >= 7 && bad >= 8, "{ok} ok, {bad} bad files");
}

/// Reads `path` of partition `part` of a disk image.
fn read(image: &[u8], part: u32, path: &[u8]) -> Vec<u8> {
    let mut disk = Disk::new();
    disk.set_view(Arc::new(MemView(image.to_vec())), image.len() as u64);
    let mut buf = vec![0u8; 1 << 20];
    let n = disk
        .with_fs(part, &mut |_| {}, |fs| fs.read(path, 0, &mut buf))
        .expect("a filesystem")
        .unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn a_journal_that_needs_recovery_is_applied_in_memory() {
    let image = corpus("ok-ext4-dirty-journal.img");
    assert_eq!(read(&image, 0, b"/hello.txt"), b"howdy\n");
    assert_eq!(read(&corpus("ok-ext4.img"), 0, b"/hello.txt"), b"hello\n");
    let mut notes = Vec::new();
    let mut disk = Disk::new();
    disk.set_view(Arc::new(MemView(image.clone())), image.len() as u64);
    disk.with_fs(0, &mut |n| notes.push(n), |_| Ok(()))
        .unwrap()
        .unwrap();
    assert!(
        notes.iter().any(|n| n.contains("journal needs recovery")),
        "{notes:?}"
    );
}

#[test]
fn partitions_are_numbered_as_linux_numbers_them() {
    for (image, fat, ext) in [("ok-gpt.img", 2, 1), ("ok-mbr.img", 1, 5)] {
        let bytes = corpus(image);
        let mut disk = Disk::new();
        disk.set_view(Arc::new(MemView(bytes.clone())), bytes.len() as u64);
        let mut parts = disk.partitions(&mut |_| {});
        parts.sort();
        let mut want = vec![fat, ext];
        want.sort();
        assert_eq!(parts, want, "{image}");
        assert_eq!(read(&bytes, fat, b"/hello.txt"), b"hello\n", "{image}");
        assert_eq!(
            read(&bytes, ext, b"/dir/sub/deep.txt"),
            b"deep\n",
            "{image}"
        );
        let link = disk
            .with_fs(ext, &mut |_| {}, |fs| fs.read_link(b"/dir/link"))
            .unwrap()
            .unwrap();
        assert_eq!(link, b"../hello.txt");
        let attr = disk
            .with_fs(ext, &mut |_| {}, |fs| fs.stat(b"/dir"))
            .unwrap()
            .unwrap();
        assert_eq!((attr.kind, attr.perm, attr.uid), (Kind::Dir, 0o750, 1000));
    }
}
