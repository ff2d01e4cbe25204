//! Attacks on what the daemon runs and opens as root: guest bytes that
//! look like an image format, backing files an image owner chose, monitor
//! peers that are not the QEMU they claim to be, names that break option
//! strings, secrets in definitions. Each must fail safely: no hang, no
//! leak, a clear errno and a `.log` line where something is refused.

mod common;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// A VM, its definition (policy `policy`) and a mounted daemon; dropped
/// daemon first.
struct Setup {
    daemon: Daemon,
    vm: Vm,
    dir: TempDir,
}

impl Setup {
    fn new(tag: &str, spec: &VmSpec, policy: &str) -> Setup {
        let dir = TempDir::new(tag);
        let mut vm = Vm::start(spec, &dir.0.join("images")).expect("start VM");
        vm.policy = Some(policy.into());
        vm.write_definition(&dir.0.join("domains")).unwrap();
        let daemon = Daemon::start(&dir.0, &[]);
        Setup { daemon, vm, dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.daemon.mnt.join("vm1").join(rel)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path(".log")).unwrap_or_default()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- .log ---\n{}", self.log());
            let log = self.daemon.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(40);
            eprintln!("--- daemon log ---\n{}", lines[from..].join("\n"));
        }
    }
}

/// Runs `f` on another thread; fails the test when it takes longer than
/// `limit` (a hang is the attack succeeding).
fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} hung for {limit:?}"))
}

/// A qcow2 header (the whole small file) naming `backing` as its
/// backing file of format `format` (`None`: no format recorded).
fn qcow2_header(dir: &Path, name: &str, backing: &str, format: Option<&str>) -> Vec<u8> {
    let p = dir.join(format!("{name}.made.qcow2"));
    let st = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-F",
            format.unwrap_or("raw"),
        ])
        .arg("-b")
        .arg(backing)
        .arg(&p)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img create {name}");
    let mut bytes = fs::read(&p).unwrap();
    fs::remove_file(&p).unwrap();
    if format.is_none() {
        // Rename the backing-format header extension to one QEMU skips.
        let magic = [0xe2, 0x79, 0x2a, 0xca];
        let at = bytes[..4096]
            .windows(4)
            .position(|w| w == magic)
            .expect("backing format extension");
        bytes[at..at + 4].copy_from_slice(b"none");
    }
    bytes
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// True when some process has `fifo` open for reading (a write-side
/// open without O_NONBLOCK would then succeed at once).
fn fifo_has_reader(fifo: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .is_ok()
}

/// A root-only secret: a 0700 directory holding a 0600 file of 0x5a bytes.
fn secret(dir: &Path) -> PathBuf {
    let d = dir.join("rootonly");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
    let f = d.join("secret");
    fs::write(&f, vec![0x5a; 1 << 20]).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    f
}

