//! Domain definitions: a subset of libvirt's `<domain>` XML.
//!
//! What is read (everything else is ignored, so a full libvirt definition
//! works):
//!
//! ```xml
//! <domain>
//!   <name>vm1</name>
//!   <monitor path='/run/vm1.qmp'/>            <!-- ours: the QMP socket -->
//!   <devices>
//!     <disk type='file' device='disk'>
//!       <driver name='qemu' type='qcow2'/>    <!-- type defaults to raw -->
//!       <source file='/var/lib/vm1/vda.qcow2'/>
//!       <target dev='vda'/>
//!     </disk>
//!     <channel type='unix'>                   <!-- the guest agent (qemu-ga) -->
//!       <source mode='bind' path='/run/vm1/qga.sock'/>
//!       <target type='virtio' name='org.qemu.guest_agent.0'/>
//!     </channel>
//!   </devices>
//!   <commandline>                             <!-- ours: argv to start it -->
//!     <arg value='qemu-system-x86_64'/>
//!     <arg value='-m'/>
//!     <arg value='2048'/>
//!   </commandline>
//!   <snapshot policy='internal'/>             <!-- ours: what mkdir makes: internal | disk-only | external | external-disk-only -->
//!                                             <!-- and quiesce='auto|yes|no' (see DomainDef::quiesce_default) -->
//! </domain>
//! ```
//!
//! Disks with `device='cdrom'` or `'floppy'`, `<readonly/>` disks and disks
//! without a `<source>` are skipped: the guest cannot write them. Other
//! writable disks that are not image files (`type='block'`, `'network'`,
//! `'volume'`, `device='lun'`) are kept as [`OtherDisk`]s: snapshots must
//! leave them out on purpose (`snapshot='no'`).

use std::borrow::Cow;
use std::collections::HashSet;
use std::ops::Range;
use std::path::PathBuf;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::tree::{self, Element};
use super::{trim_xml, XmlError};
use crate::model::{
    validate_name, AgentChannel, DiskDef, DomainDef, OtherDisk, QuiesceMode, SnapshotPolicy,
};

/// Values of `<disk device=...>` that libvirt knows.
const DISK_DEVICES: &[&str] = &["disk", "cdrom", "floppy", "lun"];

/// Values of `<snapshot policy=...>`.
const POLICIES: &[&str] = &["internal", "disk-only", "external", "external-disk-only"];

/// Values of `<snapshot quiesce=...>`.
const QUIESCE: &[&str] = &["auto", "yes", "no"];

/// The name of the guest agent's virtio-serial port (libvirt's and qemu-ga's).
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// The format of a disk whose `<driver>` names none (libvirt's default).
const DEFAULT_FORMAT: &str = "raw";

/// What replaces the value of a `passwd` attribute in [`redact_secrets`].
const REDACTED: &str = "***";

/// Parses a domain definition.
///
/// The root must be `<domain>` with a `<name>` that is a valid directory
/// name (see [`validate_name`]; surrounding white space is trimmed). Each
/// `device='disk'` disk must have a `<target dev>` that is a valid file
/// name, and no two disks read may share one. The returned
/// [`DomainDef::xml`] is `xml` as given.
pub fn parse_domain_def(xml: &str) -> Result<DomainDef, XmlError> {
    parse_domain_def_with(xml, &|_| false)
}

