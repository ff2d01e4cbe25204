//! The direct reader against `qemu-img convert` of the same images.

use super::super::test_images::{create, io, overlay, run, Dir};
use super::*;

/// What QEMU reads: `qemu-img convert -O raw` of `image` (format given,
/// at snapshot `tag` if any).
fn qemu_bytes(dir: &Dir, image: &str, format: &str, tag: Option<&str>) -> Vec<u8> {
    let out = dir.p("want.raw");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert", "-f", format, "-O", "raw"];
    let l;
    if let Some(t) = tag {
        l = format!("snapshot.name={}", t.replace(',', ",,"));
        args.extend(["-l", &l]);
    }
    args.extend([image, &out]);
    run("qemu-img", &args);
    std::fs::read(&out).unwrap()
}

/// Reads all of `chain` in odd-sized pieces that cross cluster edges.
fn read_all(chain: &Chain, step: usize) -> Vec<u8> {
    let mut got = vec![0xEEu8; chain.size() as usize];
    let mut off = 0;
    while off < got.len() {
        let end = (off + step).min(got.len());
        assert_eq!(
            chain.read_at(off as u64, &mut got[off..end]).unwrap(),
            end - off
        );
        off = end;
    }
    got
}

fn same(chain: &Chain, want: &[u8]) {
    assert_eq!(chain.size(), want.len() as u64);
    for step in [777_777, 4096, 1 << 20] {
        assert!(read_all(chain, step) == want, "bytes differ (step {step})");
    }
}

#[test]
fn reads_internal_snapshots_like_qemu() {
    let d = Dir::new("snap");
    let img = d.p("d.qcow2");
    create("qcow2", &img, "70M");
    io("qcow2", &img, "write -P 0x11 0 100k");
    io("qcow2", &img, "write -P 0x22 5M 64k");
    io("qcow2", &img, "write -z 5M 4k");
    io("qcow2", &img, "write -P 0x33 69M 1M");
    run("qemu-img", &["snapshot", "-c", "s,1", &img]);
    let want = qemu_bytes(&d, &img, "qcow2", Some("s,1"));
    io("qcow2", &img, "write -P 0x44 0 2M");
    run("qemu-img", &["snapshot", "-c", "later", &img]);
    let snap = Chain::open_file(Path::new(&img), "qcow2", Some("s,1")).unwrap();
    same(&snap, &want);
    assert_eq!(snap.seek_data(0).unwrap(), Some(0));
    assert_eq!(snap.seek_hole(0).unwrap(), Some(128 << 10));
    assert_eq!(snap.seek_data(128 << 10).unwrap(), Some(5 << 20));
    assert_eq!(snap.seek_data(6 << 20).unwrap(), Some(69 << 20));
    assert_eq!(snap.seek_hole(69 << 20).unwrap(), Some(70 << 20));
    assert_eq!(snap.seek_data(70 << 20).unwrap(), None);
    assert_eq!(snap.seek_hole(70 << 20).unwrap(), None);
    let later = Chain::open_file(Path::new(&img), "qcow2", Some("later")).unwrap();
    same(&later, &qemu_bytes(&d, &img, "qcow2", Some("later")));
    let e = Chain::open_file(Path::new(&img), "qcow2", Some("nope"))
        .err()
        .unwrap();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
}

