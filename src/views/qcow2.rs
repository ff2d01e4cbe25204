//! Direct reads of a frozen qcow2 disk: an internal snapshot (its L1
//! table and the L2 tables and data clusters it points to are never
//! written while the snapshot exists: QEMU copies on write), or an
//! external snapshot's point image (nobody writes it any more), each over
//! the images below it, which nobody writes either. They can be read with
//! `pread` beside a running QEMU, without a server.
//!
//! Only the plain layout is handled: no encryption, no external data
//! file, no extended L2 entries, no compressed clusters, one cluster size
//! through the chain, qcow2 images with at most a raw one at the bottom.
//! The openers answer `None` for anything else, and the caller serves the
//! view through `qemu-nbd` instead.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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

/// Where a guest cluster lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    /// Reads as zeros (unallocated all the way down, or a zero cluster).
    Zero,
    /// Data in layer `.0` at host offset `.1`.
    Data(usize, u64),
}

/// What one qcow2 layer says of a cluster.
enum Alloc {
    /// Not here: ask the backing layer.
    Below,
    Zero,
    Data(u64),
}

/// One qcow2 image of the chain, read at a fixed L1 table: an internal
/// snapshot's, or the active one of an image that no longer changes (an
/// external snapshot's point, a backing image).
struct Qcow2Layer {
    file: File,
    size: u64,
    l1: Vec<u64>,
    l2_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    file_len: u64,
}

/// One image of the chain.
enum Layer {
    Qcow2(Qcow2Layer),
    /// A raw backing image: every byte is data.
    Raw {
        file: File,
        len: u64,
    },
}

impl Layer {
    fn file(&self) -> &File {
        match self {
            Layer::Qcow2(l) => &l.file,
            Layer::Raw { file, .. } => file,
        }
    }
}

/// A frozen disk read directly from its qcow2 file (and the images below
/// it): an internal snapshot, or an external snapshot's point.
pub struct Qcow2Snapshot {
    layers: Vec<Layer>,
    cluster_bits: u32,
    size: u64,
}

impl Qcow2Snapshot {
    /// Opens snapshot `tag` of `image`; `Ok(None)` when the image uses a
    /// feature this reader does not handle (serve it another way),
    /// including a backing file.
    pub fn open(image: &Path, tag: &str) -> io::Result<Option<Self>> {
        Self::open_chain(image, Some(tag), &[])
    }

    /// Opens `image` at internal snapshot `tag`, or at its current
    /// contents when `tag` is `None` (only for an image nobody writes any
    /// more), over the backing chain `backing` (file, format), top first.
    pub fn open_chain(
        image: &Path,
        tag: Option<&str>,
        backing: &[(PathBuf, String)],
    ) -> io::Result<Option<Self>> {
        let Some((top, cluster_bits)) = Self::open_top(image, tag, !backing.is_empty())? else {
            return Ok(None);
        };
        let size = top.size;
        let mut layers = vec![Layer::Qcow2(top)];
        for (i, (path, format)) in backing.iter().enumerate() {
            let more = i + 1 < backing.len();
            match format.as_str() {
                "raw" if !more => {
                    let file = File::open(path)?;
                    let len = file.metadata()?.len();
                    layers.push(Layer::Raw { file, len });
                }
                "qcow2" => match Self::open_once(path, None, more)? {
                    Some((l, bits)) if bits == cluster_bits => layers.push(Layer::Qcow2(l)),
                    _ => return Ok(None),
                },
                _ => return Ok(None),
            }
        }
        Ok(Some(Qcow2Snapshot {
            layers,
            cluster_bits,
            size,
        }))
    }

    fn open_top(
        image: &Path,
        tag: Option<&str>,
        has_backing: bool,
    ) -> io::Result<Option<(Qcow2Layer, u32)>> {
        if tag.is_none() {
            return Self::open_once(image, None, has_backing);
        }
        // QEMU may rewrite the snapshot table meanwhile (a new snapshot of
        // another tag): it writes the new table elsewhere, then points the
        // header at it. A table read between two equal headers is whole.
        for _ in 0..5 {
            let before = table_pointer(image)?;
            let opened = Self::open_once(image, tag, has_backing)?;
            if table_pointer(image)? == before {
                return Ok(opened);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the snapshot table keeps changing",
        ))
    }

