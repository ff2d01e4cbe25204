//! The frozen views of one domain's snapshots (`disks/<target>`): each
//! read directly from its image files ([`crate::views::Chain`]), opened
//! on first use and kept while in use. Opening reads a few headers and
//! tables with `pread`; nothing here runs a child process, so FUSE
//! threads never wait on one. Open views hold their snapshot: it cannot
//! be deleted while one is open.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::qemu_img;
use crate::error::{Error, Result};
use crate::model::{DiskDef, DiskSnapshotKind, MemoryLocation, Snapshot};
use crate::views::{Chain, ErrorSink, FrozenView};

#[path = "changes.rs"]
mod changes;

/// Views, their open counts, and the virtual sizes of images.
pub struct DiskViews {
    on_error: Option<ErrorSink>,
    views: Mutex<HashMap<(String, String), Served>>,
    holds: Mutex<Holds>,
    sizes: Mutex<HashMap<PathBuf, u64>>,
    allocation: Arc<Mutex<Allocation>>,
    /// Changed extents between snapshots (`changes/`, `since/`).
    changes: changes::ChangeCache,
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

/// One opened view and when it was last opened.
#[derive(Clone)]
struct Served {
    view: Arc<dyn FrozenView>,
    opened: Instant,
}

/// What a view reads: the top image, its format, and the internal
/// snapshot tag (`None`: the image's current contents, frozen).
#[derive(Debug, Clone)]
struct ViewSource {
    image: PathBuf,
    format: String,
    tag: Option<String>,
}

impl ViewSource {
    fn open(&self) -> std::io::Result<Chain> {
        Chain::open_file(&self.image, &self.format, self.tag.as_deref())
    }
}

/// A view whose read failures are told to the domain's `.log` (once per
/// distinct cause in a row) and answered with `EIO`.
struct LoggedView {
    chain: Chain,
    what: String,
    sink: Option<ErrorSink>,
    last: Mutex<String>,
}

impl LoggedView {
    fn tell<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        r.map_err(|e| {
            let text = e.to_string();
            let mut last = self.last.lock();
            if *last != text {
                log::warn!("{}: {text}", self.what);
                if let Some(sink) = &self.sink {
                    (sink.0)(&format!("read failed (EIO): {}: {text}", self.what));
                }
                *last = text;
            }
            std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO))
        })
    }
}

impl FrozenView for LoggedView {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tell(self.chain.read_at(offset, buf))
    }
    fn seek_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        self.tell(self.chain.seek_data(offset))
    }
    fn seek_hole(&self, offset: u64) -> std::io::Result<Option<u64>> {
        self.tell(self.chain.seek_hole(offset))
    }
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
    broken: parking_lot::RwLock<bool>,
}

impl Hold {
    /// Who holds it.
    pub fn holder(&self) -> Holder {
        self.holder
    }

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

    /// `pid 123 (cat /snaps/...) uid 1000`, for `.log`. The command line
    /// is read now, never while a lock a view's reader takes is held:
    /// reading `/proc/PID/cmdline` waits for the memory map lock of a
    /// process that may itself wait on a read from this mount.
    pub fn describe(&self) -> String {
        format!(
            "pid {} ({}) uid {}",
            self.holder.pid,
            command_of(self.holder.pid),
            self.holder.uid
        )
    }
}

/// How much of a command line `.log` shows.
const COMMAND_SHOWN: usize = 80;

/// The command line of process `pid`, shortened, for `.log`. Only its
/// start is read: `xargs cat` runs with hundreds of KiB of arguments.
fn command_of(pid: u32) -> String {
    use std::io::Read;
    let limit = 4 * COMMAND_SHOWN;
    let mut raw = Vec::with_capacity(limit + 1);
    let _ = std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|f| f.take(limit as u64 + 1).read_to_end(&mut raw));
    let cut = raw.len() > limit;
    raw.truncate(limit);
    let mut line = shown_command(&raw, cut);
    if line.is_empty() {
        line = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
    }
    line
}

