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
//! file and any name fits. `layers`, `layers.history`,
//! `pending-tag-deletes`, `frozen` and `made` are JSON records whose paths
//! keep their exact bytes (see [`super::record`]); the tab-separated lines
//! of earlier versions are still read.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::atomic::{clean_temp_files, remove_durable, write_atomic};
use super::journal::Journal;
use super::owned::{self, FileId, Removal};
use super::record::{self, unescape};
use crate::model::{Forest, Snapshot};
use crate::xml::snapshot::{parse_snapshot_xml, snapshot_from_spec, write_snapshot_xml};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

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
        write_atomic(&self.dir.join("layers"), &encode_layers(layers))
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
        write_atomic(&self.dir.join("layers.history"), &encode_history(&all))
    }

    /// Every image recorded by [`DomainStore::add_layer_history`].
    pub fn layer_history(&self) -> Vec<(String, PathBuf)> {
        let bytes = self.read_bytes("layers.history");
        parse_history(&bytes).unwrap_or_default()
    }

    /// Internal snapshots deleted from the tree whose tags are still in
    /// an image (a backing image of the running QEMU): (image, tag).
    pub fn pending_tag_deletes(&self) -> Vec<(PathBuf, String)> {
        let bytes = self.read_bytes("pending-tag-deletes");
        parse_pending_tag_deletes(&bytes).unwrap_or_default()
    }

    /// Durably records the list of [`DomainStore::pending_tag_deletes`].
    pub fn save_pending_tag_deletes(&self, list: &[(PathBuf, String)]) -> io::Result<()> {
        let path = self.dir.join("pending-tag-deletes");
        if list.is_empty() {
            return remove_durable(&path);
        }
        write_atomic(&path, &encode_pending_tag_deletes(list))
    }

    /// The fingerprints recorded for frozen images (image, opaque text).
    pub fn frozen_fingerprints(&self) -> BTreeMap<PathBuf, String> {
        let bytes = self.read_bytes("frozen");
        parse_frozen(&bytes).unwrap_or_default()
    }

    /// Durably records the fingerprints of the frozen images.
    pub fn save_frozen_fingerprints(&self, all: &BTreeMap<PathBuf, String>) -> io::Result<()> {
        write_atomic(&self.dir.join("frozen"), &encode_frozen(all))
    }

    /// The recorded active layers (empty when none were recorded).
    pub fn load_layers(&self) -> BTreeMap<String, Layer> {
        parse_layers(&self.read_bytes("layers")).unwrap_or_default()
    }

    /// The bytes of record `name`; a missing one reads as empty (which
    /// every record reads as no entries).
    fn read_bytes(&self, name: &str) -> Vec<u8> {
        fs::read(self.dir.join(name)).unwrap_or_default()
    }
}

/// Reads a record: JSON, or through `legacy` when it is in the line format
/// of earlier versions. `None` when it is neither.
fn parse_record<T: DeserializeOwned>(bytes: &[u8], legacy: impl FnOnce(&str) -> T) -> Option<T> {
    if record::is_legacy(bytes) {
        return std::str::from_utf8(bytes).ok().map(legacy);
    }
    serde_json::from_slice(bytes).ok()
}

/// Reads a `layers` record: each disk's active layer by target.
pub fn parse_layers(bytes: &[u8]) -> Option<BTreeMap<String, Layer>> {
    parse_record(bytes, |text| {
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, '\t');
                let target = unescape(f.next()?);
                let format = unescape(f.next()?);
                let path = PathBuf::from(unescape(f.next()?));
                Some((target, Layer { path, format }))
            })
            .collect()
    })
}

/// Encodes a `layers` record.
pub fn encode_layers(layers: &BTreeMap<String, Layer>) -> Vec<u8> {
    record::encode(layers)
}

/// Reads a `layers.history` record: (target, image).
pub fn parse_history(bytes: &[u8]) -> Option<Vec<(String, PathBuf)>> {
    let list: Vec<HistoryEntry> = parse_record(bytes, |text| {
        text.lines()
            .filter_map(|l| {
                let (t, p) = l.split_once('\t')?;
                Some(HistoryEntry {
                    target: unescape(t),
                    image: PathBuf::from(unescape(p)),
                })
            })
            .collect()
    })?;
    Some(list.into_iter().map(|e| (e.target, e.image)).collect())
}

