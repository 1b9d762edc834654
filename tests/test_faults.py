"""Fault injection: I/O errors in write / fdatasync / os.replace, and crashes at every step of
a compaction (issue 5, harness parts c and d).

Faults come through `walspan._fsutil.faults.hook(op, path)`, called before every write, sync,
directory sync, replace and link walspan makes (a no-op in production). A test either raises
an OSError from it (ENOSPC, EIO) or, in a child process, calls os._exit() there to die at that
exact step.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import walspan
from walspan import _fsutil
from walspan._compactor import fold_wal
from walspan._fold import dumps
from walspan._verify import verify_dir

ERRNOS = [errno.ENOSPC, errno.EIO]


def fail_once(op: str, match: Callable[[str], bool], err: int) -> Callable[[str, str], None]:
    """A hook that raises OSError(err) the first time `op` is called on a matching path."""
    fired = []

    def hook(o: str, path: str) -> None:
        if o == op and match(path) and not fired:
            fired.append(path)
            raise OSError(err, os.strerror(err))

    hook.fired = fired  # type: ignore[attr-defined]
    return hook


def is_wal(path: str) -> bool:
    return path.endswith(".wal")


def event_ops(doc: dict[str, Any]) -> list[int]:
    return [e["attributes"]["n"] for s in doc["spans"] for e in s["events"]]


# == (d) I/O errors ==========================================================================


@pytest.mark.parametrize("err", ERRNOS)
def test_write_error_reaches_the_caller_and_writes_nothing(store_dir: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """A failed WAL write raises DurabilityError (an OSError carrying the errno), leaves no byte
    of the record behind, is not acknowledged, and the next append works (invariant 1)."""
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    span = trace.start_span("work")
    for n in range(3):
        span.add_event("e", {"n": n})
    wal = store.wal_path("s")
    size = wal.stat().st_size
    hook = fail_once("write", is_wal, err)
    monkeypatch.setattr(_fsutil.faults, "hook", hook)
    with pytest.raises(walspan.DurabilityError) as info:
        span.add_event("e", {"n": 99})
    assert hook.fired == [str(wal)]
    assert isinstance(info.value, OSError) and info.value.errno == err and info.value.op == "write"
    assert wal.stat().st_size == size
    span.add_event("e", {"n": 3})
    span.end()
    assert event_ops(store.load("s")) == [0, 1, 2, 3]
    store.close()
    assert verify_dir(str(store_dir)).ok


@pytest.mark.parametrize("err", ERRNOS)
def test_fdatasync_error_is_not_retried_and_acknowledged(store_dir: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """A failed fdatasync raises DurabilityError(errno) and poisons the session: every later append
    through this store raises the same error and writes nothing, even once fsync works again (a
    retried fsync that succeeds proves nothing). A reopened store continues the trace, and every
    acknowledged event is there (invariant 1)."""
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    span = trace.start_span("work")
    acked = []
    for n in range(3):
        span.add_event("e", {"n": n})
        acked.append(n)
    hook = fail_once("fsync", is_wal, err)
    monkeypatch.setattr(_fsutil.faults, "hook", hook)
    with pytest.raises(walspan.DurabilityError) as info:
        span.add_event("e", {"n": 3})
    assert info.value.errno == err and info.value.op == "fdatasync"
    assert hook.fired
    monkeypatch.setattr(_fsutil.faults, "hook", None)  # the disk "works" again
    wal = store.wal_path("s")
    size = wal.stat().st_size
    syncs: list[str] = []
    monkeypatch.setattr(_fsutil.faults, "hook", lambda op, path: syncs.append(op) if is_wal(path) else None)
    for call in (lambda: span.add_event("e", {"n": 4}), lambda: trace.set_metadata(k=1), lambda: trace.end()):
        with pytest.raises(walspan.DurabilityError) as again:
            call()
        assert again.value.errno == err
    assert wal.stat().st_size == size, "a refused append wrote to the WAL"
    assert "fsync" not in syncs, "the failed fdatasync was retried"
    monkeypatch.setattr(_fsutil.faults, "hook", None)

    # The failure is recorded in the shared state: a fresh store (or another process) refuses
    # too, until `repair` re-writes and re-syncs what followed the last good fdatasync.
    store2 = walspan.Store(store_dir, install_hooks=False)
    with pytest.raises(walspan.DurabilityError, match="walspan repair"):
        store2.open("s")
    assert wal.stat().st_size == size
    repaired = store2.repair("s")
    assert repaired is not None and repaired.action == "resynced"
    t2 = store2.open("s")
    s2 = t2.start_span("after-reopen")
    s2.add_event("e", {"n": 5})
    s2.end()
    t2.end()
    doc = store2.load("s")
    ops = event_ops(doc)
    # acknowledged: 0..2 and 5; 3 was written but not acknowledged (it may be there), 4 refused
    assert [n for n in ops if n != 3] == acked + [5]
    assert 4 not in ops
    assert doc["status"] == "completed"
    store2.close()
    assert verify_dir(str(store_dir)).ok


def test_fdatasync_error_poisons_only_its_session(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal after a failed fdatasync is per session: another session of the same store
    keeps appending (invariant 9)."""
    store = walspan.Store(store_dir, install_hooks=False)
    a, b = store.open("a"), store.open("b")
    monkeypatch.setattr(_fsutil.faults, "hook", fail_once("fsync", lambda p: p.endswith("a.wal"), errno.EIO))
    with pytest.raises(walspan.DurabilityError):
        a.start_span("x")
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    with pytest.raises(walspan.DurabilityError):
        a.start_span("y")
    b.start_span("fine").end()
    assert [s["name"] for s in store.load("b")["spans"]] == ["fine"]


