//! Incremental views: `NAME/changes/<target>` (against NAME's parent)
//! and `NAME/since/<OTHER>/<target>`, the disk at NAME with data only
//! where it may differ from the other snapshot ([`crate::views::diff`]),
//! and their `.map`. The extents are computed from the images when first
//! asked (on a worker thread, never a FUSE thread), kept in memory only
//! as a cache of what the images say (dropped when images change; a
//! restarted daemon computes them again), and shared by every reader.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{DiskViews, Hold, Holder};
use crate::error::{Error, Result};
use crate::model::Snapshot;
use crate::views::diff::{self, Changes};
use crate::views::FrozenView;

/// Results kept per domain before finished ones are dropped.
const MAX_RESULTS: usize = 4096;

/// (snapshot id, other snapshot id or none, target).
type Key = (String, Option<String>, String);

/// Change sets computed or being computed.
#[derive(Default)]
pub(super) struct ChangeCache {
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    generation: Mutex<u64>,
}

/// One computation: its result once done, and those waiting for it.
#[derive(Default)]
struct Slot {
    result: Mutex<Option<std::result::Result<Arc<Changes>, Error>>>,
    done: Condvar,
}

impl ChangeCache {
    /// Drops the results about snapshot `id` (or every result): its
    /// images changed, or it is gone.
    pub(super) fn forget(&self, id: Option<&str>) {
        *self.generation.lock() += 1;
        self.slots
            .lock()
            .retain(|(a, b, _), _| id.is_some_and(|id| a != id && b.as_deref() != Some(id)));
    }
}

fn key(snap: &Snapshot, other: Option<&Snapshot>, target: &str) -> Key {
    (
        snap.id.clone(),
        other.map(|o| o.id.clone()),
        target.to_owned(),
    )
}

/// `changes/<target>` of `snap`, or `since/<other>/<target>`, for `.log`.
fn describe(snap: &Snapshot, other: Option<&Snapshot>, target: &str) -> String {
    match other {
        Some(o) => format!("{}/since/{}/{target}", snap.name, o.name),
        None => format!("{}/changes/{target} (no parent)", snap.name),
    }
}

impl DiskViews {
    /// The changes of `target` at `snap` since `other` (`None`: since an
    /// empty disk), if already known: never waits.
    pub fn changes_cached(
        &self,
        snap: &Snapshot,
        other: Option<&Snapshot>,
        target: &str,
    ) -> Option<Arc<Changes>> {
        let slot = self
            .changes
            .slots
            .lock()
            .get(&key(snap, other, target))
            .cloned()?;
        let done = slot.result.lock();
        match &*done {
            Some(Ok(c)) => Some(c.clone()),
            _ => None,
        }
    }

