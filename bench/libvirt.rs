//! Snapshots of a libvirt domain through the tree against virsh doing
//! the same on the same domain, in the same run (median of [`ROUNDS`]):
//!
//! - internal checkpoint: `.create` with `<memory snapshot='internal'/>`
//!   against `virsh snapshot-create-as DOM NAME` (libvirt: internal, RAM);
//!   the guest pause of each (QEMU's STOP to RESUME events, read with
//!   `virsh qemu-monitor-event`); goal: never slower than virsh;
//! - the guest pause of the default `mkdir` (an external checkpoint,
//!   QEMU's STOP to RESUME; where it went is printed from `.log`) against
//!   virsh's internal checkpoint; goal: <= 1/10;
//! - revert: `echo running discard > NAME/revert` against `virsh
//!   snapshot-revert DOM NAME` (each its own internal checkpoint);
//! - delete: `rmdir` of the internal checkpoint against `virsh
//!   snapshot-delete DOM NAME`;
//! - revert to an external checkpoint (its memory file loaded through
//!   `virsh restore`) against `virsh restore` of a `virsh save` image of
//!   the same guest (libvirt 9.0 cannot revert to external snapshots;
//!   its restore is the same load without vmsnapfs's destroy, overlays
//!   and checks), and against `virsh destroy` + `virsh restore` of that
//!   image on the running domain (libvirt's nearest sequence: a revert
//!   of a running domain has to stop it first).
//!
//! The guest has [`MIB`] MiB of RAM (TCG, no guest OS, RAM untouched:
//! the RAM written is small; libvirt's and vmsnapfs's saves write the same
//! RAM). Then [`FILL_MIB`] MiB of it are filled with data (written from
//! outside, through `/proc/PID/mem` of libvirt's QEMU), and the guest
//! pause of the default `mkdir` and of virsh's internal checkpoint, and
//! the revert to an external checkpoint against virsh's restore, are
//! measured again on that guest. Run: `cargo bench --bench libvirt`
//! (root, libvirt installed by scripts/install-deps.sh, /dev/fuse).
//!
//! Options (environment): `VMSNAPFS_BENCH_ONLY=PARTS`, a comma list of
//! `internal` (the internal checkpoint's create, pause, revert, delete),
//! `mkdir` (the default mkdir's pause), `revert` (the revert to an
//! external checkpoint; it makes its checkpoints with mkdir) and `filled`
//! (the guest whose RAM holds data): only those parts run;
//! `VMSNAPFS_BENCH_ROUNDS=N` measures N rounds instead of 9;
//! `VMSNAPFS_BENCH_RUST_LOG=trace` has the daemon's log show every QMP
//! message with its time, `VMSNAPFS_BENCH_KEEP_LOG=DIR` keeps that log
//! (and libvirtd's) in DIR; `VMSNAPFS_TEST_LIBVIRTD_DEBUG=1` has libvirtd
//! log its QEMU driver's work, each monitor message timed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::libvirtd::*;
use common::*;

const ROUNDS: usize = 9;

/// The rounds measured ([`ROUNDS`] unless `VMSNAPFS_BENCH_ROUNDS` says).
fn rounds() -> usize {
    std::env::var("VMSNAPFS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(ROUNDS)
}

/// Whether part `part` runs (`VMSNAPFS_BENCH_ONLY` unset: every part).
fn runs(part: &str) -> bool {
    std::env::var("VMSNAPFS_BENCH_ONLY")
        .map(|only| only.split(',').any(|p| p.trim() == part))
        .unwrap_or(true)
}
const MIB: u64 = 1024;
/// How much of the guest's RAM the second part fills with data (from
/// guest-physical 16 MiB on).
const FILL_MIB: u64 = 896;

/// Fills [`FILL_MIB`] MiB of the running domain's RAM, from guest-physical
/// 16 MiB on, with pseudo-random bytes, through `/proc/PID/mem` of
/// libvirt's QEMU at the address QEMU's `gpa2hva` gives.
fn fill_guest_ram(lv: &Libvirtd, dom: &str) {
    use std::io::{Seek, SeekFrom, Write};
    let pid = fs::read_to_string(format!("/run/libvirt/qemu/{dom}.pid")).unwrap();
    let out = lv.virsh(&["qemu-monitor-command", dom, "--hmp", "gpa2hva 0x1000000"]);
    let hva = out
        .rsplit("0x")
        .next()
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| panic!("gpa2hva: {out}"));
    let mut mem = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{}/mem", pid.trim()))
        .unwrap();
    mem.seek(SeekFrom::Start(hva)).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..FILL_MIB {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        mem.write_all(&buf).unwrap();
    }
}

