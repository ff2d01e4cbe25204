//! Checkpoints with RAM on each installed QEMU version, side by side in
//! one run (QEMU 7.2 from PATH, QEMU 10.0 from its prefix), each printed
//! with its peer:
//!
//! 1. Guest pause (QMP `STOP` to `RESUME` on a second monitor) of `mkdir`
//!    on a running VM with 1 GiB of RAM, 900 MiB of it dirty (goal: at
//!    most 30 ms), and the time until `mkdir` returns (goal: 1.5 s, i.e.
//!    1 GB/s of RAM written), against the bare QMP background snapshot at
//!    QEMU's default `max-bandwidth` (what vmsnapfs did before).
//! 2. Revert of the running VM to that checkpoint (a new QEMU loads the
//!    memory file), against the same revert on QEMU 7.2 (goal: twice as
//!    fast); once right after the checkpoint, once with the memory file
//!    dropped from the page cache (`posix_fadvise(DONTNEED)` on that file
//!    before each revert), as after a reboot or a long while.
//! 3. Checkpoint and revert of a paused guest (QEMU 10.0: RAM at fixed
//!    offsets, written and read by several threads).
//! 4. A real Linux guest (tests/common/guest.rs: 192 MiB, TCG) that
//!    dirties RAM the whole time (a loop rewriting 12 MiB files in its
//!    initramfs) and syncs files on its disk: guest pause and time until
//!    `mkdir` returns, and how each checkpoint wrote RAM (the background
//!    snapshot chosen for the guest's dirty rate, a live copy that
//!    converged, or one given up for the background snapshot); where the
//!    dirty rate chooses, again with the live copy forced (its
//!    measurement failed by injection), as vmsnapfs did before.
//!
//! `VMSNAPFS_BENCH_ONLY=revert` runs the running guest's checkpoints and
//! reverts only, `VMSNAPFS_BENCH_ONLY=dirty` part 4 only;
//! `VMSNAPFS_BENCH_KEEP_LOG=DIR` keeps each daemon's log in DIR and
//! `VMSNAPFS_BENCH_RUST_LOG=trace` has it show every QMP message with its
//! time (where a revert's time goes).
//!
//! Run: `cargo bench --bench versions` (root, /dev/fuse, both QEMUs
//! installed by scripts/install-deps.sh).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const RAM_MB: u64 = 1024;
const DIRTY_MB: u64 = 900;
const REPS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn event_time(e: &Value) -> Duration {
    let ts = &e["timestamp"];
    Duration::from_secs(ts["seconds"].as_u64().unwrap_or(0))
        + Duration::from_micros(ts["microseconds"].as_u64().unwrap_or(0))
}

/// The guest pause `op` caused, seen by a second monitor: from the first
/// STOP to the RESUME after it (`None` when the guest did not stop).
fn guest_pause(vm: &Vm, op: impl FnOnce()) -> Option<Duration> {
    let mut q = vm.control().unwrap();
    q.take_events();
    op();
    q.execute_raw("query-status", json!({})).unwrap();
    let events = q.take_events();
    let stop = events.iter().find(|e| e["event"] == "STOP")?;
    let resume = events.iter().rev().find(|e| e["event"] == "RESUME")?;
    Some(event_time(resume) - event_time(stop))
}

/// `qemu-system-x86_64` of version `prefix` (PATH, then the QEMU 10 prefix).
fn qemu_binary(prefix: &str) -> Option<PathBuf> {
    let q10 = std::env::var("VMSNAPFS_QEMU10").unwrap_or_else(|_| "/opt/vmsnapfs/qemu-10".into());
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain([Path::new(&q10).join("usr/bin")])
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|bin| {
            Command::new(bin).arg("--version").output().is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout).contains(&format!("version {prefix}"))
            })
        })
}

