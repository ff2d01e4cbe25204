//! One qcow2 image read at a fixed L1 table: an internal snapshot's (its
//! L1 table, and the L2 tables and clusters it points to, are never
//! written while the snapshot exists: QEMU copies on write), or the active
//! table of an image nobody writes any more (an external snapshot's point,
//! a backing file).
//!
//! The image's owner controls every byte of it, so everything read is
//! checked: a table or cluster outside the file, an unaligned offset, a
//! size past QEMU's own limits is an `InvalidData` error (`EIO`), never a
//! panic, an unbounded allocation or a read outside the file.
//!
//! Handled: versions 2 and 3, compressed clusters (deflate and zstd),
//! zero clusters, extended L2 entries (subclusters), internal snapshots,
//! the dirty bit. Refused: encryption, external data files, images marked
//! corrupt, incompatible features this reader does not know.

use std::io;

use super::compressed::Compression;
use super::image::{malformed, Storage};

const MAGIC: u32 = 0x5146_49fb;
/// Host offset bits of L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Incompatible features this reader knows: dirty, corrupt, data file,
/// compression type, extended L2.
const KNOWN_INCOMPAT: u64 = 0b1_1111;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// QEMU's limits: L1 table bytes, snapshots, snapshot extra data,
/// snapshot table bytes, backing file name bytes.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
const MAX_BACKING_NAME: u32 = 1023;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// What a qcow2 header says, checked.
#[derive(Debug, Clone)]
pub struct Header {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// The virtual size of the active disk.
    pub size: u64,
    /// The active L1 table: offset and entries.
    pub l1: (u64, u32),
    /// The internal snapshots: count and table offset.
    pub snapshots: (u32, u64),
    /// How compressed clusters are compressed.
    pub compression: Compression,
    /// 16-byte L2 entries with a subcluster bitmap.
    pub extended_l2: bool,
    /// The backing file name, as written (bytes).
    pub backing: Option<Vec<u8>>,
    /// The backing file's format, as written (the header extension).
    pub backing_format: Option<Vec<u8>>,
}

impl Header {
    /// Reads and checks the header of `img`; `Unsupported` for images
    /// this reader refuses by design (encrypted, external data file,
    /// unknown incompatible features).
    pub fn read(img: &dyn Storage) -> io::Result<Header> {
        let mut h = [0u8; 112];
        let got = img.read_upto(&mut h, 0)?;
        if got < 72 || be32(&h, 0) != MAGIC {
            return Err(malformed("not a qcow2 image (no qcow2 header)"));
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(refused(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(malformed(format!("cluster bits {cluster_bits}")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompat, header_len) = if version == 3 {
            if got < 104 {
                return Err(malformed("short version 3 header"));
            }
            (be64(&h, 72), be32(&h, 100))
        } else {
            (0, 72)
        };
        if header_len < 72 || (version == 3 && header_len < 104) || header_len as u64 > cluster_size
        {
            return Err(malformed(format!("header length {header_len}")));
        }
        if be32(&h, 32) != 0 {
            return Err(refused("the image is encrypted; vmsnapfs holds no key"));
        }
        let unknown = incompat & !KNOWN_INCOMPAT;
        if unknown != 0 {
            return Err(refused(format!(
                "unknown incompatible features {unknown:#x}"
            )));
        }
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(malformed("the image is marked corrupt"));
        }
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(refused("the image has an external data file"));
        }
        let compression = if incompat & INCOMPAT_COMPRESSION != 0 {
            if header_len <= 104 || got < 105 {
                return Err(malformed("compression type bit without the field"));
            }
            Compression::from_byte(h[104])
                .ok_or_else(|| refused(format!("compression type {}", h[104])))?
        } else {
            Compression::Deflate
        };
        let extended_l2 = incompat & INCOMPAT_EXTENDED_L2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(malformed("extended L2 entries with clusters under 16 KiB"));
        }
        // Header extensions and the backing file name live in the first
        // cluster.
        let first = cluster_size.min(img.len()) as usize;
        let mut c0 = vec![0u8; first];
        img.read_exact_in(&mut c0, 0, "first cluster")?;
        let backing_offset = be64(&h, 8);
        let backing_len = be32(&h, 16);
        let backing = if backing_offset == 0 {
            None
        } else {
            if backing_len == 0
                || backing_len > MAX_BACKING_NAME
                || backing_offset.saturating_add(backing_len as u64) > first as u64
            {
                return Err(malformed("backing file name outside the first cluster"));
            }
            let at = backing_offset as usize;
            Some(c0[at..at + backing_len as usize].to_vec())
        };
        let mut backing_format = None;
        let mut at = header_len as usize;
        loop {
            if at + 8 > first {
                return Err(malformed("header extensions run past the first cluster"));
            }
            let (kind, len) = (be32(&c0, at), be32(&c0, at + 4) as usize);
            at += 8;
            if kind == 0 {
                break;
            }
            if len > first - at {
                return Err(malformed("header extension past the first cluster"));
            }
            let data = &c0[at..at + len];
            match kind {
                EXT_BACKING_FORMAT => backing_format = Some(data.to_vec()),
                EXT_DATA_FILE => return Err(refused("the image names an external data file")),
                _ => {}
            }
            at += len.div_ceil(8) * 8;
        }
        let snapshots = (be32(&h, 60), be64(&h, 64));
        if snapshots.0 > MAX_SNAPSHOTS {
            return Err(malformed(format!("{} snapshots", snapshots.0)));
        }
        Ok(Header {
            cluster_bits,
            size: be64(&h, 24),
            l1: (be64(&h, 40), be32(&h, 36)),
            snapshots,
            compression,
            extended_l2,
            backing,
            backing_format,
        })
    }
}

/// An `Unsupported` error: a layout read by design only through QEMU.
fn refused(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{what}: not read by vmsnapfs"),
    )
}

