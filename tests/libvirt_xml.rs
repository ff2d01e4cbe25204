//! `snapshot.xml` is libvirt's own `<domainsnapshot>`: on a real libvirtd
//! (started by the test, stopped by pid), each snapshot's `snapshot.xml`
//! read through the mount is taken unchanged by `virsh snapshot-create
//! --redefine --validate` on a fresh definition of the domain, and
//! libvirt then names the same disks, sources and memory: internal
//! disks without a source, an external disk's source the overlay the
//! snapshot created, the embedded domain libvirt's definition on the
//! snapshot's images. vmsnapfs's mirror of libvirt's snapshot list says
//! the same. Skipped, saying so, where libvirtd is not installed.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::libvirtd::*;
use common::*;
use vmsnapfs::xml::domain::parse_domain_def;
use vmsnapfs::xml::snapshot::{parse_snapshot_xml, SnapshotSpec};

/// What libvirt and vmsnapfs must agree on in a `<domainsnapshot>`.
#[derive(Debug, PartialEq)]
struct Meaning {
    name: Option<String>,
    state: Option<String>,
    parent: Option<String>,
    memory: String,
    /// (disk, kind, source)
    disks: Vec<(String, String, Option<PathBuf>)>,
    /// The embedded domain's disks: (target, image, format).
    domain_disks: Vec<(String, PathBuf, String)>,
}

