//! What really happens to the VM and its images: QMP on a running QEMU,
//! `qemu-img` on a stopped one. Never imports FUSE.

pub mod block_dev;
pub mod capabilities;
pub mod child;
pub mod cmdline;
pub mod external;
pub mod fdset;
pub mod fingerprint;
pub mod guest_agent;
pub mod image_lock;
pub mod images;
pub mod liveness;
pub mod machine;
pub mod managed;
pub mod memory_file;
pub mod merge;
pub mod opened;
pub mod precopy;
pub mod process;
pub mod qemu;
pub mod qemu_img;
pub mod qmp;
pub mod qmp_message;
pub mod qmp_ops;
pub mod ram_way;
mod trust;

pub use images::{Images, OnMade, QemuImg};
pub use qemu::QemuBackend;

use std::path::PathBuf;

use crate::error::Result;
use crate::model::{DiskDef, DomainState, MemoryFormat, SnapshotState};

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

/// Why a domain is neither shut off nor answering on its monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    /// In words, for `.state` and `.log` ("no greeting within 5s").
    pub reason: String,
    /// True when a process holds the images (QEMU's locks, or the
    /// recorded QEMU process runs): operations get EBUSY, else EIO.
    pub held: bool,
}

/// What an external snapshot makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalPlan {
    /// Each disk that gets a new overlay (target, overlay path); the
    /// disk's current active layer becomes the snapshot's point.
    pub overlays: Vec<(String, PathBuf)>,
    /// Where to save the guest's RAM and device state, for a checkpoint
    /// of a running or paused VM (ignored when it is stopped).
    pub memory: Option<PathBuf>,
    /// How the memory file holds the RAM (see [`Backend::memory_format`]).
    pub memory_format: MemoryFormat,
}

impl ExternalPlan {
    /// New overlays for `overlays`, no memory file.
    pub fn disks_only(overlays: Vec<(String, PathBuf)>) -> ExternalPlan {
        ExternalPlan {
            overlays,
            memory: None,
            memory_format: MemoryFormat::default(),
        }
    }
}

/// How an external snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalOutcome {
    /// What the snapshot records.
    pub state: SnapshotState,
    /// Each switched disk's previous active layer (the snapshot's point).
    pub points: Vec<(String, PathBuf)>,
    /// Whether the memory file was written.
    pub memory_saved: bool,
    /// Something the user should know (a fallback taken), for `.log`.
    pub note: Option<String>,
    /// How long the guest was paused, when QEMU runs.
    pub paused_for: Option<std::time::Duration>,
    /// Where the pause went, for `.log` (`disks switched at 120.1 ms,
    /// ...`), when the guest was paused.
    pub pause_steps: Option<String>,
    /// The machine type of the saved state (`pc-q35-7.2`), for a checkpoint.
    pub machine: Option<String>,
    /// The memory file's format when it differs from the plan's (a live
    /// copy that did not converge fell back to a background stream).
    pub memory_format: Option<MemoryFormat>,
}

/// A revert to an external snapshot: each disk gets a new overlay over
/// the snapshot's point image (a branch); the images in use before stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRevert {
    /// (target, point image, new overlay) for each disk the snapshot holds.
    pub branches: Vec<(String, PathBuf, PathBuf)>,
    /// The snapshot's memory file, for a checkpoint (loaded into a new
    /// QEMU process unless the domain is left stopped).
    pub memory: Option<PathBuf>,
    /// How the memory file holds the RAM.
    pub memory_format: MemoryFormat,
    /// The machine type the saved state needs, when recorded: the new
    /// process emulates it even if the command line names an alias
    /// (`q35`) that a newer QEMU maps to a newer machine.
    pub machine: Option<String>,
    /// The domain's state before the revert.
    pub live: DomainState,
    /// The state to leave it in.
    pub target: DomainState,
}

