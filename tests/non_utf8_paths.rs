//! Images under a directory whose name is not UTF-8 (`vms-caf\xe9`):
//! external snapshots created and deleted on a running VM, the daemon
//! killed in the middle, and recovery acting on the exact files. XML (the
//! definition, snapshot.xml) and QMP cannot carry such a name, so the
//! definition names the images through a link to that directory; every
//! path vmsnapfs resolves itself (image graphs, frozen images' locks and
//! fingerprints) holds the byte, and the records keep it.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use common::*;
use vmsnapfs::demo::vm::{Vm, VmSpec};

const K64: usize = 64 * 1024;

fn write_both(fx: &Fixture, byte: u8) {
    for d in ["vda", "vdb"] {
        fx.vm
            .qemu_io(d, &format!("write -P 0x{byte:02x} 0 64k"))
            .unwrap();
        fx.vm.qemu_io(d, "flush").unwrap();
    }
}

fn view_byte(fx: &Fixture, snap: &str) -> u8 {
    let mut bytes = Vec::new();
    for d in ["vda", "vdb"] {
        let data = fs::read(fx.path(&format!("{snap}/disks/{d}"))).unwrap();
        assert!(all_bytes(&data, 0, K64, data[0]), "{snap}/{d}: torn");
        bytes.push(data[0]);
    }
    assert_eq!(bytes[0], bytes[1], "{snap}: disks disagree");
    bytes[0]
}

fn live_byte(fx: &Fixture) -> u8 {
    let a = fx.vm.read_disk("vda").unwrap();
    let b = fx.vm.read_disk("vdb").unwrap();
    assert!(all_bytes(&a, 0, K64, a[0]) && all_bytes(&b, 0, K64, a[0]));
    a[0]
}

/// A running VM whose images live in `vms-caf\xe9/images`, named as
/// `vms/images` (`vms` links to `vms-caf\xe9`).
fn fixture(tag: &str) -> Fixture {
    let dir = TempDir::new(tag);
    let real = OsStr::from_bytes(b"vms-caf\xe9");
    fs::create_dir(dir.0.join(real)).unwrap();
    std::os::unix::fs::symlink(real, dir.0.join("vms")).unwrap();
    let images = dir.0.join("vms/images");
    let mut vm = Vm::start(&VmSpec::small("vm1"), &images).expect("start VM");
    vm.policy = Some("external-disk-only".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    Fixture { daemon, vm, dir }
}

/// Kills the daemon at `point` during `op`, restarts it, and checks what
/// recovery left.
fn crash_run(point: &str, op: &str) {
    let mut fx = fixture(&format!("u8-{}", point.replace('.', "-")));
    for (s, b) in [("a", 0x0a), ("b", 0x0b)] {
        write_both(&fx, b);
        fs::create_dir(fx.path(s))
            .unwrap_or_else(|e| panic!("mkdir {s}: {e}\n{}", fx.read(".log")));
    }
    write_both(&fx, 0x0c);
    fx.restart_daemon(&[("VMSNAPFS_FAILPOINTS", &format!("{point}=crash"))]);
    let r = match op {
        "create" => fs::create_dir(fx.path("c")),
        _ => fs::remove_dir(fx.path("a")),
    };
    assert!(r.is_err(), "{point}: returned");
    assert!(
        fx.daemon.wait_exit(Duration::from_secs(60)),
        "{point}: daemon did not crash"
    );
    fx.daemon.kill9();
    // The intent on disk names the files by their bytes.
    let journal = fx.journal();
    assert_eq!(journal.len(), 1, "{point}: {journal:?}");
    let intent = vmsnapfs::store::Intent::from_record(&fs::read(&journal[0]).unwrap())
        .expect("the intent reads back");
    eprintln!("{point}: pending {}", intent.describe());
    fx.restart_daemon(&[]);

    let left = fx.journal();
    assert!(
        left.is_empty(),
        "{point}: journal {left:?}\n{}",
        fx.read(".log")
    );
    assert!(
        !fx.read(".log").contains("not resolved"),
        "{point}: {}",
        fx.read(".log")
    );
    // Fingerprints of the frozen images are kept by their resolved paths,
    // which pass through the directory: no false damage.
    assert!(
        !fx.read(".state").contains("damaged"),
        "{point}: {}",
        fx.read(".log")
    );
    // The frozen images' record names them by their resolved paths: the
    // byte that is not UTF-8 is kept as it is, never as U+FFFD.
    let frozen = fs::read(fx.daemon.state.join("vm1/frozen")).unwrap();
    assert!(
        !frozen.windows(3).any(|w| w == "\u{fffd}".as_bytes()),
        "{point}: lossy record"
    );
    let frozen = vmsnapfs::store::meta::parse_frozen(&frozen).expect("frozen record");
    assert!(
        frozen.keys().any(|p| p
            .as_os_str()
            .as_bytes()
            .windows(8)
            .any(|w| w == b"vms-caf\xe9")),
        "{point}: {frozen:?}"
    );
    let names = fx.ls();
    match op {
        "create" => {
            assert!(
                names == ["a", "b"] || names == ["a", "b", "c"],
                "{point}: {names:?}"
            );
            if names.len() == 3 {
                assert_eq!(view_byte(&fx, "c"), 0x0c, "{point}");
            }
        }
        _ => assert_eq!(names, ["b"], "{point}\n{}", fx.read(".log")),
    }
    assert_eq!(live_byte(&fx), 0x0c, "{point}");
    for (s, b) in [("a", 0x0a), ("b", 0x0b)] {
        if names.iter().any(|n| n == s) {
            assert_eq!(view_byte(&fx, s), b, "{point}: {s}");
        }
    }
    // Every snapshot's images/ link names a file that exists.
    for s in &names {
        for d in ["vda", "vdb"] {
            let link = fs::read_link(fx.path(&format!("{s}/images/{d}"))).unwrap();
            assert!(link.exists(), "{point}: {s}/{d} -> {}", link.display());
        }
    }
    check_no_orphans(&fx);
    // The guest writes on, and a later delete merges cleanly.
    write_both(&fx, 0x0d);
    for s in names.iter().rev() {
        fs::remove_dir(fx.path(s))
            .unwrap_or_else(|e| panic!("{point}: rmdir {s}: {e}\n{}", fx.read(".log")));
    }
    assert_eq!(live_byte(&fx), 0x0d, "{point}");
    check_no_orphans(&fx);
}

#[test]
fn non_utf8_image_directory_survives_crashes() {
    crash_run("create.after-overlays", "create");
    crash_run("create.after-backend", "create");
    crash_run("delete.after-backend", "delete");
}
