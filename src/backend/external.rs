//! External snapshots on the QEMU backend: new overlays (offline with
//! `qemu-img`, live in one `transaction`), the memory file of a checkpoint
//! (a migration to a file, live with background-snapshot when the guest
//! runs), undo, and settling a create that a crash interrupted.

use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use qapi::qmp::{MigrationCapability, MigrationInfo};

use super::capabilities::Capabilities;
use super::qemu::{canonical, qmp_err, Conn, Incoming, QemuBackend, JOB_TIMEOUT};
use super::{qemu_img, ExternalOutcome, ExternalPlan, ExternalRevert};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{DomainState, MemoryFormat, SnapshotState};
use crate::store::Layer;

/// Where a memory file is written until it is complete.
pub fn memory_part_path(memory: &Path) -> PathBuf {
    let mut name = memory.file_name().unwrap_or_default().to_owned();
    name.push(".part");
    memory.with_file_name(name)
}

/// One disk's part of a live snapshot's `transaction`: the node, the
/// overlay vmsnapfs made for it, the overlay's node name.
type SnapshotAction = (String, String, String);

/// Why a guest stays paused after QEMU opened something other than an
/// overlay vmsnapfs made.
const LEFT_PAUSED: &str = "the guest is left paused so that none of its writes reach that \
     file; stop QEMU, put the snapshot's files back and start it again";

/// `e`, saying that the guest stays paused.
pub(super) fn left_paused(e: Error) -> Error {
    Error::new(e.kind, format!("{}; {LEFT_PAUSED}", e.message))
}

/// A node name for an overlay: QEMU allows 31 characters.
fn overlay_node(overlay: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    overlay.hash(&mut h);
    SystemTime::now().hash(&mut h);
    format!("{}{:016x}", super::fdset::NODE_PREFIX, h.finish())
}

impl QemuBackend {
    /// Creates an overlay (see [`qemu_img::create_overlay`]) and records
    /// its inode as a file vmsnapfs made.
    /// A block device accepted as a layer ([`super::block_dev`]) is not
    /// made but checked again and, where allowed, formatted.
    pub(super) fn make_overlay(&self, overlay: &Path, backing: &Path, format: &str) -> Result<()> {
        if super::block_dev::is_device_path(overlay) {
            let target = self
                .active()
                .into_iter()
                .find(|d| d.source == backing)
                .map_or_else(String::new, |d| d.target);
            return super::block_dev::prepare(
                overlay,
                &super::block_dev::Over {
                    domain: &self.def.name,
                    target: &target,
                    active: backing,
                    format,
                },
                self.store.dir(),
            );
        }
        let id = qemu_img::create_overlay(overlay, backing, format)?;
        if let Err(e) = self.store.record_made(&[(overlay.to_owned(), id)]) {
            let _ = crate::store::owned::remove(overlay, Some(id));
            return Err(e.into());
        }
        Ok(())
    }

    /// Opens a file vmsnapfs made (read-write when `write`), without
    /// following a symlink, and only while `path` still names the inode
    /// recorded when it was made: what QEMU is then handed is that file.
    pub(super) fn open_made(&self, path: &Path, write: bool) -> Result<fs::File> {
        let replaced = || {
            Error::io(format!(
                "{} is no longer the file vmsnapfs made (it was replaced); it is not used",
                path.display()
            ))
        };
        let f = crate::store::owned::open_existing(path, write).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ELOOP) => replaced(),
                _ => Error::from(e).context(path.display().to_string()),
            }
        })?;
        match self.store.made_id(path) {
            Some(id) if crate::store::owned::id_of(&f)? == id => Ok(f),
            _ => Err(replaced()),
        }
    }

    /// Removes a file vmsnapfs made (see [`crate::store::DomainStore::remove_made`]);
    /// anything else found at the path is left alone and logged.
    /// A block device is never removed: what a format wrote on it is
    /// undone and it is released ([`super::block_dev::undo`]).
    pub(super) fn remove_made(&self, path: &Path) -> Result<()> {
        if let super::block_dev::Undone::Released(note) =
            super::block_dev::undo(path, self.store.dir())
        {
            log::info!(
                "{}: block device {} released",
                self.def.name,
                path.display()
            );
            if let Some(n) = note {
                self.note(n);
            }
            return Ok(());
        }
        if let crate::store::owned::Removal::Refused(why) = self.store.remove_made(path, false)? {
            log::warn!("{}: not removed: {why}", self.def.name);
        }
        Ok(())
    }

    /// Checks that QEMU holds open each of `paths` that vmsnapfs made (see
    /// [`super::opened`]): one it does not hold was given to QEMU by name
    /// and swapped for something else before QEMU opened it.
    pub(super) fn check_opened_made(&self, conn: &Conn, paths: &[&Path]) -> Result<()> {
        let made: Vec<(PathBuf, crate::store::owned::FileId)> = paths
            .iter()
            .filter_map(|p| self.store.made_id(p).map(|id| (p.to_path_buf(), id)))
            .collect();
        if made.is_empty() {
            return Ok(());
        }
        let pid = self.qemu_pid(conn).ok_or_else(|| {
            Error::io("cannot check which files QEMU opened: the monitor socket names no process")
        })?;
        // A QEMU gone meanwhile holds nothing: EIO, whatever the errno.
        let missing = super::opened::not_opened(pid, &made)
            .map_err(|e| Error::io(format!("reading /proc/{pid}/fd: {e}")).with_source(e))?;
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
        Err(Error::io(format!(
            "QEMU (pid {pid}) does not hold the file vmsnapfs made at {}: the name was \
             replaced before QEMU opened it, and QEMU opened something else",
            names.join(", ")
        )))
    }
}

