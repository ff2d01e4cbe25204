//! The default `mkdir` of a running libvirt domain (an external
//! checkpoint: RAM and disks) where libvirt's QEMU may not use
//! background-snapshot (it runs unprivileged, and the kernel keeps
//! userfaultfd to privileged processes): RAM is copied live into a
//! migration stream while the guest runs, QEMU stops the guest in
//! `pre-switchover`, the disks switch through libvirt, and the guest
//! resumes once the last pass is written. On a real libvirtd (QEMU 7.2,
//! the system's) and a real FUSE mount. Guest RAM is read and written
//! through `/proc/PID/mem` of libvirt's QEMU (at addresses QEMU's
//! `gpa2hva` gives), its clock by SeaBIOS's tick counter, its disk by
//! patterns written with qemu-io and read back through the tree.
//! Also: a copy made to give up, a failure and a daemon killed while
//! QEMU waits for the switch, each leaving nothing half-made. Skipped,
//! saying so, where libvirtd is not installed.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::libvirtd::*;
use common::*;

const DOM: &str = "lvckpt";
/// Where in guest RAM the test writes and reads (above SeaBIOS's own).
const RAM_AT: u64 = 16 << 20;
/// How much of it.
const RAM_LEN: usize = 8 << 20;

fn log_of(mnt: &Path) -> String {
    fs::read_to_string(mnt.join(DOM).join(".log")).unwrap_or_default()
}

fn must<T>(what: &str, mnt: &Path, r: std::io::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}\n{}", log_of(mnt)))
}

/// `/proc/PID/mem` of libvirt's QEMU for the domain, and the host
/// address of guest-physical [`RAM_AT`] in it.
fn guest_memory(lv: &Libvirtd) -> (fs::File, u64) {
    let pid = fs::read_to_string(format!("/run/libvirt/qemu/{DOM}.pid")).unwrap();
    let out = lv.virsh(&[
        "qemu-monitor-command",
        DOM,
        "--hmp",
        &format!("gpa2hva {RAM_AT:#x}"),
    ]);
    let hva = out
        .rsplit("0x")
        .next()
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| panic!("gpa2hva: {out}"));
    let mem = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{}/mem", pid.trim()))
        .unwrap();
    (mem, hva)
}

/// Guest RAM at [`RAM_AT`], [`RAM_LEN`] bytes.
fn read_ram(lv: &Libvirtd) -> Vec<u8> {
    let (mut mem, at) = guest_memory(lv);
    mem.seek(SeekFrom::Start(at)).unwrap();
    let mut buf = vec![0u8; RAM_LEN];
    mem.read_exact(&mut buf).unwrap();
    buf
}

/// Writes `data` into guest RAM at [`RAM_AT`].
fn write_ram(lv: &Libvirtd, data: &[u8]) {
    let (mut mem, at) = guest_memory(lv);
    mem.seek(SeekFrom::Start(at)).unwrap();
    mem.write_all(data).unwrap();
}

