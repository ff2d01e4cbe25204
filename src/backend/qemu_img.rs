//! `qemu-img` on the images of a stopped domain: internal snapshots,
//! backing chains and overlays.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::ImageSnapshot;
use crate::error::{Error, Result};

/// Runs qemu-img with `args`, returning stdout; a failure carries stderr.
pub fn run(args: &[&str]) -> Result<String> {
    log::debug!("qemu-img {}", args.join(" "));
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::io(format!(
            "qemu-img {} failed: {}",
            args.first().unwrap_or(&""),
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The internal snapshots of one image (read with `-U`, so it works while
/// a QEMU holds the image; use QMP for an authoritative view then).
pub fn list(image: &Path) -> Result<Vec<ImageSnapshot>> {
    let path = image.to_string_lossy();
    let json = run(&["info", "-U", "--output=json", &path])?;
    let info: Value =
        serde_json::from_str(&json).map_err(|e| Error::io(format!("qemu-img info: {e}")))?;
    Ok(parse_snapshot_table(&info["snapshots"]))
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

/// The backing chain of `image`, top first (read with `-U`).
pub fn chain(image: &Path) -> Result<Vec<ChainImage>> {
    let path = image.to_string_lossy();
    let json = run(&["info", "-U", "--backing-chain", "--output=json", &path])?;
    let infos: Value =
        serde_json::from_str(&json).map_err(|e| Error::io(format!("qemu-img info: {e}")))?;
    Ok(infos
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some(ChainImage {
                path: PathBuf::from(i["filename"].as_str()?),
                format: i["format"].as_str().unwrap_or("raw").to_owned(),
                snapshots: parse_snapshot_table(&i["snapshots"]),
            })
        })
        .collect())
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
    let backing = std::fs::canonicalize(backing)
        .map_err(|e| Error::io(format!("{}: {e}", backing.display())))?;
    let args: Vec<String> = ["create", "-q", "-f", "qcow2", "-F", backing_format, "-b"]
        .iter()
        .map(|s| s.to_string())
        .chain([backing.to_string_lossy().into_owned()])
        .collect();
    run_on(file, &args)
}

/// Bytes that `image` itself (not its backing chain) holds: data or zero
/// clusters a guest wrote.
pub fn own_bytes(image: &Path) -> Result<u64> {
    let json = run(&["map", "-U", "--output=json", &image.to_string_lossy()])?;
    let map: Value =
        serde_json::from_str(&json).map_err(|e| Error::io(format!("qemu-img map: {e}")))?;
    Ok(map
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["depth"].as_u64() == Some(0)
                && (e["data"] == true || e["zero"] == true)
                && e["present"] != false
        })
        .filter_map(|e| e["length"].as_u64())
        .sum())
}

/// Bytes of the disk `image` shows (down its backing chain) that hold
/// data, per `qemu-img map` of format `format`.
pub fn allocated_bytes(image: &Path, format: &str) -> Result<u64> {
    let json = run(&[
        "map",
        "-U",
        "-f",
        format,
        "--output=json",
        &image.to_string_lossy(),
    ])?;
    let map: Value =
        serde_json::from_str(&json).map_err(|e| Error::io(format!("qemu-img map: {e}")))?;
    Ok(map
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["data"] == true)
        .filter_map(|e| e["length"].as_u64())
        .sum())
}

/// True when `image` itself holds any data (see [`own_bytes`]).
pub fn has_own_data(image: &Path) -> Result<bool> {
    Ok(own_bytes(image)? > 0)
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
    let chain = chain(image)?;
    let part = target.with_extension("qcow2.part");
    let file = owned::create_new(&part, 0o600)
        .map_err(|e| Error::from(e).context(part.display().to_string()))?;
    let id = owned::id_of(&file)?;
    let done = (|| {
        record(id)?;
        owned::copy_owner_and_mode(&file, image)?;
        let src = image.to_string_lossy();
        let mut args: Vec<String> = ["convert", "-U", "-O", "qcow2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(b) = chain.get(1) {
            args.extend([
                "-B".into(),
                b.path.to_string_lossy().into_owned(),
                "-F".into(),
                b.format.clone(),
            ]);
        }
        args.push(src.into_owned());
        run_on(&file, &args)?;
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

/// Runs qemu-img with `args` and, as its last argument, `file` open in
/// it (`/proc/self/fd/N`): qemu-img never opens a path someone could
/// swap for a symlink.
fn run_on(file: &std::fs::File, args: &[String]) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = file.as_raw_fd();
    let target = format!("/proc/self/fd/{fd}");
    log::debug!("qemu-img {} {target}", args.join(" "));
    let mut cmd = Command::new("qemu-img");
    cmd.args(args).arg(&target);
    // SAFETY: only fcntl(2) runs between fork and exec; it clears
    // close-on-exec on the descriptor qemu-img must inherit.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .map_err(|e| Error::io(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(Error::io(format!(
            "qemu-img {} failed: {}",
            args.first().map(String::as_str).unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Points `image` at backing file `backing` without copying data (the
/// two must hold the same bytes).
pub fn rebase_unsafe(image: &Path, backing: &Path, backing_format: &str) -> Result<()> {
    run(&[
        "rebase",
        "-u",
        "-F",
        backing_format,
        "-b",
        &backing.to_string_lossy(),
        &image.to_string_lossy(),
    ])
    .map(drop)
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
    run(&["snapshot", "-c", tag, &image.to_string_lossy()]).map(drop)
}

/// Reverts a stopped image to internal snapshot `tag`.
pub fn apply(image: &Path, tag: &str) -> Result<()> {
    run(&["snapshot", "-a", tag, &image.to_string_lossy()]).map(drop)
}

/// Deletes internal snapshot `tag` from a stopped image.
pub fn delete(image: &Path, tag: &str) -> Result<()> {
    run(&["snapshot", "-d", tag, &image.to_string_lossy()]).map(drop)
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
}