/// Makes a complete memory file durable and read-only for root, once it
/// is still the file vmsnapfs made (`id`), and renames it into place.
fn seal_memory(part: &Path, memory: &Path, id: crate::store::owned::FileId) -> Result<()> {
    let replaced = || {
        Error::io(format!(
            "{} was replaced while RAM was saved; the memory file is not used",
            part.display()
        ))
    };
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(part)
        .map_err(|_| replaced())?;
    if crate::store::owned::id_of(&f)? != id {
        return Err(replaced());
    }
    f.sync_all()?;
    f.set_permissions(fs::Permissions::from_mode(0o400))?;
    crate::store::owned::rename_noreplace(part, memory)?;
    let m = fs::symlink_metadata(memory)?;
    if (m.dev(), m.ino()) != id {
        return Err(replaced());
    }
    if let Some(dir) = memory.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A guest pause measured from our `stop` to QEMU's RESUME event.
pub(super) fn pause_from_events(
    events: &[serde_json::Value],
    stopped_at: SystemTime,
) -> Option<Duration> {
    let at = events.iter().rev().find_map(super::qmp_ops::resumed_at)?;
    at.duration_since(stopped_at).ok()
}

impl QemuBackend {
    /// Overlays for a stopped domain: `qemu-img create`, then one durable
    /// record of the new active layers (the commit point).
    pub(super) fn external_offline(&self, plan: &ExternalPlan) -> Result<ExternalOutcome> {
        let active = self.active();
        let mut made: Vec<&Path> = Vec::new();
        let mut points = Vec::new();
        let result = (|| {
            for (target, overlay) in &plan.overlays {
                let disk = active
                    .iter()
                    .find(|d| &d.target == target)
                    .ok_or_else(|| Error::invalid(format!("the domain has no disk {target}")))?;
                self.make_overlay(overlay, &disk.source, &disk.format)?;
                made.push(overlay);
                points.push((target.clone(), disk.source.clone()));
            }
            crate::failpoint::hit("create.after-overlays")?;
            self.set_layers_over(&Self::new_layers(plan))
        })();
        if let Err(e) = result {
            for m in made {
                let _ = self.remove_made(m);
            }
            return Err(e);
        }
        Ok(ExternalOutcome {
            state: SnapshotState::Shutoff,
            points,
            memory_saved: false,
            note: None,
            paused_for: None,
            pause_steps: None,
            machine: None,
            memory_format: None,
        })
    }

    fn new_layers(plan: &ExternalPlan) -> Vec<(String, Layer)> {
        plan.overlays
            .iter()
            .map(|(t, o)| {
                (
                    t.clone(),
                    Layer {
                        path: o.clone(),
                        format: "qcow2".into(),
                    },
                )
            })
            .collect()
    }

    /// Overlays (and RAM) for a running or paused domain.
    pub(super) fn external_live(
        &self,
        plan: &ExternalPlan,
        live: DomainState,
        hook: Option<&dyn super::SwitchHook>,
    ) -> Result<ExternalOutcome> {
        let outcome = self.with_qmp(|conn| {
            let disks = self.live_disks(&mut conn.qmp)?;
            let mut actions = Vec::new();
            let mut points = Vec::new();
            let mut made: Vec<&Path> = Vec::new();
            // vmsnapfs makes the overlay files itself (O_EXCL, the base's
            // owner and mode); QEMU only opens them (mode "existing").
            for (target, overlay) in &plan.overlays {
                let prepared = disks
                    .get(target)
                    .ok_or_else(|| Error::invalid(format!("the domain has no disk {target}")))
                    .and_then(|d| {
                        let top = d.chain.first().cloned().ok_or_else(|| {
                            Error::io(format!("disk {target} has no image in QEMU"))
                        })?;
                        self.make_overlay(overlay, &top.path, &top.format)?;
                        Ok((d, top))
                    });
                let (d, top) = match prepared {
                    Ok(x) => x,
                    Err(e) => {
                        for m in made {
                            let _ = self.remove_made(m);
                        }
                        return Err(e);
                    }
                };
                made.push(overlay);
                points.push((target.clone(), top.path));
                let Some(file) = overlay.to_str() else {
                    for m in made {
                        let _ = self.remove_made(m);
                    }
                    return Err(Error::invalid(format!(
                        "{} is not UTF-8, which QMP cannot carry",
                        overlay.display()
                    )));
                };
                actions.push((d.node.clone(), file.to_owned(), overlay_node(overlay)));
            }
            let overlays: Vec<&Path> = plan.overlays.iter().map(|(_, o)| o.as_path()).collect();
            if let Err(e) = self.before_handing_over(conn) {
                for m in made {
                    let _ = self.remove_made(m);
                }
                return Err(e);
            }
            let mut outcome = ExternalOutcome {
                state: SnapshotState::DiskSnapshot,
                points,
                memory_saved: false,
                note: None,
                paused_for: None,
                pause_steps: None,
                machine: None,
                memory_format: None,
            };
            match &plan.memory {
                None => {
                    // The agent's freeze (the hook) comes right before
                    // the pause or the switch, its thaw right after the
                    // guest runs again; the time is the switch's alone.
                    let hook = hook.filter(|_| live == DomainState::Running);
                    let mut started = None;
                    let switched = super::hooked(hook, || {
                        started = Some(Instant::now());
                        self.switch_disks_checked(conn, &actions, plan, live, &overlays)
                    });
                    if switched.is_err() && started.is_none() {
                        for o in &overlays {
                            let _ = self.remove_made(o);
                        }
                    }
                    switched?;
                    outcome.paused_for = started.map(|t| t.elapsed());
                }
                Some(memory) => {
                    self.checkpoint(conn, &actions, plan, memory, live, &mut outcome)?;
                    outcome.state = if live == DomainState::Running {
                        SnapshotState::Running
                    } else {
                        SnapshotState::Paused
                    };
                    outcome.memory_saved = true;
                }
            }
            conn.nodes = None;
            Ok(outcome)
        })?;
        crate::failpoint::hit("create.after-overlays")?;
        self.set_layers_over(&Self::new_layers(plan))?;
        Ok(outcome)
    }

    /// What must hold before QEMU is given the names of new overlays: a
    /// process to check afterwards (see [`Self::check_opened_made`]).
    fn before_handing_over(&self, conn: &Conn) -> Result<()> {
        crate::failpoint::hit("create.overlays-made")?;
        if self.qemu_pid(conn).is_none() {
            return Err(Error::io(
                "the monitor socket names no process, so vmsnapfs cannot check which \
                 files QEMU opens; no live snapshot is taken",
            ));
        }
        Ok(())
    }

    /// The disk switch of a disk-only snapshot, checked: QEMU must hold
    /// the overlays vmsnapfs made before the guest writes to them. Where
    /// someone other than root could swap an overlay's name (its
    /// directory, or one on the way, is theirs), the guest is paused from
    /// before the switch until the check passed; where only root could,
    /// it keeps running. If the check fails the guest is left paused:
    /// QEMU writes a file that is not the snapshot's overlay, and none of
    /// the guest's writes may reach it.
    fn switch_disks_checked(
        &self,
        conn: &mut Conn,
        actions: &[SnapshotAction],
        plan: &ExternalPlan,
        live: DomainState,
        overlays: &[&Path],
    ) -> Result<()> {
        let running = live == DomainState::Running;
        let careful = running
            && overlays.iter().any(|o| {
                !o.parent()
                    .is_some_and(crate::store::safe_dir::only_root_can_change)
            });
        if careful {
            if let Err(e) = conn.qmp.stop() {
                for o in overlays {
                    let _ = self.remove_made(o);
                }
                return Err(qmp_err(e));
            }
        }
        if let Err(e) = self.switch_disks(conn, actions, plan) {
            if careful {
                let _ = conn.qmp.cont();
            }
            return Err(e);
        }
        if let Err(e) = self.check_opened_made(conn, overlays) {
            if running && !careful {
                let _ = conn.qmp.stop();
            }
            return Err(left_paused(e));
        }
        if careful {
            conn.qmp.cont().map_err(qmp_err)?;
        }
        Ok(())
    }

    /// Runs the disk transaction (through the domain's manager when it
    /// has one, so that its live definition follows); a refused one
    /// leaves no overlay file.
    fn switch_disks(
        &self,
        conn: &mut Conn,
        actions: &[SnapshotAction],
        plan: &ExternalPlan,
    ) -> Result<()> {
        conn.nodes = None;
        if let Some(m) = self.manager.clone() {
            return self.switch_disks_managed(conn, m.as_ref(), plan);
        }
        let r = conn.qmp.snapshot_transaction(actions);
        if let Err(e) = r {
            // A failed transaction rolls back; the files made stay.
            let _ = super::fdset::release_unused(&mut conn.qmp);
            for (_, overlay) in &plan.overlays {
                let _ = self.remove_made(overlay);
            }
            return Err(qmp_err(e));
        }
        Ok(())
    }

    /// [`Self::switch_disks`] by the manager. A failure it reports is
    /// checked against what QEMU has open (virsh killed at its deadline,
    /// or a failure after QEMU's transaction, says nothing certain): no
    /// overlay in use, they are removed; all of them, the switch is done.
    fn switch_disks_managed(
        &self,
        conn: &mut Conn,
        m: &dyn super::managed::Manager,
        plan: &ExternalPlan,
    ) -> Result<()> {
        let overlays: Vec<(String, &Path)> = plan
            .overlays
            .iter()
            .map(|(t, o)| (t.clone(), o.as_path()))
            .collect();
        let unchanged: Vec<&str> = self
            .def
            .disks
            .iter()
            .map(|d| d.target.as_str())
            .filter(|t| !plan.overlays.iter().any(|(p, _)| p == t))
            .collect();
        let Err(e) = m.switch_to_overlays(&overlays, &unchanged) else {
            return Ok(());
        };
        let e = e.context(format!("{} did not switch the disks", m.describe()));
        let disks = match self.live_disks(&mut conn.qmp) {
            Ok(d) => d,
            // Left for recovery (`settle_external`), which looks again.
            Err(l) => return Err(e.context(format!("and QEMU's disks cannot be read: {l}"))),
        };
        let on_overlay = |(t, o): &&(String, PathBuf)| {
            disks
                .get(t)
                .and_then(|d| d.chain.first())
                .is_some_and(|i| canonical(&i.path) == canonical(o))
        };
        let switched = plan.overlays.iter().filter(on_overlay).count();
        if switched == 0 {
            for (_, overlay) in &plan.overlays {
                let _ = self.remove_made(overlay);
            }
            return Err(e);
        }
        if switched == plan.overlays.len() {
            self.note(format!(
                "{}; yet QEMU runs on every new overlay: the switch is taken as done",
                e.message
            ));
            return Ok(());
        }
        Err(e.context("QEMU switched some of the disks only"))
    }

    fn set_background_snapshot(conn: &mut Conn, on: bool) -> Result<()> {
        set_migrate_capabilities(conn, &[MigrationCapability::background_snapshot], on)
    }

    /// The machine type QEMU emulates (`pc-q35-7.2`), if it says.
    fn machine_type(conn: &mut Conn) -> Option<String> {
        let t = conn.qmp.machine_type().ok()?;
        super::machine::from_qom_type(&t)
    }

    /// Sets `max-bandwidth` (QEMU throttles migrations to 128 MiB/s by
    /// default, which would make a memory file take seconds per GiB);
    /// returns the value it had.
    fn set_max_bandwidth(conn: &mut Conn, bytes_per_sec: u64) -> Option<u64> {
        let old = conn.qmp.max_bandwidth().ok()?;
        conn.qmp.set_max_bandwidth(bytes_per_sec).ok()?;
        old
    }

    /// A checkpoint: RAM and disks of one instant. A running guest on a
    /// QEMU that can ([`super::precopy`]) is copied live into a mapped-ram
    /// file and paused only for the last pass and the disk switch, unless
    /// QEMU also takes a background snapshot and measures the guest
    /// dirtying RAM too fast for a short last pass ([`super::ram_way`]);
    /// if that copy does not converge, or elsewhere, the guest is stopped, the disks
    /// switched, and RAM saved from that instant: with background-snapshot
    /// QEMU resumes the guest at once and writes RAM while it runs. Where
    /// QEMU refuses background-snapshot (it needs userfaultfd, which the
    /// kernel may deny to an unprivileged QEMU such as libvirt's), a running
    /// guest's RAM is copied live into the stream instead; without either
    /// (or when that copy does not converge) the guest stays paused until
    /// the file is written.
    fn checkpoint(
        &self,
        conn: &mut Conn,
        actions: &[SnapshotAction],
        plan: &ExternalPlan,
        memory: &Path,
        live: DomainState,
        outcome: &mut ExternalOutcome,
    ) -> Result<()> {
        use super::precopy::LiveFile;
        let mut format = plan.memory_format;
        if format == MemoryFormat::MappedRam {
            // Refused before anything is made.
            check_can_load(&conn.caps, MemoryFormat::MappedRam)?;
        }
        let running = live == DomainState::Running;
        // QEMU opens the overlays by name at the switch; where someone
        // other than root could swap one meanwhile, the guest must be
        // stopped by vmsnapfs (and stay paused if QEMU opened something
        // else), which a live copy cannot do: QEMU stops it itself and a
        // cancelled copy resumes it.
        let swappable = plan.overlays.iter().any(|(_, o)| {
            !o.parent()
                .is_some_and(crate::store::safe_dir::only_root_can_change)
        });
        let mut try_background = true;
        // Where background-snapshot is there too, the guest's dirty rate
        // chooses between the two (see `ram_way`).
        let chosen = (format == MemoryFormat::MappedRam && running && !swappable)
            .then(|| Self::choose_ram_way(conn))
            .flatten();
        if let Some(choice) = &chosen {
            add_note(outcome, choice.why.clone());
        }
        let background_chosen = chosen
            .as_ref()
            .is_some_and(|c| c.way == super::ram_way::RamWay::Background);
        if background_chosen {
            format = MemoryFormat::Stream;
            outcome.memory_format = Some(format);
        } else if format == MemoryFormat::MappedRam && running {
            let why = if swappable {
                Some("the overlays' directory can be changed by others than root".to_owned())
            } else {
                self.checkpoint_into(
                    conn,
                    actions,
                    plan,
                    memory,
                    live,
                    outcome,
                    // A shorter last pass where a background snapshot
                    // takes over from a copy that does not converge.
                    Way::Live(
                        LiveFile::MappedRam,
                        if chosen.is_some() {
                            super::ram_way::CHOSEN_DOWNTIME_MS
                        } else {
                            super::precopy::DOWNTIME_MS
                        },
                    ),
                )?
            };
            let Some(why) = why else {
                return Ok(());
            };
            add_note(
                outcome,
                format!("live copy of RAM given up ({why}); RAM written as a background snapshot"),
            );
            format = MemoryFormat::Stream;
            outcome.memory_format = Some(format);
        } else if running && !swappable && conn.caps.has_live_stream_checkpoints() {
            // Asked before anything is made: QEMU checks at once that the
            // kernel lets it track writes (userfaultfd).
            match Self::set_background_snapshot(conn, true) {
                Ok(()) => {
                    let _ = Self::set_background_snapshot(conn, false);
                }
                Err(refused) => {
                    try_background = false;
                    let why = self.checkpoint_into(
                        conn,
                        actions,
                        plan,
                        memory,
                        live,
                        outcome,
                        Way::Live(LiveFile::Stream, super::precopy::DOWNTIME_MS),
                    )?;
                    let Some(why) = why else {
                        add_note(
                            outcome,
                            format!(
                                "background-snapshot refused ({}); RAM copied live",
                                refused.message
                            ),
                        );
                        return Ok(());
                    };
                    add_note(
                        outcome,
                        format!(
                            "background-snapshot refused ({}); live copy of RAM given up \
                             ({why}); RAM saved with the guest paused",
                            refused.message
                        ),
                    );
                }
            }
        }
        self.checkpoint_into(
            conn,
            actions,
            plan,
            memory,
            live,
            outcome,
            Way::Save {
                format,
                background: try_background,
            },
        )
        .map(drop)
    }

    /// The way a running guest's RAM is written where QEMU offers a live
    /// copy into a mapped-ram file: `None` where it refuses
    /// background-snapshot (asked before anything is made: QEMU checks at
    /// once that the kernel lets it track writes), so the live copy it is;
    /// else chosen from the guest's dirty rate ([`super::ram_way`]).
    fn choose_ram_way(conn: &mut Conn) -> Option<super::ram_way::Choice> {
        Self::set_background_snapshot(conn, true).ok()?;
        let _ = Self::set_background_snapshot(conn, false);
        let t = Instant::now();
        let measured = super::ram_way::measure(conn);
        log::debug!("dirty rate {measured:?}, measured in {:?}", t.elapsed());
        Some(super::ram_way::choose(measured))
    }

    /// [`Self::checkpoint`] into a new file at `memory`: written as
    /// `memory.part`, renamed when complete. A live copy
    /// ([`Self::precopy_save`]) returns `Some(why)` when it gave up before
    /// anything changed (no file left, the guest runs).
    #[allow(clippy::too_many_arguments)]
    fn checkpoint_into(
        &self,
        conn: &mut Conn,
        actions: &[SnapshotAction],
        plan: &ExternalPlan,
        memory: &Path,
        live: DomainState,
        outcome: &mut ExternalOutcome,
        way: Way,
    ) -> Result<Option<String>> {
        let mapped = matches!(
            way,
            Way::Save {
                format: MemoryFormat::MappedRam,
                ..
            }
        );
        let part = memory_part_path(memory);
        // Guest RAM holds secrets: the file is never readable by others.
        // An existing file (or symlink) at either name is never replaced.
        if fs::symlink_metadata(memory).is_ok() {
            return Err(Error::new(
                ErrorKind::Exists,
                format!(
                    "{} exists; vmsnapfs never overwrites a file",
                    memory.display()
                ),
            ));
        }
        let file = crate::store::owned::create_new(&part, 0o600).map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                Error::new(
                    ErrorKind::Exists,
                    format!(
                        "{} exists; vmsnapfs never overwrites a file",
                        part.display()
                    ),
                )
            } else {
                Error::from(e).context(part.display().to_string())
            }
        })?;
        let id = crate::store::owned::id_of(&file)?;
        self.store
            .record_made(&[(part.clone(), id), (memory.to_owned(), id)])?;
        if let Err(e) = crate::failpoint::hit("checkpoint.part-made") {
            let _ = self.remove_made(&part);
            return Err(e);
        }
        if mapped {
            if let Err(e) = set_migrate_capabilities(conn, PARALLEL_CAPS, true) {
                let _ = self.remove_made(&part);
                return Err(e);
            }
        }
        outcome.machine = Self::machine_type(conn);
        let old_bandwidth = Self::set_max_bandwidth(conn, UNTHROTTLED);
        let result = match way {
            Way::Save { background, .. } => self
                .checkpoint_save(
                    conn,
                    actions,
                    plan,
                    (&part, &file),
                    live,
                    (mapped, background),
                    outcome,
                )
                .map(|()| None),
            Way::Live(kind, downtime_ms) => {
                let overlays: Vec<&Path> = plan.overlays.iter().map(|(_, o)| o.as_path()).collect();
                let r = self.precopy_save(
                    conn,
                    (kind, downtime_ms),
                    (&part, &file),
                    &overlays,
                    &mut |conn| self.switch_disks(conn, actions, plan),
                    &mut |conn| self.undo_live_overlays(conn, plan),
                );
                r.map(|p| match p {
                    super::precopy::Precopy::Done(pause) => {
                        outcome.paused_for = pause.paused_for;
                        outcome.pause_steps = Some(pause.steps);
                        None
                    }
                    super::precopy::Precopy::GaveUp(why) => Some(why),
                })
            }
        };
        drop(file);
        if mapped {
            // The memory file's fd set goes once the save ended.
            let _ = super::fdset::release_unused(&mut conn.qmp);
            let _ = set_migrate_capabilities(conn, PARALLEL_CAPS, false);
        }
        if let Some(b) = old_bandwidth {
            Self::set_max_bandwidth(conn, b);
        }
        if let Some(why) = result? {
            // Nothing was written that stays: the part is gone already.
            return Ok(Some(why));
        }
        seal_memory(&part, memory, id)?;
        // The name `.part` is gone; its record goes too.
        self.remove_made(&part)?;
        Ok(None)
    }

    /// The save of [`Self::checkpoint`] into `part` (`mapped`: RAM at
    /// fixed offsets, for a paused guest; `try_background`: a running
    /// guest's stream written with background-snapshot if QEMU allows it).
    #[allow(clippy::too_many_arguments)]
    fn checkpoint_save(
        &self,
        conn: &mut Conn,
        actions: &[SnapshotAction],
        plan: &ExternalPlan,
        (part, held): (&Path, &fs::File),
        live: DomainState,
        (mapped, try_background): (bool, bool),
        outcome: &mut ExternalOutcome,
    ) -> Result<()> {
        let running = live == DomainState::Running;
        // A mapped-ram file is the plain RAM of a paused guest; a running
        // guest's RAM is written in the background as a stream.
        let mut background = running && !mapped && try_background;
        if background {
            if let Err(e) = Self::set_background_snapshot(conn, true) {
                background = false;
                add_note(
                    outcome,
                    format!(
                        "background-snapshot refused ({}); RAM saved with the guest paused",
                        e.message
                    ),
                );
            }
        }
        // QEMU writes the file vmsnapfs created and holds open, handed
        // over as a descriptor before the guest pauses (through a manager
        // a descriptor may cost a process of its own): whatever the image
        // directory's owner renames or swaps in at `part` meanwhile is
        // never written.
        let uri = match Self::hand_over_memory(conn, part, held, mapped) {
            Ok(uri) => uri,
            Err(e) => {
                if background {
                    let _ = Self::set_background_snapshot(conn, false);
                }
                let _ = self.remove_made(part);
                return Err(e);
            }
        };
        let forget_fd = |conn: &mut Conn| {
            // A mapped-ram fd set goes after the save (the caller).
            if !mapped {
                let _ = super::fdset::close_named(&mut conn.qmp, MEMORY_FD);
            }
        };
        conn.qmp.take_events();
        let stopped_at = SystemTime::now();
        let t0 = Instant::now();
        let fail = |conn: &mut Conn, background: bool, e: Error| {
            if background {
                let _ = Self::set_background_snapshot(conn, false);
            }
            if running {
                let _ = conn.qmp.cont();
            }
            forget_fd(conn);
            let _ = self.remove_made(part);
            e
        };
        if running {
            if let Err(e) = conn.qmp.stop() {
                return Err(fail(conn, background, qmp_err(e)));
            }
        }
        if let Err(e) = self.switch_disks(conn, actions, plan) {
            return Err(fail(conn, background, e));
        }
        let overlays: Vec<&Path> = plan.overlays.iter().map(|(_, o)| o.as_path()).collect();
        if let Err(e) = self.check_opened_made(conn, &overlays) {
            // The guest stays paused (see `switch_disks_checked`).
            if background {
                let _ = Self::set_background_snapshot(conn, false);
            }
            forget_fd(conn);
            let _ = self.remove_made(part);
            return Err(left_paused(e));
        }
        let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1000.0;
        let switched = Instant::now();
        log::debug!(
            "{}: checkpoint: guest stopped and disks switched in {:?}",
            self.def.name,
            t0.elapsed()
        );
        let mut started = conn.qmp.migrate(&uri).map_err(qmp_err);
        if let (Err(e), true) = (&started, background) {
            let _ = Self::set_background_snapshot(conn, false);
            background = false;
            add_note(
                outcome,
                format!(
                    "background-snapshot refused ({}); RAM saved with the guest paused",
                    e.message
                ),
            );
            started = conn.qmp.migrate(&uri).map_err(qmp_err);
        }
        let migrating = Instant::now();
        log::debug!(
            "{}: checkpoint: migrate started after {:?}",
            self.def.name,
            t0.elapsed()
        );
        let saved = started.and_then(|_| {
            if background {
                Self::wait_background_snapshot(conn)
            } else {
                Self::wait_migration(conn)
            }
        });
        if let Err(e) = saved {
            // The disks switched: merge the overlays back, nothing stays.
            let undone = self.undo_live_overlays(conn, plan);
            let e = match undone {
                Ok(()) => e,
                Err(u) => e.context(format!("and merging the overlays back failed: {u}")),
            };
            return Err(fail(conn, background, e));
        }
        if background {
            let _ = Self::set_background_snapshot(conn, false);
            outcome.paused_for = pause_from_events(&conn.qmp.take_events(), stopped_at);
        } else if running {
            let saved = Instant::now();
            conn.qmp.cont().map_err(qmp_err)?;
            outcome.paused_for = Some(t0.elapsed());
            outcome.pause_steps = Some(format!(
                "RAM saved with the guest paused: disks switched at {:.1} ms, RAM save started \
                 at {:.1} ms, saved at {:.1} ms, guest continued at {:.1} ms",
                ms(switched),
                ms(migrating),
                ms(saved),
                ms(Instant::now())
            ));
        }
        Ok(())
    }

    /// Hands QEMU the memory file being written: a stream as a named
    /// descriptor (`fd:`), a mapped-ram file as a write-only fd set
    /// (`file:/dev/fdset/N`: multifd channels each open it). Returns the
    /// migration URI.
    fn hand_over_memory(
        conn: &mut Conn,
        part: &Path,
        held: &fs::File,
        mapped: bool,
    ) -> Result<String> {
        if !mapped {
            super::fdset::add_named(&mut conn.qmp, held, MEMORY_FD).map_err(qmp_err)?;
            return Ok(format!("fd:{MEMORY_FD}"));
        }
        // QEMU opens an fd set's file write-only for an outgoing file
        // migration: hand over a write-only descriptor of the same file.
        let write_only = fs::OpenOptions::new()
            .write(true)
            .open(held_file_path(held))?;
        let set = super::fdset::add(&mut conn.qmp, &write_only, part).map_err(qmp_err)?;
        Ok(format!("file:/dev/fdset/{set}"))
    }

    /// Polls `query-migrate` until the save completed or failed.
    pub(super) fn wait_migration(conn: &mut Conn) -> Result<()> {
        Self::poll_migration(conn, |_, _| Ok(()))
    }

    /// Waits for a background snapshot of a guest that we stopped, and
    /// resumes the guest as soon as QEMU writes RAM pages (the device
    /// state is saved and RAM writes are tracked by then) if QEMU did not
    /// resume it by itself: some QEMUs restart the guest after saving the
    /// device state, others keep the run state it had before `migrate`.
    fn wait_background_snapshot(conn: &mut Conn) -> Result<()> {
        let mut checked = false;
        Self::poll_migration(conn, |conn, m| {
            // No `ram` yet: nothing written so far.
            let pages = m.ram.as_ref().map_or(0, |r| r.normal + r.duplicate);
            let saving =
                matches!(m.status, Some(qapi::qmp::MigrationStatus::completed)) || pages > 0;
            if checked || !saving {
                return Ok(());
            }
            checked = true;
            let state = conn
                .qmp
                .run_state(super::qemu::STATUS_TIMEOUT)
                .map_err(qmp_err)?;
            if matches!(state, qapi::qmp::RunState::paused) {
                conn.qmp.cont().map_err(qmp_err)?;
            }
            Ok(())
        })
    }

    /// Polls `query-migrate` until the migration completed or failed,
    /// calling `each` with every answer.
    fn poll_migration(
        conn: &mut Conn,
        mut each: impl FnMut(&mut Conn, &MigrationInfo) -> Result<()>,
    ) -> Result<()> {
        use qapi::qmp::MigrationStatus;
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let m = conn.qmp.migration().map_err(qmp_err)?;
            each(conn, &m)?;
            match m.status {
                Some(MigrationStatus::completed) => return Ok(()),
                Some(MigrationStatus::failed | MigrationStatus::cancelled) => {
                    let why = m.error_desc.as_deref().unwrap_or("no reason given");
                    return Err(Error::io(format!("saving RAM failed: {why}")));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                let _ = conn.qmp.migrate_cancel();
                return Err(Error::io("saving RAM took too long; cancelled"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Merges each of `plan`'s overlays that QEMU runs on back into its
    /// backing image (active block-commit) and removes the overlay files.
    fn undo_live_overlays(&self, conn: &mut Conn, plan: &ExternalPlan) -> Result<()> {
        let disks = self.live_disks(&mut conn.qmp)?;
        let mut restored = Vec::new();
        for (target, overlay) in &plan.overlays {
            let Some(d) = disks.get(target) else { continue };
            let on_top = d
                .chain
                .first()
                .is_some_and(|i| canonical(&i.path) == canonical(overlay));
            if on_top {
                let base = d.chain.get(1).ok_or_else(|| {
                    Error::io(format!("{} has no backing image", overlay.display()))
                })?;
                match &self.manager {
                    // Through the manager, so that its live definition follows.
                    Some(m) => m.commit(target, None, &base.path)?,
                    None => {
                        let job = format!("vmsnapfs-undo-{}", std::process::id());
                        conn.qmp
                            .block_commit(&job, &d.node, None, None)
                            .map_err(qmp_err)?;
                        if let Some(e) = conn
                            .qmp
                            .wait_job_completing(&job, JOB_TIMEOUT, |_, _| {})
                            .map_err(qmp_err)?
                        {
                            return Err(Error::io(format!("block-commit of {target}: {e}")));
                        }
                    }
                }
                restored.push((
                    target.clone(),
                    Layer {
                        path: base.path.clone(),
                        format: base.format.clone(),
                    },
                ));
            }
            self.remove_made(overlay)?;
        }
        conn.nodes = None;
        let _ = super::fdset::release_unused(&mut conn.qmp);
        self.set_layers(&restored)
    }

    /// See [`super::Backend::undo_external`].
    pub(super) fn undo_external_impl(&self, plan: &ExternalPlan) -> Result<()> {
        if self.is_up()? {
            self.with_qmp(|conn| self.undo_live_overlays(conn, plan))?;
        } else {
            let layers = self.layers.lock().clone();
            for (target, overlay) in &plan.overlays {
                let active = layers
                    .get(target)
                    .is_some_and(|l| canonical(&l.path) == canonical(overlay));
                if active {
                    let chain = qemu_img::chain(overlay, "qcow2")?;
                    let base = chain.get(1).ok_or_else(|| {
                        Error::io(format!("{} has no backing image", overlay.display()))
                    })?;
                    qemu_img::commit(overlay, false)?;
                    self.set_layers(&[(
                        target.clone(),
                        Layer {
                            path: base.path.clone(),
                            format: base.format.clone(),
                        },
                    )])?;
                }
                self.remove_made(overlay)?;
            }
        }
        if let Some(m) = &plan.memory {
            self.remove_made(&memory_part_path(m))?;
            self.remove_made(m)?;
        }
        Ok(())
    }

    /// See [`super::Backend::settle_external`].
    pub(super) fn settle_external_impl(&self, plan: &ExternalPlan) -> Result<bool> {
        // Connecting makes the record follow what a running QEMU has open.
        let up = self.is_up()?;
        if up {
            // A live copy QEMU may still run, or wait in with the guest
            // stopped, ends first.
            self.with_qmp(|conn| self.settle_leftover_precopy(conn))?;
        }
        let layers = self.layers.lock().clone();
        let is_active = |t: &str, o: &Path| {
            layers
                .get(t)
                .is_some_and(|l| canonical(&l.path) == canonical(o))
        };
        let mut in_use = plan.overlays.iter().any(|(t, o)| is_active(t, o));
        if !up && !in_use {
            // A QEMU that died after switching leaves written overlays.
            let mut used = Vec::new();
            for (t, o) in &plan.overlays {
                if o.exists() && qemu_img::has_own_data(o, "qcow2")? {
                    used.push((
                        t.clone(),
                        Layer {
                            path: o.clone(),
                            format: "qcow2".into(),
                        },
                    ));
                }
            }
            if !used.is_empty() {
                self.set_layers(&used)?;
                in_use = true;
            }
        }
        if let Some(m) = &plan.memory {
            self.remove_made(&memory_part_path(m))?;
        }
        if !in_use {
            for (_, o) in &plan.overlays {
                self.remove_made(o)?;
            }
            if let Some(m) = &plan.memory {
                self.remove_made(m)?;
            }
        }
        Ok(in_use)
    }
}

/// Adds `line` to what the user should know about this snapshot.
fn add_note(outcome: &mut ExternalOutcome, line: String) {
    outcome.note = Some(match outcome.note.take() {
        Some(n) => format!("{n}; {line}"),
        None => line,
    });
}

/// How [`QemuBackend::checkpoint_into`] writes RAM.
enum Way {
    /// A live copy (see [`super::precopy`]) aiming at a last pass of
    /// so many ms (`downtime-limit`).
    Live(super::precopy::LiveFile, u64),
    /// A save from the instant the guest stopped (`background`: try
    /// background-snapshot for a running guest's stream).
    Save {
        format: MemoryFormat,
        background: bool,
    },
}

/// The capabilities of a memory file with RAM at fixed offsets.
const PARALLEL_CAPS: &[MigrationCapability] = &[
    MigrationCapability::mapped_ram,
    MigrationCapability::multifd,
];
/// `max-bandwidth` while vmsnapfs saves RAM: no throttle (1 TiB/s).
const UNTHROTTLED: u64 = 1 << 40;

fn set_migrate_capabilities(conn: &mut Conn, caps: &[MigrationCapability], on: bool) -> Result<()> {
    conn.qmp.set_migrate_capabilities(caps, on).map_err(qmp_err)
}

/// ENOTSUP (with the reason) when a QEMU with `caps` cannot read or
/// write a memory file of `format`.
pub(super) fn check_can_load(caps: &Capabilities, format: MemoryFormat) -> Result<()> {
    if format == MemoryFormat::MappedRam && !caps.has_parallel_memory_files() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the memory file holds RAM at fixed offsets (mapped-ram + multifd), \
                 which QEMU {} does not support",
                caps.version_text()
            ),
        ));
    }
    Ok(())
}

