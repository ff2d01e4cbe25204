//! Reverting to external snapshots on a real VM through the mounted tree:
//! branches over the snapshot's images (every other snapshot keeps its
//! bytes), the state left behind kept as a snapshot or discarded, disks
//! switched inside the running QEMU, checkpoints loaded into a new QEMU
//! process, and reverts of a stopped domain.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vmsnapfs::demo::vm::read_image;

const K64: usize = 64 * 1024;

fn write_both(fx: &Fixture, byte: u8) {
    for d in ["vda", "vdb"] {
        fx.vm
            .qemu_io(d, &format!("write -P 0x{byte:02x} 0 64k"))
            .unwrap();
    }
}

/// The byte the first 64 KiB of both disks hold (asserting they agree).
fn live_byte(fx: &Fixture) -> u8 {
    let a = fx.vm.read_disk("vda").unwrap();
    let b = fx.vm.read_disk("vdb").unwrap();
    assert!(all_bytes(&a, 0, K64, a[0]) && all_bytes(&b, 0, K64, a[0]));
    a[0]
}

fn view_byte(fx: &Fixture, snap: &str) -> u8 {
    let a = fs::read(fx.path(&format!("{snap}/disks/vda"))).unwrap();
    let b = fs::read(fx.path(&format!("{snap}/disks/vdb"))).unwrap();
    assert!(
        all_bytes(&a, 0, K64, a[0]) && all_bytes(&b, 0, K64, a[0]),
        "{snap}: views disagree"
    );
    a[0]
}

fn images_of(fx: &Fixture) -> Vec<PathBuf> {
    let dir = fx.vm.disks[0].image.parent().unwrap();
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .collect();
    v.sort();
    v
}

fn check_images(fx: &Fixture) {
    for img in images_of(fx) {
        let st = Command::new("qemu-img")
            .args(["check", "-U", "-q"])
            .arg(&img)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img check {}", img.display());
    }
}

fn left_snapshots(fx: &Fixture) -> Vec<String> {
    fx.ls()
        .into_iter()
        .filter(|n| n.starts_with("left-"))
        .collect()
}

#[test]
fn reverting_a_running_vm_branches_and_keeps_every_snapshot() {
    let fx = Fixture::with_policy("xrevert-live", "external-disk-only", &[]);
    let pid = fx.vm.current_pid();
    write_both(&fx, 0x0a);
    fs::create_dir(fx.path("e1")).unwrap();
    write_both(&fx, 0x0b);
    fs::create_dir(fx.path("e2")).unwrap();
    write_both(&fx, 0x0c);

    // Disks without RAM: the running guest would lose its live state.
    assert_eq!(fx.revert("e1", "running"), Err(libc::EPERM));
    assert!(fx.read(".log").contains("refused (EPERM)"));
    fx.revert("e1", "running force").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert_eq!(fx.vm.current_pid(), pid, "switched inside the same QEMU");
    assert_eq!(live_byte(&fx), 0x0a);
    assert_eq!(
        fs::read_link(fx.path(".current")).unwrap(),
        PathBuf::from("e1")
    );
    // The state left behind is a snapshot of its own; the others keep
    // their bytes.
    let left = left_snapshots(&fx);
    assert_eq!(left.len(), 1, "{:?}", fx.ls());
    assert_eq!(view_byte(&fx, &left[0]), 0x0c);
    assert_eq!(fx.read(&format!("{}/state", left[0])), "disk-snapshot\n");
    assert_eq!(view_byte(&fx, "e1"), 0x0a);
    assert_eq!(view_byte(&fx, "e2"), 0x0b);

    // A new branch under e1.
    write_both(&fx, 0x0d);
    fs::create_dir(fx.path("e3")).unwrap();
    assert_eq!(
        fs::read_link(fx.path("e3/parent")).unwrap(),
        PathBuf::from("../e1")
    );
    write_both(&fx, 0x0e);
    let before = images_of(&fx);
    // discard: the 0x0e state goes, nothing else.
    fx.revert("e2", "running force discard").unwrap();
    assert_eq!(live_byte(&fx), 0x0b);
    assert_eq!(left_snapshots(&fx).len(), 1, "discard keeps no snapshot");
    let after = images_of(&fx);
    let removed: Vec<_> = before.iter().filter(|p| !after.contains(p)).collect();
    assert_eq!(
        removed.len(),
        2,
        "the two overlays of the 0x0e state: {removed:?}"
    );
    for (snap, byte) in [
        ("e1", 0x0a),
        ("e2", 0x0b),
        ("e3", 0x0d),
        (&left[0][..], 0x0c),
    ] {
        assert_eq!(view_byte(&fx, snap), byte, "{snap}");
    }
    // Reverting back and forth without writing leaves nothing behind.
    fx.revert("e3", "running force").unwrap();
    fx.revert("e2", "running force").unwrap();
    assert_eq!(left_snapshots(&fx).len(), 1, "{:?}", fx.ls());
    assert_eq!(live_byte(&fx), 0x0b);
    check_images(&fx);
    // The guest still runs and writes; a snapshot of the new branch works.
    write_both(&fx, 0x0f);
    fs::create_dir(fx.path("e4")).unwrap();
    assert_eq!(view_byte(&fx, "e4"), 0x0f);
    let log = fx.read(".log");
    assert!(log.contains("the state left behind is snapshot"), "{log}");
}

