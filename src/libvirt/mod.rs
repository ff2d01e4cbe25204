//! libvirt mode: every domain of a libvirt connection is a domain of the
//! tree, with no definition file. vmsnapfs talks to libvirt only through
//! `virsh` (see docs/libvirt.md for why): the domain list and
//! definitions (`list`, `dumpxml --inactive --security-info`), QEMU's
//! monitor through libvirt's passthrough ([`shim`]), start and stop
//! (`start --paused`, `destroy`), and the persistent definition rewritten
//! (`define`) whenever a disk's active layer changes, so that `virsh
//! start` boots the images the guest last wrote; the images of a running
//! domain change through libvirt itself ([`live`]), so that its live
//! definition follows too.

pub mod agent;
pub mod define;
pub mod live;
pub mod save_image;
pub mod session;
pub mod shim;
pub mod snapshots;
pub mod virsh;

use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::managed::Manager;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

use crate::model::{DiskDef, DiskSnapshotKind, DomainDef, Snapshot};
use crate::store::DomainStore;
use crate::xml::domain::parse_domain_def_with;

pub use virsh::Virsh;

/// Deadline of a quick virsh call (list, dumpxml, define).
const QUICK: Duration = Duration::from_secs(30);
/// Deadline of `virsh start` (libvirt probes QEMU the first time).
const START: Duration = Duration::from_secs(120);
/// Deadline of `virsh restore` (QEMU reads the whole memory file).
const RESTORE: Duration = Duration::from_secs(900);
/// Deadline of `virsh destroy`.
const DESTROY: Duration = Duration::from_secs(60);
/// Where a privileged libvirtd keeps the pid of each domain's QEMU.
const SYSTEM_PID_DIR: &str = "/run/libvirt/qemu";
/// The snapshots vmsnapfs defined in libvirt's list (name -> hash of
/// the XML), in a domain's state directory.
const SNAPSHOT_RECORD: &str = "libvirt-snapshots";
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
    /// What libvirt's snapshot list was last made to mirror (a hash of
    /// the snapshots, the current one and the active layers).
    synced: parking_lot::Mutex<Option<u64>>,
    /// libvirt's persistent definition as the last change of the active
    /// layers left it (read, then defined when it named other images),
    /// with the disks it names: a restore on those disks that follows
    /// at once starts from it instead of reading it again.
    defined: parking_lot::Mutex<Option<(Vec<DiskDef>, String)>>,
}

impl LibvirtDomain {
    /// Reads libvirt's persistent definition of `name` and opens its
    /// monitor endpoint in `store`'s directory. The returned definition
    /// names the endpoint as its monitor.
    pub fn open(virsh: &Virsh, name: &str, store: &DomainStore) -> Result<(DomainDef, Self)> {
        let xml = inactive_xml(virsh, name)?;
        let ours = own_devices(store);
        let mut def = parse_domain_def_with(&xml, &|p| ours.iter().any(|o| o == p))
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
        if def.agent.is_some() {
            // libvirt holds the agent's socket itself: freezes go
            // through libvirt.
            def.agent = Some(crate::model::AgentChannel::Libvirt {
                uri: virsh.uri().to_owned(),
                domain: name.to_owned(),
            });
        }
        Ok((
            def,
            LibvirtDomain {
                virsh: virsh.clone(),
                name: name.to_owned(),
                state_dir: store.dir().to_owned(),
                shim,
                synced: parking_lot::Mutex::new(None),
                defined: parking_lot::Mutex::new(None),
            },
        ))
    }

    /// The monitor endpoint.
    pub fn monitor(&self) -> &Path {
        self.shim.path()
    }

