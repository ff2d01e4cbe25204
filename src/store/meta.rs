//! The metadata of one domain on disk:
//!
//! ```text
//! <state>/<domain>/snapshots/<id>.xml   one <domainsnapshot> per snapshot
//! <state>/<domain>/current              the id of the current snapshot
//! <state>/<domain>/argv                 QEMU's last verified command line: owner line, argv NUL-separated
//! <state>/<domain>/layers               each disk's active image (after external snapshots)
//! <state>/<domain>/layers.history       images that were active layers before
//! <state>/<domain>/pending-tag-deletes  tags of deleted snapshots left in backing images
//! <state>/<domain>/made                 files vmsnapfs made beside the images: path, dev, inode
//! <state>/<domain>/journal/             intent records (see `journal`)
//! <state>/<domain>/log                  the domain's operation log
//! ```
//!
//! Files are named by snapshot id, never by name, so a rename rewrites one
//! file and any name fits.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::atomic::{clean_temp_files, remove_durable, write_atomic};
use super::journal::Journal;
use super::journal::{escape, unescape};
use super::owned::{self, FileId, Removal};
use crate::model::{Forest, Snapshot};
use crate::xml::snapshot::{parse_snapshot_xml, snapshot_from_spec, write_snapshot_xml};

/// The metadata directory of one domain.
#[derive(Debug, Clone)]
pub struct DomainStore {
    dir: PathBuf,
}

/// What loading found: the forest and the files it could not use.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The snapshots with parents and current resolved.
    pub forest: Forest,
    /// One sentence per file that was skipped, for the log.
    pub warnings: Vec<String>,
}

impl DomainStore {
    /// Opens (creating) `<state_root>/<domain>`, root's alone: 0700
    /// directories, 0600 files (tightened if an earlier run left them
    /// open to others).
    pub fn open(state_root: &Path, domain: &str) -> io::Result<Self> {
        let dir = state_root.join(domain);
        super::atomic::private_dir(&dir.join("snapshots"))?;
        super::atomic::tighten(&dir)?;
        clean_temp_files(&dir.join("snapshots"))?;
        clean_temp_files(&dir)?;
        Ok(DomainStore { dir })
    }

    /// The domain's metadata directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The domain's intent journal.
    pub fn journal(&self) -> io::Result<Journal> {
        Journal::open(&self.dir.join("journal"))
    }

