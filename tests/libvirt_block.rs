//! External disks onto block devices for libvirt's domains (`<disk
//! type='block'><source dev=...>` in a `.create` spec), on a real
//! libvirtd (started by each test, stopped by pid), a real FUSE mount and
//! loop devices made here: the reuse form (a device holding a qcow2 over
//! the disk's active layer) and the format form (a blank device in
//! `--format-devices`, named by a group member), on a running and on a
//! stopped domain. After each step libvirt's live and persistent
//! definitions name the device as vda's `type='block'` active layer,
//! `virsh start` boots it, every view holds its bytes; a restarted daemon
//! reads libvirt's definition naming the device as the disk it made;
//! `snapshot.xml` says `type='block'` `<source dev>` and is taken by
//! `virsh snapshot-create --redefine --validate` on a fresh definition;
//! rmdir merges out of a device and releases it (its node as libvirt
//! found it, its bytes kept), a revert works. A group member naming a
//! device outside `--format-devices`, a symlink outside it, a mounted
//! device and one holding a file system are refused with nothing made; a
//! `type='block'` disk vmsnapfs never accepted stays one it cannot
//! snapshot; a daemon killed after formatting a device, before the
//! create committed, puts its first MiB back at the next start.
//! Skipped, saying so, where libvirtd is not installed.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::libvirtd::*;
use common::*;

