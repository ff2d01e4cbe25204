//! External snapshots on the domain side: where overlays and memory files
//! go, the planned metadata that the journal carries, recording the
//! result, and finishing or undoing an interrupted create.

use std::path::{Path, PathBuf};

use super::{CreateRequest, Domain};
use crate::backend::{ExternalOutcome, ExternalPlan};
use crate::error::{Error, Result};
use crate::model::{
    DiskDef, DiskPoint, DiskSnapshotKind, DomainState, MemoryFormat, MemoryLocation, Snapshot,
    SnapshotState,
};
use crate::xml::snapshot::{parse_snapshot_xml, snapshot_from_spec, write_snapshot_xml};

/// The default overlay of `source` for snapshot `name`: beside the image,
/// `<stem>.<name>.qcow2` (libvirt's convention).
pub fn default_overlay(source: &Path, name: &str) -> PathBuf {
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    source.with_file_name(format!("{stem}.{name}.qcow2"))
}

/// The default memory file of snapshot `name`: beside the first disk's
/// image, `<domain>.<name>.memory`.
pub fn default_memory(first_disk: &Path, domain: &str, name: &str) -> PathBuf {
    first_disk.with_file_name(format!("{domain}.{name}.memory"))
}

/// A snapshot from the `<domainsnapshot>` XML an intent carries.
pub fn snapshot_from_plan(xml: &str) -> Result<Snapshot> {
    let spec = parse_snapshot_xml(xml).map_err(|e| Error::io(e.to_string()))?;
    Ok(snapshot_from_spec(spec)
        .map_err(|e| Error::io(e.to_string()))?
        .0)
}

impl Domain {
    /// The path beside which new files of the disk `def` are named: its
    /// defined image, or, where the definition names a block device
    /// vmsnapfs accepted as a layer (libvirt's does), the first image
    /// file in the chain of the disk's active layer (see
    /// [`crate::backend::block_dev::file_beside`]).
    pub(super) fn beside(&self, def: &DiskDef) -> Result<PathBuf> {
        if !crate::backend::block_dev::is_device_path(&def.source) {
            return Ok(def.source.clone());
        }
        let active = self.backend.active_disks();
        let now = active
            .iter()
            .find(|d| d.target == def.target)
            .unwrap_or(def);
        crate::backend::block_dev::file_beside(&now.source, &now.format)
    }

    /// Decides the files of an external snapshot and the metadata it will
    /// have, before anything changes.
    pub(super) fn plan_external(
        &self,
        id: &str,
        request: &CreateRequest<'_>,
        disks: &[(String, Option<PathBuf>)],
        memory: Option<&Option<PathBuf>>,
        live: DomainState,
    ) -> Result<(ExternalPlan, Snapshot)> {
        if disks.is_empty() {
            return Err(Error::invalid(
                "an external snapshot needs at least one disk",
            ));
        }
        let active = self.backend.active_disks();
        let mut overlays = Vec::new();
        let mut points = Vec::new();
        for def in &self.def.disks {
            let now = active
                .iter()
                .find(|d| d.target == def.target)
                .unwrap_or(def);
            match disks.iter().find(|(t, _)| *t == def.target) {
                Some((_, path)) => {
                    let overlay = match path {
                        Some(p) => p.clone(),
                        None => default_overlay(&self.beside(def)?, request.name),
                    };
                    overlays.push((def.target.clone(), overlay.clone()));
                    points.push(DiskPoint {
                        target: def.target.clone(),
                        kind: DiskSnapshotKind::External,
                        image: Some(now.source.clone()),
                        overlay: Some(overlay),
                    });
                }
                None => points.push(DiskPoint {
                    target: def.target.clone(),
                    kind: DiskSnapshotKind::No,
                    image: None,
                    overlay: None,
                }),
            }
        }
        let up = live != DomainState::Shutoff;
        let memory_file = match (memory, up) {
            (Some(Some(path)), true) => Some(path.clone()),
            (Some(None), true) => {
                let first = &self.def.disks[0];
                Some(default_memory(
                    &self.beside(first)?,
                    &self.def.name,
                    request.name,
                ))
            }
            _ => None,
        };
        let state = match (live, &memory_file) {
            (DomainState::Shutoff, _) => SnapshotState::Shutoff,
            (DomainState::Unreachable, _) => {
                return Err(Error::io("the domain is unreachable; nothing was changed"))
            }
            (DomainState::Running, Some(_)) => SnapshotState::Running,
            (DomainState::Paused, Some(_)) => SnapshotState::Paused,
            (_, None) => SnapshotState::DiskSnapshot,
        };
        let memory_format = match &memory_file {
            Some(m) => self.backend.memory_format(live, m),
            None => MemoryFormat::Stream,
        };
        let saved = memory_file
            .clone()
            .map_or(MemoryLocation::No, MemoryLocation::External);
        let snap = Snapshot {
            memory_format,
            ..self.new_snapshot(id, request.named(), state, saved, points)
        };
        let plan = ExternalPlan {
            overlays,
            memory: memory_file,
            memory_format,
        };
        // Every file this create makes: named once, names that fit, none
        // in use, none there already; all checked before anything is made.
        let part = plan
            .memory
            .as_deref()
            .map(crate::backend::external::memory_part_path);
        let files: Vec<&Path> = plan
            .overlays
            .iter()
            .map(|(_, o)| o.as_path())
            .chain(plan.memory.as_deref())
            .chain(part.as_deref())
            .collect();
        super::paths::check_lengths(files.iter().copied())?;
        super::paths::check_distinct(files.iter().copied())?;
        // The new files and the images that become the points.
        let active = self.backend.active_disks();
        let becoming_points = active
            .iter()
            .filter(|a| plan.overlays.iter().any(|(t, _)| t == &a.target))
            .map(|a| a.source.as_path());
        super::paths::check_utf8(files.iter().copied().chain(becoming_points))?;
        crate::backend::external::check_plan_paths(&plan)?;
        let given = disks.iter().any(|(_, p)| p.is_some()) || matches!(memory, Some(Some(_)));
        if given {
            // A file a chain or a snapshot names, even if it is missing.
            self.check_unused(&files)?;
        }
        Ok((plan, snap))
    }

