//! Fixtures for tests on a real QEMU and a real FUSE mount. Everything a
//! fixture starts is stopped on drop, even when the test fails: the mount
//! is unmounted, the daemon and QEMU are killed by pid, the temp dir removed.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod guest;
pub mod libvirtd;

pub use vmsnapfs::demo::vm::{Vm, VmSpec};

/// A loop device over a new file of `mib` MiB, detached on drop.
pub struct LoopDevice(pub String);

impl LoopDevice {
    /// Creates `file` (`mib` MiB, sparse) and attaches a free loop device to it.
    pub fn new(file: &Path, mib: u64) -> LoopDevice {
        fs::File::create(file).unwrap().set_len(mib << 20).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        Path::new(&self.0)
    }

    /// Its first `len` bytes.
    pub fn head(&self, len: usize) -> Vec<u8> {
        use std::io::Read;
        let mut b = vec![0u8; len];
        fs::File::open(&self.0).unwrap().read_exact(&mut b).unwrap();
        b
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmsnapfs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A barrier for a `wait:PATH` failpoint: the daemon waits at the point
/// until the test opens it (the file appears); removed on drop.
pub struct Gate(pub PathBuf);

impl Gate {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmsnapfs-gate-{tag}-{}", std::process::id()));
        let _ = fs::remove_file(&p);
        Gate(p)
    }

    /// The failpoint action: `wait:PATH`.
    pub fn action(&self) -> String {
        format!("wait:{}", self.0.display())
    }

    /// Lets the waiting operation go on.
    pub fn open(&self) {
        fs::write(&self.0, b"").unwrap();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A vmsnapfs daemon process serving a mount point.
pub struct Daemon {
    child: Option<Child>,
    pub mnt: PathBuf,
    pub domains: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

pub fn is_mounted(mnt: &Path) -> bool {
    let m = fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_owned());
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(m.to_str().unwrap_or("")))
}

pub fn unmount(mnt: &Path) {
    if is_mounted(mnt) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(mnt)
            .stderr(Stdio::null())
            .status();
    }
    if is_mounted(mnt) {
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(mnt)
            .stderr(Stdio::null())
            .status();
    }
}

impl Daemon {
    /// Starts `vmsnapfs mount --foreground` with extra env (failpoints).
    pub fn start(base: &Path, env: &[(&str, &str)]) -> Daemon {
        Self::launch(base, env, false, &[])
    }

    /// Like [`Daemon::start`], run in `base` with the mount point, the
    /// definitions and the state directory given as relative paths.
    pub fn start_relative(base: &Path, env: &[(&str, &str)]) -> Daemon {
        Self::launch(base, env, true, &[])
    }

    /// Starts the daemon with extra mount options (`--allow-other`, `--group G`).
    pub fn start_with_args(base: &Path, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        Self::launch(base, env, false, args)
    }

    fn launch(base: &Path, env: &[(&str, &str)], relative: bool, args: &[&str]) -> Daemon {
        let mnt = base.join("mnt");
        let domains = base.join("domains");
        let state = base.join("state");
        fs::create_dir_all(&mnt).unwrap();
        fs::create_dir_all(&domains).unwrap();
        let log = base.join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(base.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsnapfs"));
        let arg = |p: &Path| {
            if relative {
                p.strip_prefix(base).unwrap().to_owned()
            } else {
                p.to_owned()
            }
        };
        if relative {
            cmd.current_dir(base);
        }
        cmd.arg("mount").arg(arg(&mnt));
        // In libvirt mode the domains come from libvirt, not files.
        if !args.contains(&"--libvirt") {
            cmd.arg("--domains").arg(arg(&domains));
        }
        cmd.arg("--state")
            .arg(arg(&state))
            .arg("--foreground")
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start vmsnapfs");
        let mut d = Daemon {
            child: Some(child),
            mnt,
            domains,
            state,
            log: base.join("daemon.log"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&d.mnt) {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("vmsnapfs exited at start ({st}); log:\n{}", d.log_text());
            }
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = log;
        d
    }

    /// Waits until the daemon's log contains `needle` (e.g. that it reached
    /// a failpoint), so a test acts at a known step and not after a guess.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the daemon never logged {needle:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the daemon process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits for the daemon to exit by itself (a `crash` failpoint).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Unmounts and waits for the daemon to end.
    pub fn stop(&mut self) {
        unmount(&self.mnt);
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the daemon with SIGKILL (by pid) and cleans up its mount.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        unmount(&self.mnt);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A stopped daemon no longer owns the mount point (a new one may).
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// A VM with two qcow2 disks, its definition, and a mounted daemon.
/// Field order is drop order: daemon first, then the VM, then the files.
pub struct Fixture {
    pub daemon: Daemon,
    pub vm: Vm,
    pub dir: TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.daemon.log_text();
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains(" TRACE ")).collect();
            let from = tail.len().saturating_sub(60);
            eprintln!(
                "--- daemon log (last lines) ---\n{}",
                tail[from..].join("\n")
            );
        }
    }
}

impl Fixture {
    pub fn new(tag: &str) -> Fixture {
        Self::with_env(tag, &[])
    }