    fn open_once(
        image: &Path,
        tag: Option<&str>,
        has_backing: bool,
    ) -> io::Result<Option<(Qcow2Layer, u32)>> {
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
        if (backing != 0) != has_backing || crypt != 0 || incompatible & UNHANDLED_FEATURES != 0 {
            return Ok(None);
        }
        if incompatible & 0b10 != 0 {
            return Err(bad("the image is marked corrupt"));
        }
        if !(9..=21).contains(&cluster_bits) || nb_snapshots > 65536 {
            return Err(bad("implausible qcow2 header"));
        }
        let (l1_offset, l1_size, disk_size) = match tag {
            // The active table of an image that no longer changes.
            None => (be64(&h, 40), be32(&h, 36) as usize, None),
            Some(tag) => match find_snapshot(&file, snapshots_offset, nb_snapshots, tag)? {
                Some(found) => found,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no snapshot {tag:?} in {}", image.display()),
                    ))
                }
            },
        };
        let size = disk_size.unwrap_or_else(|| be64(&h, 24));
        let l2_entries = 1u64 << (cluster_bits - 3);
        let needed = size.div_ceil(l2_entries << cluster_bits);
        if (l1_size as u64) < needed || l1_size > 1 << 26 {
            return Err(bad("L1 table does not cover the disk"));
        }
        let mut raw = vec![0u8; l1_size * 8];
        file.read_exact_at(&mut raw, l1_offset)?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Some((
            Qcow2Layer {
                file,
                size,
                l1,
                l2_cache: Mutex::new(HashMap::new()),
                file_len,
            },
            cluster_bits,
        )))
    }

    /// The virtual size of the disk.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_table(&self, layer: &Qcow2Layer, offset: u64) -> io::Result<Arc<Vec<u64>>> {
        if let Some(t) = layer.l2_cache.lock().get(&offset) {
            return Ok(t.clone());
        }
        if offset + self.cluster_size() > layer.file_len {
            return Err(bad("L2 table beyond the end of the image"));
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        layer.file.read_exact_at(&mut raw, offset)?;
        let table = Arc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect::<Vec<_>>());
        let mut cache = layer.l2_cache.lock();
        if cache.len() >= L2_CACHE {
            cache.clear();
        }
        cache.insert(offset, table.clone());
        Ok(table)
    }

    /// What one qcow2 layer holds for guest cluster `index`.
    fn lookup(&self, layer: &Qcow2Layer, index: u64) -> io::Result<Alloc> {
        let l2_bits = self.cluster_bits - 3;
        let Some(l1e) = layer.l1.get((index >> l2_bits) as usize) else {
            return Ok(Alloc::Below);
        };
        let l2_offset = l1e & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Alloc::Below);
        }
        let table = self.l2_table(layer, l2_offset)?;
        let l2e = table[(index & ((1 << l2_bits) - 1)) as usize];
        if l2e & L2_COMPRESSED != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "compressed cluster: served through qemu-nbd instead",
            ));
        }
        if l2e & L2_ZERO != 0 {
            return Ok(Alloc::Zero);
        }
        let host = l2e & OFFSET_MASK;
        if host == 0 {
            return Ok(Alloc::Below);
        }
        if host + self.cluster_size()
            > layer.file_len.div_ceil(self.cluster_size()) * self.cluster_size()
        {
            return Err(bad("data cluster beyond the end of the image"));
        }
        Ok(Alloc::Data(host))
    }

    /// Where guest cluster `index` lives, looking down the chain.
    fn cluster(&self, index: u64) -> io::Result<Cluster> {
        let guest = index << self.cluster_bits;
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                Layer::Qcow2(l) => {
                    if guest >= l.size {
                        // Past the end of a shorter backing image.
                        return Ok(Cluster::Zero);
                    }
                    match self.lookup(l, index)? {
                        Alloc::Below => continue,
                        Alloc::Zero => return Ok(Cluster::Zero),
                        Alloc::Data(host) => return Ok(Cluster::Data(i, host)),
                    }
                }
                Layer::Raw { len, .. } => {
                    return Ok(if guest >= *len {
                        Cluster::Zero
                    } else {
                        Cluster::Data(i, guest)
                    });
                }
            }
        }
        Ok(Cluster::Zero)
    }

    /// Reads at `offset`; fewer bytes only at the end of the disk.
    /// Clusters that lie next to each other in one file are read with one
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
                    (Cluster::Data(la, a), Cluster::Data(lb, b)) => {
                        la == lb && b == a + within + len as u64
                    }
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
                Cluster::Data(layer, host) => {
                    // The last cluster may end past the file's end.
                    let got = read_some_at(self.layers[layer].file(), out, host + within)?;
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
            let is_data = matches!(self.cluster(index)?, Cluster::Data(..));
            if is_data == data {
                return Ok(Some((index * cs).max(offset)));
            }
            index += 1;
        }
        Ok(if data { None } else { Some(self.size) })
    }

    /// Bytes of the disk that hold data somewhere in the chain (zero
    /// clusters and holes excluded): what `du` of the view should show.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        let cs = self.cluster_size();
        let mut total = 0u64;
        for index in 0..self.size.div_ceil(cs) {
            if let Cluster::Data(..) = self.cluster(index)? {
                total += cs.min(self.size - index * cs);
            }
        }
        Ok(total)
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

