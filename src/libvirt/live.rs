//! Changes of a running libvirt domain's images made by libvirt itself,
//! so that its live definition (what `managedsave`, `save`, a restart of
//! libvirtd and libvirt's own block jobs act on) names the images QEMU
//! writes: a switch to overlays vmsnapfs made is an external disk-only
//! snapshot that reuses them (`snapshot-create --disk-only
//! --reuse-external --no-metadata --atomic`), a merge is `blockcommit`
//! or `blockpull`, each waited for.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use super::Virsh;
use crate::error::{Error, Result};

/// Deadline of the snapshot that switches the disks (libvirt relabels
/// the files and runs one QMP transaction).
const SWITCH: Duration = Duration::from_secs(60);
/// Deadline of a block job; libvirt aborts the job itself a little
/// before (`--timeout`), so none is left running when virsh is killed.
const JOB_SECS: u64 = 3600;

/// The name of the file holding the snapshot XML in the domain's state
/// directory while `snapshot-create` reads it.
const SWITCH_XML: &str = "libvirt-switch.xml";

/// `path` as UTF-8, which libvirt's XML and virsh's arguments need.
fn utf8(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| {
        Error::invalid(format!(
            "{} is not UTF-8, which libvirt cannot be given",
            path.display()
        ))
    })
}

/// The `<domainsnapshot>` that switches `overlays` (target, existing
/// qcow2 overlay) and leaves the disks `unchanged` alone. An overlay on
/// a block device vmsnapfs accepted ([`crate::backend::block_dev`]) is
/// libvirt's `type='block'` disk with `<source dev>`.
pub fn switch_xml(overlays: &[(String, &Path)], unchanged: &[&str]) -> Result<String> {
    use quick_xml::escape::escape;
    let mut x = String::from("<domainsnapshot><description>vmsnapfs</description><disks>");
    for (target, overlay) in overlays {
        let (kind, key) = if crate::backend::block_dev::is_device_path(overlay) {
            ("block", "dev")
        } else {
            ("file", "file")
        };
        x.push_str(&format!(
            "<disk name='{}' snapshot='external' type='{kind}'><driver type='qcow2'/>\
             <source {key}='{}'/></disk>",
            escape(target.as_str()),
            escape(utf8(overlay)?)
        ));
    }
    for target in unchanged {
        x.push_str(&format!("<disk name='{}' snapshot='no'/>", escape(*target)));
    }
    x.push_str("</disks></domainsnapshot>");
    Ok(x)
}

/// Runs the switch of [`switch_xml`] on `domain`; the XML goes through a
/// file in `state_dir` (root's, private), removed afterwards.
pub fn switch(
    virsh: &Virsh,
    domain: &str,
    state_dir: &Path,
    overlays: &[(String, &Path)],
    unchanged: &[&str],
) -> Result<()> {
    let xml = switch_xml(overlays, unchanged)?;
    let file = state_dir.join(SWITCH_XML);
    // Read by virsh at once and removed: no sync inside the guest's pause.
    crate::store::atomic::write_transient(&file, xml.as_bytes())?;
    let r = virsh.run(
        &[
            OsStr::new("snapshot-create"),
            OsStr::new("--domain"),
            OsStr::new(domain),
            OsStr::new("--xmlfile"),
            file.as_os_str(),
            OsStr::new("--disk-only"),
            OsStr::new("--reuse-external"),
            OsStr::new("--no-metadata"),
            OsStr::new("--atomic"),
        ],
        SWITCH,
    );
    let _ = std::fs::remove_file(&file);
    r.map(drop)
}

/// The arguments of `virsh blockcommit` for [`super::LibvirtDomain`]'s
/// [`crate::backend::managed::Manager::commit`].
pub fn commit_args<'a>(
    domain: &'a str,
    target: &'a str,
    top: Option<&'a Path>,
    base: &'a Path,
) -> Result<Vec<String>> {
    let mut a: Vec<String> = ["blockcommit", "--domain", domain, "--path", target]
        .map(str::to_owned)
        .to_vec();
    a.extend(["--base".into(), utf8(base)?.to_owned()]);
    match top {
        Some(top) => a.extend(["--top".into(), utf8(top)?.to_owned(), "--wait".into()]),
        None => a.extend(["--active".into(), "--pivot".into()]),
    }
    a.extend(["--timeout".into(), JOB_SECS.to_string()]);
    Ok(a)
}

/// The arguments of `virsh blockpull` for
/// [`crate::backend::managed::Manager::pull`].
pub fn pull_args(domain: &str, target: &str, base: Option<&Path>) -> Result<Vec<String>> {
    let mut a: Vec<String> = ["blockpull", "--domain", domain, "--path", target, "--wait"]
        .map(str::to_owned)
        .to_vec();
    if let Some(base) = base {
        a.extend(["--base".into(), utf8(base)?.to_owned()]);
    }
    a.extend(["--timeout".into(), JOB_SECS.to_string()]);
    Ok(a)
}

/// Runs a block job's virsh command, with a deadline a minute past the
/// job's own timeout.
pub fn run_job(virsh: &Virsh, args: &[String]) -> Result<()> {
    virsh
        .run(args, Duration::from_secs(JOB_SECS + 60))
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_names_each_overlay_and_leaves_the_rest() {
        let x = switch_xml(&[("vda".into(), Path::new("/i/a'&b.qcow2"))], &["vdb"]).unwrap();
        assert_eq!(
            x,
            "<domainsnapshot><description>vmsnapfs</description><disks>\
             <disk name='vda' snapshot='external' type='file'><driver type='qcow2'/>\
             <source file='/i/a&apos;&amp;b.qcow2'/></disk>\
             <disk name='vdb' snapshot='no'/></disks></domainsnapshot>"
        );
    }

    #[test]
    fn a_block_device_is_switched_to_as_a_block_disk() {
        // /dev/null is a character device: a file to libvirt.
        let x = switch_xml(&[("vda".into(), Path::new("/dev/null"))], &[]).unwrap();
        assert!(x.contains("type='file'") && x.contains("<source file='/dev/null'/>"));
        let Some(dev) = std::fs::read_dir("/dev").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| crate::backend::block_dev::is_block(p))
        }) else {
            return;
        };
        let x = switch_xml(&[("vdb".into(), dev.as_path())], &[]).unwrap();
        assert_eq!(
            x,
            format!(
                "<domainsnapshot><description>vmsnapfs</description><disks>\
                 <disk name='vdb' snapshot='external' type='block'><driver type='qcow2'/>\
                 <source dev='{}'/></disk></disks></domainsnapshot>",
                dev.display()
            )
        );
    }

    #[test]
    fn an_active_commit_pivots_and_an_inner_one_names_its_top() {
        let a = commit_args("d", "vda", None, Path::new("/i/base")).unwrap();
        assert!(a.contains(&"--active".into()) && a.contains(&"--pivot".into()));
        assert!(!a.contains(&"--top".into()));
        let a = commit_args("d", "vda", Some(Path::new("/i/mid")), Path::new("/i/base")).unwrap();
        let top = a.iter().position(|x| x == "--top").unwrap();
        assert_eq!(a[top + 1], "/i/mid");
        assert!(a.contains(&"--wait".into()) && !a.contains(&"--active".into()));
    }

    #[test]
    fn paths_that_are_not_utf8_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(OsStr::from_bytes(b"/i/\xff"));
        assert!(switch_xml(&[("vda".into(), p)], &[]).is_err());
        assert!(pull_args("d", "vda", Some(p)).is_err());
    }
}