/// [`parse_domain_def`] for a definition that may name, as a disk's
/// active layer, a block device vmsnapfs accepted as one (see
/// [`crate::backend::block_dev`]): a `type='block'` disk (not a LUN)
/// whose `<driver type>` is qcow2 and whose `<source dev>` `ours` takes
/// is read as an image disk on that device. Every other block disk stays
/// a disk vmsnapfs cannot snapshot.
pub fn parse_domain_def_with(
    xml: &str,
    ours: &dyn Fn(&std::path::Path) -> bool,
) -> Result<DomainDef, XmlError> {
    let root = tree::parse(xml)?;
    root.expect_root("domain")?;

    let name = trim_xml(&root.required_child("name")?.text);
    validate_name(name).map_err(|e| XmlError::invalid_name("domain name", name, e))?;

    let monitor = match root.child("monitor")? {
        Some(monitor) => Some(path_attr(monitor, "path", "<monitor path>")?),
        None => None,
    };

    let mut disks: Vec<DiskDef> = Vec::new();
    let mut other_disks: Vec<OtherDisk> = Vec::new();
    let mut agent = None;
    if let Some(devices) = root.child("devices")? {
        for channel in devices.children_named("channel") {
            let Some(found) = parse_agent_channel(channel)? else {
                continue;
            };
            if agent.replace(found).is_some() {
                return Err(XmlError::Duplicate {
                    what: "guest agent channel",
                    value: AGENT_PORT.into(),
                });
            }
        }
        let mut targets = HashSet::new();
        for disk in devices.children_named("disk") {
            let target = match parse_disk(disk, ours)? {
                ParsedDisk::Skipped => continue,
                ParsedDisk::File(d) => {
                    let t = d.target.clone();
                    disks.push(d);
                    t
                }
                ParsedDisk::Other(d) => {
                    let t = d.target.clone();
                    other_disks.push(d);
                    t
                }
            };
            if !targets.insert(target.clone()) {
                return Err(XmlError::Duplicate {
                    what: "disk target",
                    value: target,
                });
            }
        }
    }

    let commandline = match root.child("commandline")? {
        Some(commandline) => Some(parse_commandline(commandline)?),
        None => None,
    };

    let quiesce = match root.child("snapshot")?.and_then(|s| s.attr("quiesce")) {
        None => None,
        Some("auto") => Some(QuiesceMode::Auto),
        Some("yes") => Some(QuiesceMode::Yes),
        Some("no") => Some(QuiesceMode::No),
        Some(other) => return Err(XmlError::bad_choice("<snapshot quiesce>", other, QUIESCE)),
    };

    let policy = match root.child("snapshot")? {
        Some(snapshot) => match snapshot.attr("policy") {
            None => SnapshotPolicy::default(),
            Some("internal") => SnapshotPolicy::Internal,
            Some("disk-only") => SnapshotPolicy::DiskOnly,
            Some("external") => SnapshotPolicy::External,
            Some("external-disk-only") => SnapshotPolicy::ExternalDiskOnly,
            Some(other) => return Err(XmlError::bad_choice("<snapshot policy>", other, POLICIES)),
        },
        None => SnapshotPolicy::default(),
    };

    Ok(DomainDef {
        name: name.to_string(),
        monitor,
        disks,
        other_disks,
        commandline,
        policy,
        quiesce,
        agent,
        xml: xml.to_string(),
    })
}

/// Reads one `<channel>`: `None` unless its target is the guest agent's
/// virtio port. A `type='unix'` channel with `<source path>` (an
/// absolute path) names the socket QEMU listens on; any other is a
/// channel the daemon cannot reach itself.
fn parse_agent_channel(channel: &Element) -> Result<Option<AgentChannel>, XmlError> {
    let Some(target) = channel.child("target")? else {
        return Ok(None);
    };
    if target.attr("type") != Some("virtio") || target.attr("name") != Some(AGENT_PORT) {
        return Ok(None);
    }
    if channel.attr("type") != Some("unix") {
        return Ok(Some(AgentChannel::Unreachable(format!(
            "its guest agent channel is of type {:?}, not a Unix socket",
            channel.attr("type").unwrap_or("")
        ))));
    }
    let source = channel.child("source")?;
    let Some(path) = source.and_then(|s| s.attr("path")) else {
        return Ok(Some(AgentChannel::Unreachable(
            "its guest agent channel names no socket path".into(),
        )));
    };
    if let Some(mode) = source.and_then(|s| s.attr("mode")) {
        if mode != "bind" {
            return Ok(Some(AgentChannel::Unreachable(format!(
                "its guest agent socket is in mode {mode:?}: QEMU does not listen on it"
            ))));
        }
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(XmlError::bad_value(
            "<channel><source path>",
            &path.display().to_string(),
            "not an absolute path",
        ));
    }
    Ok(Some(AgentChannel::Socket(path)))
}

/// What one `<disk>` is to vmsnapfs.
enum ParsedDisk {
    /// An image file: snapshotted.
    File(DiskDef),
    /// Writable, but not a file: snapshots must leave it out on purpose.
    Other(OtherDisk),
    /// Removable media, read-only or empty: never part of the guest's
    /// written state.
    Skipped,
}

/// What a disk that is not an image file is, for `.log`.
fn other_what(disk: &Element, source: Option<&Element>, lun: bool) -> String {
    let attr = |name: &str| source.and_then(|s| s.attr(name)).unwrap_or("?");
    let what = match disk.attr("type").unwrap_or("file") {
        "block" => format!("block device {}", attr("dev")),
        "network" => format!("network disk {} {}", attr("protocol"), attr("name")),
        "volume" => format!("storage volume {}/{}", attr("pool"), attr("volume")),
        "dir" => format!("directory {}", attr("dir")),
        other => format!("{other} disk"),
    };
    if lun {
        format!("SCSI passthrough (device='lun') of the {what}")
    } else {
        what
    }
}

