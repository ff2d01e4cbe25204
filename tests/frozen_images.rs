//! Frozen images on a real VM through the mounted tree: what `du` of a
//! view shows, the image locks that keep QEMU from opening a snapshot's
//! frozen image writable, the supported way to start a stopped domain on
//! its active layers, damage reported when a frozen image was written
//! while the daemon was not running, and reverts that keep the state they
//! leave behind.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const M: u64 = 1 << 20;

/// A fixture with a 1 GiB `vda` and the given snapshot policy.
fn fixture(tag: &str, policy: &str) -> Fixture {
    let dir = TempDir::new(tag);
    let spec = VmSpec {
        name: "vm1".into(),
        disks: vec![("vda".into(), 1024), ("vdb".into(), 32)],
        memory_mb: 128,
    };
    let mut vm = Vm::start(&spec, &dir.0.join("images")).expect("start VM");
    vm.policy = Some(policy.into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    Fixture { daemon, vm, dir }
}

/// `du -B1` of a file: the bytes its `st_blocks` says it holds.
fn du(path: &Path) -> u64 {
    let out = Command::new("du").arg("-B1").arg(path).output().unwrap();
    assert!(out.status.success(), "du {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits until `du` of `path` is within [lo, hi] bytes (the allocation is
/// computed in the background; `stat` answers 0 until it is known).
fn wait_du(path: &Path, lo: u64, hi: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = du(path);
        if (lo..=hi).contains(&got) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "du {} = {got}, want {lo}..={hi}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn du_of_a_view_shows_its_allocation() {
    let fx = fixture("du", "external");
    // 130 MiB at the start of the disk, 4 MiB in the middle: 134 MiB of
    // a 1 GiB disk.
    fx.vm.qemu_io("vda", "write -P 0x5a 0 130M").unwrap();
    fx.vm.qemu_io("vda", "write -P 0x6b 512M 4M").unwrap();
    fs::create_dir(fx.path("e1")).unwrap();
    let view = fx.path("e1/disks/vda");
    let md = fs::metadata(&view).unwrap();
    assert_eq!(md.len(), 1024 * M, "the size is the virtual size");
    let got = wait_du(&view, 134 * M, 135 * M);
    eprintln!("du of a 1 GiB view holding 134 MiB: {} MiB", got / M);
    // Written after the snapshot: the view keeps its allocation; an
    // internal snapshot in the overlay sees both.
    fx.vm.qemu_io("vda", "write -P 0x7c 700M 10M").unwrap();
    let spec = b"<domainsnapshot><name>i1</name><memory snapshot='no'/><disks>\
        <disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
        </disks></domainsnapshot>";
    write_file(&fx.path(".create"), spec).unwrap();
    wait_du(&fx.path("i1/disks/vda"), 144 * M, 145 * M);
    assert_eq!(du(&view), got);
    // An empty disk's view holds nothing.
    assert_eq!(wait_du(&fx.path("e1/disks/vdb"), 0, 0), 0);
    assert_eq!(fs::metadata(fx.path("e1/disks/vdb")).unwrap().blocks(), 0);
}
