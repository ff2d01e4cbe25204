//! Block devices as layers of a disk: the device a `.create` spec names
//! for an external disk (`type='block'`, `<source dev>`, as `virsh
//! snapshot-create-as --diskspec vda,snapshot=external,stype=block,...`
//! writes it).
//!
//! vmsnapfs runs as root and `.create` may come from a less trusted group
//! member, so a device is used only when that cannot harm data:
//!
//! - reuse: the device already holds a qcow2 image whose backing file is
//!   the disk's active layer, in that layer's format, of the disk's size
//!   (libvirt's `--reuse-external`); it becomes the new active layer and
//!   nothing is written to it before QEMU opens it;
//! - format: a device the operator listed in the directory given with
//!   `--format-devices` (e.g. an LVM volume group's `/dev/VG`), that no
//!   signature shows in use (`blkid -p`: no file system, partition table,
//!   RAID or LVM member, no qcow2 image) and that is at least as large as
//!   the disk: vmsnapfs writes a qcow2 header on it.
//!
//! Either way the device is opened `O_EXCL` first (`EBUSY` when it is
//! mounted or held), must not be locked by a QEMU nor open in any other
//! process (`EBUSY`), nor be a layer of another domain (`EBUSY`). The name must be the device node
//! itself in a directory only root can change; a symlink is followed only
//! inside the `--format-devices` directory (udev's links there are the
//! operator's), and the node it leads to is what is recorded.
//!
//! A device accepted as a layer is remembered (path and device number) for
//! the rest of vmsnapfs: [`accepted`] is how image readers, which open
//! only regular files otherwise, let it in. A device is never removed,
//! truncated or given to `rm`: when no chain needs it any more it is
//! released (forgotten); a failed create puts back the bytes a format
//! overwrote. Those bytes are kept in the domain's root-only state
//! directory (`device-heads/`, written `O_EXCL|O_NOFOLLOW` and fsynced
//! before the format writes), so that the recovery of a create a crash
//! interrupted puts them back too; a committed create removes the copy.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;

use crate::error::{Error, ErrorKind, Result};

/// The directory of devices vmsnapfs may format (`--format-devices`).
static FORMAT_DIR: OnceLock<PathBuf> = OnceLock::new();

/// How many bytes at the start of a device a format may write and an
/// undo puts back (a qcow2 header, refcount table and block, L1 table).
const SAVED_HEAD: usize = 1 << 20;

/// The directory of a domain's state directory holding the first MiB of
/// each device a create formatted and has not committed yet.
pub const HEADS_DIR: &str = "device-heads";

/// How long `blkid` or `qemu-img info` on a device may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// One device accepted as a layer.
struct Entry {
    /// Its device number (`st_rdev`): the node must still lead there.
    rdev: u64,
    /// The domain it is a layer of.
    domain: String,
    /// Whether the operator's directory lists it (it may be formatted).
    may_format: bool,
}

static ACCEPTED: LazyLock<RwLock<HashMap<PathBuf, Entry>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

/// Sets the directory of devices vmsnapfs may format: an absolute
/// directory that only root can change.
pub fn set_format_dir(dir: &Path) -> std::result::Result<(), String> {
    if !dir.is_absolute() || !dir.is_dir() {
        return Err(format!("{} is not an absolute directory", dir.display()));
    }
    if !crate::store::safe_dir::only_root_can_change(dir) {
        return Err(format!(
            "{}: someone other than root can change it (or a directory on the way)",
            dir.display()
        ));
    }
    FORMAT_DIR
        .set(dir.to_owned())
        .map_err(|_| "set twice".to_owned())
}

/// The directory of devices vmsnapfs may format, if the operator gave one.
pub fn format_dir() -> Option<&'static Path> {
    FORMAT_DIR.get().map(PathBuf::as_path)
}

