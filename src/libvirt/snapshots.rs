//! libvirt's snapshot list mirrors the tree: every snapshot of a libvirt
//! domain is (re)defined in libvirt's metadata (`virsh snapshot-create
//! --redefine`) in libvirt's own terms, and the ones vmsnapfs defined
//! and no longer has are removed from it (`snapshot-delete --metadata`,
//! images untouched). Snapshots libvirt had of its own are left alone.
//! [`snapshot_xml`] is also each snapshot's `snapshot.xml` in the tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::model::{DiskDef, DiskSnapshotKind, MemoryLocation, Snapshot};
use crate::xml::snapshot::{embeddable_domain, push_vmsnapfs_element};
use crate::xml::{push_attr_value, push_text};

/// `snapshot.xml`: one snapshot as libvirt's `<domainsnapshot>`, which
/// `virsh snapshot-create --redefine` (and `--validate`) takes unchanged
/// and reads as vmsnapfs means it. `parent` is the parent's name;
/// `domain_xml` the definition recorded when the snapshot was taken,
/// embedded with each disk on the snapshot's point (the images the
/// domain had then, see [`domain_at_point`]).
/// An external disk's `<source>` is the overlay the snapshot created
/// (the image that became active), as recorded, else from `overlays`;
/// internal disks carry none. vmsnapfs's own data sits in `<cookie>`.
pub fn snapshot_xml(
    s: &Snapshot,
    parent: Option<&str>,
    domain_xml: Option<&str>,
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
    x.push_str(&format!("  <state>{}</state>\n", s.state.as_str()));
    if let Some(p) = parent {
        x.push_str("  <parent>\n    <name>");
        push_text(&mut x, p);
        x.push_str("</name>\n  </parent>\n");
    }
    x.push_str(&format!(
        "  <creationTime>{}</creationTime>\n",
        s.creation_time
    ));
    match &s.memory {
        MemoryLocation::No => x.push_str("  <memory snapshot='no'/>\n"),
        MemoryLocation::Internal => x.push_str("  <memory snapshot='internal'/>\n"),
        MemoryLocation::External(f) => {
            x.push_str("  <memory snapshot='external' file='");
            push_attr_value(&mut x, &f.to_string_lossy());
            x.push_str("'/>\n");
        }
    }
    if !s.disks.is_empty() {
        x.push_str("  <disks>\n");
    }
    for d in &s.disks {
        let mut name = String::new();
        push_attr_value(&mut name, &d.target);
        match d.kind {
            DiskSnapshotKind::External => {
                let overlay = d.overlay.as_ref().or_else(|| overlays.get(&d.target));
                // A block device (see `backend::block_dev`) is libvirt's
                // `type='block'` disk, named by `<source dev>`.
                let (kind, key) = match overlay {
                    Some(o) if crate::backend::block_dev::is_device_path(o) => ("block", "dev"),
                    _ => ("file", "file"),
                };
                x.push_str(&format!(
                    "    <disk name='{name}' snapshot='external' type='{kind}'>\n      \
                     <driver type='qcow2'/>\n"
                ));
                if let Some(o) = overlay {
                    x.push_str(&format!("      <source {key}='"));
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
    if !s.disks.is_empty() {
        x.push_str("  </disks>\n");
    }
    if let Some(domain) = domain_xml.and_then(|d| domain_at_point(s, d)) {
        x.push_str("  ");
        x.push_str(&domain);
        x.push('\n');
    }
    x.push_str("  <cookie>\n    ");
    push_vmsnapfs_element(&mut x, s);
    x.push_str("\n  </cookie>\n</domainsnapshot>\n");
    x
}

/// `domain_xml`'s `<domain>` element with each disk of `s` on its point
/// (a point that is the image the recorded definition names keeps its
/// format there; any other is a qcow2 vmsnapfs made); `None` when it is
/// not a well-formed domain document.
pub fn domain_at_point(s: &Snapshot, domain_xml: &str) -> Option<String> {
    let defs = crate::xml::domain::parse_domain_def(domain_xml)
        .map(|d| d.disks)
        .unwrap_or_default();
    let points: Vec<DiskDef> = s
        .disks
        .iter()
        .filter(|d| d.kind != DiskSnapshotKind::No)
        .filter_map(|d| {
            let image = d.image.clone()?;
            let own = defs
                .iter()
                .find(|f| f.target == d.target && f.source == image);
            Some(DiskDef {
                target: d.target.clone(),
                format: own.map_or_else(|| "qcow2".into(), |f| f.format.clone()),
                source: image,
            })
        })
        .collect();
    let moved = super::define::with_sources(domain_xml, &points).ok()?;
    let text = moved.as_deref().unwrap_or(domain_xml);
    match embeddable_domain(text) {
        Ok(element) => Some(element.to_owned()),
        Err(e) => {
            log::warn!(
                "snapshot {:?}: domain XML left out of snapshot.xml: {e}",
                s.id
            );
            None
        }
    }
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
                    overlay: None,
                },
                DiskPoint {
                    target: "vdb".into(),
                    kind: DiskSnapshotKind::No,
                    image: None,
                    overlay: None,
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
        let x = snapshot_xml(&s, Some("par"), Some(dom), &overlays);
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
        // A recorded overlay wins over one found in the chains.
        let mut r = s.clone();
        r.disks[0].overlay = Some("/i/recorded.qcow2".into());
        let x = snapshot_xml(&r, None, Some(dom), &overlays);
        assert!(x.contains("<source file='/i/recorded.qcow2'/>"), "{x}");
        assert!(!x.contains("a.s1.qcow2"), "{x}");
    }

    fn internal() -> Snapshot {
        Snapshot {
            id: "1700000000-1".into(),
            name: "base".into(),
            description: None,
            creation_time: 1_700_000_000,
            state: SnapshotState::Running,
            parent: Some("1699990000-1".into()),
            memory: MemoryLocation::Internal,
            disks: vec![DiskPoint {
                target: "vda".into(),
                kind: DiskSnapshotKind::Internal,
                image: Some("/i/vda.qcow2".into()),
                overlay: None,
            }],
            domain_xml: Some(
                "<?xml version='1.0'?>\n<!-- made by hand -->\n<domain type='kvm'><name>d</name>\
                 <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
                 <driver name='qemu' type='qcow2'/><source file='/i/vda.qcow2'/>\
                 <target dev='vda'/></disk><disk type='file' device='disk'>\
                 <driver name='qemu' type='raw'/><source file='/i/vdb.img'/>\
                 <target dev='vdb'/></disk></devices></domain>\n"
                    .into(),
            ),
            memory_format: MemoryFormat::Stream,
            machine: Some("pc-q35-7.2".into()),
        }
    }

    #[test]
    fn internal_disks_carry_no_source_and_our_data_sits_in_the_cookie() {
        let s = internal();
        let x = snapshot_xml(&s, Some("p"), s.domain_xml.as_deref(), &BTreeMap::new());
        assert!(x.contains("<disk name='vda' snapshot='internal'/>"), "{x}");
        assert!(x.contains("<memory snapshot='internal'/>"), "{x}");
        // Nothing of ours outside <cookie>; no declaration inside.
        let (before, after) = x.split_once("<cookie>").unwrap();
        assert!(!before.contains("vmsnapfs"), "{x}");
        assert!(after.contains("<vmsnapfs id='1700000000-1'"), "{x}");
        assert!(!x.contains("<?xml") && !x.contains("made by hand"), "{x}");
        // The domain as it was, unchanged where the point is its image.
        assert!(x.contains("<domain type='kvm'><name>d</name><os>"), "{x}");
        // vmsnapfs reads its own data back from the cookie.
        let spec = crate::xml::snapshot::parse_snapshot_xml(&x).unwrap();
        assert_eq!(spec.id.as_deref(), Some("1700000000-1"));
        assert_eq!(spec.parent_id.as_deref(), Some("1699990000-1"));
        assert_eq!(spec.machine.as_deref(), Some("pc-q35-7.2"));
        assert_eq!(spec.disks[0].source, None);
        assert_eq!(spec.parent_name.as_deref(), Some("p"));
    }

    #[test]
    fn the_embedded_domain_names_the_points_in_their_formats() {
        let mut s = internal();
        s.memory = MemoryLocation::No;
        s.state = SnapshotState::DiskSnapshot;
        s.disks = vec![
            DiskPoint {
                target: "vda".into(),
                kind: DiskSnapshotKind::External,
                image: Some("/i/vda.e0.qcow2".into()),
                overlay: Some("/i/vda.e1.qcow2".into()),
            },
            DiskPoint {
                target: "vdb".into(),
                kind: DiskSnapshotKind::External,
                image: Some("/i/vdb.img".into()),
                overlay: Some("/i/vdb.e1.qcow2".into()),
            },
        ];
        let x = snapshot_xml(&s, None, s.domain_xml.as_deref(), &BTreeMap::new());
        let domain = crate::xml::snapshot::parse_snapshot_xml(&x)
            .unwrap()
            .domain_xml
            .unwrap();
        let def = crate::xml::domain::parse_domain_def(&domain).unwrap();
        // vda's point is an overlay vmsnapfs made; vdb's the raw image.
        assert_eq!(def.disks[0].source, PathBuf::from("/i/vda.e0.qcow2"));
        assert_eq!(def.disks[0].format, "qcow2");
        assert_eq!(def.disks[1].source, PathBuf::from("/i/vdb.img"));
        assert_eq!(def.disks[1].format, "raw");
        // Each disk's <source> is the overlay the snapshot created.
        let disks = &x[..x.find("  <domain ").unwrap()];
        assert!(disks.contains("<source file='/i/vda.e1.qcow2'/>"), "{x}");
        assert!(disks.contains("<source file='/i/vdb.e1.qcow2'/>"), "{x}");
        assert!(!disks.contains("/i/vdb.img"), "{x}");
        // Without a recorded domain there is none, and the rest stands.
        let x = snapshot_xml(&s, None, None, &BTreeMap::new());
        assert!(!x.contains("<domain "), "{x}");
        let x = snapshot_xml(&s, None, Some("<domain>"), &BTreeMap::new());
        assert!(!x.contains("<domain "), "{x}");
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