#[test]
fn reads_a_chain_over_a_shorter_raw_base_like_qemu() {
    let d = Dir::new("chain");
    // raw base (8M) <- qcow2 mid (10M, a zero cluster over data) <- qcow2
    // top (12M, snapshot inside).
    create("raw", &d.p("base.raw"), "8M");
    io("raw", &d.p("base.raw"), "write -P 0x11 0 3M");
    io("raw", &d.p("base.raw"), "write -P 0x12 7M 1M");
    overlay(&d.p("mid.qcow2"), "base.raw", "raw", Some("10M"), &[]);
    io("qcow2", &d.p("mid.qcow2"), "write -P 0x22 1M 512k");
    io("qcow2", &d.p("mid.qcow2"), "write -z 2M 64k");
    io("qcow2", &d.p("mid.qcow2"), "write -P 0x23 9M 64k");
    overlay(
        &d.p("top.qcow2"),
        &d.p("mid.qcow2"),
        "qcow2",
        Some("12M"),
        &[],
    );
    io("qcow2", &d.p("top.qcow2"), "write -P 0x33 1536k 100k");
    io("qcow2", &d.p("top.qcow2"), "write -P 0x34 11M 4k");
    let want = qemu_bytes(&d, &d.p("top.qcow2"), "qcow2", None);
    let view = Chain::open_file(Path::new(&d.p("top.qcow2")), "qcow2", None).unwrap();
    assert_eq!(view.depth(), 3);
    same(&view, &want);
    // The raw base counts as data; past it, holes.
    assert_eq!(view.seek_hole(0).unwrap(), Some(2 << 20));
    assert_eq!(view.seek_data(8 << 20).unwrap(), Some(9 << 20));
    assert_eq!(view.seek_data(10 << 20).unwrap(), Some(11 << 20));
    // An internal snapshot of the top reads through the same chain.
    run("qemu-img", &["snapshot", "-c", "t", &d.p("top.qcow2")]);
    io("qcow2", &d.p("top.qcow2"), "write -P 0x35 0 4M");
    let snap = Chain::open_file(Path::new(&d.p("top.qcow2")), "qcow2", Some("t")).unwrap();
    same(&snap, &want);
    // The raw base alone, as a point image.
    let raw = Chain::open_file(Path::new(&d.p("base.raw")), "raw", None).unwrap();
    same(&raw, &std::fs::read(d.p("base.raw")).unwrap());
    // Its holes (the sparse file's) read as zeros.
    assert_eq!(raw.seek_hole(0).unwrap(), Some(3 << 20));
    assert_eq!(raw.seek_data(3 << 20).unwrap(), Some(7 << 20));
    assert_eq!(raw.allocated_bytes().unwrap(), 4 << 20);
}

