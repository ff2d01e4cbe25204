//! The matrix of snapshot operations on libvirt domains through the
//! tree, on a real libvirtd (started by each test, stopped by pid) and a
//! real FUSE mount: create (external and internal, disk-only and
//! checkpoint), rename, revert and delete (rmdir), on a running and on a
//! stopped domain. After each step every side agrees:
//!
//! - libvirt's snapshot list (names, parents, the current snapshot) is
//!   the tree's;
//! - libvirt's live definition (running) and persistent one name the
//!   active layer vmsnapfs recorded;
//! - every snapshot's view holds the bytes the guest had when it was
//!   taken, and the active layer (read in the guest's QEMU, or from the
//!   image when stopped) the last bytes written;
//!
//! and at chosen points `virsh destroy; virsh start` or `virsh
//! managedsave; virsh start` boots the active layer. A combination that
//! cannot be done says why with its errno and a `.log` line and changes
//! nothing. At the end each `snapshot.xml` is taken unchanged by `virsh
//! snapshot-create --redefine --validate` on a fresh definition of the
//! domain, which then lists the same names and parents. Skipped, saying
//! so, where libvirtd is not installed.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::libvirtd::*;
use common::*;

/// Snapshot name -> parent name.
type Forest = BTreeMap<String, Option<String>>;

/// One domain under test: what the test wrote and expects.
struct Matrix<'a> {
    lv: &'a Libvirtd,
    mnt: PathBuf,
    state: PathBuf,
    dom: &'static str,
    /// The image libvirt's definition named at first.
    image: PathBuf,
    /// The byte each snapshot's view of vda holds.
    views: BTreeMap<String, u8>,
    /// The byte the active layer holds.
    live: u8,
}