/// Prints the medians of `a` (vmsnapfs) and `b` (virsh) and their
/// ratio, unless either part did not run.
fn row(what: &str, a: Vec<f64>, b: Vec<f64>) {
    if a.is_empty() || b.is_empty() {
        return;
    }
    let (a, b) = (median(a), median(b));
    println!(
        "{what:<40} vmsnapfs {a:>8.3} s   virsh {b:>8.3} s   ratio {:.2}",
        a / b
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Times `f`, returning (seconds, guest pause in seconds from QEMU's
/// STOP and RESUME events during `f`).
fn timed_with_pause(lv: &Libvirtd, dom: &str, f: impl FnOnce()) -> (f64, f64) {
    let mut ev = Command::new("virsh")
        .args([
            "-q",
            "-c",
            &lv.uri,
            "qemu-monitor-event",
            "--domain",
            dom,
            "--loop",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = ev.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut stop: Option<f64> = None;
        let mut paused = 0.0;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let at = |l: &str| -> Option<f64> {
                l.split(" at ").nth(1)?.split(' ').next()?.parse().ok()
            };
            if line.starts_with("event STOP ") {
                stop = at(&line);
            } else if line.starts_with("event RESUME ") {
                if let (Some(s), Some(r)) = (stop.take(), at(&line)) {
                    paused += r - s;
                }
            }
        }
        paused
    });
    // The listener registers before the work starts.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    f();
    let took = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let _ = ev.kill();
    let _ = ev.wait();
    (took, reader.join().unwrap())
}

fn main() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("bench-libvirt");
    let mut perms = fs::metadata(&dir.0).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    fs::set_permissions(&dir.0, perms).unwrap();
    let images = dir.0.join("images");
    fs::create_dir_all(&images).unwrap();
    let _shared = SharedMount::new(&dir.0);
    let Some(mut lv) = Libvirtd::start(&dir.0.join("libvirtd")) else {
        return;
    };
    let dom = "lvbench";
    lv.define_with_memory(dom, &images, MIB);
    lv.virsh(&["start", dom]);
    let level = std::env::var("VMSNAPFS_BENCH_RUST_LOG").unwrap_or_else(|_| "debug".into());
    let daemon = Daemon::start_with_args(
        &dir.0,
        &[("RUST_LOG", level.as_str())],
        &["--libvirt", &lv.uri.clone()],
    );
    let mnt = daemon.mnt.clone();
    let d = mnt.join(dom);
    wait_until("running", Duration::from_secs(60), || {
        fs::read_to_string(d.join(".state"))
            .unwrap_or_default()
            .trim()
            == "running"
    });

    let (mut ours, mut theirs, mut our_pause, mut their_pause) = (vec![], vec![], vec![], vec![]);
    let (mut our_rev, mut their_rev, mut our_del, mut their_del) = (vec![], vec![], vec![], vec![]);
    let n = rounds();
    for i in 0..if runs("internal") { n } else { 0 } {
        let spec = format!(
            "<domainsnapshot><name>v{i}</name><memory snapshot='internal'/></domainsnapshot>"
        );
        let (t, p) = timed_with_pause(&lv, dom, || {
            write_file(&d.join(".create"), spec.as_bytes()).unwrap();
        });
        ours.push(t);
        our_pause.push(p);
        let (t, p) = timed_with_pause(&lv, dom, || {
            lv.virsh(&["snapshot-create-as", dom, &format!("l{i}")]);
        });
        theirs.push(t);
        their_pause.push(p);
        let t = Instant::now();
        fs::write(d.join(format!("v{i}/revert")), "running discard").unwrap();
        our_rev.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        lv.virsh(&["snapshot-revert", dom, &format!("l{i}"), "--running"]);
        their_rev.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        fs::remove_dir(d.join(format!("v{i}"))).unwrap();
        our_del.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        lv.virsh(&["snapshot-delete", dom, &format!("l{i}")]);
        their_del.push(t.elapsed().as_secs_f64());
    }
    // The default mkdir: an external checkpoint, its pause from events.
    let (mut ext_pause, mut ext_took) = (vec![], vec![]);
    for i in 0..if runs("mkdir") || runs("revert") {
        n
    } else {
        0
    } {
        let (t, p) = timed_with_pause(&lv, dom, || {
            fs::create_dir(d.join(format!("e{i}"))).unwrap();
        });
        ext_took.push(t);
        ext_pause.push(p);
    }
    // Revert to each external checkpoint; virsh restores a save image.
    let (mut our_ext, mut their_restore, mut their_cycle) = (vec![], vec![], vec![]);
    let save = dir.0.join("bench.save");
    for i in 0..if runs("revert") { n } else { 0 } {
        let (ours, theirs, cycle) = revert_against_restore(&lv, dom, &d, &format!("e{i}"), &save);
        our_ext.push(ours);
        their_restore.push(theirs);
        their_cycle.push(cycle);
    }
    println!("libvirt domain, {MIB} MiB RAM, median of {n}");
    row("internal checkpoint (create)", ours, theirs);
    row("  its guest pause", our_pause, their_pause.clone());
    row("revert to it (running)", our_rev, their_rev);
    row("delete it", our_del, their_del);
    row(
        "mkdir pause (external) vs virsh internal",
        ext_pause,
        their_pause,
    );
    row(
        "revert to external checkpoint vs restore",
        our_ext.clone(),
        their_restore,
    );
    row("  the same vs destroy + restore", our_ext, their_cycle);
    // The default mkdir's wall time has no peer (libvirt 9.0 takes
    // external checkpoints but can neither revert nor delete them).
    if !ext_took.is_empty() {
        println!(
            "{:<40} vmsnapfs {:>8.3} s",
            "mkdir (external checkpoint), wall",
            median(ext_took)
        );
    }
    // Where the default mkdir's pause went (each one's `.log` line).
    let log = fs::read_to_string(d.join(".log")).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("mkdir \"e") && l.contains("guest paused"))
    {
        println!("  {l}");
    }

    if runs("filled") {
        filled(&lv, dom, &d, &dir.0, n);
    }
    // Where the reverts went (the daemon's debug log): libvirt's destroy,
    // then its restore and what follows it.
    let log = fs::read_to_string(dir.0.join("daemon.log")).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("virsh destroy ") || l.contains(" started QEMU in "))
    {
        println!("  {}", l.rsplit("] ").next().unwrap_or(l));
    }
    drop(daemon);
    if let Ok(keep) = std::env::var("VMSNAPFS_BENCH_KEEP_LOG") {
        let to = std::path::Path::new(&keep).join("daemon-libvirt.log");
        fs::copy(dir.0.join("daemon.log"), &to).unwrap();
        println!("the daemon's log: {}", to.display());
        let to = std::path::Path::new(&keep).join("libvirtd.log");
        if fs::copy(dir.0.join("libvirtd/libvirtd.log"), &to).is_ok() {
            println!("libvirtd's log: {}", to.display());
        }
    }
}

