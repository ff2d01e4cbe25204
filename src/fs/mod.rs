//! The FUSE front end: the only module that imports `fuser`. It maps
//! inodes to domains and snapshots, generates file contents, and hands
//! every snapshot operation to a worker thread so that `ls` and `cat`
//! never wait behind one.

mod changes;
pub mod content;
mod guest;
pub mod inode;
mod invalidate;
mod tree;
pub mod xml_edit;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use parking_lot::Mutex;

use crate::domain::{Domain, Registry};
use crate::error::Error;
use inode::{DomainFile, InodeTable, Node, SnapFile};
use xml_edit::{Step, XmlEdit, XmlTarget};

/// Names and attributes that change only through this mount or by
/// operations that tell the kernel (see `invalidate.rs`).
const STABLE_TTL: Duration = Duration::from_secs(60);
/// Attributes of things that change by themselves (`.state`, `.log`), and
/// entries that come and go with other changes (`.current`, `parent`).
const LIVE_TTL: Duration = Duration::ZERO;

/// How the tree is presented.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Let users other than root in (permissions are then enforced).
    pub allow_other: bool,
    /// A group that may create, revert and delete snapshots.
    pub group: Option<u32>,
    /// FUSE request threads.
    pub threads: usize,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            allow_other: false,
            group: None,
            threads: 4,
        }
    }
}

struct Inner {
    reg: Arc<Registry>,
    inodes: InodeTable,
    config: MountConfig,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    mounted_at: SystemTime,
    invalidator: Arc<invalidate::Invalidator>,
    /// The threads that read the guest's files (`files/`).
    guest: crate::guestfs::workers::Workers,
}

/// What an open file handle reads from or writes to.
enum Handle {
    /// Generated text, fixed at open so a reader sees one version.
    Text(Arc<Vec<u8>>),
    /// A frozen view of a snapshot's disk; holds the snapshot while open.
    View {
        view: Arc<dyn crate::views::FrozenView>,
        domain: Arc<Domain>,
        hold: Arc<crate::domain::views::Hold>,
    },
    /// An XML document being written to `snapshot.xml` or `.create`;
    /// applied as soon as it is whole (else when the file is closed).
    /// Its own lock: a long document never holds up other handles.
    XmlEdit(Arc<Mutex<XmlEdit>>),
    /// A guest file below `files/`; holds the snapshot while open.
    Guest(Arc<guest::OpenGuest>),
}

/// The vmsnapfs filesystem.
pub struct SnapFs {
    inner: Arc<Inner>,
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn secs(t: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)
}

impl SnapFs {
    /// A filesystem over the domains of `reg`.
    pub fn new(reg: Arc<Registry>, config: MountConfig) -> Self {
        SnapFs {
            inner: Arc::new(Inner {
                reg,
                inodes: InodeTable::new(),
                config,
                handles: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                mounted_at: SystemTime::now(),
                invalidator: Arc::default(),
                guest: Default::default(),
            }),
        }
    }

    /// Mounts at `mountpoint` and serves from background threads.
    pub fn spawn(self, mountpoint: &Path) -> std::io::Result<fuser::BackgroundSession> {
        let config = fuse_config(&self.inner.config);
        let inner = self.inner.clone();
        let session = fuser::spawn_mount(self, mountpoint, &config)?;
        inner
            .invalidator
            .start(session.notifier(), Arc::downgrade(&inner));
        raise_readahead(mountpoint);
        Ok(session)
    }
}

/// Lets buffered reads of the mount use 1 MiB requests (the kernel's
/// default read-ahead of 128 KiB halves the throughput of frozen views).
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, "1024") {
        log::debug!("cannot raise read-ahead ({knob}): {e}");
    }
}

fn fuse_config(c: &MountConfig) -> fuser::Config {
    use fuser::MountOption as O;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        O::FSName("vmsnapfs".into()),
        O::Subtype("vmsnapfs".into()),
        O::DefaultPermissions,
        O::NoDev,
        O::NoSuid,
        O::NoExec,
    ];
    config.acl = if c.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(c.threads.max(1));
    config.clone_fd = true;
    config
}

