//! Reverting to an internal snapshot whose data lives in an image that is
//! no longer the active layer (an external snapshot stacked an overlay on
//! it, or a revert branched away). The image is reverted in place and
//! becomes active again; whatever depended on its current contents (the
//! images above it, snapshots whose point it is, the live state) is first
//! moved onto a copy of those contents, so no other snapshot changes. The
//! domain is stopped for it: QEMU reverts only root images.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::oplog::now_secs;
use super::prune::ImageGraph;
use super::revert::{left_behind, RevertTo};
use super::revert_rule::RevertPlace;
use super::Domain;
use crate::backend::qemu_img::canonical;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{DiskPoint, DiskSnapshotKind, DomainState, Snapshot, SnapshotState};
use crate::store::Intent;

/// Where the current contents of `image` are copied: beside it, or
/// beside the first file below it when it is a block device (see
/// [`crate::backend::block_dev::file_beside`]).
fn copy_path(image: &Path) -> Result<PathBuf> {
    let image = crate::backend::block_dev::file_beside(image, "qcow2")?;
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let secs = now_secs();
    (1..)
        .map(|n| image.with_file_name(format!("{stem}.moved-{secs}-{n}.qcow2")))
        .find(|p| !p.exists())
        .ok_or_else(|| Error::io("no free name for a copy"))
}

impl Domain {
    /// True when some disk of internal snapshot `snap` lives in an image
    /// that is not an active layer.
    pub(super) fn needs_relocation(&self, snap: &Snapshot) -> bool {
        let active = self.backend.active_disks();
        snap.disks
            .iter()
            .filter(|d| d.kind == DiskSnapshotKind::Internal)
            .any(|d| {
                !active
                    .iter()
                    .any(|a| a.target == d.target && Some(&a.source) == d.image.as_ref())
            })
    }

