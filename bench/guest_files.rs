//! The guest's files (`files/`) against the kernel's ext4, measured in the
//! same run on the same tree:
//!
//! - a 1 GiB disk holding an ext4 filesystem (made with `mke2fs -d`) of
//!   2000 files, 4 KiB to 516 KiB, about 500 MiB in all, in 40 directories;
//! - an internal snapshot of the running VM;
//! - `find files/vda -type f | xargs cat > /dev/null` through the mount,
//!   against the same command on a loop mount (kernel ext4, read-only) of
//!   a `cp --sparse=always` copy of the snapshot's view `disks/vda`
//!   (goal: >= 0.5x of the kernel's throughput). Each round starts with
//!   the page cache dropped for both (the view's images and the copy are
//!   then read from disk by both), median of [`ROUNDS`];
//! - the time of the first `ls files/vda` after `mkdir` returns, which
//!   opens the filesystem (goal: < 100 ms), median of [`ROUNDS`]
//!   snapshots.
//!
//! Run: `cargo bench --bench guest_files` (root, QEMU, /dev/fuse, loop
//! devices).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const ROUNDS: usize = 5;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn drop_caches() {
    run(&mut Command::new("sync"));
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// `find DIR -type f | xargs cat > /dev/null`: (bytes read, time).
fn find_cat(dir: &Path) -> (u64, Duration) {
    let t = Instant::now();
    run(Command::new("sh").arg("-c").arg(format!(
        "find '{}' -type f -print0 | xargs -0 cat > /dev/null",
        dir.display()
    )));
    let took = t.elapsed();
    let out = Command::new("find")
        .arg(dir)
        .args(["-type", "f", "-printf", "%s\\n"])
        .output()
        .unwrap();
    let bytes = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.parse::<u64>().ok())
        .sum();
    (bytes, took)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A tree of 2000 files in 40 directories, sizes 4 KiB..516 KiB.
fn make_tree(dir: &Path) {
    let mut seed = 0x2545f4914f6cdd1du64;
    for d in 0..40 {
        let sub = dir.join(format!("d{d:02}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..50 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = 4096 + (seed % (1 << 19)) as usize;
            let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ seed) as u8).collect();
            fs::write(sub.join(format!("f{f:02}")), data).unwrap();
        }
    }
}

fn main() {
    let dir = TempDir::new("bench-guest-work");
    let mut spec = VmSpec::small("vm1");
    spec.disks = vec![("vda".into(), 1024)];
    let fx = Fixture::with_spec("bench-guest", &spec, &[]);
    let tree = dir.0.join("tree");
    make_tree(&tree);
    let image = dir.0.join("vda.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("1G"));
    let len = fs::metadata(&image).unwrap().len();
    fx.vm
        .qemu_io("vda", &format!("write -s {} 0 {len}", image.display()))
        .unwrap();
    fs::remove_file(&image).unwrap();

    // First `ls files/vda` after mkdir.
    let mut first = Vec::new();
    for i in 0..ROUNDS {
        let name = format!("s{i}");
        fs::create_dir(fx.path(&name)).unwrap();
        let t = Instant::now();
        let n = fs::read_dir(fx.path(&format!("{name}/files/vda")))
            .unwrap()
            .count();
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(n, 41, "40 directories and lost+found");
    }

    // The kernel's ext4 on a loop mount of a sparse copy of the view.
    let copy = dir.0.join("vda.copy");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(fx.path("s0/disks/vda"))
        .arg(&copy));
    let mnt = dir.0.join("loop");
    fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop,ro,noload"])
        .arg(&copy)
        .arg(&mnt));
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _umount = Umount(&mnt);

    let files = fx.path("s0/files/vda");
    let (mut ours, mut kernel) = (Vec::new(), Vec::new());
    let mut total = 0;
    for _ in 0..ROUNDS {
        drop_caches();
        let (b, t) = find_cat(&files);
        ours.push(b as f64 / t.as_secs_f64() / 1e6);
        drop_caches();
        let (k, tk) = find_cat(&mnt);
        kernel.push(k as f64 / tk.as_secs_f64() / 1e6);
        assert_eq!(b, k, "the same bytes through both");
        total = b;
    }
    let (ours, kernel) = (median(ours), median(kernel));
    println!(
        "guest files: {} MiB in 2000 files; find | xargs cat: files/ {ours:.0} MB/s, \
         kernel ext4 (loop) {kernel:.0} MB/s: {:.2}x (goal >= 0.5x)",
        total >> 20,
        ours / kernel
    );
    println!(
        "first ls files/vda after mkdir: median {:.1} ms (goal < 100 ms), all {:?}",
        median(first.clone()),
        first.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>()
    );
    let _ = Command::new("umount").arg(&mnt).status();
}
