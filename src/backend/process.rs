//! QEMU processes: reading a running one's command line and checking
//! that it may be run again, starting one detached from the daemon with
//! the credentials it ran with, waiting for one to exit.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The argv of a running process, from `/proc/PID/cmdline`.
pub fn read_argv(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!argv.is_empty()).then_some(argv)
}

/// The start time of a process (field 22 of `/proc/PID/stat`), to tell it
/// apart from a later process that reuses its pid.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after ')' are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// True while the process `pid` started at `started` is alive (a zombie counts as gone).
pub fn is_alive(pid: i32, started: Option<u64>) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rfind(')').and_then(|i| stat[i + 2..].chars().next());
    if state == Some('Z') {
        return false;
    }
    started.is_none() || start_time(pid) == started
}

/// Waits until the process exits, or `timeout` passes.
pub fn wait_exit(pid: i32, timeout: Duration) -> bool {
    let started = start_time(pid);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !is_alive(pid, started) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    !is_alive(pid, started)
}

/// Who a recorded command line runs as: the credentials of the process
/// it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id (real, effective, saved and filesystem ids were all this).
    pub uid: u32,
    /// Group id (likewise).
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// The credentials of root.
    pub fn root() -> Self {
        Credentials {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// One line: `uid gid g1,g2,...`.
    pub fn to_line(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        format!("{} {} {}", self.uid, self.gid, groups.join(","))
    }

    /// Parses [`Credentials::to_line`].
    pub fn from_line(line: &str) -> Option<Self> {
        let mut f = line.trim_end_matches('\n').splitn(3, ' ');
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let groups = f
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|g| !g.is_empty())
            .map(|g| g.parse().ok())
            .collect::<Option<Vec<u32>>>()?;
        Some(Credentials { uid, gid, groups })
    }
}

/// A command line read from a running QEMU and found fit to run again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedArgv {
    /// The argv, its first element the absolute path of the binary.
    pub argv: Vec<String>,
    /// Who ran it, and who runs it again.
    pub creds: Credentials,
}

/// Reads the command line of process `pid` (the peer of a monitor
/// socket, whose `SO_PEERCRED` said `peer_uid`/`peer_gid`) and checks
/// that it may be run again:
///
/// - the process runs a QEMU system emulator (`qemu-system-*`), an
///   executable that only root can change: a root-owned regular file,
///   not writable by group or others, in directories with the same
///   properties up to `/`;
/// - its `argv[0]` names that same file (not another program behind a
///   QEMU-looking name);
/// - all its user and group ids are the ones the socket reported.
///
/// The argv returned starts with the binary's absolute path; it is run
/// again with the process's credentials, never more.
pub fn verify_qemu(pid: i32, peer_uid: u32, peer_gid: u32) -> Result<VerifiedArgv> {
    let refuse = |why: String| Err(Error::new(crate::error::ErrorKind::NotPermitted, why));
    let exe_link = format!("/proc/{pid}/exe");
    let exe = fs::read_link(&exe_link).map_err(|e| Error::at(Path::new(&exe_link), e))?;
    let running = fs::metadata(&exe_link)?;
    let mut argv = read_argv(pid).ok_or_else(|| Error::io(format!("pid {pid} has no argv")))?;
    if let Err(e) = check_binary(&exe) {
        return refuse(format!("pid {pid}: {}", e.message));
    }
    match fs::symlink_metadata(&exe) {
        Ok(m) if m.dev() == running.dev() && m.ino() == running.ino() => {}
        _ => {
            return refuse(format!(
                "{} is no longer the binary pid {pid} runs",
                exe.display()
            ))
        }
    }
    match resolve_argv0(pid, &argv[0]) {
        Some(m) if m.dev() == running.dev() && m.ino() == running.ino() => {}
        _ => {
            return refuse(format!(
                "argv[0] {:?} of pid {pid} is not the binary it runs ({})",
                argv[0],
                exe.display()
            ))
        }
    }
    let creds = credentials(pid)?;
    if creds.uid != peer_uid || creds.gid != peer_gid {
        return refuse(format!(
            "pid {pid} runs as {}:{}, the monitor socket says {peer_uid}:{peer_gid}",
            creds.uid, creds.gid
        ));
    }
    argv[0] = exe.to_string_lossy().into_owned();
    Ok(VerifiedArgv { argv, creds })
}

