//! An internal snapshot's qcow2 tag is its name at creation, so what
//! reads the images by name (`qemu-img snapshot -l`, libvirt's
//! `snapshot-revert`) finds it; a rename keeps the tag; a name already
//! a tag in the disks' images (or a number, which qcow2 reads as its
//! own snapshot numbers) gets a fresh id as its tag, with a `.log` line.
//! A real QEMU and a real FUSE mount; bytes checked through the views
//! and by the guest.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;

use common::*;

const K64: usize = 64 * 1024;

fn tags(fx: &Fixture, target: &str) -> BTreeSet<String> {
    let d = fx.vm.disks.iter().find(|d| d.target == target).unwrap();
    image_tags(&d.image).into_iter().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn view_is(fx: &Fixture, snap: &str, byte: u8) -> bool {
    let data = fs::read(fx.path(&format!("{snap}/disks/vda"))).unwrap();
    all_bytes(&data, 0, K64, byte)
}

#[test]
fn internal_snapshots_are_tagged_with_their_names_unless_the_name_is_taken() {
    let fx = Fixture::new("internal-tags");
    // An internal checkpoint (`mkdir`) and an internal disk-only snapshot.
    fx.vm.qemu_io("vda", "write -P 0xa1 0 64k").unwrap();
    fs::create_dir(fx.path("base")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0xa2 0 64k").unwrap();
    write_file(
        &fx.path(".create"),
        b"<domainsnapshot><name>disk one</name><memory snapshot='no'/>\
          <disks><disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
          </disks></domainsnapshot>",
    )
    .unwrap_or_else(|e| panic!("{}: {}", strerror(e), fx.read(".log")));
    assert_eq!(fx.read("disk one/state"), "disk-snapshot\n");
    for d in ["vda", "vdb"] {
        assert_eq!(tags(&fx, d), set(&["base", "disk one"]), "{d}");
    }
    // `qemu-img snapshot -l` names them.
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(&fx.vm.disks[0].image)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains(" base ") && listed.contains(" disk one "),
        "{listed}"
    );

    // A rename keeps the tag.
    fs::rename(fx.path("base"), fx.path("renamed")).unwrap();
    assert_eq!(tags(&fx, "vda"), set(&["base", "disk one"]));

    // A new snapshot named like a tag in the images, and one named by a
    // number: fresh ids as tags, `.log` says why.
    fx.vm.qemu_io("vda", "write -P 0xa3 0 64k").unwrap();
    fs::create_dir(fx.path("base")).unwrap();
    let now = tags(&fx, "vda");
    let fresh: Vec<&String> = now
        .iter()
        .filter(|t| *t != "base" && *t != "disk one")
        .collect();
    assert_eq!(fresh.len(), 1, "{now:?}");
    let log = fx.read(".log");
    assert!(
        log.contains("instead of the name") && log.contains("already has a snapshot tagged"),
        "{log}"
    );
    fs::create_dir(fx.path("42")).unwrap();
    assert!(!tags(&fx, "vda").contains("42"));
    assert_eq!(tags(&fx, "vda").len(), 4);
    assert!(fx.read(".log").contains("qcow2 snapshot number"));
    assert_eq!(tags(&fx, "vdb"), tags(&fx, "vda"));

    // Every view holds its bytes.
    assert!(view_is(&fx, "renamed", 0xa1));
    assert!(view_is(&fx, "disk one", 0xa2));
    assert!(view_is(&fx, "base", 0xa3));
    assert!(view_is(&fx, "42", 0xa3));

    // Revert to the renamed snapshot (tag `base`, while the snapshot now
    // named `base` has another tag): the guest reads its bytes; the
    // state left behind is kept under a `left-*` name, its tag.
    fx.vm.qemu_io("vda", "write -P 0xa4 0 64k").unwrap();
    fx.revert("renamed", "running")
        .unwrap_or_else(|e| panic!("{}: {}", strerror(e), fx.read(".log")));
    fx.vm.qemu_io("vda", "read -q -P 0xa1 0 64k").unwrap();
    let left: Vec<String> = fx
        .ls()
        .into_iter()
        .filter(|n| n.starts_with("left-"))
        .collect();
    assert_eq!(left.len(), 1, "{:?}", fx.ls());
    assert!(
        tags(&fx, "vda").contains(&left[0]),
        "{:?}",
        tags(&fx, "vda")
    );
    assert!(view_is(&fx, &left[0], 0xa4));
    assert!(view_is(&fx, "base", 0xa3));

    // A delete removes the tag it names, not the one named alike.
    fs::remove_dir(fx.path("renamed")).unwrap();
    let after = tags(&fx, "vda");
    assert!(!after.contains("base"), "{after:?}");
    assert!(after.contains(fresh[0].as_str()), "{after:?}");
    assert!(view_is(&fx, "base", 0xa3));
    assert!(view_is(&fx, "disk one", 0xa2));
}
