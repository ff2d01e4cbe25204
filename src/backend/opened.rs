//! Proof that a QEMU process opened the very files vmsnapfs made.
//!
//! QEMU opens a new overlay by its name (`blockdev-snapshot-sync` with
//! mode `existing`, `blockdev-add`, a `-drive` of a restarted QEMU).
//! Between vmsnapfs's `O_EXCL` create and QEMU's open, the owner of the
//! image directory could rename the file away and put a symlink to another
//! image in its place; a QEMU running as root would then write guest data
//! into that image. Before a guest runs on files vmsnapfs made, the inodes
//! QEMU holds open (`/proc/PID/fd`) must include each of them (device and
//! inode recorded at creation). A name cannot be swapped under an open
//! descriptor, so what QEMU holds is what it uses.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::store::owned::FileId;

/// Device and inode of every regular file process `pid` holds open.
pub fn open_files(pid: i32) -> io::Result<HashSet<FileId>> {
    let mut ids = HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        // A descriptor closed meanwhile is simply not counted.
        let Ok(meta) = fs::metadata(entry?.path()) else {
            continue;
        };
        if meta.file_type().is_file() {
            ids.insert((meta.dev(), meta.ino()));
        }
    }
    Ok(ids)
}

/// The files of `made` (path and recorded identity) that process `pid`
/// does not hold open: each one is a name QEMU was given but a file it did
/// not open.
pub fn not_opened(pid: i32, made: &[(PathBuf, FileId)]) -> io::Result<Vec<PathBuf>> {
    let open = open_files(pid)?;
    Ok(not_in(&open, made))
}

/// The entries of `made` whose identity `open` lacks.
fn not_in(open: &HashSet<FileId>, made: &[(PathBuf, FileId)]) -> Vec<PathBuf> {
    made.iter()
        .filter(|(_, id)| !open.contains(id))
        .map(|(p, _)| p.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_holds_the_files_it_opened_and_not_others() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-opened-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let held_path = dir.join("held");
        let other_path = dir.join("other");
        let held = fs::File::create(&held_path).unwrap();
        drop(fs::File::create(&other_path).unwrap());
        let id = |p: &PathBuf| {
            let m = fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        let made = vec![
            (held_path.clone(), id(&held_path)),
            (other_path.clone(), id(&other_path)),
        ];
        let missing = not_opened(std::process::id() as i32, &made).unwrap();
        assert_eq!(missing, vec![other_path]);
        drop(held);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unknown_process_is_an_error() {
        assert!(not_opened(i32::MAX, &[]).is_err());
    }

    #[test]
    fn nothing_made_is_never_missing() {
        assert!(not_in(&HashSet::new(), &[]).is_empty());
        let open: HashSet<FileId> = [(1, 2)].into();
        assert_eq!(
            not_in(&open, &[("a".into(), (1, 2)), ("b".into(), (1, 3))]),
            vec![PathBuf::from("b")]
        );
    }
}
