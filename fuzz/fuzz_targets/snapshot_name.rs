//! Snapshot names from raw bytes (as FUSE hands them over): checking never
//! panics, and an accepted name is a safe single path component.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsnapfs::model::{validate_name, validate_name_bytes, MAX_NAME_BYTES};

fuzz_target!(|data: &[u8]| {
    let Ok(name) = validate_name_bytes(data) else {
        return;
    };
    assert_eq!(name.as_bytes(), data);
    assert!(!name.is_empty());
    assert!(name.len() <= MAX_NAME_BYTES);
    assert!(!name.contains('/'));
    assert!(!name.contains('\0'));
    assert!(!name.starts_with('.'));
    assert!(!name.chars().any(char::is_control));
    assert_eq!(validate_name(name), Ok(()));
});