/// Finds internal snapshot `tag` in the snapshot table: its L1 table
/// (offset, entries) and the disk size it records, if it does.
fn find_snapshot(
    file: &File,
    table: u64,
    count: usize,
    tag: &str,
) -> io::Result<Option<(u64, usize, Option<u64>)>> {
    let mut at = table;
    for _ in 0..count {
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
            return Ok(Some((l1_offset, l1_size, disk_size)));
        }
        let len = 40 + extra_len + id_len + name_len as u64;
        at += len.div_ceil(8) * 8;
    }
    Ok(None)
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

    #[test]
    fn reads_a_chain_like_qemu_does() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
        // raw base <- qcow2 mid (with a zero cluster over data) <- qcow2 top.
        qemu_img(&["create", "-q", "-f", "raw", &p("base.raw"), "8M"]);
        let st = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x11 0 3M", &p("base.raw")])
            .output()
            .unwrap();
        assert!(st.status.success());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &p("base.raw"),
            &p("mid.qcow2"),
            "10M",
        ]);
        qemu_io(&p("mid.qcow2"), "write -P 0x22 1M 512k");
        qemu_io(&p("mid.qcow2"), "write -z 2M 64k");
        qemu_io(&p("mid.qcow2"), "write -P 0x23 9M 64k");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &p("mid.qcow2"),
            &p("top.qcow2"),
        ]);
        qemu_io(&p("top.qcow2"), "write -P 0x33 1536k 100k");
        qemu_img(&["convert", "-O", "raw", &p("top.qcow2"), &p("want.raw")]);
        let want = std::fs::read(p("want.raw")).unwrap();
        let backing = vec![
            (PathBuf::from(p("mid.qcow2")), "qcow2".to_owned()),
            (PathBuf::from(p("base.raw")), "raw".to_owned()),
        ];
        let view = Qcow2Snapshot::open_chain(Path::new(&p("top.qcow2")), None, &backing)
            .unwrap()
            .expect("handled");
        assert_eq!(view.size(), 10 << 20);
        let mut got = vec![0u8; want.len()];
        let mut off = 0;
        while off < got.len() {
            let end = (off + 333_333).min(got.len());
            view.read_at(off as u64, &mut got[off..end]).unwrap();
            off = end;
        }
        assert!(got == want, "bytes differ from qemu-img convert");
        // The raw base counts as data; past it, holes.
        assert_eq!(view.seek_hole(0).unwrap(), Some(2 << 20));
        assert_eq!(view.seek_data(8 << 20).unwrap(), Some(9 << 20));
        // A chain given wrong is refused, not misread.
        assert!(
            Qcow2Snapshot::open_chain(Path::new(&p("top.qcow2")), None, &[])
                .unwrap()
                .is_none()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