/// The part with [`FILL_MIB`] MiB of the guest's RAM filled: the default
/// mkdir's pause and wall time against virsh's internal checkpoint, and
/// the revert to an external checkpoint against virsh's restore.
fn filled(lv: &Libvirtd, dom: &str, d: &std::path::Path, dir: &std::path::Path, n: usize) {
    // The same guest with most of its RAM holding data: each save writes
    // it all. Each snapshot goes again after it is measured (disk space).
    fill_guest_ram(lv, dom);
    let (mut full_ours, mut full_took, mut full_theirs, mut full_their_took) =
        (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let (t, p) = timed_with_pause(lv, dom, || {
            lv.virsh(&["snapshot-create-as", dom, &format!("f{i}")]);
        });
        full_their_took.push(t);
        full_theirs.push(p);
        lv.virsh(&["snapshot-delete", dom, &format!("f{i}")]);
        let (t, p) = timed_with_pause(lv, dom, || {
            fs::create_dir(d.join(format!("g{i}"))).unwrap();
        });
        full_took.push(t);
        full_ours.push(p);
        fs::remove_dir(d.join(format!("g{i}"))).unwrap();
    }
    println!("the same guest with {FILL_MIB} MiB of its {MIB} MiB RAM filled with data:");
    println!(
        "{:<40} virsh    {:>8.3} s",
        "  snapshot-create-as (internal), wall",
        median(full_their_took)
    );
    row(
        "  mkdir pause (external) vs virsh internal",
        full_ours,
        full_theirs,
    );
    println!(
        "{:<40} vmsnapfs {:>8.3} s",
        "  mkdir (external checkpoint), wall",
        median(full_took)
    );
    let log = fs::read_to_string(d.join(".log")).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("mkdir \"g") && l.contains("guest paused"))
    {
        println!("  {l}");
    }
    // Revert to a checkpoint of the filled guest (its memory file holds
    // the data), against virsh's restore of a save image of it.
    let (mut full_rev, mut full_restore, mut full_cycle) = (vec![], vec![], vec![]);
    let save = dir.join("bench.save");
    for i in 0..n {
        fs::create_dir(d.join(format!("h{i}"))).unwrap();
        let (ours, theirs, cycle) = revert_against_restore(lv, dom, d, &format!("h{i}"), &save);
        full_rev.push(ours);
        full_restore.push(theirs);
        full_cycle.push(cycle);
        fs::remove_dir(d.join(format!("h{i}"))).unwrap();
    }
    row(
        "  revert to external checkpoint vs restore",
        full_rev.clone(),
        full_restore,
    );
    row("    the same vs destroy + restore", full_rev, full_cycle);
}

