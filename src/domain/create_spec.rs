//! `.create`: a snapshot from a libvirt `<domainsnapshot>` spec, the XML
//! that `virsh snapshot-create` takes. Internal snapshots, with or without
//! RAM, are made here; external ones are refused with EOPNOTSUPP.

use super::{oplog::now_secs, CreateRequest, Domain};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{validate_name, DiskSnapshotKind};
use crate::xml::snapshot::{parse_snapshot_xml, MemorySpec, SnapshotSpec};

/// What a spec asks for, once checked against the domain.
#[derive(Debug, PartialEq, Eq)]
pub struct CheckedSpec {
    /// The name (libvirt's default: the creation time in seconds).
    pub name: String,
    /// The description.
    pub description: Option<String>,
    /// RAM too (when QEMU runs).
    pub memory: bool,
}

/// Checks a spec: names, disks of this domain, what is supported.
pub fn check_spec(spec: SnapshotSpec, targets: &[&str]) -> Result<CheckedSpec> {
    let unsupported = |what: &str| Err(Error::new(ErrorKind::Unsupported, what.to_owned()));
    let name = spec.name.unwrap_or_else(|| now_secs().to_string());
    validate_name(&name)?;
    if spec.quiesce {
        return unsupported("quiesce needs the guest agent, which vmsnapfs does not drive yet");
    }
    let memory = match spec.memory {
        None | Some(MemorySpec::Internal) => true,
        Some(MemorySpec::No) => false,
        Some(MemorySpec::External(_)) => {
            return unsupported(
                "external memory snapshots are not supported yet (use 'internal' or 'no')",
            )
        }
    };
    for d in &spec.disks {
        if !targets.contains(&d.name.as_str()) {
            return Err(Error::invalid(format!(
                "the domain has no disk {:?}",
                d.name
            )));
        }
        match d.kind {
            Some(DiskSnapshotKind::Internal) | None if d.source.is_none() => {}
            Some(DiskSnapshotKind::External) | None => {
                return unsupported(&format!(
                    "disk {}: external disk snapshots are not supported yet",
                    d.name
                ))
            }
            Some(DiskSnapshotKind::No) => {
                return unsupported(&format!(
                "disk {}: internal snapshots cover every disk; leaving one out is not supported",
                d.name
            ))
            }
            Some(DiskSnapshotKind::Internal) => {
                return Err(Error::invalid(format!(
                    "disk {}: an internal snapshot takes no <source>",
                    d.name
                )))
            }
        }
    }
    Ok(CheckedSpec {
        name,
        description: spec.description,
        memory,
    })
}

impl Domain {
    /// `cat spec.xml > .create`: takes the snapshot the spec describes.
    pub fn create_from_spec(&self, xml: &[u8]) -> Result<String> {
        let what = ".create".to_owned();
        let r = (|| {
            let text =
                std::str::from_utf8(xml).map_err(|_| Error::invalid("the spec is not UTF-8"))?;
            let spec = parse_snapshot_xml(text).map_err(|e| Error::invalid(e.to_string()))?;
            let targets: Vec<&str> = self.def.disks.iter().map(|d| d.target.as_str()).collect();
            check_spec(spec, &targets)
        })();
        let checked = match r {
            Ok(c) => c,
            Err(e) => return self.refuse(&what, e),
        };
        let what = format!(".create {:?}", checked.name);
        let request = CreateRequest {
            name: &checked.name,
            description: checked.description.clone(),
            memory: checked.memory,
        };
        self.create_as(&what, request)
            .or_else(|e| self.refuse(&what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(xml: &str) -> Result<CheckedSpec> {
        check_spec(parse_snapshot_xml(xml).unwrap(), &["vda", "vdb"])
    }

    #[test]
    fn libvirt_specs() {
        let c =
            check("<domainsnapshot><name>a</name><description>d</description></domainsnapshot>")
                .unwrap();
        assert_eq!(
            c,
            CheckedSpec {
                name: "a".into(),
                description: Some("d".into()),
                memory: true
            }
        );
        let c = check(
            "<domainsnapshot><name>b</name><memory snapshot='no'/><disks>\
             <disk name='vda' snapshot='internal'/><disk name='vdb'/></disks></domainsnapshot>",
        )
        .unwrap();
        assert!(!c.memory);
        assert!(check("<domainsnapshot/>")
            .unwrap()
            .name
            .parse::<i64>()
            .is_ok());
    }

    #[test]
    fn refusals() {
        let kind = |xml: &str| check(xml).unwrap_err().kind;
        assert_eq!(
            kind("<domainsnapshot><memory snapshot='external' file='/m'/></domainsnapshot>"),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind("<domainsnapshot><disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>"),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind("<domainsnapshot><disks><disk name='vda'><source file='/x'/></disk></disks></domainsnapshot>"),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind("<domainsnapshot><disks><disk name='vdz'/></disks></domainsnapshot>"),
            ErrorKind::Invalid
        );
        // A bad name is refused by the parser already.
        assert!(parse_snapshot_xml("<domainsnapshot><name>.x</name></domainsnapshot>").is_err());
        assert_eq!(
            kind("<domainsnapshot><quiesce/></domainsnapshot>"),
            ErrorKind::Unsupported
        );
    }
}
