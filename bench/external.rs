//! Benchmarks of external snapshots, each printed with a ratio against a
//! peer measured in the same run:
//!
//! 1. Guest pause (QMP `STOP` to `RESUME`, from the events' timestamps)
//!    of `mkdir` on a running VM with 1 GiB of RAM, ~900 MiB of it dirty,
//!    under the `external` policy (background-snapshot; goal <= 30 ms)
//!    versus an internal checkpoint of the same VM (~3-4 s).
//! 2. `mkdir` of an external disk-only snapshot of 2 disks, end to end
//!    (goal <= 20 ms), versus the bare QMP `transaction` of
//!    `blockdev-snapshot-sync` for the same 2 disks.
//!
//! 3. Revert of a running VM to an external disk-only snapshot (new
//!    overlays switched in the same QEMU), wall time and guest pause,
//!    versus stopping QEMU, making the overlay and starting it again
//!    (goal: >= 5x faster).
//! 4. rmdir of an external snapshot with 500 MiB of delta versus the bare
//!    block-commit of the same chain (goal: ratio <= 1.1).
//!
//! Run: `cargo bench --bench external` (root, QEMU 7.2, /dev/fuse).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const REPS: usize = 5;

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

/// Runs `op` and returns the guest pause it caused, seen by a second
/// monitor: from the first STOP to the RESUME after it.
fn guest_pause(vm: &Vm, op: impl FnOnce()) -> Duration {
    let mut q = vm.control().unwrap();
    q.take_events();
    op();
    q.execute_raw("query-status", json!({})).unwrap();
    let events = q.take_events();
    let stop = events
        .iter()
        .find(|e| e["event"] == "STOP")
        .expect("a STOP event");
    let resume = events
        .iter()
        .rev()
        .find(|e| e["event"] == "RESUME")
        .expect("a RESUME event");
    event_time(resume) - event_time(stop)
}

fn policy_fixture(tag: &str, policy: &str, ram_mb: u64) -> Fixture {
    let dir = TempDir::new(tag);
    let mut spec = VmSpec::small("vm1");
    spec.memory_mb = ram_mb;
    let vm = Vm::start(&spec, &dir.0.join("images")).expect("start VM");
    let def = vm.write_definition(&dir.0.join("domains")).unwrap();
    let xml = fs::read_to_string(&def).unwrap().replace(
        "</domain>",
        &format!("  <snapshot policy='{policy}'/>\n</domain>"),
    );
    fs::write(&def, xml).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    Fixture { daemon, vm, dir }
}

fn pause_bench() {
    let fx = policy_fixture("bench-pause", "external", 1024);
    fx.vm.fill_ram(900).unwrap();
    let (mut ext, mut ext_wall, mut int) = (vec![], vec![], vec![]);
    for i in 0..REPS {
        let mut wall = Duration::ZERO;
        ext.push(guest_pause(&fx.vm, || {
            let t = Instant::now();
            fs::create_dir(fx.path(&format!("e{i}"))).unwrap();
            wall = t.elapsed();
        }));
        ext_wall.push(wall);
        if i < 3 {
            let spec = format!(
                "<domainsnapshot><name>i{i}</name><memory snapshot='internal'/>\
                 </domainsnapshot>"
            );
            // Internal checkpoints need internal disks: the active overlays are qcow2.
            int.push(guest_pause(&fx.vm, || {
                write_file(&fx.path(".create"), spec.as_bytes()).unwrap()
            }));
        }
    }
    if std::env::var("VMSNAPFS_BENCH_VERBOSE").is_ok() {
        for l in fx
            .daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("checkpoint:"))
        {
            eprintln!("{l}");
        }
    }
    let log = fx.read(".log");
    assert!(
        !log.contains("background-snapshot refused"),
        "the live path was not taken:\n{log}"
    );
    let (e, w, n) = (median(ext), median(ext_wall), median(int));
    println!(
        "guest pause, 1 GiB RAM (900 MiB dirty): external checkpoint (mkdir) {:.1} ms \
         (mkdir returns after {:.0} ms, RAM written while the guest runs); \
         internal checkpoint {:.0} ms; ratio internal/external {:.0}x; goal <= 30 ms: {}",
        ms(e),
        ms(w),
        ms(n),
        n.as_secs_f64() / e.as_secs_f64(),
        if ms(e) <= 30.0 { "met" } else { "NOT met" }
    );
}