    pub fn with_env(tag: &str, env: &[(&str, &str)]) -> Fixture {
        Self::with_spec(tag, &VmSpec::small("vm1"), env)
    }

    /// A fixture whose domain takes internal snapshots (`mkdir` makes an
    /// internal checkpoint), what most tests of the tree exercise.
    pub fn with_spec(tag: &str, spec: &VmSpec, env: &[(&str, &str)]) -> Fixture {
        let dir = TempDir::new(tag);
        let mut vm = Vm::start(spec, &dir.0.join("images")).expect("start VM");
        vm.policy = Some("internal".into());
        vm.write_definition(&dir.0.join("domains")).unwrap();
        let daemon = Daemon::start(&dir.0, env);
        Fixture { daemon, vm, dir }
    }

    /// A fixture whose definition sets `<snapshot policy=...>`.
    /// A running VM whose RAM is a shared file, so that QEMU refuses
    /// background-snapshot (it cannot track writes to shared memory),
    /// policy `external`, under a daemon with `env`.
    pub fn with_shared_ram(tag: &str, env: &[(&str, &str)]) -> Fixture {
        let dir = TempDir::new(tag);
        let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).unwrap();
        vm.kill();
        let ram = dir.0.join("guest-ram");
        vm.argv.extend([
            "-object".to_owned(),
            format!(
                "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
                vm.memory_mb,
                ram.display()
            ),
            "-machine".to_owned(),
            "memory-backend=ram0".to_owned(),
        ]);
        vm.launch().unwrap();
        vm.policy = Some("external".into());
        vm.write_definition(&dir.0.join("domains")).unwrap();
        let daemon = Daemon::start(&dir.0, env);
        Fixture { daemon, vm, dir }
    }

    /// Guest-physical bytes [16 MiB, +len) through `pmemsave`.
    pub fn guest_ram(&self, len: u64) -> Vec<u8> {
        let out = self.dir.0.join("ram.dump");
        let mut q = self.vm.control().unwrap();
        q.execute_raw(
            "pmemsave",
            serde_json::json!({"val": 16u64 << 20, "size": len, "filename": out}),
        )
        .unwrap();
        let data = fs::read(&out).unwrap();
        let _ = fs::remove_file(&out);
        data
    }

    /// Overwrites guest RAM at 16 MiB with zeros through /proc/PID/mem.
    pub fn scribble_ram(&self, len: usize) {
        use std::io::{Seek, SeekFrom};
        let mut q = self.vm.control().unwrap();
        let out = q.hmp(&format!("gpa2hva 0x{:x}", 16u64 << 20)).unwrap();
        let pid = q.peer_pid().unwrap();
        drop(q);
        let hva = u64::from_str_radix(out.rsplit("0x").next().unwrap().trim(), 16).unwrap();
        let mut mem = fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .unwrap();
        mem.seek(SeekFrom::Start(hva)).unwrap();
        mem.write_all(&vec![0u8; len]).unwrap();
    }

    pub fn with_policy(tag: &str, policy: &str, env: &[(&str, &str)]) -> Fixture {
        let dir = TempDir::new(tag);
        let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
        vm.policy = Some(policy.into());
        vm.write_definition(&dir.0.join("domains")).unwrap();
        let daemon = Daemon::start(&dir.0, env);
        Fixture { daemon, vm, dir }
    }

