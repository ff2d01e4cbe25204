//! Mounting the way an operator does: `mount -t vmsnapfs`, an fstab line,
//! the daemonized mode, `umount`, `allow_other`, and the demo.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The mount helper, built beside the vmsnapfs binary (built here when a
/// test run did not build the whole workspace).
fn helper_binary() -> PathBuf {
    let main = Path::new(env!("CARGO_BIN_EXE_vmsnapfs"));
    let helper = main.with_file_name("mount-vmsnapfs");
    if !helper.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "mount-vmsnapfs"]);
        if main.parent().is_some_and(|d| d.ends_with("release")) {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "cannot build mount-vmsnapfs"
        );
    }
    helper
}

/// Puts `mount.vmsnapfs` where mount(8) looks for helpers, for the
/// duration of a test, unless one is installed already.
struct HelperInstall(Option<PathBuf>);

impl HelperInstall {
    fn new() -> Self {
        let dest = PathBuf::from("/usr/sbin/mount.vmsnapfs");
        if dest.exists() {
            return HelperInstall(None);
        }
        std::os::unix::fs::symlink(helper_binary(), &dest).unwrap();
        HelperInstall(Some(dest))
    }
}

impl Drop for HelperInstall {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

fn wait_unmounted(mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(mnt) {
        assert!(Instant::now() < deadline, "still mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts on drop whatever a test mounted.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

#[test]
fn mount_t_fstab_and_allow_other() {
    let dir = TempDir::new("mount-t");
    let vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).unwrap();
    let domains = dir.0.join("domains");
    let state = dir.0.join("state");
    let def = vm.write_definition(&domains).unwrap();
    // A secret in the definition, as libvirt's <graphics passwd=...>.
    let xml = fs::read_to_string(&def).unwrap().replace(
        "  </devices>",
        "    <graphics type='vnc' passwd='s3cret-pw'/>\n  </devices>",
    );
    fs::write(&def, xml).unwrap();
    let mnt = dir.0.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let _guard = MountGuard(mnt.clone());
    let _helper = HelperInstall::new();
    // mount(8) runs mount.vmsnapfs which daemonizes vmsnapfs once mounted.
    let opts = format!("domains={},state={}", domains.display(), state.display());
    let st = Command::new("mount")
        .args(["-t", "vmsnapfs", "-o", &opts, "none"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(is_mounted(&mnt));
    // The daemon's log has its start-up lines, not only what came after.
    let log = fs::read_to_string(state.join("daemon.log")).unwrap();
    assert!(log.contains("domain vm1: 0 snapshots"), "{log}");
    assert!(log.contains("mounted at"), "{log}");
    fs::create_dir(mnt.join("vm1/through-mount-t")).unwrap();
    assert_eq!(
        fs::read_to_string(mnt.join("vm1/.state")).unwrap(),
        "running\n"
    );
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success());
    wait_unmounted(&mnt);

    // The same from an fstab line, with allow_other: other users may look
    // but not change anything.
    let fstab = dir.0.join("fstab");
    fs::write(
        &fstab,
        format!("none {} vmsnapfs {opts},allow_other 0 0\n", mnt.display()),
    )
    .unwrap();
    let st = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    let names: Vec<String> = fs::read_dir(mnt.join("vm1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        names,
        vec!["through-mount-t"],
        "metadata kept across mounts"
    );
    let as_nobody = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .args(args)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let vm1 = mnt.join("vm1");
    let vm1 = vm1.to_str().unwrap();
    assert!(as_nobody(&["ls", vm1]));
    // Secrets in the domain XML are shown to root only.
    let seen_by = |user: &str| {
        let out = Command::new("runuser")
            .args(["-u", user, "--", "cat"])
            .arg(format!("{vm1}/.domain.xml"))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(seen_by("root").contains("s3cret-pw"));
    let redacted = seen_by("nobody");
    assert!(!redacted.contains("s3cret-pw"), "{redacted}");
    assert!(
        redacted.contains("passwd='***'") || redacted.contains("passwd=\"***\""),
        "{redacted}"
    );
    assert!(as_nobody(&["cat", &format!("{vm1}/.tree")]));
    assert!(!as_nobody(&["mkdir", &format!("{vm1}/by-nobody")]));
    assert!(!as_nobody(&["rmdir", &format!("{vm1}/through-mount-t")]));
    assert!(!as_nobody(&[
        "sh",
        "-c",
        &format!("echo running > {vm1}/through-mount-t/revert")
    ]));
    assert!(fs::metadata(mnt.join("vm1/through-mount-t")).is_ok());
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success());
    wait_unmounted(&mnt);
}

#[test]
fn demo_runs_a_vm_and_cleans_up_on_ctrl_c() {
    let dir = TempDir::new("demo");
    let mnt = dir.0.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let _guard = MountGuard(mnt.clone());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmsnapfs"))
        .arg("demo")
        .arg(&mnt)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mnt.join("demo/.state").exists() {
        assert!(Instant::now() < deadline, "demo did not mount");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fs::read_to_string(mnt.join("demo/.domain.xml"))
        .unwrap()
        .contains("<name>demo</name>"));
    fs::create_dir(mnt.join("demo/first")).unwrap();
    assert_eq!(
        fs::read_to_string(mnt.join("demo/first/state")).unwrap(),
        "running\n"
    );
    // Ctrl-C: the demo unmounts, stops its VM and removes its files.
    // SAFETY: signalling the child this test started, by pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains("mkdir"), "demo prints what to try: {out}");
    assert!(!is_mounted(&mnt));
    let work = std::env::temp_dir().join(format!("vmsnapfs-demo-{}", child.id()));
    assert!(!work.exists(), "demo left {}", work.display());
}

#[test]
fn sigterm_unmounts_and_ends_the_daemon() {
    let mut fx = Fixture::new("sigterm");
    fs::create_dir(fx.path("before-stop")).unwrap();
    let pid = fx.daemon.pid().unwrap();
    // SAFETY: signalling the daemon this test started, by pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    assert!(
        fx.daemon.wait_exit(Duration::from_secs(30)),
        "the daemon ignored SIGTERM"
    );
    assert!(!is_mounted(&fx.daemon.mnt), "SIGTERM left the mount behind");
    assert!(fx.daemon.log_text().contains("signal: unmounting"));
    // The snapshot made before is still there for the next daemon.
    fx.restart_daemon(&[]);
    assert_eq!(fx.ls(), vec!["before-stop"]);
}
