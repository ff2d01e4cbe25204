//! A frozen disk read directly from its image files: the top image (at
//! an internal snapshot, or its current contents when nobody writes it
//! any more) over its backing chain, qcow2 and raw images alike. Reads are
//! `pread`s of the files (compressed clusters decompressed here), safe
//! beside a running QEMU: nothing a frozen view reads is ever rewritten.
//!
//! The chain is what the images record: each qcow2 image names its
//! backing file and that file's format (the backing format header
//! extension). Nothing is probed: a backing file without a stated format,
//! of a format other than qcow2 or raw, named as anything but a plain
//! path, or looping is refused.

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::image::{malformed, ImageFile, Storage};
use super::qcow2::{Header, Mapping, Qcow2Layer};

/// The longest backing chain followed.
pub const MAX_CHAIN: usize = 256;
/// Most bytes of L1 tables one chain holds.
const MAX_L1_TOTAL: u64 = 128 << 20;
/// Most bytes of L2 tables one chain caches.
const L2_CACHE_BYTES: u64 = 64 << 20;
/// Decompressed clusters one chain caches.
const CLUSTER_CACHE: usize = 8;

/// One image of the chain.
enum Layer {
    Qcow2(Qcow2Layer),
    /// A raw image: every byte it has is data, but for the holes of a
    /// sparse file (zeros).
    Raw(Box<dyn Storage>),
}

/// Where guest bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Zero,
    /// Plain bytes of layer `.0` at host offset `.1`.
    Data(usize, u64),
    /// Compressed cluster (L2 entry `.1`) of layer `.0`, `.2` bytes into it.
    Compressed(usize, u64, u64),
}

/// Where guest bytes come from, comparable across chains: the image is
/// named by its (device, inode), `None` for bytes in memory (never equal
/// to anything but itself within one chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Reads as zeros.
    Zero,
    /// Plain bytes of an image at a host offset.
    Data(Option<(u64, u64)>, u64),
    /// A compressed cluster of an image (its L2 entry), bytes into it.
    Compressed(Option<(u64, u64)>, u64, u64),
}

impl Origin {
    /// True when both name the same bytes of the same image file.
    pub fn same_as(&self, other: &Origin) -> bool {
        match (self, other) {
            (Origin::Zero, Origin::Zero) => true,
            (Origin::Data(Some(a), x), Origin::Data(Some(b), y)) => a == b && x == y,
            (Origin::Compressed(Some(a), e, w), Origin::Compressed(Some(b), f, v)) => {
                a == b && e == f && w == v
            }
            _ => false,
        }
    }
}

/// A cached table or cluster: (layer, offset or L2 entry).
type Key = (usize, u64);

/// A frozen disk: a chain of images, top first.
pub struct Chain {
    layers: Vec<Layer>,
    size: u64,
    l2_cache: Mutex<Lru<Key, Arc<Vec<u64>>>>,
    clusters: Mutex<Lru<Key, Arc<Vec<u8>>>>,
}

/// A bounded cache: when full, an arbitrary entry makes room.
struct Lru<K, V> {
    entries: HashMap<K, V>,
    max: usize,
}

