//! A byte range of a frozen disk view (the whole disk, or one partition)
//! as the filesystem readers want it: `Read + Seek` (fatfs, gpt, mbrman)
//! and `Ext4Read` (ext4-view). Reads past the range's end are short (an
//! exact read fails); every write is refused with `EROFS`, so no reader
//! can change a frozen image. Small reads are served from a few cached
//! windows (FAT reads 32-byte directory entries and 4-byte table entries).

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use super::budget::Budget;
use crate::views::FrozenView;

/// Bytes per cached window.
const WINDOW: usize = 64 * 1024;
/// Windows kept (1 MiB).
const WINDOWS: usize = 16;

/// `len` bytes of `view` from `start`, with a read position.
pub struct Slice {
    view: Arc<dyn FrozenView>,
    start: u64,
    len: u64,
    pos: u64,
    /// Cached windows, most recently used last: (offset in the slice, bytes).
    cache: Vec<(u64, Vec<u8>)>,
    cached: bool,
    budget: Budget,
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slice({}+{})", self.start, self.len)
    }
}

impl Slice {
    /// The bytes `start..start+len` of `view`; `cached`: small reads go
    /// through the window cache.
    pub fn new(view: Arc<dyn FrozenView>, start: u64, len: u64, cached: bool) -> Self {
        Slice {
            view,
            start,
            len,
            pos: 0,
            cache: Vec::new(),
            cached,
            budget: Budget::default(),
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads at `offset` (within the slice) straight from the view; short
    /// only at the slice's end.
    /// The same bytes, each read checking `budget` first.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.len.checked_sub(offset) else {
            return Ok(0);
        };
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let mut done = 0;
        while done < want {
            let at = self.start + offset + done as u64;
            match self.view.read_at(at, &mut buf[done..want])? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }

    /// Reads at `offset` (within the slice); short only at its end.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.budget.check()?;
        if !self.cached || buf.len() >= WINDOW {
            return self.read_direct(offset, buf);
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            if at >= self.len {
                break;
            }
            let base = at - at % WINDOW as u64;
            let i = match self.cache.iter().position(|(b, _)| *b == base) {
                Some(i) => i,
                None => {
                    let mut w = vec![0; WINDOW];
                    let n = self.read_direct(base, &mut w)?;
                    w.truncate(n);
                    if self.cache.len() >= WINDOWS {
                        self.cache.remove(0);
                    }
                    self.cache.push((base, w));
                    self.cache.len() - 1
                }
            };
            let entry = self.cache.remove(i);
            let within = (at - base) as usize;
            let n = entry.1.len().saturating_sub(within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&entry.1[within..within + n]);
            self.cache.push(entry);
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(self.pos, buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Slice {
    fn seek(&mut self, from: SeekFrom) -> io::Result<u64> {
        let to = match from {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = to.ok_or_else(|| super::errno(libc::EINVAL))?;
        Ok(self.pos)
    }
}

impl Write for Slice {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(super::errno(libc::EROFS))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for Slice {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let n = self.read_at(start_byte, dst)?;
        if n < dst.len() {
            return Err(Box::new(super::eio(format!(
                "read of {} bytes at {start_byte} goes past the end ({} bytes)",
                dst.len(),
                self.len
            ))));
        }
        Ok(())
    }
}

/// A disk held in memory (tests and the fuzz target).
pub struct MemView(pub Vec<u8>);

impl FrozenView for MemView {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let Ok(at) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(src) = self.0.get(at..) else {
            return Ok(0);
        };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.0.len() as u64).then_some(offset))
    }
    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.0.len() as u64).then_some(self.0.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(cached: bool) -> Slice {
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        Slice::new(Arc::new(MemView(bytes)), 1000, 150_000, cached)
    }

    #[test]
    fn reads_stay_in_the_range_and_writes_are_refused() {
        for cached in [false, true] {
            let mut s = slice(cached);
            let mut b = [0u8; 10];
            assert_eq!(s.read_at(0, &mut b).unwrap(), 10);
            assert_eq!(b[0], (1000 % 251) as u8);
            // Across a window boundary.
            let mut b = vec![0u8; 300];
            assert_eq!(s.read_at(65_400, &mut b).unwrap(), 300);
            assert_eq!(b[299], ((1000 + 65_400 + 299) % 251) as u8);
            // Short at the end, nothing past it.
            assert_eq!(s.read_at(149_995, &mut b).unwrap(), 5);
            assert_eq!(s.read_at(150_000, &mut b).unwrap(), 0);
            assert_eq!(s.read_at(u64::MAX, &mut b).unwrap(), 0);
            assert!(ext4_view::Ext4Read::read(&mut s, 149_995, &mut b).is_err());
            assert_eq!(s.seek(SeekFrom::End(0)).unwrap(), 150_000);
            assert!(s.seek(SeekFrom::Current(-200_000)).is_err());
            assert_eq!(s.write(b"x").unwrap_err().raw_os_error(), Some(libc::EROFS));
        }
    }
}
