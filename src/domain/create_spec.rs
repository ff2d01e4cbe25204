//! `.create`: a snapshot from a libvirt `<domainsnapshot>` spec, the XML
//! that `virsh snapshot-create` takes: internal (RAM and disks in the
//! qcow2 images) or external (new overlays, RAM to a file).

use std::path::PathBuf;

use super::{oplog::now_secs, CreateKind, CreateRequest, Domain};
use crate::backend::block_dev;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{validate_name, DiskSnapshotKind};
use crate::xml::snapshot::{parse_snapshot_xml, MemorySpec, SnapshotSpec};

/// A block device a spec names, accepted for a disk: target, node, use.
type Accepted = (String, PathBuf, block_dev::DeviceUse);

/// What a spec asks for, once checked against the domain.
#[derive(Debug, PartialEq, Eq)]
pub struct CheckedSpec {
    /// The name (libvirt's default: the creation time in seconds).
    pub name: String,
    /// The description.
    pub description: Option<String>,
    /// Internal or external, with or without RAM.
    pub kind: CreateKind,
    /// `quiesce` as the spec gives it (`None`: the domain's default).
    pub quiesce: Option<bool>,
}

fn absolute(what: &str, p: Option<PathBuf>) -> Result<Option<PathBuf>> {
    match p {
        Some(p) if !p.is_absolute() => Err(Error::invalid(format!(
            "{what} {} is not an absolute path",
            p.display()
        ))),
        p => Ok(p),
    }
}

/// Puts libvirt's other spellings of a creation spec into the ones
/// [`check_spec`] reads: a disk named by its image path (libvirt allows
/// the source path as `<disk name>`) becomes its target, looked up in
/// `disks` (target, images the disk is known by: the defined source and
/// the active layer); `<state>disk-snapshot</state>` without `<memory>`
/// (how `--disk-only` can be written in the XML) becomes
/// `<memory snapshot='no'/>`. An external disk onto a block device
/// (`type='block'`, `<source dev>`) is checked by the domain
/// ([`crate::backend::block_dev::check`]).
pub fn normalize_spec(
    mut spec: SnapshotSpec,
    disks: &[(&str, Vec<&std::path::Path>)],
) -> Result<SnapshotSpec> {
    for d in &mut spec.disks {
        if d.name.starts_with('/') {
            let path = std::path::Path::new(&d.name);
            let found = disks
                .iter()
                .find(|(_, images)| images.contains(&path))
                .map(|(t, _)| t.to_string());
            d.name = found.ok_or_else(|| {
                Error::invalid(format!("no disk of the domain has the image {:?}", d.name))
            })?;
        }
        if d.source.as_deref().is_some_and(block_dev::is_block) {
            d.device = true;
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(d) = spec.disks.iter().find(|d| !seen.insert(d.name.clone())) {
        return Err(Error::invalid(format!("disk {} is named twice", d.name)));
    }
    if spec.state == Some(crate::model::SnapshotState::DiskSnapshot) {
        match spec.memory {
            None => spec.memory = Some(MemorySpec::No),
            Some(MemorySpec::No) => {}
            Some(_) => {
                return Err(Error::invalid(
                    "<state>disk-snapshot</state> with saved memory: a disk-only snapshot has none",
                ))
            }
        }
    }
    Ok(spec)
}

/// Takes out of `spec` the disks it names among `others` (the domain's
/// writable disks that are not image files): each must be left out
/// (`snapshot='no'`), which is all vmsnapfs can do with them
/// (EOPNOTSUPP otherwise). Returns the spec without them and their
/// targets.
pub fn take_other_disks(
    mut spec: SnapshotSpec,
    others: &[&str],
) -> Result<(SnapshotSpec, Vec<String>)> {
    let mut left_out = Vec::new();
    let mut kept = Vec::new();
    for d in spec.disks {
        if !others.contains(&d.name.as_str()) {
            kept.push(d);
            continue;
        }
        if d.kind != Some(DiskSnapshotKind::No) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "disk {} is not an image file; vmsnapfs can only leave it out of a \
                     snapshot (<disk name='{}' snapshot='no'/>)",
                    d.name, d.name
                ),
            ));
        }
        left_out.push(d.name);
    }
    spec.disks = kept;
    Ok((spec, left_out))
}

