//! The built-in demo: a small real VM, its definition, and a mounted tree.

pub mod vm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::domain::Registry;
use crate::error::{Error, Result};
use crate::fs::{MountConfig, SnapFs};
use crate::signals::StopSignals;
use vm::{Vm, VmSpec};

/// Runs the demo: VM up, tree mounted at `mountpoint` (or a temp dir),
/// until Ctrl-C; then everything is taken down.
pub fn run(mountpoint: Option<PathBuf>) -> Result<()> {
    let stop = StopSignals::install()?;
    let work = std::env::temp_dir().join(format!("vmsnapfs-demo-{}", std::process::id()));
    let result = run_in(&work, mountpoint, &stop);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run_in(work: &Path, mountpoint: Option<PathBuf>, stop: &StopSignals) -> Result<()> {
    let images = work.join("images");
    let domains = work.join("domains");
    let state = work.join("state");
    let (mnt, own_mnt) = match mountpoint {
        Some(m) => (m, false),
        None => (work.join("mnt"), true),
    };
    std::fs::create_dir_all(&mnt)?;
    let vm = Vm::start(&VmSpec::small("demo"), &images)?;
    vm.write_definition(&domains)?;
    vm.qemu_io("vda", "write -P 0x61 0 1M")?;
    vm.qemu_io("vdb", "write -P 0x62 1M 1M")?;
    let reg = Registry::open(&domains, &state)?;
    let session = SnapFs::new(reg.clone(), MountConfig::default())
        .spawn(&mnt)
        .map_err(|e| Error::io(format!("mount {}: {e}", mnt.display())))?;
    let m = mnt.display();
    println!(
        "vmsnapfs demo: VM 'demo' (2 qcow2 disks, {}) mounted at {m}\n\n\
         Try, in another shell:\n  \
         ls {m}/demo; cat {m}/demo/.state\n  \
         mkdir {m}/demo/first            # live checkpoint: RAM to a file, new disk overlays\n  \
         mkdir {m}/demo/second; cat {m}/demo/.tree\n  \
         cat {m}/demo/first/snapshot.xml; ls -l {m}/demo/first/disks {m}/demo/first/images\n  \
         cmp {m}/demo/first/disks/vda {m}/demo/second/disks/vda\n  \
         echo running > {m}/demo/first/revert   # new QEMU with first's RAM; the rest is kept\n  \
         cat {m}/demo/.tree; rmdir {m}/demo/second\n  \
         cat {m}/demo/.log\n\nCtrl-C ends the demo and removes everything.",
        if vm::kvm_usable() { "KVM" } else { "TCG" }
    );
    while !stop.requested() && !session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("\nvmsnapfs demo: unmounting and stopping the VM");
    reg.shutdown();
    drop(session);
    drop(vm);
    if own_mnt {
        let _ = std::fs::remove_dir(&mnt);
    }
    Ok(())
}
