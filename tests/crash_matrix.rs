//! The daemon killed (as by `kill -9`) at every named step of mkdir,
//! rmdir, revert and mv, on a running and on a stopped VM. After a
//! restart the images and the metadata agree, the journal is empty, the
//! live disks hold what they held (or, for a revert, the snapshot's data
//! on every disk), and every surviving snapshot reverts to its own bytes.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

const K64: usize = 64 * 1024;

/// What the test does once the daemon has the crash armed.
#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Delete,
    Revert,
    Rename,
}

const POINTS: &[(&str, Op)] = &[
    ("create.begin", Op::Create),
    ("create.after-backend", Op::Create),
    ("create.after-meta", Op::Create),
    ("delete.begin", Op::Delete),
    ("delete.after-backend", Op::Delete),
    ("delete.before-meta-remove", Op::Delete),
    ("revert.begin", Op::Revert),
    ("revert.after-steps", Op::Revert),
    ("rename.begin", Op::Rename),
];

/// The byte each snapshot holds at the start of both disks.
fn pattern_of(name: &str) -> u8 {
    match name {
        "a" => 0x0a,
        "b" | "b2" => 0x0b,
        "c" => 0x0c,
        other => panic!("unexpected snapshot {other}"),
    }
}

fn write_both(fx: &Fixture, byte: u8, running: bool) {
    for d in ["vda", "vdb"] {
        if running {
            fx.vm
                .qemu_io(d, &format!("write -P 0x{byte:02x} 0 64k"))
                .unwrap();
        } else {
            let img = &fx.vm.disks.iter().find(|x| x.target == d).unwrap().image;
            let st = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", &format!("write -P 0x{byte:02x} 0 64k")])
                .arg(img)
                .output()
                .unwrap();
            assert!(st.status.success());
        }
    }
}

fn live_byte(fx: &Fixture) -> (u8, u8) {
    let a = fx.vm.read_disk("vda").unwrap();
    let b = fx.vm.read_disk("vdb").unwrap();
    assert!(all_bytes(&a, 0, K64, a[0]), "vda torn");
    assert!(all_bytes(&b, 0, K64, b[0]), "vdb torn");
    (a[0], b[0])
}

fn metadata_names(state: &Path) -> BTreeSet<(String, String)> {
    fs::read_dir(state.join("vm1/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .map(|p| {
            let spec =
                vmsnapfs::xml::snapshot::parse_snapshot_xml(&fs::read_to_string(&p).unwrap())
                    .unwrap();
            (spec.name.unwrap(), spec.id.unwrap())
        })
        .collect()
}

fn run_point(point: &str, op: Op, running: bool) {
    let tag = format!(
        "crash-{}-{}",
        point.replace('.', "-"),
        if running { "up" } else { "down" }
    );
    let mut fx = Fixture::new(&tag);
    if !running {
        fx.vm.kill();
        fx.wait_state("shutoff");
    }
    // a (0x0a) <- b (0x0b); live 0x0c.
    write_both(&fx, 0x0a, running);
    fs::create_dir(fx.path("a")).unwrap();
    write_both(&fx, 0x0b, running);
    fs::create_dir(fx.path("b")).unwrap();
    write_both(&fx, 0x0c, running);

    // Arm the crash and do the operation: the daemon dies mid-way.
    let arm = format!("{point}=crash");
    fx.restart_daemon(&[("VMSNAPFS_FAILPOINTS", &arm)]);
    let r = match op {
        Op::Create => fs::create_dir(fx.path("c")),
        Op::Delete => fs::remove_dir(fx.path("a")),
        Op::Revert => write_file(
            &fx.path("a/revert"),
            if running {
                b"running discard"
            } else {
                b"shutoff discard"
            },
        )
        .map_err(std::io::Error::from_raw_os_error),
        Op::Rename => fs::rename(fx.path("b"), fx.path("b2")),
    };
    assert!(
        r.is_err(),
        "{point}: the operation should not have returned"
    );
    // Restart: recovery runs.
    fx.recover_after_crash(point, Duration::from_secs(30));
    let temps: Vec<_> = fs::read_dir(fx.daemon.state.join("vm1/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(temps.is_empty(), "{point}: temp files {temps:?}");

    // The tree, the metadata and every image agree.
    let names: BTreeSet<String> = fx.ls().into_iter().collect();
    let meta = metadata_names(&fx.daemon.state);
    assert_eq!(
        names,
        meta.iter().map(|(n, _)| n.clone()).collect(),
        "{point}: tree vs metadata"
    );
    let ids: BTreeSet<String> = meta.iter().map(|(_, i)| i.clone()).collect();
    for d in &fx.vm.disks {
        let tags: BTreeSet<String> = image_tags(&d.image).into_iter().collect();
        assert_eq!(
            tags,
            ids,
            "{point}: {} vs metadata\n{}",
            d.target,
            fx.read(".log")
        );
    }
    // All or nothing.
    let expect_one_of: &[&[&str]] = match op {
        Op::Create => &[&["a", "b"], &["a", "b", "c"]],
        Op::Delete => &[&["a", "b"], &["b"]],
        Op::Revert => &[&["a", "b"]],
        Op::Rename => &[&["a", "b"], &["a", "b2"]],
    };
    let got: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(
        expect_one_of.contains(&got.as_slice()),
        "{point}: tree {got:?}"
    );
    if let Some(bname) = names.iter().find(|n| n.starts_with('b')) {
        let parent = fs::read_link(fx.path(&format!("{bname}/parent"))).ok();
        if names.contains("a") {
            assert_eq!(
                parent.as_deref().and_then(|p| p.to_str()),
                Some("../a"),
                "{point}"
            );
        } else {
            assert!(parent.is_none(), "{point}: dangling parent");
        }
    }

    // Live disks: untouched, or (revert) the snapshot's bytes on both.
    let live = live_byte(&fx);
    match op {
        Op::Revert => assert!(
            live == (0x0c, 0x0c) || live == (0x0a, 0x0a),
            "{point}: {live:?}"
        ),
        _ => assert_eq!(live, (0x0c, 0x0c), "{point}: live data changed"),
    }

    // Every surviving snapshot reverts to its own bytes.
    for n in &names {
        let target = if running { "running" } else { "shutoff" };
        fx.revert(n, target)
            .unwrap_or_else(|e| panic!("{point}: revert {n}: errno {e}"));
        let p = pattern_of(n);
        assert_eq!(live_byte(&fx), (p, p), "{point}: snapshot {n}");
    }
}

fn run_all(running: bool) {
    let mut runs = 0;
    for (point, op) in POINTS {
        run_point(point, *op, running);
        runs += 1;
    }
    eprintln!(
        "crash matrix ({}): {runs} crash points checked",
        if running { "running VM" } else { "stopped VM" }
    );
}

#[test]
fn crash_at_every_step_on_a_running_vm() {
    run_all(true);
}

#[test]
fn crash_at_every_step_on_a_stopped_vm() {
    run_all(false);
}