/// The name under which a memory file's descriptor is handed to QEMU.
pub(super) const MEMORY_FD: &str = "vmsnapfs-memory";

/// The path through which this process opens again exactly the file it
/// holds open as `file` (`/proc/self/fd/<n>`), never a name in a
/// directory someone else may change.
pub(super) fn held_file_path(file: &fs::File) -> String {
    use std::os::fd::AsRawFd;
    format!("/proc/self/fd/{}", file.as_raw_fd())
}

/// Loads RAM from a memory file into a QEMU started with `-incoming
/// defer`, from `held`, the file vmsnapfs opened (see
/// [`QemuBackend::open_memory`]), handed over as a descriptor: a
/// mapped-ram file as a read-only fd set, loaded in parallel (`file:`
/// with mapped-ram and multifd), a stream as a named descriptor (`fd:`).
/// QEMU needs no right to open the root-only file by name, whatever uid
/// it runs as.
pub(super) fn load_memory(conn: &mut Conn, incoming: &Incoming<'_>, held: &fs::File) -> Result<()> {
    check_can_load(&conn.caps, incoming.format)?;
    let uri = match incoming.format {
        MemoryFormat::MappedRam => {
            set_migrate_capabilities(conn, PARALLEL_CAPS, true)?;
            let set = super::fdset::add(&mut conn.qmp, held, incoming.file).map_err(qmp_err)?;
            // A file mostly on disk only (a live copy is written past the
            // page cache; any file after a reboot) reads faster with
            // O_DIRECT; one in the page cache reads faster from there.
            let resident = super::memory_file::resident_share(held);
            log::debug!(
                "memory file {:?} in the page cache: {resident:?}",
                incoming.file
            );
            if conn.caps.has_migrate_parameter("direct-io") && resident.is_some_and(|r| r < 0.5) {
                let direct = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(held_file_path(held));
                if let Ok(direct) = direct {
                    super::fdset::add_to(&mut conn.qmp, set, &direct, incoming.file)
                        .map_err(qmp_err)?;
                    conn.qmp.set_direct_io(true).map_err(qmp_err)?;
                }
            }
            format!("file:/dev/fdset/{set}")
        }
        MemoryFormat::Stream => {
            super::fdset::add_named(&mut conn.qmp, held, MEMORY_FD).map_err(qmp_err)?;
            format!("fd:{MEMORY_FD}")
        }
    };
    conn.qmp.migrate_incoming(&uri).map_err(qmp_err)?;
    let loaded = QemuBackend::wait_migration(conn);
    let _ = super::fdset::release_unused(&mut conn.qmp);
    if incoming.format == MemoryFormat::MappedRam {
        // The settings of the load are not those of a later save.
        if conn.caps.has_migrate_parameter("direct-io") {
            let _ = conn.qmp.set_direct_io(false);
        }
        let _ = set_migrate_capabilities(conn, PARALLEL_CAPS, false);
    }
    loaded
}

