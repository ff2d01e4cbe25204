//! Benchmarks of the internal-snapshot tree, each printed with a ratio
//! against a peer measured in the same run:
//!
//! 1. mkdir / revert / rmdir through the tree versus the bare QMP job
//!    (`snapshot-save` / `snapshot-load` / `snapshot-delete`) for the same
//!    work on the same VM (goal: overhead ratio <= 1.2).
//! 2. `ls -l` and `cat .tree` of a domain with 1000 snapshots (goal
//!    < 20 ms each), against `ls -l` of a plain directory of 1000 dirs.
//! 3. The daemon's RSS with 1000 snapshots.
//!
//! Run: `cargo bench --bench internal` (root, QEMU 7.2, /dev/fuse).
//! `VMSNAPFS_BENCH_SNAPSHOTS=N` changes the 1000.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const REPS: usize = 9;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs a QMP snapshot job on the control socket and waits for it.
fn bare_job(vm: &Vm, command: &str, tag: &str, with_vmstate: bool) -> Duration {
    let mut q = vm.control().unwrap();
    let nodes: Vec<String> = vm
        .disks
        .iter()
        .map(|d| format!("{}-fmt", d.target))
        .collect();
    let mut args = json!({"job-id": "bench", "tag": tag, "devices": nodes});
    if with_vmstate {
        args["vmstate"] = json!(nodes[0]);
    }
    let t = Instant::now();
    q.execute_raw(command, args).unwrap();
    let err = q
        .wait_job("bench", Duration::from_secs(600), |_, _| {})
        .unwrap();
    let d = t.elapsed();
    assert!(err.is_none(), "{command}: {err:?}");
    d
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn overhead(ram_mb: u64, dirty_mb: u64) {
    let mut spec = VmSpec::small("vm1");
    spec.memory_mb = ram_mb;
    let fx = Fixture::with_spec("bench-ops", &spec, &[("RUST_LOG", "info")]);
    fx.vm.qemu_io("vda", "write -P 0xab 0 32M").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0xcd 0 16M").unwrap();
    if dirty_mb > 0 {
        fx.vm.fill_ram(dirty_mb).unwrap();
    }
    let (mut tree_c, mut bare_c, mut tree_r, mut bare_r, mut tree_d, mut bare_d) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    // Each kind of operation in its own phase, the two sides alternating
    // and taking turns at going first.
    let order = |i: usize, bare: &mut dyn FnMut(), tree: &mut dyn FnMut()| {
        if i.is_multiple_of(2) {
            bare();
            tree();
        } else {
            tree();
            bare();
        }
    };
    for i in 0..REPS {
        let (tag, name) = (format!("bare{i}"), format!("tree{i}"));
        order(
            i,
            &mut || bare_c.push(bare_job(&fx.vm, "snapshot-save", &tag, true)),
            &mut || tree_c.push(timed(|| fs::create_dir(fx.path(&name)).unwrap())),
        );
    }
    for i in 0..REPS {
        let (tag, name) = (format!("bare{i}"), format!("tree{i}"));
        order(
            i,
            &mut || bare_r.push(bare_job(&fx.vm, "snapshot-load", &tag, true)),
            &mut || tree_r.push(timed(|| fx.revert(&name, "running discard").unwrap())),
        );
    }
    for i in 0..REPS {
        let (tag, name) = (format!("bare{i}"), format!("tree{i}"));
        order(
            i,
            &mut || bare_d.push(bare_job(&fx.vm, "snapshot-delete", &tag, false)),
            &mut || tree_d.push(timed(|| fs::remove_dir(fx.path(&name)).unwrap())),
        );
    }
    println!(
        "\n== operations through the tree vs the bare QMP job (median of {REPS}, 2 disks, 48 MiB data, \
         {ram_mb} MiB RAM of which {dirty_mb} MiB filled)"
    );
    for (what, tree, bare) in [
        ("mkdir  vs snapshot-save  ", tree_c, bare_c),
        ("revert vs snapshot-load  ", tree_r, bare_r),
        ("rmdir  vs snapshot-delete", tree_d, bare_d),
    ] {
        let (t, b) = (median(tree), median(bare));
        println!(
            "{what}: tree {:8.2} ms  bare {:8.2} ms  ratio {:.2}x (goal <= 1.2x)",
            ms(t),
            ms(b),
            t.as_secs_f64() / b.as_secs_f64()
        );
    }
}

fn run_median(reps: usize, mut f: impl FnMut()) -> Duration {
    median((0..reps).map(|_| timed(&mut f)).collect())
}

fn drop_kernel_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "2");
}

