"""Shared pytest setup: the ``qemu`` marker policy and the golden stream corpus.

* A test that uses the ``qemu_corpus`` fixture is marked ``qemu``.
* ``qemu`` tests are skipped, with the reason, only when QEMU is missing and
  the environment variable ``CI`` is not set; in CI a missing QEMU fails
  them instead, so a broken runner cannot pass silently.
* ``qemu5``, ``qemu10`` and ``qemu11`` tests (QEMU 5.2, 10.0 and 11.1 in the
  chroots of ``scripts/ensure-qemu-release.sh RELEASE``) follow the same
  policy, each for its own chroot.
"""

from __future__ import annotations

import os
import shutil

import pytest
from qemu_corpus import qemu_corpus  # noqa: F401  (the session fixture)

_QEMU_MISSING = (
    "{name} not found: install Debian's qemu-system-x86 (scripts/ensure-qemu.sh) "
    "or point VMFERRY_QEMU at a qemu-system-x86_64"
)


def _qemu_name() -> str:
    return os.environ.get("VMFERRY_QEMU") or "qemu-system-x86_64"


def _qemu_present() -> bool:
    return shutil.which(_qemu_name()) is not None


#: marker -> the QEMU release (a chroot of scripts/ensure-qemu-release.sh) its tests need
RELEASE_MARKERS = {"qemu5": "5.2", "qemu10": "10.0", "qemu11": "11.1"}


def _release_missing(release: str) -> str | None:
    from vmferry.live.qemu.process import QemuError, release_root

    try:
        release_root(release)
    except QemuError as exc:
        return str(exc)
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "qemu_corpus" in getattr(item, "fixturenames", ()) and item.get_closest_marker("qemu") is None:
            item.add_marker(pytest.mark.qemu)
    if _in_ci():
        return
    for marker, release in RELEASE_MARKERS.items():
        missing = _release_missing(release)
        if missing is None:
            continue
        skip_release = pytest.mark.skip(reason=missing + " (CI unset, so skipping)")
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip_release)
    if _qemu_present():
        return
    skip = pytest.mark.skip(reason=_QEMU_MISSING.format(name=_qemu_name()) + " (CI unset, so skipping)")
    for item in items:
        if item.get_closest_marker("qemu") is not None:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("qemu") is not None and _in_ci() and not _qemu_present():
        pytest.fail("CI is set and " + _QEMU_MISSING.format(name=_qemu_name()), pytrace=False)
    if not _in_ci():
        return
    for marker, release in RELEASE_MARKERS.items():
        if item.get_closest_marker(marker) is not None:
            missing = _release_missing(release)
            if missing is not None:
                pytest.fail("CI is set and " + missing, pytrace=False)
