//! The extent map of a view: which ranges of the disk hold data and which
//! are holes, loaded lazily from NBD block status one chunk (1 GiB by
//! default) at a time, cached, and answering `lseek(2)` questions.
//!
//! The map itself never talks to a server: every query takes an
//! [`ExtentSource`] (an [`NbdPool`] in production, a fake in tests) that
//! it asks for the chunks it has not seen yet. Runs never cross a chunk
//! boundary, so a chunk can be evicted from the cache on its own.

use std::collections::{BTreeMap, HashSet, VecDeque};

use parking_lot::Mutex;

use super::nbd::{Extent, NbdError, NbdPool, NBD_STATE_HOLE, NBD_STATE_ZERO};

/// Default chunk of one block status query: 1 GiB.
pub const DEFAULT_CHUNK: u64 = 1 << 30;
/// Default number of chunks kept in the cache (4 TiB of disk at 1 GiB).
pub const DEFAULT_MAX_CHUNKS: usize = 4096;
/// The most runs one chunk may have before the answer is refused (a
/// defence against a server that describes a chunk byte by byte).
pub const MAX_RUNS_PER_CHUNK: usize = 1 << 22;

/// Anything that answers NBD block status for `base:allocation`: from
/// `offset`, up to `length` bytes, at least one extent; the server may
/// describe less than asked, and the last extent may reach beyond.
pub trait ExtentSource {
    /// Block status from `offset` for up to `length` bytes.
    fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, NbdError>;
}

impl ExtentSource for NbdPool {
    fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, NbdError> {
        NbdPool::block_status(self, offset, length)
    }
}

/// A maximal range of equal allocation state, within one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// `NBD_STATE_HOLE` and `NBD_STATE_ZERO` bits (others dropped).
    pub flags: u32,
}

impl Run {
    /// A hole for `SEEK_DATA`/`SEEK_HOLE`: the `NBD_STATE_HOLE` flag.
    pub fn is_hole(&self) -> bool {
        self.flags & NBD_STATE_HOLE != 0
    }

    /// Reads as zeroes without asking: the `NBD_STATE_ZERO` flag.
    pub fn is_zero(&self) -> bool {
        self.flags & NBD_STATE_ZERO != 0
    }
}

#[derive(Default)]
struct State {
    /// start -> (end, flags); runs of loaded chunks only.
    runs: BTreeMap<u64, (u64, u32)>,
    loaded: HashSet<u64>,
    /// Loaded chunk indexes, oldest first (eviction order).
    order: VecDeque<u64>,
}

/// The cached allocation map of a disk of `size` bytes.
pub struct ExtentMap {
    size: u64,
    chunk: u64,
    max_chunks: usize,
    state: Mutex<State>,
}

impl std::fmt::Debug for ExtentMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtentMap")
            .field("size", &self.size)
            .field("chunk", &self.chunk)
            .field("cached_chunks", &self.cached_chunks())
            .finish()
    }
}

impl ExtentMap {
    /// An empty map of a disk of `size` bytes, loading `chunk` bytes per
    /// query (clamped to 1..=2 GiB; keep it a multiple of the server's
    /// minimum block size, e.g. a power of two >= 64 KiB).
    pub fn new(size: u64, chunk: u64) -> Self {
        ExtentMap {
            size,
            chunk: chunk.clamp(1, 1 << 31),
            max_chunks: DEFAULT_MAX_CHUNKS,
            state: Mutex::new(State::default()),
        }
    }

