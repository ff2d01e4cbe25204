//! Files vmsnapfs makes beside the images, in directories other users may
//! write: created with `O_EXCL|O_NOFOLLOW` (never over an existing file or
//! through a symlink), known by device and inode, and removed only while
//! the recorded path still names that inode, without following symlinks.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{openat, renameat2, OFlag, RenameFlags};
use nix::sys::stat::{fstatat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::safe_dir;

/// A file's device and inode numbers.
pub type FileId = (u64, u64);

/// Creates `path` with `mode`: fails with `EEXIST` if anything (a file, a
/// dangling symlink) is there. The directory is opened with
/// [`safe_dir::open_dir`], never through a symlink another user made.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    let dir = safe_dir::open_dir(parent_of(path)?)?;
    let fd = openat(
        &dir,
        safe_dir::file_name(path)?,
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )?;
    Ok(File::from(fd))
}

/// Opens the existing file `path` (read-write when `write`) without
/// following a symlink, at its last name or on the way (see
/// [`safe_dir::open_dir`]); never blocks on a FIFO.
pub fn open_existing(path: &Path, write: bool) -> io::Result<File> {
    let dir = safe_dir::open_dir(parent_of(path)?)?;
    let access = if write {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    let fd = openat(
        &dir,
        safe_dir::file_name(path)?,
        access | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

fn parent_of(path: &Path) -> io::Result<&Path> {
    path.parent().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })
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
    nix::unistd::fchown(
        file,
        Some(nix::unistd::Uid::from_raw(m.uid())),
        Some(nix::unistd::Gid::from_raw(m.gid())),
    )?;
    nix::sys::stat::fchmod(file, Mode::from_bits_truncate(m.mode() & 0o777))?;
    Ok(())
}

/// Renames `from` to `to`, failing with `EEXIST` if anything is at `to`;
/// both directories are opened as [`create_new`] opens one.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (a, b) = (
        safe_dir::open_dir(parent_of(from)?)?,
        safe_dir::open_dir(parent_of(to)?)?,
    );
    renameat2(
        &a,
        safe_dir::file_name(from)?,
        &b,
        safe_dir::file_name(to)?,
        RenameFlags::RENAME_NOREPLACE,
    )?;
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

/// Unlinks `path` itself (never what a symlink there points to), only
/// when it is a regular file and, if `expected` is given, still the inode
/// vmsnapfs made. The directory is opened with [`safe_dir::open_dir`],
/// the entry checked with `fstatat(AT_SYMLINK_NOFOLLOW)` and removed
/// with `unlinkat`.
pub fn remove(path: &Path, expected: Option<FileId>) -> io::Result<Removal> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(Removal::Refused(format!(
            "{} is not a file path",
            path.display()
        )));
    };
    let dirfd = match safe_dir::open_dir(dir) {
        Ok(fd) => fd,
        Err(e) => {
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(Removal::Absent),
                Some(libc::ELOOP) | Some(libc::ENOTDIR) | None => Ok(Removal::Refused(format!(
                    "{} cannot be opened without following a symlink others may change ({e})",
                    dir.display()
                ))),
                _ => Err(e),
            };
        }
    };
    let st = match fstatat(
        dirfd.as_fd(),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(Removal::Absent),
        Err(e) => return Err(e.into()),
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(Removal::Refused(format!(
            "{} is not a regular file (a symlink?); vmsnapfs removes only files it made",
            path.display()
        )));
    }
    if let Some((dev, ino)) = expected {
        if (st.st_dev, st.st_ino) != (dev, ino) {
            return Ok(Removal::Refused(format!(
                "{} is no longer the file vmsnapfs made (it was replaced)",
                path.display()
            )));
        }
    }
    match unlinkat(&dirfd, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => Ok(Removal::Removed),
        Err(nix::errno::Errno::ENOENT) => Ok(Removal::Absent),
        Err(e) => Err(e.into()),
    }
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