def test_close_after_fdatasync_error_releases_the_writer(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed fdatasync, Store.close() still releases the process's writer (its liveness
    lock file goes away), so recovery can prove the writer gone instead of seeing it alive until
    the process exits."""
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    monkeypatch.setattr(_fsutil.faults, "hook", fail_once("fsync", is_wal, errno.EIO))
    with pytest.raises(walspan.DurabilityError):
        trace.start_span("x")
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    try:
        store.close()
    except walspan.DurabilityError:
        pass
    assert os.listdir(store_dir / ".walspan" / "writers") == []


@pytest.mark.parametrize("err", ERRNOS)
@pytest.mark.parametrize("op", ["write", "fsync", "replace"])
def test_compaction_io_error_keeps_the_old_json(store_dir: Path, monkeypatch: pytest.MonkeyPatch, err: int, op: str) -> None:
    """An I/O error while writing the JSON (tmp write, tmp fsync, os.replace) reaches the caller as
    the OSError with its errno; the old JSON stays byte for byte, no tmp file is left behind, the
    WAL is untouched, and the next compaction writes the new JSON (invariant 4)."""
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    trace.start_span("one").end()
    old = store.compact("s").read_bytes()
    trace.start_span("two").end()
    wal_before = store.wal_path("s").read_bytes()
    match = (lambda p: ".json.tmp-" in p) if op in ("write", "fsync") else (lambda p: p.endswith(".json"))
    hook = fail_once(op, match, err)
    monkeypatch.setattr(_fsutil.faults, "hook", hook)
    with pytest.raises(OSError) as info:
        store.compact("s")
    assert info.value.errno == err and hook.fired
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    assert store.trace_path("s").read_bytes() == old
    assert [n for n in os.listdir(store_dir) if ".tmp-" in n] == []
    assert store.wal_path("s").read_bytes() == wal_before
    new = store.compact("s").read_bytes()
    assert json.loads(new) == store.load("s")
    assert [s["name"] for s in json.loads(new)["spans"]] == ["one", "two"]


def test_end_whose_compaction_fails_still_ended_the_trace(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trace.end() appends the terminal record, then compacts. If os.replace fails, end() raises
    that OSError, but the terminal record is already in the WAL: the trace is completed, further
    appends are refused, and the next compaction shows it (invariant 3)."""
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    trace.start_span("work").end()
    monkeypatch.setattr(_fsutil.faults, "hook", fail_once("replace", lambda p: p.endswith(".json"), errno.ENOSPC))
    with pytest.raises(OSError) as info:
        trace.end("completed")
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    assert store.load("s")["status"] == "completed"
    with pytest.raises(walspan.TraceClosedError):
        trace.start_span("late")
    assert json.loads(store.compact("s").read_bytes())["status"] == "completed"


# == (c) a crash at every step of a compaction ================================================

# step name -> (fault op, which path): the hook runs *before* that op, so it marks the step
# that completed just before it.
STEPS = {
    "before tmp write": ("write", "tmp"),
    "after tmp write": ("fsync", "tmp"),
    "after tmp fsync": ("replace", "json"),
    "after rename, before dir fsync": ("fsync_dir", "dir"),
}


def _matcher(kind: str, store_dir: Path) -> Callable[[str], bool]:
    if kind == "tmp":
        return lambda p: ".json.tmp-" in p
    if kind == "json":
        return lambda p: p.endswith(".json")
    return lambda p: os.path.abspath(p) == os.path.abspath(store_dir)


