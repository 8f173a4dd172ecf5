"""``make demo``: vmferry's main job on a built-in default, with real QEMU.

1. Boot a tiny guest (a 512-byte boot sector that counts on the serial port)
   under QEMU 7.2, machine type pc-i440fx-7.2, and let it count.
2. Save it while it runs, with QEMU's own migration to a file.
3. Inspect the stream with vmferry.
4. Round-trip it: QEMU stream -> JSON -> QEMU stream, byte for byte.
5. Load the round-tripped stream into a fresh QEMU and watch the guest count
   on from where it stopped.

    python -m vmferry.demo [--machine pc-i440fx-7.2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from .cli import main as cli_main
from .qemu_process import QemuError, QemuVM, qemu_binary

console = Console(highlight=False)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _step(n: int, text: str) -> None:
    console.print(f"\n[bold cyan]{n}.[/bold cyan] [bold]{text}[/bold]")


def run(machine: str, workdir: Path) -> int:
    stream = workdir / "guest.mig"
    doc = workdir / "guest.json"
    back = workdir / "guest-roundtrip.mig"

    _step(1, f"Boot a counting guest under QEMU ({machine})")
    with QemuVM(machine, boot_sector=True, paused=False, workdir=workdir / "source", name="source") as src:
        src.wait_for_count(5, timeout=60)
        console.print(f"   the guest prints: {' '.join(map(str, src.counts()[-6:]))} ...")

        _step(2, "Save it while it runs (QEMU migrate to exec:cat > guest.mig)")
        src.save(stream)
        stopped_at = src.counts()[-1]
        console.print(f"   saved {stream.stat().st_size:,} bytes; the guest had counted to {stopped_at}")

    _step(3, "vmferry inspect guest.mig")
    if cli_main(["inspect", str(stream)]) != 0:
        return 1

    _step(4, "Round trip: vmferry convert guest.mig -> JSON -> QEMU stream")
    if cli_main(["convert", "-q", str(stream), str(doc), "--to", "json"]) != 0:
        return 1
    if cli_main(["convert", "-q", str(doc), str(back), "--to", "legacy"]) != 0:
        return 1
    same = stream.read_bytes() == back.read_bytes()
    console.print(f"   guest.mig            sha256 {_sha(stream)}  {stream.stat().st_size:,} bytes")
    console.print(f"   guest.json           {doc.stat().st_size:,} bytes (editable: device fields by QEMU's names)")
    console.print(f"   guest-roundtrip.mig  sha256 {_sha(back)}  {'identical' if same else 'DIFFERENT'}")
    if not same:
        console.print("[red]round trip changed the stream[/red]")
        return 1

    _step(5, "Load the round-tripped stream into a fresh QEMU (-incoming defer)")
    with QemuVM(machine, incoming=True, paused=False, boot_sector=True, workdir=workdir / "destination",
                name="destination") as dst:
        state = dst.load(back)
        first = dst.wait_for_count(stopped_at + 1, timeout=60)
        time.sleep(1.0)
        counts = dst.counts()
        console.print(f"   destination state: {state}; the guest goes on: {' '.join(map(str, counts[:8]))} ...")
        if counts[0] < stopped_at or first <= stopped_at:
            console.print(f"[red]the guest restarted instead of going on from {stopped_at}[/red]")
            return 1
    console.print(f"\n[bold green]demo OK[/bold green]: saved at {stopped_at}, round-tripped byte for byte, "
                  f"resumed at {counts[0]}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmferry.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machine", default="pc-i440fx-7.2", help="QEMU machine type (default: pc-i440fx-7.2)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="keep the streams in DIR (default: a temporary "
                                                               "directory, removed afterwards)")
    args = ap.parse_args(argv)
    try:
        qemu_binary()
    except QemuError as e:
        print(f"demo: {e}; install it with: apt-get install -y qemu-system-x86", file=sys.stderr)
        return 1
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="vmferry-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        status = run(args.machine, workdir)
        if args.keep is not None:
            console.print(f"The streams are in {workdir}.")
        return status
    except QemuError as e:
        print(f"demo: QEMU failed: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
