//! External disks onto block devices (`<disk type='block'><source
//! dev=...>` in a `.create` spec, as `virsh snapshot-create-as --diskspec
//! vda,snapshot=external,stype=block,file=/dev/...` writes it), on a
//! real QEMU and a real FUSE mount, with loop devices made here: the
//! reuse form (a device holding a qcow2 over the disk's active layer),
//! the format form (a blank device in `--format-devices`, named by a
//! group member), frozen views reading the devices, deletes that merge
//! out of a device and release it (never remove it), a revert, an offline
//! create; and the attacks that must fail with nothing made.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A file system mounted for the test, unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A disk-only external snapshot of vda onto the device `dev`.
fn spec(name: &str, dev: &Path) -> String {
    format!(
        "<domainsnapshot><name>{name}</name><memory snapshot='no'/><disks>\
         <disk name='vda' snapshot='external' type='block'><source dev='{}'/></disk>\
         <disk name='vdb' snapshot='no'/></disks></domainsnapshot>",
        dev.display()
    )
}

/// Writes on `dev` a 64 MiB qcow2 image over the qcow2 `backing`, as an
/// operator prepares a device for libvirt's `--reuse-external`.
fn qcow2_over(backing: &Path, dev: &LoopDevice) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(dev.path())
        .arg("64M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img create over {}: {}",
        backing.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first 64 KiB of a snapshot's frozen view of vda are all `byte`.
fn view_is(fx: &Fixture, snap: &str, byte: u8) {
    let data = fs::read(fx.path(&format!("{snap}/disks/vda")))
        .unwrap_or_else(|e| panic!("{snap}: {e}: {}", fx.read(".log")));
    assert!(all_bytes(&data, 0, 65536, byte), "{snap}/disks/vda");
}

#[test]
fn external_disks_onto_block_devices() {
    let member = TestUser::new("blk", true);
    let group = member.group.as_ref().unwrap().0.clone();
    let dir = TempDir::new("blockdev");
    let (a, b, c, d) = (
        LoopDevice::new(&dir.0.join("a.raw"), 80),
        LoopDevice::new(&dir.0.join("b.raw"), 80),
        LoopDevice::new(&dir.0.join("c.raw"), 80),
        LoopDevice::new(&dir.0.join("d.raw"), 80),
    );
    // c holds a mounted file system.
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", &c.0])
        .status()
        .unwrap();
    assert!(st.success());
    let mnt_c = dir.0.join("mnt-c");
    fs::create_dir(&mnt_c).unwrap();
    assert!(Command::new("mount")
        .arg(&c.0)
        .arg(&mnt_c)
        .status()
        .unwrap()
        .success());
    let _mounted = Mounted(mnt_c);
    // The operator's directory of devices vmsnapfs may format: links as
    // udev makes them in /dev/VG.
    let devs = dir.0.join("devs");
    fs::create_dir(&devs).unwrap();
    fs::set_permissions(&devs, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&b.0, devs.join("lv-b")).unwrap();
    std::os::unix::fs::symlink(&c.0, devs.join("lv-c")).unwrap();

    let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
    vm.policy = Some("external".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let args = [
        "--allow-other",
        "--group",
        group.as_str(),
        "--format-devices",
        devs.to_str().unwrap(),
    ];
    let daemon = Daemon::start_with_args(&dir.0, &[], &args);
    let mut fx = Fixture { daemon, vm, dir };
    let images = fx.vm.disks[0].image.parent().unwrap().to_owned();
    let vda = fx.vm.disks[0].image.clone();
    let create = fx.path(".create");
    let by_member =
        |xml: String| member.sh(&format!("cat > '{}'", create.display()), xml.as_bytes());
    // a holds the overlay already (libvirt's --reuse-external).
    qcow2_over(&vda, &a);

    // --- Attacks: each refused with its errno and `.log` line, nothing made.
    let files = names(&images);
    let heads = [a.head(1 << 20), b.head(1 << 20), d.head(1 << 20)];
    let refused = |errno: i32, xml: String, says: &str| {
        assert_eq!(write_file(&create, xml.as_bytes()), Err(errno), "{says}");
        let log = fx.read(".log");
        assert!(log.contains(says), "wanted {says:?} in:\n{log}");
    };
    // A group member names a device outside --format-devices.
    let out = by_member(spec("m1", a.path()));
    assert_failed_with(
        &out,
        libc::EPERM,
        "a member names a device outside the directory",
    );
    assert!(fx.read(".log").contains(&format!(
        "{}: refused (EPERM): disk vda: {} is not in the directory of devices vmsnapfs may use",
        ".create", a.0
    )));
    // A symlink to a device, outside the operator's directory.
    let evil = images.join("evil");
    std::os::unix::fs::symlink(&b.0, &evil).unwrap();
    refused(
        libc::EPERM,
        spec("x1", &evil),
        &format!(
            "{} is a symlink; vmsnapfs never follows a symlink it did not make",
            evil.display()
        ),
    );
    fs::remove_file(&evil).unwrap();
    // A mounted device, even in the operator's directory.
    refused(
        libc::EBUSY,
        spec("x2", &devs.join("lv-c")),
        &format!("{} is in use (mounted", c.0),
    );
    // A blank device outside the operator's directory is never formatted.
    refused(
        libc::EPERM,
        spec("x3", d.path()),
        "holds no qcow2 image over the disk's active layer (libvirt's --reuse-external), and \
         it is not in",
    );
    // A device holding a qcow2 over another image.
    let other = fx.dir.0.join("other.qcow2");
    create_qcow2(&other, "64M");
    qcow2_over(&other, &d);
    let d_head = d.head(1 << 20);
    refused(
        libc::EPERM,
        spec("x4", d.path()),
        &format!(
            "{} holds a qcow2 image over {:?}",
            d.0,
            other.display().to_string()
        ),
    );
    assert_eq!(names(&images), files, "nothing made");
    assert_eq!(
        [a.head(1 << 20), b.head(1 << 20)],
        [heads[0].clone(), heads[1].clone()]
    );
    assert_eq!(d.head(1 << 20), d_head);
    assert!(fx.ls().is_empty(), "{:?}", fx.ls());
    drop(heads);

    // --- The reuse form, running: a becomes vda's active layer as it is.
    fx.vm.qemu_io("vda", "write -P 0x11 0 64k").unwrap();
    write_file(&create, spec("s1", a.path()).as_bytes())
        .unwrap_or_else(|e| panic!("errno {e}: {}", fx.read(".log")));
    assert!(fx.read(".log").contains(&format!(
        "disk vda: block device {} holds a qcow2 over the disk's active layer",
        a.0
    )));
    assert_eq!(active_layer(&fx, "vda"), a.path());
    let xml = fx.read("s1/snapshot.xml");
    assert!(
        xml.contains(&format!(
            "<disk name='vda' snapshot='external' type='block'>\n      <driver type='qcow2'/>\n      \
             <source dev='{}'/>",
            a.0
        )),
        "{xml}"
    );
    fx.vm.qemu_io("vda", "write -P 0x22 0 64k").unwrap();

    // --- The format form, by a group member, through the operator's link.
    let out = by_member(spec("s2", &devs.join("lv-b")));
    assert!(out.status.success(), "{out:?}: {}", fx.read(".log"));
    assert!(fx.read(".log").contains(&format!(
        "disk vda: block device {} is blank and listed in --format-devices",
        b.0
    )));
    assert_eq!(active_layer(&fx, "vda"), b.path());
    fx.vm.qemu_io("vda", "write -P 0x33 0 64k").unwrap();
    view_is(&fx, "s1", 0x11);
    view_is(&fx, "s2", 0x22);

    // --- Delete s2: b is committed down into a, then released, not removed.
    fs::remove_dir(fx.path("s2")).unwrap_or_else(|e| panic!("{e}: {}", fx.read(".log")));
    assert!(
        fx.read(".log").contains(&format!(
            "{} is a block device: released, never removed",
            b.0
        )),
        "{}",
        fx.read(".log")
    );
    assert!(fs::symlink_metadata(&b.0)
        .unwrap()
        .file_type()
        .is_block_device());
    assert_eq!(active_layer(&fx, "vda"), a.path());
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, 65536, 0x33));
    view_is(&fx, "s1", 0x11);

    // --- Revert to s1: vda back to 0x11; what a held is kept (left-*).
    fx.revert("s1", "running force")
        .unwrap_or_else(|e| panic!("revert: errno {e}: {}", fx.read(".log")));
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, 65536, 0x11));
    let left = fx
        .ls()
        .into_iter()
        .find(|n| n.starts_with("left-"))
        .expect("the state the revert left");
    view_is(&fx, &left, 0x33);
    fs::remove_dir(fx.path(&left)).unwrap_or_else(|e| panic!("{e}: {}", fx.read(".log")));
    assert!(fx.read(".log").contains(&format!(
        "{} is a block device: released, never removed",
        a.0
    )));
    assert_eq!(
        &a.head(1 << 20)[..4],
        b"QFI\xfb",
        "a released device keeps its bytes"
    );

    // --- Stopped: the reuse form offline, a frozen view read from the
    // device, a delete that merges into it.
    fx.quit_vm();
    let top = active_layer(&fx, "vda");

    // --- The daemon killed after formatting e, before the create commits:
    // at the restart the recovery puts back e's first MiB (kept in the
    // state directory before the format), and nothing of the snapshot is
    // left, nor the kept copy.
    let e = LoopDevice::new(&fx.dir.0.join("e.raw"), 80);
    {
        // A pattern no signature matches: blank to blkid, not zeros.
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&e.0).unwrap();
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        f.write_all_at(&pattern, 0).unwrap();
        f.sync_all().unwrap();
    }
    std::os::unix::fs::symlink(&e.0, devs.join("lv-e")).unwrap();
    let e_head = e.head(1 << 20);
    let heads_dir = fx.daemon.state.join("vm1/device-heads");
    fx.daemon.stop();
    fx.daemon = Daemon::start_with_args(
        &fx.dir.0,
        &[("VMSNAPFS_FAILPOINTS", "create.after-overlays=crash")],
        &args,
    );
    assert!(write_file(&create, spec("s5", &devs.join("lv-e")).as_bytes()).is_err());
    assert!(fx.daemon.wait_exit(std::time::Duration::from_secs(30)));
    assert_eq!(
        &e.head(1 << 20)[..4],
        b"QFI\xfb",
        "formatted before the crash"
    );
    assert_eq!(
        fs::read_dir(&heads_dir).unwrap().count(),
        1,
        "the first MiB kept before the format"
    );
    fx.daemon.kill9();
    fx.daemon = Daemon::start_with_args(&fx.dir.0, &[], &args);
    let journal = fx.journal();
    assert!(journal.is_empty(), "{journal:?}\n{}", fx.read(".log"));
    assert!(e.head(1 << 20) == e_head, "e's first MiB put back");
    assert!(!fx.ls().contains(&"s5".to_owned()), "{:?}", fx.ls());
    assert_eq!(active_layer(&fx, "vda"), top);
    assert_eq!(
        fs::read_dir(&heads_dir).unwrap().count(),
        0,
        "the kept copy removed"
    );
    drop(e);
    qcow2_over(&top, &d);
    write_file(&create, spec("s3", d.path()).as_bytes())
        .unwrap_or_else(|e| panic!("errno {e}: {}", fx.read(".log")));
    assert_eq!(active_layer(&fx, "vda"), d.path());
    fs::create_dir(fx.path("s4")).unwrap_or_else(|e| panic!("{e}: {}", fx.read(".log")));
    view_is(&fx, "s4", 0x11);
    view_is(&fx, "s3", 0x11);
    // s4's point is the device; a second external disk over it is a file.
    assert!(fs::read_link(fx.path("s4/images/vda")).unwrap() == d.path());
    let xml = fx.read("s4/snapshot.xml");
    // The embedded <domain> has vda on its point, the device.
    assert!(
        xml.contains(&format!("<source dev=\"{}\"/>", d.0)) && xml.contains("type=\"block\""),
        "{xml}"
    );
    fs::remove_dir(fx.path("s4")).unwrap_or_else(|e| panic!("{e}: {}", fx.read(".log")));
    fs::remove_dir(fx.path("s3")).unwrap_or_else(|e| panic!("{e}: {}", fx.read(".log")));
    assert!(fs::symlink_metadata(&d.0)
        .unwrap()
        .file_type()
        .is_block_device());
    fs::remove_dir(fx.path("s1")).unwrap_or_else(|e| panic!("{e}: {}", fx.read(".log")));
    check_no_orphans(&fx);
}
