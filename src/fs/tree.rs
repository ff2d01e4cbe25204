//! Navigating the tree: what each inode is called, what it holds, its
//! attributes, and the directory listings.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{Errno, FileAttr, FileType, Generation, INodeNo, ReplyEntry};

use super::content;
use super::inode::{DomainFile, Node, SnapFile};
use super::xml_edit::XmlTarget;
use super::{errno, secs, Inner, LIVE_TTL, STABLE_TTL};
use crate::domain::Domain;

/// The owner, group and mode (less the write bits) of an image, read
/// without following a symlink; root's and 0400 when it cannot be read.
pub(super) fn image_owner(image: &std::path::Path) -> ((u32, u32), u16) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(image) {
        Ok(m) if m.is_file() => ((m.uid(), m.gid()), (m.mode() & 0o555) as u16),
        _ => ((0, 0), 0o400),
    }
}

/// Owner and mode of `files/`: who may read every disk image of the
/// snapshot may enter (the guest's own owners and modes below it are the
/// guest's, not the host's users).
fn files_gate(dom: &Domain, id: &str) -> ((u32, u32), u16) {
    let mut owner = None;
    let mut perm = 0o555;
    for t in content::view_targets(dom, id) {
        let (o, p) = content::image_of(dom, id, &t)
            .map(|i| image_owner(&i))
            .unwrap_or(((0, 0), 0o400));
        // Read bits become read and search bits.
        perm &= p | ((p & 0o444) >> 2);
        owner = match owner {
            None => Some(o),
            Some(x) if x == o => Some(x),
            Some(_) => Some((0, 0)),
        };
    }
    (owner.unwrap_or((0, 0)), perm)
}

impl Inner {
    pub(super) fn domain(&self, name: &str) -> Result<Arc<Domain>, Errno> {
        self.reg.get(name).ok_or(Errno::ENOENT)
    }

