//! What a disk holds: a filesystem on the whole disk, a partition table
//! (GPT through `gpt`, MBR with logical partitions through `mbrman`), or
//! nothing this reader knows. Partitions are numbered as Linux numbers
//! them: GPT entries 1..128 by their slot, MBR primary 1-4 and logical
//! from 5. A partition that does not lie inside the disk is left out
//! with a note.

use std::io::{self, Seek, SeekFrom};

use super::source::Slice;

/// The filesystems this reader opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext2, ext3 or ext4.
    Ext,
    /// FAT12, FAT16 or FAT32.
    Fat,
}

/// One partition of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Its number (`files/<target>/<number>/`).
    pub number: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The layout of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// A filesystem on the whole disk.
    Whole(FsType),
    /// A partition table (`scheme`: `gpt` or `mbr`); `notes` says what was
    /// left out.
    Parts {
        /// `gpt` or `mbr`.
        scheme: &'static str,
        /// The partitions, by number.
        parts: Vec<Part>,
        /// Entries left out, and why.
        notes: Vec<String>,
    },
    /// Nothing known: the reason.
    Unknown(String),
}

/// At most this many partitions are shown (GPT's usual table size).
pub const MAX_PARTS: usize = 128;
const SECTOR: u64 = 512;

fn read_exact_at(s: &mut Slice, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
    Ok(s.read_at(offset, buf)? == buf.len())
}

/// The filesystem whose signature starts the range `s`, if any: ext's
/// magic 0xEF53 at byte 1080, or a FAT boot sector whose BIOS parameter
/// block is plausible.
pub fn fs_type(s: &mut Slice) -> io::Result<Option<FsType>> {
    let mut magic = [0u8; 2];
    if read_exact_at(s, 1024 + 56, &mut magic)? && u16::from_le_bytes(magic) == 0xEF53 {
        return Ok(Some(FsType::Ext));
    }
    let mut boot = [0u8; 512];
    if read_exact_at(s, 0, &mut boot)? && is_fat_boot_sector(&boot) {
        return Ok(Some(FsType::Fat));
    }
    Ok(None)
}

/// A FAT boot sector: a jump, a boot signature, a power-of-two sector
/// size of 512..4096, a power-of-two cluster, reserved sectors, FATs.
fn is_fat_boot_sector(b: &[u8; 512]) -> bool {
    let jump = b[0] == 0xEB || b[0] == 0xE9;
    let signature = b[510] == 0x55 && b[511] == 0xAA;
    let sector = u16::from_le_bytes([b[11], b[12]]);
    let cluster = b[13];
    let reserved = u16::from_le_bytes([b[14], b[15]]);
    jump && signature
        && sector.is_power_of_two()
        && (512..=4096).contains(&sector)
        && cluster.is_power_of_two()
        && reserved > 0
        && b[16] > 0
}

/// Reads the layout of the disk `s`.
pub fn probe(s: &mut Slice) -> io::Result<Layout> {
    let mut lba1 = [0u8; 8];
    if read_exact_at(s, SECTOR, &mut lba1)? && &lba1 == b"EFI PART" {
        return Ok(gpt_parts(s));
    }
    if let Some(t) = fs_type(s)? {
        return Ok(Layout::Whole(t));
    }
    let mut mbr = [0u8; 512];
    if read_exact_at(s, 0, &mut mbr)? && looks_like_mbr(&mbr) {
        return Ok(mbr_parts(s));
    }
    Ok(Layout::Unknown(
        "no ext2/3/4 or FAT filesystem and no GPT or MBR partition table".into(),
    ))
}

/// The boot signature, each entry's boot flag 0 or 0x80, one entry used.
fn looks_like_mbr(b: &[u8; 512]) -> bool {
    let entries = || b[446..510].chunks(16);
    b[510] == 0x55
        && b[511] == 0xAA
        && entries().all(|e| e[0] == 0 || e[0] == 0x80)
        && entries().any(|e| e[4] != 0)
}

/// Keeps a partition that lies inside the disk; else a note.
fn place(
    parts: &mut Vec<Part>,
    notes: &mut Vec<String>,
    number: u32,
    start: Option<u64>,
    len: Option<u64>,
    disk: u64,
) {
    match (start, len) {
        (Some(start), Some(len))
            if len > 0 && start.checked_add(len).is_some_and(|end| end <= disk) =>
        {
            if parts.len() < MAX_PARTS {
                parts.push(Part { number, start, len });
            } else {
                notes.push(format!("partition {number}: more than {MAX_PARTS} partitions"));
            }
        }
        _ => notes.push(format!(
            "partition {number}: start {start:?} length {len:?} does not lie inside the disk ({disk} bytes)"
        )),
    }
}

fn gpt_parts(s: &mut Slice) -> Layout {
    let disk_len = s.len();
    let _ = s.seek(SeekFrom::Start(0));
    let opened = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open_from_device(&mut *s);
    let disk = match opened {
        Ok(d) => d,
        Err(e) => return Layout::Unknown(format!("unreadable GPT partition table: {e}")),
    };
    let (mut parts, mut notes) = (Vec::new(), Vec::new());
    for (number, p) in disk.partitions() {
        if !p.is_used() {
            continue;
        }
        let lb = gpt::disk::LogicalBlockSize::Lb512;
        place(
            &mut parts,
            &mut notes,
            *number,
            p.bytes_start(lb).ok(),
            p.bytes_len(lb).ok(),
            disk_len,
        );
    }
    Layout::Parts {
        scheme: "gpt",
        parts,
        notes,
    }
}

fn mbr_parts(s: &mut Slice) -> Layout {
    let disk_len = s.len();
    let _ = s.seek(SeekFrom::Start(0));
    let mbr = match mbrman::MBR::read_from(s, SECTOR as u32) {
        Ok(m) => m,
        Err(e) => return Layout::Unknown(format!("unreadable MBR partition table: {e}")),
    };
    let (mut parts, mut notes) = (Vec::new(), Vec::new());
    for (number, p) in mbr.iter() {
        if !p.is_used() || p.is_extended() {
            continue;
        }
        place(
            &mut parts,
            &mut notes,
            number as u32,
            u64::from(p.starting_lba).checked_mul(SECTOR),
            u64::from(p.sectors).checked_mul(SECTOR),
            disk_len,
        );
    }
    Layout::Parts {
        scheme: "mbr",
        parts,
        notes,
    }
}
