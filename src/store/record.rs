//! How durable records are written: JSON through serde, with every path
//! kept as the exact bytes the kernel knows. A path that is UTF-8 is a
//! JSON string; any other is an array of its bytes, so a directory named
//! with a Latin-1 byte comes back as the same file, never as U+FFFD.
//!
//! Records written before this format (one `key=value` or tab-separated
//! line per entry, backslash escapes) are still read: [`is_legacy`]
//! tells them apart, and [`unescape`] reads their fields.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::de::Deserializer;
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// A path as a record holds it (see the module documentation).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Wire<'a> {
    Text(std::borrow::Cow<'a, str>),
    Bytes(Vec<u8>),
}

/// The record form of one path.
fn to_wire(path: &Path) -> Wire<'_> {
    match std::str::from_utf8(path.as_os_str().as_bytes()) {
        Ok(s) => Wire::Text(s.into()),
        Err(_) => Wire::Bytes(path.as_os_str().as_bytes().to_vec()),
    }
}

/// The path a record form holds.
fn from_wire(w: Wire<'_>) -> PathBuf {
    match w {
        Wire::Text(s) => PathBuf::from(s.into_owned()),
        Wire::Bytes(b) => PathBuf::from(OsString::from_vec(b)),
    }
}

/// A path field (`#[serde(with = "record::path")]`).
pub mod path {
    use super::*;

    /// Writes the path's bytes.
    pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        to_wire(p).serialize(s)
    }

    /// Reads the path's bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Wire::deserialize(d).map(from_wire)
    }
}

/// A list of paths (`#[serde(with = "record::paths")]`).
pub mod paths {
    use super::*;

    /// Writes each path's bytes.
    pub fn serialize<S: Serializer>(v: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|p| to_wire(p)))
    }

    /// Reads each path's bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
        let v: Vec<Wire> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(from_wire).collect())
    }
}

/// A list of (disk target, path) (`#[serde(with = "record::targets")]`).
pub mod targets {
    use super::*;

    /// Writes `[target, path]` pairs.
    pub fn serialize<S: Serializer>(v: &[(String, PathBuf)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(t, p)| (t, to_wire(p))))
    }

    /// Reads `[target, path]` pairs.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, PathBuf)>, D::Error> {
        let v: Vec<(String, Wire)> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|(t, p)| (t, from_wire(p))).collect())
    }
}

/// A list of path pairs (`#[serde(with = "record::path_pairs")]`).
pub mod path_pairs {
    use super::*;

    /// Writes `[path, path]` pairs.
    pub fn serialize<S: Serializer>(v: &[(PathBuf, PathBuf)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(a, b)| (to_wire(a), to_wire(b))))
    }

    /// Reads `[path, path]` pairs.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(PathBuf, PathBuf)>, D::Error> {
        let v: Vec<(Wire, Wire)> = Vec::deserialize(d)?;
        Ok(v.into_iter()
            .map(|(a, b)| (from_wire(a), from_wire(b)))
            .collect())
    }
}

/// Encodes a record (pretty JSON, one trailing newline).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(value).expect("records always serialize");
    out.push(b'\n');
    out
}

/// True when `bytes` are a record in the old line format (or empty, as
/// an old record of an empty list was): anything that does not start,
/// after white space, like a JSON object or array.
pub fn is_legacy(bytes: &[u8]) -> bool {
    !matches!(
        bytes.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

/// A field of the old line format: backslash escapes of backslash,
/// newline and tab undone.
pub fn unescape(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct R {
        #[serde(with = "path")]
        one: PathBuf,
        #[serde(with = "paths")]
        many: Vec<PathBuf>,
        #[serde(with = "targets")]
        by_target: Vec<(String, PathBuf)>,
        #[serde(with = "path_pairs")]
        pairs: Vec<(PathBuf, PathBuf)>,
    }

    #[test]
    fn paths_keep_their_bytes() {
        let odd = PathBuf::from(OsString::from_vec(b"/img/caf\xe9/\xff\x00x.qcow2".to_vec()));
        let r = R {
            one: odd.clone(),
            many: vec![odd.clone(), "/plain/a b\n\"c\".qcow2".into()],
            by_target: vec![("vda".into(), odd.clone())],
            pairs: vec![(odd.clone(), "/x".into())],
        };
        let bytes = encode(&r);
        let text = std::str::from_utf8(&bytes).expect("records are UTF-8 text");
        assert!(text.contains("\"/plain/a b\\n\\\"c\\\".qcow2\""), "{text}");
        let back: R = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.one.as_os_str().as_bytes(), odd.as_os_str().as_bytes());
    }

    #[test]
    fn tells_old_records_apart() {
        assert!(is_legacy(b"op=create\nid=x\n"));
        assert!(is_legacy(b"vda\tqcow2\t/img\n"));
        assert!(!is_legacy(b"  {\"op\":\"delete\"}"));
        assert!(!is_legacy(b"[]"));
        assert!(is_legacy(b""));
        assert_eq!(unescape("a\\\\b\\nc\\td\\"), "a\\b\nc\td\\");
    }
}
