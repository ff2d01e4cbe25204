//! A writable disk vmsnapfs cannot snapshot (here a block device, a loop
//! device attached to the VM) is never silently left out: a snapshot
//! without it would not match the guest's state (a checkpoint reverted
//! would run the guest's RAM against a disk from later). `mkdir` is
//! refused (EOPNOTSUPP, `.log`, nothing made) until the disk is left out
//! on purpose: `snapshot='no'` on the disk in the definition, or `<disk
//! name='vdz' snapshot='no'/>` in a `.create` spec. A revert then leaves
//! that disk as it is. On a real QEMU and a real FUSE mount.

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// The definition of `vm` with the block disk vdz, `attr` on its `<disk>`.
fn write_definition(vm: &Vm, domains: &Path, dev: &str, attr: &str) {
    let disk = format!(
        "    <disk type='block' device='disk'{attr}>\n      <driver name='qemu' type='raw'/>\n      \
         <source dev='{dev}'/>\n      <target dev='vdz' bus='virtio'/>\n    </disk>\n  </devices>"
    );
    let xml = vm.definition_xml().replacen("  </devices>", &disk, 1);
    fs::create_dir_all(domains).unwrap();
    fs::write(domains.join("vm1.xml"), xml).unwrap();
}

#[test]
fn a_block_disk_is_left_out_only_on_purpose() {
    let dir = TempDir::new("otherdisk");
    let backing = dir.0.join("vdz.raw");
    let lp = LoopDevice::new(&backing, 16);
    let mut vm = Vm::create(
        &VmSpec::small("vm1"),
        &dir.0.join("images"),
        "qemu-system-x86_64",
    )
    .expect("create the VM");
    vm.policy = Some("internal".into());
    vm.argv.extend([
        "-drive".into(),
        format!("file={},format=raw,if=none,id=blk0,cache=none", lp.0),
        "-device".into(),
        "virtio-blk-pci,drive=blk0,id=blkdev0".into(),
    ]);
    vm.launch().expect("start the VM");
    let write_vdz = |vm: &Vm, byte: u8| {
        let out = vm
            .control()
            .unwrap()
            .hmp(&format!(
                "qemu-io -d blkdev0/virtio-backend \"write -P {byte:#x} 0 64k\""
            ))
            .unwrap();
        assert!(out.trim().is_empty(), "{out}");
    };
    write_definition(&vm, &dir.0.join("domains"), &lp.0, "");
    let daemon = Daemon::start(&dir.0, &[]);
    let mut fx = Fixture { daemon, vm, dir };
    let files_before = names(&fx.vm.dir);

    // Silently leaving vdz out is refused, and nothing is made.
    assert_eq!(errno(fs::create_dir(fx.path("s1"))), libc::EOPNOTSUPP);
    let log = fx.read(".log");
    assert!(
        log.contains(&format!(
            "mkdir \"s1\": refused (EOPNOTSUPP): disk vdz is a block device {}, which vmsnapfs \
             cannot snapshot",
            lp.0
        )),
        "{log}"
    );
    assert!(!fx.path("s1").exists());
    assert!(image_tags(&fx.vm.disks[0].image).is_empty());
    assert_eq!(names(&fx.vm.dir), files_before);
    // A spec can only leave it out.
    let spec = "<domainsnapshot><name>s1</name><disks><disk name='vdz' snapshot='external'/>\
                </disks></domainsnapshot>";
    assert_eq!(
        write_file(&fx.path(".create"), spec.as_bytes()),
        Err(libc::EOPNOTSUPP)
    );
    assert!(fx.read(".log").contains("can only leave it out"));

    // Left out in the spec: a checkpoint of the other disks.
    fx.vm.qemu_io("vda", "write -P 0x11 0 64k").unwrap();
    write_vdz(&fx.vm, 0x21);
    let spec = "<domainsnapshot><name>s2</name><disks><disk name='vdz' snapshot='no'/>\
                </disks></domainsnapshot>";
    write_file(&fx.path(".create"), spec.as_bytes())
        .unwrap_or_else(|e| panic!("errno {e}: {}", fx.read(".log")));
    assert_eq!(fx.read("s2/state"), "running\n");
    assert!(fx
        .read(".log")
        .contains(".create \"s2\": left out on purpose, and not reverted by this snapshot: vdz"));
    // Reverted: vda goes back, vdz keeps what the guest wrote since.
    fx.vm.qemu_io("vda", "write -P 0x12 0 64k").unwrap();
    write_vdz(&fx.vm, 0x22);
    fx.revert("s2", "running")
        .unwrap_or_else(|e| panic!("revert: errno {e}: {}", fx.read(".log")));
    assert!(all_bytes(&fx.vm.read_disk("vda").unwrap(), 0, 65536, 0x11));
    assert!(
        all_bytes(&lp.head(65536), 0, 65536, 0x22),
        "vdz was left as it is"
    );

    // Left out by the definition: mkdir works.
    fx.daemon.stop();
    write_definition(&fx.vm, &fx.dir.0.join("domains"), &lp.0, " snapshot='no'");
    fx.restart_daemon(&[]);
    fs::create_dir(fx.path("s3")).unwrap_or_else(|e| panic!("{e}: {}", fx.read(".log")));
    assert!(fx
        .read(".log")
        .contains("mkdir \"s3\": left out on purpose, and not reverted by this snapshot: vdz"));
    fx.daemon.stop();
}
