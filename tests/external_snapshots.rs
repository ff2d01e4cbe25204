//! External snapshots on a real VM through the mounted tree: overlays
//! taken live in one transaction and offline with qemu-img, live
//! checkpoints with a memory file, `.create` specs with explicit paths,
//! the frozen views and image links of external points, and a restart
//! that must boot the active layers, not the images the command line names.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmsnapfs::demo::vm::read_image;

const M: usize = 1 << 20;

fn lseek(f: &fs::File, off: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    (r >= 0).then_some(r as u64)
}

fn link(p: &Path) -> PathBuf {
    fs::read_link(p).unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
}

/// Keeps the guest writing over both disks until dropped.
struct GuestWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl GuestWriter {
    fn start(control: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ctl = control.to_owned();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut q = vmsnapfs::backend::qmp::Qmp::connect(&ctl, Duration::from_secs(10))
                .expect("control socket");
            let mut n = 0u32;
            while !flag.load(Ordering::Acquire) {
                for (dev, off) in [("vda-dev", 4 + n % 30), ("vdb-dev", 16 + n % 10)] {
                    q.hmp(&format!(
                        "qemu-io -d {dev}/virtio-backend \"write -P 0xee {off}M 1M\""
                    ))
                    .unwrap();
                }
                n += 1;
            }
            n
        });
        GuestWriter {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u32 {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for GuestWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Quits QEMU cleanly through the control socket and waits for `.state`.
fn quit(fx: &Fixture) {
    let mut q = fx.vm.control().unwrap();
    let _ = q.execute_raw("quit", serde_json::json!({}));
    drop(q);
    fx.wait_state("shutoff");
}

#[test]
fn external_disk_only_snapshots_live_offline_and_after_a_restart() {
    let fx = Fixture::with_policy("ext-disks", "external-disk-only", &[]);
    let images = fx.vm.disks[0].image.parent().unwrap().to_owned();
    let (vda_base, vdb_base) = (fx.vm.disks[0].image.clone(), fx.vm.disks[1].image.clone());
    fx.vm.qemu_io("vda", "write -P 0xa1 0 1M").unwrap();
    fx.vm.qemu_io("vda", "write -P 0xa2 40M 64k").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0xb1 8M 2M").unwrap();
    let e1_vda = fx.vm.read_disk("vda").unwrap();
    let e1_vdb = fx.vm.read_disk("vdb").unwrap();

    fs::create_dir(fx.path("e1")).unwrap();
    assert_eq!(fx.read("e1/state"), "disk-snapshot\n");
    assert!(!fx.path("e1/memory").exists(), "no memory without RAM");
    assert_eq!(link(&fx.path("e1/images/vda")), vda_base);
    assert_eq!(link(&fx.path("e1/images/vdb")), vdb_base);
    let vda_e1 = images.join("vm1-vda.e1.qcow2");
    assert!(vda_e1.exists() && images.join("vm1-vdb.e1.qcow2").exists());
    let xml = fx.read("e1/snapshot.xml");
    assert!(xml.contains("snapshot='external'"), "{xml}");

    // The views show the disks at e1 while the guest writes over them.
    let writer = GuestWriter::start(&fx.vm.control);
    let vda = fs::read(fx.path("e1/disks/vda")).unwrap();
    let vdb = fs::read(fx.path("e1/disks/vdb")).unwrap();
    assert!(writer.finish() > 0, "the guest wrote during the read");
    assert!(vda == e1_vda, "e1 vda view differs from the disk at e1");
    assert!(vdb == e1_vdb, "e1 vdb view differs from the disk at e1");
    // Holes come from block status.
    let f = fs::File::open(fx.path("e1/disks/vda")).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Some(0));
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE), Some(M as u64));
    assert_eq!(
        lseek(&f, 2 * M as u64, libc::SEEK_DATA),
        Some(40 * M as u64)
    );
    drop(f);
    let copy = fx.dir.0.join("vda.sparse");
    let st = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(fx.path("e1/disks/vda"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(fs::read(&copy).unwrap() == e1_vda);
    let blocks = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&copy).unwrap());
    assert!(
        blocks * 512 < 4 * M as u64,
        "the copy is sparse: {blocks} blocks"
    );

    // A second snapshot stacks on the first overlay.
    fx.vm.qemu_io("vda", "write -P 0xc1 2M 1M").unwrap();
    let e2_vda = fx.vm.read_disk("vda").unwrap();
    assert!(all_bytes(&e2_vda, 0, M, 0xa1) && all_bytes(&e2_vda, 2 * M, M, 0xc1));
    fs::create_dir(fx.path("e2")).unwrap();
    assert_eq!(link(&fx.path("e2/images/vda")), vda_e1);
    assert_eq!(link(&fx.path("e2/parent")), PathBuf::from("../e1"));

    // Stopped: the same bytes, and the next snapshot is taken offline.
    fx.vm.qemu_io("vda", "write -P 0xd1 3M 1M").unwrap();
    fx.vm.qemu_io("vda", "flush").unwrap();
    fx.vm.qemu_io("vdb", "flush").unwrap();
    quit(&fx);
    assert!(fs::read(fx.path("e1/disks/vda")).unwrap() == e1_vda);
    assert!(fs::read(fx.path("e2/disks/vda")).unwrap() == e2_vda);
    let vda_e2 = images.join("vm1-vda.e2.qcow2");
    let live_vda = read_image(&vda_e2).unwrap();
    assert!(all_bytes(&live_vda, 3 * M, M, 0xd1));
    fs::create_dir(fx.path("e3")).unwrap();
    assert_eq!(fx.read("e3/state"), "shutoff\n");
    assert_eq!(link(&fx.path("e3/images/vda")), vda_e2);
    assert!(fs::read(fx.path("e3/disks/vda")).unwrap() == live_vda);
    for img in [&vda_e1, &vda_e2, &images.join("vm1-vda.e3.qcow2")] {
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(img)
            .status()
            .unwrap();
        assert!(out.success(), "qemu-img check {}", img.display());
    }

    // An internal snapshot of the stopped VM lands in the active overlay;
    // reverting to it starts QEMU on the overlays, never on the images
    // the command line names (which hold older data).
    let spec = b"<domainsnapshot><name>i1</name><memory snapshot='no'/><disks>\
        <disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
        </disks></domainsnapshot>";
    write_file(&fx.path(".create"), spec).unwrap();
    assert_eq!(
        link(&fx.path("i1/images/vda")),
        images.join("vm1-vda.e3.qcow2")
    );
    fx.revert("i1", "running").unwrap();
    fx.wait_state("running");
    let now = fx.vm.read_disk("vda").unwrap();
    assert!(now == live_vda, "QEMU restarted on the active layers");
    let log = fx.read(".log");
    assert!(!log.contains("refused"), "{log}");
}

