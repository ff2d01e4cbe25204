//! `vmsnapfs apply`: rebuilds the disk at a snapshot from a full copy of
//! the disk at another snapshot (a raw file) and the changes between the
//! two (`since/<other>/<target>` and its `.map`, or copies of them): the
//! map's `data` runs are copied from the changes file into the copy, at
//! the same offsets, and the copy takes the map's length. The map is
//! what counts, not the changes file's holes: a copy of a changes file
//! made sparse by `cp --sparse=always` has holes where the disk changed
//! to zeros.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use serde::Deserialize;

/// One entry of a `.map` (the fields of `qemu-img map --output=json`
/// that matter here).
#[derive(Debug, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
}

/// The `data` runs of a map and the disk size it covers.
pub fn read_map(text: &[u8]) -> io::Result<(Vec<(u64, u64)>, u64)> {
    let entries: Vec<MapEntry> = serde_json::from_slice(text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("map: {e}")))?;
    let mut end = 0u64;
    let mut runs = Vec::new();
    for e in entries {
        if e.start != end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("map: entry at {} does not follow {end}", e.start),
            ));
        }
        end = e
            .start
            .checked_add(e.length)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "map: overflow"))?;
        if e.data && e.length > 0 {
            runs.push((e.start, e.length));
        }
    }
    Ok((runs, end))
}

/// Copies the `data` runs of `map` from `changes` into `target` (which
/// must exist: the full copy of the older disk) and sets its length to
/// the disk size. Returns the bytes copied.
pub fn apply(changes: &Path, map: &Path, target: &Path) -> io::Result<u64> {
    let (runs, size) = read_map(&std::fs::read(map)?)?;
    let src = File::open(changes)?;
    let dst = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    for (start, len) in runs {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], start + done)?;
            dst.write_all_at(&buf[..n], start + done)?;
            done += n as u64;
        }
        copied += len;
    }
    dst.set_len(size)?;
    dst.sync_all()?;
    Ok(copied)
}
