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
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
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

/// Fills the first MiB of `dev` with a pattern no signature matches
/// (blank to blkid, and not zeros); `salt` makes two devices differ.
fn fill_blank(dev: &LoopDevice, salt: u32) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(&dev.0).unwrap();
    let pattern: Vec<u8> = (0..1u32 << 20)
        .map(|i| ((i + salt) % 251) as u8 | 1)
        .collect();
    f.write_all_at(&pattern, 0).unwrap();
    f.sync_all().unwrap();
}

/// The image QEMU has under disk `target` (its active layer as the
/// running QEMU sees it), asked on the VM's own control socket.
fn qemu_active(vm: &Vm, target: &str) -> PathBuf {
    let disk = vm.disks.iter().find(|d| d.target == target).unwrap();
    let qdev = format!("/machine/peripheral/{}/virtio-backend", disk.device);
    let blocks = vm.control().unwrap().block_devices().unwrap();
    let file = blocks
        .into_iter()
        .find(|b| b.qdev.as_deref() == Some(qdev.as_str()))
        .and_then(|b| b.inserted)
        .map(|i| i.file)
        .unwrap_or_else(|| panic!("QEMU has no image under {target}"));
    PathBuf::from(file)
}

/// QEMU's run state (`query-status`), asked on the VM's control socket.
fn qemu_status(vm: &Vm) -> String {
    let s = vm
        .control()
        .unwrap()
        .execute_raw("query-status", serde_json::json!({}))
        .unwrap();
    s["status"].as_str().unwrap_or_default().to_owned()
}

/// A device node `name` in `dir` (root's, 0600) for the device `rdev`,
/// made with mknod(2): a node the operator keeps in the
/// `--format-devices` directory.
fn device_node(dir: &Path, name: &str, rdev: u64) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let p = dir.join(name);
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: mknod(2) on a NUL-terminated path with integer arguments.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, rdev as libc::dev_t) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    p
}

/// The device number of the loop device `dev`.
fn rdev_of(dev: &LoopDevice) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(&dev.0).unwrap().rdev()
}

/// A running VM (policy `external`) and a daemon with `--format-devices
/// devs` that crashes once a create's overlays are made (a format done),
/// before QEMU is handed them.
fn crashing_fixture(tag: &str) -> (Fixture, PathBuf, Vec<String>) {
    let dir = TempDir::new(tag);
    let devs = dir.0.join("devs");
    fs::create_dir(&devs).unwrap();
    fs::set_permissions(&devs, fs::Permissions::from_mode(0o755)).unwrap();
    let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
    vm.policy = Some("external".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let args = vec![
        "--format-devices".to_owned(),
        devs.to_str().unwrap().to_owned(),
    ];
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start_with_args(
        &dir.0,
        &[("VMSNAPFS_FAILPOINTS", "create.overlays-made=crash")],
        &a,
    );
    (Fixture { daemon, vm, dir }, devs, args)
}

/// Runs the create of `c1` onto `dev`, which kills the daemon after the
/// format (QEMU runs on); checks that the format happened and its bytes
/// were kept, then restarts the daemon so that its recovery runs.
fn create_killed_after_format(
    fx: &mut Fixture,
    dev: &Path,
    formatted: &LoopDevice,
    args: &[String],
) {
    let heads_dir = fx.daemon.state.join("vm1/device-heads");
    assert!(write_file(&fx.path(".create"), spec("c1", dev).as_bytes()).is_err());
    assert!(
        fx.daemon.wait_exit(std::time::Duration::from_secs(30)),
        "the daemon did not stop at create.overlays-made"
    );
    assert_eq!(
        &formatted.head(1 << 20)[..4],
        b"QFI\xfb",
        "formatted before the crash"
    );
    assert_eq!(
        fs::read_dir(&heads_dir).unwrap().count(),
        1,
        "the first MiB kept before the format"
    );
    // QEMU ran on while the daemon was gone.
    assert_eq!(qemu_status(&fx.vm), "running");
    fx.daemon.kill9();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    fx.daemon = Daemon::start_with_args(&fx.dir.0, &[], &a);
    let journal = fx.journal();
    assert!(journal.is_empty(), "{journal:?}\n{}", fx.read(".log"));
}

/// Waits (up to 30 s) until vm1's `.log` holds `needle`.
fn wait_dot_log(fx: &Fixture, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let log = fx.read(".log");
        if log.contains(needle) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "wanted {needle:?} in .log:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_format_is_undone_by_recovery_while_the_guest_runs() {
    let (mut fx, devs, args) = crashing_fixture("blockdev-crash-run");
    let e = LoopDevice::new(&fx.dir.0.join("e.raw"), 80);
    fill_blank(&e, 0);
    std::os::unix::fs::symlink(&e.0, devs.join("lv-e")).unwrap();
    let e_head = e.head(1 << 20);
    let images = fx.vm.disks[0].image.parent().unwrap().to_owned();
    let files = names(&images);
    let before = active_layer(&fx, "vda");
    assert_eq!(qemu_active(&fx.vm, "vda"), before);
    fx.vm.qemu_io("vda", "write -P 0x44 0 64k").unwrap();

    create_killed_after_format(&mut fx, &devs.join("lv-e"), &e, &args);

    // Nothing half-made: no snapshot, no file, no kept copy.
    assert!(
        e.head(1 << 20) == e_head,
        "e's first MiB put back byte for byte"
    );
    let heads_dir = fx.daemon.state.join("vm1/device-heads");
    assert_eq!(
        fs::read_dir(&heads_dir).unwrap().count(),
        0,
        "the kept copy removed"
    );
    assert!(!fx.ls().contains(&"c1".to_owned()), "{:?}", fx.ls());
    assert_eq!(names(&images), files, "nothing made beside the images");
    wait_dot_log(
        &fx,
        &format!(
            "{}: the 1048576 bytes the format overwrote are put back",
            e.0
        ),
    );
    // The guest runs on as before, on its previous active layer, and
    // QEMU never took the device.
    assert_eq!(fx.read(".state").trim(), "running");
    assert_eq!(qemu_status(&fx.vm), "running");
    assert_eq!(active_layer(&fx, "vda"), before);
    assert_eq!(qemu_active(&fx.vm, "vda"), before);
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&e.0)
        .expect("nobody holds e");
    fx.vm.qemu_io("vda", "write -P 0x55 64k 64k").unwrap();
    let disk = fx.vm.read_disk("vda").unwrap();
    assert!(all_bytes(&disk, 0, 65536, 0x44) && all_bytes(&disk, 65536, 65536, 0x55));
    // The same device is taken again by the next create.
    write_file(
        &fx.path(".create"),
        spec("c2", &devs.join("lv-e")).as_bytes(),
    )
    .unwrap_or_else(|e| panic!("errno {e}: {}", fx.read(".log")));
    assert_eq!(active_layer(&fx, "vda"), e.path());
    view_is(&fx, "c2", 0x44);
    fs::remove_dir(fx.path("c2")).unwrap_or_else(|e| panic!("{e}: {}", fx.read(".log")));
    check_no_orphans(&fx);
}

