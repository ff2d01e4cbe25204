//! The real backend: one QMP connection per running domain, `qemu-img`
//! when it is stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::capabilities::Capabilities;
use super::liveness::{self, QemuProcess};
use super::qmp::{Qmp, QmpError};
use super::{
    process, qemu_img, Backend, ExternalOutcome, ExternalPlan, ImageSnapshot, Unreachable,
};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{DiskDef, DomainDef, DomainState, MemoryFormat, SnapshotState};
use crate::store::{DomainStore, Layer};

/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connect to the monitor socket may wait (a full backlog:
/// another client holds a one-client monitor, or QEMU is stopped).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long QEMU may take to greet a new connection and to answer
/// `qmp_capabilities` (it does so at once).
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a state probe (`query-status`) may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// A probe that found the monitor unreachable this recently is not
/// repeated: its answer is reused.
const PROBE_REUSE: Duration = Duration::from_millis(800);
/// How long a snapshot job may take (RAM saves run ~3 s per GiB here).
pub(super) const JOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a started QEMU may take to open its monitor.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) struct Conn {
    pub(super) qmp: Qmp,
    pub(super) pid: Option<i32>,
    /// Node names of the qcow2 disks' active layers, in definition order,
    /// once looked up (external snapshots and reverts reset it).
    pub(super) nodes: Option<Vec<String>>,
    /// What this QEMU can do, read when the connection was made.
    pub(super) caps: Capabilities,
    /// The run state last read (`query-status`), with the count of
    /// commands sent when it was read: it still holds while no command
    /// followed, so the checks of one operation ask once.
    pub(super) status: Option<(u64, qapi::qmp::RunState)>,
    /// The disks as QEMU reported them when the connection was made, with
    /// the count of changing commands sent then: still what QEMU has while
    /// that count has not moved (a restored QEMU's check uses them).
    pub(super) disks_at_connect: Option<(u64, BTreeMap<String, LiveDisk>)>,
}

impl Conn {
    /// The run state read before any later command was sent, if any.
    fn status_unchanged(&self) -> Option<qapi::qmp::RunState> {
        self.status
            .as_ref()
            .filter(|(sent, _)| *sent == self.qmp.commands_sent())
            .map(|(_, s)| *s)
    }

    /// Reads the run state (`query-status`) within `timeout`, and keeps it.
    fn read_status(
        &mut self,
        timeout: Duration,
    ) -> std::result::Result<qapi::qmp::RunState, QmpError> {
        let s = self.qmp.run_state(timeout)?;
        self.status = Some((self.qmp.commands_sent(), s));
        Ok(s)
    }
}

/// An internal snapshot job: its id and the qcow2 nodes it covers (the
/// first also holds the RAM of a checkpoint).
struct InternalJob {
    job_id: String,
    nodes: Vec<String>,
}

/// A memory file for a QEMU started with `-incoming defer` to load.
pub(super) struct Incoming<'a> {
    /// The file.
    pub(super) file: &'a Path,
    /// How it holds the RAM.
    pub(super) format: MemoryFormat,
    /// The machine type it was saved on, when recorded.
    pub(super) machine: Option<&'a str>,
}

/// One disk as the running QEMU sees it.
pub(super) struct LiveDisk {
    /// Node name of the active layer.
    pub(super) node: String,
    /// The QOM path of the device using it, if one does.
    pub(super) device: Option<String>,
    /// The backing chain, top (active layer) first.
    pub(super) chain: Vec<qemu_img::ChainImage>,
}

/// Why there is no monitor connection.
enum NoMonitor {
    /// Nothing listens on the socket (missing, or connections refused):
    /// shut off, unless a process still holds the images.
    Absent(String),
    /// The monitor is there but cannot be used in time.
    Unreachable(String),
}

/// QMP + qemu-img backend of one domain.
pub struct QemuBackend {
    pub(super) def: DomainDef,
    pub(super) store: DomainStore,
    conn: Mutex<Option<Conn>>,
    /// A warning about the connected QEMU (outside the tested range).
    qemu_warning: Mutex<Option<String>>,
    /// Why the domain is unreachable, when it is.
    unreachable: Mutex<Option<Unreachable>>,
    /// When the last probe found it unreachable.
    last_unreachable: Mutex<Option<Instant>>,
    /// The QEMU process last seen on the monitor (also kept in the store).
    qemu: Mutex<Option<QemuProcess>>,
    /// Lines for the domain's `.log`, taken by [`Backend::take_notes`].
    notes: Mutex<Vec<String>>,
    /// Images known to be the domain's (see `trust`), canonical.
    pub(super) known_images: Mutex<std::collections::HashSet<PathBuf>>,
    /// Each disk's active layer, by target (persisted in the store).
    pub(super) layers: Mutex<BTreeMap<String, Layer>>,
    /// Who starts and stops QEMU when it is not vmsnapfs (libvirt); the
    /// running domain's images then change through it.
    pub(super) manager: Option<std::sync::Arc<dyn super::managed::Manager>>,
    /// How many operations are stopping or starting QEMU through the
    /// manager: state polls wait (a poll's connection to a QEMU being
    /// restored would wait for the manager, then take the monitor from
    /// the operation that started it).
    restarting: std::sync::atomic::AtomicUsize,
    /// The manager has just started QEMU from the definition vmsnapfs
    /// gave it: nothing of vmsnapfs's is in it (no node it added, no fd
    /// set), which the next connection need not ask.
    fresh: std::sync::atomic::AtomicBool,
}

/// While held, the domain's QEMU is being stopped or started through
/// its manager (see `QemuBackend::restarting`).
pub(super) struct Restarting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Restarting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The file in the domain's state directory that records QEMU's pid.
const QEMU_RECORD: &str = "qemu-pid";

pub(super) fn qmp_err(e: QmpError) -> Error {
    Error::reported(e.to_string()).with_source(e)
}

/// The chain of one `query-block` entry's image, top first, with the
/// names of files handed over as descriptors read back to their paths.
fn chain_of(
    inserted: &qapi::qmp::BlockDeviceInfo,
    sets: &std::collections::HashMap<i64, PathBuf>,
) -> Vec<qemu_img::ChainImage> {
    let mut out = Vec::new();
    let mut image = Some(&inserted.image);
    while let Some(i) = image {
        out.push(qemu_img::ChainImage {
            path: super::fdset::real_path(&i.base.filename, sets),
            format: i.base.format.clone(),
            snapshots: i
                .base
                .snapshots
                .iter()
                .flatten()
                .map(|s| ImageSnapshot {
                    tag: s.name.clone(),
                    vm_state_size: u64::try_from(s.vm_state_size).unwrap_or(0),
                    date_sec: s.date_sec,
                })
                .collect(),
        });
        image = i.backing_image.as_deref();
    }
    out
}

