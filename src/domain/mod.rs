//! Snapshot operations on one domain: one at a time, journaled, logged.
//! Runs on worker threads, never on a FUSE thread that serves `ls`.

pub mod branch;
pub mod create_spec;
pub mod describe;
pub mod external;
pub mod frozen;
pub mod jobs;
pub mod oplog;
pub mod paths;
pub mod prune;
pub mod quiesce;
pub mod recovery;
pub mod registry;
pub mod relocate;
pub mod revert;
pub mod revert_rule;
pub mod start;
pub mod views;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tables;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::backend::{Backend, Images};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{
    validate_name_bytes, DiskPoint, DiskSnapshotKind, DomainDef, DomainState, Forest,
    MemoryLocation, Snapshot, SnapshotPolicy, SnapshotState,
};
use crate::store::{DomainStore, Intent, IntentRecord, Journal};
use oplog::{now_secs, OpLog};
pub use paths::Caller;
pub use registry::Registry;
pub use revert::RevertRequest;

/// One VM known to the daemon: its definition, snapshots, backend and log.
pub struct Domain {
    /// The definition file's content.
    pub def: DomainDef,
    store: DomainStore,
    journal: Journal,
    backend: Arc<dyn Backend>,
    /// The disk images outside the running hypervisor.
    images: Arc<dyn Images>,
    forest: RwLock<Forest>,
    state: RwLock<DomainState>,
    /// Why the domain is unreachable, as `.state` shows it.
    unreachable: RwLock<Option<String>>,
    busy: Mutex<Option<String>>,
    /// The backend's warning about its QEMU, as last logged.
    qemu_warning: Mutex<Option<String>>,
    /// When the first look at the monitor began, once it has.
    first_probe: Mutex<Option<Instant>>,
    /// Whether the first look at the monitor has ended.
    probed: AtomicBool,
    /// Whether start-up recovery has run (it waits for a domain whose
    /// monitor does not answer).
    recovered: AtomicBool,
    views: views::DiskViews,
    jobs: jobs::Jobs,
    log: Arc<OpLog>,
    frozen: frozen::FrozenLocks,
    commandline: start::CommandLine,
    /// Held by whoever talks to the guest agent (one client at a time).
    agent_use: Mutex<()>,
    /// Freezes whose thaw failed, retried from the domain's thread.
    thaw_pending: Mutex<Vec<quiesce::PendingThaw>>,
}

/// Marks the domain busy for one operation; when it ends, the writer
/// locks follow the snapshots again and the domain is free.
struct BusyGuard<'a>(&'a Domain);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.sync_frozen();
        self.0.refresh_commandline();
        *self.0.busy.lock() = None;
    }
}

/// What a create is asked to make.
pub struct CreateRequest<'a> {
    /// The new snapshot's name (already validated).
    pub name: &'a str,
    /// Its `<description>`.
    pub description: Option<String>,
    /// Internal or external, with or without RAM.
    pub kind: CreateKind,
    /// The spec's `quiesce` (`None`: the domain's default).
    pub quiesce: Option<bool>,
    /// Disks the spec leaves out on purpose (`snapshot='no'`) among the
    /// domain's [`crate::model::OtherDisk`]s.
    pub left_out: Vec<String>,
}

impl CreateRequest<'_> {
    /// The new snapshot's name and description.
    fn named(&self) -> (&str, Option<String>) {
        (self.name, self.description.clone())
    }
}

/// Internal or external, and what to include.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateKind {
    /// Inside the qcow2 images; RAM too when `memory` and QEMU runs.
    Internal {
        /// Save RAM (a checkpoint); false: disks only.
        memory: bool,
    },
    /// New overlays for `disks` (target, overlay path or the default);
    /// with `memory`, RAM to a file (the path or the default) when QEMU runs.
    External {
        /// The disks that get an overlay; the others are left out.
        disks: Vec<(String, Option<std::path::PathBuf>)>,
        /// `Some`: a checkpoint, RAM to this file (or the default one).
        memory: Option<Option<std::path::PathBuf>>,
    },
}

/// Keeps a snapshot's views closed during its delete.
struct DeleteHold<'a> {
    views: &'a views::DiskViews,
    id: &'a str,
    gone: bool,
}

impl Drop for DeleteHold<'_> {
    fn drop(&mut self) {
        self.views.end_delete(self.id, self.gone);
    }
}

/// How long an operation waits for the domain's start-up (its first
/// look at the monitor, then recovery) before it gives up with EBUSY.
const START_WAIT: Duration = Duration::from_secs(60);

/// The longest name that becomes an internal snapshot's id (the store
/// keeps `snapshots/<id>.xml`, within one 255-byte path component).
const MAX_NAME_AS_TAG: usize = 200;

