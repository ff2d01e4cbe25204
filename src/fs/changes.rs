//! `changes/` and `since/<other>/` of a snapshot directory: names,
//! attributes and opens. The extents are computed on worker threads: a
//! `stat` that needs them (the `.map`'s size, the blocks of a disk) and
//! every open are answered from one when they are not known yet.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{Errno, FileHandle, FileType, FopenFlags, ReplyAttr, ReplyOpen};

use super::inode::{ChangeFile, Node, SnapFile};
use super::{content, errno, off_thread, secs, Handle, Inner};
use crate::domain::Domain;
use crate::model::Snapshot;
use crate::views::diff::Changes;

/// Attributes of a file of `changes/` or `since/<other>/`.
pub(super) struct ChangeAttr {
    pub owner: (u32, u32),
    pub perm: u16,
    pub size: u64,
    /// 512-byte blocks, once the extents are known.
    pub blocks: Option<u64>,
    pub mtime: SystemTime,
}

impl Inner {
    /// The domain, the snapshot and the one its changes are against
    /// (`None`: a snapshot without parent, against an empty disk).
    fn change_pair(
        &self,
        d: &str,
        id: &str,
        since: Option<&str>,
    ) -> Option<(Arc<Domain>, Snapshot, Option<Snapshot>)> {
        let dom = self.reg.get(d)?;
        let (snap, other) = {
            let forest = dom.forest();
            let snap = forest.get(id)?.clone();
            let other = match since {
                Some(o) => Some(forest.get(o)?.clone()),
                None => snap.parent.as_deref().and_then(|p| forest.get(p)).cloned(),
            };
            (snap, other)
        };
        Some((dom, snap, other))
    }

    fn cached_changes(&self, d: &str, id: &str, f: &ChangeFile) -> Option<Arc<Changes>> {
        let (dom, snap, other) = self.change_pair(d, id, f.since.as_deref())?;
        dom.views().changes_cached(&snap, other.as_ref(), &f.target)
    }

    /// Attributes without waiting: sizes and blocks that need the extents
    /// are 0 (and not cached by the kernel) until they are known.
    pub(super) fn change_attr(&self, d: &str, id: &str, f: &ChangeFile) -> Option<ChangeAttr> {
        let (dom, snap, _) = self.change_pair(d, id, f.since.as_deref())?;
        let image = content::image_of(&dom, id, &f.target)?;
        let known = self.cached_changes(d, id, f);
        let (owner, perm) = super::tree::image_owner(&image);
        let size = if f.is_map() {
            known.as_ref().map_or(0, |c| c.map_json().len() as u64)
        } else {
            dom.views().disk_size(&image).unwrap_or(0)
        };
        Some(ChangeAttr {
            owner,
            perm,
            size,
            blocks: known.map(|c| {
                if f.is_map() {
                    size.div_ceil(512)
                } else {
                    c.changed_bytes().div_ceil(512)
                }
            }),
            mtime: secs(snap.creation_time),
        })
    }

    /// Answers a `getattr` of a changes file whose extents are not known
    /// from a worker thread, once they are; gives the reply back when
    /// they are known (the caller answers).
    pub(super) fn getattr_later(
        self: &Arc<Self>,
        node: &Node,
        uid: u32,
        reply: ReplyAttr,
    ) -> Option<ReplyAttr> {
        let Node::Change(d, id, f) = node else {
            return Some(reply);
        };
        if self.cached_changes(d, id, f).is_some() {
            return Some(reply);
        }
        let fs = self.clone();
        let node = node.clone();
        let (d, id, f) = (d.clone(), id.clone(), f.clone());
        off_thread(move || {
            if let Some((dom, snap, other)) = fs.change_pair(&d, &id, f.since.as_deref()) {
                // A failure is told when the file is opened.
                let _ = dom.views().changes(&snap, other.as_ref(), &f.target);
            }
            match fs.attr(&node, uid) {
                Some((attr, ttl)) => reply.attr(&ttl, &attr),
                None => reply.error(Errno::ENOENT),
            }
        });
        None
    }

