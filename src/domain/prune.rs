//! Deleting an external snapshot without losing a byte anything else
//! reads. Its point image is merged with the image above it when that is
//! its only child and no internal snapshot lives in the image that goes
//! away (commit down or stream up, whichever copies less); otherwise the
//! point image stays as the shared backing of its children. Afterwards the
//! images and memory file that nothing needs any more are removed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::Domain;
use crate::backend::qemu_img::{self, canonical};
use crate::backend::Images;
use crate::backend::{Merge, MergeKind};
use crate::error::{Error, Result};
use crate::model::{DiskSnapshotKind, MemoryLocation, Snapshot};
use crate::store::owned::Removal;
use crate::store::Intent;

/// The images a domain needs, with their backing links.
#[derive(Default)]
pub(super) struct ImageGraph {
    /// Image -> its backing image.
    backing: HashMap<PathBuf, PathBuf>,
    /// Every image in the chain of a needed image.
    needed: HashSet<PathBuf>,
    /// How many internal snapshots each image holds.
    tags: HashMap<PathBuf, usize>,
    /// Each image's path as its chain names it (before symlinks are
    /// resolved): the only path vmsnapfs ever removes.
    named: HashMap<PathBuf, PathBuf>,
}

impl ImageGraph {
    pub(super) fn build(images: &dyn Images, roots: &[(PathBuf, String)]) -> Result<Self> {
        let mut g = ImageGraph::default();
        for (r, format) in roots {
            if g.needed.contains(&canonical(r)) {
                continue;
            }
            let chain = images.chain(r, format)?;
            for (i, image) in chain.iter().enumerate() {
                let path = canonical(&image.path);
                g.named
                    .entry(path.clone())
                    .or_insert_with(|| image.path.clone());
                g.tags.insert(path.clone(), image.snapshots.len());
                if let Some(b) = chain.get(i + 1) {
                    g.backing.insert(path.clone(), canonical(&b.path));
                }
                g.needed.insert(path);
            }
        }
        Ok(g)
    }

    pub(super) fn children(&self, image: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .backing
            .iter()
            .filter(|(_, b)| b.as_path() == image)
            .map(|(c, _)| c.clone())
            .collect();
        v.sort();
        v
    }

    /// Every image of the chains (canonical paths).
    pub(super) fn images(&self) -> impl Iterator<Item = &PathBuf> {
        self.needed.iter()
    }

    /// The path a chain names for the image whose canonical path is `image`.
    pub(super) fn named(&self, image: &Path) -> PathBuf {
        self.named
            .get(image)
            .cloned()
            .unwrap_or_else(|| image.to_owned())
    }
}

/// What happens to one disk's point image.
#[derive(Debug)]
enum DiskPlan {
    Merge(Merge),
    Keep(String),
    Unneeded,
}

impl Domain {
    /// The format `image` must be opened with (never probed): the active
    /// layer's or the defined disk's it is, else qcow2.
    pub(super) fn format_of(&self, image: &Path) -> String {
        let mut disks = self.backend.active_disks();
        disks.extend(self.def.disks.iter().cloned());
        qemu_img::expected_format(&disks, image)
    }

    /// The images every snapshot but `except` and the live state need,
    /// each with the format it is opened with.
    pub(super) fn roots(&self, except: Option<&str>) -> Vec<(PathBuf, String)> {
        let mut roots: Vec<PathBuf> = self
            .backend
            .active_disks()
            .into_iter()
            .map(|d| d.source)
            .collect();
        for s in self.forest.read().iter() {
            if Some(s.id.as_str()) == except {
                continue;
            }
            roots.extend(
                s.disks
                    .iter()
                    .filter(|d| d.kind != DiskSnapshotKind::No)
                    .filter_map(|d| d.image.clone()),
            );
        }
        roots
            .into_iter()
            .map(|r| {
                let f = self.format_of(&r);
                (r, f)
            })
            .collect()
    }

    /// True when `p` is an image the domain's definition names, kept
    /// as the operator's. A block device there is not: a definition
    /// names one only as a layer vmsnapfs accepted (see
    /// [`crate::xml::parse_domain_def_with`]), merged out of and
    /// released like any other.
    pub(super) fn is_defined_image(&self, p: &Path) -> bool {
        self.def.disks.iter().any(|d| {
            canonical(&d.source) == p && !crate::backend::block_dev::is_device_path(&d.source)
        })
    }