impl QemuBackend {
    /// Opens a memory file to load, without following a symlink: the
    /// file vmsnapfs recorded making at that path, or, for files made
    /// before such records, a regular root-only file with one link (what
    /// vmsnapfs writes): never a file someone linked or swapped in.
    pub(super) fn open_memory(&self, memory: &Path) -> Result<fs::File> {
        if self.store.made_id(memory).is_some() {
            return self.open_made(memory, false);
        }
        let f = crate::store::owned::open_existing(memory, false)
            .map_err(|e| Error::from(e).context(memory.display().to_string()))?;
        let m = f.metadata()?;
        if !m.is_file() || m.uid() != 0 || m.nlink() != 1 {
            return Err(Error::io(format!(
                "{} is not a memory file vmsnapfs wrote (a regular root-owned file with one link); it is not loaded",
                memory.display()
            )));
        }
        Ok(f)
    }
}

impl QemuBackend {
    /// See [`super::Backend::revert_external`].
    pub(super) fn revert_external_impl(&self, r: &ExternalRevert) -> Result<()> {
        let mut made: Vec<&Path> = Vec::new();
        let cleanup = |made: &[&Path]| {
            for m in made {
                let _ = self.remove_made(m);
            }
        };
        for (_, point, overlay) in &r.branches {
            if self.store.made_id(overlay).is_some() {
                // Made ahead by `prepare_overlays`.
                made.push(overlay);
                continue;
            }
            let format = self.format_of(point);
            if let Err(e) = self.make_overlay(overlay, point, &format) {
                cleanup(&made);
                return Err(e);
            }
            made.push(overlay);
        }
        if let Err(e) = crate::failpoint::hit("revert.overlays-made") {
            cleanup(&made);
            return Err(e);
        }
        let layers: Vec<(String, Layer)> = r
            .branches
            .iter()
            .map(|(t, _, o)| {
                (
                    t.clone(),
                    Layer {
                        path: o.clone(),
                        format: "qcow2".into(),
                    },
                )
            })
            .collect();
        let up = r.live != DomainState::Shutoff;
        // A managed domain's devices never switch images behind its
        // manager, which could not follow: QEMU is restarted through it.
        let in_place =
            up && r.target != DomainState::Shutoff && r.memory.is_none() && self.manager.is_none();
        if in_place {
            if let Err(e) = self.switch_devices(r) {
                cleanup(&made);
                return Err(e);
            }
            return self.set_layers(&layers);
        }
        // From the stop to the start through the manager, state polls
        // keep out of the way (see `restarting`).
        let _restarting = (up && self.manager.is_some()).then(|| self.restarting());
        if up {
            if let Err(e) = super::Backend::stop_process(self) {
                cleanup(&made);
                return Err(e);
            }
        }
        if let Err(e) = self.set_layers(&layers) {
            cleanup(&made);
            return Err(e);
        }
        if r.target == DomainState::Shutoff {
            return Ok(());
        }
        let incoming = r.memory.as_deref().map(|file| Incoming {
            file,
            format: r.memory_format,
            machine: r.machine.as_deref(),
        });
        self.start_with(None, incoming.as_ref(), r.target == DomainState::Paused)
            .map_err(|e| {
                e.context("the disks were switched to the snapshot; the domain is left stopped")
            })
    }

