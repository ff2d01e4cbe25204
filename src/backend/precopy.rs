//! A running guest's checkpoint as a live copy of its RAM: a precopy
//! migration into the memory file while the guest runs, in one of two
//! forms ([`LiveFile`]):
//!
//! - RAM at fixed offsets (QEMU with
//!   [`super::capabilities::Capabilities::has_live_parallel_checkpoints`]):
//!   `mapped-ram` + `multifd`, written with `direct-io` (on disk as it is
//!   written);
//! - a migration stream through a passed descriptor (QEMU with
//!   [`super::capabilities::Capabilities::has_live_stream_checkpoints`]),
//!   used where background-snapshot is refused (it needs userfaultfd,
//!   which a kernel may deny to an unprivileged QEMU, such as libvirt's):
//!   the format every QEMU and libvirt's restore load.
//!
//! QEMU copies RAM until what is left fits in `downtime-limit`, then stops
//! the guest and waits in `pre-switchover` (`pause-before-switchover`):
//! the disks switch there, `migrate-continue` writes the last dirty pages
//! and the device state, and the guest resumes (`cont`). RAM and disks
//! are of the same instant; the guest pause is the last pass plus the
//! switch.
//!
//! A guest that dirties RAM faster than the file is written never gets
//! there: after [`MAX_PASSES`] passes, or as long again as the first pass
//! took, or once a stream (where a page sent again is appended) grew past
//! [`STREAM_GROWTH`] times guest RAM, or the filesystem has less than
//! [`FREE_RESERVE`] left, the migration is cancelled before anything
//! changed (the guest runs on, the partial file is removed) and the
//! caller takes another way.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use qapi::qmp::{MigrationCapability, MigrationStatus};

use super::qemu::{qmp_err, Conn, QemuBackend, JOB_TIMEOUT};
use crate::error::{Error, Result};

/// The guest pause QEMU aims at for the last pass (`downtime-limit`, ms)
/// where no background snapshot can take over from a copy that does not
/// converge (see [`super::ram_way::CHOSEN_DOWNTIME_MS`] for where one can).
pub const DOWNTIME_MS: u64 = 20;
/// The most passes over dirty RAM before giving up.
pub const MAX_PASSES: i64 = 8;
/// How many times guest RAM a stream may grow to before giving up.
pub const STREAM_GROWTH: u64 = 2;
/// The free space a live copy leaves on the memory file's filesystem
/// (the overlays the guest writes to are usually there too), in bytes.
pub const FREE_RESERVE: u64 = 256 << 20;
/// The least time allowed after the first pass before giving up.
const MIN_SETTLE: Duration = Duration::from_secs(1);
/// How often the migration's progress is read.
const POLL: Duration = Duration::from_millis(1);
/// How long QEMU's `RESUME` event is awaited after `cont` (through a
/// manager, events come on another channel than the answers).
const RESUME_EVENT_WAIT: Duration = Duration::from_secs(2);
/// QEMU's `downtime-limit` when it reports none.
const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Where QEMU sends MIGRATION events (capability `events`, which libvirt
/// turns on for its QEMU), how long one is awaited before QEMU's state is
/// read again. Through libvirt's passthrough a read is a round trip of
/// several ms that holds libvirt's job (a disk switch sent meanwhile
/// waits for it): the stop and the end of the copy are seen from their
/// events instead, and the state is read only for progress and errors.
const EVENT_WAIT: Duration = Duration::from_millis(100);

/// The memory file a live copy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LiveFile {
    /// RAM at fixed offsets (`mapped-ram` + `multifd`, `direct-io`).
    MappedRam,
    /// A migration stream through a named descriptor (`fd:`).
    Stream,
}

impl LiveFile {
    /// The migration capabilities this copy turns on (and off after).
    fn caps(self) -> &'static [MigrationCapability] {
        match self {
            LiveFile::MappedRam => &[
                MigrationCapability::mapped_ram,
                MigrationCapability::multifd,
                MigrationCapability::pause_before_switchover,
            ],
            LiveFile::Stream => &[MigrationCapability::pause_before_switchover],
        }
    }

    fn name(self) -> &'static str {
        match self {
            LiveFile::MappedRam => "mapped-ram",
            LiveFile::Stream => "stream",
        }
    }
}