/// True when `path` itself (not followed) is a block device node.
pub fn is_block(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// True when `path` names a device accepted as a layer (see [`accepted`])
/// or any other block device: never a file to remove.
pub fn is_device_path(path: &Path) -> bool {
    ACCEPTED.read().contains_key(path) || is_block(path)
}

/// Whether `file`, opened at `path` without following a symlink, is a
/// block device accepted as a layer: the node still leads to the device
/// that was checked.
pub fn accepted(path: &Path, file: &File) -> bool {
    let Ok(m) = file.metadata() else {
        return false;
    };
    m.file_type().is_block_device()
        && ACCEPTED
            .read()
            .get(path)
            .is_some_and(|e| e.rdev == m.rdev())
}

/// Remembers the block device node `path` as a layer of `domain`, when it
/// is one (the layers record or a snapshot of the domain names it: what
/// vmsnapfs itself accepted earlier).
pub fn remember(path: &Path, domain: &str) {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !m.file_type().is_block_device() {
        return;
    }
    ACCEPTED
        .write()
        .entry(path.to_owned())
        .or_insert_with(|| Entry {
            rdev: m.rdev(),
            domain: domain.to_owned(),
            may_format: false,
        });
}

/// Forgets the device at `path` (no chain needs it any more): it is
/// released, never removed. True when `path` is a device.
pub fn release(path: &Path) -> bool {
    let known = ACCEPTED.write().remove(path).is_some();
    known || is_block(path)
}

/// What [`undo`] found at a path.
#[derive(Debug, PartialEq, Eq)]
pub enum Undone {
    /// Not a device: a file, for the caller to remove.
    NotDevice,
    /// A device, released (nothing else is done to it). With a line for
    /// the domain's `.log` when a format's bytes were kept for it: put
    /// back, or why not and where they are kept.
    Released(Option<String>),
}

/// Undoes what a failed create did to the device at `path`: the bytes a
/// format overwrote, kept in the domain's state directory `state`, are put
/// back, and the device is released.
pub fn undo(path: &Path, state: &Path) -> Undone {
    let known = ACCEPTED.write().remove(path).is_some();
    if !known && !is_block(path) {
        return Undone::NotDevice;
    }
    Undone::Released(put_back(path, state))
}

/// The create that formatted `node` committed: the saved copy of the
/// bytes the format overwrote is removed.
pub fn committed(node: &Path, state: &Path) {
    let saved = saved_path(state, node);
    if let Err(e) = crate::store::atomic::remove_durable(&saved) {
        log::warn!("{}: {e}", saved.display());
    }
}

/// Where the first MiB of `node` is kept while a create that formatted it
/// is not committed: its path's bytes in hex, under [`HEADS_DIR`].
fn saved_path(state: &Path, node: &Path) -> PathBuf {
    let name: String = node
        .as_os_str()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    state.join(HEADS_DIR).join(name)
}

/// Durably keeps `head`, the first bytes of the device `node` (device
/// number `rdev`), before a format overwrites them: a new root-only file
/// (`O_EXCL|O_NOFOLLOW`) holding the device number and the bytes, fsynced
/// with its directory.
fn save_head(state: &Path, node: &Path, rdev: u64, head: &[u8]) -> Result<()> {
    let dir = state.join(HEADS_DIR);
    crate::store::atomic::private_dir(&dir)?;
    let saved = saved_path(state, node);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::store::atomic::FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&saved)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::io(format!(
                "{}: the bytes an earlier format overwrote are still kept in {} \
                 (they could not be put back); it is not formatted again",
                node.display(),
                saved.display()
            )),
            _ => Error::at(&saved, e),
        })?;
    let written = f
        .write_all(&rdev.to_le_bytes())
        .and_then(|_| f.write_all(head))
        .and_then(|_| f.sync_all())
        .and_then(|_| crate::store::atomic::sync_dir(&dir));
    if let Err(e) = written {
        drop(f);
        let _ = std::fs::remove_file(&saved);
        return Err(Error::at(&saved, e));
    }
    Ok(())
}

