//! The kernel's caches never lie: names the daemon removes or adds by
//! itself (a subtree delete, `.create`, a revert's `left-*` snapshot) are
//! seen at once by `stat` and `ls`, as a new user would try it, and the
//! inode numbers of removed names are forgotten.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn stat_errno(p: &Path) -> i32 {
    match fs::symlink_metadata(p) {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// Stats every file of a snapshot, so the kernel caches each entry.
fn stat_all(fx: &Fixture, snap: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for e in fs::read_dir(fx.path(snap)).unwrap() {
        let e = e.unwrap();
        let rel = format!("{snap}/{}", e.file_name().to_string_lossy());
        fs::symlink_metadata(fx.path(&rel)).unwrap();
        seen.push(rel);
    }
    for sub in ["disks", "images"] {
        for e in fs::read_dir(fx.path(&format!("{snap}/{sub}"))).unwrap() {
            let rel = format!("{snap}/{sub}/{}", e.unwrap().file_name().to_string_lossy());
            fs::symlink_metadata(fx.path(&rel)).unwrap();
            seen.push(rel);
        }
    }
    seen
}

/// The inode numbers the daemon holds, from `/.stats`.
fn inodes(fx: &Fixture) -> usize {
    let stats = fs::read_to_string(fx.daemon.mnt.join(".stats")).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("inodes "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no inode count in {stats:?}"))
}

#[test]
fn a_subtree_delete_is_seen_at_once_by_stat() {
    let fx = Fixture::new("cache-subtree");
    // mkdir a b c: a chain (each new snapshot is a child of the current).
    for n in ["a", "b", "c"] {
        fs::create_dir(fx.path(n)).unwrap();
    }
    let mut cached = Vec::new();
    for n in ["a", "b", "c"] {
        cached.push(n.to_owned());
        cached.extend(stat_all(&fx, n));
    }
    assert_eq!(fx.ls(), vec!["a", "b", "c"]);
    write_file(&fx.path("a/delete"), b"subtree\n").unwrap();
    assert!(fx.ls().is_empty(), "{:?}", fx.ls());
    // Every name of the subtree is gone for stat too, at once (the kernel
    // had each one cached for a minute).
    for rel in &cached {
        assert_eq!(stat_errno(&fx.path(rel)), libc::ENOENT, "{rel} still stats");
    }
    assert_eq!(stat_errno(&fx.path("b")), libc::ENOENT);
    // The names can be taken again at once.
    fs::create_dir(fx.path("b")).unwrap();
    assert_eq!(fx.ls(), vec!["b"]);
    assert_eq!(fx.read("b/state"), "running\n");
}

#[test]
fn a_renamed_snapshot_deleted_by_its_control_file_is_gone_under_its_new_name() {
    let fx = Fixture::new("cache-rename");
    fs::create_dir(fx.path("a")).unwrap();
    stat_all(&fx, "a");
    fs::rename(fx.path("a"), fx.path("a2")).unwrap();
    stat_all(&fx, "a2");
    assert_eq!(stat_errno(&fx.path("a")), libc::ENOENT);
    write_file(&fx.path("a2/delete"), b"self").unwrap();
    assert_eq!(stat_errno(&fx.path("a2")), libc::ENOENT);
    assert_eq!(stat_errno(&fx.path("a2/state")), libc::ENOENT);
    assert!(fx.ls().is_empty());
}

#[test]
fn names_a_revert_or_a_create_adds_are_seen_at_once() {
    let fx = Fixture::new("cache-add");
    fs::create_dir(fx.path("s")).unwrap();
    stat_all(&fx, "s");
    assert_eq!(fx.ls(), vec!["s"]);
    // `.create`: the name did not exist a moment ago (and was looked up).
    assert_eq!(stat_errno(&fx.path("made")), libc::ENOENT);
    write_file(
        &fx.path(".create"),
        b"<domainsnapshot><name>made</name></domainsnapshot>",
    )
    .unwrap();
    assert!(fs::metadata(fx.path("made")).unwrap().is_dir());
    assert_eq!(fx.read("made/state"), "running\n");
    assert_eq!(fx.ls(), vec!["made", "s"]);
    // A revert keeps what it leaves as left-*: in ls and stat at once.
    fx.vm.qemu_io("vda", "write -P 0x5a 0 64k").unwrap();
    fx.revert("s", "running").unwrap();
    let names = fx.ls();
    let left: Vec<&String> = names.iter().filter(|n| n.starts_with("left-")).collect();
    assert_eq!(left.len(), 1, "{names:?}");
    let left = left[0].clone();
    assert!(fs::metadata(fx.path(&left)).unwrap().is_dir());
    assert_eq!(
        fs::read_link(fx.path(&format!("{left}/parent")))
            .unwrap()
            .to_str(),
        Some("../made")
    );
    assert_eq!(
        fs::read_link(fx.path(".current")).unwrap().to_str(),
        Some("s")
    );
    // And a delete of it through its control file is seen at once too.
    stat_all(&fx, &left);
    write_file(&fx.path(&format!("{left}/delete")), b"self").unwrap();
    assert_eq!(stat_errno(&fx.path(&left)), libc::ENOENT);
    assert_eq!(fx.ls(), vec!["made", "s"]);
}

#[test]
fn the_inode_table_shrinks_after_lookups_of_removed_names() {
    let fx = Fixture::new("cache-forget");
    fs::create_dir(fx.path("keep")).unwrap();
    stat_all(&fx, "keep");
    let before = inodes(&fx);
    let mut looked_up = 0;
    for i in 0..12 {
        let name = format!("gone{i}");
        fs::create_dir(fx.path(&name)).unwrap();
        looked_up += stat_all(&fx, &name).len() + 1;
        write_file(&fx.path(&format!("{name}/delete")), b"self").unwrap();
        assert_eq!(stat_errno(&fx.path(&name)), libc::ENOENT);
    }
    assert!(looked_up > 100, "{looked_up}");
    // The kernel forgets the inodes of invalidated names (its FORGET
    // messages come on their own time): the table goes back to what the
    // names that still exist need.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = inodes(&fx);
        if now <= before + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the table holds {now} numbers, {before} before {looked_up} lookups of names now removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The names that remain keep their numbers and still work.
    assert_eq!(fx.ls(), vec!["keep"]);
    assert_eq!(fx.read("keep/state"), "running\n");
}
