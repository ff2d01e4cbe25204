//! A running guest's checkpoint as a live copy of its RAM (QEMU 10.0:
//! precopy into a mapped-ram file, see src/backend/precopy.rs) with a
//! real Linux guest (tests/common/guest.rs) that dirties RAM the whole
//! time: a loop rewriting files in its initramfs, while it also writes
//! and syncs files on its ext4 disk. The copy either converges (`.log`:
//! `RAM copied live`, a mapped-ram file) or gives up and falls back to the
//! background snapshot (`.log`: `live copy of RAM given up`, a stream);
//! either way nothing half-made is left (one memory file, no `.part`,
//! QEMU's migration settings as before), the checkpoint's disks hold
//! every file synced before `mkdir`, and a revert brings the guest back
//! as it was at the checkpoint: it goes on writing where it was, its
//! RAM-only files are whole, and a quiesced snapshot taken after the
//! revert has a clean ext4. The give-up is seen twice: as it comes, and
//! forced by holding QEMU's copy below the guest's dirty rate (the
//! give-up itself is then QEMU's real non-convergence, not injected).

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

/// How the live copy of `c1` is to end.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ending {
    /// As it does: converged or given up, whichever happens.
    AsItGoes,
    /// Given up: the test holds QEMU's copy to `max-bandwidth` 16 MiB/s
    /// (below the rate at which the guest dirties RAM) while the daemon
    /// waits at the failpoint `checkpoint.converging` after starting it.
    Throttled,
}

/// A guest on QEMU 10 dirtying RAM, a checkpoint `c1` of it, the checks
/// on what it left, a revert to it and the checks on the guest after.
/// Returns whether the live copy converged.
fn checkpoint_and_revert(tag: &str, ending: Ending) -> bool {
    let qemu = qemu10();
    let gate = Gate::new(tag);
    let env: Vec<(&str, String)> = match ending {
        Ending::AsItGoes => vec![],
        Ending::Throttled => vec![(
            "VMSNAPFS_FAILPOINTS",
            format!("checkpoint.converging={}", gate.action()),
        )],
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let rg = RealGuest::start_with(tag, "external", &env, qemu.to_str().unwrap());
    let caps = Capabilities::read(&mut rg.qmp()).unwrap();
    assert!(
        caps.has_live_parallel_checkpoints(),
        "QEMU {} takes no live copy",
        caps.version_text()
    );
    rg.guest.wait_wrote(3, Duration::from_secs(120));
    let rate = rg.guest.dirty_ram(12);
    eprintln!("{tag}: the guest dirties RAM at {rate:.0} MiB/s");

    // The checkpoint, while the loop runs.
    let n1 = rg.guest.wrote();
    let t = Instant::now();
    let mkdir = {
        let p = rg.path("c1");
        std::thread::spawn(move || fs::create_dir(p))
    };
    if ending == Ending::Throttled {
        assert!(rate > 16.0, "the guest dirties RAM at only {rate:.0} MiB/s");
        rg.daemon.wait_log("failpoint checkpoint.converging");
        rg.qmp().set_max_bandwidth(16 << 20).unwrap();
        gate.open();
    }
    mkdir.join().unwrap().unwrap();
    let took = t.elapsed();
    let n1_end = rg.guest.wrote();
    assert_eq!(rg.read("c1/state"), "running\n");
    assert_eq!(rg.read(".state"), "running\n", "the guest runs on");
    let log = rg.read(".log");
    let line = log
        .lines()
        .filter(|l| l.contains("mkdir \"c1\""))
        .collect::<Vec<_>>()
        .join("\n");
    let converged = line.contains("RAM copied live");
    let gave_up = line.contains("live copy of RAM given up");
    assert!(converged != gave_up, "the log says which: {line}");
    eprintln!(
        "{tag}: mkdir took {took:?}; the live copy {}:\n{line}",
        if converged { "converged" } else { "gave up" }
    );
    if ending == Ending::Throttled {
        assert!(
            gave_up && line.contains("RAM written as a background snapshot"),
            "{line}"
        );
    }
    let want = if converged { "mapped-ram" } else { "stream" };
    let xml = rg.read("c1/snapshot.xml");
    assert!(xml.contains(&format!("memory-format='{want}'")), "{xml}");
    assert_eq!(
        memory_files(&rg.vm.dir),
        vec!["vm1.c1.memory".to_string()],
        "one memory file, nothing partial"
    );
    {
        let mut q = rg.qmp();
        assert!(!q.migrate_capability_on("pause-before-switchover").unwrap());
        assert!(!q.migrate_capability_on("mapped-ram").unwrap());
        assert_eq!(
            q.downtime_and_direct_io().unwrap(),
            (Some(300), Some(false))
        );
    }
    check_files(&rg, "c1", n1);

    // The guest goes on, then goes back to the checkpoint.
    let later = rg.guest.wait_wrote(n1_end + 2, Duration::from_secs(120));
    let seen = rg.guest.console_text().len();
    rg.revert("c1", "running").unwrap();
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
        "after the revert to c1 (taken after f{n1}, mkdir returned after f{n1_end}; \
         f{later} was written before the revert) the guest wrote f{first}"
    );
    assert!(
        !rg.guest.console_text()[seen..].contains("BOOT"),
        "the guest resumed, it did not boot again"
    );
    rg.guest.check_dirtier();

    // RAM and disks came back of one instant: the guest's ext4, frozen
    // by its agent, is clean as it is.
    write_file(
        &rg.path(".create"),
        b"<domainsnapshot><name>q1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='external'/>\
          </disks><quiesce/></domainsnapshot>",
    )
    .unwrap();
    assert_clean(&rg.path("q1/disks/vda"));
    rg.guest.check_dirtier();
    converged
}

#[test]
fn a_live_copy_of_a_guest_dirtying_ram_ends_either_way_and_reverts_whole() {
    checkpoint_and_revert("lc-dirty", Ending::AsItGoes);
}

#[test]
fn a_live_copy_outrun_by_the_guest_falls_back_and_reverts_whole() {
    let converged = checkpoint_and_revert("lc-outrun", Ending::Throttled);
    assert!(!converged);
}