/// Puts back the bytes kept for `path` (see [`save_head`]), only while the
/// node (never followed) still leads to the device they came from; the
/// copy is removed once they are back, kept otherwise. Returns what
/// happened, for `.log` (`None`: nothing was kept for `path`).
fn put_back(path: &Path, state: &Path) -> Option<String> {
    let saved = saved_path(state, path);
    let bytes = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&saved)
        .and_then(|mut f| {
            let mut b = Vec::new();
            f.read_to_end(&mut b).map(|_| b)
        }) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(format!(
                "{}: the bytes a format overwrote cannot be read from {} ({e}); they are \
                 not put back",
                path.display(),
                saved.display()
            ))
        }
    };
    let Some((rdev, head)) = bytes.split_first_chunk::<8>() else {
        return Some(format!(
            "{}: {} is too short to hold the bytes a format overwrote; nothing is put back, \
             the file is kept",
            path.display(),
            saved.display()
        ));
    };
    let rdev = u64::from_le_bytes(*rdev);
    let put = open_node(path, true, false)
        .map_err(|e| e.to_string())
        .and_then(|f| {
            let m = f.metadata().map_err(|e| e.to_string())?;
            if !m.file_type().is_block_device() {
                return Err("it is no longer a device node".to_owned());
            }
            if m.rdev() != rdev {
                return Err(format!(
                    "it now leads to device {}:{}, not to {}:{}, the device that was \
                     formatted; nothing is written to it",
                    libc::major(m.rdev()),
                    libc::minor(m.rdev()),
                    libc::major(rdev),
                    libc::minor(rdev)
                ));
            }
            f.write_all_at(head, 0)
                .and_then(|_| f.sync_all())
                .map_err(|e| e.to_string())
        });
    Some(match put {
        Ok(()) => {
            let kept = match crate::store::atomic::remove_durable(&saved) {
                Ok(()) => String::new(),
                Err(e) => format!(" (the copy in {} stays: {e})", saved.display()),
            };
            format!(
                "{}: the {} bytes the format overwrote are put back{kept}",
                path.display(),
                head.len()
            )
        }
        Err(e) => format!(
            "{}: the bytes the format overwrote are not put back: {e}; they are kept in {}",
            path.display(),
            saved.display()
        ),
    })
}

/// How a checked device becomes the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceUse {
    /// It holds the qcow2 overlay already; nothing is written.
    Reuse,
    /// vmsnapfs writes a qcow2 header on it.
    Format,
}

/// The disk a device is to become the active layer of.
pub struct Over<'a> {
    /// The domain's name.
    pub domain: &'a str,
    /// The disk's target, for messages.
    pub target: &'a str,
    /// The disk's active layer: the device's backing file.
    pub active: &'a Path,
    /// Its format.
    pub format: &'a str,
}

fn refused(kind: ErrorKind, msg: String) -> Error {
    Error::new(kind, msg)
}

/// Opens the node at `path` (never through a symlink), `O_EXCL` when
/// `exclusive`: `EBUSY` when it is mounted or held.
fn open_node(path: &Path, write: bool, exclusive: bool) -> std::io::Result<File> {
    let mut flags = libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if exclusive {
        flags |= libc::O_EXCL;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
}

/// The node `named` leads to: itself when it is a block device node, or
/// the target of a root's symlink directly inside the `--format-devices`
/// directory. Every other symlink is `EPERM`; anything else `EINVAL`.
fn resolve(named: &Path, what: &str) -> Result<PathBuf> {
    let m = std::fs::symlink_metadata(named).map_err(|e| Error::at(named, e))?;
    if m.file_type().is_block_device() {
        return Ok(named.to_owned());
    }
    if !m.file_type().is_symlink() {
        return Err(Error::invalid(format!(
            "{what}: {} is not a block device",
            named.display()
        )));
    }
    let in_dir = format_dir().is_some_and(|d| named.parent() == Some(d));
    if !in_dir || m.uid() != 0 {
        return Err(refused(
            ErrorKind::NotPermitted,
            format!(
                "{what}: {} is a symlink; vmsnapfs never follows a symlink it did not make \
                 (only root's links in the --format-devices directory); name the device node",
                named.display()
            ),
        ));
    }
    let node = std::fs::canonicalize(named).map_err(|e| Error::at(named, e))?;
    if !is_block(&node) {
        return Err(Error::invalid(format!(
            "{what}: {} leads to {}, which is not a block device",
            named.display(),
            node.display()
        )));
    }
    Ok(node)
}

/// Whether the `--format-devices` directory lists the device `rdev` (a
/// node there, or a root's symlink there that leads to it).
fn listed(rdev: u64) -> bool {
    let Some(dir) = format_dir() else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        let Ok(l) = std::fs::symlink_metadata(&p) else {
            return false;
        };
        let m = if l.file_type().is_symlink() && l.uid() == 0 {
            std::fs::metadata(&p).ok()
        } else {
            Some(l)
        };
        m.is_some_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
    })
}

