//! What each inode is, and the table that numbers them. Snapshots are
//! keyed by id, so an inode survives a rename; the kernel's lookup
//! counts are kept, so a forgotten inode leaves the table.

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
    /// `changes/`: each disk with data only where it changed since the
    /// parent snapshot, and its `.map`.
    Changes,
    /// `since/`: one directory per other snapshot, like `changes/`.
    Since,
    /// `files/`: the filesystems inside the disks (`files/<target>/`).
    Files,
}

impl SnapFile {
    /// Every snapshot file with its name, in listing order.
    pub const ALL: [(SnapFile, &'static str); 12] = [
        (SnapFile::SnapshotXml, "snapshot.xml"),
        (SnapFile::State, "state"),
        (SnapFile::Parent, "parent"),
        (SnapFile::Revert, "revert"),
        (SnapFile::Delete, "delete"),
        (SnapFile::Release, "release"),
        (SnapFile::Memory, "memory"),
        (SnapFile::Disks, "disks"),
        (SnapFile::Images, "images"),
        (SnapFile::Changes, "changes"),
        (SnapFile::Since, "since"),
        (SnapFile::Files, "files"),
    ];

    /// The kind of file this is.
    pub fn is_dir(self) -> bool {
        matches!(
            self,
            SnapFile::Disks
                | SnapFile::Images
                | SnapFile::Changes
                | SnapFile::Since
                | SnapFile::Files
        )
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
    /// `/.stats`: counters of the daemon (inode numbers held, open files).
    RootStats,
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
    /// `<domain>/<snapshot>/since/<other>/`, by the two snapshot ids.
    SinceDir(String, String, String),
    /// `<domain>/<snapshot>/changes/<file>` or `since/<other>/<file>`.
    Change(String, String, ChangeFile),
    /// `<domain>/<snapshot>/files/<target>[/<partition>][/path]`: a
    /// disk, a partition or a guest file, by snapshot id.
    Guest(String, String, GuestPath),
}

/// A file of `changes/` or `since/<other>/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChangeFile {
    /// The other snapshot's id (`since/`), or `None`: the parent's.
    pub since: Option<String>,
    /// The disk.
    pub target: String,
    /// Its name: the target, or the target and `.map`.
    pub name: String,
}

impl ChangeFile {
    /// True for the `.map` (JSON) beside the disk.
    pub fn is_map(&self) -> bool {
        self.name != self.target
    }
}

/// A place below `files/`: a disk, a partition of it, a path in its
/// filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GuestPath {
    /// The disk's target (`vda`).
    pub target: String,
    /// The partition's number as shown (`"1"`), empty for the whole disk.
    pub part: String,
    /// The path in the filesystem (`/etc/passwd`), empty for its root.
    pub path: Vec<u8>,
}

impl GuestPath {
    /// The partition number (0: the whole disk).
    pub fn part_number(&self) -> u32 {
        self.part.parse().unwrap_or(0)
    }

    /// The last name of this place.
    pub fn name(&self) -> &[u8] {
        if let Some(i) = self.path.iter().rposition(|b| *b == b'/') {
            return &self.path[i + 1..];
        }
        if !self.part.is_empty() {
            return self.part.as_bytes();
        }
        self.target.as_bytes()
    }

    /// The place above, `None` above the disk.
    pub fn parent(&self) -> Option<GuestPath> {
        let mut p = self.clone();
        if let Some(i) = self.path.iter().rposition(|b| *b == b'/') {
            p.path.truncate(i);
        } else if !self.part.is_empty() {
            p.part.clear();
        } else {
            return None;
        }
        Some(p)
    }

    /// How many names below `files/` it is (the disk is 1).
    pub fn depth(&self) -> usize {
        1 + usize::from(!self.part.is_empty()) + self.path.iter().filter(|b| **b == b'/').count()
    }
}

/// The inode number of the mount point.
pub const ROOT_INO: u64 = 1;

/// One numbered node: what it is, the name the kernel last got for it,
/// and how many lookups the kernel holds on it.
struct Entry {
    node: Node,
    name: Vec<u8>,
    lookups: u64,
}

#[derive(Default)]
struct Table {
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Entry>,
    last: u64,
}

