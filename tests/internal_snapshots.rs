//! Internal checkpoints end to end: a real QEMU, a real FUSE mount, every
//! action through the tree, every byte checked on the guest's disks.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, UNIX_EPOCH};

use common::*;

const K64: usize = 64 * 1024;

#[test]
fn browse_create_revert_delete_rename_on_a_running_vm() {
    let fx = Fixture::new("lifecycle");
    // The tree: domains at the top (and the jobs of all), snapshots (none
    // yet) in a domain.
    let top: Vec<_> = fs::read_dir(&fx.daemon.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(top, vec![".jobs", ".stats", "vm1"]);
    assert_eq!(fs::read_to_string(fx.daemon.mnt.join(".jobs")).unwrap(), "");
    assert!(fx.ls().is_empty());
    assert_eq!(fx.read(".state"), "running\n");
    assert!(fx.read(".domain.xml").contains("<name>vm1</name>"));
    assert_eq!(fx.read(".tree"), "");
    assert!(fs::symlink_metadata(fx.path(".current")).is_err());

    // First checkpoint over known data.
    fx.vm.qemu_io("vda", "write -P 0xab 0 64k").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0x11 1M 64k").unwrap();
    let before = std::time::SystemTime::now();
    fs::create_dir(fx.path("base")).unwrap();
    assert_eq!(fx.ls(), vec!["base"]);
    assert_eq!(fx.read("base/state"), "running\n");
    let xml = fx.read("base/snapshot.xml");
    assert!(xml.contains("<name>base</name>"), "{xml}");
    assert!(xml.contains("<state>running</state>"), "{xml}");
    assert!(
        xml.contains("snapshot='internal'") || xml.contains("snapshot=\"internal\""),
        "{xml}"
    );
    assert!(xml.contains("<domain"), "{xml}");
    let mtime = fs::metadata(fx.path("base")).unwrap().mtime();
    let t0 = before.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((t0 - 1..=t0 + 5).contains(&mtime), "mtime {mtime} vs {t0}");
    assert_eq!(
        fs::read_link(fx.path(".current")).unwrap().to_str(),
        Some("base")
    );
    assert!(fs::symlink_metadata(fx.path("base/parent")).is_err());
    // The images hold the tag of the snapshot, on both disks.
    for d in &fx.vm.disks {
        assert_eq!(image_tags(&d.image).len(), 1, "{}", d.image.display());
    }

    // A second one, after more writes: a child of the first.
    fx.vm.qemu_io("vda", "write -P 0xcd 0 64k").unwrap();
    fs::create_dir(fx.path("after")).unwrap();
    assert_eq!(
        fs::read_link(fx.path("after/parent")).unwrap().to_str(),
        Some("../base")
    );
    assert_eq!(fx.read(".tree"), "base (running)\n  after (running) *\n");
    fx.vm.qemu_io("vda", "write -P 0xef 0 64k").unwrap();

    // Revert to the first: same QEMU process, data back, still running.
    let pid = fx.vm.current_pid();
    fx.revert("base", "running discard\n").unwrap();
    assert_eq!(fx.vm.current_pid(), pid, "revert must not restart QEMU");
    assert_eq!(fx.read(".state"), "running\n");
    let vda = fx.vm.read_disk("vda").unwrap();
    assert!(all_bytes(&vda, 0, K64, 0xab), "vda not reverted");
    let vdb = fx.vm.read_disk("vdb").unwrap();
    assert!(all_bytes(&vdb, 1 << 20, K64, 0x11), "vdb not reverted");
    assert_eq!(
        fs::read_link(fx.path(".current")).unwrap().to_str(),
        Some("base")
    );

    // Revert to the second, paused.
    fx.revert("after", "paused discard").unwrap();
    assert_eq!(fx.read(".state"), "paused\n");
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, K64, 0xcd));
    fx.revert("after", "running discard").unwrap();
    assert_eq!(fx.read(".state"), "running\n");

    // A branch: a new snapshot under "base" after reverting to it.
    fx.revert("base", "discard\n").unwrap();
    fs::create_dir(fx.path("branch")).unwrap();
    assert_eq!(
        fx.read(".tree"),
        "base (running)\n  after (running)\n  branch (running) *\n"
    );

    // snapshot.xml takes a new description, and nothing else.
    let mut xml = fx.read("branch/snapshot.xml");
    xml = xml.replace(
        "<name>branch</name>",
        "<name>branch</name>\n  <description>before the upgrade</description>",
    );
    write_file(&fx.path("branch/snapshot.xml"), xml.as_bytes()).unwrap();
    assert!(fx
        .read("branch/snapshot.xml")
        .contains("<description>before the upgrade</description>"));
    let renamed = fx
        .read("branch/snapshot.xml")
        .replace("<name>branch</name>", "<name>sneaky</name>");
    let r = fs::write(fx.path("branch/snapshot.xml"), renamed);
    assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EINVAL)));
    assert!(fx.read(".log").contains("only <description> may change"));
    assert_eq!(fx.ls(), vec!["after", "base", "branch"]);

    // Rename keeps identity, links and the tree.
    fs::rename(fx.path("branch"), fx.path("side")).unwrap();
    assert_eq!(fx.ls(), vec!["after", "base", "side"]);
    assert_eq!(
        fs::read_link(fx.path(".current")).unwrap().to_str(),
        Some("side")
    );
    assert!(fx.read("side/snapshot.xml").contains("<name>side</name>"));
    assert_eq!(
        errno(fs::rename(fx.path("side"), fx.path("after"))),
        libc::EEXIST
    );

    // Delete the root: its children become roots; current stays.
    fs::remove_dir(fx.path("base")).unwrap();
    assert_eq!(fx.ls(), vec!["after", "side"]);
    assert_eq!(fx.read(".tree"), "after (running)\nside (running) *\n");
    assert!(fs::symlink_metadata(fx.path("after/parent")).is_err());
    for d in &fx.vm.disks {
        assert_eq!(image_tags(&d.image).len(), 2, "tag of base must be gone");
    }
    // Data of the others untouched: revert to "after" still gives 0xcd.
    fx.revert("after", "running discard").unwrap();
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, K64, 0xcd));

    // Delete the current one: current moves to its parent (none: a root).
    fs::remove_dir(fx.path("after")).unwrap();
    assert!(fs::symlink_metadata(fx.path(".current")).is_err());
    let log = fx.read(".log");
    assert!(log.contains("mkdir \"base\": created"), "{log}");
    assert!(log.contains("rmdir \"after\": deleted"), "{log}");
}