/// Which way two images of a chain become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeKind {
    /// The upper image's data goes down into the lower one; the upper
    /// image is then unused (block-commit / `qemu-img commit`).
    Commit,
    /// The lower image's data goes up into the upper one, which then
    /// backs onto the lower one's backing; the lower image is then unused
    /// (block-stream / `qemu-img rebase`).
    Stream,
}

/// Two adjacent images of a disk's chain to merge, keeping what every
/// image above reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// The disk.
    pub target: String,
    /// Commit or stream.
    pub kind: MergeKind,
    /// The backing image.
    pub lower: PathBuf,
    /// The image right above it (its only child).
    pub upper: PathBuf,
    /// Images whose backing is `upper` (a commit points them at `lower`).
    pub above: Vec<PathBuf>,
}

/// What runs around the instant a running guest's disks switch to a
/// snapshot (the guest agent's freeze and thaw): the backend calls
/// [`SwitchHook::before_switch`] right before the QMP transaction, once
/// everything else is ready, and [`SwitchHook::after_switch`] right
/// after it, whether it worked or not, before anything else.
pub trait SwitchHook {
    /// Right before the switch; an error aborts the snapshot with
    /// nothing switched.
    fn before_switch(&self) -> Result<()>;
    /// Right after the switch (or its failure), when `before_switch`
    /// succeeded.
    fn after_switch(&self);
}

/// Runs `switch` inside `hook` (when there is one): the switch does not
/// start when [`SwitchHook::before_switch`] fails, and
/// [`SwitchHook::after_switch`] runs whatever the switch did.
pub fn hooked<T>(hook: Option<&dyn SwitchHook>, switch: impl FnOnce() -> Result<T>) -> Result<T> {
    if let Some(h) = hook {
        h.before_switch()?;
    }
    let r = switch();
    if let Some(h) = hook {
        h.after_switch();
    }
    r
}

/// The primitive actions on one domain. The domain layer decides which to
/// run (and refuses what is unsafe); a backend just does them.
pub trait Backend: Send + Sync {
    /// Re-reads the live state, connecting to the monitor if needed;
    /// every wait on the monitor has a deadline. `Unreachable` when the
    /// monitor does not answer in time and nothing proves QEMU gone (see
    /// [`Backend::unreachable`] for why).
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
    /// `live` was read. `hook` runs around the disks' transaction of a
    /// disk-only snapshot of a running guest (see [`SwitchHook`]).
    fn create_internal(
        &self,
        tag: &str,
        live: DomainState,
        memory: bool,
        hook: Option<&dyn SwitchHook>,
    ) -> Result<SnapshotState>;

    /// Deletes internal snapshot `tag` from every disk that has it.
    fn delete_internal(&self, tag: &str) -> Result<()>;

    /// Deletes internal snapshot `tag` from `image`, an image that is not
    /// an active layer. Returns false when that cannot be done now: the
    /// running QEMU has the image open as a backing image (QEMU deletes
    /// internal snapshots of root nodes only); the tag is then harmless
    /// and is deleted once the domain is stopped.
    fn delete_tag_in(&self, image: &std::path::Path, tag: &str) -> Result<bool>;

    /// Records `images` as the active layers of their disks (target,
    /// image). Only while QEMU is stopped: it would not follow.
    fn set_active_layers(&self, images: &[(String, PathBuf)]) -> Result<()>;

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

    /// Why the domain is unreachable, when the last look found it so.
    fn unreachable(&self) -> Option<Unreachable>;

    /// Lines for the domain's `.log` gathered since the last call (the
    /// active layers a (re)connection found changed, for instance).
    fn take_notes(&self) -> Vec<String>;

    /// After a failed create: a sentence when the filesystem of an image
    /// lacks the room a snapshot needs (QEMU reports a full disk during a
    /// RAM save as a plain I/O error).
    fn space_shortage(&self) -> Option<String>;

    /// True when a command line to start the domain is known.
    fn can_start(&self) -> bool;