/// A node the kernel may hold, as seen by the cache invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// Its inode number.
    pub ino: u64,
    /// What it is.
    pub node: Node,
    /// The name the kernel got for it last (empty if never looked up).
    pub name: Vec<u8>,
    /// Lookups the kernel holds (0: only a readdir gave its number).
    pub lookups: u64,
}

/// Inode numbers for nodes. A number is never reused; it stays the same
/// for a node while the kernel holds a lookup on it (and while the node
/// exists, once listed), and is dropped when the kernel forgets it.
pub struct InodeTable {
    inner: RwLock<Table>,
}

impl Default for InodeTable {
    fn default() -> Self {
        Self::new()
    }
}

impl InodeTable {
    /// A table holding only the root.
    pub fn new() -> Self {
        let t = InodeTable {
            inner: RwLock::new(Table::default()),
        };
        t.ino(&Node::Root);
        t
    }

    /// The inode number of a node, assigned on first use (a readdir
    /// entry: no lookup is counted).
    pub fn ino(&self, node: &Node) -> u64 {
        if let Some(i) = self.inner.read().by_node.get(node) {
            return *i;
        }
        let mut w = self.inner.write();
        Self::assign(&mut w, node, b"")
    }

    fn assign(t: &mut Table, node: &Node, name: &[u8]) -> u64 {
        if let Some(i) = t.by_node.get(node) {
            return *i;
        }
        t.last += 1;
        let ino = t.last;
        t.by_node.insert(node.clone(), ino);
        t.by_ino.insert(
            ino,
            Entry {
                node: node.clone(),
                name: name.to_vec(),
                lookups: 0,
            },
        );
        ino
    }

    /// The inode number of a node the kernel is told about under `name`
    /// (a lookup, mkdir or readdirplus entry): counts one lookup.
    pub fn lookup(&self, node: &Node, name: &[u8]) -> u64 {
        let mut w = self.inner.write();
        let ino = Self::assign(&mut w, node, name);
        if let Some(e) = w.by_ino.get_mut(&ino) {
            e.lookups += 1;
            if e.name != name {
                e.name = name.to_vec();
            }
        }
        ino
    }

    /// The kernel dropped `n` lookups of `ino`; a number with none left
    /// is forgotten (the root never is).
    pub fn forget(&self, ino: u64, n: u64) {
        let mut w = self.inner.write();
        Self::forget_locked(&mut w, ino, n);
    }

    fn forget_locked(t: &mut Table, ino: u64, n: u64) {
        let Some(e) = t.by_ino.get_mut(&ino) else {
            return;
        };
        e.lookups = e.lookups.saturating_sub(n);
        if e.lookups == 0 && ino != ROOT_INO {
            if let Some(e) = t.by_ino.remove(&ino) {
                t.by_node.remove(&e.node);
            }
        }
    }

    /// Drops a number the kernel holds no lookup on (its node is gone).
    pub fn drop_unheld(&self, ino: u64) {
        let mut w = self.inner.write();
        if ino != ROOT_INO && w.by_ino.get(&ino).is_some_and(|e| e.lookups == 0) {
            if let Some(e) = w.by_ino.remove(&ino) {
                w.by_node.remove(&e.node);
            }
        }
    }

    /// Records the name the kernel now has for `ino` (after a rename).
    pub fn set_name(&self, ino: u64, name: &[u8]) {
        if let Some(e) = self.inner.write().by_ino.get_mut(&ino) {
            e.name = name.to_vec();
        }
    }

    /// The node of an inode number.
    pub fn node(&self, ino: u64) -> Option<Node> {
        self.inner.read().by_ino.get(&ino).map(|e| e.node.clone())
    }

    /// The inode number of a node, if it has one.
    pub fn known_ino(&self, node: &Node) -> Option<u64> {
        self.inner.read().by_node.get(node).copied()
    }

    /// How many numbers are held.
    pub fn len(&self) -> usize {
        self.inner.read().by_ino.len()
    }

    /// Never true: the root always has its number.
    pub fn is_empty(&self) -> bool {
        self.inner.read().by_ino.is_empty()
    }