/// Reads one `<disk>`; `ours` tells which block devices are layers
/// vmsnapfs accepted (see [`parse_domain_def_with`]).
fn parse_disk(
    disk: &Element,
    ours: &dyn Fn(&std::path::Path) -> bool,
) -> Result<ParsedDisk, XmlError> {
    let lun = match disk.attr("device").unwrap_or("disk") {
        "disk" => false,
        "lun" => true,
        "cdrom" | "floppy" => return Ok(ParsedDisk::Skipped),
        other => return Err(XmlError::bad_choice("<disk device>", other, DISK_DEVICES)),
    };
    let target = disk.required_child("target")?.required_attr("dev")?;
    validate_name(target).map_err(|e| XmlError::invalid_name("disk target", target, e))?;
    if disk.child("readonly")?.is_some() {
        return Ok(ParsedDisk::Skipped);
    }

    let Some(source) = disk.child("source")? else {
        return Ok(ParsedDisk::Skipped);
    };
    let format_attr = disk.child("driver")?.and_then(|d| d.attr("type"));
    let file = match (disk.attr("type").unwrap_or("file"), lun) {
        ("file", false) if source.attr("file").is_some() => source.attr("file").unwrap_or(""),
        ("block", false)
            if format_attr == Some("qcow2")
                && source
                    .attr("dev")
                    .is_some_and(|d| !d.is_empty() && ours(std::path::Path::new(d))) =>
        {
            source.attr("dev").unwrap_or("")
        }
        _ => {
            return Ok(ParsedDisk::Other(OtherDisk {
                target: target.to_string(),
                what: other_what(disk, Some(source), lun),
                left_out: disk.attr("snapshot") == Some("no"),
            }))
        }
    };
    if file.is_empty() {
        return Err(XmlError::bad_value("<source file>", file, "empty path"));
    }

    let format = match format_attr {
        Some(format) if is_format_name(format) => format,
        Some(format) => {
            return Err(XmlError::bad_value(
                "<driver type>",
                format,
                "expected an image format name such as qcow2 or raw",
            ))
        }
        None => DEFAULT_FORMAT,
    };

    Ok(ParsedDisk::File(DiskDef {
        target: target.to_string(),
        source: PathBuf::from(file),
        format: format.to_string(),
    }))
}