/// The start of a NUL-separated argv as one line of at most
/// [`COMMAND_SHOWN`] characters, `...` where cut (`cut`: `raw` is only
/// the start of it).
fn shown_command(raw: &[u8], cut: bool) -> String {
    let mut line = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    if let Some((i, _)) = line.char_indices().nth(COMMAND_SHOWN) {
        line.truncate(i);
        line.push_str("...");
    } else if cut {
        line.push_str("...");
    }
    line
}

impl DiskViews {
    /// Views whose failures are told to `on_error`. `disks` are the
    /// domain's defined disks (an image that is one of them is opened
    /// with its format).
    pub fn new(on_error: Option<ErrorSink>, disks: Vec<DiskDef>) -> Self {
        DiskViews {
            on_error,
            views: Mutex::new(HashMap::new()),
            holds: Mutex::new(Holds::default()),
            sizes: Mutex::new(HashMap::new()),
            allocation: Arc::default(),
            changes: changes::ChangeCache::default(),
            disks,
        }
    }

    /// What the view of `target` at `snap` reads, if the snapshot has
    /// that disk: the top image with the format it must have (an internal
    /// snapshot's image is qcow2; a point image has its defined disk's
    /// format, else qcow2 as every image vmsnapfs makes). The chain below
    /// is what the images record.
    fn source(disks: &[DiskDef], snap: &Snapshot, target: &str) -> Option<ViewSource> {
        let d = snap.disks.iter().find(|d| d.target == target)?;
        let image = d.image.clone()?;
        let (format, tag) = match d.kind {
            DiskSnapshotKind::Internal => ("qcow2".to_owned(), Some(snap.id.clone())),
            DiskSnapshotKind::External => (qemu_img::expected_format(disks, &image), None),
            DiskSnapshotKind::No => return None,
        };
        Some(ViewSource { image, format, tag })
    }

    fn tell(&self, text: &str) {
        log::warn!("{text}");
        if let Some(sink) = &self.on_error {
            (sink.0)(text);
        }
    }

    /// Opens a view of `target` at `snap`, holding the snapshot until
    /// [`DiskViews::close`]. EBUSY while the snapshot is being deleted;
    /// EIO (and a `.log` line saying why) when its images cannot be read.
    pub fn open(
        &self,
        snap: &Snapshot,
        target: &str,
        holder: Holder,
    ) -> Result<(Arc<dyn FrozenView>, Arc<Hold>)> {
        if Self::source(&self.disks, snap, target).is_none() {
            return Err(Error::not_found(format!(
                "disk {target} is not in this snapshot"
            )));
        }
        let hold = self.hold(snap, holder)?;
        match self.view(snap, target) {
            Ok(view) => Ok((view, hold)),
            Err(e) => {
                self.close(&hold);
                Err(e)
            }
        }
    }

    /// The view of `target` at `snap`, opened and cached if needed, without
    /// a hold: the caller holds the snapshot while it reads (see
    /// [`DiskViews::hold`]). EIO (and a `.log` line) when its images cannot
    /// be read.
    pub fn view(&self, snap: &Snapshot, target: &str) -> Result<Arc<dyn FrozenView>> {
        let Some(source) = Self::source(&self.disks, snap, target) else {
            return Err(Error::not_found(format!(
                "disk {target} is not in this snapshot"
            )));
        };
        let key = (snap.id.clone(), target.to_owned());
        if let Some(s) = self.views.lock().get_mut(&key) {
            s.opened = Instant::now();
            return Ok(s.view.clone());
        }
        let what = format!("view of disk {target} of {:?}", snap.name);
        let chain = match source.open() {
            Ok(c) => c,
            Err(e) => {
                let text = format!("refused (EIO): {what}: {}: {e}", source.image.display());
                self.tell(&text);
                return Err(Error::io(text));
            }
        };
        let view: Arc<dyn FrozenView> = Arc::new(LoggedView {
            chain,
            what,
            sink: self.on_error.clone(),
            last: Mutex::default(),
        });
        let served = Served {
            view,
            opened: Instant::now(),
        };
        Ok(self.views.lock().entry(key).or_insert(served).view.clone())
    }

