"""The shared state (.walspan/S.shm) is a cache of the log, never trusted past it.

Each case below once let a durable append be acknowledged with no fdatasync at all, because
durable_end said the record was already durable. Each test forces the situation, then checks
that a durable append still runs its own fdatasync of the WAL (counted through the fault hook
that sits in front of the real call: the call itself is pinned by the syscall-trace tests)
and that durable_end never exceeds the log.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from walfiles import flip_byte, record_offsets

import walspan
from walspan import _fsutil, _shm
from walspan._format import RECORD_HEADER_SIZE, decode_file_header

SID = "s"
WAIT = 60.0  # safety net for event waits; never reached when things work


def state(store: walspan.Store) -> _shm.State | None:
    wal = str(store.wal_path(SID))
    with open(wal, "rb") as f:
        salt = decode_file_header(f.read(32))
    return _shm.read_state(wal, salt, os.path.getsize(wal))


@contextmanager
def wal_syncs(store: walspan.Store) -> Iterator[list[str]]:
    """Count the fdatasyncs of the session's WAL (and nothing else) while the block runs."""
    wal = str(store.wal_path(SID))
    seen: list[str] = []
    previous = _fsutil.faults.hook

    def hook(op: str, path: str) -> None:
        if op == "fsync" and path == wal:
            seen.append(path)
        if previous is not None:
            previous(op, path)

    _fsutil.faults.hook = hook
    try:
        yield seen
    finally:
        _fsutil.faults.hook = previous


def fill(trace: walspan.Trace, n: int, tag: str = "x") -> None:
    for i in range(n):
        trace.start_span(f"{tag}{i}", attributes={"pad": "p" * 200}).end()


def assert_durable_append_syncs(store: walspan.Store, trace: walspan.Trace) -> None:
    size = store.wal_path(SID).stat().st_size
    with wal_syncs(store) as syncs:
        trace.start_span("after").end()  # two appends, each past the end it saw
    assert len(syncs) >= 1, "a durable append was acknowledged without an fdatasync of the WAL"
    st = state(store)
    assert st is not None and st.durable_end <= store.wal_path(SID).stat().st_size
    assert st.durable_end > size  # and the flush that covered it was recorded


def test_wal_restored_from_an_older_copy_while_the_state_survives(tmp_path: Path) -> None:
    """Restoring an older copy of a WAL while .walspan/ survives: the state describes a longer
    log (durable_end past the end of the file), so it is not trusted; the next durable append
    flushes, and durable_end is rebuilt below the file's end."""
    store = walspan.Store(tmp_path, install_hooks=False)
    t = store.open(SID)
    fill(t, 3)
    backup = tmp_path / "backup"
    shutil.copyfile(store.wal_path(SID), backup)
    fill(t, 20, "later")
    old = state(store)
    assert old is not None and old.durable_end > backup.stat().st_size
    shutil.copyfile(backup, store.wal_path(SID))  # same inode, older content
    assert state(store) is None  # durable_end past the log: not trusted
    assert_durable_append_syncs(store, t)
    names = [s["name"] for s in store.load(SID)["spans"]]
    assert names == ["x0", "x1", "x2", "after"]
    store.close()


