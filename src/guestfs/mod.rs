//! The guest's own files (`<snapshot>/files/`): the filesystems inside a
//! snapshot's frozen disk views, read in-process with pure-Rust readers.
//!
//! - [`source`]: a byte range of a frozen view (a whole disk or one
//!   partition) as the readers want it (`Read + Seek`, `Ext4Read`); every
//!   write refused.
//! - [`table`]: what a disk holds: a filesystem on the whole disk, a
//!   partition table (GPT, MBR with logical partitions), or nothing known.
//! - [`ext`]: ext2/3/4 through `ext4-view` (a dirty journal is applied in
//!   memory, the disk never written).
//! - [`fat`]: FAT12/16/32 (vfat long names) through `fatfs`.
//! - [`disk`]: one snapshot's disk: its layout and its opened
//!   filesystems, probed and opened lazily; [`disk::check_image`] is the
//!   fuzzing entry point.
//! - [`budget`]: what one request may cost: a path depth and a time.
//! - [`workers`]: one thread per disk in use, which owns its readers; the
//!   FUSE threads hand it work and never wait for it.
//!
//! Guest disks are hostile input: every reader error is an `io::Error`
//! (`EIO` with a sentence for `.log`), every reader call runs under
//! `catch_unwind`, and sizes and counts are bounded.

pub mod budget;
pub mod disk;
pub mod ext;
pub mod fat;
pub mod source;
pub mod table;
pub mod workers;

use std::io;

/// What a guest file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A character device node.
    CharDev,
    /// A block device node.
    BlockDev,
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

/// A time as the guest stored it: seconds since the epoch (UTC) and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    /// Seconds since 1970-01-01 UTC (negative before).
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

/// The attributes of a guest file as its filesystem stores them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Its kind.
    pub kind: Kind,
    /// Permission bits, with setuid, setgid and sticky (`0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (a symlink: the length of its target).
    pub size: u64,
    /// Last access.
    pub atime: Time,
    /// Last data change.
    pub mtime: Time,
    /// Last inode change.
    pub ctime: Time,
    /// Creation, where the filesystem records it.
    pub crtime: Option<Time>,
}

impl Attr {
    /// A directory with mode `perm`, owned by root, with no times: what a
    /// place the guest does not store (a root, `.`) shows.
    pub fn dir(perm: u16) -> Attr {
        Attr {
            kind: Kind::Dir,
            perm,
            uid: 0,
            gid: 0,
            size: 0,
            atime: Time::default(),
            mtime: Time::default(),
            ctime: Time::default(),
            crtime: None,
        }
    }
}

/// A filesystem read from a guest disk. Paths are absolute byte strings
/// (`b""` or `b"/"` is the root, `b"/etc/passwd"`); nothing is followed:
/// a symlink is a file of its own.
pub trait GuestFs {
    /// `ext4`, `vfat`, ... for `.log`.
    fn type_name(&self) -> &'static str;
    /// The attributes of `path` (not following a final symlink).
    fn stat(&mut self, path: &[u8]) -> io::Result<Attr>;
    /// The entries of directory `path` (without `.` and `..`), each with
    /// its attributes.
    fn list(&mut self, path: &[u8]) -> io::Result<Vec<(Vec<u8>, Attr)>>;
    /// The target of symlink `path`.
    fn read_link(&mut self, path: &[u8]) -> io::Result<Vec<u8>>;
    /// Reads regular file `path` at `offset`; fewer bytes only at its end.
    fn read(&mut self, path: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<usize>;
}

/// The path `parent/name` (`parent` is `b""` for the root).
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent.strip_suffix(b"/").unwrap_or(parent));
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// The components of an absolute path (empty ones skipped).
pub fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|b| *b == b'/').filter(|c| !c.is_empty())
}

/// An `EIO` error carrying `text` (for `.log`).
pub(crate) fn eio(text: impl Into<String>) -> io::Error {
    io::Error::other(text.into())
}

/// An error with errno `errno` and no further text.
pub(crate) fn errno(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// Days since 1970-01-01 of a civil (proleptic Gregorian) date.
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_and_split() {
        assert_eq!(join(b"", b"etc"), b"/etc");
        assert_eq!(join(b"/", b"etc"), b"/etc");
        assert_eq!(join(b"/etc", b"passwd"), b"/etc/passwd");
        let c: Vec<&[u8]> = components(b"/a//b/").collect();
        assert_eq!(c, vec![&b"a"[..], &b"b"[..]]);
    }

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1980, 1, 1), 3652);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
        assert_eq!(days_from_civil(2024, 2, 29), 19782);
    }
}
