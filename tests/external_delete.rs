//! Deleting external snapshots on a real VM through the mounted tree:
//! mid-chain, leaf, root, with branches, on a running and a stopped VM.
//! After each delete every remaining snapshot's view keeps its bytes, the
//! live disks keep theirs, `qemu-img check` passes, no image or memory
//! file is left that nothing needs, and the VM still runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use vmsnapfs::demo::vm::read_image;

/// Writes a 1 MiB pattern at a per-byte offset on both disks, so that
/// every state differs from the others in several places.
fn write_state(fx: &Fixture, byte: u8, stopped: Option<(&PathBuf, &PathBuf)>) {
    let off = (byte as u64 % 16) * 1024 * 1024;
    for (i, d) in ["vda", "vdb"].iter().enumerate() {
        let cmd = format!("write -P 0x{byte:02x} {off} 1M");
        match stopped {
            None => {
                fx.vm.qemu_io(d, &cmd).unwrap();
                fx.vm.qemu_io(d, "flush").unwrap();
            }
            Some((a, b)) => {
                let img = if i == 0 { a } else { b };
                let out = Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", &cmd])
                    .arg(img)
                    .output()
                    .unwrap();
                assert!(out.status.success());
            }
        }
    }
}

fn sha(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// sha256 of each snapshot's views, by snapshot and disk.
fn view_shas(fx: &Fixture) -> BTreeMap<(String, String), String> {
    let mut m = BTreeMap::new();
    for s in fx.ls() {
        for d in ["vda", "vdb"] {
            let p = fx.path(&format!("{s}/disks/{d}"));
            if p.exists() {
                m.insert((s.clone(), d.to_owned()), sha(&fs::read(&p).unwrap()));
            }
        }
    }
    m
}

/// The live content of both disks: through QEMU when it runs, from the
/// active layers otherwise.
fn live_shas(fx: &Fixture, running: bool) -> Vec<String> {
    ["vda", "vdb"]
        .iter()
        .map(|d| {
            if running {
                sha(&fx.vm.read_disk(d).unwrap())
            } else {
                sha(&read_image(&active_layer(fx, d)).unwrap())
            }
        })
        .collect()
}

fn image_files(fx: &Fixture) -> BTreeSet<PathBuf> {
    let dir = fx.vm.disks[0].image.parent().unwrap();
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.to_string_lossy();
            n.ends_with(".qcow2") || n.ends_with(".memory")
        })
        .collect()
}

/// Deletes `name` and checks that nothing else changed.
fn delete_and_check(fx: &Fixture, name: &str, running: bool) {
    let mut views = view_shas(fx);
    let live = live_shas(fx, running);
    fs::remove_dir(fx.path(name))
        .unwrap_or_else(|e| panic!("rmdir {name}: {e}\n{}", fx.read(".log")));
    views.retain(|(s, _), _| s != name);
    assert_eq!(view_shas(fx), views, "after rmdir {name}: views changed");
    assert_eq!(
        live_shas(fx, running),
        live,
        "after rmdir {name}: live disks changed"
    );
    check_no_orphans(fx);
    if running {
        assert_eq!(fx.read(".state"), "running\n");
    }
    assert!(fx.read(".jobs").is_empty(), "no job left running");
}

