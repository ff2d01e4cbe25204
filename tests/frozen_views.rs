//! Frozen views (`disks/<target>`): the raw bytes of each disk at the
//! snapshot, read through the mount while the guest keeps writing; holes
//! through SEEK_DATA/SEEK_HOLE; copies by `cp --sparse` and restic; the
//! same bytes after the VM stopped. Disks over compressed bases (deflate,
//! zstd), over a raw base, and raw point images of external snapshots,
//! each compared byte for byte with `qemu-img convert` of the same image.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
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
    let restic = |args: &[&str]| common::restic(&repo, args);
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

/// `qemu-img convert -O raw` of `image` (opened as `format`, shared with
/// a running QEMU, at internal snapshot `tag` if any).
fn qemu_img_bytes(dir: &Path, image: &Path, format: &str, tag: Option<&str>) -> Vec<u8> {
    let out = dir.join("qemu-img.raw");
    let _ = fs::remove_file(&out);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-U", "-f", format, "-O", "raw"]);
    if let Some(tag) = tag {
        cmd.arg("-l").arg(format!("snapshot.name={tag}"));
    }
    let o = cmd.arg(image).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    bytes
}

fn run(prog: &str, args: &[&str]) {
    let o = Command::new(prog).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Disk bytes with runs of patterns, holes and incompressible noise.
fn patterned(size: usize, seed: u8) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b[..2 * M].fill(seed);
    b[5 * M..5 * M + 100_000].fill(seed ^ 0x5a);
    for (i, x) in b[9 * M..10 * M].iter_mut().enumerate() {
        *x = ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed;
    }
    b[size - M..].fill(seed.wrapping_add(1));
    b
}

/// A fixture whose disks are first replaced by `make(target, image)`
/// (with the VM stopped), then the VM relaunched and the daemon started.
fn fixture_with_images(
    tag: &str,
    spec: &VmSpec,
    policy: &str,
    make: impl Fn(&str, &Path),
) -> Fixture {
    let dir = TempDir::new(tag);
    let mut vm = Vm::start(spec, &dir.0.join("images")).expect("start VM");
    vm.kill();
    for d in &vm.disks {
        fs::remove_file(&d.image).unwrap();
        make(&d.target, &d.image);
    }
    vm.launch().unwrap();
    vm.policy = Some(policy.into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    Fixture { daemon, vm, dir }
}

#[test]
fn views_of_disks_over_compressed_bases_match_qemu_img() {
    // vda over a deflate-compressed base, vdb over a zstd one.
    let fx = fixture_with_images(
        "views-compressed",
        &VmSpec::small("vm1"),
        "internal",
        |target, image| {
            let dir = image.parent().unwrap();
            let (size, seed, kind) = match target {
                "vda" => (64 * M, 0x31, "zlib"),
                _ => (32 * M, 0x32, "zstd"),
            };
            let src = dir.join(format!("{target}.src.raw"));
            fs::write(&src, patterned(size, seed)).unwrap();
            let base = dir.join(format!("{target}-base.qcow2"));
            let opts = format!("compression_type={kind}");
            let (src, base_s) = (src.to_str().unwrap(), base.to_str().unwrap());
            run(
                "qemu-img",
                &[
                    "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, src, base_s,
                ],
            );
            fs::remove_file(src).unwrap();
            let image = image.to_str().unwrap();
            run(
                "qemu-img",
                &[
                    "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base_s, image,
                ],
            );
        },
    );
    let mut fx = fx;
    fx.vm.qemu_io("vda", "write -P 0xa1 1M 64k").unwrap();
    fx.vm.qemu_io("vda", "write -z 9M 4k").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0xb1 20M 1M").unwrap();
    let want_vda = fx.vm.read_disk("vda").unwrap();
    let want_vdb = fx.vm.read_disk("vdb").unwrap();
    fs::create_dir(fx.path("s1")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0xee 0 16M").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0xee 0 16M").unwrap();
    let vda = fs::read(fx.path("s1/disks/vda")).unwrap();
    let vdb = fs::read(fx.path("s1/disks/vdb")).unwrap();
    assert!(
        vda == want_vda,
        "vda view differs from the disk at the snapshot"
    );
    assert!(
        vdb == want_vdb,
        "vdb view differs from the disk at the snapshot"
    );
    let f = fs::File::open(fx.path("s1/disks/vda")).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Some(0));
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE), Some(2 * M as u64));
    drop(f);
    // Every byte as qemu-img reads the same snapshot.
    fx.vm.kill();
    fx.wait_state("shutoff");
    for (d, view) in [(0, &vda), (1, &vdb)] {
        let image = fx.vm.disks[d].image.clone();
        let tags = image_tags(&image);
        assert_eq!(tags.len(), 1, "{tags:?}");
        let want = qemu_img_bytes(&fx.dir.0, &image, "qcow2", Some(&tags[0]));
        assert!(
            *view == want,
            "{} differs from qemu-img convert",
            fx.vm.disks[d].target
        );
    }
    drop_caches();
    assert!(fs::read(fx.path("s1/disks/vdb")).unwrap() == want_vdb);
    assert!(!fx.read(".log").contains("EIO"), "{}", fx.read(".log"));
    fx.daemon.stop();
}

