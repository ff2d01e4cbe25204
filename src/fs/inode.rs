//! What each inode is, and the table that numbers them. Snapshots are
//! keyed by id, so an inode survives a rename.

use std::collections::HashMap;

use parking_lot::RwLock;

/// A file of a domain directory (dot-names beside the snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainFile {
    /// `.state`: running | paused | shutoff.
    State,
    /// `.domain.xml`: the definition.
    DomainXml,
    /// `.tree`: the forest, indented.
    Tree,
    /// `.current`: symlink to the current snapshot.
    Current,
    /// `.jobs`: long operations in progress.
    Jobs,
    /// `.log`: the operation log.
    Log,
    /// `.create`: control file taking a `<domainsnapshot>` spec.
    Create,
    /// `.start`: control file starting a stopped domain on its active layers.
    Start,
    /// `.commandline`: the command line a start runs (root only).
    CommandLine,
}

impl DomainFile {
    /// Every domain file with its name, in listing order.
    pub const ALL: [(DomainFile, &'static str); 9] = [
        (DomainFile::State, ".state"),
        (DomainFile::DomainXml, ".domain.xml"),
        (DomainFile::Tree, ".tree"),
        (DomainFile::Current, ".current"),
        (DomainFile::Jobs, ".jobs"),
        (DomainFile::Log, ".log"),
        (DomainFile::Create, ".create"),
        (DomainFile::Start, ".start"),
        (DomainFile::CommandLine, ".commandline"),
    ];

    /// The file for a name.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, n)| n.as_bytes() == name)
            .map(|(f, _)| *f)
    }
}

/// A file of a snapshot directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapFile {
    /// `snapshot.xml`.
    SnapshotXml,
    /// `state`.
    State,
    /// `parent`: symlink to `../<parent>`.
    Parent,
    /// `revert`: control file.
    Revert,
    /// `delete`: control file (`self`, `children` or `subtree`).
    Delete,
    /// `release`: control file for root (`force` breaks every hold).
    Release,
    /// `memory`: the saved state of an external checkpoint (root only).
    Memory,
    /// `disks/`: one frozen view per disk.
    Disks,
    /// `images/`: one link per disk to the image holding the snapshot.
    Images,
}

impl SnapFile {
    /// Every snapshot file with its name, in listing order.
    pub const ALL: [(SnapFile, &'static str); 9] = [
        (SnapFile::SnapshotXml, "snapshot.xml"),
        (SnapFile::State, "state"),
        (SnapFile::Parent, "parent"),
        (SnapFile::Revert, "revert"),
        (SnapFile::Delete, "delete"),
        (SnapFile::Release, "release"),
        (SnapFile::Memory, "memory"),
        (SnapFile::Disks, "disks"),
        (SnapFile::Images, "images"),
    ];

    /// The kind of file this is.
    pub fn is_dir(self) -> bool {
        matches!(self, SnapFile::Disks | SnapFile::Images)
    }

    /// The file for a name.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(_, n)| n.as_bytes() == name)
            .map(|(f, _)| *f)
    }
}

/// What an inode stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    /// The mount point.
    Root,
    /// `/.jobs`: the long operations of every domain (readable while a
    /// domain directory is locked by an rmdir).
    RootJobs,
    /// `<domain>/`.
    Domain(String),
    /// `<domain>/.<file>`.
    DomainFile(String, DomainFile),
    /// `<domain>/<snapshot>/`, by snapshot id.
    Snapshot(String, String),
    /// `<domain>/<snapshot>/<file>`, by snapshot id.
    SnapshotFile(String, String, SnapFile),
    /// `<domain>/<snapshot>/disks/<target>`: a frozen view.
    SnapshotDisk(String, String, String),
    /// `<domain>/<snapshot>/images/<target>`: link to the image.
    SnapshotImage(String, String, String),
}

/// The inode number of the mount point.
pub const ROOT_INO: u64 = 1;

/// Inode numbers for nodes: stable for the life of the mount.
#[derive(Default)]
pub struct InodeTable {
    inner: RwLock<(HashMap<Node, u64>, Vec<Node>)>,
}

impl InodeTable {
    /// A table holding only the root.
    pub fn new() -> Self {
        let t = InodeTable::default();
        t.ino(&Node::Root);
        t
    }

    /// The inode number of a node, assigned on first use.
    pub fn ino(&self, node: &Node) -> u64 {
        if let Some(i) = self.inner.read().0.get(node) {
            return *i;
        }
        let mut w = self.inner.write();
        if let Some(i) = w.0.get(node) {
            return *i;
        }
        w.1.push(node.clone());
        let ino = w.1.len() as u64;
        w.0.insert(node.clone(), ino);
        ino
    }

    /// The node of an inode number.
    pub fn node(&self, ino: u64) -> Option<Node> {
        let r = self.inner.read();
        r.1.get(ino.checked_sub(1)? as usize).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable() {
        let t = InodeTable::new();
        assert_eq!(t.ino(&Node::Root), ROOT_INO);
        let a = t.ino(&Node::Domain("vm1".into()));
        assert_eq!(t.ino(&Node::Domain("vm1".into())), a);
        assert_eq!(t.node(a), Some(Node::Domain("vm1".into())));
        assert_eq!(t.node(0), None);
        assert_eq!(t.node(999), None);
    }
}
