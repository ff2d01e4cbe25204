//! The intent journal: before a multi-step operation touches an image it
//! records what it is about to do; the record is removed when the
//! operation is complete. Records found at start-up are replayed or rolled
//! back by the domain (see `domain::recovery`).
//!
//! A record is one JSON object (see [`super::record`]: paths keep their
//! exact bytes); records in the line format of earlier versions are
//! still read, so an intent pending across an upgrade is recovered.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::atomic::{remove_durable, write_atomic};
use super::record::{self, unescape};

/// What an interrupted operation was doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Intent {
    /// Creating snapshot `id` named `name` (internal tag = id).
    Create {
        /// Snapshot id and qcow2 tag.
        id: String,
        /// Its name in the tree.
        name: String,
    },
    /// Creating external snapshot `id`: new overlays become the disks'
    /// active layers. `plan` is the snapshot's metadata as it will be
    /// written, so that an interrupted create can be finished.
    CreateExternal {
        /// Snapshot id.
        id: String,
        /// Its name in the tree.
        name: String,
        /// The overlay each external disk gets, by target.
        #[serde(with = "record::targets")]
        overlays: Vec<(String, PathBuf)>,
        /// The `<domainsnapshot>` XML to record.
        plan: String,
    },
    /// Reverting to external snapshot `id`: new overlays become the
    /// active layers; the layers left behind are kept as snapshot `left`
    /// (its metadata) or their files in `discard` are removed.
    RevertExternal {
        /// The snapshot, the state asked for and what is left behind.
        #[serde(flatten)]
        revert: RevertRecord,
        /// The new overlay of each switched disk, by target.
        #[serde(with = "record::targets")]
        overlays: Vec<(String, PathBuf)>,
    },
    /// Reverting to internal snapshot `id` whose tags live in images that
    /// are not all active layers: each (image, copy) in `moved` first gets
    /// its current contents copied out and its dependents moved onto the
    /// copy; then every image is reverted in place and becomes active.
    RevertRelocate {
        /// The snapshot (its id is the tag), the state asked for and what
        /// is left behind.
        #[serde(flatten)]
        revert: RevertRecord,
        /// (image, copy of its current contents).
        #[serde(with = "record::path_pairs")]
        moved: Vec<(PathBuf, PathBuf)>,
    },
    /// Deleting external snapshot `id`: images merged, then the files in
    /// `candidates` that nothing needs any more are removed.
    DeleteExternal {
        /// Snapshot id.
        id: String,
        /// Images and the memory file that may become unused.
        #[serde(with = "record::paths")]
        candidates: Vec<PathBuf>,
    },
    /// Deleting snapshot `id`.
    Delete {
        /// Snapshot id and qcow2 tag.
        id: String,
    },
    /// Reverting to snapshot `id`, leaving the domain in `target` state.
    Revert {
        /// Snapshot id and qcow2 tag.
        id: String,
        /// `running`, `paused` or `shutoff`.
        target: String,
    },
    /// The guest's file systems are being frozen through the guest agent
    /// at `agent` for snapshot `id`: written before the freeze, removed
    /// once they are thawed; a record left behind is thawed at start.
    Thaw {
        /// The snapshot whose create froze them.
        id: String,
        /// The agent's socket.
        #[serde(with = "record::path")]
        agent: PathBuf,
    },
}

/// What the record of a revert that leaves state behind holds besides
/// its own steps (the same JSON fields as the variant's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertRecord {
    /// Snapshot id.
    pub id: String,
    /// `running`, `paused` or `shutoff`.
    pub target: String,
    /// The `<domainsnapshot>` XML of the snapshot keeping the state left behind.
    pub left: Option<String>,
    /// Files of the state left behind, removed as asked (`discard`).
    #[serde(with = "record::paths")]
    pub discard: Vec<PathBuf>,
}

impl Intent {
    /// A short description for logs: the operation and the snapshot.
    pub fn describe(&self) -> String {
        match self {
            Intent::Create { id, name } => format!("create of {name:?} ({id})"),
            Intent::CreateExternal { id, name, .. } => {
                format!("external create of {name:?} ({id})")
            }
            Intent::Delete { id } => format!("delete of {id}"),
            Intent::DeleteExternal { id, .. } => format!("delete of external {id}"),
            Intent::RevertRelocate { revert: r, .. } => {
                format!("revert to {} in backing images ({})", r.id, r.target)
            }
            Intent::Revert { id, target } => format!("revert to {id} ({target})"),
            Intent::Thaw { id, .. } => format!("freeze of the guest's file systems for {id}"),
            Intent::RevertExternal { revert: r, .. } => {
                format!("revert to external {} ({})", r.id, r.target)
            }
        }
    }

    /// The bytes of the record of this intent.
    pub fn to_record(&self) -> Vec<u8> {
        record::encode(self)
    }