/// One entry of the internal snapshot table.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    /// Its name (the tag).
    pub name: Vec<u8>,
    /// Its L1 table: offset and entries.
    pub l1: (u64, u32),
    /// The disk size it records (version 3), if any.
    pub disk_size: Option<u64>,
}

/// Reads the internal snapshot table, checked against QEMU's limits.
pub fn snapshot_table(img: &dyn Storage, header: &Header) -> io::Result<Vec<SnapshotEntry>> {
    let (count, mut at) = header.snapshots;
    if count == 0 {
        return Ok(Vec::new());
    }
    if !at.is_multiple_of(1 << header.cluster_bits) {
        return Err(malformed("snapshot table not aligned to a cluster"));
    }
    let start = at;
    let mut out = Vec::new();
    for _ in 0..count {
        let mut e = [0u8; 40];
        img.read_exact_in(&mut e, at, "snapshot table entry")?;
        let id_len = be16(&e, 12) as u64;
        let name_len = be16(&e, 14) as usize;
        let extra_len = be32(&e, 36);
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(malformed("snapshot extra data too large"));
        }
        let mut extra = vec![0u8; extra_len as usize];
        img.read_exact_in(&mut extra, at + 40, "snapshot extra data")?;
        let mut name = vec![0u8; name_len];
        img.read_exact_in(
            &mut name,
            at + 40 + extra_len as u64 + id_len,
            "snapshot name",
        )?;
        out.push(SnapshotEntry {
            name,
            l1: (be64(&e, 0), be32(&e, 8)),
            // extra data: vm_state_size_large (8), disk_size (8), ...
            disk_size: (extra.len() >= 16).then(|| be64(&extra, 8)),
        });
        let len = 40 + extra_len as u64 + id_len + name_len as u64;
        at += len.div_ceil(8) * 8;
        if at - start > MAX_SNAPSHOT_TABLE {
            return Err(malformed("snapshot table too large"));
        }
    }
    Ok(out)
}

