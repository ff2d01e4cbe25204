//! Reverts of libvirt domains that load a snapshot's saved RAM: an
//! external checkpoint's memory file goes into a new QEMU through
//! `virsh restore` (libvirt's save image: its header and the domain XML
//! naming the active layers, fed through a FIFO, then the memory file);
//! libvirt owns the QEMU afterwards. On a real libvirtd (QEMU 7.2, the
//! system's) and a real FUSE mount. The guest has no OS: its RAM is
//! told apart by SeaBIOS's timer tick count (BIOS data area 0x46c, read
//! with the monitor's `xp`), which grows 18.2 times a second, so a
//! guest restored from the memory file counts from where it was saved;
//! its disk by patterns written with qemu-io, read back through the
//! tree and by the guest. Skipped, saying so, where libvirtd is not
//! installed.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::libvirtd::*;
use common::*;

const DOM: &str = "lvrevert";

fn log_of(mnt: &Path) -> String {
    fs::read_to_string(mnt.join(DOM).join(".log")).unwrap_or_default()
}

fn must<T>(what: &str, mnt: &Path, r: std::io::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}\n{}", log_of(mnt)))
}

/// QEMU's status of its incoming migration: `completed` once it loaded
/// RAM from a stream, absent in a QEMU that booted.
fn incoming_status(lv: &Libvirtd) -> String {
    let out = lv.virsh(&[
        "qemu-monitor-command",
        DOM,
        "--pretty",
        r#"{"execute":"query-migrate"}"#,
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["return"]["status"].as_str().unwrap_or("none").to_owned()
}

/// Nothing of a restore is left in the domain's state directory.
fn no_restore_leftovers(state: &Path) {
    for e in fs::read_dir(state.join(DOM)).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with("libvirt-restore"), "{n} left behind");
    }
}

fn digest(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fs::read(path).unwrap().hash(&mut h);
    h.finish()
}

/// Reverts to `snap` with `request` and checks the guest came back from
/// its memory file under libvirt: `state` in libvirt and in the tree,
/// QEMU's incoming migration completed, RAM counting from between
/// `saved` and `later`, the guest reading `byte`, libvirt's definitions
/// on the active layer.
#[allow(clippy::too_many_arguments)]
fn revert_and_check(
    lv: &Libvirtd,
    mnt: &Path,
    state: &Path,
    snap: &str,
    request: &str,
    (saved, later): (u64, u64),
    byte: u8,
    expect: &str,
) -> Duration {
    let t = Instant::now();
    must(
        &format!("revert {snap} {request}"),
        mnt,
        fs::write(mnt.join(DOM).join(snap).join("revert"), request),
    );
    let took = t.elapsed();
    let tree_state = if expect == "running" {
        "running"
    } else {
        "paused"
    };
    assert_eq!(lv.state(DOM), expect, "{}", log_of(mnt));
    wait_until(tree_state, Duration::from_secs(30), || {
        state_of(mnt, DOM) == tree_state
    });
    assert_eq!(incoming_status(lv), "completed", "QEMU did not load RAM");
    let now = lv.bios_ticks(DOM);
    assert!(
        now >= saved && now < later,
        "the guest's RAM is not the snapshot's: ticks {now}, saved at >= {saved}, \
         {later} before the revert"
    );
    assert!(
        lv.guest_reads(DOM, byte),
        "the guest's disk after the revert"
    );
    lv.definitions_agree(DOM, state, &format!("revert {snap} {request}"));
    no_restore_leftovers(state);
    took
}

