//! Files handed to QEMU as open descriptors, never by name.
//!
//! An image directory may belong to a less trusted user, who can swap a
//! name for a symlink between the moment vmsnapfs makes a file and the
//! moment QEMU opens it. So QEMU gets the descriptor vmsnapfs holds: for
//! a file QEMU opens itself (a mapped-ram memory file), an fd set
//! (`add-fd`, opened by QEMU as `/dev/fdset/N`) whose `opaque` text
//! records the file's path; for a migration stream, a named descriptor
//! (`getfd`, used as `fd:NAME`). This works whatever uid QEMU
//! runs as, and the path QEMU reports (`/dev/fdset/N`, or a `json:`
//! filename around it) is read back to the real path through the opaque
//! text, from QEMU itself: nothing depends on the daemon's memory.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::qmp::{Qmp, QmpError};

/// What the `opaque` text of every fd set vmsnapfs adds starts with.
const OPAQUE_PREFIX: &str = "vmsnapfs:";
/// Marks a path written as hex (it is not UTF-8, which QMP cannot carry).
const HEX_PREFIX: &str = "hex:";
/// Where QEMU opens an fd set's descriptors.
const FDSET_DIR: &str = "/dev/fdset/";

/// The `opaque` text that records `path`.
pub fn opaque_of(path: &Path) -> String {
    match path.to_str() {
        Some(s) if !s.starts_with(HEX_PREFIX) => format!("{OPAQUE_PREFIX}{s}"),
        _ => {
            let hex: String = path
                .as_os_str()
                .as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{OPAQUE_PREFIX}{HEX_PREFIX}{hex}")
        }
    }
}

/// The path an `opaque` text of vmsnapfs's records; `None` for any other.
pub fn path_of_opaque(opaque: &str) -> Option<PathBuf> {
    let rest = opaque.strip_prefix(OPAQUE_PREFIX)?;
    let Some(hex) = rest.strip_prefix(HEX_PREFIX) else {
        return Some(PathBuf::from(rest));
    };
    if hex.len() % 2 != 0 || !hex.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect();
    Some(PathBuf::from(OsStr::from_bytes(&bytes?)))
}

/// Adds `file` as a new fd set recording `path`; returns the set's id.
pub fn add(qmp: &mut Qmp, file: &impl AsFd, path: &Path) -> Result<i64, QmpError> {
    let info = qmp.execute_with_fds(
        &qapi::qmp::add_fd {
            fdset_id: None,
            opaque: Some(opaque_of(path)),
        },
        &[file.as_fd()],
    )?;
    Ok(info.fdset_id)
}

/// Adds `file` to the existing fd set `set` (QEMU picks, among a set's
/// descriptors, one whose access mode and `O_DIRECT` flag match its open).
pub fn add_to(qmp: &mut Qmp, set: i64, file: &impl AsFd, path: &Path) -> Result<(), QmpError> {
    qmp.execute_with_fds(
        &qapi::qmp::add_fd {
            fdset_id: Some(set),
            opaque: Some(opaque_of(path)),
        },
        &[file.as_fd()],
    )
    .map(drop)
}

/// Removes the fd set `set` (QEMU closes its descriptors once nothing it
/// opened from them is in use).
pub fn remove(qmp: &mut Qmp, set: i64) -> Result<(), QmpError> {
    qmp.execute(&qapi::qmp::remove_fd {
        fdset_id: set,
        fd: None,
    })
    .map(|_| ())
}

/// Hands QEMU the open file `file` under the name `name` (`getfd`), for a
/// migration URI `fd:NAME` on this same monitor connection.
pub fn add_named(qmp: &mut Qmp, file: &impl AsFd, name: &str) -> Result<(), QmpError> {
    qmp.execute_with_fds(
        &qapi::qmp::getfd {
            fdname: name.to_owned(),
        },
        &[file.as_fd()],
    )
    .map(|_| ())
}

/// Closes the descriptor QEMU holds under `name` (from [`add_named`]),
/// when no migration took it.
pub fn close_named(qmp: &mut Qmp, name: &str) -> Result<(), QmpError> {
    qmp.execute(&qapi::qmp::closefd {
        fdname: name.to_owned(),
    })
    .map(|_| ())
}

/// The fd sets vmsnapfs added to this QEMU, by id, with their paths.
pub fn ours(qmp: &mut Qmp) -> Result<HashMap<i64, PathBuf>, QmpError> {
    let sets = qmp.execute(&qapi::qmp::query_fdsets {})?;
    Ok(sets
        .iter()
        .filter_map(|s| {
            let path = s
                .fds
                .iter()
                .find_map(|f| f.opaque.as_deref().and_then(path_of_opaque))?;
            Some((s.fdset_id, path))
        })
        .collect())
}