/// Encodes a `layers.history` record.
pub fn encode_history(list: &[(String, PathBuf)]) -> Vec<u8> {
    let list: Vec<HistoryEntry> = list
        .iter()
        .map(|(target, image)| HistoryEntry {
            target: target.clone(),
            image: image.clone(),
        })
        .collect();
    record::encode(&list)
}

/// Reads a `pending-tag-deletes` record: (image, tag).
pub fn parse_pending_tag_deletes(bytes: &[u8]) -> Option<Vec<(PathBuf, String)>> {
    let list: Vec<PendingTag> = parse_record(bytes, |text| {
        text.lines()
            .filter_map(|l| {
                let (p, t) = l.split_once('\t')?;
                Some(PendingTag {
                    image: PathBuf::from(unescape(p)),
                    tag: unescape(t),
                })
            })
            .collect()
    })?;
    Some(list.into_iter().map(|e| (e.image, e.tag)).collect())
}

/// Encodes a `pending-tag-deletes` record.
pub fn encode_pending_tag_deletes(list: &[(PathBuf, String)]) -> Vec<u8> {
    let list: Vec<PendingTag> = list
        .iter()
        .map(|(image, tag)| PendingTag {
            image: image.clone(),
            tag: tag.clone(),
        })
        .collect();
    record::encode(&list)
}

/// Reads a `frozen` record: image -> fingerprint.
pub fn parse_frozen(bytes: &[u8]) -> Option<BTreeMap<PathBuf, String>> {
    let list: Vec<Fingerprint> = parse_record(bytes, |text| {
        text.lines()
            .filter_map(|l| {
                let (p, f) = l.split_once('\t')?;
                Some(Fingerprint {
                    image: PathBuf::from(unescape(p)),
                    fingerprint: unescape(f),
                })
            })
            .collect()
    })?;
    Some(list.into_iter().map(|e| (e.image, e.fingerprint)).collect())
}

/// Encodes a `frozen` record.
pub fn encode_frozen(all: &BTreeMap<PathBuf, String>) -> Vec<u8> {
    let list: Vec<Fingerprint> = all
        .iter()
        .map(|(image, f)| Fingerprint {
            image: image.clone(),
            fingerprint: f.clone(),
        })
        .collect();
    record::encode(&list)
}

/// Reads a `made` record: (path, (device, inode)).
pub fn parse_made(bytes: &[u8]) -> Option<Vec<(PathBuf, FileId)>> {
    let list: Vec<Made> = parse_record(bytes, |text| {
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, '\t');
                let path = PathBuf::from(unescape(f.next()?));
                let dev = f.next()?.parse().ok()?;
                let ino = f.next()?.parse().ok()?;
                Some(Made { path, dev, ino })
            })
            .collect()
    })?;
    Some(list.into_iter().map(|m| (m.path, (m.dev, m.ino))).collect())
}

/// Encodes a `made` record.
pub fn encode_made(all: &[(PathBuf, FileId)]) -> Vec<u8> {
    let list: Vec<Made> = all
        .iter()
        .map(|(p, (dev, ino))| Made {
            path: p.clone(),
            dev: *dev,
            ino: *ino,
        })
        .collect();
    record::encode(&list)
}

/// One entry of `layers.history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HistoryEntry {
    target: String,
    #[serde(with = "record::path")]
    image: PathBuf,
}

/// One entry of `pending-tag-deletes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PendingTag {
    #[serde(with = "record::path")]
    image: PathBuf,
    tag: String,
}

/// One entry of `frozen`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Fingerprint {
    #[serde(with = "record::path")]
    image: PathBuf,
    fingerprint: String,
}

/// One entry of `made`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Made {
    #[serde(with = "record::path")]
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// Serialises the read-modify-write of every domain's `made` record.
static MADE_LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