#[test]
fn revert_rules_stopped_vm_and_restart_from_command_line() {
    let fx = Fixture::new("rules");
    fx.vm.qemu_io("vda", "write -P 0x5a 0 64k").unwrap();
    fs::create_dir(fx.path("live")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x00 0 64k").unwrap();

    // Leaving a running VM for a stopped state needs force.
    assert_eq!(fx.revert("live", "shutoff"), Err(libc::EPERM));
    assert!(fx.read(".log").contains("refused (EPERM)"));
    assert_eq!(fx.revert("live", "sideways"), Err(libc::EINVAL));
    assert_eq!(fx.read(".state"), "running\n");
    fx.revert("live", "shutoff force").unwrap();
    assert_eq!(fx.read(".state"), "shutoff\n");
    // Disks reverted offline: the image content is the snapshot's.
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, K64, 0x5a));

    // A snapshot of the stopped domain: disks only, with qemu-img.
    fs::create_dir(fx.path("cold")).unwrap();
    assert_eq!(fx.read("cold/state"), "shutoff\n");
    assert!(
        fx.read("cold/snapshot.xml").contains("snapshot='no'")
            || fx.read("cold/snapshot.xml").contains("snapshot=\"no\"")
    );

    // Revert to the checkpoint from stopped: QEMU started again from the
    // definition's command line, RAM and disks loaded, running.
    fx.revert("live", "\n").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, K64, 0x5a));

    // Reverting the running VM to a disk-only snapshot restarts QEMU: force.
    fx.vm.qemu_io("vda", "write -P 0x77 0 64k").unwrap();
    assert_eq!(fx.revert("cold", "running"), Err(libc::EPERM));
    fx.revert("cold", "running force").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, K64, 0x5a));
    // The default for a shutoff snapshot is to stay stopped: needs force.
    assert_eq!(fx.revert("cold", "\n"), Err(libc::EPERM));
    fx.revert("cold", "force").unwrap();
    assert_eq!(fx.read(".state"), "shutoff\n");
    // Paused start from stopped.
    fx.revert("live", "paused").unwrap();
    assert_eq!(fx.read(".state"), "paused\n");
    std::thread::sleep(Duration::from_millis(10));
}

/// Writes `data` to `path` and closes it, returning the errno of write(2)
/// or of close(2) (where a document that never became whole is refused).
fn write_and_close(path: &std::path::Path, data: &[u8]) -> Result<(), i32> {
    use std::os::fd::IntoRawFd;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    std::io::Write::write_all(&mut f, data).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let fd = f.into_raw_fd();
    // SAFETY: closing the descriptor this function owns.
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    Ok(())
}