    /// Keeps at most `max_chunks` (at least 1) chunks cached; the oldest
    /// loaded is dropped first and loaded again when asked.
    pub fn with_cache_limit(mut self, max_chunks: usize) -> Self {
        self.max_chunks = max_chunks.max(1);
        self
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size of one block status query.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Number of chunks cached now.
    pub fn cached_chunks(&self) -> usize {
        self.state.lock().loaded.len()
    }

    /// Forgets everything cached.
    pub fn clear(&self) {
        *self.state.lock() = State::default();
    }

    /// The run that contains `offset`, loading its chunk if needed; `None`
    /// at or past the end of the disk.
    pub fn run_at(&self, src: &dyn ExtentSource, offset: u64) -> Result<Option<Run>, NbdError> {
        if offset >= self.size {
            return Ok(None);
        }
        let idx = offset / self.chunk;
        {
            let st = self.state.lock();
            if st.loaded.contains(&idx) {
                return Ok(Some(self.lookup(&st, offset)));
            }
        }
        // Loaded without the lock: two threads may load the same chunk;
        // the second insert is skipped.
        let runs = self.fetch(src, idx)?;
        let mut st = self.state.lock();
        self.insert(&mut st, idx, runs);
        Ok(Some(self.lookup(&st, offset)))
    }

    /// `lseek(SEEK_DATA)`: the first data byte at or after `offset`, or
    /// `None` (`ENXIO`) when only holes follow or `offset` is past the end.
    pub fn seek_data(&self, src: &dyn ExtentSource, offset: u64) -> Result<Option<u64>, NbdError> {
        let mut pos = offset;
        while let Some(run) = self.run_at(src, pos)? {
            if !run.is_hole() {
                return Ok(Some(pos));
            }
            pos = run.end;
        }
        Ok(None)
    }

    /// `lseek(SEEK_HOLE)`: the first hole byte at or after `offset`, the
    /// disk size when only data follows (the implicit hole at the end), or
    /// `None` (`ENXIO`) when `offset` is at or past the end.
    pub fn seek_hole(&self, src: &dyn ExtentSource, offset: u64) -> Result<Option<u64>, NbdError> {
        if offset >= self.size {
            return Ok(None);
        }
        let mut pos = offset;
        while let Some(run) = self.run_at(src, pos)? {
            if run.is_hole() {
                return Ok(Some(pos));
            }
            pos = run.end;
        }
        Ok(Some(self.size))
    }

    /// True when every byte of `offset..offset+len` inside the disk is a
    /// hole (an empty range is).
    pub fn is_hole(&self, src: &dyn ExtentSource, offset: u64, len: u64) -> Result<bool, NbdError> {
        self.all(src, offset, len, Run::is_hole)
    }

    /// True when every byte of `offset..offset+len` inside the disk is
    /// known to read as zero (`NBD_STATE_ZERO`), so a read may be answered
    /// without asking the server.
    pub fn is_zero(&self, src: &dyn ExtentSource, offset: u64, len: u64) -> Result<bool, NbdError> {
        self.all(src, offset, len, Run::is_zero)
    }

    fn all(
        &self,
        src: &dyn ExtentSource,
        offset: u64,
        len: u64,
        pred: fn(&Run) -> bool,
    ) -> Result<bool, NbdError> {
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        while pos < end {
            match self.run_at(src, pos)? {
                Some(run) if pred(&run) => pos = run.end,
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    fn chunk_range(&self, idx: u64) -> (u64, u64) {
        let start = idx * self.chunk;
        (start, start.saturating_add(self.chunk).min(self.size))
    }

    /// The run containing `offset` of a loaded chunk.
    fn lookup(&self, st: &State, offset: u64) -> Run {
        match st.runs.range(..=offset).next_back() {
            Some((&start, &(end, flags))) if end > offset => Run { start, end, flags },
            _ => {
                // Cannot happen (a loaded chunk is covered); answer "data"
                // up to the chunk's end, the safe choice for readers.
                let (_, end) = self.chunk_range(offset / self.chunk);
                Run {
                    start: offset,
                    end,
                    flags: 0,
                }
            }
        }
    }

    /// Asks `src` until chunk `idx` is covered; returns its merged runs.
    fn fetch(&self, src: &dyn ExtentSource, idx: u64) -> Result<Vec<Run>, NbdError> {
        let (start, end) = self.chunk_range(idx);
        let mut runs: Vec<Run> = Vec::new();
        let mut pos = start;
        while pos < end {
            let want = u32::try_from(end - pos).unwrap_or(u32::MAX);
            let extents = src.block_status(pos, want)?;
            if extents.is_empty() {
                return Err(NbdError::Protocol(format!(
                    "no extents for block status at {pos}"
                )));
            }
            for e in extents {
                if pos >= end {
                    break;
                }
                if e.length == 0 {
                    return Err(NbdError::Protocol("zero-length extent".into()));
                }
                let e_end = pos.saturating_add(e.length).min(end);
                let flags = e.flags & (NBD_STATE_HOLE | NBD_STATE_ZERO);
                match runs.last_mut() {
                    Some(r) if r.flags == flags => r.end = e_end,
                    _ => {
                        if runs.len() >= MAX_RUNS_PER_CHUNK {
                            return Err(NbdError::Protocol(format!(
                                "over {MAX_RUNS_PER_CHUNK} extents in a chunk"
                            )));
                        }
                        runs.push(Run {
                            start: pos,
                            end: e_end,
                            flags,
                        });
                    }
                }
                pos = e_end;
            }
        }
        Ok(runs)
    }

    fn insert(&self, st: &mut State, idx: u64, runs: Vec<Run>) {
        if !st.loaded.insert(idx) {
            return;
        }
        for r in runs {
            st.runs.insert(r.start, (r.end, r.flags));
        }
        st.order.push_back(idx);
        while st.order.len() > self.max_chunks {
            let Some(old) = st.order.pop_front() else {
                break;
            };
            st.loaded.remove(&old);
            let (s, e) = self.chunk_range(old);
            let keys: Vec<u64> = st.runs.range(s..e).map(|(k, _)| *k).collect();
            for k in keys {
                st.runs.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const H: u32 = NBD_STATE_HOLE;
    const Z: u32 = NBD_STATE_ZERO;

    /// A disk described by per-granule flags, answering block status like
    /// a server: at most `per_reply` extents, optionally overshooting.
    struct Fake {
        granule: u64,
        flags: Vec<u32>,
        per_reply: usize,
        overshoot: bool,
        calls: AtomicUsize,
    }

    impl Fake {
        fn size(&self) -> u64 {
            self.granule * self.flags.len() as u64
        }
    }

    impl ExtentSource for Fake {
        fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, NbdError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            assert!(
                offset < self.size() && length > 0,
                "bad request {offset} {length}"
            );
            let req_end = (offset + u64::from(length)).min(self.size());
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < req_end && out.len() < self.per_reply {
                let f = self.flags[(pos / self.granule) as usize];
                let mut end = (pos / self.granule + 1) * self.granule;
                while end < self.size() && self.flags[(end / self.granule) as usize] == f {
                    end += self.granule;
                }
                if !self.overshoot {
                    end = end.min(req_end);
                }
                out.push(Extent {
                    length: end - pos,
                    flags: f | 0x100, // unknown bits are ignored
                });
                pos = end;
            }
            Ok(out)
        }
    }

    /// Simple deterministic pseudo-random numbers.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    fn random_disk(seed: u64, granules: usize) -> Vec<u32> {
        let mut r = Lcg(seed);
        let mut v = Vec::with_capacity(granules);
        while v.len() < granules {
            let f = [0, H | Z, H, Z][(r.next() % 4) as usize];
            let n = 1 + (r.next() % 6) as usize;
            v.extend(std::iter::repeat_n(f, n));
        }
        v.truncate(granules);
        v
    }

    fn brute_seek_data(f: &Fake, off: u64) -> Option<u64> {
        (off..f.size()).find(|&p| f.flags[(p / f.granule) as usize] & H == 0)
    }

    fn brute_seek_hole(f: &Fake, off: u64) -> Option<u64> {
        if off >= f.size() {
            return None;
        }
        Some(
            (off..f.size())
                .find(|&p| f.flags[(p / f.granule) as usize] & H != 0)
                .unwrap_or(f.size()),
        )
    }

    #[test]
    fn seeks_match_brute_force() {
        for (seed, chunk, per_reply, overshoot, limit) in [
            (1, 64, 100, false, 1000),
            (2, 48, 1, false, 1000),
            (3, 100, 2, true, 1000),
            (4, 1 << 20, 3, true, 1000),
            (5, 40, 2, false, 2),
            (6, 7, 1, true, 1),
        ] {
            let f = Fake {
                granule: 8,
                flags: random_disk(seed, 120),
                per_reply,
                overshoot,
                calls: AtomicUsize::new(0),
            };
            let m = ExtentMap::new(f.size(), chunk).with_cache_limit(limit);
            for off in (0..f.size() + 3).chain([u64::MAX]) {
                let ctx = format!("seed {seed} chunk {chunk} offset {off}");
                assert_eq!(
                    m.seek_data(&f, off).unwrap(),
                    brute_seek_data(&f, off),
                    "data {ctx}"
                );
                assert_eq!(
                    m.seek_hole(&f, off).unwrap(),
                    brute_seek_hole(&f, off),
                    "hole {ctx}"
                );
                for len in [0u64, 1, 5, 8, 17, 64, u64::MAX] {
                    let end = off.saturating_add(len).min(f.size());
                    let all = |bit: u32| (off..end).all(|p| f.flags[(p / 8) as usize] & bit != 0);
                    assert_eq!(
                        m.is_hole(&f, off, len).unwrap(),
                        all(H),
                        "is_hole {ctx} len {len}"
                    );
                    assert_eq!(
                        m.is_zero(&f, off, len).unwrap(),
                        all(Z),
                        "is_zero {ctx} len {len}"
                    );
                }
            }
            assert!(m.cached_chunks() <= limit);
        }
    }

    #[test]
    fn chunks_are_cached() {
        let f = Fake {
            granule: 4096,
            flags: random_disk(9, 1024),
            per_reply: usize::MAX,
            overshoot: false,
            calls: AtomicUsize::new(0),
        };
        let m = ExtentMap::new(f.size(), 1 << 20);
        for off in (0..f.size()).step_by(512) {
            m.seek_data(&f, off).unwrap();
            m.seek_hole(&f, off).unwrap();
        }
        assert_eq!(
            f.calls.load(Ordering::Relaxed),
            4,
            "one query per 1 MiB chunk"
        );
        assert_eq!(m.cached_chunks(), 4);
        m.clear();
        assert_eq!(m.cached_chunks(), 0);
    }

    #[test]
    fn all_hole_and_all_data_disks() {
        for (flags, data, hole) in [(H | Z, None, Some(0)), (0, Some(0), Some(1 << 20))] {
            let f = Fake {
                granule: 1 << 16,
                flags: vec![flags; 16],
                per_reply: 1,
                overshoot: true,
                calls: AtomicUsize::new(0),
            };
            let m = ExtentMap::new(f.size(), 1 << 18);
            assert_eq!(m.seek_data(&f, 0).unwrap(), data);
            assert_eq!(m.seek_hole(&f, 0).unwrap(), hole);
            assert_eq!(m.seek_data(&f, f.size()).unwrap(), None);
            assert_eq!(m.seek_hole(&f, f.size()).unwrap(), None);
        }
        let empty = ExtentMap::new(0, DEFAULT_CHUNK);
        let f = Fake {
            granule: 1,
            flags: vec![],
            per_reply: 1,
            overshoot: false,
            calls: AtomicUsize::new(0),
        };
        assert_eq!(empty.seek_data(&f, 0).unwrap(), None);
        assert_eq!(empty.seek_hole(&f, 0).unwrap(), None);
        assert!(empty.is_hole(&f, 0, 100).unwrap());
    }

    struct Bad(fn(u64, u32) -> Result<Vec<Extent>, NbdError>);
    impl ExtentSource for Bad {
        fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, NbdError> {
            (self.0)(offset, length)
        }
    }

    #[test]
    fn bad_sources_give_errors() {
        let m = ExtentMap::new(1 << 20, 1 << 16);
        let empty = Bad(|_, _| Ok(vec![]));
        assert!(matches!(m.seek_data(&empty, 0), Err(NbdError::Protocol(_))));
        let zero = Bad(|_, _| {
            Ok(vec![Extent {
                length: 0,
                flags: 0,
            }])
        });
        assert!(matches!(m.seek_hole(&zero, 0), Err(NbdError::Protocol(_))));
        let failing = Bad(|_, _| Err(NbdError::Closed));
        assert!(matches!(m.is_hole(&failing, 0, 10), Err(NbdError::Closed)));
        let huge = Bad(|_, _| {
            Ok(vec![Extent {
                length: u64::MAX,
                flags: H,
            }])
        });
        assert_eq!(m.seek_data(&huge, 5).unwrap(), None);
        assert_eq!(m.seek_hole(&huge, 5).unwrap(), Some(5));
        assert_eq!(m.cached_chunks(), 16);
    }
}