/// How an attempt ended when it did not fail.
pub(super) enum Precopy {
    /// The memory file is complete; the disks switched with it.
    Done(LivePause),
    /// Given up before the guest stopped or any disk changed (why): the
    /// partial file is removed, the guest runs; take another way.
    GaveUp(String),
}

/// The guest pause of a live copy that completed.
pub(super) struct LivePause {
    /// From QEMU's `STOP` to its `RESUME` (both events' times), if both
    /// came.
    pub paused_for: Option<Duration>,
    /// What happened meanwhile, for `.log`.
    pub steps: String,
}

/// When a precopy that has not reached `pre-switchover` is given up:
/// `passes` is QEMU's `dirty-sync-count` (1 during the first pass),
/// `first_pass` how long the first pass took once it ended, `since` the
/// time since it ended.
pub fn gives_up(passes: i64, first_pass: Option<Duration>, since: Duration) -> Option<String> {
    if passes > MAX_PASSES {
        return Some(format!(
            "{} passes over dirty RAM without converging",
            passes - 1
        ));
    }
    let first = first_pass?;
    let allowed = first.max(MIN_SETTLE);
    (since > allowed).then(|| {
        format!(
            "the guest dirtied RAM faster than it was written: not converged {:.1} s after \
             the first pass ({:.1} s)",
            since.as_secs_f64(),
            first.as_secs_f64()
        )
    })
}

/// When a live copy is given up for the room it takes: `written` bytes
/// of the file so far (a stream grows with each page sent again; `ram`
/// is the guest's, 0 while QEMU has not said), `free` bytes left on its
/// filesystem.
pub fn space_gives_up(stream: bool, written: u64, ram: u64, free: u64) -> Option<String> {
    let mib = |b: u64| b >> 20;
    if stream && ram > 0 && written > STREAM_GROWTH.saturating_mul(ram) {
        return Some(format!(
            "the stream grew to {} MiB, more than {STREAM_GROWTH} times the guest's {} MiB \
             of RAM",
            mib(written),
            mib(ram)
        ));
    }
    (free < FREE_RESERVE).then(|| {
        format!(
            "{} MiB left on the memory file's filesystem, under the {} MiB a live copy \
             leaves free",
            mib(free),
            mib(FREE_RESERVE)
        )
    })
}

/// The length of `held` and the bytes its filesystem has left for
/// unprivileged writers (QEMU may be one).
fn room(held: &fs::File) -> Result<(u64, u64)> {
    let st = nix::sys::statvfs::fstatvfs(held).map_err(std::io::Error::from)?;
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    Ok((held.metadata()?.len(), free))
}

/// What [`QemuBackend::converge`] saw at `pre-switchover`.
struct Converged {
    /// Passes over RAM (QEMU's `dirty-sync-count`).
    passes: i64,
    /// When vmsnapfs saw QEMU waiting.
    seen: SystemTime,
}

