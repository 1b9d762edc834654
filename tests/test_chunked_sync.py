"""Large files (the canonical JSON of a big trace) are written and synced in chunks
(walspan/_fsutil.py), so that appends to other files never wait for their whole writeback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from walspan import _fsutil


def test_a_large_json_is_written_and_synced_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file much larger than SYNC_CHUNK is written in chunks, each synced before the next is
    written (so a concurrent fdatasync's journal commit never waits for the whole file's
    writeback), and lands whole: same bytes, one rename. A small file is one write, one sync."""
    ops: list[tuple[str, str]] = []
    monkeypatch.setattr(_fsutil, "SYNC_CHUNK", 64 * 1024)
    monkeypatch.setattr(_fsutil.faults, "hook", lambda op, path: ops.append((op, os.path.basename(path))))
    final = tmp_path / "big.json"
    data = os.urandom(10 * 64 * 1024 + 123)
    _fsutil.atomic_replace(str(final), data)
    assert final.read_bytes() == data
    on_tmp = [op for op, name in ops if name.startswith("big.json.tmp-")]
    assert on_tmp == ["write", "fsync"] * 11
    assert [op for op, name in ops if name == "big.json"] == ["replace"]
    ops.clear()
    _fsutil.atomic_replace(str(final), b"small")
    assert [op for op, name in ops if name.startswith("big.json.tmp-")] == ["write", "fsync"]
    assert final.read_bytes() == b"small"


@pytest.mark.parametrize("size", [0, 1, 4096, 4096 * 2, 4096 * 2 + 1, 4096 * 7 - 1])
def test_chunked_writes_keep_every_byte_at_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """Sizes at, around and between chunk boundaries (and empty) are written byte for byte."""
    monkeypatch.setattr(_fsutil, "SYNC_CHUNK", 4096)
    final = tmp_path / "f"
    data = os.urandom(size)
    _fsutil.atomic_replace(str(final), data)
    assert final.read_bytes() == data
