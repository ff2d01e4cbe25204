//! The frozen views of one domain's snapshots (`disks/<target>`): one
//! lazily started read-only `qemu-nbd` per snapshot and disk, released
//! when idle. Open views hold their snapshot: it cannot be deleted while
//! one is open.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::backend::qemu_img;
use crate::error::{Error, Result};
use crate::model::{DiskDef, DiskSnapshotKind, MemoryLocation, Snapshot};
use crate::views::{DirectView, ErrorSink, FrozenView, LazyView, ViewOptions, ViewSource};

/// Views, their open counts, and the virtual sizes of images.
pub struct DiskViews {
    options: ViewOptions,
    views: Mutex<HashMap<(String, String), Served>>,
    holds: Mutex<Holds>,
    sizes: Mutex<HashMap<PathBuf, u64>>,
    allocation: Arc<Mutex<Allocation>>,
    /// The domain's defined disks: an image that is one of them is opened
    /// with its format, any other as qcow2 (never probed).
    disks: Vec<DiskDef>,
}

/// Allocated bytes of each view (snapshot id, target), computed off the
/// FUSE threads; `generation` changes when images change, so a result
/// computed before is not stored.
#[derive(Default)]
struct Allocation {
    bytes: HashMap<(String, String), u64>,
    running: HashSet<(String, String)>,
    generation: u64,
}

/// One view and, when it has one, its server-backed part.
#[derive(Clone)]
struct Served {
    view: Arc<dyn FrozenView>,
    server: Arc<LazyView>,
}

#[derive(Default)]
struct Holds {
    /// Snapshot id -> the open views and memory files of it.
    open: HashMap<String, Vec<Arc<Hold>>>,
    deleting: HashSet<String>,
}

/// The process that opened a view (from the FUSE request of the open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
}

/// One open view or memory file: it keeps its snapshot from being
/// deleted until it is closed, or until root breaks it.
pub struct Hold {
    snapshot: String,
    holder: Holder,
    command: String,
    broken: parking_lot::RwLock<bool>,
}

impl Hold {
    /// Runs `read` unless root broke the hold (`ESTALE` then). A break
    /// waits for reads in progress, so no read of a broken hold ever sees
    /// an image a delete changes.
    pub fn read<T>(&self, read: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        let broken = self.broken.read();
        if *broken {
            return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
        }
        read()
    }

    /// `pid 123 (cat /snaps/...) uid 1000`, for `.log`.
    pub fn describe(&self) -> String {
        format!(
            "pid {} ({}) uid {}",
            self.holder.pid, self.command, self.holder.uid
        )
    }
}

/// The command line of process `pid`, shortened, for `.log`.
fn command_of(pid: u32) -> String {
    let argv = crate::backend::process::read_argv(pid as i32).unwrap_or_default();
    let mut line = argv.join(" ");
    if line.is_empty() {
        line = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
    }
    if let Some((i, _)) = line.char_indices().nth(80) {
        line.truncate(i);
        line.push_str("...");
    }
    line
}

impl DiskViews {
    /// Views whose `qemu-nbd` sockets live in `runtime_dir`; failures to
    /// serve one are told to `on_error`. Servers left there by a daemon
    /// that died are stopped. `disks` are the domain's defined disks (an
    /// image that is one of them is opened with its format).
    pub fn new(runtime_dir: &Path, on_error: Option<ErrorSink>, disks: Vec<DiskDef>) -> Self {
        let _ = crate::store::atomic::private_dir(runtime_dir);
        stop_orphans(runtime_dir);
        let options = ViewOptions {
            runtime_dir: runtime_dir.to_owned(),
            on_error,
            ..Default::default()
        };
        DiskViews {
            options,
            views: Mutex::new(HashMap::new()),
            holds: Mutex::new(Holds::default()),
            sizes: Mutex::new(HashMap::new()),
            allocation: Arc::default(),
            disks,
        }
    }