impl<K: Eq + Hash + Copy, V: Clone> Lru<K, V> {
    fn new(max: usize) -> Self {
        Lru {
            entries: HashMap::new(),
            max: max.max(1),
        }
    }
    fn get(&mut self, k: K) -> Option<V> {
        self.entries.get(&k).cloned()
    }
    fn put(&mut self, k: K, v: V) {
        if self.entries.len() >= self.max {
            if let Some(old) = self.entries.keys().next().copied() {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(k, v);
    }
}

/// How the files of a chain are found and opened.
pub trait Opener {
    /// Opens the top image.
    fn top(&self) -> io::Result<Box<dyn Storage>>;
    /// Opens backing file `name` (as recorded) of the image at `depth`.
    fn backing(&self, depth: usize, name: &[u8]) -> io::Result<Box<dyn Storage>>;
}

/// Opens files by path: backing names are plain paths, relative ones
/// taken from the directory of the image that names them.
pub struct FileOpener {
    paths: Mutex<Vec<PathBuf>>,
}

impl FileOpener {
    /// An opener whose top image is `top`.
    pub fn new(top: &Path) -> Self {
        FileOpener {
            paths: Mutex::new(vec![top.to_owned()]),
        }
    }
}

impl Opener for FileOpener {
    fn top(&self) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(ImageFile::open(&self.paths.lock()[0])?))
    }
    fn backing(&self, depth: usize, name: &[u8]) -> io::Result<Box<dyn Storage>> {
        use std::os::unix::ffi::OsStrExt;
        let refuse = |why: &str| {
            malformed(format!(
                "backing file {:?} {why}; refused (vmsnapfs opens only plain files \
                 with a stated format)",
                String::from_utf8_lossy(name)
            ))
        };
        // QEMU reads `proto:...` (a colon before any slash) as a protocol.
        let protocol = name
            .iter()
            .position(|&b| b == b':')
            .is_some_and(|c| !name[..c].contains(&b'/'));
        if name.is_empty() || name.starts_with(b"json:") || name.contains(&0) || protocol {
            return Err(refuse("which is not a plain file path"));
        }
        let p = Path::new(std::ffi::OsStr::from_bytes(name));
        let mut paths = self.paths.lock();
        let path = if p.is_absolute() {
            p.to_owned()
        } else {
            paths[depth].parent().unwrap_or(Path::new("/")).join(p)
        };
        let file = ImageFile::open(&path)?;
        paths.truncate(depth + 1);
        paths.push(path);
        Ok(Box::new(file))
    }
}

/// Opens bytes in memory: the image has no backing file (fuzzing).
pub struct BytesOpener(pub Vec<u8>);

impl Opener for BytesOpener {
    fn top(&self) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(self.0.clone()))
    }
    fn backing(&self, _: usize, _: &[u8]) -> io::Result<Box<dyn Storage>> {
        Err(malformed("no backing files here"))
    }
}

/// The virtual size of image `path` of format `format` (qcow2: its
/// header; raw: its length), read without QEMU.
pub fn virtual_size(path: &Path, format: &str) -> io::Result<u64> {
    let file = ImageFile::open(path)?;
    match format {
        "raw" => Ok(file.len()),
        "qcow2" => Ok(Header::read(&file)?.size),
        other => Err(unknown_format(other.as_bytes())),
    }
}

fn unknown_format(f: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "image format {:?} is not one vmsnapfs reads (qcow2, raw)",
            String::from_utf8_lossy(f)
        ),
    )
}

impl Chain {
    /// Opens the chain whose top image (format `format`) `opener` opens,
    /// at internal snapshot `tag` of the top (qcow2) or at its current
    /// contents.
    pub fn open(opener: &dyn Opener, format: &str, tag: Option<&str>) -> io::Result<Chain> {
        let top = opener.top()?;
        let mut layers = Vec::new();
        let mut seen = Vec::new();
        let (mut storage, mut format) = (top, format.as_bytes().to_vec());
        let mut tag = tag.map(|t| t.as_bytes().to_vec());
        let mut size = None;
        let mut l1_total = 0u64;
        loop {
            if let Some(id) = storage.identity() {
                if seen.contains(&id) {
                    return Err(malformed("the backing chain loops"));
                }
                seen.push(id);
            }
            let backing = match format.as_slice() {
                b"raw" if tag.is_none() => {
                    size.get_or_insert(storage.len());
                    layers.push(Layer::Raw(storage));
                    None
                }
                b"qcow2" => {
                    let header = Header::read(storage.as_ref())?;
                    let layer = Qcow2Layer::open(storage, &header, tag.as_deref(), size)?;
                    size.get_or_insert(layer.size);
                    l1_total += layer.l1_bytes();
                    if l1_total > MAX_L1_TOTAL {
                        return Err(malformed("the chain's L1 tables are too large"));
                    }
                    layers.push(Layer::Qcow2(layer));
                    match (header.backing, header.backing_format) {
                        (None, _) => None,
                        (Some(name), Some(f)) => Some((name, f)),
                        (Some(name), None) => {
                            return Err(malformed(format!(
                                "backing file {:?} without a backing format; refused \
                                 (formats are never probed)",
                                String::from_utf8_lossy(&name)
                            )))
                        }
                    }
                }
                b"raw" => return Err(malformed("a raw image has no internal snapshots")),
                other => return Err(unknown_format(other)),
            };
            let Some((name, f)) = backing else { break };
            if layers.len() >= MAX_CHAIN {
                return Err(malformed(format!(
                    "the backing chain is longer than {MAX_CHAIN} images"
                )));
            }
            storage = opener.backing(layers.len() - 1, &name)?;
            format = f;
            tag = None;
        }
        let size = size.unwrap_or(0);
        let l2_max = layers
            .iter()
            .filter_map(|l| match l {
                Layer::Qcow2(q) => Some(q.cluster_size()),
                Layer::Raw(_) => None,
            })
            .max()
            .unwrap_or(1);
        Ok(Chain {
            layers,
            size,
            l2_cache: Mutex::new(Lru::new((L2_CACHE_BYTES / l2_max) as usize)),
            clusters: Mutex::new(Lru::new(CLUSTER_CACHE)),
        })
    }

