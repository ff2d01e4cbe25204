//! Frozen views (`disks/<target>`) of internal snapshots: the raw bytes of
//! each disk at the snapshot, read through the mount while the guest keeps
//! writing; holes through SEEK_DATA/SEEK_HOLE; copies by `cp --sparse` and
//! restic; the same bytes after the VM stopped.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;

const M: usize = 1 << 20;

fn lseek(f: &fs::File, off: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    (r >= 0).then_some(r as u64)
}

fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

#[test]
fn views_read_the_snapshot_while_the_guest_writes() {
    let mut fx = Fixture::new("views");
    fx.vm.qemu_io("vda", "write -P 0xa1 0 1M").unwrap();
    fx.vm.qemu_io("vda", "write -P 0xa2 40M 64k").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0xb1 8M 2M").unwrap();
    let want_vda = fx.vm.read_disk("vda").unwrap();
    let want_vdb = fx.vm.read_disk("vdb").unwrap();
    fs::create_dir(fx.path("s1")).unwrap();

    // The guest keeps writing over everything while the views are read.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let ctl = fx.vm.control.clone();
        std::thread::spawn(move || {
            let mut q =
                vmsnapfs::backend::qmp::Qmp::connect(&ctl, std::time::Duration::from_secs(10))
                    .unwrap();
            let mut n = 0u32;
            while !stop.load(Ordering::Acquire) {
                for (dev, off) in [("vda-dev", n % 60), ("vdb-dev", n % 30)] {
                    q.hmp(&format!(
                        "qemu-io -d {dev}/virtio-backend \"write -P 0xee {off}M 1M\""
                    ))
                    .unwrap();
                }
                n += 1;
            }
            n
        })
    };
    let mut names: Vec<String> = fs::read_dir(fx.path("s1/disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["vda", "vdb"]);
    let vda = fs::read(fx.path("s1/disks/vda")).unwrap();
    let vdb = fs::read(fx.path("s1/disks/vdb")).unwrap();
    stop.store(true, Ordering::Release);
    let rounds = writer.join().unwrap();
    assert!(rounds > 0, "the guest wrote during the read");
    assert_eq!(vda.len(), 64 * M);
    assert!(
        vda == want_vda,
        "vda view differs from the disk at the snapshot"
    );
    assert!(
        vdb == want_vdb,
        "vdb view differs from the disk at the snapshot"
    );
    let meta = fs::metadata(fx.path("s1/disks/vda")).unwrap();
    assert_eq!(meta.len(), 64 * M as u64);
    assert_eq!(meta.mode() & 0o777, 0o444);
    assert_eq!(
        fs::read_link(fx.path("s1/images/vda")).unwrap(),
        fx.vm.disks[0].image
    );
    // Writing to a view is refused.
    assert!(fs::OpenOptions::new()
        .write(true)
        .open(fx.path("s1/disks/vda"))
        .is_err());

    // Holes: answered from block status.
    let f = fs::File::open(fx.path("s1/disks/vda")).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Some(0));
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE), Some(M as u64));
    assert_eq!(lseek(&f, M as u64, libc::SEEK_DATA), Some(40 * M as u64));
    assert_eq!(
        lseek(&f, 40 * M as u64, libc::SEEK_HOLE),
        Some(40 * M as u64 + 65536)
    );
    assert_eq!(
        lseek(&f, 41 * M as u64, libc::SEEK_DATA),
        None,
        "no data after 40M+64k"
    );

    // An open view holds the snapshot.
    assert_eq!(errno(fs::remove_dir(fx.path("s1"))), libc::EBUSY);
    assert!(fx.read(".log").contains("frozen view"));
    drop(f);

    // cp --sparse=always copies only the data.
    let copy = fx.dir.0.join("vda.copy");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(fx.path("s1/disks/vda"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(fs::read(&copy).unwrap() == want_vda);
    let allocated = fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        allocated <= 2 * M as u64,
        "cp wrote {allocated} bytes, holes not kept"
    );

    // A second read after the VM stopped gives the same bytes.
    fx.vm.kill();
    fx.wait_state("shutoff");
    drop_caches();
    assert!(fs::read(fx.path("s1/disks/vda")).unwrap() == want_vda);
    assert!(fs::read(fx.path("s1/disks/vdb")).unwrap() == want_vdb);
    // A snapshot of the stopped domain has views too.
    let now_vda = fx.vm.read_disk("vda").unwrap();
    fs::create_dir(fx.path("cold")).unwrap();
    assert!(fs::read(fx.path("cold/disks/vda")).unwrap() == now_vda);
    fs::remove_dir(fx.path("s1")).unwrap();
    fx.daemon.stop();
}

#[test]
fn restic_backs_up_a_view_byte_for_byte() {
    if Command::new("restic").arg("version").output().is_err() {
        eprintln!("restic is not installed: scripts/install-deps.sh installs it");
        panic!("restic missing");
    }
    let fx = Fixture::new("restic");
    fx.vm.qemu_io("vda", "write -P 0x5e 3M 5M").unwrap();
    let want = fx.vm.read_disk("vda").unwrap();
    fs::create_dir(fx.path("nightly")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x00 3M 5M").unwrap();
    let repo = fx.dir.0.join("repo");
    let restic = |args: &[&str]| {
        let out = Command::new("restic")
            .args(args)
            .env("RESTIC_PASSWORD", "test")
            .env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_CACHE_DIR", fx.dir.0.join("restic-cache"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restic {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    restic(&["init"]);
    let disks = fx.path("nightly/disks");
    restic(&["backup", disks.to_str().unwrap()]);
    let out = fx.dir.0.join("restored");
    restic(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let restored = out.join(disks.strip_prefix("/").unwrap()).join("vda");
    assert!(
        fs::read(&restored).unwrap() == want,
        "restored bytes differ"
    );
}
