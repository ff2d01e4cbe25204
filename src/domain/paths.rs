//! Where the files of a new snapshot may go: every file name fits, no
//! path is named twice or is already in use, and a caller other than
//! root places files only beside the domain's disk images, in a directory
//! it could write itself.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::Domain;
use crate::backend::qemu_img::canonical;
use crate::error::{Error, ErrorKind, Result};
use crate::model::MemoryLocation;

/// Longest file name (one path component), in bytes.
const MAX_FILE_NAME: usize = 255;
/// Longest path, in bytes (PATH_MAX less the NUL).
const MAX_PATH: usize = 4095;

/// Who asked for an operation (from the FUSE request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id.
    pub pid: u32,
}

impl Caller {
    /// The daemon itself, or root: no restriction on paths.
    pub const ROOT: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };

    /// The caller's groups: its primary group and, read from
    /// `/proc/<pid>/status`, its supplementary ones.
    fn groups(&self) -> HashSet<u32> {
        let mut g: HashSet<u32> = [self.gid].into();
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid));
        if let Some(line) = status
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Groups:"))
        {
            g.extend(
                line[7..]
                    .split_whitespace()
                    .filter_map(|x| x.parse::<u32>().ok()),
            );
        }
        g
    }
}

/// `ENAMETOOLONG` if a file name of `paths` is over 255 bytes or a path
/// over 4095, before anything is made.
pub fn check_lengths<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    for p in paths {
        let name = p.file_name().map_or(0, |n| n.len());
        if name > MAX_FILE_NAME {
            return Err(Error::new(
                ErrorKind::NameTooLong,
                format!(
                    "file name {:?} would be {name} bytes, the limit is {MAX_FILE_NAME} \
                     (choose a shorter snapshot name or file)",
                    short(p)
                ),
            ));
        }
        if p.as_os_str().len() > MAX_PATH {
            return Err(Error::new(
                ErrorKind::NameTooLong,
                format!("a path of {} bytes is too long", p.as_os_str().len()),
            ));
        }
    }
    Ok(())
}

/// The start of a long file name, for `.log`.
fn short(p: &Path) -> String {
    let n = p.file_name().unwrap_or_default().to_string_lossy();
    match n.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &n[..i]),
        None => n.into_owned(),
    }
}

/// `EINVAL` if one of `paths` is not UTF-8: snapshot.xml names every
/// file of a snapshot, and XML holds only UTF-8 text (a byte of another
/// encoding would name another file). Checked before anything is made.
pub fn check_utf8<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    match paths.into_iter().find(|p| p.to_str().is_none()) {
        Some(p) => Err(Error::invalid(format!(
            "{} is not UTF-8 text: snapshot.xml (XML) cannot name it; nothing was made \
             (name the images by a path in UTF-8, e.g. through a link to their directory)",
            p.display()
        ))),
        None => Ok(()),
    }
}

/// How two paths are compared: the directory with symlinks resolved,
/// then the file name as written.
fn key(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(d), Some(n)) => canonical(d).join(n),
        _ => p.to_owned(),
    }
}

/// `EINVAL` when one path is named twice among `paths`.
pub fn check_distinct<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    let mut seen = HashSet::new();
    for p in paths {
        if !seen.insert(key(p)) {
            return Err(Error::invalid(format!(
                "{} is named twice in this snapshot (an overlay and the memory file, or two \
                 disks, would be one file)",
                p.display()
            )));
        }
    }
    Ok(())
}

/// A path made only of plain names after the root (no `.` or `..`).
fn is_plain(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// True when `caller` could create a file in directory `dir` itself.
fn may_write(caller: &Caller, dir: &Path) -> bool {
    let Ok(m) = std::fs::metadata(dir) else {
        return false;
    };
    let mode = m.mode();
    let bits = if m.uid() == caller.uid {
        mode >> 6
    } else if caller.groups().contains(&m.gid()) {
        mode >> 3
    } else {
        mode
    };
    bits & 0o3 == 0o3
}

impl Domain {
    /// The directories of the domain's disk images (symlinks resolved;
    /// for a disk defined on a block device, its first file below, see
    /// [`Domain::beside`]).
    fn image_dirs(&self) -> Vec<PathBuf> {
        self.def
            .disks
            .iter()
            .filter_map(|d| self.beside(d).ok())
            .filter_map(|p| p.parent().map(canonical))
            .collect()
    }

    /// `EACCES` unless `caller` (not root) places `path` beside one of the
    /// domain's disk images, in a directory it could write itself.
    pub(super) fn check_caller_path(&self, caller: &Caller, what: &str, path: &Path) -> Result<()> {
        if caller.uid == 0 {
            return Ok(());
        }
        let dirs = self.image_dirs();
        let denied = |why: &str| {
            Err(Error::new(
                ErrorKind::Denied,
                format!(
                    "{what} {}: {why} (uid {} may place files only in the directory of the \
                     domain's disk images, where it can write: {})",
                    path.display(),
                    caller.uid,
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        };
        if !is_plain(path) {
            return denied("not a plain absolute path");
        }
        let Some(parent) = path.parent() else {
            return denied("no directory");
        };
        let dir = canonical(parent);
        if !dirs.contains(&dir) {
            return denied("not beside the disk images");
        }
        if !may_write(caller, &dir) {
            return denied("the caller cannot write there");
        }
        Ok(())
    }

    /// `EINVAL` when one of `paths` is an image of any chain (of the live
    /// state or of a snapshot), a snapshot's memory file, or a defined image.
    pub(super) fn check_unused(&self, paths: &[&Path]) -> Result<()> {
        let graph = super::prune::ImageGraph::build(self.images.as_ref(), &self.roots(None))?;
        let mut used: HashSet<PathBuf> = graph.images().map(|p| key(p)).collect();
        used.extend(self.def.disks.iter().map(|d| key(&d.source)));
        for s in self.forest.read().iter() {
            if let MemoryLocation::External(m) = &s.memory {
                used.insert(key(m));
            }
        }
        match paths
            .iter()
            .find(|p| used.contains(&key(p)) || used.contains(&canonical(p)))
        {
            Some(p) => Err(Error::invalid(format!(
                "{} is already used by this domain (an image of a chain or a snapshot's \
                 memory file)",
                p.display()
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_duplicates() {
        let long = PathBuf::from(format!("/i/{}.qcow2", "x".repeat(251)));
        assert_eq!(
            check_lengths([long.as_path()]).unwrap_err().kind,
            ErrorKind::NameTooLong
        );
        assert!(check_lengths([Path::new("/i/vm.a.qcow2")]).is_ok());
        let a = Path::new("/nonexistent-dir/a");
        assert_eq!(
            check_distinct([a, Path::new("/nonexistent-dir/b"), a])
                .unwrap_err()
                .kind,
            ErrorKind::Invalid
        );
        assert!(is_plain(Path::new("/a/b")));
        assert!(!is_plain(Path::new("/a/../b")));
        assert!(!is_plain(Path::new("a/b")));
    }
}
