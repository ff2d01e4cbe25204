//! Tables of the domain's decisions, run on the in-memory hypervisor and
//! images of [`super::fake`]: what a revert does to QEMU and when it is
//! refused, and what a delete keeps, merges or removes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fake::{FakeBackend, FakeImage, FakeImages};
use super::Domain;
use crate::error::ErrorKind;
use crate::model::DomainState;
use crate::store::DomainStore;
use crate::xml::parse_domain_def;

use DomainState::{Paused, Running, Shutoff};

/// A domain with two qcow2 disks on the fake hypervisor.
struct World {
    dir: PathBuf,
    images: Arc<FakeImages>,
    backend: Arc<FakeBackend>,
    dom: Domain,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn world(tag: &str, policy: &str, state: DomainState, can_start: bool) -> World {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("vmsnapfs-tables-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let img = |d: &str| dir.join("img").join(format!("vm-{d}.qcow2"));
    let xml = format!(
        "<domain><name>vm</name><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda'/></disk>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vdb'/></disk>\
         </devices><snapshot policy='{policy}'/></domain>",
        img("vda").display(),
        img("vdb").display()
    );
    let def = parse_domain_def(&xml).unwrap();
    let images = Arc::new(FakeImages::default());
    for d in &def.disks {
        images.add(
            &d.source,
            FakeImage {
                format: "qcow2".into(),
                own: 100,
                ..Default::default()
            },
        );
    }
    let mut backend = FakeBackend::new(images.clone(), def.disks.clone(), state);
    backend.can_start = can_start;
    let backend = Arc::new(backend);
    let store = DomainStore::open(&dir.join("state"), "vm").unwrap();
    let dom = Domain::open(def, store, backend.clone(), images.clone()).unwrap();
    dom.start_up();
    World {
        dir,
        images,
        backend,
        dom,
    }
}

impl World {
    /// Takes snapshot `name` (as `mkdir` does) in state `state`.
    fn snap(&self, name: &str, state: DomainState) {
        *self.backend.state.lock() = state;
        self.dom.create(name.as_bytes()).unwrap();
    }

    /// Sets the own data of an image.
    fn own(&self, image: &Path, bytes: u64) {
        self.images
            .images
            .lock()
            .get_mut(image)
            .expect("known image")
            .own = bytes;
    }

    /// The calls to the hypervisor made by `f`, or its errno.
    fn calls_of(&self, f: impl FnOnce() -> crate::error::Result<()>) -> Result<Vec<String>, i32> {
        let before = self.backend.calls.lock().len();
        f().map_err(|e| e.kind.errno())?;
        Ok(self.backend.calls.lock()[before..].to_vec())
    }

    fn image(&self, name: &str) -> PathBuf {
        self.dir.join("img").join(name)
    }

    fn point(&self, snap: &str, target: &str) -> PathBuf {
        let f = self.dom.forest();
        let s = f.by_name(snap).expect("snapshot");
        s.disks
            .iter()
            .find(|d| d.target == target)
            .and_then(|d| d.image.clone())
            .expect("a point image")
    }
}

/// Reverts to an internal snapshot in the active layers: what happens to
/// QEMU, and the refusals, for each kind of snapshot, state and request
/// (the user guide's table "Internal snapshots in the active layers").
#[test]
fn internal_revert_table() {
    type Row = (
        &'static str, // policy that took the snapshot
        DomainState,  // domain now
        &'static str, // request
        bool,         // a command line is known
        Result<&'static [&'static str], i32>,
    );
    let rows: &[Row] = &[
        // A checkpoint of a running domain: in place.
        (
            "internal",
            Running,
            "running",
            true,
            Ok(&["create-internal ram=true", "load-live"]),
        ),
        (
            "internal",
            Paused,
            "running",
            true,
            Ok(&["create-internal ram=true", "load-live", "cont"]),
        ),
        (
            "internal",
            Running,
            "paused discard",
            true,
            Ok(&["load-live", "pause"]),
        ),
        ("internal", Running, "shutoff", true, Err(libc::EPERM)),
        (
            "internal",
            Running,
            "shutoff force",
            true,
            Ok(&["create-internal ram=true", "stop", "apply-offline"]),
        ),
        (
            "internal",
            Shutoff,
            "running",
            true,
            Ok(&["create-internal ram=false", "start loadvm"]),
        ),
        ("internal", Shutoff, "running", false, Err(libc::EOPNOTSUPP)),
        (
            "internal",
            Shutoff,
            "shutoff",
            false,
            Ok(&["create-internal ram=false", "apply-offline"]),
        ),
        // Disks only: a running domain restarts, with force only.
        ("disk-only", Running, "running", true, Err(libc::EPERM)),
        ("disk-only", Paused, "", true, Err(libc::EPERM)),
        (
            "disk-only",
            Running,
            "running force",
            true,
            Ok(&[
                "create-internal ram=false",
                "stop",
                "apply-offline",
                "start",
            ]),
        ),
        (
            "disk-only",
            Running,
            "running force discard",
            false,
            Err(libc::EOPNOTSUPP),
        ),
        (
            "disk-only",
            Shutoff,
            "paused",
            true,
            Ok(&["create-internal ram=false", "apply-offline", "start paused"]),
        ),
        (
            "disk-only",
            Shutoff,
            "shutoff discard",
            true,
            Ok(&["apply-offline"]),
        ),
    ];
    for (i, (policy, live, request, can_start, want)) in rows.iter().enumerate() {
        let w = world(&format!("irev{i}"), policy, Running, *can_start);
        w.snap("s", Running);
        *w.backend.state.lock() = *live;
        let got = w.calls_of(|| w.dom.revert("s", request.as_bytes()));
        let want = want.map(|c| c.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            got, want,
            "row {i}: {policy} {live:?} {request:?} start={can_start}"
        );
        if got.is_err() {
            // Refused before anything changed: the left-* snapshot too.
            assert_eq!(w.dom.forest().len(), 1, "row {i}");
            assert!(w.dom.log_text().contains("refused ("), "row {i}");
        }
    }
}

/// A revert or a delete while the hypervisor cannot change its disks is
/// EBUSY before anything changes; a revert to `shutoff` is not.
#[test]
fn disks_unavailable_is_ebusy() {
    let w = world("busy", "internal", Running, true);
    w.snap("s", Running);
    *w.backend.unavailable.lock() = Some("the disks are inactive".into());
    assert_eq!(
        w.calls_of(|| w.dom.revert("s", b"running")),
        Err(libc::EBUSY)
    );
    assert_eq!(w.calls_of(|| w.dom.delete("s")), Err(libc::EBUSY));
    assert!(w.dom.log_text().contains("the disks are inactive"));
    assert!(w
        .calls_of(|| w.dom.revert("s", b"shutoff force discard"))
        .is_ok());
}

/// Reverts to an external snapshot: the guest's devices switch in place
/// for disks only (with force), a checkpoint restarts QEMU (no force).
#[test]
fn external_revert_table() {
    type Row = (
        &'static str,
        DomainState,
        &'static str,
        Result<&'static [&'static str], i32>,
    );
    let rows: &[Row] = &[
        ("external-disk-only", Running, "running", Err(libc::EPERM)),
        (
            "external-disk-only",
            Running,
            "running force",
            Ok(&["pause", "switch-devices", "cont"]),
        ),
        ("external-disk-only", Running, "shutoff", Err(libc::EPERM)),
        (
            "external-disk-only",
            Running,
            "shutoff force",
            Ok(&["pause", "stop"]),
        ),
        ("external-disk-only", Shutoff, "running", Ok(&["start"])),
        (
            "external",
            Running,
            "running",
            Ok(&["pause", "stop", "start loadvm"]),
        ),
        ("external", Paused, "", Ok(&["stop", "start loadvm"])),
        ("external", Shutoff, "shutoff", Ok(&[])),
    ];
    for (i, (policy, live, request, want)) in rows.iter().enumerate() {
        let w = world(&format!("xrev{i}"), policy, Running, true);
        w.snap("s", Running);
        *w.backend.state.lock() = *live;
        let got = w.calls_of(|| w.dom.revert("s", request.as_bytes()));
        let want = want.map(|c| c.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(got, want, "row {i}: {policy} {live:?} {request:?}");
        if got.is_ok() {
            // A branch: the snapshot's point images stay, under new overlays.
            let active = w.backend.active.lock().clone();
            for d in &active {
                assert!(d.source.to_string_lossy().contains(".s.revert-"), "{d:?}");
                assert_eq!(
                    w.images.images.lock()[&d.source].backing.as_deref(),
                    Some(w.point("s", &d.target).as_path())
                );
            }
        }
    }
}

/// Deletes of external snapshots on a chain base <- e1 <- e2 <- e3 (the
/// active overlays above): which image is merged which way, and which
/// file is removed (the user guide's "Delete" rules).
#[test]
fn external_delete_table() {
    // (delete, own bytes of e1's and e2's overlays, merge, file removed)
    type Row = (&'static str, u64, u64, &'static str, &'static str);
    let rows: &[Row] = &[
        // The definition's own image is never streamed away: commit.
        (
            "e1",
            5,
            5,
            "commit vm-vda.e1.qcow2 vm-vda.qcow2",
            "vm-vda.e1.qcow2",
        ),
        // Between two overlays: the side with less data is copied.
        (
            "e2",
            50,
            5,
            "commit vm-vda.e2.qcow2 vm-vda.e1.qcow2",
            "vm-vda.e2.qcow2",
        ),
        (
            "e2",
            5,
            50,
            "stream vm-vda.e2.qcow2 vm-vda.e1.qcow2",
            "vm-vda.e1.qcow2",
        ),
    ];
    for (i, (name, own1, own2, merge, removed)) in rows.iter().enumerate() {
        let w = world(&format!("xdel{i}"), "external-disk-only", Shutoff, true);
        for s in ["e1", "e2", "e3"] {
            w.snap(s, Shutoff);
        }
        for d in ["vda", "vdb"] {
            w.own(&w.image(&format!("vm-{d}.e1.qcow2")), *own1);
            w.own(&w.image(&format!("vm-{d}.e2.qcow2")), *own2);
        }
        let calls = w.calls_of(|| w.dom.delete(name)).unwrap();
        assert_eq!(calls[0], *merge, "row {i}: {calls:?}");
        assert_eq!(calls.len(), 2, "row {i}: one merge per disk: {calls:?}");
        assert!(!w.image(removed).exists(), "row {i}: {removed} stays");
        for kept in [
            "vm-vda.qcow2",
            "vm-vda.e1.qcow2",
            "vm-vda.e2.qcow2",
            "vm-vda.e3.qcow2",
        ] {
            if kept != *removed {
                assert!(w.image(kept).exists(), "row {i}: {kept} removed");
            }
        }
        // Every other snapshot still names an image that exists.
        for s in w.dom.forest().iter() {
            for d in &s.disks {
                assert!(d.image.as_ref().unwrap().exists(), "row {i}: {s:?}");
            }
        }
    }
}

/// A point image that is the backing of two branches, or under an image
/// holding internal snapshots, stays; nothing is merged.
#[test]
fn external_delete_keeps_shared_points() {
    // Two branches: a revert to e1 puts a new overlay on e1's point.
    let w = world("xkeep", "external-disk-only", Shutoff, true);
    w.snap("e1", Shutoff);
    w.snap("e2", Shutoff);
    w.calls_of(|| w.dom.revert("e1", b"shutoff discard"))
        .unwrap();
    let calls = w.calls_of(|| w.dom.delete("e1")).unwrap();
    assert!(calls.is_empty(), "{calls:?}");
    assert!(w.image("vm-vda.qcow2").exists());
    assert!(w.dom.log_text().contains("backing image of 2 images"));

    // An internal snapshot in the image above the point.
    let w = world("xtags", "external-disk-only", Shutoff, true);
    w.snap("e1", Shutoff);
    for d in ["vda", "vdb"] {
        let overlay = w.image(&format!("vm-{d}.e1.qcow2"));
        w.images
            .images
            .lock()
            .get_mut(&overlay)
            .unwrap()
            .tags
            .push(("other".into(), false));
    }
    let calls = w.calls_of(|| w.dom.delete("e1")).unwrap();
    assert!(calls.is_empty(), "{calls:?}");
    assert!(w.dom.log_text().contains("holds internal snapshots"));
}

/// An open memory file holds its snapshot: EBUSY, nothing merged.
#[test]
fn external_delete_of_an_open_snapshot_is_ebusy() {
    let w = world("xbusy", "external", Running, true);
    w.snap("c1", Running);
    let snap = w.dom.forest().by_name("c1").unwrap().clone();
    let (_view, hold) = w
        .dom
        .views()
        .open_memory(&snap, super::views::Holder { pid: 1, uid: 0 })
        .unwrap();
    assert_eq!(w.calls_of(|| w.dom.delete("c1")), Err(libc::EBUSY));
    assert!(w.dom.log_text().contains("is open (held by"));
    w.dom.views().close(&hold);
    let calls = w.calls_of(|| w.dom.delete("c1")).unwrap();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(ErrorKind::Busy.errno(), libc::EBUSY);
}

/// Reverts to an internal snapshot in an image that is no longer the
/// active layer (an overlay was put on it): QEMU is stopped, the image's
/// current contents copied out, the overlay rebased onto the copy, the
/// image reverted in place; QEMU started as asked.
#[test]
fn backing_revert_table() {
    type Row = (
        DomainState,
        &'static str,
        Result<(&'static [&'static str], &'static [&'static str]), i32>,
    );
    let rows: &[Row] = &[
        (
            Running,
            "running",
            Ok((&["stop", "start loadvm"], &["copy", "rebase", "apply"])),
        ),
        (Running, "shutoff", Err(libc::EPERM)),
        (
            Running,
            "shutoff force",
            Ok((&["stop"], &["copy", "rebase", "apply"])),
        ),
        (
            Shutoff,
            "paused",
            Ok((&["start loadvm paused"], &["copy", "rebase", "apply"])),
        ),
        (Shutoff, "shutoff", Ok((&[], &["copy", "rebase", "apply"]))),
    ];
    for (i, (live, request, want)) in rows.iter().enumerate() {
        let w = world(&format!("brev{i}"), "internal", Running, true);
        w.snap("i", Running);
        // An overlay over each disk's image, made active.
        let mut layers = Vec::new();
        for d in ["vda", "vdb"] {
            let base = w.image(&format!("vm-{d}.qcow2"));
            let overlay = w.image(&format!("vm-{d}.top.qcow2"));
            w.images.add(
                &overlay,
                FakeImage {
                    backing: Some(base),
                    format: "qcow2".into(),
                    own: 1,
                    ..Default::default()
                },
            );
            layers.push((d.to_owned(), overlay));
        }
        crate::backend::Backend::set_active_layers(w.backend.as_ref(), &layers).unwrap();
        *w.backend.state.lock() = *live;
        let before = w.images.calls.lock().len();
        let got = w.calls_of(|| w.dom.revert("i", request.as_bytes()));
        match (got, want) {
            (Err(e), Err(want)) => assert_eq!(e, *want, "row {i}"),
            (Ok(calls), Ok((backend, images))) => {
                assert_eq!(calls, backend.to_vec(), "row {i}");
                let done: Vec<String> = w.images.calls.lock()[before..]
                    .iter()
                    .map(|c| c.split(' ').next().unwrap().to_owned())
                    .collect();
                // Each step once per disk, the in-place revert last.
                assert_eq!(done.len(), 2 * images.len(), "row {i}: {done:?}");
                let copies = done.iter().filter(|c| *c == "copy").count();
                assert_eq!(copies, 2, "row {i}: {done:?}");
                assert_eq!(done.last().map(String::as_str), Some("apply"), "row {i}");
                // The overlay now backs onto the copy; the image is active.
                for d in ["vda", "vdb"] {
                    let top = w.image(&format!("vm-{d}.top.qcow2"));
                    let b = w.images.images.lock()[&top].backing.clone().unwrap();
                    assert!(b.to_string_lossy().contains(".moved-"), "row {i}: {b:?}");
                    let active = w.backend.active.lock().clone();
                    let a = active.iter().find(|a| a.target == d).unwrap();
                    assert_eq!(a.source, w.image(&format!("vm-{d}.qcow2")), "row {i}");
                }
            }
            (got, _) => panic!("row {i}: {got:?}, want {want:?}"),
        }
    }
}

