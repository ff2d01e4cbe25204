//! What really happens to the VM and its images: QMP on a running QEMU,
//! `qemu-img` on a stopped one. Never imports FUSE.

pub mod process;
pub mod qemu;
pub mod qemu_img;
pub mod qmp;

pub use qemu::QemuBackend;

use crate::error::Result;
use crate::model::{DomainState, SnapshotState};

/// One internal snapshot found in an image's snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSnapshot {
    /// The qcow2 tag (QEMU calls it the name).
    pub tag: String,
    /// Bytes of saved state; 0 for a disk-only snapshot.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: i64,
}

/// The primitive actions on one domain. The domain layer decides which to
/// run (and refuses what is unsafe); a backend just does them.
pub trait Backend: Send + Sync {
    /// Re-reads the live state, connecting to the monitor if needed.
    fn refresh_state(&self) -> DomainState;

    /// Like [`Backend::refresh_state`], but returns `None` instead of
    /// waiting when an operation holds the monitor.
    fn try_refresh_state(&self) -> Option<DomainState>;

    /// The internal snapshots of the domain's qcow2 disks, merged by tag.
    /// Fails when any disk cannot be read.
    fn list_internal(&self) -> Result<Vec<ImageSnapshot>>;

    /// Takes internal snapshot `tag` of every qcow2 disk. When the domain
    /// was found `live` running or paused: with RAM if `memory` (returns
    /// `Running` or `Paused`), else the disks alone, atomically across
    /// disks (returns `DiskSnapshot`). When stopped: disks (returns
    /// `Shutoff`). Fails with EIO when QEMU went away or appeared since
    /// `live` was read.
    fn create_internal(&self, tag: &str, live: DomainState, memory: bool) -> Result<SnapshotState>;

    /// Deletes internal snapshot `tag` from every disk that has it.
    fn delete_internal(&self, tag: &str) -> Result<()>;

    /// On how many of the qcow2 disks internal snapshot `tag` exists,
    /// and how many qcow2 disks there are.
    fn tag_presence(&self, tag: &str) -> Result<(usize, usize)>;

    /// Loads checkpoint `tag` (RAM and disks) into the running QEMU.
    fn load_checkpoint_live(&self, tag: &str) -> Result<()>;

    /// Reverts every disk of the stopped domain to internal snapshot `tag`.
    fn apply_disks_offline(&self, tag: &str) -> Result<()>;

    /// Stops the QEMU process (QMP `quit`) and waits for it to exit.
    fn stop_process(&self) -> Result<()>;

    /// Starts QEMU from the domain's command line, loading checkpoint
    /// `loadvm` if given, paused or running.
    fn start_process(&self, loadvm: Option<&str>, paused: bool) -> Result<()>;

    /// Resumes (`cont`) or pauses (`stop`) the guest.
    fn set_running(&self, running: bool) -> Result<()>;

    /// Why the monitor socket answered but could not be used, if it did
    /// (garbage, no greeting): the domain is then treated as stopped.
    fn monitor_error(&self) -> Option<String>;

    /// After a failed create: a sentence when the filesystem of an image
    /// lacks the room a snapshot needs (QEMU reports a full disk during a
    /// RAM save as a plain I/O error).
    fn space_shortage(&self) -> Option<String>;

    /// True when a command line to start the domain is known.
    fn can_start(&self) -> bool;
}