/// [`RAM_LEN`] bytes of a pattern that differs with `seed`.
fn pattern(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..RAM_LEN / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// QEMU's events for the domain while `f` runs (`virsh
/// qemu-monitor-event`), one line each.
fn events_during(lv: &Libvirtd, f: impl FnOnce()) -> Vec<String> {
    let mut ev = Command::new("virsh")
        .args(["-q", "-c", &lv.uri, "qemu-monitor-event"])
        .args(["--domain", DOM, "--loop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = ev.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    // The listener registers before the work starts.
    std::thread::sleep(Duration::from_millis(500));
    f();
    std::thread::sleep(Duration::from_millis(500));
    let _ = ev.kill();
    let _ = ev.wait();
    reader.join().unwrap()
}

/// The guest pause in the events: from the first `STOP` to the `RESUME`
/// after it, in seconds.
fn pause_in(events: &[String]) -> Option<f64> {
    let at = |l: &str| -> Option<f64> { l.split(" at ").nth(1)?.split(' ').next()?.parse().ok() };
    let stop = events.iter().find(|l| l.starts_with("event STOP "))?;
    let resume = events
        .iter()
        .skip_while(|l| !l.starts_with("event STOP "))
        .find(|l| l.starts_with("event RESUME "))?;
    Some(at(resume)? - at(stop)?)
}

/// After a checkpoint `name` that failed at `step`: libvirt's definitions
/// name the active layer, QEMU's migration settings are back and it holds
/// no memory file, and no memory file or overlay of `name` is left (the
/// memory files of c1 and c2 stay).
fn nothing_left_of(lv: &Libvirtd, state: &Path, images: &Path, name: &str, step: &str) {
    lv.definitions_agree(DOM, state, step);
    migration_settings_restored(lv);
    qemu_holds_no_part(step);
    assert_eq!(
        memory_files(images),
        vec![format!("{DOM}.c1.memory"), format!("{DOM}.c2.memory")],
        "{step}: nothing half-made"
    );
    let overlays: Vec<String> = fs::read_dir(images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(name))
        .collect();
    assert!(overlays.is_empty(), "{step}: {overlays:?}");
}

/// Memory files (and their `.part`s) beside the images.
fn memory_files(images: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".memory"))
        .collect();
    v.sort();
    v
}

/// libvirt's QEMU holds no descriptor of a memory file being written
/// (a `.part`, removed or not): none was left behind in it.
fn qemu_holds_no_part(step: &str) {
    let pid = fs::read_to_string(format!("/run/libvirt/qemu/{DOM}.pid")).unwrap();
    let held: Vec<String> = fs::read_dir(format!("/proc/{}/fd", pid.trim()))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.contains(".memory"))
        .collect();
    assert!(held.is_empty(), "{step}: QEMU holds {held:?}");
}

