//! A domain whose QEMU another manager (libvirt) starts and stops: the
//! QEMU backend asks it instead of running a command line, and tells it
//! when the disks' active layers change so that the manager's own
//! definition names them. A manager also keeps its own view of the
//! running QEMU's disks, which follows only the changes the manager
//! itself makes: every change of a running domain's images (a switch to
//! overlays, a merge) goes through it, and a device never switches to
//! other images behind it.

use std::path::Path;

use crate::error::Result;
use crate::model::DiskDef;

/// What the QEMU backend asks of the manager of a domain's QEMU.
pub trait Manager: Send + Sync {
    /// The pid of the domain's QEMU process as the manager records it,
    /// while it runs.
    fn qemu_pid(&self) -> Option<i32>;

    /// Starts QEMU from the manager's definition, paused before the
    /// guest runs (the backend checks the disks, then resumes it).
    fn start_paused(&self) -> Result<()>;

    /// Starts QEMU from the manager's definition with the disks on
    /// `disks`, loading the guest's RAM from `memory` (a QEMU migration
    /// stream, read from its start, never written), and leaves the guest
    /// paused (the backend checks the disks, then resumes it).
    fn restore_paused(&self, memory: &std::fs::File, disks: &[DiskDef]) -> Result<()>;

    /// Stops QEMU at once (the guest's RAM is lost, the images stay).
    fn destroy(&self) -> Result<()>;

    /// The disks' active layers changed: the manager's definitions (the
    /// persistent one always; the live one where the manager can change
    /// it) are made to name `disks`.
    fn layers_changed(&self, disks: &[DiskDef]) -> Result<()>;

    /// Switches disks of the running QEMU, all at once, to the qcow2
    /// overlays vmsnapfs made over their active layers (target, overlay);
    /// the disks named in `unchanged` keep theirs. The manager opens the
    /// existing files (it never creates one) and its live definition
    /// then names them.
    fn switch_to_overlays(&self, overlays: &[(String, &Path)], unchanged: &[&str]) -> Result<()>;

    /// Merges `top` (an image below the active layer; `None`: the active
    /// layer, which the disk then leaves for `base`) into `base` on disk
    /// `target` of the running QEMU, with the manager's block job, and
    /// waits for it.
    fn commit(&self, target: &str, top: Option<&Path>, base: &Path) -> Result<()>;

    /// Copies into the active layer of disk `target` of the running QEMU
    /// what the images above `base` hold (`None`: the whole chain), which
    /// then backs onto `base`, with the manager's block job, and waits.
    fn pull(&self, target: &str, base: Option<&Path>) -> Result<()>;

    /// Who manages the domain, for messages ("libvirt qemu:///system").
    fn describe(&self) -> String;
}
