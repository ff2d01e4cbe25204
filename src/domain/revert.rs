//! Reverting a domain to a snapshot: parsing what was written to `revert`,
//! the safety rules (`force`, `EPERM`) and the steps for each case.

use std::path::PathBuf;
use std::time::Instant;

use super::revert_rule::{self, Refusal, RevertCase, RevertPlace, RevertPlan};
use super::Domain;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{DiskPoint, DomainState, MemoryLocation, Snapshot, SnapshotState};
use crate::store::{Intent, RevertRecord};

/// What a write to a `revert` file asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevertRequest {
    /// The state to leave the domain in; `None`: the snapshot's own.
    pub target: Option<DomainState>,
    /// The user accepts losing the live state.
    pub force: bool,
    /// Remove the state left behind instead of keeping it as a
    /// `left-*` snapshot.
    pub discard: bool,
}

impl RevertRequest {
    /// Parses `"[running|paused|shutoff] [force]"` (white space around is
    /// fine; an empty write means the defaults).
    pub fn parse(text: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(text)
            .map_err(|_| Error::invalid("revert request is not UTF-8 text"))?;
        let mut req = RevertRequest {
            target: None,
            force: false,
            discard: false,
        };
        for word in text.split_whitespace() {
            let state = match word {
                "running" => DomainState::Running,
                "paused" => DomainState::Paused,
                "shutoff" => DomainState::Shutoff,
                "force" if !req.force => {
                    req.force = true;
                    continue;
                }
                "discard" if !req.discard => {
                    req.discard = true;
                    continue;
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown word {word:?} in revert request; write \
                         'running', 'paused' or 'shutoff', optionally followed by 'force' \
                         and 'discard'"
                    )))
                }
            };
            if req.target.replace(state).is_some() {
                return Err(Error::invalid("revert request names two states"));
            }
        }
        Ok(req)
    }
}

/// EPERM: reverting the running domain to a snapshot without RAM.
fn no_saved_state(snap: &Snapshot, target: DomainState) -> Error {
    Error::new(
        ErrorKind::NotPermitted,
        format!(
            "snapshot {:?} has no saved state: reverting the running domain loses its live \
             state (QEMU is restarted, or the guest reset onto the snapshot's disks); write \
             '{} force' to do it anyway",
            snap.name,
            target.as_str()
        ),
    )
}

/// EOPNOTSUPP: the revert would start QEMU without a command line.
fn no_command_line() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "the revert must start QEMU but no command line is known: add <commandline> \
         to the domain definition, or revert to 'shutoff' and start the VM yourself",
    )
}

/// EPERM: a revert that would stop the running domain.
fn would_stop() -> Error {
    Error::new(
        ErrorKind::NotPermitted,
        "the domain is running and the revert would stop it, losing its live state; \
         write 'shutoff force' to do it anyway",
    )
}

/// The state a snapshot returns the domain to by default.
fn default_target(snap: &Snapshot) -> DomainState {
    match snap.state {
        SnapshotState::Running | SnapshotState::DiskSnapshot => DomainState::Running,
        SnapshotState::Paused => DomainState::Paused,
        SnapshotState::Shutoff => DomainState::Shutoff,
    }
}

/// How a revert's `.log` line ends: the snapshot that `kept` the state
/// the revert left behind, or that it was discarded (`removed`: how many
/// images of it were removed, where that is known).
pub(super) fn left_behind(kept: Option<&str>, removed: Option<usize>) -> String {
    match (kept, removed) {
        (Some(n), _) => format!("the state left behind is snapshot {n:?}"),
        (None, None) => "the state left behind was discarded".into(),
        (None, Some(0)) => "nothing was left behind".into(),
        (None, Some(n)) => format!("{n} image(s) of the state left behind removed"),
    }
}

/// A revert asked for: its name in `.log`, the snapshot, the domain's
/// state now and the one asked for, and the request.
#[derive(Clone, Copy)]
pub(super) struct RevertTo<'a> {
    pub what: &'a str,
    pub snap: &'a Snapshot,
    pub live: DomainState,
    pub target: DomainState,
    pub req: &'a RevertRequest,
}