impl QemuBackend {
    /// A backend for the domain `def`, recording argv in `store`.
    pub fn new(def: DomainDef, store: DomainStore) -> Self {
        let recorded = store.load_layers();
        let layers = def
            .disks
            .iter()
            .map(|d| {
                let layer = recorded.get(&d.target).cloned().unwrap_or(Layer {
                    path: d.source.clone(),
                    format: d.format.clone(),
                });
                (d.target.clone(), layer)
            })
            .collect();
        let qemu = QemuProcess::load(&store.dir().join(QEMU_RECORD));
        QemuBackend {
            def,
            store,
            conn: Mutex::new(None),
            qemu_warning: Mutex::new(None),
            unreachable: Mutex::new(None),
            last_unreachable: Mutex::new(None),
            qemu: Mutex::new(qemu),
            notes: Mutex::new(Vec::new()),
            known_images: Mutex::new(Default::default()),
            layers: Mutex::new(layers),
            manager: None,
            restarting: Default::default(),
            fresh: Default::default(),
        }
    }

    /// A backend for a domain whose QEMU `manager` starts and stops (and
    /// whose monitor `def.monitor` reaches through it): no command line
    /// is recorded or run, and every change of the active layers is
    /// handed to the manager.
    pub fn managed(
        def: DomainDef,
        store: DomainStore,
        manager: std::sync::Arc<dyn super::managed::Manager>,
    ) -> Self {
        QemuBackend {
            manager: Some(manager),
            ..Self::new(def, store)
        }
    }

    /// The pid of the QEMU behind `conn` now: the manager's record (a
    /// connection through libvirt outlives a restart of its QEMU), else
    /// the monitor peer's.
    pub(super) fn qemu_pid(&self, conn: &Conn) -> Option<i32> {
        match &self.manager {
            Some(m) => m.qemu_pid(),
            None => conn.pid,
        }
    }