/// Reverts the running domain to its external checkpoint `name` through
/// the tree, then times `virsh restore` of a `virsh save` image (at
/// `save`, removed afterwards) of the guest it runs, then `virsh destroy`
/// and `virsh restore` of the same image (what libvirt does for a
/// running domain, stopping it first, as a revert must): (ours, virsh's
/// restore, virsh's destroy and restore) in seconds. Returns once
/// vmsnapfs sees the domain running again.
fn revert_against_restore(
    lv: &Libvirtd,
    dom: &str,
    d: &std::path::Path,
    name: &str,
    save: &std::path::Path,
) -> (f64, f64, f64) {
    let t = Instant::now();
    fs::write(d.join(format!("{name}/revert")), "running discard").unwrap();
    let ours = t.elapsed().as_secs_f64();
    lv.virsh(&["save", dom, save.to_str().unwrap()]);
    let t = Instant::now();
    lv.virsh(&["restore", save.to_str().unwrap()]);
    let theirs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    lv.virsh(&["destroy", dom]);
    lv.virsh(&["restore", save.to_str().unwrap()]);
    let theirs_stopping = t.elapsed().as_secs_f64();
    fs::remove_file(save).unwrap();
    wait_until("running", Duration::from_secs(60), || {
        fs::read_to_string(d.join(".state"))
            .unwrap_or_default()
            .trim()
            == "running"
    });
    (ours, theirs, theirs_stopping)
}
