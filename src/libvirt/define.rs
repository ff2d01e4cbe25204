//! libvirt's domain XML pointed at new images: each listed disk's
//! `<source file>` and `<driver type>` replaced, its `<backingStore>`
//! dropped (libvirt reads the chain from the images), everything else
//! kept as libvirt wrote it.

use std::collections::BTreeMap;

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, Writer};

use crate::error::{Error, Result};
use crate::model::DiskDef;

/// `xml` with the disks whose target `disks` names pointed at their
/// source and format; `None` when it already names them all.
pub fn with_sources(xml: &str, disks: &[DiskDef]) -> Result<Option<String>> {
    let want: BTreeMap<&str, &DiskDef> = disks.iter().map(|d| (d.target.as_str(), d)).collect();
    let bad = |e: &dyn std::fmt::Display| Error::invalid(format!("libvirt's domain XML: {e}"));
    let mut reader = Reader::from_str(xml);
    let mut writer = Writer::new(Vec::new());
    let mut disk: Option<Vec<Event<'static>>> = None;
    let mut depth = 0usize;
    let mut changed = false;
    loop {
        let ev = reader.read_event().map_err(|e| bad(&e))?;
        if let Event::Eof = ev {
            break;
        }
        let ev = ev.into_owned();
        if let Some(buf) = disk.as_mut() {
            match &ev {
                Event::Start(_) => depth += 1,
                Event::End(_) => depth -= 1,
                _ => {}
            }
            buf.push(ev);
            if depth == 0 {
                let events = disk.take().unwrap_or_default();
                for e in rewrite_disk(events, &want, &mut changed)? {
                    writer.write_event(e).map_err(|e| bad(&e))?;
                }
            }
            continue;
        }
        if let Event::Start(s) = &ev {
            if s.name().as_ref() == "disk" {
                depth = 1;
                disk = Some(vec![ev]);
                continue;
            }
        }
        writer.write_event(ev).map_err(|e| bad(&e))?;
    }
    if !changed {
        return Ok(None);
    }
    String::from_utf8(writer.into_inner())
        .map(Some)
        .map_err(|e| bad(&e))
}

/// One `<disk>` element's events (its start to its end), rewritten when
/// its target is in `want`.
fn rewrite_disk(
    events: Vec<Event<'static>>,
    want: &BTreeMap<&str, &DiskDef>,
    changed: &mut bool,
) -> Result<Vec<Event<'static>>> {
    let target = events.iter().find_map(|e| match e {
        Event::Start(s) | Event::Empty(s) if s.name().as_ref() == "target" => attr(s, "dev"),
        _ => None,
    });
    let Some(d) = target.as_deref().and_then(|t| want.get(t)) else {
        return Ok(events);
    };
    let file = d.source.to_str().ok_or_else(|| {
        Error::invalid("an image path that is not UTF-8 cannot go into libvirt's XML")
    })?;
    // A block device vmsnapfs accepted as a layer is libvirt's
    // `type='block'` disk with `<source dev>`; a file `type='file'`.
    let (kind, key, other) = if crate::backend::block_dev::is_device_path(&d.source) {
        ("block", "dev", "file")
    } else {
        ("file", "file", "dev")
    };
    let mut out = Vec::with_capacity(events.len());
    let mut depth = 0usize;
    let mut skipping: Option<usize> = None;
    for e in events {
        let (opens, closes) = match &e {
            Event::Start(_) => (true, false),
            Event::End(_) => (false, true),
            _ => (false, false),
        };
        if closes {
            depth -= 1;
        }
        if let Some(at) = skipping {
            if closes && depth == at {
                skipping = None;
            }
            if opens {
                depth += 1;
            }
            continue;
        }
        // Direct children of <disk> are at depth 1.
        let child = depth == 1;
        let e = match e {
            Event::Start(s) | Event::Empty(s) if child && s.name().as_ref() == "backingStore" => {
                *changed = true;
                if opens {
                    skipping = Some(depth);
                    depth += 1;
                }
                continue;
            }
            Event::Start(s) if depth == 0 && s.name().as_ref() == "disk" => {
                Event::Start(set_attr(&s, "type", kind, changed))
            }
            Event::Start(s) if child && s.name().as_ref() == "source" => {
                Event::Start(set_attr(&drop_attr(&s, other, changed), key, file, changed))
            }
            Event::Empty(s) if child && s.name().as_ref() == "source" => {
                Event::Empty(set_attr(&drop_attr(&s, other, changed), key, file, changed))
            }
            Event::Start(s) if child && s.name().as_ref() == "driver" => {
                Event::Start(set_attr(&s, "type", &d.format, changed))
            }
            Event::Empty(s) if child && s.name().as_ref() == "driver" => {
                Event::Empty(set_attr(&s, "type", &d.format, changed))
            }
            e => e,
        };
        if opens {
            depth += 1;
        }
        out.push(e);
    }
    Ok(out)
}