def test_stale_durable_end_after_a_repair_and_a_reboot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repair cuts the log below durable_end. Before cutting, it lowers durable_end and makes
    the state durable (the fsync of the state file comes before the WAL's truncation). If a
    power loss still left the state as it was before the repair, the next run of the kernel
    (another boot id) does not trust its durable_end past the log: the next durable append
    flushes."""
    store = walspan.Store(tmp_path, install_hooks=False)
    t = store.open(SID)
    fill(t, 10)
    t.close()
    shm_file = tmp_path / ".walspan" / f"{SID}.shm"
    before_repair = shm_file.read_bytes()
    wal = store.wal_path(SID)
    bad = record_offsets(wal)[6][0]
    flip_byte(wal, bad + RECORD_HEADER_SIZE + 2)
    order: list[tuple[str, str]] = []
    monkeypatch.setattr(_fsutil.faults, "hook", lambda op, path: order.append((op, os.path.basename(path))))
    result = store.repair(SID)
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    assert result is not None and result.action == "cut" and result.offset == bad
    shm_sync = order.index(("fsync", shm_file.name))
    assert shm_sync < order.index(("truncate", wal.name)), "the lowered durable_end was not made durable before the cut"
    assert (st := state(store)) is not None and st.durable_end <= bad

    shm_file.write_bytes(before_repair)  # the power loss lost the lowered state after all
    with open(wal, "ab") as f:
        f.write(b"\x5a" * 300)  # and left half a record behind
    monkeypatch.setattr(_shm, "boot_id", lambda: b"another-boot-id!")
    again = walspan.Store(tmp_path, install_hooks=False)
    # the stale durable_end (past the log) is no witness: the half record is a torn tail, not
    # "damage below durable_end"
    t2 = again.open(SID)
    assert (tmp_path / f"{wal.name}.torn-{bad}").read_bytes() == b"\x5a" * 300
    assert_durable_append_syncs(again, t2)
    again.close()
    store.close()


def test_a_flush_that_read_its_target_before_a_repair_cut_does_not_raise_durable_end(tmp_path: Path) -> None:
    """Forced interleaving: a flush leader reads written_end W and starts its fdatasync; an
    explicit repair then cuts the log below W, and other writers (process level) grow it back
    past W; the leader's fdatasync returns. It must not raise durable_end to W (the cut changed
    the state's generation): the bytes from the cut to W were written after its fdatasync
    began. The next durable append runs its own fdatasync."""
    leader = walspan.Store(tmp_path, install_hooks=False)
    t = leader.open(SID)
    fill(t, 8)
    wal = str(leader.wal_path(SID))
    span = t.start_span("big", attributes={"pad": "q" * 4000})
    in_sync, release = threading.Event(), threading.Event()
    leader_thread: list[int] = []

    def hook(op: str, path: str) -> None:
        if op == "fsync" and path == wal and leader_thread and threading.get_ident() == leader_thread[0]:
            in_sync.set()
            assert release.wait(WAIT)

    def lead() -> None:
        leader_thread.append(threading.get_ident())
        span.end()

    _fsutil.faults.hook = hook
    try:
        th = threading.Thread(target=lead)
        th.start()
        assert in_sync.wait(WAIT)  # the leader read W and is inside its fdatasync
        w = os.path.getsize(wal)
        bad = record_offsets(wal)[4][0]
        flip_byte(wal, bad + RECORD_HEADER_SIZE + 1)
        other = walspan.Store(tmp_path, install_hooks=False)
        result = other.repair(SID)
        assert result is not None and result.offset == bad < w
        # the log grows back past W with records nobody has flushed yet
        unsynced = walspan.Store(tmp_path, durability="process", install_hooks=False)
        tu = unsynced.open(SID)
        while os.path.getsize(wal) <= w:
            tu.set_metadata(pad="r" * 500)
        release.set()
        th.join(WAIT)
        assert not th.is_alive()
    finally:
        _fsutil.faults.hook = None
        release.set()
    st = state(other)
    assert st is not None and st.durable_end <= bad, "durable_end was raised over records no fdatasync covered"
    t2 = other.open(SID)
    assert_durable_append_syncs(other, t2)
    unsynced.close()
    other.close()
    leader.close()


def fail_fsync_in(thread_ident: Callable[[], int | None], wal: str, err: int = errno.EIO) -> Callable[[str, str], None]:
    def hook(op: str, path: str) -> None:
        if op == "fsync" and path == wal and threading.get_ident() == thread_ident():
            raise OSError(err, os.strerror(err))

    return hook


def test_an_fdatasync_failure_seen_by_one_writer_stops_every_writer(tmp_path: Path) -> None:
    """Two stores on one session (as two processes would be: separate handles, one shared
    state). Store A's fdatasync fails with EIO; store B never saw the error (its own
    fdatasync would succeed, although the kernel may have dropped the pages A wrote). B must
    not acknowledge anything, nor raise durable_end, until `repair` re-syncs: the failure is
    recorded in the shared state."""
    a = walspan.Store(tmp_path, install_hooks=False)
    b = walspan.Store(tmp_path, install_hooks=False)
    ta, tb = a.open(SID), b.open(SID)
    fill(ta, 2)
    fill(tb, 2, "b")
    wal = str(a.wal_path(SID))
    me = threading.get_ident()
    _fsutil.faults.hook = fail_fsync_in(lambda: me, wal)
    try:
        with pytest.raises(walspan.DurabilityError):
            ta.start_span("lost?")
    finally:
        _fsutil.faults.hook = None
    st = state(a)
    assert st is not None and st.failed, "the failure was not recorded where other writers see it"
    size = os.path.getsize(wal)
    with pytest.raises(walspan.DurabilityError, match="repair"):
        tb.start_span("refused")
    assert os.path.getsize(wal) == size
    result = b.repair(SID)
    assert result is not None and result.action == "resynced"
    tb2 = b.open(SID)
    assert_durable_append_syncs(b, tb2)
    b.close()
    with pytest.raises(walspan.DurabilityError):  # A's own handle stays failed: it cannot detach
        a.close()


def test_after_a_reboot_only_durable_end_vouches_for_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """written_end vouches for complete writes only within the kernel run that made them (they
    sat in the page cache); after a reboot, a damaged last record past durable_end is what a
    power loss leaves, a torn tail for every reader, while the same damage below durable_end
    is corruption."""
    store = walspan.Store(tmp_path, install_hooks=False)  # durable: these are fdatasynced
    t = store.open(SID)
    fill(t, 3)
    t.close()
    store.close()
    later = walspan.Store(tmp_path, durability="process", install_hooks=False)  # these are not
    t = later.open(SID)
    fill(t, 3, "p")
    t.close()
    later.close()
    wal = store.wal_path(SID)
    recs = record_offsets(wal)
    st = state(store)
    assert st is not None and st.durable_end < recs[-1][0] < st.written_end
    flip_byte(wal, recs[-1][0] + RECORD_HEADER_SIZE + 3)
    with pytest.raises(walspan.CorruptWALError):  # this run: written_end vouches for it
        walspan.Store(tmp_path, install_hooks=False).load(SID)
    monkeypatch.setattr(_shm, "boot_id", lambda: b"another-boot-id!")
    doc = walspan.Store(tmp_path, install_hooks=False).load(SID)  # after a reboot: a torn tail
    assert len(doc["spans"]) == 6 and doc["wal"]["offset"] == recs[-1][0]
    # (the last record is the process-level writer's detach: past durable_end)
    flip_byte(wal, recs[-1][0] + RECORD_HEADER_SIZE + 3)  # undo; now damage below durable_end
    inside, inside_end, _t, _s = [r for r in recs if r[1] <= st.durable_end][-1]
    os.truncate(wal, inside_end)  # the fdatasynced record is now the last one...
    flip_byte(wal, inside + RECORD_HEADER_SIZE + 1)  # ...and it is damaged: nothing written after
    with pytest.raises(walspan.CorruptWALError):
        walspan.Store(tmp_path, install_hooks=False).load(SID)


def test_repair_after_a_failed_fdatasync_resyncs_a_region_larger_than_its_chunk(tmp_path: Path) -> None:
    """The records written since the last good flush can be large (here one record of about
    3 MiB, beyond the 2 MiB chunk repair copies in): repair re-writes every byte of them, and
    the log reads whole and takes durable appends afterwards."""
    store = walspan.Store(tmp_path, install_hooks=False)
    t = store.open(SID)
    fill(t, 2)
    wal = str(store.wal_path(SID))
    me = threading.get_ident()
    big = {k: k * (1 << 20) for k in ("a", "b", "c")}
    _fsutil.faults.hook = fail_fsync_in(lambda: me, wal)
    try:
        with pytest.raises(walspan.DurabilityError):
            t.start_span("big", attributes=big)
    finally:
        _fsutil.faults.hook = None
    other = walspan.Store(tmp_path, install_hooks=False)
    result = other.repair(SID)
    assert result is not None and result.action == "resynced" and result.moved > 3 << 20
    assert result.offset + result.moved == os.path.getsize(wal)
    names = [s["name"] for s in other.load(SID)["spans"]]
    assert names[-1] == "big"
    t2 = other.open(SID)
    assert_durable_append_syncs(other, t2)
    other.close()
    with pytest.raises(walspan.DurabilityError):
        store.close()
