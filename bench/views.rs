//! Frozen-view read speed against the FUSE ceiling of this machine,
//! measured in the same run, on 1 GiB disks holding 600 MiB of data:
//!
//! - `disks/vda` of an external snapshot of a qcow2 disk (the 1 GiB qcow2
//!   point image read directly), and of an internal snapshot taken right
//!   after it in the overlay (read through the empty overlay into the
//!   point), through the mounted tree;
//! - `disks/vdb` of an external snapshot of a raw disk (a raw point: the
//!   view is the raw file);
//! - the peer: a minimal fuser filesystem, written here, serving a plain
//!   file (a raw copy of the same bytes) with `pread` and
//!   `FOPEN_DIRECT_IO`, as vmsnapfs serves views: the FUSE ceiling (goal:
//!   each view >= 0.8x of it);
//! - the same peer with FUSE passthrough (kernel 6.9+): reads of the file
//!   go from the kernel to the backing file without the daemon;
//! - `cat`-like reads of the raw copy from the page cache, for scale.
//!
//! Every file read is in the host page cache first (each image is read
//! once before its view), then read whole with 1 MiB reads; median of
//! [`ROUNDS`]. Run: `cargo bench --bench views` (root, QEMU, /dev/fuse).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::*;
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen,
    Request,
};
use parking_lot::Mutex;

const ROUNDS: usize = 5;
const GOAL: f64 = 0.8;