    /// The running QEMU's devices switch to new overlays over the
    /// snapshot's images: stop, blockdev-add, qom-set drive, reset, cont.
    fn switch_devices(&self, r: &ExternalRevert) -> Result<()> {
        self.with_qmp(|conn| {
            let disks = self.live_disks(&mut conn.qmp)?;
            let was_running = r.live == DomainState::Running;
            if was_running {
                conn.qmp.stop().map_err(qmp_err)?;
            }
            let mut added = Vec::new();
            let mut result = Ok(());
            for (target, _, overlay) in &r.branches {
                let node = overlay_node(overlay);
                let Some(file) = overlay.to_str() else {
                    result = Err(Error::invalid(format!(
                        "{} is not UTF-8, which QMP cannot carry",
                        overlay.display()
                    )));
                    break;
                };
                if let Err(e) = conn.qmp.add_qcow2(&node, file) {
                    result = Err(qmp_err(e));
                    break;
                }
                added.push((target.clone(), node));
            }
            if result.is_ok() {
                let overlays: Vec<&Path> = r.branches.iter().map(|(_, _, o)| o.as_path()).collect();
                result = self.check_opened_made(conn, &overlays);
            }
            if result.is_ok() {
                for (target, node) in &added {
                    let device = disks.get(target).and_then(|d| d.device.clone());
                    let Some(device) = device else {
                        result = Err(Error::io(format!(
                            "disk {target} is not attached to a device QEMU can switch"
                        )));
                        break;
                    };
                    if let Err(e) = conn.qmp.set_drive(&device, node) {
                        result = Err(qmp_err(e));
                        break;
                    }
                }
            }
            conn.nodes = None;
            if let Err(e) = result {
                for (_, node) in &added {
                    let _ = conn.qmp.blockdev_del(node);
                }
                let _ = super::fdset::release_unused(&mut conn.qmp);
                if was_running {
                    let _ = conn.qmp.cont();
                }
                return Err(e);
            }
            // Old active layers this daemon added (blockdev-add) stay open
            // until deleted; nodes QEMU made itself close on their own.
            for (target, _, _) in &r.branches {
                if let Some(old) = disks.get(target) {
                    let _ = conn.qmp.blockdev_del(&old.node);
                }
            }
            let _ = super::fdset::release_unused(&mut conn.qmp);
            // The guest's RAM does not match the reverted disks: it boots
            // from them, as after a power cycle.
            conn.qmp.system_reset().map_err(qmp_err)?;
            if r.target == DomainState::Running {
                conn.qmp.cont().map_err(qmp_err)?;
            }
            Ok(())
        })
    }
}

/// Refuses a plan whose files exist already, symlinks included (they are
/// never overwritten, followed or removed).
pub fn check_plan_paths(plan: &ExternalPlan) -> Result<()> {
    let part = plan.memory.as_deref().map(memory_part_path);
    let taken = plan
        .overlays
        .iter()
        .map(|(_, o)| o)
        // A block device accepted as a layer is there already.
        .filter(|o| !super::block_dev::is_device_path(o))
        .chain(plan.memory.iter())
        .chain(part.iter())
        .find(|p| fs::symlink_metadata(p).is_ok());
    match taken {
        Some(p) => Err(Error::new(
            ErrorKind::Exists,
            format!("{} exists; vmsnapfs never overwrites a file", p.display()),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_path_sits_beside() {
        assert_eq!(
            memory_part_path(Path::new("/i/vm.s1.memory")),
            PathBuf::from("/i/vm.s1.memory.part")
        );
    }

    #[test]
    fn node_names_fit_qemu() {
        let n = overlay_node(Path::new("/some/very/long/path/to/an/overlay.qcow2"));
        assert!(n.len() <= 31 && n.starts_with("vso-"));
    }
}
