//! Bad input, busy domains, a dying QEMU, daemon restarts, permissions:
//! every refusal is an errno plus a `.log` line, nothing half-made remains.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn bad_names_duplicates_and_busy_domain() {
    let gate = Gate::new("badinput");
    let fx = Fixture::with_env(
        "badinput",
        &[(
            "VMSNAPFS_FAILPOINTS",
            &format!("revert.begin={}", gate.action()),
        )],
    );
    let cases: Vec<(Vec<u8>, i32)> = vec![
        (b".hidden".to_vec(), libc::EINVAL),
        (b"ctl\x01char".to_vec(), libc::EINVAL),
        (b"new\nline".to_vec(), libc::EINVAL),
        (b"\xff\xfe".to_vec(), libc::EINVAL),
        (b" padded".to_vec(), libc::EINVAL),
        (vec![b'x'; 255 + 1], libc::ENAMETOOLONG),
    ];
    for (name, want) in &cases {
        let p = fx.path("").join(std::ffi::OsStr::from_bytes(name));
        assert_eq!(
            errno(fs::create_dir(&p)),
            *want,
            "{:?}",
            String::from_utf8_lossy(name)
        );
    }
    let log = fx.read(".log");
    assert!(
        log.contains("refused (EINVAL): invalid snapshot name"),
        "{log}"
    );
    assert!(fx.ls().is_empty());

    // A second operation while one runs on the domain: EBUSY. (Two
    // mkdirs in one directory are serialised by the kernel's directory
    // lock, so the long operation here is a revert.)
    fs::create_dir(fx.path("one")).unwrap();
    let p = fx.path("one/revert");
    let t = std::thread::spawn(move || write_file(&p, b"running discard"));
    fx.daemon.wait_log("failpoint revert.begin");
    assert_eq!(errno(fs::create_dir(fx.path("two"))), libc::EBUSY);
    assert_eq!(errno(fs::remove_dir(fx.path("one"))), libc::EBUSY);
    // ls and cat do not wait behind the running revert: it is held at
    // its gate until they answered (were they waiting, they never would).
    let (tx, rx) = std::sync::mpsc::channel();
    let dom = fx.path("");
    std::thread::spawn(move || {
        let mut names: Vec<String> = fs::read_dir(&dom)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let tree = fs::read_to_string(dom.join(".tree")).is_ok();
        let xml = fs::read_to_string(dom.join("one/snapshot.xml")).is_ok();
        let _ = tx.send((names, tree, xml));
    });
    let answered = rx.recv_timeout(Duration::from_secs(60));
    gate.open();
    let (names, tree, xml) = answered.expect("ls blocked behind the revert");
    assert_eq!(names, vec!["one"]);
    assert!(tree && xml);
    t.join().unwrap().unwrap();
    assert!(fx.read(".log").contains("refused (EBUSY)"));
    // A taken name: mkdir is answered by the kernel (the entry exists);
    // mv over it reaches the daemon, which refuses and says why.
    assert_eq!(errno(fs::create_dir(fx.path("one"))), libc::EEXIST);
    fs::create_dir(fx.path("two")).unwrap();
    assert_eq!(
        errno(fs::rename(fx.path("two"), fx.path("one"))),
        libc::EEXIST
    );
    assert!(fx.read(".log").contains("refused (EEXIST)"));
    assert_eq!(fx.ls(), vec!["one", "two"]);
    // Not a control file, not a snapshot: no writes, no unlink, no rmdir of files.
    assert!(fs::write(fx.path(".tree"), "x").is_err());
    assert!(fs::remove_file(fx.path(".tree")).is_err());
    assert_eq!(errno(fs::remove_dir(fx.path("nope"))), libc::ENOENT);
    assert!(fs::create_dir(fx.path("one/sub")).is_err());
    for d in &fx.vm.disks {
        assert_eq!(image_tags(&d.image).len(), 2);
    }
}

#[test]
fn qemu_dying_mid_operation_gives_eio_and_leaves_nothing() {
    let gate = Gate::new("qemugone");
    let mut fx = Fixture::with_env(
        "qemugone",
        &[(
            "VMSNAPFS_FAILPOINTS",
            &format!("create.begin={}", gate.action()),
        )],
    );
    let p = fx.path("doomed");
    let t = std::thread::spawn(move || fs::create_dir(p));
    fx.daemon.wait_log("failpoint create.begin");
    fx.vm.kill();
    gate.open();
    let r = t.join().unwrap();
    assert_eq!(errno(r), libc::EIO);
    assert_eq!(fx.read(".state"), "shutoff\n");
    assert!(fx.ls().is_empty());
    assert!(fx.read(".log").contains("refused (EIO)"));
    for d in &fx.vm.disks {
        assert!(
            image_tags(&d.image).is_empty(),
            "stray tag in {}",
            d.image.display()
        );
    }
    let snaps = fs::read_dir(fx.daemon.state.join("vm1/snapshots"))
        .unwrap()
        .count();
    assert_eq!(snaps, 0, "stray metadata");
}

