//! A QMP endpoint for a libvirt domain: a Unix socket in the domain's
//! private state directory on which the daemon's QMP session talks to
//! libvirt's QEMU through libvirt's monitor passthrough (`virsh
//! qemu-monitor-command`, descriptors with `--pass-fds`), so the QEMU
//! backend runs unchanged. libvirt keeps its own monitor; nothing
//! connects to `monitor.sock`.
//!
//! Per connection: the greeting is QEMU's `query-version` (no answer
//! because the domain is not running: the connection is closed, which
//! the backend reads as "nothing listens"; libvirt silent: the
//! connection stays open and silent, which it reads as unreachable);
//! `qmp_capabilities` is answered here; `quit` becomes `virsh destroy`;
//! every other command is passed through, each within a deadline; the
//! events of the domain (`virsh qemu-monitor-event`) are forwarded.
//!
//! A connection talks to one QEMU process: the one that answered its
//! greeting. libvirt may start another behind it (`virsh destroy; virsh
//! start`, its own revert or restore), and what the client learnt of the
//! old one (node names, pid, version, disks) would not hold for the new
//! one. So the QEMU is identified at the greeting and again before each
//! command (and, where that is free, after it): by libvirt's pid file
//! (the pid and the start time of the process it names; a local read)
//! for a privileged libvirtd, else by libvirt's id of the running
//! domain (`virsh domid`, new at every start or restore). When it
//! changed, the connection is closed without the command going to the
//! new QEMU (or without its answer, when the change shows only after
//! it): the client connects again and learns everything anew.

use std::io::{self, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::virsh::{self, Virsh};
use crate::backend::liveness::QemuProcess;

/// Deadline of one passed-through command (longer than any the QEMU
/// backend gives a command, so the backend times out first).
const COMMAND_DEADLINE: Duration = Duration::from_secs(40);
/// Deadline of the greeting's `query-version`.
const GREETING_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of `virsh destroy`.
const DESTROY_DEADLINE: Duration = Duration::from_secs(60);
/// Longest command line accepted from the client.
const MAX_LINE: usize = 1 << 20;

/// A running endpoint; dropping it stops accepting and removes the socket.
pub struct Shim {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Shim {
    /// Listens on `path` (created 0600 by root in a private directory)
    /// for QMP sessions with libvirt domain `domain`.
    pub fn start(virsh: Virsh, domain: &str, path: &Path) -> io::Result<Shim> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, domain) = (stop.clone(), domain.to_owned());
        std::thread::Builder::new()
            .name(format!("qmp-{domain}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (v, d) = (virsh.clone(), domain.clone());
                    let _ = std::thread::Builder::new()
                        .name(format!("qmp-{d}"))
                        .spawn(move || serve(v, d, conn));
                }
            })?;
        Ok(Shim {
            path: path.to_owned(),
            stop,
        })
    }

    /// The socket the QEMU backend connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The `virsh qemu-monitor-event` child of one connection, killed by pid
/// when the connection ends.
struct EventChild(Child);

impl Drop for EventChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Which QEMU process of a domain a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qemu {
    /// The process libvirt's pid file names (pid and start time).
    Process(QemuProcess),
    /// libvirt's id of the running domain (new at every start).
    Id(u32),
}

impl std::fmt::Display for Qemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Qemu::Process(p) => write!(f, "pid {} (started at tick {})", p.pid, p.start),
            Qemu::Id(id) => write!(f, "libvirt domain id {id}"),
        }
    }
}

/// How a connection tells which QEMU runs the domain now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// libvirt's pid file (a privileged libvirtd): read locally.
    PidFile,
    /// `virsh domid`: a round trip to libvirt.
    DomainId,
}

impl Watch {
    /// The QEMU running `domain` now, as this way tells it; `None` when
    /// none runs (or it cannot be told).
    fn current(self, virsh: &Virsh, domain: &str) -> Option<Qemu> {
        match self {
            Watch::PidFile => super::system_qemu_pid(virsh, domain)
                .and_then(QemuProcess::of)
                .map(Qemu::Process),
            Watch::DomainId => virsh
                .run(&["domid", "--domain", domain], GREETING_DEADLINE)
                .ok()?
                .trim()
                .parse()
                .ok()
                .map(Qemu::Id),
        }
    }
}