/// The snapshot table of an image a running QEMU may be rewriting (a
/// new snapshot of another tag): QEMU writes the new table elsewhere,
/// then points the header at it. A table read between two equal header
/// pointers is whole.
fn stable_snapshot_table(img: &dyn Storage, header: &Header) -> io::Result<Vec<SnapshotEntry>> {
    let pointer = || -> io::Result<(u32, u64)> {
        let mut b = [0u8; 12];
        img.read_exact_in(&mut b, 60, "snapshot table pointer")?;
        Ok((be32(&b, 0), be64(&b, 4)))
    };
    let mut h = header.clone();
    for _ in 0..5 {
        img.refresh();
        h.snapshots = pointer()?;
        if h.snapshots.0 > MAX_SNAPSHOTS {
            return Err(malformed(format!("{} snapshots", h.snapshots.0)));
        }
        let table = snapshot_table(img, &h);
        if pointer()? == h.snapshots {
            return table;
        }
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "the snapshot table keeps changing",
    ))
}

/// What one qcow2 layer says of the guest bytes at some offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this layer: the backing layer answers.
    Below,
    /// Reads as zeros.
    Zero,
    /// Plain data at this host offset (of the asked guest offset).
    Data(u64),
    /// Inside a compressed cluster: its L2 entry.
    Compressed(u64),
}

/// One qcow2 layer at a fixed L1 table.
pub struct Qcow2Layer {
    /// The image's bytes.
    pub storage: Box<dyn Storage>,
    /// The disk size this L1 table describes.
    pub size: u64,
    cluster_bits: u32,
    compression: Compression,
    extended_l2: bool,
    l1: Vec<u64>,
}