/// A raw disk's guest writes qcow2 headers whose backing files are a
/// root-only host file, a FIFO and an NBD server of its choosing. The
/// daemon never probes a raw image: each frozen view returns the guest's
/// own bytes, nothing opens the FIFO, nothing connects to the server.
#[test]
fn guest_bytes_that_look_like_qcow2_are_only_bytes() {
    let mut spec = VmSpec::small("vm1");
    spec.raw = vec!["vda".into()];
    let s = Setup::new("sec-rawprobe", &spec, "external");
    let secret = secret(&s.dir.0);
    let fifo = s.dir.0.join("fifo");
    mkfifo(&fifo);
    let nbd = TcpListener::bind("127.0.0.1:0").unwrap();
    nbd.set_nonblocking(true).unwrap();
    let port = nbd.local_addr().unwrap().port();
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"inet","host":"127.0.0.1","port":"{port}"}}}}}}"#
    );
    let attacks = [
        ("secret", secret.to_string_lossy().into_owned(), Some("raw")),
        ("fifo", fifo.to_string_lossy().into_owned(), Some("raw")),
        ("nbd", json, Some("raw")),
        ("probe", secret.to_string_lossy().into_owned(), None),
    ];
    for (name, backing, format) in &attacks {
        let header = qcow2_header(&s.dir.0, name, backing, *format);
        let src = s.dir.0.join(format!("{name}.hdr"));
        fs::write(&src, &header).unwrap();
        s.vm.qemu_io(
            "vda",
            &format!("write -s {} 0 {}", src.display(), header.len()),
        )
        .unwrap();
        let snap = format!("after-{name}");
        let p = s.path(&snap);
        bounded("mkdir", Duration::from_secs(120), move || fs::create_dir(p))
            .unwrap_or_else(|e| panic!("mkdir {snap}: {e}"));
        let view = s.path(&format!("{snap}/disks/vda"));
        let data = bounded("reading the view", Duration::from_secs(120), move || {
            fs::read(view)
        })
        .unwrap_or_else(|e| panic!("read {snap}/disks/vda: {e}"));
        assert_eq!(data.len(), 64 << 20, "{name}: the raw disk's size");
        assert_eq!(
            &data[..header.len()],
            &header[..],
            "{name}: the guest's bytes"
        );
        assert!(
            !data.windows(4096).any(|w| w.iter().all(|b| *b == 0x5a)),
            "{name}: the view served the root-only host file"
        );
    }
    assert!(!fifo_has_reader(&fifo), "something opened the FIFO");
    assert!(
        nbd.accept().is_err(),
        "something connected to the guest's NBD server"
    );
    // Offline too: a stopped domain's snapshot of the same disk.
    let mut q = s.vm.control().unwrap();
    let _ = q.execute_raw("quit", serde_json::json!({}));
    drop(q);
    let state = s.path(".state");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fs::read_to_string(&state).unwrap() != "shutoff\n" {
        assert!(std::time::Instant::now() < deadline, "VM did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = s.path("offline");
    bounded("offline mkdir", Duration::from_secs(120), move || {
        fs::create_dir(p)
    })
    .unwrap();
    for snap in ["offline", "after-probe"] {
        let view = s.path(&format!("{snap}/disks/vda"));
        let data = bounded(
            "reading an offline view",
            Duration::from_secs(120),
            move || fs::read(view),
        )
        .unwrap();
        assert!(!data.windows(4096).any(|w| w.iter().all(|b| *b == 0x5a)));
        assert_eq!(&data[..4], b"QFI\xfb", "{snap}: the guest's bytes");
    }
    assert!(!fifo_has_reader(&fifo));
    assert!(nbd.accept().is_err());
}

/// The owner of a stopped domain's qcow2 images points their backing
/// files at a FIFO, at an NBD server, at a root-only file without a
/// stated format. Every view over such a chain is refused (EIO) at once
/// with a `.log` line; nothing hangs, opens the FIFO or connects out.
#[test]
fn backing_files_an_image_owner_chose_are_refused() {
    let dir = TempDir::new("sec-backing");
    let images = dir.0.join("images");
    fs::create_dir_all(&images).unwrap();
    let secret = secret(&dir.0);
    let fifo = dir.0.join("fifo");
    mkfifo(&fifo);
    let nbd = TcpListener::bind("127.0.0.1:0").unwrap();
    nbd.set_nonblocking(true).unwrap();
    let port = nbd.local_addr().unwrap().port();
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"inet","host":"127.0.0.1","port":"{port}"}}}}}}"#
    );
    let disks = [
        ("vda", fifo.to_string_lossy().into_owned(), Some("raw")),
        ("vdb", json, Some("raw")),
        ("vdc", secret.to_string_lossy().into_owned(), None),
        ("vdd", format!("nbd:127.0.0.1:{port}"), Some("raw")),
    ];
    let mut xml = String::from(
        "<domain type='kvm'>\n  <name>vm1</name>\n  <monitor path='/nonexistent/vm1.qmp'/>\n  <devices>\n",
    );
    for (target, backing, format) in &disks {
        let img = images.join(format!("{target}.qcow2"));
        fs::write(&img, qcow2_header(&dir.0, target, backing, *format)).unwrap();
        xml += &format!(
            "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='{target}' bus='virtio'/></disk>\n",
            img.display()
        );
    }
    xml += "  </devices>\n  <snapshot policy='external'/>\n</domain>\n";
    fs::create_dir_all(dir.0.join("domains")).unwrap();
    fs::write(dir.0.join("domains/vm1.xml"), xml).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    let vm = daemon.mnt.join("vm1");
    assert_eq!(fs::read_to_string(vm.join(".state")).unwrap(), "shutoff\n");
    let p = vm.join("s1");
    bounded("mkdir", Duration::from_secs(120), move || fs::create_dir(p)).unwrap();
    for (target, _, _) in &disks {
        let view = vm.join(format!("s1/disks/{target}"));
        let r = bounded("opening the view", Duration::from_secs(120), move || {
            fs::read(view)
        });
        assert_eq!(errno(r), libc::EIO, "disks/{target}");
    }
    let log = fs::read_to_string(vm.join(".log")).unwrap();
    for why in [
        "is not a regular file",
        "which is not a plain file path",
        "without a backing format",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("refused (EIO)") && l.contains("of \"s1\"") && l.contains(why)),
            "no .log line saying {why:?}:\n{log}"
        );
    }
    assert!(!fifo_has_reader(&fifo), "something opened the FIFO");
    assert!(
        nbd.accept().is_err(),
        "something connected to the NBD server"
    );
    drop(daemon);
}

