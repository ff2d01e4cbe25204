//! One snapshot's disk as `files/<target>/` shows it: its layout and its
//! filesystems, each probed and opened on first use and kept until the
//! view it reads changes. A disk, a partition or a filesystem that cannot
//! be read is noted once (for `.log`) and shows as an empty directory.
//! Every call into a reader runs under `catch_unwind`: a reader that
//! panics on a hostile disk is dropped, noted, and its directory empty.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use super::budget::{check_depth, Budget, REQUEST_TIME};
use super::ext::ExtFs;
use super::fat::FatFs;
use super::source::{MemView, Slice};
use super::table::{self, FsType, Layout};
use super::{eio, errno, join, Attr, GuestFs, Kind};
use crate::views::FrozenView;

/// A directory listing: names and attributes.
pub type Listing = Arc<Vec<(Vec<u8>, Attr)>>;

/// What a disk or partition number leads to.
enum Opened {
    /// A filesystem.
    Fs(Box<dyn GuestFs>),
    /// Nothing readable (already noted).
    Nothing,
}

/// A disk of one snapshot with its readers.
#[derive(Default)]
pub struct Disk {
    view: Option<Arc<dyn FrozenView>>,
    size: u64,
    layout: Option<Layout>,
    /// By partition number (0: the whole disk).
    fss: BTreeMap<u32, Opened>,
    /// The last listing: (partition, path) and its entries.
    listing: Option<((u32, Vec<u8>), Listing)>,
    /// The attributes of every entry listed so far, by (partition,
    /// path): a lookup after a listing is answered without walking the
    /// path again (a reader resolves each path from the root, and a
    /// hostile directory of many entries makes each walk long). The view
    /// is frozen, so an entry never goes stale.
    attrs: HashMap<(u32, Vec<u8>), Attr>,
    /// The deadline of the request in progress, checked by every read.
    budget: Budget,
    /// What one request may read for (zero: [`REQUEST_TIME`]).
    request_time: std::time::Duration,
}

/// At most this many attributes are kept per disk; past it the cache
/// starts again (a bound on memory, not a correctness limit).
pub const MAX_CACHED_ATTRS: usize = 1 << 18;

/// Runs `f`, turning a panic into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(eio(format!("{what}: the reader failed (panic: {msg})")))
        }
    }
}

/// The ext superblock of `s` says its journal needs recovery.
fn ext_needs_recovery(s: &mut Slice) -> bool {
    let mut b = [0u8; 4];
    s.read_at(1024 + 0x60, &mut b).ok() == Some(4) && u32::from_le_bytes(b) & 0x4 != 0
}

impl Disk {
    /// A disk with nothing opened yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `view` (`size` bytes) from now on. A different view than
    /// before (its images changed) drops everything opened.
    pub fn set_view(&mut self, view: Arc<dyn FrozenView>, size: u64) {
        let same = self
            .view
            .as_ref()
            .is_some_and(|v| Arc::ptr_eq(v, &view) && self.size == size);
        if !same {
            *self = Disk {
                view: Some(view),
                size,
                request_time: self.request_time,
                ..Disk::default()
            };
        }
    }

    /// Lets each request read for at most `time` instead of
    /// [`REQUEST_TIME`].
    pub fn set_request_time(&mut self, time: std::time::Duration) {
        self.request_time = time;
    }

    fn request_time(&self) -> std::time::Duration {
        if self.request_time.is_zero() {
            REQUEST_TIME
        } else {
            self.request_time
        }
    }

    fn slice(&self, start: u64, len: u64, cached: bool) -> io::Result<Slice> {
        let view = self.view.clone().ok_or_else(|| errno(libc::ESTALE))?;
        Ok(Slice::new(view, start, len, cached).with_budget(self.budget.clone()))
    }

    /// The disk's layout, read once; a disk with nothing known is noted.
    pub fn layout(&mut self, note: &mut dyn FnMut(String)) -> Layout {
        if let Some(l) = &self.layout {
            return l.clone();
        }
        let layout = match self.slice(0, self.size, true) {
            Ok(mut s) => guarded("partition table", || table::probe(&mut s))
                .unwrap_or_else(|e| Layout::Unknown(e.to_string())),
            Err(e) => Layout::Unknown(e.to_string()),
        };
        match &layout {
            Layout::Unknown(why) => note(format!("{why}: shown as an empty directory")),
            Layout::Parts { notes, .. } => {
                for n in notes {
                    note(format!("{n}: left out"));
                }
            }
            Layout::Whole(_) => {}
        }
        self.layout = Some(layout.clone());
        layout
    }

    /// The partitions shown (empty for a whole-disk filesystem).
    pub fn partitions(&mut self, note: &mut dyn FnMut(String)) -> Vec<u32> {
        match self.layout(note) {
            Layout::Parts { parts, .. } => parts.iter().map(|p| p.number).collect(),
            _ => Vec::new(),
        }
    }

