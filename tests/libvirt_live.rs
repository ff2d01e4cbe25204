//! libvirt's live definition of a running domain follows every change of
//! images vmsnapfs makes (external snapshots with and without RAM,
//! internal ones, merges, reverts): `virsh dumpxml` (live) and `virsh
//! dumpxml --inactive` name the active layer vmsnapfs recorded, so what
//! libvirt does with its live definition (`virsh managedsave` and
//! `virsh start`, libvirt's own snapshots) runs on the images the guest
//! last wrote and never writes a snapshot's frozen image. On a real
//! libvirtd (QEMU 7.2, the system's) and a real FUSE mount; bytes are
//! checked through the tree. Skipped, saying so, where libvirtd is not
//! installed.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::libvirtd::*;
use common::*;

const DOM: &str = "lvlive";

/// A hash of a whole file.
fn checksum(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fs::read(path).unwrap().hash(&mut h);
    h.finish()
}

/// The domain's `.log`, for failure messages.
fn log_of(mnt: &Path) -> String {
    fs::read_to_string(mnt.join(DOM).join(".log")).unwrap_or_default()
}

/// `virsh managedsave; virsh start`: libvirt restores the guest from its
/// live definition; the tree sees the domain running again.
fn managedsave_and_start(lv: &Libvirtd, mnt: &Path) {
    lv.virsh(&["managedsave", DOM]);
    wait_until(
        "shut off after managedsave",
        Duration::from_secs(30),
        || state_of(mnt, DOM) == "shutoff",
    );
    lv.virsh(&["start", DOM]);
    assert_eq!(lv.state(DOM), "running");
    wait_until("running after start", Duration::from_secs(30), || {
        state_of(mnt, DOM) == "running"
    });
}

/// Every (view, byte) pair still holds.
fn views_hold(mnt: &Path, views: &[(&str, u8)], step: &str) {
    for (name, byte) in views {
        assert!(
            view_holds(mnt, &format!("{DOM}/{name}/disks/vda"), *byte),
            "{step}: {name}'s view changed"
        );
    }
}

fn must<T>(what: &str, mnt: &Path, r: std::io::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}\n{}", log_of(mnt)))
}

