"""Shared pytest setup: the ``qemu`` marker policy and the golden stream corpus.

* A test that uses the ``qemu_corpus`` fixture is marked ``qemu``.
* ``qemu`` tests are skipped, with the reason, only when QEMU is missing and
  the environment variable ``CI`` is not set; in CI a missing QEMU fails
  them instead, so a broken runner cannot pass silently.
* ``qemu10`` tests (QEMU 10.0 in the chroot of scripts/ensure-qemu10.sh)
  follow the same policy.
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


def _qemu10_missing() -> str | None:
    from vmferry.live.qemu.process import QemuError, qemu10_root

    try:
        qemu10_root()
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
    missing10 = _qemu10_missing()
    if missing10 is not None:
        skip10 = pytest.mark.skip(reason=missing10 + " (CI unset, so skipping)")
        for item in items:
            if item.get_closest_marker("qemu10") is not None:
                item.add_marker(skip10)
    if _qemu_present():
        return
    skip = pytest.mark.skip(reason=_QEMU_MISSING.format(name=_qemu_name()) + " (CI unset, so skipping)")
    for item in items:
        if item.get_closest_marker("qemu") is not None:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("qemu") is not None and _in_ci() and not _qemu_present():
        pytest.fail("CI is set and " + _QEMU_MISSING.format(name=_qemu_name()), pytrace=False)
    if item.get_closest_marker("qemu10") is not None and _in_ci():
        missing10 = _qemu10_missing()
        if missing10 is not None:
            pytest.fail("CI is set and " + missing10, pytrace=False)