    fn plan_disk(
        &self,
        g: &ImageGraph,
        snap_id: &str,
        target: &str,
        point: &Path,
    ) -> Result<DiskPlan> {
        let point = canonical(point);
        if !g.needed.contains(&point) {
            return Ok(DiskPlan::Unneeded);
        }
        // Another snapshot's point too (an earlier merge moved it here):
        // its bytes must not change, and it keeps the image.
        let shared = self.forest.read().iter().any(|s| {
            s.id != snap_id
                && s.disks.iter().any(|d| {
                    d.kind == DiskSnapshotKind::External
                        && d.image.as_deref().map(canonical).as_ref() == Some(&point)
                })
        });
        if shared {
            return Ok(DiskPlan::Keep(format!(
                "{} stays: another snapshot's disk is that image",
                point.display()
            )));
        }
        let kids = g.children(&point);
        let [upper] = kids.as_slice() else {
            return Ok(DiskPlan::Keep(format!(
                "{} stays: it is the backing image of {} images",
                point.display(),
                kids.len()
            )));
        };
        if g.tags.get(upper).copied().unwrap_or(0) > 0 {
            return Ok(DiskPlan::Keep(format!(
                "{} stays: {} above it holds internal snapshots",
                point.display(),
                upper.display()
            )));
        }
        let viewed = self.forest.read().iter().any(|s| {
            self.views.is_open(&s.id)
                && s.disks
                    .iter()
                    .any(|d| d.image.as_deref().map(canonical).as_ref() == Some(upper))
        });
        let can_commit = !self.is_defined_image(upper) && !viewed;
        // A block device's room is fixed: data is committed down out of
        // it, never streamed up into it.
        let can_stream = g.tags.get(&point).copied().unwrap_or(0) == 0
            && !self.is_defined_image(&point)
            && !crate::backend::block_dev::is_device_path(upper);
        let kind = match (can_commit, can_stream) {
            (false, false) => {
                return Ok(DiskPlan::Keep(format!(
                    "{} stays: neither it nor {} can be merged away",
                    point.display(),
                    upper.display()
                )))
            }
            (true, false) => MergeKind::Commit,
            (false, true) => MergeKind::Stream,
            (true, true) => {
                // Copy the smaller side.
                let up = self
                    .images
                    .own_bytes(upper, &self.format_of(upper))
                    .unwrap_or(u64::MAX);
                let down = self
                    .images
                    .own_bytes(&point, &self.format_of(&point))
                    .unwrap_or(u64::MAX);
                if up <= down {
                    MergeKind::Commit
                } else {
                    MergeKind::Stream
                }
            }
        };
        // The paths the chains name, not their resolved forms: those are
        // what the backend, the records and snapshot.xml are given (a
        // resolved path may pass through a directory whose name is not
        // UTF-8, which XML and qemu-img's command line cannot carry).
        Ok(DiskPlan::Merge(Merge {
            target: target.to_owned(),
            kind,
            lower: g.named(&point),
            upper: g.named(upper),
            above: g.children(upper).iter().map(|a| g.named(a)).collect(),
        }))
    }

