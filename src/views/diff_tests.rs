//! Changed extents of images made by qemu-img and written by qemu-io:
//! exact where the maps say so, and always enough to rebuild the newer
//! disk from the older one.

use super::super::test_images::{create, io, overlay, run, Dir};
use super::*;

const K: u64 = 1024;
const M: u64 = 1 << 20;

fn open(img: &str, format: &str, tag: Option<&str>) -> Chain {
    Chain::open_file(std::path::Path::new(img), format, tag).unwrap()
}

fn bytes(c: &Chain) -> Vec<u8> {
    let mut v = vec![0u8; c.size() as usize];
    assert_eq!(c.read_at(0, &mut v).unwrap(), v.len());
    v
}

/// The older disk patched with the newer one's bytes over the extents
/// equals the newer disk.
fn assert_rebuilds(new: &Chain, old: Option<&Chain>, ch: &Changes) {
    let want = bytes(new);
    let mut got = old.map(bytes).unwrap_or_default();
    got.resize(want.len(), 0);
    for &(s, l) in &ch.extents {
        let (s, l) = (s as usize, l as usize);
        got[s..s + l].copy_from_slice(&want[s..s + l]);
    }
    assert!(
        got == want,
        "patched disk differs; extents {:?}",
        ch.extents
    );
}

#[test]
fn internal_snapshots_compare_their_clusters() {
    let d = Dir::new("diff-int");
    let img = d.p("a.qcow2");
    create("qcow2", &img, "16M");
    io("qcow2", &img, "write -P 1 0 4M");
    run("qemu-img", &["snapshot", "-c", "s1", &img]);
    io("qcow2", &img, "write -P 2 1M 64k");
    io("qcow2", &img, "write -P 3 8M 128k");
    io("qcow2", &img, "write -z 3M 64k");
    run("qemu-img", &["snapshot", "-c", "s2", &img]);
    let (s1, s2) = (
        open(&img, "qcow2", Some("s1")),
        open(&img, "qcow2", Some("s2")),
    );
    let ch = changes(&s2, Some(&s1)).unwrap();
    assert_eq!(
        ch.extents,
        vec![(M, 64 * K), (3 * M, 64 * K), (8 * M, 128 * K)]
    );
    assert_eq!(ch.compared, 0, "the maps decided everything");
    assert_rebuilds(&s2, Some(&s1), &ch);
    // Backwards too: what s1 needs over s2.
    let back = changes(&s1, Some(&s2)).unwrap();
    assert_eq!(back.extents, ch.extents);
    assert_rebuilds(&s1, Some(&s2), &back);
    // Against nothing: every byte with data.
    let all = changes(&s1, None).unwrap();
    assert_eq!(all.extents, vec![(0, 4 * M)]);
    assert_rebuilds(&s1, None, &all);
    // The same snapshot: nothing.
    assert!(changes(&s2, Some(&s2)).unwrap().extents.is_empty());
}

#[test]
fn external_chains_report_the_overlays_between() {
    let d = Dir::new("diff-ext");
    let (base, o1, o2) = (d.p("base.qcow2"), d.p("o1.qcow2"), d.p("o2.qcow2"));
    create("qcow2", &base, "16M");
    io("qcow2", &base, "write -P 1 0 6M");
    for (over, under) in [(&o1, &base), (&o2, &o1)] {
        overlay(over, under, "qcow2", Some("16M"), &[]);
    }
    io("qcow2", &o1, "write -P 2 2M 64k");
    io("qcow2", &o2, "write -P 3 10M 192k");
    let (b, c1, c2) = (
        open(&base, "qcow2", None),
        open(&o1, "qcow2", None),
        open(&o2, "qcow2", None),
    );
    let ch = changes(&c2, Some(&b)).unwrap();
    assert_eq!(ch.extents, vec![(2 * M, 64 * K), (10 * M, 192 * K)]);
    assert_rebuilds(&c2, Some(&b), &ch);
    assert_eq!(
        changes(&c2, Some(&c1)).unwrap().extents,
        vec![(10 * M, 192 * K)]
    );
    let back = changes(&b, Some(&c2)).unwrap();
    assert_rebuilds(&b, Some(&c2), &back);
    // Two branches over one base: both overlays' allocations.
    let br = d.p("br.qcow2");
    overlay(&br, &base, "qcow2", Some("16M"), &[]);
    io("qcow2", &br, "write -P 4 12M 64k");
    let cb = open(&br, "qcow2", None);
    let ch = changes(&cb, Some(&c2)).unwrap();
    assert_eq!(
        ch.extents,
        vec![(2 * M, 64 * K), (10 * M, 192 * K), (12 * M, 64 * K)]
    );
    assert_rebuilds(&cb, Some(&c2), &ch);
}

