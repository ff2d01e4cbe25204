//! A libvirt domain whose QEMU an operator restarts behind the daemon
//! (`virsh destroy; virsh start`) while the daemon's monitor connection
//! through libvirt's passthrough stays open: what the daemon knew of the
//! old QEMU (node names, pid, version, the last state read) must not be
//! used on the new one. Snapshots taken through the tree before the
//! restart, then `.create` (internal checkpoint), `mkdir` (external
//! checkpoint), a revert and `rmdir` after it, all act on the new QEMU:
//! bytes checked through the views and in the guest, libvirt's
//! definitions on the active layer. On a real libvirtd (QEMU 7.2, the
//! system's) and a real FUSE mount; skipped, saying so, where libvirtd
//! is not installed.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::libvirtd::*;
use common::*;

const DOM: &str = "lvrestart";

fn log_of(mnt: &Path) -> String {
    fs::read_to_string(mnt.join(DOM).join(".log")).unwrap_or_default()
}

fn must<T>(what: &str, mnt: &Path, r: std::io::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}\n{}", log_of(mnt)))
}

/// The pid of the domain's QEMU from libvirt's pid file.
fn qemu_pid() -> i32 {
    fs::read_to_string(format!("/run/libvirt/qemu/{DOM}.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The node names QEMU gives the active layer of each disk (the top of
/// each device's chain), as libvirt's passthrough reports them.
fn top_nodes(lv: &Libvirtd) -> Vec<String> {
    let out = lv.virsh(&["qemu-monitor-command", DOM, r#"{"execute":"query-block"}"#]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["inserted"]["node-name"].as_str().map(str::to_owned))
        .collect()
}

/// Returns right after the daemon's next command through libvirt's
/// passthrough (a state poll, once a second) is logged.
fn after_a_poll(log: &Path) {
    let count = || {
        fs::read_to_string(log)
            .unwrap_or_default()
            .matches("virsh qemu-monitor-command")
            .count()
    };
    let before = count();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count() == before {
        assert!(std::time::Instant::now() < deadline, "no state poll");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn internal_spec(name: &str) -> String {
    format!("<domainsnapshot><name>{name}</name><memory snapshot='internal'/></domainsnapshot>")
}

#[test]
fn libvirt_restarting_qemu_behind_the_daemon_leaves_nothing_stale() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut t) = LibvirtTest::start("libvirt-restart") else {
        return;
    };
    t.lv.define(DOM, &t.images);
    t.lv.virsh(&["start", DOM]);
    t.lv.guest_write(DOM, 0xc1);
    let uri = t.lv.uri.clone();
    let daemon = Daemon::start_with_args(&t.dir.0, &[], &["--libvirt", &uri]);
    let (mnt, state) = (daemon.mnt.clone(), daemon.state.clone());
    let lv = &t.lv;
    let d = mnt.join(DOM);
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });

    // Before the restart: an external checkpoint, then an internal one
    // on the overlay it made (the daemon learns that overlay's node).
    must("mkdir e1", &mnt, fs::create_dir(d.join("e1")));
    lv.guest_write(DOM, 0xc2);
    must(
        ".create i1",
        &mnt,
        fs::write(d.join(".create"), internal_spec("i1")),
    );
    assert!(view_holds(&mnt, &format!("{DOM}/e1/disks/vda"), 0xc1));
    assert!(view_holds(&mnt, &format!("{DOM}/i1/disks/vda"), 0xc2));
    let (old_pid, old_nodes) = (qemu_pid(), top_nodes(lv));

    // An operator restarts the domain's QEMU with virsh, right after a
    // state poll of the daemon: the next poll comes while libvirt starts
    // the new QEMU (it waits for libvirt's job, then reaches the new
    // QEMU on the connection made to the old one).
    after_a_poll(&t.dir.0.join("daemon.log"));
    lv.virsh(&[&format!("destroy {DOM}; start {DOM}")]);
    let (new_pid, new_nodes) = (qemu_pid(), top_nodes(lv));
    assert_ne!(old_pid, new_pid, "libvirt started a new QEMU");
    eprintln!("active layer's node: {old_nodes:?} before, {new_nodes:?} after the restart");
    // The new QEMU booted the active layer (libvirt's definition names it).
    assert!(lv.guest_reads(DOM, 0xc2), "the restarted guest's disk");
    lv.definitions_agree(DOM, &state, "restart behind the daemon");
    lv.guest_write(DOM, 0xc3);

    // After it, every operation acts on the new QEMU.
    must(
        ".create i2",
        &mnt,
        fs::write(d.join(".create"), internal_spec("i2")),
    );
    assert!(
        view_holds(&mnt, &format!("{DOM}/i2/disks/vda"), 0xc3),
        "i2 holds what the new QEMU's guest wrote"
    );
    let xml = fs::read_to_string(d.join("i2/snapshot.xml")).unwrap();
    assert!(xml.contains("<memory snapshot='internal'"), "{xml}");
    must("mkdir e2", &mnt, fs::create_dir(d.join("e2")));
    lv.definitions_agree(DOM, &state, "mkdir e2");
    assert!(view_holds(&mnt, &format!("{DOM}/e2/disks/vda"), 0xc3));
    lv.guest_write(DOM, 0xc4);
    assert_eq!(
        fs::read_to_string(d.join("e2/state")).unwrap().trim(),
        "running"
    );

    // Revert to e1 (taken before the restart): libvirt restores its RAM
    // into another QEMU, on a new overlay over e1's image.
    must(
        "revert e1",
        &mnt,
        fs::write(d.join("e1/revert"), "running discard"),
    );
    assert_eq!(lv.state(DOM), "running");
    wait_until("running after the revert", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    assert!(
        lv.guest_reads(DOM, 0xc1),
        "the guest after the revert to e1"
    );
    lv.definitions_agree(DOM, &state, "revert e1");

    // Deletes: the external checkpoint taken after the restart, and the
    // internal one (its tag is in an image the new QEMU no longer runs).
    must("rmdir e2", &mnt, fs::remove_dir(d.join("e2")));
    must("rmdir i2", &mnt, fs::remove_dir(d.join("i2")));
    lv.definitions_agree(DOM, &state, "rmdir");
    for (snap, byte) in [("e1", 0xc1), ("i1", 0xc2)] {
        assert!(
            view_holds(&mnt, &format!("{DOM}/{snap}/disks/vda"), byte),
            "{snap}'s view after the deletes"
        );
    }
    assert!(!d.join("e2").exists() && !d.join("i2").exists());
    // The guest runs on.
    assert!(lv.guest_reads(DOM, 0xc1));
    lv.guest_write(DOM, 0xc5);
    assert!(lv.guest_reads(DOM, 0xc5));

    // The daemon saw the QEMU change behind its connection and dropped
    // what it knew of the old one.
    let daemon_log = fs::read_to_string(t.dir.0.join("daemon.log")).unwrap();
    assert!(
        daemon_log.contains("changed behind a monitor connection"),
        "the daemon did not notice the new QEMU"
    );
    drop(daemon);
    drop(t);
}