    /// Reads a record: JSON, or the line format of earlier versions.
    /// `None` when it is neither (a damaged or foreign file).
    pub fn from_record(bytes: &[u8]) -> Option<Intent> {
        if record::is_legacy(bytes) {
            return legacy::decode(std::str::from_utf8(bytes).ok()?);
        }
        serde_json::from_slice(bytes).ok()
    }
}

/// The line format of earlier versions (`op=...`, `id=...`, one field a
/// line, backslash escapes), read only.
mod legacy {
    use super::*;

    /// Decodes an old record.
    pub(super) fn decode(text: &str) -> Option<Intent> {
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
        };
        let id = get("id")?;
        Some(match get("op")?.as_str() {
            "create" => Intent::Create {
                id,
                name: unescape(&get("name")?),
            },
            "create-external" => Intent::CreateExternal {
                id,
                name: unescape(&get("name")?),
                overlays: overlays(text)?,
                plan: unescape(&get("plan")?),
            },
            "revert-external" => Intent::RevertExternal {
                revert: revert_record(id, &get, text)?,
                overlays: overlays(text)?,
            },
            "revert-relocate" => Intent::RevertRelocate {
                revert: revert_record(id, &get, text)?,
                moved: text
                    .lines()
                    .filter_map(|l| l.strip_prefix("moved="))
                    .map(|l| {
                        let (a, b) = l.split_once('\t')?;
                        Some((PathBuf::from(unescape(a)), PathBuf::from(unescape(b))))
                    })
                    .collect::<Option<Vec<_>>>()?,
            },
            "delete-external" => Intent::DeleteExternal {
                id,
                candidates: paths(text, "candidate="),
            },
            "delete" => Intent::Delete { id },
            "revert" => Intent::Revert {
                id,
                target: get("target")?,
            },
            _ => return None,
        })
    }

    /// The fields every revert record has.
    fn revert_record(
        id: String,
        get: &dyn Fn(&str) -> Option<String>,
        text: &str,
    ) -> Option<RevertRecord> {
        Some(RevertRecord {
            id,
            target: get("target")?,
            left: get("left").map(|l| unescape(&l)),
            discard: paths(text, "discard="),
        })
    }

    fn paths(text: &str, key: &str) -> Vec<PathBuf> {
        text.lines()
            .filter_map(|l| l.strip_prefix(key))
            .map(|p| PathBuf::from(unescape(p)))
            .collect()
    }

    fn overlays(text: &str) -> Option<Vec<(String, PathBuf)>> {
        text.lines()
            .filter_map(|l| l.strip_prefix("overlay="))
            .map(|l| {
                let (t, p) = l.split_once('\t')?;
                Some((unescape(t), PathBuf::from(unescape(p))))
            })
            .collect()
    }
}

/// The journal directory of one domain.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// A written intent; [`Journal::complete`] removes it.
#[derive(Debug)]
pub struct IntentRecord {
    path: PathBuf,
    /// What was recorded.
    pub intent: Intent,
}

impl Journal {
    /// Opens (creating) the journal directory.
    pub fn open(dir: &Path) -> io::Result<Self> {
        super::atomic::private_dir(dir)?;
        Ok(Journal {
            dir: dir.to_owned(),
        })
    }

