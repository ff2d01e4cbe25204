//! What differs between QEMU versions, on real VMs through the mounted
//! tree: memory files in the fastest format the QEMU has, recorded in the
//! metadata; a memory file saved by QEMU 7.2 reverting on QEMU 10.0 (an
//! upgrade); the warning for a QEMU outside the tested range; a running
//! guest's checkpoint as a live copy where QEMU can, its fallback, and a
//! daemon killed while QEMU waits for the disk switch.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use common::*;
use vmsnapfs::backend::capabilities::Capabilities;
use vmsnapfs::backend::memory_file;
use vmsnapfs::model::MemoryFormat;

fn first_byte(fx: &Fixture) -> u8 {
    fx.vm.read_disk("vda").unwrap()[0]
}

fn caps(fx: &Fixture) -> Capabilities {
    Capabilities::read(&mut fx.vm.control().unwrap()).unwrap()
}

fn control(fx: &Fixture, cmd: &str) {
    fx.vm
        .control()
        .unwrap()
        .execute_raw(cmd, serde_json::json!({}))
        .unwrap();
}

/// The first `qemu-system-x86_64` whose version starts with `prefix`:
/// on PATH, or in the QEMU 10 prefix that install-deps.sh unpacks.
fn qemu_binary(prefix: &str) -> PathBuf {
    let q10 = std::env::var("VMSNAPFS_QEMU10").unwrap_or_else(|_| "/opt/vmsnapfs/qemu-10".into());
    let dirs = std::env::var("PATH").unwrap_or_default();
    let candidates = dirs
        .split(':')
        .map(PathBuf::from)
        .chain([Path::new(&q10).join("usr/bin")]);
    for d in candidates {
        let bin = d.join("qemu-system-x86_64");
        let Ok(out) = Command::new(&bin).arg("--version").output() else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains(&format!("version {prefix}")) {
            return bin;
        }
    }
    panic!("no QEMU {prefix} installed: run scripts/install-deps.sh");
}

#[test]
fn a_paused_checkpoint_writes_the_fastest_memory_file_the_qemu_has() {
    let fx = Fixture::with_policy("qv-paused", "external", &[]);
    fx.vm.fill_ram(8).unwrap();
    let ram = fx.guest_ram(8 << 20);
    fx.vm.qemu_io("vda", "write -P 0x2a 0 64k").unwrap();
    control(&fx, "stop");
    fx.wait_state("paused");

    fs::create_dir(fx.path("c1")).unwrap();
    assert_eq!(fx.read("c1/state"), "paused\n");
    assert_eq!(fx.read(".state"), "paused\n", "a paused guest stays paused");
    let xml = fx.read("c1/snapshot.xml");
    let want = if caps(&fx).has_parallel_memory_files() {
        "mapped-ram"
    } else {
        "stream"
    };
    assert!(
        xml.contains(&format!("memory-format='{want}'")),
        "{want}: {xml}"
    );
    assert!(xml.contains("machine='pc-q35-"), "{xml}");
    let memory = fx.vm.dir.join("vm1.c1.memory");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&memory).unwrap().permissions().mode() & 0o777,
        0o400
    );

    control(&fx, "cont");
    fx.wait_state("running");
    fx.vm.qemu_io("vda", "write -P 0x2b 0 64k").unwrap();
    fx.scribble_ram(8 << 20);
    assert_ne!(fx.guest_ram(8 << 20), ram);

    fx.revert("c1", "paused").unwrap();
    assert_eq!(fx.read(".state"), "paused\n");
    assert!(fx.guest_ram(8 << 20) == ram, "RAM as at the checkpoint");
    assert_eq!(first_byte(&fx), 0x2a);
    let log = fx.read(".log");
    assert!(!log.contains("refused"), "{log}");
}

