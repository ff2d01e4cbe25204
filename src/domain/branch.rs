//! Reverting to an external snapshot: new overlays over the snapshot's
//! images (a branch), so every other snapshot stays valid. The state the
//! domain leaves is kept as a snapshot of its own (`left-<time>`) unless
//! the user writes `discard`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::external::default_overlay;
use super::oplog::now_secs;
use super::revert::{left_behind, RevertTo};
use super::revert_rule::{RevertCase, RevertPlace};
use super::Domain;
use crate::backend::qemu_img::canonical;
use crate::backend::{ExternalPlan, ExternalRevert};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{
    DiskPoint, DiskSnapshotKind, DomainState, MemoryLocation, Snapshot, SnapshotState,
};
use crate::store::Intent;

/// True when the snapshot's data is in point images and a memory file
/// rather than inside the qcow2 images.
pub fn is_external(snap: &Snapshot) -> bool {
    matches!(snap.memory, MemoryLocation::External(_))
        || snap
            .disks
            .iter()
            .any(|d| d.kind == DiskSnapshotKind::External)
}

/// A name for the snapshot that keeps the state a revert leaves.
pub(super) fn left_name(taken: impl Fn(&str) -> bool) -> String {
    let secs = now_secs();
    // utc_stamp: YYYY-MM-DDTHH:MM:SSZ -> YYYYMMDD-HHMMSS
    let stamp: String = super::oplog::utc_stamp(secs)
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .map(|c| if c == 'T' { '-' } else { c })
        .collect();
    let base = format!("left-{stamp}");
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken(n))
        .unwrap_or(base)
}

/// A free path for a branch overlay of `source` for snapshot `name`.
fn branch_overlay(source: &Path, name: &str) -> PathBuf {
    let secs = now_secs();
    (1..)
        .map(|n| default_overlay(source, &format!("{name}.revert-{secs}-{n}")))
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .expect("some free name")
}

impl Domain {
    /// Reverts to external snapshot `snap` (the request was parsed, the
    /// domain is busy, `live` was read).
    pub(super) fn revert_to_external(&self, to: &RevertTo<'_>) -> Result<()> {
        let (snap, live) = (to.snap, to.live);
        let t0 = Instant::now();
        let memory = match &snap.memory {
            MemoryLocation::External(p) => Some(p.clone()),
            _ => None,
        };
        self.check_external_revert(to, memory.as_deref())?;
        let was_running = live == DomainState::Running;
        let r = self.revert_external_steps(to, memory, t0);
        if r.is_err() && was_running && self.backend.refresh_state() == DomainState::Paused {
            // The revert did not happen: the guest goes on as it was.
            let _ = self.backend.set_running(true);
            self.note_state(DomainState::Running);
        }
        r
    }

