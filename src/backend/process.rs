//! QEMU processes: reading a running one's command line, starting one
//! detached from the daemon, waiting for one to exit.

use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::Path;
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
        std::thread::sleep(Duration::from_millis(10));
    }
    !is_alive(pid, started)
}

/// Removes `-loadvm X`, `-S` and `-incoming X` from a recorded argv: they
/// describe how that process started, not how the domain is defined.
pub fn strip_start_options(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-loadvm" | "--loadvm" | "-incoming" | "--incoming" => {
                it.next();
            }
            "-S" => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

/// Points a command line at each disk's active layer: every occurrence of
/// an older image path of the disk (bounded by `=`, `,`, `"`, `:` or the
/// ends of the argument) becomes the active path. When a raw disk got a
/// qcow2 overlay, `format=raw` / `driver=raw` in the same argument become
/// qcow2. What this cannot rewrite is caught by checking the chains QEMU
/// opened (see `QemuBackend::start_process`).
pub fn point_at_layers(argv: &[String], swaps: &[(Vec<String>, String, bool)]) -> Vec<String> {
    argv.iter()
        .map(|arg| {
            let mut arg = arg.clone();
            for (olds, new, to_qcow2) in swaps {
                let mut hit = false;
                for old in olds {
                    if old != new {
                        let (replaced, n) = replace_bounded(&arg, old, new);
                        arg = replaced;
                        hit |= n > 0;
                    }
                }
                if hit && *to_qcow2 {
                    for (from, to) in [
                        ("format=raw", "format=qcow2"),
                        ("driver=raw", "driver=qcow2"),
                        ("\"driver\":\"raw\"", "\"driver\":\"qcow2\""),
                    ] {
                        arg = replace_bounded(&arg, from, to).0;
                    }
                }
            }
            arg
        })
        .collect()
}

/// Replaces `old` in `s` where it stands alone between separators.
fn replace_bounded(s: &str, old: &str, new: &str) -> (String, usize) {
    const SEP: &[char] = &['=', ',', '"', ':', '{'];
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut count = 0;
    while let Some(i) = rest.find(old) {
        let before_ok = out.is_empty() && i == 0
            || rest[..i]
                .chars()
                .last()
                .or_else(|| out.chars().last())
                .is_some_and(|c| SEP.contains(&c));
        let after = &rest[i + old.len()..];
        let after_ok = after.is_empty() || after.starts_with([',', '"']);
        out.push_str(&rest[..i]);
        if before_ok && after_ok {
            out.push_str(new);
            count += 1;
        } else {
            out.push_str(old);
        }
        rest = after;
    }
    out.push_str(rest);
    (out, count)
}

/// Starts QEMU from `argv` in a session of its own (it outlives the
/// daemon), output appended to `log`. Reaps it when it exits.
pub fn spawn_detached(argv: &[String], log: &Path) -> Result<u32> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| Error::invalid("empty QEMU command line"))?;
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("cannot start {prog}: {e}")))?;
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
    fn points_disks_at_their_active_layer() {
        let argv: Vec<String> = [
            "qemu",
            "-blockdev",
            "driver=qcow2,node-name=vda-fmt,file.driver=file,file.filename=/i/a.qcow2",
            "-drive",
            "file=/i/b.raw,format=raw,if=virtio",
            "-drive",
            "file=/i/a.qcow2.bak,format=qcow2",
            "-blockdev",
            r#"{"driver":"raw","file":{"driver":"file","filename":"/i/b.raw"}}"#,
        ]
        .map(String::from)
        .to_vec();
        let swaps = vec![
            (
                vec!["/i/a.qcow2".to_owned()],
                "/i/a.s1.qcow2".to_owned(),
                false,
            ),
            (
                vec!["/i/b.raw".to_owned()],
                "/i/b.s1.qcow2".to_owned(),
                true,
            ),
        ];
        let out = point_at_layers(&argv, &swaps);
        assert_eq!(
            out[2],
            "driver=qcow2,node-name=vda-fmt,file.driver=file,file.filename=/i/a.s1.qcow2"
        );
        assert_eq!(out[4], "file=/i/b.s1.qcow2,format=qcow2,if=virtio");
        assert_eq!(
            out[6], "file=/i/a.qcow2.bak,format=qcow2",
            "a longer path is another file"
        );
        assert_eq!(
            out[8],
            r#"{"driver":"qcow2","file":{"driver":"file","filename":"/i/b.s1.qcow2"}}"#
        );
    }

    #[test]
    fn strips_start_options() {
        let argv: Vec<String> = [
            "qemu",
            "-m",
            "64",
            "-S",
            "-loadvm",
            "x",
            "-incoming",
            "defer",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(strip_start_options(&argv), vec!["qemu", "-m", "64"]);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        assert!(read_argv(me).is_some());
        assert!(is_alive(me, start_time(me)));
    }
}