    pub(super) fn attr(&self, node: &Node, uid: u32) -> Option<(FileAttr, Duration)> {
        let gid = self.config.group.unwrap_or(0);
        let group_w = self.config.group.is_some();
        // Files that come from an image (views, memory files) take its
        // owner, group and mode, less the write bits; the rest is root's.
        let mut owner = (0, gid);
        let mut change_blocks = None;
        let (kind, perm, size, mtime, ttl) = match node {
            Node::Root => (FileType::Directory, 0o755, 0, self.mounted_at, STABLE_TTL),
            Node::RootJobs => {
                let len = self.all_jobs().len() as u64;
                (
                    FileType::RegularFile,
                    0o444,
                    len,
                    SystemTime::now(),
                    LIVE_TTL,
                )
            }
            Node::RootStats => {
                let len = self.stats().len() as u64;
                (
                    FileType::RegularFile,
                    0o444,
                    len,
                    SystemTime::now(),
                    LIVE_TTL,
                )
            }
            Node::Domain(d) => {
                self.reg.get(d)?;
                let perm = if group_w { 0o775 } else { 0o755 };
                (FileType::Directory, perm, 0, self.mounted_at, STABLE_TTL)
            }
            Node::DomainFile(d, f) => {
                let dom = self.reg.get(d)?;
                if *f == DomainFile::Current {
                    let t = content::current_target(&dom)?;
                    (
                        FileType::Symlink,
                        0o777,
                        t.len() as u64,
                        SystemTime::now(),
                        LIVE_TTL,
                    )
                } else if matches!(*f, DomainFile::Create | DomainFile::Start) {
                    let perm = if group_w { 0o220 } else { 0o200 };
                    (FileType::RegularFile, perm, 0, self.mounted_at, STABLE_TTL)
                } else if *f == DomainFile::CommandLine {
                    let len = content::domain_file(&dom, *f, uid).len() as u64;
                    (
                        FileType::RegularFile,
                        0o400,
                        len,
                        SystemTime::now(),
                        LIVE_TTL,
                    )
                } else {
                    let len = content::domain_file(&dom, *f, uid).len() as u64;
                    (
                        FileType::RegularFile,
                        0o444,
                        len,
                        SystemTime::now(),
                        LIVE_TTL,
                    )
                }
            }
            Node::Snapshot(d, id) => {
                let dom = self.reg.get(d)?;
                let t = dom.forest().get(id)?.creation_time;
                (FileType::Directory, 0o755, 0, secs(t), STABLE_TTL)
            }
            Node::SnapshotDisk(d, id, target) => {
                let dom = self.reg.get(d)?;
                let t = secs(dom.forest().get(id)?.creation_time);
                let image = content::image_of(&dom, id, target)?;
                let size = dom.views().disk_size(&image).unwrap_or(0);
                let (o, perm) = image_owner(&image);
                owner = o;
                (FileType::RegularFile, perm, size, t, STABLE_TTL)
            }
            Node::SnapshotImage(d, id, target) => {
                let dom = self.reg.get(d)?;
                let t = secs(dom.forest().get(id)?.creation_time);
                let image = content::image_of(&dom, id, target)?;
                let len = image.as_os_str().len() as u64;
                (FileType::Symlink, 0o777, len, t, STABLE_TTL)
            }
            Node::SinceDir(d, id, other) => {
                let t = self.since_dir_time(d, id, other)?;
                (FileType::Directory, 0o755, 0, t, STABLE_TTL)
            }
            Node::Change(d, id, f) => {
                let a = self.change_attr(d, id, f)?;
                owner = a.owner;
                change_blocks = a.blocks;
                (FileType::RegularFile, a.perm, a.size, a.mtime, LIVE_TTL)
            }
            Node::SnapshotFile(d, id, SnapFile::Files) => {
                let dom = self.reg.get(d)?;
                let t = secs(dom.forest().get(id)?.creation_time);
                let (o, perm) = files_gate(&dom, id);
                owner = o;
                (FileType::Directory, perm, 0, t, STABLE_TTL)
            }
            // A disk or partition below `files/`; a guest file's
            // attributes come from its filesystem (`guest.rs`).
            Node::Guest(d, id, g) => {
                if !g.path.is_empty() {
                    return None;
                }
                let dom = self.reg.get(d)?;
                let t = secs(dom.forest().get(id)?.creation_time);
                (FileType::Directory, 0o555, 0, t, STABLE_TTL)
            }
            Node::SnapshotFile(d, id, f) if f.is_dir() => {
                let dom = self.reg.get(d)?;
                let t = secs(dom.forest().get(id)?.creation_time);
                (FileType::Directory, 0o755, 0, t, STABLE_TTL)
            }
            Node::SnapshotFile(d, id, f) => {
                let dom = self.reg.get(d)?;
                let t = secs(dom.forest().get(id)?.creation_time);
                match f {
                    SnapFile::Parent => {
                        let target = content::parent_target(&dom, id)?;
                        (FileType::Symlink, 0o777, target.len() as u64, t, LIVE_TTL)
                    }
                    SnapFile::Revert | SnapFile::Delete => {
                        let perm = if group_w { 0o220 } else { 0o200 };
                        (FileType::RegularFile, perm, 0, t, STABLE_TTL)
                    }
                    // Breaking another user's hold is root's alone.
                    SnapFile::Release => (FileType::RegularFile, 0o200, 0, t, STABLE_TTL),
                    SnapFile::Memory => {
                        let file = content::memory_file(&dom, id)?;
                        let len = std::fs::symlink_metadata(&file)
                            .map(|m| m.len())
                            .unwrap_or(0);
                        let (o, perm) = image_owner(&file);
                        owner = o;
                        (FileType::RegularFile, perm, len, t, STABLE_TTL)
                    }
                    _ => {
                        let len = content::snapshot_file(&dom, id, *f, uid)?.len() as u64;
                        // snapshot.xml takes a new <description>.
                        let perm = match (f, group_w) {
                            (SnapFile::SnapshotXml, false) => 0o644,
                            (SnapFile::SnapshotXml, true) => 0o664,
                            _ => 0o444,
                        };
                        (FileType::RegularFile, perm, len, t, LIVE_TTL)
                    }
                }
            }
        };
        let nlink = if kind == FileType::Directory { 2 } else { 1 };
        let (blocks, ttl) = match node {
            // A view is sparse: its allocation, from cached data (0, not
            // cached by the kernel, until it is known).
            Node::SnapshotDisk(d, id, target) => {
                let dom = self.reg.get(d)?;
                let snap = dom.forest().get(id)?.clone();
                match dom.views().allocated(&snap, target) {
                    Some(b) => (b.min(size).div_ceil(512), ttl),
                    None => (0, LIVE_TTL),
                }
            }
            Node::Change(..) => (change_blocks.unwrap_or(0), ttl),
            _ => (size.div_ceil(512), ttl),
        };
        let attr = FileAttr {
            ino: INodeNo(self.inodes.ino(node)),
            size,
            blocks,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink,
            uid: owner.0,
            gid: owner.1,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        Some((attr, ttl))
    }

    pub(super) fn child(&self, parent: &Node, name: &OsStr) -> Option<Node> {
        let name = name.as_bytes();
        match parent {
            Node::Root => {
                if name == b".jobs" {
                    return Some(Node::RootJobs);
                }
                if name == b".stats" {
                    return Some(Node::RootStats);
                }
                let d = std::str::from_utf8(name).ok()?;
                self.reg.get(d).map(|_| Node::Domain(d.to_owned()))
            }
            Node::Domain(d) => {
                if let Some(f) = DomainFile::from_name(name) {
                    return Some(Node::DomainFile(d.clone(), f));
                }
                let dom = self.reg.get(d)?;
                let n = std::str::from_utf8(name).ok()?;
                let id = dom.forest().by_name(n)?.id.clone();
                Some(Node::Snapshot(d.clone(), id))
            }
            Node::Snapshot(d, id) => {
                let f = SnapFile::from_name(name)?;
                if f == SnapFile::Memory {
                    content::memory_file(&*self.reg.get(d)?, id)?;
                }
                Some(Node::SnapshotFile(d.clone(), id.clone(), f))
            }
            Node::SnapshotFile(d, id, f @ (SnapFile::Disks | SnapFile::Images)) => {
                let dom = self.reg.get(d)?;
                let t = std::str::from_utf8(name).ok()?;
                if !content::view_targets(&dom, id).iter().any(|x| x == t) {
                    return None;
                }
                Some(if *f == SnapFile::Disks {
                    Node::SnapshotDisk(d.clone(), id.clone(), t.to_owned())
                } else {
                    Node::SnapshotImage(d.clone(), id.clone(), t.to_owned())
                })
            }
            Node::SnapshotFile(_, _, SnapFile::Changes | SnapFile::Since) | Node::SinceDir(..) => {
                self.change_child(parent, OsStr::from_bytes(name))
            }
            Node::SnapshotFile(d, id, SnapFile::Files) => {
                let dom = self.reg.get(d)?;
                let t = std::str::from_utf8(name).ok()?;
                if !content::view_targets(&dom, id).iter().any(|x| x == t) {
                    return None;
                }
                Some(Node::Guest(
                    d.clone(),
                    id.clone(),
                    super::guest::disk_root(t),
                ))
            }
            _ => None,
        }
    }

    /// The entries of a directory (without `.` and `..`).
    pub(super) fn entries(&self, node: &Node) -> Option<Vec<(Node, FileType, String)>> {
        Some(match node {
            Node::Root => {
                self.reg.rescan_soon();
                let mut v: Vec<_> = self
                    .reg
                    .all()
                    .iter()
                    .map(|d| {
                        (
                            Node::Domain(d.name().to_owned()),
                            FileType::Directory,
                            d.name().to_owned(),
                        )
                    })
                    .collect();
                v.insert(0, (Node::RootJobs, FileType::RegularFile, ".jobs".into()));
                v.insert(1, (Node::RootStats, FileType::RegularFile, ".stats".into()));
                v
            }
            Node::Domain(d) => {
                let dom = self.reg.get(d)?;
                let mut v: Vec<_> = DomainFile::ALL
                    .iter()
                    .filter(|(f, _)| {
                        *f != DomainFile::Current || content::current_target(&dom).is_some()
                    })
                    .map(|(f, n)| {
                        let kind = if *f == DomainFile::Current {
                            FileType::Symlink
                        } else {
                            FileType::RegularFile
                        };
                        (Node::DomainFile(d.clone(), *f), kind, (*n).to_owned())
                    })
                    .collect();
                for s in dom.forest().iter_by_time() {
                    v.push((
                        Node::Snapshot(d.clone(), s.id.clone()),
                        FileType::Directory,
                        s.name.clone(),
                    ));
                }
                v
            }
            Node::Snapshot(d, id) => {
                let dom = self.reg.get(d)?;
                let has_parent = dom.forest().get(id)?.parent.is_some();
                let has_memory = content::memory_file(&dom, id).is_some();
                SnapFile::ALL
                    .iter()
                    .filter(|(f, _)| *f != SnapFile::Parent || has_parent)
                    .filter(|(f, _)| *f != SnapFile::Memory || has_memory)
                    .map(|(f, n)| {
                        let kind = match f {
                            SnapFile::Parent => FileType::Symlink,
                            f if f.is_dir() => FileType::Directory,
                            _ => FileType::RegularFile,
                        };
                        (
                            Node::SnapshotFile(d.clone(), id.clone(), *f),
                            kind,
                            (*n).to_owned(),
                        )
                    })
                    .collect()
            }
            Node::SnapshotFile(d, id, SnapFile::Files) => {
                let dom = self.reg.get(d)?;
                content::view_targets(&dom, id)
                    .into_iter()
                    .map(|t| {
                        let n = Node::Guest(d.clone(), id.clone(), super::guest::disk_root(&t));
                        (n, FileType::Directory, t)
                    })
                    .collect()
            }
            Node::SnapshotFile(d, id, f @ (SnapFile::Disks | SnapFile::Images)) => {
                let dom = self.reg.get(d)?;
                content::view_targets(&dom, id)
                    .into_iter()
                    .map(|t| {
                        if *f == SnapFile::Disks {
                            let n = Node::SnapshotDisk(d.clone(), id.clone(), t.clone());
                            (n, FileType::RegularFile, t)
                        } else {
                            let n = Node::SnapshotImage(d.clone(), id.clone(), t.clone());
                            (n, FileType::Symlink, t)
                        }
                    })
                    .collect()
            }
            Node::SnapshotFile(_, _, SnapFile::Changes | SnapFile::Since) | Node::SinceDir(..) => {
                return self.change_entries(node)
            }
            _ => return None,
        })
    }

    pub(super) fn parent_of(&self, node: &Node) -> Node {
        match node {
            Node::Root | Node::RootJobs | Node::RootStats | Node::Domain(_) => Node::Root,
            Node::DomainFile(d, _) | Node::Snapshot(d, _) => Node::Domain(d.clone()),
            Node::SnapshotFile(d, id, _) => Node::Snapshot(d.clone(), id.clone()),
            Node::SnapshotDisk(d, id, _) => {
                Node::SnapshotFile(d.clone(), id.clone(), SnapFile::Disks)
            }
            Node::SnapshotImage(d, id, _) => {
                Node::SnapshotFile(d.clone(), id.clone(), SnapFile::Images)
            }
            Node::SinceDir(d, id, _) => Node::SnapshotFile(d.clone(), id.clone(), SnapFile::Since),
            Node::Change(d, id, f) => match &f.since {
                None => Node::SnapshotFile(d.clone(), id.clone(), SnapFile::Changes),
                Some(o) => Node::SinceDir(d.clone(), id.clone(), o.clone()),
            },
            Node::Guest(d, id, g) => match g.parent() {
                Some(p) => Node::Guest(d.clone(), id.clone(), p),
                None => Node::SnapshotFile(d.clone(), id.clone(), SnapFile::Files),
            },
        }
    }

    /// A directory's entries with `.` and `..` first, in a stable order.
    pub(super) fn listing(&self, ino: INodeNo) -> Option<Vec<(Node, FileType, String)>> {
        let node = self.node(ino).ok()?;
        let entries = self.entries(&node)?;
        let mut all = Vec::with_capacity(entries.len() + 2);
        all.push((node.clone(), FileType::Directory, ".".to_owned()));
        all.push((self.parent_of(&node), FileType::Directory, "..".to_owned()));
        all.extend(entries);
        Some(all)
    }

    pub(super) fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.inodes.node(ino.0).ok_or(Errno::ENOENT)
    }