#[test]
fn reverting_to_a_checkpoint_loads_its_ram_into_a_new_qemu() {
    let fx = Fixture::with_policy("xrevert-ckpt", "external", &[]);
    fx.vm.fill_ram(8).unwrap();
    let ram = fx.guest_ram(8 << 20);
    assert!(ram.iter().any(|b| *b != 0));
    write_both(&fx, 0x1a);
    fs::create_dir(fx.path("c1")).unwrap();
    assert_eq!(fx.read("c1/state"), "running\n");
    write_both(&fx, 0x1b);
    fx.scribble_ram(8 << 20);
    assert_ne!(fx.guest_ram(8 << 20), ram);
    let pid = fx.vm.current_pid();

    // A checkpoint brings RAM back: no force needed.
    fx.revert("c1", "running").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert_ne!(fx.vm.current_pid(), pid, "a new QEMU process");
    assert!(fx.guest_ram(8 << 20) == ram, "RAM as at the checkpoint");
    assert_eq!(live_byte(&fx), 0x1a);
    let left = left_snapshots(&fx);
    assert_eq!(left.len(), 1);
    assert_eq!(view_byte(&fx, &left[0]), 0x1b);

    // From a stopped domain, paused as asked.
    let mut q = fx.vm.control().unwrap();
    let _ = q.execute_raw("quit", serde_json::json!({}));
    drop(q);
    fx.wait_state("shutoff");
    fx.revert("c1", "paused").unwrap();
    assert_eq!(fx.read(".state"), "paused\n");
    assert!(fx.guest_ram(8 << 20) == ram);
    assert_eq!(live_byte(&fx), 0x1a);
    check_images(&fx);
}

#[test]
fn reverting_a_stopped_domain_to_disks_only() {
    let fx = Fixture::with_policy("xrevert-off", "external-disk-only", &[]);
    write_both(&fx, 0x2a);
    fs::create_dir(fx.path("d1")).unwrap();
    write_both(&fx, 0x2b);
    for d in ["vda", "vdb"] {
        fx.vm.qemu_io(d, "flush").unwrap();
    }
    let mut q = fx.vm.control().unwrap();
    let _ = q.execute_raw("quit", serde_json::json!({}));
    drop(q);
    fx.wait_state("shutoff");
    fx.revert("d1", "shutoff").unwrap();
    assert_eq!(fx.read(".state"), "shutoff\n");
    let left = left_snapshots(&fx);
    assert_eq!(left.len(), 1);
    assert_eq!(fx.read(&format!("{}/state", left[0])), "shutoff\n");
    assert_eq!(view_byte(&fx, &left[0]), 0x2b);
    // The new active layer is a branch over d1's image.
    let branch: Vec<PathBuf> = images_of(&fx)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("vm1-vda.d1.revert-"))
        .collect();
    assert_eq!(branch.len(), 1);
    let data = read_image(Path::new(&branch[0])).unwrap();
    assert!(all_bytes(&data, 0, K64, 0x2a));
    // Started from there, the guest sees d1.
    fx.revert("d1", "running").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert_eq!(live_byte(&fx), 0x2a);
    check_images(&fx);
}