fn chain_case(running: bool) {
    let tag = if running {
        "xdel-chain-up"
    } else {
        "xdel-chain-down"
    };
    let fx = Fixture::with_policy(tag, "external-disk-only", &[]);
    let images = fx.vm.disks[0].image.parent().unwrap().to_owned();
    let layers = |snap: &str| {
        (
            images.join(format!("vm1-vda.{snap}.qcow2")),
            images.join(format!("vm1-vdb.{snap}.qcow2")),
        )
    };
    if !running {
        fx.quit_vm();
    }
    let base = (fx.vm.disks[0].image.clone(), fx.vm.disks[1].image.clone());
    let mut top = base.clone();
    for (i, s) in ["e1", "e2", "e3", "e4"].iter().enumerate() {
        let stopped = (!running).then_some((&top.0, &top.1));
        write_state(&fx, 0x11 * (i as u8 + 1), stopped);
        fs::create_dir(fx.path(s)).unwrap();
        top = layers(s);
    }
    write_state(&fx, 0x77, (!running).then_some((&top.0, &top.1)));
    delete_and_check(&fx, "e2", running); // mid-chain
    delete_and_check(&fx, "e4", running); // the newest: its overlay is active
    delete_and_check(&fx, "e1", running); // the oldest: its point is the defined image
    delete_and_check(&fx, "e3", running); // the last one
    assert!(fx.ls().is_empty());
    // Only the defined images and the active layers remain.
    let files = image_files(&fx);
    assert!(files.len() <= 4, "{files:?}");
    let log = fx.read(".log");
    assert!(
        log.contains("committed into") || log.contains("streamed up from"),
        "{log}"
    );
    // The domain goes on.
    if running {
        write_state(&fx, 0x7e, None);
    }
    fs::create_dir(fx.path("after")).unwrap();
}

#[test]
fn deleting_every_snapshot_of_a_chain_on_a_running_vm() {
    chain_case(true);
}

#[test]
fn deleting_every_snapshot_of_a_chain_on_a_stopped_vm() {
    chain_case(false);
}

#[test]
fn deleting_snapshots_with_branches_and_memory() {
    let fx = Fixture::with_policy("xdel-branch", "external", &[]);
    write_state(&fx, 0x21, None);
    fs::create_dir(fx.path("c1")).unwrap(); // checkpoint: memory file
    write_state(&fx, 0x22, None);
    fs::create_dir(fx.path("c2")).unwrap();
    write_state(&fx, 0x23, None);
    // Back to c1: a branch; the 0x23 state is kept as left-*.
    fx.revert("c1", "running").unwrap();
    write_state(&fx, 0x24, None);
    fs::create_dir(fx.path("c3")).unwrap();
    write_state(&fx, 0x25, None);
    let memory = |s: &str| {
        fx.vm.disks[0]
            .image
            .with_file_name(format!("vm1.{s}.memory"))
    };
    assert!(memory("c1").exists() && memory("c3").exists());

    // c1's point is the backing of two branches: it stays, the memory goes.
    delete_and_check(&fx, "c1", true);
    assert!(
        !memory("c1").exists(),
        "the memory file went with its snapshot"
    );
    assert!(fx
        .read(".log")
        .contains("stays: it is the backing image of 2 images"));
    let left: Vec<String> = fx
        .ls()
        .into_iter()
        .filter(|n| n.starts_with("left-"))
        .collect();
    assert_eq!(left.len(), 1);
    delete_and_check(&fx, &left[0], true);
    delete_and_check(&fx, "c2", true);
    delete_and_check(&fx, "c3", true);
    assert!(!memory("c3").exists());
    assert!(fx.ls().is_empty());
}

fn create_spec(fx: &Fixture, xml: &str) {
    write_file(&fx.path(".create"), xml.as_bytes())
        .unwrap_or_else(|e| panic!("create: errno {e}\n{}", fx.read(".log")));
}

fn byte_of(data: &[u8], byte: u8) -> bool {
    let off = (byte as usize % 16) << 20;
    all_bytes(data, off, 1 << 20, byte)
}

