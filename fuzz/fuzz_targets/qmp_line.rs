//! Lines of a QMP peer (the monitor socket may be held by a hostile
//! process): decoding never panics, and an accepted message written back
//! as QMP decodes to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmsnapfs::backend::qmp_message::check_lines(data);
});