#[test]
fn saved_bytes_never_go_to_another_device() {
    let (mut fx, devs, args) = crashing_fixture("blockdev-crash-rdev");
    let e = LoopDevice::new(&fx.dir.0.join("e.raw"), 80);
    let f = LoopDevice::new(&fx.dir.0.join("f.raw"), 80);
    fill_blank(&e, 0);
    fill_blank(&f, 7);
    // The operator keeps a device node in the directory; after the crash
    // it is made again for another device.
    let node = device_node(&devs, "node-e", rdev_of(&e));
    let f_head = f.head(1 << 20);
    let before = active_layer(&fx, "vda");

    // The daemon's kill, and the node replaced while it is gone.
    let heads_dir = fx.daemon.state.join("vm1/device-heads");
    assert!(write_file(&fx.path(".create"), spec("c1", &node).as_bytes()).is_err());
    assert!(fx.daemon.wait_exit(std::time::Duration::from_secs(30)));
    assert_eq!(
        &e.head(1 << 20)[..4],
        b"QFI\xfb",
        "formatted before the crash"
    );
    fs::remove_file(&node).unwrap();
    device_node(&devs, "node-e", rdev_of(&f));
    fx.daemon.kill9();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    fx.daemon = Daemon::start_with_args(&fx.dir.0, &[], &a);
    let journal = fx.journal();
    assert!(journal.is_empty(), "{journal:?}\n{}", fx.read(".log"));

    // Not a byte written to the other device; `.log` says why and where
    // the bytes are kept; the copy stays for the operator.
    let log = wait_dot_log(
        &fx,
        &format!(
            "{}: the bytes the format overwrote are not put back: it now leads to device {}:{}",
            node.display(),
            libc::major(rdev_of(&f)),
            libc::minor(rdev_of(&f))
        ),
    );
    assert!(log.contains("nothing is written to it"), "{log}");
    assert!(f.head(1 << 20) == f_head, "the other device unchanged");
    assert_eq!(
        &e.head(1 << 20)[..4],
        b"QFI\xfb",
        "e left as the format made it"
    );
    let kept: Vec<_> = fs::read_dir(&heads_dir).unwrap().collect();
    assert_eq!(kept.len(), 1, "the kept copy stays");
    let kept = kept.into_iter().next().unwrap().unwrap().path();
    assert!(
        log.contains(&format!("they are kept in {}", kept.display())),
        "{log}"
    );
    // The kept copy is e's first MiB as it was.
    let bytes = fs::read(&kept).unwrap();
    assert_eq!(&bytes[..8], &rdev_of(&e).to_le_bytes());
    fill_blank(&e, 0);
    assert!(bytes[8..] == e.head(1 << 20)[..], "the kept bytes are e's");
    // The guest runs on its previous layer; no snapshot.
    assert!(!fx.ls().contains(&"c1".to_owned()), "{:?}", fx.ls());
    assert_eq!(qemu_status(&fx.vm), "running");
    assert_eq!(active_layer(&fx, "vda"), before);
    assert_eq!(qemu_active(&fx.vm, "vda"), before);
    // A new format of that node is refused while the copy is kept.
    assert!(write_file(&fx.path(".create"), spec("c2", &node).as_bytes()).is_err());
    assert!(
        f.head(1 << 20) == f_head,
        "the other device still unchanged"
    );
    wait_dot_log(&fx, "the bytes an earlier format overwrote are still kept");
    check_no_orphans(&fx);
}