impl Matrix<'_> {
    /// The active layer of vda vmsnapfs recorded (the defined image
    /// until the first change).
    fn active(&self) -> PathBuf {
        if self.state.join(self.dom).join("layers").exists() {
            active_layer_of(&self.state, self.dom)
        } else {
            self.image.clone()
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(self.dom).join(rel)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path(".log")).unwrap_or_default()
    }

    fn running(&self) -> bool {
        self.lv.state(self.dom) == "running"
    }

    /// The tree's snapshots and their parents.
    fn tree(&self) -> Forest {
        names(&self.mnt.join(self.dom))
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .map(|n| {
                let parent = fs::read_link(self.path(&format!("{n}/parent")))
                    .ok()
                    .map(|p| p.file_name().unwrap().to_string_lossy().into_owned());
                (n, parent)
            })
            .collect()
    }

    /// libvirt's snapshot list: `snapshot-list --parent` prints a name,
    /// the creation time (date, time, zone), the state and the parent.
    fn libvirt(&self) -> Forest {
        self.lv
            .virsh(&["snapshot-list", self.dom, "--parent"])
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let name = (*w.first()?).to_owned();
                Some((name, w.get(5).map(|p| (*p).to_owned())))
            })
            .collect()
    }

    fn current(&self) -> Option<String> {
        fs::read_link(self.path(".current"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    fn libvirt_current(&self) -> Option<String> {
        let o = self.lv.try_virsh(&["snapshot-current", self.dom, "--name"]);
        let name = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        (o.status.success() && !name.is_empty()).then_some(name)
    }

    /// Writes `byte` over the first 64 KiB of vda: in the guest's QEMU
    /// when the domain runs, into the active layer when it is stopped.
    fn write(&mut self, byte: u8) {
        if self.running() {
            self.lv.guest_write(self.dom, byte);
        } else {
            let img = self.active();
            let o = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", &format!("write -P {byte:#x} 0 64k")])
                .arg(&img)
                .output()
                .unwrap();
            assert!(o.status.success(), "qemu-io write: {o:?}");
        }
        self.live = byte;
    }

    /// The first 64 KiB of the active layer hold `byte` (a running
    /// guest's QEMU flushes first; the image is read beside it).
    fn active_holds(&self, byte: u8) -> Result<(), String> {
        if self.running() {
            let out = self.lv.virsh(&[
                "qemu-monitor-command",
                self.dom,
                "--hmp",
                "qemu-io -d virtio-disk0/virtio-backend flush",
            ]);
            assert!(!out.contains("rror"), "{out}");
        }
        let o = Command::new("qemu-io")
            .args(["-r", "-U", "-f", "qcow2", "-c"])
            .arg(format!("read -P {byte:#x} 0 64k"))
            .arg(self.active())
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() && out.contains("read 65536/65536") && !out.contains("failed") {
            Ok(())
        } else {
            Err(format!("{out}{}", String::from_utf8_lossy(&o.stderr)))
        }
    }

    /// Every side agrees after `step` (see the module's doc).
    fn check(&self, step: &str) {
        let t = Instant::now();
        let tree = self.tree();
        let want: Vec<&String> = tree.keys().collect();
        let mut views: Vec<&String> = self.views.keys().collect();
        views.sort();
        assert_eq!(want, views, "{step}: the tree's snapshots\n{}", self.log());
        // The mirror runs after the domain's next state poll.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (theirs, cur) = (self.libvirt(), self.libvirt_current());
            if theirs == tree && cur == self.current() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{step}: libvirt's list {theirs:?} (current {cur:?}) is not the tree's \
                 {tree:?} (current {:?})\n{}",
                self.current(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let ours = self.active().to_string_lossy().into_owned();
        let (live, persistent) = self.lv.sources(self.dom);
        assert_eq!(persistent, ours, "{step}: libvirt's persistent definition");
        if self.running() {
            assert_eq!(live, ours, "{step}: libvirt's live definition");
        }
        for (name, byte) in &self.views {
            assert!(
                view_holds(&self.mnt, &format!("{}/{name}/disks/vda", self.dom), *byte),
                "{step}: {name}'s view does not hold {byte:#x}"
            );
        }
        if let Err(out) = self.active_holds(self.live) {
            panic!(
                "{step}: the active layer does not hold {:#x}: {out}",
                self.live
            );
        }
        eprintln!("{step}: checked in {:?}", t.elapsed());
    }

    fn wait_state(&self, want: &str) {
        wait_until(
            &format!("{} {want}", self.dom),
            Duration::from_secs(30),
            || state_of(&self.mnt, self.dom) == want,
        );
    }

    /// `virsh destroy; virsh start`: libvirt boots its persistent
    /// definition, which must be the active layer.
    fn destroy_and_start(&self, step: &str) {
        self.lv.virsh(&["destroy", self.dom]);
        self.wait_state("shutoff");
        self.lv.virsh(&["start", self.dom]);
        self.wait_state("running");
        self.check(&format!("{step}, destroy and start"));
    }

    /// `virsh managedsave; virsh start`: libvirt restores from its live
    /// definition.
    fn managedsave_and_start(&self, step: &str) {
        self.lv.virsh(&["managedsave", self.dom]);
        self.wait_state("shutoff");
        self.lv.virsh(&["start", self.dom]);
        self.wait_state("running");
        self.check(&format!("{step}, managedsave and start"));
    }

    fn mkdir(&mut self, name: &str) {
        fs::create_dir(self.path(name))
            .unwrap_or_else(|e| panic!("mkdir {name}: {e}\n{}", self.log()));
        self.views.insert(name.to_owned(), self.live);
    }

    /// `.create` of a snapshot named `name`: `memory` (internal, no,
    /// external) and `disk` (internal, external) as libvirt spells them.
    fn create(&mut self, name: &str, memory: &str, disk: &str) {
        let spec = format!(
            "<domainsnapshot><name>{name}</name><memory snapshot='{memory}'/>\
             <disks><disk name='vda' snapshot='{disk}'/></disks></domainsnapshot>"
        );
        write_file(&self.path(".create"), spec.as_bytes())
            .unwrap_or_else(|e| panic!("create {name}: {}\n{}", strerror(e), self.log()));
        self.views.insert(name.to_owned(), self.live);
    }

    fn state_file(&self, name: &str) -> String {
        fs::read_to_string(self.path(&format!("{name}/state")))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn rename(&mut self, from: &str, to: &str) {
        fs::rename(self.path(from), self.path(to))
            .unwrap_or_else(|e| panic!("rename {from} {to}: {e}\n{}", self.log()));
        let b = self.views.remove(from).unwrap();
        self.views.insert(to.to_owned(), b);
    }

    /// Reverts to `name` with `request`; the state left behind becomes a
    /// new `left-*` snapshot holding the bytes the domain had, and the
    /// active layer holds the snapshot's. Returns the left snapshot.
    fn revert(&mut self, name: &str, request: &str) -> String {
        let before = self.tree();
        fs::write(self.path(&format!("{name}/revert")), request)
            .unwrap_or_else(|e| panic!("revert {name} {request}: {e}\n{}", self.log()));
        let left: Vec<String> = self
            .tree()
            .into_keys()
            .filter(|n| !before.contains_key(n))
            .collect();
        assert_eq!(left.len(), 1, "revert {name}: new snapshots {left:?}");
        assert!(left[0].starts_with("left-"), "{left:?}");
        self.views.insert(left[0].clone(), self.live);
        self.live = self.views[name];
        left[0].clone()
    }

    fn rmdir(&mut self, name: &str) {
        fs::remove_dir(self.path(name))
            .unwrap_or_else(|e| panic!("rmdir {name}: {e}\n{}", self.log()));
        self.views.remove(name);
    }

    /// Each `snapshot.xml` now, with the tree's names and parents.
    fn snapshot_xmls(&self) -> (Forest, Vec<(String, String)>) {
        let tree = self.tree();
        let xmls = tree
            .keys()
            .map(|n| {
                let x = fs::read_to_string(self.path(&format!("{n}/snapshot.xml"))).unwrap();
                (n.clone(), x)
            })
            .collect();
        (tree, xmls)
    }
}

/// Redefines each `snapshot.xml` (parents first), unchanged and
/// validated, on a fresh definition of `dom` (`fresh`: libvirt's XML of
/// it before the test); libvirt then lists the same names and parents.
fn redefine_on_fresh_definition(
    lv: &Libvirtd,
    dir: &Path,
    dom: &str,
    fresh: &Path,
    (tree, xmls): (Forest, Vec<(String, String)>),
) {
    let _ = lv.try_virsh(&["destroy", dom]);
    lv.virsh(&["undefine", dom, "--snapshots-metadata", "--managed-save"]);
    lv.virsh(&["define", fresh.to_str().unwrap()]);
    assert!(lv.snapshot_names(dom).is_empty());
    let mut done: Vec<String> = Vec::new();
    while done.len() < xmls.len() {
        let before = done.len();
        for (name, xml) in &xmls {
            let ready = tree[name].as_ref().is_none_or(|p| done.contains(p));
            if done.contains(name) || !ready {
                continue;
            }
            let file = dir.join(format!("{dom}-{name}.snapshot.xml"));
            fs::write(&file, xml).unwrap();
            let out = lv.try_virsh(&[
                "snapshot-create",
                dom,
                file.to_str().unwrap(),
                "--redefine",
                "--validate",
            ]);
            assert!(
                out.status.success(),
                "redefine {name}: {}\n{xml}",
                String::from_utf8_lossy(&out.stderr)
            );
            done.push(name.clone());
        }
        assert!(done.len() > before, "parents missing: {tree:?}");
    }
    let listed: Forest = lv
        .virsh(&["snapshot-list", dom, "--parent"])
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some(((*w.first()?).to_owned(), w.get(5).map(|p| (*p).to_owned())))
        })
        .collect();
    assert_eq!(listed, tree, "libvirt's list after the redefines");
}

/// Sets up `dom` in a libvirtd of its own, the daemon mounted on it.
fn start(tag: &str, dom: &str, run: bool) -> Option<(LibvirtTest, Daemon, PathBuf, PathBuf)> {
    let mut t = LibvirtTest::start(tag)?;
    let image = t.lv.define(dom, &t.images);
    let fresh = t.dir.0.join(format!("{dom}-fresh.xml"));
    fs::write(&fresh, t.lv.virsh(&["dumpxml", "--inactive", dom])).unwrap();
    if run {
        t.lv.virsh(&["start", dom]);
    }
    let daemon = Daemon::start_with_args(&t.dir.0, &[], &["--libvirt", &t.lv.uri.clone()]);
    Some((t, daemon, fresh, image))
}

#[test]
fn libvirt_matrix_on_a_running_domain() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let Some((t, daemon, fresh, image)) = start("libvirt-matrix-run", "lvmrun", true) else {
        return;
    };
    let mut m = Matrix {
        lv: &t.lv,
        mnt: daemon.mnt.clone(),
        state: daemon.state.clone(),
        dom: "lvmrun",
        image,
        views: BTreeMap::new(),
        live: 0,
    };
    m.wait_state("running");
    m.write(0x10);
    m.check("started");

    // Create: an external checkpoint (the default mkdir), an external
    // disk-only snapshot, an internal checkpoint, an internal disk-only
    // snapshot, each after its own guest write.
    m.mkdir("c1");
    assert_eq!(m.state_file("c1"), "running");
    m.write(0x11);
    m.check("external checkpoint c1");
    m.create("d1", "no", "external");
    assert_eq!(m.state_file("d1"), "disk-snapshot");
    m.write(0x12);
    m.check("external disk-only d1");
    m.destroy_and_start("d1");
    m.create("i1", "internal", "internal");
    assert_eq!(m.state_file("i1"), "running");
    m.write(0x13);
    m.check("internal checkpoint i1");
    m.create("i2", "no", "internal");
    assert_eq!(m.state_file("i2"), "disk-snapshot");
    m.write(0x14);
    m.check("internal disk-only i2");
    m.managedsave_and_start("i2");

    // Rename, external and internal.
    m.rename("d1", "d1x");
    m.check("rename d1");
    m.rename("i1", "i1x");
    m.check("rename i1");
    let xmls = m.snapshot_xmls();

    // Revert: to the internal checkpoint in place (snapshot-load), to
    // the external disk-only snapshot (a restart through libvirt).
    m.revert("i1x", "running");
    assert!(m.running());
    m.check("revert to internal checkpoint i1x");
    m.write(0x15);
    m.revert("d1x", "running force");
    m.wait_state("running");
    m.check("revert to external disk-only d1x");
    m.write(0x16);
    m.destroy_and_start("revert to d1x");

    // A revert to the external checkpoint, running: its memory file is
    // loaded into a QEMU libvirt starts, or, where that cannot be done,
    // the revert is refused with EOPNOTSUPP, says why, and changes
    // nothing.
    let before = (m.tree(), m.active(), m.current());
    let logged = m.log().len();
    match fs::write(m.path("c1/revert"), "running") {
        Ok(()) => {
            let left: Vec<String> = m
                .tree()
                .into_keys()
                .filter(|n| !before.0.contains_key(n))
                .collect();
            assert_eq!(left.len(), 1, "{left:?}");
            m.views.insert(left[0].clone(), m.live);
            m.live = m.views["c1"];
            assert!(m.running());
            m.check("revert to external checkpoint c1, running");
            m.write(0x16);
        }
        Err(e) => {
            let log = m.log();
            assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}: {log}");
            assert!(
                log[logged.min(log.len())..].contains("memory file cannot be loaded"),
                "{log}"
            );
            assert!(m.running(), "a refused revert stopped the domain: {log}");
            assert_eq!(before, (m.tree(), m.active(), m.current()), "{log}");
            m.check("refused revert to external checkpoint c1");
        }
    }
    // Its disks alone: the domain stops, libvirt boots them.
    m.revert("c1", "shutoff force");
    m.wait_state("shutoff");
    m.check("revert to c1's disks");
    m.lv.virsh(&["start", m.dom]);
    m.wait_state("running");
    m.check("start after the revert to c1");
    m.write(0x17);
    // The internal checkpoint is now in an image below other layers: the
    // domain stops, the images are reverted, libvirt starts it again.
    m.revert("i1x", "running force");
    m.wait_state("running");
    m.check("revert to internal checkpoint i1x in a backing image");
    // A checkpoint of the paused domain.
    m.lv.virsh(&["suspend", m.dom]);
    m.wait_state("paused");
    m.mkdir("p1");
    assert_eq!(m.state_file("p1"), "paused");
    m.lv.virsh(&["resume", m.dom]);
    m.wait_state("running");
    m.write(0x18);
    m.check("checkpoint of the paused domain");

    // Delete: an external snapshot below the active layer (commit), an
    // internal one, the external checkpoint the domain runs on.
    m.rmdir("d1x");
    m.check("rmdir d1x");
    m.rmdir("i2");
    m.check("rmdir i2");
    m.rmdir("c1");
    m.check("rmdir c1");
    m.managedsave_and_start("deletes");
    m.rmdir("i1x");
    m.check("rmdir i1x");
    for name in m.tree().into_keys().filter(|n| n.starts_with("left-")) {
        m.rmdir(&name);
        m.check(&format!("rmdir {name}"));
    }
    m.destroy_and_start("deletes");
    drop(daemon);
    redefine_on_fresh_definition(&t.lv, &t.dir.0, "lvmrun", &fresh, xmls);
    eprintln!("matrix on a running domain: {:?}", t0.elapsed());
}

#[test]
fn libvirt_matrix_on_a_stopped_domain() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let Some((t, daemon, fresh, image)) = start("libvirt-matrix-off", "lvmoff", false) else {
        return;
    };
    let mut m = Matrix {
        lv: &t.lv,
        mnt: daemon.mnt.clone(),
        state: daemon.state.clone(),
        dom: "lvmoff",
        image,
        views: BTreeMap::new(),
        live: 0,
    };
    m.wait_state("shutoff");
    m.write(0x20);
    m.check("defined");

    // Create: external (an overlay made offline), internal (a tag in the
    // overlay), external again over it.
    m.mkdir("o1");
    assert_eq!(m.state_file("o1"), "shutoff");
    m.write(0x21);
    m.check("external o1");
    m.lv.virsh(&["start", m.dom]);
    m.wait_state("running");
    m.check("start after o1");
    m.lv.virsh(&["destroy", m.dom]);
    m.wait_state("shutoff");
    m.create("i1", "no", "internal");
    assert_eq!(m.state_file("i1"), "shutoff");
    m.write(0x22);
    m.check("internal i1");
    m.create("e2", "no", "external");
    m.write(0x23);
    m.check("external e2");

    // Rename, external and internal.
    m.rename("o1", "o1x");
    m.rename("i1", "i1x");
    m.check("renames");
    let xmls = m.snapshot_xmls();

    // Revert: to the internal snapshot, now in a backing image; to the
    // external one, started through libvirt; back to the internal one
    // from the running domain.
    m.revert("i1x", "shutoff");
    m.check("revert to internal i1x (in a backing image)");
    m.write(0x24);
    m.revert("o1x", "running");
    m.wait_state("running");
    m.check("revert to external o1x, running");
    m.write(0x25);
    m.revert("i1x", "shutoff force");
    m.wait_state("shutoff");
    m.check("revert to internal i1x from the running domain");
    m.lv.virsh(&["start", m.dom]);
    m.wait_state("running");
    m.check("start after the revert to i1x");
    m.lv.virsh(&["destroy", m.dom]);
    m.wait_state("shutoff");

    // Delete each, the left-* ones last.
    for name in ["o1x", "e2", "i1x"] {
        m.rmdir(name);
        m.check(&format!("rmdir {name}"));
    }
    for name in m.tree().into_keys() {
        m.rmdir(&name);
        m.check(&format!("rmdir {name}"));
    }
    m.lv.virsh(&["start", m.dom]);
    m.wait_state("running");
    m.check("start after the deletes");
    drop(daemon);
    redefine_on_fresh_definition(&t.lv, &t.dir.0, "lvmoff", &fresh, xmls);
    eprintln!("matrix on a stopped domain: {:?}", t0.elapsed());
}