/// Checks a spec: names, disks of this domain, what is supported.
///
/// Unspecified parts follow the rest: a disk without `snapshot=` is
/// external when the memory or another disk is external, internal
/// otherwise; memory without `snapshot=` is external when a disk is.
pub fn check_spec(spec: SnapshotSpec, targets: &[&str]) -> Result<CheckedSpec> {
    let unsupported = |what: &str| Err(Error::new(ErrorKind::Unsupported, what.to_owned()));
    let name = spec.name.unwrap_or_else(|| now_secs().to_string());
    validate_name(&name)?;
    for d in &spec.disks {
        if !targets.contains(&d.name.as_str()) {
            return Err(Error::invalid(format!(
                "the domain has no disk {:?}",
                d.name
            )));
        }
    }
    let any_external_disk = spec
        .disks
        .iter()
        .any(|d| d.kind == Some(DiskSnapshotKind::External) || d.source.is_some());
    let external = any_external_disk || matches!(spec.memory, Some(MemorySpec::External(_)));
    // Each disk of the domain: its kind and overlay path.
    let mut disks = Vec::new();
    for target in targets {
        let given = spec.disks.iter().find(|d| d.name == *target);
        let kind = given.and_then(|d| d.kind).unwrap_or(if external {
            DiskSnapshotKind::External
        } else {
            DiskSnapshotKind::Internal
        });
        let source = absolute(
            &format!("disk {target}: <source file>"),
            given.and_then(|d| d.source.clone()),
        )?;
        disks.push((target.to_string(), kind, source));
    }
    if !external {
        for (target, kind, source) in &disks {
            if *kind == DiskSnapshotKind::No {
                return unsupported(&format!(
                    "disk {target}: internal snapshots cover every disk; leaving one out is \
                     supported for external snapshots only"
                ));
            }
            if source.is_some() {
                return Err(Error::invalid(format!(
                    "disk {target}: an internal snapshot takes no <source>"
                )));
            }
        }
        let memory = !matches!(spec.memory, Some(MemorySpec::No));
        return Ok(CheckedSpec {
            name,
            description: spec.description,
            kind: CreateKind::Internal { memory },
            quiesce: spec.quiesce,
        });
    }
    if let Some((target, _, _)) = disks
        .iter()
        .find(|(_, k, _)| *k == DiskSnapshotKind::Internal)
    {
        return unsupported(&format!(
            "disk {target}: mixing internal and external disks in one snapshot is not supported"
        ));
    }
    let memory = match spec.memory {
        Some(MemorySpec::Internal) => {
            return unsupported("RAM saved inside a qcow2 image needs internal disk snapshots")
        }
        Some(MemorySpec::No) => None,
        Some(MemorySpec::External(file)) => Some(absolute("memory file", file)?),
        None => Some(None),
    };
    let disks: Vec<(String, Option<PathBuf>)> = disks
        .into_iter()
        .filter(|(_, k, _)| *k == DiskSnapshotKind::External)
        .map(|(t, _, s)| (t, s))
        .collect();
    if disks.is_empty() {
        return Err(Error::invalid(
            "an external snapshot needs at least one disk",
        ));
    }
    Ok(CheckedSpec {
        name,
        description: spec.description,
        kind: CreateKind::External { disks, memory },
        quiesce: spec.quiesce,
    })
}

impl Domain {
    /// `cat spec.xml > .create`: takes the snapshot the spec describes.
    /// Files a caller other than root names must go beside the domain's
    /// disk images, where it could write itself (see [`super::paths`]).
    pub fn create_from_spec(&self, xml: &[u8], caller: &super::Caller) -> Result<String> {
        let what = ".create".to_owned();
        let mut accepted: Vec<Accepted> = Vec::new();
        let r = (|| {
            let text =
                std::str::from_utf8(xml).map_err(|_| Error::invalid("the spec is not UTF-8"))?;
            let spec = parse_snapshot_xml(text).map_err(|e| Error::invalid(e.to_string()))?;
            let others: Vec<&str> = self
                .def
                .other_disks
                .iter()
                .map(|d| d.target.as_str())
                .collect();
            let (spec, left_out) = take_other_disks(spec, &others)?;
            let active = self.backend.active_disks();
            let known: Vec<(&str, Vec<&std::path::Path>)> = self
                .def
                .disks
                .iter()
                .map(|d| {
                    let mut images = vec![d.source.as_path()];
                    images.extend(
                        active
                            .iter()
                            .filter(|a| a.target == d.target)
                            .map(|a| a.source.as_path()),
                    );
                    (d.target.as_str(), images)
                })
                .collect();
            let spec = normalize_spec(spec, &known)?;
            let devices: Vec<String> = spec
                .disks
                .iter()
                .filter(|d| d.device && d.source.is_some())
                .map(|d| d.name.clone())
                .collect();
            let targets: Vec<&str> = self.def.disks.iter().map(|d| d.target.as_str()).collect();
            let mut checked = check_spec(spec, &targets)?;
            if let CreateKind::External { disks, memory } = &mut checked.kind {
                for (target, path) in disks.iter_mut() {
                    let Some(p) = path else { continue };
                    if devices.contains(target) {
                        let node = self.check_device(target, p, caller, &mut accepted)?;
                        *p = node;
                    } else {
                        self.check_caller_path(caller, &format!("disk {target}: overlay"), p)?;
                    }
                }
                if let Some(Some(p)) = memory {
                    self.check_caller_path(caller, "memory file", p)?;
                }
            }
            Ok((checked, left_out))
        })();
        let (checked, left_out) = match r {
            Ok(c) => c,
            Err(e) => {
                release_all(&accepted);
                return self.refuse(&what, e);
            }
        };
        let what = format!(".create {:?}", checked.name);
        let request = CreateRequest {
            name: &checked.name,
            description: checked.description.clone(),
            kind: checked.kind.clone(),
            quiesce: checked.quiesce,
            left_out,
        };
        for (target, node, usage) in &accepted {
            self.log
                .line(&format!("{what}: {}", device_note(target, node, *usage)));
        }
        self.create_as(&what, request).or_else(|e| {
            release_all(&accepted);
            self.refuse(&what, e)
        })
    }

