//! Pure types, no I/O: snapshots, the snapshot forest, name rules, domain
//! definitions.

pub mod domain_def;
pub mod forest;
pub mod name;
pub mod snapshot;

pub use domain_def::{
    AgentChannel, DiskDef, DomainDef, DomainState, OtherDisk, QuiesceMode, SnapshotPolicy,
};
pub use forest::{Forest, ForestError};
pub use name::{validate_name, validate_name_bytes, NameError, MAX_NAME_BYTES};
pub use snapshot::{
    DiskPoint, DiskSnapshotKind, MemoryFormat, MemoryLocation, Snapshot, SnapshotState,
};