impl QemuBackend {
    /// The save of a running guest's checkpoint as a live copy of
    /// `kind` into `part` (held open as `held`), QEMU aiming at a last
    /// pass of `downtime_ms`, with the disks switched
    /// by `switch` while QEMU waits in `pre-switchover`. On an error
    /// nothing is left (the overlays merged back and removed, `part`
    /// removed) and the guest runs, except when QEMU opened a file other
    /// than the overlay vmsnapfs made: then it stays paused.
    pub(super) fn precopy_save(
        &self,
        conn: &mut Conn,
        (kind, downtime_ms): (LiveFile, u64),
        (part, held): (&Path, &fs::File),
        overlays: &[&Path],
        switch: &mut dyn FnMut(&mut Conn) -> Result<()>,
        undo: &mut dyn FnMut(&mut Conn) -> Result<()>,
    ) -> Result<Precopy> {
        let old = conn.qmp.downtime_and_direct_io().map_err(qmp_err);
        let restore = |conn: &mut Conn| {
            let _ = conn.qmp.set_migrate_capabilities(kind.caps(), false);
            if let Ok((downtime, direct)) = &old {
                let downtime = downtime.unwrap_or(DEFAULT_DOWNTIME_MS);
                let _ = match kind {
                    LiveFile::MappedRam => conn
                        .qmp
                        .set_downtime_and_direct_io(downtime, direct.unwrap_or(false)),
                    LiveFile::Stream => conn.qmp.set_downtime(downtime),
                };
            }
            match kind {
                // The memory file's fd set goes once the save ended.
                LiveFile::MappedRam => {
                    let _ = super::fdset::release_unused(&mut conn.qmp);
                }
                // Still there only if no migration took it.
                LiveFile::Stream => {
                    let _ = super::fdset::close_named(&mut conn.qmp, super::external::MEMORY_FD);
                }
            }
        };
        let started = (|| {
            old.as_ref().map_err(Clone::clone)?;
            let (_, free) = room(held)?;
            if let Some(why) = space_gives_up(false, 0, 0, free) {
                return Err(Error::io(why));
            }
            conn.qmp
                .set_migrate_capabilities(kind.caps(), true)
                .map_err(qmp_err)?;
            let uri = match kind {
                LiveFile::MappedRam => {
                    conn.qmp
                        .set_downtime_and_direct_io(downtime_ms, true)
                        .map_err(qmp_err)?;
                    hand_over_direct(conn, part, held)?
                }
                LiveFile::Stream => {
                    conn.qmp.set_downtime(downtime_ms).map_err(qmp_err)?;
                    super::fdset::add_named(&mut conn.qmp, held, super::external::MEMORY_FD)
                        .map_err(qmp_err)?;
                    format!("fd:{}", super::external::MEMORY_FD)
                }
            };
            // Read before the events are cleared: its answer may carry some.
            let events = conn.qmp.migrate_capability_on("events").unwrap_or(false);
            conn.qmp.take_events();
            conn.qmp.migrate(&uri).map_err(qmp_err).map(|_| events)
        })();
        let events = match started {
            Ok(events) => events,
            Err(e) => {
                let _ = conn.qmp.migrate_cancel();
                restore(conn);
                let _ = self.remove_made(part);
                return Ok(Precopy::GaveUp(e.message));
            }
        };
        let started_at = SystemTime::now();
        let converged = match Self::converge(conn, kind, held, events) {
            Ok(c) => c,
            Err(why) => {
                // Cancelled before the switch: QEMU resumes a guest it stopped.
                cancel(conn);
                restore(conn);
                let _ = self.remove_made(part);
                return Ok(Precopy::GaveUp(why));
            }
        };
        // The guest is stopped; the disks switch at this instant.
        let switched =
            crate::failpoint::hit("checkpoint.pre-switchover").and_then(|_| switch(conn));
        if let Err(e) = switched {
            cancel(conn);
            restore(conn);
            let _ = self.remove_made(part);
            return Err(e);
        }
        let switched_at = SystemTime::now();
        let overlays_checked = self.check_opened_made(conn, overlays);
        let finished = conn
            .qmp
            .migrate_continue()
            .map_err(qmp_err)
            .and_then(|_| finish(conn, events));
        let saved_at = SystemTime::now();
        if let Err(e) = overlays_checked {
            // QEMU opened something else: the guest stays paused (see
            // `switch_disks_checked`), in `postmigrate` once QEMU ends.
            if finished.is_err() {
                let _ = conn.qmp.stop();
            }
            restore(conn);
            let _ = self.remove_made(part);
            return Err(super::external::left_paused(e));
        }
        if let Err(e) = finished {
            cancel(conn);
            let undone = undo(conn);
            let _ = conn.qmp.cont();
            restore(conn);
            let _ = self.remove_made(part);
            return Err(match undone {
                Ok(()) => e,
                Err(u) => e.context(format!("and merging the overlays back failed: {u}")),
            });
        }
        // QEMU leaves the guest in `postmigrate`: it runs again now.
        let resumed = conn.qmp.cont().map_err(qmp_err);
        let continued_at = SystemTime::now();
        // From QEMU's own STOP (when it stopped the guest for the last
        // pass) to its RESUME.
        let resume = match &resumed {
            Ok(()) => conn
                .qmp
                .wait_event(RESUME_EVENT_WAIT, |e| {
                    super::qmp_ops::resumed_at(e).is_some()
                })
                .ok(),
            Err(_) => None,
        };
        let events = conn.qmp.take_events();
        let stopped = events.iter().find_map(super::qmp_ops::stopped_at);
        let paused_for = match (
            stopped,
            resume.as_ref().and_then(super::qmp_ops::resumed_at),
        ) {
            (Some(s), Some(r)) => r.duration_since(s).ok(),
            _ => None,
        };
        let written = held.metadata().map(|m| m.len()).unwrap_or(0);
        let from = stopped.unwrap_or(converged.seen);
        let ms = |t: SystemTime| t.duration_since(from).unwrap_or_default().as_secs_f64() * 1000.0;
        let steps = format!(
            "RAM copied live into a {} file: {} pass{} over RAM (downtime-limit {} ms), a {:.1} \
             MiB file in {:.1} s; after QEMU stopped the guest: seen at {:.1} ms, disks switched \
             at {:.1} ms, RAM saved at {:.1} ms, guest continued at {:.1} ms",
            kind.name(),
            converged.passes,
            if converged.passes == 1 { "" } else { "es" },
            downtime_ms,
            written as f64 / (1u64 << 20) as f64,
            converged
                .seen
                .duration_since(started_at)
                .unwrap_or_default()
                .as_secs_f64(),
            ms(converged.seen),
            ms(switched_at),
            ms(saved_at),
            ms(continued_at),
        );
        log::debug!("{}: {steps}", self.def.name);
        restore(conn);
        resumed?;
        Ok(Precopy::Done(LivePause { paused_for, steps }))
    }

