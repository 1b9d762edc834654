"""The flush slot of the shared state (walspan/_shm.py, docs/FORMAT.md "Shared state"): the
durable mark a flush leader raises without the append lock, trusted only under its rules."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

import walspan
from walspan import _shm
from walspan._format import decode_file_header


def _setup(tmp_path: Path) -> tuple[walspan.Store, str, int, _shm.SharedState]:
    store = walspan.Store(tmp_path / "s", durability="process", install_hooks=False)
    trace = store.open("s")
    for n in range(50):
        trace.start_span(f"x{n}").end()
    wal = str(store.wal_path("s"))
    salt = decode_file_header(Path(wal).read_bytes()[:32])
    shm = _shm.SharedState(_shm.shm_path(wal), salt)
    return store, wal, salt, shm


def _state(wal: str, salt: int) -> _shm.State:
    st = _shm.read_state(wal, salt, os.path.getsize(wal))
    assert st is not None
    return st


def test_the_slot_raises_the_mark_only_for_its_cut_gen_and_within_the_log(tmp_path: Path) -> None:
    """A slot with the state's cut_gen and flushed_end <= written_end is the durable mark (it
    only ever goes up); one from another cut_gen (a cut since its target was read), or past
    written_end, or with a bad crc, is ignored and the mark stays durable_end."""
    store, wal, salt, shm = _setup(tmp_path)
    st = _state(wal, salt)
    assert st.durable_end < st.written_end
    mid = st.written_end - 40
    shm.publish_flushed(st.cut_gen, mid)
    assert _state(wal, salt).durable_end == mid
    assert shm.durable_end() == mid
    shm.publish_flushed(st.cut_gen, mid - 10)  # never lowers the slot within a cut_gen
    assert _state(wal, salt).durable_end == mid
    shm.publish_flushed(st.cut_gen + 1, st.written_end)  # another cut_gen: does not count
    assert _state(wal, salt).durable_end == st.durable_end
    shm.publish_flushed(st.cut_gen, st.written_end)
    assert _state(wal, salt).durable_end == st.written_end
    raw = bytearray(shm._mm[0:128])
    raw[100] ^= 1  # a torn or damaged slot
    shm._mm[96:116] = bytes(raw[96:116])
    assert _state(wal, salt).durable_end == st.durable_end
    shm.publish_flushed(st.cut_gen + 2, 0)
    shm.publish_flushed(st.cut_gen, st.written_end + 100)  # past the log's end: does not count
    assert _state(wal, salt).durable_end == st.durable_end
    shm.close()
    store.close()


def test_a_cut_voids_the_slot(tmp_path: Path) -> None:
    """After a repair that cuts the log below a published slot, the slot no longer counts (its
    cut_gen is the old one), so the mark never exceeds what this log has flushed."""
    store, wal, salt, shm = _setup(tmp_path)
    st = _state(wal, salt)
    shm.publish_flushed(st.cut_gen, st.written_end)
    data = Path(wal).read_bytes()
    Path(wal).write_bytes(data + b"\0" * 300)  # a torn tail: repair cuts it
    store.repair("s")
    after = _state(wal, salt)
    assert after.cut_gen != st.cut_gen
    assert after.durable_end <= after.written_end
    (slot_end, slot_gen) = struct.unpack_from("<QQ", shm._mm, 96)
    assert slot_gen == st.cut_gen and slot_gen != after.cut_gen
    shm.close()
    store.close()


def test_readers_wait_for_a_write_in_progress_to_settle() -> None:
    """Two reads in a row that agree are a settled state: a reader that catches a write in
    progress reads again (a bounded number of times) instead of calling the state unknown."""
    reads = iter([b"a", b"b", b"c", b"c", b"x"])
    assert _shm._settled(lambda: next(reads)) == b"c"
    never = iter(range(100))
    assert _shm._settled(lambda: bytes([next(never)])) == bytes([_shm._SETTLE_TRIES])


@pytest.mark.parametrize("torn", [False, True])
def test_slot_intact(torn: bool) -> None:
    """A never-written slot (zeros) and one whose crc matches are whole; any other is not."""
    slot = struct.pack("<QQ", 1000, 7)
    raw = bytearray(128)
    assert _shm._slot_intact(bytes(raw))
    raw[96:116] = slot + struct.pack("<I", zlib.crc32(slot) ^ (1 if torn else 0))
    assert _shm._slot_intact(bytes(raw)) is not torn
