//! libvirt's snapshot list mirrors the tree: every snapshot of a libvirt
//! domain is (re)defined in libvirt's metadata (`virsh snapshot-create
//! --redefine`) in libvirt's own terms, and the ones vmsnapfs defined
//! and no longer has are removed from it (`snapshot-delete --metadata`,
//! images untouched). Snapshots libvirt had of its own are left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::model::{DiskDef, DiskSnapshotKind, MemoryLocation, Snapshot};
use crate::xml::{push_attr_value, push_text};

/// One snapshot as libvirt's `<domainsnapshot>` for `--redefine`:
/// `domain_xml` is libvirt's definition (its disks are set to the
/// snapshot's points here), `parent` the parent's name, `overlays` the
/// image each external disk's writes went to after the snapshot (libvirt's
/// `<source>` of an external disk). Internal disks carry no `<source>`.
pub fn snapshot_xml(
    s: &Snapshot,
    parent: Option<&str>,
    domain_xml: &str,
    formats: &BTreeMap<String, String>,
    overlays: &BTreeMap<String, PathBuf>,
) -> String {
    let mut x = String::from("<domainsnapshot>\n  <name>");
    push_text(&mut x, &s.name);
    x.push_str("</name>\n");
    if let Some(d) = &s.description {
        x.push_str("  <description>");
        push_text(&mut x, d);
        x.push_str("</description>\n");
    }
    x.push_str(&format!(
        "  <state>{}</state>\n  <creationTime>{}</creationTime>\n",
        s.state.as_str(),
        s.creation_time
    ));
    if let Some(p) = parent {
        x.push_str("  <parent>\n    <name>");
        push_text(&mut x, p);
        x.push_str("</name>\n  </parent>\n");
    }
    match &s.memory {
        MemoryLocation::No => x.push_str("  <memory snapshot='no'/>\n"),
        MemoryLocation::Internal => x.push_str("  <memory snapshot='internal'/>\n"),
        MemoryLocation::External(f) => {
            x.push_str("  <memory snapshot='external' file='");
            push_attr_value(&mut x, &f.to_string_lossy());
            x.push_str("'/>\n");
        }
    }
    x.push_str("  <disks>\n");
    for d in &s.disks {
        let mut name = String::new();
        push_attr_value(&mut name, &d.target);
        match d.kind {
            DiskSnapshotKind::External => {
                x.push_str(&format!(
                    "    <disk name='{name}' snapshot='external' type='file'>\n      \
                     <driver type='qcow2'/>\n"
                ));
                if let Some(o) = overlays.get(&d.target) {
                    x.push_str("      <source file='");
                    push_attr_value(&mut x, &o.to_string_lossy());
                    x.push_str("'/>\n");
                }
                x.push_str("    </disk>\n");
            }
            k => x.push_str(&format!(
                "    <disk name='{name}' snapshot='{}'/>\n",
                k.as_str()
            )),
        }
    }
    x.push_str("  </disks>\n");
    // The domain as it was: each disk on the snapshot's point.
    let points: Vec<DiskDef> = s
        .disks
        .iter()
        .filter_map(|d| {
            Some(DiskDef {
                target: d.target.clone(),
                source: d.image.clone()?,
                format: formats
                    .get(&d.target)
                    .cloned()
                    .unwrap_or_else(|| "qcow2".into()),
            })
        })
        .collect();
    let domain = super::define::with_sources(domain_xml, &points)
        .ok()
        .flatten()
        .unwrap_or_else(|| domain_xml.to_owned());
    // Without the XML declaration libvirt would refuse inside an element.
    x.push_str(domain.trim_start_matches(|c: char| c != '<').trim());
    x.push_str("\n</domainsnapshot>\n");
    x
}

/// The image right above `point` in one of `chains` (each top first):
/// the overlay the snapshot whose point it is created.
pub fn overlay_over(point: &Path, chains: &[Vec<PathBuf>]) -> Option<PathBuf> {
    chains.iter().find_map(|c| {
        let i = c.iter().position(|p| p == point)?;
        (i > 0).then(|| c[i - 1].clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DiskPoint, MemoryFormat, SnapshotState};

    #[test]
    fn libvirt_terms_internal_without_source_external_with_the_overlay() {
        let s = Snapshot {
            id: "id1".into(),
            name: "a<b".into(),
            description: Some("d".into()),
            creation_time: 7,
            state: SnapshotState::Running,
            parent: Some("p".into()),
            memory: MemoryLocation::External("/i/m'em".into()),
            disks: vec![
                DiskPoint {
                    target: "vda".into(),
                    kind: DiskSnapshotKind::External,
                    image: Some("/i/a.qcow2".into()),
                },
                DiskPoint {
                    target: "vdb".into(),
                    kind: DiskSnapshotKind::No,
                    image: None,
                },
            ],
            domain_xml: None,
            memory_format: MemoryFormat::Stream,
            machine: None,
        };
        let dom = "<domain type='kvm'><name>d</name><devices><disk type='file' device='disk'>\
                   <driver name='qemu' type='qcow2'/><source file='/i/a.s1.qcow2'/>\
                   <target dev='vda'/></disk></devices></domain>";
        let overlays = BTreeMap::from([("vda".to_string(), PathBuf::from("/i/a.s1.qcow2"))]);
        let x = snapshot_xml(&s, Some("par"), dom, &BTreeMap::new(), &overlays);
        assert!(x.contains("<name>a&lt;b</name>"), "{x}");
        assert!(x.contains("<parent>\n    <name>par</name>"), "{x}");
        assert!(x.contains("file='/i/m&apos;em'"), "{x}");
        assert!(
            x.contains("<source file='/i/a.s1.qcow2'/>\n    </disk>"),
            "{x}"
        );
        assert!(x.contains("<disk name='vdb' snapshot='no'/>"), "{x}");
        // The embedded domain is on the point.
        let d = &x[x.find("<domain").unwrap()..];
        assert!(d.contains("/i/a.qcow2"), "{x}");
    }

    #[test]
    fn the_overlay_is_the_image_above_the_point() {
        let chains = vec![vec![
            PathBuf::from("/top"),
            PathBuf::from("/mid"),
            PathBuf::from("/base"),
        ]];
        assert_eq!(
            overlay_over(Path::new("/base"), &chains),
            Some("/mid".into())
        );
        assert_eq!(overlay_over(Path::new("/top"), &chains), None);
        assert_eq!(overlay_over(Path::new("/x"), &chains), None);
    }
}