/// The node names of the disks' active layers, from the control socket.
fn active_nodes(vm: &Vm) -> Vec<String> {
    let mut q = vm.control().unwrap();
    let blocks = q.execute_raw("query-block", json!({})).unwrap();
    vm.disks
        .iter()
        .map(|d| {
            let qdev = format!("/machine/peripheral/{}/virtio-backend", d.device);
            blocks
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["qdev"] == qdev.as_str())
                .and_then(|b| b["inserted"]["node-name"].as_str())
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn disk_only_bench() {
    let fx = policy_fixture("bench-xdisks", "external-disk-only", 256);
    fx.vm.qemu_io("vda", "write -P 0xab 0 8M").unwrap();
    let images = fx.vm.disks[0].image.parent().unwrap().to_owned();
    let (mut tree, mut bare) = (vec![], vec![]);
    for i in 0..REPS * 2 {
        let nodes = active_nodes(&fx.vm);
        let actions: Vec<Value> = nodes
            .iter()
            .enumerate()
            .map(|(k, n)| {
                json!({"type": "blockdev-snapshot-sync", "data": {"node-name": n,
                    "snapshot-file": images.join(format!("bare{i}-{k}.qcow2")),
                    "snapshot-node-name": format!("bare{i}-{k}"),
                    "format": "qcow2", "mode": "absolute-paths"}})
            })
            .collect();
        let mut q = fx.vm.control().unwrap();
        let t = Instant::now();
        q.execute_raw("transaction", json!({ "actions": actions }))
            .unwrap();
        bare.push(t.elapsed());
        drop(q);
        let t = Instant::now();
        fs::create_dir(fx.path(&format!("d{i}"))).unwrap();
        tree.push(t.elapsed());
    }
    let (t, b) = (median(tree), median(bare));
    println!(
        "external disk-only snapshot of 2 disks: mkdir {:.1} ms, bare transaction {:.1} ms, \
         ratio {:.2}; goal <= 20 ms: {}",
        ms(t),
        ms(b),
        t.as_secs_f64() / b.as_secs_f64(),
        if ms(t) <= 20.0 { "met" } else { "NOT met" }
    );
}

/// Waits until the guest behind the control socket runs.
fn wait_running(vm: &Vm) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running = vm
            .control()
            .ok()
            .and_then(|mut q| q.execute_raw("query-status", json!({})).ok())
            .is_some_and(|v| v["status"] == "running");
        if running {
            return;
        }
        assert!(Instant::now() < deadline, "QEMU did not come back");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn revert_bench() {
    let fx = policy_fixture("bench-xrevert", "external-disk-only", 512);
    fx.vm.fill_ram(256).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x5a 0 16M").unwrap();
    fs::create_dir(fx.path("d")).unwrap();
    let (mut wall, mut pause) = (vec![], vec![]);
    for i in 0..REPS {
        fx.vm
            .qemu_io("vda", &format!("write -P 0x{:02x} 0 1M", 0x10 + i))
            .unwrap();
        let mut w = Duration::ZERO;
        pause.push(guest_pause(&fx.vm, || {
            let t = Instant::now();
            let at = std::time::SystemTime::now();
            write_file(&fx.path("d/revert"), b"running force discard").unwrap();
            w = t.elapsed();
            if std::env::var("VMSNAPFS_BENCH_VERBOSE").is_ok() {
                eprintln!(
                    "rep start {:?} took {w:?}",
                    at.duration_since(std::time::UNIX_EPOCH).unwrap()
                );
            }
        }));
        wall.push(w);
    }
    if std::env::var("VMSNAPFS_BENCH_VERBOSE").is_ok() {
        eprintln!("revert wall times: {wall:?}, pauses: {pause:?}");
        let log = fx.daemon.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(60);
        for l in &lines[from..] {
            eprintln!("{}", &l[..l.len().min(220)]);
        }
    }
    // What libvirt does: stop QEMU, make the overlay, start QEMU again on
    // it, and wait until the guest runs.
    let images = fx.vm.disks[0].image.parent().unwrap().to_owned();
    let mut restart = vec![];
    for i in 0..3 {
        let t = Instant::now();
        let pid = fx.vm.current_pid().unwrap();
        let _ = fx.vm.control().unwrap().execute_raw("quit", json!({}));
        assert!(vmsnapfs::backend::process::wait_exit(
            pid,
            Duration::from_secs(30)
        ));
        for d in &fx.vm.disks {
            let overlay = images.join(format!("restart{i}-{}.qcow2", d.target));
            vmsnapfs::backend::qemu_img::create_overlay(&overlay, &d.image, "qcow2").unwrap();
        }
        let log = fx.dir.0.join("restart.log");
        vmsnapfs::backend::process::spawn_detached(
            &fx.vm.argv,
            &vmsnapfs::backend::process::Credentials::root(),
            &log,
        )
        .unwrap();
        wait_running(&fx.vm);
        restart.push(t.elapsed());
    }
    let (w, p, r) = (median(wall), median(pause), median(restart));
    println!(
        "revert of a running VM (512 MiB RAM) to an external disk-only snapshot: {:.1} ms wall, \
         guest paused {:.1} ms; stop + overlay + restart: {:.1} ms; {:.1}x faster (goal >= 5x): {}",
        ms(w),
        ms(p),
        ms(r),
        r.as_secs_f64() / w.as_secs_f64(),
        if r.as_secs_f64() / w.as_secs_f64() >= 5.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}

const DELTA_MB: u64 = 500;

/// A VM whose vda is 1 GiB, under the external-disk-only policy.
fn big_disk_fixture(tag: &str) -> Fixture {
    let dir = TempDir::new(tag);
    let spec = VmSpec {
        name: "vm1".into(),
        disks: vec![("vda".into(), 1024), ("vdb".into(), 32)],
        memory_mb: 128,
        raw: Vec::new(),
    };
    let vm = Vm::start(&spec, &dir.0.join("images")).expect("start VM");
    let def = vm.write_definition(&dir.0.join("domains")).unwrap();
    let xml = fs::read_to_string(&def).unwrap().replace(
        "</domain>",
        "  <snapshot policy='external-disk-only'/>\n</domain>",
    );
    fs::write(&def, xml).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    Fixture { daemon, vm, dir }
}

fn rmdir_bench() {
    let (mut tree, mut bare) = (vec![], vec![]);
    for i in 0..3 {
        // Through the tree: e1 (point: the defined image) <- 500 MiB <- e2.
        let fx = big_disk_fixture(&format!("bench-rmdir-{i}"));
        fs::create_dir(fx.path("e1")).unwrap();
        fx.vm
            .qemu_io("vda", &format!("write -P 0x3c 0 {DELTA_MB}M"))
            .unwrap();
        fx.vm.qemu_io("vda", "flush").unwrap();
        fs::create_dir(fx.path("e2")).unwrap();
        let t = Instant::now();
        fs::remove_dir(fx.path("e1")).unwrap();
        tree.push(t.elapsed());
        let log = fx.read(".log");
        assert!(log.contains("committed into"));
        if std::env::var("VMSNAPFS_BENCH_VERBOSE").is_ok() {
            eprintln!("{}", log.lines().last().unwrap_or_default());
        }
        drop(fx);

        // Bare: the same chain and the same block-commit on a plain VM.
        let dir = TempDir::new(&format!("bench-commit-{i}"));
        let spec = VmSpec {
            name: "vm1".into(),
            disks: vec![("vda".into(), 1024), ("vdb".into(), 32)],
            memory_mb: 128,
            raw: Vec::new(),
        };
        let vm = Vm::start(&spec, &dir.0.join("images")).unwrap();
        let img = dir.0.join("images");
        let mut q = vm.control().unwrap();
        let snap = |q: &mut vmsnapfs::backend::qmp::Qmp, from: &str, to: &str| {
            q.execute_raw(
                "blockdev-snapshot-sync",
                json!({"node-name": from, "snapshot-file": img.join(format!("{to}.qcow2")),
                       "snapshot-node-name": to, "format": "qcow2", "mode": "absolute-paths"}),
            )
            .unwrap();
        };
        snap(&mut q, "vda-fmt", "o1");
        drop(q);
        vm.qemu_io("vda", &format!("write -P 0x3c 0 {DELTA_MB}M"))
            .unwrap();
        vm.qemu_io("vda", "flush").unwrap();
        let mut q = vm.control().unwrap();
        snap(&mut q, "o1", "o2");
        let t = Instant::now();
        q.execute_raw(
            "block-commit",
            json!({"job-id": "bench", "device": "o2", "top-node": "o1",
                   "base-node": "vda-fmt", "auto-dismiss": false}),
        )
        .unwrap();
        let err = q
            .wait_job("bench", Duration::from_secs(600), |_, _| {})
            .unwrap();
        assert!(err.is_none(), "{err:?}");
        // Done as the tree is: the merged image's file removed too.
        fs::remove_file(img.join("o1.qcow2")).unwrap();
        bare.push(t.elapsed());
    }
    let (t, b) = (median(tree), median(bare));
    println!(
        "rmdir of an external snapshot with {DELTA_MB} MiB of delta (block-commit): {:.0} ms, \
         bare block-commit and rm of the merged image {:.0} ms, ratio {:.2} (goal <= 1.1): {}",
        ms(t),
        ms(b),
        t.as_secs_f64() / b.as_secs_f64(),
        if t.as_secs_f64() / b.as_secs_f64() <= 1.1 {
            "met"
        } else {
            "NOT met"
        }
    );
}

fn main() {
    let only = std::env::var("VMSNAPFS_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "pause" {
        pause_bench();
    }
    if only.is_empty() || only == "disk-only" {
        disk_only_bench();
    }
    if only.is_empty() || only == "revert" {
        revert_bench();
    }
    if only.is_empty() || only == "rmdir" {
        rmdir_bench();
    }
}