    /// Durably records an intent before the operation starts.
    pub fn begin(&self, intent: Intent) -> io::Result<IntentRecord> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = self.dir.join(format!("{stamp:032}.intent"));
        write_atomic(&path, &intent.to_record())?;
        Ok(IntentRecord { path, intent })
    }

    /// Durably removes a record once its operation completed or was undone.
    pub fn complete(&self, record: IntentRecord) -> io::Result<()> {
        remove_durable(&record.path)
    }

    /// The records left by interrupted operations, oldest first. A record
    /// that cannot be read is returned as an error entry with its path.
    pub fn pending(&self) -> io::Result<Vec<Result<IntentRecord, PathBuf>>> {
        let mut paths: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "intent"))
            .collect();
        paths.sort();
        Ok(paths
            .into_iter()
            .map(|path| {
                let bytes = fs::read(&path).map_err(|_| path.clone())?;
                match Intent::from_record(&bytes) {
                    Some(intent) => Ok(IntentRecord { path, intent }),
                    None => Err(path),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revert(id: &str, target: &str, left: Option<&str>, discard: &[&str]) -> RevertRecord {
        RevertRecord {
            id: id.into(),
            target: target.into(),
            left: left.map(str::to_owned),
            discard: discard.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn records_round_trip_and_complete() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-journal-{}", std::process::id()));
        let j = Journal::open(&dir).unwrap();
        let a = Intent::Create {
            id: "s1".into(),
            name: "we\\ird\nname".into(),
        };
        let b = Intent::Revert {
            id: "s2".into(),
            target: "paused".into(),
        };
        let c = Intent::CreateExternal {
            id: "s3".into(),
            name: "ext".into(),
            overlays: vec![("vda".into(), "/img/a\tb.qcow2".into())],
            plan: "<domainsnapshot>\n  <name>ext</name>\n</domainsnapshot>".into(),
        };
        j.begin(a.clone()).unwrap();
        j.begin(c.clone()).unwrap();
        let d = Intent::RevertExternal {
            revert: revert(
                "s4",
                "running",
                Some("<domainsnapshot/>"),
                &["/img/old.qcow2"],
            ),
            overlays: vec![("vda".into(), "/img/a.r.qcow2".into())],
        };
        j.begin(d.clone()).unwrap();
        let e = Intent::Thaw {
            id: "s5".into(),
            agent: "/run/vm/qga.sock".into(),
        };
        j.begin(e.clone()).unwrap();
        let rb = j.begin(b).unwrap();
        j.complete(rb).unwrap();
        let left: Vec<_> = j
            .pending()
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().intent)
            .collect();
        assert_eq!(left, vec![a, c, d, e]);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Records as the line format of earlier versions wrote them: an
    /// intent pending across an upgrade is still recovered.
    #[test]
    fn reads_records_of_the_old_format() {
        let read = |t: &str| Intent::from_record(t.as_bytes());
        assert_eq!(
            read("op=create\nid=s1\nname=we\\\\ird\\nname\n"),
            Some(Intent::Create {
                id: "s1".into(),
                name: "we\\ird\nname".into()
            })
        );
        assert_eq!(
            read(
                "op=create-external\nid=s3\nname=ext\noverlay=vda\t/img/a\\tb.qcow2\n\
                 plan=<domainsnapshot>\\n  <name>ext</name>\\n</domainsnapshot>\n"
            ),
            Some(Intent::CreateExternal {
                id: "s3".into(),
                name: "ext".into(),
                overlays: vec![("vda".into(), "/img/a\tb.qcow2".into())],
                plan: "<domainsnapshot>\n  <name>ext</name>\n</domainsnapshot>".into(),
            })
        );
        assert_eq!(
            read(
                "op=revert-external\nid=s4\ntarget=running\noverlay=vda\t/img/a.r.qcow2\n\
                 discard=/img/old.qcow2\nleft=<domainsnapshot/>\n"
            ),
            Some(Intent::RevertExternal {
                revert: revert(
                    "s4",
                    "running",
                    Some("<domainsnapshot/>"),
                    &["/img/old.qcow2"]
                ),
                overlays: vec![("vda".into(), "/img/a.r.qcow2".into())],
            })
        );
        assert_eq!(
            read(
                "op=revert-relocate\nid=s5\ntarget=shutoff\nmoved=/i/a.qcow2\t/i/a.moved.qcow2\n\
                 discard=/i/x\n"
            ),
            Some(Intent::RevertRelocate {
                revert: revert("s5", "shutoff", None, &["/i/x"]),
                moved: vec![("/i/a.qcow2".into(), "/i/a.moved.qcow2".into())],
            })
        );
        assert_eq!(
            read("op=delete-external\nid=s6\ncandidate=/i/p.qcow2\ncandidate=/i/m.memory\n"),
            Some(Intent::DeleteExternal {
                id: "s6".into(),
                candidates: vec!["/i/p.qcow2".into(), "/i/m.memory".into()],
            })
        );
        assert_eq!(
            read("op=delete\nid=s7\n"),
            Some(Intent::Delete { id: "s7".into() })
        );
        assert_eq!(
            read("op=revert\nid=s8\ntarget=paused\n"),
            Some(Intent::Revert {
                id: "s8".into(),
                target: "paused".into()
            })
        );
        assert_eq!(read("op=unknown\nid=x\n"), None);
        assert_eq!(read("op=revert\nid=x\n"), None);
        assert_eq!(read("{\"op\":\"delete\"}"), None);
    }

    /// A path with a byte that is not UTF-8 comes back as the same bytes.
    #[test]
    fn non_utf8_paths_round_trip() {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let odd = PathBuf::from(std::ffi::OsString::from_vec(
            b"/img/caf\xe9/vda.x.qcow2".to_vec(),
        ));
        let i = Intent::DeleteExternal {
            id: "s".into(),
            candidates: vec![odd.clone()],
        };
        let back = Intent::from_record(&i.to_record()).unwrap();
        let Intent::DeleteExternal { candidates, .. } = &back else {
            panic!("{back:?}")
        };
        assert_eq!(
            candidates[0].as_os_str().as_bytes(),
            odd.as_os_str().as_bytes()
        );
        assert_eq!(back, i);
    }
}