/// The unescaped value of attribute `key`.
fn attr(s: &BytesStart<'_>, key: &str) -> Option<String> {
    s.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == key)
        .and_then(|a| {
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .ok()
                .map(|v| v.into_owned())
        })
}

/// `s` without attribute `key`.
fn drop_attr(s: &BytesStart<'_>, key: &str, changed: &mut bool) -> BytesStart<'static> {
    if attr(s, key).is_none() {
        return s.clone().into_owned();
    }
    *changed = true;
    let mut n = BytesStart::new(s.name().as_ref().to_owned());
    for a in s.attributes().flatten() {
        if a.key.as_ref() != key {
            n.push_attribute(a);
        }
    }
    n
}

/// `s` with attribute `key` set to `value` (added if missing).
fn set_attr(s: &BytesStart<'_>, key: &str, value: &str, changed: &mut bool) -> BytesStart<'static> {
    if attr(s, key).as_deref() == Some(value) {
        return s.clone().into_owned();
    }
    *changed = true;
    let name = s.name().as_ref().to_owned();
    let mut n = BytesStart::new(name);
    let mut set = false;
    for a in s.attributes().flatten() {
        if a.key.as_ref() == key {
            n.push_attribute((key, value));
            set = true;
        } else {
            n.push_attribute(a);
        }
    }
    if !set {
        n.push_attribute((key, value));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'><name>d</name><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
        <source file='/i/a.img' index='1'/><backingStore type='file'><format type='raw'/>\
        <source file='/i/base'/><backingStore/></backingStore>\
        <target dev='vda' bus='virtio'/></disk>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
        <source file='/i/b.qcow2'/><target dev='vdb' bus='virtio'/></disk>\
        <graphics type='vnc' passwd='s&amp;cret'/></devices></domain>";

    fn disk(t: &str, p: &str, f: &str) -> DiskDef {
        DiskDef {
            target: t.into(),
            source: p.into(),
            format: f.into(),
        }
    }

    #[test]
    fn listed_disks_get_their_new_source_and_format_only() {
        let out = with_sources(XML, &[disk("vda", "/i/a.snap'1&.qcow2", "qcow2")])
            .unwrap()
            .unwrap();
        let def = crate::xml::domain::parse_domain_def(&out).unwrap();
        assert_eq!(def.disks[0], disk("vda", "/i/a.snap'1&.qcow2", "qcow2"));
        assert_eq!(def.disks[1], disk("vdb", "/i/b.qcow2", "qcow2"));
        assert!(!out.contains("backingStore"), "{out}");
        assert!(!out.contains("/i/base"), "{out}");
        assert!(
            out.contains("index='1'") || out.contains("index=\"1\""),
            "{out}"
        );
        assert!(out.contains("passwd='s&amp;cret'"), "{out}");
    }

    #[test]
    fn nothing_to_change_is_none() {
        let xml = "<domain><name>d</name><devices><disk type='file' device='disk'>\
            <driver name='qemu' type='qcow2'/><source file='/i/b.qcow2'/>\
            <target dev='vdb'/></disk></devices></domain>";
        assert_eq!(
            with_sources(xml, &[disk("vdb", "/i/b.qcow2", "qcow2")]).unwrap(),
            None
        );
    }
}