    /// The changes of `target` at `snap` since `other`: computed from the
    /// images (or waited for, when another thread computes them). Reads
    /// every table of both chains: call it off the FUSE threads.
    pub fn changes(
        &self,
        snap: &Snapshot,
        other: Option<&Snapshot>,
        target: &str,
    ) -> Result<Arc<Changes>> {
        let k = key(snap, other, target);
        let (slot, mine) = {
            let mut slots = self.changes.slots.lock();
            match slots.get(&k) {
                Some(s) => (s.clone(), false),
                None => {
                    // Bounded: past the limit, finished results make room.
                    if slots.len() >= MAX_RESULTS {
                        slots.retain(|_, s| s.result.lock().is_none());
                    }
                    let s = Arc::new(Slot::default());
                    slots.insert(k.clone(), s.clone());
                    (s, true)
                }
            }
        };
        if !mine {
            let mut r = slot.result.lock();
            while r.is_none() {
                slot.done.wait(&mut r);
            }
            return r.clone().unwrap_or_else(|| Err(Error::io("no result")));
        }
        let generation = *self.changes.generation.lock();
        let result = self.compute(snap, other, target).map(Arc::new);
        {
            let mut slots = self.changes.slots.lock();
            // A result computed before the images changed is not kept
            // (it is still true: snapshots never change; but the next
            // reader starts from the new chains); a failure is not kept.
            let keep = result.is_ok() && *self.changes.generation.lock() == generation;
            if !keep && slots.get(&k).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.remove(&k);
            }
        }
        *slot.result.lock() = Some(result.clone());
        slot.done.notify_all();
        result
    }

    /// Reads both chains under holds of both snapshots, so that no
    /// delete merges their images meanwhile.
    fn compute(&self, snap: &Snapshot, other: Option<&Snapshot>, target: &str) -> Result<Changes> {
        let what = describe(snap, other, target);
        let me = Holder {
            pid: std::process::id(),
            uid: 0,
        };
        let holds: Vec<Arc<Hold>> = std::iter::once(snap)
            .chain(other)
            .map(|s| self.hold(s, me))
            .collect::<Result<_>>()?;
        let result = (|| {
            let refuse = |e: std::io::Error| {
                let text = format!("refused (EIO): {what}: {e}");
                self.tell(&text);
                Error::io(text)
            };
            let Some(new) = Self::source(&self.disks, snap, target) else {
                return Err(Error::not_found(format!(
                    "disk {target} is not in snapshot {:?}",
                    snap.name
                )));
            };
            let new = new.open().map_err(refuse)?;
            let old = match other {
                Some(o) => match Self::source(&self.disks, o, target) {
                    Some(s) => Some(s.open().map_err(refuse)?),
                    None => {
                        self.tell(&format!(
                            "{what}: {:?} has no view of disk {target}: every byte with \
                             data is reported changed",
                            o.name
                        ));
                        None
                    }
                },
                None => None,
            };
            let t = std::time::Instant::now();
            let ch = diff::changes(&new, old.as_ref()).map_err(refuse)?;
            if ch.compared > 0 {
                self.tell(&format!(
                    "{what}: the two disks share no image, so no map relates them: \
                     {} bytes compared byte by byte ({} bytes differ), in {:.3} s",
                    ch.compared,
                    ch.changed_bytes(),
                    t.elapsed().as_secs_f64()
                ));
            }
            log::debug!(
                "{what}: {} bytes changed in {} extents, {:.3} s",
                ch.changed_bytes(),
                ch.extents.len(),
                t.elapsed().as_secs_f64()
            );
            Ok(ch)
        })();
        for h in &holds {
            self.close(h);
        }
        result
    }

    /// Opens `target` at `snap` with data only where it changed since
    /// `other`, holding `snap` until [`DiskViews::close`]. Off the FUSE
    /// threads (it may compute the changes).
    pub fn open_changes(
        &self,
        snap: &Snapshot,
        other: Option<&Snapshot>,
        target: &str,
        holder: Holder,
    ) -> Result<(Arc<dyn FrozenView>, Arc<Hold>)> {
        let changes = self.changes(snap, other, target)?;
        let (view, hold) = self.open(snap, target, holder)?;
        Ok((Arc::new(ChangesView { changes, view }), hold))
    }
}

/// A disk at a snapshot with holes wherever it did not change.
struct ChangesView {
    changes: Arc<Changes>,
    view: Arc<dyn FrozenView>,
}

impl FrozenView for ChangesView {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.changes.size;
        if offset >= size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - offset) as usize;
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let left = (n - done) as u64;
            let data = self.changes.seek_data(pos);
            let len = match data {
                Some(d) if d == pos => {
                    let end = self.changes.seek_hole(pos).unwrap_or(size);
                    let len = (end - pos).min(left) as usize;
                    let got = self.view.read_at(pos, &mut buf[done..done + len])?;
                    buf[done + got..done + len].fill(0);
                    len
                }
                Some(d) => {
                    let len = (d - pos).min(left) as usize;
                    buf[done..done + len].fill(0);
                    len
                }
                None => {
                    buf[done..n].fill(0);
                    n - done
                }
            };
            done += len;
        }
        Ok(n)
    }
    fn seek_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        Ok(self.changes.seek_data(offset))
    }
    fn seek_hole(&self, offset: u64) -> std::io::Result<Option<u64>> {
        Ok(self.changes.seek_hole(offset))
    }
}