/// An image path that is not UTF-8 (a layer QEMU reported, say) cannot be
/// named in snapshot.xml: an external snapshot or revert that would have
/// to is refused (EINVAL, .log says why) before anything is made.
#[test]
fn paths_xml_cannot_name_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    let w = world("utf8", "external-disk-only", Running, true);
    w.snap("e1", Running);
    let odd = w
        .dir
        .join("img")
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.qcow2"));
    w.images.add(
        &odd,
        FakeImage {
            backing: Some(w.image("vm-vda.e1.qcow2")),
            format: "qcow2".into(),
            ..Default::default()
        },
    );
    crate::backend::Backend::set_active_layers(w.backend.as_ref(), &[("vda".into(), odd)]).unwrap();
    let files = |w: &World| std::fs::read_dir(w.dir.join("img")).unwrap().count();
    let before = files(&w);
    assert_eq!(
        w.calls_of(|| w.dom.create(b"e2").map(drop)),
        Err(libc::EINVAL)
    );
    assert_eq!(
        w.calls_of(|| w.dom.revert("e1", b"running force")),
        Err(libc::EINVAL)
    );
    assert_eq!(files(&w), before, "nothing made");
    assert_eq!(w.dom.forest().len(), 1);
    let log = w.dom.log_text();
    assert!(
        log.contains("refused (EINVAL)") && log.contains("is not UTF-8"),
        "{log}"
    );
}
