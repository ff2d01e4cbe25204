//! Frozen views: read-only raw views of a disk at a snapshot, the bytes
//! behind `<domain>/<snapshot>/disks/<target>`, read directly from the
//! image files with `pread` (no server, no child process).
//!
//! - [`image`]: the bytes of one image ([`Storage`]: a file opened once,
//!   never through a symlink, or a buffer in memory).
//! - [`qcow2`]: one qcow2 image at a fixed L1 table (an internal
//!   snapshot's, or the active one of an image nobody writes any more):
//!   the header, the snapshot table, L1/L2 lookups (extended L2 entries
//!   included), every field checked.
//! - [`compressed`]: compressed clusters (deflate, zstd).
//! - [`chain`]: a frozen disk, the top image over the backing chain its
//!   headers record (qcow2 and raw): reads, `SEEK_DATA`/`SEEK_HOLE`,
//!   allocated bytes; [`check_image`] is the fuzzing entry point.
//! - [`diff`]: the changed extents between two frozen disks (the runs
//!   whose bytes do not come from the same cluster of the same file).
//! - [`apply`]: a full copy of a disk brought forward over a changes
//!   file and its map (`vmsnapfs apply`).
//!
//! Malformed metadata is an `InvalidData` error (`EIO`); layouts read only
//! by QEMU by design (encryption, external data files, unknown
//! incompatible features) are `Unsupported` errors (`EIO` too). The
//! domain's `.log` gets a line saying why.

pub mod apply;
pub mod chain;
pub mod compressed;
pub mod diff;
pub mod image;
pub mod qcow2;
#[cfg(test)]
mod test_images;

pub use chain::{check_image, Chain};
pub use image::Storage;

/// Where the failures of views are told (the domain's `.log`).
#[derive(Clone)]
pub struct ErrorSink(pub std::sync::Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for ErrorSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ErrorSink")
    }
}

/// What the tree needs of a frozen view, however it is served.
pub trait FrozenView: Send + Sync {
    /// Reads at `offset`; fewer bytes only at the end of the disk.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
    /// `lseek(SEEK_DATA)`: `None` means `ENXIO`.
    fn seek_data(&self, offset: u64) -> std::io::Result<Option<u64>>;
    /// `lseek(SEEK_HOLE)`: `None` means `ENXIO`.
    fn seek_hole(&self, offset: u64) -> std::io::Result<Option<u64>>;
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
