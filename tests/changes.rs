//! Incremental views (`changes/<disk>`, `since/<other>/<disk>`, their
//! `.map`) on a real VM whose guest writes between snapshots: internal,
//! external and mixed chains, reverts and branches, before and after the
//! snapshots in between are deleted, after the daemon and QEMU are
//! killed. Each time, the other snapshot's view patched with the changes
//! over their map equals the snapshot's view byte for byte; the extents
//! are exactly the guest's writes; SEEK_DATA/SEEK_HOLE walk the same
//! runs; `cp --sparse=always`, rsync and restic copy only the changed
//! data.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use common::*;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

fn lseek(f: &fs::File, off: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    (r >= 0).then_some(r as u64)
}

/// The `data` runs of a `.map` and the size it covers.
fn map_of(path: &Path) -> (Vec<(u64, u64)>, u64) {
    let text = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    vmsnapfs::views::apply::read_map(&text).unwrap()
}

/// The directory of the changes of `name` against `other` (`None`: its
/// parent).
fn dir_of(name: &str, other: Option<&str>) -> String {
    match other {
        Some(o) => format!("{name}/since/{o}"),
        None => format!("{name}/changes"),
    }
}

/// Checks the changes of disk `t` at `name` against `other` (or its
/// parent): the map is `want`, the changes file holds `name`'s bytes
/// there and zeros elsewhere, its holes are the map's, and the other
/// view patched over the map is `name`'s view. Returns the map's runs.
fn check(fx: &Fixture, name: &str, other: Option<&str>, t: &str, want: &[(u64, u64)]) {
    let dir = dir_of(name, other);
    let (runs, size) = map_of(&fx.path(&format!("{dir}/{t}.map")));
    assert_eq!(runs, want, "{dir}/{t}.map\n{}", fx.read(".log"));
    let view = fs::read(fx.path(&format!("{name}/disks/{t}"))).unwrap();
    assert_eq!(size, view.len() as u64);
    let ch_path = fx.path(&format!("{dir}/{t}"));
    let changes = fs::read(&ch_path).unwrap();
    assert_eq!(changes.len(), view.len());
    let mut pos = 0usize;
    for &(s, l) in &runs {
        let (s, l) = (s as usize, l as usize);
        assert!(changes[pos..s].iter().all(|b| *b == 0), "{dir}/{t}: hole");
        assert!(changes[s..s + l] == view[s..s + l], "{dir}/{t}: data");
        pos = s + l;
    }
    assert!(changes[pos..].iter().all(|b| *b == 0));
    // SEEK_DATA / SEEK_HOLE walk the map's runs.
    let f = fs::File::open(&ch_path).unwrap();
    let mut seen = Vec::new();
    let mut at = 0;
    while let Some(d) = lseek(&f, at, libc::SEEK_DATA) {
        let h = lseek(&f, d, libc::SEEK_HOLE).unwrap();
        seen.push((d, h - d));
        at = h;
    }
    assert_eq!(seen, runs, "{dir}/{t}: seeks");
    assert_eq!(
        fs::metadata(&ch_path).unwrap().blocks() * 512,
        want_bytes(want)
    );
    // The other snapshot's view (an empty disk without parent) patched
    // with the changes over the map is this one's.
    let other = other.map(str::to_owned).or_else(|| {
        fs::read_link(fx.path(&format!("{name}/parent")))
            .ok()
            .map(|p| p.to_string_lossy().trim_start_matches("../").to_owned())
    });
    let mut rebuilt = match &other {
        Some(o) => fs::read(fx.path(&format!("{o}/disks/{t}"))).unwrap(),
        None => Vec::new(),
    };
    rebuilt.resize(size as usize, 0);
    for &(s, l) in &runs {
        f.read_exact_at(&mut rebuilt[s as usize..(s + l) as usize], s)
            .unwrap();
    }
    assert!(rebuilt == view, "{dir}/{t}: the patched copy differs");
}

fn want_bytes(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|r| r.1).sum()
}

