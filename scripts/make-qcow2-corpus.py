#!/usr/bin/env python3
"""Writes the seed corpus of the qcow2 fuzz target to tests/corpus/qcow2/:
small images made by qemu-img and qemu-io (ok-*.qcow2, which must read),
and copies broken on purpose (bad-*.qcow2, which must be refused).
Run from the crate's root; needs qemu-img and qemu-io."""

import os
import struct
import subprocess
import tempfile

OUT = "tests/corpus/qcow2"


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def make(name, size, opts, writes, snapshot=None, later=()):
    with tempfile.TemporaryDirectory() as d:
        img = os.path.join(d, "x.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, size)
        for w in writes:
            run("qemu-io", "-f", "qcow2", "-c", w, img)
        if snapshot:
            run("qemu-img", "snapshot", "-c", snapshot, img)
        for w in later:
            run("qemu-io", "-f", "qcow2", "-c", w, img)
        data = open(img, "rb").read()
    open(os.path.join(OUT, name), "wb").write(data)
    return bytearray(data)


def compressed(name, opts):
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "x.raw")
        body = bytearray(64 << 10)
        body[0:20000] = b"vmsnapfs " * 2222 + b"vm"
        body[40000:40100] = bytes(range(100))
        open(raw, "wb").write(body)
        img = os.path.join(d, "x.qcow2")
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, img)
        data = open(img, "rb").read()
    open(os.path.join(OUT, name), "wb").write(data)
    return bytearray(data)


def be64(b, at):
    return struct.unpack(">Q", b[at : at + 8])[0]


def save(name, b):
    open(os.path.join(OUT, name), "wb").write(bytes(b))


def main():
    os.makedirs(OUT, exist_ok=True)
    small = "cluster_size=512"
    v2 = make("ok-v2.qcow2", "64k", small + ",compat=0.10", ["write -P 0x11 0 1k", "write -P 0x22 30k 700"])
    v3 = make(
        "ok-v3-data-zero.qcow2",
        "64k",
        small,
        ["write -P 0x33 0 2k", "write -z 1k 512", "write -P 0x44 63k 1k"],
    )
    make("ok-snapshot.qcow2", "32k", small, ["write -P 0x55 0 4k"], "s", ["write -P 0x66 0 8k"])
    make(
        "ok-subclusters.qcow2",
        "64k",
        "cluster_size=16k,extended_l2=on",
        ["write -P 0x77 1k 1k", "write -z 4k 2k", "write -P 0x78 20k 512"],
    )
    z = compressed("ok-deflate.qcow2", "cluster_size=4k,compression_type=zlib")
    compressed("ok-zstd.qcow2", "cluster_size=4k,compression_type=zstd")
    make("ok-empty.qcow2", "1M", small, [])

    save("bad-empty.qcow2", b"")
    save("bad-magic-only.qcow2", b"QFI\xfb")
    save("bad-truncated.qcow2", v3[: len(v3) // 2])
    b = bytearray(v3)
    b[20:24] = struct.pack(">I", 30)  # cluster bits
    save("bad-cluster-bits.qcow2", b)
    b = bytearray(v3)
    b[32:36] = struct.pack(">I", 1)  # AES encryption
    save("bad-encrypted.qcow2", b)
    b = bytearray(v3)
    b[72:80] = struct.pack(">Q", 1 << 5)  # unknown incompatible feature
    save("bad-unknown-feature.qcow2", b)
    b = bytearray(v3)
    b[72:80] = struct.pack(">Q", 1 << 1)  # marked corrupt
    save("bad-corrupt.qcow2", b)
    b = bytearray(v3)
    b[36:40] = struct.pack(">I", 0)  # L1 does not cover the disk
    save("bad-l1-short.qcow2", b)
    b = bytearray(v3)
    b[24:32] = struct.pack(">Q", 1 << 60)  # a huge disk
    save("bad-huge-size.qcow2", b)
    l1 = be64(v3, 40)
    b = bytearray(v3)
    b[l1 : l1 + 8] = struct.pack(">Q", (1 << 63) | (1 << 40))  # L2 past the end
    save("bad-l2-outside.qcow2", b)
    l2 = be64(v3, l1) & 0x00FFFFFFFFFFFE00
    b = bytearray(v3)
    b[l2 : l2 + 8] = struct.pack(">Q", (1 << 63) | (1 << 44))  # data past the end
    save("bad-data-outside.qcow2", b)
    # A compressed cluster whose bytes are garbage.
    l1 = be64(z, 40)
    l2 = be64(z, l1) & 0x00FFFFFFFFFFFE00
    e = be64(z, l2)
    assert e & (1 << 62), "first cluster compressed"
    off = e & ((1 << (62 - 4)) - 1)
    b = bytearray(z)
    b[off : off + 64] = b"\xff" * 64
    save("bad-compressed-garbage.qcow2", b)
    # 4 KiB clusters: tables and data at 512-byte steps are unaligned.
    b = bytearray(z)
    b[l1 : l1 + 8] = struct.pack(">Q", (1 << 63) | (l2 + 0x200))
    save("bad-l2-unaligned.qcow2", b)
    b = bytearray(z)
    b[l2 : l2 + 8] = struct.pack(">Q", (1 << 63) | 0x1200)
    save("bad-data-unaligned.qcow2", b)
    # A backing file: no file system behind the fuzz entry point.
    b = bytearray(v2)
    name = b"/etc/shadow"
    b[8:16] = struct.pack(">Q", 200)
    b[16:20] = struct.pack(">I", len(name))
    b[200 : 200 + len(name)] = name
    save("bad-backing-file.qcow2", b)
    # Snapshot table entry with an impossible extra data size.
    s = bytearray(open(os.path.join(OUT, "ok-snapshot.qcow2"), "rb").read())
    t = be64(s, 64)
    s[t + 36 : t + 40] = struct.pack(">I", 1 << 20)
    save("bad-snapshot-extra.qcow2", s)
    # A subcluster both allocated and zero.
    x = bytearray(open(os.path.join(OUT, "ok-subclusters.qcow2"), "rb").read())
    l1 = be64(x, 40)
    l2 = be64(x, l1) & 0x00FFFFFFFFFFFE00
    bitmap = be64(x, l2 + 8)
    x[l2 + 8 : l2 + 16] = struct.pack(">Q", bitmap | ((bitmap & 0xFFFFFFFF) << 32))
    save("bad-subcluster-bitmap.qcow2", x)


if __name__ == "__main__":
    main()
