//! The daemon killed (as by `kill -9`) at every named step of a delete
//! of an external snapshot and of the reverts that branch or move images,
//! on a running and a stopped VM. After a restart: an empty journal, the
//! operation finished or undone as a whole, every remaining snapshot's
//! view and the live disks as they must be, no image nothing needs, and
//! `qemu-img check` clean.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;
use vmsnapfs::demo::vm::read_image;

const K64: usize = 64 * 1024;

fn first_byte(data: &[u8]) -> u8 {
    assert!(all_bytes(data, 0, K64, data[0]), "torn");
    data[0]
}

/// Both disks' first byte through the snapshot's views.
fn view_byte(fx: &Fixture, snap: &str) -> u8 {
    let a = first_byte(&fs::read(fx.path(&format!("{snap}/disks/vda"))).unwrap());
    let b = first_byte(&fs::read(fx.path(&format!("{snap}/disks/vdb"))).unwrap());
    assert_eq!(a, b, "{snap}: disks disagree");
    a
}

fn live_byte(fx: &Fixture, running: bool) -> u8 {
    let read = |d: &str| {
        if running {
            fx.vm.read_disk(d).unwrap()
        } else {
            read_image(&active_layer(fx, d)).unwrap()
        }
    };
    let a = first_byte(&read("vda"));
    assert_eq!(a, first_byte(&read("vdb")), "live disks disagree");
    a
}

fn write_both(fx: &Fixture, byte: u8, running: bool) {
    for d in ["vda", "vdb"] {
        let cmd = format!("write -P 0x{byte:02x} 0 64k");
        if running {
            fx.vm.qemu_io(d, &cmd).unwrap();
            fx.vm.qemu_io(d, "flush").unwrap();
        } else {
            let out = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", &cmd])
                .arg(active_layer(fx, d))
                .output()
                .unwrap();
            assert!(out.status.success());
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// rmdir of the middle snapshot of a chain.
    Delete,
    /// revert to the first snapshot of a chain (a branch).
    Branch,
}

fn crash_run(point: &str, op: Op, running: bool) {
    let tag = format!(
        "xcr-{}-{:?}-{}",
        point.replace('.', "-"),
        op,
        if running { "up" } else { "down" }
    );
    let mut fx = Fixture::with_policy(&tag, "external-disk-only", &[]);
    if !running {
        fx.vm.kill();
        fx.wait_state("shutoff");
        // The layers record names the defined images until a snapshot.
        fs::create_dir(fx.path("z")).unwrap();
        fs::remove_dir(fx.path("z")).unwrap();
    }
    for (s, b) in [("a", 0x0a), ("b", 0x0b), ("c", 0x0c)] {
        write_both(&fx, b, running);
        fs::create_dir(fx.path(s)).unwrap();
    }
    write_both(&fx, 0x0d, running);

    fx.restart_daemon(&[("VMSNAPFS_FAILPOINTS", &format!("{point}=crash"))]);
    let r = match op {
        Op::Delete => fs::remove_dir(fx.path("b")),
        Op::Branch => write_file(
            &fx.path("a/revert"),
            if running {
                b"running force"
            } else {
                b"shutoff"
            },
        )
        .map_err(std::io::Error::from_raw_os_error),
    };
    assert!(r.is_err(), "{point}: returned");
    fx.recover_after_crash(point, Duration::from_secs(60));

    // What recovery merged is not damage to a frozen image.
    assert!(
        !fx.read(".state").contains("damaged"),
        "{point}: {}",
        fx.read(".log")
    );
    let names = fx.ls();
    match op {
        Op::Delete => {
            // A delete is finished once started.
            assert_eq!(names, vec!["a", "c"], "{point}\n{}", fx.read(".log"));
            assert_eq!(live_byte(&fx, running), 0x0d, "{point}");
        }
        Op::Branch => {
            let left: Vec<&String> = names.iter().filter(|n| n.starts_with("left-")).collect();
            let live = live_byte(&fx, running);
            if left.is_empty() {
                assert_eq!(names, vec!["a", "b", "c"], "{point}");
                assert_eq!(live, 0x0d, "{point}: rolled back");
            } else {
                assert_eq!(live, 0x0a, "{point}: completed");
                assert_eq!(view_byte(&fx, left[0]), 0x0d, "{point}: state left behind");
            }
        }
    }
    for (s, b) in [("a", 0x0a), ("b", 0x0b), ("c", 0x0c)] {
        if names.iter().any(|n| n == s) {
            assert_eq!(view_byte(&fx, s), b, "{point}: {s}");
        }
    }
    check_no_orphans(&fx);
    eprintln!("{tag}: {names:?}");
}

#[test]
fn crash_during_external_delete_and_branching_revert() {
    for running in [true, false] {
        for p in [
            "delete.begin",
            "delete.after-backend",
            "delete.before-meta-remove",
        ] {
            crash_run(p, Op::Delete, running);
        }
        for p in ["revert.begin", "revert.after-steps"] {
            crash_run(p, Op::Branch, running);
        }
    }
}