    /// Plans, journals and does an external revert. The new overlays are
    /// made while the guest still runs; it is paused only for the switch.
    fn revert_external_steps(
        &self,
        to: &RevertTo<'_>,
        memory: Option<PathBuf>,
        t0: Instant,
    ) -> Result<()> {
        let (what, snap, live, target, req) = (to.what, to.snap, to.live, to.target, to.req);
        let defs = self.def.disks.clone();
        let active = self.backend.active_disks();
        let mut branches = Vec::new();
        let mut left_points = Vec::new();
        for def in &defs {
            let point = snap.disks.iter().find(|d| d.target == def.target);
            match point {
                Some(DiskPoint {
                    kind: DiskSnapshotKind::External,
                    image: Some(image),
                    ..
                }) => {
                    let overlay = branch_overlay(&self.beside(def)?, &snap.name);
                    let format = if image == &def.source {
                        def.format.clone()
                    } else {
                        "qcow2".into()
                    };
                    branches.push((def.target.clone(), image.clone(), overlay, format));
                    let now = active.iter().find(|a| a.target == def.target);
                    left_points.push(DiskPoint {
                        target: def.target.clone(),
                        kind: DiskSnapshotKind::External,
                        image: now.map(|a| a.source.clone()),
                        overlay: None,
                    });
                }
                _ => left_points.push(DiskPoint {
                    target: def.target.clone(),
                    kind: DiskSnapshotKind::No,
                    image: None,
                    overlay: None,
                }),
            }
        }
        // The overlays' names fit, before anything is made.
        super::paths::check_lengths(branches.iter().map(|(_, _, o, _)| o.as_path()))?;
        // The new layers record and the left-* snapshot's XML (unless
        // discarded) name the overlays and the previous active layers.
        let kept = left_points.iter().filter(|_| !req.discard);
        super::paths::check_utf8(
            branches
                .iter()
                .map(|(_, _, o, _)| o.as_path())
                .chain(kept.filter_map(|p| p.image.as_deref())),
        )?;
        let left_images: Vec<PathBuf> =
            left_points.iter().filter_map(|p| p.image.clone()).collect();
        // Read before the guest stops: their snapshot tables do not change.
        let discardable = self.discardable(&left_images);
        let (mut left, mut discard) = if req.discard {
            (None, discardable.clone())
        } else {
            let state = if live == DomainState::Shutoff {
                SnapshotState::Shutoff
            } else {
                SnapshotState::DiskSnapshot
            };
            (
                Some(self.left_snapshot(snap, state, left_points)),
                Vec::new(),
            )
        };
        let overlays: Vec<(String, PathBuf)> = branches
            .iter()
            .map(|(t, _, o, _)| (t.clone(), o.clone()))
            .collect();
        let record = self.journal.begin(Intent::RevertExternal {
            revert: self.revert_record(to, left.as_ref(), &discard),
            overlays: overlays.clone(),
        })?;
        let t1 = Instant::now();
        let prepared = crate::failpoint::hit("revert.begin")
            .and_then(|_| self.backend.prepare_overlays(&branches));
        if let Err(e) = prepared {
            let plan = ExternalPlan::disks_only(overlays);
            self.backend.settle_external(&plan)?;
            self.journal.complete(record)?;
            return Err(e);
        }
        // Stopping the guest flushes its images: what the state left
        // behind holds can now be read from outside QEMU. A discarded
        // state is not read (QEMU's exit or the switch stops the guest).
        let live = if live == DomainState::Running && left.is_some() {
            self.backend.set_running(false)?;
            DomainState::Paused
        } else {
            live
        };
        if left.is_some() && self.already_kept(&left_images) {
            // Nothing was written since a snapshot: its empty overlays go.
            left = None;
            discard = discardable;
        }
        let revert = ExternalRevert {
            branches: branches.into_iter().map(|(t, p, o, _)| (t, p, o)).collect(),
            memory,
            memory_format: snap.memory_format,
            machine: snap.machine.clone(),
            live,
            target,
        };
        let done = self
            .backend
            .revert_external(&revert)
            .and_then(|_| crate::failpoint::hit("revert.after-steps"));
        let backend_time = t1.elapsed();
        let state = match &done {
            Ok(()) => target,
            Err(_) => self.backend.refresh_state(),
        };
        self.note_state(state);
        if let Err(e) = done {
            let plan = ExternalPlan::disks_only(overlays);
            if !self.backend.settle_external(&plan)? {
                self.journal.complete(record)?;
                return Err(e);
            }
            self.finish_external_revert(&snap.id, left, &discard)?;
            self.journal.complete(record)?;
            return Err(e);
        }
        let kept = left.as_ref().map(|l| l.name.clone());
        self.finish_external_revert(&snap.id, left, &discard)?;
        self.journal.complete(record)?;
        let behind = left_behind(kept.as_deref(), Some(discard.len()));
        self.log.line(&format!(
            "{what}: reverted, domain {} in {:.3} s (QEMU/qemu-img {:.3} s); {behind}",
            state.as_str(),
            t0.elapsed().as_secs_f64(),
            backend_time.as_secs_f64()
        ));
        Ok(())
    }