fn fixture(tag: &str, qemu: &Path) -> Fixture {
    let dir = TempDir::new(tag);
    let mut spec = VmSpec::small("vm1");
    spec.memory_mb = RAM_MB;
    let mut vm =
        Vm::start_with_qemu(&spec, &dir.0.join("images"), &qemu.to_string_lossy()).unwrap();
    vm.policy = Some("external".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    // VMSNAPFS_BENCH_RUST_LOG=trace shows each QMP message with its time.
    let level = std::env::var("VMSNAPFS_BENCH_RUST_LOG").unwrap_or_else(|_| "debug".into());
    let daemon = Daemon::start(&dir.0, &[("RUST_LOG", level.as_str())]);
    Fixture { daemon, vm, dir }
}

fn wait_state(fx: &Fixture, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while fx.read(".state").lines().next() != Some(want) {
        assert!(Instant::now() < deadline, "never {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one QEMU version gives.
struct Figures {
    version: String,
    pause: Duration,
    mkdir: Duration,
    bare_default_bw: Duration,
    bare_pause: Duration,
    revert: Duration,
    cold_revert: Duration,
    format: String,
    paused_mkdir: Duration,
    paused_revert: Duration,
    paused_format: String,
}

/// The bare background snapshot vmsnapfs used to take: stop, migrate
/// with background-snapshot at QEMU's default max-bandwidth, wait.
fn bare_background_snapshot(vm: &Vm, file: &Path) -> (Duration, Duration) {
    let mut q = vm.control().unwrap();
    q.execute_raw(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    )
    .unwrap();
    q.take_events();
    let t = Instant::now();
    q.execute_raw("stop", json!({})).unwrap();
    q.execute_raw(
        "migrate",
        json!({"uri": format!("exec:cat > {}", file.display())}),
    )
    .unwrap();
    let mut resumed = false;
    loop {
        let m = q.execute_raw("query-migrate", json!({})).unwrap();
        let ram = &m["ram"];
        let pages = ram["normal"].as_u64().unwrap_or(0) + ram["duplicate"].as_u64().unwrap_or(0);
        if !resumed && (pages > 0 || m["status"] == "completed") {
            let st = q.execute_raw("query-status", json!({})).unwrap();
            if st["status"] == "paused" {
                q.execute_raw("cont", json!({})).unwrap();
            }
            resumed = true;
        }
        if m["status"] == "completed" {
            break;
        }
        assert_ne!(m["status"], "failed", "{m}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall = t.elapsed();
    q.execute_raw(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": false}]}),
    )
    .unwrap();
    q.execute_raw("query-status", json!({})).unwrap();
    let events = q.take_events();
    let stop = events.iter().find(|e| e["event"] == "STOP").unwrap();
    let resume = events
        .iter()
        .rev()
        .find(|e| e["event"] == "RESUME")
        .unwrap();
    let _ = fs::remove_file(file);
    (wall, event_time(resume) - event_time(stop))
}

/// The `memory-format` a snapshot.xml records.
fn memory_format(xml: &str) -> String {
    xml.split("memory-format='")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .unwrap_or("?")
        .to_owned()
}

/// Drops `file`'s pages from the page cache (it is synced: they are clean).
fn drop_from_page_cache(file: &Path) {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(file).unwrap();
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

fn measure(qemu: &Path) -> Figures {
    let fx = fixture("bench-versions", qemu);
    let version = {
        let mut q = fx.vm.control().unwrap();
        let v = q.execute_raw("query-version", json!({})).unwrap();
        format!(
            "{}.{}.{}",
            v["qemu"]["major"], v["qemu"]["minor"], v["qemu"]["micro"]
        )
    };
    fx.vm.fill_ram(DIRTY_MB).unwrap();

    // VMSNAPFS_BENCH_ONLY=revert: the running guest's checkpoints and
    // reverts only (no bare peer, no paused guest).
    let only_revert = std::env::var("VMSNAPFS_BENCH_ONLY").is_ok_and(|v| v == "revert");
    let (mut bare, mut bare_pause) = (vec![Duration::ZERO], vec![Duration::ZERO]);
    for _ in 0..if only_revert { 0 } else { 2 } {
        let (w, p) = bare_background_snapshot(&fx.vm, &fx.dir.0.join("bare.mem"));
        bare.push(w);
        bare_pause.push(p);
    }

    let (mut pause, mut mkdir) = (vec![], vec![]);
    for i in 0..REPS {
        let mut wall = Duration::ZERO;
        let p = guest_pause(&fx.vm, || {
            let t = Instant::now();
            fs::create_dir(fx.path(&format!("c{i}"))).unwrap();
            wall = t.elapsed();
        });
        pause.push(p.expect("the checkpoint stopped the guest"));
        mkdir.push(wall);
    }
    let log = fx.read(".log");
    assert!(!log.contains("refused"), "{log}");

    let mut revert = vec![];
    for _ in 0..REPS {
        let t = Instant::now();
        fx.revert("c0", "running discard").unwrap();
        revert.push(t.elapsed());
    }
    wait_state(&fx, "running");
    let mut cold_revert = vec![];
    for _ in 0..REPS {
        drop_from_page_cache(&fx.vm.dir.join("vm1.c0.memory"));
        let t = Instant::now();
        fx.revert("c0", "running discard").unwrap();
        cold_revert.push(t.elapsed());
    }
    wait_state(&fx, "running");
    let format = memory_format(&fx.read("c0/snapshot.xml"));
    if let Ok(keep) = std::env::var("VMSNAPFS_BENCH_KEEP_LOG") {
        let to = Path::new(&keep).join(format!("daemon-{version}.log"));
        fs::copy(fx.dir.0.join("daemon.log"), &to).unwrap();
        println!("daemon log of QEMU {version}: {}", to.display());
    }
    if only_revert {
        return Figures {
            version,
            pause: median(pause),
            mkdir: median(mkdir),
            bare_default_bw: median(bare),
            bare_pause: median(bare_pause),
            revert: median(revert),
            cold_revert: median(cold_revert),
            format,
            paused_mkdir: Duration::ZERO,
            paused_revert: Duration::ZERO,
            paused_format: String::new(),
        };
    }

    // A paused guest: the fastest memory file this QEMU can write.
    fx.vm
        .control()
        .unwrap()
        .execute_raw("stop", json!({}))
        .unwrap();
    wait_state(&fx, "paused");
    let (mut paused_mkdir, mut paused_revert) = (vec![], vec![]);
    for i in 0..REPS {
        let t = Instant::now();
        fs::create_dir(fx.path(&format!("p{i}"))).unwrap();
        paused_mkdir.push(t.elapsed());
        // QEMU 7.2 keeps the disks inactive after the save until the
        // guest runs: resume and pause it between checkpoints.
        let mut q = fx.vm.control().unwrap();
        q.execute_raw("cont", json!({})).unwrap();
        q.execute_raw("stop", json!({})).unwrap();
    }
    let paused_format = memory_format(&fx.read("p0/snapshot.xml"));
    for _ in 0..REPS {
        let t = Instant::now();
        fx.revert("p0", "paused discard").unwrap();
        paused_revert.push(t.elapsed());
    }
    Figures {
        version,
        pause: median(pause),
        mkdir: median(mkdir),
        bare_default_bw: median(bare),
        bare_pause: median(bare_pause),
        revert: median(revert),
        cold_revert: median(cold_revert),
        format,
        paused_mkdir: median(paused_mkdir),
        paused_revert: median(paused_revert),
        paused_format,
    }
}

/// What a guest that dirties RAM gives on one QEMU version.
struct DirtyFigures {
    version: String,
    /// "as chosen", or "live copy forced" (the dirty rate not measured:
    /// what vmsnapfs did before it chose).
    how: &'static str,
    rate: f64,
    pause: Vec<Duration>,
    mkdir: Vec<Duration>,
    /// The dirty rates QEMU measured before each checkpoint (MiB/s).
    measured: Vec<String>,
    chosen_background: usize,
    live: usize,
    given_up: usize,
}

/// Part 4 on `qemu`; `forced_live`: the dirty rate's measurement fails
/// by injection, so that the live copy is taken as before the choice.
fn measure_dirty(qemu: &Path, forced_live: bool) -> DirtyFigures {
    use common::guest::RealGuest;
    let env: &[(&str, &str)] = if forced_live {
        &[("VMSNAPFS_FAILPOINTS", "checkpoint.dirty-rate=error")]
    } else {
        &[]
    };
    let rg = RealGuest::start_with("bench-dirty", "external", env, &qemu.to_string_lossy());
    let version = {
        let v = rg.qmp().execute_raw("query-version", json!({})).unwrap();
        format!(
            "{}.{}.{}",
            v["qemu"]["major"], v["qemu"]["minor"], v["qemu"]["micro"]
        )
    };
    rg.guest.wait_wrote(3, Duration::from_secs(180));
    let rate = rg.guest.dirty_ram(12);
    let (mut pause, mut mkdir, mut measured) = (vec![], vec![], vec![]);
    for i in 0..REPS {
        if forced_live {
            // The rate the daemon would have measured, measured here.
            measured.push(dirty_rate(&rg));
        }
        let mut wall = Duration::ZERO;
        let p = guest_pause(&rg.vm, || {
            let t = Instant::now();
            fs::create_dir(rg.path(&format!("d{i}"))).unwrap();
            wall = t.elapsed();
        });
        pause.push(p.expect("the checkpoint stopped the guest"));
        mkdir.push(wall);
    }
    let log = rg.read(".log");
    if let Ok(keep) = std::env::var("VMSNAPFS_BENCH_KEEP_LOG") {
        let to = Path::new(&keep).join(format!(
            "daemon-dirty-{version}{}.log",
            if forced_live { "-forced" } else { "" }
        ));
        fs::copy(rg.dir.0.join("daemon.log"), &to).unwrap();
    }
    rg.guest.check_dirtier();
    measured.extend(
        log.split("the guest dirties ")
            .skip(1)
            .filter_map(|r| r.split(' ').next().map(str::to_owned)),
    );
    DirtyFigures {
        version,
        how: if forced_live {
            "live copy forced"
        } else {
            "as chosen"
        },
        rate,
        pause,
        mkdir,
        measured,
        chosen_background: log.matches("background snapshot chosen").count(),
        live: log.matches("RAM copied live").count(),
        given_up: log.matches("live copy of RAM given up").count(),
    }
}

/// The guest's dirty rate as vmsnapfs measures it (`calc-dirty-rate`,
/// the same parameters), from the test's own monitor, in MiB/s.
fn dirty_rate(rg: &common::guest::RealGuest) -> String {
    use vmsnapfs::backend::ram_way::{MEASURE_MS, SAMPLE_PAGES};
    let mut q = rg.qmp();
    q.execute_raw(
        "calc-dirty-rate",
        json!({"calc-time": MEASURE_MS, "calc-time-unit": "millisecond",
               "sample-pages": SAMPLE_PAGES}),
    )
    .unwrap();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let r = q
            .execute_raw("query-dirty-rate", json!({"calc-time-unit": "millisecond"}))
            .unwrap();
        if r["status"] == "measured" {
            return r["dirty-rate"].to_string();
        }
    }
}

fn main() {
    let only = std::env::var("VMSNAPFS_BENCH_ONLY").unwrap_or_default();
    let mut all = vec![];
    let mut dirty = vec![];
    for prefix in ["7.2", "10."] {
        match qemu_binary(prefix) {
            Some(q) => {
                if only != "dirty" {
                    all.push(measure(&q));
                }
                if only.is_empty() || only == "dirty" {
                    let d = measure_dirty(&q, false);
                    // Where the dirty rate chose, the live copy forced too.
                    let chose = !d.measured.is_empty();
                    dirty.push(d);
                    if chose {
                        dirty.push(measure_dirty(&q, true));
                    }
                }
            }
            None => println!("QEMU {prefix}x not installed: skipped (scripts/install-deps.sh)"),
        }
    }
    for d in &dirty {
        let list = |v: &[Duration], f: &dyn Fn(Duration) -> String| {
            v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(" / ")
        };
        println!(
            "QEMU {} ({}): mkdir of a real guest (192 MiB, TCG) dirtying RAM at {:.0} MiB/s \
             (QEMU measured {} MiB/s): guest paused {} ms, mkdir returns after {} s; {} \
             background snapshot{} chosen, {} live cop{} converged, {} given up for the \
             background snapshot",
            d.version,
            d.how,
            d.rate,
            if d.measured.is_empty() {
                "-".to_owned()
            } else {
                d.measured.join(" / ")
            },
            list(&d.pause, &|x| format!("{:.1}", ms(x))),
            list(&d.mkdir, &|x| format!("{:.2}", x.as_secs_f64())),
            d.chosen_background,
            if d.chosen_background == 1 { "" } else { "s" },
            d.live,
            if d.live == 1 { "y" } else { "ies" },
            d.given_up,
        );
    }
    let gb = (DIRTY_MB as f64) * 1.048576 / 1000.0;
    for f in &all {
        println!(
            "QEMU {}: mkdir of a running VM, {RAM_MB} MiB RAM ({DIRTY_MB} MiB dirty): guest paused \
             {:.1} ms (goal <= 30 ms: {}), mkdir returns after {:.2} s ({:.2} GB/s of dirty RAM; \
             goal <= 1.5 s: {}); bare background snapshot at QEMU's default max-bandwidth \
             {:.2} s (pause {:.1} ms), {:.1}x slower",
            f.version,
            ms(f.pause),
            if ms(f.pause) <= 30.0 { "met" } else { "NOT met" },
            f.mkdir.as_secs_f64(),
            gb / f.mkdir.as_secs_f64(),
            if f.mkdir.as_secs_f64() <= 1.5 {
                "met"
            } else {
                "NOT met"
            },
            f.bare_default_bw.as_secs_f64(),
            ms(f.bare_pause),
            f.bare_default_bw.as_secs_f64() / f.mkdir.as_secs_f64(),
        );
        println!(
            "QEMU {}: revert of the running VM to that checkpoint ({} memory file) {:.2} s, \
             {:.2} s with the file out of the page cache; paused guest: \
             mkdir {:.2} s ({} memory file), revert {:.2} s",
            f.version,
            f.format,
            f.revert.as_secs_f64(),
            f.cold_revert.as_secs_f64(),
            f.paused_mkdir.as_secs_f64(),
            f.paused_format,
            f.paused_revert.as_secs_f64(),
        );
    }
    if let [old, new] = &all[..] {
        let r = old.revert.as_secs_f64() / new.revert.as_secs_f64();
        println!(
            "revert with RAM: QEMU {} {:.2} s vs QEMU {} {:.2} s: {:.2}x faster (goal >= 2x): {}; \
             paused guest: {:.2} s vs {:.2} s ({:.2}x)",
            new.version,
            new.revert.as_secs_f64(),
            old.version,
            old.revert.as_secs_f64(),
            r,
            if r >= 2.0 { "met" } else { "NOT met" },
            new.paused_revert.as_secs_f64(),
            old.paused_revert.as_secs_f64(),
            old.paused_revert.as_secs_f64() / new.paused_revert.as_secs_f64(),
        );
        let c = old.cold_revert.as_secs_f64() / new.cold_revert.as_secs_f64();
        println!(
            "revert with RAM, memory file out of the page cache: QEMU {} {:.2} s vs QEMU {} \
             {:.2} s: {:.2}x faster (goal >= 2x): {}; mkdir: {:.2} s vs {:.2} s ({:.2}x), \
             guest pause {:.1} ms vs {:.1} ms",
            new.version,
            new.cold_revert.as_secs_f64(),
            old.version,
            old.cold_revert.as_secs_f64(),
            c,
            if c >= 2.0 { "met" } else { "NOT met" },
            new.mkdir.as_secs_f64(),
            old.mkdir.as_secs_f64(),
            old.mkdir.as_secs_f64() / new.mkdir.as_secs_f64(),
            ms(new.pause),
            ms(old.pause),
        );
    }
}