    /// The image a snapshot's disk can be viewed from, if it has one
    /// (`Ok(None)`), with its checked backing chain spelled out: a chain
    /// that names a backing file vmsnapfs refuses to open is an error.
    fn source(disks: &[DiskDef], snap: &Snapshot, target: &str) -> Result<Option<ViewSource>> {
        let Some(d) = snap.disks.iter().find(|d| d.target == target) else {
            return Ok(None);
        };
        let Some(image) = d.image.clone() else {
            return Ok(None);
        };
        let format = match d.kind {
            DiskSnapshotKind::Internal => "qcow2".to_owned(),
            _ => qemu_img::expected_format(disks, &image),
        };
        // The chain below, spelled out so that the server takes no lock
        // and follows nothing else.
        let chain = qemu_img::chain(&image, &format)?;
        let backing = chain
            .iter()
            .skip(1)
            .map(|i| (i.path.clone(), i.format.clone()))
            .collect();
        let source = match d.kind {
            DiskSnapshotKind::Internal => ViewSource::internal_snapshot(image, &snap.id),
            DiskSnapshotKind::External => ViewSource::image(image),
            DiskSnapshotKind::No => return Ok(None),
        };
        Ok(Some(source.with_format(format).with_backing(backing)))
    }

    /// Opens a view of `target` at `snap`, holding the snapshot until
    /// [`DiskViews::close`]. EBUSY while the snapshot is being deleted.
    /// An internal snapshot is read directly from its qcow2 file when the
    /// image's layout allows it, else through `qemu-nbd`.
    pub fn open(
        &self,
        snap: &Snapshot,
        target: &str,
        holder: Holder,
    ) -> Result<(Arc<dyn FrozenView>, Arc<Hold>)> {
        let in_snapshot = snap
            .disks
            .iter()
            .any(|d| d.target == target && d.kind != DiskSnapshotKind::No && d.image.is_some());
        if !in_snapshot {
            return Err(Error::not_found(format!(
                "disk {target} is not in this snapshot"
            )));
        }
        let hold = self.hold(snap, holder)?;
        let key = (snap.id.clone(), target.to_owned());
        if let Some(s) = self.views.lock().get(&key) {
            return Ok((s.view.clone(), hold));
        }
        // Only a view not served yet needs its chain (one qemu-img run).
        let source = match Self::source(&self.disks, snap, target) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.close(&hold);
                return Err(Error::not_found(format!(
                    "disk {target} is not in this snapshot"
                )));
            }
            Err(e) => {
                self.close(&hold);
                let e = e.context(format!("view of disk {target} of {:?}", snap.name));
                if let Some(sink) = &self.options.on_error {
                    (sink.0)(&format!("refused (EIO): {}", e.message));
                }
                return Err(e);
            }
        };
        // Internal snapshots and external points alike are frozen: read
        // directly when the layout allows, else through qemu-nbd.
        let direct = match source.format.as_str() {
            "qcow2" => match crate::views::qcow2::Qcow2Snapshot::open_chain(
                &source.image,
                source.snapshot.as_deref(),
                &source.backing,
            ) {
                Ok(d) => d,
                Err(e) => {
                    self.close(&hold);
                    let text = format!("view of disk {target} of {:?}: {e}", snap.name);
                    if let Some(sink) = &self.options.on_error {
                        (sink.0)(&text);
                    }
                    return Err(Error::io(text));
                }
            },
            _ => None,
        };
        let server = Arc::new(LazyView::new(source, self.options.clone()));
        let view: Arc<dyn FrozenView> = match direct {
            Some(direct) => Arc::new(DirectView {
                direct,
                fallback: server.clone(),
            }),
            None => server.clone(),
        };
        let served = Served { view, server };
        let view = self.views.lock().entry(key).or_insert(served).view.clone();
        Ok((view, hold))
    }

    /// Records a new hold of `snap` unless it is being deleted (EBUSY).
    fn hold(&self, snap: &Snapshot, holder: Holder) -> Result<Arc<Hold>> {
        let command = command_of(holder.pid);
        let mut holds = self.holds.lock();
        if holds.deleting.contains(&snap.id) {
            return Err(Error::busy(format!(
                "snapshot {:?} is being deleted",
                snap.name
            )));
        }
        let hold = Arc::new(Hold {
            snapshot: snap.id.clone(),
            holder,
            command,
            broken: parking_lot::RwLock::new(false),
        });
        holds
            .open
            .entry(snap.id.clone())
            .or_default()
            .push(hold.clone());
        Ok(hold)
    }

    /// Opens the memory file of an external checkpoint, holding the
    /// snapshot like a disk view until [`DiskViews::close`].
    pub fn open_memory(
        &self,
        snap: &Snapshot,
        holder: Holder,
    ) -> Result<(Arc<dyn FrozenView>, Arc<Hold>)> {
        let MemoryLocation::External(path) = &snap.memory else {
            return Err(Error::not_found("the snapshot has no memory file"));
        };
        let file = crate::views::FileView::open(path)
            .map_err(|e| Error::io(format!("{}: {e}", path.display())))?;
        let hold = self.hold(snap, holder)?;
        Ok((Arc::new(file), hold))
    }

    /// Ends one [`DiskViews::open`] (or [`DiskViews::open_memory`]).
    pub fn close(&self, hold: &Arc<Hold>) {
        let mut holds = self.holds.lock();
        if let Some(v) = holds.open.get_mut(&hold.snapshot) {
            v.retain(|h| !Arc::ptr_eq(h, hold));
            if v.is_empty() {
                holds.open.remove(&hold.snapshot);
            }
        }
    }

    /// Who holds snapshot `id` open: `pid 123 (cat ...) uid 1000, ...`.
    pub fn holders(&self, id: &str) -> String {
        let holds = self.holds.lock();
        holds
            .open
            .get(id)
            .map(|v| {
                v.iter()
                    .map(|h| h.describe())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }

    /// Breaks every hold of snapshot `id` (root's `force`): later reads
    /// through them fail with `ESTALE`. Returns who held it.
    pub fn break_holds(&self, id: &str) -> Vec<String> {
        let broken = self.holds.lock().open.remove(id).unwrap_or_default();
        broken
            .iter()
            .map(|h| {
                // Waits for a read in progress through this hold.
                *h.broken.write() = true;
                h.describe()
            })
            .collect()
    }

    /// True while a view or the memory file of snapshot `id` is open.
    pub fn is_open(&self, id: &str) -> bool {
        self.holds.lock().open.contains_key(id)
    }

    /// Drops the cached (unopened) views of snapshot `id`, whose images
    /// changed: the next open starts from the snapshot's new metadata.
    pub fn forget(&self, id: &str) {
        {
            let mut a = self.allocation.lock();
            a.generation += 1;
            a.bytes.retain(|(sid, _), _| sid != id);
        }
        self.views.lock().retain(|(sid, _), s| {
            if sid == id {
                s.server.close();
            }
            sid != id
        });
    }

    /// Drops every cached view after images were merged: the next open
    /// reads the new chains. Views open now keep their server until closed.
    pub fn forget_all(&self) {
        {
            let mut a = self.allocation.lock();
            a.generation += 1;
            a.bytes.clear();
        }
        let open: HashSet<String> = self.holds.lock().open.keys().cloned().collect();
        let mut views = self.views.lock();
        for ((sid, _), s) in views.iter() {
            if !open.contains(sid) {
                s.server.close();
            }
        }
        views.clear();
    }

    /// Marks snapshot `id` as being deleted unless a view of it is open.
    pub fn hold_for_delete(&self, id: &str) -> bool {
        let mut holds = self.holds.lock();
        if holds.open.contains_key(id) {
            return false;
        }
        holds.deleting.insert(id.to_owned());
        true
    }

    /// Ends a delete: the snapshot's views are dropped if it is gone.
    pub fn end_delete(&self, id: &str, gone: bool) {
        self.holds.lock().deleting.remove(id);
        if gone {
            self.views.lock().retain(|(sid, _), s| {
                if sid == id {
                    s.server.close();
                }
                sid != id
            });
        }
    }

    /// Stops the servers of views unused for `after`.
    pub fn release_idle(&self, after: Duration) {
        let servers: Vec<Arc<LazyView>> = self
            .views
            .lock()
            .values()
            .map(|s| s.server.clone())
            .collect();
        for v in servers {
            v.close_if_idle(after);
        }
    }

    /// Stops every server (at unmount).
    pub fn close_all(&self) {
        for s in self.views.lock().values() {
            s.server.close();
        }
    }

    /// The virtual size of an image, read once with `qemu-img info`
    /// (opened with the format it must have).
    pub fn disk_size(&self, image: &Path) -> Option<u64> {
        if let Some(s) = self.sizes.lock().get(image) {
            return Some(*s);
        }
        let format = qemu_img::expected_format(&self.disks, image);
        let size = qemu_img::virtual_size(image, &format).ok()?;
        self.sizes.lock().insert(image.to_owned(), size);
        Some(size)
    }
}

impl DiskViews {
    /// Bytes the view of `target` at `snap` holds (data, not holes or
    /// zeroes), for `st_blocks`. Never waits: `None` while a background
    /// thread computes it (from the qcow2 tables, or `qemu-img map` for
    /// what the direct reader does not handle).
    pub fn allocated(&self, snap: &Snapshot, target: &str) -> Option<u64> {
        let key = (snap.id.clone(), target.to_owned());
        let mut a = self.allocation.lock();
        if let Some(b) = a.bytes.get(&key) {
            return Some(*b);
        }
        if !a.running.insert(key.clone()) {
            return None;
        }
        let generation = a.generation;
        drop(a);
        let cache = self.allocation.clone();
        let snap = snap.clone();
        let job = key.clone();
        let disks = self.disks.clone();
        let spawned = std::thread::Builder::new()
            .name("view-allocation".into())
            .spawn(move || {
                let bytes = Self::source(&disks, &snap, &job.1)
                    .ok()
                    .flatten()
                    .and_then(|s| allocated_bytes(&s));
                let mut a = cache.lock();
                a.running.remove(&job);
                if let (Some(b), true) = (bytes, a.generation == generation) {
                    a.bytes.insert(job, b);
                }
            });
        if spawned.is_err() {
            self.allocation.lock().running.remove(&key);
        }
        None
    }
}

/// Allocated bytes of a view's source: counted in the qcow2 tables down
/// the chain, else (an external point the direct reader does not handle)
/// the data extents `qemu-img map` reports.
fn allocated_bytes(source: &ViewSource) -> Option<u64> {
    if source.format == "qcow2" {
        let direct = crate::views::qcow2::Qcow2Snapshot::open_chain(
            &source.image,
            source.snapshot.as_deref(),
            &source.backing,
        );
        if let Ok(Some(d)) = direct {
            if let Ok(b) = d.allocated_bytes() {
                return Some(b);
            }
        }
    }
    if source.snapshot.is_some() {
        return None;
    }
    let chain: Vec<qemu_img::ChainImage> = std::iter::once((&source.image, &source.format))
        .chain(source.backing.iter().map(|(p, f)| (p, f)))
        .map(|(p, f)| qemu_img::ChainImage {
            path: p.clone(),
            format: f.clone(),
            snapshots: Vec::new(),
        })
        .collect();
    qemu_img::allocated_bytes(&chain).ok()
}

/// Stops `qemu-nbd` processes serving sockets in `dir` (left by a daemon
/// that was killed): found by their command line, stopped by pid.
fn stop_orphans(dir: &Path) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let dir = format!("{}/", dir.to_string_lossy());
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Some(argv) = crate::backend::process::read_argv(pid) else {
            continue;
        };
        let is_nbd = argv.first().is_some_and(|a| a.ends_with("qemu-nbd"));
        let ours = argv.iter().any(|a| a.starts_with(&dir));
        if is_nbd && ours {
            log::info!("stopping qemu-nbd pid {pid} left by an earlier daemon");
            // SAFETY: kill(2) of a pid whose command line names our runtime dir.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
}