    /// The command line a start runs: the definition's (or the recorded)
    /// argv pointed at each disk's active layer, without the options
    /// vmsnapfs adds for itself (`-S`, `-loadvm`, `-incoming`).
    fn start_argv(&self) -> Result<Vec<String>>;

    /// Each disk with its active layer (where guest writes go now).
    fn active_disks(&self) -> Vec<DiskDef>;

    /// Takes an external snapshot: the disks in `plan` switch to new
    /// overlays atomically (one transaction when QEMU runs); with
    /// `plan.memory` and QEMU up, RAM is saved to that file at the same
    /// instant (live with background-snapshot when the guest runs). On
    /// failure nothing is left: overlays are merged back and removed.
    /// `hook` runs around the disks' transaction of a disk-only snapshot
    /// of a running guest (see [`SwitchHook`]).
    fn create_external(
        &self,
        plan: &ExternalPlan,
        live: DomainState,
        hook: Option<&dyn SwitchHook>,
    ) -> Result<ExternalOutcome>;

    /// Undoes a completed [`Backend::create_external`]: merges each
    /// overlay that is an active layer back into its backing image,
    /// removes the overlays and the memory file.
    fn undo_external(&self, plan: &ExternalPlan) -> Result<()>;

    /// After a crash during [`Backend::create_external`]: true when the
    /// overlays are in use (QEMU switched to them, or a guest wrote to
    /// them), which are then recorded as the active layers; otherwise the
    /// unused overlays and any partial memory file are removed.
    fn settle_external(&self, plan: &ExternalPlan) -> Result<bool>;

    /// Reverts to an external snapshot as `revert` says: without RAM on
    /// a running QEMU, the devices switch to the new overlays in place
    /// (and the guest is reset); with RAM, a new QEMU process loads it.
    /// Returns once the domain is in `revert.target`. Before the switch a
    /// failure removes the new overlays; after it, the error says so.
    fn revert_external(&self, revert: &ExternalRevert) -> Result<()>;

    /// Makes the new overlays of a revert ahead of it (target, point image,
    /// overlay, point format), side by side, while the guest still runs.
    fn prepare_overlays(&self, branches: &[(String, PathBuf, PathBuf, String)]) -> Result<()>;

    /// Why the running hypervisor cannot change its disks now, when it
    /// cannot (QEMU 7.2 keeps its images inactive after saving the RAM of
    /// a paused guest, until the guest resumes): snapshot operations that
    /// work on the live disks are refused (EBUSY) with this sentence.
    fn disks_unavailable(&self) -> Option<String>;

    /// After a restart: finishes the block jobs an earlier daemon left in
    /// the running QEMU (an active commit waiting for `job-complete`, a
    /// concluded job never dismissed). Returns how many it settled.
    fn settle_leftover_jobs(&self) -> Result<usize>;

    /// The format a checkpoint's memory file gets when the domain is
    /// `live` and the file is `memory`: RAM at fixed offsets, written in
    /// parallel, when the guest is paused anyway and QEMU can; otherwise
    /// the plain stream (a running guest's live checkpoint writes the
    /// stream in the background, which keeps its pause shortest).
    fn memory_format(&self, _live: DomainState, _memory: &std::path::Path) -> MemoryFormat {
        MemoryFormat::Stream
    }

    /// Fails with ENOTSUP (and why) when the running QEMU cannot load a
    /// memory file of `format`; `Ok` when it can or when QEMU is stopped
    /// (the QEMU that a revert starts is asked again before it loads).
    fn can_load_memory(&self, _format: MemoryFormat) -> Result<()> {
        Ok(())
    }

    /// A warning about the QEMU in front of us (outside the tested range).
    fn qemu_warning(&self) -> Option<String> {
        None
    }

    /// Merges two images (see [`Merge`]): live with a block job when the
    /// running QEMU has them open, with `qemu-img` otherwise. Safe to run
    /// again after an interruption. `progress` sees (done, total) bytes.
    fn merge(&self, merge: &Merge, progress: &mut dyn FnMut(u64, u64)) -> Result<()>;
}