#[test]
fn libvirt_reverts_load_a_checkpoints_memory_file_through_libvirt() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut t) = LibvirtTest::start("libvirt-revert") else {
        return;
    };
    let t0 = Instant::now();
    t.lv.define(DOM, &t.images);
    t.lv.virsh(&["start", DOM]);
    t.lv.guest_write(DOM, 0xa1);
    let uri = t.lv.uri.clone();
    let mut daemon = Daemon::start_with_args(&t.dir.0, &[], &["--libvirt", &uri]);
    let (mnt, state) = (daemon.mnt.clone(), daemon.state.clone());
    let lv = &t.lv;
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    // A fresh boot counts from the time of day: the guest runs a while
    // first, so the checkpoint's count is told from a later one.
    std::thread::sleep(Duration::from_secs(2));

    // An external checkpoint (the default of a running domain).
    let saved = lv.bios_ticks(DOM);
    must("mkdir c1", &mnt, fs::create_dir(mnt.join(DOM).join("c1")));
    assert_eq!(
        fs::read_to_string(mnt.join(DOM).join("c1/state"))
            .unwrap()
            .trim(),
        "running"
    );
    let memory = mnt.join(DOM).join("c1/memory");
    let memory_digest = digest(&memory);
    std::thread::sleep(Duration::from_secs(2));
    lv.guest_write(DOM, 0xa2);
    let later = lv.bios_ticks(DOM);
    assert!(later > saved + 18, "the guest's clock does not run");

    // Revert the running domain: destroyed, restored from c1's memory
    // file by libvirt, running on a new overlay over c1's image.
    let took = revert_and_check(
        lv,
        &mnt,
        &state,
        "c1",
        "running",
        (saved, later),
        0xa1,
        "running",
    );
    eprintln!("revert (running, memory file through virsh restore): {took:?}");
    let left: Vec<String> = fs::read_dir(mnt.join(DOM))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("left-"))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(view_holds(&mnt, &format!("{DOM}/c1/disks/vda"), 0xa1));
    assert!(view_holds(
        &mnt,
        &format!("{DOM}/{}/disks/vda", left[0]),
        0xa2
    ));
    assert!(log_of(&mnt).contains("reverted, domain running"));

    // The guest writes on; a revert to `paused` leaves it paused.
    lv.guest_write(DOM, 0xa3);
    let later = lv.bios_ticks(DOM);
    revert_and_check(
        lv,
        &mnt,
        &state,
        "c1",
        "paused discard",
        (saved, later),
        0xa1,
        "paused",
    );
    lv.virsh(&["resume", DOM]);
    wait_until("running after resume", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    // libvirt owns the QEMU: its own save and restore work on it.
    let save = t.images.join("libvirt.save");
    lv.virsh(&["save", DOM, save.to_str().unwrap()]);
    lv.virsh(&["restore", save.to_str().unwrap()]);
    assert_eq!(lv.state(DOM), "running");
    assert!(lv.guest_reads(DOM, 0xa1));
    fs::remove_file(&save).unwrap();

    // From a stopped domain: `virsh restore` of the shut-off domain.
    lv.virsh(&["destroy", DOM]);
    wait_until("shut off", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "shutoff"
    });
    revert_and_check(
        lv,
        &mnt,
        &state,
        "c1",
        "running discard",
        (saved, later),
        0xa1,
        "running",
    );

    // libvirt cannot load the file (its definition now gives the guest
    // more RAM than the snapshot saved): EIO, why in `.log`, the domain
    // left shut off on the snapshot's disks, nothing left behind.
    lv.virsh(&["setmaxmem", DOM, "256M", "--config"]);
    lv.virsh(&["setmem", DOM, "256M", "--config"]);
    let r = fs::write(mnt.join(DOM).join("c1/revert"), "running discard");
    assert_eq!(errno(r), libc::EIO, "{}", log_of(&mnt));
    let log = log_of(&mnt);
    assert!(log.contains("virsh restore"), "{log}");
    assert!(log.contains("left stopped"), "{log}");
    assert_eq!(lv.state(DOM), "shut off");
    wait_until("shut off", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "shutoff"
    });
    no_restore_leftovers(&state);
    let (_, persistent) = lv.sources(DOM);
    assert_eq!(
        persistent,
        active_layer_of(&state, DOM).to_string_lossy(),
        "the persistent definition names the snapshot's branch"
    );
    lv.virsh(&["setmem", DOM, "128M", "--config"]);
    lv.virsh(&["setmaxmem", DOM, "128M", "--config"]);

    // A libvirt that does not read the FIFO in one pass gets a file.
    drop(daemon);
    daemon = Daemon::start_with_args(
        &t.dir.0,
        &[("VMSNAPFS_FAILPOINTS", "restore.fifo=error")],
        &["--libvirt", &uri],
    );
    let mnt = daemon.mnt.clone();
    wait_until("shut off", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "shutoff"
    });
    revert_and_check(
        lv,
        &mnt,
        &state,
        "c1",
        "running discard",
        (saved, later),
        0xa1,
        "running",
    );
    let daemon_log = fs::read_to_string(t.dir.0.join("daemon.log")).unwrap();
    assert!(
        daemon_log.contains("restoring from a file"),
        "the file route"
    );

    // The snapshot's memory file never changed; every view holds.
    assert_eq!(digest(&mnt.join(DOM).join("c1/memory")), memory_digest);
    assert!(view_holds(&mnt, &format!("{DOM}/c1/disks/vda"), 0xa1));
    assert!(view_holds(
        &mnt,
        &format!("{DOM}/{}/disks/vda", left[0]),
        0xa2
    ));
    eprintln!("libvirt revert test: {:?}", t0.elapsed());
    drop(daemon);
}
