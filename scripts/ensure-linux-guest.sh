#!/usr/bin/env bash
# Build, once, the Linux guest of the tests: Debian's cloud kernel and a busybox initramfs whose
# /init counts on the serial console ("1", "2", ... one number per line, about 20 a second).
#
# ROOT is $VMFERRY_LINUX_GUEST, default /var/cache/vmferry/linux-guest; it ends up holding
# vmlinuz, initrd.img and versions.txt (the two Debian packages it was built from).  Start it with
#   qemu-system-x86_64 -kernel ROOT/vmlinuz -initrd ROOT/initrd.img -append "console=ttyS0 quiet" -serial ...
# The guest is built in ROOT.tmp and renamed when complete; an existing ROOT of the same
# recipe (GUEST_RECIPE below) is left alone.  Needs root only to run apt-get update.
set -euo pipefail

ROOT="${VMFERRY_LINUX_GUEST:-/var/cache/vmferry/linux-guest}"
GUEST_RECIPE=1
KERNEL_PACKAGE=linux-image-cloud-amd64

if [ -f "$ROOT/recipe" ] && [ "$(cat "$ROOT/recipe")" = "$GUEST_RECIPE" ]; then
    exit 0
fi

TMP="$ROOT.tmp"
rm -rf "$TMP"
mkdir -p "$TMP/debs" "$TMP/initramfs"
cd "$TMP/debs"

# The kernel package the metapackage points at, and busybox-static, downloaded (not installed).
fetch() {
    apt-get download -q "$@" >/dev/null 2>&1
}
kernel=$(apt-cache depends "$KERNEL_PACKAGE" 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
if [ -z "$kernel" ] || ! fetch "$kernel" busybox-static; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "cannot download $KERNEL_PACKAGE and busybox-static; as root, run: apt-get update, then $0" >&2
        exit 1
    fi
    apt-get update -q >/dev/null
    kernel=$(apt-cache depends "$KERNEL_PACKAGE" | awk '/Depends: linux-image-/ { print $2; exit }')
    fetch "$kernel" busybox-static
fi

dpkg-deb -x linux-image-*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
cp kernel/boot/vmlinuz-* "$TMP/vmlinuz"
dpkg-deb -f linux-image-*.deb Package Version > "$TMP/versions.txt"
dpkg-deb -f busybox-static_*.deb Package Version >> "$TMP/versions.txt"

cd "$TMP/initramfs"
mkdir -p bin dev proc sys
cp "$TMP/debs/busybox/bin/busybox" bin/busybox
cat > init <<'INIT'
#!/bin/busybox sh
# vmferry's Linux test guest: count on the serial console for ever.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
n=0
while :; do
    n=$((n + 1))
    echo "$n"
    usleep 50000
done > /dev/ttyS0 2>&1
INIT
chmod 755 init bin/busybox

# The initramfs: a gzip'd cpio archive in the kernel's "newc" format, written by Python (no cpio package).
python3 - "$TMP/initramfs" "$TMP/initrd.img" <<'PY'
import gzip, os, stat, sys

root, out = sys.argv[1], sys.argv[2]
entries = []
for dirpath, dirnames, filenames in os.walk(root):
    entries += [os.path.relpath(os.path.join(dirpath, n), root) for n in dirnames + filenames]
entries.sort()


def header(ino, mode, size, name, nlink=1):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0]
    return ("070701" + "".join(f"{f:08x}" for f in fields)).encode()


def pad(n):
    return b"\0" * (-n % 4)


with gzip.open(out, "wb", compresslevel=6) as f:
    for ino, rel in enumerate(entries, 1):
        path = os.path.join(root, rel)
        st = os.lstat(path)
        data = b"" if stat.S_ISDIR(st.st_mode) else open(path, "rb").read()
        head = header(ino, st.st_mode, len(data), rel, 2 if stat.S_ISDIR(st.st_mode) else 1)
        f.write(head + rel.encode() + b"\0" + pad(len(head) + len(rel) + 1) + data + pad(len(data)))
    trailer = header(0, 0, 0, "TRAILER!!!")
    f.write(trailer + b"TRAILER!!!\0" + pad(len(trailer) + 11))
PY

cd /
rm -rf "$TMP/debs" "$TMP/initramfs"
echo "$GUEST_RECIPE" > "$TMP/recipe"
rm -rf "$ROOT"
mv -T "$TMP" "$ROOT"
echo "built the Linux test guest in $ROOT:" >&2
cat "$ROOT/versions.txt" >&2