/// The QEMU running `domain` now and the way it was told: libvirt's pid
/// file where it names a live process, else libvirt's domain id.
fn identify(virsh: &Virsh, domain: &str) -> Option<(Watch, Qemu)> {
    [Watch::PidFile, Watch::DomainId]
        .into_iter()
        .find_map(|w| w.current(virsh, domain).map(|q| (w, q)))
}

/// Serves one QMP connection until the client leaves.
fn serve(virsh: Virsh, domain: String, conn: UnixStream) {
    let greeted = identify(&virsh, &domain);
    let version = virsh.run(
        &[
            "qemu-monitor-command",
            "--domain",
            &domain,
            "--return-value",
            r#"{"execute":"query-version"}"#,
        ],
        GREETING_DEADLINE,
    );
    let version: Value = match version {
        Ok(text) => match serde_json::from_str(text.trim()) {
            Ok(v) => v,
            Err(_) => return silent(conn),
        },
        Err(e)
            if e.message.contains("not running") || e.message.contains("failed to get domain") =>
        {
            return; // closed: nothing listens
        }
        Err(_) => return silent(conn),
    };
    // The QEMU that answered is the one identified before: else it is
    // starting or stopping (closed: the client asks again).
    let Some((watch, greeted)) = greeted else {
        return;
    };
    if watch == Watch::PidFile && watch.current(&virsh, &domain) != Some(greeted) {
        return;
    }
    let same = |when: &str| {
        let now = watch.current(&virsh, &domain);
        if now == Some(greeted) {
            return true;
        }
        log::info!(
            "{domain}: libvirt's QEMU changed behind a monitor connection {when} ({greeted} \
             became {}): the connection is closed, and what its client knew of the old \
             QEMU with it",
            now.map_or_else(|| "none".to_owned(), |q| q.to_string())
        );
        false
    };
    let writer = Arc::new(Mutex::new(match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    }));
    let greeting = json!({"QMP": {"version": version, "capabilities": []}});
    if send(&writer, &greeting).is_err() {
        return;
    }
    let _events = forward_events(&virsh, &domain, writer.clone());
    let mut buf: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    loop {
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let passed = std::mem::take(&mut fds);
            // Never a command to another QEMU than the greeting's; nor
            // an answer that may come from one (told free of charge
            // only by the pid file).
            if !same("before a command") {
                return;
            }
            let reply = answer(&virsh, &domain, &line, &passed);
            if watch == Watch::PidFile && reply.get("quit").is_none() && !same("during a command") {
                return;
            }
            let quit = reply.get("quit").is_some();
            let reply = reply.get("quit").cloned().unwrap_or(reply);
            if send(&writer, &reply).is_err() || quit {
                return;
            }
        }
        if buf.len() > MAX_LINE {
            return;
        }
        match receive(&conn, &mut fds) {
            Ok(b) if b.is_empty() => return,
            Ok(b) => buf.extend_from_slice(&b),
            Err(_) => return,
        }
    }
}

/// Keeps the connection open without a word until the client leaves.
fn silent(conn: UnixStream) {
    let mut fds = Vec::new();
    while receive(&conn, &mut fds).is_ok_and(|b| !b.is_empty()) {
        fds.clear();
    }
}