impl Domain {
    /// `echo ... > NAME/revert`: reverts the domain to snapshot `name`.
    pub fn revert(&self, name: &str, request: &[u8]) -> Result<()> {
        let what = format!(
            "revert {name:?} {:?}",
            String::from_utf8_lossy(request).trim()
        );
        let r = (|| {
            let req = RevertRequest::parse(request)?;
            let _busy = self.begin(&what)?;
            let snap = self.lookup(name)?;
            let t0 = Instant::now();
            let live = self.live_state()?;
            let target = req.target.unwrap_or_else(|| default_target(&snap));
            let place = if super::branch::is_external(&snap) {
                RevertPlace::External
            } else if self.needs_relocation(&snap) {
                RevertPlace::Backing
            } else {
                RevertPlace::Active
            };
            let to = RevertTo {
                what: &what,
                snap: &snap,
                live,
                target,
                req: &req,
            };
            let case = self.revert_case(&to, place);
            // A revert that starts a new QEMU does not need the old one's images.
            if revert_rule::plan(&case).needs_active_images {
                self.check_images_active(live)?;
            }
            match place {
                RevertPlace::External => return self.revert_to_external(&to),
                RevertPlace::Backing => return self.revert_relocating(&to),
                RevertPlace::Active => {}
            }
            self.check_internal_only(&snap, "revert to")?;
            self.check_revert(&to)?;
            // The state this revert leaves behind is kept, unless discarded.
            let left = match req.discard {
                true => None,
                false => Some(self.keep_left_internal(&what, &snap, live)?),
            };
            let record = self.journal.begin(Intent::Revert {
                id: snap.id.clone(),
                target: target.as_str().into(),
            })?;
            let t1 = Instant::now();
            let mut touched = false;
            let done = crate::failpoint::hit("revert.begin")
                .and_then(|_| self.revert_steps(&snap, live, target, &mut touched))
                .and_then(|_| crate::failpoint::hit("revert.after-steps"));
            let backend_time = t1.elapsed();
            // On success the domain is in the target state; otherwise ask.
            let s = match done {
                Ok(()) => target,
                Err(_) => self.backend.refresh_state(),
            };
            self.note_state(s);
            if let Err(e) = done {
                if !touched {
                    // Nothing changed: the revert simply did not happen.
                    self.journal.complete(record)?;
                    return Err(e);
                }
                return Err(e.context(
                    "the revert stopped part-way; it is finished at the next start \
                     (disks reverted, domain left stopped)",
                ));
            }
            self.set_current(&snap.id)?;
            self.journal.complete(record)?;
            let behind = left_behind(left.as_deref(), None);
            self.log.line(&format!(
                "{what}: reverted, domain {} in {:.3} s (QEMU/qemu-img {:.3} s); {behind}",
                s.as_str(),
                t0.elapsed().as_secs_f64(),
                backend_time.as_secs_f64()
            ));
            Ok(())
        })();
        r.or_else(|e| self.refuse(&what, e))
    }

    /// The record of a new snapshot `left-*` keeping the state a revert to
    /// `to` leaves behind, in `state`, with `disks`.
    pub(super) fn left_snapshot(
        &self,
        to: &Snapshot,
        state: SnapshotState,
        disks: Vec<DiskPoint>,
    ) -> Snapshot {
        let (name, description) = self.left_names(to);
        let id = super::new_id();
        self.new_snapshot(
            &id,
            (&name, Some(description)),
            state,
            MemoryLocation::No,
            disks,
        )
    }

    /// A free name `left-*` and the description of the snapshot keeping
    /// the state a revert to `to` leaves behind.
    fn left_names(&self, to: &Snapshot) -> (String, String) {
        let name = super::branch::left_name(|n| self.forest.read().by_name(n).is_some());
        let description = format!("the state left behind by the revert to {:?}", to.name);
        (name, description)
    }

    /// The journal's record of revert `to`, leaving snapshot `left`
    /// behind (or removing the files in `discard`).
    pub(super) fn revert_record(
        &self,
        to: &RevertTo<'_>,
        left: Option<&Snapshot>,
        discard: &[PathBuf],
    ) -> RevertRecord {
        RevertRecord {
            id: to.snap.id.clone(),
            target: to.target.as_str().into(),
            left: left.map(|l| self.plan_xml(l)),
            discard: discard.to_vec(),
        }
    }

    /// What the rule looks at for revert `to` (see [`revert_rule`]).
    pub(super) fn revert_case(&self, to: &RevertTo<'_>, place: RevertPlace) -> RevertCase {
        let (snap, live, target, req) = (to.snap, to.live, to.target, to.req);
        RevertCase {
            live,
            target,
            memory: snap.has_memory(),
            place,
            force: req.force,
            discard: req.discard,
            can_start: self.backend.can_start(),
        }
    }

    /// Applies the revert rule ([`revert_rule::decide`]): the plan, or
    /// the refusal as an error for `.log`.
    pub(super) fn revert_rule(&self, snap: &Snapshot, case: &RevertCase) -> Result<RevertPlan> {
        revert_rule::decide(case).map_err(|r| match r {
            Refusal::WouldStop => would_stop(),
            Refusal::NoSavedState if case.place == RevertPlace::External => Error::new(
                ErrorKind::NotPermitted,
                format!(
                    "snapshot {:?} has no saved state: the guest is reset onto the \
                     snapshot's disks and its live state (RAM) is lost; write '{} force' \
                     to do it anyway (its disks are kept as a snapshot unless you add \
                     'discard')",
                    snap.name,
                    case.target.as_str()
                ),
            ),
            Refusal::NoSavedState => no_saved_state(snap, case.target),
            Refusal::NoCommandLine => no_command_line(),
        })
    }