    /// Marks the domain's QEMU as being stopped or started through its
    /// manager until the guard is dropped: state polls skip meanwhile.
    pub(super) fn restarting(&self) -> Restarting<'_> {
        self.restarting
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Restarting(&self.restarting)
    }

    /// A line for the domain's `.log`.
    pub(super) fn note(&self, line: String) {
        log::info!("{}: {line}", self.def.name);
        self.notes.lock().push(line);
    }

    /// The format `image` must be opened with: its recorded layer's, the
    /// defined disk's, else qcow2 (see [`qemu_img::expected_format`]).
    pub(super) fn format_of(&self, image: &Path) -> String {
        let want = canonical(image);
        let layers = self.layers.lock();
        match layers.values().find(|l| canonical(&l.path) == want) {
            Some(l) => l.format.clone(),
            None => qemu_img::expected_format(&self.def.disks, image),
        }
    }

    /// The disks as they are now: the definition's, each with its active layer.
    pub(super) fn active(&self) -> Vec<DiskDef> {
        let layers = self.layers.lock();
        self.def
            .disks
            .iter()
            .map(|d| match layers.get(&d.target) {
                Some(l) => DiskDef {
                    target: d.target.clone(),
                    source: l.path.clone(),
                    format: l.format.clone(),
                },
                None => d.clone(),
            })
            .collect()
    }

    /// Records new active layers, durably.
    pub(super) fn set_layers(&self, changes: &[(String, Layer)]) -> Result<()> {
        self.record_layers(changes, true)
    }

    /// Records new active layers that are overlays over the old ones (an
    /// external snapshot): the old ones stay in the new chains, so a
    /// command line naming them is rewritten without their history.
    pub(super) fn set_layers_over(&self, changes: &[(String, Layer)]) -> Result<()> {
        self.record_layers(changes, false)
    }

    fn record_layers(&self, changes: &[(String, Layer)], remember_old: bool) -> Result<()> {
        let mut layers = self.layers.lock();
        let mut next = layers.clone();
        let mut former = Vec::new();
        for (t, l) in changes {
            if let Some(old) = next.insert(t.clone(), l.clone()) {
                former.push((t.clone(), old.path));
            }
        }
        if remember_old {
            self.store.add_layer_history(&former)?;
        }
        self.store.save_layers(&next)?;
        *layers = next;
        drop(layers);
        // The domain's own layers from now on (no second look needed
        // when QEMU reports them).
        for (_, l) in changes {
            self.learn_image(&l.path);
        }
        if let Some(m) = &self.manager {
            if let Err(e) = m.layers_changed(&self.active()) {
                self.note(format!(
                    "{} was not told of the new active layers: {e}",
                    m.describe()
                ));
            }
        }
        Ok(())
    }

    /// The qcow2 disks (the ones that can hold internal snapshots).
    fn qcow2_disks(&self) -> Result<Vec<DiskDef>> {
        let disks = self.active();
        if let Some(d) = disks.iter().find(|d| d.format != "qcow2") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "disk {} is {}, internal snapshots need every disk in qcow2",
                    d.target, d.format
                ),
            ));
        }
        if disks.is_empty() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the domain has no disks",
            ));
        }
        Ok(disks)
    }

    /// Makes the recorded active layers follow what QEMU has open (QEMU
    /// is the truth while it runs: an interrupted external snapshot may
    /// have switched a disk before the record was written).
    /// Returns the disks QEMU reported, and whether it listed no fd set
    /// of vmsnapfs's. `fresh`: QEMU is known to hold no fd set of
    /// vmsnapfs's (not asked).
    fn sync_layers(
        &self,
        qmp: &mut Qmp,
        fresh: bool,
    ) -> Option<(BTreeMap<String, LiveDisk>, bool)> {
        let Ok((live, sets)) = self.live_disks_and_sets(qmp, fresh) else {
            return None;
        };
        self.follow_live_layers(&live);
        Some((live, sets.is_empty()))
    }

    /// Records as active layers the tops of the chains QEMU has open
    /// (`live`), saying so where they differ from the record.
    fn follow_live_layers(&self, live: &BTreeMap<String, LiveDisk>) {
        let known = self.layers.lock().clone();
        let changes: Vec<(String, Layer)> = live
            .iter()
            .filter_map(|(target, d)| {
                let top = d.chain.first()?;
                let same = known
                    .get(target)
                    .is_some_and(|l| canonical(&l.path) == canonical(&top.path));
                (!same).then(|| {
                    (
                        target.clone(),
                        Layer {
                            path: top.path.clone(),
                            format: top.format.clone(),
                        },
                    )
                })
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        for (t, l) in &changes {
            let Some(old) = known.get(t) else { continue };
            // Never silently: a record that goes back to an image below
            // the recorded layer means QEMU kept writing to an image the
            // daemon took as frozen.
            let below = qemu_img::chain(&old.path, &old.format).is_ok_and(|c| {
                c.iter()
                    .skip(1)
                    .any(|i| canonical(&i.path) == canonical(&l.path))
            });
            if below {
                self.note(format!(
                    "disk {t}: QEMU writes to {}, which lies below the recorded active layer \
                     {}: the record now follows QEMU; {} and the snapshots whose point is {} \
                     may no longer hold what they held",
                    l.path.display(),
                    old.path.display(),
                    old.path.display(),
                    l.path.display()
                ));
            } else {
                self.note(format!(
                    "disk {t}: QEMU writes to {} (was recorded as {}); recorded as the \
                     active layer",
                    l.path.display(),
                    old.path.display()
                ));
            }
        }
        if let Err(e) = self.set_layers(&changes) {
            self.note(format!("cannot record the active layers: {e}"));
        }
    }

    /// Ensures a connection when QEMU answers, within the connect and
    /// greeting deadlines; otherwise says why there is none.
    fn connect<'a>(
        &self,
        guard: &'a mut Option<Conn>,
    ) -> std::result::Result<&'a mut Conn, NoMonitor> {
        if guard.as_ref().is_some_and(|c| !c.qmp.is_usable()) {
            *guard = None;
        }
        if guard.is_none() {
            let Some(path) = self.def.monitor.as_ref() else {
                return Err(NoMonitor::Absent("no monitor socket is defined".into()));
            };
            match Qmp::connect_within(path, CONNECT_TIMEOUT, GREETING_TIMEOUT) {
                Ok(mut qmp) => {
                    qmp.set_timeout(QMP_TIMEOUT);
                    let pid = match &self.manager {
                        Some(m) => m.qemu_pid(),
                        None => qmp.peer_pid(),
                    };
                    if self.def.commandline.is_none() && self.manager.is_none() {
                        self.record_argv(pid, qmp.peer_ids());
                    }
                    self.record_process(pid.and_then(QemuProcess::of));
                    let caps = Capabilities::read_cached(&mut qmp, pid).unwrap_or_else(|e| {
                        log::warn!("{}: cannot read QEMU's capabilities: {e}", self.def.name);
                        Capabilities::default()
                    });
                    log::info!(
                        "{}: connected to QEMU {} {} pid {pid:?}",
                        self.def.name,
                        caps.version_text(),
                        caps.package
                    );
                    *self.qemu_warning.lock() = caps.range_warning();
                    // A QEMU the manager has just started from vmsnapfs's
                    // definition holds no fd set or node of vmsnapfs's.
                    let fresh = self.manager.is_some()
                        && self.fresh.swap(false, std::sync::atomic::Ordering::AcqRel);
                    let seen = self.sync_layers(&mut qmp, fresh);
                    let changes = qmp.changes_sent();
                    // Descriptors handed over by an operation that was
                    // cut short (a daemon crash) are released.
                    if !fresh {
                        let no_sets = seen.as_ref().is_some_and(|(_, n)| *n);
                        let _ = super::fdset::release_unused_knowing(&mut qmp, no_sets);
                    }
                    let disks_at_connect = seen.map(|(d, _)| (changes, d));
                    *guard = Some(Conn {
                        qmp,
                        pid,
                        nodes: None,
                        caps,
                        status: None,
                        disks_at_connect,
                    });
                }
                Err(e) => {
                    log::debug!("{}: monitor {}: {e}", self.def.name, path.display());
                    // Nobody listening, or the listener closed our queued
                    // connection (a QEMU exiting): stopped, if nothing
                    // holds the images.
                    let absent = matches!(&e, QmpError::Io(io) if matches!(
                        io.kind(),
                        std::io::ErrorKind::NotFound
                            | std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::BrokenPipe
                    ));
                    return Err(if absent {
                        NoMonitor::Absent(format!("nothing listens on {}", path.display()))
                    } else {
                        NoMonitor::Unreachable(match e {
                            QmpError::Protocol(p) => format!("the monitor does not speak QMP: {p}"),
                            e => e.to_string(),
                        })
                    });
                }
            }
        }
        Ok(guard.as_mut().expect("connected"))
    }

    /// Records the command line of the monitor's peer when it is a QEMU
    /// that may be run again (see [`process::verify_qemu`]), with the
    /// credentials it runs with; forgets any earlier one otherwise, and
    /// says why in the domain's log.
    fn record_argv(&self, pid: Option<i32>, ids: Option<(u32, u32)>) {
        let verified = match (pid, ids) {
            (Some(pid), Some((uid, gid))) => process::verify_qemu(pid, uid, gid),
            _ => Err(Error::io("the monitor socket gives no peer credentials")),
        };
        let r = match verified {
            Ok(v) => self.store.save_argv(&v.argv, &v.creds.to_line()),
            Err(e) => {
                let had = self.store.load_argv().is_some();
                self.note(format!(
                    "the command line of the monitor's peer (pid {}) is not recorded: {}; \
                     a revert that must start QEMU needs <commandline> in the definition{}",
                    pid.map_or("?".into(), |p| p.to_string()),
                    e.message,
                    if had {
                        " (the earlier record is dropped)"
                    } else {
                        ""
                    }
                ));
                self.store.forget_argv()
            }
        };
        if let Err(e) = r {
            log::warn!("{}: cannot record QEMU's argv: {e}", self.def.name);
        }
    }

    /// The command line that starts the domain and who runs it: the
    /// definition's (run as root: the administrator wrote it), else the
    /// recorded one, run with the credentials of the process it was read
    /// from, once its binary is checked again.
    fn start_command(&self) -> Result<(Vec<String>, process::Credentials)> {
        if let Some(argv) = &self.def.commandline {
            return Ok((argv.clone(), process::Credentials::root()));
        }
        let (argv, owner) = self.store.load_argv().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "no QEMU command line known: add <commandline> to the definition \
                 or start the VM once while vmsnapfs runs",
            )
        })?;
        let creds = process::Credentials::from_line(&owner)
            .ok_or_else(|| Error::io("the recorded command line has no valid owner"))?;
        process::check_binary(Path::new(&argv[0]))?;
        Ok((argv, creds))
    }

    /// Records the QEMU process seen on the monitor (none: forgets it).
    fn record_process(&self, p: Option<QemuProcess>) {
        let mut cur = self.qemu.lock();
        if *cur == p {
            return;
        }
        let file = self.store.dir().join(QEMU_RECORD);
        let r = match &p {
            Some(p) => p.save(&file),
            None => crate::store::atomic::remove_if_present(&file).map(drop),
        };
        if let Err(e) = r {
            log::warn!("{}: cannot record QEMU's pid: {e}", self.def.name);
        }
        *cur = p;
    }

    /// What holds the domain although its monitor is absent or silent:
    /// QEMU's write locks on an active layer, or the recorded QEMU process.
    fn holder(&self) -> Option<String> {
        let images: Vec<PathBuf> = self.active().into_iter().map(|d| d.source).collect();
        liveness::holder(&images, *self.qemu.lock())
    }

    /// Notes the domain as unreachable for `why` and returns that state.
    fn mark_unreachable(&self, why: String) -> DomainState {
        let holder = self.holder();
        let reason = match &holder {
            Some(h) => format!("{why} ({h})"),
            None => why,
        };
        *self.unreachable.lock() = Some(Unreachable {
            reason,
            held: holder.is_some(),
        });
        *self.last_unreachable.lock() = Some(Instant::now());
        DomainState::Unreachable
    }

    /// Shut off when nothing holds the images, else unreachable. A QEMU
    /// that is exiting may hold its locks a moment after its monitor
    /// went: asked again a few times, 50 ms apart.
    fn absent(&self, why: String) -> DomainState {
        let mut holder = self.holder();
        for _ in 0..4 {
            if holder.is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            holder = self.holder();
        }
        match holder {
            Some(h) => {
                *self.unreachable.lock() = Some(Unreachable {
                    reason: format!("{why}, but {h}"),
                    held: true,
                });
                *self.last_unreachable.lock() = Some(Instant::now());
                DomainState::Unreachable
            }
            None => {
                *self.unreachable.lock() = None;
                self.record_process(None);
                DomainState::Shutoff
            }
        }
    }

    fn state_of(&self, guard: &mut Option<Conn>) -> DomainState {
        // A probe that just found the monitor silent is not repeated at once.
        if guard.is_none()
            && self
                .last_unreachable
                .lock()
                .is_some_and(|t| t.elapsed() < PROBE_REUSE)
            && self.unreachable.lock().is_some()
        {
            return DomainState::Unreachable;
        }
        for attempt in 0..2 {
            let conn = match self.connect(guard) {
                Ok(c) => c,
                Err(NoMonitor::Absent(why)) => return self.absent(why),
                Err(NoMonitor::Unreachable(why)) => return self.mark_unreachable(why),
            };
            match conn.read_status(STATUS_TIMEOUT) {
                Ok(state) => {
                    *self.unreachable.lock() = None;
                    return if matches!(state, qapi::qmp::RunState::running) {
                        DomainState::Running
                    } else {
                        DomainState::Paused
                    };
                }
                // The connection ended (QEMU quit): ask again on a new one.
                Err(QmpError::Io(e)) if attempt == 0 => {
                    log::info!("{}: QEMU closed the monitor: {e}", self.def.name);
                    *guard = None;
                }
                Err(e) => {
                    *guard = None;
                    return self.mark_unreachable(e.to_string());
                }
            }
        }
        self.mark_unreachable("the monitor closed every connection".into())
    }

    /// [`Self::state_of`], from the state the operation read a moment ago
    /// on this connection when no command was sent since.
    fn recent_state(&self, guard: &mut Option<Conn>) -> DomainState {
        let seen = guard
            .as_ref()
            .filter(|c| c.qmp.is_usable())
            .and_then(Conn::status_unchanged);
        match seen {
            Some(qapi::qmp::RunState::running) => DomainState::Running,
            Some(_) => DomainState::Paused,
            None => self.state_of(guard),
        }
    }

    /// The error an operation gets while the domain is unreachable:
    /// EBUSY when a process holds the images (QEMU is there but does not
    /// answer), EIO otherwise.
    fn refusal(&self) -> Error {
        let u = self.unreachable.lock().clone().unwrap_or(Unreachable {
            reason: "the monitor does not answer".into(),
            held: true,
        });
        let text = format!(
            "the domain is unreachable: {}; nothing was changed",
            u.reason
        );
        if u.held {
            Error::busy(text)
        } else {
            Error::io(text)
        }
    }

    /// Runs `f` on the live connection, or fails with EIO when QEMU is
    /// not up (EBUSY when it holds the images but does not answer).
    pub(super) fn with_qmp<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut guard = self.conn.lock();
        let conn = match self.connect(&mut guard) {
            Ok(c) => c,
            Err(NoMonitor::Absent(why)) => {
                if self.absent(why) == DomainState::Unreachable {
                    return Err(self.refusal());
                }
                return Err(Error::io(
                    "QEMU is not running (the monitor does not answer)",
                ));
            }
            Err(NoMonitor::Unreachable(why)) => {
                self.mark_unreachable(why);
                return Err(self.refusal());
            }
        };
        let r = f(conn);
        if guard.as_ref().is_some_and(|c| !c.qmp.is_usable()) {
            *guard = None;
        }
        r
    }

    /// The domain's disks as the running QEMU has them, by target: the
    /// block device whose chain holds the disk's active layer (or, failing
    /// that, the image the definition names).
    pub(super) fn live_disks(&self, qmp: &mut Qmp) -> Result<BTreeMap<String, LiveDisk>> {
        self.live_disks_and_sets(qmp, false).map(|(d, _)| d)
    }

    /// [`Self::live_disks`], with the fd sets of vmsnapfs's QEMU listed
    /// (`no_sets`: known to be none, not asked).
    fn live_disks_and_sets(
        &self,
        qmp: &mut Qmp,
        no_sets: bool,
    ) -> Result<(
        BTreeMap<String, LiveDisk>,
        std::collections::HashMap<i64, PathBuf>,
    )> {
        let sets = if no_sets {
            Default::default()
        } else {
            super::fdset::ours(qmp).map_err(qmp_err)?
        };
        let blocks = qmp.block_devices().map_err(qmp_err)?;
        type Found = (String, Option<String>, Vec<qemu_img::ChainImage>);
        // A device without a medium (an empty CD-ROM) has no chain.
        let chains: Vec<Found> = blocks
            .iter()
            .filter_map(|b| {
                let inserted = b.inserted.as_ref()?;
                let node = inserted.node_name.clone().unwrap_or_default();
                let device = b
                    .qdev
                    .as_deref()
                    .map(|q| q.strip_suffix("/virtio-backend").unwrap_or(q).to_owned());
                Some((node, device, chain_of(inserted, &sets)))
            })
            .collect();
        let layers = self.layers.lock().clone();
        let mut out = BTreeMap::new();
        for disk in &self.def.disks {
            let wanted: Vec<PathBuf> = layers
                .get(&disk.target)
                .map(|l| canonical(&l.path))
                .into_iter()
                .chain([canonical(&disk.source)])
                .collect();
            // The device's own backend first: after a revert the old
            // -drive backend may still hold an older chain.
            let holds = |c: &Vec<qemu_img::ChainImage>, w: &PathBuf| {
                c.iter().any(|i| canonical(&i.path) == *w)
            };
            let found = chains
                .iter()
                .find(|(_, d, c)| d.is_some() && wanted.iter().any(|w| holds(c, w)))
                .or_else(|| {
                    wanted
                        .iter()
                        .find_map(|w| chains.iter().find(|(_, _, c)| holds(c, w)))
                });
            let Some((node, device, chain)) = found else {
                return Err(Error::io(format!(
                    "disk {} ({}) is not attached to the running QEMU",
                    disk.target,
                    disk.source.display()
                )));
            };
            self.check_reported_chain(&disk.target, chain)?;
            out.insert(
                disk.target.clone(),
                LiveDisk {
                    node: node.clone(),
                    device: device.clone(),
                    chain: chain.clone(),
                },
            );
        }
        Ok((out, sets))
    }

    /// True when QEMU answers on the monitor, false when the domain is
    /// shut off (nothing listens and nothing holds its images); an error
    /// when it is neither, so that no offline path runs on images a
    /// silent QEMU still has open.
    pub(super) fn is_up(&self) -> Result<bool> {
        let mut guard = self.conn.lock();
        match self.state_of(&mut guard) {
            DomainState::Shutoff => Ok(false),
            DomainState::Unreachable => Err(self.refusal()),
            DomainState::Running | DomainState::Paused => Ok(true),
        }
    }

    /// The backing chain of each disk, top first: from QEMU when it runs
    /// (it has the images open), from the images otherwise.
    fn chains(&self) -> Result<Vec<Vec<qemu_img::ChainImage>>> {
        if self.is_up()? {
            return self.with_qmp(|c| {
                let live = self.live_disks(&mut c.qmp)?;
                Ok(live.into_values().map(|d| d.chain).collect())
            });
        }
        self.active()
            .iter()
            .map(|d| qemu_img::chain(&d.source, &d.format))
            .collect()
    }

    /// The snapshot table of each qcow2 disk's active layer.
    fn snapshot_tables(&self) -> Result<Vec<Vec<ImageSnapshot>>> {
        Ok(self
            .chains()?
            .into_iter()
            .filter_map(|c| c.into_iter().next())
            .filter(|top| top.format == "qcow2")
            .map(|top| top.snapshots)
            .collect())
    }

    /// Starts a snapshot job and waits for it; a job error becomes EIO.
    fn run_job<C: qapi::Command>(qmp: &mut Qmp, command: &C, job_id: &str) -> Result<()> {
        qmp.forget_job_events(job_id);
        qmp.execute(command).map_err(qmp_err)?;
        // Done by the time the command answered (through libvirt's
        // passthrough the answer comes after the job's events): no
        // `query-jobs` needed.
        if qmp.job_succeeded_by_events(job_id) {
            return qmp.job_dismiss(job_id).map_err(qmp_err);
        }
        match qmp
            .wait_job(job_id, JOB_TIMEOUT, |_, _| {})
            .map_err(qmp_err)?
        {
            None => Ok(()),
            Some(e) => Err(Error::io(format!("{}: {e}", C::NAME))),
        }
    }

    /// The node names of the qcow2 disks' active layers (cached per process).
    pub(super) fn active_nodes(&self, conn: &mut Conn) -> Result<Vec<String>> {
        if let Some(n) = &conn.nodes {
            return Ok(n.clone());
        }
        let live = self.live_disks(&mut conn.qmp)?;
        let n: Vec<String> = self
            .def
            .disks
            .iter()
            .filter_map(|d| live.get(&d.target).map(|l| l.node.clone()))
            .collect();
        conn.nodes = Some(n.clone());
        Ok(n)
    }

    fn job_args(&self, conn: &mut Conn, job: &str) -> Result<InternalJob> {
        self.qcow2_disks()?;
        let nodes = self.active_nodes(conn)?;
        // Each job its own id: no event of an earlier job is taken for its.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let job_id = format!("vmsnapfs-{job}-{}-{n}", std::process::id());
        Ok(InternalJob { job_id, nodes })
    }
}

