//! A real Linux guest for tests: Debian bookworm's kernel, busybox and
//! qemu-ga in an initramfs, built from Debian packages by
//! `tests/guest/build-guest.sh` the first time a test needs it and cached
//! under the cargo target dir (one build per machine and script version;
//! test processes take turns on a lock and see only a finished build).
//!
//! The guest boots under TCG (a Linux guest does not boot under KVM on
//! every machine kind), mounts its ext4 `vda` on /mnt and its vfat `vdb`
//! on /fat, runs qemu-ga on the virtio-serial port
//! `org.qemu.guest_agent.0`, and writes numbered files without end: each
//! `/mnt/data/fN` is fsynced (with its directory) before the console says
//! `WROTE N` (see [`file_content`]). The guest's kernel writes no metadata
//! back by itself, so a killed guest leaves a journal that matters.
//! `/mnt/tree` holds files of several owners and modes.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::prelude::*;
use md5::{Digest, Md5};
use serde_json::{json, Value};

use super::{Daemon, Fixture, TempDir, Vm, VmSpec};

/// The virtio-serial port name qemu-ga listens on (libvirt's spelling).
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// How long a guest may take to boot to its first `WROTE` under TCG on a
/// loaded machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

const BUILD_SCRIPT: &str = include_str!("../guest/build-guest.sh");

/// The built guest (kernel, initramfs, base disks), built once per machine
/// and per version of the build script.
pub fn guest_build() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&root).unwrap();
    let name = format!("real-guest-{:016x}", fnv1a(BUILD_SCRIPT.as_bytes()));
    let done = root.join(&name);
    if done.join("kernel-version").exists() {
        return done;
    }
    // One builder at a time, across test processes and threads: each
    // opens the lock file itself (flock is per open file).
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join("real-guest.lock"))
        .unwrap();
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    if done.join("kernel-version").exists() {
        return done;
    }
    let tmp = root.join(format!("{name}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    let script = root.join(format!("{name}.sh"));
    fs::write(&script, BUILD_SCRIPT).unwrap();
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&tmp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the test guest failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = fs::remove_dir_all(&done);
    fs::rename(&tmp, &done).unwrap();
    eprintln!("built the test guest in {:?}", started.elapsed());
    // Builds of earlier versions of the script are not needed any more.
    for e in fs::read_dir(&root).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("real-guest-") && n != name {
            let _ = fs::remove_dir_all(e.path());
            let _ = fs::remove_file(e.path());
        }
    }
    drop(lock);
    done
}

/// FNV-1a, to name the cache after the build script's content.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The body of the guest's file N: the line `file N abc...789\n`
/// repeated, cut at 1000 + (N*7919) % 20000 bytes.
pub fn file_body(n: u64) -> Vec<u8> {
    let line = format!("file {n} abcdefghijklmnopqrstuvwxyz0123456789\n");
    let size = (1000 + (n * 7919) % 20000) as usize;
    line.bytes().cycle().take(size).collect()
}

/// What `/mnt/data/fN` holds once the guest wrote it: the body, then the
/// line `md5 <hex md5 of the body>`.
pub fn file_content(n: u64) -> Vec<u8> {
    let mut v = file_body(n);
    let sum = Md5::digest(&v);
    let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    v.extend_from_slice(format!("md5 {hex}\n").as_bytes());
    v
}

/// Checks that `data` is a complete file N: its checksum line matches its
/// body and the body is the one the guest writes for N.
pub fn check_file(n: u64, data: &[u8]) -> Result<(), String> {
    // The body is letters, digits, spaces and newlines: "md5 " starts
    // the last line only.
    let cut = data
        .windows(4)
        .rposition(|w| w == b"md5 ")
        .ok_or_else(|| format!("f{n}: no checksum line ({} bytes)", data.len()))?;
    let (body, line) = data.split_at(cut);
    let sum: String = Md5::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if line != format!("md5 {sum}\n").as_bytes() {
        return Err(format!(
            "f{n}: checksum line {:?} does not match its body ({} bytes, md5 {sum})",
            String::from_utf8_lossy(line),
            body.len()
        ));
    }
    if data != file_content(n) {
        return Err(format!("f{n}: not the body the guest writes for {n}"));
    }
    Ok(())
}