    /// Waits until QEMU stopped the guest in `pre-switchover`; `Err(why)`
    /// when it will not (see [`gives_up`], [`space_gives_up`]) or the
    /// migration ended. With `events` (QEMU sends MIGRATION events) the
    /// stop is seen from its event, and the state is read every
    /// [`EVENT_WAIT`]; without, it is read every [`POLL`].
    fn converge(
        conn: &mut Conn,
        kind: LiveFile,
        held: &fs::File,
        events: bool,
    ) -> std::result::Result<Converged, String> {
        let t0 = Instant::now();
        let deadline = t0 + JOB_TIMEOUT;
        let mut first_pass_end: Option<Instant> = None;
        let mut passes_seen = 0;
        loop {
            // Injected before QEMU's state is read, so that a copy quick
            // enough to be waiting already is given up all the same.
            if crate::failpoint::hit("checkpoint.converging").is_err() {
                return Err("not converged (injected)".into());
            }
            let m = conn.qmp.migration().map_err(|e| e.to_string())?;
            let passes = m.ram.as_ref().map_or(0, |r| r.dirty_sync_count);
            match m.status {
                Some(MigrationStatus::pre_switchover) => {
                    return Ok(Converged {
                        passes,
                        seen: SystemTime::now(),
                    })
                }
                Some(MigrationStatus::completed) => {
                    return Err("the migration ended without stopping for the switch".into())
                }
                Some(MigrationStatus::failed | MigrationStatus::cancelled) => {
                    let why = m.error_desc.as_deref().unwrap_or("no reason given");
                    return Err(format!("the live copy failed: {why}"));
                }
                _ => {}
            }
            if passes >= 2 && first_pass_end.is_none() {
                first_pass_end = Some(Instant::now());
            }
            let first = first_pass_end.map(|e| e - t0);
            let since = first_pass_end.map_or(Duration::ZERO, |e| e.elapsed());
            if let Some(why) = gives_up(passes, first, since) {
                return Err(why);
            }
            let ram = m.ram.as_ref().map_or(0, |r| r.total.max(0) as u64);
            let (written, free) = room(held).map_err(|e| e.message)?;
            if let Some(why) = space_gives_up(kind == LiveFile::Stream, written, ram, free) {
                return Err(why);
            }
            if Instant::now() > deadline {
                return Err("the live copy took too long".into());
            }
            if !events {
                std::thread::sleep(POLL);
                continue;
            }
            let ended = ["pre-switchover", "completed", "failed", "cancelled"];
            // Any other end is read (with its reason) by the next poll.
            if migration_event(conn, EVENT_WAIT, &ended, &mut passes_seen).as_deref()
                == Some("pre-switchover")
            {
                return Ok(Converged {
                    passes: passes.max(passes_seen),
                    seen: SystemTime::now(),
                });
            }
        }
    }