/// The file a name QEMU reports stands for: `/dev/fdset/N` becomes the
/// path recorded with set N; a `json:` filename (QEMU makes one when a
/// node's backing differs from its image header) becomes its protocol
/// file's name, read the same way. Any other name is kept.
pub fn real_path(reported: &str, sets: &HashMap<i64, PathBuf>) -> PathBuf {
    if let Some(json) = reported.strip_prefix("json:") {
        if let Some(file) = serde_json::from_str::<Value>(json)
            .ok()
            .as_ref()
            .and_then(protocol_filename)
        {
            return real_path(&file, sets);
        }
        return PathBuf::from(reported);
    }
    if let Some(set) = reported
        .strip_prefix(FDSET_DIR)
        .and_then(|n| n.parse::<i64>().ok())
    {
        if let Some(path) = sets.get(&set) {
            return path.clone();
        }
    }
    PathBuf::from(reported)
}

/// The protocol file name inside a `json:` filename's options.
fn protocol_filename(options: &Value) -> Option<String> {
    match &options["file"] {
        Value::String(s) => Some(s.clone()),
        Value::Object(_) => protocol_filename(&options["file"]),
        _ => options["filename"].as_str().map(str::to_owned),
    }
}

/// What the name of every node vmsnapfs adds starts with.
pub const NODE_PREFIX: &str = "vso-";

/// Closes the nodes vmsnapfs added (`blockdev-add`) that nothing uses any
/// more, and removes the fd sets vmsnapfs added whose file no node uses:
/// after a merge, a revert or an undo. An added node stays open after a
/// job dropped it from a chain (it belongs to the monitor), holding its
/// backing node and its file; QEMU refuses `blockdev-del` of a node still
/// in use, so every candidate is tried until no more go.
pub fn release_unused(qmp: &mut Qmp) -> Result<(), QmpError> {
    release_unused_knowing(qmp, false)
}

/// [`release_unused`] when `no_sets` says QEMU just listed no fd set of
/// vmsnapfs's (on this connection): unless a node of ours is closed,
/// the fd sets are not asked again.
pub fn release_unused_knowing(qmp: &mut Qmp, no_sets: bool) -> Result<(), QmpError> {
    let mut closed_any = false;
    loop {
        let nodes = qmp.named_nodes()?;
        let mut closed = false;
        for name in nodes
            .iter()
            .filter_map(|n| n.node_name.as_deref())
            .filter(|n| n.starts_with(NODE_PREFIX))
        {
            closed |= qmp.blockdev_del(name).is_ok();
        }
        if !closed {
            break;
        }
        closed_any = true;
    }
    if no_sets && !closed_any {
        return Ok(());
    }
    let sets = ours(qmp)?;
    if sets.is_empty() {
        return Ok(());
    }
    let nodes = qmp.named_nodes()?;
    let in_use: HashSet<i64> = nodes
        .iter()
        .filter_map(|n| n.file.strip_prefix(FDSET_DIR))
        .filter_map(|n| n.parse().ok())
        .collect();
    for set in sets.keys().filter(|s| !in_use.contains(s)) {
        remove(qmp, *set)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_texts_carry_any_path() {
        for p in [
            "/i/a.qcow2",
            "/i/pre,upgrade \"x\".qcow2",
            "/i/hex:odd",
            "hex:abc",
        ] {
            assert_eq!(
                path_of_opaque(&opaque_of(Path::new(p))).unwrap(),
                Path::new(p)
            );
        }
        let raw = PathBuf::from(OsStr::from_bytes(b"/i/\xff\xfe.qcow2"));
        let text = opaque_of(&raw);
        assert!(text.is_ascii());
        assert_eq!(path_of_opaque(&text).unwrap(), raw);
        assert_eq!(path_of_opaque("libvirt-1-storage"), None);
        assert_eq!(path_of_opaque("vmsnapfs:hex:zz"), None);
        assert_eq!(path_of_opaque("vmsnapfs:hex:abc"), None);
    }

    #[test]
    fn reported_names_become_real_paths() {
        let sets: HashMap<i64, PathBuf> = [(0, PathBuf::from("/i/a.s1.qcow2"))].into();
        let cases = [
            ("/dev/fdset/0", "/i/a.s1.qcow2"),
            ("/dev/fdset/7", "/dev/fdset/7"),
            ("/i/base.qcow2", "/i/base.qcow2"),
            (
                r#"json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/dev/fdset/3"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "/dev/fdset/0"}}"#,
                "/i/a.s1.qcow2",
            ),
            (
                r#"json:{"driver": "qcow2", "file": "/i/b.qcow2"}"#,
                "/i/b.qcow2",
            ),
            ("json:{not json", "json:{not json"),
        ];
        for (reported, want) in cases {
            assert_eq!(real_path(reported, &sets), Path::new(want), "{reported}");
        }
    }
}
