#!/usr/bin/env bash
# Builds the small Linux guest of the real-guest tests into OUT (an empty
# directory; the caller renames it into place when this succeeds):
#   OUT/vmlinuz         bookworm's kernel (the one linux-image-amd64 depends on)
#   OUT/initramfs.gz    busybox-static, the virtio/ext4/vfat modules, qemu-ga
#                       (bookworm's package) with the libraries and the
#                       dynamic loader it needs, and /init (below)
#   OUT/vda.qcow2       128 MiB ext4 (4 KiB blocks, as a real root fs) with
#                       a 32 MiB journal
#   OUT/vdb.qcow2       16 MiB vfat
#   OUT/kernel-version  e.g. 6.1.0-57-amd64
# Only Debian packages are downloaded (apt-get download, dpkg-deb -x).
#
# The guest's /init mounts /dev/vda (ext4) on /mnt and /dev/vdb (vfat) on
# /fat, starts qemu-ga on the virtio-serial port named
# org.qemu.guest_agent.0, makes /mnt/tree once (files of several owners and
# modes, a symlink, set times), prints "TREE ready", then loops:
#   N = N + 1 (from the highest /mnt/data/fN found: a rebooted guest goes on)
#   /mnt/data/fN = body(N) + "md5 <md5 of body(N)>\n"; every 10th N also
#   /fat/fN; fsync of the file and its directory (`sync FILE...`); prints
#   "WROTE N" on ttyS0; sleeps 0.1 s.
# The kernel never writes dirty metadata back by itself (no periodic
# writeback): what fsync made durable is in the ext4 journal, and in place
# only after a checkpoint (a full journal, a freeze, an unmount) or a
# whole-system `sync`. A disk of the guest killed mid-write is then
# crash-consistent with a journal that matters.
# body(N) is the line "file N abcdefghijklmnopqrstuvwxyz0123456789\n"
# repeated, cut at SIZE = 1000 + (N*7919) % 20000 bytes.
set -euo pipefail
OUT=$1
mkdir -p "$OUT"
W=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$W"' EXIT
cd "$W"

# The kernel image package that bookworm's linux-image-amd64 depends on,
# and the packages, downloaded; once more after `apt-get update` when the
# package lists are missing or name versions the archive dropped.
fetch() {
    local deps
    deps=$(apt-cache depends linux-image-amd64 2>/dev/null) || return 1
    KPKG=$(awk '/Depends: linux-image-[0-9]/ {print $2; exit}' <<<"$deps")
    [ -n "$KPKG" ] || return 1
    apt-get download -qq "$KPKG" busybox-static qemu-guest-agent 2>/dev/null
}
if ! fetch; then
    rm -f ./*.deb
    apt-get update -qq
    fetch || { echo "build-guest: cannot download the guest's packages" >&2; exit 1; }
fi
KVER=${KPKG#linux-image-}
mkdir kx bx qx
dpkg-deb -x linux-image-*.deb kx
dpkg-deb -x busybox-static_*.deb bx
dpkg-deb -x qemu-guest-agent_*.deb qx
depmod -b kx "$KVER"

R=$W/root
mkdir -p "$R"/{bin,sbin,dev,proc,sys,mnt,fat,tmp,run,lib/modules,usr/sbin}
cp bx/bin/busybox "$R/bin/busybox"
ln -s busybox "$R/bin/sh"

# Modules with their dependencies, in load order (built-in ones are skipped).
ORDER=""
for m in virtio_pci virtio_blk virtio_console crc32c_generic ext4 vfat nls_cp437 nls_ascii nls_utf8; do
    show=$(modprobe -d kx -S "$KVER" --show-depends "$m")
    for f in $(awk '$1 == "insmod" {print $2}' <<<"$show"); do
        b=$(basename "$f")
        b=${b%%.ko*}
        case " $ORDER " in *" $b "*) continue ;; esac
        ORDER="$ORDER $b"
        case $f in
        *.ko.xz) xz -dc "$f" >"$R/lib/modules/$b.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$R/lib/modules/$b.ko" ;;
        *) cp "$f" "$R/lib/modules/$b.ko" ;;
        esac
    done
done

# qemu-ga and every shared library it loads, at the paths ldd names.
cp qx/usr/sbin/qemu-ga "$R/usr/sbin/qemu-ga"
libs=$(ldd qx/usr/sbin/qemu-ga)
if grep 'not found' <<<"$libs" >&2; then
    echo "build-guest: qemu-ga needs libraries this host lacks (above)" >&2
    exit 1
fi
for lib in $(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$libs"); do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
done

cat >"$R/init" <<EOF
#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs
for m in $ORDER; do insmod /lib/modules/\$m.ko 2>/dev/null; done
i=0; while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do sleep 0.1; i=\$((i+1)); [ \$i -gt 300 ] && break; done
if ! mount -t ext4 /dev/vda /mnt; then echo "GUEST-ERROR mount vda failed"; exec sh; fi
if ! mount -t vfat /dev/vdb /fat; then echo "GUEST-ERROR mount vdb failed"; exec sh; fi

# The agent, on the port QEMU named org.qemu.guest_agent.0.
port=""; i=0
while [ -z "\$port" ] && [ \$i -lt 300 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "\$(cat \$p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=\${p##*/}
  done
  [ -z "\$port" ] && { sleep 0.1; i=\$((i+1)); }