    /// The planned snapshot as the journal keeps it.
    pub(super) fn plan_xml(&self, snap: &Snapshot) -> String {
        let forest = self.forest.read();
        let parent = snap.parent.as_deref().and_then(|p| forest.name_of(p));
        write_snapshot_xml(snap, parent)
    }

    /// Takes the planned external snapshot and records it.
    pub(super) fn create_external_steps(
        &self,
        what: &str,
        plan: &ExternalPlan,
        mut snap: Snapshot,
        live: DomainState,
        hook: Option<&dyn crate::backend::SwitchHook>,
    ) -> Result<()> {
        let outcome: ExternalOutcome = self.backend.create_external(plan, live, hook)?;
        if let Some(note) = &outcome.note {
            self.log.line(&format!("{what}: {note}"));
        }
        if let Some(p) = outcome.paused_for {
            let steps = outcome
                .pause_steps
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            self.log.line(&format!(
                "{what}: guest paused {:.1} ms{steps}",
                p.as_secs_f64() * 1000.0
            ));
        }
        crate::failpoint::hit("create.after-backend")?;
        snap.state = outcome.state;
        snap.machine = outcome.machine;
        if let Some(format) = outcome.memory_format {
            snap.memory_format = format;
        }
        if !outcome.memory_saved {
            snap.memory = MemoryLocation::No;
        }
        for (target, image) in outcome.points {
            if let Some(p) = snap.disks.iter_mut().find(|p| p.target == target) {
                p.image = Some(image);
            }
        }
        self.record_new(snap)?;
        self.committed_devices(&plan.overlays);
        Ok(())
    }

    /// The create onto `overlays` committed: the bytes kept for a device
    /// it formatted are no longer needed (see
    /// [`crate::backend::block_dev::committed`]).
    fn committed_devices(&self, overlays: &[(String, PathBuf)]) {
        for (_, o) in overlays {
            crate::backend::block_dev::committed(o, self.store.dir());
        }
    }

    /// Removes what a failed external create may have made.
    pub(super) fn undo_create_external(&self, id: &str, plan: &ExternalPlan) -> Result<()> {
        self.backend.undo_external(plan)?;
        self.store.remove_snapshot(id)?;
        Ok(())
    }

    /// Finishes or undoes an interrupted external create (start-up).
    pub(super) fn replay_create_external(
        &self,
        id: &str,
        overlays: &[(String, PathBuf)],
        plan_xml: &str,
    ) -> Result<&'static str> {
        // A block device the intent names was accepted before the crash.
        for (_, o) in overlays {
            crate::backend::block_dev::remember(o, &self.def.name);
        }
        let mut snap = snapshot_from_plan(plan_xml)?;
        let memory = match &snap.memory {
            MemoryLocation::External(p) => Some(p.clone()),
            _ => None,
        };
        let plan = ExternalPlan {
            overlays: overlays.to_vec(),
            memory: memory.clone(),
            memory_format: snap.memory_format,
        };
        if self.store.has_snapshot(id) {
            self.set_current(id)?;
            self.committed_devices(overlays);
            return Ok("completed");
        }
        if !self.backend.settle_external(&plan)? {
            return Ok("rolled back");
        }
        if let Some(m) = memory.as_deref().filter(|m| m.exists()) {
            // A live copy that fell back to a background stream wrote
            // another format than the plan says: the file tells.
            if let Ok(Some(format)) = crate::backend::memory_file::format_of_file(m) {
                snap.memory_format = format;
            }
        }
        if memory.is_some_and(|m| !m.exists()) {
            // The disks switched but RAM was not saved: a disk snapshot.
            snap.memory = MemoryLocation::No;
            snap.state = SnapshotState::DiskSnapshot;
            self.log.line(&format!(
                "recovery: snapshot {:?} lost its unfinished memory file; kept as a disk snapshot",
                snap.name
            ));
        }
        self.record_new(snap)?;
        self.committed_devices(overlays);
        Ok("completed (the disks had switched to the new overlays)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths_sit_beside_the_images() {
        assert_eq!(
            default_overlay(Path::new("/img/vm1-vda.qcow2"), "pre upgrade"),
            PathBuf::from("/img/vm1-vda.pre upgrade.qcow2")
        );
        assert_eq!(
            default_memory(Path::new("/img/vm1-vda.qcow2"), "vm1", "s1"),
            PathBuf::from("/img/vm1.s1.memory")
        );
    }
}
