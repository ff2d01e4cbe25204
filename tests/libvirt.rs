//! libvirt mode on a real libvirtd (started by this test with its own
//! configuration and socket directory, stopped by pid at the end) and a
//! real FUSE mount: libvirt's domains appear with no definition file;
//! snapshots of a running domain go through libvirt's monitor
//! passthrough, RAM through a passed descriptor (libvirt's seccomp
//! sandbox forbids the fork of `exec:` and the guest survives); every
//! change of images is written into libvirt's persistent definition, so
//! `virsh start` boots the images the guest last wrote; bytes are
//! checked through the tree. Skipped, saying so, where libvirtd is not
//! installed.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::libvirtd::*;
use common::*;

/// Runs `f`, failing when it takes 2 s or more (a hang check).
fn prompt<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{what} took {:?}",
        t.elapsed()
    );
    r
}

#[test]
fn libvirt_domains_snapshot_through_the_tree_and_boot_their_active_layers() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let Some(mut fx) = LibvirtTest::start("libvirt") else {
        return;
    };
    let (dir, images, lv) = (&fx.dir, fx.images.clone(), &mut fx.lv);
    eprintln!("libvirtd started in {:?}", t.elapsed());
    let run_img = lv.define("lvrun", &images);
    lv.define("lvoff", &images);
    let t = Instant::now();
    lv.virsh(&["start", "lvrun"]);
    eprintln!("virsh start: {:?}", t.elapsed());
    lv.guest_write("lvrun", 0xab);

    let t = Instant::now();
    let daemon = Daemon::start_with_args(&dir.0, &[], &["--libvirt", &lv.uri.clone()]);
    eprintln!("mount in libvirt mode: {:?}", t.elapsed());
    let mnt = daemon.mnt.clone();
    let names: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    // (Domains libvirt had before are listed too.)
    assert!(
        names.iter().any(|n| n == "lvrun") && names.iter().any(|n| n == "lvoff"),
        "{names:?}"
    );
    wait_until("lvrun running", Duration::from_secs(30), || {
        state_of(&mnt, "lvrun") == "running"
    });
    assert_eq!(state_of(&mnt, "lvoff"), "shutoff");
    for d in ["lvrun", "lvoff"] {
        prompt("ls", || fs::read_dir(mnt.join(d)).unwrap().count());
        prompt("cat .state", || {
            fs::read_to_string(mnt.join(d).join(".state")).unwrap()
        });
    }

    // A checkpoint of the running domain (the default): RAM through a
    // descriptor libvirt passes on, disks switched to overlays; the
    // guest keeps running under libvirt.
    let t = Instant::now();
    fs::create_dir(mnt.join("lvrun/s1")).unwrap_or_else(|e| {
        panic!(
            "mkdir lvrun/s1: {e}\n{}",
            fs::read_to_string(mnt.join("lvrun/.log")).unwrap()
        )
    });
    eprintln!("mkdir (checkpoint) of a libvirt domain: {:?}", t.elapsed());
    assert_eq!(lv.state("lvrun"), "running");
    assert_eq!(
        fs::read_to_string(mnt.join("lvrun/s1/state"))
            .unwrap()
            .trim(),
        "running"
    );
    assert!(fs::metadata(mnt.join("lvrun/s1/memory")).unwrap().len() > 0);
    assert!(view_holds(&mnt, "lvrun/s1/disks/vda", 0xab));
    // libvirt's next boot uses the overlay; the snapshot's image is frozen.
    let (_, persistent) = lv.sources("lvrun");
    assert_ne!(persistent, run_img.to_string_lossy());
    assert_eq!(
        persistent,
        active_layer_of(&daemon.state, "lvrun").to_string_lossy()
    );
    let s1_overlay = persistent;
    lv.guest_write("lvrun", 0xcd);
    assert!(view_holds(&mnt, "lvrun/s1/disks/vda", 0xab));

    // A stopped domain: an overlay made offline, libvirt's definition
    // names it, and `virsh start` boots it.
    fs::create_dir(mnt.join("lvoff/o1")).unwrap();
    let (_, persistent) = lv.sources("lvoff");
    assert_eq!(
        persistent,
        active_layer_of(&daemon.state, "lvoff").to_string_lossy()
    );
    lv.virsh(&["start", "lvoff"]);
    let (live, _) = lv.sources("lvoff");
    assert_eq!(live, persistent);
    wait_until("lvoff running", Duration::from_secs(30), || {
        state_of(&mnt, "lvoff") == "running"
    });
    lv.guest_write("lvoff", 0x11);
    assert!(view_holds(&mnt, "lvoff/o1/disks/vda", 0));

    // `virsh destroy; virsh start` of the checkpointed domain boots the
    // overlay: the guest sees its last write, the snapshot keeps its bytes.
    lv.virsh(&["destroy", "lvrun"]);
    wait_until("lvrun shut off", Duration::from_secs(30), || {
        state_of(&mnt, "lvrun") == "shutoff"
    });
    lv.virsh(&["start", "lvrun"]);
    wait_until("lvrun running again", Duration::from_secs(30), || {
        state_of(&mnt, "lvrun") == "running"
    });
    fs::create_dir(mnt.join("lvrun/s2")).unwrap_or_else(|e| {
        panic!(
            "mkdir lvrun/s2: {e}\n{}",
            fs::read_to_string(mnt.join("lvrun/.log")).unwrap()
        )
    });
    assert!(view_holds(&mnt, "lvrun/s2/disks/vda", 0xcd));
    assert!(view_holds(&mnt, "lvrun/s1/disks/vda", 0xab));

    // libvirt's snapshot list shows them, s2 current and a child of s1;
    // s1's external disk names the overlay it created (libvirt's
    // meaning of <source>), its <domain> the image it froze.
    wait_until("libvirt's list", Duration::from_secs(30), || {
        lv.snapshot_names("lvrun") == ["s1", "s2"]
            && lv.virsh(&["snapshot-current", "lvrun", "--name"]).trim() == "s2"
    });
    assert_eq!(lv.virsh(&["snapshot-parent", "lvrun", "s2"]).trim(), "s1");
    let x = lv.virsh(&["snapshot-dumpxml", "lvrun", "s1"]);
    assert!(x.contains("<state>running</state>"), "{x}");
    let disks = &x[x.find("<disks>").unwrap()..x.find("</disks>").unwrap()];
    assert!(
        disks.contains(&format!("<source file='{s1_overlay}'")),
        "{x}"
    );
    let domain = &x[x.find("<domain").unwrap()..];
    assert!(
        domain.contains(&format!("<source file='{}'", run_img.display())),
        "{x}"
    );

    // Delete the first snapshot of the running domain (a live merge
    // through the passthrough): the later one keeps its bytes, and
    // libvirt's next boot still finds its images.
    fs::remove_dir(mnt.join("lvrun/s1")).unwrap_or_else(|e| {
        panic!(
            "rmdir lvrun/s1: {e}\n{}",
            fs::read_to_string(mnt.join("lvrun/.log")).unwrap()
        )
    });
    assert!(view_holds(&mnt, "lvrun/s2/disks/vda", 0xcd));
    lv.virsh(&["destroy", "lvrun"]);
    lv.virsh(&["start", "lvrun"]);
    wait_until(
        "lvrun running after the delete",
        Duration::from_secs(30),
        || state_of(&mnt, "lvrun") == "running",
    );
    fs::create_dir(mnt.join("lvrun/s3")).unwrap();
    assert!(view_holds(&mnt, "lvrun/s3/disks/vda", 0xcd));
    wait_until(
        "libvirt's list after the delete",
        Duration::from_secs(30),
        || lv.snapshot_names("lvrun") == ["s2", "s3"],
    );

    // Revert through the tree: vmsnapfs stops QEMU through libvirt and
    // leaves the domain on a branch over s2; libvirt boots that branch.
    lv.guest_write("lvrun", 0x77);
    fs::write(mnt.join("lvrun/s2/revert"), "shutoff force").unwrap_or_else(|e| {
        panic!(
            "revert: {e}\n{}",
            fs::read_to_string(mnt.join("lvrun/.log")).unwrap()
        )
    });
    assert_eq!(lv.state("lvrun"), "shut off");
    let (_, persistent) = lv.sources("lvrun");
    assert_eq!(
        persistent,
        active_layer_of(&daemon.state, "lvrun").to_string_lossy()
    );
    lv.virsh(&["start", "lvrun"]);
    wait_until(
        "lvrun running after the revert",
        Duration::from_secs(30),
        || state_of(&mnt, "lvrun") == "running",
    );
    fs::create_dir(mnt.join("lvrun/s4")).unwrap();
    assert!(view_holds(&mnt, "lvrun/s4/disks/vda", 0xcd));
    let t = Instant::now();
    drop(daemon);
    eprintln!("daemon stopped in {:?}", t.elapsed());
    let t = Instant::now();
    drop(fx);
    eprintln!("libvirtd stopped in {:?}", t.elapsed());
}