    /// Opens the chain of image `path` of format `format` from files.
    pub fn open_file(path: &Path, format: &str, tag: Option<&str>) -> io::Result<Chain> {
        Chain::open(&FileOpener::new(path), format, tag)
    }

    /// The virtual size of the disk.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Images in the chain.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    fn l2(&self, layer: usize, q: &Qcow2Layer, offset: u64) -> io::Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.lock().get((layer, offset)) {
            return Ok(t);
        }
        let t = Arc::new(q.read_l2(offset)?);
        self.l2_cache.lock().put((layer, offset), t.clone());
        Ok(t)
    }

    /// Where the bytes at `pos` come from, and for how many bytes (at
    /// most `max`) that holds.
    fn resolve(&self, pos: u64, max: u64) -> io::Result<(Source, u64)> {
        let mut run = max;
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                Layer::Qcow2(q) => {
                    if pos >= q.size {
                        // Past the end of a shorter backing image.
                        return Ok((Source::Zero, run));
                    }
                    run = run.min(q.size - pos);
                    let (l2, len) = q.l2_of(pos)?;
                    run = run.min(len);
                    let Some(l2) = l2 else { continue };
                    let table = self.l2(i, q, l2)?;
                    let (m, len) = q.map(&table, pos)?;
                    run = run.min(len);
                    match m {
                        Mapping::Below => continue,
                        Mapping::Zero => return Ok((Source::Zero, run)),
                        Mapping::Data(host) => return Ok((Source::Data(i, host), run)),
                        Mapping::Compressed(e) => {
                            let within = pos % q.cluster_size();
                            return Ok((Source::Compressed(i, e, within), run));
                        }
                    }
                }
                Layer::Raw(s) => {
                    if pos >= s.len() {
                        return Ok((Source::Zero, run));
                    }
                    let run = run.min(s.len() - pos);
                    // A sparse raw file's holes read as zeros.
                    return Ok(match s.data_run(pos)? {
                        Some((d, _)) if d > pos => (Source::Zero, run.min(d - pos)),
                        Some((_, h)) if h > pos => (Source::Data(i, pos), run.min(h - pos)),
                        _ => (Source::Data(i, pos), run),
                    });
                }
            }
        }
        Ok((Source::Zero, run))
    }

    fn storage(&self, layer: usize) -> &dyn Storage {
        match &self.layers[layer] {
            Layer::Qcow2(q) => q.storage.as_ref(),
            Layer::Raw(s) => s.as_ref(),
        }
    }

    fn cluster(&self, layer: usize, entry: u64) -> io::Result<Arc<Vec<u8>>> {
        if let Some(c) = self.clusters.lock().get((layer, entry)) {
            return Ok(c);
        }
        let Layer::Qcow2(q) = &self.layers[layer] else {
            return Err(malformed("compressed data in a raw image"));
        };
        let mut out = vec![0u8; q.cluster_size() as usize];
        q.decompress(entry, &mut out)?;
        let out = Arc::new(out);
        self.clusters.lock().put((layer, entry), out.clone());
        Ok(out)
    }

    /// Reads at `offset`; fewer bytes only at the end of the disk. Runs
    /// that lie next to each other in one file are read with one `pread`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let (src, mut len) = self.resolve(pos, (n - done) as u64)?;
            if let Source::Data(layer, host) = src {
                // Extend over the next runs that continue in the same file.
                while done + (len as usize) < n {
                    let (next, more) = self.resolve(pos + len, (n - done) as u64 - len)?;
                    if next != Source::Data(layer, host + len) {
                        break;
                    }
                    len += more;
                }
            }
            let out = &mut buf[done..done + len as usize];
            match src {
                Source::Zero => out.fill(0),
                Source::Data(layer, host) => {
                    // The last cluster of a file may end short of a cluster.
                    let got = self.storage(layer).read_upto(out, host)?;
                    out[got..].fill(0);
                }
                Source::Compressed(layer, entry, within) => {
                    let c = self.cluster(layer, entry)?;
                    out.copy_from_slice(&c[within as usize..within as usize + out.len()]);
                }
            }
            done += len as usize;
        }
        Ok(n)
    }

    fn find(&self, offset: u64, data: bool) -> io::Result<Option<u64>> {
        let mut pos = offset;
        while pos < self.size {
            let (src, len) = self.resolve(pos, self.size - pos)?;
            if (src != Source::Zero) == data {
                return Ok(Some(pos));
            }
            pos += len;
        }
        Ok(if data || offset >= self.size {
            None
        } else {
            Some(self.size)
        })
    }

    /// Where the guest bytes at `pos` come from, for at most `max`
    /// bytes, named so that two chains can be compared: the same origin
    /// in two chains is the same bytes (a frozen image never changes).
    pub fn origin(&self, pos: u64, max: u64) -> io::Result<(Origin, u64)> {
        let (src, len) = self.resolve(pos, max)?;
        let file = |layer: usize| self.storage(layer).identity();
        Ok((
            match src {
                Source::Zero => Origin::Zero,
                Source::Data(layer, host) => Origin::Data(file(layer), host),
                Source::Compressed(layer, entry, within) => {
                    Origin::Compressed(file(layer), entry, within)
                }
            },
            len,
        ))
    }

    /// The (device, inode) of each image of the chain that is a file.
    pub fn files(&self) -> Vec<(u64, u64)> {
        (0..self.layers.len())
            .filter_map(|i| self.storage(i).identity())
            .collect()
    }

    /// `lseek(SEEK_DATA)`: `None` means `ENXIO`.
    pub fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.find(offset, true)
    }

    /// `lseek(SEEK_HOLE)`: `None` means `ENXIO` (at or past the end).
    pub fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.find(offset, false)
    }

    /// Bytes of the disk that hold data somewhere in the chain (zero
    /// clusters and holes excluded): what `du` of the view shows.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        let (mut pos, mut total) = (0u64, 0u64);
        while pos < self.size {
            let (src, len) = self.resolve(pos, self.size - pos)?;
            if src != Source::Zero {
                total += len;
            }
            pos += len;
        }
        Ok(total)
    }
}

