//! Which image paths a monitor peer may report. `query-block` comes from
//! whatever listens on the monitor socket; its paths are believed only
//! when they are the domain's own images: the definition's, their
//! backing chains (read with stated formats), the recorded active and
//! former layers, the snapshots' images, and the images of operations in
//! the intent journal. Anything else is refused before vmsnapfs records
//! it or runs qemu-img on it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::qemu::QemuBackend;
use super::qemu_img::{self, canonical, ChainImage};
use crate::error::{Error, Result};
use crate::store::Intent;

impl QemuBackend {
    /// Refuses (EIO) a chain QEMU reports for disk `target` when one of
    /// its images is not the domain's; the log says which.
    pub(super) fn check_reported_chain(&self, target: &str, chain: &[ChainImage]) -> Result<()> {
        for image in chain {
            if !self.is_known_image(&image.path) {
                let why = format!(
                    "the monitor's peer reports {} in the chain of disk {target}, which is \
                     not one of the domain's images (definition, recorded layers, \
                     snapshots); refused",
                    image.path.display()
                );
                self.note(why.clone());
                return Err(Error::io(why));
            }
        }
        Ok(())
    }

    /// Adds `path`, recorded as an active layer, to the domain's images
    /// (the set is otherwise gathered again, image by image, on a miss).
    pub(super) fn learn_image(&self, path: &Path) {
        self.known_images.lock().insert(canonical(path));
    }

    /// True when `path` is one of the domain's images; the set is
    /// gathered again once on a miss (a layer made since).
    fn is_known_image(&self, path: &Path) -> bool {
        let c = canonical(path);
        if self.known_images.lock().contains(&c) {
            return true;
        }
        let fresh = self.gather_known_images();
        let hit = fresh.contains(&c);
        *self.known_images.lock() = fresh;
        hit
    }

    fn gather_known_images(&self) -> HashSet<PathBuf> {
        let mut roots: Vec<PathBuf> = self.def.disks.iter().map(|d| d.source.clone()).collect();
        roots.extend(self.layers.lock().values().map(|l| l.path.clone()));
        roots.extend(self.store.layer_history().into_iter().map(|(_, p)| p));
        if let Ok(loaded) = self.store.load() {
            for s in loaded.forest.iter() {
                roots.extend(s.disks.iter().filter_map(|d| d.image.clone()));
            }
        }
        if let Ok(pending) = self.store.journal().and_then(|j| j.pending()) {
            for r in pending.into_iter().flatten() {
                match r.intent {
                    Intent::CreateExternal { overlays, .. }
                    | Intent::RevertExternal { overlays, .. } => {
                        roots.extend(overlays.into_iter().map(|(_, p)| p));
                    }
                    Intent::RevertRelocate { moved, .. } => {
                        roots.extend(moved.into_iter().flat_map(|(a, b)| [a, b]));
                    }
                    _ => {}
                }
            }
        }
        let mut known = HashSet::new();
        for r in roots {
            let c = canonical(&r);
            if !known.insert(c) {
                continue;
            }
            if let Ok(chain) = qemu_img::chain(&r, &self.format_of(&r)) {
                known.extend(chain.iter().map(|i| canonical(&i.path)));
            }
        }
        known
    }
}
