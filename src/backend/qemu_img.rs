//! `qemu-img` on the images of a stopped domain: internal snapshots,
//! backing chains and overlays.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::ImageSnapshot;
use crate::error::{Error, Result};

/// How long a `qemu-img` that reads or writes metadata only may take.
pub const META_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a `qemu-img` that copies data (commit, convert) may take.
pub const DATA_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// The longest backing chain vmsnapfs follows.
const MAX_CHAIN: usize = 256;
/// The image formats vmsnapfs opens.
pub const FORMATS: &[&str] = &["qcow2", "raw"];

/// Runs qemu-img with `args` (metadata work: killed after
/// [`META_TIMEOUT`]), returning stdout; a failure carries stderr. Paths
/// are passed as their bytes.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Result<String> {
    run_for(args, META_TIMEOUT)
}

/// Runs qemu-img with `args`, killed after `timeout`.
pub fn run_for<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Result<String> {
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    log::debug!("qemu-img {}", shown.join(" "));
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    let out = super::child::output(cmd, timeout)
        .map_err(|e| Error::io(format!("running qemu-img: {e}")).with_source(e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::reported(format!(
            "qemu-img {} failed: {}",
            shown.first().map(|a| a.as_ref()).unwrap_or(""),
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Refuses a format vmsnapfs does not open (it never lets QEMU probe).
pub fn check_format(format: &str) -> Result<()> {
    if FORMATS.contains(&format) {
        Ok(())
    } else {
        Err(Error::new(
            crate::error::ErrorKind::Unsupported,
            format!("image format {format:?} is not one vmsnapfs opens (qcow2, raw)"),
        ))
    }
}

/// `qemu-img info` of one image opened with the format it must have,
/// without its backing chain.
pub fn info(image: &Path, format: &str) -> Result<Value> {
    check_format(format)?;
    let pinned = pin(image)?;
    let args: [&OsStr; 6] = [
        "info".as_ref(),
        "-U".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        "--output=json".as_ref(),
        &fd_name(&pinned),
    ];
    let json = run_pinned(&args, &[&pinned], META_TIMEOUT)?;
    serde_json::from_str(&json).map_err(|e| Error::io(format!("qemu-img info: {e}")))
}

/// Opens the image `image` for qemu-img to use as `/proc/self/fd/N` (see
/// [`fd_name`]): never through a symlink someone other than root could
/// have made (at its last name or on the way), and only a regular file (a
/// FIFO would hang whoever opens it, a device is no image) or a block
/// device accepted as a layer ([`super::block_dev`]). qemu-img then
/// works on the very file checked here, whatever is renamed meanwhile.
pub fn pin(image: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::FileTypeExt;
    let refused = |why: &str| {
        Error::io(format!(
            "{} {why}; refused as an image (vmsnapfs opens only regular files, \
             never through a symlink others may have made)",
            image.display()
        ))
    };
    match std::fs::symlink_metadata(image) {
        Ok(m) if m.file_type().is_symlink() || m.is_file() => {}
        Ok(m) if m.file_type().is_block_device() => {
            // Only a device accepted as a layer (see `block_dev`).
            let file = crate::store::owned::open_existing(image, false)
                .map_err(|e| Error::at(image, e))?;
            if super::block_dev::accepted(image, &file) {
                return Ok(file);
            }
            return Err(refused(
                "is a block device vmsnapfs did not accept as a layer",
            ));
        }
        Ok(m) if m.file_type().is_fifo() => return Err(refused("is a FIFO")),
        Ok(_) => return Err(refused("is not a regular file")),
        Err(e) => return Err(Error::at(image, e)),
    }
    let file = crate::store::owned::open_existing(image, false).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            refused("is a symlink")
        } else {
            Error::at(image, e)
        }
    })?;
    if !file.metadata()?.is_file() {
        return Err(refused("is not a regular file"));
    }
    Ok(file)
}

/// How qemu-img, started by [`run_pinned`], names a file vmsnapfs holds.
pub fn fd_name(file: &std::fs::File) -> OsString {
    use std::os::unix::io::AsRawFd;
    OsString::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Runs qemu-img with `args`, killed after `timeout`, with `files`
/// inherited (named in `args` by [`fd_name`]); returns stdout.
pub fn run_pinned<S: AsRef<OsStr>>(
    args: &[S],
    files: &[&std::fs::File],
    timeout: Duration,
) -> Result<String> {
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::CommandExt;
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    log::debug!("qemu-img {}", shown.join(" "));
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    // SAFETY: only fcntl(2) runs between fork and exec; it clears
    // close-on-exec on the descriptors qemu-img must inherit.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = super::child::output(cmd, timeout)
        .map_err(|e| Error::io(format!("running qemu-img: {e}")).with_source(e))?;
    if !out.status.success() {
        return Err(Error::reported(format!(
            "qemu-img {} failed: {}",
            shown.first().map(|a| a.as_ref()).unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The virtual size of `image` opened as `format`.
pub fn virtual_size(image: &Path, format: &str) -> Result<u64> {
    if let Some(size) = header_size(image, format) {
        return Ok(size);
    }
    info(image, format)?["virtual-size"]
        .as_u64()
        .ok_or_else(|| Error::io(format!("{}: no virtual size", image.display())))
}

/// The virtual size a qcow2 image's header gives (big-endian at byte
/// 24, after the magic `QFI\xfb` and a version of 2 or 3), without a
/// `qemu-img` process: the size QEMU uses when it is a whole number of
/// 512-byte sectors. `None` (ask `qemu-img`) for anything else: another
/// format, a file [`pin`] refuses, a header that does not read so.
fn header_size(image: &Path, format: &str) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    if format != "qcow2" {
        return None;
    }
    // Opened as for qemu-img (see [`pin`]).
    let f = pin(image).ok()?;
    let mut h = [0u8; 32];
    f.read_exact_at(&mut h, 0).ok()?;
    qcow2_header_size(&h)
}

/// The virtual size in the first 32 bytes of a qcow2 header (see
/// [`header_size`]).
fn qcow2_header_size(h: &[u8; 32]) -> Option<u64> {
    let version = u32::from_be_bytes(h[4..8].try_into().ok()?);
    if &h[..4] != b"QFI\xfb" || !(2..=3).contains(&version) {
        return None;
    }
    let size = u64::from_be_bytes(h[24..32].try_into().ok()?);
    (size % 512 == 0).then_some(size)
}

/// Whether qcow2 `image` holds internal snapshots: the count in its
/// header (big-endian at byte 60), without a `qemu-img` process, where
/// the header reads as qcow2 version 2 or 3; else from `qemu-img` ([`list`]).
pub fn has_snapshots(image: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let counted = (|| {
        // Opened as for qemu-img (see [`pin`]).
        let f = pin(image).ok()?;
        let mut h = [0u8; 64];
        f.read_exact_at(&mut h, 0).ok()?;
        qcow2_header_snapshots(&h)
    })();
    match counted {
        Some(n) => Ok(n > 0),
        None => Ok(!list(image)?.is_empty()),
    }
}

/// The count of internal snapshots in the first 64 bytes of a qcow2
/// header (see [`has_snapshots`]).
fn qcow2_header_snapshots(h: &[u8; 64]) -> Option<u32> {
    let version = u32::from_be_bytes(h[4..8].try_into().ok()?);
    if &h[..4] != b"QFI\xfb" || !(2..=3).contains(&version) {
        return None;
    }
    Some(u32::from_be_bytes(h[60..64].try_into().ok()?))
}

/// The internal snapshots of one image (read with `-U`, so it works while
/// a QEMU holds the image; use QMP for an authoritative view then).
pub fn list(image: &Path) -> Result<Vec<ImageSnapshot>> {
    Ok(parse_snapshot_table(&info(image, "qcow2")?["snapshots"]))
}

/// `path` with symlinks and `..` resolved, or as given when it does not
/// exist: how image paths are compared.
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// One image of a backing chain, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainImage {
    /// The image file.
    pub path: PathBuf,
    /// Its format.
    pub format: String,
    /// Its internal snapshots.
    pub snapshots: Vec<ImageSnapshot>,
}

/// The backing chain of `image` opened as `format`, top first (read
/// with `-U`). Nothing is probed: each image is opened with the format
/// its user states (the caller for the top, the qcow2 header for each
/// backing file), one image at a time. A raw image has no backing file
/// whatever its bytes say. A backing file without an explicit format, or
/// that is not a plain path to a regular file (`json:`, a protocol such
/// as `nbd:`, a FIFO, a device), or a qcow2 image with an external data
/// file, is refused (EIO) before anything opens it.
pub fn chain(image: &Path, format: &str) -> Result<Vec<ChainImage>> {
    let mut out: Vec<ChainImage> = Vec::new();
    let mut path = image.to_owned();
    let mut format = format.to_owned();
    loop {
        let info = info(&path, &format)?;
        if !info["format-specific"]["data"]["data-file"].is_null() {
            return Err(Error::io(format!(
                "{} has an external data file; refused",
                path.display()
            )));
        }
        let next = if format == "qcow2" {
            backing_of(&path, &info)?
        } else {
            None
        };
        out.push(ChainImage {
            path: path.clone(),
            format: format.clone(),
            snapshots: parse_snapshot_table(&info["snapshots"]),
        });
        let Some((p, f)) = next else {
            return Ok(out);
        };
        if out.len() >= MAX_CHAIN || out.iter().any(|i| canonical(&i.path) == canonical(&p)) {
            return Err(Error::io(format!(
                "the backing chain of {} loops or is longer than {MAX_CHAIN} images; refused",
                image.display()
            )));
        }
        path = p;
        format = f;
    }
}

/// The backing file and format a qcow2 image's header names, checked:
/// the format must be stated and be one vmsnapfs opens, the file a plain
/// path (relative paths are taken from the image's directory).
fn backing_of(image: &Path, info: &Value) -> Result<Option<(PathBuf, String)>> {
    let Some(name) = info["backing-filename"].as_str() else {
        return Ok(None);
    };
    let refuse = |why: &str| {
        Err(Error::io(format!(
            "{} names backing file {name:?}, {why}; refused (vmsnapfs opens only \
             plain files with a stated format)",
            image.display()
        )))
    };
    let Some(format) = info["backing-filename-format"].as_str() else {
        return refuse("without a backing format");
    };
    if !FORMATS.contains(&format) {
        return refuse(&format!("of format {format:?}"));
    }
    if name.is_empty() || name.starts_with("json:") || has_protocol(name) {
        return refuse("which is not a plain file path");
    }
    let p = Path::new(name);
    let path = if p.is_absolute() {
        p.to_owned()
    } else {
        image.parent().unwrap_or(Path::new("/")).join(p)
    };
    if let Err(e) = pin(&path) {
        return refuse(&e.to_string());
    }
    Ok(Some((path, format.to_owned())))
}

/// True when QEMU would read `name` as `protocol:...` rather than a file
/// (a `:` before any `/`).
fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(c) => !name[..c].contains('/'),
        None => false,
    }
}

/// The format an image of a domain must be opened with: that of the
/// defined disk it is, else qcow2 (every other image vmsnapfs opens as a
/// top is an overlay or copy it made, all qcow2). Never probed.
pub fn expected_format(disks: &[crate::model::DiskDef], image: &Path) -> String {
    let want = canonical(image);
    disks
        .iter()
        .find(|d| d.source == image || canonical(&d.source) == want)
        .map(|d| d.format.clone())
        .unwrap_or_else(|| "qcow2".into())
}

/// `--image-opts` of `chain` (top first) opened read-only with every
/// image named and pinned (see [`pin`]): QEMU follows nothing the chain
/// does not list. The files go to [`run_pinned`] with the options.
pub fn image_opts(chain: &[ChainImage]) -> Result<(OsString, Vec<std::fs::File>)> {
    let mut opts = OsString::new();
    let mut files = Vec::new();
    let mut prefix = String::new();
    for (i, c) in chain.iter().enumerate() {
        if i > 0 {
            opts.push(",");
            prefix.push_str("backing.");
        }
        let file = pin(&c.path)?;
        let protocol = protocol_of(&file);
        opts.push(format!(
            "{prefix}driver={},{prefix}file.driver={protocol},{prefix}file.filename=",
            c.format
        ));
        opts.push(fd_name(&file));
        files.push(file);
        opts.push(format!(",{prefix}force-share=on,{prefix}read-only=on"));
        if i + 1 == chain.len() && c.format == "qcow2" {
            opts.push(format!(",{prefix}backing="));
        }
    }
    Ok((opts, files))
}

/// QEMU's protocol driver for a pinned image: `file` opens regular files
/// only, `host_device` a block device.
fn protocol_of(file: &std::fs::File) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    match file.metadata() {
        Ok(m) if m.file_type().is_block_device() => "host_device",
        _ => "file",
    }
}

/// `--image-opts` of the qcow2 image `image` (pinned) alone, writable, its
/// backing file not opened: for work inside the image (internal
/// snapshots), which never needs it.
fn qcow2_alone(image: &std::fs::File) -> OsString {
    let mut opts = OsString::from(format!(
        "driver=qcow2,file.driver={},file.filename=",
        protocol_of(image)
    ));
    opts.push(fd_name(image));
    opts.push(",backing=");
    opts
}

/// Doubles commas, the escape of QEMU's `key=value,...` option strings.
pub fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// [`opt_escape`] of a path's bytes (any bytes, not only UTF-8).
pub fn opt_escape_os(s: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// Creates a qcow2 overlay at `overlay` over `backing` (format
/// `backing_format`), with the backing image's owner, group and mode.
/// Refuses anything already at `overlay` (`EEXIST`), a dangling symlink
/// included; a failed create removes what it made. Returns the new file's
/// device and inode.
pub fn create_overlay(
    overlay: &Path,
    backing: &Path,
    backing_format: &str,
) -> Result<crate::store::owned::FileId> {
    use crate::store::owned;
    let file = owned::create_new(overlay, 0o600).map_err(|e| {
        if e.raw_os_error() == Some(libc::EEXIST) {
            Error::new(
                crate::error::ErrorKind::Exists,
                format!(
                    "{} exists; vmsnapfs never overwrites a file",
                    overlay.display()
                ),
            )
        } else {
            Error::from(e).context(overlay.display().to_string())
        }
    })?;
    let id = owned::id_of(&file)?;
    let made = owned::copy_owner_and_mode(&file, backing)
        .map_err(|e| Error::from(e).context(format!("{}: owner and mode", overlay.display())))
        .and_then(|_| create_overlay_in(&file, backing, backing_format));
    if let Err(e) = made {
        let _ = owned::remove(overlay, Some(id));
        return Err(e);
    }
    Ok(id)
}

/// Makes `file` (created empty by the caller, with `O_EXCL|O_NOFOLLOW`)
/// a qcow2 overlay whose backing file is `backing` (absolute path, format
/// `backing_format`). qemu-img writes through the open descriptor
/// (`/proc/self/fd/N`), so a path swapped in the meantime is never touched.
pub fn create_overlay_in(file: &std::fs::File, backing: &Path, backing_format: &str) -> Result<()> {
    // Absolute (qemu-img runs on /proc/self/fd/N), but as named: the
    // header must hold the path QEMU opened the backing image by, or
    // QEMU reports the overlay by a json: description instead of its name.
    let backing = std::path::absolute(backing).map_err(|e| Error::at(backing, e))?;
    let size = virtual_size(&backing, backing_format)?.to_string();
    let args: Vec<OsString> = [
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-F",
        backing_format,
        "-b",
    ]
    .iter()
    .map(OsString::from)
    .chain([backing.into_os_string()])
    .collect();
    let args: Vec<OsString> = args
        .into_iter()
        .chain([fd_name(file), size.into()])
        .collect();
    run_pinned(&args, &[file], DATA_TIMEOUT).map(drop)
}

/// Bytes that `image` (opened as `format`) itself holds, not its backing
/// chain: data or zero clusters a guest wrote. Only that image is opened.
pub fn own_bytes(image: &Path, format: &str) -> Result<u64> {
    let top = ChainImage {
        path: image.to_owned(),
        format: format.to_owned(),
        snapshots: Vec::new(),
    };
    check_format(format)?;
    Ok(map_entries(&[top])?
        .iter()
        .filter(|e| {
            e["depth"].as_u64() == Some(0)
                && (e["data"] == true || e["zero"] == true)
                && e["present"] != false
        })
        .filter_map(|e| e["length"].as_u64())
        .sum())
}

/// Bytes of the disk `chain` shows (top first, as [`chain`] read it)
/// that hold data, per `qemu-img map` of that chain spelled out.
pub fn allocated_bytes(chain: &[ChainImage]) -> Result<u64> {
    Ok(map_entries(chain)?
        .iter()
        .filter(|e| e["data"] == true)
        .filter_map(|e| e["length"].as_u64())
        .sum())
}

/// The extents `qemu-img map --output=json` lists for `chain` spelled out.
fn map_entries(chain: &[ChainImage]) -> Result<Vec<Value>> {
    let (opts, files) = image_opts(chain)?;
    let args: [&OsStr; 4] = [
        "map".as_ref(),
        "--output=json".as_ref(),
        "--image-opts".as_ref(),
        &opts,
    ];
    let files: Vec<&std::fs::File> = files.iter().collect();
    let json = run_pinned(&args, &files, META_TIMEOUT)?;
    serde_json::from_str(&json).map_err(|e| Error::io(format!("qemu-img map: {e}")))
}

/// True when `image` itself holds any data (see [`own_bytes`]).
pub fn has_own_data(image: &Path, format: &str) -> Result<bool> {
    Ok(own_bytes(image, format)? > 0)
}

/// Copies the current contents of `image` into a new qcow2 `target`
/// that backs onto the same backing image, writing only what `image`
/// itself holds. Written into `<target>.part` (created with `O_EXCL`,
/// `image`'s owner and mode, written through its descriptor), then
/// renamed to `target` unless something is there. `record` is told the
/// new file's device and inode as soon as it exists (before any data).
pub fn copy_above_backing(
    image: &Path,
    target: &Path,
    record: &dyn Fn(crate::store::owned::FileId) -> Result<()>,
) -> Result<()> {
    use crate::store::owned;
    let chain = chain(image, "qcow2")?;
    let part = target.with_extension("qcow2.part");
    let file = owned::create_new(&part, 0o600)
        .map_err(|e| Error::from(e).context(part.display().to_string()))?;
    let id = owned::id_of(&file)?;
    let done = (|| {
        record(id)?;
        owned::copy_owner_and_mode(&file, image)?;
        let mut args: Vec<OsString> = ["convert", "--image-opts", "-O", "qcow2"]
            .iter()
            .map(OsString::from)
            .collect();
        if let Some(b) = chain.get(1) {
            args.extend([
                "-B".into(),
                b.path.clone().into_os_string(),
                "-F".into(),
                b.format.clone().into(),
            ]);
        }
        let (opts, pinned) = image_opts(&chain)?;
        args.extend([opts, fd_name(&file)]);
        let mut files: Vec<&std::fs::File> = pinned.iter().collect();
        files.push(&file);
        run_pinned(&args, &files, DATA_TIMEOUT)?;
        file.sync_all()?;
        owned::rename_noreplace(&part, target)
            .map_err(|e| Error::from(e).context(target.display().to_string()))
    })();
    if let Err(e) = done {
        let _ = owned::remove(&part, Some(id));
        return Err(e);
    }
    Ok(())
}

/// Points qcow2 `image` at backing file `backing` without copying data
/// (the two must hold the same bytes).
pub fn rebase_unsafe(image: &Path, backing: &Path, backing_format: &str) -> Result<()> {
    check_format(backing_format)?;
    let pinned = pin(image)?;
    let args: [&OsStr; 9] = [
        "rebase".as_ref(),
        "-u".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        backing_format.as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
        &fd_name(&pinned),
    ];
    run_pinned(&args, &[&pinned], META_TIMEOUT).map(drop)
}

/// `qemu-img commit` of qcow2 `image` into its backing file, after its
/// chain was checked ([`chain`]); `drop` empties it (`-d`).
pub fn commit(image: &Path, drop_after: bool) -> Result<()> {
    let chain = chain(image, "qcow2")?;
    let Some(lower) = chain.get(1) else {
        return Err(Error::io(format!(
            "{} has no backing file to commit into",
            image.display()
        )));
    };
    // Both images as vmsnapfs opened them; nothing below `lower` is
    // needed (only what `image` holds is copied).
    let (top, base) = (pin(image)?, pin(&lower.path)?);
    let mut opts = OsString::from(format!(
        "driver=qcow2,file.driver={},file.filename=",
        protocol_of(&top)
    ));
    opts.push(fd_name(&top));
    opts.push(format!(
        ",backing.driver={},backing.file.driver={},backing.file.filename=",
        lower.format,
        protocol_of(&base)
    ));
    opts.push(fd_name(&base));
    if lower.format == "qcow2" {
        opts.push(",backing.backing=");
    }
    let mut args: Vec<&OsStr> = ["commit", "-q"].iter().map(OsStr::new).collect();
    if drop_after {
        args.push(OsStr::new("-d"));
    }
    args.extend([OsStr::new("--image-opts"), &opts]);
    run_pinned(&args, &[&top, &base], DATA_TIMEOUT).map(drop)
}

/// Decodes a qcow2 snapshot table as both `qemu-img info` and QMP's
/// `query-block` (`inserted.image.snapshots`) give it.
pub fn parse_snapshot_table(table: &Value) -> Vec<ImageSnapshot> {
    table
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| {
                    Some(ImageSnapshot {
                        tag: r["name"].as_str()?.to_owned(),
                        vm_state_size: r["vm-state-size"].as_u64().unwrap_or(0),
                        date_sec: r["date-sec"].as_i64().unwrap_or(0),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Creates internal snapshot `tag` in a stopped image (refusing a
/// duplicate: `qemu-img snapshot -c` would make a second one).
pub fn create(image: &Path, tag: &str) -> Result<()> {
    if list(image)?.iter().any(|s| s.tag == tag) {
        return Err(Error::new(
            crate::error::ErrorKind::Exists,
            format!("{} already has a snapshot tagged {tag}", image.display()),
        ));
    }
    let pinned = pin(image)?;
    let opts = qcow2_alone(&pinned);
    let args: [&OsStr; 6] = [
        "snapshot".as_ref(),
        "-q".as_ref(),
        "-c".as_ref(),
        tag.as_ref(),
        "--image-opts".as_ref(),
        &opts,
    ];
    run_pinned(&args, &[&pinned], META_TIMEOUT).map(drop)
}

/// Reverts a stopped image to internal snapshot `tag`.
pub fn apply(image: &Path, tag: &str) -> Result<()> {
    let pinned = pin(image)?;
    let opts = qcow2_alone(&pinned);
    let args: [&OsStr; 6] = [
        "snapshot".as_ref(),
        "-q".as_ref(),
        "-a".as_ref(),
        tag.as_ref(),
        "--image-opts".as_ref(),
        &opts,
    ];
    run_pinned(&args, &[&pinned], DATA_TIMEOUT).map(drop)
}

/// Deletes internal snapshot `tag` from a stopped image.
pub fn delete(image: &Path, tag: &str) -> Result<()> {
    let pinned = pin(image)?;
    let opts = qcow2_alone(&pinned);
    let args: [&OsStr; 6] = [
        "snapshot".as_ref(),
        "-q".as_ref(),
        "-d".as_ref(),
        tag.as_ref(),
        "--image-opts".as_ref(),
        &opts,
    ];
    run_pinned(&args, &[&pinned], META_TIMEOUT).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_snapshot_table() {
        let v: Value = serde_json::from_str(
            r#"[{"icount":0,"vm-clock-nsec":0,"name":"s1","date-sec":1700000000,
                 "date-nsec":0,"vm-clock-sec":0,"id":"1","vm-state-size":4096},
                {"name":"s2","id":"2"}]"#,
        )
        .unwrap();
        let t = parse_snapshot_table(&v);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].tag, "s1");
        assert_eq!(t[0].vm_state_size, 4096);
        assert_eq!(t[1].vm_state_size, 0);
        assert!(parse_snapshot_table(&Value::Null).is_empty());
    }

    #[test]
    fn the_header_gives_the_size_qemu_img_reports() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-hdr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, size) in ["1M", "1000000", "64M", "3G"].iter().enumerate() {
            let img = dir.join(format!("{i}.qcow2"));
            let ok = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&img)
                .arg(size)
                .status()
                .unwrap()
                .success();
            assert!(ok, "qemu-img create {size}");
            let reported = info(&img, "qcow2").unwrap()["virtual-size"].as_u64();
            assert_eq!(header_size(&img, "qcow2"), reported, "{size}");
        }
        // Another format, or no qcow2 header: qemu-img is asked.
        let raw = dir.join("raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert_eq!(header_size(&raw, "raw"), None);
        assert_eq!(header_size(&raw, "qcow2"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_header_counts_the_snapshots_qemu_img_lists() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-snaps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let qemu_img = |args: &[&str], img: &Path| {
            let ok = Command::new("qemu-img")
                .args(args)
                .arg(img)
                .status()
                .unwrap()
                .success();
            assert!(ok, "qemu-img {args:?}");
        };
        for compat in ["0.10", "1.1"] {
            let img = dir.join(format!("{compat}.qcow2"));
            let made = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o"])
                .arg(format!("compat={compat}"))
                .arg(&img)
                .arg("1M")
                .status()
                .unwrap()
                .success();
            assert!(made, "qemu-img create {compat}");
            assert!(!has_snapshots(&img).unwrap());
            assert!(list(&img).unwrap().is_empty());
            qemu_img(&["snapshot", "-c", "one"], &img);
            assert!(has_snapshots(&img).unwrap(), "{compat}");
            qemu_img(&["snapshot", "-c", "two"], &img);
            qemu_img(&["snapshot", "-d", "one"], &img);
            assert!(has_snapshots(&img).unwrap(), "{compat}");
            assert_eq!(list(&img).unwrap().len(), 1);
            qemu_img(&["snapshot", "-d", "two"], &img);
            assert!(!has_snapshots(&img).unwrap(), "{compat}");
        }
        // No qcow2 header: qemu-img is asked (and refuses a raw file).
        let raw = dir.join("raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert!(has_snapshots(&raw).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_qcow2_header_of_whole_sectors_gives_a_size() {
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        assert_eq!(qcow2_header_size(&h), Some(1 << 30));
        h[4..8].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(qcow2_header_size(&h), Some(1 << 30));
        h[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(qcow2_header_size(&h), None);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[24..32].copy_from_slice(&1000u64.to_be_bytes());
        assert_eq!(qcow2_header_size(&h), None);
        h[0] = b'X';
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        assert_eq!(qcow2_header_size(&h), None);
    }
}
