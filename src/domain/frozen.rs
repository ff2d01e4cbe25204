//! Frozen images: every image a snapshot names as an external point must
//! never change. While the daemon runs it holds QEMU-compatible locks that
//! deny writers on each of them (see [`WriterLock`]), so a QEMU started
//! from an old command line, `virsh start` or `qemu-img` cannot open one
//! writable. vmsnapfs's own operations that legitimately write a point
//! image (a merge into it, a rebase, an internal tag change, an in-place
//! revert) release the lock of exactly the images they change first; the
//! locks follow the snapshots again when the operation ends.
//!
//! A write that happens anyway (the daemon was not running, or a process
//! ignored the locks) is found by a fingerprint of each frozen image
//! recorded when it froze (`<state>/<domain>/frozen`, see
//! [`Fingerprint`]), checked at start and whenever the domain's state
//! changes, and reported as damage to the snapshots that name the image.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::Domain;
use crate::backend::fingerprint::Fingerprint;
use crate::backend::image_lock::WriterLock;
use crate::backend::qemu_img::canonical;
use crate::model::DiskSnapshotKind;

/// The writer locks one domain holds, by canonical image path.
#[derive(Default)]
pub struct FrozenLocks {
    held: Mutex<HashMap<PathBuf, WriterLock>>,
    /// Images that could not be locked at the last sync (logged once).
    failed: Mutex<BTreeSet<PathBuf>>,
    /// Points found to be active layers too (logged once).
    active: Mutex<BTreeSet<PathBuf>>,
    /// Images released for a write by vmsnapfs since the last sync: not
    /// checked, and fingerprinted again at the sync.
    released: Mutex<BTreeSet<PathBuf>>,
    /// Frozen images found changed since they froze, with what changed.
    damage: Mutex<BTreeMap<PathBuf, String>>,
    /// Serialises reading and writing the fingerprint record.
    record: Mutex<()>,
}

impl FrozenLocks {
    /// The images locked now.
    pub fn held(&self) -> BTreeSet<PathBuf> {
        self.held.lock().keys().cloned().collect()
    }

    /// Holds locks on exactly `wanted`: takes the missing ones (and
    /// again those whose path names another file now), drops the others.
    /// Returns the images newly found impossible to lock, with why.
    fn hold_exactly(&self, wanted: &BTreeSet<PathBuf>) -> Vec<(PathBuf, String)> {
        let mut held = self.held.lock();
        held.retain(|p, lock| {
            wanted.contains(p) && lock.identity() == file_identity(p) && lock.identity().is_some()
        });
        let mut failed = self.failed.lock();
        let mut news = Vec::new();
        let mut now_failed = BTreeSet::new();
        for p in wanted {
            if held.contains_key(p) {
                continue;
            }
            match WriterLock::deny_writers(p) {
                Ok(lock) => {
                    held.insert(p.clone(), lock);
                }
                Err(e) => {
                    if !failed.contains(p) {
                        news.push((p.clone(), e.to_string()));
                    }
                    now_failed.insert(p.clone());
                }
            }
        }
        *failed = now_failed;
        news
    }

    /// Drops the locks of `images` (canonical paths) before they are
    /// written; the next sync takes them again if they are still points.
    fn release(&self, images: &[PathBuf]) {
        let mut held = self.held.lock();
        let mut released = self.released.lock();
        for i in images {
            held.remove(i);
            released.insert(i.clone());
        }
    }
}