    /// Opens a changes file (the disk, or its `.map`) from a worker
    /// thread: the extents may have to be computed first.
    pub(super) fn open_change(
        self: &Arc<Self>,
        node: &Node,
        holder: crate::domain::views::Holder,
        fh: u64,
        reply: ReplyOpen,
    ) {
        let Node::Change(d, id, f) = node else {
            return reply.error(Errno::ENOENT);
        };
        let Some((dom, snap, other)) = self.change_pair(d, id, f.since.as_deref()) else {
            return reply.error(Errno::ENOENT);
        };
        let fs = self.clone();
        let f = f.clone();
        off_thread(move || {
            let views = dom.views();
            let handle = if f.is_map() {
                views
                    .changes(&snap, other.as_ref(), &f.target)
                    .map(|c| Handle::Text(Arc::new(c.map_json().into_bytes())))
            } else {
                views
                    .open_changes(&snap, other.as_ref(), &f.target, holder)
                    .map(|(view, hold)| Handle::View {
                        view,
                        domain: dom.clone(),
                        hold,
                    })
            };
            match handle {
                Ok(h) => {
                    fs.handles.lock().insert(fh, h);
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// The node called `name` in `changes/`, `since/` or `since/<other>/`.
    pub(super) fn change_child(&self, parent: &Node, name: &OsStr) -> Option<Node> {
        let name = std::str::from_utf8(name.as_bytes()).ok()?;
        let (d, id, since) = match parent {
            Node::SnapshotFile(d, id, SnapFile::Since) => {
                let dom = self.reg.get(d)?;
                let other = dom.forest().by_name(name)?.id.clone();
                return (other != *id).then(|| Node::SinceDir(d.clone(), id.clone(), other));
            }
            Node::SnapshotFile(d, id, SnapFile::Changes) => (d, id, None),
            Node::SinceDir(d, id, other) => (d, id, Some(other.clone())),
            _ => return None,
        };
        let dom = self.reg.get(d)?;
        if let Some(o) = &since {
            dom.forest().get(o)?;
        }
        let target = name.strip_suffix(".map").unwrap_or(name);
        if !content::view_targets(&dom, id).iter().any(|t| t == target) {
            return None;
        }
        Some(Node::Change(
            d.clone(),
            id.clone(),
            ChangeFile {
                since,
                target: target.to_owned(),
                name: name.to_owned(),
            },
        ))
    }

    /// The entries of `changes/`, `since/` (the other snapshots, nothing
    /// computed) or `since/<other>/` (whose extents start to be computed
    /// in the background).
    pub(super) fn change_entries(&self, node: &Node) -> Option<Vec<(Node, FileType, String)>> {
        let (d, id, since) = match node {
            Node::SnapshotFile(d, id, SnapFile::Since) => {
                let dom = self.reg.get(d)?;
                let forest = dom.forest();
                return Some(
                    forest
                        .iter_by_time()
                        .into_iter()
                        .filter(|s| s.id != *id)
                        .map(|s| {
                            let n = Node::SinceDir(d.clone(), id.clone(), s.id.clone());
                            (n, FileType::Directory, s.name.clone())
                        })
                        .collect(),
                );
            }
            Node::SnapshotFile(d, id, SnapFile::Changes) => (d, id, None),
            Node::SinceDir(d, id, other) => (d, id, Some(other.clone())),
            _ => return None,
        };
        let (dom, snap, other) = self.change_pair(d, id, since.as_deref())?;
        let mut out = Vec::new();
        for target in content::view_targets(&dom, id) {
            // Listed: each disk's extents are computed at once, side by
            // side, for the `stat`s that follow (`ls -l`).
            if dom
                .views()
                .changes_cached(&snap, other.as_ref(), &target)
                .is_none()
            {
                let (dom, snap, other, t) =
                    (dom.clone(), snap.clone(), other.clone(), target.clone());
                off_thread(move || {
                    let _ = dom.views().changes(&snap, other.as_ref(), &t);
                });
            }
            for name in [target.clone(), format!("{target}.map")] {
                let f = ChangeFile {
                    since: since.clone(),
                    target: target.clone(),
                    name: name.clone(),
                };
                out.push((
                    Node::Change(d.clone(), id.clone(), f),
                    FileType::RegularFile,
                    name,
                ));
            }
        }
        Some(out)
    }

    /// Attributes of `since/<other>/`: a directory while both exist.
    pub(super) fn since_dir_time(&self, d: &str, id: &str, other: &str) -> Option<SystemTime> {
        let dom = self.reg.get(d)?;
        let forest = dom.forest();
        forest.get(other)?;
        Some(secs(forest.get(id)?.creation_time))
    }
}
