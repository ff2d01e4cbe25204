//! ext2, ext3 and ext4 through `ext4-view`, which checks what it reads
//! (checksums where the filesystem has them, every block index against
//! the filesystem's size) and applies a journal that needs recovery in
//! memory: a crash-consistent snapshot reads as the guest's kernel would
//! mount it, and the disk is never written.

use std::io;

use ext4_view::{Ext4, Ext4Error, File, Metadata};

use super::source::Slice;
use super::{eio, errno, Attr, GuestFs, Kind, Time};

/// At most this many entries of one directory are listed.
pub const MAX_ENTRIES: usize = 1 << 20;

/// An ext2/3/4 filesystem and the file last read (sequential reads go on
/// from where the last one ended).
pub struct ExtFs {
    fs: Ext4,
    open: Option<(Vec<u8>, File)>,
}

fn io_error(e: Ext4Error) -> io::Error {
    match e {
        Ext4Error::NotFound => errno(libc::ENOENT),
        Ext4Error::NotADirectory => errno(libc::ENOTDIR),
        Ext4Error::IsADirectory => errno(libc::EISDIR),
        Ext4Error::IsASpecialFile | Ext4Error::NotASymlink => errno(libc::EINVAL),
        Ext4Error::MalformedPath | Ext4Error::NotAbsolute => errno(libc::ENOENT),
        Ext4Error::PathTooLong => errno(libc::ENAMETOOLONG),
        Ext4Error::TooManySymlinks => errno(libc::ELOOP),
        other => eio(format!("ext4: {other}")),
    }
}

fn time(t: ext4_view::Timestamp) -> Time {
    Time {
        secs: t.seconds(),
        nanos: t.nanoseconds().min(999_999_999),
    }
}

fn attr(m: &Metadata) -> Attr {
    let t = m.file_type();
    let kind = if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink
    } else if t.is_char_dev() {
        Kind::CharDev
    } else if t.is_block_dev() {
        Kind::BlockDev
    } else if t.is_fifo() {
        Kind::Fifo
    } else if t.is_socket() {
        Kind::Socket
    } else {
        Kind::File
    };
    let mtime = time(m.modified());
    Attr {
        kind,
        perm: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.len(),
        atime: time(m.accessed()),
        mtime,
        // The reader does not give the inode change time: the data's.
        ctime: mtime,
        crtime: m.created().map(time),
    }
}

/// `b""` is the root.
fn path(p: &[u8]) -> &[u8] {
    if p.is_empty() {
        b"/"
    } else {
        p
    }
}

impl ExtFs {
    /// Opens the filesystem in `source` (superblock, group descriptors,
    /// and the journal when it needs recovery).
    pub fn open(source: Slice) -> io::Result<Self> {
        let fs = Ext4::load(Box::new(source)).map_err(|e| match e {
            Ext4Error::Io(e) => eio(format!("ext4: cannot read the disk: {e}")),
            other => eio(format!("ext4: {other}")),
        })?;
        Ok(ExtFs { fs, open: None })
    }
}

impl GuestFs for ExtFs {
    fn type_name(&self) -> &'static str {
        "ext2/3/4"
    }

    fn stat(&mut self, p: &[u8]) -> io::Result<Attr> {
        self.fs
            .symlink_metadata(path(p))
            .map(|m| attr(&m))
            .map_err(io_error)
    }

    fn list(&mut self, p: &[u8]) -> io::Result<Vec<(Vec<u8>, Attr)>> {
        let mut out = Vec::new();
        for entry in self.fs.read_dir(path(p)).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            let name = entry.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            if out.len() >= MAX_ENTRIES {
                return Err(eio(format!(
                    "ext4: directory has more than {MAX_ENTRIES} entries"
                )));
            }
            let m = entry.metadata().map_err(io_error)?;
            out.push((name, attr(&m)));
        }
        Ok(out)
    }

    fn read_link(&mut self, p: &[u8]) -> io::Result<Vec<u8>> {
        self.fs
            .read_link(path(p))
            .map(|t| t.as_ref().to_vec())
            .map_err(io_error)
    }

    fn read(&mut self, p: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let reuse = matches!(&self.open, Some((q, _)) if q == p);
        if !reuse {
            if self.stat(p)?.kind != Kind::File {
                return Err(errno(libc::EINVAL));
            }
            let f = self.fs.open(path(p)).map_err(io_error)?;
            self.open = Some((p.to_vec(), f));
        }
        let Some((_, f)) = self.open.as_mut() else {
            return Err(errno(libc::EBADF));
        };
        if f.position() != offset {
            f.seek_to(offset).map_err(io_error)?;
        }
        let mut done = 0;
        while done < buf.len() {
            match f.read_bytes(&mut buf[done..]).map_err(io_error)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }
}
