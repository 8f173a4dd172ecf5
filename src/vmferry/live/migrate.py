"""The management tool: migrate a running machine between two endpoints, each a real QEMU or vmferry's own.

:func:`migrate` does what the seed asks of a management tool:

1. query both sides: ``query-migration-capabilities`` (a side without it,
   such as QEMU, has mask 0) and QEMU's own ``query-migrate-capabilities``;
2. take the intersection: of the vmferry masks, and of QEMU's capability
   lists by name (a capability on at one side only is switched off), limited
   to ``--set-caps`` when given; set it on both sides;
3. start the incoming side (``migrate-incoming``), then the migration;
4. follow ``query-migrate`` (progress: bytes, pages, rate, remainder) until
   it completes, then wait until the destination runs.

Any failure cancels the migration (``migrate_cancel``), makes sure the
source runs again (``cont`` when it ended up stopped and the destination
is not running), and raises :class:`MigrationError` with one clear line.

With ``via_proxy`` the stream goes through vmferry's proxies
(:mod:`vmferry.live.route`): the destination's machine type is read over
QMP (``qom-get /machine type``) and the device state is converted to it in
flight, so a guest moves between machine types that QEMU alone refuses to
mix; only the QEMU capabilities a proxy can carry stay on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .. import caps
from ..caps import Cap
from ..errors import FerryError, TransportError
from ..events import Event
from ..serialize.schema import SchemaSet
from . import proxy
from .qmp.client import QMPCommandError, QMPConnectError, QMPConnection
from .route import ProxyRoute
from .transport import TlsOptions, connect, listen


class MigrationError(FerryError):
    """The migration did not happen; the source keeps running."""


@dataclass
class Side:
    """One endpoint as the tool sees it."""

    role: str
    address: str
    conn: QMPConnection
    kind: str = "qemu"  # "qemu" (no mask commands) or "vmferry"
    mask: Cap = Cap(0)
    supported: Cap = Cap(0)
    qemu: dict[str, bool] = field(default_factory=dict)
    status: str = ""
    version: str = ""
    release: str = ""  # QEMU's major.minor, e.g. "10.0" (empty when unknown)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "status": self.status, "mask": int(self.mask),
                "names": caps.names(self.mask), "supported": int(self.supported),
                "supported-names": caps.names(self.supported), "qemu-capabilities": self.qemu}


def probe(conn: QMPConnection, role: str, address: str) -> Side:
    """Ask one side what it is and what it supports."""
    side = Side(role, address, conn)
    try:
        r = conn.cmd("query-migration-capabilities")
        side.kind = "vmferry"
        side.mask = Cap(int(r.get("mask", 0)))
        side.supported = Cap(int(r.get("supported", side.mask)))
    except QMPCommandError as e:
        if e.error_class != "CommandNotFound":
            raise
    try:
        side.qemu = caps.parse_qemu_list(conn.cmd("query-migrate-capabilities"))
    except QMPCommandError as e:
        if e.error_class != "CommandNotFound":
            raise
    except ValueError as e:
        raise MigrationError(f"{role}: odd query-migrate-capabilities answer: {e}") from None
    try:
        v = conn.cmd("query-version")
        q = v.get("qemu", {})
        side.version = (v.get("package") or "").strip() or f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
        side.release = f"{q.get('major')}.{q.get('minor')}" if "major" in q else ""
        if side.kind == "qemu":
            side.version = f"QEMU {q.get('major')}.{q.get('minor')}.{q.get('micro')}"
    except QMPCommandError:
        pass
    side.status = str(conn.cmd("query-status").get("status", ""))
    return side


@dataclass
class Plan:
    """What the tool sets on both sides."""

    mask: Cap
    qemu: dict[str, bool]
    unused: list[str] = field(default_factory=list)  # requested but not available on both sides

    @property
    def qemu_on(self) -> list[str]:
        return sorted(n for n, on in self.qemu.items() if on)


def make_plan(src: Side, dst: Side, requested: list[str] | None) -> Plan:
    """The intersection of both sides, limited to ``requested`` (None: everything both support)."""
    req_mask, req_qemu = caps.split_requested(requested or [], set(src.qemu) | set(dst.qemu))
    mask = caps.intersect(src.mask, dst.mask)
    if requested is not None:
        mask = caps.restrict(mask, req_mask)
    plan = caps.qemu_plan(src.qemu, dst.qemu, req_qemu)
    if src.kind == "vmferry" and dst.kind == "vmferry":
        plan = {}  # both speak masks: QEMU's names are only mirrors of the bits
    unused = [caps.name(b) for b in caps.bits(req_mask & ~mask)]
    unused += [n for n in req_qemu if not plan.get(n) and caps.from_qemu_name(n) is None]
    return Plan(mask, plan, unused)


def apply_plan(side: Side, plan: Plan) -> None:
    if side.kind == "vmferry":
        r = side.conn.cmd("set-migration-capabilities", {"mask": int(plan.mask)})
        side.mask = Cap(int(r.get("mask", plan.mask)))
        return
    changes: list[dict[str, Any]] = [{"capability": n, "state": want} for n, want in plan.qemu.items()
               if n in side.qemu and side.qemu[n] != want]
    if changes:
        side.conn.cmd("migrate-set-capabilities", {"capabilities": changes})
        for c in changes:
            side.qemu[c["capability"]] = c["state"]


@dataclass
class Result:
    """What a migration did."""

    seconds: float
    transferred: int
    total: int
    downtime_ms: int | None
    mask: int
    qemu_caps: list[str]
    codec: str
    source: dict[str, Any]
    destination: dict[str, Any]
    final: dict[str, Any]
    route: dict[str, Any] | None = None

    @property
    def mb_per_s(self) -> float:
        return self.transferred / self.seconds / 1e6 if self.seconds else 0.0

    def line(self) -> str:
        down = f", downtime {self.downtime_ms} ms" if self.downtime_ms is not None else ""
        codec = f", {self.codec} stream" if self.codec else ""
        used = caps.names(self.mask) + self.qemu_caps
        via = ""
        if self.route is not None:
            r = self.route
            conv = f", {r['from_machine']} -> {r['machine']}" if r.get("machine") else ""
            link = f", link mask {r['link_mask']:#x}" if r["wire"] == "ferry" else ""
            via = f" via proxy ({r['wire']} on the wire{link}{conv})"
        return (f"migrated{via}: {self.transferred / 1e6:.1f} MB in {self.seconds:.2f} s ({self.mb_per_s:.0f} MB/s)"
                f"{down}{codec}; capabilities: {', '.join(used) or 'none (mask 0)'}")

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "transferred": self.transferred, "total": self.total,
                "mb_per_s": round(self.mb_per_s, 1), "downtime_ms": self.downtime_ms, "mask": self.mask,
                "names": caps.names(self.mask), "qemu_capabilities": self.qemu_caps, "codec": self.codec,
                "source": self.source, "destination": self.destination, "route": self.route}


Progress = Callable[[dict[str, Any]], None]


def migrate(source: str, dest: str, uri: str | None = None, set_caps: list[str] | None = None, *,
            progress: Progress | None = None, timeout: float = 600.0, poll: float = 0.1,
            params: dict[str, Any] | None = None, qmp_timeout: float = 30.0, via_proxy: bool = False,
            machine: str | None = "auto", wire: str = "legacy",
            observe: Callable[[Event], None] | None = None, qmp_tls: TlsOptions | None = None,
            qemu_caps: list[str] | None = None, multifd_channels: int | None = None,
            multifd_compression: str | None = None, postcopy: bool = False,
            schema: SchemaSet | None = None) -> Result:
    """Migrate from the endpoint at QMP address ``source`` to the one at ``dest``; see the module doc.

    ``via_proxy`` routes the stream through proxies with ``wire`` between them, converting the device state
    to ``machine`` (``auto``: the destination's machine type); ``observe`` sees every event they carry.

    ``qemu_caps`` are QEMU migration capabilities to switch on at both QEMUs (each must exist at both, and
    through proxies be one they carry); ``multifd_channels``/``multifd_compression`` set multifd (and switch
    it on); ``postcopy`` switches postcopy-ram on and the migration to postcopy once the first pass over RAM
    is done.  ``schema`` describes the source's devices, which a postcopy migration to another machine type
    needs (postcopy sends no vmdesc).
    """
    if not via_proxy and (wire != "legacy" or observe is not None or machine not in (None, "auto")):
        raise MigrationError("--to and --machine need --via-proxy (QEMU alone cannot convert a stream)")
    if via_proxy and uri is not None:
        raise MigrationError("--uri and --via-proxy exclude each other: the proxies choose the sockets")
    tmpdir: str | None = None
    route: ProxyRoute | None = None
    src_conn = _open(source, "source", qmp_timeout, qmp_tls)
    try:
        dst_conn = _open(dest, "destination", qmp_timeout, qmp_tls)
    except BaseException:
        src_conn.close()
        raise
    src = dst = None
    started = False
    try:
        src = probe(src_conn, "source", source)
        dst = _incoming(probe(dst_conn, "destination", dest))
        if src.status in ("inmigrate", "postmigrate", "finish-migrate"):
            raise MigrationError(f"the source is {src.status}: nothing to migrate")
        qemu_wanted = _qemu_wanted(qemu_caps, multifd_channels, multifd_compression, postcopy)
        _check_qemu_caps(qemu_wanted, src, dst, via_proxy)
        try:
            requested = (set_caps or []) + qemu_wanted if set_caps is not None or qemu_wanted else None
            plan = make_plan(src, dst, requested)
        except ValueError as e:
            raise MigrationError(str(e)) from None
        both_params = _multifd_params(src, dst, multifd_channels, multifd_compression)
        if via_proxy:
            tmpdir = tempfile.mkdtemp(prefix="vmferry-mig-")
            route = _route(src, dst, plan, set_caps, machine, wire, tmpdir, observe, schema)
            uri = route.source_uri
            if postcopy and route.machine and schema is None:
                raise MigrationError(f"postcopy to {route.machine} converts the device state inside the postcopy "
                                     "package, which carries no description of it: give --schema (a stream the "
                                     f"source's QEMU wrote under {route.from_machine} with the same devices)")
        for side in (src, dst):
            apply_plan(side, plan)
            if both_params.get(side.role):
                side.conn.cmd("migrate-set-parameters", both_params[side.role])
        _set_params(src, params)
        if uri is None:
            tmpdir = tempfile.mkdtemp(prefix="vmferry-mig-")
            uri = f"unix:{os.path.join(tmpdir, 'stream.sock')}"
        dst_conn.cmd("migrate-incoming", {"uri": route.dest_uri if route else uri})
        started = True
        if route is not None:
            route.start()
        t0 = time.monotonic()
        src_conn.cmd("migrate", {"uri": uri})
        if route is not None and progress is not None:
            progress = _with_channels(progress, route)
        info = _follow(src_conn, dst_conn, progress, timeout, poll, postcopy)
        elapsed = time.monotonic() - t0
        if route is not None:
            route.finish()
        _wait_destination(dst_conn, src.status == "running", timeout=60.0)
        ram = info.get("ram", {})
        vm = info.get("x-vmferry", {})
        return Result(elapsed, int(ram.get("transferred", 0)), int(ram.get("total", 0)), info.get("downtime"),
                      int(plan.mask), plan.qemu_on, vm.get("codec", "legacy" if src.kind == "qemu" else ""),
                      src.describe(), dst.describe(), info, route.describe() if route else None)
    except (FerryError, TimeoutError) as e:
        if route is not None:
            route.abort()
        if started and src is not None:
            if _recover(src_conn, dst_conn, src.status == "running"):
                info = _safe(src_conn, "query-migrate") or {}
                ram = info.get("ram", {})
                return Result(0.0, int(ram.get("transferred", 0)), int(ram.get("total", 0)), info.get("downtime"),
                              0, [], "", src.describe(), dst.describe() if dst else {}, info)
        raise _one_line(e, "migration failed") from None
    finally:
        if route is not None:
            route.abort()
        src_conn.close()
        dst_conn.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def machine_type(conn: QMPConnection) -> str:
    """The machine type a QEMU runs (its QOM type less ``-machine``): ``pc-i440fx-7.2``."""
    try:
        qom = str(conn.cmd("qom-get", {"path": "/machine", "property": "type"}))
    except QMPCommandError as e:
        raise MigrationError(f"{conn.name}: cannot read its machine type ({e}); give --machine") from None
    return qom.removesuffix("-machine")


def _release(machine: str, qemu: str) -> str:
    """``machine`` as run by QEMU ``qemu``: ``MACHINE@QEMU`` when the catalogue has that pair (e.g.
    ``pc-i440fx-7.2@10.0``), else the machine type alone, which names it at its own QEMU version."""
    from ..compat import qemu_registry
    from ..errors import CompatError

    if qemu:
        try:
            return qemu_registry().release(f"{machine}@{qemu}").name
        except CompatError:
            pass
    return machine


#: QEMU capabilities that imply others (QEMU refuses them alone).
_IMPLIES = {"switchover-ack": ("return-path",), "postcopy-preempt": ("postcopy-ram",)}


def _qemu_wanted(qemu_caps: list[str] | None, channels: int | None, compression: str | None,
                 postcopy: bool) -> list[str]:
    wanted = list(qemu_caps or [])
    if (channels is not None or compression is not None) and "multifd" not in wanted:
        wanted.append("multifd")
    if postcopy and "postcopy-ram" not in wanted:
        wanted.append("postcopy-ram")
    for name in list(wanted):
        wanted += [n for n in _IMPLIES.get(name, ()) if n not in wanted]
    return wanted


def _check_qemu_caps(wanted: list[str], src: Side, dst: Side, via_proxy: bool) -> None:
    """Refuse, before anything moves, a capability one side lacks or a proxy cannot carry."""
    for name in wanted:
        for side in (src, dst):
            if name not in side.qemu:
                what = f"QEMU {side.release}" if side.release else side.kind
                raise MigrationError(f"{name}: the {side.role} ({what}) has no such migration capability")
        if via_proxy and name not in proxy.QEMU_CAPABILITIES:
            raise MigrationError(f"{name}: the proxy cannot carry it (it carries "
                                 f"{', '.join(sorted(proxy.QEMU_CAPABILITIES))})")


def _multifd_params(src: Side, dst: Side, channels: int | None, compression: str | None) -> dict[str, dict[str, Any]]:
    """The multifd parameters for each side (by role)."""
    common: dict[str, Any] = {}
    if channels is not None:
        common["multifd-channels"] = channels
    if compression is not None:
        common["multifd-compression"] = compression
    if not common:
        return {}
    out = {"source": dict(common), "destination": dict(common)}
    if _release_tuple(src.release) >= (9, 0) and _release_tuple(dst.release) < (9, 0):
        # A QEMU older than 9.0 reads no zero pages from multifd packets: the source sends them the old way.
        out["source"]["zero-page-detection"] = "legacy"
    return out


def _release_tuple(release: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in release.split("."))
    except ValueError:
        return ()


def _route(src: Side, dst: Side, plan: Plan, requested: list[str] | None, machine: str | None, wire: str,
           workdir: str, observe: Callable[[Event], None] | None, schema: SchemaSet | None = None) -> ProxyRoute:
    """The proxies for this migration; narrows ``plan`` to what a proxy can carry.

    The vmferry bits in ``requested`` (e.g. ``zstd``) are asked of the ferry wire between the proxies.
    """
    from_machine = _release(machine_type(src.conn), src.release) if src.kind == "qemu" else None
    if machine == "auto":
        target = _release(machine_type(dst.conn), dst.release) if dst.kind == "qemu" else None
        machine = target if target != from_machine else None
    if machine and from_machine and dst.kind == "qemu":
        _check_pinned(dst, from_machine, machine)
    for name, on in plan.qemu.items():
        if on and name not in proxy.QEMU_CAPABILITIES:
            plan.qemu[name] = False
    plan.mask = Cap(plan.mask & ~(Cap.RETURN_PATH | Cap.RECEIVER_TRANSFORMS | Cap.DEVICE_VERSIONS))
    link_bits = caps.split_requested(requested, set(src.qemu) | set(dst.qemu))[0] if requested is not None else None
    try:
        return ProxyRoute(workdir, machine, from_machine, wire, link_bits, observe, schema=schema)
    except FerryError as e:
        raise MigrationError(str(e).splitlines()[0]) from None


def _balloons(conn: QMPConnection) -> list[str]:
    """The QOM paths of a QEMU's virtio-balloon-pci devices (and their transitional variants)."""
    paths = []
    for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            children = conn.cmd("qom-list", {"path": parent})
        except QMPCommandError:
            continue
        paths += [f"{parent}/{c['name']}" for c in children
                  if isinstance(c, dict) and str(c.get("type", "")).startswith("child<virtio-balloon-pci")]
    return paths


def _check_pinned(dst: Side, from_machine: str, machine: str) -> None:
    """Refuse, before anything moves, a destination whose balloon lacks a property value the source's machine
    type gave it and no stream edit can stand in for (:mod:`vmferry.compat.machines.pinned`)."""
    from ..compat.machines.pinned import balloon_pins

    pins = balloon_pins(from_machine, machine)
    for path in _balloons(dst.conn) if pins else []:
        for pin in pins:
            try:
                value = bool(dst.conn.cmd("qom-get", {"path": path, "property": pin.name}))
            except QMPCommandError:
                continue
            if value != pin.value:
                raise MigrationError(f"the destination's virtio-balloon ({path}) runs with {pin.name}="
                                     f"{'on' if value else 'off'}; the guest's driver holds the BAR that "
                                     f"{from_machine} sized: start the destination with {pin.qemu_option} "
                                     f"({pin.why})")


def _open(address: str, role: str, timeout: float, tls: TlsOptions | None = None) -> QMPConnection:
    try:
        return QMPConnection(address, timeout=timeout, name=role, tls=tls).connect()
    except QMPConnectError as e:
        raise MigrationError(f"{role}: {e}") from None


def _with_channels(progress: Progress, route: ProxyRoute) -> Progress:
    """``progress`` fed with the first proxy's channels too (``x-vmferry-channels``: kind and bytes of each)."""
    def update(info: dict[str, Any]) -> None:
        channels = [{"kind": c.kind, "bytes_in": c.carried} for c in route.proxies[0].stats.channels]
        progress(dict(info, **{"x-vmferry-channels": channels}))
    return update


def _follow(src: QMPConnection, dst: QMPConnection | None, progress: Progress | None, timeout: float,
            poll: float, postcopy: bool = False) -> dict[str, Any]:
    """Poll the source until the migration completes (MigrationError when it fails or times out), and the
    destination ``dst`` (None: a socket of our own) for its failures; with ``postcopy``, switch to postcopy once
    the first pass over RAM is done (``dirty-sync-count`` 2: the second dirty-bitmap sync comes after it)."""
    deadline = time.monotonic() + timeout
    last_dst_check = 0.0
    switched = False
    while True:
        try:
            info = src.cmd("query-migrate")
        except QMPConnectError as e:
            raise MigrationError(f"lost the source: {e}") from None
        status = info.get("status")
        if postcopy and not switched and status == "active" and \
                int(info.get("ram", {}).get("dirty-sync-count", 0)) >= 2:
            src.cmd("migrate-start-postcopy")
            switched = True
        if progress is not None:
            progress(info)
        if status == "completed":
            return dict(info)
        if status in ("failed", "cancelled"):
            theirs, ours = None, info.get("error-desc")
            if dst is not None:
                time.sleep(0.1)  # let the destination record why, if it knows
                theirs = _dest_error(dst)
            desc = f"{ours} ({theirs})" if theirs == "the destination went away" and ours else \
                theirs or ours or "no reason given"
            raise MigrationError(f"migration {status}: {desc}")
        now = time.monotonic()
        if dst is not None and now - last_dst_check > 0.5:
            last_dst_check = now
            try:
                d = dst.cmd("query-migrate")
            except QMPConnectError:
                raise MigrationError("the destination went away during the migration") from None
            if d.get("status") in ("failed", "cancelled"):
                raise MigrationError(f"the destination failed: {d.get('error-desc') or d.get('status')}")
        if now > deadline:
            raise MigrationError(f"migration not completed within {timeout:.0f} s (status {status!r})")
        time.sleep(poll)


def _dest_error(dst: QMPConnection) -> str | None:
    try:
        d = dst.cmd("query-migrate", timeout=5.0)
    except QMPConnectError:
        return "the destination went away"
    except FerryError:
        return None
    if d and d.get("status") == "failed":
        return f"the destination refused the stream: {d.get('error-desc')}"
    return None


def _wait_destination(dst: QMPConnection, source_was_running: bool, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = dst.cmd("query-status").get("status")
        except QMPConnectError:
            raise MigrationError("the destination exited after the stream was sent (it refused the stream)") from None
        if st == "running":
            return st
        if st in ("paused", "postmigrate") and not source_was_running:
            return st
        if st == "paused" and source_was_running:
            dst.cmd("cont")
            continue
        if st not in ("inmigrate", "paused", "prelaunch", "restore-vm"):
            raise MigrationError(f"the destination ended in state {st!r}")
        d = _safe(dst, "query-migrate") or {}
        if d.get("status") == "failed":
            raise MigrationError(f"the destination refused the stream: {d.get('error-desc')}")
        if time.monotonic() > deadline:
            raise MigrationError(f"the destination did not start within {timeout:.0f} s (state {st!r})")
        time.sleep(0.05)


def _safe(conn: QMPConnection, name: str) -> Any:
    try:
        return conn.cmd(name, timeout=5.0)
    except FerryError:
        return None


def _recover(src: QMPConnection, dst: QMPConnection, source_was_running: bool) -> bool:
    """After a failure: cancel, and leave the source running.  True if the destination runs after all."""
    _cancel(src)
    dst_state = (_safe(dst, "query-status") or {}).get("status")
    if dst_state == "running":
        return True  # the guest lives on at the destination: never run it twice
    _resume(src, source_was_running)
    _safe(dst, "migrate_cancel")
    return False


def _cancel(src: QMPConnection) -> None:
    """Cancel the source's migration and wait (15 s at most) until it has stopped."""
    _safe(src, "migrate_cancel")
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        info = _safe(src, "query-migrate") or {}
        if info.get("status") not in ("active", "setup", "cancelling", "device", "pre-switchover"):
            break
        time.sleep(0.05)


def _resume(src: QMPConnection, was_running: bool) -> None:
    """Run a source that ran before the migration and is stopped now."""
    st = (_safe(src, "query-status") or {}).get("status")
    if was_running and st in ("paused", "postmigrate", "finish-migrate"):
        try:
            src.cmd("cont", timeout=10.0)
        except FerryError:
            pass


def _incoming(dst: Side) -> Side:
    """``dst``, if it waits for a migration."""
    if dst.status != "inmigrate":
        raise MigrationError(f"the destination is {dst.status or 'in an unknown state'}, not waiting for a "
                             "migration (start it with 'vmferry serve --incoming' or QEMU's -incoming defer)")
    return dst


def _set_params(src: Side, params: dict[str, Any] | None) -> None:
    """The caller's ``migrate-set-parameters`` at the source (vmferry's own ``x-vmferry-*`` only at an endpoint)."""
    wanted = {k: v for k, v in (params or {}).items() if src.kind == "vmferry" or not k.startswith("x-vmferry-")}
    if wanted:
        src.conn.cmd("migrate-set-parameters", wanted)


def _one_line(e: BaseException, fallback: str) -> MigrationError:
    """A failure as one line: a FerryError's first line, a timeout as such."""
    message = str(e) if isinstance(e, FerryError) else "timed out"
    return MigrationError(message.splitlines()[0] if message else fallback)


def qemu_qmp_args(path: str, chardev_id: str = "vmferry-mgmt") -> list[str]:
    """QEMU options for an extra QMP monitor on the unix socket ``path``, for the management tool.

    A QEMU chardev socket serves one client at a time: a QEMU that is already
    driven over its own QMP socket needs a second monitor for ``vmferry migrate``.
    """
    safe = path.replace(",", ",,")
    return ["-chardev", f"socket,id={chardev_id},path={safe},server=on,wait=off",
            "-mon", f"chardev={chardev_id},mode=control"]


# ---------------------------------------------------------------------------
# To and from a file: virsh save / restore, QEMU's file: URI
# ---------------------------------------------------------------------------


def _plain(side: Side) -> None:
    """Set what a stream in a file needs: mask 0 (QEMU's own stream) and no QEMU capability that wants a peer."""
    apply_plan(side, Plan(Cap(0), {name: False for name in side.qemu}))


def save(source: str, write: Callable[[Any], Any], *, progress: Progress | None = None, timeout: float = 600.0,
         poll: float = 0.1, params: dict[str, Any] | None = None, qmp_timeout: float = 30.0,
         qmp_tls: TlsOptions | None = None) -> Result:
    """Migrate the guest at QMP ``source`` into ``write`` (called with each chunk): QEMU's own stream, as
    ``virsh save`` and QEMU's ``file:`` URI make it.

    The source migrates to a private unix socket that this function reads, so it works with any QEMU (``file:``
    needs QEMU >= 8.2) and with vmferry endpoints, and the caller decides how the file is written.  Every QEMU
    capability is switched off and a vmferry endpoint is set to mask 0 first: the file holds a plain stream any
    QEMU of that machine type loads.  Once saved, the source is stopped (``postmigrate``; ``cont`` resumes it).
    On any failure or interruption the migration is cancelled and a running source runs on.
    """
    conn = _open(source, "source", qmp_timeout, qmp_tls)
    tmpdir = tempfile.mkdtemp(prefix="vmferry-save-")
    listener = None
    reader: threading.Thread | None = None
    src: Side | None = None
    started = False
    got: dict[str, Any] = {"bytes": 0, "error": None, "done": False}
    try:
        src = probe(conn, "source", source)
        if src.status in ("inmigrate", "postmigrate", "finish-migrate", "shutdown"):
            raise MigrationError(f"the source is {src.status}: nothing to save")
        _plain(src)
        _set_params(src, params)
        uri = f"unix:{os.path.join(tmpdir, 'save.sock')}"
        listener = listen(uri)

        def pump() -> None:
            assert listener is not None
            try:
                with listener.accept(timeout) as stream:
                    for chunk in stream.chunks():
                        write(chunk)
                        got["bytes"] += len(chunk)
                got["done"] = True
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                got["error"] = e

        reader = threading.Thread(target=pump, name="vmferry-save", daemon=True)
        reader.start()
        t0 = time.monotonic()
        conn.cmd("migrate", {"uri": uri})
        started = True
        info = _follow(conn, None, progress, timeout, poll)
        reader.join(timeout)
        if got["error"] is not None:
            raise MigrationError(f"writing the file: {got['error']}")
        if not got["done"]:
            raise MigrationError("the source completed, but its stream did not end")
        elapsed = time.monotonic() - t0
        ram = info.get("ram", {})
        side = src.describe()
        side["status"] = str(conn.cmd("query-status").get("status", ""))
        return Result(elapsed, got["bytes"], int(ram.get("total", 0)), info.get("downtime"), 0, [], "legacy", side,
                      {"kind": "file", "bytes": got["bytes"]}, info)
    except BaseException as e:
        if started and src is not None:
            _cancel(conn)
            _resume(conn, src.status == "running")
        if listener is not None:
            listener.close()
        if reader is not None:
            reader.join(10)
        if isinstance(e, (FerryError, TimeoutError)):
            raise _one_line(e, "save failed") from None
        raise
    finally:
        if listener is not None:
            listener.close()
        conn.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def restore(chunks: Iterable[Any], dest: str, *, size: int | None = None, progress: Progress | None = None,
            timeout: float = 600.0, qmp_timeout: float = 30.0, qmp_tls: TlsOptions | None = None,
            resume: bool = True) -> Result:
    """Load the stream ``chunks`` (QEMU's own stream, e.g. a file :func:`save` wrote) into the destination at
    QMP ``dest``, which waits for it (QEMU's ``-incoming defer``, ``vmferry serve --incoming``), as
    ``virsh restore`` does; then run the guest (``resume``; else leave it paused).

    The destination gets ``migrate-incoming`` on a private unix socket and this function sends the stream
    there.  ``progress`` sees ``{"status", "ram": {"transferred", "total"}}`` with ``size`` as the total.
    """
    conn = _open(dest, "destination", qmp_timeout, qmp_tls)
    tmpdir = tempfile.mkdtemp(prefix="vmferry-restore-")
    sent = 0
    try:
        dst = _incoming(probe(conn, "destination", dest))
        _plain(dst)
        uri = f"unix:{os.path.join(tmpdir, 'restore.sock')}"
        conn.cmd("migrate-incoming", {"uri": uri})
        t0 = time.monotonic()
        last = 0.0
        try:
            with connect(uri, timeout=qmp_timeout) as stream:
                for chunk in chunks:
                    stream.write(chunk)
                    sent += len(chunk)
                    now = time.monotonic()
                    if progress is not None and now - last > 0.1:
                        last = now
                        progress({"status": "active", "ram": {"transferred": sent, "total": size or 0}})
                stream.close_write()
        except TransportError as e:
            theirs = _dest_error(conn)
            raise MigrationError(theirs or f"sending the stream: {e}") from None
        if progress is not None:
            progress({"status": "completed", "ram": {"transferred": sent, "total": size or sent}})
        status = _wait_destination(conn, resume, timeout=timeout)
        elapsed = time.monotonic() - t0
        side = dst.describe()
        side["status"] = status
        return Result(elapsed, sent, size or sent, None, 0, [], "legacy", {"kind": "file", "bytes": sent}, side,
                      _safe(conn, "query-migrate") or {})
    except (FerryError, TimeoutError) as e:
        raise _one_line(e, "restore failed") from None
    finally:
        conn.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def capabilities(address: str, timeout: float = 30.0, qmp_tls: TlsOptions | None = None) -> dict[str, Any]:
    """What one side supports: ``vmferry caps``."""
    conn = _open(address, "endpoint", timeout, qmp_tls)
    try:
        side = probe(conn, "endpoint", address)
    finally:
        conn.close()
    return side.describe()


__all__ = ["MigrationError", "Plan", "Result", "Side", "apply_plan", "capabilities", "machine_type", "make_plan",
           "migrate", "probe", "qemu_qmp_args", "restore", "save"]