#[test]
fn metadata_survives_restart_and_foreign_snapshots_appear() {
    let mut fx = Fixture::new("restart");
    fs::create_dir(fx.path("a")).unwrap();
    fs::create_dir(fx.path("b")).unwrap();
    fs::rename(fx.path("b"), fx.path("b2")).unwrap();
    // A snapshot made behind vmsnapfs' back (as virsh or an admin would).
    fx.vm.control().unwrap().hmp("savevm foreign-tag").unwrap();
    fx.restart_daemon(&[]);
    assert_eq!(fx.ls(), vec!["a", "b2", "foreign-tag"]);
    assert_eq!(
        fs::read_link(fx.path("b2/parent")).unwrap().to_str(),
        Some("../a")
    );
    assert_eq!(
        fs::read_link(fx.path(".current")).unwrap().to_str(),
        Some("b2")
    );
    assert!(fs::symlink_metadata(fx.path("foreign-tag/parent")).is_err());
    assert!(fx
        .read(".log")
        .contains("adopted snapshot tag \"foreign-tag\""));
    // The adopted one is a real snapshot: revert to it and delete it.
    fx.revert("foreign-tag", "running discard").unwrap();
    fs::remove_dir(fx.path("foreign-tag")).unwrap();
    // A snapshot deleted behind our back disappears at the next start.
    let tag = fs::read_dir(fx.daemon.state.join("vm1/snapshots"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .map(|xml| vmsnapfs::xml::snapshot::parse_snapshot_xml(&xml).unwrap())
        .find(|spec| spec.name.as_deref() == Some("a"))
        .and_then(|spec| spec.id)
        .unwrap();
    fx.vm
        .control()
        .unwrap()
        .hmp(&format!("delvm {tag}"))
        .unwrap();
    fx.restart_daemon(&[]);
    assert_eq!(fx.ls(), vec!["b2"]);
    assert!(fx.read(".log").contains("gone from the images"));
}

#[test]
fn daemon_killed_mid_create_rolls_back_at_start() {
    let mut fx = Fixture::with_env(
        "crash",
        &[("VMSNAPFS_FAILPOINTS", "create.after-backend=crash")],
    );
    let _ = fs::create_dir(fx.path("half"));
    assert!(fx.daemon.wait_exit(Duration::from_secs(10)));
    fx.daemon.kill9();
    // The tag exists in the images, the metadata does not.
    assert_eq!(image_tags(&fx.vm.disks[0].image).len(), 1);
    fx.restart_daemon(&[]);
    assert!(fx.ls().is_empty(), "{:?}", fx.ls());
    for d in &fx.vm.disks {
        assert!(image_tags(&d.image).is_empty());
    }
    assert!(fx.read(".log").contains("rolled back"));
    // And the domain works normally afterwards.
    fs::create_dir(fx.path("whole")).unwrap();
    assert_eq!(fx.ls(), vec!["whole"]);
}

#[test]
fn tree_is_roots_only_by_default() {
    let fx = Fixture::new("perms");
    let meta = fs::metadata(fx.path("")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    fs::create_dir(fx.path("s")).unwrap();
    let revert = fs::metadata(fx.path("s/revert")).unwrap();
    assert_eq!(revert.permissions().mode() & 0o777, 0o200);
    // Another user is refused at the FUSE level (no allow_other).
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", "ls"])
        .arg(&fx.daemon.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success(), "nobody could list the tree");
}

#[test]
fn qemu_dying_before_a_revert_changes_nothing() {
    let gate = Gate::new("qemugone-revert");
    let mut fx = Fixture::with_env(
        "qemugone-revert",
        &[(
            "VMSNAPFS_FAILPOINTS",
            &format!("revert.begin={}", gate.action()),
        )],
    );
    fx.vm.qemu_io("vda", "write -P 0x21 0 64k").unwrap();
    fs::create_dir(fx.path("s")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x22 0 64k").unwrap();
    // What the guest flushed survives QEMU's death (qcow2 metadata too).
    fx.vm.qemu_io("vda", "flush").unwrap();
    let p = fx.path("s/revert");
    let t = std::thread::spawn(move || write_file(&p, b"running discard"));
    fx.daemon.wait_log("failpoint revert.begin");
    fx.vm.kill();
    gate.open();
    assert_eq!(t.join().unwrap(), Err(libc::EIO));
    assert_eq!(fx.read(".state"), "shutoff\n");
    let journal = fx.journal().len();
    assert_eq!(
        journal, 0,
        "a revert that never started must leave no intent"
    );
    // A restart does not revert behind the user's back either.
    fx.restart_daemon(&[]);
    let vda = fx.vm.read_disk("vda").unwrap();
    assert!(all_bytes(&vda, 0, 64 * 1024, 0x22), "live data changed");
    assert_eq!(fx.ls(), vec!["s"]);
}

/// A size-limited tmpfs, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn new(path: std::path::PathBuf, size: &str) -> Self {
        fs::create_dir_all(&path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success());
        SmallFs(path)
    }

    /// Fills the filesystem; returns the filler to remove later.
    fn fill(&self) -> std::path::PathBuf {
        let filler = self.0.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .stderr(std::process::Stdio::null())
            .status();
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn out_of_space_gives_enospc_and_leaves_nothing() {
    let dir = TempDir::new("enospc");
    let small = SmallFs::new(dir.0.join("small"), "96m");
    let mut vm = Vm::start(&VmSpec::small("vm1"), &small.0).unwrap();
    vm.policy = Some("internal".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    vm.qemu_io("vda", "write -P 0x31 0 8M").unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    let vm1 = daemon.mnt.join("vm1");
    let filler = small.fill();
    // Running VM: the RAM state does not fit into the image.
    let r = fs::create_dir(vm1.join("full"));
    let log = fs::read_to_string(vm1.join(".log")).unwrap();
    assert_eq!(errno(r), libc::ENOSPC, "{log}");
    assert!(log.contains("refused (ENOSPC)"), "{log}");
    assert_eq!(fs::read_to_string(vm1.join(".state")).unwrap(), "running\n");
    let status = vm
        .control()
        .unwrap()
        .execute_raw("query-status", serde_json::json!({}))
        .unwrap();
    assert_eq!(status["status"], "running", "the VM must keep running");
    for d in &vm.disks {
        assert!(image_tags(&d.image).is_empty(), "stray tag");
    }
    assert_eq!(
        fs::read_dir(daemon.state.join("vm1/snapshots"))
            .unwrap()
            .count(),
        0
    );
    // With space again, the same name works and the guest data is intact.
    fs::remove_file(&filler).unwrap();
    fs::create_dir(vm1.join("full")).unwrap();
    assert!(all_bytes(&vm.read_disk("vda").unwrap(), 0, 8 << 20, 0x31));
    drop(daemon);
    drop(vm);
    drop(small);
}

#[test]
fn out_of_space_offline_and_in_the_state_dir() {
    let dir = TempDir::new("enospc-offline");
    let small = SmallFs::new(dir.0.join("small"), "64m");
    let mut vm = Vm::start(&VmSpec::small("vm1"), &small.0).unwrap();
    vm.qemu_io("vda", "write -P 0x41 0 4M").unwrap();
    vm.kill();
    vm.policy = Some("internal".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    // The metadata store on a full filesystem of its own.
    let state_fs = SmallFs::new(dir.0.join("state"), "1m");
    let daemon = Daemon::start(&dir.0, &[]);
    let vm1 = daemon.mnt.join("vm1");
    let state_filler = state_fs.fill();
    assert_eq!(
        errno(fs::create_dir(vm1.join("nometa"))),
        libc::ENOSPC,
        "{}",
        daemon.log_text()
    );
    fs::remove_file(&state_filler).unwrap();
    // Stopped VM: qemu-img cannot grow the image.
    let filler = small.fill();
    assert_eq!(errno(fs::create_dir(vm1.join("noimg"))), libc::ENOSPC);
    let log = fs::read_to_string(vm1.join(".log")).unwrap();
    assert_eq!(log.matches("refused (ENOSPC)").count(), 2, "{log}");
    for d in &vm.disks {
        assert!(image_tags(&d.image).is_empty(), "stray tag");
    }
    fs::remove_file(&filler).unwrap();
    fs::create_dir(vm1.join("ok")).unwrap();
    let names: Vec<_> = fs::read_dir(&vm1)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names, vec!["ok"]);
    drop(daemon);
    drop(state_fs);
    drop(vm);
    drop(small);
}

#[test]
fn a_monitor_that_speaks_garbage_or_hangs_is_unreachable_not_shut_off() {
    use std::io::Write as _;
    use std::os::unix::net::UnixListener;
    let dir = TempDir::new("badmonitor");
    let domains = dir.0.join("domains");
    fs::create_dir_all(&domains).unwrap();
    let mut keep = Vec::new();
    for (name, garbage) in [("garbage", true), ("silent", false)] {
        let img = dir.0.join(format!("{name}.qcow2"));
        create_qcow2(&img, "16M");
        let sock = dir.0.join(format!("{name}.qmp"));
        let listener = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                if garbage {
                    let _ = s.write_all(b"\x00\xffnot json at all\n");
                } else {
                    // Accept and say nothing, keeping the connection open.
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(600));
                        drop(s);
                    });
                }
            }
        });
        fs::write(
            domains.join(format!("{name}.xml")),
            format!(
                "<domain><name>{name}</name><monitor path='{}'/><devices><disk type='file' device='disk'>\
                 <driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda'/></disk>\
                 </devices><snapshot policy='internal'/></domain>",
                sock.display(),
                img.display()
            ),
        )
        .unwrap();
        keep.push(img);
    }
    let mut daemon = Daemon::start(&dir.0, &[]);
    for (name, why) in [
        ("garbage", "unreachable: the monitor does not speak QMP"),
        ("silent", "unreachable: no greeting within 5s"),
    ] {
        let d = daemon.mnt.join(name);
        // A monitor that cannot be used is not "shut off": wait for the
        // domain's first look at it to end.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = fs::read_to_string(d.join(".state")).unwrap();
            if state.starts_with(why) {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: .state is {state:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = fs::read_to_string(d.join(".log")).unwrap();
        assert!(log.contains(why), "{name}: {log}");
        // Nothing is done offline on images a silent QEMU may hold.
        assert_eq!(
            errno(fs::create_dir(d.join("offline"))),
            libc::EIO,
            "{name}"
        );
        assert_eq!(
            image_tags(&keep[if name == "garbage" { 0 } else { 1 }]).len(),
            0
        );
    }
    assert!(daemon.alive(), "the daemon must survive a hostile monitor");
}

/// The `qemu-nbd` servers that process `pid` runs as children (of any
/// of its threads).
fn nbd_children_of(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .filter_map(|p| vmsnapfs::backend::process::read_argv(p)?.into_iter().next())
        .filter(|a| a.ends_with("qemu-nbd"))
        .collect()
}

#[test]
fn views_start_no_process_and_survive_a_killed_daemon() {
    let mut fx = Fixture::new("orphans");
    // A compressed cluster, read directly like any other.
    fx.vm.qemu_io("vda", "write -c -P 0x77 0 64k").unwrap();
    fs::create_dir(fx.path("s")).unwrap();
    let mut f = fs::File::open(fx.path("s/disks/vda")).unwrap();
    let mut buf = vec![0u8; 4096];
    std::io::Read::read_exact(&mut f, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x77), "compressed data read back");
    let pid = fx.daemon.pid().expect("daemon pid");
    assert_eq!(
        nbd_children_of(pid),
        Vec::<String>::new(),
        "an open view runs no server"
    );
    drop(f);
    fx.daemon.kill9();
    fx.restart_daemon(&[]);
    // The view works again after a restart.
    let all = fs::read(fx.path("s/disks/vda")).unwrap();
    assert_eq!(all.len(), 64 << 20);
    assert!(all[..65536].iter().all(|b| *b == 0x77));
}

#[test]
fn a_snapshot_on_some_disks_only_is_never_half_reverted() {
    let mut fx = Fixture::new("partial");
    fx.vm.qemu_io("vda", "write -P 0x51 0 64k").unwrap();
    // Made behind vmsnapfs' back, on vda only.
    fx.vm
        .control()
        .unwrap()
        .execute_raw(
            "blockdev-snapshot-internal-sync",
            serde_json::json!({"device": "vda-fmt", "name": "half"}),
        )
        .unwrap();
    fx.vm.qemu_io("vda", "write -P 0x52 0 64k").unwrap();
    fx.restart_daemon(&[]);
    assert_eq!(fx.ls(), vec!["half"]);
    assert_eq!(fx.revert("half", "running force"), Err(libc::ENOENT));
    assert_eq!(fx.revert("half", "shutoff force"), Err(libc::ENOENT));
    assert!(fx.read(".log").contains("is on 1 of 2 disks"));
    assert_eq!(fx.read(".state"), "running\n", "nothing was stopped");
    assert!(all_bytes(
        &fx.vm.read_disk("vda").unwrap(),
        0,
        64 * 1024,
        0x52
    ));
    let journal = fx.journal().len();
    assert_eq!(journal, 0);
}
