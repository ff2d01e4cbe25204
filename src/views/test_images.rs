//! Test images for the views' unit tests: a temporary directory, and
//! qemu-img / qemu-io run on it.

use std::path::PathBuf;
use std::process::Command;

/// A directory removed when dropped.
pub struct Dir(pub PathBuf);

impl Dir {
    /// A new empty directory named after `name` and this process.
    pub fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("vmsnapfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// The path of `n` in it, as a string for command lines.
    pub fn p(&self, n: &str) -> String {
        self.0.join(n).to_str().unwrap().to_owned()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `prog` with `args`; panics with its stderr when it fails.
pub fn run(prog: &str, args: &[&str]) {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-io -f FORMAT -c CMD IMG`.
pub fn io(format: &str, img: &str, cmd: &str) {
    run("qemu-io", &["-f", format, "-c", cmd, img]);
}

/// `qemu-img create -q -f FORMAT IMG SIZE`.
pub fn create(format: &str, img: &str, size: &str) {
    run("qemu-img", &["create", "-q", "-f", format, img, size]);
}

/// `qemu-img create -q -f qcow2 OPTIONS -F BACKING_FORMAT -b BACKING IMG
/// [SIZE]`: a qcow2 overlay of `backing`.
pub fn overlay(
    img: &str,
    backing: &str,
    backing_format: &str,
    size: Option<&str>,
    options: &[&str],
) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(options);
    args.extend_from_slice(&["-F", backing_format, "-b", backing, img]);
    args.extend(size);
    run("qemu-img", &args);
}
