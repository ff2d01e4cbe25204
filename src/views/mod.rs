//! Frozen views: read-only raw views of a disk at a snapshot, the bytes
//! behind `<domain>/<snapshot>/disks/<target>`.
//!
//! A view is served over NBD, never by parsing qcow2 here: QEMU's own block
//! layer reads the image, so every byte is what QEMU itself would read.
//!
//! - [`source`]: *what* is exported and *who* serves it. A [`ViewSource`]
//!   is an image (an external snapshot's point, a backing file) or an
//!   internal snapshot inside a qcow2 image. [`NbdServer`] runs
//!   `qemu-nbd --image-opts -r -t -e 0 -k SOCK -x view [-l snapshot.name=TAG]
//!   driver=qcow2,file.driver=file,file.filename=IMG,force-share=on,read-only=on`
//!   as a child (read-only and `force-share`, so images a running QEMU
//!   holds can be read), stopped by pid when dropped. [`View`] is an open
//!   view: `read_at` (pread semantics, zero-filled holes), `seek_data`,
//!   `seek_hole`. [`LazyView`] opens on first use and is released by
//!   `close_if_idle`, reopening on the next read.
//! - [`nbd`]: the protocol. [`NbdClient`] is one synchronous connection
//!   over a Unix socket (fixed newstyle, structured replies,
//!   `base:allocation`, `NBD_OPT_GO` with block size constraints,
//!   READ, BLOCK_STATUS, DISC on drop, socket timeouts). Malformed server
//!   data is an [`NbdError`], never a panic. [`NbdPool`] spreads parallel
//!   reads over several connections, reconnecting after a failure.
//! - [`extents`]: the allocation map of a view, loaded lazily from
//!   BLOCK_STATUS one chunk (1 GiB) at a time and cached, answering
//!   `lseek(2)` questions. `NBD_STATE_HOLE` makes a hole for
//!   SEEK_DATA/SEEK_HOLE; only `NBD_STATE_ZERO` lets a read be answered
//!   with zeroes without asking the server.
//!
//! Views of an export that someone else serves (QEMU's built-in NBD server
//! for a backing node of a running VM, `block-export-add`) use
//! [`View::connect`] on that socket instead of starting `qemu-nbd`.
//!
//! Errors convert to `std::io::Error` with the errno FUSE should return
//! (`EIO` for protocol and connection failures, `ETIMEDOUT` for timeouts,
//! the server's errno for its errors).

pub mod extents;
pub mod nbd;
pub mod qcow2;
pub mod source;

pub use extents::{ExtentMap, ExtentSource, Run};
pub use nbd::{
    BlockSize, ExportInfo, Extent, NbdClient, NbdError, NbdOptions, NbdPool, NBD_STATE_HOLE,
    NBD_STATE_ZERO,
};
pub use source::{
    ErrorSink, LazyView, NbdServer, View, ViewError, ViewOptions, ViewSource, EXPORT_NAME,
};

/// What the tree needs of a frozen view, however it is served.
pub trait FrozenView: Send + Sync {
    /// Reads at `offset`; fewer bytes only at the end of the disk.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
    /// `lseek(SEEK_DATA)`: `None` means `ENXIO`.
    fn seek_data(&self, offset: u64) -> std::io::Result<Option<u64>>;
    /// `lseek(SEEK_HOLE)`: `None` means `ENXIO`.
    fn seek_hole(&self, offset: u64) -> std::io::Result<Option<u64>>;
}

impl FrozenView for LazyView {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        LazyView::read_at(self, offset, buf)
    }
    fn seek_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        LazyView::seek_data(self, offset)
    }
    fn seek_hole(&self, offset: u64) -> std::io::Result<Option<u64>> {
        LazyView::seek_hole(self, offset)
    }
}

/// An internal snapshot read directly from its qcow2 file, falling back
/// to a `qemu-nbd` view for what the direct reader does not handle
/// (compressed clusters).
pub struct DirectView {
    /// The direct reader.
    pub direct: qcow2::Qcow2Snapshot,
    /// The server-backed view, started only if ever needed.
    pub fallback: std::sync::Arc<LazyView>,
}

impl FrozenView for DirectView {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.direct.read_at(offset, buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                self.fallback.read_at(offset, buf)
            }
            other => other,
        }
    }
    fn seek_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        match self.direct.seek_data(offset) {
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                self.fallback.seek_data(offset)
            }
            other => other,
        }
    }
    fn seek_hole(&self, offset: u64) -> std::io::Result<Option<u64>> {
        match self.direct.seek_hole(offset) {
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                self.fallback.seek_hole(offset)
            }
            other => other,
        }
    }
}

/// A plain file served as is (the memory file of a checkpoint): no holes.
pub struct FileView {
    file: std::fs::File,
    len: u64,
}

impl FileView {
    /// Opens `path` read-only, never through a symlink.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let len = file.metadata()?.len();
        Ok(FileView { file, len })
    }
}

impl FrozenView for FileView {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.file, buf, offset)
    }
    fn seek_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        Ok((offset < self.len).then_some(offset))
    }
    fn seek_hole(&self, offset: u64) -> std::io::Result<Option<u64>> {
        Ok((offset < self.len).then_some(self.len))
    }
}