    /// Path of the operation log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    fn snapshot_path(&self, id: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{id}.xml"))
    }

    /// True when the metadata of snapshot `id` is on disk.
    pub fn has_snapshot(&self, id: &str) -> bool {
        self.snapshot_path(id).exists()
    }

    /// Reads one stored snapshot.
    pub fn read_snapshot(&self, id: &str) -> Result<Snapshot, String> {
        let path = self.snapshot_path(id);
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let spec = parse_snapshot_xml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        snapshot_from_spec(spec)
            .map(|(s, _)| s)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Loads every snapshot and the current pointer.
    pub fn load(&self) -> io::Result<Loaded> {
        let mut loaded = Loaded::default();
        let mut snaps = Vec::new();
        let mut by_parent_name = Vec::new();
        for entry in fs::read_dir(self.dir.join("snapshots"))? {
            let path = entry?.path();
            if path.extension().is_none_or(|x| x != "xml") {
                continue;
            }
            let parsed = fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_snapshot_xml(&t).map_err(|e| e.to_string()))
                .and_then(|spec| snapshot_from_spec(spec).map_err(|e| e.to_string()));
            match parsed {
                Ok((snap, parent_name)) => {
                    if snap.parent.is_none() {
                        if let Some(p) = parent_name {
                            by_parent_name.push((snap.id.clone(), p));
                        }
                    }
                    snaps.push(snap);
                }
                Err(e) => loaded.warnings.push(format!(
                    "skipped unreadable metadata {}: {e}",
                    path.display()
                )),
            }
        }
        // Parents named but not given by id (hand-written metadata).
        for (id, pname) in by_parent_name {
            let pid = snaps.iter().find(|s| s.name == pname).map(|s| s.id.clone());
            if let Some(s) = snaps.iter_mut().find(|s| s.id == id) {
                s.parent = pid;
            }
        }
        // Insert parents before children so that parent links survive.
        snaps.sort_by(|a, b| (a.creation_time, &a.id).cmp(&(b.creation_time, &b.id)));
        let mut pending = snaps;
        while !pending.is_empty() {
            let before = pending.len();
            let mut rest = Vec::new();
            for s in pending {
                let ready = s
                    .parent
                    .as_ref()
                    .is_none_or(|p| loaded.forest.get(p).is_some());
                if ready {
                    let path = self.snapshot_path(&s.id);
                    if let Err(e) = loaded.forest.insert(s) {
                        loaded
                            .warnings
                            .push(format!("skipped metadata {}: {e}", path.display()));
                    }
                } else {
                    rest.push(s);
                }
            }
            if rest.len() == before {
                // Parents missing or a cycle: the rest become roots.
                for mut s in rest {
                    s.parent = None;
                    let _ = loaded.forest.insert(s);
                }
                break;
            }
            pending = rest;
        }
        let current = fs::read_to_string(self.dir.join("current")).ok();
        loaded.forest.set_current(current.as_deref().map(str::trim));
        Ok(loaded)
    }

    /// Durably writes one snapshot's metadata.
    pub fn save_snapshot(&self, snap: &Snapshot, forest: &Forest) -> io::Result<()> {
        let parent_name = snap.parent.as_deref().and_then(|p| forest.name_of(p));
        let xml = write_snapshot_xml(snap, parent_name);
        write_atomic(&self.snapshot_path(&snap.id), xml.as_bytes())
    }

    /// Durably removes one snapshot's metadata.
    pub fn remove_snapshot(&self, id: &str) -> io::Result<()> {
        remove_durable(&self.snapshot_path(id))
    }

    /// Durably records the current snapshot.
    pub fn save_current(&self, id: Option<&str>) -> io::Result<()> {
        let path = self.dir.join("current");
        match id {
            Some(id) => write_atomic(&path, id.as_bytes()),
            None => remove_durable(&path),
        }
    }

    /// Records a verified QEMU command line and who ran it, to start the
    /// domain again later (first line `uid gid groups`, then the argv
    /// NUL-separated).
    pub fn save_argv(&self, argv: &[String], owner: &str) -> io::Result<()> {
        let text = format!("{owner}\n{}", argv.join("\0"));
        write_atomic(&self.dir.join("argv"), text.as_bytes())
    }

    /// Forgets the recorded command line.
    pub fn forget_argv(&self) -> io::Result<()> {
        remove_durable(&self.dir.join("argv"))
    }

    /// The last recorded QEMU command line and its owner line. A file
    /// without an owner line (written before command lines were
    /// verified) is not returned.
    pub fn load_argv(&self) -> Option<(Vec<String>, String)> {
        let text = fs::read_to_string(self.dir.join("argv")).ok()?;
        let (owner, rest) = text.split_once('\n')?;
        let argv: Vec<String> = rest.split('\0').map(str::to_owned).collect();
        (!argv.is_empty() && !argv[0].is_empty()).then(|| (argv, owner.to_owned()))
    }

    /// Durably records each disk's active layer: target, format, image.
    pub fn save_layers(&self, layers: &BTreeMap<String, Layer>) -> io::Result<()> {
        let mut text = String::new();
        for (target, l) in layers {
            text += &format!(
                "{}\t{}\t{}\n",
                escape(target),
                escape(&l.format),
                escape(&l.path.to_string_lossy())
            );
        }
        write_atomic(&self.dir.join("layers"), text.as_bytes())
    }

    /// Durably adds images that were a disk's active layer: a command line
    /// recorded earlier may name them (see `QemuBackend::start_process`).
    pub fn add_layer_history(&self, entries: &[(String, PathBuf)]) -> io::Result<()> {
        let mut all = self.layer_history();
        let known = all.len();
        for e in entries {
            if !all.contains(e) {
                all.push(e.clone());
            }
        }
        if all.len() == known {
            return Ok(());
        }
        let text: String = all
            .iter()
            .map(|(t, p)| format!("{}\t{}\n", escape(t), escape(&p.to_string_lossy())))
            .collect();
        write_atomic(&self.dir.join("layers.history"), text.as_bytes())
    }

    /// Every image recorded by [`DomainStore::add_layer_history`].
    pub fn layer_history(&self) -> Vec<(String, PathBuf)> {
        let text = fs::read_to_string(self.dir.join("layers.history")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (t, p) = l.split_once('\t')?;
                Some((unescape(t), PathBuf::from(unescape(p))))
            })
            .collect()
    }

    /// Internal snapshots deleted from the tree whose tags are still in
    /// an image (a backing image of the running QEMU): (image, tag).
    pub fn pending_tag_deletes(&self) -> Vec<(PathBuf, String)> {
        let text = fs::read_to_string(self.dir.join("pending-tag-deletes")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (p, t) = l.split_once('\t')?;
                Some((PathBuf::from(unescape(p)), unescape(t)))
            })
            .collect()
    }

    /// Durably records the list of [`DomainStore::pending_tag_deletes`].
    pub fn save_pending_tag_deletes(&self, list: &[(PathBuf, String)]) -> io::Result<()> {
        let path = self.dir.join("pending-tag-deletes");
        if list.is_empty() {
            return remove_durable(&path);
        }
        let text: String = list
            .iter()
            .map(|(p, t)| format!("{}\t{}\n", escape(&p.to_string_lossy()), escape(t)))
            .collect();
        write_atomic(&path, text.as_bytes())
    }

    /// The fingerprints recorded for frozen images (image, opaque text).
    pub fn frozen_fingerprints(&self) -> BTreeMap<PathBuf, String> {
        let text = fs::read_to_string(self.dir.join("frozen")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (p, f) = l.split_once('\t')?;
                Some((PathBuf::from(unescape(p)), unescape(f)))
            })
            .collect()
    }

    /// Durably records the fingerprints of the frozen images.
    pub fn save_frozen_fingerprints(&self, all: &BTreeMap<PathBuf, String>) -> io::Result<()> {
        let text: String = all
            .iter()
            .map(|(p, f)| format!("{}\t{}\n", escape(&p.to_string_lossy()), escape(f)))
            .collect();
        write_atomic(&self.dir.join("frozen"), text.as_bytes())
    }

    /// The recorded active layers (empty when none were recorded).
    pub fn load_layers(&self) -> BTreeMap<String, Layer> {
        let text = fs::read_to_string(self.dir.join("layers")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, '\t');
                let target = unescape(f.next()?);
                let format = unescape(f.next()?);
                let path = PathBuf::from(unescape(f.next()?));
                Some((target, Layer { path, format }))
            })
            .collect()
    }
}

