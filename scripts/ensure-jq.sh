#!/usr/bin/env bash
# jq >= 1.7 for the test of the jq pipeline of docs/format.md §7 (tests/test_jq_pipeline.py).
#
# jq 1.6 (Debian bookworm's) rounds integers beyond 2^53, and QEMU streams carry
# 64-bit registers, so the pipeline needs 1.7. When the system's jq is older,
# trixie's jq (1.7) is installed into the QEMU 10.0 chroot of ensure-qemu10.sh,
# where the test runs it as `chroot ROOT jq`; the system's jq is installed too.
set -euo pipefail

ROOT="${VMFERRY_QEMU10_ROOT:-/var/cache/vmferry/qemu-10.0-trixie}"

# true when "$@ --version" says jq-1.7 or later
recent() {
    local v
    v=$("$@" --version 2>/dev/null | sed -n 's/^jq-\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p') || return 1
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt 1 ] || { [ "$1" -eq 1 ] && [ "$2" -ge 7 ]; }
}

if recent jq; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "jq >= 1.7 is missing; as root: apt-get install jq (trixie or later), or run $0" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v jq >/dev/null 2>&1; then
    echo "installing jq with apt ..." >&2
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends jq >/dev/null
fi
if recent jq || recent chroot "$ROOT" jq; then
    exit 0
fi
bash "$(dirname "$0")/ensure-qemu10.sh"
echo "installing trixie's jq into $ROOT ..." >&2
chroot "$ROOT" apt-get update -q >/dev/null
chroot "$ROOT" apt-get install -y -q --no-install-recommends jq >/dev/null
recent chroot "$ROOT" jq
