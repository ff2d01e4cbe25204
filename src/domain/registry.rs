//! All domains of one mount: read from the definitions directory, their
//! live state polled in the background.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use super::Domain;
use crate::backend::QemuBackend;
use crate::error::{Error, Result};
use crate::store::DomainStore;
use crate::xml::domain::parse_domain_def;

/// How often the live state of every domain is re-read.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long an unused frozen view keeps its `qemu-nbd`.
const VIEW_IDLE: Duration = Duration::from_secs(30);

/// The domains of one mount.
pub struct Registry {
    domains_dir: PathBuf,
    state_dir: PathBuf,
    domains: RwLock<BTreeMap<String, Arc<Domain>>>,
    stop: AtomicBool,
}

impl Registry {
    /// Reads every `*.xml` definition in `domains_dir`; metadata lives in
    /// `state_dir`. A definition that cannot be used is skipped with a warning.
    pub fn open(domains_dir: &Path, state_dir: &Path) -> Result<Arc<Self>> {
        if !domains_dir.is_dir() {
            return Err(Error::not_found(format!(
                "domains directory {} does not exist",
                domains_dir.display()
            )));
        }
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::from(e).context(format!("state dir {}", state_dir.display())))?;
        let reg = Arc::new(Registry {
            domains_dir: domains_dir.to_owned(),
            state_dir: state_dir.to_owned(),
            domains: RwLock::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
        });
        reg.rescan();
        Ok(reg)
    }

    /// Adds domains whose definition files appeared since the last scan.
    pub fn rescan(&self) {
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

    fn load_one(&self, path: &Path) -> Result<()> {
        let meta = std::fs::metadata(path)?;
        if meta.len() > 1024 * 1024 {
            return Err(Error::invalid("definition larger than 1 MiB"));
        }
        let text = std::fs::read_to_string(path)?;
        let def = parse_domain_def(&text).map_err(|e| Error::invalid(e.to_string()))?;
        if self.domains.read().contains_key(&def.name) {
            return Ok(());
        }
        let store = DomainStore::open(&self.state_dir, &def.name)?;
        let backend = Arc::new(QemuBackend::new(def.clone(), store.clone()));
        let name = def.name.clone();
        let dom = Arc::new(Domain::open(def, store, backend)?);
        log::info!(
            "domain {name}: {} snapshots, {}",
            dom.forest().len(),
            dom.state().as_str()
        );
        self.domains.write().entry(name).or_insert(dom);
        Ok(())
    }

    /// The domain with this name.
    pub fn get(&self, name: &str) -> Option<Arc<Domain>> {
        self.domains.read().get(name).cloned()
    }

    /// All domains, by name.
    pub fn all(&self) -> Vec<Arc<Domain>> {
        self.domains.read().values().cloned().collect()
    }

    /// Starts the background thread that re-reads every domain's state.
    pub fn start_poller(self: &Arc<Self>) {
        let reg = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("state-poller".into())
            .spawn(move || loop {
                std::thread::sleep(POLL_INTERVAL);
                let Some(reg) = reg.upgrade() else { return };
                if reg.stop.load(Ordering::Acquire) {
                    return;
                }
                for d in reg.all() {
                    d.poll_state();
                    d.views().release_idle(VIEW_IDLE);
                }
            })
            .expect("spawn poller thread");
    }

    /// Stops the poller and every view server.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        for d in self.all() {
            d.views().close_all();
        }
    }
}
