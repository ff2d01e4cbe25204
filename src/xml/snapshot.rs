//! `<domainsnapshot>` documents, as libvirt writes and reads them.
//!
//! [`write_snapshot_xml`] writes vmsnapfs's own record of one snapshot
//! (what the store and the journal keep; `snapshot.xml` in the tree is
//! the libvirt-shaped document of `crate::libvirt::snapshots`);
//! [`parse_snapshot_xml`] reads both back and also the creation specs
//! users write for `virsh snapshot-create` (and for `.create`), where
//! every element is optional. [`snapshot_from_spec`] turns a parsed
//! record into a [`Snapshot`].
//!
//! A record looks like this: each disk's `<source>` is its point (the
//! image holding the snapshot), `overlay` the image an external snapshot
//! created, `<vmsnapfs>` what libvirt has no words for (in `snapshot.xml`
//! it sits inside libvirt's `<cookie>`, where libvirt's schema allows it):
//!
//! ```xml
//! <domainsnapshot>
//!   <name>pre-upgrade</name>
//!   <description>before apt upgrade</description>
//!   <state>running</state>
//!   <parent>
//!     <name>base</name>
//!   </parent>
//!   <creationTime>1700000000</creationTime>
//!   <memory snapshot='internal'/>
//!   <disks>
//!     <disk name='vda' snapshot='internal' type='file'>
//!       <source file='/var/lib/vm1/vda.qcow2'/>
//!     </disk>
//!     <disk name='vdb' snapshot='external' overlay='/var/lib/vm1/vdb.pre-upgrade.qcow2' type='file'>
//!       <source file='/var/lib/vm1/vdb.qcow2'/>
//!     </disk>
//!   </disks>
//!   <domain>...</domain>
//!   <vmsnapfs id='1700000000-1' parent-id='1699990000-1'/>
//! </domainsnapshot>
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::limits::MAX_DEPTH;
use super::tree::{self, Element};
use super::{push_attr_value, push_text, trim_xml, XmlError};
use crate::model::{
    validate_name, DiskPoint, DiskSnapshotKind, MemoryFormat, MemoryLocation, Snapshot,
    SnapshotState,
};

/// The root element of a snapshot document.
const ROOT: &str = "domainsnapshot";

/// Values of `<state>` (`shutdown` is also read, as `shutoff`).
const STATES: &[&str] = &["running", "paused", "shutoff", "disk-snapshot"];

/// Values of `snapshot='...'` on `<memory>` and `<disk>`.
const LOCATIONS: &[&str] = &["no", "internal", "external"];

/// Values of a yes/no flag.
const FLAGS: &[&str] = &["yes", "no"];

/// How the saved state of a requested snapshot is to be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemorySpec {
    /// `<memory snapshot='no'/>`: no saved state (disks only).
    No,
    /// `<memory snapshot='internal'/>`: inside the first qcow2 disk.
    Internal,
    /// `<memory snapshot='external' file='...'/>`: in a file of its own;
    /// `None` when the spec names no file.
    External(Option<PathBuf>),
}

/// One `<disk>` of a `<domainsnapshot>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The `name` attribute: a target such as `vda` or, as libvirt allows in
    /// a creation spec, the disk's source path (the caller resolves it).
    pub name: String,
    /// The `snapshot` attribute; when absent but a `<source>` is given,
    /// `External` (libvirt's rule). `None` means "the default".
    pub kind: Option<DiskSnapshotKind>,
    /// `<source file='...'/>` (or `dev`): the overlay or image file.
    pub source: Option<PathBuf>,
    /// The source is a block device: `type='block'` on the disk, or
    /// `<source dev='...'/>`.
    pub device: bool,
    /// The `overlay` attribute of vmsnapfs's own record: the overlay an
    /// external snapshot created (its `<source>` there is the point).
    pub overlay: Option<PathBuf>,
}

/// A parsed `<domainsnapshot>`: a stored document or a creation spec.
///
/// Every field is optional because a creation spec may leave anything out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotSpec {
    /// `<name>`, trimmed; a valid snapshot name when present.
    pub name: Option<String>,
    /// `<description>`, exactly as written (white space kept).
    pub description: Option<String>,
    /// `<state>`.
    pub state: Option<SnapshotState>,
    /// `<parent><name>`, trimmed; a valid snapshot name when present.
    pub parent_name: Option<String>,
    /// `<creationTime>`, seconds since the epoch.
    pub creation_time: Option<i64>,
    /// `<memory>`; `None` when absent or when it says neither `snapshot`
    /// nor `file`.
    pub memory: Option<MemorySpec>,
    /// `<disks>`, in document order; no two share a name.
    pub disks: Vec<DiskSpec>,
    /// The `<domain>` element, as the exact slice of the input.
    pub domain_xml: Option<String>,
    /// `<vmsnapfs id>`: our snapshot id; a valid file name when present.
    pub id: Option<String>,
    /// `<vmsnapfs parent-id>`: the parent's id; a valid file name when present.
    pub parent_id: Option<String>,
    /// `<vmsnapfs memory-format>`: how the memory file holds the RAM
    /// (absent: a plain stream).
    pub memory_format: Option<MemoryFormat>,
    /// `<vmsnapfs machine>`: the machine type the saved state needs.
    pub machine: Option<String>,
    /// Whether the guest's file systems are to be frozen for a disk-only
    /// snapshot: a `<quiesce/>` element (text, if any, `yes` or `no`) or a
    /// `quiesce='yes'|'no'` attribute on the root; `None` when neither is
    /// given (the domain's default applies).
    pub quiesce: Option<bool>,
}

