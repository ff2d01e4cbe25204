//! The intent journal: before a multi-step operation touches an image it
//! records what it is about to do; the record is removed when the
//! operation is complete. Records found at start-up are replayed or rolled
//! back by the domain (see `domain::recovery`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::atomic::{remove_durable, write_atomic};

/// What an interrupted operation was doing.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        overlays: Vec<(String, PathBuf)>,
        /// The `<domainsnapshot>` XML to record.
        plan: String,
    },
    /// Reverting to external snapshot `id`: new overlays become the
    /// active layers; the layers left behind are kept as snapshot `left`
    /// (its metadata) or their files in `discard` are removed.
    RevertExternal {
        /// Snapshot id.
        id: String,
        /// `running`, `paused` or `shutoff`.
        target: String,
        /// The new overlay of each switched disk, by target.
        overlays: Vec<(String, PathBuf)>,
        /// The `<domainsnapshot>` XML of the snapshot keeping the state left behind.
        left: Option<String>,
        /// Files of the state left behind, removed as asked (`discard`).
        discard: Vec<PathBuf>,
    },
    /// Reverting to internal snapshot `id` whose tags live in images that
    /// are not all active layers: each (image, copy) in `moved` first gets
    /// its current contents copied out and its dependents moved onto the
    /// copy; then every image is reverted in place and becomes active.
    RevertRelocate {
        /// Snapshot id (the tag).
        id: String,
        /// `running`, `paused` or `shutoff`.
        target: String,
        /// (image, copy of its current contents).
        moved: Vec<(PathBuf, PathBuf)>,
        /// The `<domainsnapshot>` XML of the snapshot keeping the state left behind.
        left: Option<String>,
        /// Files of the state left behind, removed as asked (`discard`).
        discard: Vec<PathBuf>,
    },
    /// Deleting external snapshot `id`: images merged, then the files in
    /// `candidates` that nothing needs any more are removed.
    DeleteExternal {
        /// Snapshot id.
        id: String,
        /// Images and the memory file that may become unused.
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
            Intent::RevertRelocate { id, target, .. } => {
                format!("revert to {id} in backing images ({target})")
            }
            Intent::Revert { id, target } => format!("revert to {id} ({target})"),
            Intent::RevertExternal { id, target, .. } => {
                format!("revert to external {id} ({target})")
            }
        }
    }

    fn encode(&self) -> String {
        match self {
            Intent::Create { id, name } => format!("op=create\nid={id}\nname={}\n", escape(name)),
            Intent::CreateExternal {
                id,
                name,
                overlays,
                plan,
            } => {
                let mut text = format!("op=create-external\nid={id}\nname={}\n", escape(name));
                text += &encode_overlays(overlays);
                text + &format!("plan={}\n", escape(plan))
            }
            Intent::RevertExternal {
                id,
                target,
                overlays,
                left,
                discard,
            } => {
                let mut text = format!("op=revert-external\nid={id}\ntarget={target}\n");
                text += &encode_overlays(overlays);
                for d in discard {
                    text += &format!("discard={}\n", escape(&d.to_string_lossy()));
                }
                if let Some(l) = left {
                    text += &format!("left={}\n", escape(l));
                }
                text
            }
            Intent::RevertRelocate {
                id,
                target,
                moved,
                left,
                discard,
            } => {
                let mut text = format!("op=revert-relocate\nid={id}\ntarget={target}\n");
                for (a, b) in moved {
                    text += &format!(
                        "moved={}\t{}\n",
                        escape(&a.to_string_lossy()),
                        escape(&b.to_string_lossy())
                    );
                }
                for d in discard {
                    text += &format!("discard={}\n", escape(&d.to_string_lossy()));
                }
                if let Some(l) = left {
                    text += &format!("left={}\n", escape(l));
                }
                text
            }
            Intent::DeleteExternal { id, candidates } => {
                let mut text = format!("op=delete-external\nid={id}\n");
                for c in candidates {
                    text += &format!("candidate={}\n", escape(&c.to_string_lossy()));
                }
                text
            }
            Intent::Delete { id } => format!("op=delete\nid={id}\n"),
            Intent::Revert { id, target } => format!("op=revert\nid={id}\ntarget={target}\n"),
        }
    }

    fn decode(text: &str) -> Option<Intent> {
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
                overlays: decode_overlays(text)?,
                plan: unescape(&get("plan")?),
            },
            "revert-external" => Intent::RevertExternal {
                id,
                target: get("target")?,
                overlays: decode_overlays(text)?,
                left: get("left").map(|l| unescape(&l)),
                discard: decode_paths(text, "discard="),
            },
            "revert-relocate" => Intent::RevertRelocate {
                id,
                target: get("target")?,
                moved: text
                    .lines()
                    .filter_map(|l| l.strip_prefix("moved="))
                    .map(|l| {
                        let (a, b) = l.split_once('\t')?;
                        Some((PathBuf::from(unescape(a)), PathBuf::from(unescape(b))))
                    })
                    .collect::<Option<Vec<_>>>()?,
                left: get("left").map(|l| unescape(&l)),
                discard: decode_paths(text, "discard="),
            },
            "delete-external" => Intent::DeleteExternal {
                id,
                candidates: decode_paths(text, "candidate="),
            },
            "delete" => Intent::Delete { id },
            "revert" => Intent::Revert {
                id,
                target: get("target")?,
            },
            _ => return None,
        })
    }
}

fn encode_overlays(overlays: &[(String, PathBuf)]) -> String {
    overlays
        .iter()
        .map(|(target, path)| {
            format!(
                "overlay={}\t{}\n",
                escape(target),
                escape(&path.to_string_lossy())
            )
        })
        .collect()
}

fn decode_paths(text: &str, key: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

fn decode_overlays(text: &str) -> Option<Vec<(String, PathBuf)>> {
    text.lines()
        .filter_map(|l| l.strip_prefix("overlay="))
        .map(|l| {
            let (t, p) = l.split_once('\t')?;
            Some((unescape(t), PathBuf::from(unescape(p))))
        })
        .collect()
}

/// Names may hold any character but '/', NUL and control characters; the
/// record is line-based, so backslash and newline are escaped anyway.
pub(crate) fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\t', "\\t")
}

pub(crate) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
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
        write_atomic(&path, intent.encode().as_bytes())?;
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
                let text = fs::read_to_string(&path).map_err(|_| path.clone())?;
                match Intent::decode(&text) {
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
            id: "s4".into(),
            target: "running".into(),
            overlays: vec![("vda".into(), "/img/a.r.qcow2".into())],
            left: Some("<domainsnapshot/>".into()),
            discard: vec!["/img/old.qcow2".into()],
        };
        j.begin(d.clone()).unwrap();
        let rb = j.begin(b).unwrap();
        j.complete(rb).unwrap();
        let left: Vec<_> = j
            .pending()
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().intent)
            .collect();
        assert_eq!(left, vec![a, c, d]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
