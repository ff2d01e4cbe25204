//! A running guest's checkpoint with a real Linux guest
//! (tests/common/guest.rs) that dirties RAM the whole time: a loop
//! rewriting files in its initramfs, while it also writes and syncs files
//! on its ext4 disk.
//!
//! On a QEMU that offers both a live copy into a mapped-ram file (see
//! src/backend/precopy.rs) and a background snapshot, the guest's dirty
//! rate, measured by QEMU just before, chooses (src/backend/ram_way.rs):
//! the guest quiet, a live copy (`.log`: `live copy chosen`, a mapped-ram
//! file); the guest dirtying RAM, a background snapshot (`background
//! snapshot chosen`, a stream). Elsewhere (QEMU 7.2) no choice is made:
//! the background snapshot. A live copy forced on the busy guest (the
//! measurement failed by injection) and held below its dirty rate gives
//! up and falls back to the background snapshot.
//!
//! Either way nothing half-made is left (one memory file per checkpoint,
//! no `.part`, QEMU's migration settings as before), the checkpoint's
//! disks hold every file synced before `mkdir`, and a revert brings the
//! guest back as it was at the checkpoint: it goes on writing where it
//! was, its RAM-only files are whole, and a quiesced snapshot taken after
//! the revert has a clean ext4.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;
use vmsnapfs::backend::capabilities::Capabilities;

/// The QEMU 10 binary: on PATH, or in the prefix install-deps.sh unpacks.
fn qemu10() -> PathBuf {
    let q10 = std::env::var("VMSNAPFS_QEMU10").unwrap_or_else(|_| "/opt/vmsnapfs/qemu-10".into());
    let dirs = std::env::var("PATH").unwrap_or_default();
    dirs.split(':')
        .map(PathBuf::from)
        .chain([Path::new(&q10).join("usr/bin")])
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|bin| {
            Command::new(bin)
                .arg("--version")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("version 10."))
        })
        .expect("no QEMU 10 installed: run scripts/install-deps.sh")
}

/// The memory files and partial files beside the images.
fn memory_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".memory") || n.ends_with(".part"))
        .collect();
    v.sort();
    v
}

/// Every file 1..=`upto` the guest synced is whole in `<snap>/files/`.
fn check_files(rg: &RealGuest, snap: &str, upto: u64) {
    let data = rg.path(&format!("{snap}/files/vda/data"));
    for n in 1..=upto {
        let bytes = fs::read(data.join(format!("f{n}")))
            .unwrap_or_else(|e| panic!("{snap}: f{n} (synced before mkdir): {e}"));
        check_file(n, &bytes).unwrap_or_else(|e| panic!("{snap}: {e}"));
    }
}