#[test]
fn a_memory_file_saved_by_qemu_7_2_reverts_on_qemu_10() {
    let q72 = qemu_binary("7.2");
    let q10 = qemu_binary("10.");
    let dir = TempDir::new("qv-upgrade");
    let mut vm = Vm::start_with_qemu(
        &VmSpec::small("vm1"),
        &dir.0.join("images"),
        &q72.to_string_lossy(),
    )
    .unwrap();
    vm.policy = Some("external".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    let mut fx = Fixture { daemon, vm, dir };
    assert_eq!(caps(&fx).version.0, 7);

    fx.vm.fill_ram(8).unwrap();
    let ram = fx.guest_ram(8 << 20);
    fx.vm.qemu_io("vda", "write -P 0x3a 0 64k").unwrap();
    fs::create_dir(fx.path("c1")).unwrap();
    assert_eq!(fx.read("c1/state"), "running\n");
    let xml = fx.read("c1/snapshot.xml");
    assert!(xml.contains("memory-format='stream'"), "{xml}");
    assert!(xml.contains("machine='pc-q35-7.2'"), "{xml}");
    fx.vm.qemu_io("vda", "write -P 0x3b 0 64k").unwrap();
    fx.scribble_ram(8 << 20);

    // QEMU is upgraded: the definition now starts QEMU 10.
    fx.vm.argv[0] = q10.to_string_lossy().into_owned();
    fx.vm.write_definition(&fx.dir.0.join("domains")).unwrap();
    fx.restart_daemon(&[]);

    fx.revert("c1", "running").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    let now = caps(&fx);
    assert_eq!(now.version.0, 10, "the new QEMU is 10.x");
    assert!(fx.guest_ram(8 << 20) == ram, "RAM as at the checkpoint");
    assert_eq!(first_byte(&fx), 0x3a);
    let log = fx.read(".log");
    assert!(!log.contains("refused"), "{log}");
}

#[test]
fn a_qemu_outside_the_tested_range_is_warned_about_and_keeps_working() {
    let fx = Fixture::with_env("qv-range", &[("VMSNAPFS_TESTED_QEMU", "1.0-1.1")]);
    let v = caps(&fx).version_text();
    let state = fx.read(".state");
    assert_eq!(
        state,
        format!(
            "running\nwarning: QEMU {v} is outside the tested range 1.0-1.1; \
             vmsnapfs uses what it reports\n"
        )
    );
    let log = fx.read(".log");
    assert!(log.contains("outside the tested range"), "{log}");
    fs::create_dir(fx.path("s1")).unwrap();
    assert_eq!(fx.read("s1/state"), "running\n");
    assert_eq!(fx.ls(), vec!["s1".to_string()]);
}

#[test]
fn a_mapped_ram_memory_file_is_refused_by_a_qemu_without_it() {
    let q72 = qemu_binary("7.2");
    let q10 = qemu_binary("10.");
    let dir = TempDir::new("qv-nomapped");
    let mut vm = Vm::start_with_qemu(
        &VmSpec::small("vm1"),
        &dir.0.join("images"),
        &q10.to_string_lossy(),
    )
    .unwrap();
    vm.policy = Some("external".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    let mut fx = Fixture { daemon, vm, dir };
    assert!(caps(&fx).has_parallel_memory_files());
    fx.vm.fill_ram(8).unwrap();
    control(&fx, "stop");
    fx.wait_state("paused");
    fs::create_dir(fx.path("p1")).unwrap();
    let xml = fx.read("p1/snapshot.xml");
    assert!(xml.contains("memory-format='mapped-ram'"), "{xml}");

    // The domain now runs on QEMU 7.2, which has no mapped-ram.
    let _ = fx
        .vm
        .control()
        .unwrap()
        .execute_raw("quit", serde_json::json!({}));
    fx.wait_state("shutoff");
    fx.vm.argv[0] = q72.to_string_lossy().into_owned();
    fx.vm.write_definition(&fx.dir.0.join("domains")).unwrap();
    fx.restart_daemon(&[]);
    write_file(&fx.path(".start"), b"running").unwrap();
    fx.wait_state("running");
    assert_eq!(caps(&fx).version.0, 7);
    let pid = fx.vm.current_pid();
    let files = |fx: &Fixture| {
        let mut v: Vec<_> = fs::read_dir(&fx.vm.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = files(&fx);

    assert_eq!(fx.revert("p1", "running"), Err(libc::EOPNOTSUPP));
    let log = fx.read(".log");
    assert!(
        log.contains("refused (EOPNOTSUPP)") && log.contains("mapped-ram"),
        "{log}"
    );
    assert_eq!(fx.read(".state"), "running\n");
    assert_eq!(fx.vm.current_pid(), pid, "the same QEMU runs on");
    assert_eq!(files(&fx), before, "nothing made");
    assert_eq!(fx.ls(), vec!["p1".to_string()]);
}

/// QEMU's migration settings that a live copy changes are as before it:
/// `pause-before-switchover` off, `downtime-limit` and `direct-io` at
/// QEMU's defaults.
fn migration_settings_restored(fx: &Fixture) {
    let mut q = fx.vm.control().unwrap();
    assert!(!q.migrate_capability_on("pause-before-switchover").unwrap());
    assert!(!q.migrate_capability_on("mapped-ram").unwrap());
    assert_eq!(
        q.downtime_and_direct_io().unwrap(),
        (Some(300), Some(false))
    );
}

/// The memory files and their `.part`s beside the images.
fn memory_files(fx: &Fixture) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(&fx.vm.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".memory"))
        .collect();
    v.sort();
    v
}

/// The format of snapshot `snap`'s memory file, read through the tree.
fn memory_format_of(fx: &Fixture, snap: &str) -> Option<MemoryFormat> {
    use std::io::Read;
    let mut head = Vec::new();
    fs::File::open(fx.path(&format!("{snap}/memory")))
        .unwrap()
        .take(memory_file::HEAD as u64)
        .read_to_end(&mut head)
        .unwrap();
    memory_file::format_of(&head)
}

/// `.log` once it holds `text` (notes reach it with the next state poll).
fn log_with(fx: &Fixture, text: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = fx.read(".log");
        if log.contains(text) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_running_checkpoint_is_a_live_copy_where_the_qemu_can() {
    let fx = Fixture::with_policy("qv-live", "external", &[]);
    let live_copy = caps(&fx).has_live_parallel_checkpoints();
    let (want, format) = if live_copy {
        ("mapped-ram", MemoryFormat::MappedRam)
    } else {
        ("stream", MemoryFormat::Stream)
    };
    fx.vm.fill_ram(8).unwrap();
    let ram = fx.guest_ram(8 << 20);
    fx.vm.qemu_io("vda", "write -P 0x4a 0 64k").unwrap();

    fs::create_dir(fx.path("c1")).unwrap();
    assert_eq!(fx.read("c1/state"), "running\n");
    assert_eq!(fx.read(".state"), "running\n", "the guest runs on");
    let xml = fx.read("c1/snapshot.xml");
    assert!(xml.contains(&format!("memory-format='{want}'")), "{xml}");
    assert_eq!(memory_format_of(&fx, "c1"), Some(format));
    assert_eq!(memory_files(&fx), vec!["vm1.c1.memory"]);
    let log = fx.read(".log");
    assert!(log.contains("guest paused"), "{log}");
    assert!(
        !log.contains("given up") && !log.contains("refused"),
        "{log}"
    );
    if live_copy {
        migration_settings_restored(&fx);
    }

    // A second one in the same QEMU process.
    fs::create_dir(fx.path("c2")).unwrap();
    assert_eq!(memory_format_of(&fx, "c2"), Some(format));
    assert_eq!(fx.read(".state"), "running\n");

    // The guest goes on; a revert brings back RAM and disks of the
    // checkpoint.
    fx.vm.qemu_io("vda", "write -P 0x4b 0 64k").unwrap();
    fx.scribble_ram(8 << 20);
    assert_ne!(fx.guest_ram(8 << 20), ram);
    fx.revert("c1", "running").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert!(fx.guest_ram(8 << 20) == ram, "RAM as at the checkpoint");
    assert_eq!(first_byte(&fx), 0x4a);

    // And the QEMU the revert started takes one too.
    fs::create_dir(fx.path("c3")).unwrap();
    assert_eq!(memory_format_of(&fx, "c3"), Some(format));
    assert_eq!(fx.read(".state"), "running\n");
    let log = fx.read(".log");
    assert!(!log.contains("given up"), "{log}");
}

#[test]
fn a_live_copy_that_does_not_converge_falls_back_to_a_background_snapshot() {
    let fx = Fixture::with_policy(
        "qv-noconv",
        "external",
        &[("VMSNAPFS_FAILPOINTS", "checkpoint.converging=error")],
    );
    let live_copy = caps(&fx).has_live_parallel_checkpoints();
    fx.vm.fill_ram(8).unwrap();
    let ram = fx.guest_ram(8 << 20);
    fx.vm.qemu_io("vda", "write -P 0x5a 0 64k").unwrap();

    fs::create_dir(fx.path("c1")).unwrap();
    assert_eq!(fx.read("c1/state"), "running\n");
    assert_eq!(fx.read(".state"), "running\n");
    let xml = fx.read("c1/snapshot.xml");
    assert!(xml.contains("memory-format='stream'"), "{xml}");
    assert_eq!(memory_format_of(&fx, "c1"), Some(MemoryFormat::Stream));
    assert_eq!(memory_files(&fx), vec!["vm1.c1.memory"], "no partial file");
    let log = fx.read(".log");
    assert_eq!(
        log.contains("live copy of RAM given up (not converged"),
        live_copy,
        "{log}"
    );
    assert!(!log.contains("refused"), "{log}");
    if live_copy {
        assert!(
            log.contains("RAM written as a background snapshot"),
            "{log}"
        );
        migration_settings_restored(&fx);
    }

    fx.vm.qemu_io("vda", "write -P 0x5b 0 64k").unwrap();
    fx.scribble_ram(8 << 20);
    fx.revert("c1", "running discard").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert!(fx.guest_ram(8 << 20) == ram, "RAM as at the checkpoint");
    assert_eq!(first_byte(&fx), 0x5a);
}

#[test]
fn a_daemon_killed_while_qemu_waits_for_the_disk_switch_leaves_the_guest_running() {
    let mut fx = Fixture::with_policy("qv-crash", "external", &[]);
    let live_copy = caps(&fx).has_live_parallel_checkpoints();
    fx.vm.fill_ram(8).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x6a 0 64k").unwrap();
    fs::create_dir(fx.path("a")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x6c 0 64k").unwrap();

    fx.restart_daemon(&[("VMSNAPFS_FAILPOINTS", "checkpoint.pre-switchover=crash")]);
    let r = fs::create_dir(fx.path("c"));
    if !live_copy {
        // No live copy on this QEMU: the point is never reached.
        r.unwrap();
        assert_eq!(memory_format_of(&fx, "c"), Some(MemoryFormat::Stream));
        return;
    }
    assert!(r.is_err(), "returned");
    assert!(fx.daemon.wait_exit(Duration::from_secs(60)), "no crash");
    fx.daemon.kill9();
    // QEMU waits for the switch with the guest stopped.
    {
        let mut q = fx.vm.control().unwrap();
        let m = q
            .execute_raw("query-migrate", serde_json::json!({}))
            .unwrap();
        assert_eq!(m["status"], "pre-switchover", "{m}");
        let s = q
            .execute_raw("query-status", serde_json::json!({}))
            .unwrap();
        assert_eq!(s["running"], false, "{s}");
    }

    fx.restart_daemon(&[]);
    let journal: Vec<_> = fs::read_dir(fx.daemon.state.join("vm1/journal"))
        .unwrap()
        .collect();
    assert!(journal.is_empty(), "journal {journal:?}");
    let log = log_with(&fx, "live checkpoint interrupted");
    assert!(log.contains("live checkpoint interrupted"), "{log}");
    assert_eq!(fx.ls(), vec!["a".to_string()], "{log}");
    assert_eq!(fx.read(".state"), "running\n");
    {
        let mut q = fx.vm.control().unwrap();
        let s = q
            .execute_raw("query-status", serde_json::json!({}))
            .unwrap();
        assert_eq!(s["status"], "running", "{s}");
        let m = q
            .execute_raw("query-migrate", serde_json::json!({}))
            .unwrap();
        assert_eq!(m["status"], "cancelled", "{m}");
    }
    migration_settings_restored(&fx);
    assert_eq!(memory_files(&fx), vec!["vm1.a.memory"], "nothing half-made");
    check_no_orphans(&fx);
    assert_eq!(first_byte(&fx), 0x6c, "the guest's disk as it was");
    assert_eq!(fs::read(fx.path("a/disks/vda")).unwrap()[0], 0x6a);

    // The domain goes on: the next checkpoint is a live copy again.
    fs::create_dir(fx.path("d")).unwrap();
    assert_eq!(memory_format_of(&fx, "d"), Some(MemoryFormat::MappedRam));
    assert_eq!(fx.read(".state"), "running\n");
}

#[test]
fn a_checkpoint_recovered_after_a_crash_records_the_format_its_file_has() {
    let mut fx = Fixture::with_policy("qv-recfmt", "external", &[]);
    fx.vm.fill_ram(8).unwrap();
    let ram = fx.guest_ram(8 << 20);
    fx.vm.qemu_io("vda", "write -P 0x7a 0 64k").unwrap();
    // The live copy gives up (where there is one) and the stream that
    // replaces it is written; the daemon dies before the record is.
    fx.restart_daemon(&[(
        "VMSNAPFS_FAILPOINTS",
        "checkpoint.converging=error,create.after-backend=crash",
    )]);
    assert!(fs::create_dir(fx.path("c")).is_err(), "returned");
    assert!(fx.daemon.wait_exit(Duration::from_secs(60)), "no crash");
    fx.daemon.kill9();
    fx.restart_daemon(&[]);

    assert_eq!(fx.ls(), vec!["c".to_string()], "{}", fx.read(".log"));
    let xml = fx.read("c/snapshot.xml");
    assert!(xml.contains("memory-format='stream'"), "{xml}");
    assert_eq!(memory_format_of(&fx, "c"), Some(MemoryFormat::Stream));
    fx.vm.qemu_io("vda", "write -P 0x7b 0 64k").unwrap();
    fx.scribble_ram(8 << 20);
    fx.revert("c", "running discard").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert!(fx.guest_ram(8 << 20) == ram, "RAM as at the checkpoint");
    assert_eq!(first_byte(&fx), 0x7a);
}

/// What a live copy changes in QEMU's migration settings is back as it
/// was: `pause-before-switchover` off, `downtime-limit` (and `direct-io`
/// where QEMU has it) at QEMU's defaults, no descriptor left.
fn live_copy_settings_restored(fx: &Fixture) {
    let mut q = fx.vm.control().unwrap();
    assert!(!q.migrate_capability_on("pause-before-switchover").unwrap());
    assert!(!q.migrate_capability_on("background-snapshot").unwrap());
    let (downtime, direct) = q.downtime_and_direct_io().unwrap();
    assert_eq!(downtime, Some(300));
    assert_ne!(direct, Some(true));
}

#[test]
fn a_running_checkpoint_is_a_live_copy_where_background_snapshot_is_refused() {
    let fx = Fixture::with_shared_ram("qv-shared", &[]);
    let c = caps(&fx);
    let (want, format) = if c.has_live_parallel_checkpoints() {
        ("mapped-ram", MemoryFormat::MappedRam)
    } else {
        ("stream", MemoryFormat::Stream)
    };
    assert!(
        c.has_live_stream_checkpoints(),
        "QEMU {} has no pause-before-switchover",
        c.version_text()
    );
    fx.vm.fill_ram(8).unwrap();
    let ram = fx.guest_ram(8 << 20);
    fx.vm.qemu_io("vda", "write -P 0x3c 0 64k").unwrap();

    fs::create_dir(fx.path("c1")).unwrap();
    assert_eq!(fx.read("c1/state"), "running\n");
    assert_eq!(fx.read(".state"), "running\n", "the guest runs on");
    let log = fx.read(".log");
    assert!(
        log.contains(&format!("RAM copied live into a {want} file")),
        "{log}"
    );
    if format == MemoryFormat::Stream {
        assert!(
            log.contains("background-snapshot refused") && log.contains("RAM copied live"),
            "{log}"
        );
    }
    assert!(!log.contains("given up"), "{log}");
    assert!(log.contains("guest paused"), "{log}");
    for l in log.lines().filter(|l| l.contains("guest paused")) {
        eprintln!("{l}");
    }
    assert_eq!(memory_format_of(&fx, "c1"), Some(format));
    assert_eq!(memory_files(&fx), vec!["vm1.c1.memory"]);
    live_copy_settings_restored(&fx);
    assert_eq!(fs::read(fx.path("c1/disks/vda")).unwrap()[0], 0x3c);

    fx.vm.qemu_io("vda", "write -P 0x3d 0 64k").unwrap();
    fx.scribble_ram(8 << 20);
    assert_ne!(fx.guest_ram(8 << 20), ram);
    fx.revert("c1", "running").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert!(fx.guest_ram(8 << 20) == ram, "RAM as at the checkpoint");
    assert_eq!(first_byte(&fx), 0x3c);
}
