"""Postcopy through the proxy: the device state in the PACKAGED command converted in flight, page requests back.

A counting guest starts migrating under a bandwidth cap that precopy alone
would take long to get through; ``migrate-start-postcopy`` switches it over
and the destination, already running, asks for the pages it touches on the
return path.  The device state comes inside PACKAGED with no vmdesc, so the
proxy reads it with the schemas of a stream saved from a twin of the source
(same QEMU, machine type and devices), converts it to the destination's
machine type, and re-encodes the package with its new length.  Without
those schemas the same machine type still works (the package travels
undecoded) and a machine-type change is refused with one line.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_proxy import _check_continued, sockdir  # noqa: F401  (the fixture)
from test_proxy_channels import ACCELS, _final_status, _vm, _wait_for, _wait_for_bytes

from vmferry.cli.files import load_schema_file
from vmferry.live.proxy import Proxy

pytestmark = pytest.mark.qemu

E1000 = ("-device", "e1000")
CAPS = {"postcopy-ram": True}
MEMORY = "128M"  # enough zero pages above what precopy sent that postcopy's background copy takes seconds
MOVES = [
    ("pc-i440fx-2.12", "7.2", "pc-i440fx-7.2", "7.2", E1000),
    pytest.param("pc-i440fx-10.0", "10.0", "pc-i440fx-7.2", "7.2", (), marks=pytest.mark.qemu10),
]


def _twin_schema(tmp_path: Path, machine: str, qemu: str, args: tuple[str, ...], accel: str = "tcg") -> Any:
    """The schemas of a stream saved from a running twin of the source (as an operator would make one)."""
    with _vm(machine, qemu, args, tmp_path / "twin", accel, paused=False, name="twin") as twin:
        twin.wait_for_count(3, timeout=60)
        twin.save(tmp_path / "twin.mig")
    return load_schema_file(str(tmp_path / "twin.mig"))


def _postcopy(tmp_path: Path, sockdir: Path, a: str, qa: str, b: str, qb: str, args: tuple[str, ...],
              proxy: Proxy, accel: str = "tcg") -> dict[str, Any]:
    dst_sock = sockdir / "dst.sock"
    with _vm(a, qa, args, tmp_path / "src", accel, paused=False, name="source", memory=MEMORY) as src, \
            _vm(b, qb, args, tmp_path / "dst", accel, incoming=True, paused=False, name="destination",
                memory=MEMORY) as dst:
        dst.set_caps(CAPS)
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        proxy.start()
        src.wait_for_count(5, timeout=60)
        src.set_caps(CAPS)
        # precopy alone would take many seconds; postcopy's background copy is as slow, so the running
        # destination asks for the pages its guest touches
        src.set_params({"max-bandwidth": 65536, "max-postcopy-bandwidth": 65536})
        src.migrate(proxy.uri)
        _wait_for_bytes(src, 50_000)
        src.cmd("migrate-start-postcopy")
        _touch_missing_pages(dst)
        status = _final_status(src, timeout=120)
        info = src.query_migrate()
        stats = proxy.join(60)
        assert status == "completed", (info, stats.error)
        assert stats.error is None and stats.done, stats
        _check_continued(src.serial_text(), dst)
    return info


def _touch_missing_pages(dst: Any) -> None:
    """Once the destination runs, read guest pages near the top of its RAM, which the slow background copy
    (from the bottom up, 64 KiB/s: several seconds to get there) has not sent yet: each read faults, and the
    destination asks for the page."""
    _wait_status(dst, "postcopy-active")
    top = int(MEMORY.rstrip("M"))
    for mib in range(top - 4, top):
        dst.cmd("human-monitor-command", **{"command-line": f"xp /1xw {mib << 20:#x}"})


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize(("a", "qa", "b", "qb", "args"), MOVES)
def test_postcopy_converts_the_packaged_device_state(tmp_path: Path, sockdir: Path, a: str, qa: str, b: str,
                                                     qb: str, args: tuple[str, ...], accel: str) -> None:
    schema = _twin_schema(tmp_path, a, qa, args, accel)
    proxy = Proxy(f"unix:{sockdir / 'proxy.sock'}", f"unix:{sockdir / 'dst.sock'}", machine=b, schema=schema,
                  accept_timeout=120)
    info = _postcopy(tmp_path, sockdir, a, qa, b, qb, args, proxy, accel)
    main = proxy.stats.channels[0]
    # PING 1 opens the return path; 2, 3 (inside the package) and 4 come only with the switch to postcopy
    assert main.messages.get("PONG") == 4 and main.messages.get("SHUT") == 1, main.messages
    assert main.messages.get("REQ_PAGES_ID", 0) + main.messages.get("REQ_PAGES", 0) >= 4, main.messages
    print(f"\n{a}@{qa} -> {b}@{qb} in postcopy: {info.get('ram', {}).get('postcopy-requests')} page requests, "
          f"return path {main.messages}")


def test_postcopy_through_two_proxies_with_ferry(tmp_path: Path, sockdir: Path) -> None:
    """The package and the pages cross the ferry wire, the page requests and PONGs come back across it."""
    a, b = "pc-i440fx-2.12", "pc-i440fx-7.2"
    schema = _twin_schema(tmp_path, a, "7.2", E1000)
    near_dst = Proxy("tcp:127.0.0.1:0", f"unix:{sockdir / 'dst.sock'}", machine=b, schema=schema,
                     accept_timeout=120).bind()
    near_src = Proxy(f"unix:{sockdir / 'proxy.sock'}", near_dst.uri, wire="ferry", accept_timeout=120)
    near_dst.start()
    _postcopy(tmp_path, sockdir, a, "7.2", b, "7.2", E1000, near_src)
    for p in (near_src, near_dst):
        assert p.join(30).done
        messages = p.stats.channels[0].messages
        assert messages.get("PONG") == 4 and messages.get("REQ_PAGES_ID", 0) >= 1, messages
    assert near_src.stats.channels[0].messages == near_dst.stats.channels[0].messages  # each relayed by both


def test_postcopy_without_schemas_under_the_same_machine_type(tmp_path: Path, sockdir: Path) -> None:
    proxy = Proxy(f"unix:{sockdir / 'proxy.sock'}", f"unix:{sockdir / 'dst.sock'}", accept_timeout=120)
    _postcopy(tmp_path, sockdir, "pc-i440fx-7.2", "7.2", "pc-i440fx-7.2", "7.2", E1000, proxy)
    assert proxy.stats.channels[0].messages.get("PONG") == 4


def test_postcopy_to_another_machine_type_needs_the_schemas(tmp_path: Path, sockdir: Path) -> None:
    proxy = Proxy(f"unix:{sockdir / 'proxy.sock'}", f"unix:{sockdir / 'dst.sock'}", machine="pc-i440fx-7.2",
                  accept_timeout=120)
    dst_sock = sockdir / "dst.sock"
    with _vm("pc-i440fx-2.12", "7.2", E1000, tmp_path / "src", paused=False, name="source") as src, \
            _vm("pc-i440fx-7.2", "7.2", E1000, tmp_path / "dst", incoming=True, paused=False,
                name="destination") as dst:
        dst.set_caps(CAPS)
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        proxy.start()
        src.wait_for_count(3, timeout=60)
        src.set_caps(CAPS)
        src.set_params({"max-bandwidth": 65536})
        src.migrate(proxy.uri)
        _wait_for_bytes(src, 50_000)
        src.cmd("migrate-start-postcopy")
        stats = proxy.join(60)
        assert stats.error is not None and "--schema" in stats.error and "\n" not in stats.error, stats.error
        time.sleep(0.5)
        # the source stopped its guest for the switch-over and never heard the destination run it: it pauses
        assert src.query_migrate()["status"] in ("postcopy-paused", "failed"), src.query_migrate()["status"]


@pytest.mark.parametrize("schema_needed", [False, True], ids=["same-machine", "2.12->7.2"])
def test_postcopy_recovers_through_a_fresh_proxy(tmp_path: Path, sockdir: Path, schema_needed: bool) -> None:
    """The proxy dies in postcopy: both QEMUs pause (postcopy-paused); migrate-recover on the destination and
    migrate resume=true on the source, through a fresh proxy, finish the migration; the guest counts on."""
    a, b = ("pc-i440fx-2.12", "pc-i440fx-7.2") if schema_needed else ("pc-i440fx-7.2", "pc-i440fx-7.2")
    if schema_needed:
        _twin_schema(tmp_path, a, "7.2", E1000)  # writes tmp_path / "twin.mig" for the proxy's --schema
    dst_sock, again_sock, first_sock = sockdir / "dst.sock", sockdir / "again.sock", sockdir / "proxy.sock"
    command = [sys.executable, "-m", "vmferry.cli", "proxy", "--listen", f"unix:{first_sock}",
               "--forward", f"unix:{dst_sock}", "-q"]
    if schema_needed:
        command += ["--machine", b, "--schema", str(tmp_path / "twin.mig")]
    with _vm(a, "7.2", E1000, tmp_path / "src", paused=False, name="source") as src, \
            _vm(b, "7.2", E1000, tmp_path / "dst", incoming=True, paused=False, name="destination") as dst:
        dst.set_caps(CAPS)
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        first = subprocess.Popen(command)
        try:
            _wait_for(first_sock)
            src.wait_for_count(5, timeout=60)
            src.set_caps(CAPS)
            src.set_params({"max-bandwidth": 65536, "max-postcopy-bandwidth": 32768})
            src.migrate(f"unix:{first_sock}")
            _wait_for_bytes(src, 50_000)
            src.cmd("migrate-start-postcopy")
            _wait_status(src, "postcopy-active")
            _wait_status(dst, "postcopy-active")  # the destination runs the guest
            time.sleep(0.5)
            first.send_signal(signal.SIGKILL)  # the proxy dies in the middle of postcopy
        finally:
            first.wait(30)
        _wait_status(src, "postcopy-paused")
        _wait_status(dst, "postcopy-paused")
        dst.cmd("migrate-recover", uri=f"unix:{again_sock}")
        fresh = Proxy(f"unix:{sockdir / 'proxy2.sock'}", f"unix:{again_sock}", machine=b if schema_needed else None,
                      accept_timeout=60)
        fresh.start()
        src.cmd("migrate", uri=fresh.uri, resume=True)
        status = _final_status(src, timeout=120)
        stats = fresh.join(60)
        assert status == "completed", (src.query_migrate(), stats.error)
        assert stats.error is None and stats.done, stats
        main = stats.channels[0]
        assert main.kind == "main (resumed)"
        assert main.messages.get("RECV_BITMAP", 0) >= 1 and main.messages.get("RESUME_ACK") == 1, main.messages
        _check_continued(src.serial_text(), dst)


def _wait_status(vm: Any, status: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := vm.query_migrate().get("status")) != status:
        assert time.monotonic() < deadline, f"{vm.name}: {now}, waiting for {status}"
        time.sleep(0.05)


@pytest.mark.qemu10
def test_postcopy_preempt_channel_crosses_the_proxy(tmp_path: Path, sockdir: Path) -> None:
    """QEMU 10.0's postcopy-preempt: requested pages come on a channel of their own, which the proxy relays."""
    a, b = "pc-i440fx-9.2", "pc-i440fx-10.0"
    schema = _twin_schema(tmp_path, a, "10.0", E1000)
    proxy = Proxy(f"unix:{sockdir / 'proxy.sock'}", f"unix:{sockdir / 'dst.sock'}", machine=b, schema=schema,
                  accept_timeout=120)
    caps = {"postcopy-ram": True, "postcopy-preempt": True}
    dst_sock = sockdir / "dst.sock"
    with _vm(a, "10.0", E1000, tmp_path / "src", paused=False, name="source") as src, \
            _vm(b, "10.0", E1000, tmp_path / "dst", incoming=True, paused=False, name="destination") as dst:
        dst.set_caps(caps)
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        proxy.start()
        src.wait_for_count(5, timeout=60)
        src.set_caps(caps)
        src.set_params({"max-bandwidth": 65536, "max-postcopy-bandwidth": 65536})
        src.migrate(proxy.uri)
        _wait_for_bytes(src, 50_000)
        src.cmd("migrate-start-postcopy")
        status = _final_status(src, timeout=120)
        stats = proxy.join(60)
        assert status == "completed", (src.query_migrate(), stats.error)
        assert stats.error is None and stats.done, stats
        kinds = [c.kind for c in stats.channels]
        # the preempt channel opens at the switch; it carries pages only when one is asked for urgently
        # enough (here the guest touches few), so it may close without a byte
        assert kinds[0] == "main" and len(kinds) == 2 and kinds[1] in ("preempt", "empty"), kinds
        print(f"\npreempt: channels {[(c.kind, c.pages, c.bytes_in) for c in stats.channels]}, "
              f"return path {stats.channels[0].messages}")
        _check_continued(src.serial_text(), dst)
