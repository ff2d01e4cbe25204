//! Nothing waits on a monitor, and a silent monitor is not "shut off":
//! monitors that never accept, that greet and then say nothing, and a
//! real QEMU stopped with SIGSTOP, each beside a healthy domain on the
//! same mount. Every FUSE call answers at once, nothing is made, and
//! `.state` / `.log` say why.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Generous bound for one FUSE call: a hang check, not a speed target.
const FUSE_CALL: Duration = Duration::from_secs(2);

/// Runs `f`, failing when it takes longer than [`FUSE_CALL`].
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    let took = t.elapsed();
    assert!(took < FUSE_CALL, "{what} took {took:?}");
    r
}

/// `ls /`, and for each domain `ls`, `cat .state`, `cat .log`, `cat
/// .tree`, `stat .jobs`: each answers within [`FUSE_CALL`].
fn fuse_calls_answer(mnt: &Path, domains: &[&str]) {
    timed("ls /", || fs::read_dir(mnt).unwrap().count());
    for d in domains {
        let p = mnt.join(d);
        timed(&format!("ls {d}"), || fs::read_dir(&p).unwrap().count());
        timed(&format!("cat {d}/.state"), || {
            fs::read_to_string(p.join(".state")).unwrap()
        });
        timed(&format!("cat {d}/.log"), || {
            fs::read_to_string(p.join(".log")).unwrap()
        });
        timed(&format!("cat {d}/.tree"), || {
            fs::read_to_string(p.join(".tree")).unwrap()
        });
        timed(&format!("stat {d}/.jobs"), || {
            fs::metadata(p.join(".jobs")).unwrap()
        });
    }
}

/// Polls `f` until it holds, failing after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn state_of(mnt: &Path, d: &str) -> String {
    fs::read_to_string(mnt.join(d).join(".state"))
        .unwrap()
        .trim()
        .to_owned()
}

/// A listening Unix socket whose backlog is full: `listen(fd, 0)` with
/// one connection queued that nobody accepts. A further connect would
/// block forever.
struct FullListener {
    _listener: OwnedFd,
    _queued: UnixStream,
}

fn full_listener(path: &Path) -> FullListener {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket/bind/listen on a fresh descriptor with a valid address.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let rc = libc::bind(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind {}", path.display());
        assert_eq!(libc::listen(fd, 0), 0);
        OwnedFd::from_raw_fd(fd)
    };
    let queued = UnixStream::connect(path).unwrap();
    // The backlog is full now: a connect with a deadline times out.
    let e = vmsnapfs::backend::qmp::Qmp::connect_within(
        path,
        Duration::from_millis(100),
        Duration::from_millis(100),
    )
    .err()
    .expect("the backlog should be full");
    assert!(e.to_string().contains("connect timed out"), "{e}");
    FullListener {
        _listener: listener,
        _queued: queued,
    }
}

/// A QMP peer that greets every client and then never answers.
fn silent_after_greeting(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = s.write_all(
                    b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \
                      \"package\": \"\"}, \"capabilities\": []}}\n",
                );
                // Read whatever comes, answer nothing, until the client leaves.
                let mut r = BufReader::new(s);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    line.clear();
                }
            });
        }
    });
}

/// A qcow2 image and a definition for a domain whose monitor is `sock`.
fn fake_domain(dir: &Path, name: &str, sock: &Path, policy: &str) -> PathBuf {
    let img = dir.join("images").join(format!("{name}.qcow2"));
    fs::create_dir_all(img.parent().unwrap()).unwrap();
    create_qcow2(&img, "16M");
    fs::create_dir_all(dir.join("domains")).unwrap();
    fs::write(
        dir.join("domains").join(format!("{name}.xml")),
        format!(
            "<domain><name>{name}</name><monitor path='{}'/><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda'/></disk></devices>\
             <snapshot policy='{policy}'/></domain>",
            sock.display(),
            img.display()
        ),
    )
    .unwrap();
    img
}

