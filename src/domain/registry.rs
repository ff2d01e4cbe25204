//! All domains of one mount: read from the definitions directory, each
//! watched by its own thread (the state polled, start-up recovery, idle
//! views released), so that a domain whose monitor does not answer
//! delays no other domain and no FUSE call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::Domain;
use crate::backend::{QemuBackend, QemuImg};
use crate::error::{Error, Result};
use crate::model::DomainDef;
use crate::store::DomainStore;
use crate::xml::domain::parse_domain_def;

/// How often the live state of every domain is re-read.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long an unused frozen view keeps its `qemu-nbd`.
const VIEW_IDLE: Duration = Duration::from_secs(30);
/// How long opening the registry waits for a domain's first look at its
/// monitor before it goes on without it (the look goes on in the background).
const START_GRACE: Duration = Duration::from_secs(3);

/// A libvirt domain's link to libvirt and its backend (for the active
/// layers), for mirroring its snapshots into libvirt's list.
type LibvirtLink = (Arc<crate::libvirt::LibvirtDomain>, Arc<QemuBackend>);

/// Makes libvirt's snapshot list mirror the domain's (see
/// [`crate::libvirt::LibvirtDomain::sync_snapshots`]).
fn mirror_snapshots(dom: &Domain, link: &crate::libvirt::LibvirtDomain, backend: &QemuBackend) {
    use crate::backend::Backend;
    let (snaps, current) = {
        let f = dom.forest();
        let snaps: Vec<crate::model::Snapshot> = f.iter().cloned().collect();
        (snaps, f.current().map(str::to_owned))
    };
    link.sync_snapshots(&snaps, current.as_deref(), &backend.active_disks());
}

/// The domains of one mount.
pub struct Registry {
    domains_dir: PathBuf,
    /// In libvirt mode, the connection whose domains are the tree's.
    libvirt: Option<crate::libvirt::Virsh>,
    state_dir: PathBuf,
    domains: RwLock<BTreeMap<String, Arc<Domain>>>,
    stop: Arc<AtomicBool>,
    /// A background listing of libvirt's domains runs ([`Registry::rescan_soon`]).
    rescanning: AtomicBool,
    me: Weak<Registry>,
}

/// Largest definition file read.
const MAX_DEFINITION: u64 = 1024 * 1024;

/// Reads a definition file: a regular file (opened without following a
/// symlink and without blocking, so a FIFO or a device is refused, never
/// waited on), at most [`MAX_DEFINITION`] bytes.
fn read_definition(path: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::invalid("a symlink; definitions must be regular files"),
            _ => Error::from(e),
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::invalid(
            "not a regular file (a FIFO, a device or a directory)",
        ));
    }
    if meta.len() > MAX_DEFINITION {
        return Err(Error::invalid("definition larger than 1 MiB"));
    }
    let mut text = String::new();
    file.take(MAX_DEFINITION + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::invalid(format!("not readable as UTF-8 text: {e}")))?;
    if text.len() as u64 > MAX_DEFINITION {
        return Err(Error::invalid("definition larger than 1 MiB"));
    }
    Ok(text)
}

impl Registry {
    /// Reads every `*.xml` definition in `domains_dir`; metadata lives in
    /// `state_dir`. A definition that cannot be used is skipped with a
    /// warning. Each domain's thread starts at once; this waits until
    /// each domain is recovered, found unreachable, or has waited
    /// [`START_GRACE`] for its monitor.
    pub fn open(domains_dir: &Path, state_dir: &Path) -> Result<Arc<Self>> {
        if !domains_dir.is_dir() {
            return Err(Error::not_found(format!(
                "domains directory {} does not exist",
                domains_dir.display()
            )));
        }
        Self::open_from(domains_dir, None, state_dir)
    }

    /// Libvirt mode: every domain of the libvirt connection `uri`
    /// (`qemu:///system`), read from libvirt, no definition files (see
    /// [`crate::libvirt`]); otherwise as [`Registry::open`].
    pub fn open_libvirt(uri: &str, state_dir: &Path) -> Result<Arc<Self>> {
        let virsh = crate::libvirt::Virsh::new(uri);
        crate::libvirt::list_domains(&virsh)
            .map_err(|e| e.context(format!("libvirt connection {uri}")))?;
        Self::open_from(Path::new(""), Some(virsh), state_dir)
    }

    fn open_from(
        domains_dir: &Path,
        libvirt: Option<crate::libvirt::Virsh>,
        state_dir: &Path,
    ) -> Result<Arc<Self>> {
        crate::store::atomic::private_dir(state_dir)
            .map_err(|e| Error::from(e).context(format!("state dir {}", state_dir.display())))?;
        let reg = Arc::new_cyclic(|me| Registry {
            domains_dir: domains_dir.to_owned(),
            libvirt,
            state_dir: state_dir.to_owned(),
            domains: RwLock::new(BTreeMap::new()),
            stop: Arc::new(AtomicBool::new(false)),
            rescanning: AtomicBool::new(false),
            me: me.clone(),
        });
        let opened = Instant::now();
        reg.rescan();
        while !reg
            .all()
            .iter()
            .all(|d| d.start_settled(opened, START_GRACE))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(reg)
    }