/// Bytes a file has allocated.
fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// `cp --sparse=always` and `rsync --sparse` of a changes file allocate
/// only its data, restic stores only its data; each copies its bytes.
fn copies_are_sparse(fx: &Fixture, rel: &str, data: u64) {
    let src = fx.path(rel);
    let want = fs::read(&src).unwrap();
    // rsync (scripts/install-deps.sh installs it) writes holes for the
    // runs of zeros it reads, as `cp --sparse=always` does.
    for (tool, flag) in [("cp", "--sparse=always"), ("rsync", "--sparse")] {
        let copy = fx.dir.0.join(format!("{tool}.copy"));
        let st = Command::new(tool)
            .arg(flag)
            .arg(&src)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success(), "{tool} failed");
        assert!(
            fs::read(&copy).unwrap() == want,
            "{tool} copied other bytes"
        );
        let got = allocated(&copy);
        assert!(
            got >= data && got <= data + 64 * K,
            "{tool} allocated {got}"
        );
        fs::remove_file(&copy).unwrap();
    }
    // restic reads every byte (it does not seek holes); deduplicated and
    // compressed, the runs of zeros cost nothing: its repository holds
    // at most the changed data, and restores the file.
    let repo = fx.dir.0.join("restic-repo");
    let restic = |args: &[&str]| common::restic(&repo, args);
    restic(&["init"]);
    restic(&["backup", src.to_str().unwrap()]);
    let stats: serde_json::Value =
        serde_json::from_slice(&restic(&["stats", "--mode", "raw-data", "--json"])).unwrap();
    let stored = stats["total_size"].as_u64().unwrap();
    assert!(
        stored <= data + 64 * K,
        "restic stored {stored} bytes for {data} changed"
    );
    let out = fx.dir.0.join("restic-out");
    restic(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let restored = out.join(src.strip_prefix("/").unwrap());
    assert!(
        fs::read(&restored).unwrap() == want,
        "restic restored other bytes"
    );
    fs::remove_dir_all(&out).unwrap();
    fs::remove_dir_all(&repo).unwrap();
}

fn io(fx: &Fixture, disk: &str, cmd: &str) {
    fx.vm.qemu_io(disk, cmd).unwrap();
}

fn mkdir(fx: &Fixture, name: &str) {
    fs::create_dir(fx.path(name))
        .unwrap_or_else(|e| panic!("mkdir {name}: {e}\n{}", fx.read(".log")));
}

#[test]
fn internal_snapshots_across_deletes_and_crashes() {
    let mut fx = Fixture::new("chg-int");
    io(&fx, "vda", "write -P 0xa1 0 4M");
    mkdir(&fx, "s1");
    io(&fx, "vda", "write -P 0xa2 1M 128k");
    io(&fx, "vda", "write -P 0xa3 20M 64k");
    io(&fx, "vdb", "write -P 0xb2 0 64k");
    mkdir(&fx, "s2");
    io(&fx, "vda", "write -P 0xa4 30M 64k");
    io(&fx, "vda", "write -z 2M 64k");
    mkdir(&fx, "s3");
    io(&fx, "vda", "write -P 0xa5 40M 1M");

    assert_eq!(
        names(&fx.path("s2/changes")),
        vec!["vda", "vda.map", "vdb", "vdb.map"]
    );
    assert_eq!(names(&fx.path("s2/since")), vec!["s1", "s3"]);
    // `ls -l`: sizes are the disk's and the map's.
    let map_len = fs::metadata(fx.path("s2/changes/vda.map")).unwrap().len();
    assert_eq!(
        map_len,
        fs::read(fx.path("s2/changes/vda.map")).unwrap().len() as u64
    );
    assert_eq!(
        fs::metadata(fx.path("s2/changes/vda")).unwrap().len(),
        64 * M
    );

    check(&fx, "s1", None, "vda", &[(0, 4 * M)]);
    check(&fx, "s2", None, "vda", &[(M, 128 * K), (20 * M, 64 * K)]);
    check(&fx, "s2", None, "vdb", &[(0, 64 * K)]);
    check(&fx, "s3", None, "vdb", &[]);
    let s3_s1 = [
        (M, 128 * K),
        (2 * M, 64 * K),
        (20 * M, 64 * K),
        (30 * M, 64 * K),
    ];
    check(&fx, "s3", Some("s1"), "vda", &s3_s1);
    check(&fx, "s1", Some("s3"), "vda", &s3_s1);
    copies_are_sparse(&fx, "s3/since/s1/vda", want_bytes(&s3_s1) - 64 * K);

    // The snapshot in between goes: s3's changes are against s1 now.
    fs::remove_dir(fx.path("s2")).unwrap();
    assert!(!fx.path("s3/since/s2").exists());
    check(&fx, "s3", None, "vda", &s3_s1);

    // Nothing is kept in memory: a new daemon after a kill, then QEMU
    // killed too, say the same.
    fx.daemon.kill9();
    fx.daemon = Daemon::start(&fx.dir.0, &[]);
    check(&fx, "s3", Some("s1"), "vda", &s3_s1);
    fx.vm.kill();
    fx.wait_state("shutoff");
    check(&fx, "s3", None, "vda", &s3_s1);
    check(&fx, "s1", Some("s3"), "vda", &s3_s1);
}