/// The sequence libvirt 9.0 cannot handle: external e1, internal i,
/// external e2; delete e1; then revert to i.
#[test]
fn external_internal_external_delete_first_then_revert_to_the_internal() {
    let fx = Fixture::with_policy("xdel-libvirt", "external-disk-only", &[]);
    write_state(&fx, 0x31, None);
    fs::create_dir(fx.path("e1")).unwrap();
    write_state(&fx, 0x32, None);
    fx.vm.fill_ram(4).unwrap();
    create_spec(
        &fx,
        "<domainsnapshot><name>i</name><memory snapshot='internal'/><disks>\
         <disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
         </disks></domainsnapshot>",
    );
    assert_eq!(fx.read("i/state"), "running\n");
    write_state(&fx, 0x33, None);
    fs::create_dir(fx.path("e2")).unwrap();
    write_state(&fx, 0x34, None);

    delete_and_check(&fx, "e1", true);
    // Back to i: RAM and disks, while e2 keeps its bytes.
    let views = view_shas(&fx);
    fx.revert("i", "running")
        .unwrap_or_else(|e| panic!("errno {e}\n{}", fx.read(".log")));
    assert_eq!(fx.read(".state"), "running\n");
    let live = fx.vm.read_disk("vda").unwrap();
    assert!(byte_of(&live, 0x31) && byte_of(&live, 0x32) && !byte_of(&live, 0x33));
    let mut after = view_shas(&fx);
    let left: Vec<String> = fx
        .ls()
        .into_iter()
        .filter(|n| n.starts_with("left-"))
        .collect();
    assert_eq!(left.len(), 1, "{:?}", fx.ls());
    let left_vda = fs::read(fx.path(&format!("{}/disks/vda", left[0]))).unwrap();
    assert!(byte_of(&left_vda, 0x34), "the state left behind is kept");
    after.retain(|(s, _), _| s != &left[0]);
    assert_eq!(after, views, "every other snapshot keeps its bytes");
    check_no_orphans(&fx);
    // And everything can still be deleted.
    for s in ["e2", "i", &left[0][..]] {
        delete_and_check(&fx, s, true);
    }
    assert!(fx.ls().is_empty());
}

/// An internal snapshot whose image became a backing image: deleted from
/// the tree at once, its data freed once QEMU lets go of the image.
#[test]
fn deleting_an_internal_snapshot_below_an_overlay() {
    let fx = Fixture::with_policy("xdel-internal", "external-disk-only", &[]);
    write_state(&fx, 0x41, None);
    create_spec(
        &fx,
        "<domainsnapshot><name>i1</name><memory snapshot='no'/><disks>\
         <disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
         </disks></domainsnapshot>",
    );
    fs::create_dir(fx.path("e1")).unwrap();
    write_state(&fx, 0x42, None);
    let base = fx.vm.disks[0].image.clone();
    assert_eq!(image_tags(&base).len(), 1);
    delete_and_check(&fx, "i1", true);
    assert!(fx
        .read(".log")
        .contains("is freed once the domain is stopped"));
    assert_eq!(image_tags(&base).len(), 1, "QEMU holds the image");
    let mut fx = fx;
    fx.restart_daemon(&[]);
    assert_eq!(fx.ls(), vec!["e1"], "the tag is not adopted again");
    let mut q = fx.vm.control().unwrap();
    let _ = q.execute_raw("quit", serde_json::json!({}));
    drop(q);
    fx.wait_state("shutoff");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !image_tags(&base).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "tag still in {}",
            base.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(fx.ls(), vec!["e1"]);
}

#[test]
fn deleting_children_or_a_whole_subtree_in_one_action() {
    let fx = Fixture::with_policy("xdel-tree", "external-disk-only", &[]);
    for (s, b) in [("a", 0x51), ("b", 0x52), ("c", 0x53)] {
        write_state(&fx, b, None);
        fs::create_dir(fx.path(s)).unwrap();
    }
    write_state(&fx, 0x54, None);
    fx.revert("a", "running force").unwrap();
    write_state(&fx, 0x55, None);
    fs::create_dir(fx.path("d")).unwrap();
    write_state(&fx, 0x56, None);
    // a -> b -> c -> left-*, a -> d
    assert_eq!(fx.ls().len(), 5, "{:?}", fx.ls());
    assert_eq!(
        write_file(&fx.path("b/delete"), b"everything"),
        Err(libc::EINVAL)
    );

    let mut views = view_shas(&fx);
    let live = live_shas(&fx, true);
    write_file(&fx.path("b/delete"), b"children\n").unwrap();
    let mut names = fx.ls();
    names.sort();
    assert_eq!(names, vec!["a", "b", "d"]);
    views.retain(|(s, _), _| names.contains(s));
    assert_eq!(view_shas(&fx), views);
    assert_eq!(live_shas(&fx, true), live);
    check_no_orphans(&fx);

    // An open view anywhere in the subtree: EBUSY, nothing deleted.
    let held = fs::File::open(fx.path("d/disks/vda")).unwrap();
    assert_eq!(
        write_file(&fx.path("a/delete"), b"subtree"),
        Err(libc::EBUSY)
    );
    assert_eq!(fx.ls().len(), 3);
    drop(held);
    write_file(&fx.path("a/delete"), b"subtree").unwrap();
    assert!(fx.ls().is_empty(), "{:?}", fx.ls());
    assert_eq!(live_shas(&fx, true), live);
    check_no_orphans(&fx);
    assert!(fx.read(".log").contains("3 snapshot(s) deleted"));
}

