//! `<domainsnapshot>` documents: parsing never panics, and a document that
//! describes a complete snapshot survives write -> parse unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsnapfs::xml::{parse_snapshot_xml, snapshot_from_spec, write_snapshot_xml, XmlError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = parse_snapshot_xml(text) else {
        return;
    };
    // Only documents with name, id, state and creationTime (and disks and
    // memory complete) describe a stored snapshot.
    let Ok((snap, parent_name)) = snapshot_from_spec(spec) else {
        return;
    };
    let written = write_snapshot_xml(&snap, parent_name.as_deref());
    let spec = match parse_snapshot_xml(&written) {
        Ok(spec) => spec,
        // Escaping may make the document longer than the limit.
        Err(XmlError::TooLarge { .. }) => return,
        Err(e) => panic!("written document does not parse: {e}\n{written}"),
    };
    let (again, again_parent) = match snapshot_from_spec(spec) {
        Ok(done) => done,
        Err(e) => panic!("written document is incomplete: {e}\n{written}"),
    };
    assert_eq!(again, snap);
    assert_eq!(again_parent, parent_name);
    assert_eq!(write_snapshot_xml(&again, again_parent.as_deref()), written);
});