/// Writes `snap` as a libvirt-compatible `<domainsnapshot>` document,
/// indented by two spaces, ending with a newline.
///
/// `parent_name` is the parent's current name (the snapshot records only
/// its id); `<parent>` is left out when it is `None`. The domain XML is
/// inserted verbatim as a child element, without any XML declaration or
/// comments around its root; if it is not a well-formed `<domain>` document
/// within the parse limits it is left out (with a warning in the log),
/// since the result must stay readable. Paths that are not UTF-8 are written
/// lossily, and characters XML cannot carry become U+FFFD.
pub fn write_snapshot_xml(snap: &Snapshot, parent_name: Option<&str>) -> String {
    let mut out = String::with_capacity(
        512 + snap.domain_xml.as_ref().map_or(0, String::len)
            + snap.description.as_ref().map_or(0, String::len),
    );
    out.push_str("<domainsnapshot>\n");
    text_element(&mut out, 1, "name", &snap.name);
    if let Some(description) = &snap.description {
        text_element(&mut out, 1, "description", description);
    }
    text_element(&mut out, 1, "state", snap.state.as_str());
    if let Some(parent) = parent_name {
        out.push_str("  <parent>\n");
        text_element(&mut out, 2, "name", parent);
        out.push_str("  </parent>\n");
    }
    text_element(&mut out, 1, "creationTime", &snap.creation_time.to_string());
    match &snap.memory {
        MemoryLocation::No => out.push_str("  <memory snapshot='no'/>\n"),
        MemoryLocation::Internal => out.push_str("  <memory snapshot='internal'/>\n"),
        MemoryLocation::External(file) => {
            out.push_str("  <memory snapshot='external' file='");
            push_path(&mut out, file);
            out.push_str("'/>\n");
        }
    }
    if !snap.disks.is_empty() {
        out.push_str("  <disks>\n");
        for disk in &snap.disks {
            out.push_str("    <disk name='");
            push_attr_value(&mut out, &disk.target);
            out.push_str("' snapshot='");
            out.push_str(disk.kind.as_str());
            if let Some(overlay) = &disk.overlay {
                out.push_str("' overlay='");
                push_path(&mut out, overlay);
            }
            match &disk.image {
                None => out.push_str("'/>\n"),
                Some(image) => {
                    out.push_str("' type='file'>\n      <source file='");
                    push_path(&mut out, image);
                    out.push_str("'/>\n    </disk>\n");
                }
            }
        }
        out.push_str("  </disks>\n");
    }
    if let Some(domain_xml) = &snap.domain_xml {
        match embeddable_domain(domain_xml) {
            Ok(element) => {
                out.push_str("  ");
                out.push_str(element);
                out.push('\n');
            }
            Err(err) => log::warn!(
                "snapshot {:?}: domain XML left out of snapshot.xml: {err}",
                snap.id
            ),
        }
    }
    out.push_str("  ");
    push_vmsnapfs_element(&mut out, snap);
    out.push_str("\n</domainsnapshot>\n");
    out
}

/// Appends `<vmsnapfs id=... parent-id=... memory-format=... machine=.../>`:
/// what vmsnapfs keeps of a snapshot beyond libvirt's terms.
pub fn push_vmsnapfs_element(out: &mut String, snap: &Snapshot) {
    out.push_str("<vmsnapfs id='");
    push_attr_value(out, &snap.id);
    out.push('\'');
    if let Some(parent) = &snap.parent {
        out.push_str(" parent-id='");
        push_attr_value(out, parent);
        out.push('\'');
    }
    if matches!(snap.memory, MemoryLocation::External(_)) {
        out.push_str(" memory-format='");
        out.push_str(snap.memory_format.as_str());
        out.push('\'');
    }
    if let Some(machine) = &snap.machine {
        out.push_str(" machine='");
        push_attr_value(out, machine);
        out.push('\'');
    }
    out.push_str("/>");
}

/// Appends `<tag>text</tag>` on a line of its own at `level` indentation.
fn text_element(out: &mut String, level: usize, tag: &str, text: &str) {
    for _ in 0..level {
        out.push_str("  ");
    }
    out.push('<');
    out.push_str(tag);
    out.push('>');
    push_text(out, text);
    out.push_str("</");
    out.push_str(tag);
    out.push_str(">\n");
}

/// Appends a path as an attribute value.
fn push_path(out: &mut String, path: &Path) {
    push_attr_value(out, &path.to_string_lossy());
}

/// The `<domain>` root element of `xml` as a slice, if `xml` is a
/// well-formed domain document that still parses one level deeper.
pub fn embeddable_domain(xml: &str) -> Result<&str, XmlError> {
    let root = tree::parse_with_depth(xml, MAX_DEPTH - 1)?;
    root.expect_root("domain")?;
    xml.get(root.span.clone())
        .ok_or_else(|| tree::malformed(xml, root.span.start, "element boundaries lost"))
}

