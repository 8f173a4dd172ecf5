"""vmferry.cli.copyout: QEMU's stream written with its page runs copied by the kernel from the input file."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from vmferry.cli.copyout import write_pieces
from vmferry.encode import legacy
from vmferry.errors import DecodeError
from vmferry.events import (
    SECTION_PART,
    SECTION_START,
    Eof,
    Header,
    IterBegin,
    IterEnd,
    RamBlock,
    RamEos,
    RamMemSize,
    RamPages,
    RamZeros,
)
from vmferry.cli.files import mapped_chunks

PS = 4096
PAGES = 600  # 2.4 MiB of pages: many windows of the small mapping used below


def stream() -> bytes:
    pages = b"".join(bytes([i % 251]) * PS for i in range(PAGES))
    events = [Header(), IterBegin(SECTION_START, 2, "ram", 0, 4),
              RamMemSize(2 * PAGES * PS, [RamBlock("pc.ram", 2 * PAGES * PS)]), RamEos(), IterEnd(2, True),
              IterBegin(SECTION_PART, 2), RamPages("pc.ram", 0, PAGES // 2, True, data=pages[:PAGES // 2 * PS]),
              RamZeros("pc.ram", PAGES // 2 * PS, 7, False),
              RamPages("pc.ram", (PAGES // 2 + 7) * PS, PAGES // 2, False, data=pages[PAGES // 2 * PS:]),
              RamEos(), IterEnd(2, True), IterBegin(SECTION_PART, 2), RamZeros("pc.ram", PAGES * 2 * PS - PS, 1, False),
              RamEos(), IterEnd(2, True), Eof()]
    return b"".join(bytes(c) for c in legacy.encode(events))


@pytest.fixture()
def source(tmp_path):
    path = tmp_path / "in.mig"
    path.write_bytes(stream())
    with open(path, "rb") as f:
        yield f


def pieces(f, window: int = 64 << 10):
    """Decoded with mapped windows of 64 KiB: runs end at every window's end, records straddle windows."""
    return legacy.encode_pieces(legacy.decode(mapped_chunks(f, os.fstat(f.fileno()).st_size, window)))


def test_runs_of_a_file_are_copied_by_the_kernel(source, tmp_path):
    out_path = tmp_path / "out.mig"
    with open(out_path, "wb") as out:
        _, copied = write_pieces(pieces(source), out, source)
    data = stream()
    assert out_path.read_bytes() == data
    assert copied > 0.95 * PAGES * PS  # nearly every page byte went file to file; the rest was written


def test_into_a_pipe_by_sendfile(source):
    r, w = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with os.fdopen(w, "wb") as out:
        _, copied = write_pieces(pieces(source), out, source)
    reader.join()
    os.close(r)
    assert bytes(got) == stream() and copied > 0.95 * PAGES * PS


def test_without_a_source_every_byte_is_written(source, tmp_path):
    out_path = tmp_path / "out.mig"
    with open(out_path, "wb") as out:
        assert write_pieces(pieces(source), out, None) == (len(stream()), 0)
    assert out_path.read_bytes() == stream()


def test_refused_kernel_copy_falls_back_to_reading(source, tmp_path):
    out_path = tmp_path / "out.mig"
    with open(out_path, "ab") as out:  # O_APPEND: copy_file_range and sendfile refuse it
        _, copied = write_pieces(pieces(source), out, source)
    assert out_path.read_bytes() == stream() and copied == 0


def test_a_decode_error_stops_the_writer_and_is_the_error_raised(tmp_path):
    data = stream()
    path = tmp_path / "cut.mig"
    path.write_bytes(data[:len(data) // 2])
    with open(path, "rb") as f, open(tmp_path / "out.mig", "wb") as out:
        with pytest.raises(DecodeError, match="truncated"):
            write_pieces(pieces(f), out, f)


def test_a_write_error_is_raised_in_the_caller(source, tmp_path):
    r, w = os.pipe()
    os.close(r)  # nobody reads: the writer meets EPIPE
    with os.fdopen(w, "wb") as out, pytest.raises(BrokenPipeError):
        write_pieces(pieces(source), out, source)


def test_convert_to_legacy_from_a_file_and_to_stdout(tmp_path):
    src = tmp_path / "in.mig"
    src.write_bytes(stream())
    dst = tmp_path / "out.mig"
    cmd = [sys.executable, "-m", "vmferry.cli", "convert", "-q", str(src)]
    assert subprocess.run(cmd + [str(dst), "--to", "legacy"], timeout=60).returncode == 0
    assert dst.read_bytes() == stream()
    out = subprocess.run(cmd + ["-", "--to", "legacy"], capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == stream()


def test_bytes_that_differ_from_the_input_are_written_and_the_rest_still_copied(source, tmp_path):
    """A piece that is not the input's next bytes (a converted device section, say) is written as it is; runs
    after it are still copied from their own offsets."""
    data = stream()

    def edited():
        for i, piece in enumerate(pieces(source)):
            if i == 0:
                assert isinstance(piece, (bytes, bytearray)) and piece.startswith(b"QEVM")
                piece = b"QEVX" + bytes(piece[4:])
            yield piece

    out_path = tmp_path / "out.mig"
    with open(out_path, "wb") as out:
        _, copied = write_pieces(edited(), out, source)
    assert out_path.read_bytes() == b"QEVX" + data[4:]
    assert copied > 0.95 * PAGES * PS


def test_a_stream_converted_to_itself_is_copied_whole(source, tmp_path):
    out_path = tmp_path / "out.mig"
    with open(out_path, "wb") as out:
        _, copied = write_pieces(pieces(source), out, source)
    assert out_path.read_bytes() == stream() and copied == len(stream())