    /// `<mnt>/vm1/<rel>`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.daemon.mnt.join("vm1").join(rel)
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    /// Snapshot names as `ls` shows them.
    pub fn ls(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path(""))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }

    /// Writes a revert request; returns the errno on failure.
    pub fn revert(&self, snap: &str, request: &str) -> Result<(), i32> {
        write_file(&self.path(&format!("{snap}/revert")), request.as_bytes())
    }

    /// Restarts the daemon (with other failpoints).
    pub fn restart_daemon(&mut self, env: &[(&str, &str)]) {
        self.daemon.stop();
        self.daemon = Daemon::start(&self.dir.0, env);
    }

    /// The files in the domain's journal (intents not finished), sorted.
    pub fn journal(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.daemon.state.join("vm1/journal"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    /// After a crash injected at `point`: waits (up to `within`) for the
    /// daemon to die, restarts it so that recovery runs, and asserts that
    /// recovery finished every intent.
    pub fn recover_after_crash(&mut self, point: &str, within: Duration) {
        assert!(
            self.daemon.wait_exit(within),
            "{point}: daemon did not crash"
        );
        self.daemon.kill9();
        self.restart_daemon(&[]);
        let journal = self.journal();
        assert!(
            journal.is_empty(),
            "{point}: journal not empty: {journal:?}\n{}",
            self.read(".log")
        );
    }

    /// Stops the VM as its guest would power off: its disks flushed,
    /// QEMU told to quit; waits until the daemon sees it shut off.
    pub fn quit_vm(&self) {
        for d in &self.vm.disks {
            self.vm.qemu_io(&d.target, "flush").unwrap();
        }
        let mut q = self.vm.control().unwrap();
        let _ = q.execute_raw("quit", serde_json::json!({}));
        drop(q);
        self.wait_state("shutoff");
    }

    /// Waits until `.state` says `want`.
    pub fn wait_state(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.read(".state");
            if s.trim() == want {
                return;
            }
            assert!(Instant::now() < deadline, ".state is {s:?}, want {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every file of `tests/corpus/<dir>/`, by name (sorted), with its bytes.
pub fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|path| {
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The names of the entries of `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs restic on the repository `repo` (password `test`, its cache
/// beside the repository), asserts it succeeded and returns its stdout.
pub fn restic(repo: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("restic")
        .args(args)
        .env("RESTIC_PASSWORD", "test")
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_CACHE_DIR", repo.with_extension("cache"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restic {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Writes `data` in one write(2) call; returns the errno on failure.
pub fn write_file(path: &Path, data: &[u8]) -> Result<(), i32> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    f.write_all(data)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// errno of an io::Result.
pub fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected a failure")
        .raw_os_error()
        .unwrap_or(-1)
}

/// The internal snapshot tags of an image (`qemu-img snapshot -l -U`).
pub fn image_tags(image: &Path) -> Vec<String> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "-f", "qcow2", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// True when `data[off..off+len]` is all `byte`.
pub fn all_bytes(data: &[u8], off: usize, len: usize, byte: u8) -> bool {
    data.len() >= off + len && data[off..off + len].iter().all(|b| *b == byte)
}

/// The recorded active layer of disk `d` of vm1 (the defined image while
/// no external snapshot changed it).
pub fn active_layer(fx: &Fixture, d: &str) -> PathBuf {
    let bytes = fs::read(fx.daemon.state.join("vm1/layers")).unwrap_or_default();
    vmsnapfs::store::meta::parse_layers(&bytes)
        .expect("a readable layers record")
        .remove(d)
        .map(|l| l.path)
        .unwrap_or_else(|| {
            fx.vm
                .disks
                .iter()
                .find(|x| x.target == d)
                .unwrap()
                .image
                .clone()
        })
}

/// Every qcow2 image beside vm1's disks is needed (in the chain of an
/// active layer or of a snapshot's `images/` link) and passes
/// `qemu-img check`.
pub fn check_no_orphans(fx: &Fixture) {
    let mut needed = std::collections::BTreeSet::new();
    let mut roots: Vec<PathBuf> = ["vda", "vdb"].iter().map(|d| active_layer(fx, d)).collect();
    for s in fx.ls() {
        for d in ["vda", "vdb"] {
            if let Ok(l) = fs::read_link(fx.path(&format!("{s}/images/{d}"))) {
                roots.push(l);
            }
        }
    }
    for r in roots {
        for img in vmsnapfs::backend::qemu_img::chain(&r, "qcow2").unwrap() {
            needed.insert(fs::canonicalize(&img.path).unwrap());
        }
    }
    let dir = fx.vm.disks[0].image.parent().unwrap();
    for e in fs::read_dir(dir).unwrap() {
        let f = fs::canonicalize(e.unwrap().path()).unwrap();
        if !f.to_string_lossy().ends_with(".qcow2") {
            continue;
        }
        assert!(
            needed.contains(&f),
            "orphan image {}\n{}",
            f.display(),
            fx.read(".log")
        );
        let st = Command::new("qemu-img")
            .args(["check", "-U", "-q"])
            .arg(&f)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img check {}", f.display());
    }
}

/// A user (and, if asked, a group it belongs to) made for one test with
/// useradd/groupadd, removed on drop: the unprivileged attacker.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub group: Option<(String, u32)>,
}

impl TestUser {
    /// `tag` keeps names unique across the tests of one run (<= 6 chars).
    pub fn new(tag: &str, with_group: bool) -> TestUser {
        let name = format!("vs{tag}{}", std::process::id() % 100000);
        let group = with_group.then(|| {
            let g = format!("{name}g");
            let _ = Command::new("groupdel")
                .arg(&g)
                .stderr(Stdio::null())
                .status();
            let st = Command::new("groupadd").arg(&g).status().unwrap();
            assert!(st.success(), "groupadd {g}");
            let gid = id_of("getent", &["group", &g]);
            (g, gid)
        });
        let _ = Command::new("userdel")
            .arg(&name)
            .stderr(Stdio::null())
            .status();
        let mut cmd = Command::new("useradd");
        cmd.args(["-M", "-N", "-s", "/bin/sh"]);
        if let Some((g, _)) = &group {
            cmd.args(["-G", g]);
        }
        let st = cmd.arg(&name).status().unwrap();
        assert!(st.success(), "useradd {name}");
        let uid = id_of("getent", &["passwd", &name]);
        TestUser { name, uid, group }
    }

    /// The group's gid (a user made with a group).
    pub fn gid(&self) -> u32 {
        self.group.as_ref().expect("a user with a group").1
    }

    /// Runs `sh -c script` as this user (with its groups), `stdin` fed in.
    pub fn sh(&self, script: &str, stdin: &[u8]) -> std::process::Output {
        let mut child = Command::new("runuser")
            .args(["-u", &self.name, "--", "sh", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin);
        child.wait_with_output().unwrap()
    }
}

/// The third field of a getent line (uid or gid).
fn id_of(cmd: &str, args: &[&str]) -> u32 {
    let out = Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or_else(|| panic!("{cmd} {args:?}"))
}

impl Drop for TestUser {
    fn drop(&mut self) {
        remove_user(&self.name);
        if let Some((g, _)) = &self.group {
            let _ = Command::new("groupdel").arg(g).status();
        }
    }
}

/// The text strerror(3) gives for `errno` (what a failing tool prints).
pub fn strerror(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno)
        .to_string()
        .split(" (os error")
        .next()
        .unwrap()
        .to_owned()
}

/// Asserts that a command failed and printed the text of `errno`.
pub fn assert_failed_with(out: &std::process::Output, errno: i32, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&strerror(errno)),
        "{what}: wanted {}, got status {:?}, stderr {stderr}",
        strerror(errno),
        out.status
    );
}

/// Creates an empty qcow2 image of `size` (qemu-img's spelling, e.g. "16M").
pub fn create_qcow2(path: &Path, size: &str) {
    vmsnapfs::backend::qemu_img::run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path.to_str().unwrap(),
        size,
    ])
    .unwrap();
}

/// Removes a test user. `userdel` refuses while a process of the user
/// still exits (killed by its test, not reaped yet): retry for a few
/// seconds, then force, so no test user is left behind.
pub fn remove_user(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new("userdel").arg(name).output();
        let gone = Command::new("id")
            .arg(name)
            .output()
            .is_ok_and(|o| !o.status.success());
        if gone || out.is_err() {
            return;
        }
        if Instant::now() >= deadline {
            let _ = Command::new("userdel").arg("-f").arg(name).output();
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
