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

/// Creates a qcow2 overlay at `overlay` whose backing file is `backing`
/// (absolute path, format `backing_format`). Refuses an existing file.
pub fn create_overlay(overlay: &Path, backing: &Path, backing_format: &str) -> Result<()> {
    if overlay.exists() {
        return Err(Error::new(
            crate::error::ErrorKind::Exists,
            format!("{} exists", overlay.display()),
        ));
    }
    let backing = std::fs::canonicalize(backing)
        .map_err(|e| Error::io(format!("{}: {e}", backing.display())))?;
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        backing_format,
        "-b",
        &backing.to_string_lossy(),
        &overlay.to_string_lossy(),
    ])
    .map(drop)
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
/// itself holds (written to `<target>.part`, then renamed).
pub fn copy_above_backing(image: &Path, target: &Path) -> Result<()> {
    let chain = chain(image)?;
    let part = target.with_extension("qcow2.part");
    let _ = std::fs::remove_file(&part);
    let (src, dst) = (image.to_string_lossy(), part.to_string_lossy());
    let mut args = vec!["convert", "-U", "-O", "qcow2"];
    let backing;
    let backing_format;
    if let Some(b) = chain.get(1) {
        backing = b.path.to_string_lossy().into_owned();
        backing_format = b.format.clone();
        args.extend(["-B", &backing, "-F", &backing_format]);
    }
    args.extend([src.as_ref(), dst.as_ref()]);
    run(&args)?;
    std::fs::File::open(&part)?.sync_all()?;
    std::fs::rename(&part, target)?;
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
