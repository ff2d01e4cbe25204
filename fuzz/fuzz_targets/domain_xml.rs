//! Domain definitions: parsing and redaction never panic, and redaction
//! keeps a readable definition readable with the same meaning and every
//! `passwd` attribute blanked.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quick_xml::events::Event;
use quick_xml::Reader;
use vmsnapfs::xml::{parse_domain_def, redact_secrets, XmlError};

/// Panics unless every `passwd` attribute quick-xml reads in `xml` (up to
/// the first error, if `well_formed` is false) has the value `***`.
fn assert_passwords_hidden(xml: &str, well_formed: bool) {
    let mut reader = Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(Event::Start(tag) | Event::Empty(tag)) => {
                for attr in tag.attributes().with_checks(false).flatten() {
                    if attr.key.as_ref() == "passwd" {
                        assert_eq!(attr.value, "***", "{xml}");
                    }
                }
            }
            Ok(Event::Eof) => return,
            Ok(_) => {}
            Err(e) if well_formed => panic!("redacted XML is not well-formed: {e}\n{xml}"),
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_domain_def(text);
    let redacted = redact_secrets(text);
    assert_passwords_hidden(&redacted, false);
    let Ok(def) = parsed else {
        return;
    };
    assert_eq!(def.xml, text);
    match parse_domain_def(&redacted) {
        Ok(again) => {
            assert_eq!(again.name, def.name);
            assert_eq!(again.monitor, def.monitor);
            assert_eq!(again.disks, def.disks);
            assert_eq!(again.commandline, def.commandline);
            assert_eq!(again.policy, def.policy);
            assert_passwords_hidden(&redacted, true);
        }
        // `***` may be longer than the value it replaces.
        Err(XmlError::TooLarge { .. }) => {}
        Err(e) => panic!("redacted definition no longer parses: {e}\n{redacted}"),
    }
});