    /// Checks the block device `named` that a spec gives for `target`
    /// (see [`block_dev::check`]) and returns its node, noted in
    /// `accepted`.
    fn check_device(
        &self,
        target: &str,
        named: &std::path::Path,
        caller: &super::Caller,
        accepted: &mut Vec<Accepted>,
    ) -> Result<PathBuf> {
        let active = self.backend.active_disks();
        let now = active
            .iter()
            .find(|d| d.target == target)
            .ok_or_else(|| Error::invalid(format!("the domain has no disk {target:?}")))?;
        let over = block_dev::Over {
            domain: &self.def.name,
            target,
            active: &now.source,
            format: &now.format,
        };
        let (node, usage) = block_dev::check(named, &over, caller.uid == 0)?;
        accepted.push((target.to_owned(), node.clone(), usage));
        Ok(node)
    }
}

/// The `.log` line that says how an accepted device is used.
fn device_note(target: &str, node: &std::path::Path, usage: block_dev::DeviceUse) -> String {
    match usage {
        block_dev::DeviceUse::Format => format!(
            "disk {target}: block device {} is blank and listed in --format-devices; it is \
             formatted as the new overlay",
            node.display()
        ),
        block_dev::DeviceUse::Reuse => format!(
            "disk {target}: block device {} holds a qcow2 over the disk's active layer; it \
             becomes the new overlay as it is",
            node.display()
        ),
    }
}