    /// `rmdir` of an external snapshot (busy, views held, not journaled yet).
    pub(super) fn delete_external(&self, what: &str, snap: &Snapshot) -> Result<()> {
        let t0 = Instant::now();
        if let Some(d) = snap
            .disks
            .iter()
            .find(|d| d.kind == DiskSnapshotKind::Internal)
        {
            return Err(Error::new(
                crate::error::ErrorKind::Unsupported,
                format!(
                    "snapshot {:?} mixes internal and external disks (disk {}); deleting \
                     it is not supported",
                    snap.name, d.target
                ),
            ));
        }
        // Everything that may become unused: the points, their children,
        // the memory file.
        let g = ImageGraph::build(self.images.as_ref(), &self.roots(None))?;
        let mut candidates = Vec::new();
        // Recorded paths, never their symlink-resolved targets.
        for d in &snap.disks {
            if let (DiskSnapshotKind::External, Some(p)) = (d.kind, &d.image) {
                candidates.extend(g.children(&canonical(p)).iter().map(|c| g.named(c)));
                candidates.push(p.clone());
            }
        }
        if let MemoryLocation::External(m) = &snap.memory {
            candidates.push(m.clone());
        }
        let record = self.journal.begin(Intent::DeleteExternal {
            id: snap.id.clone(),
            candidates: candidates.clone(),
        })?;
        let mut merged = false;
        let notes = crate::failpoint::hit("delete.begin")
            .and_then(|_| self.delete_external_steps(what, snap, &mut merged))
            .and_then(|notes| {
                crate::failpoint::hit("delete.before-meta-remove")?;
                self.forget_snapshot(&snap.id)?;
                Ok(notes)
            });
        let notes = match notes {
            Ok(n) => n,
            Err(e) if !merged => {
                // Nothing changed: the delete simply did not happen.
                self.journal.complete(record)?;
                return Err(e);
            }
            Err(e) => {
                // A merge changed the snapshot's image: every other byte
                // is readable, and the next start finishes the delete.
                return Err(e.context(
                    "the snapshot's images were partly merged; its delete is finished \
                     at the next start",
                ));
            }
        };
        let (removed, left) = self.remove_unneeded(&candidates)?;
        self.journal.complete(record)?;
        let mut line = format!("{what}: deleted in {:.3} s", t0.elapsed().as_secs_f64());
        for n in notes {
            line += &format!("; {n}");
        }
        if !removed.is_empty() {
            line += &format!("; removed {}", removed.join(", "));
        }
        for why in left {
            line += &format!("; not removed: {why}");
        }
        self.log.line(&line);
        Ok(())
    }