impl super::FrozenView for Chain {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        Chain::read_at(self, offset, buf)
    }
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Chain::seek_data(self, offset)
    }
    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        Chain::seek_hole(self, offset)
    }
}

/// Opens `bytes` as a qcow2 image and reads it the way a view's reader
/// would, bounded: at its active table and at each internal snapshot (at
/// most 4), up to 16 runs of data found by `SEEK_DATA`, each read up to
/// 64 KiB, and the last bytes of the disk. Returns the data bytes read.
/// The entry point of the fuzz target and the corpus test: a malformed
/// image is an error, never a panic, a hang or an unbounded allocation.
pub fn check_image(bytes: &[u8]) -> io::Result<u64> {
    let opener = BytesOpener(bytes.to_vec());
    let header = Header::read(&opener.0)?;
    let mut total = check_chain(&Chain::open(&opener, "qcow2", None)?)?;
    let table = super::qcow2::snapshot_table(&opener.0, &header)?;
    for s in table.iter().take(4) {
        let tag = std::str::from_utf8(&s.name).map_err(|_| malformed("tag not UTF-8"))?;
        total += check_chain(&Chain::open(&opener, "qcow2", Some(tag))?)?;
    }
    Ok(total)
}

fn check_chain(chain: &Chain) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let (mut pos, mut total) = (0u64, 0u64);
    for _ in 0..16 {
        let Some(at) = chain.seek_data(pos)? else {
            break;
        };
        total += chain.read_at(at, &mut buf)? as u64;
        let Some(hole) = chain.seek_hole(at)? else {
            break;
        };
        pos = hole.max(at + 1);
    }
    // The last bytes, and a read across the end.
    let end = chain.size();
    chain.read_at(end.saturating_sub(100), &mut buf[..4096])?;
    chain.allocated_bytes()?;
    Ok(total)
}

#[cfg(test)]
#[path = "chain_tests.rs"]
mod tests;