/// Sends SIGCONT to a stopped libvirtd when dropped.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of the libvirtd this test started.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

#[test]
fn libvirt_internal_checkpoints_and_a_silent_libvirtd() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut fx) = LibvirtTest::start("libvirt-int") else {
        return;
    };
    let (dir, images, lv) = (&fx.dir, fx.images.clone(), &mut fx.lv);
    let img = lv.define("lvint", &images);
    lv.virsh(&["start", "lvint"]);
    lv.guest_write("lvint", 0x21);
    let daemon = Daemon::start_with_args(&dir.0, &[], &["--libvirt", &lv.uri.clone()]);
    let mnt = daemon.mnt.clone();
    wait_until("lvint running", Duration::from_secs(30), || {
        state_of(&mnt, "lvint") == "running"
    });

    // An internal checkpoint through the passthrough (snapshot-save):
    // the tag is in the image, the guest runs on under libvirt.
    let spec = "<domainsnapshot><name>i1</name><memory snapshot='internal'/>\
                <disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>";
    let t = Instant::now();
    write_file(&mnt.join("lvint/.create"), spec.as_bytes()).unwrap_or_else(|e| {
        panic!(
            "create i1: {}\n{}",
            strerror(e),
            fs::read_to_string(mnt.join("lvint/.log")).unwrap()
        )
    });
    eprintln!("internal checkpoint of a libvirt domain: {:?}", t.elapsed());
    assert_eq!(lv.state("lvint"), "running");
    assert_eq!(
        fs::read_to_string(mnt.join("lvint/i1/state"))
            .unwrap()
            .trim(),
        "running"
    );
    assert_eq!(image_tags(&img).len(), 1);
    assert!(view_holds(&mnt, "lvint/i1/disks/vda", 0x21));
    lv.guest_write("lvint", 0x22);
    assert!(view_holds(&mnt, "lvint/i1/disks/vda", 0x21));

    // Renamed, then reverted in the same QEMU (snapshot-load), which
    // keeps the left state as a snapshot; deleted.
    wait_until("i1 in libvirt's list", Duration::from_secs(30), || {
        lv.snapshot_names("lvint") == ["i1"]
    });
    let x = lv.virsh(&["snapshot-dumpxml", "lvint", "i1"]);
    assert!(x.contains("<memory snapshot='internal'/>"), "{x}");
    let disks = &x[x.find("<disks>").unwrap()..x.find("</disks>").unwrap()];
    assert!(
        disks.contains("snapshot='internal'") && !disks.contains("<source"),
        "{x}"
    );
    fs::rename(mnt.join("lvint/i1"), mnt.join("lvint/first")).unwrap();
    wait_until(
        "the new name in libvirt's list",
        Duration::from_secs(30),
        || lv.snapshot_names("lvint") == ["first"],
    );
    fs::write(mnt.join("lvint/first/revert"), "running").unwrap_or_else(|e| {
        panic!(
            "revert: {e}\n{}",
            fs::read_to_string(mnt.join("lvint/.log")).unwrap()
        )
    });
    assert_eq!(lv.state("lvint"), "running");
    let left: Vec<String> = fs::read_dir(mnt.join("lvint"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("left-"))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(view_holds(
        &mnt,
        &format!("lvint/{}/disks/vda", left[0]),
        0x22
    ));
    fs::remove_dir(mnt.join("lvint/first")).unwrap();
    assert_eq!(image_tags(&img).len(), 1);
    wait_until(
        "libvirt's list after the delete",
        Duration::from_secs(30),
        || lv.snapshot_names("lvint") == left,
    );
    assert!(view_holds(
        &mnt,
        &format!("lvint/{}/disks/vda", left[0]),
        0x22
    ));

    // libvirtd stops answering (SIGSTOP): every FUSE call answers at
    // once, the domain says it is unreachable and held (its QEMU holds
    // the images), an operation is refused and makes nothing.
    let pid: i32 = fs::read_to_string(dir.0.join("libvirtd/libvirtd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the pid of the libvirtd this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let resume = Resume(pid);
    wait_until("lvint unreachable", Duration::from_secs(60), || {
        // The mount's listing asks libvirt for new domains in the
        // background, never on the FUSE thread.
        prompt("ls of the mount", || fs::read_dir(&mnt).unwrap().count());
        prompt("ls", || fs::read_dir(mnt.join("lvint")).unwrap().count());
        prompt("stat .state", || {
            fs::metadata(mnt.join("lvint/.state")).unwrap()
        });
        prompt("cat .state", || state_of(&mnt, "lvint")).starts_with("unreachable: ")
    });
    let r = prompt("mkdir", || fs::create_dir(mnt.join("lvint/while-stopped")));
    assert_eq!(errno(r), libc::EBUSY);
    let log = fs::read_to_string(mnt.join("lvint/.log")).unwrap();
    assert!(log.contains("domain is now unreachable: "), "{log}");
    assert_eq!(image_tags(&img).len(), 1);
    drop(resume);
    wait_until("lvint running again", Duration::from_secs(60), || {
        state_of(&mnt, "lvint") == "running"
    });
    fs::create_dir(mnt.join("lvint/after")).unwrap();

    // A revert that must start QEMU goes through libvirt: the domain is
    // shut off, the checkpoint is loaded into the QEMU `virsh start
    // --paused` made (snapshot-load), and the guest runs on its disks.
    lv.virsh(&["destroy", "lvint"]);
    wait_until("lvint shut off", Duration::from_secs(30), || {
        state_of(&mnt, "lvint") == "shutoff"
    });
    fs::write(mnt.join("lvint").join(&left[0]).join("revert"), "running").unwrap_or_else(|e| {
        panic!(
            "revert: {e}\n{}",
            fs::read_to_string(mnt.join("lvint/.log")).unwrap()
        )
    });
    assert_eq!(lv.state("lvint"), "running");
    wait_until(
        "lvint running after the start",
        Duration::from_secs(30),
        || state_of(&mnt, "lvint") == "running",
    );
    fs::create_dir(mnt.join("lvint/restarted")).unwrap();
    assert!(view_holds(&mnt, "lvint/restarted/disks/vda", 0x22));

    // Specs as virsh writes them (snapshot-create-as --print-xml): a disk
    // named by its image path; --disk-only spelled <state>disk-snapshot</state>.
    let spec = format!(
        "<domainsnapshot><name>by-path</name><state>disk-snapshot</state>\
         <disks><disk name='{}' snapshot='internal'/></disks></domainsnapshot>",
        img.display()
    );
    write_file(&mnt.join("lvint/.create"), spec.as_bytes()).unwrap_or_else(|e| {
        panic!(
            "create by-path: {}\n{}",
            strerror(e),
            fs::read_to_string(mnt.join("lvint/.log")).unwrap()
        )
    });
    assert_eq!(
        fs::read_to_string(mnt.join("lvint/by-path/state"))
            .unwrap()
            .trim(),
        "disk-snapshot"
    );
    assert!(fs::metadata(mnt.join("lvint/by-path/memory")).is_err());
    assert!(view_holds(&mnt, "lvint/by-path/disks/vda", 0x22));
    let bad = "<domainsnapshot><name>nope</name><disks>\
               <disk name='/no/such/image.qcow2' snapshot='internal'/></disks></domainsnapshot>";
    assert_eq!(
        write_file(&mnt.join("lvint/.create"), bad.as_bytes()),
        Err(libc::EINVAL)
    );
    let log = fs::read_to_string(mnt.join("lvint/.log")).unwrap();
    assert!(log.contains("no disk of the domain has the image"), "{log}");
    drop(daemon);
}
