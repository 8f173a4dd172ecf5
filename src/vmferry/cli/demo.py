"""``make demo``: vmferry's whole job on a built-in default, with real QEMU 7.2.

1. Boot a tiny guest (a 512-byte boot sector that counts on the serial port)
   under an older machine type, pc-i440fx-2.12 with an e1000 NIC, and a
   destination QEMU under a newer one, pc-i440fx-7.2, waiting for a migration.
2. Show that QEMU alone refuses to mix the two (the source keeps running).
3. Negotiate: query both sides' capabilities (a QEMU has mask 0: today's
   protocol) and the masks of the two vmferry proxies between them.
4. Migrate live through the proxies, with vmferry's ferry format on the wire
   between them, converting the device state to the destination's machine
   type in flight.
5. Print what the proxies carried, as ``vmferry inspect`` shows a stream.
6. Watch the guest count on at the destination from where it stopped.

    python -m vmferry.cli.demo [--source-machine pc-i440fx-2.12] [--dest-machine pc-i440fx-7.2] [--wire ferry]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .. import caps
from ..errors import FerryError
from ..live import proxy
from ..live.migrate import MigrationError, capabilities, migrate, qemu_qmp_args
from ..live.qemu.process import QemuError, QemuVM, qemu_binary, qemu_version
from ..live.route import link_mask
from .common import print_summary
from .summary import StreamSummary

console = Console(highlight=False)
INSTALL = "apt-get install -y qemu-system-x86"


def _step(n: int, text: str) -> None:
    console.print(f"\n[bold cyan]{n}.[/bold cyan] [bold]{text}[/bold]")


def _vm(workdir: Path, name: str, machine: str, nic: bool, incoming: bool) -> tuple[QemuVM, str]:
    """A QEMU with a second QMP monitor for the management tool; returns it and that monitor's address."""
    sock = workdir / f"{name}-mgmt.sock"
    args = [*qemu_qmp_args(str(sock)), *(["-device", "e1000"] if nic else [])]
    vm = QemuVM(machine, args, boot_sector=True, paused=False, incoming=incoming, workdir=workdir / name, name=name)
    return vm, f"unix:{sock}"


def _caps_table(sides: dict[str, dict[str, Any]], link: int) -> Table:
    t = Table(title="capability masks", title_justify="left")
    for col in ("side", "is", "mask", "what it means"):
        t.add_column(col)
    for role, d in sides.items():
        on = [n for n, v in d["qemu-capabilities"].items() if v]
        t.add_row(role, d["version"] or d["kind"], f"{d['mask']:#x}",
                  "no mask commands; QEMU capabilities on: " + (", ".join(on) or "none"))
    own = int(proxy.capabilities())
    for role in ("proxy, source side", "proxy, dest side"):
        t.add_row(role, "vmferry", f"{own:#x}", ", ".join(caps.names(own)))
    t.add_row("[bold]QEMU <-> proxy[/bold]", "agreed", "0x0", "today's QEMU protocol")
    t.add_row("[bold]proxy <-> proxy[/bold]", "agreed", f"{link:#x}", ", ".join(caps.names(link)) or "legacy")
    return t


def _qemu_alone(workdir: Path, src: QemuVM, src_addr: str, dst_machine: str) -> bool:
    """Step 2: a direct migration to ``dst_machine``; True when QEMU refuses it (the source runs on)."""
    _step(2, f"QEMU alone: migrate to {dst_machine} directly")
    refused, refused_addr = _vm(workdir, "refused", dst_machine, True, True)
    with refused:
        try:
            migrate(src_addr, refused_addr, timeout=60)
        except MigrationError:
            pass
        else:
            console.print("   QEMU accepted the direct migration: nothing left for vmferry to show")
            return False
    why = next((ln.split("qemu-system-x86_64: ", 1)[-1] for ln in refused.stderr_log.read_text().splitlines()
                if "Machine type" in ln or "load of migration failed" in ln), "refused")
    console.print(f"   the destination refuses: [red]{why}[/red]")
    console.print(f"   the source is still {src.status()}, the guest at {src.counts()[-1]}")
    return True


def run(src_machine: str, dst_machine: str, wire: str, workdir: Path) -> int:
    _step(1, f"Boot a counting guest under QEMU ({src_machine}, e1000) and a destination ({dst_machine})")
    console.print(f"   {qemu_version()}")
    src, src_addr = _vm(workdir, "source", src_machine, True, False)
    with src:
        src.wait_for_count(5, timeout=60)
        console.print(f"   the guest prints: {' '.join(map(str, src.counts()[-6:]))} ...")

        if src_machine != dst_machine and not _qemu_alone(workdir, src, src_addr, dst_machine):
            return 0

        dst, dst_addr = _vm(workdir, "destination", dst_machine, True, True)
        with dst:
            _step(3, "Negotiate capabilities (query-migration-capabilities, intersect, set)")
            sides = {"source QEMU": capabilities(src_addr), "destination QEMU": capabilities(dst_addr)}
            link = link_mask(proxy.capabilities(), proxy.capabilities()) if wire == "ferry" else 0
            console.print(_caps_table(sides, link))

            _step(4, f"vmferry migrate --via-proxy --to {wire}: live, {src_machine} -> {dst_machine} in flight")
            summary = StreamSummary()
            result = migrate(src_addr, dst_addr, via_proxy=True, wire=wire, observe=summary.add,
                             params={"max-bandwidth": 1 << 30}, timeout=300)
            console.print(f"   {result.line()}")
            stopped_at = src.counts()[-1]

            _step(5, "What the source sent, decoded in flight (as vmferry inspect shows a stream)")
            print_summary(summary, f"live stream from the source: QEMU's format, version {summary.version}, "
                                   f"converted to {dst_machine} on the way")

            _step(6, "The guest counts on at the destination")
            first = dst.wait_for_count(stopped_at + 5, timeout=60)
            counts = dst.counts()
            console.print(f"   source stopped at {stopped_at}; destination ({dst.status()}): "
                          f"{' '.join(map(str, counts[:3]))} ... {' '.join(map(str, counts[-3:]))}")
            if not counts or counts[0] < stopped_at or first <= stopped_at:
                console.print(f"[red]the guest restarted instead of going on from {stopped_at}[/red]")
                return 1
    console.print(f"\n[bold green]demo OK[/bold green]: a running guest moved from {src_machine} to {dst_machine}, "
                  f"which QEMU alone refuses, with {wire} between the proxies; it went on counting from "
                  f"{stopped_at}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmferry.cli.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source-machine", default="pc-i440fx-2.12", help="the source's machine type "
                                                                       "(default: pc-i440fx-2.12)")
    ap.add_argument("--dest-machine", default="pc-i440fx-7.2", help="the destination's machine type "
                                                                    "(default: pc-i440fx-7.2)")
    ap.add_argument("--wire", choices=("legacy", "ferry"), default="ferry",
                    help="between the proxies: ferry (default) or legacy (one proxy)")
    args = ap.parse_args(argv)
    if shutil.which(qemu_binary()) is None:
        print(f"demo: {qemu_binary()} not found; install it with: {INSTALL} (or run 'make demo' as root)",
              file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="vmf-demo-"))
    try:
        return run(args.source_machine, args.dest_machine, args.wire, workdir)
    except (QemuError, FerryError) as e:
        print(f"demo: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
