#!/usr/bin/env bash
# Install what the libvirt tests need (tests/test_libvirt_real.py, tests/libvirt_daemon.py) when it is missing:
# Debian's libvirtd and virtlogd (libvirt-daemon, libvirt-daemon-driver-qemu; libvirt 9.0 on bookworm), virsh
# (libvirt-clients), and the compressors libvirt runs for save_image_format (lzop is not installed by default).
# The daemons' configuration is the tests' own: nothing here configures or starts libvirt.
set -euo pipefail
missing=()
command -v libvirtd >/dev/null 2>&1 || [ -x /usr/sbin/libvirtd ] || missing+=(libvirt-daemon)
[ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] \
    || dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1 || missing+=(libvirt-daemon-driver-qemu)
command -v virsh >/dev/null 2>&1 || missing+=(libvirt-clients)
for prog in gzip bzip2 xz lzop; do
    command -v "$prog" >/dev/null 2>&1 || missing+=("$([ "$prog" = xz ] && echo xz-utils || echo "$prog")")
done
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing for the libvirt tests: ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "installing ${missing[*]} with apt ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