/// Parses a `<domainsnapshot>` document: one [`write_snapshot_xml`] wrote,
/// or a creation spec in libvirt's format.
///
/// Unknown elements and attributes are ignored (so is `<driver>` inside a
/// `<disk>`). Names are trimmed and checked with [`validate_name`]; enum
/// values outside libvirt's sets are errors that list the allowed values.
pub fn parse_snapshot_xml(xml: &str) -> Result<SnapshotSpec, XmlError> {
    let root = tree::parse(xml)?;
    root.expect_root(ROOT)?;

    let name = match root.child("name")? {
        Some(name) => Some(checked_name(&name.text, "snapshot name")?),
        None => None,
    };
    let description = root.child("description")?.map(|d| d.text.clone());
    let state = match root.child("state")? {
        Some(state) => Some(parse_state(trim_xml(&state.text))?),
        None => None,
    };
    let parent_name = match root.child("parent")? {
        Some(parent) => Some(checked_name(
            &parent.required_child("name")?.text,
            "parent name",
        )?),
        None => None,
    };
    let creation_time = match root.child("creationTime")? {
        Some(time) => Some(parse_time(trim_xml(&time.text))?),
        None => None,
    };
    let memory = match root.child("memory")? {
        Some(memory) => parse_memory(memory)?,
        None => None,
    };
    let disks = match root.child("disks")? {
        Some(disks) => parse_disks(disks)?,
        None => Vec::new(),
    };
    let domain_xml = match root.child("domain")? {
        Some(domain) => Some(
            xml.get(domain.span.clone())
                .ok_or_else(|| tree::malformed(xml, domain.span.start, "element boundaries lost"))?
                .to_string(),
        ),
        None => None,
    };
    // At the root in vmsnapfs's records, inside libvirt's <cookie> in
    // the libvirt-shaped snapshot.xml.
    let ours = match root.child("vmsnapfs")? {
        Some(ours) => Some(ours),
        None => match root.child("cookie")? {
            Some(cookie) => cookie.child("vmsnapfs")?,
            None => None,
        },
    };
    let (id, parent_id) = match ours {
        Some(ours) => (
            ours.attr("id")
                .map(|id| checked_id(id, "snapshot id"))
                .transpose()?,
            ours.attr("parent-id")
                .map(|id| checked_id(id, "parent id"))
                .transpose()?,
        ),
        None => (None, None),
    };
    let memory_format = match ours.and_then(|o| o.attr("memory-format")) {
        Some(f) => Some(MemoryFormat::parse(f).ok_or_else(|| {
            XmlError::bad_choice("<vmsnapfs memory-format>", f, &["stream", "mapped-ram"])
        })?),
        None => None,
    };
    let machine = match ours.and_then(|o| o.attr("machine")) {
        Some(m) => Some(checked_machine(m)?),
        None => None,
    };
    let mut quiesce = match root.attr("quiesce") {
        Some(flag) => Some(parse_flag(flag, "<domainsnapshot quiesce>")?),
        None => None,
    };
    if let Some(element) = root.child("quiesce")? {
        let flag = trim_xml(&element.text);
        let element = flag.is_empty() || parse_flag(flag, "<quiesce>")?;
        quiesce = Some(quiesce.unwrap_or(false) || element);
    }

    Ok(SnapshotSpec {
        name,
        description,
        state,
        parent_name,
        creation_time,
        memory,
        disks,
        domain_xml,
        id,
        parent_id,
        memory_format,
        machine,
        quiesce,
    })
}

/// A machine type as QEMU names it: letters, digits, `.`, `-`, `_`.
fn checked_machine(m: &str) -> Result<String, XmlError> {
    let ok = !m.is_empty()
        && m.len() <= 64
        && m.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(m.to_owned())
    } else {
        Err(XmlError::bad_value(
            "<vmsnapfs machine>",
            m,
            "not a QEMU machine type",
        ))
    }
}

/// A trimmed snapshot name that passes [`validate_name`].
fn checked_name(text: &str, what: &'static str) -> Result<String, XmlError> {
    let name = trim_xml(text);
    validate_name(name).map_err(|e| XmlError::invalid_name(what, name, e))?;
    Ok(name.to_string())
}

/// A snapshot id: also a file name and a qcow2 tag, so the name rules apply.
fn checked_id(id: &str, what: &'static str) -> Result<String, XmlError> {
    validate_name(id).map_err(|e| XmlError::invalid_name(what, id, e))?;
    Ok(id.to_string())
}

/// Reads `<state>`.
fn parse_state(text: &str) -> Result<SnapshotState, XmlError> {
    SnapshotState::parse(text).ok_or_else(|| XmlError::bad_choice("<state>", text, STATES))
}

/// Reads `<creationTime>`: whole seconds since the epoch.
fn parse_time(text: &str) -> Result<i64, XmlError> {
    text.parse().map_err(|_| {
        XmlError::bad_value(
            "<creationTime>",
            text,
            "expected whole seconds since the epoch",
        )
    })
}