/// Reads what the client sent, keeping descriptors that came with it.
fn receive(conn: &UnixStream, fds: &mut Vec<OwnedFd>) -> io::Result<Vec<u8>> {
    let mut data = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; virsh::MAX_PASSED_FDS]);
    let (n, got) = {
        let mut iov = [io::IoSliceMut::new(&mut data)];
        let msg = recvmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(conn),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut got = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(rs) = c {
                for r in rs {
                    // SAFETY: SCM_RIGHTS gave us these new descriptors.
                    got.push(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
        (msg.bytes, got)
    };
    fds.extend(got);
    data.truncate(n);
    Ok(data)
}

/// The answer to one command line. A `{"quit": answer}` wrapper says the
/// connection ends after the answer.
fn answer(virsh: &Virsh, domain: &str, line: &[u8], fds: &[OwnedFd]) -> Value {
    let Ok(mut cmd) = serde_json::from_slice::<Value>(line) else {
        return error("GenericError", "the command is not JSON");
    };
    let Some(name) = cmd["execute"].as_str().map(str::to_owned) else {
        return error("GenericError", "no \"execute\" in the command");
    };
    // libvirt adds its own id and refuses one from us.
    if let Some(o) = cmd.as_object_mut() {
        o.remove("id");
    }
    match name.as_str() {
        "qmp_capabilities" => json!({"return": {}}),
        "quit" => match virsh.run(&["destroy", "--domain", domain], DESTROY_DEADLINE) {
            Ok(_) => json!({"quit": {"return": {}}}),
            Err(e) => error("GenericError", &e.message),
        },
        _ => {
            if fds.len() > virsh::MAX_PASSED_FDS {
                return error("GenericError", "too many descriptors with one command");
            }
            let text = cmd.to_string();
            let mut args = vec!["qemu-monitor-command", "--domain", domain];
            let pass = virsh::passed_fds(fds.len());
            if !fds.is_empty() {
                args.extend(["--pass-fds", pass.as_str()]);
            }
            args.push(&text);
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            let r = if borrowed.is_empty() {
                virsh.run(&args, COMMAND_DEADLINE)
            } else {
                virsh.run_with_fds(&args, &borrowed, COMMAND_DEADLINE)
            };
            match r {
                Ok(out) => match serde_json::from_str::<Value>(out.trim()) {
                    Ok(mut v) => {
                        if let Some(o) = v.as_object_mut() {
                            o.remove("id");
                        }
                        v
                    }
                    Err(_) => error("GenericError", "libvirt's answer is not JSON"),
                },
                Err(e) => error("GenericError", &e.message),
            }
        }
    }
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn send(writer: &Mutex<UnixStream>, msg: &Value) -> io::Result<()> {
    let mut line = msg.to_string().into_bytes();
    line.push(b'\n');
    writer.lock().write_all(&line)
}

/// Starts `virsh qemu-monitor-event --loop` for the domain and a thread
/// that writes each event it prints to the client as a QMP event.
fn forward_events(
    virsh: &Virsh,
    domain: &str,
    writer: Arc<Mutex<UnixStream>>,
) -> Option<EventChild> {
    let mut cmd = virsh.command(&["qemu-monitor-event", "--domain", domain, "--loop"]);
    // SAFETY: prctl(2) with integer arguments, async-signal-safe: the
    // listener dies with the daemon even when the daemon is killed.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let prefix = format!(" for domain '{domain}': ");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if let Some(ev) = parse_event(&line, &prefix) {
                if send(&writer, &ev).is_err() {
                    return;
                }
            }
        }
    });
    Some(EventChild(child))
}

/// Reads one line of `virsh qemu-monitor-event` (`event NAME at
/// SECS.USECS for domain 'D': DATA`, DATA JSON or `<null>`) as a QMP event.
fn parse_event(line: &str, prefix: &str) -> Option<Value> {
    let rest = line.strip_prefix("event ")?;
    let (name, rest) = rest.split_once(" at ")?;
    let (when, data) = rest.split_once(prefix)?;
    let (secs, usecs) = when.split_once('.').unwrap_or((when, "0"));
    let mut ev = json!({
        "event": name,
        "timestamp": {
            "seconds": secs.parse::<i64>().ok()?,
            "microseconds": usecs.parse::<i64>().ok()?,
        },
    });
    if data != "<null>" {
        ev["data"] = serde_json::from_str(data).ok()?;
    }
    Some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_printed_by_virsh_become_qmp_events() {
        let p = " for domain 'd1': ";
        let e = parse_event("event STOP at 1796165902.307744 for domain 'd1': <null>", p).unwrap();
        assert_eq!(e["event"], "STOP");
        assert_eq!(e["timestamp"]["seconds"], 1796165902i64);
        assert_eq!(e["timestamp"]["microseconds"], 307744);
        assert!(e.get("data").is_none());
        let e = parse_event(
            "event JOB_STATUS_CHANGE at 1.000002 for domain 'd1': {\"status\":\"concluded\",\"id\":\"j\"}",
            p,
        )
        .unwrap();
        assert_eq!(e["data"]["status"], "concluded");
        // Another domain's event, or anything else, is not an event.
        assert!(parse_event("event STOP at 1.2 for domain 'd2': <null>", p).is_none());
        assert!(parse_event("garbage", p).is_none());
    }
}
