//! Frozen images on a real VM through the mounted tree: what `du` of a
//! view shows, the image locks that keep QEMU from opening a snapshot's
//! frozen image writable, the supported way to start a stopped domain on
//! its active layers, damage reported when a frozen image was written
//! while the daemon was not running, and reverts that keep the state they
//! leave behind.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const M: u64 = 1 << 20;

/// A fixture with a 1 GiB `vda` and the given snapshot policy.
fn big_fixture(tag: &str, policy: &str) -> Fixture {
    let spec = VmSpec {
        name: "vm1".into(),
        disks: vec![("vda".into(), 1024), ("vdb".into(), 32)],
        memory_mb: 128,
        raw: Vec::new(),
    };
    fixture_of(tag, &spec, policy)
}

/// A fixture with the small VM (vda 64 MiB, vdb 32 MiB) and `policy`.
fn fixture(tag: &str, policy: &str) -> Fixture {
    fixture_of(tag, &VmSpec::small("vm1"), policy)
}

fn fixture_of(tag: &str, spec: &VmSpec, policy: &str) -> Fixture {
    let dir = TempDir::new(tag);
    let mut vm = Vm::start(spec, &dir.0.join("images")).expect("start VM");
    vm.policy = Some(policy.into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    Fixture { daemon, vm, dir }
}

/// `du -B1` of a file: the bytes its `st_blocks` says it holds.
fn du(path: &Path) -> u64 {
    let out = Command::new("du").arg("-B1").arg(path).output().unwrap();
    assert!(out.status.success(), "du {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits until `du` of `path` is within [lo, hi] bytes (the allocation is
/// computed in the background; `stat` answers 0 until it is known).
fn wait_du(path: &Path, lo: u64, hi: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = du(path);
        if (lo..=hi).contains(&got) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "du {} = {got}, want {lo}..={hi}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn du_of_a_view_shows_its_allocation() {
    let fx = big_fixture("du", "external");
    // 130 MiB at the start of the disk, 4 MiB in the middle: 134 MiB of
    // a 1 GiB disk.
    fx.vm.qemu_io("vda", "write -P 0x5a 0 130M").unwrap();
    fx.vm.qemu_io("vda", "write -P 0x6b 512M 4M").unwrap();
    fs::create_dir(fx.path("e1")).unwrap();
    let view = fx.path("e1/disks/vda");
    let md = fs::metadata(&view).unwrap();
    assert_eq!(md.len(), 1024 * M, "the size is the virtual size");
    let got = wait_du(&view, 134 * M, 135 * M);
    eprintln!("du of a 1 GiB view holding 134 MiB: {} MiB", got / M);
    // Written after the snapshot: the view keeps its allocation; an
    // internal snapshot in the overlay sees both.
    fx.vm.qemu_io("vda", "write -P 0x7c 700M 10M").unwrap();
    let spec = b"<domainsnapshot><name>i1</name><memory snapshot='no'/><disks>\
        <disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
        </disks></domainsnapshot>";
    write_file(&fx.path(".create"), spec).unwrap();
    wait_du(&fx.path("i1/disks/vda"), 144 * M, 145 * M);
    assert_eq!(du(&view), got);
    // An empty disk's view holds nothing.
    assert_eq!(wait_du(&fx.path("e1/disks/vdb"), 0, 0), 0);
    assert_eq!(fs::metadata(fx.path("e1/disks/vdb")).unwrap().blocks(), 0);
}

/// sha256 of a file (a view, read through the mount).
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// Stops the VM's QEMU the way a user would (`quit` on its monitor).
fn quit(fx: &Fixture) {
    let pid = fx.vm.current_pid();
    let _ = fx
        .vm
        .control()
        .unwrap()
        .execute_raw("quit", serde_json::json!({}));
    if let Some(pid) = pid {
        assert!(vmsnapfs::backend::process::wait_exit(
            pid,
            Duration::from_secs(20)
        ));
    }
    fx.wait_state("shutoff");
}

/// Starts QEMU from the VM's original command line (the definition's
/// images) with `bin` as the emulator; returns its exit status and output
/// when it exits within 20 s, or kills it (by pid) and returns `None`.
fn start_original(fx: &Fixture, bin: &str) -> Option<(bool, String)> {
    let out = Command::new(bin)
        .args(&fx.vm.argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = out.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut child = out;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&o.stderr).into_owned()
                + &String::from_utf8_lossy(&o.stdout);
            return Some((st.success(), text));
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) of the QEMU this test started, by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const QEMU10: &str = "/opt/vmsnapfs/qemu-10/usr/bin/qemu-system-x86_64";

#[test]
fn a_frozen_image_cannot_be_opened_writable_while_the_daemon_runs() {
    let fx = fixture("locks", "external");
    fx.vm.qemu_io("vda", "write -P 0x11 0 8M").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0x12 0 4M").unwrap();
    fs::create_dir(fx.path("s1")).unwrap();
    let before = (
        sha256(&fx.path("s1/disks/vda")),
        sha256(&fx.path("s1/disks/vdb")),
    );
    // The running QEMU keeps the frozen images as backing images.
    fx.vm.qemu_io("vda", "write -P 0x21 0 1M").unwrap();
    let frozen = fs::read_link(fx.path("s1/images/vda")).unwrap();
    assert_eq!(
        frozen, fx.vm.disks[0].image,
        "the definition's image is frozen"
    );
    quit(&fx);

    // The original command line names the frozen images: QEMU 7.2 and
    // 10.0 both refuse to open them writable, with a clear error.
    for bin in ["qemu-system-x86_64", QEMU10] {
        if bin == QEMU10 && !Path::new(QEMU10).exists() {
            continue;
        }
        let (ok, text) = start_original(&fx, bin).expect("QEMU exits at once");
        assert!(!ok, "{bin} started on a frozen image");
        assert!(
            text.contains("Failed to get \"write\" lock") && text.contains("vm1-vda.qcow2"),
            "{bin}: {text}"
        );
    }
    // qemu-img too; reading stays possible.
    let w = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 4k"])
        .arg(&frozen)
        .output()
        .unwrap();
    assert!(!w.status.success());
    let r = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&frozen)
        .output()
        .unwrap();
    assert!(r.status.success(), "a frozen image is readable");
    assert_eq!(
        (
            sha256(&fx.path("s1/disks/vda")),
            sha256(&fx.path("s1/disks/vdb"))
        ),
        before,
        "the snapshot never changed"
    );
    assert_eq!(fx.read(".state").trim(), "shutoff");

    // Once no snapshot names the image, the lock goes: the delete merges
    // the overlay into it (vmsnapfs's own write, with the lock released)
    // and it is the active layer again, writable.
    fs::remove_dir(fx.path("s1")).unwrap();
    assert_eq!(active_layer(&fx, "vda"), frozen, "{}", fx.read(".log"));
    let w = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read 0 4k"])
        .arg(&frozen)
        .output()
        .unwrap();
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
}

#[test]
fn a_stopped_domain_starts_on_its_active_layers() {
    let fx = fixture("start", "external");
    fx.vm.qemu_io("vda", "write -P 0x11 0 4M").unwrap();
    fs::create_dir(fx.path("s1")).unwrap();
    let before = sha256(&fx.path("s1/disks/vda"));
    fx.vm.qemu_io("vda", "write -P 0x22 1M 1M").unwrap();
    let overlay = active_layer(&fx, "vda");
    assert_ne!(overlay, fx.vm.disks[0].image);
    // Refused while the domain runs, and for unknown words.
    assert_eq!(write_file(&fx.path(".start"), b"running"), Err(libc::EBUSY));
    quit(&fx);
    assert_eq!(write_file(&fx.path(".start"), b"now"), Err(libc::EINVAL));
    assert!(fx.read(".log").contains("unknown start request"));

    // The corrected command line, for scripts: the overlays, not the
    // definition's images.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let l = fx.read(".commandline");
        if l.contains(&*overlay.to_string_lossy()) {
            break l;
        }
        assert!(Instant::now() < deadline, ".commandline is {l:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !line.contains(&format!("file={},", fx.vm.disks[0].image.display())),
        "{line}"
    );
    let mode = fs::metadata(fx.path(".commandline")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o400, "command lines may hold secrets");

    // The supported start: the guest sees what it wrote last.
    write_file(&fx.path(".start"), b"running\n").unwrap();
    fx.wait_state("running");
    let now = fx.vm.read_disk("vda").unwrap();
    assert_eq!(now[M as usize], 0x22, "booted on the overlay");
    assert_eq!(now[0], 0x11);
    assert!(fx.read(".log").contains("started on the active layers"));
    fx.vm.qemu_io("vda", "write -P 0x33 2M 1M").unwrap();
    quit(&fx);

    // A script running .commandline starts on the overlays too.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{} -daemonize", line.trim()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fx.wait_state("running");
    let now = fx.vm.read_disk("vda").unwrap();
    assert_eq!(now[2 * M as usize], 0x33);
    quit(&fx);
    assert_eq!(sha256(&fx.path("s1/disks/vda")), before);
}

#[test]
fn a_write_to_a_frozen_image_while_the_daemon_is_stopped_is_reported() {
    let mut fx = fixture("damage", "external-disk-only");
    fx.vm.qemu_io("vda", "write -P 0x11 0 4M").unwrap();
    fs::create_dir(fx.path("s1")).unwrap();
    let before = sha256(&fx.path("s1/disks/vda"));
    quit(&fx);
    assert!(!fx.read(".state").contains("damaged"));
    assert!(!fx.read("s1/state").contains("damaged"));
    fx.daemon.stop();

    // Without the daemon nothing holds the locks: the original command
    // line opens the frozen image and the guest writes to it.
    fx.vm.launch().expect("QEMU starts on the frozen image");
    fx.vm.qemu_io("vda", "write -P 0x44 0 1M").unwrap();
    let pid = fx.vm.current_pid();
    let _ = fx
        .vm
        .control()
        .unwrap()
        .execute_raw("quit", serde_json::json!({}));
    if let Some(pid) = pid {
        vmsnapfs::backend::process::wait_exit(pid, Duration::from_secs(20));
    }

    fx.daemon = Daemon::start(&fx.dir.0, &[]);
    assert_ne!(
        sha256(&fx.path("s1/disks/vda")),
        before,
        "the snapshot did change"
    );
    let log = fx.read(".log");
    assert!(
        log.contains("snapshot \"s1\" is damaged")
            && log.contains("written after the snapshot was taken"),
        "{log}"
    );
    let state = fx.read(".state");
    assert_eq!(state.lines().next(), Some("shutoff"));
    assert!(
        state.contains("damaged: snapshot \"s1\" disk vda"),
        "{state}"
    );
    let s1 = fx.read("s1/state");
    assert!(
        s1.starts_with("disk-snapshot\n") && s1.contains("damaged: disk vda"),
        "{s1}"
    );
    assert!(!s1.contains("disk vdb"), "vdb was not written: {s1}");
    // Still reported after another restart: the record is kept.
    fx.restart_daemon(&[]);
    assert!(fx
        .read(".state")
        .contains("damaged: snapshot \"s1\" disk vda"));
}

/// The names of the `left-*` snapshots.
fn lefts(fx: &Fixture) -> Vec<String> {
    fx.ls()
        .into_iter()
        .filter(|n| n.starts_with("left-"))
        .collect()
}

/// The first `len` bytes of a view, read through the mount.
fn view_head(fx: &Fixture, rel: &str, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; len];
    fs::File::open(fx.path(rel))
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

#[test]
fn an_internal_revert_keeps_the_state_it_leaves_behind() {
    let fx = fixture("left", "internal");
    let mb = M as usize;
    fx.vm.qemu_io("vda", "write -P 0x31 0 1M").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0x31 0 1M").unwrap();
    fs::create_dir(fx.path("cp")).unwrap();
    assert_eq!(fx.read("cp/state"), "running\n");
    // The guest writes after the checkpoint ...
    fx.vm.qemu_io("vda", "write -P 0x32 0 1M").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0x33 0 1M").unwrap();
    // ... and the running VM goes back to it, without force.
    fx.revert("cp", "running").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, mb, 0x31));
    // Those writes are kept in a left-* checkpoint, readable and revertible.
    let left = lefts(&fx);
    assert_eq!(left.len(), 1, "{:?}", fx.ls());
    let l1 = &left[0];
    assert_eq!(fx.read(&format!("{l1}/state")), "running\n");
    assert!(all_bytes(
        &view_head(&fx, &format!("{l1}/disks/vda"), mb),
        0,
        mb,
        0x32
    ));
    assert!(all_bytes(
        &view_head(&fx, &format!("{l1}/disks/vdb"), mb),
        0,
        mb,
        0x33
    ));
    let log = fx.read(".log");
    assert!(
        log.contains(&format!("the state left behind is snapshot {l1:?}")),
        "{log}"
    );
    assert!(fx
        .read(&format!("{l1}/snapshot.xml"))
        .contains("the state left behind by the revert to"));
    fx.revert(l1, "running discard").unwrap();
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, mb, 0x32));
    assert_eq!(lefts(&fx).len(), 1, "discard keeps nothing");
    assert!(fx
        .read(".log")
        .contains("the state left behind was discarded"));

    // Stopping needs force, and keeps the live state too.
    assert_eq!(fx.revert("cp", "shutoff"), Err(libc::EPERM));
    assert_eq!(lefts(&fx).len(), 1, "a refused revert keeps nothing");
    fx.revert("cp", "shutoff force").unwrap();
    assert_eq!(fx.read(".state"), "shutoff\n");
    let after_stop = lefts(&fx);
    assert_eq!(after_stop.len(), 2);
    let l2 = after_stop.iter().find(|n| *n != l1).unwrap().clone();
    assert!(all_bytes(
        &view_head(&fx, &format!("{l2}/disks/vda"), mb),
        0,
        mb,
        0x32
    ));

    // Offline: writes to the stopped disks are kept by the next revert.
    let st = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x34 0 1M"])
        .arg(&fx.vm.disks[0].image)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    fx.revert("cp", "shutoff").unwrap();
    let l3: Vec<String> = lefts(&fx)
        .into_iter()
        .filter(|n| !after_stop.contains(n))
        .collect();
    assert_eq!(l3.len(), 1);
    assert_eq!(fx.read(&format!("{}/state", l3[0])), "shutoff\n");
    assert!(all_bytes(
        &view_head(&fx, &format!("{}/disks/vda", l3[0]), mb),
        0,
        mb,
        0x34
    ));
    assert!(all_bytes(
        &vmsnapfs::demo::vm::read_image(&fx.vm.disks[0].image).unwrap(),
        0,
        mb,
        0x31
    ));
}