fn meaning(xml: &str) -> Meaning {
    let spec: SnapshotSpec = parse_snapshot_xml(xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
    let domain = spec.domain_xml.as_deref().expect("an embedded <domain>");
    let def = parse_domain_def(domain).unwrap_or_else(|e| panic!("{e}\n{domain}"));
    Meaning {
        name: spec.name,
        state: spec.state.map(|s| s.as_str().to_owned()),
        parent: spec.parent_name,
        memory: format!("{:?}", spec.memory),
        disks: spec
            .disks
            .into_iter()
            .map(|d| {
                let kind = d.kind.map(|k| k.as_str().to_owned()).unwrap_or_default();
                (d.name, kind, d.source)
            })
            .collect(),
        domain_disks: def
            .disks
            .into_iter()
            .map(|d| (d.target, d.source, d.format))
            .collect(),
    }
}

fn create(mnt: &Path, spec: &str) {
    write_file(&mnt.join("lvx/.create"), spec.as_bytes()).unwrap_or_else(|e| {
        panic!(
            "create {spec}: {}\n{}",
            strerror(e),
            fs::read_to_string(mnt.join("lvx/.log")).unwrap()
        )
    });
}

#[test]
fn libvirt_redefines_each_snapshot_xml_unchanged_and_reads_it_the_same() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut fx) = LibvirtTest::start("libvirt-xml") else {
        return;
    };
    let (dir, images, lv) = (&fx.dir, fx.images.clone(), &mut fx.lv);
    let img = lv.define("lvx", &images);
    let fresh = dir.0.join("lvx-fresh.xml");
    fs::write(&fresh, lv.virsh(&["dumpxml", "--inactive", "lvx"])).unwrap();
    lv.virsh(&["start", "lvx"]);
    lv.guest_write("lvx", 0x41);
    let daemon = Daemon::start_with_args(&dir.0, &[], &["--libvirt", &lv.uri.clone()]);
    let mnt = daemon.mnt.clone();
    wait_until("lvx running", Duration::from_secs(30), || {
        state_of(&mnt, "lvx") == "running"
    });

    // An internal checkpoint, an internal disk-only snapshot, an
    // external disk-only snapshot and an external checkpoint.
    create(
        &mnt,
        "<domainsnapshot><name>i1</name><memory snapshot='internal'/>\
         <disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>",
    );
    create(
        &mnt,
        "<domainsnapshot><name>i2</name><memory snapshot='no'/>\
         <disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>",
    );
    create(
        &mnt,
        "<domainsnapshot><name>e1</name><memory snapshot='no'/>\
         <disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>",
    );
    let e1_overlay = active_layer_of(&daemon.state, "lvx");
    assert_ne!(e1_overlay, img);
    lv.guest_write("lvx", 0x42);
    fs::create_dir(mnt.join("lvx/e2")).unwrap();
    let e2_overlay = active_layer_of(&daemon.state, "lvx");
    assert_ne!(e2_overlay, e1_overlay);
    assert_eq!(lv.state("lvx"), "running");

    let names = ["i1", "i2", "e1", "e2"];
    let xmls: Vec<String> = names
        .iter()
        .map(|n| fs::read_to_string(mnt.join("lvx").join(n).join("snapshot.xml")).unwrap())
        .collect();
    let m: Vec<Meaning> = xmls.iter().map(|x| meaning(x)).collect();
    let none = |t: &str| ("vda".to_owned(), t.to_owned(), None::<PathBuf>);
    let qcow2 = |p: &Path| vec![("vda".to_owned(), p.to_owned(), "qcow2".to_owned())];
    // Internal: no <source>; the domain on the image the tags are in.
    assert_eq!(m[0].disks, vec![none("internal")]);
    assert_eq!(m[0].memory, "Some(Internal)");
    assert_eq!(m[0].state.as_deref(), Some("running"));
    assert_eq!(m[0].domain_disks, qcow2(&img));
    assert_eq!(m[1].disks, vec![none("internal")]);
    assert_eq!(m[1].memory, "Some(No)");
    assert_eq!(m[1].parent.as_deref(), Some("i1"));
    assert_eq!(m[1].domain_disks, qcow2(&img));
    // External: <source> is the overlay the snapshot made, the domain
    // names the image that was active (the frozen one).
    let ext = |o: &Path| vec![("vda".to_owned(), "external".to_owned(), Some(o.to_owned()))];
    assert_eq!(m[2].disks, ext(&e1_overlay));
    assert_eq!(m[2].memory, "Some(No)");
    assert_eq!(m[2].state.as_deref(), Some("disk-snapshot"));
    assert_eq!(m[2].domain_disks, qcow2(&img));
    assert_eq!(m[3].disks, ext(&e2_overlay));
    assert!(
        m[3].memory.starts_with("Some(External(Some("),
        "{}",
        xmls[3]
    );
    assert_eq!(m[3].state.as_deref(), Some("running"));
    assert_eq!(m[3].domain_disks, qcow2(&e1_overlay));
    for x in &xmls {
        // libvirt's definition: it has an <os>, ours no monitor of its own.
        assert!(x.contains("<os>") && x.contains("<uuid>"), "{x}");
    }

    // vmsnapfs's mirror in libvirt's list says the same.
    wait_until("libvirt's list mirrors", Duration::from_secs(30), || {
        lv.snapshot_names("lvx") == ["e1", "e2", "i1", "i2"]
    });
    for (n, want) in names.iter().zip(&m) {
        let got = meaning(&lv.virsh(&["snapshot-dumpxml", "lvx", n]));
        assert_eq!(&got, want, "{n} as mirrored");
    }
    drop(daemon);

    // A fresh definition of the domain takes each file unchanged, validated.
    let _ = lv.try_virsh(&["destroy", "lvx"]);
    lv.virsh(&["undefine", "lvx", "--snapshots-metadata"]);
    assert!(lv.try_virsh(&["dominfo", "lvx"]).status.code() != Some(0));
    lv.virsh(&["define", fresh.to_str().unwrap()]);
    assert!(lv.snapshot_names("lvx").is_empty());
    for (n, xml) in names.iter().zip(&xmls) {
        let file = dir.0.join(format!("{n}.snapshot.xml"));
        fs::write(&file, xml).unwrap();
        let out = lv.try_virsh(&[
            "snapshot-create",
            "lvx",
            file.to_str().unwrap(),
            "--redefine",
            "--validate",
        ]);
        assert!(
            out.status.success(),
            "redefine {n}: {}\n{xml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(lv.snapshot_names("lvx"), ["e1", "e2", "i1", "i2"]);
    for (n, want) in names.iter().zip(&m) {
        let got = meaning(&lv.virsh(&["snapshot-dumpxml", "lvx", n]));
        assert_eq!(&got, want, "{n} as libvirt reads it");
    }
    drop(fx);
}

/// libvirt's own `virsh snapshot-revert` finds an internal snapshot
/// vmsnapfs took, once its `snapshot.xml` is redefined on a fresh
/// definition: the qcow2 tag is the snapshot's name. The guest then
/// reads the snapshot's bytes; after a re-mount every view holds its own.
#[test]
fn libvirt_reverts_to_an_internal_checkpoint_vmsnapfs_took() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut fx) = LibvirtTest::start("libvirt-tags") else {
        return;
    };
    let (dir, images, lv) = (&fx.dir, fx.images.clone(), &mut fx.lv);
    let img = lv.define("lvx", &images);
    let fresh = dir.0.join("lvx-fresh.xml");
    fs::write(&fresh, lv.virsh(&["dumpxml", "--inactive", "lvx"])).unwrap();
    lv.virsh(&["start", "lvx"]);
    lv.guest_write("lvx", 0x41);
    let uri = lv.uri.clone();
    let daemon = Daemon::start_with_args(&dir.0, &[], &["--libvirt", &uri]);
    let mnt = daemon.mnt.clone();
    wait_until("lvx running", Duration::from_secs(30), || {
        state_of(&mnt, "lvx") == "running"
    });
    create(
        &mnt,
        "<domainsnapshot><name>i1</name><memory snapshot='internal'/>\
         <disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>",
    );
    lv.guest_write("lvx", 0x42);
    create(
        &mnt,
        "<domainsnapshot><name>i2</name><memory snapshot='no'/>\
         <disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>",
    );
    lv.guest_write("lvx", 0x43);
    let mut tags = image_tags(&img);
    tags.sort();
    assert_eq!(tags, ["i1", "i2"]);
    let xmls: Vec<String> = ["i1", "i2"]
        .iter()
        .map(|n| fs::read_to_string(mnt.join("lvx").join(n).join("snapshot.xml")).unwrap())
        .collect();
    drop(daemon);

    // A fresh definition, the snapshots redefined from the files.
    lv.virsh(&["destroy", "lvx"]);
    lv.virsh(&["undefine", "lvx", "--snapshots-metadata"]);
    lv.virsh(&["define", fresh.to_str().unwrap()]);
    for (n, xml) in ["i1", "i2"].iter().zip(&xmls) {
        let file = dir.0.join(format!("{n}.snapshot.xml"));
        fs::write(&file, xml).unwrap();
        lv.virsh(&[
            "snapshot-create",
            "lvx",
            file.to_str().unwrap(),
            "--redefine",
            "--validate",
        ]);
    }
    // libvirt reverts the running domain to the checkpoint by its name.
    lv.virsh(&["start", "lvx"]);
    lv.guest_write("lvx", 0x44);
    lv.virsh(&["snapshot-revert", "lvx", "i1"]);
    assert_eq!(lv.state("lvx"), "running");
    assert!(
        lv.guest_reads("lvx", 0x41),
        "the guest after libvirt's revert"
    );
    assert_eq!(
        lv.virsh(&["snapshot-current", "lvx", "--name"]).trim(),
        "i1"
    );

    // Mounted again: the views hold their bytes, the domain runs.
    let daemon = Daemon::start_with_args(&dir.0, &[], &["--libvirt", &uri]);
    let mnt = daemon.mnt.clone();
    wait_until("lvx running again", Duration::from_secs(30), || {
        state_of(&mnt, "lvx") == "running"
    });
    assert!(view_holds(&mnt, "lvx/i1/disks/vda", 0x41));
    assert!(view_holds(&mnt, "lvx/i2/disks/vda", 0x42));
    drop(daemon);
    drop(fx);
}