/// The size of an open device.
fn device_size(f: &File) -> Result<u64> {
    let mut f = f;
    Ok(f.seek(SeekFrom::End(0))?)
}

/// A process other than vmsnapfs that has the block device `rdev` open
/// (its pid and command name), whatever node it opened it by: a QEMU
/// that libvirt runs in a mount namespace of its own opens the node of
/// its own `/dev`, whose image locks the host's node does not show.
fn holder(rdev: u64) -> Option<(i32, String)> {
    let me = std::process::id() as i32;
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        // stat(2) of /proc/PID/fd/N is the open file itself; only nodes
        // a process opened under /dev (its own, in its namespace) are
        // looked at, so that no file system (a FUSE mount) is asked.
        let holds = fds.flatten().any(|fd| {
            let under_dev = std::fs::read_link(fd.path())
                .is_ok_and(|t| t.as_os_str().as_bytes().starts_with(b"/dev/"));
            under_dev
                && std::fs::metadata(fd.path())
                    .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            return Some((pid, comm.trim().to_owned()));
        }
    }
    None
}

/// Whether the device starts with a qcow2 header.
fn has_qcow2_magic(f: &File) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = f;
    f.seek(SeekFrom::Start(0))?;
    let n = f.read(&mut magic)?;
    Ok(n == 4 && magic == *b"QFI\xfb")
}

/// `qemu-img info -f qcow2` of the open device, without `-U`: a QEMU
/// that holds it makes this fail (`EBUSY`).
fn qcow2_info(node: &Path, f: &File, format: &str) -> Result<serde_json::Value> {
    let name = super::qemu_img::fd_name(f);
    let args: [&std::ffi::OsStr; 5] = [
        "info".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        "--output=json".as_ref(),
        &name,
    ];
    let json = super::qemu_img::run_pinned(&args, &[f], PROBE_TIMEOUT).map_err(|e| {
        if e.message.contains("lock") {
            refused(
                ErrorKind::Busy,
                format!("{} is in use by a QEMU ({})", node.display(), e.message),
            )
        } else {
            e
        }
    })?;
    serde_json::from_str(&json).map_err(|e| Error::io(format!("qemu-img info: {e}")))
}