fn file_identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Domain {
    /// Every image a snapshot names as an external disk point (canonical).
    pub(super) fn frozen_points(&self) -> BTreeSet<PathBuf> {
        self.forest
            .read()
            .iter()
            .flat_map(|s| s.disks.iter())
            .filter(|d| d.kind == DiskSnapshotKind::External)
            .filter_map(|d| d.image.as_deref().map(canonical))
            .collect()
    }

    /// Makes the held writer locks follow the snapshots: every point image
    /// locked, nothing else. Called at start and when each operation ends.
    pub(super) fn sync_frozen(&self) {
        let mut wanted = self.frozen_points();
        // The active layers are written by the guest: never locked (a
        // point that is also an active layer is reported, not locked).
        let mut both = BTreeSet::new();
        for a in self.backend.active_disks() {
            let a = canonical(&a.source);
            if wanted.remove(&a) {
                both.insert(a);
            }
        }
        let mut known = self.frozen.active.lock();
        for a in both.difference(&known) {
            self.log.line(&format!(
                "{} is a snapshot's frozen image and a disk's active layer: guest writes \
                 change that snapshot",
                a.display()
            ));
        }
        *known = both;
        drop(known);
        for (p, why) in self.frozen.hold_exactly(&wanted) {
            self.log.line(&format!(
                "cannot lock frozen image {} against writers ({why}): QEMU could open it \
                 writable",
                p.display()
            ));
        }
        self.record_fingerprints();
    }

    /// Records the fingerprint of each point image that has none, or that
    /// vmsnapfs itself wrote since the last sync; forgets images that are
    /// no longer points.
    fn record_fingerprints(&self) {
        let _record = self.frozen.record.lock();
        let points = self.frozen_points();
        let released = std::mem::take(&mut *self.frozen.released.lock());
        let mut all = self.store.frozen_fingerprints();
        let before = all.clone();
        all.retain(|p, _| points.contains(p));
        let active: BTreeSet<PathBuf> = self
            .backend
            .active_disks()
            .iter()
            .map(|a| canonical(&a.source))
            .collect();
        for p in &points {
            let fresh = !all.contains_key(p) || released.contains(p);
            if !fresh || active.contains(p) {
                continue;
            }
            if let Ok(f) = Fingerprint::of(p) {
                all.insert(p.clone(), f.to_text());
                self.frozen.damage.lock().remove(p);
            }
        }
        if all != before {
            if let Err(e) = self.store.save_frozen_fingerprints(&all) {
                self.log.line(&format!(
                    "cannot record the fingerprints of frozen images: {e}"
                ));
            }
        }
    }

    /// Compares every frozen image with its recorded fingerprint; logs
    /// each newly damaged snapshot. Images vmsnapfs is writing are skipped.
    pub(super) fn check_frozen(&self) {
        let _record = self.frozen.record.lock();
        let points = self.frozen_points();
        let released = self.frozen.released.lock().clone();
        let mut found = BTreeMap::new();
        for (p, text) in self.store.frozen_fingerprints() {
            if !points.contains(&p) || released.contains(&p) {
                continue;
            }
            let Some(was) = Fingerprint::parse(&text) else {
                continue;
            };
            let change = match Fingerprint::of(&p) {
                Ok(now) => now.changes_since(&was),
                Err(e) => Some(format!("cannot be read ({e})")),
            };
            if let Some(c) = change {
                found.insert(p, c);
            }
        }
        let mut damage = self.frozen.damage.lock();
        for (p, what) in &found {
            if damage.get(p) == Some(what) {
                continue;
            }
            for (name, target) in self.snapshots_naming(p) {
                self.log.line(&format!(
                    "snapshot {name:?} is damaged: its frozen image {} (disk {target}) was \
                     written after the snapshot was taken ({what}); its views and a revert \
                     to it no longer show the disk as it was",
                    p.display()
                ));
            }
        }
        *damage = found;
    }

    /// (snapshot name, disk) of every snapshot naming `image` as a point.
    fn snapshots_naming(&self, image: &Path) -> Vec<(String, String)> {
        self.forest
            .read()
            .iter()
            .flat_map(|s| {
                s.disks
                    .iter()
                    .filter(|d| d.kind == DiskSnapshotKind::External)
                    .filter(|d| d.image.as_deref().map(canonical).as_deref() == Some(image))
                    .map(|d| (s.name.clone(), d.target.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Lines for `.state`: one per damaged snapshot and disk.
    pub fn damage_lines(&self) -> String {
        let damage = self.frozen.damage.lock().clone();
        let mut out = String::new();
        for (p, what) in &damage {
            for (name, target) in self.snapshots_naming(p) {
                out += &format!(
                    "damaged: snapshot {name:?} disk {target}: {} was written after the \
                     snapshot ({what})\n",
                    p.display()
                );
            }
        }
        out
    }

    /// Lines for a snapshot's `state`: one per damaged disk.
    pub fn snapshot_damage(&self, snap: &crate::model::Snapshot) -> String {
        let damage = self.frozen.damage.lock().clone();
        let mut out = String::new();
        for d in &snap.disks {
            if d.kind != DiskSnapshotKind::External {
                continue;
            }
            let Some(p) = d.image.as_deref().map(canonical) else {
                continue;
            };
            if let Some(what) = damage.get(&p) {
                out += &format!(
                    "damaged: disk {}: {} was written after the snapshot ({what})\n",
                    d.target,
                    p.display()
                );
            }
        }
        out
    }

    /// Releases the writer locks of `images` before vmsnapfs itself writes
    /// them (a merge, a rebase, a tag change, an in-place revert).
    pub(super) fn release_frozen(&self, images: &[&Path]) {
        let list: Vec<PathBuf> = images.iter().map(|p| canonical(p)).collect();
        self.frozen.release(&list);
    }

    /// The images locked against writers now (for tests and `.state`).
    pub fn frozen_locked(&self) -> BTreeSet<PathBuf> {
        self.frozen.held()
    }
}
