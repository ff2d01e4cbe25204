//! Many processes on several domains at once: mkdir, rmdir, mv, revert,
//! ls, cat, stat. No deadlock, no torn metadata, one operation at a time
//! per domain and one winner per name (decided by the daemon, not by the
//! kernel's directory lock), and afterwards the tree, the metadata and
//! the images agree.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// errnos that a racing operation may legitimately get.
const RACE_ERRNOS: &[i32] = &[libc::EBUSY, libc::EEXIST, libc::ENOENT];

fn check(r: std::io::Result<()>, what: &str) {
    if let Err(e) = r {
        let code = e.raw_os_error().unwrap_or(-1);
        assert!(RACE_ERRNOS.contains(&code), "{what}: unexpected {e}");
    }
}

fn names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

fn names_sorted(dir: &Path) -> Vec<String> {
    let mut v = names(dir);
    v.sort();
    v
}

fn worker(dom: PathBuf, id: usize, rounds: usize) {
    for r in 0..rounds {
        let mine = format!("w{id}-{r}");
        check(fs::create_dir(dom.join(&mine)), "mkdir");
        let _ = fs::read_to_string(dom.join(".tree")).unwrap();
        let list = names(&dom);
        for n in &list {
            // Entries may vanish between readdir and stat.
            let _ = fs::metadata(dom.join(n));
        }
        if let Some(victim) = list.get((id + r) % list.len().max(1)) {
            match r % 3 {
                0 => check(fs::remove_dir(dom.join(victim)), "rmdir"),
                1 => check(
                    write_file(&dom.join(victim).join("revert"), b"running")
                        .map_err(std::io::Error::from_raw_os_error),
                    "revert",
                ),
                _ => check(
                    fs::rename(dom.join(victim), dom.join(format!("{victim}-mv"))),
                    "mv",
                ),
            }
        }
    }
}

#[test]
fn many_processes_on_two_domains() {
    let dir = TempDir::new("concurrency");
    let vms: Vec<Vm> = ["vm1", "vm2"]
        .iter()
        .map(|n| {
            let mut vm = Vm::start(&VmSpec::small(n), &dir.0.join("images")).unwrap();
            vm.policy = Some("internal".into());
            vm.write_definition(&dir.0.join("domains")).unwrap();
            vm
        })
        .collect();
    // Every create waits at a gate until this test opens it (once open,
    // creates go on at once).
    let gate = Gate::new("concurrency");
    let daemon = Daemon::start(
        &dir.0,
        &[
            ("RUST_LOG", "info"),
            (
                "VMSNAPFS_FAILPOINTS",
                &format!("create.begin={}", gate.action()),
            ),
        ],
    );
    let done = Arc::new(AtomicBool::new(false));
    // A watchdog: on a deadlock, unmount lazily so that stuck calls fail.
    let watchdog = {
        let (done, mnt) = (done.clone(), daemon.mnt.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(240);
            while !done.load(Ordering::Acquire) {
                if Instant::now() > deadline {
                    unmount(&mnt);
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
    };

    // Exactly one winner for the same name, decided by the daemon: a
    // mkdir holds the directory's lock in the kernel, but `.create` and
    // the control files of other snapshots are other inodes, which the
    // kernel lets through at the same time. The mkdir is held inside the
    // daemon (after its name check) while the others try.
    let vm1 = daemon.mnt.join("vm1");
    let spec = b"<domainsnapshot><name>contested</name></domainsnapshot>";
    gate.open();
    fs::create_dir(vm1.join("base")).unwrap();
    fs::remove_file(&gate.0).unwrap();
    // Names looked up before: while the mkdir runs the kernel holds the
    // directory's lock, and a first lookup in it would wait for that.
    for n in [".create", ".log", "base/revert", "base/delete"] {
        fs::metadata(vm1.join(n)).unwrap();
    }
    let mkdir = {
        let p = vm1.join("contested");
        std::thread::spawn(move || fs::create_dir(p))
    };
    // The second create (base was the first) is at its gate.
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.log_text().matches("failpoint create.begin").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the mkdir never reached its gate"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let contenders: Vec<_> = (0..6)
        .map(|i| {
            let vm1 = vm1.clone();
            std::thread::spawn(move || match i % 3 {
                0 => write_file(&vm1.join(".create"), spec),
                1 => write_file(&vm1.join("base/revert"), b"running"),
                _ => write_file(&vm1.join("base/delete"), b"self"),
            })
        })
        .collect();
    let lost: Vec<Result<(), i32>> = contenders.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        lost.iter().all(|r| *r == Err(libc::EBUSY)),
        "while one operation runs, every other one on the domain is refused: {lost:?}\n{}",
        fs::read_to_string(vm1.join(".log")).unwrap_or_default()
    );
    gate.open();
    mkdir
        .join()
        .unwrap()
        .expect("the operation that came first wins");
    assert_eq!(names_sorted(&vm1), vec!["base", "contested"]);
    // Afterwards the daemon's name check refuses what the kernel did not see.
    assert_eq!(write_file(&vm1.join(".create"), spec), Err(libc::EEXIST));
    let log = fs::read_to_string(vm1.join(".log")).unwrap();
    assert!(log.contains("refused (EBUSY)"), "{log}");
    assert!(log.contains("refused (EEXIST)"), "{log}");

    // Workers on both domains, readers everywhere.
    let mut threads = Vec::new();
    for (i, name) in ["vm1", "vm2"].iter().enumerate() {
        for w in 0..3 {
            let dom = daemon.mnt.join(name);
            threads.push(std::thread::spawn(move || worker(dom, i * 10 + w, 8)));
        }
    }
    for _ in 0..2 {
        let mnt = daemon.mnt.clone();
        let done = done.clone();
        threads.push(std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                for name in ["vm1", "vm2"] {
                    let d = mnt.join(name);
                    let _ = names(&d);
                    let _ = fs::read_to_string(d.join(".state"));
                    let _ = fs::read_to_string(d.join(".log"));
                }
            }
        }));
    }
    let readers = threads.split_off(6);
    for t in threads {
        t.join().expect("worker failed");
    }
    done.store(true, Ordering::Release);
    for t in readers {
        t.join().unwrap();
    }
    assert!(
        !watchdog.join().unwrap(),
        "deadlock: the watchdog had to unmount"
    );

    // The tree, the metadata and the images agree on every domain.
    for vm in &vms {
        let tree: BTreeSet<String> = names(&daemon.mnt.join(&vm.name)).into_iter().collect();
        let meta_dir = daemon.state.join(&vm.name).join("snapshots");
        let mut meta_names = BTreeSet::new();
        let mut meta_ids = BTreeSet::new();
        for e in fs::read_dir(&meta_dir).unwrap() {
            let p = e.unwrap().path();
            let text = fs::read_to_string(&p).unwrap();
            let spec = vmsnapfs::xml::snapshot::parse_snapshot_xml(&text)
                .unwrap_or_else(|e| panic!("torn metadata {}: {e}", p.display()));
            meta_names.insert(spec.name.unwrap());
            meta_ids.insert(spec.id.unwrap());
        }
        assert_eq!(tree, meta_names, "{}", vm.name);
        for d in &vm.disks {
            let tags: BTreeSet<String> = image_tags(&d.image).into_iter().collect();
            assert_eq!(tags, meta_ids, "{} {}", vm.name, d.target);
        }
        let journal = fs::read_dir(daemon.state.join(&vm.name).join("journal"))
            .unwrap()
            .count();
        assert_eq!(journal, 0);
    }
}