#[test]
fn external_checkpoints_are_live_and_keep_the_memory() {
    let fx = Fixture::with_policy("ext-ckpt", "external", &[]);
    let images = fx.vm.disks[0].image.parent().unwrap().to_owned();
    fx.vm.fill_ram(64).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x5a 0 1M").unwrap();
    let want = fx.vm.read_disk("vda").unwrap();

    fs::create_dir(fx.path("c1")).unwrap();
    assert_eq!(fx.read("c1/state"), "running\n");
    assert_eq!(fx.read(".state"), "running\n");
    let memory = images.join("vm1.c1.memory");
    let meta = fs::metadata(&memory).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o400,
        "RAM holds secrets"
    );
    assert!(meta.len() > 64 * M as u64, "the RAM is in the file");
    assert!(!images.join("vm1.c1.memory.part").exists());
    let in_tree = fs::metadata(fx.path("c1/memory")).unwrap();
    assert_eq!(in_tree.len(), meta.len());
    assert_eq!(in_tree.permissions().mode() & 0o777, 0o400);
    let head = {
        use std::io::Read;
        let mut b = vec![0u8; 4096];
        fs::File::open(fx.path("c1/memory"))
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        b
    };
    assert_eq!(&head[..], &fs::read(&memory).unwrap()[..4096]);
    assert!(fs::read(fx.path("c1/disks/vda")).unwrap() == want);
    let log = fx.read(".log");
    assert!(log.contains("guest paused"), "{log}");
    assert!(!log.contains("background-snapshot refused"), "{log}");

    // A libvirt spec with explicit files, one disk left out.
    let mem2 = fx.dir.0.join("c2.mem");
    let ovl = fx.dir.0.join("vda-c2.qcow2");
    let spec = format!(
        "<domainsnapshot><name>c2</name><description>by spec</description>\
         <memory snapshot='external' file='{}'/><disks>\
         <disk name='vda' snapshot='external'><source file='{}'/></disk>\
         <disk name='vdb' snapshot='no'/></disks></domainsnapshot>",
        mem2.display(),
        ovl.display()
    );
    write_file(&fx.path(".create"), spec.as_bytes()).unwrap();
    assert_eq!(fx.read("c2/state"), "running\n");
    assert!(mem2.exists() && ovl.exists());
    let disks: Vec<String> = fs::read_dir(fx.path("c2/disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(disks, vec!["vda"]);
    assert_eq!(
        link(&fx.path("c2/images/vda")),
        images.join("vm1-vda.c1.qcow2")
    );

    // A file that exists is never overwritten: EEXIST, nothing made.
    let spec = format!(
        "<domainsnapshot><name>c3</name><disks><disk name='vda' snapshot='external'>\
         <source file='{}'/></disk></disks></domainsnapshot>",
        ovl.display()
    );
    assert_eq!(
        write_file(&fx.path(".create"), spec.as_bytes()),
        Err(libc::EEXIST)
    );
    assert!(!fx.path("c3").exists());
    assert!(!images.join("vm1.c3.memory").exists());
    assert!(fx.read(".log").contains("never overwrites"));

    // A paused VM: the checkpoint is taken without running the guest.
    fx.vm
        .control()
        .unwrap()
        .execute_raw("stop", serde_json::json!({}))
        .unwrap();
    fx.wait_state("paused");
    fs::create_dir(fx.path("p1")).unwrap();
    assert_eq!(fx.read("p1/state"), "paused\n");
    assert_eq!(fx.read(".state"), "paused\n");
    assert!(images.join("vm1.p1.memory").exists());
    // QEMU 7.2 keeps the disks inactive until the guest resumes: block
    // operations are refused before they change anything.
    let files_before = fs::read_dir(&images).unwrap().count();
    assert_eq!(errno(fs::create_dir(fx.path("p2"))), libc::EBUSY);
    assert_eq!(errno(fs::remove_dir(fx.path("c2"))), libc::EBUSY);
    assert_eq!(fs::read_dir(&images).unwrap().count(), files_before);
    assert!(fx.journal().is_empty());
    assert!(fx.read(".log").contains("resume the guest first"));
    fx.vm
        .control()
        .unwrap()
        .execute_raw("cont", serde_json::json!({}))
        .unwrap();
    fx.wait_state("running");
    fx.vm.qemu_io("vda", "write -P 0x6b 1M 1M").unwrap();
    fs::create_dir(fx.path("after-pause")).unwrap();
    let v = fs::read(fx.path("after-pause/disks/vda")).unwrap();
    assert!(all_bytes(&v, 0, M, 0x5a) && all_bytes(&v, M, M, 0x6b));
}

/// Writes `byte` over the first 64 KiB of both disks: through the guest
/// when QEMU runs, into the active layers `vda`/`vdb` when it is stopped.
fn write_both(fx: &Fixture, byte: u8, stopped_layers: Option<(&Path, &Path)>) {
    for (i, d) in ["vda", "vdb"].iter().enumerate() {
        let cmd = format!("write -P 0x{byte:02x} 0 64k");
        match stopped_layers {
            None => {
                fx.vm.qemu_io(d, &cmd).unwrap();
                fx.vm.qemu_io(d, "flush").unwrap();
            }
            Some((a, b)) => {
                let img = if i == 0 { a } else { b };
                let st = std::process::Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", &cmd])
                    .arg(img)
                    .output()
                    .unwrap();
                assert!(st.status.success(), "{st:?}");
            }
        }
    }
}

fn first_byte_of(data: &[u8]) -> u8 {
    assert!(all_bytes(data, 0, 64 * 1024, data[0]), "torn");
    data[0]
}

/// Kills the daemon at `point` of an external create and checks that the
/// restart finishes or undoes it: no journal, no orphan file, the
/// snapshot whole or absent, the live disks unchanged.
fn external_crash(point: &str, running: bool) {
    let tag = format!(
        "xcrash-{}-{}",
        point.replace('.', "-"),
        if running { "up" } else { "down" }
    );
    let policy = if running {
        "external"
    } else {
        "external-disk-only"
    };
    let mut fx = Fixture::with_policy(&tag, policy, &[]);
    let images = fx.vm.disks[0].image.parent().unwrap().to_owned();
    let ov = |snap: &str, d: &str| images.join(format!("vm1-{d}.{snap}.qcow2"));
    if !running {
        fx.vm.kill();
        fx.wait_state("shutoff");
    }
    let layers_a = (ov("a", "vda"), ov("a", "vdb"));
    if running {
        write_both(&fx, 0x0a, None);
    } else {
        write_both(
            &fx,
            0x0a,
            Some((&fx.vm.disks[0].image, &fx.vm.disks[1].image)),
        );
    }
    fs::create_dir(fx.path("a")).unwrap();
    if running {
        write_both(&fx, 0x0c, None);
    } else {
        write_both(&fx, 0x0c, Some((&layers_a.0, &layers_a.1)));
    }

    fx.restart_daemon(&[("VMSNAPFS_FAILPOINTS", &format!("{point}=crash"))]);
    assert!(fs::create_dir(fx.path("c")).is_err(), "{point}: returned");
    fx.recover_after_crash(point, Duration::from_secs(60));

    let names = fx.ls();
    let has_c = match names.as_slice() {
        [a] if a == "a" => false,
        [a, c] if a == "a" && c == "c" => true,
        other => panic!("{point}: tree {other:?}\n{}", fx.read(".log")),
    };
    let log = fx.read(".log");
    let recovered = log.lines().find(|l| l.contains("recovery: interrupted"));
    eprintln!("{tag}: snapshot c kept: {has_c}; {recovered:?}");
    assert!(
        recovered.is_some() || point == "create.after-meta",
        "{point}: {log}"
    );
    // Exactly the files the surviving snapshots explain.
    let mut want: Vec<PathBuf> = vec![
        fx.vm.disks[0].image.clone(),
        fx.vm.disks[1].image.clone(),
        layers_a.0.clone(),
        layers_a.1.clone(),
    ];
    if running {
        want.push(images.join("vm1.a.memory"));
    }
    if has_c {
        want.push(ov("c", "vda"));
        want.push(ov("c", "vdb"));
        assert_eq!(link(&fx.path("c/images/vda")), layers_a.0, "{point}");
        if running && fx.path("c/memory").exists() {
            want.push(images.join("vm1.c.memory"));
        }
    }
    let mut got: Vec<PathBuf> = fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.contains(".qcow2") || n.contains(".memory")
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{point}: files\n{}", fx.read(".log"));

    // Live disks unchanged; views of both snapshots right.
    let live = if running {
        fx.wait_state("running");
        (
            fx.vm.read_disk("vda").unwrap(),
            fx.vm.read_disk("vdb").unwrap(),
        )
    } else {
        let (a, b) = if has_c {
            (ov("c", "vda"), ov("c", "vdb"))
        } else {
            layers_a.clone()
        };
        (read_image(&a).unwrap(), read_image(&b).unwrap())
    };
    assert_eq!(first_byte_of(&live.0), 0x0c, "{point}: vda");
    assert_eq!(first_byte_of(&live.1), 0x0c, "{point}: vdb");
    assert_eq!(
        first_byte_of(&fs::read(fx.path("a/disks/vda")).unwrap()),
        0x0a
    );
    if has_c {
        assert_eq!(
            first_byte_of(&fs::read(fx.path("c/disks/vdb")).unwrap()),
            0x0c
        );
    }
    // The domain goes on: another external snapshot works.
    fs::create_dir(fx.path("d")).unwrap();
}

const EXTERNAL_POINTS: &[&str] = &[
    "create.begin",
    "create.after-overlays",
    "create.after-backend",
    "create.after-meta",
];

#[test]
fn crash_during_external_create_on_a_running_vm() {
    for p in EXTERNAL_POINTS {
        external_crash(p, true);
    }
}

#[test]
fn crash_during_external_create_on_a_stopped_vm() {
    for p in EXTERNAL_POINTS {
        external_crash(p, false);
    }
}

/// When QEMU refuses background-snapshot (here: RAM in a shared file),
/// the checkpoint is still taken, with the guest paused for the RAM save,
/// and `.log` says so. A QEMU that copies RAM live first is made to give
/// that copy up (it did not converge), so that it reaches the background
/// snapshot too, and so is the live copy into a stream that a QEMU
/// refusing background-snapshot takes instead; nothing of that copy is
/// left.
#[test]
fn a_refused_background_snapshot_falls_back_to_a_paused_save() {
    let fx = Fixture::with_shared_ram(
        "ext-fallback",
        &[("VMSNAPFS_FAILPOINTS", "checkpoint.converging=error")],
    );
    fx.vm.qemu_io("vda", "write -P 0x7a 0 1M").unwrap();
    let want = fx.vm.read_disk("vda").unwrap();
    fs::create_dir(fx.path("c1")).unwrap();
    let log = fx.read(".log");
    assert!(log.contains("background-snapshot refused"), "{log}");
    assert!(log.contains("RAM saved with the guest paused"), "{log}");
    assert!(
        log.contains("live copy of RAM given up (not converged"),
        "{log}"
    );
    let parts: Vec<_> = fs::read_dir(&fx.vm.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(parts.is_empty(), "{parts:?}");
    {
        let mut q = fx.vm.control().unwrap();
        assert!(!q.migrate_capability_on("pause-before-switchover").unwrap());
        assert_eq!(q.downtime_and_direct_io().unwrap().0, Some(300));
    }
    assert_eq!(fx.read("c1/state"), "running\n");
    assert_eq!(fx.read(".state"), "running\n", "the guest runs again");
    assert!(fs::metadata(fx.path("c1/memory")).unwrap().len() > 0);
    assert!(fs::read(fx.path("c1/disks/vda")).unwrap() == want);
    // And it reverts: RAM from the file into a new QEMU.
    fx.vm.qemu_io("vda", "write -P 0x00 0 1M").unwrap();
    fx.revert("c1", "running").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert!(fx.vm.read_disk("vda").unwrap() == want);
}