/// Reads a `snapshot='...'` location.
fn parse_location(value: &str, what: &'static str) -> Result<DiskSnapshotKind, XmlError> {
    DiskSnapshotKind::parse(value).ok_or_else(|| XmlError::bad_choice(what, value, LOCATIONS))
}

/// Reads a yes/no flag (also `true`/`false`, `on`/`off`, `1`/`0`).
fn parse_flag(value: &str, what: &'static str) -> Result<bool, XmlError> {
    match value {
        "yes" | "true" | "on" | "1" => Ok(true),
        "no" | "false" | "off" | "0" => Ok(false),
        other => Err(XmlError::bad_choice(what, other, FLAGS)),
    }
}

/// A path attribute, which must not be empty.
fn non_empty_path(value: &str, what: &'static str) -> Result<PathBuf, XmlError> {
    if value.is_empty() {
        return Err(XmlError::bad_value(what, value, "empty path"));
    }
    Ok(PathBuf::from(value))
}

/// Reads `<memory snapshot='...' file='...'/>`; a file alone means external.
fn parse_memory(memory: &Element) -> Result<Option<MemorySpec>, XmlError> {
    let file = memory
        .attr("file")
        .map(|file| non_empty_path(file, "<memory file>"))
        .transpose()?;
    let kind = memory
        .attr("snapshot")
        .map(|kind| parse_location(kind, "<memory snapshot>"))
        .transpose()?;
    Ok(match (kind, file) {
        (None, None) => None,
        (None | Some(DiskSnapshotKind::External), file) => Some(MemorySpec::External(file)),
        (Some(DiskSnapshotKind::No), None) => Some(MemorySpec::No),
        (Some(DiskSnapshotKind::Internal), None) => Some(MemorySpec::Internal),
        (Some(kind), Some(file)) => {
            return Err(XmlError::bad_value(
                "<memory file>",
                &file.to_string_lossy(),
                format!(
                    "a memory file needs snapshot='external', not '{}'",
                    kind.as_str()
                ),
            ))
        }
    })
}

/// Reads the `<disk>` children of `<disks>`.
fn parse_disks(disks: &Element) -> Result<Vec<DiskSpec>, XmlError> {
    let mut specs: Vec<DiskSpec> = Vec::new();
    let mut seen = HashSet::new();
    for disk in disks.children_named("disk") {
        let name = disk.required_attr("name")?;
        if name.is_empty() {
            return Err(XmlError::bad_value("<disk name>", name, "empty name"));
        }
        if !seen.insert(name) {
            return Err(XmlError::Duplicate {
                what: "disk",
                value: name.to_string(),
            });
        }
        let kind = disk
            .attr("snapshot")
            .map(|kind| parse_location(kind, "<disk snapshot>"))
            .transpose()?;
        let mut device = disk.attr("type") == Some("block");
        let source = match disk.child("source")? {
            Some(source) => {
                device |= source.attr("file").is_none() && source.attr("dev").is_some();
                let file = source
                    .attr("file")
                    .or_else(|| source.attr("dev"))
                    .ok_or_else(|| XmlError::MissingAttribute {
                        element: source.name.clone(),
                        attribute: "file",
                    })?;
                Some(non_empty_path(file, "<source file>")?)
            }
            None => None,
        };
        // libvirt: a source without a snapshot attribute implies external.
        let kind = kind.or(source.as_ref().map(|_| DiskSnapshotKind::External));
        let overlay = disk
            .attr("overlay")
            .map(|o| non_empty_path(o, "<disk overlay>"))
            .transpose()?;
        specs.push(DiskSpec {
            name: name.to_string(),
            kind,
            source,
            device,
            overlay,
        });
    }
    Ok(specs)
}

