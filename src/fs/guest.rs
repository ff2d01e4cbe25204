//! `files/`: the FUSE side of the guest's files. Every request below a
//! disk is queued to that disk's thread ([`crate::guestfs::workers`]),
//! which probes, opens and reads the guest's filesystem and answers the
//! kernel; the FUSE thread returns at once. Each request holds the
//! snapshot while it reads (an rmdir meanwhile is EBUSY, as for a view),
//! and an open file holds it until it is closed.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen, Request,
};

use super::inode::{GuestPath, Node};
use super::{errno, Handle, Inner, STABLE_TTL};
use crate::domain::views::{Hold, Holder};
use crate::domain::Domain;
use crate::guestfs::disk::Disk;
use crate::guestfs::{join, Attr, Kind, Time};
use crate::model::Snapshot;

/// The place of disk `target` in `files/`.
pub(super) fn disk_root(target: &str) -> GuestPath {
    GuestPath {
        target: target.to_owned(),
        part: String::new(),
        path: Vec::new(),
    }
}

/// An open guest file: it holds its snapshot until released.
pub(super) struct OpenGuest {
    pub(super) domain: Arc<Domain>,
    pub(super) hold: Arc<Hold>,
    id: String,
    place: GuestPath,
}

fn time(t: Time) -> SystemTime {
    let nanos = Duration::new(t.secs.unsigned_abs(), 0) + Duration::from_nanos(u64::from(t.nanos));
    if t.secs >= 0 {
        UNIX_EPOCH + nanos
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::new(t.secs.unsigned_abs(), 0))
            .map(|e| e + Duration::from_nanos(u64::from(t.nanos)))
            .unwrap_or(UNIX_EPOCH)
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: a.crtime.map(time).unwrap_or(UNIX_EPOCH),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: if a.kind == Kind::Dir { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The attributes shown for `.` and `..` in a listing (the kernel takes
/// those of the directories themselves from elsewhere).
fn synthetic_dir() -> Attr {
    Attr::dir(0o555)
}

/// What a request reads: the domain and the snapshot.
struct Ctx {
    dom: Arc<Domain>,
    snap: Snapshot,
    target: String,
    /// Who asks.
    holder: Holder,
}

impl Ctx {
    /// Tells the domain's `.log` about this disk.
    fn note(&self) -> impl FnMut(String) + '_ {
        move |text| {
            self.dom.views().note(&format!(
                "files/{} of {:?}: {text}",
                self.target, self.snap.name
            ))
        }
    }

    /// Runs `f` holding the snapshot (EBUSY while it is being deleted).
    fn held<T>(&self, f: impl FnOnce() -> T) -> Result<T, Errno> {
        let hold = self
            .dom
            .views()
            .hold(&self.snap, self.holder)
            .map_err(|e| errno(&e))?;
        let r = hold.read(|| Ok(f()));
        self.dom.views().close(&hold);
        r.map_err(|e: std::io::Error| Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)))
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Which disk of which snapshot a request reads, and who asks.
pub(super) struct DiskAt {
    holder: Holder,
    domain: String,
    id: String,
    target: String,
}

impl DiskAt {
    /// Disk `place.target` of snapshot `id` of domain `d`, for `req`.
    pub(super) fn of(req: &Request, d: &str, id: &str, place: &GuestPath) -> DiskAt {
        DiskAt::new(holder(req), d, id, &place.target)
    }

    fn new(holder: Holder, domain: &str, id: &str, target: &str) -> DiskAt {
        DiskAt {
            holder,
            domain: domain.to_owned(),
            id: id.to_owned(),
            target: target.to_owned(),
        }
    }
}

/// Who asks: the holder a request's snapshot hold is taken for.
fn holder(req: &Request) -> Holder {
    Holder {
        pid: req.pid(),
        uid: req.uid(),
    }
}

/// A kernel reply that a job on a disk's thread answers: with an error
/// when the job cannot run.
trait GuestReply: Send + 'static {
    /// Answers with error `e`.
    fn fail(self, e: Errno);
}

macro_rules! guest_reply {
    ($($t:ty),*) => {$(
        impl GuestReply for $t {
            fn fail(self, e: Errno) {
                self.error(e)
            }
        }
    )*};
}

guest_reply!(ReplyEntry, ReplyAttr, ReplyData, ReplyOpen, GuestDirReply);

/// An entry of a directory below `files/`.
struct Entry {
    place: GuestPath,
    /// `None`: a partition's directory (its attributes are ours).
    attr: Option<Attr>,
    name: Vec<u8>,
}

impl Inner {
    /// Queues `job` for the thread of disk `target` of snapshot `id`,
    /// with the disk set to the snapshot's view; the job answers `reply`.
    /// When the snapshot or its view is gone, `reply` gets the error
    /// instead; a job that never runs drops `reply`, which answers EIO.
    fn guest_job<R: GuestReply>(
        self: &Arc<Self>,
        at: DiskAt,
        reply: R,
        job: impl FnOnce(&Arc<Inner>, &Ctx, &mut Disk, R) + Send + 'static,
    ) {
        let fs = self.clone();
        let DiskAt {
            holder,
            domain: d2,
            id: id2,
            target: t2,
        } = at;
        let key = (d2.clone(), id2.clone(), t2.clone());
        self.guest.submit(
            &key,
            Box::new(move |disk: &mut Disk| {
                let Some(dom) = fs.reg.get(&d2) else {
                    return reply.fail(Errno::ENOENT);
                };
                let Some(snap) = dom.forest().get(&id2).cloned() else {
                    return reply.fail(Errno::ENOENT);
                };
                let view = match dom.views().view(&snap, &t2) {
                    Ok(v) => v,
                    Err(e) => return reply.fail(errno(&e)),
                };
                let size = super::content::image_of(&dom, &id2, &t2)
                    .and_then(|i| dom.views().disk_size(&i))
                    .unwrap_or(0);
                disk.set_view(view, size);
                let ctx = Ctx {
                    dom,
                    snap,
                    target: t2,
                    holder,
                };
                job(&fs, &ctx, disk, reply);
            }),
        );
    }

    /// The attributes of a place (a disk or partition directory: ours).
    fn guest_attr(
        &self,
        ctx: &Ctx,
        disk: &mut Disk,
        place: &GuestPath,
    ) -> Result<Option<Attr>, Errno> {
        if place.path.is_empty() {
            return Ok(None);
        }
        match disk.stat(place.part_number(), &place.path, &mut ctx.note()) {
            None => Err(Errno::ENOENT),
            Some(r) => r.map(Some).map_err(|e| io_errno(&e)),
        }
    }

    /// The entries of directory `place`.
    fn guest_entries(
        &self,
        ctx: &Ctx,
        disk: &mut Disk,
        place: &GuestPath,
    ) -> Result<Vec<Entry>, Errno> {
        let mut note = ctx.note();
        if place.part.is_empty() && place.path.is_empty() {
            let parts = disk.partitions(&mut note);
            if !parts.is_empty() {
                return Ok(parts
                    .into_iter()
                    .map(|n| {
                        let name = n.to_string();
                        Entry {
                            place: GuestPath {
                                target: place.target.clone(),
                                part: name.clone(),
                                path: Vec::new(),
                            },
                            attr: None,
                            name: name.into_bytes(),
                        }
                    })
                    .collect());
            }
        }
        let listing = disk
            .list(place.part_number(), &place.path, &mut note)
            .map_err(|e| io_errno(&e))?;
        Ok(listing
            .iter()
            .map(|(name, attr)| Entry {
                place: GuestPath {
                    target: place.target.clone(),
                    part: place.part.clone(),
                    path: join(&place.path, name),
                },
                attr: Some(attr.clone()),
                name: name.clone(),
            })
            .collect())
    }

    /// The kernel's attributes of `node` with attributes `attr` (`None`:
    /// a disk or partition directory).
    fn guest_file_attr(&self, node: &Node, ino: u64, attr: Option<&Attr>) -> Option<FileAttr> {
        match attr {
            Some(a) => Some(file_attr(ino, a)),
            None => self.attr(node, 0).map(|(a, _)| a),
        }
    }

    /// `lookup` in a directory below `files/<target>/`.
    pub(super) fn guest_lookup(
        self: &Arc<Self>,
        at: DiskAt,
        parent: GuestPath,
        name: &OsStr,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        let (d2, id2) = (at.domain.clone(), at.id.clone());
        self.guest_job(at, reply, move |fs, ctx, disk, reply| {
            let found = ctx.held(|| -> Result<(GuestPath, Option<Attr>), Errno> {
                let mut note = ctx.note();
                if parent.part.is_empty() && parent.path.is_empty() {
                    let parts = disk.partitions(&mut note);
                    if !parts.is_empty() {
                        let n = std::str::from_utf8(&name).map_err(|_| Errno::ENOENT)?;
                        if !parts.iter().any(|p| p.to_string() == n) {
                            return Err(Errno::ENOENT);
                        }
                        let place = GuestPath {
                            target: parent.target.clone(),
                            part: n.to_owned(),
                            path: Vec::new(),
                        };
                        return Ok((place, None));
                    }
                }
                let place = GuestPath {
                    target: parent.target.clone(),
                    part: parent.part.clone(),
                    path: join(&parent.path, &name),
                };
                let attr = fs.guest_attr(ctx, disk, &place)?;
                Ok((place, attr))
            });
            let (place, attr) = match found.and_then(|r| r) {
                Ok(x) => x,
                Err(e) => return reply.error(e),
            };
            let node = Node::Guest(d2, id2, place);
            let ino = fs.inodes.lookup(&node, &name);
            match fs.guest_file_attr(&node, ino, attr.as_ref()) {
                Some(a) => reply.entry_with_ttls(&STABLE_TTL, &STABLE_TTL, &a, Generation(0)),
                None => {
                    fs.inodes.forget(ino, 1);
                    reply.error(Errno::ENOENT)
                }
            }
        });
    }

    /// `getattr` of a guest file (below a disk or partition directory).
    pub(super) fn guest_getattr(
        self: &Arc<Self>,
        at: DiskAt,
        ino: u64,
        place: GuestPath,
        reply: ReplyAttr,
    ) {
        self.guest_job(at, reply, move |fs, ctx, disk, reply| {
            match ctx
                .held(|| fs.guest_attr(ctx, disk, &place))
                .and_then(|r| r)
            {
                Ok(Some(a)) => reply.attr(&STABLE_TTL, &file_attr(ino, &a)),
                Ok(None) => reply.error(Errno::ENOENT),
                Err(e) => reply.error(e),
            }
        });
    }

    /// `readlink` of a guest symlink.
    pub(super) fn guest_readlink(self: &Arc<Self>, at: DiskAt, place: GuestPath, reply: ReplyData) {
        self.guest_job(at, reply, move |_fs, ctx, disk, reply| {
            let r = ctx.held(|| disk.read_link(place.part_number(), &place.path, &mut ctx.note()));
            match r {
                Ok(Some(Ok(t))) => reply.data(&t),
                Ok(Some(Err(e))) => reply.error(io_errno(&e)),
                Ok(None) => reply.error(Errno::ENOENT),
                Err(e) => reply.error(e),
            }
        });
    }

    /// `open` of a guest file: read-only; holds the snapshot until released.
    pub(super) fn guest_open(
        self: &Arc<Self>,
        at: DiskAt,
        place: GuestPath,
        write: bool,
        reply: ReplyOpen,
    ) {
        if write {
            return reply.error(Errno::EROFS);
        }
        if place.path.is_empty() {
            return reply.error(Errno::EISDIR);
        }
        let id2 = at.id.clone();
        self.guest_job(at, reply, move |fs, ctx, disk, reply| {
            let hold = match ctx.dom.views().hold(&ctx.snap, ctx.holder) {
                Ok(h) => h,
                Err(e) => return reply.error(errno(&e)),
            };
            let kind = hold
                .read(|| Ok(fs.guest_attr(ctx, disk, &place)))
                .map_err(|e| io_errno(&e))
                .and_then(|r| r);
            let refused = match kind {
                Ok(Some(a)) if a.kind == Kind::File => None,
                Ok(Some(a)) if a.kind == Kind::Dir => Some(Errno::EISDIR),
                Ok(_) => Some(Errno::EINVAL),
                Err(e) => Some(e),
            };
            if let Some(e) = refused {
                ctx.dom.views().close(&hold);
                return reply.error(e);
            }
            let fh = fs
                .next_fh
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let open = OpenGuest {
                domain: ctx.dom.clone(),
                hold,
                id: id2,
                place,
            };
            fs.handles.lock().insert(fh, Handle::Guest(Arc::new(open)));
            // The file never changes: the kernel may keep what it read.
            reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
        });
    }

    /// `read` of an open guest file.
    pub(super) fn guest_read(
        self: &Arc<Self>,
        open: Arc<OpenGuest>,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        let at = DiskAt::new(
            open.hold.holder(),
            open.domain.name(),
            &open.id,
            &open.place.target,
        );
        self.guest_job(at, reply, move |_fs, ctx, disk, reply| {
            let mut buf = vec![0u8; size as usize];
            let place = &open.place;
            let r = open.hold.read(|| {
                match disk.read(
                    place.part_number(),
                    &place.path,
                    offset,
                    &mut buf,
                    &mut ctx.note(),
                ) {
                    Some(r) => r,
                    None => Err(std::io::Error::from_raw_os_error(libc::EIO)),
                }
            });
            match r {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => {
                    if e.raw_os_error().is_none() {
                        ctx.dom.views().note(&format!(
                            "files/{} of {:?}: read of {} failed (EIO): {e}",
                            ctx.target,
                            ctx.snap.name,
                            String::from_utf8_lossy(&place.path)
                        ));
                    }
                    reply.error(io_errno(&e))
                }
            }
        });
    }

    /// `readdir` (`plus`: with attributes) of a directory below `files/<target>/`.
    pub(super) fn guest_readdir(
        self: &Arc<Self>,
        at: DiskAt,
        place: GuestPath,
        offset: u64,
        reply: GuestDirReply,
    ) {
        let (d2, id2) = (at.domain.clone(), at.id.clone());
        self.guest_job(at, reply, move |fs, ctx, disk, mut reply| {
            let entries = match ctx
                .held(|| fs.guest_entries(ctx, disk, &place))
                .and_then(|r| r)
            {
                Ok(e) => e,
                Err(e) => return reply.error(e),
            };
            let me = Node::Guest(d2.clone(), id2.clone(), place.clone());
            let up = fs.parent_of(&me);
            let dots = [(me, b".".to_vec()), (up, b"..".to_vec())];
            let dir_attr = Some(file_attr(0, &synthetic_dir()));
            let all =
                dots.into_iter()
                    .map(|(n, name)| (n, None, name))
                    .chain(entries.into_iter().map(|e| {
                        (
                            Node::Guest(d2.clone(), id2.clone(), e.place),
                            e.attr,
                            e.name,
                        )
                    }));
            for (i, (node, attr, name)) in all.enumerate().skip(offset as usize) {
                let next = (i + 1) as u64;
                let kind = attr
                    .as_ref()
                    .map_or(FileType::Directory, |a| file_type(a.kind));
                let full = match &mut reply {
                    GuestDirReply::Plain(r) => r.add(
                        INodeNo(fs.inodes.ino(&node)),
                        next,
                        kind,
                        OsStr::from_bytes(&name),
                    ),
                    GuestDirReply::Plus(r) => {
                        // Every entry but `.` and `..` counts as a lookup.
                        let counted = i >= 2;
                        let ino = if counted {
                            fs.inodes.lookup(&node, &name)
                        } else {
                            fs.inodes.ino(&node)
                        };
                        let a = if counted {
                            fs.guest_file_attr(&node, ino, attr.as_ref())
                        } else {
                            dir_attr.map(|mut a| {
                                a.ino = INodeNo(ino);
                                a
                            })
                        };
                        let Some(a) = a else {
                            if counted {
                                fs.inodes.forget(ino, 1);
                            }
                            continue;
                        };
                        let full = r.add(
                            INodeNo(ino),
                            next,
                            OsStr::from_bytes(&name),
                            &STABLE_TTL,
                            &a,
                            Generation(0),
                        );
                        if full && counted {
                            fs.inodes.forget(ino, 1);
                        }
                        full
                    }
                };
                if full {
                    break;
                }
            }
            reply.ok();
        });
    }
}

/// The reply of a `readdir` or a `readdirplus`.
pub(super) enum GuestDirReply {
    /// Names and kinds.
    Plain(ReplyDirectory),
    /// Names with attributes.
    Plus(ReplyDirectoryPlus),
}

impl GuestDirReply {
    fn error(self, e: Errno) {
        match self {
            GuestDirReply::Plain(r) => r.error(e),
            GuestDirReply::Plus(r) => r.error(e),
        }
    }
    fn ok(self) {
        match self {
            GuestDirReply::Plain(r) => r.ok(),
            GuestDirReply::Plus(r) => r.ok(),
        }
    }
}