    /// Makes libvirt's snapshot list mirror `snaps` (current: the id
    /// `current`; the disks now on `active`), when any of it changed
    /// since the last call. Snapshots vmsnapfs defined earlier and no
    /// longer has lose their libvirt metadata (never their images).
    pub fn sync_snapshots(&self, snaps: &[Snapshot], current: Option<&str>, active: &[DiskDef]) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{snaps:?}{current:?}{active:?}").hash(&mut h);
        let key = h.finish();
        if *self.synced.lock() == Some(key) {
            return;
        }
        match self.mirror(snaps, current, active) {
            Ok(()) => *self.synced.lock() = Some(key),
            Err(e) => {
                log::warn!("{}: libvirt's snapshot list not updated: {e}", self.name);
                // Tried again on the next change, not every second.
                *self.synced.lock() = Some(key);
            }
        }
    }

    fn mirror(&self, snaps: &[Snapshot], current: Option<&str>, active: &[DiskDef]) -> Result<()> {
        let names: BTreeMap<&str, &str> = snaps
            .iter()
            .map(|s| (s.id.as_str(), s.name.as_str()))
            .collect();
        // Records of earlier versions name no overlay: found in every
        // chain from the active layers and from each point image, read
        // only when such a record exists (each image is a qemu-img run).
        let unrecorded = snaps.iter().any(|s| {
            s.disks
                .iter()
                .any(|d| d.kind == DiskSnapshotKind::External && d.overlay.is_none())
        });
        let chains = if unrecorded {
            all_chains(snaps, active)
        } else {
            Vec::new()
        };
        let domain = inactive_xml(&self.virsh, &self.name)?;
        let order = parents_first(snaps);
        let mut want: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for s in &order {
            // Records of earlier versions name no overlay: found in the chains.
            let overlays = s
                .disks
                .iter()
                .filter(|d| d.kind == DiskSnapshotKind::External && d.overlay.is_none())
                .filter_map(|d| {
                    let o = snapshots::overlay_over(d.image.as_deref()?, &chains)?;
                    Some((d.target.clone(), o))
                })
                .collect();
            let parent = s.parent.as_deref().and_then(|p| names.get(p).copied());
            // libvirt's definition recorded at the snapshot, else today's.
            let recorded = s.domain_xml.as_deref().unwrap_or(&domain);
            let xml = snapshots::snapshot_xml(s, parent, Some(recorded), &overlays);
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            xml.hash(&mut h);
            want.insert(s.name.clone(), (h.finish(), xml));
        }
        let record = self.state_dir.join(SNAPSHOT_RECORD);
        let had: BTreeMap<String, u64> = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        // Gone or renamed: libvirt's metadata only, newest first.
        let in_libvirt = self
            .virsh
            .run(&["snapshot-list", "--domain", &self.name, "--name"], QUICK)?;
        let in_libvirt: Vec<&str> = in_libvirt
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let mut defined: BTreeMap<String, u64> = BTreeMap::new();
        for name in had.keys().rev() {
            if want.contains_key(name) || !in_libvirt.contains(&name.as_str()) {
                continue;
            }
            self.virsh.run(
                &[
                    "snapshot-delete",
                    "--domain",
                    &self.name,
                    "--snapshotname",
                    name,
                    "--metadata",
                ],
                QUICK,
            )?;
        }
        let file = self.state_dir.join("libvirt-snapshot.xml");
        let mut result = Ok(());
        for s in &order {
            let (hash, xml) = &want[&s.name];
            if had.get(&s.name) == Some(hash) && in_libvirt.contains(&s.name.as_str()) {
                defined.insert(s.name.clone(), *hash);
                continue;
            }
            crate::store::atomic::write_transient(&file, xml.as_bytes())?;
            let r = self.virsh.run(
                &[
                    std::ffi::OsStr::new("snapshot-create"),
                    std::ffi::OsStr::new("--domain"),
                    std::ffi::OsStr::new(&self.name),
                    std::ffi::OsStr::new("--redefine"),
                    std::ffi::OsStr::new("--xmlfile"),
                    file.as_os_str(),
                ],
                QUICK,
            );
            match r {
                Ok(_) => {
                    defined.insert(s.name.clone(), *hash);
                }
                Err(e) => {
                    result = Err(e.context(format!("snapshot {}", s.name)));
                    break;
                }
            }
        }
        let _ = std::fs::remove_file(&file);
        if result.is_ok() {
            if let Some(cur) = current.and_then(|c| names.get(c)) {
                self.virsh.run(
                    &[
                        "snapshot-current",
                        "--domain",
                        &self.name,
                        "--snapshotname",
                        cur,
                    ],
                    QUICK,
                )?;
            }
        }
        let text = serde_json::to_vec(&defined).map_err(|e| Error::io(e.to_string()))?;
        crate::store::atomic::write_atomic(&record, &text)?;
        result
    }
}