/// Turns a parsed stored document into the [`Snapshot`] it describes, and
/// the parent's name from `<parent>` if the document has one.
///
/// Needs `<name>`, `<state>`, `<creationTime>` and `<vmsnapfs id>`, and a
/// `snapshot` kind on every disk, whose name must be a target (a valid file
/// name). [`Snapshot::parent`] is the `parent-id`; the parent's name is only
/// returned, for the caller to check or to resolve when a document written
/// by another tool has a `<parent>` but no id. A missing `<memory>` means
/// [`MemoryLocation::No`]; an external one without a file is an error.
pub fn snapshot_from_spec(spec: SnapshotSpec) -> Result<(Snapshot, Option<String>), XmlError> {
    let missing = |element| XmlError::MissingElement {
        parent: ROOT.to_string(),
        element,
    };
    let name = spec.name.ok_or_else(|| missing("name"))?;
    validate_name(&name).map_err(|e| XmlError::invalid_name("snapshot name", &name, e))?;
    let id = spec.id.ok_or_else(|| XmlError::MissingAttribute {
        element: "vmsnapfs".to_string(),
        attribute: "id",
    })?;
    validate_name(&id).map_err(|e| XmlError::invalid_name("snapshot id", &id, e))?;
    let state = spec.state.ok_or_else(|| missing("state"))?;
    let creation_time = spec.creation_time.ok_or_else(|| missing("creationTime"))?;
    let memory = match spec.memory {
        None | Some(MemorySpec::No) => MemoryLocation::No,
        Some(MemorySpec::Internal) => MemoryLocation::Internal,
        Some(MemorySpec::External(Some(file))) => MemoryLocation::External(file),
        Some(MemorySpec::External(None)) => {
            return Err(XmlError::MissingAttribute {
                element: "memory".to_string(),
                attribute: "file",
            })
        }
    };
    let disks = spec
        .disks
        .into_iter()
        .map(|disk| {
            validate_name(&disk.name)
                .map_err(|e| XmlError::invalid_name("disk target", &disk.name, e))?;
            let kind = disk.kind.ok_or_else(|| XmlError::MissingAttribute {
                element: "disk".to_string(),
                attribute: "snapshot",
            })?;
            Ok(DiskPoint {
                target: disk.name,
                kind,
                image: disk.source,
                overlay: disk.overlay,
            })
        })
        .collect::<Result<Vec<_>, XmlError>>()?;
    let snapshot = Snapshot {
        id,
        name,
        description: spec.description,
        creation_time,
        state,
        parent: spec.parent_id,
        memory,
        disks,
        domain_xml: spec.domain_xml,
        memory_format: spec.memory_format.unwrap_or_default(),
        machine: spec.machine,
    };
    Ok((snapshot, spec.parent_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            id: "1700000000-1".into(),
            name: "pre-upgrade".into(),
            description: Some("before apt upgrade".into()),
            creation_time: 1_700_000_000,
            state: SnapshotState::Running,
            parent: Some("1699990000-1".into()),
            memory: MemoryLocation::Internal,
            disks: vec![
                DiskPoint {
                    target: "vda".into(),
                    kind: DiskSnapshotKind::Internal,
                    image: None,
                    overlay: None,
                },
                DiskPoint {
                    target: "vdb".into(),
                    kind: DiskSnapshotKind::External,
                    image: Some("/path/vdb.snap1.qcow2".into()),
                    overlay: None,
                },
            ],
            domain_xml: Some("<domain type='kvm'>\n  <name>vm1</name>\n</domain>".into()),
            memory_format: Default::default(),
            machine: None,
        }
    }

    fn round_trip(snap: &Snapshot, parent_name: Option<&str>) {
        let xml = write_snapshot_xml(snap, parent_name);
        let spec = parse_snapshot_xml(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
        let (back, back_parent) = snapshot_from_spec(spec).unwrap_or_else(|e| panic!("{e}\n{xml}"));
        assert_eq!(&back, snap, "{xml}");
        assert_eq!(back_parent.as_deref(), parent_name, "{xml}");
        assert_eq!(write_snapshot_xml(&back, back_parent.as_deref()), xml);
    }

    #[test]
    fn writes_the_documented_layout() {
        let xml = write_snapshot_xml(&snap(), Some("base"));
        assert_eq!(
            xml,
            "<domainsnapshot>
  <name>pre-upgrade</name>
  <description>before apt upgrade</description>
  <state>running</state>
  <parent>
    <name>base</name>
  </parent>
  <creationTime>1700000000</creationTime>
  <memory snapshot='internal'/>
  <disks>
    <disk name='vda' snapshot='internal'/>
    <disk name='vdb' snapshot='external' type='file'>
      <source file='/path/vdb.snap1.qcow2'/>
    </disk>
  </disks>
  <domain type='kvm'>
  <name>vm1</name>
</domain>
  <vmsnapfs id='1700000000-1' parent-id='1699990000-1'/>
</domainsnapshot>
"
        );
    }

    #[test]
    fn round_trips_a_checkpoint_with_parent() {
        round_trip(&snap(), Some("base"));
    }

    #[test]
    fn round_trips_a_root() {
        let root = Snapshot {
            parent: None,
            description: None,
            memory: MemoryLocation::No,
            state: SnapshotState::Shutoff,
            disks: Vec::new(),
            domain_xml: None,
            ..snap()
        };
        round_trip(&root, None);
        let xml = write_snapshot_xml(&root, None);
        assert!(!xml.contains("<parent>"));
        assert!(!xml.contains("parent-id"));
        assert!(!xml.contains("<description>"));
        assert!(!xml.contains("<disks>"));
    }

    #[test]
    fn round_trips_external_memory_and_disks() {
        let external = Snapshot {
            state: SnapshotState::Paused,
            memory: MemoryLocation::External("/var/lib/vm1/mem.pre-upgrade".into()),
            disks: vec![
                DiskPoint {
                    target: "vda".into(),
                    kind: DiskSnapshotKind::External,
                    image: Some("/var/lib/vm1/vda.pre-upgrade.qcow2".into()),
                    overlay: None,
                },
                DiskPoint {
                    target: "vdb".into(),
                    kind: DiskSnapshotKind::No,
                    image: None,
                    overlay: None,
                },
                DiskPoint {
                    target: "vdc".into(),
                    kind: DiskSnapshotKind::Internal,
                    image: Some("/var/lib/vm1/vdc.qcow2".into()),
                    overlay: None,
                },
            ],
            ..snap()
        };
        round_trip(&external, Some("base"));
        let disk_only = Snapshot {
            state: SnapshotState::DiskSnapshot,
            memory: MemoryLocation::No,
            creation_time: -5,
            ..external
        };
        round_trip(&disk_only, None);
    }

    #[test]
    fn round_trips_odd_names_and_text() {
        let odd = Snapshot {
            id: "id &<>'\"é".into(),
            name: "a & b <c> 'd' \"e\" ünïcødé 🦀".into(),
            description: Some("line 1\nline 2\r\n\ttabbed &amp; ]]> <x/>\n\n".into()),
            parent: Some("p'\"&<".into()),
            memory: MemoryLocation::External("/tmp/it's \"mem\"\n&<>.bin".into()),
            disks: vec![DiskPoint {
                target: "v d&'\"<>".into(),
                kind: DiskSnapshotKind::External,
                image: Some("/a\tb/c\r\nd é".into()),
                overlay: Some("/a\tb/o'v&\"l".into()),
            }],
            ..snap()
        };
        round_trip(&odd, Some("parent & <sibling> 'x' \"y\" ü"));
        round_trip(
            &Snapshot {
                description: Some(String::new()),
                ..snap()
            },
            None,
        );
        round_trip(
            &Snapshot {
                description: Some("  padded  ".into()),
                ..snap()
            },
            None,
        );
    }

    #[test]
    fn round_trips_embedded_domain_xml() {
        let domain =
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n\
                      <name>vm &amp; co</name>\n<!-- comment -->\n<![CDATA[raw <stuff>]]>\n\
                      <devices><graphics passwd='x'/></devices>\n\
                      <qemu:commandline><qemu:arg value='-s'/></qemu:commandline>\n</domain>";
        round_trip(
            &Snapshot {
                domain_xml: Some(domain.into()),
                ..snap()
            },
            Some("base"),
        );
    }

    #[test]
    fn strips_the_declaration_of_embedded_domain_xml() {
        let with_decl = Snapshot {
            domain_xml: Some(
                "<?xml version='1.0' encoding='UTF-8'?>\n<!-- x -->\n<domain><name>v</name></domain>\n"
                    .into(),
            ),
            ..snap()
        };
        let xml = write_snapshot_xml(&with_decl, None);
        assert!(
            xml.contains("\n  <domain><name>v</name></domain>\n"),
            "{xml}"
        );
        assert!(!xml.contains("<?xml"));
        let spec = parse_snapshot_xml(&xml).expect("parses");
        assert_eq!(
            spec.domain_xml.as_deref(),
            Some("<domain><name>v</name></domain>")
        );
    }

    #[test]
    fn leaves_out_unusable_domain_xml() {
        for bad in [
            "not xml",
            "<domain>",
            "<other/>",
            "<!DOCTYPE d><domain/>",
            "<domain>&ent;</domain>",
            "<domain/></domainsnapshot><x>",
        ] {
            let xml = write_snapshot_xml(
                &Snapshot {
                    domain_xml: Some(bad.into()),
                    ..snap()
                },
                None,
            );
            let spec = parse_snapshot_xml(&xml).unwrap_or_else(|e| panic!("{bad:?}: {e}\n{xml}"));
            assert_eq!(spec.domain_xml, None, "{bad:?}");
        }
        // A domain at the depth limit cannot be nested one level deeper.
        let deep = format!(
            "<domain>{}{}</domain>",
            "<x>".repeat(MAX_DEPTH - 1),
            "</x>".repeat(MAX_DEPTH - 1)
        );
        let xml = write_snapshot_xml(
            &Snapshot {
                domain_xml: Some(deep),
                ..snap()
            },
            None,
        );
        assert_eq!(parse_snapshot_xml(&xml).expect("parses").domain_xml, None);
    }

    #[test]
    fn writer_replaces_characters_xml_cannot_carry() {
        let xml = write_snapshot_xml(
            &Snapshot {
                description: Some("bell\u{7} nul\0".into()),
                ..snap()
            },
            None,
        );
        let spec = parse_snapshot_xml(&xml).expect("parses");
        assert_eq!(
            spec.description.as_deref(),
            Some("bell\u{FFFD} nul\u{FFFD}")
        );
    }

    #[test]
    fn reads_libvirt_creation_specs() {
        let spec = parse_snapshot_xml(
            "<domainsnapshot>\n  <name>x</name>\n\
             <memory snapshot='external' file='/var/lib/x.mem'/>\n\
             <disks>\n\
               <disk name='vda' snapshot='external'><source file='/var/lib/vda.x.qcow2'/></disk>\n\
               <disk name='vdb' snapshot='no'/>\n\
             </disks>\n</domainsnapshot>",
        )
        .expect("parses");
        assert_eq!(
            spec,
            SnapshotSpec {
                name: Some("x".into()),
                memory: Some(MemorySpec::External(Some("/var/lib/x.mem".into()))),
                disks: vec![
                    DiskSpec {
                        name: "vda".into(),
                        kind: Some(DiskSnapshotKind::External),
                        source: Some("/var/lib/vda.x.qcow2".into()),
                        device: false,
                        overlay: None,
                    },
                    DiskSpec {
                        name: "vdb".into(),
                        kind: Some(DiskSnapshotKind::No),
                        source: None,
                        device: false,
                        overlay: None,
                    },
                ],
                ..SnapshotSpec::default()
            }
        );

        // From the libvirt documentation: a disk-only snapshot with a
        // description, a driver element, a path as disk name, no snapshot
        // attribute.
        let spec = parse_snapshot_xml(
            "<domainsnapshot>
  <description>Snapshot of OS install and updates</description>
  <memory snapshot='no'/>
  <disks>
    <disk name='/path/to/old'>
      <source file='/path/to/new'/>
    </disk>
    <disk name='vdb'>
      <driver type='qcow2'/>
    </disk>
    <disk name='vdc' snapshot='internal'/>
  </disks>
</domainsnapshot>",
        )
        .expect("parses");
        assert_eq!(spec.name, None);
        assert_eq!(
            spec.description.as_deref(),
            Some("Snapshot of OS install and updates")
        );
        assert_eq!(spec.memory, Some(MemorySpec::No));
        assert_eq!(spec.disks[0].name, "/path/to/old");
        assert_eq!(spec.disks[0].kind, Some(DiskSnapshotKind::External));
        assert_eq!(spec.disks[1].kind, None);
        assert_eq!(spec.disks[1].source, None);
        assert_eq!(spec.disks[2].kind, Some(DiskSnapshotKind::Internal));
        assert_eq!(spec.quiesce, None);
        assert!(!spec.disks[0].device);

        // virsh snapshot-create-as --diskspec vda,snapshot=external,
        // stype=block,file=/dev/vg0/s1 --print-xml: a block device.
        let spec = parse_snapshot_xml(
            "<domainsnapshot><disks><disk name='vda' snapshot='external' type='block'>\
             <source dev='/dev/vg0/s1'/></disk><disk name='vdb'><source dev='/dev/sdz'/>\
             </disk></disks></domainsnapshot>",
        )
        .expect("parses");
        assert!(spec.disks.iter().all(|d| d.device));
        assert_eq!(
            spec.disks[0].source.as_deref(),
            Some(Path::new("/dev/vg0/s1"))
        );
        assert_eq!(spec.disks[1].kind, Some(DiskSnapshotKind::External));

        let spec = parse_snapshot_xml("<domainsnapshot/>").expect("parses");
        assert_eq!(spec, SnapshotSpec::default());
        let spec = parse_snapshot_xml(
            "<domainsnapshot><name> spaced </name><memory file='/m'/><quiesce/></domainsnapshot>",
        )
        .expect("parses");
        assert_eq!(spec.name.as_deref(), Some("spaced"));
        assert_eq!(spec.memory, Some(MemorySpec::External(Some("/m".into()))));
        assert_eq!(spec.quiesce, Some(true));
        let spec = parse_snapshot_xml(
            "<domainsnapshot quiesce='yes'><memory snapshot='external'/><memory-x/></domainsnapshot>",
        )
        .expect("parses");
        assert_eq!(spec.quiesce, Some(true));
        assert_eq!(spec.memory, Some(MemorySpec::External(None)));
        let spec =
            parse_snapshot_xml("<domainsnapshot><quiesce>no</quiesce><memory/></domainsnapshot>")
                .expect("parses");
        assert_eq!(spec.quiesce, Some(false));
        assert_eq!(spec.memory, None);
        let spec = parse_snapshot_xml("<domainsnapshot><state>shutdown</state></domainsnapshot>")
            .expect("parses");
        assert_eq!(spec.state, Some(SnapshotState::Shutoff));
    }

    #[test]
    fn ignores_unknown_elements() {
        let spec = parse_snapshot_xml(
            "<domainsnapshot xmlns:x='urn:x' extra='1'><x:name>no</x:name><name>yes</name>\
             <active>1</active><cookie><cpu/></cookie><inactiveDomain/>\
             <disks><disk name='vda' snapshot='internal' foo='bar'><driver type='qcow2'/>\
             <unknown/></disk><notadisk name='vdz'/></disks><future a='b'>text</future>\
             </domainsnapshot>",
        )
        .expect("parses");
        assert_eq!(spec.name.as_deref(), Some("yes"));
        assert_eq!(spec.disks.len(), 1);
    }

    #[test]
    fn refuses_bad_values_with_clear_messages() {
        let cases: &[(&str, &str)] = &[
            ("<snapshot/>", "expected <domainsnapshot> as the root element, found <snapshot>"),
            (
                "<domainsnapshot><state>sleeping</state></domainsnapshot>",
                "bad value \"sleeping\" for <state>: expected one of: running, paused, shutoff, disk-snapshot",
            ),
            (
                "<domainsnapshot><memory snapshot='manual'/></domainsnapshot>",
                "bad value \"manual\" for <memory snapshot>: expected one of: no, internal, external",
            ),
            (
                "<domainsnapshot><disks><disk name='vda' snapshot='copy'/></disks></domainsnapshot>",
                "bad value \"copy\" for <disk snapshot>: expected one of: no, internal, external",
            ),
            (
                "<domainsnapshot><creationTime>yesterday</creationTime></domainsnapshot>",
                "bad value \"yesterday\" for <creationTime>: expected whole seconds since the epoch",
            ),
            (
                "<domainsnapshot><quiesce>maybe</quiesce></domainsnapshot>",
                "bad value \"maybe\" for <quiesce>: expected one of: yes, no",
            ),
            (
                "<domainsnapshot><disks><disk snapshot='no'/></disks></domainsnapshot>",
                "<disk> lacks the required 'name' attribute",
            ),
            (
                "<domainsnapshot><disks><disk name='a'/><disk name='a'/></disks></domainsnapshot>",
                "disk \"a\" appears more than once",
            ),
            (
                "<domainsnapshot><name>a</name><name>b</name></domainsnapshot>",
                "<name> appears more than once in <domainsnapshot>",
            ),
            (
                "<domainsnapshot><parent/></domainsnapshot>",
                "<parent> lacks the required <name> element",
            ),
            (
                "<domainsnapshot><name>a/b</name></domainsnapshot>",
                "invalid snapshot name \"a/b\": contains '/'",
            ),
            (
                "<domainsnapshot><memory snapshot='internal' file='/m'/></domainsnapshot>",
                "bad value \"/m\" for <memory file>: a memory file needs snapshot='external', not 'internal'",
            ),
            (
                "<domainsnapshot><memory file=''/></domainsnapshot>",
                "bad value \"\" for <memory file>: empty path",
            ),
            (
                "<domainsnapshot><disks><disk name='a'><source/></disk></disks></domainsnapshot>",
                "<source> lacks the required 'file' attribute",
            ),
            (
                "<domainsnapshot><vmsnapfs id='../x'/></domainsnapshot>",
                "invalid snapshot id \"../x\": a leading '.' is reserved for domain files",
            ),
        ];
        for (xml, message) in cases {
            match parse_snapshot_xml(xml) {
                Ok(spec) => panic!("{xml} parsed: {spec:?}"),
                Err(e) => assert_eq!(&e.to_string(), message, "{xml}"),
            }
        }
    }

    #[test]
    fn refuses_hostile_input() {
        let laughs = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>\
                      <!ENTITY lol1 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>]>\
                      <domainsnapshot><name>&lol1;</name></domainsnapshot>";
        assert!(matches!(
            parse_snapshot_xml(laughs),
            Err(XmlError::Doctype { .. })
        ));
        let deep = format!(
            "<domainsnapshot>{}{}</domainsnapshot>",
            "<description>".repeat(10_000),
            "</description>".repeat(10_000)
        );
        assert!(matches!(
            parse_snapshot_xml(&deep),
            Err(XmlError::TooDeep { .. })
        ));
        let big = format!(
            "<domainsnapshot><description>{}</description></domainsnapshot>",
            "x".repeat(2 << 20)
        );
        assert!(matches!(
            parse_snapshot_xml(&big),
            Err(XmlError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_snapshot_xml("<domainsnapshot><name>&foo;</name></domainsnapshot>"),
            Err(XmlError::UnknownEntity { .. })
        ));
        let full = write_snapshot_xml(&snap(), Some("base"));
        for n in 0..full.trim_end().len() {
            if let Some(prefix) = full.get(..n) {
                assert!(parse_snapshot_xml(prefix).is_err(), "prefix of {n} bytes");
            }
        }
    }

    #[test]
    fn from_spec_needs_the_stored_fields() {
        let full = parse_snapshot_xml(&write_snapshot_xml(&snap(), Some("base"))).expect("parses");
        let cases: Vec<(SnapshotSpec, &str)> = vec![
            (
                SnapshotSpec {
                    name: None,
                    ..full.clone()
                },
                "<domainsnapshot> lacks the required <name> element",
            ),
            (
                SnapshotSpec {
                    id: None,
                    ..full.clone()
                },
                "<vmsnapfs> lacks the required 'id' attribute",
            ),
            (
                SnapshotSpec {
                    state: None,
                    ..full.clone()
                },
                "<domainsnapshot> lacks the required <state> element",
            ),
            (
                SnapshotSpec {
                    creation_time: None,
                    ..full.clone()
                },
                "<domainsnapshot> lacks the required <creationTime> element",
            ),
            (
                SnapshotSpec {
                    memory: Some(MemorySpec::External(None)),
                    ..full.clone()
                },
                "<memory> lacks the required 'file' attribute",
            ),
            (
                SnapshotSpec {
                    disks: vec![DiskSpec {
                        name: "vda".into(),
                        kind: None,
                        source: None,
                        device: false,
                        overlay: None,
                    }],
                    ..full.clone()
                },
                "<disk> lacks the required 'snapshot' attribute",
            ),
            (
                SnapshotSpec {
                    disks: vec![DiskSpec {
                        name: "/path/to/old".into(),
                        kind: Some(DiskSnapshotKind::External),
                        source: None,
                        device: false,
                        overlay: None,
                    }],
                    ..full.clone()
                },
                "invalid disk target \"/path/to/old\": contains '/'",
            ),
        ];
        for (spec, message) in cases {
            match snapshot_from_spec(spec) {
                Ok(s) => panic!("accepted: {s:?}"),
                Err(e) => assert_eq!(e.to_string(), message),
            }
        }
        // No <memory> means no saved state; a <parent> without id stays a name.
        let (s, parent) = snapshot_from_spec(SnapshotSpec {
            memory: None,
            parent_id: None,
            ..full
        })
        .expect("converts");
        assert_eq!(s.memory, MemoryLocation::No);
        assert_eq!(s.parent, None);
        assert_eq!(parent.as_deref(), Some("base"));
    }
}