#[test]
fn reads_compressed_clusters_like_qemu() {
    let d = Dir::new("compressed");
    // Patterns, holes, and incompressible bytes (stored plain by QEMU).
    let src = d.p("src.raw");
    let mut bytes = vec![0u8; 20 << 20];
    bytes[..3 << 20].fill(0x41);
    bytes[5 << 20..(5 << 20) + 100_000].fill(0x42);
    bytes[19 << 20..].fill(0x43);
    for (i, b) in bytes[8 << 20..9 << 20].iter_mut().enumerate() {
        *b = ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    std::fs::write(&src, &bytes).unwrap();
    for (name, opts) in [
        ("zlib", "compression_type=zlib"),
        ("zstd", "compression_type=zstd"),
        ("small", "compression_type=zstd,cluster_size=4k"),
        ("big", "compression_type=zlib,cluster_size=2M"),
    ] {
        let img = d.p(&format!("{name}.qcow2"));
        run(
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", "-o", opts, &src, &img],
        );
        io("qcow2", &img, "write -P 0x44 6M 64k");
        let want = qemu_bytes(&d, &img, "qcow2", None);
        let view = Chain::open_file(Path::new(&img), "qcow2", None).unwrap();
        same(&view, &want);
        assert_eq!(view.seek_data(0).unwrap(), Some(0));
        assert!(view.allocated_bytes().unwrap() >= 3 << 20);
        // Under an overlay, and at an internal snapshot.
        let top = d.p(&format!("{name}-top.qcow2"));
        overlay(&top, &img, "qcow2", None, &[]);
        io("qcow2", &top, "write -P 0x45 1M 8k");
        run("qemu-img", &["snapshot", "-c", "s", &top]);
        io("qcow2", &top, "write -P 0x46 0 20M");
        let want = qemu_bytes(&d, &top, "qcow2", Some("s"));
        same(
            &Chain::open_file(Path::new(&top), "qcow2", Some("s")).unwrap(),
            &want,
        );
    }
}

#[test]
fn reads_subclusters_like_qemu() {
    let d = Dir::new("subclusters");
    create("raw", &d.p("base.raw"), "4M");
    io("raw", &d.p("base.raw"), "write -P 0x51 0 4M");
    let img = d.p("ext.qcow2");
    overlay(
        &img,
        &d.p("base.raw"),
        "raw",
        Some("6M"),
        &["-o", "extended_l2=on,cluster_size=128k"],
    );
    io("qcow2", &img, "write -P 0x52 4k 4k");
    io("qcow2", &img, "write -P 0x53 12k 8k");
    io("qcow2", &img, "write -z 64k 8k");
    io("qcow2", &img, "write -P 0x54 1M 3k");
    io("qcow2", &img, "write -z 2M 128k");
    io("qcow2", &img, "write -P 0x55 5M 4k");
    run("qemu-img", &["snapshot", "-c", "s", &img]);
    let want = qemu_bytes(&d, &img, "qcow2", Some("s"));
    io("qcow2", &img, "write -P 0x56 0 6M");
    let view = Chain::open_file(Path::new(&img), "qcow2", Some("s")).unwrap();
    same(&view, &want);
    // Zero subclusters are holes; the raw base below is data.
    assert_eq!(view.seek_hole(0).unwrap(), Some(64 << 10));
    assert_eq!(view.seek_data(64 << 10).unwrap(), Some(72 << 10));
    assert_eq!(view.seek_hole(72 << 10).unwrap(), Some(2 << 20));
    assert_eq!(
        view.seek_data(2 << 20).unwrap(),
        Some((2 << 20) + (128 << 10))
    );
    assert_eq!(view.seek_data(4 << 20).unwrap(), Some(5 << 20));
}

#[test]
fn refuses_what_it_must_not_read() {
    let d = Dir::new("refuse");
    create("raw", &d.p("base.raw"), "1M");
    // A backing file without a recorded format (its extension renamed
    // to one QEMU ignores): never probed.
    let nofmt = d.p("nofmt.qcow2");
    overlay(&nofmt, &d.p("base.raw"), "raw", Some("1M"), &[]);
    let mut b = std::fs::read(&nofmt).unwrap();
    let at = b
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    b[at..at + 4].copy_from_slice(&[0, 0, 0, 0x42]);
    std::fs::write(&nofmt, &b).unwrap();
    let e = Chain::open_file(Path::new(&nofmt), "qcow2", None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("without a backing format"), "{e}");
    // A protocol and a json: name.
    for name in ["nbd:localhost:10809", "json:{\"driver\":\"raw\"}"] {
        let img = d.p("proto.qcow2");
        let _ = std::fs::remove_file(&img);
        overlay(&img, name, "raw", Some("1M"), &["-u"]);
        let e = Chain::open_file(Path::new(&img), "qcow2", None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("refused"), "{e}");
    }
    // A symlink as a backing file, and a loop.
    std::os::unix::fs::symlink(d.p("base.raw"), d.p("link.raw")).unwrap();
    overlay(
        &d.p("sym.qcow2"),
        &d.p("link.raw"),
        "raw",
        Some("1M"),
        &["-u"],
    );
    assert!(Chain::open_file(Path::new(&d.p("sym.qcow2")), "qcow2", None).is_err());
    let (la, lb) = (d.p("loop-a.qcow2"), d.p("loop.qcow2"));
    create("qcow2", &la, "1M");
    overlay(&lb, &la, "qcow2", Some("1M"), &[]);
    run(
        "qemu-img",
        &["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", &lb, &la],
    );
    let e = Chain::open_file(Path::new(&d.p("loop.qcow2")), "qcow2", None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("loops"), "{e}");
    // The wrong format for a file: never guessed.
    assert!(Chain::open_file(Path::new(&d.p("base.raw")), "qcow2", None).is_err());
    assert!(Chain::open_file(Path::new(&d.p("base.raw")), "vmdk", None).is_err());
    // Encrypted images: vmsnapfs holds no key.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pw",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            &d.p("enc.qcow2"),
            "1M",
        ],
    );
    let e = Chain::open_file(Path::new(&d.p("enc.qcow2")), "qcow2", None)
        .err()
        .unwrap();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
    assert_eq!(
        virtual_size(Path::new(&d.p("base.raw")), "raw").unwrap(),
        1 << 20
    );
    assert_eq!(
        virtual_size(Path::new(&d.p("nofmt.qcow2")), "qcow2").unwrap(),
        1 << 20
    );
}
