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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The QEMU libvirt runs: the distribution's, which its libvirt knows
/// (libvirt 9.0 cannot probe QEMU 10).
const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";

/// One privileged libvirtd at a time: its QEMU driver locks the system's
/// state directories, so the tests of this file take turns.
static ONE_LIBVIRTD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A libvirtd of this test: its own libvirtd.conf, socket directory,
/// log and pid file, run in the foreground under `tini -s`, which reaps
/// the QEMU processes libvirt daemonizes (where no init does, a QEMU
/// that exited stays a zombie and libvirt waits for it); stopped by pid
/// on drop, after its domains.
struct Libvirtd {
    dir: PathBuf,
    uri: String,
    tini: std::process::Child,
    domains: Vec<String>,
}

impl Libvirtd {
    /// Starts one, or says why it cannot and returns `None`.
    fn start(dir: &Path) -> Option<Libvirtd> {
        let have = |p: &str| Path::new(p).exists();
        if !have("/usr/sbin/libvirtd")
            || !have("/usr/bin/virsh")
            || !have("/usr/bin/tini")
            || !have(EMULATOR)
        {
            eprintln!(
                "SKIPPED: libvirt is not installed (scripts/install-deps.sh installs it): \
                 no libvirtd, virsh, tini or {EMULATOR}"
            );
            return None;
        }
        if Command::new("id")
            .arg("libvirt-qemu")
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!("SKIPPED: no libvirt-qemu user (scripts/install-deps.sh creates it)");
            return None;
        }
        let sock = dir.join("sock");
        fs::create_dir_all(&sock).unwrap();
        let conf = dir.join("libvirtd.conf");
        fs::write(
            &conf,
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\n\
                 auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
                 log_outputs = \"3:file:{}\"\n",
                sock.display(),
                dir.join("libvirtd.log").display()
            ),
        )
        .unwrap();
        let tini = Command::new("tini")
            .args(["-s", "--", "libvirtd", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(dir.join("libvirtd.pid"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let uri = format!(
            "qemu:///system?socket={}",
            sock.join("libvirt-sock").display()
        );
        let mut d = Libvirtd {
            dir: dir.to_owned(),
            uri,
            tini,
            domains: Vec::new(),
        };
        // Answers before the test goes on.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.try_virsh(&["version"]).status.success() {
            if let Ok(Some(st)) = d.tini.try_wait() {
                panic!(
                    "libvirtd exited ({st}) (another libvirtd may hold /run/libvirt): {}",
                    fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer: {}",
                fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(d)
    }

    /// Runs virsh on this libvirtd; its output, or a panic with stderr.
    fn virsh(&self, args: &[&str]) -> String {
        let o = self.try_virsh(args);
        assert!(
            o.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn try_virsh(&self, args: &[&str]) -> std::process::Output {
        Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .unwrap()
    }

    /// Defines a domain with one qcow2 disk `vda` of 64 MiB in `images`
    /// (TCG: the test needs no guest OS) and returns its image.
    fn define(&mut self, name: &str, images: &Path) -> PathBuf {
        let img = images.join(format!("{name}-vda.qcow2"));
        create_qcow2(&img, "64M");
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><emulator>{EMULATOR}</emulator>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             </devices></domain>",
            img.display()
        );
        let file = self.dir.join(format!("{name}.xml"));
        fs::write(&file, xml).unwrap();
        // A domain an interrupted run left behind goes first.
        let _ = self.try_virsh(&["destroy", name]);
        let _ = self.try_virsh(&["undefine", name, "--snapshots-metadata"]);
        self.virsh(&["define", file.to_str().unwrap()]);
        self.domains.push(name.to_owned());
        img
    }

    /// The images of the domain's disk vda: (live top, persistent source).
    fn sources(&self, name: &str) -> (String, String) {
        let top = |xml: &str| {
            let def = vmsnapfs::xml::domain::parse_domain_def(xml).unwrap();
            def.disks[0].source.to_string_lossy().into_owned()
        };
        (
            top(&self.virsh(&["dumpxml", name])),
            top(&self.virsh(&["dumpxml", "--inactive", name])),
        )
    }

    /// libvirt's snapshot list of the domain, sorted.
    fn snapshot_names(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .virsh(&["snapshot-list", name, "--name"])
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    fn state(&self, name: &str) -> String {
        self.virsh(&["domstate", name]).trim().to_owned()
    }

    /// Writes `byte` over the first 64 KiB of the running guest's vda.
    fn guest_write(&self, name: &str, byte: u8) {
        let out = self.virsh(&[
            "qemu-monitor-command",
            name,
            "--hmp",
            &format!("qemu-io -d virtio-disk0/virtio-backend \"write -P {byte:#x} 0 64k\""),
        ]);
        assert!(!out.contains("rror"), "{out}");
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for d in &self.domains {
            let _ = self.try_virsh(&["destroy", d]);
            let o = self.try_virsh(&["undefine", d, "--snapshots-metadata"]);
            if !o.status.success() {
                eprintln!("virsh undefine {d}: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        // tini passes SIGTERM on to libvirtd and exits with it.
        // SAFETY: kill(2) on the pid of the tini this test started and
        // has not reaped yet.
        unsafe {
            libc::kill(self.tini.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.tini.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.tini.kill();
                let _ = self.tini.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state_of(mnt: &Path, d: &str) -> String {
    fs::read_to_string(mnt.join(d).join(".state"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The first 64 KiB of a view are `byte`.
fn view_holds(mnt: &Path, rel: &str, byte: u8) -> bool {
    let data = fs::read(mnt.join(rel)).unwrap();
    all_bytes(&data, 0, 64 << 10, byte)
}

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
    let dir = TempDir::new("libvirt");
    // libvirt's QEMU runs as libvirt-qemu: it must reach the images.
    let mut perms = fs::metadata(&dir.0).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    fs::set_permissions(&dir.0, perms).unwrap();
    let images = dir.0.join("images");
    fs::create_dir_all(&images).unwrap();
    let _shared = SharedMount::new(&dir.0);
    let _keep = KeepLog(dir.0.clone());
    let t = Instant::now();
    let Some(mut lv) = Libvirtd::start(&dir.0.join("libvirtd")) else {
        return;
    };
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
    drop(lv);
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
    let dir = TempDir::new("libvirt-int");
    let mut perms = fs::metadata(&dir.0).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    fs::set_permissions(&dir.0, perms).unwrap();
    let images = dir.0.join("images");
    fs::create_dir_all(&images).unwrap();
    let _shared = SharedMount::new(&dir.0);
    let _keep = KeepLog(dir.0.clone());
    let Some(mut lv) = Libvirtd::start(&dir.0.join("libvirtd")) else {
        return;
    };
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

/// `dir` bind-mounted on itself and made shared, so that the FUSE mount
/// under it is shared too: libvirt starts QEMU in a mount namespace of
/// its own, with a slave copy of every mount; where the host's mounts
/// are private (no systemd) that copy of the tree outlives our unmount
/// and the daemon with it. Unmounted on drop (after the daemon).
struct SharedMount(PathBuf);

impl SharedMount {
    fn new(dir: &Path) -> SharedMount {
        for args in [&["--bind"][..], &["--make-rshared"][..]] {
            let st = Command::new("mount")
                .args(args)
                .arg(dir)
                .args(if args[0] == "--bind" { Some(dir) } else { None })
                .status()
                .unwrap();
            assert!(st.success(), "mount {args:?} {}", dir.display());
        }
        SharedMount(dir.to_owned())
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// On a failure, prints the end of the daemon's log.
struct KeepLog(PathBuf);

impl Drop for KeepLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = fs::read_to_string(self.0.join("daemon.log")).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(" TRACE ") && !l.contains("fuser::"))
                .collect();
            let from = lines.len().saturating_sub(150);
            eprintln!(
                "--- daemon log (last lines) ---\n{}",
                lines[from..].join("\n")
            );
        }
    }
}

/// The active layer of vda that vmsnapfs recorded for `domain`.
fn active_layer_of(state: &Path, domain: &str) -> PathBuf {
    let layers = fs::read(state.join(domain).join("layers")).unwrap();
    vmsnapfs::store::meta::parse_layers(&layers)
        .and_then(|mut l| l.remove("vda"))
        .map(|l| l.path)
        .expect("an active layer for vda")
}