    /// After a daemon stopped during a live checkpoint: cancels the
    /// migration QEMU may still run (or wait in, with the guest stopped),
    /// turns its capabilities off and resumes the guest that the
    /// checkpoint found running. Nothing to do when no live checkpoint was
    /// under way (`pause-before-switchover` off).
    pub(super) fn settle_leftover_precopy(&self, conn: &mut Conn) -> Result<()> {
        if !conn.caps.has_live_stream_checkpoints()
            || !conn
                .qmp
                .migrate_capability_on("pause-before-switchover")
                .map_err(qmp_err)?
        {
            return Ok(());
        }
        cancel(conn);
        let kind = if conn.caps.has_live_parallel_checkpoints() {
            LiveFile::MappedRam
        } else {
            LiveFile::Stream
        };
        conn.qmp
            .set_migrate_capabilities(kind.caps(), false)
            .map_err(qmp_err)?;
        let _ = match kind {
            LiveFile::MappedRam => conn
                .qmp
                .set_downtime_and_direct_io(DEFAULT_DOWNTIME_MS, false),
            LiveFile::Stream => conn.qmp.set_downtime(DEFAULT_DOWNTIME_MS),
        };
        let _ = super::fdset::release_unused(&mut conn.qmp);
        let _ = super::fdset::close_named(&mut conn.qmp, super::external::MEMORY_FD);
        let state = conn
            .qmp
            .run_state(super::qemu::STATUS_TIMEOUT)
            .map_err(qmp_err)?;
        if matches!(
            state,
            qapi::qmp::RunState::postmigrate | qapi::qmp::RunState::paused
        ) {
            conn.qmp.cont().map_err(qmp_err)?;
        }
        self.note(
            "a live checkpoint interrupted by a restart was cancelled; the guest runs".into(),
        );
        Ok(())
    }
}

/// Waits for a MIGRATION event whose status is one of `want` (events
/// already received count) for at most `wait`, and returns that status;
/// MIGRATION_PASS events seen meanwhile raise `passes`. Other events stay
/// queued.
fn migration_event(
    conn: &mut Conn,
    wait: Duration,
    want: &[&str],
    passes: &mut i64,
) -> Option<String> {
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let e = conn
            .qmp
            .wait_event(left, |e| match e["event"].as_str() {
                Some("MIGRATION_PASS") => true,
                Some("MIGRATION") => e["data"]["status"]
                    .as_str()
                    .is_some_and(|s| want.contains(&s)),
                _ => false,
            })
            .ok()?;
        match e["data"]["pass"].as_i64() {
            Some(p) => *passes = (*passes).max(p),
            None => return e["data"]["status"].as_str().map(str::to_owned),
        }
    }
}

/// Waits until the last pass and the device state are written: from
/// QEMU's MIGRATION event where it sends them (`events`), else by reading
/// the state often (the guest is stopped meanwhile).
fn finish(conn: &mut Conn, events: bool) -> Result<()> {
    let deadline = Instant::now() + JOB_TIMEOUT;
    let ended = ["completed", "failed", "cancelled"];
    let mut passes = 0;
    loop {
        // A failure's reason comes from the state read below.
        if events
            && migration_event(conn, EVENT_WAIT, &ended, &mut passes).as_deref()
                == Some("completed")
        {
            return Ok(());
        }
        let m = conn.qmp.migration().map_err(qmp_err)?;
        match m.status {
            Some(MigrationStatus::completed) => return Ok(()),
            Some(MigrationStatus::failed | MigrationStatus::cancelled) => {
                let why = m.error_desc.as_deref().unwrap_or("no reason given");
                return Err(Error::io(format!("saving RAM failed: {why}")));
            }
            _ if Instant::now() > deadline => {
                return Err(Error::io("saving RAM took too long"));
            }
            _ if events => {}
            _ => std::thread::sleep(POLL),
        }
    }
}

