//! A real Linux guest (tests/common/guest.rs) writing files while vmsnapfs
//! snapshots it. Its agent answers; every file the guest synced (its
//! `WROTE N` line printed) before `mkdir` began is in the snapshot's
//! `files/vda/data/` byte for byte, and every 10th in `files/vdb/` (vfat),
//! for internal and external snapshots of the running guest and of the
//! stopped one; a file deleted later in the guest is still in the older
//! snapshot; `cp -a` of a directory out of `files/` restores the owners,
//! modes, times and links the guest gave it; the disk of a guest killed
//! mid-write (crash-consistent, its ext4 journal needing recovery) reads
//! with the journal applied; a guest reverted to a running checkpoint goes
//! on writing where it was.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;

/// Files the guest writes before the first snapshot (10 and more gives
/// one on vfat too).
const FIRST: u64 = 10;

/// Checks that every file 1..=`upto` the guest wrote, except `gone`, is
/// complete in `<snap>/files/`, and that `gone` ones are not there.
fn check_files(rg: &RealGuest, snap: &str, upto: u64, gone: &[u64]) {
    let data = rg.path(&format!("{snap}/files/vda/data"));
    for n in 1..=upto {
        let f = data.join(format!("f{n}"));
        if gone.contains(&n) {
            assert!(!f.exists(), "{snap}: f{n} was deleted before it");
            continue;
        }
        let bytes = fs::read(&f).unwrap_or_else(|e| {
            panic!(
                "{snap}: f{n} (synced before mkdir): {e}; the snapshot has {} files; .log:\n{}",
                fs::read_dir(&data).map_or(0, |d| d.count()),
                rg.read(".log")
            )
        });
        check_file(n, &bytes).unwrap_or_else(|e| panic!("{snap}: {e}"));
    }
    // The guest's vfat copies (FAT's short names may be shown in either
    // case: match them without case).
    let fat: BTreeSet<String> = fs::read_dir(rg.path(&format!("{snap}/files/vdb")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_lowercase())
        .collect();
    for n in (10..=upto).step_by(10) {
        assert!(fat.contains(&format!("f{n}")), "{snap}: vdb: {fat:?}");
        let name = fs::read_dir(rg.path(&format!("{snap}/files/vdb")))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().to_lowercase() == format!("f{n}"))
            .unwrap();
        check_file(n, &fs::read(&name).unwrap()).unwrap_or_else(|e| panic!("{snap} vdb: {e}"));
    }
}

/// Takes snapshot `name` with `mkdir` after the guest wrote more than
/// `after` files; returns the last file synced before the mkdir began.
fn mkdir_after(rg: &RealGuest, name: &str, after: u64) -> u64 {
    rg.guest.wait_wrote(after, Duration::from_secs(120));
    let n = rg.guest.wrote();
    let t = Instant::now();
    fs::create_dir(rg.path(name)).unwrap();
    eprintln!("mkdir {name} after f{n}: {:?}", t.elapsed());
    n
}

/// One line per entry of a tree: path, kind, mode, owner, size (not of
/// directories), mtime, and the md5 of a file or the target of a link.
type Listing = BTreeSet<String>;

/// The listing of /mnt/tree as the guest itself sees it (busybox stat).
fn guest_listing(guest: &Guest) -> Listing {
    let out = guest.sh("cd /mnt/tree && find . | while read f; do
           t=$(stat -c '%F|%a|%u|%g|%s|%Y' \"$f\")
           case $t in
             regular*) x=$(md5sum < \"$f\"); x=${x%% *} ;;
             symbolic*) x=$(readlink \"$f\") ;;
             *) x= ;;
           esac
           echo \"$f|$t|$x\"
         done");
    assert_eq!(out.code, 0, "{out:?}");
    out.text()
        .lines()
        .map(|l| {
            let v: Vec<&str> = l.split('|').collect();
            let kind = v[1].split(' ').next().unwrap();
            let size = if kind == "directory" { "-" } else { v[5] };
            format!(
                "{} {kind} {} {}:{} {size} {} {}",
                v[0], v[2], v[3], v[4], v[6], v[7]
            )
        })
        .collect()
}

/// The same listing of a directory on the host.
fn host_listing(root: &Path) -> Listing {
    let mut out = Listing::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        let rel = Path::new(".").join(p.strip_prefix(root).unwrap());
        let rel = rel.to_string_lossy().trim_end_matches('/').to_owned();
        let (kind, size, x) = if m.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            ("directory", "-".to_owned(), String::new())
        } else if m.file_type().is_symlink() {
            let target = fs::read_link(&p).unwrap();
            (
                "symbolic",
                m.len().to_string(),
                target.display().to_string(),
            )
        } else {
            let sum = md5_hex(&fs::read(&p).unwrap());
            ("regular", m.len().to_string(), sum)
        };
        out.insert(format!(
            "{} {kind} {:o} {}:{} {size} {} {x}",
            if rel == "." { "." } else { &rel },
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            m.mtime()
        ));
    }
    out
}

fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `cp -a <snap>/files/vda/tree` restores what the guest listed.
fn check_cp_a(rg: &RealGuest, snap: &str, want: &Listing) {
    let dest = rg.dir.0.join(format!("restored-{snap}"));
    let out = Command::new("cp")
        .arg("-a")
        .arg(rg.path(&format!("{snap}/files/vda/tree")))
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp -a: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = host_listing(&dest);
    assert_eq!(&got, want, "cp -a of {snap}/files/vda/tree");
    // The tree has what it is meant to show: several owners, set-id bits.
    for needle in ["4755 0:0", "2775 33:33", "700 1000:1000", "640 0:42"] {
        assert!(
            got.iter().any(|l| l.contains(needle)),
            "{needle} in {got:#?}"
        );
    }
    fs::remove_dir_all(&dest).unwrap();
}

/// Deletes the guest's files `ns` in the guest and syncs.
fn delete_in_guest(guest: &Guest, ns: &[u64]) {
    let files: Vec<String> = ns.iter().map(|n| format!("/mnt/data/f{n}")).collect();
    let out = guest.sh(&format!("rm {} && sync", files.join(" ")));
    assert_eq!(out.code, 0, "{out:?}");
}

/// Kills the guest's QEMU (a crash: the guest's ext4 is left mounted,
/// its journal needing recovery) once it wrote another file, and waits
/// until the daemon sees it off. Returns the last file synced before.
fn crash(rg: &mut RealGuest) -> u64 {
    let n = rg.guest.wrote();
    rg.guest.wait_wrote(n, Duration::from_secs(120));
    rg.fx.vm.kill();
    rg.wait_state("shutoff");
    rg.guest.wrote()
}

/// The view of a crashed guest's vda is an ext4 whose journal needs
/// recovery and holds the last file `last` the guest synced: read without
/// the journal (debugfs on a copy of the view) the filesystem lacks it;
/// `files/` shows it, every name the disk has in place, and said in
/// `.log` that it applies the journal.
fn check_journal_applied(rg: &RealGuest, snap: &str, last: u64) {
    let copy = rg.dir.0.join(format!("{snap}-vda.raw"));
    let out = Command::new("cp")
        .arg("--sparse=always")
        .arg(rg.path(&format!("{snap}/disks/vda")))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let whole = fs::read(rg.path(&format!("{snap}/disks/vda"))).unwrap();
    assert!(
        fs::read(&copy).unwrap() == whole,
        "{snap}: a sparse copy of the view (SEEK_DATA/SEEK_HOLE) differs from its bytes"
    );
    let incompat = u32::from_le_bytes(whole[1024 + 0x60..1024 + 0x64].try_into().unwrap());
    drop(whole);
    assert_ne!(incompat & 0x4, 0, "{snap}: the journal needs recovery");
    let out = Command::new("debugfs")
        .args(["-c", "-R", "ls -p /data"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let in_place: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_owned))
        .filter(|n| n.starts_with('f'))
        .collect();
    fs::remove_file(&copy).unwrap();
    let shown: BTreeSet<String> = fs::read_dir(rg.path(&format!("{snap}/files/vda/data")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let last = format!("f{last}");
    assert!(
        !in_place.contains(&last) && shown.contains(&last),
        "{snap}: {last} is only in the journal: in place {in_place:?}, shown {shown:?}"
    );
    assert!(
        in_place.is_subset(&shown),
        "{snap}: in place {in_place:?}, shown {shown:?}; debugfs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{snap}: {} files in place, {} with the journal applied",
        in_place.len(),
        shown.len()
    );
    let log = rg.read(".log");
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("files/vda of {snap:?}"))
                && l.contains("journal needs recovery")),
        "{log}"
    );
}