/// Reads a whole file with 1 MiB reads; returns (bytes, time).
fn read_all(path: &Path) -> (u64, Duration) {
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let t = Instant::now();
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    (total, t.elapsed())
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The peer: one file, `disk`, served from `file` by `pread` with
/// `FOPEN_DIRECT_IO`, or by passthrough to `file`.
struct PeerFs {
    file: fs::File,
    len: u64,
    passthrough: bool,
    backing: Mutex<Option<Arc<BackingId>>>,
    handles: Mutex<HashMap<u64, Arc<BackingId>>>,
    next: AtomicU64,
}

const DISK: INodeNo = INodeNo(2);

impl PeerFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let dir = ino == INodeNo::ROOT;
        FileAttr {
            ino,
            size: if dir { 0 } else { self.len },
            blocks: if dir { 0 } else { self.len / 512 },
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o444 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

impl Filesystem for PeerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // As vmsnapfs does.
        let _ = config.set_max_readahead(1024 * 1024);
        if self.passthrough {
            config
                .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
                .map_err(|_| std::io::Error::other("the kernel has no FUSE passthrough"))?;
            config
                .set_max_stack_depth(1)
                .map_err(|_| std::io::Error::other("max_stack_depth refused"))?;
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == "disk" {
            reply.entry(
                &Duration::from_secs(60),
                &self.attr(DISK),
                fuser::Generation(0),
            );
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == DISK {
            reply.attr(&Duration::from_secs(60), &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK {
            return reply.error(Errno::ENOENT);
        }
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        if !self.passthrough {
            return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
        }
        let id = {
            let mut b = self.backing.lock();
            match &*b {
                Some(id) => id.clone(),
                None => match reply.open_backing(&self.file) {
                    Ok(id) => b.insert(Arc::new(id)).clone(),
                    Err(e) => {
                        eprintln!("open_backing: {e}");
                        return reply.error(Errno::EIO);
                    }
                },
            }
        };
        self.handles.lock().insert(fh, id.clone());
        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            buf.resize(size as usize, 0);
            let mut done = 0;
            while done < buf.len() {
                match self.file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(_) => return reply.error(Errno::EIO),
                }
            }
            reply.data(&buf[..done]);
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().remove(&fh.0);
        reply.ok();
    }
}

/// A mounted peer; unmounted on drop.
struct Peer {
    _session: fuser::BackgroundSession,
    mnt: PathBuf,
}

impl Peer {
    fn mount(file: &Path, mnt: &Path, passthrough: bool) -> std::io::Result<Peer> {
        fs::create_dir_all(mnt)?;
        let f = fs::File::open(file)?;
        let len = f.metadata()?.len();
        let peer = PeerFs {
            file: f,
            len,
            passthrough,
            backing: Mutex::new(None),
            handles: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("peer".into()),
            fuser::MountOption::RO,
        ];
        // As vmsnapfs' default (--threads 4).
        config.n_threads = Some(4);
        config.clone_fd = true;
        let session = fuser::spawn_mount(peer, mnt, &config)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::metadata(mnt.join("disk")).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("the peer did not mount"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Peer {
            _session: session,
            mnt: mnt.to_owned(),
        })
    }

    fn disk(&self) -> PathBuf {
        self.mnt.join("disk")
    }
}

/// Measures `path` once: warms `cached` (the files its bytes come from)
/// in the host page cache, then reads it whole.
fn measure(path: &Path, cached: &[&Path]) -> f64 {
    for c in cached {
        let _ = read_all(c);
    }
    let (n, d) = read_all(path);
    assert_eq!(n, 1 << 30, "{}", path.display());
    mbps(n, d)
}

fn qemu_img_raw(image: &Path, format: &str, out: &Path) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-U", "-f", format, "-O", "raw"]);
    let st = cmd.arg(image).arg(out).status().unwrap();
    assert!(st.success());
}

fn main() {
    let spec = VmSpec {
        name: "vm1".into(),
        disks: vec![("vda".into(), 1024), ("vdb".into(), 1024)],
        memory_mb: 128,
        raw: vec!["vdb".into()],
    };
    let mut fx = Fixture::with_spec("bench-views", &spec, &[("RUST_LOG", "info")]);
    // ~600 MiB of data in 100 MiB runs with gaps, different bytes each.
    for i in 0..6u64 {
        for d in ["vda", "vdb"] {
            let cmd = format!("write -P 0x{:02x} {}M 100M", 0x11 * (i + 1), i * 160);
            fx.vm.qemu_io(d, &cmd).unwrap();
        }
    }
    // An external snapshot: vda's qcow2 image and vdb's raw image become
    // read-only points under new overlays; then an internal snapshot of
    // the same point, in the overlays (its view reads through them).
    write_file(
        &fx.path(".create"),
        b"<domainsnapshot><name>x1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='external'/>\
          </disks></domainsnapshot>",
    )
    .unwrap();
    fs::create_dir(fx.path("s1")).unwrap();
    fx.vm.kill();
    fx.wait_state("shutoff");
    let qcow2 = fx.vm.disks[0].image.clone();
    let raw_point = fx.vm.disks[1].image.clone();
    assert_eq!(fs::read_link(fx.path("x1/images/vda")).unwrap(), qcow2);
    let copy = fx.dir.0.join("vda.raw");
    qemu_img_raw(&qcow2, "qcow2", &copy);

    let ceiling = Peer::mount(&copy, &fx.dir.0.join("peer"), false).expect("mount the peer");
    let passthrough = match Peer::mount(&copy, &fx.dir.0.join("peer-pt"), true) {
        Ok(p) => match fs::File::open(p.disk()) {
            Ok(_) => Some(p),
            Err(e) => {
                println!("FUSE passthrough: open refused ({e}); not measured");
                None
            }
        },
        Err(e) => {
            println!("FUSE passthrough: not available ({e}); not measured");
            None
        }
    };
    let internal = fx.path("s1/disks/vda");
    let external = fx.path("x1/disks/vda");
    let overlay = fs::read_link(fx.path("s1/images/vda")).unwrap();
    let raw_view = fx.path("x1/disks/vdb");
    // The views show the bytes qemu-img reads.
    assert!(fs::read(&external).unwrap() == fs::read(&copy).unwrap());
    assert!(fs::read(&internal).unwrap() == fs::read(&copy).unwrap());

    let mut r: HashMap<&str, Vec<f64>> = HashMap::new();
    for _ in 0..ROUNDS {
        let mut add = |k, v| r.entry(k).or_default().push(v);
        add("external", measure(&external, &[&qcow2]));
        add("peer", measure(&ceiling.disk(), &[&copy]));
        add("internal", measure(&internal, &[&qcow2, &overlay]));
        add("raw", measure(&raw_view, &[&raw_point]));
        add("peer2", measure(&ceiling.disk(), &[&copy]));
        if let Some(p) = &passthrough {
            add("passthrough", measure(&p.disk(), &[&copy]));
        }
        add("cat", measure(&copy, &[&copy]));
    }
    let m = |k: &str| r.get(k).map(|v| median(v.clone()));
    let peer = median(r["peer"].iter().chain(r["peer2"].iter()).copied().collect());
    let line = |what: &str, v: f64| {
        let verdict = if v / peer >= GOAL { "met" } else { "NOT met" };
        println!(
            "{what:<44}: {v:7.0} MB/s   {:.2}x of the peer (goal >= {GOAL}x: {verdict})",
            v / peer
        );
    };
    println!(
        "\n== sequential read of a 1 GiB disk with 600 MiB of data \
         (median of {ROUNDS}, 1 MiB reads, files in the page cache)"
    );
    println!(
        "{:<44}: {peer:7.0} MB/s",
        "peer: fuser + pread + FOPEN_DIRECT_IO"
    );
    line(
        "external snapshot's view (qcow2 point)",
        m("external").unwrap(),
    );
    line(
        "internal snapshot's view (overlay over it)",
        m("internal").unwrap(),
    );
    line("external snapshot's view (raw point)", m("raw").unwrap());
    if let Some(p) = m("passthrough") {
        println!(
            "{:<44}: {p:7.0} MB/s   {:.2}x of the peer",
            "peer with FUSE passthrough (same file)",
            p / peer
        );
    }
    let c = m("cat").unwrap();
    println!(
        "{:<44}: {c:7.0} MB/s   {:.2}x of the peer",
        "page-cache read of the raw copy (cat)",
        c / peer
    );
    drop(passthrough);
    drop(ceiling);
    fx.daemon.stop();
}
