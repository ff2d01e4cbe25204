//! A domain as its definition file describes it.

use std::path::PathBuf;

/// What the domain is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// QEMU runs the guest.
    Running,
    /// QEMU is up, the guest is stopped.
    Paused,
    /// Nothing listens on the monitor socket and no process holds the
    /// images (QEMU's image locks, the recorded QEMU process).
    Shutoff,
    /// The monitor does not answer in time (taken by another client, a
    /// stopped or stuck QEMU, not QMP), or nothing listens but a process
    /// still holds the images: neither up nor provably shut off.
    Unreachable,
}

impl DomainState {
    /// The spelling used in `.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::Shutoff => "shutoff",
            DomainState::Unreachable => "unreachable",
        }
    }
}

/// What a plain `mkdir` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotPolicy {
    /// RAM and disks inside the qcow2 images (disks only when stopped):
    /// a checkpoint that reverts the running guest in place, but the
    /// guest is paused for the whole RAM save (seconds per GiB).
    Internal,
    /// Disks only, inside the qcow2 images, all disks in one transaction:
    /// ~10 ms and no RAM save, crash-consistent; reverting a running VM
    /// to it restarts QEMU (needs `force`).
    DiskOnly,
    /// RAM to a memory file and new overlays for every disk, taken live
    /// with background-snapshot (the guest pauses for tens of ms whatever
    /// its RAM size); disks only when the VM is stopped. The default: it
    /// barely disturbs the guest, works for raw disks too, and reverts
    /// with RAM (in a new QEMU process).
    #[default]
    External,
    /// New overlays for every disk in one transaction, no RAM.
    ExternalDiskOnly,
}

/// Whether a disk-only snapshot of a running guest freezes the guest's
/// file systems through its guest agent first (libvirt's `--quiesce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuiesceMode {
    /// Quiesce when the agent answers; otherwise take the snapshot
    /// crash-consistent and say so in `.log`.
    Auto,
    /// Quiesce, or refuse the snapshot when no agent answers.
    Yes,
    /// Never quiesce.
    No,
}

impl QuiesceMode {
    /// The spelling in the definition and in `.log`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuiesceMode::Auto => "auto",
            QuiesceMode::Yes => "yes",
            QuiesceMode::No => "no",
        }
    }
}

/// How the daemon reaches a domain's guest agent (qemu-ga).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChannel {
    /// QEMU listens on this Unix socket (libvirt's `<channel type='unix'>`
    /// with `<source mode='bind' path=...>`); the daemon connects to it.
    Socket(PathBuf),
    /// In libvirt mode: libvirt holds the socket, and the daemon freezes
    /// and thaws through libvirt (`virsh domfsfreeze`, `domfsthaw`).
    Libvirt {
        /// libvirt's connection URI.
        uri: String,
        /// The domain's name in libvirt.
        domain: String,
    },
    /// A channel without a socket path the daemon can use (a definition
    /// that names none).
    Unreachable(String),
}

impl AgentChannel {
    /// How `.log` names the channel.
    pub fn describe(&self) -> String {
        match self {
            AgentChannel::Socket(p) => format!("guest agent socket {}", p.display()),
            AgentChannel::Libvirt { domain, .. } => {
                format!("libvirt's guest agent of domain {domain}")
            }
            AgentChannel::Unreachable(why) => why.clone(),
        }
    }
}

/// One disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDef {
    /// Target name, e.g. `vda`.
    pub target: String,
    /// Image file of the active layer.
    pub source: PathBuf,
    /// Image format, e.g. `qcow2` or `raw`.
    pub format: String,
}

/// A writable disk that vmsnapfs cannot snapshot (a block device, a
/// network disk, SCSI passthrough): a snapshot without it would not match
/// the guest's state, so snapshots are refused unless it is left out on
/// purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherDisk {
    /// Target name, e.g. `sdb`.
    pub target: String,
    /// What it is, for `.log` (`block device /dev/vg0/data`).
    pub what: String,
    /// The definition leaves it out of every snapshot (libvirt's
    /// `<disk ... snapshot='no'>`).
    pub left_out: bool,
}

/// A domain definition: a subset of libvirt's `<domain>` XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDef {
    /// The domain's name (a directory under the mount point).
    pub name: String,
    /// The QMP socket path, when the domain runs.
    pub monitor: Option<PathBuf>,
    /// Its disks.
    pub disks: Vec<DiskDef>,
    /// Its writable disks that cannot be snapshotted.
    pub other_disks: Vec<OtherDisk>,
    /// The QEMU command line to start it again (argv), if given.
    pub commandline: Option<Vec<String>>,
    /// What `mkdir` creates.
    pub policy: SnapshotPolicy,
    /// `<snapshot quiesce=...>` as written (`None`: not given; see
    /// [`DomainDef::quiesce_default`]).
    pub quiesce: Option<QuiesceMode>,
    /// The guest agent's channel, when the definition has one.
    pub agent: Option<AgentChannel>,
    /// The definition as written, shown as `.domain.xml`.
    pub xml: String,
}

impl DomainDef {
    /// Whether snapshots quiesce when neither the definition nor the
    /// `.create` spec says: `auto` when the definition has a guest agent
    /// channel, `no` otherwise (a domain without an agent gets no `.log`
    /// line about it on every snapshot).
    pub fn quiesce_default(&self) -> QuiesceMode {
        match (self.quiesce, &self.agent) {
            (Some(q), _) => q,
            (None, Some(_)) => QuiesceMode::Auto,
            (None, None) => QuiesceMode::No,
        }
    }
}