#[test]
fn views_of_a_raw_base_and_a_raw_point_match_qemu_img() {
    // vda: a qcow2 overlay over a raw base; vdb: a raw disk.
    let spec = VmSpec {
        raw: vec!["vdb".into()],
        ..VmSpec::small("vm1")
    };
    let mut fx = fixture_with_images("views-raw", &spec, "internal", |target, image| {
        let dir = image.parent().unwrap();
        let (size, seed) = if target == "vda" {
            (64 * M, 0x41)
        } else {
            (32 * M, 0x42)
        };
        if target == "vdb" {
            fs::write(image, patterned(size, seed)).unwrap();
            return;
        }
        let base = dir.join("vda-base.raw");
        fs::write(&base, patterned(size, seed)).unwrap();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                base.to_str().unwrap(),
                image.to_str().unwrap(),
            ],
        );
    });
    fx.vm.qemu_io("vda", "write -P 0xa2 3M 64k").unwrap();
    fx.vm.qemu_io("vda", "write -z 1M 64k").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0xb2 7M 1M").unwrap();
    let want_vda = fx.vm.read_disk("vda").unwrap();
    let want_vdb = fx.vm.read_disk("vdb").unwrap();
    write_file(
        &fx.path(".create"),
        b"<domainsnapshot><name>x1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='external'/>\
          </disks></domainsnapshot>",
    )
    .unwrap();
    fx.vm.qemu_io("vda", "write -P 0xee 0 16M").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0xee 0 16M").unwrap();
    // vdb's point is the raw image itself, now under an overlay.
    let point_vdb = fs::read_link(fx.path("x1/images/vdb")).unwrap();
    assert_eq!(point_vdb, fx.vm.disks[1].image);
    let point_vda = fs::read_link(fx.path("x1/images/vda")).unwrap();
    let vda = fs::read(fx.path("x1/disks/vda")).unwrap();
    let vdb = fs::read(fx.path("x1/disks/vdb")).unwrap();
    assert!(
        vda == want_vda,
        "vda view differs from the disk at the snapshot"
    );
    assert!(
        vdb == want_vdb,
        "vdb view differs from the disk at the snapshot"
    );
    assert!(vda == qemu_img_bytes(&fx.dir.0, &point_vda, "qcow2", None));
    assert!(vdb == qemu_img_bytes(&fx.dir.0, &point_vdb, "raw", None));
    assert_eq!(
        fs::metadata(fx.path("x1/disks/vdb")).unwrap().len(),
        32 * M as u64
    );
    // A raw point is all data; the raw base under vda is data too, but a
    // zero cluster over it is a hole.
    let f = fs::File::open(fx.path("x1/disks/vdb")).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE), Some(32 * M as u64));
    let f = fs::File::open(fx.path("x1/disks/vda")).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE), Some(M as u64));
    assert_eq!(lseek(&f, M as u64, libc::SEEK_DATA), Some(M as u64 + 65536));
    drop(f);
    fx.vm.kill();
    fx.wait_state("shutoff");
    drop_caches();
    assert!(fs::read(fx.path("x1/disks/vda")).unwrap() == want_vda);
    assert!(fs::read(fx.path("x1/disks/vdb")).unwrap() == want_vdb);
    fx.daemon.stop();
}

#[test]
fn a_malformed_image_is_eio_with_a_log_line() {
    let mut fx = Fixture::new("views-malformed");
    fx.vm.qemu_io("vda", "write -P 0x71 0 1M").unwrap();
    fs::create_dir(fx.path("s1")).unwrap();
    fx.vm.kill();
    fx.wait_state("shutoff");
    // The image's owner points the first L1 entry outside the file.
    let image = fx.vm.disks[0].image.clone();
    let mut b = fs::read(&image).unwrap();
    let tags = image_tags(&image);
    assert_eq!(tags.len(), 1);
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let table = be64(&b, 64) as usize;
    let l1 = be64(&b, table) as usize;
    b[l1..l1 + 8].copy_from_slice(&(0x8000_7fff_0000_0000u64).to_be_bytes());
    fs::write(&image, &b).unwrap();
    assert_eq!(errno(fs::read(fx.path("s1/disks/vda"))), libc::EIO);
    let log = fx.read(".log");
    assert!(log.contains("past the end"), "{log}");
    fx.daemon.stop();
}
