//! The frozen-view reader over a qcow2 image of arbitrary bytes (images
//! sit on shared storage; their owner writes every byte): opening and
//! reading at the active table and every internal snapshot never panics,
//! hangs or allocates without bound; malformed metadata is an error.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmsnapfs::views::check_image(data);
});
