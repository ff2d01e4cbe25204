//! Direct reads of an internal snapshot of a qcow2 image: the snapshot's
//! L1 table and the L2 tables and data clusters it points to are never
//! written while the snapshot exists (QEMU copies on write), so they can
//! be read with `pread` beside a running QEMU, without a server.
//!
//! Only the plain layout is handled: no backing file, no encryption, no
//! external data file, no extended L2 entries, no compressed clusters.
//! [`Qcow2Snapshot::open`] answers `None` for anything else, and the
//! caller serves the view through `qemu-nbd` instead.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

const MAGIC: u32 = 0x5146_49fb;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// Incompatible features handled: dirty (0) and corrupt (1) are refused
/// below; external data file (2), compression type (3) and extended L2
/// (4) are not handled.
const UNHANDLED_FEATURES: u64 = !0b11;
/// Most L2 tables kept in memory (64 KiB each at the default cluster size).
const L2_CACHE: usize = 1024;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Where a guest cluster of the snapshot lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Reads as zeros (unallocated without backing file, or a zero cluster).
    Zero,
    /// Data at this host offset.
    Data(u64),
}

/// An internal snapshot of a qcow2 file, read directly.
pub struct Qcow2Snapshot {
    file: File,
    cluster_bits: u32,
    size: u64,
    l1: Vec<u64>,
    l2_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    file_len: u64,
}

impl Qcow2Snapshot {
    /// Opens snapshot `tag` of `image`; `Ok(None)` when the image uses a
    /// feature this reader does not handle (serve it another way).
    pub fn open(image: &Path, tag: &str) -> io::Result<Option<Self>> {
        // QEMU may rewrite the snapshot table meanwhile (a new snapshot of
        // another tag): it writes the new table elsewhere, then points the
        // header at it. A table read between two equal headers is whole.
        for _ in 0..5 {
            let before = table_pointer(image)?;
            let opened = Self::open_once(image, tag)?;
            if table_pointer(image)? == before {
                return Ok(opened);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the snapshot table keeps changing",
        ))
    }

