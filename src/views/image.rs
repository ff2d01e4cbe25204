//! The bytes of one image file, as the readers see them: `pread` of a
//! file opened once (never through a symlink, never a FIFO, a device only
//! when accepted as a layer), or
//! a buffer in memory (the fuzz targets and corpus tests).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Something an image can be read from.
pub trait Storage: Send + Sync {
    /// Reads at `offset`; fewer bytes only at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The length in bytes.
    fn len(&self) -> u64;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The (device, inode) of a file, to find loops in a chain.
    fn identity(&self) -> Option<(u64, u64)> {
        None
    }
    /// Takes the current length again (a file a running QEMU may grow).
    fn refresh(&self) {}

    /// The next run of data of a sparse file at or after `offset`, as
    /// (start, end): its holes read as zeros (start = end = the length
    /// when only a hole is left). `None` when it cannot tell: all data.
    fn data_run(&self, _offset: u64) -> io::Result<Option<(u64, u64)>> {
        Ok(None)
    }

    /// Reads as much of `buf` as the storage holds at `offset`: the count
    /// is short only at the end.
    fn read_upto(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }

    /// Reads all of `buf` at `offset`, or fails with `InvalidData` naming
    /// `what` when that lies past the end (malformed metadata).
    fn read_exact_in(&self, buf: &mut [u8], offset: u64, what: &str) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len()) {
            return Err(malformed(format!(
                "{what} at {offset} (+{}) lies past the end of the image ({} bytes)",
                buf.len(),
                self.len()
            )));
        }
        if self.read_upto(buf, offset)? < buf.len() {
            return Err(malformed(format!("{what} at {offset}: short read")));
        }
        Ok(())
    }
}

/// An `InvalidData` error: what the image says cannot be right.
pub fn malformed(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// An image file opened read-only.
pub struct ImageFile {
    file: File,
    len: AtomicU64,
    id: (u64, u64),
}

impl ImageFile {
    /// Opens `path` read-only, never through a symlink; refuses anything
    /// but a regular file or a block device accepted as a layer
    /// ([`crate::backend::block_dev`]).
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let not_file = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file; refused", path.display()),
            )
        };
        // Looked at before it is opened: a FIFO is never opened.
        let named = std::fs::symlink_metadata(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let device = named.file_type().is_block_device();
        if !named.is_file() && !device {
            return Err(not_file());
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let meta = file.metadata()?;
        let len = if meta.is_file() {
            meta.len()
        } else if crate::backend::block_dev::accepted(path, &file) {
            crate::backend::block_dev::size_of(&file)?
        } else {
            return Err(not_file());
        };
        Ok(ImageFile {
            file,
            len: AtomicU64::new(len),
            id: (meta.dev(), meta.ino()),
        })
    }
}

impl Storage for ImageFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }
    fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }
    fn identity(&self) -> Option<(u64, u64)> {
        Some(self.id)
    }
    fn refresh(&self) {
        if let Ok(m) = self.file.metadata() {
            self.len.fetch_max(m.len(), Ordering::Relaxed);
        }
    }
    fn data_run(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        use nix::errno::Errno;
        use nix::unistd::{lseek, Whence};
        let (Ok(at), len) = (i64::try_from(offset), self.len()) else {
            return Ok(None);
        };
        // lseek on a shared descriptor moves its position, which pread
        // never uses.
        let start = match lseek(&self.file, at, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => return Ok(Some((len, len))),
            // A filesystem without SEEK_DATA: all data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let end = match lseek(&self.file, start as i64, Whence::SeekHole) {
            Ok(h) => h as u64,
            Err(Errno::ENXIO) => len,
            Err(e) => return Err(e.into()),
        };
        Ok(Some((start.min(len), end.min(len))))
    }
}

impl Storage for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = (offset.min(self.len() as u64)) as usize;
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
}
