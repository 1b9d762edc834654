"""Group commit in the durable level (walspan/_wal.py, DESIGN.md §4 and invariant 1).

One fdatasync covers every record complete before it began, so a writer whose record is
already covered (by a flush in flight or just finished) does not issue its own; and no append
is acknowledged before a flush covering it has succeeded. These tests count the fdatasync calls
on the WAL through the fault hook (walspan._fsutil.faults, op "fsync") and read the shared
durable_end mark at the moment each append returns. No timing: the interleavings that matter
are forced with barriers and events (bounded waits are only a safety net).
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import threading
from pathlib import Path
from typing import Any

import pytest

import walspan
from walspan import _fsutil
from walspan._compactor import fold_wal
from walspan._wal import WalHandle
from walspan.errors import DurabilityError

WAIT = 60  # safety net for every blocking wait, in seconds: never reached when the code is right


def _count_wal_fsyncs(wal: str, counter: list[int], lock: threading.Lock, then: Any = None) -> Any:
    def hook(op: str, path: str) -> None:
        if op == "fsync" and path == wal:
            with lock:
                counter[0] += 1
            if then is not None:
                then()

    return hook


def _events_per_span(store_dir: Path, session: str) -> dict[str, list[int]]:
    fold, _scan = fold_wal(str(walspan.Store(store_dir, install_hooks=False, create=False).wal_path(session)))
    return {s["name"]: [e["attributes"]["n"] for e in s["events"]] for s in fold.spans.values()}


# -- threads ------------------------------------------------------------------------------------


def test_threads_whose_records_a_flush_covers_do_not_flush(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 threads write one record each before any of them flushes: exactly one fdatasync
    acknowledges all 8, and each returns with durable_end at or past its record (invariant 1)."""
    n = 8
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    spans = [trace.start_span(f"t{i}") for i in range(n)]
    wal = str(store.wal_path("s"))
    counter, lock = [0], threading.Lock()
    monkeypatch.setattr(_fsutil.faults, "hook", _count_wal_fsyncs(wal, counter, lock))

    written = threading.Barrier(n, timeout=WAIT)
    armed = threading.local()
    acks: list[tuple[int, int]] = []
    original = WalHandle.wait_durable

    def wait_durable(self: WalHandle, end: int) -> None:
        if getattr(armed, "on", False):
            armed.on = False
            written.wait()  # every thread has written its record; nobody has flushed yet
            original(self, end)
            with lock:
                acks.append((end, self._durable_end()))
            return
        original(self, end)

    monkeypatch.setattr(WalHandle, "wait_durable", wait_durable)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            armed.on = True
            spans[i].add_event("e", {"n": 0})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors
    assert counter[0] == 1, f"{counter[0]} fdatasyncs for {n} records written before the first flush"
    assert len(acks) == n
    assert all(durable >= end for end, durable in acks), acks
    trace.close()
    store.close()
    assert _events_per_span(store_dir, "s") == {f"t{i}": [0] for i in range(n)}