    /// Opens the filesystem of partition `part` (0: the whole disk).
    fn open(&mut self, part: u32, note: &mut dyn FnMut(String)) -> Opened {
        let (start, len, known) = match (self.layout(note), part) {
            (Layout::Whole(t), 0) => (0, self.size, Some(t)),
            (Layout::Parts { parts, .. }, n) if n > 0 => {
                match parts.iter().find(|p| p.number == n) {
                    Some(p) => (p.start, p.len, None),
                    None => return Opened::Nothing,
                }
            }
            _ => return Opened::Nothing,
        };
        let what = if part == 0 {
            "the disk".to_owned()
        } else {
            format!("partition {part}")
        };
        let opened = (|| -> io::Result<Option<Box<dyn GuestFs>>> {
            let mut s = self.slice(start, len, false)?;
            let t = match known {
                Some(t) => t,
                None => match guarded(&what, || table::fs_type(&mut s))? {
                    Some(t) => t,
                    None => return Ok(None),
                },
            };
            Ok(Some(match t {
                FsType::Ext => {
                    if ext_needs_recovery(&mut s) {
                        note(format!(
                            "{what}: ext journal needs recovery (a crash-consistent snapshot): \
                             its transactions are applied in memory"
                        ));
                    }
                    Box::new(guarded(&what, || ExtFs::open(s))?)
                }
                FsType::Fat => Box::new(guarded(&what, || {
                    FatFs::open(self.slice(start, len, true)?)
                })?),
            }))
        })();
        match opened {
            Ok(Some(fs)) => Opened::Fs(fs),
            Ok(None) => {
                note(format!(
                    "{what}: no ext2/3/4 or FAT filesystem: shown as an empty directory"
                ));
                Opened::Nothing
            }
            Err(e) => {
                note(format!(
                    "{what}: unreadable filesystem: {e}: shown as an empty directory"
                ));
                Opened::Nothing
            }
        }
    }

    /// Runs `op` on the filesystem of partition `part` (0: the whole
    /// disk); `None` when there is none to read. Opening and `op` each
    /// read for at most [`REQUEST_TIME`]. A reader that panics is dropped
    /// and noted.
    pub fn with_fs<T>(
        &mut self,
        part: u32,
        note: &mut dyn FnMut(String),
        op: impl FnOnce(&mut dyn GuestFs) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        if !self.fss.contains_key(&part) {
            self.budget.start(self.request_time());
            let opened = self.open(part, note);
            self.budget.clear();
            self.fss.insert(part, opened);
        }
        let time = self.request_time();
        let Some(Opened::Fs(fs)) = self.fss.get_mut(&part) else {
            return None;
        };
        self.budget.start(time);
        let r = guarded("filesystem", || op(fs.as_mut()));
        self.budget.clear();
        if let Err(e) = &r {
            if e.to_string().contains("the reader failed (panic") {
                note(format!("partition {part}: {e}: no longer read"));
                self.fss.insert(part, Opened::Nothing);
                self.listing = None;
                self.attrs.clear();
            }
        }
        Some(r)
    }

    /// Runs `op` on `path` of partition `part`, like [`Disk::with_fs`],
    /// after checking the path's depth; an error with a reason (a corrupt
    /// or hostile filesystem) is noted with the path.
    fn at_path<T>(
        &mut self,
        part: u32,
        path: &[u8],
        note: &mut dyn FnMut(String),
        op: impl FnOnce(&mut dyn GuestFs) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        let r = self.with_fs(part, note, |fs| {
            check_depth(path)?;
            op(fs)
        });
        if let Some(Err(e)) = &r {
            if e.raw_os_error().is_none() {
                note(format!("{}: {e} (EIO)", shown(part, path)));
            }
        }
        r
    }

    /// The entries of directory `path` of partition `part`; empty when
    /// there is no filesystem. The last listing is kept (a directory
    /// read in several requests is listed once).
    pub fn list(
        &mut self,
        part: u32,
        path: &[u8],
        note: &mut dyn FnMut(String),
    ) -> io::Result<Listing> {
        if let Some((key, l)) = &self.listing {
            if key.0 == part && key.1 == path {
                return Ok(l.clone());
            }
        }
        let l: Listing = match self.with_fs(part, note, |fs| {
            check_depth(path)?;
            fs.list(path)
        }) {
            None => Arc::new(Vec::new()),
            Some(Ok(l)) => Arc::new(l),
            // A corrupt directory: said in `.log`; the root is shown empty.
            Some(Err(e)) if e.raw_os_error().is_none() => {
                let shown = String::from_utf8_lossy(if path.is_empty() { b"/" } else { path });
                let what = if part == 0 {
                    String::new()
                } else {
                    format!("partition {part}: ")
                };
                if path.is_empty() {
                    note(format!(
                        "{what}unreadable root directory: {e}: shown as empty"
                    ));
                    Arc::new(Vec::new())
                } else {
                    note(format!("{what}unreadable directory {shown} (EIO): {e}"));
                    return Err(e);
                }
            }
            Some(Err(e)) => return Err(e),
        };
        if self.attrs.len() + l.len() > MAX_CACHED_ATTRS {
            self.attrs.clear();
        }
        if l.len() <= MAX_CACHED_ATTRS {
            for (name, attr) in l.iter() {
                self.attrs.insert((part, join(path, name)), attr.clone());
            }
        }
        self.listing = Some(((part, path.to_vec()), l.clone()));
        Ok(l)
    }

