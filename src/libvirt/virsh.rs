//! `virsh` as the daemon runs it: one connection URI, every call with a
//! deadline after which the virsh is killed by pid. Commands go to
//! long-lived virsh shells ([`super::session`]) when every argument can
//! be quoted for virsh's parser unchanged; otherwise, and whenever
//! descriptors go with the command (`--pass-fds`, at fixed numbers) or a
//! command streams (events), a virsh process of its own runs with the
//! arguments as argv (no shell).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::child;
use crate::error::{Error, Result};

/// The first descriptor number a passed descriptor gets in `virsh`.
const FIRST_PASSED_FD: i32 = 3;
/// The most descriptors passed with one command.
pub const MAX_PASSED_FDS: usize = 8;

/// `virsh` for one libvirt connection; clones share its shells.
#[derive(Clone)]
pub struct Virsh {
    uri: String,
    shells: Arc<super::session::Pool>,
}

impl std::fmt::Debug for Virsh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Virsh").field("uri", &self.uri).finish()
    }
}

impl Virsh {
    /// Commands against the libvirt connection `uri` (`qemu:///system`).
    pub fn new(uri: &str) -> Self {
        Virsh {
            uri: uri.to_owned(),
            shells: Arc::default(),
        }
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The command `virsh -q -c URI ARGS...`, not started; it inherits
    /// no descriptor but its standard ones.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut c = self.base(args);
        // SAFETY: close_range is a system call, async-signal-safe.
        unsafe {
            c.pre_exec(|| close_from(FIRST_PASSED_FD));
        }
        c
    }

    fn base<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new("virsh");
        c.arg("-q").arg("-c").arg(&self.uri).args(args);
        // Never the caller's language: messages are matched.
        c.env("LC_ALL", "C");
        c
    }

    /// Runs `virsh ARGS` within `timeout`, on a long-lived shell when
    /// the arguments allow it (see the module's doc); its standard
    /// output on success, an EIO error with what virsh said otherwise.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S], timeout: Duration) -> Result<String> {
        let Some(line) = super::session::line(args) else {
            return self.run_alone(args, timeout);
        };
        let what = args_text(args);
        let t = std::time::Instant::now();
        let said = self.shells.run(&self.uri, &line, &what, timeout);
        log::debug!("virsh {what} (shell): {:?}", t.elapsed());
        let said = said?;
        let errors = said.errors();
        if !errors.is_empty() {
            return Err(Error::io(format!(
                "virsh {what}: {}",
                errors
                    .iter()
                    .map(|l| l.trim_start_matches("error: "))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        String::from_utf8(said.out).map_err(|_| Error::io(format!("virsh {what}: not UTF-8")))
    }

    /// Runs `virsh ARGS` in a process of its own (arguments as argv)
    /// within `timeout`; as [`Virsh::run`].
    pub fn run_alone<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        timeout: Duration,
    ) -> Result<String> {
        self.run_command(self.command(args), args_text(args), timeout)
    }

    /// How many long-lived shells wait for a command.
    pub fn idle_shells(&self) -> usize {
        self.shells.idle()
    }

    /// Like [`Virsh::run`], with `fds` open in virsh as descriptors 3,
    /// 4, ...: the numbers to give `--pass-fds` (see [`passed_fds`]).
    pub fn run_with_fds<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<String> {
        if fds.len() > MAX_PASSED_FDS {
            return Err(Error::invalid(format!(
                "at most {MAX_PASSED_FDS} descriptors go with one command"
            )));
        }
        let mut cmd = self.base(args);
        let mut raw = [-1i32; MAX_PASSED_FDS];
        for (r, f) in raw.iter_mut().zip(fds) {
            *r = f.as_raw_fd();
        }
        let n = fds.len();
        // SAFETY: between fork and exec only fcntl and dup2, which are
        // async-signal-safe, on a fixed array (no allocation) of
        // descriptors this process holds open for the duration of the
        // call; the copies at 3, 4, ... lose FD_CLOEXEC, so virsh
        // inherits exactly them.
        unsafe {
            cmd.pre_exec(move || {
                // First out of the way of the target numbers, then into place.
                let mut high = [-1i32; MAX_PASSED_FDS];
                for i in 0..n {
                    high[i] = libc::fcntl(raw[i], libc::F_DUPFD_CLOEXEC, 100);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &fd) in high.iter().enumerate().take(n) {
                    if libc::dup2(fd, FIRST_PASSED_FD + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                close_from(FIRST_PASSED_FD + n as i32)
            });
        }
        self.run_command(cmd, args_text(args), timeout)
    }

    fn run_command(&self, cmd: Command, what: String, timeout: Duration) -> Result<String> {
        let t = std::time::Instant::now();
        let out = child::output(cmd, timeout).map_err(|e| Error::io(e.to_string()));
        log::debug!("virsh {what}: {:?}", t.elapsed());
        let out = out?;
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr);
            return Err(Error::io(format!(
                "virsh {what}: {}",
                said.trim()
                    .trim_start_matches("error: ")
                    .replace('\n', "; ")
            )));
        }
        String::from_utf8(out.stdout).map_err(|_| Error::io(format!("virsh {what}: not UTF-8")))
    }
}

/// Closes every descriptor from `first` on (the daemon's own, such as
/// /dev/fuse, which a long-lived virsh would otherwise keep open).
/// Async-signal-safe: one system call.
pub(super) fn close_from(first: i32) -> std::io::Result<()> {
    // SAFETY: close_range(2) with no pointer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `--pass-fds` value for `n` descriptors handed over with
/// [`Virsh::run_with_fds`].
pub fn passed_fds(n: usize) -> String {
    (0..n as i32)
        .map(|i| (FIRST_PASSED_FD + i).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The first words of a command, for messages.
fn args_text<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    args.iter()
        .take(2)
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_fds_count_from_three() {
        assert_eq!(passed_fds(0), "");
        assert_eq!(passed_fds(1), "3");
        assert_eq!(passed_fds(3), "3,4,5");
    }
}
