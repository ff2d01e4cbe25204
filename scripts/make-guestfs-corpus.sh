#!/usr/bin/env bash
# Makes the seed images of the `guest_disk` fuzz target and of
# tests/guestfs_corpus.rs in tests/corpus/guestfs/: small disks with ext2,
# ext3, ext4 (one with a journal that needs recovery) and FAT filesystems,
# whole or in GPT and MBR partitions (`ok-*`), and broken ones (`bad-*`).
# Needs mke2fs, debugfs, mkfs.vfat, mtools and sfdisk (scripts/install-deps.sh).
set -euo pipefail
out=$(cd "$(dirname "$0")/.." && pwd)/tests/corpus/guestfs
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
export SOURCE_DATE_EPOCH=1700000000 E2FSPROGS_FAKE_TIME=1700000000
mkdir -p tree/dir/sub
printf 'hello\n' >tree/hello.txt
head -c 70000 /dev/urandom >tree/dir/random.bin
ln -s ../hello.txt tree/dir/link
printf 'deep\n' >tree/dir/sub/deep.txt
chmod 0750 tree/dir
chown -R 1000:1000 tree/dir
touch -d '2021-02-03 04:05:06' tree/hello.txt

ext() { # ext() TYPE FILE SIZE [mke2fs options...]
    local t=$1 f=$2 size=$3
    shift 3
    mke2fs -q -F -t "$t" -b 1024 -N 64 -U clear -E root_owner=0:0,hash_seed=00000000-0000-0000-0000-000000000000 -d tree "$@" "$f" "$size" >/dev/null
}
vfat() { # vfat() FILE SIZE_KIB
    rm -f "$2"
    mkfs.vfat -C -n GUEST -i 12345678 "$1" "$2" >/dev/null
    MTOOLS_SKIP_CHECK=1 mcopy -s -m -i "$1" tree/hello.txt tree/dir ::/
}

ext ext2 ok-ext2.img 400k
ext ext3 ok-ext3.img 3M
ext ext4 ok-ext4.img 3M
vfat ok-vfat.img 512
# ext4 whose journal holds a transaction not yet written in place.
ext ext4 ok-ext4-dirty-journal.img 3M
block=$(debugfs -R 'blocks /hello.txt' ok-ext4-dirty-journal.img 2>/dev/null | tr -d ' \n')
head -c 1024 /dev/zero >blk
printf 'howdy\n' | dd of=blk conv=notrunc status=none
printf 'jo -c\njw -b %s blk\njc\n' "$block" | debugfs -w ok-ext4-dirty-journal.img >/dev/null 2>&1

# Partitioned disks: GPT (ext2 + FAT) and MBR (FAT, ext2 in a logical partition).
ext ext2 p-ext2.img 512k
vfat p-fat.img 512
truncate -s 3M ok-gpt.img
printf 'label: gpt\nstart=2048, size=1024\nstart=3072, size=1024\n' | sfdisk -q ok-gpt.img
dd if=p-ext2.img of=ok-gpt.img bs=512 seek=2048 conv=notrunc status=none
dd if=p-fat.img of=ok-gpt.img bs=512 seek=3072 conv=notrunc status=none
truncate -s 2M ok-mbr.img
printf 'label: dos\nstart=2048, size=1024, type=c\nstart=3072, type=5\nstart=3200, size=800, type=83\n' | sfdisk -q ok-mbr.img
dd if=p-fat.img of=ok-mbr.img bs=512 seek=2048 conv=notrunc status=none
dd if=p-ext2.img of=ok-mbr.img bs=512 seek=3200 count=800 conv=notrunc status=none

# Broken ones.
head -c 2048 ok-ext4.img >bad-ext4-truncated.img
cp ok-ext4.img bad-ext4-superblock.img
printf '\xff\xff\xff\xff' | dd of=bad-ext4-superblock.img bs=1 seek=$((1024 + 24)) conv=notrunc status=none
cp ok-ext2.img bad-ext2-group-table.img
dd if=/dev/urandom of=bad-ext2-group-table.img bs=1024 seek=2 count=1 conv=notrunc status=none
cp ok-vfat.img bad-vfat-bpb.img
printf '\x00\x00' | dd of=bad-vfat-bpb.img bs=1 seek=11 conv=notrunc status=none
cp ok-gpt.img bad-gpt-crc.img
printf 'XXXX' | dd of=bad-gpt-crc.img bs=1 seek=$((512 + 16)) conv=notrunc status=none
dd if=/dev/zero of=bad-gpt-crc.img bs=512 seek=$((6144 - 1)) count=1 conv=notrunc status=none
cp ok-mbr.img bad-mbr-outside.img
printf '\xff\xff\xff\x7f' | dd of=bad-mbr-outside.img bs=1 seek=$((446 + 8)) conv=notrunc status=none
printf '\x00' | dd of=bad-mbr-outside.img bs=1 seek=$((446 + 16 + 4)) conv=notrunc status=none
head -c 65536 /dev/urandom >bad-random.img
truncate -s 1M bad-zeros.img

rm -f "$out"/*.img
cp ok-*.img bad-*.img "$out"/
ls -l "$out"