    /// The rules of an external revert, checked before anything changes.
    fn check_external_revert(&self, to: &RevertTo<'_>, memory: Option<&Path>) -> Result<()> {
        let (snap, target) = (to.snap, to.target);
        if let Some(d) = snap
            .disks
            .iter()
            .find(|d| d.kind == DiskSnapshotKind::Internal)
        {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "snapshot {:?} mixes internal and external disks (disk {}); reverting \
                     to it is not supported",
                    snap.name, d.target
                ),
            ));
        }
        for d in &snap.disks {
            if let (DiskSnapshotKind::External, Some(image)) = (d.kind, &d.image) {
                if !image.exists() {
                    return Err(Error::not_found(format!(
                        "the image of disk {} at {:?}, {}, is gone",
                        d.target,
                        snap.name,
                        image.display()
                    )));
                }
            }
        }
        if let Some(m) = memory {
            if target != DomainState::Shutoff && !m.exists() {
                return Err(Error::not_found(format!(
                    "the memory file {} is gone; revert to 'shutoff' to get the disks back",
                    m.display()
                )));
            }
        }
        if memory.is_some() && target != DomainState::Shutoff {
            self.backend.can_load_memory(snap.memory_format)?;
        }
        let case = RevertCase {
            memory: memory.is_some(),
            ..self.revert_case(to, RevertPlace::External)
        };
        self.revert_rule(snap, &case)?;
        Ok(())
    }

    /// True when every image of the state left behind is an overlay with
    /// no data of its own over the point of an existing snapshot: that
    /// snapshot already holds the state.
    pub(super) fn already_kept(&self, images: &[PathBuf]) -> bool {
        let forest = self.forest.read();
        let is_point = |p: &Path| {
            forest.iter().any(|s| {
                s.disks
                    .iter()
                    .any(|d| d.kind == DiskSnapshotKind::External && d.image.as_deref() == Some(p))
            })
        };
        let empty_over_point = |img: &PathBuf| {
            let chain = self
                .images
                .chain(img, &self.format_of(img))
                .unwrap_or_default();
            let backing = chain.get(1).map(|b| b.path.clone());
            backing.is_some_and(|b| is_point(&b))
                && chain.first().is_some_and(|top| top.snapshots.is_empty())
                && self
                    .images
                    .has_own_data(img, &self.format_of(img))
                    .is_ok_and(|d| !d)
        };
        // One qemu-img pair per disk, side by side: the guest is paused.
        !images.is_empty()
            && std::thread::scope(|scope| {
                let handles: Vec<_> = images
                    .iter()
                    .map(|img| scope.spawn(|| empty_over_point(img)))
                    .collect();
                handles.into_iter().all(|h| h.join().unwrap_or(false))
            })
    }

    /// The images among `images` that nothing refers to once the domain
    /// leaves them: no snapshot's point, no internal snapshot inside, not
    /// the definition's own image.
    pub(super) fn discardable(&self, images: &[PathBuf]) -> Vec<PathBuf> {
        let forest = self.forest.read();
        images
            .iter()
            .filter(|img| {
                let named = self.is_defined_image(&canonical(img));
                let point = forest
                    .iter()
                    .any(|s| s.disks.iter().any(|d| d.image.as_ref() == Some(*img)));
                let tags = self.images.has_tags(img).unwrap_or(true);
                !named && !point && !tags
            })
            .cloned()
            .collect()
    }

    /// After the disks switched: records the snapshot that keeps the state
    /// left behind (or removes its files, as asked) and makes `id` current.
    pub(super) fn finish_external_revert(
        &self,
        id: &str,
        left: Option<Snapshot>,
        discard: &[PathBuf],
    ) -> Result<()> {
        if let Some(left) = left {
            if !self.store.has_snapshot(&left.id) {
                self.record_new(left)?;
            }
        }
        for f in discard {
            if let crate::store::owned::Removal::Refused(why) = self.store.remove_made(f, true)? {
                self.log.line(&format!("revert: not removed: {why}"));
            }
        }
        self.set_current(id)
    }

    /// Finishes or undoes an interrupted external revert (start-up).
    pub(super) fn replay_revert_external(
        &self,
        id: &str,
        overlays: &[(String, PathBuf)],
        left: Option<&str>,
        discard: &[PathBuf],
    ) -> Result<&'static str> {
        let plan = ExternalPlan::disks_only(overlays.to_vec());
        if !self.backend.settle_external(&plan)? {
            return Ok("rolled back");
        }
        let left = left.map(super::external::snapshot_from_plan).transpose()?;
        self.finish_external_revert(id, left, discard)?;
        Ok("completed (the disks had switched; the domain is as QEMU left it)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_names_are_free() {
        let n = left_name(|_| false);
        assert!(
            n.starts_with("left-20") && n.len() == "left-YYYYMMDD-HHMMSS".len(),
            "{n}"
        );
        let taken = n.clone();
        assert_eq!(left_name(|x| x == taken), format!("{n}-2"));
    }
}