/// The block devices the records in `store` name as layers (the active
/// layers, the snapshots' images and overlays, and the overlays of an
/// interrupted create or revert, which libvirt may have switched to
/// before the crash): the only ones a libvirt definition may name as a
/// disk vmsnapfs snapshots (see [`parse_domain_def_with`]).
fn own_devices(store: &DomainStore) -> Vec<PathBuf> {
    use crate::store::Intent;
    let mut out: Vec<PathBuf> = store.load_layers().into_values().map(|l| l.path).collect();
    let pending = store
        .journal()
        .and_then(|j| j.pending())
        .unwrap_or_default();
    for r in pending.into_iter().flatten() {
        if let Intent::CreateExternal { overlays, .. } | Intent::RevertExternal { overlays, .. } =
            r.intent
        {
            out.extend(overlays.into_iter().map(|(_, o)| o));
        }
    }
    if let Ok(loaded) = store.load() {
        for s in loaded.forest.iter() {
            for d in &s.disks {
                out.extend([&d.image, &d.overlay].into_iter().flatten().cloned());
            }
        }
    }
    out.retain(|p| crate::backend::block_dev::is_block(p));
    out
}

/// The backing chains (paths, top first) of the active layers and of
/// every external snapshot's point image. Branches: an overlay over a
/// point is found in the chain of an image above it, so every chain is
/// searched from every top.
fn all_chains(snaps: &[Snapshot], active: &[DiskDef]) -> Vec<Vec<PathBuf>> {
    let mut chains: Vec<Vec<PathBuf>> = Vec::new();
    for d in active {
        if let Ok(c) = crate::backend::qemu_img::chain(&d.source, &d.format) {
            chains.push(c.into_iter().map(|i| i.path).collect());
        }
    }
    for s in snaps {
        for d in &s.disks {
            if let (Some(img), DiskSnapshotKind::External) = (&d.image, d.kind) {
                if let Ok(c) = crate::backend::qemu_img::chain(img, "qcow2") {
                    chains.push(c.into_iter().map(|i| i.path).collect());
                }
            }
        }
    }
    chains
}

/// `snaps` oldest first, each after its parent (libvirt refuses a
/// snapshot whose parent it does not know; times tie within a second).
fn parents_first(snaps: &[Snapshot]) -> Vec<&Snapshot> {
    let mut pending: Vec<&Snapshot> = snaps.iter().collect();
    pending.sort_by(|a, b| (a.creation_time, &a.name).cmp(&(b.creation_time, &b.name)));
    let mut order: Vec<&Snapshot> = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready = pending.iter().position(|s| {
            s.parent.as_deref().is_none_or(|p| {
                order.iter().any(|o| o.id == p) || !pending.iter().any(|q| q.id == p)
            })
        });
        // A cycle cannot be in a forest; if one were, the oldest goes on.
        order.push(pending.remove(ready.unwrap_or(0)));
    }
    order
}

/// libvirt's persistent definition of `name`, with its secrets (it is
/// defined again from this text).
fn inactive_xml(virsh: &Virsh, name: &str) -> Result<String> {
    virsh.run(
        &["dumpxml", "--inactive", "--security-info", "--domain", name],
        QUICK,
    )
}

