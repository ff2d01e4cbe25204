//! A running guest's checkpoint as a live copy of its RAM (QEMU with
//! [`super::capabilities::Capabilities::has_live_parallel_checkpoints`]): a precopy migration
//! into the memory file with `mapped-ram` + `multifd`, written with
//! `direct-io` (on disk as it is written), while the guest runs. QEMU
//! copies RAM until what is left fits in `downtime-limit`, then stops the
//! guest and waits in `pre-switchover` (`pause-before-switchover`): the
//! disks switch there, `migrate-continue` writes the last dirty pages and
//! the device state, and the guest resumes (`cont`). RAM and disks are of
//! the same instant; the guest pause is the last pass plus the switch.
//!
//! A guest that dirties RAM faster than the file is written never gets
//! there: after [`MAX_PASSES`] passes, or as long again as the first pass
//! took, the migration is cancelled before anything changed (the guest
//! runs on, the partial file is removed) and the caller falls back to a
//! background snapshot.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use qapi::qmp::{MigrationCapability, MigrationStatus};

use super::qemu::{qmp_err, Conn, QemuBackend, JOB_TIMEOUT};
use crate::error::{Error, Result};

/// The guest pause QEMU aims at for the last pass (`downtime-limit`, ms).
pub const DOWNTIME_MS: u64 = 20;
/// The most passes over dirty RAM before giving up.
pub const MAX_PASSES: i64 = 8;
/// The least time allowed after the first pass before giving up.
const MIN_SETTLE: Duration = Duration::from_secs(1);
/// How often the migration's progress is read.
const POLL: Duration = Duration::from_millis(1);

/// The capabilities of a live parallel checkpoint.
const CAPS: &[MigrationCapability] = &[
    MigrationCapability::mapped_ram,
    MigrationCapability::multifd,
    MigrationCapability::pause_before_switchover,
];

/// How an attempt ended when it did not fail.
pub(super) enum Precopy {
    /// The memory file is complete; the disks switched with it.
    Done,
    /// Given up before the guest stopped or any disk changed (why): the
    /// partial file is removed, the guest runs; take another way.
    GaveUp(String),
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

impl QemuBackend {
    /// The save of a running guest's checkpoint as a live copy into
    /// `part` (held open as `held`), with the disks switched by `switch`
    /// while QEMU waits in `pre-switchover`. On an error nothing is left
    /// (the overlays merged back and removed, `part` removed) and the
    /// guest runs, except when QEMU opened a file other than the overlay
    /// vmsnapfs made: then it stays paused.
    pub(super) fn precopy_save(
        &self,
        conn: &mut Conn,
        (part, held): (&Path, &fs::File),
        overlays: &[&Path],
        switch: &mut dyn FnMut(&mut Conn) -> Result<()>,
        undo: &mut dyn FnMut(&mut Conn) -> Result<()>,
        paused_for: &mut Option<Duration>,
    ) -> Result<Precopy> {
        let old = conn.qmp.downtime_and_direct_io().map_err(qmp_err);
        let restore = |conn: &mut Conn| {
            let _ = conn.qmp.set_migrate_capabilities(CAPS, false);
            if let Ok((downtime, direct)) = &old {
                let _ = conn
                    .qmp
                    .set_downtime_and_direct_io(downtime.unwrap_or(300), direct.unwrap_or(false));
            }
            // The memory file's fd set goes once the save ended.
            let _ = super::fdset::release_unused(&mut conn.qmp);
        };
        let started = (|| {
            old.as_ref().map_err(Clone::clone)?;
            conn.qmp
                .set_migrate_capabilities(CAPS, true)
                .map_err(qmp_err)?;
            conn.qmp
                .set_downtime_and_direct_io(DOWNTIME_MS, true)
                .map_err(qmp_err)?;
            let uri = hand_over_direct(conn, part, held)?;
            conn.qmp.take_events();
            conn.qmp.migrate(&uri).map_err(qmp_err)
        })();
        if let Err(e) = started {
            let _ = conn.qmp.migrate_cancel();
            restore(conn);
            let _ = self.remove_made(part);
            return Ok(Precopy::GaveUp(e.message));
        }
        let started_at = SystemTime::now();
        if let Err(why) = Self::converge(conn) {
            // Cancelled before the switch: QEMU resumes a guest it stopped.
            cancel(conn);
            restore(conn);
            let _ = self.remove_made(part);
            return Ok(Precopy::GaveUp(why));
        }
        // The guest is stopped; the disks switch at this instant.
        let t = Instant::now();
        let switched =
            crate::failpoint::hit("checkpoint.pre-switchover").and_then(|_| switch(conn));
        if let Err(e) = switched {
            cancel(conn);
            restore(conn);
            let _ = self.remove_made(part);
            return Err(e);
        }
        let t_switch = t.elapsed();
        let overlays_checked = self.check_opened_made(conn, overlays);
        let t_check = t.elapsed();
        let finished = conn
            .qmp
            .migrate_continue()
            .map_err(qmp_err)
            .and_then(|_| finish(conn));
        log::debug!(
            "{}: live copy: disks switched in {t_switch:?}, checked at {t_check:?}, \
             the last pass ended at {:?}",
            self.def.name,
            t.elapsed()
        );
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
        // From QEMU's own STOP (when it stopped the guest for the last
        // pass) to the RESUME.
        let events = conn.qmp.take_events();
        let stopped = events
            .iter()
            .find_map(super::qmp_ops::stopped_at)
            .unwrap_or(started_at);
        *paused_for = super::external::pause_from_events(&events, stopped);
        restore(conn);
        resumed?;
        Ok(Precopy::Done)
    }