/// What `blkid -p` finds on the device: `None` when it is blank.
fn signature(node: &Path) -> Result<Option<String>> {
    let mut cmd = Command::new("blkid");
    cmd.args(["-p", "-o", "export"]).arg(node);
    let out = super::child::output(cmd, PROBE_TIMEOUT).map_err(|e| {
        Error::new(
            ErrorKind::Unsupported,
            format!("blkid, which tells whether a device is blank, cannot run: {e}"),
        )
    })?;
    match out.status.code() {
        Some(2) => Ok(None),
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let what: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("TYPE=") || l.starts_with("PTTYPE="))
                .collect();
            Ok(Some(if what.is_empty() {
                "a signature".to_owned()
            } else {
                what.join(" ")
            }))
        }
        _ => Err(Error::io(format!(
            "blkid -p {}: {}",
            node.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Checks an open device for `use`: holds the right qcow2 (reuse), or is
/// blank, listed and large enough (format).
fn check_open(node: &Path, f: &File, over: &Over<'_>, may_format: bool) -> Result<DeviceUse> {
    let what = match over.target {
        "" => node.display().to_string(),
        t => format!("disk {t}: {}", node.display()),
    };
    if let Some((pid, comm)) = holder(f.metadata()?.rdev()) {
        return Err(refused(
            ErrorKind::Busy,
            format!("{what} is in use: process {pid} ({comm}) has it open"),
        ));
    }
    let size = super::qemu_img::virtual_size(over.active, over.format)?;
    if has_qcow2_magic(f)? {
        let info = qcow2_info(node, f, "qcow2")?;
        let backing = info["backing-filename"].as_str().unwrap_or("");
        let backing_format = info["backing-filename-format"].as_str().unwrap_or("");
        let same = !backing.is_empty()
            && (Path::new(backing) == over.active
                || super::qemu_img::canonical(Path::new(backing))
                    == super::qemu_img::canonical(over.active));
        if !same || backing_format != over.format {
            return Err(refused(
                ErrorKind::NotPermitted,
                format!(
                    "{what} holds a qcow2 image over {backing:?} ({backing_format}), not over \
                     the disk's active layer {} ({}); vmsnapfs neither uses nor formats it",
                    over.active.display(),
                    over.format
                ),
            ));
        }
        if !info["format-specific"]["data"]["data-file"].is_null() {
            return Err(refused(
                ErrorKind::NotPermitted,
                format!("{what} holds a qcow2 image with an external data file; refused"),
            ));
        }
        if info["virtual-size"].as_u64() != Some(size) {
            return Err(Error::invalid(format!(
                "{what} holds a qcow2 image of {} bytes; the disk has {size}",
                info["virtual-size"]
            )));
        }
        return Ok(DeviceUse::Reuse);
    }
    if !may_format {
        let why = match format_dir() {
            Some(d) => format!(
                "it is not in {}, the directory of devices vmsnapfs may format",
                d.display()
            ),
            None => {
                "vmsnapfs formats no device unless started with --format-devices DIR".to_owned()
            }
        };
        return Err(refused(
            ErrorKind::NotPermitted,
            format!(
                "{what} holds no qcow2 image over the disk's active layer (libvirt's \
                 --reuse-external), and {why}"
            ),
        ));
    }
    // A QEMU holding it (as a raw disk) fails here.
    qcow2_info(node, f, "raw")?;
    if let Some(sig) = signature(node)? {
        return Err(refused(
            ErrorKind::NotPermitted,
            format!("{what} holds {sig}; vmsnapfs formats only blank devices"),
        ));
    }
    let dev_size = device_size(f)?;
    if dev_size < size {
        return Err(refused(
            ErrorKind::NoSpace,
            format!("{what} has {dev_size} bytes, less than the disk's {size}"),
        ));
    }
    Ok(DeviceUse::Format)
}

/// Checks the device `named` a `.create` spec gives for a disk (see the
/// module's rules) and accepts it as a layer of `over.domain`. Returns
/// the device node (what the snapshot records) and how it will be used.
/// `root` tells whether the caller is root: others may name only devices
/// the `--format-devices` directory lists.
pub fn check(named: &Path, over: &Over<'_>, root: bool) -> Result<(PathBuf, DeviceUse)> {
    let what = format!("disk {}", over.target);
    let node = resolve(named, &what)?;
    if !node
        .parent()
        .is_some_and(crate::store::safe_dir::only_root_can_change)
    {
        return Err(refused(
            ErrorKind::NotPermitted,
            format!(
                "{what}: {} is in a directory someone other than root can change",
                node.display()
            ),
        ));
    }
    let rdev = std::fs::symlink_metadata(&node)
        .map_err(|e| Error::at(&node, e))?
        .rdev();
    let may_format = listed(rdev);
    if !root && !may_format {
        return Err(refused(
            ErrorKind::NotPermitted,
            format!(
                "{what}: {} is not in the directory of devices vmsnapfs may use for others \
                 than root (--format-devices{})",
                node.display(),
                format_dir().map_or(" is not set".to_owned(), |d| format!(" {}", d.display()))
            ),
        ));
    }
    if let Some((p, e)) = ACCEPTED
        .read()
        .iter()
        .find(|(p, e)| e.rdev == rdev && (e.domain != over.domain || **p != node))
    {
        return Err(refused(
            ErrorKind::Busy,
            format!(
                "{what}: {} is already a layer of domain {} (as {})",
                node.display(),
                e.domain,
                p.display()
            ),
        ));
    }
    let f = open_node(&node, true, true).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => refused(
            ErrorKind::Busy,
            format!(
                "{what}: {} is in use (mounted, or held by another user of the device)",
                node.display()
            ),
        ),
        _ => Error::at(&node, e),
    })?;
    let usage = check_open(&node, &f, over, may_format)?;
    ACCEPTED.write().insert(
        node.clone(),
        Entry {
            rdev,
            domain: over.domain.to_owned(),
            may_format,
        },
    );
    Ok((node, usage))
}

/// Makes the accepted device `node` the qcow2 overlay of `over` right
/// before the switch: checked again (`O_EXCL`), and formatted when it does
/// not hold that overlay yet and may be formatted; the bytes a format
/// overwrites are first kept durably in the domain's state directory
/// `state` for [`undo`].
pub fn prepare(node: &Path, over: &Over<'_>, state: &Path) -> Result<()> {
    let (rdev, may_format) = match ACCEPTED.read().get(node) {
        Some(e) => (e.rdev, e.may_format),
        None => {
            return Err(refused(
                ErrorKind::NotPermitted,
                format!("{} is not a device vmsnapfs checked", node.display()),
            ))
        }
    };
    let f = open_node(node, true, true).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => refused(
            ErrorKind::Busy,
            format!("{} is in use (mounted, or held)", node.display()),
        ),
        _ => Error::at(node, e),
    })?;
    if f.metadata()?.rdev() != rdev {
        return Err(Error::io(format!(
            "{} leads to another device than the one checked",
            node.display()
        )));
    }
    if check_open(node, &f, over, may_format)? == DeviceUse::Reuse {
        return Ok(());
    }
    let mut head = vec![0u8; SAVED_HEAD.min(device_size(&f)? as usize)];
    f.read_exact_at(&mut head, 0)?;
    save_head(state, node, rdev, &head)?;
    super::qemu_img::create_overlay_in(&f, over.active, over.format)?;
    f.sync_all()?;
    log::info!(
        "{}: {} formatted as a qcow2 overlay of {}",
        over.domain,
        node.display(),
        over.active.display()
    );
    Ok(())
}

