//! QEMU command lines, read as QEMU reads them: the option strings of
//! `-drive` and `-blockdev` (`key=value,...` with `,,` for a comma in a
//! value, dotted keys for nested nodes) and JSON `-blockdev {...}`. Used
//! to point a recorded or defined command line at each disk's active
//! layer before a restart: only the image paths (`file`/`filename` of a
//! node) that equal an older image of a disk change; everything else is
//! kept byte for byte.

use std::collections::HashSet;

use serde_json::Value;

/// One disk's rewrite: every older image path (the definition's, images
/// below the active layer, former active layers), the active layer's
/// path, and whether the disk went from a raw image to a qcow2 overlay
/// (the format node's `raw` then becomes `qcow2`).
pub type Swap = (Vec<String>, String, bool);

/// Removes `-loadvm X`, `-S` and `-incoming X` from a recorded argv: they
/// describe how that process started, not how the domain is defined.
pub fn strip_start_options(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-loadvm" | "--loadvm" | "-incoming" | "--incoming" => {
                it.next();
            }
            "-S" => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

/// Points a command line at each disk's active layer. The values of
/// `-drive` and `-blockdev` are parsed; a `file` or `filename` (at any
/// depth: `file.filename`, JSON `{"file":{"filename":...}}`) equal to an
/// older path of a disk becomes its active path, escaped as the option
/// string needs; when the disk went from raw to qcow2, the format of the
/// node over it (`format=`/`driver=` of a `-drive`, the `driver` of the
/// parent node, or of the `-blockdev` whose `file` names the protocol
/// node) becomes `qcow2`. Any other argument equal to an older path as a
/// whole (`-hda PATH`, a bare image) is replaced. What this cannot
/// rewrite is caught by checking the chains QEMU opened (see
/// `QemuBackend::start_process`).
pub fn point_at_layers(argv: &[String], swaps: &[Swap]) -> Vec<String> {
    let find = |path: &str| find(swaps, path);
    // Pass 1: paths, and the node names of protocol nodes whose format
    // node (in another -blockdev) must become qcow2.
    let mut renamed_nodes = HashSet::new();
    let mut out: Vec<String> = Vec::with_capacity(argv.len());
    let mut parsed: Vec<Option<Node>> = Vec::with_capacity(argv.len());
    let mut prev: Option<&str> = None;
    for arg in argv {
        let opt = prev.map(|p| p.trim_start_matches('-'));
        let kind = match opt {
            Some("drive") => Some(Syntax::Drive),
            Some("blockdev") if arg.trim_start().starts_with('{') => Some(Syntax::Json),
            Some("blockdev") => Some(Syntax::Blockdev),
            _ => None,
        };
        prev = if arg.starts_with('-') && kind.is_none() {
            Some(arg.as_str())
        } else {
            None
        };
        let Some(kind) = kind else {
            parsed.push(None);
            out.push(match find(arg) {
                Some((new, _)) if !arg.starts_with('-') => new.to_owned(),
                _ => arg.clone(),
            });
            continue;
        };
        let Some(mut node) = Node::parse(arg, kind) else {
            parsed.push(None);
            out.push(arg.clone());
            continue;
        };
        let changed = node.swap_paths(swaps, &mut renamed_nodes);
        out.push(if changed { node.to_arg() } else { arg.clone() });
        parsed.push(Some(node));
    }
    // Pass 2: a raw format node over a renamed protocol node.
    if !renamed_nodes.is_empty() {
        for (arg, node) in out.iter_mut().zip(parsed.iter_mut()) {
            if let Some(node) = node {
                if node.format_over(&renamed_nodes) {
                    *arg = node.to_arg();
                }
            }
        }
    }
    out
}

/// The active path (and the raw-to-qcow2 flag) for an older image path.
fn find<'a>(swaps: &'a [Swap], path: &str) -> Option<(&'a str, bool)> {
    swaps
        .iter()
        .find(|(olds, new, _)| olds.iter().any(|o| o == path && o != new))
        .map(|(_, new, q)| (new.as_str(), *q))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    /// `-drive`: QemuOpts, the image is `file=`.
    Drive,
    /// `-blockdev key=value,...`: dotted keys, the image is `filename=`.
    Blockdev,
    /// `-blockdev {...}`.
    Json,
}

/// A parsed `-drive`/`-blockdev` value.
#[derive(Debug, Clone)]
enum Node {
    /// Elements in order: `(key, value)`, or a bare element (`None` key).
    Opts(Syntax, Vec<(Option<String>, String)>),
    Json(Value),
}

