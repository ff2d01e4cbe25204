//! FAT12, FAT16 and FAT32 with long names (vfat) through `fatfs`. FAT
//! has no owners, modes or symlinks: files are root's, directories 0755,
//! files 0644 (0444 with the read-only attribute); its times are the
//! guest's local time, shown as UTC (what Linux does without `tz=`).
//! Access dates are not updated and nothing is written.

use std::io::{self, Read, Seek, SeekFrom};

use fatfs::{DirEntry, FileSystem, FsOptions};

use super::ext::MAX_ENTRIES;
use super::source::Slice;
use super::{components, days_from_civil, eio, errno, Attr, GuestFs, Kind, Time};

/// A FAT filesystem.
pub struct FatFs {
    fs: FileSystem<Slice>,
}

fn time(d: fatfs::Date, t: Option<fatfs::Time>) -> Time {
    let days = days_from_civil(i64::from(d.year), i64::from(d.month), i64::from(d.day));
    let (secs, nanos) = match t {
        Some(t) => (
            i64::from(t.hour) * 3600 + i64::from(t.min) * 60 + i64::from(t.sec),
            u32::from(t.millis.min(999)) * 1_000_000,
        ),
        None => (0, 0),
    };
    Time {
        secs: days * 86400 + secs,
        nanos,
    }
}

fn attr(e: &DirEntry<'_, Slice>) -> Attr {
    let dir = e.is_dir();
    let read_only = e.attributes().contains(fatfs::FileAttributes::READ_ONLY);
    let perm = match (dir, read_only) {
        (true, _) => 0o755,
        (false, true) => 0o444,
        (false, false) => 0o644,
    };
    let m = e.modified();
    let c = e.created();
    let mtime = time(m.date, Some(m.time));
    Attr {
        kind: if dir { Kind::Dir } else { Kind::File },
        perm,
        uid: 0,
        gid: 0,
        size: if dir { 0 } else { e.len() },
        atime: time(e.accessed(), None),
        mtime,
        ctime: mtime,
        crtime: Some(time(c.date, Some(c.time))),
    }
}

fn root_attr() -> Attr {
    Attr::dir(0o755)
}

fn fat_error(e: io::Error) -> io::Error {
    if e.raw_os_error().is_some() {
        return e;
    }
    match e.kind() {
        io::ErrorKind::NotFound => errno(libc::ENOENT),
        _ => eio(format!("vfat: {e}")),
    }
}

impl FatFs {
    /// Opens the filesystem in `source` (its boot sector and, on FAT32,
    /// its FSInfo sector).
    pub fn open(source: Slice) -> io::Result<Self> {
        let options = FsOptions::new().update_accessed_date(false);
        let fs = FileSystem::new(source, options).map_err(|e| eio(format!("vfat: {e}")))?;
        Ok(FatFs { fs })
    }

    /// The entry at `path` (not the root), matched by its exact name.
    fn entry(&self, path: &[u8]) -> io::Result<DirEntry<'_, Slice>> {
        let mut dir = self.fs.root_dir();
        let mut parts = components(path).peekable();
        while let Some(name) = parts.next() {
            let mut found = None;
            for (n, e) in dir.iter().enumerate() {
                if n >= MAX_ENTRIES {
                    return Err(eio("vfat: directory too long (a loop in its clusters?)"));
                }
                let e = e.map_err(fat_error)?;
                if e.file_name().as_bytes() == name {
                    found = Some(e);
                    break;
                }
            }
            let e = found.ok_or_else(|| errno(libc::ENOENT))?;
            if parts.peek().is_none() {
                return Ok(e);
            }
            if !e.is_dir() {
                return Err(errno(libc::ENOTDIR));
            }
            dir = e.to_dir();
        }
        Err(errno(libc::ENOENT))
    }

    fn is_root(path: &[u8]) -> bool {
        components(path).next().is_none()
    }
}

impl GuestFs for FatFs {
    fn type_name(&self) -> &'static str {
        "vfat"
    }

    fn stat(&mut self, path: &[u8]) -> io::Result<Attr> {
        if Self::is_root(path) {
            return Ok(root_attr());
        }
        self.entry(path).map(|e| attr(&e))
    }

    fn list(&mut self, path: &[u8]) -> io::Result<Vec<(Vec<u8>, Attr)>> {
        let dir = if Self::is_root(path) {
            self.fs.root_dir()
        } else {
            let e = self.entry(path)?;
            if !e.is_dir() {
                return Err(errno(libc::ENOTDIR));
            }
            e.to_dir()
        };
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(fat_error)?;
            let name = e.file_name();
            if name == "." || name == ".." || name.is_empty() || name.contains('/') {
                continue;
            }
            if out.len() >= MAX_ENTRIES {
                return Err(eio("vfat: directory too long (a loop in its clusters?)"));
            }
            out.push((name.into_bytes(), attr(&e)));
        }
        Ok(out)
    }

    fn read_link(&mut self, _path: &[u8]) -> io::Result<Vec<u8>> {
        Err(errno(libc::EINVAL))
    }

    fn read(&mut self, path: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let e = self.entry(path)?;
        if e.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        if offset >= e.len() {
            return Ok(0);
        }
        let mut f = e.to_file();
        f.seek(SeekFrom::Start(offset)).map_err(fat_error)?;
        let mut done = 0;
        while done < buf.len() {
            match f.read(&mut buf[done..]).map_err(fat_error)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }
}