/// The path beside which the new files of a disk defined on `source`
/// (in `format`) are named: `source` itself, or, where that is a block
/// device vmsnapfs accepted as a layer (libvirt's definition then names
/// it), the first image file below it in its backing chain: a device's
/// directory (`/dev`) is no place for files.
pub fn file_beside(source: &Path, format: &str) -> Result<PathBuf> {
    if !is_device_path(source) {
        return Ok(source.to_owned());
    }
    super::qemu_img::chain(source, format)?
        .into_iter()
        .map(|i| i.path)
        .find(|p| !is_device_path(p))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{} is a block device with no image file below it to name new files                  beside; name them in a .create spec",
                source.display()
            ))
        })
}

/// The size of a block device opened as `file` (its length is not in
/// its metadata).
pub fn size_of(file: &File) -> std::io::Result<u64> {
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_device_nodes_and_operator_links_are_taken() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-blockdev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        // A regular file is no device; a link outside the operator's
        // directory is never followed; a missing name is ENOENT.
        assert_eq!(resolve(&file, "d").unwrap_err().kind, ErrorKind::Invalid);
        assert_eq!(
            resolve(&link, "d").unwrap_err().kind,
            ErrorKind::NotPermitted
        );
        assert_eq!(
            resolve(&dir.join("none"), "d").unwrap_err().kind,
            ErrorKind::NotFound
        );
        // A file is never taken for an accepted device, nor is an
        // unknown path.
        let f = File::open(&file).unwrap();
        assert!(!accepted(&file, &f));
        assert!(!is_device_path(&file));
        assert!(!release(&file));
        assert_eq!(undo(&file, &dir), Undone::NotDevice);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