fn create_spec(fx: &Fixture, xml: &str) {
    write_file(&fx.path(".create"), xml.as_bytes())
        .unwrap_or_else(|e| panic!("create: errno {e}\n{}", fx.read(".log")));
}

#[test]
fn external_and_mixed_chains_branches_and_merges() {
    let fx = Fixture::with_policy("chg-ext", "external-disk-only", &[]);
    io(&fx, "vda", "write -P 0xa1 0 4M");
    mkdir(&fx, "e1");
    io(&fx, "vda", "write -P 0xa2 1M 128k");
    mkdir(&fx, "e2");
    io(&fx, "vda", "write -P 0xa3 20M 64k");
    mkdir(&fx, "e3");
    io(&fx, "vda", "write -P 0xa4 30M 64k");

    check(&fx, "e1", None, "vda", &[(0, 4 * M)]);
    check(&fx, "e2", None, "vda", &[(M, 128 * K)]);
    check(&fx, "e3", None, "vda", &[(20 * M, 64 * K)]);
    check(&fx, "e3", None, "vdb", &[]);
    let e3_e1 = [(M, 128 * K), (20 * M, 64 * K)];
    check(&fx, "e3", Some("e1"), "vda", &e3_e1);
    check(&fx, "e1", Some("e3"), "vda", &e3_e1);
    copies_are_sparse(&fx, "e3/since/e1/vda", want_bytes(&e3_e1));

    // A full backup of e1 brought to e3 by `vmsnapfs apply`, from copies
    // made sparse (the map says where the data is).
    let backup = fx.dir.0.join("backup.raw");
    fs::copy(fx.path("e1/disks/vda"), &backup).unwrap();
    let (ch, map) = (fx.dir.0.join("ch"), fx.dir.0.join("ch.map"));
    fs::copy(fx.path("e3/since/e1/vda.map"), &map).unwrap();
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(fx.path("e3/since/e1/vda"))
        .arg(&ch)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new(env!("CARGO_BIN_EXE_vmsnapfs"))
        .arg("apply")
        .args([&ch, &map, &backup])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(fs::read(&backup).unwrap() == fs::read(fx.path("e3/disks/vda")).unwrap());

    // A branch: back to e1, new writes, a snapshot under e1.
    fx.revert("e1", "running force").unwrap();
    io(&fx, "vda", "write -P 0xa5 40M 64k");
    mkdir(&fx, "b1");
    check(&fx, "b1", None, "vda", &[(40 * M, 64 * K)]);
    let b1_e3 = [(M, 128 * K), (20 * M, 64 * K), (40 * M, 64 * K)];
    check(&fx, "b1", Some("e3"), "vda", &b1_e3);
    check(&fx, "e3", Some("b1"), "vda", &b1_e3);

    // Mixed: an internal snapshot in the active overlay, then an
    // external one over it.
    create_spec(
        &fx,
        "<domainsnapshot><name>i1</name><memory snapshot='no'/><disks>\
         <disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
         </disks></domainsnapshot>",
    );
    io(&fx, "vda", "write -P 0xa6 50M 64k");
    mkdir(&fx, "b2");
    check(&fx, "i1", None, "vda", &[]);
    check(&fx, "b2", None, "vda", &[(50 * M, 64 * K)]);
    check(&fx, "b2", Some("b1"), "vda", &[(50 * M, 64 * K)]);
    check(
        &fx,
        "b2",
        Some("e1"),
        "vda",
        &[(40 * M, 64 * K), (50 * M, 64 * K)],
    );
    let b2_e2 = [(M, 128 * K), (40 * M, 64 * K), (50 * M, 64 * K)];
    check(&fx, "b2", Some("e2"), "vda", &b2_e2);

    // Deletes merge the images in between; the changes stay right.
    fs::remove_dir(fx.path("e2")).unwrap();
    check(&fx, "e3", None, "vda", &e3_e1);
    check(
        &fx,
        "e3",
        Some("b2"),
        "vda",
        &[
            (M, 128 * K),
            (20 * M, 64 * K),
            (40 * M, 64 * K),
            (50 * M, 64 * K),
        ],
    );
    fs::remove_dir(fx.path("b1")).unwrap();
    fs::remove_dir(fx.path("i1")).unwrap();
    check(
        &fx,
        "b2",
        None,
        "vda",
        &[(40 * M, 64 * K), (50 * M, 64 * K)],
    );
    check(
        &fx,
        "b2",
        Some("e3"),
        "vda",
        &[
            (M, 128 * K),
            (20 * M, 64 * K),
            (40 * M, 64 * K),
            (50 * M, 64 * K),
        ],
    );
}