def test_threads_that_write_during_a_flush_share_the_next_one(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records that two threads write while a third thread's flush is in flight are not covered
    by it; they wait for it (within a process one flush runs at a time) and are then covered
    together by one more flush: 3 appends, exactly 2 fdatasyncs, each append returning with
    durable_end past its record."""
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    spans = {name: trace.start_span(name) for name in ("a", "b", "c")}
    wal = str(store.wal_path("s"))
    counter, lock = [0], threading.Lock()
    flushing = threading.Event()
    entered = threading.Barrier(3, timeout=WAIT)  # b and c have written their records, and the main thread
    stalled = threading.local()

    def then() -> None:
        if getattr(stalled, "on", False):
            stalled.on = False
            flushing.set()
            entered.wait()  # b's and c's records are written: this flush began before them

    monkeypatch.setattr(_fsutil.faults, "hook", _count_wal_fsyncs(wal, counter, lock, then))
    original = WalHandle.wait_durable
    armed = threading.local()
    acks: list[tuple[str, int, int]] = []

    def wait_durable(self: WalHandle, end: int) -> None:
        name = getattr(armed, "name", None)
        if name in ("b", "c"):
            entered.wait()
        original(self, end)
        if name is not None:
            with lock:
                acks.append((name, end, self._durable_end()))

    monkeypatch.setattr(WalHandle, "wait_durable", wait_durable)
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            armed.name = name
            stalled.on = name == "a"
            spans[name].add_event("e", {"n": 0})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    first = threading.Thread(target=run, args=("a",))
    first.start()
    assert flushing.wait(WAIT)
    others = [threading.Thread(target=run, args=(name,)) for name in ("b", "c")]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(WAIT)
    assert not errors
    assert counter[0] == 2, f"{counter[0]} fdatasyncs for 3 appends"
    assert sorted(a[0] for a in acks) == ["a", "b", "c"]
    assert all(durable >= end for _name, end, durable in acks), acks
    trace.close()
    store.close()
    assert _events_per_span(store_dir, "s") == {"a": [0], "b": [0], "c": [0]}


def test_a_failed_flush_is_not_acknowledged_to_the_threads_it_covered(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the fdatasync that covers several threads' records fails (EIO), every one of those
    appends raises DurabilityError: none is acknowledged, and the failed flush is not retried."""
    n = 4
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    spans = [trace.start_span(f"t{i}") for i in range(n)]
    wal = str(store.wal_path("s"))
    calls = [0]

    def hook(op: str, path: str) -> None:
        if op == "fsync" and path == wal:
            calls[0] += 1
            raise OSError(errno.EIO, "injected EIO")

    monkeypatch.setattr(_fsutil.faults, "hook", hook)
    written = threading.Barrier(n, timeout=WAIT)
    armed = threading.local()
    original = WalHandle.wait_durable

    def wait_durable(self: WalHandle, end: int) -> None:
        if getattr(armed, "on", False):
            armed.on = False
            written.wait()
        original(self, end)

    monkeypatch.setattr(WalHandle, "wait_durable", wait_durable)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        armed.on = True
        try:
            spans[i].add_event("e", {"n": 0})
            result = "acknowledged"
        except DurabilityError:
            result = "DurabilityError"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert outcomes == ["DurabilityError"] * n
    assert calls[0] == 1, "a failed fdatasync was retried"
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    with pytest.raises(DurabilityError):
        spans[0].add_event("e", {"n": 1})  # the session stays failed


def test_free_running_threads_every_acknowledged_append_is_covered(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 threads append 40 events each with no coordination: every append returns with
    durable_end at or past the end of its record, there is at most one fdatasync per append,
    and every acknowledged event is in the WAL, in order per thread."""
    n, per = 8, 40
    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    spans = [trace.start_span(f"t{i}") for i in range(n)]
    wal = str(store.wal_path("s"))
    counter, lock = [0], threading.Lock()
    monkeypatch.setattr(_fsutil.faults, "hook", _count_wal_fsyncs(wal, counter, lock))
    uncovered: list[tuple[int, int]] = []
    original = WalHandle.append

    def append(self: WalHandle, rtype: int, payload: dict[str, Any], session_id: str) -> tuple[int, int]:
        seq, end = original(self, rtype, payload, session_id)
        durable = self._durable_end()
        if durable < end:
            uncovered.append((end, durable))
        return seq, end

    monkeypatch.setattr(WalHandle, "append", append)
    start = threading.Barrier(n, timeout=WAIT)

    def run(i: int) -> None:
        start.wait()
        for k in range(per):
            spans[i].add_event("e", {"n": k})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert uncovered == []
    assert 1 <= counter[0] <= n * per
    trace.close()
    store.close()
    assert _events_per_span(store_dir, "s") == {f"t{i}": list(range(per)) for i in range(n)}


# -- processes ----------------------------------------------------------------------------------


def _leader_and_followers(store_dir: str, i: int, ready: Any, written: Any, leader_flushing: Any, out: Any) -> None:
    """One writer process: append one event; process 0 flushes first, the others only once the
    leader's flush has begun (their records were all written before it did)."""
    try:
        store = walspan.Store(store_dir, install_hooks=False)
        trace = store.open("s")
        span = trace.start_span(f"p{i}")
        wal = str(store.wal_path("s"))
        fsyncs = [0]
        armed = [False]

        def hook(op: str, path: str) -> None:
            if op == "fsync" and path == wal and armed[0]:
                fsyncs[0] += 1
                leader_flushing.set()

        _fsutil.faults.hook = hook
        original = WalHandle.wait_durable
        acks: list[tuple[int, int]] = []

        def wait_durable(self: WalHandle, end: int) -> None:
            if not armed[0]:
                armed[0] = True
                written.wait(WAIT)  # every process has written its record
                if i != 0:
                    assert leader_flushing.wait(WAIT)
            original(self, end)
            acks.append((end, self._durable_end()))

        WalHandle.wait_durable = wait_durable  # type: ignore[method-assign]
        ready.wait(WAIT)  # every process is set up: no setup flush can cover the records below
        span.add_event("e", {"n": 0})
        WalHandle.wait_durable = original  # type: ignore[method-assign]
        _fsutil.faults.hook = None
        trace.close()
        store.close()
        out.put(("ok", i, fsyncs[0], acks))
    except BaseException as exc:  # pragma: no cover - reported by the test
        out.put(("error", i, repr(exc), []))


def test_processes_whose_records_a_flush_in_flight_covers_do_not_flush(store_dir: Path) -> None:
    """8 processes write one record each; one of them then flushes, and the other 7, finding
    that flush in flight (or done) and covering their records, issue no fdatasync of their own:
    exactly one fdatasync acknowledges all 8 appends, each with durable_end past its record."""
    n = 8
    walspan.Store(store_dir, install_hooks=False).open("s").close()
    ctx = mp.get_context("fork")
    ready, written, leader_flushing, out = ctx.Barrier(n), ctx.Barrier(n), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_leader_and_followers, args=(str(store_dir), i, ready, written, leader_flushing, out))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=WAIT) for _ in range(n)]
    for p in procs:
        p.join(WAIT)
    assert [r for r in results if r[0] != "ok"] == []
    assert sum(r[2] for r in results) == 1, [(r[1], r[2]) for r in results]
    for r in results:
        assert len(r[3]) == 1 and r[3][0][1] >= r[3][0][0], r
    assert _events_per_span(store_dir, "s") == {f"p{i}": [0] for i in range(n)}


