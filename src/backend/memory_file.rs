//! What a memory file holds, read from its first bytes: after a crash a
//! checkpoint's record may not be written yet, and a live copy that fell
//! back to a background stream wrote a file of another format than its
//! plan says.

use std::io::Read;
use std::path::Path;

use crate::model::MemoryFormat;

/// The magic number a QEMU migration file starts with (`QEVM`).
const MAGIC: &[u8] = b"QEVM";
/// The subsection of the configuration section listing the capabilities
/// a file needs to be loaded (QEMU 9.0 and later write it when one is on).
const CAPABILITIES: &[u8] = b"configuration/capabilities";
/// `mapped-ram` as a length-prefixed string, as that subsection lists it.
const MAPPED_RAM: &[u8] = b"\x0amapped-ram";
/// How many bytes of the header are read: the configuration section
/// (machine type and capabilities) comes first.
pub const HEAD: usize = 512;

/// The format of a memory file that starts with `head`; `None` when it is
/// not a QEMU migration file.
pub fn format_of(head: &[u8]) -> Option<MemoryFormat> {
    if !head.starts_with(MAGIC) {
        return None;
    }
    let caps = find(head, CAPABILITIES).map(|i| &head[i + CAPABILITIES.len()..]);
    match caps {
        Some(rest) if find(rest, MAPPED_RAM).is_some() => Some(MemoryFormat::MappedRam),
        _ => Some(MemoryFormat::Stream),
    }
}

/// [`format_of`] the file at `path` (opened without following a symlink).
pub fn format_of_file(path: &Path) -> std::io::Result<Option<MemoryFormat>> {
    let mut f = crate::store::owned::open_existing(path, false)?;
    let mut head = Vec::with_capacity(HEAD);
    f.by_ref().take(HEAD as u64).read_to_end(&mut head)?;
    Ok(format_of(&head))
}

/// The share (0 to 1) of `file`'s pages in the page cache (`mincore` of
/// a read-only mapping); `None` when that cannot be told.
pub fn resident_share(file: &std::fs::File) -> Option<f64> {
    use std::os::fd::AsRawFd;
    let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
    if len == 0 {
        return None;
    }
    // SAFETY: a read-only shared mapping of a file we hold open, never
    // read through, unmapped before returning.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    // SAFETY: the mapping made above, of `len` bytes.
    unsafe { libc::munmap(addr, len) };
    if r != 0 {
        return None;
    }
    let resident = vec.iter().filter(|b| *b & 1 == 1).count();
    Some(resident as f64 / vec.len() as f64)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of a file QEMU 10.0 wrote with mapped-ram.
    const MAPPED: &[u8] =
        b"QEVM\0\0\0\x03\x07\0\0\0\x0bpc-q35-10.0\x05\x1aconfiguration/capabilities\
\0\0\0\x01\0\0\0\x01\x0amapped-ram\x01\0\0\0\x01\x03ram\0\0\0\0";
    /// The first bytes of a stream QEMU 7.2 wrote.
    const STREAM: &[u8] =
        b"QEVM\0\0\0\x03\x07\0\0\0\x0apc-q35-7.2\x01\0\0\0\x02\x03ram\0\0\0\0\0\0\0\x04";

    #[test]
    fn tells_mapped_ram_from_a_stream() {
        assert_eq!(format_of(MAPPED), Some(MemoryFormat::MappedRam));
        assert_eq!(format_of(STREAM), Some(MemoryFormat::Stream));
        // Not a migration file at all.
        assert_eq!(format_of(b"\0\0\0\0"), None);
        assert_eq!(format_of(b""), None);
        // "mapped-ram" elsewhere than in the capabilities is not the format.
        let mut odd = STREAM.to_vec();
        odd.extend_from_slice(b"\x0amapped-ram");
        assert_eq!(format_of(&odd), Some(MemoryFormat::Stream));
    }

    #[test]
    fn tells_how_much_of_a_file_is_in_the_page_cache() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("vmsnapfs-resident-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // Just written: in the page cache.
        assert!(resident_share(&f).unwrap() > 0.9);
        f.sync_all().unwrap();
        use std::os::fd::AsRawFd;
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert!(resident_share(&f).unwrap() < 0.5);
        std::fs::remove_file(&path).unwrap();
        let empty = tempfile_empty();
        assert_eq!(resident_share(&empty), None);
    }

    fn tempfile_empty() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("vmsnapfs-empty-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
