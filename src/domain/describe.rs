//! Writing `snapshot.xml`: only `<description>` may change. Every other
//! element the written document carries must equal the snapshot's own.

use super::Domain;
use crate::error::{Error, Result};
use crate::model::{MemoryLocation, Snapshot};
use crate::xml::snapshot::{parse_snapshot_xml, MemorySpec, SnapshotSpec};

/// Checks that `spec` changes nothing but the description of `snap`
/// (whose parent is named `parent`); returns the new description.
pub fn description_change(
    snap: &Snapshot,
    parent: Option<&str>,
    spec: SnapshotSpec,
) -> Result<Option<String>> {
    let differs = |what: &str| {
        Err(Error::invalid(format!(
            "snapshot.xml: only <description> may change, not {what}"
        )))
    };
    if spec.name.as_deref().is_some_and(|n| n != snap.name) {
        return differs("<name> (use mv to rename)");
    }
    if spec.id.as_deref().is_some_and(|i| i != snap.id) {
        return differs("the snapshot id");
    }
    if spec.state.is_some_and(|s| s != snap.state) {
        return differs("<state>");
    }
    if spec.creation_time.is_some_and(|t| t != snap.creation_time) {
        return differs("<creationTime>");
    }
    if spec.parent_name.is_some() && spec.parent_name.as_deref() != parent {
        return differs("<parent>");
    }
    let memory_same = match (&spec.memory, &snap.memory) {
        (None, _) => true,
        (Some(MemorySpec::No), MemoryLocation::No) => true,
        (Some(MemorySpec::Internal), MemoryLocation::Internal) => true,
        (Some(MemorySpec::External(f)), MemoryLocation::External(g)) => {
            f.as_ref().is_none_or(|f| f == g)
        }
        _ => false,
    };
    if !memory_same {
        return differs("<memory>");
    }
    for d in &spec.disks {
        // libvirt's shape names an external disk's overlay; earlier
        // documents named the point.
        let same = snap.disks.iter().any(|p| {
            p.target == d.name
                && d.kind.is_none_or(|k| k == p.kind)
                && d.source
                    .as_ref()
                    .is_none_or(|s| Some(s) == p.image.as_ref() || Some(s) == p.overlay.as_ref())
        });
        if !same {
            return differs(&format!("<disk name='{}'>", d.name));
        }
    }
    if let (Some(new), Some(old)) = (&spec.domain_xml, &snap.domain_xml) {
        // As snapshot.xml shows it (on the snapshot's points) or as recorded.
        let shown = crate::libvirt::snapshots::domain_at_point(snap, old);
        if new.trim() != old.trim() && shown.as_deref().map(str::trim) != Some(new.trim()) {
            return differs("<domain>");
        }
    }
    Ok(spec.description)
}

impl Domain {
    /// A whole `snapshot.xml` document was written: applies its description.
    pub fn write_snapshot_xml(&self, name: &str, xml: &[u8]) -> Result<()> {
        let what = format!("write {name:?}/snapshot.xml");
        let r = (|| {
            let text =
                std::str::from_utf8(xml).map_err(|_| Error::invalid("snapshot.xml: not UTF-8"))?;
            let spec = parse_snapshot_xml(text)
                .map_err(|e| Error::invalid(format!("snapshot.xml: {e}")))?;
            let (snap, parent) = {
                let forest = self.forest();
                let snap = forest
                    .by_name(name)
                    .cloned()
                    .ok_or_else(|| Error::not_found(format!("no snapshot named {name:?}")))?;
                let parent = snap
                    .parent
                    .as_deref()
                    .and_then(|p| forest.name_of(p))
                    .map(str::to_owned);
                (snap, parent)
            };
            description_change(&snap, parent.as_deref(), spec)
        })();
        match r {
            Ok(description) => self.set_description(name, description),
            Err(e) => self.refuse(&what, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DiskPoint, DiskSnapshotKind, SnapshotState};
    use crate::xml::snapshot::write_snapshot_xml;

    fn snap() -> Snapshot {
        Snapshot {
            id: "vs-1".into(),
            name: "base".into(),
            description: Some("old".into()),
            creation_time: 1_700_000_000,
            state: SnapshotState::Running,
            parent: None,
            memory: MemoryLocation::Internal,
            disks: vec![DiskPoint {
                target: "vda".into(),
                kind: DiskSnapshotKind::Internal,
                image: Some("/img/vda.qcow2".into()),
                overlay: None,
            }],
            domain_xml: Some("<domain><name>vm1</name></domain>".into()),
            memory_format: Default::default(),
            machine: None,
        }
    }

    fn apply(xml: &str) -> Result<Option<String>> {
        description_change(&snap(), None, parse_snapshot_xml(xml).unwrap())
    }

    #[test]
    fn the_full_document_with_a_new_description_is_accepted() {
        let mut s = snap();
        s.description = Some("new words".into());
        let xml = write_snapshot_xml(&s, None);
        assert_eq!(apply(&xml).unwrap().as_deref(), Some("new words"));
        let shown = crate::libvirt::snapshots::snapshot_xml(
            &s,
            None,
            s.domain_xml.as_deref(),
            &Default::default(),
        );
        assert_eq!(apply(&shown).unwrap().as_deref(), Some("new words"));
        let short = "<domainsnapshot><description>only this</description></domainsnapshot>";
        assert_eq!(apply(short).unwrap().as_deref(), Some("only this"));
        assert_eq!(apply("<domainsnapshot/>").unwrap(), None);
    }

    #[test]
    fn other_changes_are_refused() {
        for xml in [
            "<domainsnapshot><name>other</name></domainsnapshot>",
            "<domainsnapshot><state>paused</state></domainsnapshot>",
            "<domainsnapshot><parent><name>p</name></parent></domainsnapshot>",
            "<domainsnapshot><memory snapshot='no'/></domainsnapshot>",
            "<domainsnapshot><disks><disk name='vdb' snapshot='internal'/></disks></domainsnapshot>",
            "<domainsnapshot><creationTime>5</creationTime></domainsnapshot>",
        ] {
            assert!(apply(xml).is_err(), "{xml}");
        }
    }
}