#[test]
fn libvirt_live_definition_follows_every_change_of_images() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut t) = LibvirtTest::start("libvirt-live") else {
        return;
    };
    let t0 = Instant::now();
    let base = t.lv.define(DOM, &t.images);
    t.lv.virsh(&["start", DOM]);
    t.lv.guest_write(DOM, 0xa1);
    let daemon = Daemon::start_with_args(&t.dir.0, &[], &["--libvirt", &t.lv.uri.clone()]);
    let (mnt, state) = (daemon.mnt.clone(), daemon.state.clone());
    let lv = &t.lv;
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });

    // An external disk-only snapshot of the running domain: libvirt's
    // live definition names the new overlay, so a managedsave and start
    // runs the guest on it and the frozen image keeps its bytes.
    let spec = "<domainsnapshot><name>d1</name><state>disk-snapshot</state>\
                <disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>";
    must(
        "create d1",
        &mnt,
        write_file(&mnt.join(DOM).join(".create"), spec.as_bytes())
            .map_err(std::io::Error::from_raw_os_error),
    );
    assert_eq!(
        fs::read_to_string(mnt.join(DOM).join("d1/state"))
            .unwrap()
            .trim(),
        "disk-snapshot"
    );
    lv.definitions_agree(DOM, &state, "external disk-only");
    let d1_overlay = active_layer_of(&state, DOM).to_string_lossy().into_owned();
    let frozen = checksum(&base);
    lv.guest_write(DOM, 0xa2);
    managedsave_and_start(lv, &mnt);
    lv.definitions_agree(DOM, &state, "managedsave after d1");
    lv.guest_write(DOM, 0xa3);
    assert_eq!(checksum(&base), frozen, "d1's frozen image was written");
    views_hold(&mnt, &[("d1", 0xa1)], "managedsave after d1");

    // A checkpoint (external, RAM through a descriptor): the switch goes
    // through libvirt while the guest is paused; the pause is in `.log`.
    must("mkdir c1", &mnt, fs::create_dir(mnt.join(DOM).join("c1")));
    assert_eq!(
        fs::read_to_string(mnt.join(DOM).join("c1/state"))
            .unwrap()
            .trim(),
        "running"
    );
    let paused = log_of(&mnt)
        .lines()
        .rfind(|l| l.contains("guest paused"))
        .map(str::to_owned);
    eprintln!("checkpoint through libvirt: {paused:?}");
    assert!(paused.is_some(), "{}", log_of(&mnt));
    lv.definitions_agree(DOM, &state, "external checkpoint");
    lv.guest_write(DOM, 0xa4);
    managedsave_and_start(lv, &mnt);
    lv.definitions_agree(DOM, &state, "managedsave after c1");
    lv.guest_write(DOM, 0xa5);
    views_hold(&mnt, &[("d1", 0xa1), ("c1", 0xa3)], "managedsave after c1");

    // Deleting d1 merges its overlay into the image below it while c1's
    // overlay is the active layer (libvirt's blockcommit --top/--base).
    must("rmdir d1", &mnt, fs::remove_dir(mnt.join(DOM).join("d1")));
    lv.definitions_agree(DOM, &state, "merge below the active layer");
    // libvirt's live chain lost the merged image too.
    let x = lv.virsh(&["dumpxml", DOM]);
    assert!(!x.contains(&d1_overlay), "{x}");
    managedsave_and_start(lv, &mnt);
    lv.definitions_agree(DOM, &state, "managedsave after rmdir d1");
    lv.guest_write(DOM, 0xa6);
    views_hold(&mnt, &[("c1", 0xa3)], "managedsave after rmdir d1");

    // Deleting c1 merges the active layer down (blockcommit --active
    // --pivot).
    let before = active_layer_of(&state, DOM);
    must("rmdir c1", &mnt, fs::remove_dir(mnt.join(DOM).join("c1")));
    assert_ne!(active_layer_of(&state, DOM), before, "an active commit");
    lv.definitions_agree(DOM, &state, "merge of the active layer");

    // An internal disk-only snapshot: the images stay.
    let spec = "<domainsnapshot><name>i1</name><memory snapshot='no'/>\
                <disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>";
    must(
        "create i1",
        &mnt,
        write_file(&mnt.join(DOM).join(".create"), spec.as_bytes())
            .map_err(std::io::Error::from_raw_os_error),
    );
    lv.definitions_agree(DOM, &state, "internal");
    managedsave_and_start(lv, &mnt);
    lv.guest_write(DOM, 0xa7);
    views_hold(&mnt, &[("i1", 0xa6)], "managedsave after i1");

    // A revert of the running domain to an external disk-only snapshot
    // (a new overlay over its image, the guest booted from it).
    let spec = "<domainsnapshot><name>d2</name><state>disk-snapshot</state>\
                <disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>";
    must(
        "create d2",
        &mnt,
        write_file(&mnt.join(DOM).join(".create"), spec.as_bytes())
            .map_err(std::io::Error::from_raw_os_error),
    );
    lv.guest_write(DOM, 0xa8);
    must(
        "revert to d2",
        &mnt,
        fs::write(mnt.join(DOM).join("d2/revert"), "running force"),
    );
    assert_eq!(lv.state(DOM), "running");
    wait_until("running after the revert", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    lv.definitions_agree(DOM, &state, "revert");
    managedsave_and_start(lv, &mnt);
    lv.definitions_agree(DOM, &state, "managedsave after the revert");
    must(
        "mkdir after",
        &mnt,
        fs::create_dir(mnt.join(DOM).join("after")),
    );
    views_hold(
        &mnt,
        &[("d2", 0xa7), ("after", 0xa7), ("i1", 0xa6)],
        "after the revert",
    );

    // A delete that streams into the active layer (it holds more than
    // the image below it, e1's overlay): libvirt's blockpull.
    let mut e1_overlay = String::new();
    for name in ["e1", "e2"] {
        let spec = format!(
            "<domainsnapshot><name>{name}</name><state>disk-snapshot</state>\
             <disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>"
        );
        must(
            name,
            &mnt,
            write_file(&mnt.join(DOM).join(".create"), spec.as_bytes())
                .map_err(std::io::Error::from_raw_os_error),
        );
        if name == "e1" {
            e1_overlay = active_layer_of(&state, DOM).to_string_lossy().into_owned();
            lv.guest_write(DOM, 0xb1);
        }
    }
    let top = active_layer_of(&state, DOM);
    let big = lv.virsh(&[
        "qemu-monitor-command",
        DOM,
        "--hmp",
        "qemu-io -d virtio-disk0/virtio-backend \"write -P 0xb2 1M 4M\"",
    ]);
    assert!(!big.contains("rror"), "{big}");
    assert!(lv.virsh(&["dumpxml", DOM]).contains(&e1_overlay));
    must("rmdir e2", &mnt, fs::remove_dir(mnt.join(DOM).join("e2")));
    assert!(
        log_of(&mnt).contains("streamed up from"),
        "{}",
        log_of(&mnt)
    );
    assert_eq!(active_layer_of(&state, DOM), top);
    lv.definitions_agree(DOM, &state, "a stream into the active layer");
    let x = lv.virsh(&["dumpxml", DOM]);
    assert!(!x.contains(&e1_overlay), "{x}");
    managedsave_and_start(lv, &mnt);
    views_hold(&mnt, &[("e1", 0xa7), ("after", 0xa7)], "after the stream");

    // libvirt refuses the switch (a block job of its own runs on the
    // disk): the mkdir fails with EIO and says why in `.log`; no file is
    // left, the guest runs on, libvirt's definitions are unchanged.
    let copy = t.images.join("copy.qcow2");
    lv.virsh(&[
        "blockcopy",
        DOM,
        "vda",
        copy.to_str().unwrap(),
        "--transient-job",
    ]);
    let files = |d: &Path| {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = files(&t.images);
    let r = fs::create_dir(mnt.join(DOM).join("refused"));
    assert_eq!(errno(r), libc::EIO, "{}", log_of(&mnt));
    let log = log_of(&mnt);
    assert!(log.contains("did not switch the disks"), "{log}");
    assert_eq!(files(&t.images), before);
    assert!(fs::metadata(mnt.join(DOM).join("refused")).is_err());
    assert_eq!(lv.state(DOM), "running");
    lv.definitions_agree(DOM, &state, "a refused switch");
    lv.virsh(&["blockjob", DOM, "vda", "--abort"]);

    // libvirt's own disk-only snapshot works on the chain vmsnapfs left.
    lv.virsh(&[
        "snapshot-create-as",
        DOM,
        "theirs",
        "--disk-only",
        "--no-metadata",
    ]);
    eprintln!("libvirt live-definition test: {:?}", t0.elapsed());
    drop(daemon);
}
