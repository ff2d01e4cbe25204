//! Durable records from raw bytes (the intent journal and the other
//! records of a domain's state directory, in the current JSON format and
//! the line format of earlier versions): parsing never panics, and a
//! record that is read comes back the same after being written again.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmsnapfs::store::check_record_parsers(data);
});