    /// Every numbered node of domain `d`.
    pub fn known_in(&self, d: &str) -> Vec<Known> {
        self.inner
            .read()
            .by_ino
            .iter()
            .filter(|(_, e)| e.node.domain() == Some(d))
            .map(|(ino, e)| Known {
                ino: *ino,
                node: e.node.clone(),
                name: e.name.clone(),
                lookups: e.lookups,
            })
            .collect()
    }
}

impl Node {
    /// The domain this node belongs to (none for the root's own nodes).
    pub fn domain(&self) -> Option<&str> {
        match self {
            Node::Root | Node::RootJobs | Node::RootStats => None,
            Node::Domain(d)
            | Node::DomainFile(d, _)
            | Node::Snapshot(d, _)
            | Node::SnapshotFile(d, _, _)
            | Node::SnapshotDisk(d, _, _)
            | Node::SnapshotImage(d, _, _)
            | Node::SinceDir(d, _, _)
            | Node::Change(d, _, _) => Some(d),
            Node::Guest(d, _, _) => Some(d),
        }
    }

    /// The one name this node can have (a snapshot's name can change:
    /// none; the root has none).
    pub fn fixed_name(&self) -> Option<&[u8]> {
        Some(match self {
            Node::Root | Node::Snapshot(..) | Node::SinceDir(..) => return None,
            Node::RootJobs => b".jobs",
            Node::RootStats => b".stats",
            Node::Domain(d) => d.as_bytes(),
            Node::DomainFile(_, f) => DomainFile::ALL.iter().find(|(x, _)| x == f)?.1.as_bytes(),
            Node::SnapshotFile(_, _, f) => SnapFile::ALL.iter().find(|(x, _)| x == f)?.1.as_bytes(),
            Node::SnapshotDisk(_, _, t) | Node::SnapshotImage(_, _, t) => t.as_bytes(),
            Node::Change(_, _, f) => f.name.as_bytes(),
            Node::Guest(_, _, g) => g.name(),
        })
    }

    /// How deep below the mount point it is (the root is 0).
    pub fn depth(&self) -> usize {
        match self {
            Node::Root => 0,
            Node::RootJobs | Node::RootStats | Node::Domain(_) => 1,
            Node::DomainFile(..) | Node::Snapshot(..) => 2,
            Node::SnapshotFile(..) => 3,
            Node::SnapshotDisk(..) | Node::SnapshotImage(..) | Node::SinceDir(..) => 4,
            Node::Change(_, _, f) if f.since.is_none() => 4,
            Node::Change(..) => 5,
            Node::Guest(_, _, g) => 3 + g.depth(),
        }
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

    #[test]
    fn forgotten_numbers_leave_and_are_never_reused() {
        let t = InodeTable::new();
        let snap = Node::Snapshot("vm1".into(), "id1".into());
        let a = t.lookup(&snap, b"a");
        assert_eq!(t.lookup(&snap, b"a"), a);
        assert_eq!(t.len(), 2);
        t.forget(a, 1);
        assert_eq!(t.node(a), Some(snap.clone()), "one lookup still held");
        t.forget(a, 1);
        assert_eq!(t.node(a), None);
        assert_eq!(t.len(), 1);
        let b = t.lookup(&snap, b"a");
        assert_ne!(a, b, "a number is never given to another inode");
        t.forget(b, 5);
        t.forget(ROOT_INO, 9);
        assert_eq!(t.len(), 1, "the root stays");
        assert_eq!(t.node(ROOT_INO), Some(Node::Root));
    }

    #[test]
    fn listed_numbers_go_only_when_unheld() {
        let t = InodeTable::new();
        let listed = t.ino(&Node::Snapshot("vm1".into(), "x".into()));
        let held = t.lookup(&Node::Snapshot("vm1".into(), "y".into()), b"y");
        t.drop_unheld(held);
        t.drop_unheld(listed);
        assert_eq!(t.node(listed), None);
        assert!(t.node(held).is_some());
        t.set_name(held, b"y2");
        let known = t.known_in("vm1");
        assert_eq!(known.len(), 1);
        assert_eq!(
            (known[0].name.as_slice(), known[0].lookups),
            (&b"y2"[..], 1)
        );
        assert!(t.known_in("vm2").is_empty());
    }
}
