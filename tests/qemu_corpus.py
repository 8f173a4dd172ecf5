"""pytest glue for the golden stream corpus made by real QEMU (see tests/qemu_recipes.py).

The session fixture ``qemu_corpus`` is a lazy mapping name -> stream path:
``qemu_corpus["pc-7.2-paused"]`` makes that stream with QEMU the first time
a test asks for it (later tests reuse it), ``qemu_corpus.provenance(name)``
says how it was made, and ``provenance.json`` lies beside the streams.  A
stream this QEMU build cannot make skips the asking test.

Tests that use the fixture are marked ``qemu`` automatically (conftest.py).
Set ``VMFERRY_CORPUS_DIR`` to keep the corpus in a directory across runs:
streams made by the same QEMU from unchanged recipes are reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qemu_recipes import Corpus, RecipeUnavailable

# Streams without a vmdesc, and the stream whose vmdesc describes them (spec §4.7).
SCHEMA_FOR = {"pc-2.2-novmdesc": "pc-2.3-nocfg", "pc-7.2-xen-devices": "pc-7.2-paused"}


class PytestCorpus(Corpus):
    """A :class:`Corpus` that skips the asking test when a stream is unavailable."""

    def __getitem__(self, name: str) -> Path:
        try:
            return super().__getitem__(name)
        except RecipeUnavailable as exc:
            pytest.skip(f"corpus stream {name} unavailable: {exc}")


@pytest.fixture(scope="session")
def qemu_corpus(tmp_path_factory: pytest.TempPathFactory) -> PytestCorpus:
    """The golden streams (generated lazily, once per session)."""
    keep = os.environ.get("VMFERRY_CORPUS_DIR")
    if keep:
        return PytestCorpus(Path(keep), reuse=True)
    return PytestCorpus(tmp_path_factory.mktemp("qemu-corpus"))