def _free_writer(store_dir: str, i: int, per: int, start: Any, out: Any) -> None:
    try:
        store = walspan.Store(store_dir, install_hooks=False)
        trace = store.open("s")
        span = trace.start_span(f"p{i}")
        wal = str(store.wal_path("s"))
        fsyncs = [0]

        def hook(op: str, path: str) -> None:
            if op == "fsync" and path == wal:
                fsyncs[0] += 1

        original = WalHandle.append
        uncovered: list[tuple[int, int]] = []

        def append(self: WalHandle, rtype: int, payload: dict[str, Any], session_id: str) -> tuple[int, int]:
            seq, end = original(self, rtype, payload, session_id)
            durable = self._durable_end()
            if durable < end:
                uncovered.append((end, durable))
            return seq, end

        WalHandle.append = append  # type: ignore[method-assign]
        start.wait(WAIT)
        _fsutil.faults.hook = hook
        for k in range(per):
            span.add_event("e", {"n": k})
        _fsutil.faults.hook = None
        trace.close()
        store.close()
        out.put(("ok", i, fsyncs[0], uncovered))
    except BaseException as exc:  # pragma: no cover - reported by the test
        out.put(("error", i, repr(exc), []))


def test_free_running_processes_every_acknowledged_append_is_covered(store_dir: Path) -> None:
    """8 processes append 25 events each to one session with no coordination: every append
    returns with durable_end at or past its record, there is at most one fdatasync per append,
    and every acknowledged event is in the WAL, in order per process."""
    n, per = 8, 25
    walspan.Store(store_dir, install_hooks=False).open("s").close()
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_free_writer, args=(str(store_dir), i, per, start, out)) for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=WAIT) for _ in range(n)]
    for p in procs:
        p.join(WAIT)
    assert [r for r in results if r[0] != "ok"] == []
    assert all(r[3] == [] for r in results), [r[3] for r in results if r[3]]
    assert 1 <= sum(r[2] for r in results) <= n * per
    assert _events_per_span(store_dir, "s") == {f"p{i}": list(range(per)) for i in range(n)}


def _stalled_leader(store_dir: str, flushing: Any, release: Any, done: Any, out: Any) -> None:
    """Append one event whose flush stalls (inside its fdatasync, holding the flush lock)
    until `release` is set; detach only once `done` is set."""
    try:
        store = walspan.Store(store_dir, install_hooks=False)
        trace = store.open("s")
        span = trace.start_span("first")
        wal = str(store.wal_path("s"))
        armed = [True]

        def hook(op: str, path: str) -> None:
            if op == "fsync" and path == wal and armed[0]:
                armed[0] = False
                flushing.set()
                assert release.wait(WAIT)

        _fsutil.faults.hook = hook
        span.add_event("e", {"n": 0})
        _fsutil.faults.hook = None
        assert done.wait(WAIT)  # no flush of ours (the detach) may serve the queued writers
        trace.close()
        store.close()
        out.put(("ok", "first", 1, []))
    except BaseException as exc:  # pragma: no cover - reported by the test
        out.put(("error", "first", repr(exc), []))