def _old_and_new(store_dir: Path) -> tuple[walspan.Store, bytes, bytes]:
    """A trace with a compacted JSON (old) and more records after it (new = their fold)."""
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s", metadata={"title": "compaction crash"})
    span = trace.start_span("first", input="x" * 3000)
    span.end(output="y" * 3000)
    old = store.compact("s").read_bytes()
    for i in range(20):
        trace.start_span(f"more-{i}", input="z" * 2000).end()
    trace.close()
    new = dumps(fold_wal(str(store.wal_path("s")))[0].to_dict())
    assert old != new
    return store, old, new


@pytest.mark.parametrize("step", list(STEPS))
def test_compaction_raising_at_each_step_leaves_old_or_new_json(store_dir: Path, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """A compaction failing at any step leaves the JSON exactly old or exactly new (never partial);
    after the rename the JSON is new even though the caller saw the error; recompaction converges
    to the new JSON and verify is clean (invariant 4)."""
    store, old, new = _old_and_new(store_dir)
    op, kind = STEPS[step]
    hook = fail_once(op, _matcher(kind, store_dir), errno.EIO)
    monkeypatch.setattr(_fsutil.faults, "hook", hook)
    with pytest.raises(OSError):
        store.compact("s")
    assert hook.fired
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    got = store.trace_path("s").read_bytes()
    assert got == (new if op == "fsync_dir" else old)
    assert store.compact("s").read_bytes() == new
    assert store.trace_path("s").read_bytes() == new
    assert verify_dir(str(store_dir)).ok


_DIE_AT_STEP = textwrap.dedent(
    """
    import os, sys
    import walspan
    from walspan import _fsutil
    store_dir, op, kind = sys.argv[1], sys.argv[2], sys.argv[3]

    def matches(path):
        if kind == "tmp":
            return ".json.tmp-" in path
        if kind == "json":
            return path.endswith(".json")
        return os.path.abspath(path) == os.path.abspath(store_dir)

    def hook(o, path):
        if o == op and matches(path):
            os._exit(17)  # die right here: no cleanup, no unlink of the tmp file

    _fsutil.faults.hook = hook
    walspan.Store(store_dir, install_hooks=False, create=False).compact("s")
    os._exit(0)
    """
)


@pytest.mark.parametrize("step", list(STEPS))
def test_compaction_process_dying_at_each_step_leaves_old_or_new_json(store_dir: Path, step: str) -> None:
    """A compacting process that dies (os._exit) at any step leaves the JSON exactly old or new;
    a leftover tmp file does not disturb verify or the next compaction, which converges to the
    new JSON (invariant 4)."""
    store, old, new = _old_and_new(store_dir)
    op, kind = STEPS[step]
    proc = subprocess.run([sys.executable, "-c", _DIE_AT_STEP, str(store_dir), op, kind], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 17, proc.stderr  # the step was reached
    got = store.trace_path("s").read_bytes()
    assert got == (new if op == "fsync_dir" else old)
    report = verify_dir(str(store_dir))
    assert report.ok, report.errors
    assert store.compact("s").read_bytes() == new
    assert json.loads(new) == store.load("s")
    report = verify_dir(str(store_dir))
    assert report.ok, report.errors


@pytest.mark.parametrize("op", ["write", "fsync", "link"])
def test_failed_wal_creation_leaves_nothing_behind(store_dir: Path, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """An I/O error while creating a session's WAL (tmp write, tmp fsync, link to the final name)
    reaches store.open() as the OSError with its errno; no WAL and no tmp file is left, so the
    next open() creates the trace from scratch (invariant 2: a WAL is whole from its first byte)."""
    store = walspan.Store(store_dir, install_hooks=False)
    match = (lambda p: p.endswith("new.wal")) if op == "link" else (lambda p: ".wal.tmp-" in p)
    hook = fail_once(op, match, errno.ENOSPC)
    monkeypatch.setattr(_fsutil.faults, "hook", hook)
    with pytest.raises(OSError) as info:
        store.open("new")
    assert info.value.errno == errno.ENOSPC and hook.fired
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    assert sorted(n for n in os.listdir(store_dir) if not n.startswith(".")) == []
    trace = store.open("new")
    trace.start_span("first").end()
    assert [s["name"] for s in store.load("new")["spans"]] == ["first"]
    store.close()
    assert verify_dir(str(store_dir)).ok