    /// The safety rules of a revert in the active layers, checked before
    /// anything changes.
    fn check_revert(&self, to: &RevertTo<'_>) -> Result<()> {
        let snap = to.snap;
        let case = self.revert_case(to, RevertPlace::Active);
        self.revert_rule(snap, &case)?;
        // A snapshot on only some disks (made by another tool) cannot be
        // reverted to: refuse before anything changes.
        let (present, total) = self.backend.tag_presence(&snap.id)?;
        if present < total {
            return Err(Error::not_found(format!(
                "snapshot {:?} is on {present} of {total} disks; it cannot be reverted to",
                snap.name
            )));
        }
        Ok(())
    }

    /// Keeps the state a revert to internal snapshot `target` leaves
    /// behind as an internal snapshot `left-*` of the active layers (the
    /// images the revert changes): a checkpoint of a running or paused
    /// domain whose policy takes checkpoints, else its disks. Returns its
    /// name. The domain is busy.
    fn keep_left_internal(
        &self,
        what: &str,
        target: &Snapshot,
        live: DomainState,
    ) -> Result<String> {
        let (name, description) = self.left_names(target);
        let checkpoints = matches!(
            self.def.policy,
            crate::model::SnapshotPolicy::Internal | crate::model::SnapshotPolicy::External
        );
        let request = super::CreateRequest {
            name: &name,
            description: Some(description),
            kind: super::CreateKind::Internal {
                memory: live != DomainState::Shutoff && checkpoints,
            },
            // The guest is about to be reverted: never frozen for it.
            quiesce: Some(false),
            // What the revert keeps is left as it is.
            left_out: self
                .def
                .other_disks
                .iter()
                .map(|d| d.target.clone())
                .collect(),
        };
        self.create_busy(&format!("{what}: keeping the state left behind"), request)
            .map_err(|e| {
                e.context("the state the revert would leave behind could not be kept; nothing was reverted (write 'discard' to revert without keeping it)")
            })?;
        Ok(name)
    }

    /// Does the revert; the rules were checked. Also used by recovery.
    /// `touched` becomes true once a step that changes the VM or its disks
    /// has been started.
    pub(super) fn revert_steps(
        &self,
        snap: &Snapshot,
        live: DomainState,
        target: DomainState,
        touched: &mut bool,
    ) -> Result<()> {
        let up = live != DomainState::Shutoff;
        let paused = target == DomainState::Paused;
        if up && self.backend.refresh_state() == DomainState::Shutoff {
            return Err(Error::io("QEMU went away before the revert started"));
        }
        *touched = true;
        match (up, target) {
            (true, DomainState::Shutoff) => {
                self.backend.stop_process()?;
                self.backend.apply_disks_offline(&snap.id)
            }
            (true, _) if snap.has_memory() => {
                // snapshot-load keeps the run state the guest had before.
                self.backend.load_checkpoint_live(&snap.id)?;
                if live == target {
                    Ok(())
                } else {
                    self.backend.set_running(!paused)
                }
            }
            (true, _) => {
                self.backend.stop_process()?;
                self.backend.apply_disks_offline(&snap.id)?;
                self.backend.start_process(None, paused)
            }
            (false, DomainState::Shutoff) => self.backend.apply_disks_offline(&snap.id),
            (false, _) if snap.has_memory() => self.backend.start_process(Some(&snap.id), paused),
            (false, _) => {
                self.backend.apply_disks_offline(&snap.id)?;
                self.backend.start_process(None, paused)
            }
        }
    }

    /// Makes `id` the current snapshot, durably.
    pub(super) fn set_current(&self, id: &str) -> Result<()> {
        let mut forest = self.forest.write();
        forest.set_current(Some(id));
        self.store.save_current(forest.current())?;
        drop(forest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        let p = |s: &str| RevertRequest::parse(s.as_bytes());
        assert_eq!(
            p("").unwrap(),
            RevertRequest {
                target: None,
                force: false,
                discard: false
            }
        );
        assert_eq!(
            p("running\n").unwrap(),
            RevertRequest {
                target: Some(DomainState::Running),
                force: false,
                discard: false
            }
        );
        assert_eq!(
            p(" shutoff force ").unwrap(),
            RevertRequest {
                target: Some(DomainState::Shutoff),
                force: true,
                discard: false
            }
        );
        assert_eq!(
            p("force").unwrap(),
            RevertRequest {
                target: None,
                force: true,
                discard: false
            }
        );
        assert!(p("runing").is_err());
        assert!(p("running paused").is_err());
        assert!(p("force force").is_err());
        assert!(RevertRequest::parse(b"\xff").is_err());
    }
}