#[test]
fn a_raw_base_and_an_internal_snapshot_in_a_backing_image() {
    let d = Dir::new("diff-mixed");
    let (raw, mid, top) = (d.p("base.raw"), d.p("mid.qcow2"), d.p("top.qcow2"));
    std::fs::write(&raw, vec![7u8; 4 * M as usize]).unwrap();
    overlay(&mid, &raw, "raw", Some("4M"), &[]);
    io("qcow2", &mid, "write -P 1 0 64k");
    run("qemu-img", &["snapshot", "-c", "t1", &mid]);
    io("qcow2", &mid, "write -P 2 1M 64k");
    overlay(&top, &mid, "qcow2", Some("4M"), &[]);
    io("qcow2", &top, "write -P 3 2M 64k");
    let t1 = open(&mid, "qcow2", Some("t1"));
    let now = open(&top, "qcow2", None);
    let ch = changes(&now, Some(&t1)).unwrap();
    assert_eq!(ch.extents, vec![(M, 64 * K), (2 * M, 64 * K)]);
    assert_rebuilds(&now, Some(&t1), &ch);
    let r = open(&raw, "raw", None);
    let ch = changes(&now, Some(&r)).unwrap();
    assert_eq!(ch.extents, vec![(0, 64 * K), (M, 64 * K), (2 * M, 64 * K)]);
    assert_eq!(ch.compared, 0);
}

#[test]
fn unrelated_images_are_compared_byte_by_byte() {
    let d = Dir::new("diff-raw");
    let (a, b) = (d.p("a.raw"), d.p("b.raw"));
    let mut bytes_a = vec![5u8; 2 * M as usize];
    std::fs::write(&a, &bytes_a).unwrap();
    bytes_a[M as usize + 10] = 6;
    bytes_a.truncate(M as usize + 100);
    std::fs::write(&b, &bytes_a).unwrap();
    let (ca, cb) = (open(&a, "raw", None), open(&b, "raw", None));
    let ch = changes(&cb, Some(&ca)).unwrap();
    assert_eq!(ch.extents, vec![(M, 100)]);
    assert_eq!(ch.compared, cb.size());
    assert_rebuilds(&cb, Some(&ca), &ch);
    // The longer one over the shorter: the tail differs (zeros there).
    let back = changes(&ca, Some(&cb)).unwrap();
    assert_eq!(back.extents, vec![(M, M)]);
    assert_rebuilds(&ca, Some(&cb), &back);
}

#[test]
fn the_holes_of_a_sparse_raw_file_are_zeros() {
    let d = Dir::new("diff-sparse");
    let raw = d.p("s.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(8 * M).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![9u8; 64 * K as usize], 3 * M).unwrap();
    drop(f);
    let c = open(&raw, "raw", None);
    let ch = changes(&c, None).unwrap();
    assert_eq!(ch.extents, vec![(3 * M, 64 * K)]);
    assert_rebuilds(&c, None, &ch);
    assert_eq!(c.seek_data(0).unwrap(), Some(3 * M));
    assert_eq!(c.seek_hole(3 * M).unwrap(), Some(3 * M + 64 * K));
    assert_eq!(c.allocated_bytes().unwrap(), 64 * K);
}

#[test]
fn seeks_and_the_map_follow_the_extents() {
    let ch = Changes {
        size: 10 * M,
        extents: vec![(M, 64 * K), (4 * M, M)],
        compared: 0,
    };
    assert_eq!(ch.seek_data(0), Some(M));
    assert_eq!(ch.seek_data(M + 5), Some(M + 5));
    assert_eq!(ch.seek_data(M + 64 * K), Some(4 * M));
    assert_eq!(ch.seek_data(5 * M), None);
    assert_eq!(ch.seek_data(10 * M), None);
    assert_eq!(ch.seek_hole(0), Some(0));
    assert_eq!(ch.seek_hole(M), Some(M + 64 * K));
    assert_eq!(ch.seek_hole(4 * M + 1), Some(5 * M));
    assert_eq!(ch.seek_hole(9 * M), Some(9 * M));
    assert_eq!(ch.seek_hole(10 * M), None);
    assert_eq!(ch.changed_bytes(), M + 64 * K);
    let map: serde_json::Value = serde_json::from_str(&ch.map_json()).unwrap();
    let runs: Vec<(u64, u64, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        vec![
            (0, M, false),
            (M, 64 * K, true),
            (M + 64 * K, 3 * M - 64 * K, false),
            (4 * M, M, true),
            (5 * M, 5 * M, false)
        ]
    );
    let empty = Changes {
        size: 0,
        ..Changes::default()
    };
    assert_eq!(empty.map_json(), "[]\n");
}