/// The paths of one booted guest: its console file and agent socket.
/// Owns nothing: the [`Vm`] it was booted with kills QEMU.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The serial console, appended to by every QEMU of this guest.
    pub console: PathBuf,
    /// The unix socket of the agent's virtio-serial channel (QEMU listens).
    pub agent_socket: PathBuf,
}

impl Guest {
    /// Makes the guest's disks in `dir` (vda: 128 MiB ext4, vdb: 16 MiB
    /// vfat, copies of the built base images) and starts QEMU under TCG
    /// with the console on a file and the agent channel on a socket.
    /// Returns at once; [`Guest::wait_wrote`] waits for the guest.
    pub fn boot(dir: &Path, name: &str) -> (Vm, Guest) {
        Self::boot_with(dir, name, "qemu-system-x86_64")
    }

    /// [`Guest::boot`] on the QEMU binary `qemu` (a path, or a name
    /// looked up in PATH).
    pub fn boot_with(dir: &Path, name: &str, qemu: &str) -> (Vm, Guest) {
        let build = guest_build();
        let mut spec = VmSpec::small(name);
        spec.disks = vec![("vda".into(), 128), ("vdb".into(), 16)];
        spec.memory_mb = 192;
        let mut vm = Vm::create(&spec, dir, qemu).expect("create the VM");
        for d in &vm.disks {
            fs::copy(build.join(format!("{}.qcow2", d.target)), &d.image).unwrap();
        }
        let guest = Guest {
            console: dir.join(format!("{name}.console")),
            agent_socket: dir.join(format!("{name}.qga")),
        };
        let a = &mut vm.argv;
        let at = |a: &[String], opt: &str| a.iter().position(|x| x == opt).unwrap() + 1;
        let i = at(a, "-accel");
        a[i] = "tcg".into();
        let i = at(a, "-serial");
        a[i] = "chardev:con".into();
        let p = |x: &Path| x.to_str().unwrap().to_owned();
        a.extend([
            "-kernel".into(),
            p(&build.join("vmlinuz")),
            "-initrd".into(),
            p(&build.join("initramfs.gz")),
            "-append".into(),
            "console=ttyS0 quiet panic=-1".into(),
            "-no-reboot".into(),
            "-chardev".into(),
            format!("file,id=con,path={},append=on", guest.console.display()),
            "-device".into(),
            "virtio-serial".into(),
            "-chardev".into(),
            format!(
                "socket,path={},server=on,wait=off,id=qga0",
                guest.agent_socket.display()
            ),
            "-device".into(),
            format!("virtserialport,chardev=qga0,name={AGENT_PORT}"),
        ]);
        vm.launch().expect("start the guest's QEMU");
        (vm, guest)
    }

    /// The vmsnapfs definition of `vm` with the agent channel, as libvirt
    /// spells it, among its devices.
    pub fn definition_xml(&self, vm: &Vm) -> String {
        let channel = format!(
            "    <channel type='unix'>\n      <source mode='bind' path='{}'/>\n      \
             <target type='virtio' name='{AGENT_PORT}'/>\n    </channel>\n  </devices>",
            self.agent_socket.display()
        );
        vm.definition_xml().replacen("  </devices>", &channel, 1)
    }

    /// Writes [`Guest::definition_xml`] to `<domains>/<name>.xml`.
    pub fn write_definition(&self, vm: &Vm, domains: &Path) -> PathBuf {
        fs::create_dir_all(domains).unwrap();
        let path = domains.join(format!("{}.xml", vm.name));
        fs::write(&path, self.definition_xml(vm)).unwrap();
        path
    }

    /// The `WROTE` numbers the console shows after its first `seen`
    /// bytes, for a guest reverted to a checkpoint since: lines its
    /// earlier self still printed before the revert stopped it (they
    /// continue the count of the last line before `seen`) are left out;
    /// the reverted guest counts on from the checkpoint, below them.
    pub fn wrote_after_revert(&self, seen: usize) -> Vec<u64> {
        let text = self.console_text();
        let before = wrote_lines(&text[..seen]).last().copied().unwrap_or(0);
        let mut lines = wrote_lines(&text[seen..]);
        let stray = lines
            .iter()
            .zip(before + 1..)
            .take_while(|(n, old)| **n == *old)
            .count();
        lines.split_off(stray)
    }

