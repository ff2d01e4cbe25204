//! QEMU-compatible image locks that deny writers.
//!
//! QEMU's file driver (`block/file-posix.c`, `locking=auto|on`) tells other
//! processes which permissions it holds and which it does not share with
//! open-file-description (OFD) read locks on single bytes of the image
//! file: byte `100 + bit` for each permission held, byte `200 + bit` for
//! each permission not shared, with the bits in `BLK_PERM_*` order
//! (`CONSISTENT_READ` 0, `WRITE` 1, `WRITE_UNCHANGED` 2, `RESIZE` 3). Before
//! it takes a permission, QEMU tests for a conflicting lock on that
//! permission's "not shared" byte and refuses with `Failed to get "write"
//! lock` / `Is another process using the image [PATH]?`.
//!
//! A [`WriterLock`] holds the "not shared" bytes of `WRITE`,
//! `WRITE_UNCHANGED` and `RESIZE` (201-203) and no permission byte: QEMU
//! and `qemu-img` can still open the image read-only (a backing image, a
//! view with `force-share`, `qemu-img info`), but nothing that honours the
//! locks can open it writable or resize it. Verified with QEMU 7.2 and
//! 10.0. Closing the lock's file releases it (also when the daemon dies).

use nix::fcntl::{fcntl, FcntlArg};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// QEMU's `RAW_LOCK_SHARED_BASE`: byte 200 + bit is "bit not shared".
const SHARED_BASE: i64 = 200;
/// `BLK_PERM_WRITE`, `BLK_PERM_WRITE_UNCHANGED`, `BLK_PERM_RESIZE`: bits 1-3.
const DENIED_BITS: std::ops::RangeInclusive<i64> = 1..=3;

/// A held lock denying writers of one image file.
#[derive(Debug)]
pub struct WriterLock {
    file: File,
}

impl WriterLock {
    /// Opens `image` read-only (never following a symlink) and takes the
    /// locks. Fails if the file cannot be opened, or a process holds a
    /// conflicting (write) lock on those bytes.
    pub fn deny_writers(image: &Path) -> io::Result<WriterLock> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(image)?;
        // QEMU locks a block device (`host_device`) the same way; only
        // one accepted as a layer is locked here.
        if !file.metadata()?.is_file() && !super::block_dev::accepted(image, &file) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let start = SHARED_BASE + DENIED_BITS.start();
        let len = DENIED_BITS.end() - DENIED_BITS.start() + 1;
        ofd_lock(&file, libc::F_RDLCK as i16, start, len)?;
        Ok(WriterLock { file })
    }

    /// True when a process (QEMU, `qemu-img`) holds `image` open with the
    /// `WRITE` permission (its byte 101 is locked).
    pub fn has_writer(image: &Path) -> io::Result<bool> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(image)?;
        // A write lock would conflict with any read lock on the byte.
        Ok(ofd_conflict(&file, libc::F_WRLCK as i16, 101, 1)? != libc::F_UNLCK as i16)
    }

    /// The locked file's device and inode, to tell whether a path still
    /// names it.
    pub fn identity(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }
}

fn flock(kind: i16, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as i16,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

/// Takes (or with `F_UNLCK` drops) an OFD lock of `kind` on `len` bytes
/// at `start`, without waiting.
fn ofd_lock(file: &File, kind: i16, start: i64, len: i64) -> io::Result<()> {
    let fl = flock(kind, start, len);
    fcntl(file, FcntlArg::F_OFD_SETLK(&fl))?;
    Ok(())
}

/// `F_OFD_GETLK`: the type of a lock someone else holds that would
/// conflict with a lock of `kind` on `len` bytes at `start`
/// (`F_UNLCK` when none would).
pub fn ofd_conflict(file: &File, kind: i16, start: i64, len: i64) -> io::Result<i16> {
    let mut fl = flock(kind, start, len);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_description_sees_the_lock_and_closing_releases_it() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let lock = WriterLock::deny_writers(&img).unwrap();
        // What QEMU tests before it takes WRITE: byte 201, as a write lock.
        let probe = File::open(&img).unwrap();
        let wr = libc::F_WRLCK as i16;
        assert_eq!(
            ofd_conflict(&probe, wr, 201, 1).unwrap(),
            libc::F_RDLCK as i16,
            "byte 201 is held"
        );
        // Reading (byte 200) and writers' bytes (101) are free.
        for byte in [200, 101] {
            assert_eq!(
                ofd_conflict(&probe, wr, byte, 1).unwrap(),
                libc::F_UNLCK as i16,
                "byte {byte} is free"
            );
        }
        assert!(!WriterLock::has_writer(&img).unwrap());
        drop(lock);
        assert_eq!(
            ofd_conflict(&probe, wr, 201, 1).unwrap(),
            libc::F_UNLCK as i16,
            "released on close"
        );
        let link = dir.join("link");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        assert!(WriterLock::deny_writers(&link).is_err(), "no symlink");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
