//! Files vmsnapfs makes beside the images, in directories other users may
//! write: created with `O_EXCL|O_NOFOLLOW` (never over an existing file or
//! through a symlink), known by device and inode, and removed only while
//! the recorded path still names that inode, without following symlinks.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// A file's device and inode numbers.
pub type FileId = (u64, u64);

/// Creates `path` with `mode`: fails with `EEXIST` if anything (a file, a
/// dangling symlink) is there.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The device and inode of an open file.
pub fn id_of(file: &File) -> io::Result<FileId> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Gives `file` the owner, group and permission bits of `like` (the image
/// it is made from), as a copy keeps them.
pub fn copy_owner_and_mode(file: &File, like: &Path) -> io::Result<()> {
    let m = std::fs::metadata(like)?;
    let fd = file.as_raw_fd();
    // SAFETY: fchown/fchmod on a descriptor this function borrows.
    let r = unsafe { libc::fchown(fd, m.uid(), m.gid()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let r = unsafe { libc::fchmod(fd, m.mode() & 0o777) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Renames `from` to `to`, failing with `EEXIST` if anything is at `to`.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (a, b) = (c_name(from.as_os_str())?, c_name(to.as_os_str())?);
    // SAFETY: renameat2(2) of two NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The file was unlinked.
    Removed,
    /// Nothing is at the path.
    Absent,
    /// Something else is there now; it was left alone (the reason).
    Refused(String),
}

fn c_name(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Unlinks `path` itself (never what a symlink there points to), only
/// when it is a regular file and, if `expected` is given, still the inode
/// vmsnapfs made. The directory is opened with `O_NOFOLLOW`, the entry
/// checked with `fstatat(AT_SYMLINK_NOFOLLOW)` and removed with `unlinkat`.
pub fn remove(path: &Path, expected: Option<FileId>) -> io::Result<Removal> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(Removal::Refused(format!(
            "{} is not a file path",
            path.display()
        )));
    };
    let cdir = c_name(dir.as_os_str())?;
    // SAFETY: open(2) of a NUL-terminated path; the fd is owned below.
    let fd = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(Removal::Absent),
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => Ok(Removal::Refused(format!(
                "{} is not a directory (a symlink?)",
                dir.display()
            ))),
            _ => Err(e),
        };
    }
    // SAFETY: fd was just opened and is owned from here on.
    let dirfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = c_name(name)?;
    // SAFETY: fstatat into a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::fstatat(
            dirfd.as_raw_fd(),
            cname.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(Removal::Absent),
            _ => Err(e),
        };
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(Removal::Refused(format!(
            "{} is not a regular file (a symlink?); vmsnapfs removes only files it made",
            path.display()
        )));
    }
    if let Some((dev, ino)) = expected {
        if (st.st_dev as u64, st.st_ino as u64) != (dev, ino) {
            return Ok(Removal::Refused(format!(
                "{} is no longer the file vmsnapfs made (it was replaced)",
                path.display()
            )));
        }
    }
    // SAFETY: unlinkat of a name in a directory fd we hold.
    let r = unsafe { libc::unlinkat(dirfd.as_raw_fd(), cname.as_ptr(), 0) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(Removal::Absent),
            _ => Err(e),
        };
    }
    Ok(Removal::Removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_the_file_it_made() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-owned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        let f = create_new(&a, 0o600).unwrap();
        let id = id_of(&f).unwrap();
        drop(f);
        // Never over an existing file, nor through a dangling symlink.
        assert_eq!(
            create_new(&a, 0o600).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        let victim = dir.join("victim");
        std::os::unix::fs::symlink(&victim, dir.join("dangling")).unwrap();
        assert!(create_new(&dir.join("dangling"), 0o600).is_err());
        assert!(!victim.exists());
        // A replaced file stays; a symlink is never followed.
        let other = dir.join("other");
        std::fs::write(&other, b"someone else's").unwrap();
        std::fs::rename(&other, &a).unwrap();
        assert!(matches!(remove(&a, Some(id)).unwrap(), Removal::Refused(_)));
        std::fs::write(&victim, b"keep").unwrap();
        std::fs::remove_file(&a).unwrap();
        std::os::unix::fs::symlink(&victim, &a).unwrap();
        assert!(matches!(remove(&a, None).unwrap(), Removal::Refused(_)));
        assert!(victim.exists());
        std::fs::remove_file(&a).unwrap();
        let f = create_new(&a, 0o600).unwrap();
        let id = id_of(&f).unwrap();
        assert_eq!(remove(&a, Some(id)).unwrap(), Removal::Removed);
        assert_eq!(remove(&a, Some(id)).unwrap(), Removal::Absent);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
