//! A libvirtd for tests and benchmarks, and what its domains need.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{all_bytes, create_qcow2};

/// The QEMU libvirt runs: the distribution's, which its libvirt knows
/// (libvirt 9.0 cannot probe QEMU 10).
pub const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";

/// One privileged libvirtd at a time: its QEMU driver locks the system's
/// state directories, so tests and benchmarks take turns.
pub static ONE_LIBVIRTD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A libvirtd of this test: its own libvirtd.conf, socket directory,
/// log and pid file, run in the foreground under `tini -s`, which reaps
/// the QEMU processes libvirt daemonizes (where no init does, a QEMU
/// that exited stays a zombie and libvirt waits for it); stopped by pid
/// on drop, after its domains.
pub struct Libvirtd {
    dir: PathBuf,
    pub uri: String,
    tini: std::process::Child,
    domains: Vec<String>,
    /// Held until this libvirtd is gone: other test processes wait.
    _turn: fs::File,
}

impl Libvirtd {
    /// Starts one, or says why it cannot and returns `None`.
    pub fn start(dir: &Path) -> Option<Libvirtd> {
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
        // One privileged libvirtd on the machine at a time (another test
        // process may run these tests too): wait for the machine's turn.
        let turn = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/vmsnapfs-test-libvirtd.lock")
            .unwrap();
        // SAFETY: flock(2) on a descriptor this function owns.
        assert_eq!(
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&turn), libc::LOCK_EX) },
            0
        );
        let sock = dir.join("sock");
        fs::create_dir_all(&sock).unwrap();
        let conf = dir.join("libvirtd.conf");
        // `VMSNAPFS_TEST_LIBVIRTD_DEBUG=1`: libvirtd logs what its QEMU
        // driver does (each monitor message, timed to the ms) into its
        // libvirtd.log, for breakdowns of where a libvirt call goes.
        let debug = std::env::var("VMSNAPFS_TEST_LIBVIRTD_DEBUG").is_ok_and(|v| v == "1");
        let logging = if debug {
            "log_filters = \"1:qemu 1:security 1:util.command 3:*\"\nlog_outputs = \"1:file:"
        } else {
            "log_outputs = \"3:file:"
        };
        fs::write(
            &conf,
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\n\
                 auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
                 {logging}{}\"\n",
                sock.display(),
                dir.join("libvirtd.log").display()
            ),
        )
        .unwrap();
        // libvirtd looks for its default emulator on PATH and probes
        // every one it finds; the domains here use the system's QEMU
        // (EMULATOR), so another QEMU first on PATH (the suite's second
        // pass puts QEMU 10.0 there) is kept out of its sight.
        let tini = Command::new("tini")
            .args(["-s", "--", "libvirtd", "-f"])
            .arg(&conf)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
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
            _turn: turn,
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
    pub fn virsh(&self, args: &[&str]) -> String {
        let o = self.try_virsh(args);
        assert!(
            o.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn try_virsh(&self, args: &[&str]) -> std::process::Output {
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
    pub fn define(&mut self, name: &str, images: &Path) -> PathBuf {
        self.define_with_memory(name, images, 128)
    }

    /// [`Libvirtd::define`] with `mib` MiB of guest RAM.
    pub fn define_with_memory(&mut self, name: &str, images: &Path, mib: u64) -> PathBuf {
        let img = images.join(format!("{name}-vda.qcow2"));
        create_qcow2(&img, "64M");
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>{mib}</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>\
             <devices><emulator>{EMULATOR}</emulator>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             </devices></domain>",
            img.display()
        );
        self.define_xml(name, &xml);
        img
    }

    /// Defines domain `name` from `xml` (removed again on drop).
    pub fn define_xml(&mut self, name: &str, xml: &str) {
        let file = self.dir.join(format!("{name}.xml"));
        fs::write(&file, xml).unwrap();
        // A domain an interrupted run left behind goes first.
        let _ = self.try_virsh(&["destroy", name]);
        let _ = self.try_virsh(&["undefine", name, "--snapshots-metadata", "--managed-save"]);
        self.virsh(&["define", file.to_str().unwrap()]);
        self.domains.push(name.to_owned());
    }

    /// The images of the domain's disk vda: (live top, persistent source),
    /// a file or a block device holding a qcow2.
    pub fn sources(&self, name: &str) -> (String, String) {
        let top = |xml: &str| {
            let def = vmsnapfs::xml::domain::parse_domain_def_with(xml, &|_| true).unwrap();
            def.disks[0].source.to_string_lossy().into_owned()
        };
        (
            top(&self.virsh(&["dumpxml", name])),
            top(&self.virsh(&["dumpxml", "--inactive", name])),
        )
    }

    /// libvirt's snapshot list of the domain, sorted.
    pub fn snapshot_names(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .virsh(&["snapshot-list", name, "--name"])
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    pub fn state(&self, name: &str) -> String {
        self.virsh(&["domstate", name]).trim().to_owned()
    }

    /// SeaBIOS's timer tick count in the RAM of domain `name`'s guest.
    pub fn bios_ticks(&self, name: &str) -> u64 {
        let out = self.virsh(&["qemu-monitor-command", name, "--hmp", "xp /1wx 0x46c"]);
        let hex = out
            .trim()
            .rsplit_once("0x")
            .unwrap_or_else(|| panic!("xp: {out}"))
            .1;
        u64::from_str_radix(hex.trim(), 16).unwrap_or_else(|_| panic!("xp: {out}"))
    }

    /// The guest of domain `name` reads `byte` over the first 64 KiB of vda.
    pub fn guest_reads(&self, name: &str, byte: u8) -> bool {
        let out = self.virsh(&[
            "qemu-monitor-command",
            name,
            "--hmp",
            &format!("qemu-io -d virtio-disk0/virtio-backend \"read -P {byte:#x} 0 64k\""),
        ]);
        !out.contains("fail") && !out.contains("rror")
    }

    /// libvirt's live and persistent definitions of domain `name` name
    /// the active layer vmsnapfs recorded in `state`.
    pub fn definitions_agree(&self, name: &str, state: &Path, step: &str) {
        let (live, persistent) = self.sources(name);
        let ours = active_layer_of(state, name).to_string_lossy().into_owned();
        assert_eq!(live, ours, "{step}: libvirt's live definition");
        assert_eq!(persistent, ours, "{step}: libvirt's persistent definition");
    }

    /// Writes `byte` over the first 64 KiB of the running guest's vda.
    pub fn guest_write(&self, name: &str, byte: u8) {
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
            let o = self.try_virsh(&["undefine", d, "--snapshots-metadata", "--managed-save"]);
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

/// `dir` bind-mounted on itself and made shared, so that the FUSE mount
/// under it is shared too: libvirt starts QEMU in a mount namespace of
/// its own, with a slave copy of every mount; where the host's mounts
/// are private (no systemd) that copy of the tree outlives our unmount
/// and the daemon with it. Unmounted on drop (after the daemon).
pub struct SharedMount(PathBuf);

impl SharedMount {
    pub fn new(dir: &Path) -> SharedMount {
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

/// Waits until `f` holds; fails after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The domain's `.state` in the tree.
pub fn state_of(mnt: &Path, d: &str) -> String {
    fs::read_to_string(mnt.join(d).join(".state"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The first 64 KiB of a view are `byte`.
pub fn view_holds(mnt: &Path, rel: &str, byte: u8) -> bool {
    let data = fs::read(mnt.join(rel)).unwrap();
    all_bytes(&data, 0, 64 << 10, byte)
}

/// On a failure, prints the end of the daemon's log.
pub struct KeepLog(pub PathBuf);

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
pub fn active_layer_of(state: &Path, domain: &str) -> PathBuf {
    let layers = fs::read(state.join(domain).join("layers")).unwrap();
    vmsnapfs::store::meta::parse_layers(&layers)
        .and_then(|mut l| l.remove("vda"))
        .map(|l| l.path)
        .expect("an active layer for vda")
}

/// What a libvirt test runs in: a temp directory libvirt's QEMU can
/// reach (0755), shared for the FUSE mount, with `images/` and a
/// libvirtd of its own. Dropped in order: libvirtd (and its domains),
/// the daemon log's tail on a failure, the shared mount, the directory.
pub struct LibvirtTest {
    pub lv: Libvirtd,
    pub images: PathBuf,
    _keep: KeepLog,
    _shared: SharedMount,
    pub dir: super::TempDir,
}

impl LibvirtTest {
    /// Sets one up, or says why libvirt cannot run here and returns `None`.
    pub fn start(name: &str) -> Option<LibvirtTest> {
        let dir = super::TempDir::new(name);
        let mut perms = fs::metadata(&dir.0).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        fs::set_permissions(&dir.0, perms).unwrap();
        let images = dir.0.join("images");
        fs::create_dir_all(&images).unwrap();
        let shared = SharedMount::new(&dir.0);
        let keep = KeepLog(dir.0.clone());
        let lv = Libvirtd::start(&dir.0.join("libvirtd"))?;
        Some(LibvirtTest {
            lv,
            images,
            _keep: keep,
            _shared: shared,
            dir,
        })
    }
}