/// A raw disk under external snapshots: the raw point's data is where
/// its file is not a hole, the overlays' maps say what changed.
#[test]
fn a_raw_disk_under_external_snapshots() {
    let spec = VmSpec {
        raw: vec!["vdb".into()],
        ..VmSpec::small("vm1")
    };
    let dir = TempDir::new("chg-raw");
    let mut vm = Vm::start(&spec, &dir.0.join("images")).expect("start VM");
    vm.policy = Some("external-disk-only".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    let fx = Fixture { daemon, vm, dir };
    io(&fx, "vdb", "write -P 0xc1 0 1M");
    mkdir(&fx, "r1");
    io(&fx, "vdb", "write -P 0xc2 2M 64k");
    mkdir(&fx, "r2");
    io(&fx, "vdb", "write -P 0xc3 4M 64k");
    mkdir(&fx, "r3");
    // A raw image has no map, but the holes of the sparse file read as
    // zeros.
    check(&fx, "r1", None, "vdb", &[(0, M)]);
    check(&fx, "r2", None, "vdb", &[(2 * M, 64 * K)]);
    check(
        &fx,
        "r3",
        Some("r1"),
        "vdb",
        &[(2 * M, 64 * K), (4 * M, 64 * K)],
    );
    fs::remove_dir(fx.path("r2")).unwrap();
    check(&fx, "r3", None, "vdb", &[(2 * M, 64 * K), (4 * M, 64 * K)]);
    // A snapshot that left vdb out: it has no vdb to compare with, so
    // every byte with data is reported (and `.log` says why).
    create_spec(
        &fx,
        "<domainsnapshot><name>x1</name><memory snapshot='no'/><disks>\
         <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='no'/>\
         </disks></domainsnapshot>",
    );
    assert_eq!(names(&fx.path("x1/changes")), vec!["vda", "vda.map"]);
    assert!(!fx.path("x1/since/r3/vdb").exists());
    let (runs, _) = map_of(&fx.path("r3/since/x1/vdb.map"));
    assert_eq!(runs, vec![(0, M), (2 * M, 64 * K), (4 * M, 64 * K)]);
    assert!(fx.read(".log").contains("has no view of disk vdb"));
}

/// A revert to an internal snapshot of a base image below an external
/// snapshot copies the base out: the external snapshot's disk is then a
/// file that shares no image with the internal snapshot's, no map
/// relates them, and the bytes are compared (and `.log` says so).
#[test]
fn disks_that_share_no_image_are_compared_byte_by_byte() {
    let fx = Fixture::with_policy("chg-cmp", "external-disk-only", &[]);
    io(&fx, "vda", "write -P 0xd1 0 2M");
    create_spec(
        &fx,
        "<domainsnapshot><name>i1</name><memory snapshot='no'/><disks>\
         <disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
         </disks></domainsnapshot>",
    );
    io(&fx, "vda", "write -P 0xd2 1M 64k");
    io(&fx, "vda", "write -P 0xd3 8M 64k");
    mkdir(&fx, "e1");
    io(&fx, "vda", "write -P 0xd4 9M 64k");
    check(
        &fx,
        "e1",
        Some("i1"),
        "vda",
        &[(M, 64 * K), (8 * M, 64 * K)],
    );
    assert!(!fx.read(".log").contains("compared byte by byte"));

    fx.revert("i1", "shutoff force")
        .unwrap_or_else(|e| panic!("errno {e}\n{}", fx.read(".log")));
    let point = fs::read_link(fx.path("e1/images/vda")).unwrap();
    assert_ne!(point, fx.vm.disks[0].image, "the base was copied out");
    check(
        &fx,
        "e1",
        Some("i1"),
        "vda",
        &[(M, 64 * K), (8 * M, 64 * K)],
    );
    check(
        &fx,
        "i1",
        Some("e1"),
        "vda",
        &[(M, 64 * K), (8 * M, 64 * K)],
    );
    let log = fx.read(".log");
    assert!(
        log.contains("e1/since/i1/vda: the two disks share no image")
            && log.contains("compared byte by byte"),
        "{log}"
    );
    // The state left behind is over the copy: its map decides.
    let left: Vec<String> = fx
        .ls()
        .into_iter()
        .filter(|n| n.starts_with("left-"))
        .collect();
    assert_eq!(left.len(), 1, "{:?}", fx.ls());
    check(&fx, &left[0], Some("e1"), "vda", &[(9 * M, 64 * K)]);
}
