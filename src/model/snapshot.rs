//! One snapshot of a domain, as the metadata records it.

use std::path::PathBuf;

/// The state a snapshot records: what the domain was doing when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// A checkpoint of a running guest.
    Running,
    /// A checkpoint of a paused guest.
    Paused,
    /// Disks of a stopped domain.
    Shutoff,
    /// Disks only, of a running or paused guest (crash-consistent unless quiesced).
    DiskSnapshot,
}

impl SnapshotState {
    /// The libvirt spelling, as used in `<state>` and the `state` file.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Running => "running",
            SnapshotState::Paused => "paused",
            SnapshotState::Shutoff => "shutoff",
            SnapshotState::DiskSnapshot => "disk-snapshot",
        }
    }

    /// Parses the libvirt spelling (`shutdown` and `shutoff` are both accepted).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => SnapshotState::Running,
            "paused" => SnapshotState::Paused,
            "shutoff" | "shutdown" => SnapshotState::Shutoff,
            "disk-snapshot" => SnapshotState::DiskSnapshot,
            _ => return None,
        })
    }
}

/// Where a snapshot's saved state (RAM and devices) lives, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLocation {
    /// No saved state: a disk-only snapshot.
    No,
    /// Inside the first qcow2 disk, beside the internal disk snapshot.
    Internal,
    /// In a file of its own.
    External(PathBuf),
}

/// How a memory file holds the guest's RAM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MemoryFormat {
    /// QEMU's plain migration stream, written and read in order (every
    /// QEMU loads it; snapshots recorded without a format have it).
    #[default]
    Stream,
    /// RAM at fixed offsets in the file (`mapped-ram`), written and read
    /// by several threads (`multifd`); needs a QEMU that has both.
    MappedRam,
}

impl MemoryFormat {
    /// The spelling in the metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryFormat::Stream => "stream",
            MemoryFormat::MappedRam => "mapped-ram",
        }
    }

    /// Parses the spelling in the metadata.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "stream" => MemoryFormat::Stream,
            "mapped-ram" => MemoryFormat::MappedRam,
            _ => return None,
        })
    }
}

/// How one disk takes part in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSnapshotKind {
    /// The disk is left out.
    No,
    /// A qcow2 internal snapshot inside the disk's image.
    Internal,
    /// The image became read-only; writes go to a new overlay.
    External,
}

impl DiskSnapshotKind {
    /// The libvirt spelling of `snapshot='...'`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskSnapshotKind::No => "no",
            DiskSnapshotKind::Internal => "internal",
            DiskSnapshotKind::External => "external",
        }
    }

    /// Parses the libvirt spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "no" => DiskSnapshotKind::No,
            "internal" => DiskSnapshotKind::Internal,
            "external" => DiskSnapshotKind::External,
            _ => return None,
        })
    }
}

/// One disk's part in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPoint {
    /// The disk's target name, e.g. `vda`.
    pub target: String,
    /// Internal, external or left out.
    pub kind: DiskSnapshotKind,
    /// The image file that holds the snapshot's point (the "disk link").
    pub image: Option<PathBuf>,
    /// For an external disk, the overlay the snapshot created: the image
    /// that became the active layer when it was taken (libvirt's
    /// `<source>`). `None` for other kinds, for snapshots that made no
    /// overlay, and in records of earlier versions.
    pub overlay: Option<PathBuf>,
}

/// A snapshot as the metadata store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Immutable identity: the qcow2 tag of internal snapshots and the
    /// metadata file's name. Survives renames.
    pub id: String,
    /// The name shown in the tree.
    pub name: String,
    /// Free text the user may change.
    pub description: Option<String>,
    /// Seconds since the epoch when the snapshot was taken.
    pub creation_time: i64,
    /// What the domain was doing then.
    pub state: SnapshotState,
    /// The id of the parent snapshot, if any.
    pub parent: Option<String>,
    /// Saved state, for checkpoints.
    pub memory: MemoryLocation,
    /// Each disk's part.
    pub disks: Vec<DiskPoint>,
    /// The domain definition (`<domain>` XML) when the snapshot was taken.
    pub domain_xml: Option<String>,
    /// How an external memory file holds the RAM.
    pub memory_format: MemoryFormat,
    /// The machine type the saved state was made on (`pc-q35-7.2`), which
    /// a QEMU loading it must emulate; `None` when not recorded.
    pub machine: Option<String>,
}

impl Snapshot {
    /// True when the snapshot holds saved state (a checkpoint).
    pub fn has_memory(&self) -> bool {
        self.memory != MemoryLocation::No
    }
}
