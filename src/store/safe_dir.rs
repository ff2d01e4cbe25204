//! Opening the directory of an image without following a symlink that a
//! less trusted user could have made.
//!
//! A path like `/srv/vm/u/images/vda.s1.qcow2` crosses directories that
//! the VM's owner may write. If one of them is swapped for a symlink (to
//! `/etc`, say), root must not create, open or delete files where it
//! points. A symlink is followed only when the directory holding it is
//! owned by root and writable by nobody else, so that only root could have
//! made it (`/var/lib/images -> /srv/images` set up by an administrator
//! keeps working); any other symlink on the way gets `ELOOP`. Files are
//! then made, opened and removed relative to the directory descriptor
//! this returns, so nothing above it is looked up again.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::fcntl::{openat, readlinkat, OFlag, AT_FDCWD};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};

/// Symlinks followed in one path at most (as the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// Opens the directory `dir` (absolute) read-only, following only
/// symlinks that sit in root-owned directories nobody else may write.
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    if !dir.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not an absolute path", dir.display()),
        ));
    }
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut fd = openat(AT_FDCWD, "/", dir_flags, Mode::empty())?;
    let mut left: VecDeque<OsString> = components(dir.as_os_str());
    let mut followed = 0;
    while let Some(name) = left.pop_front() {
        if name == ".." {
            fd = openat(&fd, "..", dir_flags, Mode::empty())?;
            continue;
        }
        let st = fstatat(
            &fd,
            name.as_os_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
            if !only_root_writes(&fd)? {
                return Err(io::Error::other(
                    format!(
                        "{}: {} is a symlink in a directory others may change; vmsnapfs does not follow it",
                        dir.display(),
                        Path::new(&name).display()
                    ),
                ));
            }
            followed += 1;
            if followed > MAX_SYMLINKS {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = readlinkat(&fd, name.as_os_str())?;
            let mut next = components(&target);
            if Path::new(&target).is_absolute() {
                fd = openat(AT_FDCWD, "/", dir_flags, Mode::empty())?;
            }
            while let Some(c) = next.pop_back() {
                left.push_front(c);
            }
            continue;
        }
        fd = openat(
            &fd,
            name.as_os_str(),
            dir_flags | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
    }
    Ok(fd)
}

/// True when no one but root can rename, replace or add names anywhere
/// along the directory `dir` (absolute) and inside it: every directory on
/// the way is root's and writable by no one else, or root's and sticky
/// with the next name root's too. Symlinks on the way count as changeable
/// (the answer only decides how careful a caller is; `false` is safe).
pub fn only_root_can_change(dir: &Path) -> bool {
    only_root_can_change_inner(dir).unwrap_or(false)
}

fn only_root_can_change_inner(dir: &Path) -> io::Result<bool> {
    if !dir.is_absolute() {
        return Ok(false);
    }
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let mut fd = openat(AT_FDCWD, "/", dir_flags, Mode::empty())?;
    for name in components(dir.as_os_str()) {
        if name == ".." {
            return Ok(false);
        }
        let st = fstatat(
            &fd,
            name.as_os_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        let sticky_over_roots = {
            let d = fstat(fd.as_fd())?;
            d.st_uid == 0 && d.st_mode & 0o1000 != 0 && st.st_uid == 0
        };
        if !(only_root_writes(&fd)? || sticky_over_roots) {
            return Ok(false);
        }
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
            return Ok(false);
        }
        fd = openat(&fd, name.as_os_str(), dir_flags, Mode::empty())?;
    }
    only_root_writes(&fd)
}

/// The names along `path`, without `/` and `.`.
fn components(path: &OsStr) -> VecDeque<OsString> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// True when the directory `fd` is owned by root and writable by no one
/// else: only root can have put a symlink there.
fn only_root_writes(fd: &impl AsFd) -> io::Result<bool> {
    let st = fstat(fd.as_fd())?;
    Ok(st.st_uid == 0 && st.st_mode & 0o022 == 0)
}

/// The final name of `path`, which must be a plain name (not `..`).
pub fn file_name(path: &Path) -> io::Result<&OsStr> {
    match path.file_name() {
        Some(n) if !n.as_bytes().is_empty() => Ok(n),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn symlinks_only_where_only_root_writes() {
        let base = std::env::temp_dir().join(format!("vmsnapfs-safedir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let trusted = base.join("trusted");
        let open = base.join("open");
        let real = base.join("real");
        for d in [&trusted, &open, &real] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&trusted, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&real, trusted.join("link")).unwrap();
        std::os::unix::fs::symlink("../real", open.join("link")).unwrap();
        std::os::unix::fs::symlink("../real", trusted.join("rel")).unwrap();
        // Tests run as root: a root-owned 0755 directory is trusted.
        if nix::unistd::geteuid().is_root() {
            assert!(open_dir(&trusted.join("link")).is_ok());
            assert!(open_dir(&trusted.join("rel")).is_ok());
        }
        let e = open_dir(&open.join("link")).unwrap_err();
        assert!(e.to_string().contains("does not follow"), "{e}");
        assert!(open_dir(&real).is_ok());
        assert!(open_dir(&base.join("missing")).is_err());
        assert!(open_dir(Path::new("relative/dir")).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn only_roots_directories_cannot_change() {
        let base = std::env::temp_dir().join(format!("vmsnapfs-change-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let closed = base.join("closed");
        let open = base.join("open");
        let sticky = base.join("sticky");
        for d in [&closed, &open, &sticky.join("inner")] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mode = |d: &Path, m| std::fs::set_permissions(d, std::fs::Permissions::from_mode(m));
        mode(&base, 0o755).unwrap();
        mode(&closed, 0o755).unwrap();
        mode(&open, 0o777).unwrap();
        mode(&sticky, 0o1777).unwrap();
        mode(&sticky.join("inner"), 0o755).unwrap();
        assert!(!only_root_can_change(&open));
        assert!(!only_root_can_change(&open.join("..").join("closed")));
        assert!(!only_root_can_change(Path::new("relative")));
        assert!(!only_root_can_change(&base.join("missing")));
        std::os::unix::fs::symlink(&closed, base.join("link")).unwrap();
        assert!(!only_root_can_change(&base.join("link")));
        // Tests run as root, and the path to the temporary directory is
        // root's (sticky where others write).
        if nix::unistd::geteuid().is_root() && only_root_can_change(&base) {
            assert!(only_root_can_change(&closed));
            assert!(only_root_can_change(&sticky.join("inner")));
            assert!(!only_root_can_change(&sticky));
            std::os::unix::fs::chown(sticky.join("inner"), Some(65534), None).unwrap();
            assert!(!only_root_can_change(&sticky.join("inner")));
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