impl QemuBackend {
    /// Starts QEMU from the domain's command line pointed at the active
    /// layers, paused (-S): loading internal checkpoint `loadvm`, or RAM
    /// from memory file `incoming`; then checks the disks' chains and
    /// resumes the guest unless `paused`.
    pub(super) fn start_with(
        &self,
        loadvm: Option<&str>,
        incoming: Option<&Incoming<'_>>,
        paused: bool,
    ) -> Result<()> {
        if let Some(m) = &self.manager {
            return self.start_managed(m.as_ref(), loadvm, incoming, paused);
        }
        // The active layers' chains, read once: for the command line and
        // for the check of what QEMU opened.
        let chains = self.active_chains();
        let (mut argv, creds) = self.layered_argv_with(&chains)?;
        // The memory file is checked and held before QEMU starts.
        let held = incoming.map(|i| self.open_memory(i.file)).transpose()?;
        if let Some(machine) = incoming.and_then(|i| i.machine) {
            argv = super::machine::pin(&argv, machine);
        }
        argv.push("-S".into());
        if let Some(tag) = loadvm {
            argv.push("-loadvm".into());
            argv.push(tag.into());
        }
        if incoming.is_some() {
            argv.push("-incoming".into());
            argv.push("defer".into());
        }
        let pid = process::spawn_detached(&argv, &creds, &self.store.dir().join("qemu.log"))?;
        log::info!(
            "{}: started QEMU pid {pid} as uid {} gid {}",
            self.def.name,
            creds.uid,
            creds.gid
        );
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            {
                let mut guard = self.conn.lock();
                if self.connect(&mut guard).is_ok() {
                    break;
                }
            }
            if !process::is_alive(pid as i32, None) {
                return Err(Error::io(format!(
                    "QEMU exited at start; see {}",
                    self.store.dir().join("qemu.log").display()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::io("QEMU did not open its monitor in time"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Err(e) = self.check_started_chains_with(&chains) {
            let _ = self.stop_process();
            return Err(e);
        }
        if let (Some(memory), Some(held)) = (incoming, &held) {
            if let Err(e) = self.with_qmp(|c| super::external::load_memory(c, memory, held)) {
                let _ = self.stop_process();
                return Err(e);
            }
        }
        if !paused {
            self.set_running(true)?;
        }
        Ok(())
    }

    /// Starts a managed QEMU (paused): from its definition, or restored
    /// from memory file `incoming` (a stream: the manager loads nothing
    /// else); checks its chains, loads checkpoint `loadvm` with
    /// `snapshot-load`, and resumes it unless `paused`.
    fn start_managed(
        &self,
        m: &dyn super::managed::Manager,
        loadvm: Option<&str>,
        incoming: Option<&Incoming<'_>>,
        paused: bool,
    ) -> Result<()> {
        let _restarting = self.restarting();
        let t = Instant::now();
        // The active layers' chains are read while the manager starts
        // QEMU: read before QEMU opens the images, they catch what a read
        // afterwards would (an image changed before QEMU opened it makes
        // QEMU's chain differ from them).
        let chains = std::thread::scope(|scope| {
            let reader = std::thread::Builder::new()
                .name("read-chains".into())
                .spawn_scoped(scope, || self.active_chains())
                .ok();
            let started = match incoming {
                Some(i) => managed_can_load(m, i.format)
                    .and_then(|()| self.open_memory(i.file))
                    .and_then(|held| m.restore_paused(&held, &self.active())),
                None => m.start_paused(),
            };
            let chains = reader.and_then(|r| r.join().ok());
            started.map(|()| chains)
        })?;
        // Started from the definition vmsnapfs gave: nothing of
        // vmsnapfs's is in it yet.
        self.fresh.store(true, std::sync::atomic::Ordering::Release);
        let started = t.elapsed();
        let deadline = Instant::now() + START_TIMEOUT;
        // The monitor stays held from the first answer to the resume: no
        // state poll slips its commands in between.
        let mut guard = loop {
            let mut guard = self.conn.lock();
            if self.connect(&mut guard).is_ok() {
                break guard;
            }
            drop(guard);
            if Instant::now() > deadline {
                self.fresh
                    .store(false, std::sync::atomic::Ordering::Release);
                let _ = m.destroy();
                return Err(Error::io(format!(
                    "the QEMU that {} started did not answer in time",
                    m.describe()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let answered = t.elapsed();
        let chains = chains.unwrap_or_else(|| self.active_chains());
        let conn = guard.as_mut().expect("connected");
        let mut ready = self.check_started_chains_in(conn, &chains);
        if ready.is_ok() && loadvm.is_none() && !paused {
            ready = conn.qmp.cont().map_err(qmp_err);
            if ready.is_ok() {
                drop(guard);
                let checked = t.elapsed();
                log::debug!(
                    "{}: {} started QEMU in {:.3} s, it answered at {:.3} s, chains checked \
                     and the guest resumed at {:.3} s",
                    self.def.name,
                    m.describe(),
                    started.as_secs_f64(),
                    answered.as_secs_f64(),
                    checked.as_secs_f64(),
                );
                return Ok(());
            }
        }
        drop(guard);
        let ready = ready.and_then(|()| match loadvm {
            Some(tag) => self.load_checkpoint_live(tag),
            None => Ok(()),
        });
        if let Err(e) = ready {
            let _ = self.stop_process();
            return Err(e);
        }
        let checked = t.elapsed();
        if !paused {
            self.set_running(true)?;
        }
        log::debug!(
            "{}: {} started QEMU in {:.3} s, it answered at {:.3} s, chains checked at {:.3} s, \
             done at {:.3} s",
            self.def.name,
            m.describe(),
            started.as_secs_f64(),
            answered.as_secs_f64(),
            checked.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The domain's command line pointed at the active layers, and who
    /// runs it (see `start_command`).
    fn layered_argv(&self) -> Result<(Vec<String>, process::Credentials)> {
        self.layered_argv_with(&self.active_chains())
    }

    /// [`Self::layered_argv`] with the active layers' chains already read.
    fn layered_argv_with(
        &self,
        chains: &[(DiskDef, Result<Vec<qemu_img::ChainImage>>)],
    ) -> Result<(Vec<String>, process::Credentials)> {
        let (argv, creds) = self.start_command()?;
        Ok((
            super::cmdline::point_at_layers(
                &super::cmdline::strip_start_options(&argv),
                &self.swaps(chains),
            ),
            creds,
        ))
    }

    /// Each disk's active layer with its backing chain, top first, read
    /// with `qemu-img` (one process per disk, side by side).
    fn active_chains(&self) -> Vec<(DiskDef, Result<Vec<qemu_img::ChainImage>>)> {
        let active = self.active();
        std::thread::scope(|scope| {
            let handles: Vec<_> = active
                .iter()
                .map(|d| scope.spawn(move || qemu_img::chain(&d.source, &d.format)))
                .collect();
            active
                .iter()
                .zip(handles)
                .map(|(d, h)| {
                    let chain = h
                        .join()
                        .unwrap_or_else(|_| Err(Error::io("reading a backing chain panicked")));
                    (d.clone(), chain)
                })
                .collect()
        })
    }

    /// For each disk: the image paths a command line may name (the
    /// definition's and every image below the active layer), the active
    /// layer, and whether a raw disk now has a qcow2 overlay.
    fn swaps(
        &self,
        chains: &[(DiskDef, Result<Vec<qemu_img::ChainImage>>)],
    ) -> Vec<(Vec<String>, String, bool)> {
        let history = self.store.layer_history();
        self.def
            .disks
            .iter()
            .zip(chains)
            .map(|(def, (now, chain))| {
                let mut olds = vec![def.source.to_string_lossy().into_owned()];
                if let Ok(chain) = chain {
                    olds.extend(chain.iter().map(|i| i.path.to_string_lossy().into_owned()));
                }
                olds.extend(
                    history
                        .iter()
                        .filter(|(t, _)| *t == def.target)
                        .map(|(_, p)| p.to_string_lossy().into_owned()),
                );
                let to_qcow2 = def.format != "qcow2" && now.format == "qcow2";
                (olds, now.source.to_string_lossy().into_owned(), to_qcow2)
            })
            .collect()
    }

    /// After a start: every disk must run on its active layer with the
    /// whole backing chain the image names. A command line that opened
    /// another image, or cut the chain (`backing: null`), would show the
    /// guest the wrong bytes: refused before the guest runs. `chains`:
    /// the active layers' chains as read before QEMU opened the images.
    fn check_started_chains_with(
        &self,
        chains: &[(DiskDef, Result<Vec<qemu_img::ChainImage>>)],
    ) -> Result<()> {
        self.with_qmp(|c| self.check_started_chains_in(c, chains))
    }

    /// [`Self::check_started_chains_with`] on a connection already held;
    /// the disks QEMU reported when the connection was made are used when
    /// nothing that could change them was sent since.
    fn check_started_chains_in(
        &self,
        c: &mut Conn,
        chains: &[(DiskDef, Result<Vec<qemu_img::ChainImage>>)],
    ) -> Result<()> {
        let mut named = Vec::new();
        let expected: Vec<(String, Vec<PathBuf>)> = chains
            .iter()
            .map(|(d, chain)| {
                let chain = chain.as_ref().map_err(Clone::clone)?;
                named.extend(chain.iter().map(|i| i.path.clone()));
                Ok((
                    d.target.clone(),
                    chain.iter().map(|i| canonical(&i.path)).collect(),
                ))
            })
            .collect::<Result<_>>()?;
        {
            // QEMU opened the images by name: those vmsnapfs made must be
            // the very files it made.
            let named: Vec<&Path> = named.iter().map(PathBuf::as_path).collect();
            self.check_opened_made(c, &named)
                .map_err(|e| e.context("QEMU was stopped before the guest ran"))?;
            let seen = c
                .disks_at_connect
                .take()
                .filter(|(at, _)| *at == c.qmp.changes_sent())
                .map(|(_, d)| d);
            let live = match seen {
                Some(d) => d,
                None => self.live_disks(&mut c.qmp)?,
            };
            for (target, want) in &expected {
                let got: Vec<PathBuf> = live
                    .get(target)
                    .map(|d| d.chain.iter().map(|i| canonical(&i.path)).collect())
                    .unwrap_or_default();
                if &got != want {
                    return Err(Error::io(format!(
                        "the command line opens disk {target} as {got:?}, but its active \
                         layer and backing chain are {want:?}; QEMU was stopped before the \
                         guest ran (fix <commandline> in the definition)"
                    )));
                }
            }
            Ok(())
        }
    }
}

/// Bytes available to unprivileged writers on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

pub(super) use super::qemu_img::canonical;

/// Merges per-disk snapshot tables by tag.
fn merge(tables: impl IntoIterator<Item = Vec<ImageSnapshot>>) -> Vec<ImageSnapshot> {
    let mut by_tag: BTreeMap<String, ImageSnapshot> = BTreeMap::new();
    for t in tables {
        for s in t {
            by_tag
                .entry(s.tag.clone())
                .and_modify(|e| {
                    e.vm_state_size = e.vm_state_size.max(s.vm_state_size);
                    e.date_sec = e.date_sec.min(s.date_sec);
                })
                .or_insert(s);
        }
    }
    by_tag.into_values().collect()
}

impl Backend for QemuBackend {
    fn refresh_state(&self) -> DomainState {
        let mut guard = self.conn.lock();
        self.state_of(&mut guard)
    }

    fn try_refresh_state(&self) -> Option<DomainState> {
        if self.restarting.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return None;
        }
        let mut guard = self.conn.try_lock()?;
        Some(self.state_of(&mut guard))
    }

    fn list_internal(&self) -> Result<Vec<ImageSnapshot>> {
        // Every image of every chain: an internal snapshot stays in its
        // image when an external snapshot puts an overlay on top.
        Ok(merge(
            self.chains()?
                .into_iter()
                .flatten()
                .map(|image| image.snapshots),
        ))
    }

    fn create_internal(
        &self,
        tag: &str,
        live: DomainState,
        memory: bool,
        hook: Option<&dyn super::SwitchHook>,
    ) -> Result<SnapshotState> {
        let disks = self.qcow2_disks()?;
        if live == DomainState::Shutoff {
            for d in &disks {
                qemu_img::create(&d.source, tag)?;
            }
            return Ok(SnapshotState::Shutoff);
        }
        if !memory {
            // Disks only: one transaction, so all disks share one instant.
            self.with_qmp(|conn| {
                let job = self.job_args(conn, "disks")?;
                let hook = hook.filter(|_| live == DomainState::Running);
                super::hooked(hook, || {
                    conn.qmp
                        .internal_snapshot_transaction(&job.nodes, tag)
                        .map_err(qmp_err)
                })
            })?;
            return Ok(SnapshotState::DiskSnapshot);
        }
        self.with_qmp(|conn| {
            let job = self.job_args(conn, "save")?;
            let save = qapi::qmp::snapshot_save {
                job_id: job.job_id.clone(),
                tag: tag.to_owned(),
                vmstate: job.nodes[0].clone(),
                devices: job.nodes,
            };
            Self::run_job(&mut conn.qmp, &save, &job.job_id)
        })?;
        Ok(if live == DomainState::Running {
            SnapshotState::Running
        } else {
            SnapshotState::Paused
        })
    }

    fn delete_internal(&self, tag: &str) -> Result<()> {
        let mut guard = self.conn.lock();
        let state = self.recent_state(&mut guard);
        if state == DomainState::Unreachable {
            return Err(self.refusal());
        }
        if state == DomainState::Shutoff {
            drop(guard);
            for d in self.active().iter().filter(|d| d.format == "qcow2") {
                if qemu_img::list(&d.source)?.iter().any(|s| s.tag == tag) {
                    qemu_img::delete(&d.source, tag)?;
                }
            }
            return Ok(());
        }
        let conn = guard.as_mut().ok_or_else(|| Error::io("QEMU went away"))?;
        // snapshot-delete skips the devices that lack the tag.
        let job = self.job_args(conn, "delete")?;
        let delete = qapi::qmp::snapshot_delete {
            job_id: job.job_id.clone(),
            tag: tag.to_owned(),
            devices: job.nodes,
        };
        Self::run_job(&mut conn.qmp, &delete, &job.job_id)
    }

    fn delete_tag_in(&self, image: &Path, tag: &str) -> Result<bool> {
        let open_in_qemu = self.is_up()?
            && self.with_qmp(|c| {
                let live = self.live_disks(&mut c.qmp)?;
                let want = canonical(image);
                Ok(live
                    .values()
                    .any(|d| d.chain.iter().any(|i| canonical(&i.path) == want)))
            })?;
        if open_in_qemu {
            return Ok(false);
        }
        if qemu_img::list(image)?.iter().any(|s| s.tag == tag) {
            qemu_img::delete(image, tag)?;
        }
        Ok(true)
    }

    fn set_active_layers(&self, images: &[(String, PathBuf)]) -> Result<()> {
        if self.is_up()? {
            return Err(Error::io("QEMU runs: its disks cannot be switched offline"));
        }
        let changes = images
            .iter()
            .map(|(t, p)| {
                let format = self.format_of(p);
                qemu_img::chain(p, &format)?;
                Ok((
                    t.clone(),
                    Layer {
                        path: p.clone(),
                        format,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.set_layers(&changes)
    }

    fn tag_presence(&self, tag: &str) -> Result<(usize, usize)> {
        let tables = self.snapshot_tables()?;
        let present = tables
            .iter()
            .filter(|t| t.iter().any(|s| s.tag == tag))
            .count();
        Ok((present, tables.len()))
    }

    fn load_checkpoint_live(&self, tag: &str) -> Result<()> {
        self.with_qmp(|c| {
            let job = self.job_args(c, "load")?;
            let load = qapi::qmp::snapshot_load {
                job_id: job.job_id.clone(),
                tag: tag.to_owned(),
                vmstate: job.nodes[0].clone(),
                devices: job.nodes,
            };
            Self::run_job(&mut c.qmp, &load, &job.job_id)
        })
    }

    fn apply_disks_offline(&self, tag: &str) -> Result<()> {
        let disks = self.qcow2_disks()?;
        // All disks or none: a disk without the snapshot is found before
        // any disk is touched.
        for d in &disks {
            if !qemu_img::list(&d.source)?.iter().any(|s| s.tag == tag) {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "disk {} ({}) does not hold this snapshot; nothing was reverted",
                        d.target,
                        d.source.display()
                    ),
                ));
            }
        }
        for d in &disks {
            qemu_img::apply(&d.source, tag)?;
        }
        Ok(())
    }

    fn stop_process(&self) -> Result<()> {
        let mut guard = self.conn.lock();
        let conn = match self.connect(&mut guard) {
            Ok(c) => c,
            Err(NoMonitor::Absent(why)) => {
                return match self.absent(why) {
                    DomainState::Shutoff => Ok(()),
                    _ => Err(self.refusal()),
                }
            }
            Err(NoMonitor::Unreachable(why)) => {
                self.mark_unreachable(why);
                return Err(self.refusal());
            }
        };
        let pid = self.qemu_pid(conn);
        if let Some(m) = &self.manager {
            *guard = None;
            m.destroy()?;
        } else {
            // QEMU may close the socket before it answers `quit`.
            let _ = conn.qmp.quit();
            *guard = None;
        }
        if let Some(pid) = pid {
            if !process::wait_exit(pid, Duration::from_secs(30)) {
                return Err(Error::io(format!("QEMU pid {pid} did not exit after quit")));
            }
        }
        Ok(())
    }

    fn start_process(&self, loadvm: Option<&str>, paused: bool) -> Result<()> {
        self.start_with(loadvm, None, paused)
    }

    fn set_running(&self, running: bool) -> Result<()> {
        self.with_qmp(|c| if running { c.qmp.cont() } else { c.qmp.stop() }.map_err(qmp_err))
    }

    fn space_shortage(&self) -> Option<String> {
        // A checkpoint needs about the guest's RAM; disk-only needs little.
        let ram = {
            let mut guard = self.conn.lock();
            self.connect(&mut guard)
                .ok()
                .and_then(|c| c.qmp.base_memory(STATUS_TIMEOUT).ok())
        };
        let need = ram.unwrap_or(0) + 16 * 1024 * 1024;
        let active = self.active();
        self.def.disks.iter().find_map(|d| {
            // A block device vmsnapfs put into libvirt's definition: new
            // files go beside the first file below the active layer.
            let beside = if super::block_dev::is_device_path(&d.source) {
                let now = active.iter().find(|a| a.target == d.target)?;
                super::block_dev::file_beside(&now.source, &now.format).ok()?
            } else {
                d.source.clone()
            };
            let free = free_bytes(beside.parent()?)?;
            (free < need).then(|| {
                format!(
                    "no space left on the filesystem of {}: {} MiB free, a snapshot needs about {} MiB",
                    beside.display(),
                    free >> 20,
                    need >> 20
                )
            })
        })
    }

    fn unreachable(&self) -> Option<Unreachable> {
        self.unreachable.lock().clone()
    }

    fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock())
    }

    fn qemu_warning(&self) -> Option<String> {
        self.qemu_warning.lock().clone()
    }

    fn memory_format(&self, live: DomainState, memory: &Path) -> MemoryFormat {
        // `file:` URIs end at a comma (`file:PATH,offset=N`); a manager
        // loads streams only (see `managed_can_load`).
        if self.manager.is_some() || memory.to_string_lossy().contains(',') {
            return MemoryFormat::Stream;
        }
        let parallel = match live {
            // A paused guest: RAM at fixed offsets, written in parallel.
            DomainState::Paused => self
                .with_qmp(|c| Ok(c.caps.has_parallel_memory_files()))
                .unwrap_or(false),
            // A running guest: the same file copied live (see `precopy`).
            DomainState::Running => self
                .with_qmp(|c| Ok(c.caps.has_live_parallel_checkpoints()))
                .unwrap_or(false),
            _ => false,
        };
        if parallel {
            MemoryFormat::MappedRam
        } else {
            MemoryFormat::Stream
        }
    }

    fn can_load_memory(&self, format: MemoryFormat) -> Result<()> {
        if let Some(m) = &self.manager {
            managed_can_load(m.as_ref(), format)?;
        }
        // The operation read the state a moment ago: asked again only
        // when a command went to QEMU since.
        let up = {
            let mut guard = self.conn.lock();
            match self.recent_state(&mut guard) {
                DomainState::Shutoff => false,
                DomainState::Unreachable => return Err(self.refusal()),
                DomainState::Running | DomainState::Paused => true,
            }
        };
        if !up {
            return Ok(());
        }
        self.with_qmp(|c| super::external::check_can_load(&c.caps, format))
    }

    fn can_start(&self) -> bool {
        self.manager.is_some() || self.def.commandline.is_some() || self.store.load_argv().is_some()
    }

    fn active_disks(&self) -> Vec<DiskDef> {
        self.active()
    }

    fn start_argv(&self) -> Result<Vec<String>> {
        if let Some(m) = &self.manager {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("QEMU is started by {}, from its definition", m.describe()),
            ));
        }
        self.layered_argv().map(|(argv, _)| argv)
    }

    fn create_external(
        &self,
        plan: &ExternalPlan,
        live: DomainState,
        hook: Option<&dyn super::SwitchHook>,
    ) -> Result<ExternalOutcome> {
        super::external::check_plan_paths(plan)?;
        if live == DomainState::Shutoff {
            if self.is_up()? {
                return Err(Error::io(
                    "QEMU started while the snapshot was being prepared",
                ));
            }
            return self.external_offline(plan);
        }
        self.external_live(plan, live, hook)
    }

    fn undo_external(&self, plan: &ExternalPlan) -> Result<()> {
        self.undo_external_impl(plan)
    }

    fn settle_external(&self, plan: &ExternalPlan) -> Result<bool> {
        self.settle_external_impl(plan)
    }

    fn prepare_overlays(&self, branches: &[(String, PathBuf, PathBuf, String)]) -> Result<()> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = branches
                .iter()
                .map(|(_, point, overlay, format)| {
                    scope.spawn(move || self.make_overlay(overlay, point, format))
                })
                .collect();
            let results: Vec<Result<()>> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::io("qemu-img create panicked")))
                })
                .collect();
            match results.into_iter().find(|r| r.is_err()) {
                Some(e) => {
                    for (_, _, overlay, _) in branches {
                        let _ = self.remove_made(overlay);
                    }
                    e
                }
                None => Ok(()),
            }
        })
    }

    fn revert_external(&self, revert: &super::ExternalRevert) -> Result<()> {
        self.revert_external_impl(revert)
    }

    fn disks_unavailable(&self) -> Option<String> {
        let mut guard = self.conn.lock();
        let conn = self.connect(&mut guard).ok()?;
        // The operation's own look at the state, when nothing was sent
        // since (it asked a moment ago), else a new one.
        let state = match conn.status_unchanged() {
            Some(s) => Ok(s),
            None => conn.read_status(STATUS_TIMEOUT),
        };
        let inactive = state.is_ok_and(|s| matches!(s, qapi::qmp::RunState::postmigrate));
        inactive.then(|| {
            "QEMU keeps the disks inactive since the RAM of the paused guest was saved \
             (QEMU 7.2 reactivates them when the guest resumes): resume the guest first, \
             or revert to a checkpoint"
                .to_owned()
        })
    }

    fn settle_leftover_jobs(&self) -> Result<usize> {
        if !self.is_up()? {
            return Ok(0);
        }
        self.with_qmp(|c| {
            let jobs = c.qmp.jobs().map_err(qmp_err)?;
            let ours: Vec<String> = jobs
                .into_iter()
                .map(|j| j.id)
                .filter(|id| id.starts_with("vmsnapfs-"))
                .collect();
            for id in &ours {
                // Waits for it, completing an active commit in `ready`.
                if let Some(e) = c
                    .qmp
                    .wait_job_completing(id, JOB_TIMEOUT, |_, _| {})
                    .map_err(qmp_err)?
                {
                    log::warn!("{}: leftover job {id} failed: {e}", self.def.name);
                }
            }
            c.nodes = None;
            if !ours.is_empty() {
                self.sync_layers(&mut c.qmp, false);
            }
            Ok(ours.len())
        })
    }

    fn merge(&self, merge: &super::Merge, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.merge_impl(merge, progress)
    }
}

/// ENOTSUP when a QEMU that `m` starts cannot load a memory file of
/// `format`: a manager restores a migration stream only (libvirt 9.0's
/// `virsh restore` sets no migration capability, so RAM at fixed
/// offsets cannot go through it).
fn managed_can_load(m: &dyn super::managed::Manager, format: MemoryFormat) -> Result<()> {
    if format == MemoryFormat::MappedRam {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the memory file holds RAM at fixed offsets (mapped-ram), which {} cannot \
                 load; revert to 'shutoff' to get the disks back",
                m.describe()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_unions_tags() {
        let a = vec![ImageSnapshot {
            tag: "x".into(),
            vm_state_size: 0,
            date_sec: 5,
        }];
        let b = vec![
            ImageSnapshot {
                tag: "x".into(),
                vm_state_size: 10,
                date_sec: 7,
            },
            ImageSnapshot {
                tag: "y".into(),
                vm_state_size: 0,
                date_sec: 1,
            },
        ];
        let m = merge([a, b]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].vm_state_size, 10);
        assert_eq!(m[0].date_sec, 5);
    }
}
