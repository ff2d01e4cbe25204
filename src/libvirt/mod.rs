//! libvirt mode: every domain of a libvirt connection is a domain of the
//! tree, with no definition file. vmsnapfs talks to libvirt only through
//! `virsh` (see docs/libvirt.md for why): the domain list and
//! definitions (`list`, `dumpxml --inactive --security-info`), QEMU's
//! monitor through libvirt's passthrough ([`shim`]), start and stop
//! (`start --paused`, `destroy`), and the persistent definition rewritten
//! (`define`) whenever a disk's active layer changes, so that `virsh
//! start` boots the images the guest last wrote.

pub mod define;
pub mod shim;
pub mod virsh;

use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::managed::Manager;
use crate::error::{Error, Result};
use crate::model::{DiskDef, DomainDef};
use crate::store::DomainStore;
use crate::xml::domain::parse_domain_def;

pub use virsh::Virsh;

/// Deadline of a quick virsh call (list, dumpxml, define).
const QUICK: Duration = Duration::from_secs(30);
/// Deadline of `virsh start` (libvirt probes QEMU the first time).
const START: Duration = Duration::from_secs(120);
/// Deadline of `virsh destroy`.
const DESTROY: Duration = Duration::from_secs(60);
/// Where a privileged libvirtd keeps the pid of each domain's QEMU.
const SYSTEM_PID_DIR: &str = "/run/libvirt/qemu";
/// The name of the monitor endpoint in a domain's state directory.
const SHIM_SOCKET: &str = "libvirt-qmp.sock";

/// The names of every domain of the connection, running or not.
pub fn list_domains(virsh: &Virsh) -> Result<Vec<String>> {
    let out = virsh.run(&["list", "--all", "--name"], QUICK)?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// One libvirt domain as vmsnapfs manages it: its monitor endpoint and
/// what the QEMU backend asks libvirt.
pub struct LibvirtDomain {
    virsh: Virsh,
    name: String,
    state_dir: PathBuf,
    shim: shim::Shim,
}

impl LibvirtDomain {
    /// Reads libvirt's persistent definition of `name` and opens its
    /// monitor endpoint in `store`'s directory. The returned definition
    /// names the endpoint as its monitor.
    pub fn open(virsh: &Virsh, name: &str, store: &DomainStore) -> Result<(DomainDef, Self)> {
        let xml = inactive_xml(virsh, name)?;
        let mut def = parse_domain_def(&xml)
            .map_err(|e| Error::invalid(format!("libvirt's definition of {name}: {e}")))?;
        if def.name != name {
            return Err(Error::invalid(format!(
                "libvirt's definition of {name} names {}",
                def.name
            )));
        }
        let path = store.dir().join(SHIM_SOCKET);
        let shim = shim::Shim::start(virsh.clone(), name, &path)
            .map_err(|e| Error::from(e).context(format!("monitor endpoint {}", path.display())))?;
        def.monitor = Some(shim.path().to_owned());
        Ok((
            def,
            LibvirtDomain {
                virsh: virsh.clone(),
                name: name.to_owned(),
                state_dir: store.dir().to_owned(),
                shim,
            },
        ))
    }

    /// The monitor endpoint.
    pub fn monitor(&self) -> &Path {
        self.shim.path()
    }
}

/// libvirt's persistent definition of `name`, with its secrets (it is
/// defined again from this text).
fn inactive_xml(virsh: &Virsh, name: &str) -> Result<String> {
    virsh.run(
        &["dumpxml", "--inactive", "--security-info", "--domain", name],
        QUICK,
    )
}

impl Manager for LibvirtDomain {
    fn qemu_pid(&self) -> Option<i32> {
        if !self.virsh.uri().starts_with("qemu:///system") {
            return None;
        }
        let path = Path::new(SYSTEM_PID_DIR).join(format!("{}.pid", self.name));
        let mut text = String::new();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        let meta = f.metadata().ok()?;
        // Only a file root wrote: libvirtd's.
        if !meta.is_file() || std::os::unix::fs::MetadataExt::uid(&meta) != 0 {
            return None;
        }
        std::io::Read::read_to_string(&mut (&mut f).take(64), &mut text).ok()?;
        text.trim().parse().ok()
    }

    fn start_paused(&self) -> Result<()> {
        self.virsh
            .run(&["start", "--paused", "--domain", &self.name], START)
            .map(drop)
    }

    fn destroy(&self) -> Result<()> {
        self.virsh
            .run(&["destroy", "--domain", &self.name], DESTROY)
            .map(drop)
    }

    fn layers_changed(&self, disks: &[DiskDef]) -> Result<()> {
        let xml = inactive_xml(&self.virsh, &self.name)?;
        let Some(new) = define::with_sources(&xml, disks)? else {
            return Ok(());
        };
        let file = self.state_dir.join("libvirt-define.xml");
        crate::store::atomic::write_atomic(&file, new.as_bytes())?;
        let r = self
            .virsh
            .run(&[std::ffi::OsStr::new("define"), file.as_os_str()], QUICK);
        let _ = std::fs::remove_file(&file);
        r.map(drop)
    }

    fn describe(&self) -> String {
        format!("libvirt {}", self.virsh.uri())
    }
}