    /// Reverts to internal snapshot `snap` held (partly) by images that
    /// are not active layers.
    pub(super) fn revert_relocating(&self, to: &RevertTo<'_>) -> Result<()> {
        let (what, snap, target, req) = (to.what, to.snap, to.target, to.req);
        let t0 = Instant::now();
        let case = self.revert_case(to, RevertPlace::Backing);
        let plan = self.revert_rule(snap, &case)?;
        let mut images = Vec::new();
        for d in &snap.disks {
            let (DiskSnapshotKind::Internal, Some(img)) = (d.kind, &d.image) else {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("snapshot {:?}: disk {} is not in it", snap.name, d.target),
                ));
            };
            if !self.images.tags(img)?.iter().any(|t| t.tag == snap.id) {
                return Err(Error::not_found(format!(
                    "disk {}: {} does not hold snapshot {:?}; nothing was reverted",
                    d.target,
                    img.display(),
                    snap.name
                )));
            }
            images.push((d.target.clone(), img.clone()));
        }
        if let Some(reader) =
            self.view_reading(&images.iter().map(|(_, i)| i.as_path()).collect::<Vec<_>>())
        {
            return Err(Error::busy(format!(
                "this revert changes an image that a view reads: {reader}"
            )));
        }
        // QEMU reverts only root images: stop it (this flushes every image).
        if plan.stops_qemu {
            self.backend.stop_process()?;
        }
        let active = self.backend.active_disks();
        let g = ImageGraph::build(self.images.as_ref(), &self.roots(None))?;
        let mut moved = Vec::new();
        let mut left_points = Vec::new();
        let mut left_images = Vec::new();
        for (target, img) in &images {
            let now = active
                .iter()
                .find(|a| &a.target == target)
                .map(|a| a.source.clone());
            let is_active = now.as_deref().map(canonical) == Some(canonical(img));
            let has_dependents = !g.children(&canonical(img)).is_empty()
                || self.forest.read().iter().any(|s| {
                    s.disks.iter().any(|d| {
                        d.kind == DiskSnapshotKind::External
                            && d.image.as_deref().map(canonical) == Some(canonical(img))
                    })
                });
            let keep_live = is_active && !req.discard;
            if has_dependents || keep_live {
                let copy = copy_path(img)?;
                if is_active {
                    left_images.push(copy.clone());
                }
                moved.push((img.clone(), copy));
            } else if let (false, Some(now)) = (is_active, now.clone()) {
                left_images.push(now);
            }
            let point = if is_active {
                moved
                    .last()
                    .filter(|(i, _)| i == img)
                    .map(|(_, c)| c.clone())
            } else {
                now
            };
            left_points.push(DiskPoint {
                target: target.clone(),
                kind: if point.is_some() {
                    DiskSnapshotKind::External
                } else {
                    DiskSnapshotKind::No
                },
                image: point,
                overlay: None,
            });
        }
        let keep = !req.discard && left_points.iter().any(|p| p.image.is_some());
        let left = keep.then(|| self.left_snapshot(snap, SnapshotState::Shutoff, left_points));
        let discard = if req.discard {
            self.discardable(&left_images)
        } else {
            Vec::new()
        };
        let record = self.journal.begin(Intent::RevertRelocate {
            revert: self.revert_record(to, left.as_ref(), &discard),
            moved: moved.clone(),
        })?;
        let t1 = Instant::now();
        let kept = left.as_ref().map(|l| l.name.clone());
        crate::failpoint::hit("revert.begin")
            .and_then(|_| self.relocate_and_apply(snap, &images, &moved))
            .and_then(|_| self.finish_external_revert(&snap.id, left, &discard))
            .and_then(|_| crate::failpoint::hit("revert.after-steps"))
            .map_err(|e| {
                e.context(
                    "the revert stopped part-way; it is finished at the next start \
                     (disks reverted, domain left stopped)",
                )
            })?;
        self.journal.complete(record)?;
        let disks_time = t1.elapsed();
        let start = match plan.starts_qemu {
            false => Ok(()),
            true => self.backend.start_process(
                snap.has_memory().then_some(snap.id.as_str()),
                target == DomainState::Paused,
            ),
        };
        let state = self.backend.refresh_state();
        self.note_state(state);
        start.map_err(|e| e.context("the disks were reverted; the domain is left stopped"))?;
        let behind = left_behind(kept.as_deref(), None);
        self.log.line(&format!(
            "{what}: reverted in place, domain {} in {:.3} s (images {:.3} s, {} copied out); {behind}",
            state.as_str(),
            t0.elapsed().as_secs_f64(),
            disks_time.as_secs_f64(),
            moved.len()
        ));
        Ok(())
    }

    /// Copies out and moves the dependents of each image in `moved`, then
    /// reverts every image in place and makes it active. Safe to repeat.
    fn relocate_and_apply(
        &self,
        snap: &Snapshot,
        images: &[(String, PathBuf)],
        moved: &[(PathBuf, PathBuf)],
    ) -> Result<()> {
        for (img, copy) in moved {
            let made = self.store.made_id(copy);
            let whole = made.is_some() && std::fs::symlink_metadata(copy).is_ok();
            if !whole {
                // A copy interrupted before its rename: its part goes first.
                let part = copy.with_extension("qcow2.part");
                if let Some(id) = made {
                    crate::store::owned::remove(&part, Some(id))?;
                }
                self.images.copy_above_backing(img, copy, &|id| {
                    Ok(self.store.record_made(&[(copy.clone(), id)])?)
                })?;
            }
            let g = ImageGraph::build(self.images.as_ref(), &self.roots(None))?;
            for child in g.children(&canonical(img)) {
                let child = g.named(&child);
                self.release_frozen(&[&child]);
                self.images.rebase_unsafe(&child, copy, "qcow2")?;
            }
            self.repoint(&canonical(img), copy)?;
        }
        for (_, img) in images {
            self.release_frozen(&[img]);
            self.images.apply_tag(img, &snap.id)?;
        }
        self.backend.set_active_layers(images)?;
        self.views.forget_all();
        Ok(())
    }

    /// Finishes an interrupted relocating revert (start-up); the domain is
    /// left stopped.
    pub(super) fn replay_revert_relocate(
        &self,
        id: &str,
        moved: &[(PathBuf, PathBuf)],
        left: Option<&str>,
        discard: &[PathBuf],
    ) -> Result<&'static str> {
        let Some(snap) = self.forest.read().get(id).cloned() else {
            return Ok("dropped (snapshot gone)");
        };
        if self.backend.refresh_state() != DomainState::Shutoff {
            return Err(Error::busy(
                "QEMU runs again; the revert cannot be finished",
            ));
        }
        let images: Vec<(String, PathBuf)> = snap
            .disks
            .iter()
            .filter_map(|d| Some((d.target.clone(), d.image.clone()?)))
            .collect();
        self.relocate_and_apply(&snap, &images, moved)?;
        let left = left.map(super::external::snapshot_from_plan).transpose()?;
        self.finish_external_revert(id, left, discard)?;
        Ok("completed for the disks; the domain was left stopped")
    }
}
