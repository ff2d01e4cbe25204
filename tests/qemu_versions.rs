//! What differs between QEMU versions, on real VMs through the mounted
//! tree: memory files in the fastest format the QEMU has, recorded in the
//! metadata; a memory file saved by QEMU 7.2 reverting on QEMU 10.0 (an
//! upgrade); the warning for a QEMU outside the tested range.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vmsnapfs::backend::capabilities::Capabilities;

/// Guest-physical bytes [16 MiB, +len) through `pmemsave`.
fn guest_ram(fx: &Fixture, len: u64) -> Vec<u8> {
    let out = fx.dir.0.join("ram.dump");
    let mut q = fx.vm.control().unwrap();
    q.execute_raw(
        "pmemsave",
        serde_json::json!({"val": 16u64 << 20, "size": len, "filename": out}),
    )
    .unwrap();
    let data = fs::read(&out).unwrap();
    let _ = fs::remove_file(&out);
    data
}

/// Overwrites guest RAM at 16 MiB with zeros through /proc/PID/mem.
fn scribble_ram(fx: &Fixture, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut q = fx.vm.control().unwrap();
    let out = q.hmp(&format!("gpa2hva 0x{:x}", 16u64 << 20)).unwrap();
    let pid = q.peer_pid().unwrap();
    drop(q);
    let hva = u64::from_str_radix(out.rsplit("0x").next().unwrap().trim(), 16).unwrap();
    let mut mem = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    mem.seek(SeekFrom::Start(hva)).unwrap();
    mem.write_all(&vec![0u8; len]).unwrap();
}

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
    let ram = guest_ram(&fx, 8 << 20);
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
    scribble_ram(&fx, 8 << 20);
    assert_ne!(guest_ram(&fx, 8 << 20), ram);

    fx.revert("c1", "paused").unwrap();
    assert_eq!(fx.read(".state"), "paused\n");
    assert!(guest_ram(&fx, 8 << 20) == ram, "RAM as at the checkpoint");
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
    let ram = guest_ram(&fx, 8 << 20);
    fx.vm.qemu_io("vda", "write -P 0x3a 0 64k").unwrap();
    fs::create_dir(fx.path("c1")).unwrap();
    assert_eq!(fx.read("c1/state"), "running\n");
    let xml = fx.read("c1/snapshot.xml");
    assert!(xml.contains("memory-format='stream'"), "{xml}");
    assert!(xml.contains("machine='pc-q35-7.2'"), "{xml}");
    fx.vm.qemu_io("vda", "write -P 0x3b 0 64k").unwrap();
    scribble_ram(&fx, 8 << 20);

    // QEMU is upgraded: the definition now starts QEMU 10.
    fx.vm.argv[0] = q10.to_string_lossy().into_owned();
    fx.vm.write_definition(&fx.dir.0.join("domains")).unwrap();
    fx.restart_daemon(&[]);

    fx.revert("c1", "running").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    let now = caps(&fx);
    assert_eq!(now.version.0, 10, "the new QEMU is 10.x");
    assert!(guest_ram(&fx, 8 << 20) == ram, "RAM as at the checkpoint");
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
