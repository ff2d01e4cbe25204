//! The readers of the guest's files over a disk of arbitrary bytes (the
//! guest writes every byte of its disks): the partition table, ext2/3/4
//! and FAT, every directory, symlink and file as `files/` reads them never
//! panic, hang or allocate without bound. A panic inside a reader crate is
//! caught by vmsnapfs at run time (the directory then shows empty, `.log`
//! says why), but libFuzzer's panic hook still reports it here.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmsnapfs::guestfs::disk::check_image(data);
});