/// An unprivileged user made for one test, removed on drop.
struct User {
    name: String,
    uid: u32,
    gid: u32,
}

impl User {
    fn new(tag: &str) -> User {
        let name = format!("vsf{tag}{}", std::process::id() % 100_000);
        let _ = Command::new("userdel").arg(&name).output();
        let st = Command::new("useradd")
            .args(["-M", "-N", "-s", "/usr/sbin/nologin"])
            .arg(&name)
            .status()
            .unwrap();
        assert!(st.success(), "useradd {name}");
        let id = |flag: &str| -> u32 {
            let o = Command::new("id").arg(flag).arg(&name).output().unwrap();
            String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        User { name, uid, gid }
    }

    /// A command run as this user (setpriv execs it: its pid is the
    /// program's own).
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg(program);
        c
    }

    /// A directory owned by this user.
    fn dir(&self, p: &Path) -> PathBuf {
        fs::create_dir_all(p).unwrap();
        std::os::unix::fs::chown(p, Some(self.uid), Some(self.gid)).unwrap();
        p.to_owned()
    }
}

impl Drop for User {
    fn drop(&mut self) {
        remove_user(&self.name);
    }
}

/// A child process killed by pid on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QMP server in Python: writes its uid to a marker file when it
/// starts, then answers like a running QEMU whose disks are the images
/// given as `target=path`.
const FAKE_QMP: &str = r#"
import json, os, socket, sys
marker, path, disks = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(marker, "a") as f:
    f.write("%d\n" % os.getuid())
try:
    os.unlink(path)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(4)
while True:
    c, _ = s.accept()
    f = c.makefile("rwb")
    f.write(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}\n')
    f.flush()
    for line in f:
        try:
            m = json.loads(line)
        except ValueError:
            break
        cmd, ret = m.get("execute"), {}
        if cmd == "query-status":
            ret = {"status": "running", "running": True}
        elif cmd == "query-block":
            ret = []
            for d in disks:
                t, p = d.split("=", 1)
                ret.append({"device": t, "qdev": "/machine/peripheral/%s-dev/virtio-backend" % t,
                            "inserted": {"node-name": t + "-fmt",
                                         "image": {"filename": p, "format": "qcow2"}}})
        out = {"return": ret}
        if "id" in m:
            out["id"] = m["id"]
        f.write((json.dumps(out) + "\n").encode())
        f.flush()
        if cmd == "quit":
            sys.exit(0)
    c.close()
"#;

/// Waits until `file` contains `needle`.
fn wait_for(file: &Path, needle: &str) {
    wait_count(file, needle, 1)
}

