"""The Linux test guest: Debian's cloud kernel and a busybox initramfs that counts on the serial console.

``scripts/ensure-linux-guest.sh`` (``make linux-guest``, a dependency of
``make test``) builds it once into ``$VMFERRY_LINUX_GUEST`` (default
/var/cache/vmferry/linux-guest).  The session fixture :func:`linux_guest`
hands out the QEMU arguments that boot it; like the QEMU markers, it skips
with the reason when the guest is missing and ``CI`` is unset, and fails
when ``CI`` is set.  The guest prints ``1``, ``2``, ... one number a line,
about 20 a second, so :func:`vmferry.live.qemu.guest.parse_counts` and
``QemuVM.wait_for_count`` read it as they read the counting boot sector.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

DEFAULT_ROOT = "/var/cache/vmferry/linux-guest"
#: quiet: the kernel's messages would cut into the numbers on the shared console.
APPEND = "console=ttyS0 quiet loglevel=0"


@dataclass(frozen=True)
class LinuxGuest:
    root: Path

    @property
    def args(self) -> tuple[str, ...]:
        """QEMU arguments that boot the guest (give QemuVM ``memory`` of at least 128M)."""
        return ("-kernel", str(self.root / "vmlinuz"), "-initrd", str(self.root / "initrd.img"), "-append", APPEND)

    @property
    def versions(self) -> str:
        return (self.root / "versions.txt").read_text()


def _root() -> Path:
    return Path(os.environ.get("VMFERRY_LINUX_GUEST") or DEFAULT_ROOT)


@pytest.fixture(scope="session")
def linux_guest() -> LinuxGuest:
    root = _root()
    if not ((root / "vmlinuz").is_file() and (root / "initrd.img").is_file()):
        reason = f"the Linux test guest is missing at {root}: run scripts/ensure-linux-guest.sh (make linux-guest)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("CI is set and " + reason, pytrace=False)
        pytest.skip(reason + " (CI unset, so skipping)")
    return LinuxGuest(root)