/// The files in a directory, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn monitors_that_never_accept_or_never_answer_delay_nothing() {
    let dir = TempDir::new("robust-monitors");
    let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("vm1")).expect("start VM");
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let full_sock = dir.0.join("full.qmp");
    let _full = full_listener(&full_sock);
    let full_img = fake_domain(&dir.0, "full", &full_sock, "external");
    let silent_sock = dir.0.join("silent.qmp");
    silent_after_greeting(&silent_sock);
    let silent_img = fake_domain(&dir.0, "silent", &silent_sock, "internal");
    let images_before = files_in(&dir.0.join("images"));

    let t = Instant::now();
    let daemon = Daemon::start(&dir.0, &[]);
    let mount_took = t.elapsed();
    eprintln!("mount with two stuck monitors: {mount_took:?}");
    assert!(
        mount_took < Duration::from_secs(10),
        "mount took {mount_took:?}"
    );
    let mnt = daemon.mnt.clone();
    let all = ["vm1", "full", "silent"];
    fuse_calls_answer(&mnt, &all);
    assert_eq!(state_of(&mnt, "vm1"), "running");

    // Each stuck domain says why, while the calls keep answering.
    let want = [
        ("full", "unreachable: connect timed out after 2s"),
        (
            "silent",
            "unreachable: no answer to qmp_capabilities within 5s",
        ),
    ];
    wait_until(
        "the stuck domains' reasons",
        Duration::from_secs(30),
        || {
            fuse_calls_answer(&mnt, &all);
            want.iter().all(|(d, w)| state_of(&mnt, d) == *w)
        },
    );
    for (d, w) in want {
        let log = fs::read_to_string(mnt.join(d).join(".log")).unwrap();
        assert!(log.contains(&format!("domain is now {w}")), "{d}: {log}");
    }

    // Operations on them fail at once with EIO (nothing holds their
    // images: it is the monitor that cannot be used), and make nothing.
    for d in ["full", "silent"] {
        let r = timed(&format!("mkdir {d}/snap"), || {
            fs::create_dir(mnt.join(d).join("snap"))
        });
        assert_eq!(errno(r), libc::EIO, "{d}");
        let log = fs::read_to_string(mnt.join(d).join(".log")).unwrap();
        assert!(
            log.contains("mkdir \"snap\": refused (EIO): the domain is unreachable"),
            "{d}: {log}"
        );
    }
    assert_eq!(files_in(&dir.0.join("images")), images_before);
    assert!(image_tags(&full_img).is_empty());
    assert!(image_tags(&silent_img).is_empty());

    // The healthy domain works meanwhile, and its state follows QEMU
    // within seconds although the others' probes never end.
    fs::create_dir(mnt.join("vm1").join("ok")).unwrap();
    fuse_calls_answer(&mnt, &all);
    vm.kill();
    let t = Instant::now();
    wait_until("vm1 shut off", Duration::from_secs(10), || {
        state_of(&mnt, "vm1") == "shutoff"
    });
    let noticed = t.elapsed();
    eprintln!("QEMU's exit seen in .state after {noticed:?}");
    assert!(
        noticed < Duration::from_secs(5),
        "QEMU's exit noticed after {noticed:?}"
    );
    fuse_calls_answer(&mnt, &all);
    drop(daemon);
}

/// Sends SIGCONT to a stopped QEMU when dropped (before the Vm kills it).
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a QEMU this test started.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