/// QEMU's migration settings as before any checkpoint: no
/// pause-before-switchover, `downtime-limit` at its default.
fn migration_settings_restored(lv: &Libvirtd) {
    let caps = lv.virsh(&[
        "qemu-monitor-command",
        DOM,
        r#"{"execute":"query-migrate-capabilities"}"#,
    ]);
    let caps: serde_json::Value = serde_json::from_str(&caps).unwrap();
    let on: Vec<&str> = caps["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == true)
        .filter_map(|c| c["capability"].as_str())
        .collect();
    assert!(
        !on.contains(&"pause-before-switchover") && !on.contains(&"background-snapshot"),
        "{on:?}"
    );
    let params = lv.virsh(&[
        "qemu-monitor-command",
        DOM,
        r#"{"execute":"query-migrate-parameters"}"#,
    ]);
    let params: serde_json::Value = serde_json::from_str(&params).unwrap();
    assert_eq!(params["return"]["downtime-limit"], 300, "{params}");
}

/// The frozen view of `snap`'s vda, every byte, against its point image
/// read with qemu-img.
fn view_is_image(mnt: &Path, snap: &str, image: &Path) {
    let view = fs::read(mnt.join(DOM).join(snap).join("disks/vda")).unwrap();
    let want = vmsnapfs::demo::vm::read_image(image).unwrap();
    assert!(
        view == want,
        "{snap}: the view differs from {}",
        image.display()
    );
}

#[test]
fn libvirt_default_mkdir_copies_ram_live_and_reverts_to_it() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut t) = LibvirtTest::start("libvirt-ckpt") else {
        return;
    };
    let img: PathBuf = t.lv.define(DOM, &t.images);
    t.lv.virsh(&["start", DOM]);
    let uri = t.lv.uri.clone();
    let mut daemon = Daemon::start_with_args(&t.dir.0, &[], &["--libvirt", &uri]);
    let (mnt, state) = (daemon.mnt.clone(), daemon.state.clone());
    let lv = &t.lv;
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    // A fresh boot counts from the time of day: the guest runs a while
    // first, so the checkpoint's count is told from a later one.
    std::thread::sleep(Duration::from_secs(2));
    let ram = pattern(0x5eed);
    write_ram(lv, &ram);
    lv.guest_write(DOM, 0xb1);

    // The default mkdir of the running domain: a live copy.
    let saved = lv.bios_ticks(DOM);
    let events = events_during(lv, || {
        must("mkdir c1", &mnt, fs::create_dir(mnt.join(DOM).join("c1")));
    });
    let log = log_of(&mnt);
    assert!(log.contains("background-snapshot refused"), "{log}");
    assert!(
        log.contains("RAM copied live into a stream file"),
        "not the live path: {log}"
    );
    assert!(!log.contains("given up"), "{log}");
    // QEMU stopped the guest itself (pause-before-switchover) and resumed
    // once: one short pause, seen in its own events.
    let stops = events
        .iter()
        .filter(|l| l.starts_with("event STOP "))
        .count();
    assert_eq!(stops, 1, "{events:#?}");
    let pause = pause_in(&events).unwrap_or_else(|| panic!("no pause in {events:#?}"));
    eprintln!("guest pause of the live checkpoint (QEMU's events): {pause:.3} s");
    for l in log.lines().filter(|l| l.contains("guest paused")) {
        eprintln!("{l}");
    }
    assert_eq!(lv.state(DOM), "running");
    assert_eq!(state_of(&mnt, DOM), "running");
    assert_eq!(
        fs::read_to_string(mnt.join(DOM).join("c1/state"))
            .unwrap()
            .trim(),
        "running"
    );
    let xml = fs::read_to_string(mnt.join(DOM).join("c1/snapshot.xml")).unwrap();
    assert!(xml.contains("memory-format='stream'"), "{xml}");
    assert_eq!(memory_files(&t.images), vec![format!("{DOM}.c1.memory")]);
    lv.definitions_agree(DOM, &state, "mkdir c1");
    migration_settings_restored(lv);
    qemu_holds_no_part("mkdir c1");
    view_is_image(&mnt, "c1", &img);
    assert!(view_holds(&mnt, &format!("{DOM}/c1/disks/vda"), 0xb1));
    assert_eq!(read_ram(lv), ram, "the live copy changed the guest's RAM");

    // The guest goes on: its disk and RAM change, its clock runs.
    std::thread::sleep(Duration::from_secs(2));
    lv.guest_write(DOM, 0xb2);
    write_ram(lv, &pattern(0xbad));
    let later = lv.bios_ticks(DOM);
    assert!(later > saved + 18, "the guest's clock does not run");
    assert!(view_holds(&mnt, &format!("{DOM}/c1/disks/vda"), 0xb1));

    // The revert loads the memory file through libvirt (virsh restore).
    must(
        "revert c1",
        &mnt,
        fs::write(mnt.join(DOM).join("c1/revert"), "running discard"),
    );
    assert_eq!(lv.state(DOM), "running", "{}", log_of(&mnt));
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    assert!(read_ram(lv) == ram, "RAM is not the checkpoint's");
    let now = lv.bios_ticks(DOM);
    assert!(
        now >= saved && now < later,
        "the guest's clock is not the checkpoint's: ticks {now}, saved at >= {saved}, \
         {later} before the revert"
    );
    assert!(
        lv.guest_reads(DOM, 0xb1),
        "the guest's disk after the revert"
    );
    lv.definitions_agree(DOM, &state, "revert c1");
    view_is_image(&mnt, "c1", &img);

    // A live copy that does not converge is given up before anything
    // changed, and the checkpoint is taken with the guest paused.
    drop(daemon);
    daemon = Daemon::start_with_args(
        &t.dir.0,
        &[("VMSNAPFS_FAILPOINTS", "checkpoint.converging=error")],
        &["--libvirt", &uri],
    );
    let mnt = daemon.mnt.clone();
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    let before_c2 = active_layer_of(&state, DOM);
    lv.guest_write(DOM, 0xb3);
    let ram3 = pattern(0xc3);
    write_ram(lv, &ram3);
    must("mkdir c2", &mnt, fs::create_dir(mnt.join(DOM).join("c2")));
    let log = log_of(&mnt);
    assert!(
        log.contains(
            "live copy of RAM given up (not converged (injected)); RAM saved with the guest paused"
        ),
        "{log}"
    );
    assert_eq!(lv.state(DOM), "running");
    assert_eq!(
        memory_files(&t.images),
        vec![format!("{DOM}.c1.memory"), format!("{DOM}.c2.memory")],
        "nothing half-made"
    );
    lv.definitions_agree(DOM, &state, "mkdir c2");
    migration_settings_restored(lv);
    qemu_holds_no_part("mkdir c2");
    view_is_image(&mnt, "c2", &before_c2);
    assert!(view_holds(&mnt, &format!("{DOM}/c2/disks/vda"), 0xb3));
    assert_eq!(read_ram(lv), ram3);

    // A failure while QEMU waits for the switch: the copy is cancelled,
    // the guest runs on its disks, nothing of the checkpoint is left.
    drop(daemon);
    daemon = Daemon::start_with_args(
        &t.dir.0,
        &[("VMSNAPFS_FAILPOINTS", "checkpoint.pre-switchover=error")],
        &["--libvirt", &uri],
    );
    let mnt = daemon.mnt.clone();
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    let top = active_layer_of(&state, DOM);
    let r = fs::create_dir(mnt.join(DOM).join("c3"));
    assert_eq!(errno(r), libc::EIO, "{}", log_of(&mnt));
    assert_eq!(lv.state(DOM), "running");
    assert_eq!(active_layer_of(&state, DOM), top);
    nothing_left_of(lv, &state, &t.images, "c3", "failed mkdir c3");
    assert!(!mnt.join(DOM).join("c3").exists());
    assert!(lv.guest_reads(DOM, 0xb3));
    assert_eq!(read_ram(lv), ram3);

    // The daemon killed while QEMU waits for the switch, the guest
    // stopped: the next start cancels the copy and the guest runs on its
    // disks, with nothing of the checkpoint left.
    drop(daemon);
    daemon = Daemon::start_with_args(
        &t.dir.0,
        &[("VMSNAPFS_FAILPOINTS", "checkpoint.pre-switchover=crash")],
        &["--libvirt", &uri],
    );
    let mnt = daemon.mnt.clone();
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    assert!(
        fs::create_dir(mnt.join(DOM).join("c4")).is_err(),
        "returned"
    );
    assert!(daemon.wait_exit(Duration::from_secs(60)), "no crash");
    daemon.kill9();
    let m = lv.virsh(&[
        "qemu-monitor-command",
        DOM,
        r#"{"execute":"query-migrate"}"#,
    ]);
    assert!(m.contains("pre-switchover"), "{m}");
    assert_eq!(lv.state(DOM), "paused");
    drop(daemon);
    daemon = Daemon::start_with_args(&t.dir.0, &[], &["--libvirt", &uri]);
    let mnt = daemon.mnt.clone();
    wait_until("running again", Duration::from_secs(60), || {
        log_of(&mnt).contains("live checkpoint interrupted") && state_of(&mnt, DOM) == "running"
    });
    assert_eq!(lv.state(DOM), "running");
    assert!(!mnt.join(DOM).join("c4").exists());
    assert_eq!(active_layer_of(&state, DOM), top);
    nothing_left_of(lv, &state, &t.images, "c4", "interrupted mkdir c4");
    assert!(lv.guest_reads(DOM, 0xb3));
    assert_eq!(read_ram(lv), ram3);
    // And the next checkpoint is a live copy again.
    must("mkdir c5", &mnt, fs::create_dir(mnt.join(DOM).join("c5")));
    let log = log_of(&mnt);
    assert_eq!(
        log.matches("RAM copied live into a stream file").count(),
        2,
        "{log}"
    );
    assert_eq!(lv.state(DOM), "running");
    lv.definitions_agree(DOM, &state, "mkdir c5");
    drop(daemon);
}
