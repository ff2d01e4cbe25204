//! A domain whose QEMU another manager (libvirt) starts and stops: the
//! QEMU backend asks it instead of running a command line, and tells it
//! when the disks' active layers change so that the manager's own
//! definition names them.

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

    /// Stops QEMU at once (the guest's RAM is lost, the images stay).
    fn destroy(&self) -> Result<()>;

    /// The disks' active layers changed: the manager's definitions (the
    /// persistent one always; the live one where the manager can change
    /// it) are made to name `disks`.
    fn layers_changed(&self, disks: &[DiskDef]) -> Result<()>;

    /// Who manages the domain, for messages ("libvirt qemu:///system").
    fn describe(&self) -> String;
}