    /// [`Registry::rescan`] for a FUSE request (a listing of the
    /// mount): definition files are read at once (no wait on anything
    /// but a local file system); libvirt's domains are listed by a
    /// background thread (a FUSE thread never waits on virsh), so a
    /// domain libvirt defined appears in a listing right after that one.
    pub fn rescan_soon(&self) {
        if self.libvirt.is_none() {
            return self.rescan();
        }
        if self.rescanning.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return self.rescanning.store(false, Ordering::Release);
        };
        let spawned = std::thread::Builder::new()
            .name("libvirt-list".into())
            .spawn(move || {
                me.rescan();
                me.rescanning.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.rescanning.store(false, Ordering::Release);
        }
    }

    /// Adds domains whose definition files appeared since the last scan.
    pub fn rescan(&self) {
        if let Some(virsh) = &self.libvirt {
            return self.rescan_libvirt(virsh);
        }
        let Ok(entries) = std::fs::read_dir(&self.domains_dir) else {
            log::warn!("cannot read {}", self.domains_dir.display());
            return;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "xml"))
            .collect();
        paths.sort();
        for path in paths {
            if let Err(e) = self.load_one(&path) {
                log::warn!("skipping domain definition {}: {e}", path.display());
            }
        }
    }

    /// Adds the libvirt domains that are not in the tree yet.
    fn rescan_libvirt(&self, virsh: &crate::libvirt::Virsh) {
        let names = match crate::libvirt::list_domains(virsh) {
            Ok(n) => n,
            Err(e) => return log::warn!("cannot list libvirt's domains: {e}"),
        };
        for name in names {
            if self.domains.read().contains_key(&name) {
                continue;
            }
            let r = crate::model::validate_name(&name)
                .map_err(|e| Error::invalid(e.to_string()))
                .and_then(|()| self.load_libvirt(virsh, &name));
            if let Err(e) = r {
                log::warn!("skipping libvirt domain {name}: {e}");
            }
        }
    }

    fn load_libvirt(&self, virsh: &crate::libvirt::Virsh, name: &str) -> Result<()> {
        let store = DomainStore::open(&self.state_dir, name)?;
        let (def, link) = crate::libvirt::LibvirtDomain::open(virsh, name, &store)?;
        let link = Arc::new(link);
        let backend = Arc::new(QemuBackend::managed(
            def.clone(),
            store.clone(),
            link.clone(),
        ));
        self.add(def, store, backend.clone(), Some((link, backend)))
    }

    fn load_one(&self, path: &Path) -> Result<()> {
        let text = read_definition(path)?;
        let def = parse_domain_def(&text).map_err(|e| Error::invalid(e.to_string()))?;
        if self.domains.read().contains_key(&def.name) {
            return Ok(());
        }
        let store = DomainStore::open(&self.state_dir, &def.name)?;
        let backend = Arc::new(QemuBackend::new(def.clone(), store.clone()));
        self.add(def, store, backend, None)
    }

    /// Opens the domain `def` on `backend` and starts its thread.
    fn add(
        &self,
        def: DomainDef,
        store: DomainStore,
        backend: Arc<QemuBackend>,
        libvirt: Option<LibvirtLink>,
    ) -> Result<()> {
        let name = def.name.clone();
        let dom = Arc::new(Domain::open(def, store, backend, Arc::new(QemuImg))?);
        log::info!("domain {name}: {} snapshots", dom.forest().len());
        let mut domains = self.domains.write();
        if domains.contains_key(&name) {
            return Ok(());
        }
        domains.insert(name.clone(), dom.clone());
        drop(domains);
        self.watch(name, dom, libvirt);
        Ok(())
    }

    /// Starts the thread of one domain: its first look at the monitor
    /// and start-up recovery, then a state poll each [`POLL_INTERVAL`]
    /// and the release of idle views, until [`Registry::shutdown`].
    fn watch(&self, name: String, dom: Arc<Domain>, libvirt: Option<LibvirtLink>) {
        let stop = self.stop.clone();
        let me = self.me.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{name}"))
            .spawn(move || {
                dom.start_up();
                let mut next = Instant::now() + POLL_INTERVAL;
                loop {
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    next = Instant::now() + POLL_INTERVAL;
                    if stop.load(Ordering::Acquire) || me.strong_count() == 0 {
                        return;
                    }
                    dom.poll_state();
                    dom.views().release_idle(VIEW_IDLE);
                    // Not while an operation changes what it mirrors (nor
                    // in the way of its commands to libvirt): the next
                    // poll does it.
                    if let Some((link, backend)) = libvirt.as_ref().filter(|_| !dom.is_busy()) {
                        mirror_snapshots(&dom, link, backend.as_ref());
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("domain {name}: cannot start its thread: {e}");
        }
    }

    /// The domain with this name.
    pub fn get(&self, name: &str) -> Option<Arc<Domain>> {
        self.domains.read().get(name).cloned()
    }

    /// All domains, by name.
    pub fn all(&self) -> Vec<Arc<Domain>> {
        self.domains.read().values().cloned().collect()
    }

    /// Stops the domains' threads and every view server.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        for d in self.all() {
            d.views().close_all();
        }
    }
}