    /// `/.jobs`: each domain's `.jobs` lines, prefixed with its name.
    fn all_jobs(&self) -> String {
        self.reg
            .all()
            .iter()
            .flat_map(|d| {
                d.jobs_text()
                    .lines()
                    .map(|l| format!("{}: {l}\n", d.name()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// `/.stats`: inode numbers held (they go when the kernel forgets
    /// them) and open files.
    fn stats(&self) -> String {
        format!(
            "inodes {}\nopen-files {}\n",
            self.inodes.len(),
            self.handles.lock().len()
        )
    }

    pub(super) fn generated(&self, node: &Node, uid: u32) -> Option<Vec<u8>> {
        match node {
            Node::RootJobs => Some(self.all_jobs().into_bytes()),
            Node::RootStats => Some(self.stats().into_bytes()),
            Node::DomainFile(d, f) => Some(content::domain_file(&*self.reg.get(d)?, *f, uid)),
            Node::SnapshotFile(d, id, f) => content::snapshot_file(&*self.reg.get(d)?, id, *f, uid),
            _ => None,
        }
    }

    /// Applies a written XML document: a new description, or a create.
    pub(super) fn apply_xml(
        &self,
        domain: &str,
        target: &XmlTarget,
        xml: &[u8],
        caller: &crate::domain::Caller,
    ) -> Result<(), Errno> {
        let dom = self.domain(domain)?;
        match target {
            XmlTarget::Description(id) => {
                let name = dom
                    .forest()
                    .get(id)
                    .map(|s| s.name.clone())
                    .ok_or(Errno::ENOENT)?;
                dom.write_snapshot_xml(&name, xml).map_err(|e| errno(&e))
            }
            XmlTarget::Create => dom
                .create_from_spec(xml, caller)
                .map(drop)
                .map_err(|e| errno(&e)),
        }
    }

    /// Answers a lookup (or mkdir) of `node` under `name`: one more
    /// lookup the kernel holds on its number.
    pub(super) fn reply_entry(&self, node: &Node, name: &[u8], uid: u32, reply: ReplyEntry) {
        let ino = self.inodes.lookup(node, name);
        let Some((attr, attr_ttl)) = self.attr(node, uid) else {
            self.inodes.forget(ino, 1);
            return reply.error(Errno::ENOENT);
        };
        // Symlinks that exist only while there is a current snapshot or a
        // parent are looked up again each time; every other name is stable.
        let entry_ttl = match node {
            Node::DomainFile(_, DomainFile::Current)
            | Node::SnapshotFile(_, _, SnapFile::Parent) => LIVE_TTL,
            _ => STABLE_TTL,
        };
        reply.entry_with_ttls(&attr_ttl, &entry_ttl, &attr, Generation(0));
    }
}