done
if [ -n "\$port" ] && [ -c /dev/\$port ]; then
  qemu-ga -m virtio-serial -p /dev/\$port -f /run/qemu-ga.pid -t /run >/tmp/qemu-ga.log 2>&1 &
  echo "AGENT on \$port"
else
  echo "GUEST-ERROR no agent port"
fi

# Files of several owners and modes, made once.
if [ ! -e /mnt/tree/.done ]; then
  T=/mnt/tree
  mkdir -p \$T/etc \$T/home/alice/bin \$T/srv/www
  echo "root:x:0:0:root:/root:/bin/sh" > \$T/etc/passwd
  echo "root:*:19000:0:99999:7:::" > \$T/etc/shadow
  chown 0:42 \$T/etc/shadow; chmod 0640 \$T/etc/shadow
  echo "alice's notes" > \$T/home/alice/notes.txt
  printf '#!/bin/sh\necho hi\n' > \$T/home/alice/bin/run.sh
  ln -s ../notes.txt \$T/home/alice/bin/notes
  chown -R 1000:1000 \$T/home/alice
  chown -h 1000:1000 \$T/home/alice/bin/notes
  chmod 0700 \$T/home/alice; chmod 0664 \$T/home/alice/notes.txt
  chown 0:0 \$T/home/alice/bin/run.sh; chmod 4755 \$T/home/alice/bin/run.sh
  echo "<p>hello</p>" > \$T/srv/www/index.html
  chown -R 33:33 \$T/srv/www; chmod 2775 \$T/srv/www; chmod 0444 \$T/srv/www/index.html
  touch -d '2021-02-03 04:05:06' \$T/etc/passwd
  touch -d '2015-05-05 05:05:05' \$T/etc \$T/home/alice/bin
  sync; touch \$T/.done; sync
fi
echo "TREE ready"

mkdir -p /mnt/data
sync
N=\$(ls /mnt/data | sed -n 's/^f\([0-9][0-9]*\)\$/\1/p' | sort -n | tail -1)
[ -z "\$N" ] && N=0
echo "BOOT resume-after \$N"
while true; do
  N=\$((N+1))
  S=\$((1000 + (N*7919) % 20000))
  yes "file \$N abcdefghijklmnopqrstuvwxyz0123456789" | head -c \$S > /tmp/body
  M=\$(md5sum /tmp/body | cut -d' ' -f1)
  { cat /tmp/body; echo "md5 \$M"; } > /mnt/data/f\$N
  sync /mnt/data/f\$N /mnt/data
  if [ \$((N % 10)) -eq 0 ]; then cp /mnt/data/f\$N /fat/f\$N; sync /fat/f\$N /fat; fi
  echo "WROTE \$N"
  sleep 0.1
done
EOF
chmod 755 "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -6) >"$OUT/initramfs.gz"
cp "kx/boot/vmlinuz-$KVER" "$OUT/vmlinuz"

# The disks: ext4 the way an installer makes a root filesystem, and vfat.
truncate -s 128M "$W/vda.raw"
mkfs.ext4 -q -F -T default -J size=32 -L guestroot "$W/vda.raw"
qemu-img convert -f raw -O qcow2 "$W/vda.raw" "$OUT/vda.qcow2"
truncate -s 16M "$W/vdb.raw"
mkfs.vfat -n GUESTFAT "$W/vdb.raw" >/dev/null
qemu-img convert -f raw -O qcow2 "$W/vdb.raw" "$OUT/vdb.qcow2"
echo "$KVER" >"$OUT/kernel-version"
