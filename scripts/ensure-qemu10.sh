#!/usr/bin/env bash
# Build, once, the Debian trixie chroot that holds QEMU 10.0 for the tests
# (vmferry.live.qemu.process runs it as `chroot ROOT qemu-system-x86_64`).
#
# ROOT is $VMFERRY_QEMU10_ROOT, default /var/cache/vmferry/qemu-10.0-trixie.
# The chroot is built in ROOT.tmp and renamed to ROOT only when complete, so
# a half-built one is never used; an existing ROOT is left alone.  The
# Debian mirror is the one this machine's apt uses (default deb.debian.org).
set -euo pipefail

ROOT="${VMFERRY_QEMU10_ROOT:-/var/cache/vmferry/qemu-10.0-trixie}"
SUITE=trixie
QEMU_IN_ROOT=usr/bin/qemu-system-x86_64

if [ -x "$ROOT/$QEMU_IN_ROOT" ]; then
    exit 0
fi

# The first Debian archive URI of apt's sources (deb822 .sources files or
# one-line sources.list), security and ports archives excluded.
apt_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        uri=$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f" \
              | grep -v -e security -e ports | head -n 1)
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' "$f" \
              | grep -v -e security -e ports | head -n 1)
        if [ -n "$uri" ]; then echo "$uri"; return; fi
    done
    echo "http://deb.debian.org/debian"
}

MIRROR="${VMFERRY_DEBIAN_MIRROR:-$(apt_mirror)}"

if [ "$(id -u)" -ne 0 ]; then
    echo "QEMU 10.0 is missing ($ROOT); build it as root with:" >&2
    echo "  sudo $0" >&2
    exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing debootstrap with apt ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends debootstrap >/dev/null
fi

TMP="$ROOT.tmp"
# A leftover from an interrupted build: unmount whatever debootstrap left
# mounted in it (deepest first), then remove it without leaving its file system.
if [ -e "$TMP" ]; then
    awk -v p="$TMP/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r \
        | while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system "$TMP"
fi
mkdir -p "$(dirname "$ROOT")"

echo "building the QEMU 10.0 chroot ($SUITE from $MIRROR) in $ROOT ..." >&2
debootstrap --variant=minbase --include=qemu-system-x86 "$SUITE" "$TMP" "$MIRROR" >&2
chroot "$TMP" qemu-system-x86_64 --version >&2
mv -T "$TMP" "$ROOT"