/// True for a plausible image format name (`qcow2`, `raw`, `vmdk`, ...):
/// it is handed to `qemu-img`, so it must not look like an option.
fn is_format_name(format: &str) -> bool {
    format.len() <= 32
        && format.starts_with(|c: char| c.is_ascii_alphanumeric())
        && format
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Reads `<commandline>`: the `value` of each `<arg>`, in order.
fn parse_commandline(commandline: &Element) -> Result<Vec<String>, XmlError> {
    let argv = commandline
        .children_named("arg")
        .map(|arg| arg.required_attr("value").map(str::to_string))
        .collect::<Result<Vec<_>, _>>()?;
    if argv.is_empty() {
        return Err(XmlError::MissingElement {
            parent: commandline.name.clone(),
            element: "arg",
        });
    }
    Ok(argv)
}

/// The non-empty path in attribute `key` of `element`.
fn path_attr(
    element: &Element,
    key: &'static str,
    what: &'static str,
) -> Result<PathBuf, XmlError> {
    match element.required_attr(key)? {
        "" => Err(XmlError::bad_value(what, "", "empty path")),
        path => Ok(PathBuf::from(path)),
    }
}

/// Returns `xml` with every secret replaced by `***`: the value of each
/// attribute whose name says it holds one (`passwd`, `password`, any
/// `*secret*`, `*cookie*`, `*token*`, as libvirt's `<graphics passwd>`),
/// the text of `<cookie>` and `<secret>` elements, the value of an
/// `<env>` whose name says it holds one, and inside each command line
/// argument (`<arg value>`, `<qemu:arg value>`) the secret-bearing
/// options (see [`super::secrets::redact_arg`]: `-object
/// secret,data=...`, `password=` in `-drive`/`-blockdev`/`-vnc`, JSON
/// `"password"`, `user:password@` in URLs).
///
/// Everything else is kept byte for byte, so a well-formed input gives a
/// well-formed output with the same structure. Where the input stops being
/// readable XML (a syntax error, a malformed or duplicated attribute, or a
/// `<!DOCTYPE`, whose attribute defaults could carry a password) the rest
/// is replaced by a comment saying so: nothing past that point is shown.
/// Definitions that [`parse_domain_def`] accepts never hit that case.
pub fn redact_secrets(xml: &str) -> String {
    // quick-xml skips a byte order mark and counts positions after it.
    let base = if xml.starts_with('\u{FEFF}') {
        '\u{FEFF}'.len_utf8()
    } else {
        0
    };
    let mut reader = Reader::from_str(xml.get(base..).unwrap_or_default());
    let mut out = String::with_capacity(xml.len());
    let mut copied = 0;
    let mut secret_text = false;
    loop {
        let start =
            base.saturating_add(usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX));
        let values = match reader.read_event() {
            Ok(Event::Eof) => break,
            Ok(Event::Start(tag)) => {
                secret_text = super::secrets::is_secret_element(tag.local_name().as_ref());
                secret_values(xml, &tag)
            }
            Ok(Event::Empty(tag)) => secret_values(xml, &tag),
            Ok(Event::Text(t)) if secret_text => match range_within(xml, &t) {
                Some(r) if !r.is_empty() => Some(vec![(r, REDACTED.to_owned())]),
                _ => Some(Vec::new()),
            },
            Ok(Event::CData(t)) if secret_text => match range_within(xml, &t) {
                Some(r) if !r.is_empty() => Some(vec![(r, REDACTED.to_owned())]),
                _ => Some(Vec::new()),
            },
            Ok(Event::End(_)) => {
                secret_text = false;
                Some(Vec::new())
            }
            Ok(Event::DocType(_)) | Err(_) => None,
            Ok(_) => Some(Vec::new()),
        };
        let Some(values) = values else {
            out.push_str(xml.get(copied..start).unwrap_or_default());
            out.push_str(NOT_SHOWN);
            return out;
        };
        for (value, with) in values {
            out.push_str(xml.get(copied..value.start).unwrap_or_default());
            out.push_str(&with);
            copied = value.end;
        }
    }
    out.push_str(xml.get(copied..).unwrap_or_default());
    out
}

/// What [`redact_secrets`] puts in place of input it cannot read.
const NOT_SHOWN: &str = "<!-- vmsnapfs: the rest is not well-formed XML and is not shown -->";

/// Byte ranges in `xml` of the secret attribute values of `tag` (a tag
/// read from `xml`), quotes excluded, each with what replaces it; `None`
/// if any attribute of the tag is malformed or repeated.
fn secret_values(xml: &str, tag: &BytesStart<'_>) -> Option<Vec<(Range<usize>, String)>> {
    use super::secrets;
    let element = tag.local_name();
    let element = element.as_ref();
    let mut found = Vec::new();
    let mut env_secret = false;
    let mut env_value = None;
    for attr in tag.attributes() {
        let attr = attr.ok()?;
        // Read from `xml` itself, the raw value is a slice of it.
        let Cow::Borrowed(raw) = attr.value else {
            return None;
        };
        let key = attr.key.local_name();
        let key: &str = key.as_ref();
        if secrets::is_secret_key(key) {
            found.push((range_within(xml, raw)?, REDACTED.to_owned()));
        } else if element == "arg" && key == "value" {
            let value = quick_xml::escape::unescape(raw).ok()?;
            let redacted = secrets::redact_arg(&value);
            if redacted != value {
                let escaped = quick_xml::escape::escape(redacted.as_str()).replace('\'', "&apos;");
                found.push((range_within(xml, raw)?, escaped));
            }
        } else if element == "env" && key == "name" {
            env_secret = secrets::is_secret_key(raw);
        } else if element == "env" && key == "value" {
            env_value = Some(range_within(xml, raw)?);
        }
    }
    if let (true, Some(r)) = (env_secret, env_value) {
        found.push((r, REDACTED.to_owned()));
    }
    Some(found)
}

/// Where `part`, a slice of `whole`, lies in it.
fn range_within(whole: &str, part: &str) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NameError;

    const FULL: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- a libvirt definition with our extensions -->
<domain type='kvm' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>
  <memory unit='KiB'>2097152</memory>
  <monitor path='/run/vm1.qmp'/>
  <os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/vm1/vda.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file'>
      <source file='/var/lib/vm1/data &amp; more.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='floppy'><target dev='fda'/></disk>
    <disk type='block' device='lun'><source dev='/dev/sdz'/><target dev='sdb'/></disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdc'/>
    </disk>
    <graphics type='vnc' port='-1' passwd='s3cret'/>
    <interface type='network'><source network='default'/></interface>
  </devices>
  <commandline>
    <arg value='qemu-system-x86_64'/>
    <arg value='-m'/>
    <arg value='2048'/>
    <arg value='-name'/>
    <arg value='vm1,debug-threads=on'/>
  </commandline>
  <snapshot policy='internal'/>
  <qemu:commandline><qemu:arg value='-no-hpet'/></qemu:commandline>