impl DomainStore {
    fn read_made(&self) -> Vec<(PathBuf, FileId)> {
        parse_made(&self.read_bytes("made")).unwrap_or_default()
    }

    fn write_made(&self, all: &[(PathBuf, FileId)]) -> io::Result<()> {
        let path = self.dir.join("made");
        if all.is_empty() {
            return remove_durable(&path);
        }
        write_atomic(&path, &encode_made(all))
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The image file.
    #[serde(with = "record::path")]
    pub path: PathBuf,
    /// Its format (`qcow2` for every overlay vmsnapfs makes).
    pub format: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};

    fn store(tag: &str) -> (PathBuf, DomainStore) {
        let root = std::env::temp_dir().join(format!("vmsnapfs-meta-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let s = DomainStore::open(&root, "vm").unwrap();
        (root, s)
    }

    /// The tab-separated lines of earlier versions are still read.
    #[test]
    fn reads_records_of_the_old_format() {
        let (root, s) = store("old");
        let dir = s.dir().to_owned();
        fs::write(
            dir.join("layers"),
            "vda\tqcow2\t/i/a\\tb.qcow2\nvdb\traw\t/i/b\n",
        )
        .unwrap();
        fs::write(dir.join("layers.history"), "vda\t/i/old.qcow2\n").unwrap();
        fs::write(dir.join("pending-tag-deletes"), "/i/base.qcow2\tvs-1\n").unwrap();
        fs::write(dir.join("frozen"), "/i/p.qcow2\t10 20 abc\n").unwrap();
        fs::write(dir.join("made"), "/i/o.qcow2\t5\t77\n").unwrap();
        let layers = s.load_layers();
        assert_eq!(layers["vda"].path, PathBuf::from("/i/a\tb.qcow2"));
        assert_eq!(layers["vda"].format, "qcow2");
        assert_eq!(layers["vdb"].path, PathBuf::from("/i/b"));
        assert_eq!(
            s.layer_history(),
            vec![("vda".to_owned(), PathBuf::from("/i/old.qcow2"))]
        );
        assert_eq!(
            s.pending_tag_deletes(),
            vec![(PathBuf::from("/i/base.qcow2"), "vs-1".to_owned())]
        );
        assert_eq!(
            s.frozen_fingerprints().into_iter().collect::<Vec<_>>(),
            vec![(PathBuf::from("/i/p.qcow2"), "10 20 abc".to_owned())]
        );
        assert_eq!(s.made_id(Path::new("/i/o.qcow2")), Some((5, 77)));
        // A rewrite is in the new format and reads back the same.
        s.save_layers(&layers).unwrap();
        assert!(fs::read(dir.join("layers")).unwrap().starts_with(b"{"));
        assert_eq!(s.load_layers(), layers);
        fs::remove_dir_all(&root).unwrap();
    }

    /// Every record keeps a path's exact bytes.
    #[test]
    fn records_keep_non_utf8_paths() {
        let (root, s) = store("bytes");
        let odd = PathBuf::from(OsString::from_vec(b"/img/caf\xe9/vda.qcow2".to_vec()));
        let layers = BTreeMap::from([(
            "vda".to_owned(),
            Layer {
                path: odd.clone(),
                format: "qcow2".into(),
            },
        )]);
        s.save_layers(&layers).unwrap();
        s.add_layer_history(&[("vda".into(), odd.clone())]).unwrap();
        s.save_pending_tag_deletes(&[(odd.clone(), "t".into())])
            .unwrap();
        s.save_frozen_fingerprints(&BTreeMap::from([(odd.clone(), "f".into())]))
            .unwrap();
        s.record_made(&[(odd.clone(), (1, 2))]).unwrap();
        let same = |p: &Path| assert_eq!(p.as_os_str().as_bytes(), odd.as_os_str().as_bytes());
        same(&s.load_layers()["vda"].path);
        same(&s.layer_history()[0].1);
        same(&s.pending_tag_deletes()[0].0);
        same(s.frozen_fingerprints().keys().next().unwrap());
        assert_eq!(s.made_id(&odd), Some((1, 2)));
        fs::remove_dir_all(&root).unwrap();
    }
}