#[test]
fn a_stopped_qemu_is_busy_not_shut_off() {
    let dir = TempDir::new("robust-sigstop");
    let vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let other = Vm::start(&VmSpec::small("vm2"), &dir.0.join("images2")).expect("start VM");
    other.write_definition(&dir.0.join("domains")).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    let mnt = daemon.mnt.clone();
    let all = ["vm1", "vm2"];
    assert_eq!(state_of(&mnt, "vm1"), "running");
    let images_before = files_in(&dir.0.join("images"));
    let layers_file = daemon.state.join("vm1/layers");
    let layers_before = fs::read_to_string(&layers_file).unwrap_or_default();

    let pid = vm.pid().unwrap();
    // SAFETY: kill(2) on the pid of the QEMU this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let _resume = Resume(pid);

    // At once, before the daemon noticed: the mkdir's own look at the
    // monitor times out, and the images are QEMU's: EBUSY, nothing made.
    let r = fs::create_dir(mnt.join("vm1").join("while-stopped"));
    assert_eq!(errno(r), libc::EBUSY);
    fuse_calls_answer(&mnt, &all);
    wait_until("vm1 unreachable", Duration::from_secs(30), || {
        fuse_calls_answer(&mnt, &all);
        state_of(&mnt, "vm1").starts_with("unreachable: ")
    });
    let state = state_of(&mnt, "vm1");
    assert!(
        state.contains("a process holds the write lock") || state.contains("still runs"),
        "{state}"
    );
    // Now refused at once from the cached state.
    let r = timed("mkdir vm1/again", || {
        fs::create_dir(mnt.join("vm1").join("again"))
    });
    assert_eq!(errno(r), libc::EBUSY);
    let log = fs::read_to_string(mnt.join("vm1/.log")).unwrap();
    assert!(
        log.contains("refused (EBUSY): the domain is unreachable"),
        "{log}"
    );
    assert_eq!(files_in(&dir.0.join("images")), images_before);
    assert!(fs::read_dir(mnt.join("vm1")).unwrap().all(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
    // The other domain is not held up.
    assert_eq!(state_of(&mnt, "vm2"), "running");
    fs::create_dir(mnt.join("vm2").join("meanwhile")).unwrap();

    // Resumed: running again, the record of its layers never went back.
    // SAFETY: kill(2) on the pid of the QEMU this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    wait_until("vm1 running again", Duration::from_secs(30), || {
        state_of(&mnt, "vm1") == "running"
    });
    assert_eq!(
        fs::read_to_string(&layers_file).unwrap_or_default(),
        layers_before
    );
    fs::create_dir(mnt.join("vm1").join("after")).unwrap();
    fuse_calls_answer(&mnt, &all);
    drop(daemon);
}

/// A stopped domain with one raw disk of 64 MiB whose first MiB is
/// `byte`, and no monitor.
fn raw_domain(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let img = dir.join("images").join(format!("{name}.img"));
    fs::create_dir_all(img.parent().unwrap()).unwrap();
    let f = fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![byte; 1 << 20], 0).unwrap();
    fs::create_dir_all(dir.join("domains")).unwrap();
    fs::write(
        dir.join("domains").join(format!("{name}.xml")),
        format!(
            "<domain><name>{name}</name><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='raw'/><source file='{}'/><target dev='vda'/>\
             </disk></devices></domain>",
            img.display()
        ),
    )
    .unwrap();
    img
}

#[test]
fn a_relative_state_dir_serves_raw_views_and_helper_errors_reach_the_log() {
    let dir = TempDir::new("robust-relative");
    let vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("vm1")).expect("start VM");
    vm.write_definition(&dir.0.join("domains")).unwrap();
    raw_domain(&dir.0, "rawvm", 0x5a);
    let gone = raw_domain(&dir.0, "gone", 0x6b);
    let daemon = Daemon::start_relative(&dir.0, &[]);
    let mnt = daemon.mnt.clone();
    let all = ["vm1", "rawvm", "gone"];
    fuse_calls_answer(&mnt, &all);
    for d in ["rawvm", "gone"] {
        assert_eq!(state_of(&mnt, d), "shutoff");
        // An external snapshot: a qcow2 overlay over the raw image, which
        // is the snapshot's point, read directly.
        fs::create_dir(mnt.join(d).join("s1")).unwrap();
    }

    // The guest's later writes go to the overlay, not into the view.
    let layers = fs::read(daemon.state.join("rawvm/layers")).unwrap();
    let overlay = vmsnapfs::store::meta::parse_layers(&layers)
        .and_then(|mut l| l.remove("vda"))
        .map(|l| l.path)
        .expect("an active overlay for vda");
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x77 0 2M"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let view = timed("read rawvm/s1/disks/vda", || {
        fs::read(mnt.join("rawvm/s1/disks/vda"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_text()));
    assert_eq!(view.len(), 64 << 20);
    assert!(all_bytes(&view, 0, 1 << 20, 0x5a));
    assert!(all_bytes(&view, 1 << 20, 63 << 20, 0));
    let log = fs::read_to_string(mnt.join("rawvm/.log")).unwrap();
    assert!(!log.contains("view of"), "{log}");

    // A view whose image is gone: the cause reaches `.log`.
    fs::remove_file(&gone).unwrap();
    let r = timed("open gone/s1/disks/vda", || {
        fs::File::open(mnt.join("gone/s1/disks/vda"))
    });
    assert_eq!(errno(r), libc::EIO, "a view of a removed image opened");
    let log = fs::read_to_string(mnt.join("gone/.log")).unwrap();
    assert!(
        log.contains("view of disk vda") && log.contains("No such file or directory"),
        "{log}"
    );
    fuse_calls_answer(&mnt, &all);
    drop(daemon);
}