    /// The attributes of `path` of partition `part` (not following a
    /// final symlink): from an earlier listing when there was one, else
    /// from the reader. `None` when there is no filesystem.
    pub fn stat(
        &mut self,
        part: u32,
        path: &[u8],
        note: &mut dyn FnMut(String),
    ) -> Option<io::Result<Attr>> {
        if let Some(a) = self.attrs.get(&(part, path.to_vec())) {
            return Some(Ok(a.clone()));
        }
        self.at_path(part, path, note, |fs| fs.stat(path))
    }

    /// The target of symlink `path` of partition `part`.
    pub fn read_link(
        &mut self,
        part: u32,
        path: &[u8],
        note: &mut dyn FnMut(String),
    ) -> Option<io::Result<Vec<u8>>> {
        self.at_path(part, path, note, |fs| fs.read_link(path))
    }

    /// Reads regular file `path` of partition `part` at `offset`.
    pub fn read(
        &mut self,
        part: u32,
        path: &[u8],
        offset: u64,
        buf: &mut [u8],
        note: &mut dyn FnMut(String),
    ) -> Option<io::Result<usize>> {
        self.at_path(part, path, note, |fs| fs.read(path, offset, buf))
    }
}

/// `path` of partition `part` as `.log` names it.
fn shown(part: u32, path: &[u8]) -> String {
    let p = String::from_utf8_lossy(if path.is_empty() { b"/" } else { path });
    if part == 0 {
        p.into_owned()
    } else {
        format!("partition {part}: {p}")
    }
}

/// What [`check_image`] read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Filesystems opened.
    pub filesystems: usize,
    /// Entries listed.
    pub entries: usize,
    /// Bytes read from files.
    pub bytes: u64,
    /// Notes a `.log` would get.
    pub notes: Vec<String>,
}

/// What one request of [`check_image`] may read for.
pub const CHECK_REQUEST_TIME: std::time::Duration = std::time::Duration::from_secs(2);
/// How long [`check_image`] walks a disk in all before it stops.
pub const CHECK_WALK_TIME: std::time::Duration = std::time::Duration::from_secs(20);

/// Reads a whole disk image held in memory as `files/` would: the
/// layout, each filesystem, every directory (at most 4096 entries in all,
/// for at most [`CHECK_WALK_TIME`], each request for at most
/// [`CHECK_REQUEST_TIME`]), every symlink and up to 1 MiB of every file.
/// The fuzzing entry point: no single call may panic, hang or allocate
/// without bound, whatever the bytes (a walk of many requests, each
/// bounded, may be long on a hostile disk: that is why the walk stops).
pub fn check_image(bytes: &[u8]) -> Checked {
    let started = std::time::Instant::now();
    let mut disk = Disk::new();
    disk.set_request_time(CHECK_REQUEST_TIME);
    disk.set_view(Arc::new(MemView(bytes.to_vec())), bytes.len() as u64);
    let mut checked = Checked::default();
    let mut notes = Vec::new();
    let mut note = |n: String| notes.push(n);
    let parts = match disk.layout(&mut note) {
        Layout::Whole(_) => vec![0],
        Layout::Parts { parts, .. } => parts.iter().map(|p| p.number).collect(),
        Layout::Unknown(_) => vec![],
    };
    let mut buf = vec![0u8; 64 * 1024];
    for part in parts {
        if disk.with_fs(part, &mut note, |_| Ok(())).is_none() {
            continue;
        }
        checked.filesystems += 1;
        let mut dirs = vec![Vec::new()];
        while let Some(dir) = dirs.pop() {
            let Ok(listing) = disk.list(part, &dir, &mut note) else {
                continue;
            };
            for (name, attr) in listing.iter() {
                if checked.entries >= 4096 || started.elapsed() > CHECK_WALK_TIME {
                    break;
                }
                checked.entries += 1;
                let path = join(&dir, name);
                let _ = disk.stat(part, &path, &mut note);
                match attr.kind {
                    Kind::Dir => dirs.push(path),
                    Kind::Symlink => {
                        let _ = disk.read_link(part, &path, &mut note);
                    }
                    Kind::File => {
                        let mut off = 0u64;
                        while off < (1 << 20) {
                            match disk.read(part, &path, off, &mut buf, &mut note) {
                                Some(Ok(n)) if n > 0 => {
                                    off += n as u64;
                                    checked.bytes += n as u64;
                                }
                                _ => break,
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    checked.notes = notes;
    checked
}
