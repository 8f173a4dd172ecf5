#!/usr/bin/env bash
# Kept for old habits: QEMU 10.0's chroot is built by ensure-qemu-release.sh.
exec bash "$(dirname "$0")/ensure-qemu-release.sh" 10.0