/// Splits a QEMU option string at single commas (`,,` is a comma in a
/// value) into `key=value` or bare elements.
pub fn split_opts(s: &str) -> Vec<(Option<String>, String)> {
    // The key ends at the first '=' (a key holds no comma, so an escaped
    // comma is always in the value).
    let element = |e: String| match e.split_once('=') {
        Some((k, v)) => (Some(k.to_owned()), v.to_owned()),
        None => (None, e),
    };
    let mut elems = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            cur.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            cur.push(',');
        } else {
            elems.push(element(std::mem::take(&mut cur)));
        }
    }
    elems.push(element(cur));
    elems
}

/// Joins elements back into an option string, doubling commas in values
/// (and in bare elements).
pub fn join_opts(elems: &[(Option<String>, String)]) -> String {
    elems
        .iter()
        .map(|(k, v)| {
            let v = v.replace(',', ",,");
            match k {
                Some(k) => format!("{k}={v}"),
                None => v,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The dotted prefix of a key's node (`file.filename` -> `file.`,
/// `filename` -> ``).
fn prefix_of(key: &str) -> &str {
    key.rfind('.').map_or("", |i| &key[..=i])
}

/// The prefix of the node above the node at `prefix` (`a.b.` -> `a.`),
/// or `None` at the top.
fn parent_prefix(prefix: &str) -> Option<&str> {
    let inner = prefix.strip_suffix('.')?;
    Some(inner.rfind('.').map_or("", |i| &inner[..=i]))
}

impl Node {
    fn parse(arg: &str, kind: Syntax) -> Option<Node> {
        match kind {
            Syntax::Json => serde_json::from_str::<Value>(arg)
                .ok()
                .filter(Value::is_object)
                .map(Node::Json),
            _ => Some(Node::Opts(kind, split_opts(arg))),
        }
    }

    fn to_arg(&self) -> String {
        match self {
            Node::Opts(_, elems) => join_opts(elems),
            Node::Json(v) => v.to_string(),
        }
    }

    /// Replaces the image paths of this node; records the node names of
    /// top-level protocol nodes that went from raw to qcow2. True if
    /// anything changed.
    fn swap_paths(&mut self, swaps: &[Swap], renamed: &mut HashSet<String>) -> bool {
        match self {
            Node::Opts(kind, elems) => {
                let mut formats: Vec<String> = Vec::new();
                let mut changed = false;
                let mut top_protocol = false;
                for (k, v) in elems.iter_mut() {
                    let Some(k) = k else { continue };
                    let last = k.rsplit('.').next().unwrap_or(k);
                    let is_path = match (*kind, last) {
                        (_, "filename") => true,
                        // -drive file=PATH; in a -blockdev `file=` names a node.
                        (Syntax::Drive, "file") => true,
                        _ => false,
                    };
                    if !is_path {
                        continue;
                    }
                    let Some((new, to_qcow2)) = find(swaps, v) else {
                        continue;
                    };
                    *v = new.to_owned();
                    changed = true;
                    if !to_qcow2 {
                        continue;
                    }
                    let prefix = prefix_of(k);
                    if last == "file" {
                        // -drive file=: the format is a sibling.
                        formats.push(format!("{prefix}format"));
                        formats.push(format!("{prefix}driver"));
                    } else if let Some(parent) = parent_prefix(prefix) {
                        formats.push(format!("{parent}driver"));
                    } else {
                        top_protocol = true;
                    }
                }
                if top_protocol {
                    if let Some((_, name)) = elems
                        .iter()
                        .find(|(k, _)| k.as_deref() == Some("node-name"))
                    {
                        renamed.insert(name.clone());
                    }
                }
                for (k, v) in elems.iter_mut() {
                    if k.as_ref().is_some_and(|k| formats.contains(k)) && v == "raw" {
                        *v = "qcow2".to_owned();
                    }
                }
                changed
            }
            Node::Json(v) => json_swap(v, true, swaps, renamed),
        }
    }

    /// Makes this node's `raw` driver `qcow2` when its `file` names one
    /// of `renamed`. True if it changed.
    fn format_over(&mut self, renamed: &HashSet<String>) -> bool {
        match self {
            Node::Opts(Syntax::Blockdev, elems) => {
                let over = elems
                    .iter()
                    .any(|(k, v)| k.as_deref() == Some("file") && renamed.contains(v));
                let mut changed = false;
                for (k, v) in elems.iter_mut() {
                    if over && k.as_deref() == Some("driver") && v == "raw" {
                        *v = "qcow2".to_owned();
                        changed = true;
                    }
                }
                changed
            }
            Node::Json(Value::Object(m)) => {
                let over = m
                    .get("file")
                    .and_then(Value::as_str)
                    .is_some_and(|f| renamed.contains(f));
                if over && m.get("driver").and_then(Value::as_str) == Some("raw") {
                    m.insert("driver".into(), Value::from("qcow2"));
                    return true;
                }
                false
            }
            _ => false,
        }
    }
}

/// Replaces `filename` paths in a JSON node and the nodes below it; a
/// raw parent of a renamed protocol node becomes qcow2.
fn json_swap(v: &mut Value, top: bool, swaps: &[Swap], renamed: &mut HashSet<String>) -> bool {
    let Value::Object(m) = v else {
        return false;
    };
    let mut changed = false;
    let mut child_to_qcow2 = false;
    for child in m.values_mut() {
        if let Value::Object(c) = child {
            let hit = c
                .get("filename")
                .and_then(Value::as_str)
                .and_then(|p| find(swaps, p));
            if let Some((new, to_qcow2)) = hit {
                c.insert("filename".into(), Value::from(new));
                changed = true;
                child_to_qcow2 |= to_qcow2;
            }
            changed |= json_swap(child, false, swaps, renamed);
        }
    }
    if child_to_qcow2 && m.get("driver").and_then(Value::as_str) == Some("raw") {
        m.insert("driver".into(), Value::from("qcow2"));
    }
    if top {
        let hit = m
            .get("filename")
            .and_then(Value::as_str)
            .and_then(|p| find(swaps, p));
        if let Some((new, to_qcow2)) = hit {
            m.insert("filename".into(), Value::from(new));
            changed = true;
            if to_qcow2 {
                if let Some(name) = m.get("node-name").and_then(Value::as_str) {
                    renamed.insert(name.to_owned());
                }
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn swaps() -> Vec<Swap> {
        vec![
            (
                vec!["/i/a.qcow2".to_owned(), "/i/a,old.qcow2".to_owned()],
                "/i/a.pre,upgrade\"x.qcow2".to_owned(),
                false,
            ),
            (
                vec!["/i/b.raw".to_owned()],
                "/i/b.s1.qcow2".to_owned(),
                true,
            ),
        ]
    }

    #[test]
    fn option_strings_split_and_join_with_escaped_commas() {
        type Elems<'a> = &'a [(Option<&'a str>, &'a str)];
        let table: &[(&str, Elems)] = &[
            (
                "file=/a,if=virtio",
                &[(Some("file"), "/a"), (Some("if"), "virtio")],
            ),
            (
                "file=/a,,b,format=raw",
                &[(Some("file"), "/a,b"), (Some("format"), "raw")],
            ),
            ("file=/a,,,,b", &[(Some("file"), "/a,,b")]),
            (
                "virtio-blk,drive=d0",
                &[(None, "virtio-blk"), (Some("drive"), "d0")],
            ),
            ("k=v=w", &[(Some("k"), "v=w")]),
            ("", &[(None, "")]),
        ];
        for (s, want) in table {
            let got = split_opts(s);
            let want: Vec<(Option<String>, String)> = want
                .iter()
                .map(|(k, v)| (k.map(str::to_owned), v.to_string()))
                .collect();
            assert_eq!(got, want, "{s:?}");
            assert_eq!(join_opts(&got), *s, "round trip of {s:?}");
        }
    }

    #[test]
    fn rewrites_only_the_image_paths_of_each_node() {
        // (argument list, expected after the rewrite): each case on its own.
        let table: &[(&[&str], &[&str])] = &[
            // -drive: the file, escaped; the other options untouched.
            (
                &["-drive", "file=/i/a.qcow2,format=qcow2,if=virtio"],
                &[
                    "-drive",
                    "file=/i/a.pre,,upgrade\"x.qcow2,format=qcow2,if=virtio",
                ],
            ),
            // An older path that has a comma, given escaped.
            (
                &["-drive", "file=/i/a,,old.qcow2,format=qcow2"],
                &["-drive", "file=/i/a.pre,,upgrade\"x.qcow2,format=qcow2"],
            ),
            // A path that only starts like an image is another file.
            (
                &["-drive", "file=/i/a.qcow2.bak,format=qcow2"],
                &["-drive", "file=/i/a.qcow2.bak,format=qcow2"],
            ),
            (
                &["-drive", "file=/i/a.qcow2,,old,format=qcow2"],
                &["-drive", "file=/i/a.qcow2,,old,format=qcow2"],
            ),
            // A raw disk that got a qcow2 overlay: the format follows.
            (
                &["-drive", "file=/i/b.raw,format=raw,if=virtio"],
                &["-drive", "file=/i/b.s1.qcow2,format=qcow2,if=virtio"],
            ),
            // Dotted -blockdev: filename of the nested protocol node; the
            // parent's driver follows.
            (
                &[
                    "-blockdev",
                    "driver=raw,node-name=d1,file.driver=file,file.filename=/i/b.raw",
                ],
                &[
                    "-blockdev",
                    "driver=qcow2,node-name=d1,file.driver=file,file.filename=/i/b.s1.qcow2",
                ],
            ),
            // Two -blockdevs: the format node names the protocol node.
            (
                &[
                    "-blockdev",
                    "driver=file,filename=/i/b.raw,node-name=p1",
                    "-blockdev",
                    "driver=raw,file=p1,node-name=f1",
                ],
                &[
                    "-blockdev",
                    "driver=file,filename=/i/b.s1.qcow2,node-name=p1",
                    "-blockdev",
                    "driver=qcow2,file=p1,node-name=f1",
                ],
            ),
            // In a -blockdev, file= is a node name, even one that looks
            // like a path.
            (
                &["-blockdev", "driver=qcow2,file=/i/a.qcow2"],
                &["-blockdev", "driver=qcow2,file=/i/a.qcow2"],
            ),
            // JSON: the filename, JSON-escaped; the format follows.
            (
                &[
                    "-blockdev",
                    r#"{"driver":"raw","file":{"driver":"file","filename":"/i/b.raw"}}"#,
                ],
                &[
                    "-blockdev",
                    r#"{"driver":"qcow2","file":{"driver":"file","filename":"/i/b.s1.qcow2"}}"#,
                ],
            ),
            (
                &[
                    "-blockdev",
                    r#"{"driver":"qcow2","file":{"driver":"file","filename":"/i/a,old.qcow2"}}"#,
                ],
                &[
                    "-blockdev",
                    r#"{"driver":"qcow2","file":{"driver":"file","filename":"/i/a.pre,upgrade\"x.qcow2"}}"#,
                ],
            ),
            // JSON protocol node and a JSON format node over it.
            (
                &[
                    "-blockdev",
                    r#"{"driver":"file","filename":"/i/b.raw","node-name":"p2"}"#,
                    "-blockdev",
                    r#"{"driver":"raw","file":"p2"}"#,
                ],
                &[
                    "-blockdev",
                    r#"{"driver":"file","filename":"/i/b.s1.qcow2","node-name":"p2"}"#,
                    "-blockdev",
                    r#"{"driver":"qcow2","file":"p2"}"#,
                ],
            ),
            // A path only mentioned as a description, or in another
            // option, is not an image of the disk.
            (
                &[
                    "-blockdev",
                    r#"{"driver":"file","filename":"/x","comment":"/i/a.qcow2"}"#,
                ],
                &[
                    "-blockdev",
                    r#"{"driver":"file","filename":"/x","comment":"/i/a.qcow2"}"#,
                ],
            ),
            (
                &[
                    "-name",
                    "/i/a.qcow2,debug-threads=on",
                    "-device",
                    "virtio-blk,drive=/i/a.qcow2",
                ],
                &[
                    "-name",
                    "/i/a.qcow2,debug-threads=on",
                    "-device",
                    "virtio-blk,drive=/i/a.qcow2",
                ],
            ),
            // -hda PATH and a bare image: the whole argument.
            (
                &["-hda", "/i/a.qcow2", "/i/b.raw"],
                &["-hda", "/i/a.pre,upgrade\"x.qcow2", "/i/b.s1.qcow2"],
            ),
            // Unparsable JSON is left alone (QEMU would refuse it anyway).
            (
                &["-blockdev", r#"{"driver":"raw","file":"#],
                &["-blockdev", r#"{"driver":"raw","file":"#],
            ),
            // Options with two dashes are the same options.
            (
                &["--drive", "file=/i/a.qcow2"],
                &["--drive", "file=/i/a.pre,,upgrade\"x.qcow2"],
            ),
        ];
        for (input, want) in table {
            let mut full = argv(&["qemu", "-m", "64"]);
            full.extend(argv(input));
            let got = point_at_layers(&full, &swaps());
            assert_eq!(&got[3..], &argv(want)[..], "{input:?}");
        }
    }

    #[test]
    fn a_rewritten_line_rewrites_back() {
        let line = argv(&[
            "qemu",
            "-drive",
            "file=/i/a.qcow2,format=qcow2,if=virtio",
            "-blockdev",
            r#"{"driver":"qcow2","file":{"driver":"file","filename":"/i/a.qcow2"}}"#,
        ]);
        let there = point_at_layers(&line, &swaps());
        let back = vec![(
            vec!["/i/a.pre,upgrade\"x.qcow2".to_owned()],
            "/i/a.qcow2".to_owned(),
            false,
        )];
        assert_eq!(point_at_layers(&there, &back), line);
    }

    #[test]
    fn strips_start_options() {
        let line = argv(&[
            "qemu",
            "-m",
            "64",
            "-S",
            "-loadvm",
            "x",
            "-incoming",
            "defer",
        ]);
        assert_eq!(strip_start_options(&line), argv(&["qemu", "-m", "64"]));
    }
}