/// A disk-only external snapshot of vda onto the device `dev`.
fn spec(name: &str, dev: &Path) -> String {
    format!(
        "<domainsnapshot><name>{name}</name><memory snapshot='no'/><disks>\
         <disk name='vda' snapshot='external' type='block'><source dev='{}'/></disk>\
         </disks></domainsnapshot>",
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

/// The owner, group and mode of a device node.
fn label(dev: &LoopDevice) -> (u32, u32, u32) {
    let m = fs::metadata(dev.path()).unwrap();
    (m.uid(), m.gid(), m.mode())
}

/// The uid libvirt runs its QEMU as.
fn qemu_uid() -> u32 {
    let out = Command::new("id")
        .args(["-u", "libvirt-qemu"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The devices, the operator's directory and the group member of a test.
struct Devices {
    member: TestUser,
    group: String,
    devs: PathBuf,
    /// Reuse form: holds a qcow2 over vda's image.
    a: LoopDevice,
    /// Format form: blank, linked in `devs` as `lv-b`.
    b: LoopDevice,
    /// Blank, outside `devs`.
    d: LoopDevice,
    /// A device vmsnapfs never accepted, for a domain defined on it.
    x: LoopDevice,
}

impl Devices {
    fn new(dir: &Path, tag: &str) -> Devices {
        let member = TestUser::new(tag, true);
        let group = member.group.as_ref().unwrap().0.clone();
        let (a, b, d) = (
            LoopDevice::new(&dir.join("a.raw"), 80),
            LoopDevice::new(&dir.join("b.raw"), 80),
            LoopDevice::new(&dir.join("d.raw"), 80),
        );
        let x = LoopDevice::new(&dir.join("x.raw"), 80);
        let devs = dir.join("devs");
        fs::create_dir(&devs).unwrap();
        fs::set_permissions(&devs, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&b.0, devs.join("lv-b")).unwrap();
        Devices {
            member,
            group,
            devs,
            a,
            b,
            d,
            x,
        }
    }

    /// The daemon's arguments: libvirt mode, the group, the directory.
    fn daemon(&self, dir: &Path, uri: &str) -> Daemon {
        self.daemon_env(dir, uri, &[])
    }

    /// [`Devices::daemon`] with `env`.
    fn daemon_env(&self, dir: &Path, uri: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_args(
            dir,
            env,
            &[
                "--libvirt",
                uri,
                "--allow-other",
                "--group",
                &self.group,
                "--format-devices",
                self.devs.to_str().unwrap(),
            ],
        )
    }
}

/// One domain under test.
struct Dom<'a> {
    lv: &'a Libvirtd,
    mnt: PathBuf,
    state: PathBuf,
    name: &'static str,
}

impl Dom<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(self.name).join(rel)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path(".log")).unwrap_or_default()
    }

    fn wait_state(&self, want: &str) {
        wait_until(
            &format!("{} {want}", self.name),
            Duration::from_secs(60),
            || state_of(&self.mnt, self.name) == want,
        );
    }

    fn create(&self, xml: &str) {
        write_file(&self.path(".create"), xml.as_bytes())
            .unwrap_or_else(|e| panic!("create {xml}: {}\n{}", strerror(e), self.log()));
    }

    /// `.create` by the group member.
    fn create_as(&self, who: &TestUser, xml: &str) -> std::process::Output {
        who.sh(
            &format!("cat > '{}'", self.path(".create").display()),
            xml.as_bytes(),
        )
    }

    fn rmdir(&self, name: &str) {
        fs::remove_dir(self.path(name))
            .unwrap_or_else(|e| panic!("rmdir {name}: {e}\n{}", self.log()));
    }

    fn revert(&self, name: &str, request: &str) {
        fs::write(self.path(&format!("{name}/revert")), request)
            .unwrap_or_else(|e| panic!("revert {name} {request}: {e}\n{}", self.log()));
    }

    fn view_holds(&self, snap: &str, byte: u8) {
        assert!(
            view_holds(&self.mnt, &format!("{}/{snap}/disks/vda", self.name), byte),
            "{snap}'s view does not hold {byte:#x}\n{}",
            self.log()
        );
    }

    /// libvirt's live (when running) and persistent definitions name
    /// `dev` as vda's `type='block'` active layer, as vmsnapfs recorded.
    fn on_device(&self, dev: &LoopDevice, step: &str) {
        // No record yet: the active layers are the definition's (a
        // daemon that started on libvirt's definition naming the device).
        let recorded = self.state.join(self.name).join("layers").exists();
        if recorded {
            assert_eq!(
                active_layer_of(&self.state, self.name),
                dev.path(),
                "{step}: the recorded active layer\n{}",
                self.log()
            );
        }
        let mut xmls = vec![(
            "persistent",
            self.lv.virsh(&["dumpxml", "--inactive", self.name]),
        )];
        if self.lv.state(self.name) == "running" {
            xmls.push(("live", self.lv.virsh(&["dumpxml", self.name])));
        }
        for (which, xml) in xmls {
            let disk = vda_disk(&xml);
            assert!(
                disk.starts_with("<disk type='block' device='disk'>")
                    && disk.contains(&format!("<source dev='{}'", dev.0))
                    && disk.contains("<driver name='qemu' type='qcow2'"),
                "{step}: libvirt's {which} definition of vda: {disk}"
            );
        }
        if recorded {
            self.lv.definitions_agree(self.name, &self.state, step);
        }
    }

    /// The snapshot's `snapshot.xml` names `dev` as the overlay it made.
    fn xml_names(&self, snap: &str, dev: &LoopDevice) -> String {
        let xml = fs::read_to_string(self.path(&format!("{snap}/snapshot.xml"))).unwrap();
        assert!(
            xml.contains(&format!(
                "<disk name='vda' snapshot='external' type='block'>\n      \
                 <driver type='qcow2'/>\n      <source dev='{}'/>",
                dev.0
            )),
            "{snap}: {xml}"
        );
        xml
    }
}

/// The `<disk>` element of vda in libvirt's domain XML.
fn vda_disk(xml: &str) -> String {
    xml.split("<disk ")
        .skip(1)
        .map(|d| format!("<disk {}", &d[..d.find("</disk>").unwrap()]))
        .find(|d| d.contains("<target dev='vda'"))
        .unwrap_or_else(|| panic!("no vda in {xml}"))
}

/// A group member names a device outside `--format-devices` (holding a
/// qcow2 over the active layer, or blank): `EPERM`, a `.log` line, and
/// nothing made, the device and libvirt's definitions unchanged.
fn attack(dom: &Dom<'_>, dv: &Devices, image: &Path) {
    let before = (
        dv.a.head(1 << 20),
        dv.d.head(1 << 20),
        label(&dv.a),
        dom.lv.sources(dom.name),
    );
    for dev in [&dv.a, &dv.d] {
        let out = dom.create_as(&dv.member, &spec("m1", dev.path()));
        assert_failed_with(&out, libc::EPERM, "a member names a device outside");
        assert!(
            dom.log().contains(&format!(
                ".create: refused (EPERM): disk vda: {} is not in the directory of devices \
                 vmsnapfs may use",
                dev.0
            )),
            "{}",
            dom.log()
        );
    }
    assert!(!dom.path("m1").exists());
    assert_eq!(
        before,
        (
            dv.a.head(1 << 20),
            dv.d.head(1 << 20),
            label(&dv.a),
            dom.lv.sources(dom.name)
        )
    );
    if dom.state.join(dom.name).join("layers").exists() {
        assert_eq!(active_layer_of(&dom.state, dom.name), image);
    }
}

/// Redefines each `snapshot.xml` (parents first, `xmls` in that order),
/// unchanged and validated, on a fresh definition of `dom`; libvirt
/// then names the same device for each.
fn redefine_on_fresh_definition(
    lv: &Libvirtd,
    dir: &Path,
    dom: &str,
    fresh: &Path,
    xmls: &[(String, String, &LoopDevice)],
) {
    let _ = lv.try_virsh(&["destroy", dom]);
    lv.virsh(&["undefine", dom, "--snapshots-metadata", "--managed-save"]);
    lv.virsh(&["define", fresh.to_str().unwrap()]);
    for (name, xml, dev) in xmls {
        let file = dir.join(format!("{dom}-{name}.snapshot.xml"));
        fs::write(&file, xml).unwrap();
        let out = lv.try_virsh(&[
            "snapshot-create",
            dom,
            file.to_str().unwrap(),
            "--redefine",
            "--validate",
        ]);
        assert!(
            out.status.success(),
            "redefine {name}: {}\n{xml}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = lv.virsh(&["snapshot-dumpxml", dom, name]);
        assert!(
            theirs.contains("type='block'") && theirs.contains(&format!("<source dev='{}'", dev.0)),
            "{name} as libvirt reads it: {theirs}"
        );
    }
}

/// A released device: still the node it was, with the label libvirt
/// found it with, its qcow2 header still there (never wiped).
fn released(dom: &Dom<'_>, dev: &LoopDevice, was: (u32, u32, u32)) {
    assert!(
        dom.log().contains(&format!(
            "{} is a block device: released, never removed",
            dev.0
        )),
        "{}",
        dom.log()
    );
    let m = fs::symlink_metadata(dev.path()).unwrap();
    assert!(m.file_type().is_block_device());
    assert_eq!(label(dev), was, "{}: owner, group and mode", dev.0);
    assert_eq!(&dev.head(4)[..], b"QFI\xfb", "{} keeps its bytes", dev.0);
}

#[test]
fn libvirt_block_devices_on_a_running_domain() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    // The devices outlive the libvirtd (dropped after it, with its
    // domains), whatever fails.
    let devices = TempDir::new("libvirt-block-run-devs");
    let dv = Devices::new(&devices.0, "lbr");
    let Some(mut t) = LibvirtTest::start("libvirt-block-run") else {
        return;
    };
    let image = t.lv.define("lvb", &t.images);
    let fresh = t.dir.0.join("lvb-fresh.xml");
    fs::write(&fresh, t.lv.virsh(&["dumpxml", "--inactive", "lvb"])).unwrap();
    let labels = (label(&dv.a), label(&dv.b));
    t.lv.virsh(&["start", "lvb"]);
    t.lv.guest_write("lvb", 0x41);
    let uri = t.lv.uri.clone();
    let mut daemon = dv.daemon(&t.dir.0, &uri);
    let mut dom = Dom {
        lv: &t.lv,
        mnt: daemon.mnt.clone(),
        state: daemon.state.clone(),
        name: "lvb",
    };
    dom.wait_state("running");

    attack(&dom, &dv, &image);

    // Reuse: a holds a qcow2 over the image; libvirt switches to it.
    qcow2_over(&image, &dv.a);
    dom.create(&spec("s1", dv.a.path()));
    dom.on_device(&dv.a, "s1 onto a (reuse)");
    let live = t.lv.virsh(&["dumpxml", "lvb"]);
    assert!(
        vda_disk(&live).contains(&format!("<source file='{}'", image.display())),
        "libvirt's backing chain of a: {live}"
    );
    t.lv.guest_write("lvb", 0x42);

    // Format, by the group member, through the operator's link.
    let out = dom.create_as(&dv.member, &spec("s2", &dv.devs.join("lv-b")));
    assert!(out.status.success(), "{out:?}: {}", dom.log());
    assert!(dom.log().contains(&format!(
        "disk vda: block device {} is blank and listed in --format-devices",
        dv.b.0
    )));
    dom.on_device(&dv.b, "s2 onto b (format)");
    // libvirt gives the device to its QEMU's user (its DAC labelling) on
    // a node of QEMU's own /dev (a mount namespace of its own): the
    // host's node stays as it was.
    assert_eq!(label(&dv.b), labels.1, "b's node on the host");
    let pid = fs::read_to_string("/run/libvirt/qemu/lvb.pid").unwrap();
    let inside = Path::new("/proc")
        .join(pid.trim())
        .join("root")
        .join(&dv.b.0[1..]);
    assert_eq!(
        fs::metadata(&inside).unwrap().uid(),
        qemu_uid(),
        "b's owner in QEMU's /dev"
    );
    assert!(vda_disk(&t.lv.virsh(&["dumpxml", "lvb"])).contains("<backingStore type='block'"));
    t.lv.guest_write("lvb", 0x43);
    dom.view_holds("s1", 0x41);
    dom.view_holds("s2", 0x42);
    let xmls = vec![
        ("s1".to_owned(), dom.xml_names("s1", &dv.a), &dv.a),
        ("s2".to_owned(), dom.xml_names("s2", &dv.b), &dv.b),
    ];

    // libvirt boots the device after a stop.
    t.lv.virsh(&["destroy", "lvb"]);
    dom.wait_state("shutoff");
    t.lv.virsh(&["start", "lvb"]);
    dom.wait_state("running");
    dom.on_device(&dv.b, "destroy and start");
    assert!(t.lv.guest_reads("lvb", 0x43), "the guest after the start");

    // A restarted daemon reads libvirt's definition naming b as the
    // disk it made: a snapshot over it works.
    drop(daemon);
    daemon = dv.daemon(&t.dir.0, &uri);
    dom.mnt = daemon.mnt.clone();
    dom.wait_state("running");
    dom.create(
        "<domainsnapshot><name>s3</name><memory snapshot='no'/>\
         <disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>",
    );
    let s3_overlay = active_layer_of(&daemon.state, "lvb");
    assert_ne!(s3_overlay, dv.b.path());
    t.lv.definitions_agree("lvb", &daemon.state, "s3 over b");
    t.lv.guest_write("lvb", 0x44);
    dom.view_holds("s3", 0x43);

    // Deletes: s3 (its point is b), then s2, which merges b away.
    dom.rmdir("s3");
    t.lv.definitions_agree("lvb", &daemon.state, "rmdir s3");
    dom.rmdir("s2");
    t.lv.definitions_agree("lvb", &daemon.state, "rmdir s2");
    assert!(t.lv.guest_reads("lvb", 0x44));
    dom.view_holds("s1", 0x41);
    released(&dom, &dv.b, labels.1);

    // Revert to s1: the guest reads 0x41; the state left keeps a.
    dom.revert("s1", "running force");
    dom.wait_state("running");
    assert!(t.lv.guest_reads("lvb", 0x41), "the guest after the revert");
    t.lv.definitions_agree("lvb", &daemon.state, "revert to s1");
    let left: Vec<String> = names(&dom.mnt.join("lvb"))
        .into_iter()
        .filter(|n| n.starts_with("left-"))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    dom.view_holds(&left[0], 0x44);
    dom.rmdir(&left[0]);
    dom.rmdir("s1");
    t.lv.definitions_agree("lvb", &daemon.state, "deletes");
    assert!(t.lv.guest_reads("lvb", 0x41));
    released(&dom, &dv.a, labels.0);
    drop(daemon);
    redefine_on_fresh_definition(&t.lv, &t.dir.0, "lvb", &fresh, &xmls);
    drop(t);
    drop(dv);
    drop(devices);
}

#[test]
fn libvirt_block_devices_on_a_stopped_domain() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    // The devices outlive the libvirtd (dropped after it, with its
    // domains), whatever fails.
    let devices = TempDir::new("libvirt-block-off-devs");
    let dv = Devices::new(&devices.0, "lbo");
    let Some(mut t) = LibvirtTest::start("libvirt-block-off") else {
        return;
    };
    let image = t.lv.define("lvbo", &t.images);
    let fresh = t.dir.0.join("lvbo-fresh.xml");
    fs::write(&fresh, t.lv.virsh(&["dumpxml", "--inactive", "lvbo"])).unwrap();
    let labels = (label(&dv.a), label(&dv.b));
    let write = |img: &Path, byte: u8| {
        let o = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P {byte:#x} 0 64k")])
            .arg(img)
            .output()
            .unwrap();
        assert!(o.status.success(), "qemu-io write: {o:?}");
    };
    write(&image, 0x51);
    // Another domain whose vda is a qcow2 on a device vmsnapfs never
    // accepted: a disk it cannot snapshot, whatever the device holds.
    let other = t.images.join("other.qcow2");
    create_qcow2(&other, "64M");
    qcow2_over(&other, &dv.x);
    t.lv.define_xml(
        "lvbx",
        &format!(
            "<domain type='qemu'><name>lvbx</name><memory unit='MiB'>128</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><emulator>{EMULATOR}</emulator>\
             <disk type='block' device='disk'><driver name='qemu' type='qcow2'/>\
             <source dev='{}'/><target dev='vda' bus='virtio'/></disk>\
             </devices></domain>",
            dv.x.0
        ),
    );
    let x_head = dv.x.head(1 << 20);
    let uri = t.lv.uri.clone();
    let mut daemon = dv.daemon(&t.dir.0, &uri);
    let mut dom = Dom {
        lv: &t.lv,
        mnt: daemon.mnt.clone(),
        state: daemon.state.clone(),
        name: "lvbo",
    };
    dom.wait_state("shutoff");
    wait_until("lvbx shutoff", Duration::from_secs(60), || {
        state_of(&dom.mnt, "lvbx") == "shutoff"
    });
    assert_eq!(
        errno(fs::create_dir(dom.mnt.join("lvbx/y"))),
        libc::EOPNOTSUPP
    );
    let log = fs::read_to_string(dom.mnt.join("lvbx/.log")).unwrap();
    assert!(
        log.contains(&format!(
            "disk vda is a block device {}, which vmsnapfs cannot snapshot",
            dv.x.0
        )),
        "{log}"
    );
    assert!(!dom.mnt.join("lvbx/y").exists());
    assert_eq!(dv.x.head(1 << 20), x_head);

    attack(&dom, &dv, &image);

    // Reuse, offline: the persistent definition names a.
    qcow2_over(&image, &dv.a);
    dom.create(&spec("t1", dv.a.path()));
    dom.on_device(&dv.a, "t1 onto a (reuse), stopped");
    write(dv.a.path(), 0x52);
    // Format, by the group member.
    let out = dom.create_as(&dv.member, &spec("t2", &dv.devs.join("lv-b")));
    assert!(out.status.success(), "{out:?}: {}", dom.log());
    dom.on_device(&dv.b, "t2 onto b (format), stopped");
    dom.view_holds("t1", 0x51);
    dom.view_holds("t2", 0x52);
    let xmls = vec![
        ("t1".to_owned(), dom.xml_names("t1", &dv.a), &dv.a),
        ("t2".to_owned(), dom.xml_names("t2", &dv.b), &dv.b),
    ];

    // libvirt boots b; libvirt's label of b goes back after the stop.
    t.lv.virsh(&["start", "lvbo"]);
    dom.wait_state("running");
    dom.on_device(&dv.b, "start on b");
    assert!(t.lv.guest_reads("lvbo", 0x52), "the guest on b");
    t.lv.guest_write("lvbo", 0x53);
    t.lv.virsh(&["destroy", "lvbo"]);
    dom.wait_state("shutoff");
    assert_eq!(label(&dv.b), labels.1, "b's label after the stop");

    // A restarted daemon takes b from libvirt's definition as its own.
    drop(daemon);
    daemon = dv.daemon(&t.dir.0, &uri);
    dom.mnt = daemon.mnt.clone();
    dom.wait_state("shutoff");
    dom.create(
        "<domainsnapshot><name>t3</name><memory snapshot='no'/>\
         <disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>",
    );
    t.lv.definitions_agree("lvbo", &daemon.state, "t3 over b");
    dom.view_holds("t3", 0x53);

    // Revert to t1 (stopped): the image's bytes; libvirt boots them.
    dom.revert("t1", "shutoff force");
    t.lv.definitions_agree("lvbo", &daemon.state, "revert to t1");
    t.lv.virsh(&["start", "lvbo"]);
    dom.wait_state("running");
    assert!(t.lv.guest_reads("lvbo", 0x51), "the guest after the revert");
    t.lv.virsh(&["destroy", "lvbo"]);
    dom.wait_state("shutoff");

    // Every snapshot deleted: both devices merged away and released.
    let mut all: BTreeMap<String, ()> = names(&dom.mnt.join("lvbo"))
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .map(|n| (n, ()))
        .collect();
    for n in ["t3", "t2", "t1"] {
        all.remove(n);
        dom.rmdir(n);
        t.lv.definitions_agree("lvbo", &daemon.state, &format!("rmdir {n}"));
    }
    for n in all.keys() {
        dom.rmdir(n);
    }
    t.lv.definitions_agree("lvbo", &daemon.state, "deletes");
    released(&dom, &dv.b, labels.1);
    released(&dom, &dv.a, labels.0);
    t.lv.virsh(&["start", "lvbo"]);
    dom.wait_state("running");
    assert!(
        t.lv.guest_reads("lvbo", 0x51),
        "the guest after the deletes"
    );
    drop(daemon);
    redefine_on_fresh_definition(&t.lv, &t.dir.0, "lvbo", &fresh, &xmls);
    drop(t);
    drop(dv);
    drop(devices);
}

#[test]
fn libvirt_block_device_checks_and_a_crash_after_a_format() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let devices = TempDir::new("libvirt-block-chk-devs");
    let dv = Devices::new(&devices.0, "lbc");
    // c holds a mounted file system and is listed; e holds one, listed
    // and not mounted; f and g are blank to blkid (a pattern, not zeros)
    // and listed.
    let (c, e, f, g) = (
        LoopDevice::new(&devices.0.join("c.raw"), 80),
        LoopDevice::new(&devices.0.join("e.raw"), 80),
        LoopDevice::new(&devices.0.join("f.raw"), 80),
        LoopDevice::new(&devices.0.join("g.raw"), 80),
    );
    // h is blank and listed, and another libvirt domain's raw disk.
    let h = LoopDevice::new(&devices.0.join("h.raw"), 80);
    for dev in [&c, &e] {
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", &dev.0])
            .status()
            .unwrap();
        assert!(st.success());
    }
    for dev in [&f, &g, &h] {
        use std::os::unix::fs::FileExt;
        let h = fs::OpenOptions::new().write(true).open(&dev.0).unwrap();
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        h.write_all_at(&pattern, 0).unwrap();
        h.sync_all().unwrap();
    }
    let mnt_c = devices.0.join("mnt-c");
    fs::create_dir(&mnt_c).unwrap();
    assert!(Command::new("mount")
        .arg(&c.0)
        .arg(&mnt_c)
        .status()
        .unwrap()
        .success());
    let _mounted = Unmount(mnt_c);
    for (dev, name) in [
        (&c, "lv-c"),
        (&e, "lv-e"),
        (&f, "lv-f"),
        (&g, "lv-g"),
        (&h, "lv-h"),
    ] {
        std::os::unix::fs::symlink(&dev.0, dv.devs.join(name)).unwrap();
    }
    let f_label = label(&f);
    let Some(mut t) = LibvirtTest::start("libvirt-block-chk") else {
        return;
    };
    let image = t.lv.define("lvbc", &t.images);
    t.lv.define_xml(
        "lvbh",
        &format!(
            "<domain type='qemu'><name>lvbh</name><memory unit='MiB'>128</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><emulator>{EMULATOR}</emulator>\
             <disk type='block' device='disk'><driver name='qemu' type='raw'/>\
             <source dev='{}'/><target dev='vda' bus='virtio'/></disk>\
             </devices></domain>",
            h.0
        ),
    );
    t.lv.virsh(&["start", "lvbh"]);
    let h_head = h.head(1 << 20);
    t.lv.virsh(&["start", "lvbc"]);
    t.lv.guest_write("lvbc", 0x61);
    let uri = t.lv.uri.clone();
    let mut daemon = dv.daemon(&t.dir.0, &uri);
    let mut dom = Dom {
        lv: &t.lv,
        mnt: daemon.mnt.clone(),
        state: daemon.state.clone(),
        name: "lvbc",
    };
    dom.wait_state("running");
    // c is mounted: the kernel writes its file system (not compared).
    let heads = [e.head(1 << 20), f.head(1 << 20), g.head(1 << 20)];
    let sources = t.lv.sources("lvbc");
    let refused = |errno: i32, xml: String, says: &str| {
        assert_eq!(
            write_file(&dom.path(".create"), xml.as_bytes()),
            Err(errno),
            "{says}"
        );
        assert!(
            dom.log().contains(says),
            "wanted {says:?} in:\n{}",
            dom.log()
        );
    };
    // A symlink to a listed device, outside the operator's directory.
    let evil = t.images.join("evil");
    std::os::unix::fs::symlink(&f.0, &evil).unwrap();
    refused(
        libc::EPERM,
        spec("x1", &evil),
        &format!(
            "{} is a symlink; vmsnapfs never follows a symlink it did not make",
            evil.display()
        ),
    );
    // A mounted device, listed.
    refused(
        libc::EBUSY,
        spec("x2", &dv.devs.join("lv-c")),
        &format!("{} is in use (mounted", c.0),
    );
    // A listed, blank device another libvirt domain's QEMU runs on (its
    // image locks are on the node of that QEMU's own /dev).
    refused(
        libc::EBUSY,
        spec("x4", &dv.devs.join("lv-h")),
        &format!("{} is in use", h.0),
    );
    assert!(h.head(1 << 20) == h_head, "h unchanged");
    // A listed device that holds a file system.
    refused(
        libc::EPERM,
        spec("x3", &dv.devs.join("lv-e")),
        &format!("{} holds TYPE=ext4", e.0),
    );
    assert_eq!([e.head(1 << 20), f.head(1 << 20), g.head(1 << 20)], heads);
    assert_eq!(t.lv.sources("lvbc"), sources, "libvirt's definitions");
    assert!(
        !dom.state.join("lvbc/layers").exists() || { active_layer_of(&dom.state, "lvbc") == image }
    );
    assert!(names(&dom.mnt.join("lvbc"))
        .iter()
        .all(|n| n.starts_with('.')));

    // Killed after formatting f and libvirt's switch, before the create
    // committed (running): QEMU writes f, so the next start completes the
    // snapshot (never puts f's old bytes back under QEMU) and drops the
    // copy it kept.
    let heads_dir = daemon.state.join("lvbc/device-heads");
    let crash = |dom: &mut Dom<'_>, name: &str, dev: &str| -> Daemon {
        let mut d = dv.daemon_env(
            &t.dir.0,
            &uri,
            &[("VMSNAPFS_FAILPOINTS", "create.after-overlays=crash")],
        );
        dom.mnt = d.mnt.clone();
        wait_until("the domain's state", Duration::from_secs(60), || {
            state_of(&dom.mnt, "lvbc") != "unreachable"
        });
        assert!(write_file(
            &dom.path(".create"),
            spec(name, &dv.devs.join(dev)).as_bytes()
        )
        .is_err());
        assert!(d.wait_exit(Duration::from_secs(30)));
        assert_eq!(fs::read_dir(&heads_dir).unwrap().count(), 1, "kept");
        d.kill9();
        d = dv.daemon(&t.dir.0, &uri);
        dom.mnt = d.mnt.clone();
        d
    };
    drop(daemon);
    daemon = crash(&mut dom, "s5", "lv-f");
    dom.wait_state("running");
    assert!(
        dom.log()
            .contains("recovery: interrupted external create of \"s5\""),
        "{}",
        dom.log()
    );
    assert_eq!(
        &f.head(4)[..],
        b"QFI\xfb",
        "f holds the overlay QEMU writes"
    );
    assert_eq!(fs::read_dir(&heads_dir).unwrap().count(), 0);
    dom.on_device(&f, "s5 completed by the recovery");
    t.lv.guest_write("lvbc", 0x62);
    dom.view_holds("s5", 0x61);
    dom.rmdir("s5");
    released(&dom, &f, f_label);
    assert!(t.lv.guest_reads("lvbc", 0x62));

    // Stopped, killed after formatting g, before the new layer was
    // recorded: the next start puts g's first MiB back; nothing of the
    // snapshot is left, and libvirt's definitions name the image.
    t.lv.virsh(&["destroy", "lvbc"]);
    dom.wait_state("shutoff");
    let sources = t.lv.sources("lvbc");
    drop(daemon);
    daemon = crash(&mut dom, "s6", "lv-g");
    dom.wait_state("shutoff");
    assert!(g.head(1 << 20) == heads[2], "g's first MiB put back");
    assert_eq!(fs::read_dir(&heads_dir).unwrap().count(), 0);
    assert!(!dom.path("s6").exists(), "{}", dom.log());
    assert_eq!(t.lv.sources("lvbc"), sources, "libvirt's definitions");
    // g can be taken afterwards; libvirt boots it.
    dom.create(&spec("s7", &dv.devs.join("lv-g")));
    dom.on_device(&g, "s7 onto g after the recovery");
    t.lv.virsh(&["start", "lvbc"]);
    dom.wait_state("running");
    dom.on_device(&g, "start on g");
    assert!(t.lv.guest_reads("lvbc", 0x62));
    drop(daemon);
    drop(t);
    drop(dv);
}

/// A file system mounted for the test, unmounted on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