/// Waits until `file` contains `needle` `n` times.
fn wait_count(file: &Path, needle: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = fs::read_to_string(file).unwrap_or_default();
        if text.matches(needle).count() >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never said {needle:?}:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An unprivileged user owns the monitor socket of a domain with no
/// `<commandline>` and serves QMP from a Python script there, also under
/// a binary named like QEMU. The daemon records neither command line
/// (the `.log` says why), and a revert that must start QEMU is refused
/// before it stops anything: the script never runs as root.
#[test]
fn a_monitor_peer_that_is_not_qemu_never_runs_as_root() {
    let dir = TempDir::new("sec-peer");
    let user = User::new("peer");
    let home = user.dir(&dir.0.join("user"));
    let images = dir.0.join("images");
    fs::create_dir_all(&images).unwrap();
    let mut xml = String::from("<domain type='kvm'>\n  <name>vm1</name>\n");
    let sock = home.join("vm1.qmp");
    xml += &format!("  <monitor path='{}'/>\n  <devices>\n", sock.display());
    let mut disks = Vec::new();
    for t in ["vda", "vdb"] {
        let img = images.join(format!("{t}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success());
        xml += &format!(
            "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='{t}' bus='virtio'/></disk>\n",
            img.display()
        );
        disks.push(format!("{t}={}", img.display()));
    }
    xml += "  </devices>\n  <snapshot policy='internal'/>\n</domain>\n";
    fs::create_dir_all(dir.0.join("domains")).unwrap();
    fs::write(dir.0.join("domains/vm1.xml"), xml).unwrap();
    let script = home.join("qmp.py");
    fs::write(&script, FAKE_QMP).unwrap();
    // The same script behind a copy of the interpreter named like QEMU.
    let disguised = home.join("qemu-system-x86_64");
    fs::copy(fs::canonicalize("/usr/bin/python3").unwrap(), &disguised).unwrap();
    for p in [&script, &disguised] {
        std::os::unix::fs::chown(p, Some(user.uid), Some(user.gid)).unwrap();
    }
    let marker = home.join("marker");
    let daemon = Daemon::start(&dir.0, &[]);
    let vm = daemon.mnt.join("vm1");
    let rounds = [
        ("python3", "/usr/bin/python3"),
        ("disguised", disguised.to_str().unwrap()),
    ];
    for (n, (round, program)) in rounds.into_iter().enumerate() {
        // The user's server answers on the monitor socket for a while.
        let mut c = user.command(program);
        c.arg(&script).arg(&marker).arg(&sock).args(&disks);
        let fake = Killed(c.spawn().unwrap());
        wait_for(&vm.join(".state"), "running");
        wait_count(&vm.join(".log"), "is not recorded", n + 1);
        drop(fake);
        let _ = fs::remove_file(&sock);
        wait_for(&vm.join(".state"), "shutoff");
        // Then a revert of the stopped domain that must start QEMU.
        let snap = format!("s{n}");
        fs::create_dir(vm.join(&snap)).unwrap();
        let r = common::write_file(&vm.join(format!("{snap}/revert")), b"running");
        assert_eq!(
            r,
            Err(libc::EOPNOTSUPP),
            "{round}: the revert must be refused"
        );
        let log = fs::read_to_string(vm.join(".log")).unwrap();
        assert!(log.contains("no command line is known"), "{round}:\n{log}");
        assert!(
            fs::read_to_string(&marker)
                .unwrap()
                .lines()
                .all(|l| l == user.uid.to_string()),
            "{round}: the script ran as another user"
        );
    }
    let log = fs::read_to_string(vm.join(".log")).unwrap();
    assert!(log.contains("not a QEMU system emulator"), "{log}");
    assert!(log.contains("not owned by root"), "{log}");
    assert!(
        !daemon.state.join("vm1/argv").exists(),
        "a command line was recorded"
    );
    assert_eq!(
        fs::read_to_string(&marker).unwrap().lines().count(),
        2,
        "the script ran only the two times the user started it"
    );
    drop(daemon);
}

/// Secrets of a definition's command line and XML are shown to root
/// only, through `.domain.xml` and `snapshot.xml` alike, and the state
/// directory (which holds them unredacted) is root's alone, also when an
/// earlier run left it open.
#[test]
fn secrets_are_hidden_from_other_users_and_the_state_dir_is_private() {
    let dir = TempDir::new("sec-secrets");
    let vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
    let def = vm.write_definition(&dir.0.join("domains")).unwrap();
    let secrets = [
        ("<arg value='-object'/><arg value='secret,id=s0,data=TOPSECRET-A'/>", "TOPSECRET-A"),
        (
            "<arg value='-drive'/><arg value='file=/x/y.img,format=raw,if=none,id=d9,file.password-secret=TOPSECRET-B'/>",
            "TOPSECRET-B",
        ),
        ("<arg value='-vnc'/><arg value=':9,password=TOPSECRET-C'/>", "TOPSECRET-C"),
        (
            r#"<arg value='-blockdev'/><arg value='{"driver":"http","node-name":"h","url":"https://bob:TOPSECRET-D@example.com/x"}'/>"#,
            "TOPSECRET-D",
        ),
        (
            r#"<arg value='-blockdev'/><arg value='{"driver":"qcow2","node-name":"q","file":"h","encrypt":{"format":"luks","key-secret":"TOPSECRET-E"}}'/>"#,
            "TOPSECRET-E",
        ),
    ];
    let mut xml = fs::read_to_string(&def).unwrap();
    let args: String = secrets.iter().map(|(a, _)| *a).collect();
    xml = xml.replace("  </commandline>", &format!("    {args}\n  </commandline>"));
    xml = xml.replace(
        "</devices>",
        "  <graphics type='vnc' passwd='TOPSECRET-F'/>\n    <disk type='network' device='cdrom'>\
         <source protocol='https' name='/iso'><cookies><cookie name='s'>TOPSECRET-G</cookie></cookies>\
         </source><target dev='sdz'/></disk>\n  </devices>",
    );
    fs::write(&def, &xml).unwrap();
    // A state directory an earlier version left readable by all.
    let old = dir.0.join("state/vm1");
    fs::create_dir_all(&old).unwrap();
    fs::set_permissions(dir.0.join("state"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(old.join("log"), "an old line\n").unwrap();
    fs::set_permissions(old.join("log"), fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = Daemon::start_with_args(&dir.0, &[], &["--allow-other"]);
    let user = User::new("sec");
    let mnt = daemon.mnt.join("vm1");
    fs::create_dir(mnt.join("s1")).unwrap();
    let read_as = |who: Option<&User>, file: &str| -> String {
        let path = mnt.join(file);
        let out = match who {
            Some(u) => u.command("/bin/cat").arg(&path).output().unwrap(),
            None => Command::new("cat").arg(&path).output().unwrap(),
        };
        assert!(
            out.status.success(),
            "cat {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for file in [".domain.xml", "s1/snapshot.xml"] {
        let root = read_as(None, file);
        let other = read_as(Some(&user), file);
        for (_, s) in &secrets {
            assert!(root.contains(s), "root sees {s} in {file}");
            assert!(
                !other.contains(s),
                "{s} shown to another user in {file}:\n{other}"
            );
        }
        for s in ["TOPSECRET-F", "TOPSECRET-G"] {
            assert!(root.contains(s), "root sees {s} in {file}");
            assert!(
                !other.contains(s),
                "{s} shown to another user in {file}:\n{other}"
            );
        }
        assert!(other.contains("secret,id=s0,data=***"), "{other}");
        assert!(
            other.contains("-vnc"),
            "the rest of the command line is shown"
        );
    }
    // Root's alone: every directory 0700, every file 0600 or less.
    fn walk(p: &Path, bad: &mut Vec<String>) {
        let m = fs::symlink_metadata(p).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        if m.is_dir() {
            if mode != 0o700 {
                bad.push(format!("{} {mode:o}", p.display()));
            }
            for e in fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), bad);
            }
        } else if m.is_file() && mode & 0o077 != 0 {
            bad.push(format!("{} {mode:o}", p.display()));
        }
    }
    let mut bad = Vec::new();
    walk(&daemon.state, &mut bad);
    assert!(bad.is_empty(), "open to others: {bad:?}");
    let out = user
        .command("/bin/cat")
        .arg(old.join("log"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "another user reads the state directory"
    );
    drop(daemon);
    drop(vm);
}

/// A snapshot named with a comma (and other characters QEMU's option
/// strings treat specially) gets overlays whose paths hold them; a revert
/// that starts QEMU again on those layers escapes them in the command
/// line, and the guest runs on the snapshot's disks.
#[test]
fn snapshot_names_with_commas_survive_a_restart() {
    let fx = Fixture::with_policy("sec-comma", "external", &[]);
    fx.vm.qemu_io("vda", "write -P 0x11 0 1M").unwrap();
    fs::create_dir(fx.path("pre,upgrade")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x22 0 1M").unwrap();
    fs::create_dir(fx.path("x,,y=z:w")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x33 0 1M").unwrap();
    let before = fx.vm.current_pid();
    for (snap, byte) in [("pre,upgrade", 0x11u8), ("x,,y=z:w", 0x22)] {
        fx.revert(snap, "running")
            .unwrap_or_else(|e| panic!("revert {snap}: errno {e}\n{}", fx.read(".log")));
        fx.wait_state("running");
        assert_ne!(fx.vm.current_pid(), before, "{snap}: a new QEMU process");
        let data = fx.vm.read_disk("vda").unwrap();
        assert!(
            all_bytes(&data, 0, 1 << 20, byte),
            "{snap}: the guest runs on its disks"
        );
        let view = fs::read(fx.path(&format!("{snap}/disks/vda"))).unwrap();
        assert!(
            all_bytes(&view, 0, 1 << 20, byte),
            "{snap}: its frozen view"
        );
    }
    let layer = active_layer(&fx, "vda");
    assert!(layer.to_string_lossy().contains(','), "{}", layer.display());
}

/// The uid a process runs as, from `/proc/PID/status`.
fn uid_of(pid: i32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// A real QEMU that an unprivileged user started from a directory of
/// theirs (no `<commandline>` in the definition), with a daemon mounted
/// over it under `policy`.
struct UserVm {
    daemon: Daemon,
    first: Killed,
    control: PathBuf,
    home: PathBuf,
    user: User,
    _dir: TempDir,
}

impl UserVm {
    fn start(tag: &str, policy: &str) -> UserVm {
        let dir = TempDir::new(tag);
        let user = User::new("qemu");
        let home = user.dir(&dir.0.join("user"));
        let mut xml = String::from("<domain type='kvm'>\n  <name>vm1</name>\n");
        let monitor = home.join("vm1.qmp");
        let control = home.join("vm1.control.qmp");
        xml += &format!("  <monitor path='{}'/>\n  <devices>\n", monitor.display());
        let mut argv: Vec<String> = [
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "vm1",
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-m",
            "64",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "none",
        ]
        .map(String::from)
        .to_vec();
        for t in ["vda", "vdb"] {
            let img = home.join(format!("{t}.qcow2"));
            create_qcow2(&img, "16M");
            std::os::unix::fs::chown(&img, Some(user.uid), Some(user.gid)).unwrap();
            xml += &format!(
                "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{t}' bus='virtio'/></disk>\n",
                img.display()
            );
            argv.push("-drive".into());
            argv.push(format!(
                "file={},format=qcow2,if=none,id={t},node-name={t}-fmt",
                img.display()
            ));
            argv.push("-device".into());
            argv.push(format!("virtio-blk-pci,drive={t},id={t}-dev"));
        }
        for s in [&monitor, &control] {
            argv.push("-qmp".into());
            argv.push(format!("unix:{},server=on,wait=off", s.display()));
        }
        xml += &format!("  </devices>\n  <snapshot policy='{policy}'/>\n</domain>\n");
        fs::create_dir_all(dir.0.join("domains")).unwrap();
        fs::write(dir.0.join("domains/vm1.xml"), xml).unwrap();
        let mut c = user.command(&argv[0]);
        c.args(&argv[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let first = Killed(c.spawn().unwrap());
        let daemon = Daemon::start(&dir.0, &[]);
        wait_for(&daemon.mnt.join("vm1/.state"), "running");
        UserVm {
            daemon,
            first,
            control,
            home,
            user,
            _dir: dir,
        }
    }

    fn vm(&self) -> PathBuf {
        self.daemon.mnt.join("vm1")
    }

    /// Reverts to `snap` (errno and `.log` on failure) and returns the
    /// QEMU that runs afterwards, killed on drop.
    fn revert(&self, snap: &str, request: &str) -> Killed2 {
        let vm = self.vm();
        common::write_file(&vm.join(snap).join("revert"), request.as_bytes()).unwrap_or_else(|e| {
            panic!(
                "revert: errno {e}\n{}",
                fs::read_to_string(vm.join(".log")).unwrap()
            )
        });
        wait_for(&vm.join(".state"), "running");
        let q =
            vmsnapfs::backend::qmp::Qmp::connect(&self.control, Duration::from_secs(10)).unwrap();
        let pid = q.peer_pid().unwrap();
        Killed2(pid)
    }
}

/// A real QEMU that an unprivileged user started is recorded with its
/// credentials, and a revert that starts QEMU again runs it as that
/// user, not as root.
#[test]
fn a_users_qemu_is_restarted_as_that_user() {
    let u = UserVm::start("sec-userqemu", "disk-only");
    fs::create_dir(u.vm().join("s1")).unwrap();
    let recorded = fs::read_to_string(u.daemon.state.join("vm1/argv")).unwrap();
    assert!(
        recorded.starts_with(&format!("{} {} ", u.user.uid, u.user.gid)),
        "recorded owner: {recorded:?}"
    );
    let restarted = u.revert("s1", "running force discard");
    assert_ne!(restarted.0 as u32, u.first.0.id(), "a new QEMU process");
    assert_eq!(
        uid_of(restarted.0),
        u.user.uid,
        "QEMU was restarted as root"
    );
    drop(restarted);
}

/// A user's QEMU (not root) saves the RAM of a live checkpoint into the
/// root-only memory file vmsnapfs made, and a revert to it loads that
/// file into a new QEMU of the same user: both through descriptors
/// vmsnapfs hands over, since that user may not open the file by name.
#[test]
fn a_users_qemu_saves_and_loads_a_root_only_memory_file() {
    let u = UserVm::start("sec-usermem", "external");
    fs::create_dir(u.vm().join("c1")).unwrap_or_else(|e| {
        panic!(
            "mkdir: {e}\n{}",
            fs::read_to_string(u.vm().join(".log")).unwrap()
        )
    });
    assert_eq!(
        fs::read_to_string(u.vm().join("c1/state")).unwrap().trim(),
        "running"
    );
    let memory = u.home.join("vm1.c1.memory");
    let m = fs::symlink_metadata(&memory).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o777),
        (0, 0o400),
        "memory file owner/mode"
    );
    // A 64 MiB guest without an OS is mostly zero pages: under 1 MiB.
    assert!(
        m.len() > 100_000,
        "memory file holds RAM: {} bytes",
        m.len()
    );
    let restarted = u.revert("c1", "running force discard");
    assert_eq!(
        uid_of(restarted.0),
        u.user.uid,
        "QEMU was restarted as root"
    );
    let log = fs::read_to_string(u.vm().join(".log")).unwrap();
    assert!(log.contains("revert \"c1\""), "{log}");
    drop(restarted);
}

/// A process (not our child) killed by pid on drop.
struct Killed2(i32);

impl Drop for Killed2 {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the pid this test found on its own socket.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
        vmsnapfs::backend::process::wait_exit(self.0, Duration::from_secs(10));
    }
}
