//! Whether a QEMU process still holds a domain, asked without its
//! monitor: QEMU's image locks and the recorded QEMU pid. A domain is
//! shut off only when neither shows a holder; a monitor that does not
//! answer proves nothing.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// First of QEMU's lock bytes for the permissions an opener holds
/// (`RAW_LOCK_PERM_BASE` in QEMU's block/file-posix.c).
const LOCK_PERM_BASE: i64 = 100;
/// QEMU's `BLK_PERM_WRITE` bit.
const PERM_WRITE_BIT: i64 = 1;

/// True when some open file description holds QEMU's lock on the byte
/// that says "holds write permission" on `image` (byte 101). A QEMU that
/// has the image open as a writable disk holds it, running, paused or
/// stopped by a signal; read-only openers (views with `force-share`,
/// backing images) and the daemon's own writer-denying locks (bytes
/// 201-203) do not.
pub fn write_locked(image: &Path) -> io::Result<bool> {
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(image)?;
    byte_locked(&f, LOCK_PERM_BASE + PERM_WRITE_BIT)
}

/// `F_OFD_GETLK` for a write lock on one byte: true if it would conflict.
fn byte_locked(f: &File, byte: i64) -> io::Result<bool> {
    let kind = super::image_lock::ofd_conflict(f, libc::F_WRLCK as libc::c_short, byte, 1)?;
    Ok(kind != libc::F_UNLCK as libc::c_short)
}

/// A QEMU process as the daemon last saw it on the monitor: its pid and
/// start time (field 22 of `/proc/PID/stat`), which tells a reused pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuProcess {
    /// The process id.
    pub pid: i32,
    /// Start time in clock ticks after boot.
    pub start: u64,
}

impl QemuProcess {
    /// The process `pid` as it is now, if it exists and has not exited.
    pub fn of(pid: i32) -> Option<Self> {
        if pid <= 0 || !super::process::is_alive(pid, None) {
            return None;
        }
        let start = super::process::start_time(pid)?;
        Some(QemuProcess { pid, start })
    }

    /// True while this very process (not a reuse of its pid) runs; a
    /// zombie has exited.
    pub fn alive(&self) -> bool {
        super::process::is_alive(self.pid, Some(self.start))
    }

    /// Reads the record kept in `file` (`PID START`).
    pub fn load(file: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(file).ok()?;
        let mut it = text.split_whitespace();
        Some(QemuProcess {
            pid: it.next()?.parse().ok()?,
            start: it.next()?.parse().ok()?,
        })
    }

    /// Writes the record to `file` (atomically, not durably: a process
    /// does not outlive a crash of the machine, and a crash of the daemon
    /// keeps what it wrote; an old record after a reboot names a process
    /// whose start time no live one has).
    pub fn save(&self, file: &Path) -> io::Result<()> {
        crate::store::atomic::write_transient(
            file,
            format!("{} {}\n", self.pid, self.start).as_bytes(),
        )
    }
}

/// Why the domain cannot be taken as shut off: a process holds one of
/// `images`, or the recorded QEMU process still runs. `None`: nothing
/// holds it.
pub fn holder(images: &[PathBuf], recorded: Option<QemuProcess>) -> Option<String> {
    if let Some(p) = recorded.filter(QemuProcess::alive) {
        return Some(format!("QEMU pid {} still runs", p.pid));
    }
    images.iter().find_map(|i| match write_locked(i) {
        Ok(true) => Some(format!("a process holds the write lock of {}", i.display())),
        Ok(false) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("cannot check the locks of {}: {e}", i.display())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_changed_start_is_not() {
        let me = QemuProcess::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let reused = QemuProcess {
            start: me.start + 1,
            ..me
        };
        assert!(!reused.alive());
        assert!(QemuProcess::of(0).is_none());
    }

    #[test]
    fn ofd_lock_on_the_write_byte_is_seen() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-liveness-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        assert!(!write_locked(&img).unwrap());
        // The daemon's own writer-denying lock (201-203) is not a writer.
        let denied = crate::backend::image_lock::WriterLock::deny_writers(&img).unwrap();
        assert!(!write_locked(&img).unwrap());
        drop(denied);
        // Lock byte 101 the way QEMU does (a shared lock, OFD).
        let f = File::options().read(true).open(&img).unwrap();
        let fl = libc::flock {
            l_type: libc::F_RDLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 101,
            l_len: 1,
            l_pid: 0,
        };
        nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).unwrap();
        assert!(write_locked(&img).unwrap());
        assert!(holder(std::slice::from_ref(&img), None).is_some());
        drop(f);
        assert!(!write_locked(&img).unwrap());
        assert!(holder(&[img], None).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