#[test]
fn create_from_a_libvirt_spec() {
    let fx = Fixture::new("create-spec");
    let create = fx.path(".create");
    assert_eq!(
        fs::metadata(&create).unwrap().permissions().mode() & 0o777,
        0o200
    );
    fx.vm.qemu_io("vda", "write -P 0x61 0 64k").unwrap();
    fx.vm.qemu_io("vdb", "write -P 0x62 0 64k").unwrap();
    let want_vda = fx.vm.read_disk("vda").unwrap();

    // Disks only, atomically across both disks, with a description.
    let spec = "<domainsnapshot>\n  <name>disks-only</name>\n  <description>nightly</description>\n  \
                <memory snapshot='no'/>\n  <disks>\n    <disk name='vda' snapshot='internal'/>\n    \
                <disk name='vdb'/>\n  </disks>\n</domainsnapshot>\n";
    write_and_close(&create, spec.as_bytes()).unwrap();
    assert_eq!(fx.read("disks-only/state"), "disk-snapshot\n");
    let xml = fx.read("disks-only/snapshot.xml");
    assert!(xml.contains("<description>nightly</description>"), "{xml}");
    assert!(
        xml.contains("<memory snapshot='no'/>") || xml.contains("<memory snapshot=\"no\"/>"),
        "{xml}"
    );
    for d in &fx.vm.disks {
        assert_eq!(image_tags(&d.image).len(), 1);
    }
    assert!(fs::read(fx.path("disks-only/disks/vda")).unwrap() == want_vda);

    // The default memory is a checkpoint; parent is the current one.
    write_and_close(
        &create,
        b"<domainsnapshot><name>full</name></domainsnapshot>",
    )
    .unwrap();
    assert_eq!(fx.read("full/state"), "running\n");
    assert_eq!(
        fs::read_link(fx.path("full/parent")).unwrap().to_str(),
        Some("../disks-only")
    );

    // Refusals: from write(2), with a line in .log; nothing made.
    let external = "<domainsnapshot><name>ext</name><disks><disk name='vda' snapshot='external'>\
                    <source file='/tmp/x.qcow2'/></disk><disk name='vdb' snapshot='internal'/>\
                    </disks></domainsnapshot>";
    assert_eq!(
        write_and_close(&create, external.as_bytes()),
        Err(libc::EOPNOTSUPP)
    );
    assert_eq!(
        write_and_close(
            &create,
            b"<domainsnapshot><name>full</name></domainsnapshot>"
        ),
        Err(libc::EEXIST)
    );
    assert_eq!(
        write_and_close(
            &create,
            b"<domainsnapshot><disks><disk name='vdz'/></disks></domainsnapshot>"
        ),
        Err(libc::EINVAL)
    );
    // A document that never becomes whole is refused when the file closes.
    assert_eq!(
        write_and_close(&create, b"<domainsnapshot><name>half"),
        Err(libc::EINVAL)
    );
    let log = fx.read(".log");
    assert!(log.contains("refused (EOPNOTSUPP)"), "{log}");
    assert!(log.contains("refused (EEXIST)"), "{log}");
    assert_eq!(fx.ls(), vec!["disks-only", "full"]);
    for d in &fx.vm.disks {
        assert_eq!(image_tags(&d.image).len(), 2);
    }

    // Reverting the running VM to the disk-only snapshot restarts QEMU: force.
    fx.vm.qemu_io("vda", "write -P 0x00 0 64k").unwrap();
    assert_eq!(fx.revert("disks-only", "running"), Err(libc::EPERM));
    fx.revert("disks-only", "running force").unwrap();
    assert_eq!(fx.read(".state"), "running\n");
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, K64, 0x61));
    assert!(all_bytes(&fx.vm.read_disk("vdb").unwrap(), 0, K64, 0x62));
}

#[test]
fn disk_only_policy_makes_mkdir_take_disks_only() {
    let dir = TempDir::new("policy");
    let vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).unwrap();
    let def = vm.write_definition(&dir.0.join("domains")).unwrap();
    let xml = fs::read_to_string(&def)
        .unwrap()
        .replace("</domain>", "  <snapshot policy='disk-only'/>\n</domain>");
    fs::write(&def, xml).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    let vm1 = daemon.mnt.join("vm1");
    vm.qemu_io("vda", "write -P 0x71 0 64k").unwrap();
    fs::create_dir(vm1.join("quick")).unwrap();
    assert_eq!(
        fs::read_to_string(vm1.join("quick/state")).unwrap(),
        "disk-snapshot\n"
    );
    for d in &vm.disks {
        assert_eq!(image_tags(&d.image).len(), 1);
    }
    // A spec can still ask for a checkpoint.
    let spec = b"<domainsnapshot><name>full</name><memory snapshot='internal'/></domainsnapshot>";
    write_file(&vm1.join(".create"), spec).unwrap();
    assert_eq!(
        fs::read_to_string(vm1.join("full/state")).unwrap(),
        "running\n"
    );
    vm.qemu_io("vda", "write -P 0x00 0 64k").unwrap();
    assert_eq!(
        write_file(&vm1.join("quick/revert"), b"running"),
        Err(libc::EPERM),
        "reverting a running VM to disks only restarts QEMU"
    );
    drop(daemon);
    drop(vm);
}