/// A real QEMU whose only monitor already has a client (as libvirt holds
/// its `monitor.sock`): QEMU accepts further connections into its backlog
/// but greets none of them. Every FUSE call answers at once; the domain
/// is unreachable and busy (QEMU holds its images), never "shut off", and
/// nothing is made. Once the other client leaves, the domain is running.
#[test]
fn a_monitor_held_by_another_client_is_unreachable_and_delays_nothing() {
    let dir = TempDir::new("robust-held");
    let vm = Vm::start(&VmSpec::small("held"), &dir.0.join("images")).expect("start VM");
    vm.write_definition(&dir.0.join("domains")).unwrap();
    // The other client: connected and greeted, it keeps the monitor.
    let holder = UnixStream::connect(&vm.monitor).unwrap();
    let mut greeting = String::new();
    BufReader::new(holder.try_clone().unwrap())
        .read_line(&mut greeting)
        .unwrap();
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    let images_before = files_in(&dir.0.join("images"));

    let t = Instant::now();
    let daemon = Daemon::start(&dir.0, &[]);
    let mount_took = t.elapsed();
    eprintln!("mount with a held monitor: {mount_took:?}");
    assert!(
        mount_took < Duration::from_secs(10),
        "mount took {mount_took:?}"
    );
    let mnt = daemon.mnt.clone();
    fuse_calls_answer(&mnt, &["held"]);
    timed("stat held/.state", || {
        fs::metadata(mnt.join("held/.state")).unwrap()
    });
    // Until the first probe ends, the state says it has not asked yet.
    wait_until("the held monitor's reason", Duration::from_secs(30), || {
        fuse_calls_answer(&mnt, &["held"]);
        let s = state_of(&mnt, "held");
        assert!(s.starts_with("unreachable: "), "{s}");
        s.contains("no greeting") || s.contains("connect timed out")
    });
    let log = fs::read_to_string(mnt.join("held/.log")).unwrap();
    assert!(log.contains("domain is now unreachable: "), "{log}");

    // QEMU holds its images: busy, refused at once, nothing made.
    let r = timed("mkdir held/snap", || {
        fs::create_dir(mnt.join("held").join("snap"))
    });
    assert_eq!(errno(r), libc::EBUSY);
    let log = fs::read_to_string(mnt.join("held/.log")).unwrap();
    assert!(
        log.contains("mkdir \"snap\": refused (EBUSY): the domain is unreachable"),
        "{log}"
    );
    assert_eq!(files_in(&dir.0.join("images")), images_before);
    assert!(image_tags(&vm.disks[0].image).is_empty());
    fuse_calls_answer(&mnt, &["held"]);

    // The other client leaves: the daemon gets the monitor.
    drop(holder);
    wait_until("held running", Duration::from_secs(30), || {
        state_of(&mnt, "held") == "running"
    });
    fs::create_dir(mnt.join("held").join("after")).unwrap();
    assert_eq!(
        fs::read_dir(mnt.join("held/after/disks")).unwrap().count(),
        vm.disks.len()
    );
    fuse_calls_answer(&mnt, &["held"]);
    drop(daemon);
}