def _queued_writer(store_dir: str, i: int, ready: Any, go: Any, written: Any, out: Any) -> None:
    """Append one event after the stalled flush began; report this process's fdatasyncs of
    the WAL and (end, durable mark) when the append returned."""
    try:
        store = walspan.Store(store_dir, install_hooks=False)
        trace = store.open("s")
        span = trace.start_span(f"q{i}")
        wal = str(store.wal_path("s"))
        fsyncs = [0]

        def hook(op: str, path: str) -> None:
            if op == "fsync" and path == wal:
                fsyncs[0] += 1

        original = WalHandle.wait_durable
        acks: list[tuple[int, int]] = []

        def wait_durable(self: WalHandle, end: int) -> None:
            written.set()  # our record is written; the test releases the stalled flush after all are
            original(self, end)
            acks.append((end, self._durable_end()))

        ready.set()
        assert go.wait(WAIT)  # the other process's flush is stalled now
        WalHandle.wait_durable = wait_durable  # type: ignore[method-assign]
        _fsutil.faults.hook = hook
        span.add_event("e", {"n": 0})
        _fsutil.faults.hook = None
        WalHandle.wait_durable = original  # type: ignore[method-assign]
        trace.close()
        store.close()
        out.put(("ok", i, fsyncs[0], acks))
    except BaseException as exc:  # pragma: no cover - reported by the test
        out.put(("error", i, repr(exc), []))


def test_writers_a_flush_in_flight_does_not_cover_share_the_next_one(store_dir: Path) -> None:
    """Records written after a flush began (here: three processes, while another process's
    flush is stalled inside its fdatasync) are not covered by it. Their writers queue for the
    next flush: one of them leads it once the stalled one is done, and that one fdatasync
    covers the whole queue (the others run none); each returns with the durable mark past its
    record, and every event is in the WAL."""
    walspan.Store(store_dir, install_hooks=False).open("s").close()
    ctx = mp.get_context("fork")
    flushing, release, go, done, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    n = 3
    ready = [ctx.Event() for _ in range(n)]
    written = [ctx.Event() for _ in range(n)]
    qs = [ctx.Process(target=_queued_writer, args=(str(store_dir), i, ready[i], go, written[i], out)) for i in range(n)]
    for q in qs:
        q.start()
    for ev in ready:  # attached and span started: no setup flush is pending
        assert ev.wait(WAIT)
    p = ctx.Process(target=_stalled_leader, args=(str(store_dir), flushing, release, done, out))
    p.start()
    try:
        assert flushing.wait(WAIT)
        go.set()
        for ev in written:
            assert ev.wait(WAIT)
    finally:
        release.set()
    try:
        results = [out.get(timeout=WAIT) for _ in range(n)]
    finally:
        done.set()
    results.append(out.get(timeout=WAIT))
    for proc in [p, *qs]:
        proc.join(WAIT)
    assert [r for r in results if r[0] != "ok"] == []
    queued = [r for r in results if r[1] != "first"]
    assert sum(r[2] for r in queued) == 1, [r[2] for r in queued]
    for r in queued:
        assert len(r[3]) == 1 and r[3][0][1] >= r[3][0][0], r
    assert _events_per_span(store_dir, "s") == {"first": [0], **{f"q{i}": [0] for i in range(n)}}


@pytest.mark.parametrize("woken, waits", [(0, False), (1, False), (2, True), (7, True)])
def test_a_leader_waits_for_the_writers_the_last_flush_woke(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch, woken: int, waits: bool
) -> None:
    """commit_delay: when the previous flush woke more than one waiter (writers appending their
    next records right now: processes through the futex, or this process's threads), the next
    leader waits half its last fdatasync (at most 0.2 ms)
    before it reads its target; with one or none it flushes at once. Either way its record is
    covered when the append returns."""
    from walspan import _wal

    store = walspan.Store(store_dir, install_hooks=False)
    trace = store.open("s")
    span = trace.start_span("a")
    h = store._acquire_handle(store._session("s").stem)
    h._last_sync_ns = 300_000
    sleeps: list[float] = []
    monkeypatch.setattr(_wal.time, "sleep", sleeps.append)
    h.shm._mm[120:124] = woken.to_bytes(4, "little")  # what the previous leader recorded
    span.add_event("e", {"n": 0})
    assert sleeps == ([0.00015] if waits else [])
    assert h.shm.durable_end() == store.wal_path("s").stat().st_size
    h._last_sync_ns = 10_000_000  # a slow disk: the wait is capped
    h.shm._mm[120:124] = woken.to_bytes(4, "little")
    sleeps.clear()
    span.add_event("e", {"n": 1})
    assert sleeps == ([0.0002] if waits else [])
    h._woke = woken  # the threads of this process that the last flush woke count the same way
    h._last_sync_ns = 10_000_000
    sleeps.clear()
    span.add_event("e", {"n": 2})
    assert sleeps == ([0.0002] if waits else [])
    store._release_handle(h)
    trace.close()
    store.close()