/// The `.log` lines of `mkdir "name"`, joined.
fn mkdir_line(rg: &RealGuest, name: &str) -> String {
    rg.read(".log")
        .lines()
        .filter(|l| l.contains(&format!("mkdir \"{name}\"")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The dirty rate (MiB/s) a `.log` line says QEMU measured, if it says.
fn measured_rate(line: &str) -> Option<i64> {
    let at = line.find("the guest dirties ")? + "the guest dirties ".len();
    line[at..].split(' ').next()?.parse().ok()
}

/// Takes checkpoint `name` while the guest runs; returns its `.log`
/// lines and how long `mkdir` took. The checkpoint is running, so is the
/// guest, and QEMU's migration settings are as before.
fn checkpoint(rg: &RealGuest, name: &str) -> (String, Duration) {
    let t = Instant::now();
    fs::create_dir(rg.path(name)).unwrap();
    let took = t.elapsed();
    assert_eq!(rg.read(&format!("{name}/state")), "running\n");
    assert_eq!(rg.read(".state"), "running\n", "the guest runs on");
    let line = mkdir_line(rg, name);
    eprintln!("{name}: mkdir took {took:?}:\n{line}");
    settings_as_before(rg);
    (line, took)
}

/// QEMU's migration settings after a checkpoint: as vmsnapfs found them.
fn settings_as_before(rg: &RealGuest) {
    let mut q = rg.qmp();
    assert!(!q.migrate_capability_on("background-snapshot").unwrap());
    let caps = Capabilities::read(&mut q).unwrap();
    if caps.has_live_stream_checkpoints() {
        assert!(!q.migrate_capability_on("pause-before-switchover").unwrap());
    }
    if caps.has_live_parallel_checkpoints() {
        assert!(!q.migrate_capability_on("mapped-ram").unwrap());
        assert_eq!(
            q.downtime_and_direct_io().unwrap(),
            (Some(300), Some(false))
        );
    }
}

/// `name`'s memory format is `want`, and the memory files beside the
/// images are `files` (nothing partial).
fn check_memory(rg: &RealGuest, name: &str, want: &str, files: &[&str]) {
    let xml = rg.read(&format!("{name}/snapshot.xml"));
    assert!(xml.contains(&format!("memory-format='{want}'")), "{xml}");
    let mut want_files: Vec<String> = files.iter().map(|f| format!("vm1.{f}.memory")).collect();
    want_files.sort();
    assert_eq!(memory_files(&rg.vm.dir), want_files, "nothing partial");
}

/// Goes back to `name`, taken after the guest synced f`n1` (and before
/// `mkdir` returned, after f`n1_end`), and checks the guest it brings
/// back: it resumes between them, its RAM-only files are whole, and its
/// ext4 (frozen by its agent) is clean as it is.
fn revert_and_check(rg: &RealGuest, name: &str, n1: u64, n1_end: u64) {
    let later = rg.guest.wait_wrote(n1_end + 2, Duration::from_secs(120));
    let seen = rg.guest.console_text().len();
    rg.revert(name, "running").unwrap();
    rg.wait_state("running");
    let resumed = |g: &Guest| g.wrote_after_revert(seen);
    let deadline = Instant::now() + Duration::from_secs(120);
    while resumed(&rg.guest).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the guest wrote nothing after the revert:\n{}",
            rg.guest.console_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = resumed(&rg.guest)[0];
    assert!(
        first > n1 && first <= n1_end + 1 && first <= later,
        "after the revert to {name} (taken after f{n1}, mkdir returned after f{n1_end}; \
         f{later} was written before the revert) the guest wrote f{first}"
    );
    assert!(
        !rg.guest.console_text()[seen..].contains("BOOT"),
        "the guest resumed, it did not boot again"
    );
    rg.guest.check_dirtier();

    // RAM and disks came back of one instant.
    write_file(
        &rg.path(".create"),
        b"<domainsnapshot><name>q1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='external'/>\
          </disks><quiesce/></domainsnapshot>",
    )
    .unwrap();
    assert_clean(&rg.path("q1/disks/vda"));
    rg.guest.check_dirtier();
}

/// The QEMU on PATH (the suite runs once per version): a quiet guest's
/// checkpoint, then checkpoints of the guest dirtying RAM, each made the
/// way its measured dirty rate chooses (or the background snapshot where
/// QEMU offers no choice), and a revert to the busy guest's checkpoint.
#[test]
fn the_dirty_rate_chooses_how_ram_is_copied_and_the_busy_checkpoint_reverts_whole() {
    let rg = RealGuest::start("lc-choice", "external", &[]);
    let caps = Capabilities::read(&mut rg.qmp()).unwrap();
    let chooses = caps.has_live_parallel_checkpoints() && caps.has_short_dirty_rate();
    eprintln!(
        "QEMU {}: {}",
        caps.version_text(),
        if chooses {
            "the dirty rate chooses"
        } else {
            "no choice"
        }
    );
    rg.guest.wait_wrote(3, Duration::from_secs(120));

    // Quiet (it writes and syncs a small file now and then): a live copy.
    let (line, _) = checkpoint(&rg, "q0");
    if chooses {
        let rate = measured_rate(&line).unwrap_or_else(|| panic!("no rate: {line}"));
        assert!(
            rate <= vmsnapfs::backend::ram_way::LIVE_COPY_MAX_MIB_S,
            "the quiet guest dirties {rate} MiB/s: {line}"
        );
        assert!(line.contains("live copy chosen"), "{line}");
        assert!(line.contains("RAM copied live"), "{line}");
        check_memory(&rg, "q0", "mapped-ram", &["q0"]);
    } else {
        assert!(!line.contains("chosen"), "{line}");
        check_memory(&rg, "q0", "stream", &["q0"]);
    }

    // Busy: the background snapshot. A guest starved by a loaded host may
    // dirty less during the 100 ms measured; then it gets the live copy,
    // as the rate says, and one more checkpoint is taken.
    let rate = rg.guest.dirty_ram(12);
    eprintln!("the guest dirties RAM at {rate:.0} MiB/s (its own count)");
    let mut made = vec!["q0"];
    let mut taken = None;
    for name in ["c1", "c2"] {
        let n1 = rg.guest.wrote();
        let (line, _) = checkpoint(&rg, name);
        let n1_end = rg.guest.wrote();
        made.push(name);
        check_files(&rg, name, n1);
        if !chooses {
            assert!(!line.contains("chosen"), "{line}");
            check_memory(&rg, name, "stream", &made);
            taken = Some((name, n1, n1_end));
            break;
        }
        let measured = measured_rate(&line).unwrap_or_else(|| panic!("no rate: {line}"));
        if measured > vmsnapfs::backend::ram_way::LIVE_COPY_MAX_MIB_S {
            assert!(line.contains("background snapshot chosen"), "{line}");
            assert!(!line.contains("RAM copied live"), "{line}");
            assert!(line.contains("guest paused"), "{line}");
            check_memory(&rg, name, "stream", &made);
            taken = Some((name, n1, n1_end));
            break;
        }
        assert!(line.contains("live copy chosen"), "{line}");
    }
    let (name, n1, n1_end) =
        taken.expect("two checkpoints of the busy guest, neither measured it busy");
    revert_and_check(&rg, name, n1, n1_end);
}

/// A live copy of the guest dirtying RAM on QEMU 10, forced (the dirty
/// rate's measurement fails by injection) and held below the guest's
/// dirty rate: QEMU's copy at `max-bandwidth` 16 MiB/s, set while the
/// daemon waits at `checkpoint.converging`. It gives up (QEMU's real
/// non-convergence, not injected), the background snapshot takes over,
/// and the checkpoint reverts whole.
#[test]
fn a_live_copy_outrun_by_the_guest_falls_back_and_reverts_whole() {
    let qemu = qemu10();
    let tag = "lc-outrun";
    let gate = Gate::new(tag);
    let points = format!(
        "checkpoint.dirty-rate=error,checkpoint.converging={}",
        gate.action()
    );
    let rg = RealGuest::start_with(
        tag,
        "external",
        &[("VMSNAPFS_FAILPOINTS", points.as_str())],
        qemu.to_str().unwrap(),
    );
    let caps = Capabilities::read(&mut rg.qmp()).unwrap();
    assert!(
        caps.has_live_parallel_checkpoints(),
        "QEMU {} takes no live copy",
        caps.version_text()
    );
    rg.guest.wait_wrote(3, Duration::from_secs(120));
    let rate = rg.guest.dirty_ram(12);
    eprintln!("{tag}: the guest dirties RAM at {rate:.0} MiB/s");
    assert!(rate > 16.0, "the guest dirties RAM at only {rate:.0} MiB/s");

    let n1 = rg.guest.wrote();
    let mkdir = {
        let p = rg.path("c1");
        std::thread::spawn(move || fs::create_dir(p))
    };
    rg.daemon.wait_log("failpoint checkpoint.converging");
    rg.qmp().set_max_bandwidth(16 << 20).unwrap();
    gate.open();
    mkdir.join().unwrap().unwrap();
    let n1_end = rg.guest.wrote();
    assert_eq!(rg.read("c1/state"), "running\n");
    assert_eq!(rg.read(".state"), "running\n", "the guest runs on");
    let line = mkdir_line(&rg, "c1");
    eprintln!("{tag}:\n{line}");
    assert!(
        line.contains("live copy chosen: the guest's dirty rate was not measured"),
        "{line}"
    );
    assert!(
        line.contains("live copy of RAM given up")
            && line.contains("RAM written as a background snapshot"),
        "{line}"
    );
    assert!(!line.contains("RAM copied live"), "{line}");
    settings_as_before(&rg);
    check_memory(&rg, "c1", "stream", &["c1"]);
    check_files(&rg, "c1", n1);
    revert_and_check(&rg, "c1", n1, n1_end);
}
