//! The bytes of each generated file and the target of each symlink.

use super::inode::{DomainFile, SnapFile};
use crate::domain::Domain;
use crate::xml::domain::redact_secrets;

/// Contents of a domain file; `uid` decides whether secrets are shown.
pub fn domain_file(dom: &Domain, file: DomainFile, uid: u32) -> Vec<u8> {
    match file {
        DomainFile::State => format!("{}{}", dom.state_text(), dom.damage_lines()).into_bytes(),
        DomainFile::DomainXml if uid == 0 => dom.def.xml.clone().into_bytes(),
        DomainFile::DomainXml => redact_secrets(&dom.def.xml).into_bytes(),
        DomainFile::Tree => dom.forest().render_tree().into_bytes(),
        DomainFile::Log => dom.log_text().into_bytes(),
        DomainFile::Jobs => dom.jobs_text().into_bytes(),
        DomainFile::Current => current_target(dom).unwrap_or_default().into_bytes(),
        DomainFile::Create | DomainFile::Start => Vec::new(),
        // Command lines may hold secrets: root only.
        DomainFile::CommandLine if uid == 0 => dom.commandline_text().into_bytes(),
        DomainFile::CommandLine => Vec::new(),
    }
}

/// Where `.current` points, if there is a current snapshot.
pub fn current_target(dom: &Domain) -> Option<String> {
    let forest = dom.forest();
    forest
        .current()
        .and_then(|id| forest.name_of(id))
        .map(str::to_owned)
}

/// Contents of a snapshot file, `None` when the snapshot is gone.
pub fn snapshot_file(dom: &Domain, id: &str, file: SnapFile, uid: u32) -> Option<Vec<u8>> {
    let forest = dom.forest();
    let snap = forest.get(id)?;
    Some(match file {
        SnapFile::SnapshotXml => {
            let parent = snap.parent.as_deref().and_then(|p| forest.name_of(p));
            let xml = crate::libvirt::snapshots::snapshot_xml(
                snap,
                parent,
                snap.domain_xml.as_deref(),
                &Default::default(),
            );
            if uid == 0 { xml } else { redact_secrets(&xml) }.into_bytes()
        }
        SnapFile::State => {
            let damage = dom.snapshot_damage(snap);
            format!("{}\n{damage}", snap.state.as_str()).into_bytes()
        }
        SnapFile::Parent => parent_target(dom, id)?.into_bytes(),
        SnapFile::Revert
        | SnapFile::Delete
        | SnapFile::Release
        | SnapFile::Disks
        | SnapFile::Images
        | SnapFile::Changes
        | SnapFile::Since
        | SnapFile::Files
        | SnapFile::Memory => Vec::new(),
    })
}

/// Targets of a snapshot's disks that have a frozen view.
pub fn view_targets(dom: &Domain, id: &str) -> Vec<String> {
    let forest = dom.forest();
    forest
        .get(id)
        .map(|s| {
            s.disks
                .iter()
                .filter(|d| d.kind != crate::model::DiskSnapshotKind::No && d.image.is_some())
                .map(|d| d.target.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The image holding a snapshot's point for one disk (`images/<target>`).
pub fn image_of(dom: &Domain, id: &str, target: &str) -> Option<std::path::PathBuf> {
    let forest = dom.forest();
    let d = forest.get(id)?.disks.iter().find(|d| d.target == target)?;
    d.image.clone()
}

/// Where a snapshot's `parent` link points (`../<name>`), if it has a parent.
pub fn parent_target(dom: &Domain, id: &str) -> Option<String> {
    let forest = dom.forest();
    let parent = forest.get(id)?.parent.as_deref()?;
    Some(format!("../{}", forest.name_of(parent)?))
}

/// The memory file of an external checkpoint, if the snapshot has one.
pub fn memory_file(dom: &Domain, id: &str) -> Option<std::path::PathBuf> {
    match &dom.forest().get(id)?.memory {
        crate::model::MemoryLocation::External(p) => Some(p.clone()),
        _ => None,
    }
}