    /// Everything the console shows so far (every boot of this guest).
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.console).unwrap_or_default()).replace('\r', "")
    }

    /// The last `n` lines of the console.
    pub fn console_tail(&self, n: usize) -> String {
        let text = self.console_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The N of the last `WROTE N` line (0 before the first): every file
    /// up to it was synced to the guest's disk.
    pub fn wrote(&self) -> u64 {
        wrote_lines(&self.console_text())
            .last()
            .copied()
            .unwrap_or(0)
    }

    /// Waits until the guest wrote a file past `after`; returns its N.
    /// Panics with the console's tail on a guest error or a timeout.
    pub fn wait_wrote(&self, after: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.wrote();
            if n > after {
                return n;
            }
            let text = self.console_text();
            assert!(
                !text.contains("GUEST-ERROR") && !text.contains("Kernel panic"),
                "the guest failed:\n{}",
                self.console_tail(40)
            );
            assert!(
                Instant::now() < deadline,
                "the guest wrote nothing past {after} in {timeout:?}; console:\n{}",
                self.console_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A connection to the guest agent, synchronised; retried until the
    /// agent answers or `timeout` passes.
    pub fn agent(&self, timeout: Duration) -> Agent {
        let deadline = Instant::now() + timeout;
        loop {
            match Agent::connect(&self.agent_socket, Duration::from_secs(5)) {
                Ok(a) => return a,
                Err(e) if Instant::now() >= deadline => {
                    panic!(
                        "the guest agent did not answer: {e}; console:\n{}",
                        self.console_tail(20)
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Runs `sh -c script` in the guest through the agent; returns its
    /// exit code and output. Panics on an agent error or a timeout.
    pub fn sh(&self, script: &str) -> ExecOutput {
        self.agent(Duration::from_secs(60))
            .exec("/bin/sh", &["-c", script], Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("guest-exec {script:?}: {e}"))
    }

    /// Starts a loop in the guest that dirties RAM without end: two files
    /// of `mib` MiB of random bytes, `/dirty/a` and `/dirty/b` (in the
    /// initramfs, i.e. in RAM), copied in turn to `/dirty/tmp`, renamed
    /// to `/dirty/cur`, the round counted in `/dirty/k`. `/dirty/cur` is
    /// always a whole copy of one of them: a RAM image that mixed pages
    /// of two instants shows as a `cur` matching neither
    /// ([`Guest::check_dirtier`]). Returns the rate at which it dirties
    /// RAM, in MiB/s, over two seconds.
    pub fn dirty_ram(&self, mib: u64) -> f64 {
        let out = self.sh(&format!(
            "mkdir -p /dirty && cd /dirty && \
             head -c {bytes} /dev/urandom > a && head -c {bytes} /dev/urandom > b && \
             md5sum a b > sums && cp a cur && echo 0 > k && \
             (k=0; while :; do k=$((k+1)); if [ $((k%2)) = 0 ]; then cp a tmp; else cp b tmp; fi; \
              mv tmp cur; echo $k > k; done) </dev/null >/dev/null 2>&1 &",
            bytes = mib << 20
        ));
        assert_eq!(out.code, 0, "{out:?}");
        let rounds = |g: &Guest| -> u64 {
            let out = g.sh("cat /dirty/k");
            out.text().trim().parse().unwrap_or(0)
        };
        let (k0, t0) = (rounds(self), Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        let (k1, t1) = (rounds(self), t0.elapsed());
        assert!(
            k1 > k0,
            "the loop dirtying RAM does not run ({k0} then {k1} rounds)"
        );
        ((k1 - k0) * mib) as f64 / t1.as_secs_f64()
    }

    /// Checks the files of [`Guest::dirty_ram`]: `a` and `b` as made,
    /// `cur` a whole copy of one of them, and the loop still going.
    /// Returns the round count it had reached.
    pub fn check_dirtier(&self) -> u64 {
        let out = self.sh("cd /dirty && md5sum -c -s sums && c=$(md5sum < cur) && \
             grep -q \"^${c%% *} \" sums && k0=$(cat k) && sleep 1 && echo $k0 $(cat k)");
        assert_eq!(
            out.code, 0,
            "the guest's RAM-only files are not whole copies: {out:?}"
        );
        let text = out.text();
        let v: Vec<u64> = text
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        assert!(
            v.len() == 2 && v[1] > v[0],
            "the loop dirtying RAM stopped: {text:?}"
        );
        v[0]
    }
}

/// The N of every `WROTE N` line of console text, in order. A line a
/// killed QEMU left unfinished runs into the next one: the last `WROTE `
/// of a line counts.
pub fn wrote_lines(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.rsplit("WROTE ").next().filter(|_| l.contains("WROTE ")))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// A client of qemu-ga over its socket, with a timeout on every read and
/// write. QEMU's socket takes one client at a time: drop it when done.
pub struct Agent {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// What a command run by `guest-exec` did.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// Its exit code (-1 when a signal ended it).
    pub code: i64,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Standard output as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl Agent {
    /// Connects and synchronises with `guest-sync-delimited` (anything an
    /// earlier client left unread is skipped).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Agent, String> {
        let stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(timeout)).unwrap();
        stream.set_write_timeout(Some(timeout)).unwrap();
        let mut a = Agent {
            stream,
            buf: Vec::new(),
        };
        let id = u64::from(std::process::id()) << 20 | u64::from(rand_u16());
        // 0xFF resets the agent's parser; its answer to the sync comes
        // after a 0xFF of its own.
        a.stream.write_all(&[0xff]).map_err(|e| e.to_string())?;
        a.send("guest-sync-delimited", json!({ "id": id }))?;
        let deadline = Instant::now() + timeout;
        loop {
            let pos = loop {
                if let Some(p) = a.buf.iter().position(|b| *b == 0xff) {
                    break p;
                }
                a.fill(deadline)?;
            };
            a.buf.drain(..=pos);
            let v = a.read_message(deadline)?;
            if v["return"] == json!(id) {
                return Ok(a);
            }
        }
    }

    fn send(&mut self, cmd: &str, args: Value) -> Result<(), String> {
        let mut line = serde_json::to_vec(&json!({ "execute": cmd, "arguments": args })).unwrap();
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .map_err(|e| format!("{cmd}: write: {e}"))
    }

    fn fill(&mut self, deadline: Instant) -> Result<(), String> {
        if Instant::now() >= deadline {
            return Err("timed out".into());
        }
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err("the agent's socket closed".into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    fn read_message(&mut self, deadline: Instant) -> Result<Value, String> {
        loop {
            if let Some(p) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=p).collect();
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                return serde_json::from_str(text.trim())
                    .map_err(|e| format!("bad answer {text:?}: {e}"));
            }
            self.fill(deadline)?;
        }
    }

    /// Runs an agent command; its `return` value, or its error as text.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        self.send(cmd, args)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let v = self.read_message(deadline)?;
        match v.get("return") {
            Some(r) => Ok(r.clone()),
            None => Err(format!("{cmd}: {}", v["error"])),
        }
    }

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<(), String> {
        self.execute("guest-ping", json!({})).map(|_| ())
    }

    /// `guest-fsfreeze-status`: `thawed` or `frozen`.
    pub fn fsfreeze_status(&mut self) -> Result<String, String> {
        let v = self.execute("guest-fsfreeze-status", json!({}))?;
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("guest-fsfreeze-status said {v}"))
    }

    /// Runs `path args...` in the guest (`guest-exec`) and waits up to
    /// `timeout` for it to exit.
    pub fn exec(
        &mut self,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, String> {
        let started = self.execute(
            "guest-exec",
            json!({ "path": path, "arg": args, "capture-output": true }),
        )?;
        let pid = started["pid"].clone();
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.execute("guest-exec-status", json!({ "pid": pid }))?;
            if st["exited"] == json!(true) {
                let data = |k: &str| -> Result<Vec<u8>, String> {
                    st.get(k)
                        .and_then(Value::as_str)
                        .map_or(Ok(Vec::new()), |s| {
                            BASE64_STANDARD.decode(s).map_err(|e| e.to_string())
                        })
                };
                return Ok(ExecOutput {
                    code: st["exitcode"].as_i64().unwrap_or(-1),
                    stdout: data("out-data")?,
                    stderr: data("err-data")?,
                });
            }
            if Instant::now() >= deadline {
                return Err(format!("{path} {args:?} still runs after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A few random bits for a sync id (no rand crate: the clock's nanoseconds).
fn rand_u16() -> u16 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u16)
}

/// A real guest under a mounted vmsnapfs: the [`Fixture`] (daemon, VM,
/// temp dir, in that drop order) whose VM is the booted guest, and the
/// guest's paths. Derefs to the fixture (`path`, `read`, `wait_state`...).
pub struct RealGuest {
    /// The daemon, the guest's VM and the temp dir.
    pub fx: Fixture,
    /// The guest's console and agent socket.
    pub guest: Guest,
}

impl RealGuest {
    /// Boots a guest `vm1` with snapshot policy `policy`, writes its
    /// definition (with the agent channel), starts the daemon with `env`,
    /// and waits for the guest's first written file.
    pub fn start(tag: &str, policy: &str, env: &[(&str, &str)]) -> RealGuest {
        Self::start_with(tag, policy, env, "qemu-system-x86_64")
    }

    /// [`RealGuest::start`] on the QEMU binary `qemu`.
    pub fn start_with(tag: &str, policy: &str, env: &[(&str, &str)], qemu: &str) -> RealGuest {
        let dir = TempDir::new(tag);
        let (mut vm, guest) = Guest::boot_with(&dir.0.join("images"), "vm1", qemu);
        vm.policy = Some(policy.into());
        guest.write_definition(&vm, &dir.0.join("domains"));
        let booted = Instant::now();
        let daemon = Daemon::start(&dir.0, env);
        let rg = RealGuest {
            fx: Fixture { daemon, vm, dir },
            guest,
        };
        rg.guest.wait_wrote(0, BOOT_TIMEOUT);
        eprintln!(
            "{tag}: the guest wrote its first file {:?} after QEMU started",
            booted.elapsed()
        );
        rg
    }

    /// A new session on the test's own QMP socket.
    pub fn qmp(&self) -> vmsnapfs::backend::qmp::Qmp {
        self.fx.vm.control().expect("the test's QMP socket")
    }

    /// The pid of the QEMU that runs the guest now.
    pub fn pid(&self) -> Option<i32> {
        self.fx.vm.current_pid()
    }

    /// The agent channel's socket path.
    pub fn agent_socket(&self) -> &Path {
        &self.guest.agent_socket
    }
}

impl std::ops::Deref for RealGuest {
    type Target = Fixture;
    fn deref(&self) -> &Fixture {
        &self.fx
    }
}

impl std::ops::DerefMut for RealGuest {
    fn deref_mut(&mut self) -> &mut Fixture {
        &mut self.fx
    }
}

impl Drop for RealGuest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- guest console (last lines) ---\n{}",
                self.guest.console_tail(30)
            );
        }
    }
}

/// `e2fsck -fn` of a frozen view (read-only) and its superblock features
/// (`dumpe2fs -h`): (e2fsck's exit code, its output, the features).
pub fn fsck(view: &Path) -> (i32, String, String) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(view)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let d = Command::new("dumpe2fs")
        .arg("-h")
        .arg(view)
        .output()
        .unwrap();
    let features = String::from_utf8_lossy(&d.stdout)
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or("")
        .to_owned();
    (out.status.code().unwrap_or(-1), text, features)
}

/// Asserts that the ext4 file system of `view` is clean as it is: no
/// journal to replay, nothing for e2fsck to fix.
pub fn assert_clean(view: &Path) {
    let (code, text, features) = fsck(view);
    assert_eq!(code, 0, "e2fsck -fn {}:\n{text}", view.display());
    assert!(
        !text.contains("journal recovery") && !text.contains("Fix?"),
        "e2fsck -fn {}:\n{text}",
        view.display()
    );
    assert!(
        features.contains("has_journal") && !features.contains("needs_recovery"),
        "{features}"
    );
}