/// Builds a fresh snapshot id (also the qcow2 tag of internal snapshots).
fn new_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("vs-{nanos:x}-{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

impl Domain {
    /// Opens a domain: loads its metadata. Its monitor is not asked here
    /// (nothing waits on a monitor); [`Domain::start_up`] does that and the
    /// start-up recovery, from the domain's own thread.
    pub fn open(
        def: DomainDef,
        store: DomainStore,
        backend: Arc<dyn Backend>,
        images: Arc<dyn Images>,
    ) -> Result<Self> {
        let journal = store.journal()?;
        let log = Arc::new(OpLog::open(store.log_path()));
        let loaded = store.load()?;
        for w in &loaded.warnings {
            log.line(w);
        }
        let sink = {
            let log = log.clone();
            crate::views::ErrorSink(Arc::new(move |text: &str| log.line(text)))
        };
        let views = views::DiskViews::new(Some(sink), def.disks.clone());
        // Block devices vmsnapfs accepted as layers earlier: its own
        // records name them.
        for s in loaded.forest.iter() {
            for d in &s.disks {
                for p in [&d.image, &d.overlay].into_iter().flatten() {
                    crate::backend::block_dev::remember(p, &def.name);
                }
            }
        }
        for d in backend.active_disks() {
            crate::backend::block_dev::remember(&d.source, &def.name);
        }
        Ok(Domain {
            def,
            store,
            journal,
            backend,
            images,
            forest: RwLock::new(loaded.forest),
            state: RwLock::new(DomainState::Unreachable),
            unreachable: RwLock::new(Some("its monitor has not been asked yet".into())),
            busy: Mutex::new(None),
            qemu_warning: Mutex::new(None),
            first_probe: Mutex::new(None),
            probed: AtomicBool::new(false),
            recovered: AtomicBool::new(false),
            views,
            jobs: jobs::Jobs::default(),
            log,
            frozen: frozen::FrozenLocks::default(),
            commandline: start::CommandLine::default(),
            agent_use: Mutex::new(()),
            thaw_pending: Mutex::new(Vec::new()),
        })
    }

    /// The first look at the monitor, then start-up recovery once the
    /// domain's state is known (up, or provably shut off). Runs on the
    /// domain's own thread; the waits on the monitor have deadlines.
    /// The frozen images are locked and checked at once (that needs no
    /// monitor), and again after recovery.
    pub fn start_up(&self) {
        *self.first_probe.lock() = Some(Instant::now());
        let s = self.backend.refresh_state();
        self.note_state(s);
        self.probed.store(true, Ordering::Release);
        self.recover_when_known();
        if !self.recovered.load(Ordering::Acquire) {
            self.check_frozen();
            self.sync_frozen();
            self.refresh_commandline();
        }
    }

    /// Runs start-up recovery if it has not run and the state is known.
    fn recover_when_known(&self) {
        if self.recovered.load(Ordering::Acquire) || self.state() == DomainState::Unreachable {
            return;
        }
        let Ok(_busy) = self.begin_unchecked("start-up recovery") else {
            return;
        };
        recovery::recover(self);
        self.check_frozen();
        self.sync_frozen();
        self.refresh_commandline();
        self.recovered.store(true, Ordering::Release);
    }

    /// True once start-up needs no more waiting for: recovered, found
    /// unreachable, or still waiting for its monitor `grace` after its
    /// first look began (or after `opened`, if that never began).
    pub fn start_settled(&self, opened: Instant, grace: Duration) -> bool {
        if self.recovered.load(Ordering::Acquire) {
            return true;
        }
        if self.probed.load(Ordering::Acquire) {
            return self.state() == DomainState::Unreachable;
        }
        self.first_probe.lock().unwrap_or(opened).elapsed() >= grace
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// Read access to the snapshot forest.
    pub fn forest(&self) -> parking_lot::RwLockReadGuard<'_, Forest> {
        self.forest.read()
    }

    /// The last known live state (refreshed by operations and the poller).
    pub fn state(&self) -> DomainState {
        *self.state.read()
    }

    /// The state, and for an unreachable domain why (one line, no newline).
    pub fn state_line(&self) -> String {
        let s = self.state();
        match (s, self.unreachable.read().as_deref()) {
            (DomainState::Unreachable, Some(why)) => format!("unreachable: {why}"),
            _ => s.as_str().to_owned(),
        }
    }

    /// The `.state` text: [`Domain::state_line`], then a warning line
    /// about QEMU if there is one (a QEMU outside the tested range).
    pub fn state_text(&self) -> String {
        let mut s = format!("{}\n", self.state_line());
        if let Some(w) = self.qemu_warning.lock().as_ref() {
            s.push_str(&format!("warning: {w}\n"));
        }
        s
    }

    /// Re-reads the live state unless an operation holds the monitor,
    /// then runs start-up recovery if it waited for the state.
    pub fn poll_state(&self) {
        if let Some(s) = self.backend.try_refresh_state() {
            self.note_state(s);
        }
        self.recover_when_known();
        if self.recovered.load(Ordering::Acquire) {
            self.retry_thaws(false);
        }
    }

    fn note_state(&self, s: DomainState) {
        for n in self.backend.take_notes() {
            self.log.line(&n);
        }
        let warning = self.backend.qemu_warning();
        let mut last = self.qemu_warning.lock();
        if warning != *last {
            if let Some(w) = &warning {
                self.log.line(&format!("warning: {w}"));
            }
            *last = warning;
        }
        drop(last);
        let why = (s == DomainState::Unreachable)
            .then(|| self.backend.unreachable().map(|u| u.reason))
            .flatten();
        let first = !self.probed.load(Ordering::Acquire);
        let old = std::mem::replace(&mut *self.state.write(), s);
        let old_why = std::mem::replace(&mut *self.unreachable.write(), why.clone());
        if old != s || old_why != why {
            if first && s != DomainState::Unreachable {
                // The first look: nothing changed, the state became known.
                log::info!("{}: {}", self.def.name, s.as_str());
            } else {
                self.log
                    .line(&format!("domain is now {}", self.state_line()));
            }
            if old != s && !first {
                self.refresh_commandline();
                self.check_frozen();
            }
            // Only when there is something to do: an operation that
            // starts right after the state changed must not find the
            // domain busy for nothing.
            if s == DomainState::Shutoff
                && !first
                && self.recovered.load(Ordering::Acquire)
                && !self.store.pending_tag_deletes().is_empty()
            {
                if let Ok(_busy) = self.begin_unchecked("deleting leftover tags") {
                    self.flush_pending_tag_deletes();
                }
            }
        }
    }

    /// The live state for an operation that needs it known: re-read
    /// (with deadlines), or at once an error while the domain is
    /// unreachable (EBUSY when a process holds its images, else EIO).
    fn live_state(&self) -> Result<DomainState> {
        if self.state() != DomainState::Unreachable {
            let s = self.backend.refresh_state();
            self.note_state(s);
        }
        if self.state() == DomainState::Unreachable {
            return Err(self.unreachable_error());
        }
        Ok(self.state())
    }

    /// The refusal of an operation on an unreachable domain.
    fn unreachable_error(&self) -> Error {
        let u = self.backend.unreachable();
        let why = u
            .as_ref()
            .map(|u| u.reason.clone())
            .or_else(|| self.unreachable.read().clone())
            .unwrap_or_else(|| "its monitor does not answer".into());
        let text = format!("the domain is unreachable: {why}; nothing was changed");
        if u.is_some_and(|u| u.held) {
            Error::busy(text)
        } else {
            Error::io(text)
        }
    }

    /// The `.jobs` text: long operations in progress.
    pub fn jobs_text(&self) -> String {
        self.jobs.text()
    }

    /// The `.log` text.
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Logs a refusal or failure of `what` and passes the error on.
    fn refuse<T>(&self, what: &str, e: Error) -> Result<T> {
        let errno = e.kind.errno_name();
        self.log
            .line(&format!("{what}: refused ({errno}): {}", e.message));
        if e.kind == ErrorKind::Io && self.state() != DomainState::Unreachable {
            // QEMU may be gone: re-read the domain's state.
            let s = self.backend.refresh_state();
            self.note_state(s);
        }
        Err(e)
    }

    /// Marks the domain busy for `what`; EBUSY while another operation
    /// runs. Right after the mount, waits (on the operation's worker
    /// thread, never a FUSE thread) for the domain's first look at its
    /// monitor and start-up recovery; fails at once when that look found
    /// the domain unreachable (see [`Domain::unreachable_error`]).
    fn begin(&self, what: &str) -> Result<BusyGuard<'_>> {
        let deadline = Instant::now() + START_WAIT;
        while !self.recovered.load(Ordering::Acquire) {
            if self.probed.load(Ordering::Acquire) && self.state() == DomainState::Unreachable {
                return Err(self.unreachable_error());
            }
            if Instant::now() >= deadline {
                return Err(Error::busy(format!(
                    "interrupted operations on {} are still being settled ({})",
                    self.def.name,
                    self.state_line()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.begin_unchecked(what)
    }

    /// True while an operation runs on the domain.
    pub fn is_busy(&self) -> bool {
        self.busy.lock().is_some()
    }

    fn begin_unchecked(&self, what: &str) -> Result<BusyGuard<'_>> {
        let mut busy = self.busy.lock();
        if let Some(other) = busy.as_ref() {
            return Err(Error::busy(format!(
                "another operation is in progress on {}: {other}",
                self.def.name
            )));
        }
        *busy = Some(what.to_owned());
        Ok(BusyGuard(self))
    }

    /// EBUSY while the hypervisor cannot change its disks (see
    /// [`Backend::disks_unavailable`]), before anything changes.
    fn check_images_active(&self, live: DomainState) -> Result<()> {
        if live == DomainState::Shutoff {
            return Ok(());
        }
        match self.backend.disks_unavailable() {
            Some(why) => Err(Error::busy(why)),
            None => Ok(()),
        }
    }

    /// Why snapshot `id` (`name`) is busy: who holds a view or its memory
    /// file open, and how root breaks the hold.
    fn held_open(&self, id: &str, name: &str) -> String {
        format!(
            "a frozen view, a guest file or the memory file of {name:?} is open (held by {}); close it, \
             or as root: echo force > {name}/release",
            self.views.holders(id)
        )
    }

    /// `echo force > NAME/release` (root only): breaks every hold on the
    /// snapshot's views and memory file; their later reads fail with
    /// `ESTALE`. `.log` names the holders.
    pub fn release(&self, name: &str, request: &[u8], uid: u32) -> Result<()> {
        let word = String::from_utf8_lossy(request).trim().to_owned();
        let what = format!("release {name:?}");
        let r = (|| {
            if uid != 0 {
                return Err(Error::new(
                    ErrorKind::Denied,
                    format!("only root breaks holds (uid {uid})"),
                ));
            }
            if word != "force" {
                return Err(Error::invalid(format!(
                    "unknown release request {word:?}; write 'force'"
                )));
            }
            let snap = self.lookup(name)?;
            let broken = self.views.break_holds(&snap.id);
            if broken.is_empty() {
                self.log.line(&format!("{what}: nothing held it"));
            } else {
                self.log.line(&format!(
                    "{what}: broke {} hold(s), their reads now fail (ESTALE): {}",
                    broken.len(),
                    broken.join(", ")
                ));
            }
            Ok(())
        })();
        r.or_else(|e| self.refuse(&what, e))
    }

    /// Frozen views of this domain's snapshots.
    pub fn views(&self) -> &views::DiskViews {
        &self.views
    }

    /// `mkdir`: takes a snapshot named `raw_name` with the domain's policy.
    /// Returns the new snapshot's id once it is complete and durable.
    pub fn create(&self, raw_name: &[u8]) -> Result<String> {
        let shown = String::from_utf8_lossy(raw_name).into_owned();
        let what = format!("mkdir {shown:?}");
        let r = validate_name_bytes(raw_name)
            .map_err(Error::from)
            .and_then(|name| {
                let all: Vec<_> = self
                    .def
                    .disks
                    .iter()
                    .map(|d| (d.target.clone(), None))
                    .collect();
                let kind = match self.def.policy {
                    SnapshotPolicy::Internal => CreateKind::Internal { memory: true },
                    SnapshotPolicy::DiskOnly => CreateKind::Internal { memory: false },
                    SnapshotPolicy::External => CreateKind::External {
                        disks: all,
                        memory: Some(None),
                    },
                    SnapshotPolicy::ExternalDiskOnly => CreateKind::External {
                        disks: all,
                        memory: None,
                    },
                };
                let request = CreateRequest {
                    name,
                    description: None,
                    kind,
                    quiesce: None,
                    left_out: Vec::new(),
                };
                self.create_as(&what, request)
            });
        r.or_else(|e| self.refuse(&what, e))
    }

    /// Refuses a snapshot that would silently miss a writable disk
    /// vmsnapfs cannot snapshot (EOPNOTSUPP): each must be left out on
    /// purpose, in the definition or by the spec (`left_out`); those left
    /// out are named in `.log`.
    fn check_other_disks(&self, what: &str, left_out: &[String]) -> Result<()> {
        let mut skipped = Vec::new();
        for d in &self.def.other_disks {
            if d.left_out || left_out.contains(&d.target) {
                skipped.push(format!("{} ({})", d.target, d.what));
                continue;
            }
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "disk {} is a {}, which vmsnapfs cannot snapshot, and a snapshot without \
                     it would not match the guest's state; leave it out on purpose with \
                     snapshot='no' on the disk in the domain's definition, or with <disk \
                     name='{}' snapshot='no'/> in a .create spec; nothing was made",
                    d.target, d.what, d.target
                ),
            ));
        }
        if !skipped.is_empty() {
            self.log.line(&format!(
                "{what}: left out on purpose, and not reverted by this snapshot: {}",
                skipped.join(", ")
            ));
        }
        Ok(())
    }

    /// Takes a snapshot as `request` says; `what` names the action in `.log`.
    fn create_as(&self, what: &str, request: CreateRequest<'_>) -> Result<String> {
        let _busy = self.begin(what)?;
        self.create_busy(what, request)
    }

    /// [`Domain::create_as`] for a caller that holds the domain busy.
    fn create_busy(&self, what: &str, request: CreateRequest<'_>) -> Result<String> {
        let name = request.name;
        {
            if self.forest.read().by_name(name).is_some() {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!("snapshot {name:?} exists"),
                ));
            }
            self.check_other_disks(what, &request.left_out)?;
            let t0 = Instant::now();
            let id = match request.kind {
                CreateKind::Internal { .. } => self.internal_id(what, name),
                CreateKind::External { .. } => new_id(),
            };
            let live = self.live_state()?;
            self.check_images_active(live)?;
            let memory = live != DomainState::Shutoff
                && match &request.kind {
                    CreateKind::Internal { memory } => *memory,
                    CreateKind::External { memory, .. } => memory.is_some(),
                };
            let freezer = self.prepare_quiesce(what, &id, request.quiesce, memory, live)?;
            let hook = freezer
                .as_ref()
                .map(|f| f as &dyn crate::backend::SwitchHook);
            let external = match &request.kind {
                CreateKind::Internal { .. } => None,
                CreateKind::External { disks, memory } => {
                    Some(self.plan_external(&id, &request, disks, memory.as_ref(), live)?)
                }
            };
            let intent = match &external {
                None => Intent::Create {
                    id: id.clone(),
                    name: name.to_owned(),
                },
                Some((plan, snap)) => Intent::CreateExternal {
                    id: id.clone(),
                    name: name.to_owned(),
                    overlays: plan.overlays.clone(),
                    plan: self.plan_xml(snap),
                },
            };
            let record = self.journal.begin(intent)?;
            let t1 = Instant::now();
            let done = crate::failpoint::hit("create.begin").and_then(|_| match &external {
                None => self.create_steps(&id, &request, live, hook),
                Some((plan, snap)) => {
                    self.create_external_steps(what, plan, snap.clone(), live, hook)
                }
            });
            // Thawed by now; the agent is free again.
            drop(freezer);
            if let Err(mut e) = done {
                if e.kind == ErrorKind::Io {
                    if let Some(why) = self.backend.space_shortage() {
                        e = Error::new(ErrorKind::NoSpace, format!("{}; {why}", e.message));
                    }
                }
                // Undo: no stray tag or overlay, no stray metadata.
                let undone = match &external {
                    None => self.undo_create(&id),
                    Some((plan, _)) => self.undo_create_external(&id, plan),
                };
                if let Err(u) = undone {
                    self.log.line(&format!(
                        "{what}: cleanup left the intent for the next start: {u}"
                    ));
                    return Err(e);
                }
                self.journal.complete(record)?;
                return Err(e);
            }
            self.journal.complete(record)?;
            let kind = self
                .forest
                .read()
                .get(&id)
                .map(|s| s.state.as_str())
                .unwrap_or("?");
            self.log.line(&format!(
                "{what}: created ({kind}) in {:.3} s (QEMU/qemu-img and metadata {:.3} s)",
                t0.elapsed().as_secs_f64(),
                t1.elapsed().as_secs_f64()
            ));
            Ok(id)
        }
    }

    /// The id of a new internal snapshot named `name`, which is also its
    /// qcow2 tag: the name itself, so that what reads the images by name
    /// (`qemu-img snapshot -l`, libvirt's `snapshot-revert` of the
    /// snapshot redefined from `snapshot.xml`) finds it, and a rename
    /// keeps it; a fresh id, with a `.log` line saying why, where the
    /// name could be taken for another snapshot.
    fn internal_id(&self, what: &str, name: &str) -> String {
        match self.name_as_tag(name) {
            Ok(()) => name.to_owned(),
            Err(why) => {
                let id = new_id();
                self.log.line(&format!(
                    "{what}: qcow2 tag {id:?} instead of the name: {why}"
                ));
                id
            }
        }
    }

    /// Why `name` cannot be the qcow2 tag (and id) of a new internal
    /// snapshot: a tag already in one of the images of a disk's chain
    /// (`snapshot -a` and `snapshot-load` would find two), a number
    /// (qcow2 numbers its snapshots, and `qemu-img snapshot -a` looks a
    /// number up as one first), another snapshot's id, or too long for
    /// the store's file name.
    fn name_as_tag(&self, name: &str) -> std::result::Result<(), String> {
        if name.len() > MAX_NAME_AS_TAG {
            return Err(format!("the name is longer than {MAX_NAME_AS_TAG} bytes"));
        }
        if name.bytes().all(|b| b.is_ascii_digit()) {
            return Err("a number is read as a qcow2 snapshot number".into());
        }
        for d in self.backend.active_disks() {
            let chain = self
                .images
                .chain(&d.source, &d.format)
                .map_err(|e| format!("the images of disk {} cannot be read: {e}", d.target))?;
            if let Some(img) = chain
                .iter()
                .find(|i| i.snapshots.iter().any(|s| s.tag == name))
            {
                return Err(format!(
                    "{} already has a snapshot tagged {name:?}",
                    img.path.display()
                ));
            }
        }
        if self.forest.read().get(name).is_some() {
            return Err("the name is another snapshot's id".into());
        }
        Ok(())
    }

    fn create_steps(
        &self,
        id: &str,
        request: &CreateRequest<'_>,
        live: DomainState,
        hook: Option<&dyn crate::backend::SwitchHook>,
    ) -> Result<()> {
        let memory = matches!(request.kind, CreateKind::Internal { memory: true });
        let state = self.backend.create_internal(id, live, memory, hook)?;
        crate::failpoint::hit("create.after-backend")?;
        let memory = match state {
            SnapshotState::Running | SnapshotState::Paused => MemoryLocation::Internal,
            _ => MemoryLocation::No,
        };
        let snap = self.new_snapshot(id, request.named(), state, memory, self.internal_points());
        self.record_new(snap)
    }

    /// The record of snapshot `id` made now, `named` (name, description):
    /// its parent is the current snapshot, its definition the domain's.
    fn new_snapshot(
        &self,
        id: &str,
        (name, description): (&str, Option<String>),
        state: SnapshotState,
        memory: MemoryLocation,
        disks: Vec<DiskPoint>,
    ) -> Snapshot {
        Snapshot {
            id: id.to_owned(),
            name: name.to_owned(),
            description,
            creation_time: now_secs(),
            state,
            parent: self.forest.read().current().map(str::to_owned),
            memory,
            disks,
            domain_xml: Some(self.def.xml.clone()),
            memory_format: Default::default(),
            machine: None,
        }
    }

    /// Records a snapshot whose data exists: metadata, forest, current.
    fn record_new(&self, mut snap: Snapshot) -> Result<()> {
        let id = snap.id.clone();
        let id = id.as_str();
        let mut forest = self.forest.write();
        snap.parent = forest.current().map(str::to_owned);
        self.store.save_snapshot(&snap, &forest)?;
        crate::failpoint::hit("create.after-meta")?;
        forest
            .insert(snap)
            .map_err(|e| Error::new(ErrorKind::Exists, e.to_string()))?;
        let old_current = forest.current().map(str::to_owned);
        forest.set_current(Some(id));
        if let Err(e) = self.store.save_current(Some(id)) {
            forest.remove(id);
            forest.set_current(old_current.as_deref());
            return Err(e.into());
        }
        drop(forest);
        Ok(())
    }

    /// Every disk's part in an internal snapshot: the point is inside
    /// the disk's own image.
    fn internal_points(&self) -> Vec<DiskPoint> {
        self.backend
            .active_disks()
            .iter()
            .map(|d| DiskPoint {
                target: d.target.clone(),
                kind: DiskSnapshotKind::Internal,
                image: Some(d.source.clone()),
                overlay: None,
            })
            .collect()
    }

    /// Removes what a failed create may have made.
    fn undo_create(&self, id: &str) -> Result<()> {
        self.backend.delete_internal(id)?;
        self.store.remove_snapshot(id)?;
        Ok(())
    }

    /// Refuses what only internal snapshots in active layers support yet:
    /// external snapshots, and internal ones whose image an external
    /// snapshot made read-only.
    fn check_internal_only(&self, snap: &Snapshot, action: &str) -> Result<()> {
        let unsupported = |why: String| Err(Error::new(ErrorKind::Unsupported, why));
        if matches!(snap.memory, MemoryLocation::External(_))
            || snap
                .disks
                .iter()
                .any(|d| d.kind == DiskSnapshotKind::External)
        {
            return unsupported(format!(
                "cannot {action} external snapshot {:?} yet: only internal snapshots are supported",
                snap.name
            ));
        }
        let active = self.backend.active_disks();
        for d in snap
            .disks
            .iter()
            .filter(|d| d.kind == DiskSnapshotKind::Internal)
        {
            let in_active = active
                .iter()
                .any(|a| a.target == d.target && Some(&a.source) == d.image.as_ref());
            if !in_active {
                return unsupported(format!(
                    "cannot {action} {:?} yet: its disk {} is inside {}, which an external \
                     snapshot made a read-only backing image",
                    snap.name,
                    d.target,
                    d.image
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ));
            }
        }
        Ok(())
    }

    /// Finds a snapshot by name, or ENOENT.
    fn lookup(&self, name: &str) -> Result<Snapshot> {
        self.forest
            .read()
            .by_name(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no snapshot named {name:?}")))
    }

    /// `rmdir`: deletes one snapshot, reparenting its children.
    pub fn delete(&self, name: &str) -> Result<()> {
        let what = format!("rmdir {name:?}");
        let r = (|| {
            let _busy = self.begin(&what)?;
            let snap = self.lookup(name)?;
            self.delete_one(&what, &snap)
        })();
        r.or_else(|e| self.refuse(&what, e))
    }

    /// `echo self|children|subtree > NAME/delete`: deletes the snapshot,
    /// all its descendants, or both, newest first, in one action.
    pub fn delete_tree(&self, name: &str, request: &[u8]) -> Result<()> {
        let mode = String::from_utf8_lossy(request).trim().to_owned();
        let what = format!("delete {name:?} {mode}");
        let r = (|| {
            let (with_self, with_children) = match mode.as_str() {
                "self" => (true, false),
                "children" => (false, true),
                "subtree" => (true, true),
                other => {
                    return Err(Error::invalid(format!(
                        "unknown delete request {other:?}; write 'self', 'children' or 'subtree'"
                    )))
                }
            };
            let _busy = self.begin(&what)?;
            let snap = self.lookup(name)?;
            let mut ids = Vec::new();
            if with_children {
                let forest = self.forest.read();
                // Depth first, children before parents.
                fn walk(f: &Forest, id: &str, out: &mut Vec<String>) {
                    for c in f.children(id) {
                        walk(f, &c.id, out);
                        out.push(c.id.clone());
                    }
                }
                walk(&forest, &snap.id, &mut ids);
            }
            if with_self {
                ids.push(snap.id.clone());
            }
            if let Some(open) = ids.iter().find(|id| self.views.is_open(id)) {
                let n = self.forest.read().name_of(open).unwrap_or("?").to_owned();
                return Err(Error::busy(self.held_open(open, &n)));
            }
            let t0 = Instant::now();
            for id in &ids {
                let Some(s) = self.forest.read().get(id).cloned() else {
                    continue;
                };
                self.delete_one(&format!("{what}: {:?}", s.name), &s)?;
            }
            self.log.line(&format!(
                "{what}: {} snapshot(s) deleted in {:.3} s",
                ids.len(),
                t0.elapsed().as_secs_f64()
            ));
            Ok(())
        })();
        r.or_else(|e| self.refuse(&what, e))
    }

    /// Deletes one snapshot (the domain is busy).
    fn delete_one(&self, what: &str, snap: &Snapshot) -> Result<()> {
        let name = &snap.name;
        let what = what.to_owned();
        {
            let live = self.live_state()?;
            self.check_images_active(live)?;
            if !self.views.hold_for_delete(&snap.id) {
                return Err(Error::busy(self.held_open(&snap.id, name)));
            }
            let mut held = DeleteHold {
                views: &self.views,
                id: &snap.id,
                gone: false,
            };
            if branch::is_external(snap) {
                self.delete_external(&what, snap)?;
                held.gone = true;
                return Ok(());
            }
            let t0 = Instant::now();
            let record = self.journal.begin(Intent::Delete {
                id: snap.id.clone(),
            })?;
            let t1 = Instant::now();
            let deleted = crate::failpoint::hit("delete.begin")
                .and_then(|_| self.backend.delete_internal(&snap.id))
                .and_then(|_| self.delete_tags_elsewhere(snap));
            let backend_time = t1.elapsed();
            if let Err(e) = deleted {
                return Err(self.after_failed_delete(snap, record, e));
            }
            crate::failpoint::hit("delete.after-backend")?;
            self.forget_snapshot(&snap.id)?;
            held.gone = true;
            self.journal.complete(record)?;
            self.log.line(&format!(
                "{what}: deleted in {:.3} s (QEMU/qemu-img {:.3} s)",
                t0.elapsed().as_secs_f64(),
                backend_time.as_secs_f64()
            ));
            Ok(())
        }
    }

    /// Deletes the tags of internal snapshot `snap` that live in images
    /// other than the active layers; those a running QEMU holds as backing
    /// images are recorded and deleted once the domain is stopped.
    fn delete_tags_elsewhere(&self, snap: &Snapshot) -> Result<()> {
        let active = self.backend.active_disks();
        for d in snap
            .disks
            .iter()
            .filter(|d| d.kind == DiskSnapshotKind::Internal)
        {
            let Some(image) = &d.image else { continue };
            if active.iter().any(|a| &a.source == image) {
                continue;
            }
            self.release_frozen(&[image]);
            if !self.backend.delete_tag_in(image, &snap.id)? {
                let mut pending = self.store.pending_tag_deletes();
                pending.push((image.clone(), snap.id.clone()));
                self.store.save_pending_tag_deletes(&pending)?;
                self.log.line(&format!(
                    "snapshot {:?}: its data in {} (a backing image of the running QEMU) \
                     is freed once the domain is stopped",
                    snap.name,
                    image.display()
                ));
            }
        }
        Ok(())
    }

    /// Deletes the tags recorded by [`Domain::delete_tags_elsewhere`] once
    /// no QEMU holds their images.
    pub(super) fn flush_pending_tag_deletes(&self) {
        let pending = self.store.pending_tag_deletes();
        if pending.is_empty() {
            return;
        }
        let mut left = Vec::new();
        for (image, tag) in pending {
            self.release_frozen(&[&image]);
            match self.backend.delete_tag_in(&image, &tag) {
                Ok(true) => self.log.line(&format!(
                    "deleted the leftover data of a deleted snapshot from {}",
                    image.display()
                )),
                Ok(false) => left.push((image, tag)),
                Err(e) if !image.exists() => {
                    log::info!("{}: {}: {e}", self.def.name, image.display());
                }
                Err(e) => {
                    self.log.line(&format!(
                        "cannot delete a leftover tag in {}: {e}",
                        image.display()
                    ));
                    left.push((image, tag));
                }
            }
        }
        if let Err(e) = self.store.save_pending_tag_deletes(&left) {
            log::warn!("{}: {e}", self.def.name);
        }
    }

    /// A delete failed in the images: if every disk still holds the
    /// snapshot, nothing changed and the intent is dropped; if some disks
    /// lost it, the intent stays so that the next start finishes the delete
    /// (a snapshot missing from some disks cannot be reverted to).
    fn after_failed_delete(&self, snap: &Snapshot, record: IntentRecord, e: Error) -> Error {
        match self.backend.tag_presence(&snap.id) {
            Ok((present, total)) if present == total => {
                if let Err(j) = self.journal.complete(record) {
                    return Error::io(format!("{e}; and the journal: {j}"));
                }
                e
            }
            Ok((present, total)) => e.context(format!(
                "snapshot {:?} is left on {present} of {total} disks; the delete \
                 is finished at the next start",
                snap.name
            )),
            Err(_) => e,
        }
    }

    /// Drops a snapshot from the forest and the store once its data is
    /// gone from the images: children get its parent, `current` moves up.
    fn forget_snapshot(&self, id: &str) -> Result<()> {
        let mut forest = self.forest.write();
        let Some((_, moved)) = forest.remove(id) else {
            return Ok(());
        };
        for child in &moved {
            if let Some(c) = forest.get(child) {
                self.store.save_snapshot(c, &forest)?;
            }
        }
        self.store.save_current(forest.current())?;
        crate::failpoint::hit("delete.before-meta-remove")?;
        self.store.remove_snapshot(id)?;
        drop(forest);
        Ok(())
    }

    /// `mv`: renames a snapshot.
    pub fn rename(&self, old: &str, raw_new: &[u8]) -> Result<()> {
        let what = format!("mv {old:?} {:?}", String::from_utf8_lossy(raw_new));
        let r = (|| {
            let new = validate_name_bytes(raw_new)?;
            let _busy = self.begin(&what)?;
            let snap = self.lookup(old)?;
            crate::failpoint::hit("rename.begin")?;
            let mut forest = self.forest.write();
            if forest.by_name(new).is_some_and(|s| s.id != snap.id) {
                return Err(Error::new(
                    ErrorKind::Exists,
                    format!("snapshot {new:?} exists"),
                ));
            }
            forest
                .rename(&snap.id, new)
                .map_err(|_| Error::new(ErrorKind::Exists, format!("snapshot {new:?} exists")))?;
            let renamed = forest.get(&snap.id).cloned().expect("just renamed");
            if let Err(e) = self.store.save_snapshot(&renamed, &forest) {
                let _ = forest.rename(&snap.id, old);
                return Err(e.into());
            }
            // Children name their parent too (libvirt's <parent><name>).
            for c in forest.children(&snap.id) {
                if let Err(e) = self.store.save_snapshot(c, &forest) {
                    log::warn!(
                        "{}: child {} keeps the old parent name: {e}",
                        self.def.name,
                        c.name
                    );
                }
            }
            drop(forest);
            self.log.line(&format!("{what}: renamed"));
            Ok(())
        })();
        r.or_else(|e| self.refuse(&what, e))
    }

    /// Writes a new `<description>` (from a `snapshot.xml` write).
    pub fn set_description(&self, name: &str, description: Option<String>) -> Result<()> {
        let what = format!("describe {name:?}");
        let r = (|| {
            let _busy = self.begin(&what)?;
            let snap = self.lookup(name)?;
            let mut forest = self.forest.write();
            let mut updated = snap.clone();
            updated.description = description;
            self.store.save_snapshot(&updated, &forest)?;
            if let Some(s) = forest.get_mut(&snap.id) {
                s.description = updated.description;
            }
            drop(forest);
            self.log.line(&format!("{what}: description changed"));
            Ok(())
        })();
        r.or_else(|e| self.refuse(&what, e))
    }
}