fn many_snapshots() {
    let n: usize = std::env::var("VMSNAPFS_BENCH_SNAPSHOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = TempDir::new("bench-many");
    let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).unwrap();
    vm.policy = Some("internal".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    // N internal disk snapshots made beside vmsnapfs (QMP, ~ms each); the
    // daemon adopts them at start, so the tree holds N snapshots.
    let t = Instant::now();
    let mut q = vm.control().unwrap();
    for i in 0..n {
        for d in &vm.disks {
            q.execute_raw(
                "blockdev-snapshot-internal-sync",
                json!({"device": d.target, "name": format!("snap-{i:05}")}),
            )
            .unwrap();
        }
    }
    let made = t.elapsed();
    let t = Instant::now();
    let daemon = Daemon::start(&dir.0, &[("RUST_LOG", "info")]);
    let started = t.elapsed();
    let mnt_dir = daemon.mnt.join("vm1");
    let peer = dir.0.join("peer");
    for i in 0..n {
        fs::create_dir_all(peer.join(format!("snap-{i:05}"))).unwrap();
    }
    let ls = |dir: &std::path::Path| {
        let out = Command::new("ls").arg("-l").arg(dir).output().unwrap();
        assert!(out.status.success());
        assert!(out.stdout.iter().filter(|b| **b == b'\n').count() > n);
    };
    drop_kernel_caches();
    let ls_cold = timed(|| ls(&mnt_dir));
    let ls_warm = run_median(11, || ls(&mnt_dir));
    let peer_ls = run_median(11, || ls(&peer));
    let tree = mnt_dir.join(".tree");
    let cat = run_median(11, || {
        let out = Command::new("cat").arg(&tree).output().unwrap();
        assert_eq!(out.stdout.iter().filter(|b| **b == b'\n').count(), n);
    });
    let peer_file = dir.0.join("peer.tree");
    fs::write(&peer_file, fs::read(&tree).unwrap()).unwrap();
    let peer_cat = run_median(11, || {
        Command::new("cat").arg(&peer_file).output().unwrap();
    });
    let rss = daemon_rss_kib(&daemon);
    println!(
        "\n== a domain with {n} snapshots (made with QMP in {:.1} s; daemon start with adoption {:.2} s)",
        made.as_secs_f64(),
        started.as_secs_f64()
    );
    println!(
        "ls -l     : cold {:6.2} ms, warm {:6.2} ms (goal < 20 ms); plain dir {:6.2} ms; ratio {:.2}x",
        ms(ls_cold),
        ms(ls_warm),
        ms(peer_ls),
        ls_warm.as_secs_f64() / peer_ls.as_secs_f64()
    );
    println!(
        "cat .tree : {:6.2} ms (goal < 20 ms); plain file {:6.2} ms; ratio {:.2}x",
        ms(cat),
        ms(peer_cat),
        cat.as_secs_f64() / peer_cat.as_secs_f64()
    );
    println!(
        "daemon RSS: {:.1} MiB with {n} snapshots",
        rss as f64 / 1024.0
    );
    drop(daemon);
    drop(vm);
}

fn daemon_rss_kib(daemon: &Daemon) -> u64 {
    let pid = daemon.pid().expect("daemon runs");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// A disk-only snapshot of both disks of a running VM through `.create`
/// (one QMP transaction) against the bare transaction; goal <= 20 ms.
fn disk_only() {
    let fx = Fixture::with_env("bench-disk-only", &[("RUST_LOG", "info")]);
    fx.vm.qemu_io("vda", "write -P 0xab 0 32M").unwrap();
    let (mut tree, mut bare) = (vec![], vec![]);
    for i in 0..REPS {
        let spec =
            format!("<domainsnapshot><name>d{i}</name><memory snapshot='no'/></domainsnapshot>");
        tree.push(timed(|| {
            write_file(&fx.path(".create"), spec.as_bytes()).unwrap()
        }));
        let mut q = fx.vm.control().unwrap();
        let actions: Vec<serde_json::Value> = fx
            .vm
            .disks
            .iter()
            .map(|d| {
                json!({"type": "blockdev-snapshot-internal-sync",
                       "data": {"device": format!("{}-fmt", d.target), "name": format!("b{i}")}})
            })
            .collect();
        bare.push(timed(|| {
            q.execute_raw("transaction", json!({ "actions": actions }))
                .unwrap();
        }));
    }
    let (t, b) = (median(tree), median(bare));
    println!("\n== disk-only snapshot of 2 disks of a running VM (internal, one transaction; median of {REPS})");
    println!(
        ".create end to end: {:6.2} ms (goal <= 20 ms); bare transaction {:6.2} ms; ratio {:.2}x",
        ms(t),
        ms(b),
        t.as_secs_f64() / b.as_secs_f64()
    );
}

/// Seconds of a QMP event timestamp.
fn event_time(e: &serde_json::Value) -> f64 {
    e["timestamp"]["seconds"].as_f64().unwrap_or(0.0)
        + e["timestamp"]["microseconds"].as_f64().unwrap_or(0.0) / 1e6
}

/// Revert of a running VM to an internal checkpoint through the tree (same
/// QEMU process) versus quitting QEMU and starting it again with
/// `-loadvm` (a restart); goal: >= 5x faster. Guest pause = STOP to RESUME.
fn revert_vs_restart() {
    let mut spec = VmSpec::small("vm1");
    spec.memory_mb = 512;
    let fx = Fixture::with_spec("bench-revert", &spec, &[("RUST_LOG", "info")]);
    fx.vm.fill_ram(256).unwrap();
    fs::create_dir(fx.path("s")).unwrap();
    let tag = fs::read_dir(fx.daemon.state.join("vm1/snapshots"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .find_map(|x| vmsnapfs::xml::snapshot::parse_snapshot_xml(&x).ok()?.id)
        .unwrap();
    let (mut wall, mut pause) = (vec![], vec![]);
    for _ in 0..5 {
        let mut q = fx.vm.control().unwrap();
        let t = timed(|| fx.revert("s", "running discard").unwrap());
        let stop = q
            .wait_event(Duration::from_secs(10), |e| e["event"] == "STOP")
            .unwrap();
        let resume = q
            .wait_event(Duration::from_secs(10), |e| e["event"] == "RESUME")
            .unwrap();
        wall.push(t);
        pause.push(Duration::from_secs_f64(
            event_time(&resume) - event_time(&stop),
        ));
    }
    // The restart: quit, start the same command line with -loadvm, wait
    // until the guest runs again.
    let mut restart = vec![];
    for _ in 0..3 {
        let t = Instant::now();
        let pid = fx.vm.current_pid().unwrap();
        let _ = fx.vm.control().unwrap().execute_raw("quit", json!({}));
        assert!(vmsnapfs::backend::process::wait_exit(
            pid,
            Duration::from_secs(30)
        ));
        let mut argv = fx.vm.argv.clone();
        argv.push("-loadvm".into());
        argv.push(tag.clone());
        let log = fx.dir.0.join("restart.log");
        vmsnapfs::backend::process::spawn_detached(
            &argv,
            &vmsnapfs::backend::process::Credentials::root(),
            &log,
        )
        .unwrap();
        loop {
            let running = fx
                .vm
                .control()
                .ok()
                .and_then(|mut q| q.execute_raw("query-status", json!({})).ok())
                .is_some_and(|v| v["status"] == "running");
            if running {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        restart.push(t.elapsed());
    }
    let (w, p, r) = (median(wall), median(pause), median(restart));
    println!("\n== revert of a running VM (512 MiB RAM, 256 MiB filled) to an internal checkpoint");
    println!(
        "through the tree: {:7.1} ms wall, guest paused {:7.1} ms; restart with -loadvm: {:7.1} ms; \
         {:.1}x faster (goal >= 5x)",
        ms(w),
        ms(p),
        ms(r),
        r.as_secs_f64() / w.as_secs_f64()
    );
}

fn main() {
    // `VMSNAPFS_BENCH_ONLY=ops`, `=disk-only`, `=revert` or `=many` runs one part.
    let only = std::env::var("VMSNAPFS_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "disk-only" {
        disk_only();
    }
    if only.is_empty() || only == "revert" {
        revert_vs_restart();
    }
    if only.is_empty() || only == "ops" {
        overhead(128, 0);
        overhead(1024, 768);
    }
    if only.is_empty() || only == "many" {
        many_snapshots();
    }
}