/// Answers a read of a frozen view, into a buffer kept per FUSE thread;
/// `ESTALE` once root broke the hold.
fn read_view(
    view: &dyn crate::views::FrozenView,
    hold: &crate::domain::views::Hold,
    offset: u64,
    size: u32,
    reply: ReplyData,
) {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        if buf.len() < size as usize {
            buf.resize(size as usize, 0);
        }
        let buf = &mut buf[..size as usize];
        let read = hold.read(|| {
            let mut done = 0;
            while done < buf.len() {
                match view.read_at(offset + done as u64, &mut buf[done..])? {
                    0 => break,
                    n => done += n,
                }
            }
            Ok(done)
        });
        match read {
            Ok(done) => reply.data(&buf[..done]),
            Err(e) => {
                if e.raw_os_error() != Some(libc::ESTALE) {
                    log::warn!("frozen view read at {offset}: {e}");
                }
                reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)))
            }
        }
    });
}

/// The process (thread group) of the thread `tid` that made a request.
fn process_of(tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

/// Runs `f` on a worker thread: snapshot operations may take seconds.
fn off_thread(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name("snap-op".into()).spawn(f) {
        log::error!("cannot start a worker thread: {e}");
    }
}

impl Filesystem for SnapFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1024 * 1024);
        // `ls -l` and backup walkers get names and attributes in one go.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = &self.inner;
        let Ok(p) = fs.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        if let Node::Guest(d, id, g) = p {
            return fs.guest_lookup(guest::DiskAt::of(req, &d, &id, &g), g, name, reply);
        }
        match fs.child(&p, name) {
            Some(node) => fs.reply_entry(&node, name.as_bytes(), req.uid(), reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    // fuser's default `batch_forget` calls this for each inode (its
    // `ForgetOne` is not public, so it cannot be overridden).
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = &self.inner;
        if let Ok(Node::Guest(d, id, g)) = fs.node(ino) {
            if !g.path.is_empty() {
                return fs.guest_getattr(guest::DiskAt::of(req, &d, &id, &g), ino.0, g, reply);
            }
        }
        // A changes file whose extents are not known yet: from a worker.
        let reply = match fs.node(ino) {
            Ok(node) => match fs.getattr_later(&node, req.uid(), reply) {
                Some(reply) => reply,
                None => return,
            },
            Err(e) => return reply.error(e),
        };
        match fs.node(ino).ok().and_then(|n| fs.attr(&n, req.uid())) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let fs = &self.inner;
        let Ok(node) = fs.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // Only the truncation that `echo > revert` or `> snapshot.xml` does.
        let control = matches!(
            node,
            Node::SnapshotFile(
                _,
                _,
                SnapFile::Revert | SnapFile::Delete | SnapFile::Release | SnapFile::SnapshotXml
            ) | Node::DomainFile(_, DomainFile::Create | DomainFile::Start)
        );
        if !(control && size == Some(0)) {
            return reply.error(Errno::EPERM);
        }
        match fs.attr(&node, req.uid()) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = &self.inner;
        let target = match fs.node(ino) {
            Ok(Node::Guest(d, id, g)) => {
                return fs.guest_readlink(guest::DiskAt::of(req, &d, &id, &g), g, reply)
            }
            Ok(Node::DomainFile(d, DomainFile::Current)) => {
                fs.reg.get(&d).and_then(|dom| content::current_target(&dom))
            }
            Ok(Node::SnapshotImage(d, id, t)) => fs
                .reg
                .get(&d)
                .and_then(|dom| content::image_of(&dom, &id, &t))
                .map(|p| p.to_string_lossy().into_owned()),
            Ok(Node::SnapshotFile(d, id, SnapFile::Parent)) => fs
                .reg
                .get(&d)
                .and_then(|dom| content::parent_target(&dom, &id)),
            _ => return reply.error(Errno::EINVAL),
        };
        match target {
            Some(t) => reply.data(t.as_bytes()),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let fs = self.inner.clone();
        let Ok(Node::Domain(d)) = fs.node(parent) else {
            return reply.error(Errno::EPERM);
        };
        let Ok(dom) = fs.domain(&d) else {
            return reply.error(Errno::ENOENT);
        };
        let name = name.as_bytes().to_vec();
        let uid = req.uid();
        off_thread(move || {
            match dom.create(&name) {
                Ok(id) => fs.reply_entry(&Node::Snapshot(d, id), &name, uid, reply),
                Err(e) => reply.error(errno(&e)),
            }
            // The kernel holds the directory's lock until the reply: ask only.
            fs.invalidator.kick();
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = &self.inner;
        let Ok(Node::Domain(d)) = fs.node(parent) else {
            return reply.error(Errno::EPERM);
        };
        let Ok(dom) = fs.domain(&d) else {
            return reply.error(Errno::ENOENT);
        };
        let Ok(name) = std::str::from_utf8(name.as_bytes()).map(str::to_owned) else {
            return reply.error(Errno::ENOENT);
        };
        let fs = fs.clone();
        off_thread(move || {
            match dom.delete(&name) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
            fs.invalidator.kick();
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let fs = &self.inner;
        let (Ok(Node::Domain(d)), Ok(Node::Domain(d2))) = (fs.node(parent), fs.node(newparent))
        else {
            return reply.error(Errno::EPERM);
        };
        if d != d2 {
            return reply.error(Errno::EXDEV);
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let Ok(dom) = fs.domain(&d) else {
            return reply.error(Errno::ENOENT);
        };
        let Ok(old) = std::str::from_utf8(name.as_bytes()).map(str::to_owned) else {
            return reply.error(Errno::ENOENT);
        };
        let new = newname.as_bytes().to_vec();
        let fs = fs.clone();
        off_thread(move || {
            match dom.rename(&old, &new) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
            fs.invalidator.kick();
        });
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = &self.inner;
        let Ok(node) = fs.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if let Node::Guest(d, id, g) = node {
            return fs.guest_open(guest::DiskAt::of(req, &d, &id, &g), g, write, reply);
        }
        if matches!(
            node,
            Node::SnapshotFile(
                _,
                _,
                SnapFile::Revert | SnapFile::Delete | SnapFile::Release
            ) | Node::DomainFile(_, DomainFile::Start)
        ) {
            if !write {
                return reply.error(Errno::EACCES);
            }
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        }
        let fh = fs.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Node::Change(..) = node {
            if write {
                return reply.error(Errno::EROFS);
            }
            let holder = crate::domain::views::Holder {
                pid: req.pid(),
                uid: req.uid(),
            };
            return fs.open_change(&node, holder, fh, reply);
        }
        let frozen = match &node {
            Node::SnapshotDisk(d, id, target) => Some((d, id, Some(target))),
            Node::SnapshotFile(d, id, SnapFile::Memory) => Some((d, id, None)),
            _ => None,
        };
        if let Some((d, id, target)) = frozen {
            if write {
                return reply.error(Errno::EROFS);
            }
            let Ok(domain) = fs.domain(d) else {
                return reply.error(Errno::ENOENT);
            };
            let Some(snap) = domain.forest().get(id).cloned() else {
                return reply.error(Errno::ENOENT);
            };
            let holder = crate::domain::views::Holder {
                pid: req.pid(),
                uid: req.uid(),
            };
            let opened = match target {
                Some(target) => domain.views().open(&snap, target, holder),
                None => domain.views().open_memory(&snap, holder),
            };
            let (view, hold) = match opened {
                Ok(v) => v,
                Err(e) => return reply.error(errno(&e)),
            };
            fs.handles
                .lock()
                .insert(fh, Handle::View { view, domain, hold });
            // Requests as large as the reader's (not cut to read-ahead
            // pages): measured 1.5-2x faster than the page-cache path.
            return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
        }
        if matches!(node, Node::DomainFile(_, DomainFile::Create)) && !write {
            return reply.error(Errno::EACCES);
        }
        if write {
            let (domain, target) = match node {
                Node::SnapshotFile(d, id, SnapFile::SnapshotXml) => (d, XmlTarget::Description(id)),
                Node::DomainFile(d, DomainFile::Create) => (d, XmlTarget::Create),
                _ => return reply.error(Errno::EACCES),
            };
            let caller = crate::domain::Caller {
                uid: req.uid(),
                gid: req.gid(),
                pid: process_of(req.pid()),
            };
            let edit = XmlEdit::new(domain, target, caller);
            fs.handles
                .lock()
                .insert(fh, Handle::XmlEdit(Arc::new(Mutex::new(edit))));
            return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
        }
        // The content is fixed at open, so a reader sees one consistent version.
        let Some(data) = fs.generated(&node, req.uid()) else {
            return reply.error(Errno::ENOENT);
        };
        fs.handles.lock().insert(fh, Handle::Text(Arc::new(data)));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        enum Source {
            Text(Arc<Vec<u8>>),
            View(
                Arc<dyn crate::views::FrozenView>,
                Arc<crate::domain::views::Hold>,
            ),
        }
        let source = match self.inner.handles.lock().get(&fh.0) {
            Some(Handle::Guest(g)) => {
                let g = g.clone();
                return self.inner.guest_read(g, offset, size, reply);
            }
            Some(Handle::Text(d)) => Source::Text(d.clone()),
            Some(Handle::View { view, hold, .. }) => Source::View(view.clone(), hold.clone()),
            _ => return reply.error(Errno::EBADF),
        };
        let data = match source {
            Source::Text(d) => d,
            Source::View(view, hold) => {
                return read_view(view.as_ref(), &hold, offset, size, reply)
            }
        };
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        reply.data(&data[start..end]);
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let fs = &self.inner;
        let edit = match fs.handles.lock().get(&fh.0) {
            Some(Handle::XmlEdit(e)) => Some(e.clone()),
            _ => None,
        };
        if let Some(edit) = edit {
            let mut edit = edit.lock();
            // Each byte is scanned once; the document is parsed once, when
            // its root element ends, so errors come back from this write.
            let xml = match edit.write(offset, data, crate::xml::MAX_INPUT_BYTES) {
                Step::Written => return reply.written(data.len() as u32),
                Step::Refused(e) => return reply.error(Errno::from_i32(e)),
                Step::Apply(xml) => xml,
            };
            let (domain, target, caller) = (edit.domain.clone(), edit.target.clone(), edit.caller);
            drop(edit);
            let n = data.len() as u32;
            let fs = self.inner.clone();
            // A create takes seconds: off the FUSE thread.
            return off_thread(move || {
                let applied = fs.apply_xml(&domain, &target, &xml, &caller);
                fs.invalidator.sync();
                match applied {
                    Ok(()) => reply.written(n),
                    Err(e) => reply.error(e),
                }
            });
        }
        if let Ok(Node::DomainFile(d, DomainFile::Start)) = fs.node(ino) {
            let Ok(dom) = fs.domain(&d) else {
                return reply.error(Errno::ENOENT);
            };
            let data = data.to_vec();
            let fs = self.inner.clone();
            // A start waits for QEMU: off the FUSE thread.
            return off_thread(move || {
                let started = dom.start(&data);
                fs.invalidator.sync();
                match started {
                    Ok(()) => reply.written(data.len() as u32),
                    Err(e) => reply.error(errno(&e)),
                }
            });
        }
        let Ok(Node::SnapshotFile(
            d,
            id,
            file @ (SnapFile::Revert | SnapFile::Delete | SnapFile::Release),
        )) = fs.node(ino)
        else {
            return reply.error(Errno::EBADF);
        };
        let Ok(dom) = fs.domain(&d) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(name) = dom.forest().get(&id).map(|s| s.name.clone()) else {
            return reply.error(Errno::ENOENT);
        };
        let data = data.to_vec();
        let uid = req.uid();
        let fs = self.inner.clone();
        // Breaking a hold waits for reads in progress: off the FUSE thread too.
        off_thread(move || {
            let done = match file {
                SnapFile::Delete => dom.delete_tree(&name, &data),
                SnapFile::Release => dom.release(&name, &data, uid),
                _ => dom.revert(&name, &data),
            };
            // Names this removed or added are known to the kernel before
            // the write returns (it holds no directory lock now).
            fs.invalidator.sync();
            match done {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.inner.handles.lock().remove(&fh.0);
        match handle {
            Some(Handle::View { domain, hold, .. }) => domain.views().close(&hold),
            Some(Handle::Guest(g)) => g.domain.views().close(&g.hold),
            Some(Handle::XmlEdit(edit)) => {
                // Never flushed by its writer: applied now; a refusal
                // reaches `.log` only.
                let mut edit = edit.lock();
                if let Some(xml) = edit.finish() {
                    let (d, t, c) = (edit.domain.clone(), edit.target.clone(), edit.caller);
                    let fs = self.inner.clone();
                    off_thread(move || {
                        let _ = fs.apply_xml(&d, &t, &xml, &c);
                        fs.invalidator.kick();
                    });
                }
            }
            _ => {}
        }
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        let (view, hold) = match self.inner.handles.lock().get(&fh.0) {
            Some(Handle::View { view, hold, .. }) => (view.clone(), hold.clone()),
            _ => return reply.error(Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        // Holes come from the server's block status, never from reading zeros.
        let found = match whence {
            libc::SEEK_DATA => hold.read(|| view.seek_data(offset)),
            libc::SEEK_HOLE => hold.read(|| view.seek_hole(offset)),
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Ok(Some(pos)) => reply.offset(pos as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let fs = self.inner.clone();
        // A document that never became whole is applied (and refused) at close.
        let edit = match fs.handles.lock().get(&fh.0) {
            Some(Handle::XmlEdit(e)) => Some(e.clone()),
            _ => None,
        };
        let Some(edit) = edit else {
            return reply.ok();
        };
        let mut edit = edit.lock();
        // Every close of a copy of the descriptor flushes, also in a child
        // the writer forked (closed at its exec): only the writer's counts.
        if process_of(req.pid()) != edit.caller.pid {
            return reply.ok();
        }
        let Some(xml) = edit.finish() else {
            return reply.ok();
        };
        let (domain, target, caller) = (edit.domain.clone(), edit.target.clone(), edit.caller);
        drop(edit);
        off_thread(move || {
            let applied = fs.apply_xml(&domain, &target, &xml, &caller);
            fs.invalidator.sync();
            match applied {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inner.node(ino) {
            Ok(
                Node::Root
                | Node::Domain(_)
                | Node::Snapshot(..)
                | Node::SinceDir(..)
                | Node::SnapshotFile(
                    _,
                    _,
                    SnapFile::Disks
                    | SnapFile::Images
                    | SnapFile::Changes
                    | SnapFile::Since
                    | SnapFile::Files,
                )
                | Node::Guest(..),
            ) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let fs = &self.inner;
        if let Ok(Node::Guest(d, id, g)) = fs.node(ino) {
            let r = guest::GuestDirReply::Plain(reply);
            return fs.guest_readdir(guest::DiskAt::of(req, &d, &id, &g), g, offset, r);
        }
        let Some(listing) = fs.listing(ino) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, (node, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(fs.inodes.ino(node)), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let fs = &self.inner;
        if let Ok(Node::Guest(d, id, g)) = fs.node(ino) {
            let r = guest::GuestDirReply::Plus(reply);
            return fs.guest_readdir(guest::DiskAt::of(req, &d, &id, &g), g, offset, r);
        }
        let Some(listing) = fs.listing(ino) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, (node, _, name)) in listing.iter().enumerate().skip(offset as usize) {
            // Every entry but `.` and `..` counts as a lookup in the kernel.
            let counted = i >= 2;
            let ino = if counted {
                fs.inodes.lookup(node, name.as_bytes())
            } else {
                fs.inodes.ino(node)
            };
            let Some((attr, ttl)) = fs.attr(node, req.uid()) else {
                if counted {
                    fs.inodes.forget(ino, 1);
                }
                continue;
            };
            if reply.add(attr.ino, (i + 1) as u64, name, &ttl, &attr, Generation(0)) {
                if counted {
                    fs.inodes.forget(ino, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 0);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions makes the kernel check modes; only existence here.
        match self.inner.node(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