    fn open_once(image: &Path, tag: &str) -> io::Result<Option<Self>> {
        let file = File::open(image)?;
        let file_len = file.metadata()?.len();
        let mut h = [0u8; 104];
        file.read_exact_at(&mut h[..72], 0)?;
        if be32(&h, 0) != MAGIC {
            return Ok(None);
        }
        let version = be32(&h, 4);
        if version == 3 {
            file.read_exact_at(&mut h[72..104], 72)?;
        } else if version != 2 {
            return Ok(None);
        }
        let backing = be64(&h, 8);
        let cluster_bits = be32(&h, 20);
        let crypt = be32(&h, 32);
        let nb_snapshots = be32(&h, 60) as usize;
        let snapshots_offset = be64(&h, 64);
        let incompatible = if version == 3 { be64(&h, 72) } else { 0 };
        if backing != 0 || crypt != 0 || incompatible & UNHANDLED_FEATURES != 0 {
            return Ok(None);
        }
        if incompatible & 0b10 != 0 {
            return Err(bad("the image is marked corrupt"));
        }
        if !(9..=21).contains(&cluster_bits) || nb_snapshots > 65536 {
            return Err(bad("implausible qcow2 header"));
        }
        // Find the snapshot by name in the snapshot table.
        let mut at = snapshots_offset;
        let mut found = None;
        for _ in 0..nb_snapshots {
            let mut e = [0u8; 40];
            file.read_exact_at(&mut e, at)?;
            let l1_offset = be64(&e, 0);
            let l1_size = be32(&e, 8) as usize;
            let id_len = u16::from_be_bytes([e[12], e[13]]) as u64;
            let name_len = u16::from_be_bytes([e[14], e[15]]) as usize;
            let extra_len = be32(&e, 36) as u64;
            if extra_len > 1024 {
                return Err(bad("implausible snapshot table"));
            }
            let mut extra = vec![0u8; extra_len as usize];
            file.read_exact_at(&mut extra, at + 40)?;
            let mut name = vec![0u8; name_len];
            file.read_exact_at(&mut name, at + 40 + extra_len + id_len)?;
            if name == tag.as_bytes() {
                // extra data: vm_state_size_large (8), disk_size (8), ...
                let disk_size = (extra.len() >= 16).then(|| be64(&extra, 8));
                found = Some((l1_offset, l1_size, disk_size));
                break;
            }
            let len = 40 + extra_len + id_len + name_len as u64;
            at += len.div_ceil(8) * 8;
        }
        let Some((l1_offset, l1_size, disk_size)) = found else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no snapshot {tag:?} in {}", image.display()),
            ));
        };
        let size = disk_size.unwrap_or_else(|| be64(&h, 24));
        let l2_entries = 1u64 << (cluster_bits - 3);
        let needed = size.div_ceil(l2_entries << cluster_bits);
        if (l1_size as u64) < needed || l1_size > 1 << 26 {
            return Err(bad("snapshot L1 table does not cover the disk"));
        }
        let mut raw = vec![0u8; l1_size * 8];
        file.read_exact_at(&mut raw, l1_offset)?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Some(Qcow2Snapshot {
            file,
            cluster_bits,
            size,
            l1,
            l2_cache: Mutex::new(HashMap::new()),
            file_len,
        }))
    }

    /// The virtual size of the disk at the snapshot.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_table(&self, offset: u64) -> io::Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.lock().get(&offset) {
            return Ok(t.clone());
        }
        if offset + self.cluster_size() > self.file_len {
            return Err(bad("L2 table beyond the end of the image"));
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        self.file.read_exact_at(&mut raw, offset)?;
        let table = Arc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect::<Vec<_>>());
        let mut cache = self.l2_cache.lock();
        if cache.len() >= L2_CACHE {
            cache.clear();
        }
        cache.insert(offset, table.clone());
        Ok(table)
    }

    /// Where guest cluster `index` lives.
    fn cluster(&self, index: u64) -> io::Result<Cluster> {
        let l2_bits = self.cluster_bits - 3;
        let l1_index = (index >> l2_bits) as usize;
        let Some(l1e) = self.l1.get(l1_index) else {
            return Ok(Cluster::Zero);
        };
        let l2_offset = l1e & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Cluster::Zero);
        }
        let table = self.l2_table(l2_offset)?;
        let l2e = table[(index & ((1 << l2_bits) - 1)) as usize];
        if l2e & L2_COMPRESSED != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "compressed cluster: served through qemu-nbd instead",
            ));
        }
        let host = l2e & OFFSET_MASK;
        if l2e & L2_ZERO != 0 || host == 0 {
            return Ok(Cluster::Zero);
        }
        if host + self.cluster_size()
            > self.file_len.div_ceil(self.cluster_size()) * self.cluster_size()
        {
            return Err(bad("data cluster beyond the end of the image"));
        }
        Ok(Cluster::Data(host))
    }

    /// Reads at `offset`; fewer bytes only at the end of the disk.
    /// Clusters that lie next to each other in the file are read with one
    /// `pread`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let within = pos % cs;
            let first = self.cluster(pos / cs)?;
            // Extend the run while the next cluster continues it.
            let mut len = ((cs - within) as usize).min(n - done);
            while done + len < n {
                let next = self.cluster((pos + len as u64) / cs)?;
                let continues = match (first, next) {
                    (Cluster::Zero, Cluster::Zero) => true,
                    (Cluster::Data(a), Cluster::Data(b)) => b == a + within + len as u64,
                    _ => false,
                };
                if !continues {
                    break;
                }
                len = (len + cs as usize).min(n - done);
            }
            let out = &mut buf[done..done + len];
            match first {
                Cluster::Zero => out.fill(0),
                Cluster::Data(host) => {
                    // The last cluster may end past the file's end.
                    let got = read_some_at(&self.file, out, host + within)?;
                    out[got..].fill(0);
                }
            }
            done += len;
        }
        Ok(n)
    }

    fn find(&self, offset: u64, data: bool) -> io::Result<Option<u64>> {
        if offset >= self.size {
            return Ok(None);
        }
        let cs = self.cluster_size();
        let mut index = offset / cs;
        let last = self.size.div_ceil(cs);
        while index < last {
            let is_data = matches!(self.cluster(index)?, Cluster::Data(_));
            if is_data == data {
                return Ok(Some((index * cs).max(offset)));
            }
            index += 1;
        }
        Ok(if data { None } else { Some(self.size) })
    }

    /// `lseek(SEEK_DATA)`: `None` means `ENXIO`.
    pub fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.find(offset, true)
    }

    /// `lseek(SEEK_HOLE)`: `None` means `ENXIO` (at or past the end).
    pub fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.find(offset, false)
    }
}