    /// Writes `text` to the domain's `.log` (and the daemon's log).
    pub fn note(&self, text: &str) {
        self.tell(text);
    }

    /// Records a new hold of `snap` unless it is being deleted (EBUSY);
    /// [`DiskViews::close`] ends it.
    pub fn hold(&self, snap: &Snapshot, holder: Holder) -> Result<Arc<Hold>> {
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
        let file = crate::views::FileView::open(path).map_err(|e| Error::at(path, e))?;
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
        // Described once the lock is let go (see `Hold::describe`).
        let held: Vec<Arc<Hold>> = self.holds.lock().open.get(id).cloned().unwrap_or_default();
        held.iter()
            .map(|h| h.describe())
            .collect::<Vec<_>>()
            .join(", ")
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

    /// Drops the cached views of snapshot `id`, whose images changed:
    /// the next open starts from the snapshot's new metadata. Views open
    /// now keep their files until closed.
    pub fn forget(&self, id: &str) {
        {
            let mut a = self.allocation.lock();
            a.generation += 1;
            a.bytes.retain(|(sid, _), _| sid != id);
        }
        self.changes.forget(Some(id));
        self.views.lock().retain(|(sid, _), _| sid != id);
    }

    /// Drops every cached view after images were merged: the next open
    /// reads the new chains. Views open now keep their files until closed.
    pub fn forget_all(&self) {
        {
            let mut a = self.allocation.lock();
            a.generation += 1;
            a.bytes.clear();
        }
        self.changes.forget(None);
        self.views.lock().clear();
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
            self.changes.forget(Some(id));
            self.views.lock().retain(|(sid, _), _| sid != id);
        }
    }

    /// Closes the files of views not opened for `after` and not open now.
    pub fn release_idle(&self, after: Duration) {
        let open: HashSet<String> = self.holds.lock().open.keys().cloned().collect();
        self.views
            .lock()
            .retain(|(sid, _), s| open.contains(sid) || s.opened.elapsed() < after);
    }

    /// Closes the files of every cached view (at unmount).
    pub fn close_all(&self) {
        self.views.lock().clear();
    }

    /// The virtual size of an image, read once from its header (qcow2)
    /// or its length (raw), with the format it must have: no child
    /// process, so a FUSE thread may ask.
    pub fn disk_size(&self, image: &Path) -> Option<u64> {
        if let Some(s) = self.sizes.lock().get(image) {
            return Some(*s);
        }
        let format = qemu_img::expected_format(&self.disks, image);
        let size = crate::views::chain::virtual_size(image, &format).ok()?;
        self.sizes.lock().insert(image.to_owned(), size);
        Some(size)
    }
}

impl DiskViews {
    /// Bytes the view of `target` at `snap` holds (data, not holes or
    /// zeroes), for `st_blocks`. Never waits: `None` while a background
    /// thread counts it in the images' tables.
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
                    .and_then(|s| s.open().ok())
                    .and_then(|c| c.allocated_bytes().ok());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_is_shown_short() {
        assert_eq!(shown_command(b"cat\0/snaps/a\0", false), "cat /snaps/a");
        assert_eq!(shown_command(b"", false), "");
        let long: Vec<u8> = b"xargs\0".iter().chain(&[b'f'; 400]).copied().collect();
        let line = shown_command(&long, false);
        assert_eq!(line.chars().count(), COMMAND_SHOWN + 3);
        assert!(line.starts_with("xargs fff") && line.ends_with("..."));
        assert_eq!(shown_command(b"cat\0a", true), "cat a...");
        // A character cut in two by the limit is not a panic.
        assert_eq!(
            shown_command("cat é".as_bytes().split_last().unwrap().1, true),
            "cat \u{fffd}..."
        );
    }

    #[test]
    fn the_holder_of_a_view_is_named_by_its_command() {
        let me = std::process::id();
        let line = command_of(me);
        assert!(
            !line.is_empty() && line.chars().count() <= COMMAND_SHOWN + 3,
            "{line}"
        );
        assert_eq!(command_of(u32::MAX), "?");
    }
}