/// Releases the devices a failed create had accepted (nothing was
/// written to them, or the create's undo put it back with
/// [`block_dev::undo`]; a create whose undo failed leaves its intent, and
/// the saved bytes, to the recovery at the next start).
fn release_all(accepted: &[Accepted]) {
    for (_, p, _) in accepted {
        block_dev::release(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_disks_can_only_be_left_out() {
        let spec = |xml: &str| parse_snapshot_xml(xml).unwrap();
        let (rest, left) = take_other_disks(
            spec(
                "<domainsnapshot><disks><disk name='vda' snapshot='internal'/>\
                  <disk name='sdb' snapshot='no'/></disks></domainsnapshot>",
            ),
            &["sdb"],
        )
        .unwrap();
        assert_eq!(left, vec!["sdb".to_owned()]);
        assert_eq!(rest.disks.len(), 1);
        assert_eq!(rest.disks[0].name, "vda");
        for kind in ["snapshot='external'", "snapshot='internal'", ""] {
            let e = take_other_disks(
                spec(&format!(
                    "<domainsnapshot><disks><disk name='sdb' {kind}/></disks></domainsnapshot>"
                )),
                &["sdb"],
            )
            .unwrap_err();
            assert_eq!(e.kind, ErrorKind::Unsupported, "{kind}");
        }
    }

    fn check(xml: &str) -> Result<CheckedSpec> {
        check_spec(parse_snapshot_xml(xml).unwrap(), &["vda", "vdb"])
    }

    #[test]
    fn libvirt_spellings_disks_by_path_and_disk_only_by_state() {
        let known: Vec<(&str, Vec<&std::path::Path>)> = vec![
            (
                "vda",
                vec![
                    std::path::Path::new("/i/a.qcow2"),
                    std::path::Path::new("/i/a.s1.qcow2"),
                ],
            ),
            ("vdb", vec![std::path::Path::new("/i/b.qcow2")]),
        ];
        let norm = |xml: &str| normalize_spec(parse_snapshot_xml(xml).unwrap(), &known);
        // As virsh snapshot-create-as --diskspec PATH,... --print-xml writes it.
        let s = norm(
            "<domainsnapshot><name>p3</name><memory snapshot='external' file='/tmp/m'/>\
             <disks><disk name='/i/a.s1.qcow2' snapshot='external'/></disks></domainsnapshot>",
        )
        .unwrap();
        assert_eq!(s.disks[0].name, "vda");
        let e = norm("<domainsnapshot><disks><disk name='/i/c.qcow2'/></disks></domainsnapshot>")
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        let e = norm(
            "<domainsnapshot><disks><disk name='/i/a.qcow2'/><disk name='vda'/></disks>\
             </domainsnapshot>",
        )
        .unwrap_err();
        assert!(e.message.contains("named twice"), "{}", e.message);
        // --disk-only spelled in the XML.
        let s = norm("<domainsnapshot><state>disk-snapshot</state></domainsnapshot>").unwrap();
        assert_eq!(s.memory, Some(MemorySpec::No));
        let c = check_spec(s, &["vda", "vdb"]).unwrap();
        assert_eq!(c.kind, CreateKind::Internal { memory: false });
        assert!(norm(
            "<domainsnapshot><state>disk-snapshot</state><memory snapshot='internal'/>\
             </domainsnapshot>"
        )
        .is_err());
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
                kind: CreateKind::Internal { memory: true },
                quiesce: None,
            }
        );
        let c = check(
            "<domainsnapshot><name>b</name><memory snapshot='no'/><disks>\
             <disk name='vda' snapshot='internal'/><disk name='vdb'/></disks></domainsnapshot>",
        )
        .unwrap();
        assert_eq!(c.kind, CreateKind::Internal { memory: false });
        assert!(check("<domainsnapshot/>")
            .unwrap()
            .name
            .parse::<i64>()
            .is_ok());
    }

    #[test]
    fn external_specs() {
        let c = check(
            "<domainsnapshot><name>e</name><memory snapshot='external' file='/m/e.mem'/>\
             <disks><disk name='vda' snapshot='external'><source file='/o/a.qcow2'/></disk>\
             <disk name='vdb' snapshot='no'/></disks></domainsnapshot>",
        )
        .unwrap();
        assert_eq!(
            c.kind,
            CreateKind::External {
                disks: vec![("vda".into(), Some("/o/a.qcow2".into()))],
                memory: Some(Some("/m/e.mem".into())),
            }
        );
        // virsh snapshot-create-as --disk-only: every disk external, no RAM.
        let c = check(
            "<domainsnapshot><memory snapshot='no'/><disks>\
             <disk name='vda' snapshot='external'/></disks></domainsnapshot>",
        )
        .unwrap();
        assert_eq!(
            c.kind,
            CreateKind::External {
                disks: vec![("vda".into(), None), ("vdb".into(), None)],
                memory: None,
            }
        );
    }

    #[test]
    fn refusals() {
        let kind = |xml: &str| check(xml).unwrap_err().kind;
        assert_eq!(
            kind("<domainsnapshot><memory snapshot='internal'/><disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>"),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind("<domainsnapshot><disks><disk name='vda' snapshot='external'/><disk name='vdb' snapshot='internal'/></disks></domainsnapshot>"),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind(
                "<domainsnapshot><disks><disk name='vda' snapshot='no'/></disks></domainsnapshot>"
            ),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind("<domainsnapshot><disks><disk name='vda'><source file='rel.qcow2'/></disk></disks></domainsnapshot>"),
            ErrorKind::Invalid
        );
        assert_eq!(
            kind("<domainsnapshot><memory snapshot='external' file='/m'/><disks><disk name='vda' snapshot='no'/><disk name='vdb' snapshot='no'/></disks></domainsnapshot>"),
            ErrorKind::Invalid
        );
        assert_eq!(
            kind("<domainsnapshot><disks><disk name='vdz'/></disks></domainsnapshot>"),
            ErrorKind::Invalid
        );
        // A bad name is refused by the parser already.
        assert!(parse_snapshot_xml("<domainsnapshot><name>.x</name></domainsnapshot>").is_err());
        // Quiesce is read here and decided against the domain's state
        // when the snapshot is taken (see `domain::quiesce::decide`).
        assert_eq!(
            check("<domainsnapshot><memory snapshot='no'/><quiesce/></domainsnapshot>")
                .unwrap()
                .quiesce,
            Some(true)
        );
        assert_eq!(
            check("<domainsnapshot quiesce='no'/>").unwrap().quiesce,
            Some(false)
        );
    }
}