    /// Merges each disk's point image away where possible and points the
    /// snapshots that named a merged image at the image that now holds its
    /// data. Returns notes for `.log`.
    fn delete_external_steps(
        &self,
        what: &str,
        snap: &Snapshot,
        merged: &mut bool,
    ) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        for d in &snap.disks {
            let (DiskSnapshotKind::External, Some(point)) = (d.kind, &d.image) else {
                continue;
            };
            let g = ImageGraph::build(self.images.as_ref(), &self.roots(Some(&snap.id)))?;
            match self.plan_disk(&g, &snap.id, &d.target, point)? {
                DiskPlan::Unneeded => {}
                DiskPlan::Keep(why) => notes.push(format!("disk {}: {why}", d.target)),
                DiskPlan::Merge(m) => {
                    // QEMU merges only images no other process reads:
                    // idle view servers stop; an open view is waited for.
                    self.views.forget_all();
                    if let Some(reader) = self.view_reading(&[&m.lower, &m.upper]) {
                        return Err(Error::busy(format!(
                            "this delete merges an image that a view reads: {reader}"
                        )));
                    }
                    let t = Instant::now();
                    let label = format!(
                        "{what}: {} disk {}",
                        match m.kind {
                            MergeKind::Commit => "commit",
                            MergeKind::Stream => "stream",
                        },
                        d.target
                    );
                    self.jobs.start(&label);
                    // The merge writes both images and rebases those above.
                    let mut written = vec![m.lower.as_path(), m.upper.as_path()];
                    written.extend(m.above.iter().map(PathBuf::as_path));
                    self.release_frozen(&written);
                    // Once the job runs, the point image may have changed.
                    let mut started = false;
                    let r = self.backend.merge(&m, &mut |done, total| {
                        started = true;
                        self.jobs.progress(&label, done, total)
                    });
                    *merged |= started;
                    self.jobs.end(&label);
                    self.views.forget_all();
                    r?;
                    crate::failpoint::hit("delete.after-backend")?;
                    if m.kind == MergeKind::Commit {
                        self.repoint(&canonical(&m.upper), &m.lower)?;
                    }
                    notes.push(format!(
                        "disk {}: {} {} in {:.3} s",
                        d.target,
                        match m.kind {
                            MergeKind::Commit => "committed into",
                            MergeKind::Stream => "streamed up from",
                        },
                        match m.kind {
                            MergeKind::Commit => m.lower.display(),
                            MergeKind::Stream => m.lower.display(),
                        },
                        t.elapsed().as_secs_f64()
                    ));
                }
            }
        }
        Ok(notes)
    }

    /// Which snapshot has an open view or memory file whose chain holds
    /// one of `images`, and who holds it (for `.log`).
    pub(super) fn view_reading(&self, images: &[&Path]) -> Option<String> {
        let open: Vec<Snapshot> = self
            .forest
            .read()
            .iter()
            .filter(|s| self.views.is_open(&s.id))
            .cloned()
            .collect();
        open.into_iter().find_map(|s| {
            let reads = s.disks.iter().filter_map(|d| d.image.as_ref()).any(|p| {
                self.images
                    .chain(p, &self.format_of(p))
                    .unwrap_or_default()
                    .iter()
                    .any(|i| images.iter().any(|x| canonical(&i.path) == canonical(x)))
            });
            reads.then(|| self.held_open(&s.id, &s.name))
        })
    }

    /// Snapshots whose point (or overlay) was `from` (now merged into
    /// `to`) name `to`; those with an open view keep `from`, which then stays.
    pub(super) fn repoint(&self, from: &Path, to: &Path) -> Result<()> {
        let mut forest = self.forest.write();
        let ids: Vec<String> = forest
            .iter()
            .filter(|s| !self.views.is_open(&s.id))
            .filter(|s| {
                s.disks.iter().any(|d| {
                    d.kind == DiskSnapshotKind::External
                        && [&d.image, &d.overlay]
                            .iter()
                            .any(|p| p.as_deref().map(canonical).as_deref() == Some(from))
                })
            })
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            let Some(mut s) = forest.get(&id).cloned() else {
                continue;
            };
            for d in &mut s.disks {
                if d.image.as_deref().map(canonical).as_deref() == Some(from) {
                    d.image = Some(to.to_owned());
                }
                // The overlay merged away: its writes are in `to` now,
                // unless `to` is the point itself (then none is left).
                if d.overlay.as_deref().map(canonical).as_deref() == Some(from) {
                    let is_point = d.image.as_deref().map(canonical) == Some(canonical(to));
                    d.overlay = (!is_point).then(|| to.to_owned());
                }
            }
            self.store.save_snapshot(&s, &forest)?;
            if let Some(slot) = forest.get_mut(&id) {
                *slot = s;
            }
            self.views.forget(&id);
        }
        Ok(())
    }

    /// Removes the files among `candidates` that nothing needs: no chain
    /// of the live state or of a snapshot holds them, no snapshot names
    /// them as its memory file, and they are not the definition's images.
    /// Each is removed at the path recorded, only if it is still the file
    /// vmsnapfs made, never through a symlink. Returns the files removed
    /// and, for each left alone, why.
    fn remove_unneeded(&self, candidates: &[PathBuf]) -> Result<(Vec<String>, Vec<String>)> {
        let g = ImageGraph::build(self.images.as_ref(), &self.roots(None))?;
        let memory: HashSet<PathBuf> = self
            .forest
            .read()
            .iter()
            .filter_map(|s| match &s.memory {
                MemoryLocation::External(m) => Some(canonical(m)),
                _ => None,
            })
            .collect();
        let (mut removed, mut left) = (Vec::new(), Vec::new());
        for c in candidates {
            let p = canonical(c);
            let needed =
                |p: &Path| g.needed.contains(p) || memory.contains(p) || self.is_defined_image(p);
            if needed(&p) || needed(c) {
                continue;
            }
            // A device is never removed or truncated: it is released.
            if crate::backend::block_dev::release(c) {
                left.push(format!(
                    "{} is a block device: released, never removed",
                    c.display()
                ));
                continue;
            }
            match self.store.remove_made(c, true)? {
                Removal::Removed => removed.push(c.display().to_string()),
                Removal::Absent => {}
                Removal::Refused(why) => left.push(why),
            }
        }
        Ok((removed, left))
    }

    /// Finishes an interrupted external delete (start-up).
    pub(super) fn replay_delete_external(
        &self,
        id: &str,
        candidates: &[PathBuf],
    ) -> Result<&'static str> {
        // A merge an earlier daemon started may have written the candidates
        // and rebased their children: fingerprinted again, not damage.
        let mut written: Vec<PathBuf> = candidates.to_vec();
        if let Ok(g) = ImageGraph::build(self.images.as_ref(), &self.roots(None)) {
            for c in candidates {
                written.extend(g.children(&canonical(c)));
            }
        }
        self.release_frozen(&written.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        let snap = self.forest.read().get(id).cloned();
        if let Some(snap) = snap {
            self.delete_external_steps("recovery", &snap, &mut true)?;
            self.forget_snapshot(id)?;
        }
        let (_, left) = self.remove_unneeded(candidates)?;
        for why in left {
            self.log.line(&format!("recovery: not removed: {why}"));
        }
        Ok("completed")
    }
}