/// The pid of domain `name`'s QEMU from libvirt's pid file, for a
/// privileged libvirtd (`qemu:///system`), while it runs; `None` for
/// other URIs (the file is elsewhere, and not root's).
pub fn system_qemu_pid(virsh: &Virsh, name: &str) -> Option<i32> {
    if !virsh.uri().starts_with("qemu:///system") {
        return None;
    }
    let path = Path::new(SYSTEM_PID_DIR).join(format!("{name}.pid"));
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

impl Manager for LibvirtDomain {
    fn qemu_pid(&self) -> Option<i32> {
        system_qemu_pid(&self.virsh, &self.name)
    }

    fn start_paused(&self) -> Result<()> {
        self.virsh
            .run(&["start", "--paused", "--domain", &self.name], START)
            .map(drop)
    }

    fn restore_paused(&self, memory: &std::fs::File, disks: &[DiskDef]) -> Result<()> {
        // libvirt's persistent definition (what `virsh start` boots),
        // on the disks given: the live definition of the restored QEMU.
        // Every revert records the new layers right before (see
        // `layers_changed`): the definition it left is used.
        let defined = self.defined.lock().take().filter(|(d, _)| d == disks);
        let xml = match defined {
            Some((_, xml)) => xml,
            None => {
                let xml = inactive_xml(&self.virsh, &self.name)?;
                define::with_sources(&xml, disks)?.unwrap_or(xml)
            }
        };
        save_image::restore(&self.virsh, &self.state_dir, &xml, memory, RESTORE)
    }

    fn destroy(&self) -> Result<()> {
        self.virsh
            .run(&["destroy", "--domain", &self.name], DESTROY)
            .map(drop)
    }

    fn layers_changed(&self, disks: &[DiskDef]) -> Result<()> {
        *self.defined.lock() = None;
        let xml = inactive_xml(&self.virsh, &self.name)?;
        let Some(new) = define::with_sources(&xml, disks)? else {
            *self.defined.lock() = Some((disks.to_vec(), xml));
            return Ok(());
        };
        let file = self.state_dir.join("libvirt-define.xml");
        // Read by virsh at once and removed: it need not be durable.
        crate::store::atomic::write_transient(&file, new.as_bytes())?;
        let r = self
            .virsh
            .run(&[std::ffi::OsStr::new("define"), file.as_os_str()], QUICK);
        let _ = std::fs::remove_file(&file);
        if r.is_ok() {
            *self.defined.lock() = Some((disks.to_vec(), new));
        }
        r.map(drop)
    }

    fn switch_to_overlays(&self, overlays: &[(String, &Path)], unchanged: &[&str]) -> Result<()> {
        live::switch(
            &self.virsh,
            &self.name,
            &self.state_dir,
            overlays,
            unchanged,
        )
    }

    fn commit(&self, target: &str, top: Option<&Path>, base: &Path) -> Result<()> {
        live::run_job(
            &self.virsh,
            &live::commit_args(&self.name, target, top, base)?,
        )
    }

    fn pull(&self, target: &str, base: Option<&Path>) -> Result<()> {
        live::run_job(&self.virsh, &live::pull_args(&self.name, target, base)?)
    }

    fn describe(&self) -> String {
        format!("libvirt {}", self.virsh.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemoryLocation, SnapshotState};

    fn snap(id: &str, name: &str, parent: Option<&str>, t: i64) -> Snapshot {
        Snapshot {
            id: id.into(),
            name: name.into(),
            description: None,
            creation_time: t,
            state: SnapshotState::Shutoff,
            parent: parent.map(Into::into),
            memory: MemoryLocation::No,
            disks: Vec::new(),
            domain_xml: None,
            memory_format: Default::default(),
            machine: None,
        }
    }

    #[test]
    fn parents_go_before_their_children_whatever_the_names_and_times() {
        let snaps = vec![
            snap("3", "a", Some("2"), 5),
            snap("1", "z", None, 5),
            snap("2", "m", Some("1"), 5),
            snap("4", "b", None, 4),
            snap("5", "c", Some("gone"), 6),
        ];
        let names: Vec<&str> = parents_first(&snaps)
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["b", "z", "m", "a", "c"]);
    }
}
