//! vmsnapfs: the snapshots of QEMU virtual machines as a FUSE tree.
//!
//! Architecture, outside in:
//! - [`fs`] is the only module that speaks FUSE: inodes, attributes,
//!   control-file writes. It calls [`domain`] and never QMP or XML.
//! - [`domain`] runs snapshot operations for one domain: one at a time,
//!   journaled, logged, off the FUSE threads.
//! - [`backend`] does the real work: QMP on a running QEMU, `qemu-img` on
//!   the images of a stopped one.
//! - [`store`] keeps the metadata on disk: atomic writes, intent journal.
//! - [`views`] reads frozen disks from their images; [`guestfs`] reads the
//!   guest's filesystems inside them (`files/`).
//! - [`model`] and [`xml`] are pure: types, the snapshot forest, name rules,
//!   libvirt-compatible XML.

pub mod backend;
pub mod demo;
pub mod domain;
pub mod error;
pub mod failpoint;
pub mod fs;
pub mod guestfs;
pub mod libvirt;
pub mod model;
pub mod signals;
pub mod store;
pub mod views;
pub mod xml;
