//! Frozen-view read speed, printed with ratios against peers measured in
//! the same run, on a 1 GiB qcow2 holding ~600 MiB of data:
//!
//! - `disks/vda` of a snapshot through the mounted tree (first read: the
//!   FUSE page cache is cold, the image file is in the host page cache);
//! - qemu-storage-daemon's FUSE export of the same image (goal: the tree
//!   is >= 2x faster);
//! - a raw copy of the same data read from the page cache (the ceiling;
//!   goal: the tree reaches >= 0.5x of it);
//! - `disks/vda` of an external snapshot of the same point (its point
//!   image read directly, like an internal snapshot).
//!
//! Run: `cargo bench --bench views` (root, QEMU 7.2, /dev/fuse).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ROUNDS: usize = 3;

/// Reads a whole file with 1 MiB reads; returns (bytes, time).
fn read_all(path: &Path) -> (u64, Duration) {
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let t = Instant::now();
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    (total, t.elapsed())
}

fn warm(path: &Path) {
    let _ = read_all(path);
}

fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// qemu-storage-daemon exporting `image` over FUSE at `file`; stopped on drop.
struct Qsd(std::process::Child, std::path::PathBuf);

impl Qsd {
    fn start(image: &Path, file: &Path) -> Qsd {
        fs::write(file, b"").unwrap();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f,read-only=on,locking=off",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,file=f,node-name=q,read-only=on")
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e,node-name=q,mountpoint={}",
                file.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while fs::metadata(file).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not export"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd(child, file.to_owned())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        unmount(&self.1);
    }
}

fn main() {
    let spec = VmSpec {
        name: "vm1".into(),
        disks: vec![("vda".into(), 1024)],
        memory_mb: 128,
        raw: Vec::new(),
    };
    let mut fx = Fixture::with_spec("bench-views", &spec, &[("RUST_LOG", "info")]);
    // ~600 MiB of data in 100 MiB runs with gaps, different bytes each.
    for i in 0..6u64 {
        let cmd = format!("write -P 0x{:02x} {}M 100M", 0x11 * (i + 1), i * 160);
        fx.vm.qemu_io("vda", &cmd).unwrap();
    }
    fs::create_dir(fx.path("s1")).unwrap();
    // The same point as an external snapshot: the image becomes read-only
    // under a new overlay, and its view is served by qemu-nbd.
    write_file(
        &fx.path(".create"),
        b"<domainsnapshot><name>x1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='external'/></disks></domainsnapshot>",
    )
    .unwrap();
    fx.vm.kill();
    fx.wait_state("shutoff");
    let image = fx.vm.disks[0].image.clone();
    let view = fx.path("s1/disks/vda");
    let raw = fx.dir.0.join("vda.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw", "-l", "snapshot.name=placeholder"])
        .arg(&image)
        .arg(&raw)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    if !st.success() {
        // The image's current state is the snapshot's (nothing written after it).
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&image)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let qsd_file = fx.dir.0.join("qsd-export");
    let qsd = Qsd::start(&image, &qsd_file);

    let external_view = fx.path("x1/disks/vda");
    let (mut tree, mut peer, mut ceiling, mut ext) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        drop_caches();
        warm(&image);
        let (n, d) = read_all(&view);
        assert_eq!(n, 1 << 30);
        tree.push(mbps(n, d));
        drop_caches();
        warm(&image);
        let (n, d) = read_all(&external_view);
        assert_eq!(n, 1 << 30);
        ext.push(mbps(n, d));
        drop_caches();
        warm(&image);
        let (n, d) = read_all(&qsd_file);
        assert_eq!(n, 1 << 30);
        peer.push(mbps(n, d));
        warm(&raw);
        let (n, d) = read_all(&raw);
        ceiling.push(mbps(n, d));
    }
    drop(qsd);
    let (t, p, c, x) = (median(tree), median(peer), median(ceiling), median(ext));
    println!("\n== sequential read of a 1 GiB disk with 600 MiB of data (median of {ROUNDS}, 1 MiB reads)");
    println!("frozen view (disks/vda)          : {t:7.0} MB/s");
    println!(
        "qemu-storage-daemon FUSE export  : {p:7.0} MB/s   ratio {:.2}x (goal >= 2x)",
        t / p
    );
    println!(
        "raw copy from page cache (cat)   : {c:7.0} MB/s   ratio {:.2}x (goal >= 0.5x)",
        t / c
    );
    println!(
        "external snapshot's view          : {x:7.0} MB/s   ratio {:.2}x vs qsd, {:.2}x vs raw",
        x / p,
        x / c
    );
    fx.daemon.stop();
}
