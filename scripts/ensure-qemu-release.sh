#!/usr/bin/env bash
# Build, once, the Debian chroot that holds QEMU RELEASE for the tests
# (vmferry.live.qemu.process runs it as `chroot ROOT qemu-system-x86_64`).
#
#   scripts/ensure-qemu-release.sh RELEASE     RELEASE: 5.2 | 10.0 | 11.1
#
# RELEASE  suite     ROOT (default)                          override
# 5.2      bullseye  /var/cache/vmferry/qemu-5.2-bullseye    $VMFERRY_QEMU5_2_ROOT
# 10.0     trixie    /var/cache/vmferry/qemu-10.0-trixie     $VMFERRY_QEMU10_ROOT
# 11.1     forky     /var/cache/vmferry/qemu-11.1-forky      $VMFERRY_QEMU11_1_ROOT
#
# The chroot is built in ROOT.tmp and renamed to ROOT only when complete, so
# a half-built one is never used; an existing ROOT is left alone.  The
# Debian mirror is the one this machine's apt uses (default deb.debian.org).
# debootstrap checks the suite's Release signature with Debian's archive
# keyring (bookworm's debian-archive-keyring holds the bullseye, bookworm and
# trixie keys that sign all three suites).  Suites newer than the installed
# debootstrap knows (forky on bookworm) use its sid script.
set -euo pipefail

RELEASE="${1:-}"
case "$RELEASE" in
    5.2)  SUITE=bullseye; ROOT="${VMFERRY_QEMU5_2_ROOT:-/var/cache/vmferry/qemu-5.2-bullseye}" ;;
    10.0) SUITE=trixie;   ROOT="${VMFERRY_QEMU10_ROOT:-/var/cache/vmferry/qemu-10.0-trixie}" ;;
    11.1) SUITE=forky;    ROOT="${VMFERRY_QEMU11_1_ROOT:-/var/cache/vmferry/qemu-11.1-forky}" ;;
    *)
        echo "usage: $0 RELEASE    (RELEASE: 5.2, 10.0 or 11.1)" >&2
        exit 2 ;;
esac
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
    echo "QEMU $RELEASE is missing ($ROOT); build it as root with:" >&2
    echo "  sudo $0 $RELEASE" >&2
    exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing debootstrap with apt ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends debootstrap >/dev/null
fi

# debootstrap's script for the suite; one it does not know yet is built like sid.
SCRIPTS=/usr/share/debootstrap/scripts
SCRIPT=()
if [ ! -e "$SCRIPTS/$SUITE" ]; then
    SCRIPT=("$SCRIPTS/sid")
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

echo "building the QEMU $RELEASE chroot ($SUITE from $MIRROR) in $ROOT ..." >&2
debootstrap --variant=minbase --include=qemu-system-x86 "$SUITE" "$TMP" "$MIRROR" "${SCRIPT[@]}" >&2
chroot "$TMP" qemu-system-x86_64 --version >&2
mv -T "$TMP" "$ROOT"
