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

fn main() {
    let only = std::env::var("VMSNAPFS_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "pause" {
        pause_bench();
    }
    if only.is_empty() || only == "disk-only" {
        disk_only_bench();
    }
}