/// A long merge shows in `.jobs` while `rmdir` waits for it.
#[test]
fn a_long_merge_shows_its_progress_in_jobs() {
    let dir = TempDir::new("xdel-jobs");
    let spec = VmSpec {
        name: "vm1".into(),
        disks: vec![("vda".into(), 1024), ("vdb".into(), 32)],
        memory_mb: 128,
        raw: Vec::new(),
    };
    let vm = Vm::start(&spec, &dir.0.join("images")).unwrap();
    let def = vm.write_definition(&dir.0.join("domains")).unwrap();
    let xml = fs::read_to_string(&def).unwrap().replace(
        "</domain>",
        "  <snapshot policy='external-disk-only'/>\n</domain>",
    );
    fs::write(&def, xml).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    let fx = Fixture { daemon, vm, dir };
    fx.vm.qemu_io("vda", "write -P 0x61 0 64M").unwrap();
    fs::create_dir(fx.path("e1")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x62 0 400M").unwrap();
    fx.vm.qemu_io("vda", "flush").unwrap();
    fs::create_dir(fx.path("e2")).unwrap();
    let want = sha(&fs::read(fx.path("e2/disks/vda")).unwrap());

    // The mount root's .jobs answers even while rmdir holds vm1/ locked.
    let jobs = fx.daemon.mnt.join(".jobs");
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(20) {
            let text = fs::read_to_string(&jobs).unwrap_or_default();
            let progress = text.contains(" bytes (");
            if !text.is_empty() {
                seen.push(text);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            // Until the job reports its size (before that, the line says
            // it has no progress yet).
            if progress && seen.len() > 3 {
                break;
            }
        }
        seen
    });
    // e1's point is the defined image: the 400 MiB above it are committed
    // down into it.
    fs::remove_dir(fx.path("e1")).unwrap();
    let seen = watcher.join().unwrap();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("vm1: rmdir \"e1\": commit disk vda: ") && l.contains("bytes")),
        "no job seen in .jobs: {seen:?}\n{}",
        fx.read(".log")
    );
    assert!(fx.read(".jobs").is_empty());
    let live = sha(&fx.vm.read_disk("vda").unwrap());
    assert_eq!(live, want, "the live disk kept its bytes");
    assert_eq!(sha(&fs::read(fx.path("e2/disks/vda")).unwrap()), want);
    assert!(fx.read(".log").contains("committed into"));
}

/// A paused guest (not one whose RAM was just saved) keeps its images
/// active: deletes merge live and the guest stays paused.
#[test]
fn deleting_on_a_paused_vm() {
    let fx = Fixture::with_policy("xdel-paused", "external-disk-only", &[]);
    for (s, b) in [("p1", 0x71), ("p2", 0x72), ("p3", 0x73)] {
        write_state(&fx, b, None);
        fs::create_dir(fx.path(s)).unwrap();
    }
    write_state(&fx, 0x74, None);
    fx.vm
        .control()
        .unwrap()
        .execute_raw("stop", serde_json::json!({}))
        .unwrap();
    fx.wait_state("paused");
    for s in ["p2", "p3", "p1"] {
        let views = {
            let mut v = view_shas(&fx);
            v.retain(|(n, _), _| n != s);
            v
        };
        let live = live_shas(&fx, true);
        fs::remove_dir(fx.path(s))
            .unwrap_or_else(|e| panic!("rmdir {s}: {e}\n{}", fx.read(".log")));
        assert_eq!(view_shas(&fx), views, "rmdir {s}");
        assert_eq!(live_shas(&fx, true), live, "rmdir {s}");
        assert_eq!(fx.read(".state"), "paused\n");
        check_no_orphans(&fx);
    }
}
