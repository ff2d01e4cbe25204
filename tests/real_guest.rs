//! A real Linux guest (tests/common/guest.rs) writing files while vmsnapfs
//! snapshots it: its agent answers, and every file the guest synced before
//! `mkdir` began is in the snapshot's `files/vda/` byte for byte.

mod common;

use std::time::Duration;

use common::guest::*;

#[test]
fn the_guest_boots_writes_and_its_agent_answers() {
    let rg = RealGuest::start("rg-smoke", "internal", &[]);
    let n = rg.guest.wrote();
    assert!(n >= 1);
    let mut agent = rg.guest.agent(Duration::from_secs(60));
    agent.ping().unwrap();
    assert_eq!(agent.fsfreeze_status().unwrap(), "thawed");
    drop(agent);
    let out = rg.guest.sh("cat /proc/mounts; ls /mnt/data | wc -l");
    assert_eq!(out.code, 0, "{out:?}");
    let text = out.text();
    assert!(text.contains("/dev/vda /mnt ext4"), "{text}");
    assert!(text.contains("/dev/vdb /fat vfat"), "{text}");
    let later = rg.guest.wait_wrote(n, Duration::from_secs(60));
    assert!(later > n);
    assert!(rg.pid().is_some());
    assert_eq!(rg.read(".state"), "running\n");
    let def = std::fs::read_to_string(rg.daemon.domains.join("vm1.xml")).unwrap();
    assert!(def.contains(&format!(
        "<source mode='bind' path='{}'/>",
        rg.agent_socket().display()
    )));
}