/// Checks that `exe` is a QEMU system emulator (`qemu-system-*`) that
/// only root can change: a root-owned regular file, not writable by group
/// or others, in directories with the same properties up to `/` (EPERM
/// otherwise).
pub fn check_binary(exe: &Path) -> Result<()> {
    let refuse = |why: String| Err(Error::new(crate::error::ErrorKind::NotPermitted, why));
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
    if !exe.is_absolute()
        || !name
            .as_deref()
            .is_some_and(|n| n.starts_with("qemu-system-"))
    {
        return refuse(format!("{} is not a QEMU system emulator", exe.display()));
    }
    let m = fs::symlink_metadata(exe).map_err(|e| Error::at(exe, e))?;
    if !m.is_file() {
        return refuse(format!("{} is not a regular file", exe.display()));
    }
    if let Some(why) = not_root_only(&m) {
        return refuse(format!("{}: {why}", exe.display()));
    }
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let m = fs::symlink_metadata(d)?;
        if let Some(why) = not_root_only(&m) {
            return refuse(format!("{}: {why}", d.display()));
        }
        dir = d.parent();
    }
    Ok(())
}

/// Why a file or directory with metadata `m` is not something only root can change.
fn not_root_only(m: &fs::Metadata) -> Option<&'static str> {
    if m.file_type().is_symlink() {
        Some("a symbolic link")
    } else if m.uid() != 0 {
        Some("not owned by root")
    } else if m.mode() & 0o022 != 0 {
        Some("writable by group or others")
    } else {
        None
    }
}

/// The file `argv0` of process `pid` names: a path (relative ones from
/// the process's working directory) or a name looked up in its `PATH`.
fn resolve_argv0(pid: i32, argv0: &str) -> Option<fs::Metadata> {
    if argv0.contains('/') {
        let p = Path::new(argv0);
        let p = if p.is_absolute() {
            p.to_owned()
        } else {
            PathBuf::from(format!("/proc/{pid}/cwd")).join(p)
        };
        return fs::metadata(p).ok();
    }
    let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let path = env
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"PATH="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .find_map(|d| {
            fs::metadata(Path::new(d).join(argv0))
                .ok()
                .filter(|m| m.is_file())
        })
}

/// The credentials of process `pid`, from `/proc/PID/status`; refused
/// unless its real, effective, saved and filesystem ids agree.
pub fn credentials(pid: i32) -> Result<Credentials> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let ids = |key: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (uids, gids, groups) = (ids("Uid:"), ids("Gid:"), ids("Groups:"));
    let same = |v: &[u32]| v.len() == 4 && v.iter().all(|x| *x == v[0]);
    if !same(&uids) || !same(&gids) {
        return Err(Error::new(
            crate::error::ErrorKind::NotPermitted,
            format!("pid {pid} has mixed user or group ids ({uids:?} / {gids:?})"),
        ));
    }
    Ok(Credentials {
        uid: uids[0],
        gid: gids[0],
        groups,
    })
}

/// Starts QEMU from `argv` in a session of its own (it outlives the
/// daemon) with credentials `creds`, output appended to `log`. Reaps it
/// when it exits.
pub fn spawn_detached(argv: &[String], creds: &Credentials, log: &Path) -> Result<u32> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| Error::invalid("empty QEMU command line"))?;
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(crate::store::atomic::FILE_MODE)
        .open(log)?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let Credentials { uid, gid, groups } = creds.clone();
    let drop_privileges = uid != 0 || gid != 0;
    // SAFETY: only async-signal-safe calls (setsid, setgroups, setgid,
    // setuid) on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if drop_privileges {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getuid() != uid || libc::geteuid() != uid {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::from(e).context(format!("cannot start {prog}")))?;
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        assert!(read_argv(me).is_some());
        assert!(is_alive(me, start_time(me)));
    }
}
