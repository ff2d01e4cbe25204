//! Frozen views on real `qemu-img`/`qemu-nbd`: an internal snapshot and the
//! current state of a qcow2 image read byte by byte through `View`, the
//! extent map against what was written, idle release, and servers that go
//! away. Every process started here is stopped by pid on drop (the views
//! own their `qemu-nbd`), the temp dir removed, even when a test fails.

use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::TempDir;
use vmsnapfs::views::{
    LazyView, NbdClient, NbdOptions, View, ViewError, ViewOptions, ViewSource, EXPORT_NAME,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const CLUSTER: u64 = 64 * 1024;

fn run(prog: &str, args: &[&str]) {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Byte ranges with a fill pattern; zero elsewhere.
type Layout = &'static [(u64, u64, u8)];

/// Written before the snapshots.
const BEFORE: Layout = &[(0, MIB, 0xab), (40 * MIB, CLUSTER, 0xcd)];
/// The image after the writes over the snapshots.
const AFTER: Layout = &[
    (0, 2 * MIB, 0x11),
    (20 * MIB, CLUSTER, 0x22),
    (40 * MIB, CLUSTER, 0xcd),
];

fn expected(layout: Layout, off: u64) -> u8 {
    layout
        .iter()
        .find(|(s, l, _)| off >= *s && off < s + l)
        .map_or(0, |(_, _, p)| *p)
}

fn is_data(layout: Layout, off: u64) -> bool {
    layout.iter().any(|(s, l, _)| off >= *s && off < s + l)
}

/// A 64 MiB qcow2 with BEFORE written, internal snapshots `s1` and `s,2`
/// of it, then AFTER written over it.
fn make_image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
    run(
        "qemu-io",
        &["-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 40M 64k", p],
    );
    run("qemu-img", &["snapshot", "-c", "s1", p]);
    run("qemu-img", &["snapshot", "-c", "s,2", p]);
    run(
        "qemu-io",
        &["-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 20M 64k", p],
    );
    img
}

fn options(dir: &Path) -> ViewOptions {
    ViewOptions {
        runtime_dir: dir.to_owned(),
        nbd: NbdOptions {
            timeout: Duration::from_secs(10),
            ..NbdOptions::default()
        },
        ..ViewOptions::default()
    }
}

fn pid_alive(pid: u32) -> bool {
    // Our children are reaped by the view; a zombie does not count.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// The whole disk as `layout` describes it.
fn image_of(layout: Layout) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    for (s, l, p) in layout {
        v[*s as usize..(s + l) as usize].fill(*p);
    }
    v
}

/// Reads the whole view in reads of `step` bytes and compares every byte.
fn check_bytes(view: &View, layout: Layout, step: usize) {
    assert_eq!(view.size(), SIZE);
    let want = image_of(layout);
    let mut buf = vec![0u8; step];
    let mut off = 0u64;
    while off < SIZE {
        let n = view.read_at(off, &mut buf).unwrap();
        assert_eq!(n as u64, (step as u64).min(SIZE - off));
        let w = &want[off as usize..off as usize + n];
        if buf[..n] != *w {
            let i = buf.iter().zip(w).position(|(a, b)| a != b).unwrap();
            panic!(
                "byte at {}: {:#x}, expected {:#x}",
                off + i as u64,
                buf[i],
                w[i]
            );
        }
        off += n as u64;
    }
}

/// SEEK_DATA/SEEK_HOLE at every cluster boundary and a few odd offsets.
fn check_seeks(view: &View, layout: Layout) {
    let next = |from: u64, want_data: bool| {
        let mut c = from;
        while c < SIZE && is_data(layout, c) != want_data {
            c = (c / CLUSTER + 1) * CLUSTER;
        }
        c
    };
    let offsets = (0..SIZE / CLUSTER).map(|c| c * CLUSTER).chain([
        1,
        CLUSTER - 1,
        MIB + 5,
        40 * MIB + 17,
        SIZE - 1,
    ]);
    for off in offsets {
        let d = next(off, true);
        let want_data = (d < SIZE).then_some(d);
        assert_eq!(view.seek_data(off).unwrap(), want_data, "SEEK_DATA {off}");
        assert_eq!(
            view.seek_hole(off).unwrap(),
            Some(next(off, false)),
            "SEEK_HOLE {off}"
        );
    }
    assert_eq!(view.seek_data(SIZE).unwrap(), None);
    assert_eq!(view.seek_hole(SIZE).unwrap(), None);
    assert_eq!(view.seek_hole(u64::MAX).unwrap(), None);
    assert!(view.is_hole(MIB * 3, MIB).unwrap());
    assert!(!view.is_hole(40 * MIB - 1, 2).unwrap());
}

#[test]
fn snapshot_view_shows_the_disk_at_the_snapshot() {
    let dir = TempDir::new("views-snap");
    let img = make_image(&dir.0);
    let opts = options(&dir.0);
    let view = ViewSource::internal_snapshot(&img, "s1")
        .open(&opts)
        .unwrap();
    let pid = view.server_pid().unwrap();
    assert!(pid_alive(pid));
    check_bytes(&view, BEFORE, MIB as usize);
    check_seeks(&view, BEFORE);

    // Unaligned and edge reads.
    let mut buf = [0u8; 10];
    assert_eq!(view.read_at(MIB - 3, &mut buf).unwrap(), 10);
    assert_eq!(buf, [0xab, 0xab, 0xab, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(view.read_at(SIZE - 4, &mut buf).unwrap(), 4);
    assert_eq!(view.read_at(SIZE, &mut buf).unwrap(), 0);
    assert_eq!(view.read_at(u64::MAX, &mut buf).unwrap(), 0);
    let mut big = vec![1u8; 3 * MIB as usize + 123];
    assert_eq!(
        view.read_at(40 * MIB - MIB - 7, &mut big).unwrap(),
        big.len()
    );
    let start = (39 * MIB - 7) as usize;
    assert!(big == image_of(BEFORE)[start..start + big.len()]);

    // A tag with a comma (QEMU's option escape).
    let view2 = ViewSource::internal_snapshot(&img, "s,2")
        .open(&opts)
        .unwrap();
    check_bytes(&view2, BEFORE, 4 * MIB as usize);

    let socket_files = || {
        fs::read_dir(&dir.0)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("vmsnapfs-nbd")
            })
            .count()
    };
    assert!(socket_files() > 0);
    drop(view);
    drop(view2);
    assert!(!pid_alive(pid), "qemu-nbd {pid} still runs");
    assert_eq!(socket_files(), 0, "socket and log files removed");
}

#[test]
fn image_view_shows_the_current_state() {
    let dir = TempDir::new("views-image");
    let img = make_image(&dir.0);
    let view = ViewSource::image(&img).open(&options(&dir.0)).unwrap();
    check_bytes(&view, AFTER, 128 * 1024);
    check_seeks(&view, AFTER);
}

#[test]
fn parallel_reads_use_several_connections() {
    let dir = TempDir::new("views-parallel");
    let img = make_image(&dir.0);
    let opts = ViewOptions {
        zero_fill: false, // every read goes to the server
        ..options(&dir.0)
    };
    let view = Arc::new(
        ViewSource::internal_snapshot(&img, "s1")
            .open(&opts)
            .unwrap(),
    );
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let view = Arc::clone(&view);
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                for i in 0..64u64 {
                    let off = ((i * 4 + t) * 256 * 1024) % SIZE;
                    view.read_at(off, &mut buf).unwrap();
                    for (j, b) in buf.iter().enumerate().step_by(4093) {
                        assert_eq!(*b, expected(BEFORE, off + j as u64));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let open = view.pool().open_connections();
    assert!((1..=4).contains(&open), "{open} connections");
    // qemu-nbd runs with --shared=0: more clients at once than the pool
    // has get served too (with the default of 1 the handshake would hang).
    let socket = find_socket(&dir.0);
    let extra: Vec<NbdClient> = (0..6)
        .map(|_| NbdClient::connect(&socket, EXPORT_NAME, &opts.nbd).unwrap())
        .collect();
    assert!(extra
        .iter()
        .all(|c| c.size() == SIZE && c.has_block_status()));
}

#[test]
fn missing_snapshot_is_a_clear_error() {
    let dir = TempDir::new("views-missing");
    let img = make_image(&dir.0);
    let e = ViewSource::internal_snapshot(&img, "nope")
        .open(&options(&dir.0))
        .unwrap_err();
    match &e {
        ViewError::ServerExited { message, .. } => {
            assert!(message.contains("snapshot"), "{message}")
        }
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(io::Error::from(e).raw_os_error(), Some(libc::EIO));
}

#[test]
fn lazy_view_opens_on_use_and_closes_when_idle() {
    let dir = TempDir::new("views-lazy");
    let img = make_image(&dir.0);
    let lazy = LazyView::new(ViewSource::internal_snapshot(&img, "s1"), options(&dir.0));
    assert!(!lazy.is_open());
    let mut buf = [0u8; 4];
    assert_eq!(lazy.read_at(40 * MIB, &mut buf).unwrap(), 4);
    assert_eq!(buf, [0xcd; 4]);
    assert!(lazy.is_open());
    assert_eq!(lazy.size().unwrap(), SIZE);
    let pid = lazy.view().unwrap().server_pid().unwrap();

    assert!(!lazy.close_if_idle(Duration::from_secs(3600)));
    {
        let _in_use = lazy.view().unwrap();
        assert!(
            !lazy.close_if_idle(Duration::ZERO),
            "a view in use stays open"
        );
    }
    assert!(lazy.close_if_idle(Duration::ZERO));
    assert!(!lazy.is_open());
    assert!(!pid_alive(pid), "qemu-nbd {pid} still runs");
    // Known size, no server needed for reads past the end.
    assert_eq!(lazy.read_at(SIZE, &mut buf).unwrap(), 0);
    assert!(!lazy.is_open());

    assert_eq!(lazy.seek_data(MIB).unwrap(), Some(40 * MIB));
    assert!(lazy.is_open());
    assert_eq!(lazy.read_at(0, &mut buf).unwrap(), 4);
    assert_eq!(buf, [0xab; 4]);

    // The server dies under it: an error, then a fresh server.
    let pid = lazy.view().unwrap().server_pid().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while lazy.view().unwrap().server_running() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let e = lazy.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(!lazy.is_open(), "the dead view was dropped");
    assert_eq!(lazy.read_at(MIB - 2, &mut buf).unwrap(), 4);
    assert_eq!(buf, [0xab, 0xab, 0, 0]);
    assert_ne!(lazy.view().unwrap().server_pid().unwrap(), pid);
    assert!(lazy.close());
}

/// The one `qemu-nbd` socket in `dir`.
fn find_socket(dir: &Path) -> PathBuf {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .unwrap()
}

/// A Unix socket proxy in front of a real server that, once `cut` is set,
/// drops its connections and every later one.
struct Proxy {
    socket: PathBuf,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    fn start(listen: &Path, upstream: &Path) -> Proxy {
        let listener = UnixListener::bind(listen).unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (c, up) = (Arc::clone(&cut), upstream.to_owned());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = UnixStream::connect(&up) else {
                    return;
                };
                let pairs = [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ];
                for (mut from, mut to) in pairs {
                    thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                let c2 = Arc::clone(&c);
                thread::spawn(move || {
                    while !c2.load(Ordering::SeqCst) {
                        thread::sleep(Duration::from_millis(5));
                    }
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                });
            }
        });
        Proxy {
            socket: listen.to_owned(),
            cut,
        }
    }
}

#[test]
fn server_closing_the_connection_is_an_error() {
    let dir = TempDir::new("views-closing");
    let img = make_image(&dir.0);
    let opts = ViewOptions {
        connections: 1,
        zero_fill: false,
        ..options(&dir.0)
    };
    let real = ViewSource::internal_snapshot(&img, "s1")
        .open(&opts)
        .unwrap();
    // The real view's socket is served by its qemu-nbd: find it in the dir.
    let upstream = find_socket(&dir.0);
    let proxy = Proxy::start(&dir.0.join("proxy.sock"), &upstream);
    let view = View::connect(&proxy.socket, EXPORT_NAME, &opts).unwrap();
    assert_eq!(view.server_pid(), None);
    let mut buf = vec![0u8; 64 * 1024];
    view.read_at(40 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0xcd));
    assert_eq!(view.seek_data(MIB).unwrap(), Some(40 * MIB));

    proxy.cut.store(true, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(50));
    let e = view.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Extents of a new chunk cannot be loaded either; cached ones still answer.
    assert_eq!(view.seek_data(0).unwrap(), Some(0));
    // A server that closes at once during the handshake.
    assert!(View::connect(&proxy.socket, "view", &opts).is_err());
    drop(real);
}

#[test]
fn silent_server_times_out() {
    let dir = TempDir::new("views-silent");
    let path = dir.0.join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let held = thread::spawn(move || {
        // Accepts and says nothing until the client gives up.
        let (mut s, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let opts = ViewOptions {
        nbd: NbdOptions {
            timeout: Duration::from_millis(300),
            ..NbdOptions::default()
        },
        ..options(&dir.0)
    };
    let t = Instant::now();
    let e = View::connect(&path, "x", &opts).unwrap_err();
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    held.join().unwrap();
}