#[test]
fn internal_snapshots_of_a_writing_guest() {
    let mut rg = RealGuest::start("rg-int", "internal", &[]);
    // The guest's agent answers, and runs commands.
    let mut agent = rg.guest.agent(Duration::from_secs(60));
    agent.ping().unwrap();
    assert_eq!(agent.fsfreeze_status().unwrap(), "thawed");
    drop(agent);
    let mounts = rg.guest.sh("cat /proc/mounts").text();
    assert!(mounts.contains("/dev/vda /mnt ext4"), "{mounts}");
    assert!(mounts.contains("/dev/vdb /fat vfat"), "{mounts}");
    let tree = guest_listing(&rg.guest);

    // A checkpoint of the running guest.
    let n1 = mkdir_after(&rg, "s1", FIRST - 1);
    check_files(&rg, "s1", n1, &[]);
    check_cp_a(&rg, "s1", &tree);

    // Files deleted in the guest are gone from the next snapshot only.
    delete_in_guest(&rg.guest, &[1, 2, 10]);
    let n2 = mkdir_after(&rg, "s2", n1);
    let fat = fs::read_dir(rg.path("s2/files/vdb")).unwrap().count();
    assert!(fat as u64 >= n2 / 10, "vdb keeps its copies");
    check_files(&rg, "s2", n2, &[1, 2, 10]);
    check_files(&rg, "s1", n1, &[]);

    // The guest crashes: a snapshot of the stopped guest has everything
    // it synced, read with the journal applied.
    let n3 = crash(&mut rg);
    assert!(n3 >= n2);
    fs::create_dir(rg.path("s3")).unwrap();
    check_files(&rg, "s3", n3, &[1, 2, 10]);
    check_journal_applied(&rg, "s3", n3);
    check_cp_a(&rg, "s3", &tree);
    check_files(&rg, "s1", n1, &[]);
    assert_eq!(
        image_tags(&rg.vm.disks[0].image).len(),
        3,
        "three internal snapshots"
    );
}

#[test]
fn external_snapshots_of_a_writing_guest() {
    let mut rg = RealGuest::start("rg-ext", "external", &[]);
    let tree = guest_listing(&rg.guest);

    // A checkpoint (RAM to a file, new overlays) of the running guest.
    let n1 = mkdir_after(&rg, "e1", FIRST - 1);
    let n1_end = rg.guest.wrote();
    assert_eq!(rg.read("e1/state"), "running\n");
    check_files(&rg, "e1", n1, &[]);
    check_cp_a(&rg, "e1", &tree);

    // A disk-only snapshot after files were deleted in the guest.
    delete_in_guest(&rg.guest, &[3, 4]);
    rg.guest.wait_wrote(n1, Duration::from_secs(120));
    let n2 = rg.guest.wrote();
    write_file(
        &rg.path(".create"),
        b"<domainsnapshot><name>e2</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='external'/>\
          </disks></domainsnapshot>",
    )
    .unwrap();
    assert_eq!(rg.read("e2/state"), "disk-snapshot\n");
    check_files(&rg, "e2", n2, &[3, 4]);
    check_files(&rg, "e1", n1, &[]);

    // The guest crashes; a snapshot of the stopped guest.
    let n3 = crash(&mut rg);
    fs::create_dir(rg.path("e3")).unwrap();
    check_files(&rg, "e3", n3, &[3, 4]);
    check_journal_applied(&rg, "e3", n3);
    check_files(&rg, "e1", n1, &[]);
    check_cp_a(&rg, "e3", &tree);

    // Back to the checkpoint e1, running: a new QEMU from the definition's
    // command line with e1's RAM. The guest goes on where it was (no new
    // boot), its agent answers, and what it writes is in the next snapshot.
    let seen = rg.guest.console_text().len();
    rg.revert("e1", "running").unwrap();
    rg.wait_state("running");
    let resumed = |g: &Guest| g.wrote_after_revert(seen);
    let deadline = Instant::now() + Duration::from_secs(120);
    while resumed(&rg.guest).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the guest wrote nothing after the revert:\n{}",
            rg.guest.console_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = resumed(&rg.guest)[0];
    assert!(
        first > n1 && first <= n1_end + 1,
        "after the revert to e1 (taken after f{n1}, mkdir returned after f{n1_end}) the guest wrote f{first}"
    );
    assert!(
        !rg.guest.console_text()[seen..].contains("BOOT"),
        "the guest resumed, it did not boot again"
    );
    rg.guest.agent(Duration::from_secs(60)).ping().unwrap();
    let n4 = mkdir_after(&rg, "e4", first);
    check_files(&rg, "e4", n4, &[]);
    check_files(&rg, "e2", n2, &[3, 4]);
}
