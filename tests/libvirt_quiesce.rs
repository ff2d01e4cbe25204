//! Quiesced snapshots of a libvirt domain: libvirt holds the guest
//! agent's socket, so vmsnapfs freezes and thaws through libvirt (`virsh
//! domfsfreeze`, `domfsthaw`). On a real Linux guest run by a real
//! libvirtd (TCG) and a real FUSE mount: external and internal disk-only
//! snapshots are clean without journal replay, the guest writes on
//! thawed, and a daemon killed inside the frozen window leaves the guest
//! thawed after its restart. Skipped, saying so, where libvirtd is not
//! installed.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::guest::*;
use common::libvirtd::*;
use common::*;

const DOM: &str = "lvquiesce";

/// Whether libvirt's agent answers a command qemu-ga refuses while the
/// guest is frozen: Some(true) thawed, Some(false) frozen.
fn thawed(lv: &Libvirtd) -> Option<bool> {
    let out = lv.try_virsh(&["domtime", DOM]);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Some(true)
    } else if err.contains("frozen") {
        Some(false)
    } else {
        None
    }
}

/// The `.log` line of `what` that says how long the guest was frozen.
fn frozen_line(log: &str, what: &str) -> String {
    log.lines()
        .find(|l| l.contains(what) && l.contains("quiesced: the guest's file systems were frozen"))
        .unwrap_or_else(|| panic!("no quiesce line for {what} in .log:\n{log}"))
        .to_owned()
}

/// The guest's domain: the built kernel and disks copied beside the
/// test's images, TCG, the console on a file, libvirt's agent channel.
fn define_guest(t: &mut LibvirtTest) -> Guest {
    let build = guest_build();
    for f in ["vmlinuz", "initramfs.gz", "vda.qcow2", "vdb.qcow2"] {
        fs::copy(build.join(f), t.images.join(f)).unwrap();
    }
    let guest = Guest {
        console: t.images.join("console.log"),
        agent_socket: t.images.join("unused.qga"),
    };
    let disk = |target: &str| {
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='{target}' bus='virtio'/></disk>",
            t.images.join(format!("{target}.qcow2")).display()
        )
    };
    let xml = format!(
        "<domain type='qemu'><name>{DOM}</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel>\
         <initrd>{}</initrd><cmdline>console=ttyS0 quiet panic=-1</cmdline></os>\
         <on_reboot>destroy</on_reboot>\
         <devices><emulator>{EMULATOR}</emulator>{}{}\
         <serial type='file'><source path='{}' append='on'/><target port='0'/></serial>\
         <channel type='unix'><target type='virtio' name='{AGENT_PORT}'/></channel>\
         </devices></domain>",
        t.images.join("vmlinuz").display(),
        t.images.join("initramfs.gz").display(),
        disk("vda"),
        disk("vdb"),
        guest.console.display(),
    );
    t.lv.define_xml(DOM, &xml);
    guest
}

fn wait_agent(lv: &Libvirtd) {
    let t0 = Instant::now();
    while thawed(lv) != Some(true) {
        assert!(
            t0.elapsed() < BOOT_TIMEOUT,
            "libvirt's agent never answered"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The intent records in the domain's journal.
fn journal(state: &Path) -> Vec<String> {
    fs::read_dir(state.join(DOM).join("journal"))
        .map(|r| {
            r.map(|e| fs::read_to_string(e.unwrap().path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn quiesced_through_libvirt_clean_thawed_and_thawed_after_a_crash_mid_freeze() {
    let _turn = ONE_LIBVIRTD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut t) = LibvirtTest::start("lv-quiesce") else {
        return;
    };
    let guest = define_guest(&mut t);
    t.lv.virsh(&["start", DOM]);
    guest.wait_wrote(0, BOOT_TIMEOUT);
    wait_agent(&t.lv);
    let uri = t.lv.uri.clone();
    let mut daemon = Daemon::start_with_args(&t.dir.0, &[], &["--libvirt", &uri]);
    let mnt = daemon.mnt.clone();
    let path = |rel: &str| mnt.join(DOM).join(rel);
    let log = || fs::read_to_string(path(".log")).unwrap_or_default();
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });

    // External, disk-only, quiesce asked for: frozen through libvirt.
    write_file(
        &path(".create"),
        b"<domainsnapshot><name>ext1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='external'/>\
          </disks><quiesce/></domainsnapshot>",
    )
    .unwrap_or_else(|e| panic!("ext1: errno {e}\n{}", log()));
    let line = frozen_line(&log(), ".create \"ext1\"");
    assert!(
        line.contains("(all frozen, all thawed, libvirt's guest agent of domain lvquiesce)"),
        "{line}"
    );
    assert_clean(&path("ext1/disks/vda"));
    assert_eq!(thawed(&t.lv), Some(true), "thawed after ext1");

    // Internal, disk-only, by the domain's default (`auto`: it has a
    // channel).
    write_file(
        &path(".create"),
        b"<domainsnapshot><name>int1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
          </disks></domainsnapshot>",
    )
    .unwrap_or_else(|e| panic!("int1: errno {e}\n{}", log()));
    frozen_line(&log(), ".create \"int1\"");
    assert_clean(&path("int1/disks/vda"));
    let n = guest.wrote();
    guest.wait_wrote(n, Duration::from_secs(60));
    assert_eq!(thawed(&t.lv), Some(true), "thawed after int1");

    // The daemon killed inside the frozen window.
    daemon.stop();
    daemon = Daemon::start_with_args(
        &t.dir.0,
        &[("VMSNAPFS_FAILPOINTS", "create.frozen=crash")],
        &["--libvirt", &uri],
    );
    wait_until("running", Duration::from_secs(30), || {
        state_of(&mnt, DOM) == "running"
    });
    let _ = write_file(
        &path(".create"),
        b"<domainsnapshot><name>k1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='external'/>\
          </disks><quiesce/></domainsnapshot>",
    );
    assert!(daemon.wait_exit(Duration::from_secs(60)));
    daemon.kill9();
    assert!(
        journal(&daemon.state).iter().any(|r| r.contains("thaw")),
        "{:?}",
        journal(&daemon.state)
    );
    assert_eq!(
        thawed(&t.lv),
        Some(false),
        "the crash left the guest frozen"
    );
    daemon = Daemon::start_with_args(&t.dir.0, &[], &["--libvirt", &uri]);
    wait_until("thawed by recovery", Duration::from_secs(60), || {
        thawed(&t.lv) == Some(true)
    });
    wait_until("the thaw in .log", Duration::from_secs(30), || {
        log().contains("thawed all file system(s), after the daemon restarted")
    });
    assert!(!path("k1").exists());
    let n = guest.wrote();
    guest.wait_wrote(n, Duration::from_secs(60));
    daemon.stop();
}
