//! A cheap fingerprint of an image file, to tell whether a frozen image
//! was written after it was frozen: its size, its modification time (any
//! `write(2)`, so any guest write through QEMU, changes it) and a hash of
//! its metadata (for qcow2: the header cluster, the L1 table and the
//! refcount table, which a write that allocates changes; for other
//! formats: the first 64 KiB).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Most bytes of one table that are hashed.
const TABLE_LIMIT: u64 = 32 << 20;

/// What is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    /// File size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// FNV-1a 64 of the metadata read.
    pub meta: u64,
}

/// FNV-1a, 64 bits: stable across builds (the fingerprints are stored).
fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn read_hash(file: &File, h: u64, offset: u64, len: u64, file_len: u64) -> io::Result<u64> {
    let len = len.min(TABLE_LIMIT).min(file_len.saturating_sub(offset));
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    Ok(fnv(h, &buf))
}

impl Fingerprint {
    /// Reads the fingerprint of `image` (never following a symlink).
    pub fn of(image: &Path) -> io::Result<Fingerprint> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(image)?;
        let md = file.metadata()?;
        let size = md.len();
        let mtime_ns = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut head = [0u8; 64];
        let got = file.read_at(&mut head, 0)?;
        let be32 = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().expect("4"));
        let be64 = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().expect("8"));
        if got == 64 && be32(0) == 0x5146_49fb && (9..=21).contains(&be32(20)) {
            let cluster = 1u64 << be32(20);
            h = read_hash(&file, h, 0, cluster, size)?;
            h = read_hash(&file, h, be64(40), u64::from(be32(36)) * 8, size)?;
            h = read_hash(&file, h, be64(48), u64::from(be32(56)) * cluster, size)?;
        } else {
            h = read_hash(&file, h, 0, 64 << 10, size)?;
        }
        Ok(Fingerprint {
            size,
            mtime_ns,
            meta: h,
        })
    }

    /// The stored form.
    pub fn to_text(self) -> String {
        format!("{} {} {:016x}", self.size, self.mtime_ns, self.meta)
    }

    /// Parses [`Fingerprint::to_text`].
    pub fn parse(text: &str) -> Option<Fingerprint> {
        let mut f = text.split(' ');
        Some(Fingerprint {
            size: f.next()?.parse().ok()?,
            mtime_ns: f.next()?.parse().ok()?,
            meta: u64::from_str_radix(f.next()?, 16).ok()?,
        })
    }

    /// What differs from `was`, in words; `None` when nothing does.
    pub fn changes_since(&self, was: &Fingerprint) -> Option<String> {
        let mut what = Vec::new();
        if self.size != was.size {
            what.push(format!("size {} -> {} bytes", was.size, self.size));
        }
        if self.mtime_ns != was.mtime_ns {
            let secs = self.mtime_ns.div_euclid(1_000_000_000);
            what.push(format!("modified at {} (epoch seconds)", secs));
        }
        if self.meta != was.meta {
            what.push("qcow2 metadata changed".into());
        }
        (!what.is_empty()).then(|| what.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_changes_the_fingerprint() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.qcow2");
        crate::backend::qemu_img::run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &img.to_string_lossy(),
            "16M",
        ])
        .unwrap();
        let a = Fingerprint::of(&img).unwrap();
        assert_eq!(Fingerprint::parse(&a.to_text()), Some(a));
        assert_eq!(Fingerprint::of(&img).unwrap().changes_since(&a), None);
        // A write that allocates (new L2 table, refcounts, size).
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 1 0 64k"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(st.status.success());
        let b = Fingerprint::of(&img).unwrap();
        assert!(b.meta != a.meta && b.size != a.size);
        // A write in place (allocated cluster): the mtime tells.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 2 0 4k"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(st.status.success());
        let c = Fingerprint::of(&img).unwrap();
        assert!(c.changes_since(&b).unwrap().contains("modified at"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
