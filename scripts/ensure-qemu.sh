#!/usr/bin/env bash
# Install Debian's qemu-system-x86 (QEMU 7.2 on bookworm) when qemu-system-x86_64 is missing.
set -euo pipefail
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "qemu-system-x86_64 is missing; install it with: sudo apt-get install -y qemu-system-x86" >&2
    exit 1
fi
echo "installing qemu-system-x86 with apt ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends qemu-system-x86 >/dev/null