/// The header fields that locate the snapshot table (count and offset).
fn table_pointer(image: &Path) -> io::Result<[u8; 12]> {
    let mut b = [0u8; 12];
    File::open(image)?.read_exact_at(&mut b, 60)?;
    Ok(b)
}

fn read_some_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) {
        assert!(Command::new("qemu-img")
            .args(args)
            .status()
            .unwrap()
            .success());
    }

    fn qemu_io(img: &str, cmd: &str) {
        let st = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, img])
            .output()
            .unwrap();
        assert!(st.status.success());
    }

    #[test]
    fn reads_a_snapshot_like_qemu_does() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.qcow2");
        let img_s = img.to_str().unwrap();
        let raw = dir.join("want.raw");
        qemu_img(&["create", "-q", "-f", "qcow2", img_s, "70M"]);
        qemu_io(img_s, "write -P 0x11 0 100k");
        qemu_io(img_s, "write -P 0x22 5M 64k");
        qemu_io(img_s, "write -z 5M 4k");
        qemu_io(img_s, "write -P 0x33 69M 1M");
        qemu_img(&["snapshot", "-c", "s,1", img_s]);
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            "-l",
            "snapshot.name=s,,1",
            img_s,
            raw.to_str().unwrap(),
        ]);
        qemu_io(img_s, "write -P 0x44 0 2M");
        qemu_img(&["snapshot", "-c", "later", img_s]);
        let want = std::fs::read(&raw).unwrap();
        let snap = Qcow2Snapshot::open(&img, "s,1").unwrap().unwrap();
        assert_eq!(snap.size(), 70 << 20);
        let mut got = vec![0u8; want.len()];
        // Odd-sized reads across cluster edges.
        let mut off = 0;
        while off < got.len() {
            let end = (off + 777_777).min(got.len());
            assert_eq!(
                snap.read_at(off as u64, &mut got[off..end]).unwrap(),
                end - off
            );
            off = end;
        }
        assert!(got == want, "bytes differ from qemu-img convert");
        assert_eq!(snap.seek_data(0).unwrap(), Some(0));
        assert_eq!(snap.seek_hole(0).unwrap(), Some(128 << 10));
        assert_eq!(snap.seek_data(128 << 10).unwrap(), Some(5 << 20));
        assert_eq!(snap.seek_data(6 << 20).unwrap(), Some(69 << 20));
        assert_eq!(snap.seek_hole(69 << 20).unwrap(), Some(70 << 20));
        assert_eq!(snap.seek_data(70 << 20).unwrap(), None);
        assert!(Qcow2Snapshot::open(&img, "nope").is_err());
        // A backing file is not handled here.
        let top = dir.join("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            img_s,
            top.to_str().unwrap(),
        ]);
        qemu_img(&["snapshot", "-c", "t", top.to_str().unwrap()]);
        assert!(Qcow2Snapshot::open(&top, "t").unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
