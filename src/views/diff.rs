//! The changed extents between two frozen disks: where the disk at one
//! snapshot may differ from the disk at another, found in the images'
//! maps. Two runs of guest bytes that come from the same bytes of the
//! same image file (the same data cluster, the same compressed cluster,
//! or zeros on both sides) are equal: frozen images never change, and
//! a cluster two snapshots share is never rewritten while they exist.
//! Everything else is reported changed, so the answer is a superset of
//! the real change, never less:
//!
//! - internal snapshots of one image: the two L2 entries are compared
//!   (a cluster both snapshots point to is unchanged);
//! - external chains: a run neither the overlays between the two points
//!   nor anything else rewrote resolves to the same cluster on both
//!   sides; the union of those overlays' allocations is what differs;
//! - mixed chains, and chains after merges, alike: the rule looks only
//!   at where each side's bytes are now.
//!
//! Two chains that share no image have no map relating them (two raw
//! files, say): then the bytes are compared, in blocks, and the result
//! says so.

use std::io;

use super::chain::{Chain, Origin};

/// Blocks compared at a time where no map relates the two disks.
pub const COMPARE_BLOCK: u64 = 64 << 10;

/// The changed extents of one disk between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The disk's virtual size at the newer snapshot.
    pub size: u64,
    /// Sorted, disjoint, not adjacent `(start, length)` runs.
    pub extents: Vec<(u64, u64)>,
    /// Bytes whose sameness was decided by reading both sides.
    pub compared: u64,
}

impl Changes {
    /// Bytes reported changed.
    pub fn changed_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }

    /// The first changed byte at or after `offset` (`SEEK_DATA`).
    pub fn seek_data(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let i = self.extents.partition_point(|&(s, l)| s + l <= offset);
        self.extents.get(i).map(|&(s, _)| s.max(offset))
    }

    /// The first unchanged byte at or after `offset`, or the end
    /// (`SEEK_HOLE`); `None` at or past the end.
    pub fn seek_hole(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let i = self.extents.partition_point(|&(s, l)| s + l <= offset);
        Some(match self.extents.get(i) {
            Some(&(s, l)) if s <= offset => s + l,
            _ => offset,
        })
    }

    /// The extents as `qemu-img map --output=json` shows a disk: every
    /// byte of the disk in one entry, `data` where it changed.
    pub fn map_json(&self) -> String {
        let mut out = String::from("[");
        let mut pos = 0u64;
        let mut first = true;
        let mut entry = |out: &mut String, start: u64, len: u64, data: bool| {
            if len == 0 {
                return;
            }
            out.push_str(if first { "" } else { ",\n" });
            first = false;
            out.push_str(&format!(
                "{{ \"start\": {start}, \"length\": {len}, \"depth\": 0, \
                 \"present\": {data}, \"zero\": {}, \"data\": {data}, \
                 \"compressed\": false}}",
                !data
            ));
        };
        for &(s, l) in &self.extents {
            entry(&mut out, pos, s - pos, false);
            entry(&mut out, s, l, true);
            pos = s + l;
        }
        entry(&mut out, pos, self.size.saturating_sub(pos), false);
        out.push_str("]\n");
        out
    }

    fn push(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        match self.extents.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => self.extents.push((start, len)),
        }
    }
}

/// What is at `pos` in `chain`, past its end zeros.
fn origin_at(chain: &Chain, pos: u64, max: u64) -> io::Result<(Origin, u64)> {
    if pos >= chain.size() {
        return Ok((Origin::Zero, max));
    }
    chain.origin(pos, max.min(chain.size() - pos))
}

/// Where `new` may differ from `old` (`None`: an empty disk, so every
/// byte `new` holds data in is changed).
pub fn changes(new: &Chain, old: Option<&Chain>) -> io::Result<Changes> {
    let size = new.size();
    let mut out = Changes {
        size,
        ..Changes::default()
    };
    let related = old.is_none_or(|o| {
        let theirs = o.files();
        new.files().iter().any(|f| theirs.contains(f))
    });
    let mut pos = 0u64;
    while pos < size {
        let left = size - pos;
        let (a, la) = new.origin(pos, left)?;
        let (b, lb) = match old {
            Some(o) => origin_at(o, pos, left)?,
            None => (Origin::Zero, left),
        };
        let len = la.min(lb).max(1);
        if !a.same_as(&b) {
            match old {
                Some(o) if !related => compare(new, o, pos, len, &mut out)?,
                _ => out.push(pos, len),
            }
        }
        pos += len;
    }
    Ok(out)
}

/// Compares the bytes of `new` and `old` in `[pos, pos+len)`, block by
/// block, and records the blocks that differ.
fn compare(new: &Chain, old: &Chain, pos: u64, len: u64, out: &mut Changes) -> io::Result<()> {
    let mut a = vec![0u8; COMPARE_BLOCK as usize];
    let mut b = vec![0u8; COMPARE_BLOCK as usize];
    let end = pos + len;
    let mut at = pos;
    while at < end {
        // Blocks are aligned, so that a block cut by two runs is whole.
        let stop = ((at / COMPARE_BLOCK + 1) * COMPARE_BLOCK).min(end);
        let n = (stop - at) as usize;
        let got = new.read_at(at, &mut a[..n])?;
        a[got..n].fill(0);
        let got = old.read_at(at, &mut b[..n])?;
        b[got..n].fill(0);
        out.compared += n as u64;
        if a[..n] != b[..n] {
            out.push(at, n as u64);
        }
        at = stop;
    }
    Ok(())
}

#[cfg(test)]
#[path = "diff_tests.rs"]
mod tests;