</domain>
"#;

    fn err(xml: &str) -> XmlError {
        match parse_domain_def(xml) {
            Ok(def) => panic!("{xml:?} parsed: {def:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn reads_a_full_definition() {
        let def = parse_domain_def(FULL).expect("parses");
        assert_eq!(def.name, "vm1");
        assert_eq!(def.monitor, Some(PathBuf::from("/run/vm1.qmp")));
        assert_eq!(
            def.disks,
            vec![
                DiskDef {
                    target: "vda".into(),
                    source: "/var/lib/vm1/vda.qcow2".into(),
                    format: "qcow2".into(),
                },
                DiskDef {
                    target: "vdb".into(),
                    source: "/var/lib/vm1/data & more.img".into(),
                    format: "raw".into(),
                },
            ]
        );
        assert_eq!(
            def.commandline,
            Some(
                [
                    "qemu-system-x86_64",
                    "-m",
                    "2048",
                    "-name",
                    "vm1,debug-threads=on"
                ]
                .map(String::from)
                .to_vec()
            )
        );
        assert_eq!(def.policy, SnapshotPolicy::Internal);
        assert_eq!(def.xml, FULL);
        // The SCSI passthrough and the rbd disk are writable and not
        // image files; the cdrom and the empty floppy are skipped.
        let others = others_of(&def);
        assert_eq!(
            others,
            vec![
                (
                    "sdb",
                    "SCSI passthrough (device='lun') of the block device /dev/sdz",
                    false
                ),
                ("vdc", "network disk rbd pool/img", false),
            ]
        );
    }

    /// (target, what, left out) of each of `def`'s other disks.
    fn others_of(def: &DomainDef) -> Vec<(&str, &str, bool)> {
        def.other_disks
            .iter()
            .map(|d| (d.target.as_str(), d.what.as_str(), d.left_out))
            .collect()
    }

    #[test]
    fn writable_disks_that_are_not_files_are_kept_apart() {
        let xml = "<domain><name>v</name><devices>\
            <disk type='block' device='disk'><source dev='/dev/vg/a'/><target dev='vdb'/></disk>\
            <disk type='block' device='disk' snapshot='no'><source dev='/dev/vg/b'/>\
            <target dev='vdc'/></disk>\
            <disk type='block' device='disk'><source dev='/dev/vg/c'/><target dev='vdd'/>\
            <readonly/></disk>\
            <disk type='volume' device='disk'><source pool='p' volume='v1'/>\
            <target dev='vde'/></disk>\
            <disk type='file' device='disk'><target dev='vdf'/></disk>\
            <disk type='block' device='disk'><source dev='/dev/vg/d'/><target dev='vdb'/></disk>\
            </devices></domain>";
        // vdb twice: a duplicate target, whatever the kinds.
        assert!(parse_domain_def(xml).is_err());
        let xml = xml.replacen(
            "<target dev='vdb'/></disk></devices>",
            "<target dev='vdg'/></disk></devices>",
            1,
        );
        let def = parse_domain_def(&xml).unwrap();
        assert!(def.disks.is_empty());
        let others = others_of(&def);
        assert_eq!(
            others,
            vec![
                ("vdb", "block device /dev/vg/a", false),
                ("vdc", "block device /dev/vg/b", true),
                ("vde", "storage volume p/v1", false),
                ("vdg", "block device /dev/vg/d", false),
            ]
        );
    }

    #[test]
    fn only_block_devices_vmsnapfs_accepted_are_image_disks() {
        let xml = "<domain><name>v</name><devices>\
            <disk type='block' device='disk'><driver name='qemu' type='qcow2'/>\
            <source dev='/dev/ours' index='2'/><backingStore type='file'>\
            <format type='qcow2'/><source file='/i/base.qcow2'/></backingStore>\
            <target dev='vda'/></disk>\
            <disk type='block' device='disk'><driver name='qemu' type='qcow2'/>\
            <source dev='/dev/theirs'/><target dev='vdb'/></disk>\
            <disk type='block' device='disk'><driver name='qemu' type='raw'/>\
            <source dev='/dev/ours'/><target dev='vdc'/></disk>\
            <disk type='block' device='lun'><driver name='qemu' type='qcow2'/>\
            <source dev='/dev/ours'/><target dev='sda'/></disk>\
            </devices></domain>";
        let ours = |p: &std::path::Path| p == std::path::Path::new("/dev/ours");
        let def = parse_domain_def_with(xml, &ours).unwrap();
        assert_eq!(
            def.disks,
            vec![DiskDef {
                target: "vda".into(),
                source: "/dev/ours".into(),
                format: "qcow2".into(),
            }]
        );
        // Another device, a raw one, a LUN: not layers vmsnapfs made.
        let others: Vec<&str> = def.other_disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(others, ["vdb", "vdc", "sda"]);
        // Without the records, every block disk is another disk.
        let def = parse_domain_def(xml).unwrap();
        assert!(def.disks.is_empty());
        assert_eq!(def.other_disks.len(), 4);
    }

    #[test]
    fn reads_a_minimal_definition() {
        let def = parse_domain_def("<domain><name>\n  vm 2 \n</name></domain>").expect("parses");
        assert_eq!(def.name, "vm 2");
        assert_eq!(def.monitor, None);
        assert!(def.disks.is_empty());
        assert_eq!(def.commandline, None);
        assert_eq!(def.policy, SnapshotPolicy::External, "the default");
        let def = parse_domain_def("<domain><name>x</name><snapshot/></domain>").expect("parses");
        assert_eq!(def.policy, SnapshotPolicy::External);
    }

    #[test]
    fn reads_the_guest_agent_channel_and_the_quiesce_default() {
        let with = |channels: &str, snapshot: &str| {
            parse_domain_def(&format!(
                "<domain><name>a</name><devices>{channels}</devices>{snapshot}</domain>"
            ))
        };
        let qga = "<channel type='unix'><source mode='bind' path='/run/a/qga.sock'/>\
                   <target type='virtio' name='org.qemu.guest_agent.0'/></channel>";
        let def = with(qga, "").unwrap();
        assert_eq!(
            def.agent,
            Some(AgentChannel::Socket("/run/a/qga.sock".into()))
        );
        assert_eq!(def.quiesce, None);
        assert_eq!(def.quiesce_default(), QuiesceMode::Auto, "a channel: auto");
        let def = with("", "").unwrap();
        assert_eq!(def.agent, None);
        assert_eq!(def.quiesce_default(), QuiesceMode::No, "no channel: no");
        let def = with(qga, "<snapshot policy='disk-only' quiesce='yes'/>").unwrap();
        assert_eq!(def.quiesce_default(), QuiesceMode::Yes);
        assert_eq!(def.policy, SnapshotPolicy::DiskOnly);
        let def = with("", "<snapshot quiesce='auto'/>").unwrap();
        assert_eq!(def.quiesce_default(), QuiesceMode::Auto);
        assert_eq!(
            with(qga, "<snapshot quiesce='no'/>")
                .unwrap()
                .quiesce_default(),
            QuiesceMode::No
        );
        // Other channels are not the agent; libvirt's own (no path) is
        // known but not reachable; a connect-mode socket is not QEMU's.
        let other = "<channel type='unix'><source mode='bind' path='/x'/>\
                     <target type='virtio' name='org.example.0'/></channel>\
                     <channel type='pty'><target type='serial'/></channel>";
        assert_eq!(with(other, "").unwrap().agent, None);
        let libvirts = "<channel type='unix'>\
                        <target type='virtio' name='org.qemu.guest_agent.0'/></channel>";
        assert!(matches!(
            with(libvirts, "").unwrap().agent,
            Some(AgentChannel::Unreachable(_))
        ));
        let connect = "<channel type='unix'><source mode='connect' path='/x'/>\
                       <target type='virtio' name='org.qemu.guest_agent.0'/></channel>";
        assert!(matches!(
            with(connect, "").unwrap().agent,
            Some(AgentChannel::Unreachable(_))
        ));
        // Refusals: a relative path, two agents, an unknown value.
        let relative = "<channel type='unix'><source mode='bind' path='qga.sock'/>\
                        <target type='virtio' name='org.qemu.guest_agent.0'/></channel>";
        assert!(with(relative, "").is_err());
        assert!(with(&format!("{qga}{qga}"), "").is_err());
        let e = with(qga, "<snapshot quiesce='maybe'/>").unwrap_err();
        assert!(e.to_string().contains("auto, yes, no"), "{e}");
    }

    #[test]
    fn ignores_unknown_elements_and_attributes() {
        let def = parse_domain_def(
            "<domain bogus='1'><future><name>not me</name></future><name a='b'>vm</name>\
             <devices><widget/><disk device='disk' extra='x'><source file='/a' x='y'/>\
             <target dev='vda'/><unknown/></disk></devices></domain>",
        )
        .expect("parses");
        assert_eq!(def.name, "vm");
        assert_eq!(def.disks.len(), 1);
    }

    #[test]
    fn refuses_bad_definitions() {
        assert!(matches!(
            err("<domains><name>x</name></domains>"),
            XmlError::WrongRoot { .. }
        ));
        assert!(matches!(err("<domain/>"), XmlError::MissingElement { .. }));
        assert!(matches!(
            err("<domain><name>a</name><name>b</name></domain>"),
            XmlError::DuplicateElement { .. }
        ));
        for name in ["", ".hidden", "a/b", "..", "tab\there"] {
            let xml = format!("<domain><name>{name}</name></domain>");
            assert!(
                matches!(
                    err(&xml),
                    XmlError::InvalidName {
                        what: "domain name",
                        ..
                    }
                ),
                "{name:?}"
            );
        }
        let long = format!("<domain><name>{}</name></domain>", "x".repeat(256));
        assert!(matches!(
            err(&long),
            XmlError::InvalidName {
                source: NameError::TooLong(256),
                ..
            }
        ));
        assert!(matches!(
            err("<domain><name>a&#0;</name></domain>"),
            XmlError::Malformed { .. }
        ));
        // A disk without a target.
        let e = err(
            "<domain><name>a</name><devices><disk><source file='/a'/></disk></devices></domain>",
        );
        assert_eq!(e.to_string(), "<disk> lacks the required <target> element");
        assert!(matches!(
            err("<domain><name>a</name><devices><disk><target/></disk></devices></domain>"),
            XmlError::MissingAttribute { .. }
        ));
        // Two disks on one target.
        let e = err("<domain><name>a</name><devices>\
             <disk><source file='/a'/><target dev='vda'/></disk>\
             <disk><source file='/b'/><target dev='vda'/></disk></devices></domain>");
        assert_eq!(
            e,
            XmlError::Duplicate {
                what: "disk target",
                value: "vda".into()
            }
        );
        // Unknown policy and device values name the allowed ones.
        let e = err("<domain><name>a</name><snapshot policy='externa'/></domain>");
        assert!(
            e.to_string()
                .contains("expected one of: internal, disk-only, external, external-disk-only"),
            "{e}"
        );
        let def = parse_domain_def("<domain><name>a</name><snapshot policy='disk-only'/></domain>")
            .unwrap();
        assert_eq!(def.policy, SnapshotPolicy::DiskOnly);
        let e = err("<domain><name>a</name><devices><disk device='tape'/></devices></domain>");
        assert!(e.to_string().contains("disk, cdrom, floppy, lun"), "{e}");
        assert!(matches!(
            err("<domain><name>a</name><monitor/></domain>"),
            XmlError::MissingAttribute { .. }
        ));
        assert!(matches!(
            err("<domain><name>a</name><monitor path=''/></domain>"),
            XmlError::BadValue { .. }
        ));
        assert!(matches!(
            err("<domain><name>a</name><commandline/></domain>"),
            XmlError::MissingElement { .. }
        ));
        assert!(matches!(
            err("<domain><name>a</name><commandline><arg/></commandline></domain>"),
            XmlError::MissingAttribute { .. }
        ));
        for format in ["", "-o", "qcow2 x", "a,b"] {
            let xml = format!(
                "<domain><name>a</name><devices><disk><driver type='{format}'/>\
                 <source file='/a'/><target dev='vda'/></disk></devices></domain>"
            );
            assert!(matches!(err(&xml), XmlError::BadValue { .. }), "{format:?}");
        }
        assert!(matches!(
            err("<domain><name>a</name><devices><disk><target dev='a/b'/></disk></devices></domain>"),
            XmlError::InvalidName { .. }
        ));
    }

    #[test]
    fn refuses_hostile_input() {
        let laughs = "<!DOCTYPE domain [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;'>]>\
                      <domain><name>&b;</name></domain>";
        assert!(matches!(err(laughs), XmlError::Doctype { .. }));
        let deep = format!(
            "<domain><name>a</name>{}{}</domain>",
            "<x>".repeat(10_000),
            "</x>".repeat(10_000)
        );
        assert!(matches!(err(&deep), XmlError::TooDeep { .. }));
        let big = format!(
            "<domain><name>a</name><!-- {} --></domain>",
            "x".repeat(2 << 20)
        );
        assert!(matches!(err(&big), XmlError::TooLarge { .. }));
        assert!(matches!(
            err("<domain><name>&foo;</name></domain>"),
            XmlError::UnknownEntity { .. }
        ));
        for n in 0..FULL.trim_end().len() {
            if let Some(prefix) = FULL.get(..n) {
                assert!(parse_domain_def(prefix).is_err(), "prefix of {n} bytes");
            }
        }
    }

    #[test]
    fn redacts_passwords() {
        let redacted = redact_secrets(FULL);
        assert!(!redacted.contains("s3cret"));
        assert!(redacted.contains("passwd='***'"));
        let def = parse_domain_def(&redacted).expect("still well-formed");
        assert_eq!(def.name, "vm1");
        assert_eq!(def.disks.len(), 2);

        let xml = "<domain><graphics passwd=\"a'b&amp;c\" type='spice'/>\
                   <graphics type='vnc' passwd = 'x\"y' keymap='en'></graphics>\
                   <note>passwd is the attribute</note><x mypasswd='a' passwd_x='b' \
                   mode='keep' keymap='keep'/></domain>";
        // Any attribute whose name says it holds a password is hidden,
        // every other one is kept.
        assert_eq!(
            redact_secrets(xml),
            "<domain><graphics passwd=\"***\" type='spice'/>\
             <graphics type='vnc' passwd = '***' keymap='en'></graphics>\
             <note>passwd is the attribute</note><x mypasswd='***' passwd_x='***' \
             mode='keep' keymap='keep'/></domain>"
        );
        // Text that merely looks like an attribute stays when the XML is well-formed.
        let text = "<a>passwd='not an attribute'</a>";
        assert_eq!(redact_secrets(text), text);
    }

    /// Every `passwd` attribute a parser sees in the output is `***`.
    #[test]
    fn redaction_agrees_with_the_parser() {
        for xml in [
            FULL,
            "<a passwd='1'><b passwd = \"2\" c='passwd=&apos;3&apos;'/>\n<c\tpasswd\n=\n'4'/></a>",
            "<a x=\"'\" passwd='5' y='\"' z='>' passwd2='keep'><passwd passwd='6'/></a>",
            "<a><![CDATA[<b passwd='not an attribute'>]]><!-- passwd='x' --><b passwd=''/></a>",
        ] {
            let redacted = redact_secrets(xml);
            let root = tree::parse(&redacted).unwrap_or_else(|e| panic!("{e}: {redacted}"));
            let mut stack = vec![&root];
            let mut seen = 0;
            while let Some(element) = stack.pop() {
                for (key, value) in &element.attrs {
                    if key == "passwd" {
                        assert_eq!(value, REDACTED, "{redacted}");
                        seen += 1;
                    }
                }
                stack.extend(&element.children);
            }
            assert!(seen > 0, "{xml}");
            // Nothing but the values changed.
            let original = tree::parse(xml).expect("parses");
            assert_eq!(original.text, root.text);
        }
    }

    #[test]
    fn redacts_broken_input_too() {
        for (xml, kept) in [
            (
                "<domain><graphics passwd='s3cret'/><a></b></domain>",
                "<domain><graphics passwd='***'/><a>",
            ),
            (
                "<domain><a></b><graphics passwd='s3cret'/></domain>",
                "<domain><a>",
            ),
            ("<domain><graphics passwd='s3cret", "<domain>"),
            ("<domain><graphics passwd=s3cret/></domain>", "<domain>"),
            ("<domain><graphics passwd=\"s3cret\" &bad;/>", "<domain>"),
            ("<g passwd='s3cret' passwd='s3cret'/>", ""),
            ("<g passwd='***' passwd='s3cret'/>", ""),
            (
                "<!DOCTYPE d [<!ATTLIST g passwd CDATA 's3cret'>]><d><g/></d>",
                "",
            ),
            ("<a></b> passwd=s3cret", "<a>"),
        ] {
            assert_eq!(redact_secrets(xml), format!("{kept}{NOT_SHOWN}"), "{xml:?}");
        }
        assert_eq!(redact_secrets(""), "");
        assert_eq!(redact_secrets("passwd"), "passwd");
        assert_eq!(redact_secrets("passwd='x'"), "passwd='x'");
        assert_eq!(
            redact_secrets("\u{FEFF}<a passwd='x'/>"),
            "\u{FEFF}<a passwd='***'/>"
        );
    }
}