impl Qcow2Layer {
    /// The layer of `storage` (whose checked header is `header`) at
    /// internal snapshot `tag`, or at its active table when `None`.
    /// Only the L1 entries that cover the first `limit` bytes of the disk
    /// are loaded (the view's size: nothing past it is ever read).
    pub fn open(
        storage: Box<dyn Storage>,
        header: &Header,
        tag: Option<&[u8]>,
        limit: Option<u64>,
    ) -> io::Result<Self> {
        let (l1, size) = match tag {
            None => (header.l1, header.size),
            Some(tag) => {
                let table = stable_snapshot_table(storage.as_ref(), header)?;
                let Some(s) = table.into_iter().find(|s| s.name == tag) else {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no internal snapshot {:?}", String::from_utf8_lossy(tag)),
                    ));
                };
                (s.l1, s.disk_size.unwrap_or(header.size))
            }
        };
        let cb = header.cluster_bits;
        let entry_bits = if header.extended_l2 { 4 } else { 3 };
        let per_l1 = 1u64 << (cb - entry_bits + cb);
        let needed = size.div_ceil(per_l1);
        if (l1.1 as u64) < needed {
            return Err(malformed("the L1 table does not cover the disk"));
        }
        let load = limit.unwrap_or(size).min(size).div_ceil(per_l1);
        if load * 8 > MAX_L1_BYTES {
            return Err(malformed("the L1 table is larger than QEMU allows"));
        }
        if !l1.0.is_multiple_of(1 << cb) {
            return Err(malformed("L1 table not aligned to a cluster"));
        }
        if l1.0.saturating_add(load * 8) > storage.len() {
            return Err(malformed("the L1 table lies past the end of the image"));
        }
        let mut raw = vec![0u8; load as usize * 8];
        storage.read_exact_in(&mut raw, l1.0, "L1 table")?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Qcow2Layer {
            storage,
            size,
            cluster_bits: cb,
            compression: header.compression,
            extended_l2: header.extended_l2,
            l1,
        })
    }

    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes of the loaded L1 table (for the chain's memory bound).
    pub fn l1_bytes(&self) -> u64 {
        self.l1.len() as u64 * 8
    }

    fn l2_entries(&self) -> u64 {
        1 << (self.cluster_bits - if self.extended_l2 { 4 } else { 3 })
    }

    /// Where the L2 table for guest offset `pos` is: `None` when the L1
    /// entry is empty, with the bytes from `pos` that the answer covers.
    pub fn l2_of(&self, pos: u64) -> io::Result<(Option<u64>, u64)> {
        let span = self.l2_entries() << self.cluster_bits;
        let left = span - pos % span;
        let Some(&e) = self.l1.get((pos / span) as usize) else {
            return Ok((None, left));
        };
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok((None, left));
        }
        if !off.is_multiple_of(self.cluster_size()) {
            return Err(malformed(format!("L2 table offset {off:#x} unaligned")));
        }
        if off.saturating_add(self.cluster_size()) > self.storage.len() {
            return Err(malformed(format!("L2 table at {off:#x} past the end")));
        }
        Ok((Some(off), left))
    }

    /// Reads the L2 table at `offset` (checked by [`Self::l2_of`]) as
    /// 64-bit entries.
    pub fn read_l2(&self, offset: u64) -> io::Result<Vec<u64>> {
        let mut raw = vec![0u8; self.cluster_size() as usize];
        self.storage.read_exact_in(&mut raw, offset, "L2 table")?;
        Ok(raw.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    /// What the L2 table `l2` says of guest offset `pos`, with the bytes
    /// from `pos` that the answer covers (to the end of its cluster, or
    /// of its run of like subclusters).
    pub fn map(&self, l2: &[u64], pos: u64) -> io::Result<(Mapping, u64)> {
        let cs = self.cluster_size();
        let within = pos % cs;
        let index = ((pos >> self.cluster_bits) % self.l2_entries()) as usize;
        let (entry, bitmap) = if self.extended_l2 {
            (l2[2 * index], Some(l2[2 * index + 1]))
        } else {
            (l2[index], None)
        };
        let host = entry & OFFSET_MASK;
        if entry & L2_COMPRESSED != 0 {
            return Ok((Mapping::Compressed(entry), cs - within));
        }
        let data = |host: u64| -> io::Result<Mapping> {
            if !host.is_multiple_of(cs) {
                return Err(malformed(format!("data cluster {host:#x} unaligned")));
            }
            if host >= self.storage.len() {
                return Err(malformed(format!("data cluster {host:#x} past the end")));
            }
            Ok(Mapping::Data(host + within))
        };
        let Some(bitmap) = bitmap else {
            let m = if entry & L2_ZERO != 0 {
                Mapping::Zero
            } else if host == 0 {
                Mapping::Below
            } else {
                data(host)?
            };
            // The answer holds on over the next entries that continue it.
            let mut len = cs - within;
            for (k, &next) in l2[index + 1..].iter().enumerate() {
                let same = match m {
                    Mapping::Data(_) => {
                        entry.checked_add((k as u64 + 1) * cs) == Some(next)
                            && (next & OFFSET_MASK) < self.storage.len()
                    }
                    _ => next == entry,
                };
                if !same {
                    break;
                }
                len += cs;
            }
            return Ok((m, len));
        };
        let (alloc, zero) = (bitmap & 0xffff_ffff, bitmap >> 32);
        if alloc & zero != 0 || (host == 0 && alloc != 0) {
            return Err(malformed("invalid subcluster bitmap"));
        }
        let sub = cs / SUBCLUSTERS;
        let kind = |i: u64| (alloc >> i & 1, zero >> i & 1);
        let first = within / sub;
        let mut last = first;
        while last + 1 < SUBCLUSTERS && kind(last + 1) == kind(first) {
            last += 1;
        }
        let len = (last + 1) * sub - within;
        let m = match kind(first) {
            (_, 1) => Mapping::Zero,
            (1, _) => data(host)?,
            _ => Mapping::Below,
        };
        Ok((m, len))
    }

    /// Decompresses the cluster of compressed L2 entry `entry` into `out`
    /// (one cluster).
    pub fn decompress(&self, entry: u64, out: &mut [u8]) -> io::Result<()> {
        let shift = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1 << shift) - 1);
        let sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (offset & 511);
        if offset >= self.storage.len() {
            return Err(malformed(format!(
                "compressed cluster {offset:#x} past the end"
            )));
        }
        // The last compressed cluster may end before its last sector.
        let len = len.min(self.storage.len() - offset);
        let mut input = vec![0u8; len as usize];
        self.storage
            .read_exact_in(&mut input, offset, "compressed cluster")?;
        self.compression.decompress(&input, out)
    }
}
