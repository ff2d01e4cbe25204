//! What the domain layer asks of disk images outside a running QEMU: their
//! backing chains and internal snapshot tables, how much data an image
//! holds itself, and the few offline changes a revert in backing images
//! makes (copy out, rebase, revert a tag in place). [`QemuImg`] does it
//! with `qemu-img`; tests give the domain an in-memory one.

use std::path::Path;

use super::qemu_img::{self, ChainImage};
use super::ImageSnapshot;
use crate::error::Result;
use crate::store::owned::FileId;

/// Told the device and inode of a file as soon as it exists (to record
/// it before anything else can happen to the name).
pub type OnMade<'a> = &'a dyn Fn(FileId) -> Result<()>;

/// Disk images, read and changed offline (never probing a format).
pub trait Images: Send + Sync {
    /// The backing chain of `image` opened as `format`, top first.
    fn chain(&self, image: &Path, format: &str) -> Result<Vec<ChainImage>>;

    /// The internal snapshots of qcow2 `image`.
    fn tags(&self, image: &Path) -> Result<Vec<ImageSnapshot>>;

    /// Whether qcow2 `image` holds any internal snapshot.
    fn has_tags(&self, image: &Path) -> Result<bool> {
        Ok(!self.tags(image)?.is_empty())
    }

    /// Bytes `image` itself holds (not its backing chain).
    fn own_bytes(&self, image: &Path, format: &str) -> Result<u64>;

    /// True when `image` itself holds any data.
    fn has_own_data(&self, image: &Path, format: &str) -> Result<bool> {
        Ok(self.own_bytes(image, format)? > 0)
    }

    /// Copies the current contents of qcow2 `image` into a new image
    /// `copy` over the same backing image; `made` is told the new file's
    /// device and inode as soon as it exists.
    fn copy_above_backing(&self, image: &Path, copy: &Path, made: OnMade) -> Result<()>;

    /// Points qcow2 `image` at `backing` without copying data.
    fn rebase_unsafe(&self, image: &Path, backing: &Path, backing_format: &str) -> Result<()>;

    /// Reverts qcow2 `image` in place to its internal snapshot `tag`.
    fn apply_tag(&self, image: &Path, tag: &str) -> Result<()>;
}

/// [`Images`] with `qemu-img` (see [`qemu_img`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct QemuImg;

impl Images for QemuImg {
    fn chain(&self, image: &Path, format: &str) -> Result<Vec<ChainImage>> {
        qemu_img::chain(image, format)
    }

    fn tags(&self, image: &Path) -> Result<Vec<ImageSnapshot>> {
        qemu_img::list(image)
    }

    fn has_tags(&self, image: &Path) -> Result<bool> {
        qemu_img::has_snapshots(image)
    }

    fn own_bytes(&self, image: &Path, format: &str) -> Result<u64> {
        qemu_img::own_bytes(image, format)
    }

    fn copy_above_backing(&self, image: &Path, copy: &Path, made: OnMade) -> Result<()> {
        qemu_img::copy_above_backing(image, copy, made)
    }

    fn rebase_unsafe(&self, image: &Path, backing: &Path, backing_format: &str) -> Result<()> {
        qemu_img::rebase_unsafe(image, backing, backing_format)
    }

    fn apply_tag(&self, image: &Path, tag: &str) -> Result<()> {
        qemu_img::apply(image, tag)
    }
}