/// Cancels the migration in progress and waits until it ended (a
/// cancelled precopy restarts a guest that QEMU stopped for it).
fn cancel(conn: &mut Conn) {
    let _ = conn.qmp.migrate_cancel();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Ok(m) = conn.qmp.migration() else { return };
        if !matches!(
            m.status,
            Some(
                MigrationStatus::setup
                    | MigrationStatus::active
                    | MigrationStatus::cancelling
                    | MigrationStatus::pre_switchover
                    | MigrationStatus::device
            )
        ) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Hands QEMU the memory file as a write-only fd set holding two
/// descriptors of it, one with `O_DIRECT` (the multifd channels write
/// RAM pages through it) and one without (the main channel). Returns the
/// migration URI.
fn hand_over_direct(conn: &mut Conn, part: &Path, held: &fs::File) -> Result<String> {
    let path = super::external::held_file_path(held);
    let buffered = fs::OpenOptions::new().write(true).open(&path)?;
    let direct = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .map_err(|e| {
            Error::from(e).context(format!("{} refuses O_DIRECT writes", part.display()))
        })?;
    let set = super::fdset::add(&mut conn.qmp, &buffered, part).map_err(qmp_err)?;
    super::fdset::add_to(&mut conn.qmp, set, &direct, part).map_err(qmp_err)?;
    Ok(format!("file:/dev/fdset/{set}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_after_too_many_passes_or_too_long_after_the_first() {
        let s = Duration::from_secs;
        // The first pass runs as long as it needs.
        assert!(gives_up(1, None, Duration::ZERO).is_none());
        // After it: as long again (at least a second).
        assert!(gives_up(3, Some(s(2)), s(1)).is_none());
        assert!(gives_up(3, Some(s(2)), s(3)).is_some());
        assert!(gives_up(
            3,
            Some(Duration::from_millis(100)),
            Duration::from_millis(900)
        )
        .is_none());
        assert!(gives_up(
            3,
            Some(Duration::from_millis(100)),
            Duration::from_millis(1100)
        )
        .is_some());
        // Too many passes, however fast.
        assert!(gives_up(MAX_PASSES, Some(s(10)), Duration::ZERO).is_none());
        let why = gives_up(MAX_PASSES + 1, Some(s(10)), Duration::ZERO).unwrap();
        assert!(why.contains("passes"), "{why}");
    }

    #[test]
    fn gives_up_a_stream_past_its_bound_or_a_filesystem_nearly_full() {
        let (gib, plenty) = (1u64 << 30, 100u64 << 30);
        // A stream up to STREAM_GROWTH times RAM goes on.
        assert!(space_gives_up(true, 0, gib, plenty).is_none());
        assert!(space_gives_up(true, STREAM_GROWTH * gib, gib, plenty).is_none());
        let why = space_gives_up(true, STREAM_GROWTH * gib + 1, gib, plenty).unwrap();
        assert!(why.contains("stream grew"), "{why}");
        // A file at fixed offsets never grows past RAM: no such bound.
        assert!(space_gives_up(false, 5 * gib, gib, plenty).is_none());
        // Before QEMU says how much RAM there is: no bound yet.
        assert!(space_gives_up(true, 5 * gib, 0, plenty).is_none());
        // The filesystem keeps its reserve, whatever the file.
        assert!(space_gives_up(false, 0, gib, FREE_RESERVE).is_none());
        let why = space_gives_up(false, 0, gib, FREE_RESERVE - 1).unwrap();
        assert!(
            why.contains("left on the memory file's filesystem"),
            "{why}"
        );
        assert!(space_gives_up(true, 0, gib, 0).is_some());
    }
}