/// Serialises the read-modify-write of every domain's `made` record.
static MADE_LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

impl DomainStore {
    fn read_made(&self) -> Vec<(PathBuf, FileId)> {
        let text = fs::read_to_string(self.dir.join("made")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, '\t');
                let path = PathBuf::from(unescape(f.next()?));
                let dev = f.next()?.parse().ok()?;
                let ino = f.next()?.parse().ok()?;
                Some((path, (dev, ino)))
            })
            .collect()
    }

    fn write_made(&self, all: &[(PathBuf, FileId)]) -> io::Result<()> {
        let path = self.dir.join("made");
        if all.is_empty() {
            return remove_durable(&path);
        }
        let text: String = all
            .iter()
            .map(|(p, (d, i))| format!("{}\t{d}\t{i}\n", escape(&p.to_string_lossy())))
            .collect();
        write_atomic(&path, text.as_bytes())
    }

    /// Durably records files vmsnapfs made (overlays, memory files, copies)
    /// with their device and inode: only those inodes are ever removed.
    pub fn record_made(&self, files: &[(PathBuf, FileId)]) -> io::Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let _g = MADE_LOCK.lock();
        let mut all = self.read_made();
        all.retain(|(p, _)| !files.iter().any(|(f, _)| f == p));
        all.extend(files.iter().cloned());
        self.write_made(&all)
    }

    /// The device and inode vmsnapfs recorded for a file it made at `path`.
    pub fn made_id(&self, path: &Path) -> Option<FileId> {
        let _g = MADE_LOCK.lock();
        self.read_made()
            .into_iter()
            .find(|(p, _)| p == path)
            .map(|(_, id)| id)
    }

    /// Removes the file vmsnapfs made at `path` (see [`owned::remove`]):
    /// only the recorded inode; never through a symlink. A path with no
    /// record is left alone unless `unrecorded_ok` (images that snapshot
    /// metadata names, made before inodes were recorded): then only a
    /// regular file is removed.
    pub fn remove_made(&self, path: &Path, unrecorded_ok: bool) -> io::Result<Removal> {
        let id = self.made_id(path);
        if id.is_none() && !unrecorded_ok {
            return Ok(match fs::symlink_metadata(path) {
                Err(_) => Removal::Absent,
                Ok(_) => Removal::Refused(format!(
                    "{} was not made by vmsnapfs; left alone",
                    path.display()
                )),
            });
        }
        let r = owned::remove(path, id)?;
        if id.is_some() && matches!(r, Removal::Removed | Removal::Absent) {
            let _g = MADE_LOCK.lock();
            let mut all = self.read_made();
            all.retain(|(p, _)| p != path);
            self.write_made(&all)?;
        }
        Ok(r)
    }
}

/// The image a disk's guest writes go to now (its active layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The image file.
    pub path: PathBuf,
    /// Its format (`qcow2` for every overlay vmsnapfs makes).
    pub format: String,
}