    /// Waits until QEMU stopped the guest in `pre-switchover`; `Err(why)`
    /// when it will not (see [`gives_up`]) or the migration ended.
    fn converge(conn: &mut Conn) -> std::result::Result<(), String> {
        let t0 = Instant::now();
        let deadline = t0 + JOB_TIMEOUT;
        let mut first_pass_end: Option<Instant> = None;
        loop {
            let m = conn.qmp.migration().map_err(|e| e.to_string())?;
            match m.status {
                Some(MigrationStatus::pre_switchover) => return Ok(()),
                Some(MigrationStatus::completed) => {
                    return Err("the migration ended without stopping for the switch".into())
                }
                Some(MigrationStatus::failed | MigrationStatus::cancelled) => {
                    let why = m.error_desc.as_deref().unwrap_or("no reason given");
                    return Err(format!("the live copy failed: {why}"));
                }
                _ => {}
            }
            let passes = m.ram.as_ref().map_or(0, |r| r.dirty_sync_count);
            if passes >= 2 && first_pass_end.is_none() {
                first_pass_end = Some(Instant::now());
            }
            let first = first_pass_end.map(|e| e - t0);
            let since = first_pass_end.map_or(Duration::ZERO, |e| e.elapsed());
            if let Some(why) = gives_up(passes, first, since) {
                return Err(why);
            }
            if crate::failpoint::hit("checkpoint.converging").is_err() {
                return Err("not converged (injected)".into());
            }
            if Instant::now() > deadline {
                return Err("the live copy took too long".into());
            }
            std::thread::sleep(POLL);
        }
    }

    /// After a daemon stopped during a live checkpoint: cancels the
    /// migration QEMU may still run (or wait in, with the guest stopped),
    /// turns its capabilities off and resumes the guest that the
    /// checkpoint found running. Nothing to do when no live checkpoint was
    /// under way (`pause-before-switchover` off).
    pub(super) fn settle_leftover_precopy(&self, conn: &mut Conn) -> Result<()> {
        if !conn.caps.has_live_parallel_checkpoints()
            || !conn
                .qmp
                .migrate_capability_on("pause-before-switchover")
                .map_err(qmp_err)?
        {
            return Ok(());
        }
        cancel(conn);
        conn.qmp
            .set_migrate_capabilities(CAPS, false)
            .map_err(qmp_err)?;
        let _ = conn.qmp.set_downtime_and_direct_io(300, false);
        let _ = super::fdset::release_unused(&mut conn.qmp);
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

/// Waits (polling often: the guest is stopped meanwhile) until the last
/// pass and the device state are written.
fn finish(conn: &mut Conn) -> Result<()> {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
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
}
