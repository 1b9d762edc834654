"""The `interval` durability level (walspan/_wal.py, DESIGN.md §5).

An append returns once its record is written to the kernel (it survives the death of the
process, as in `process`); a background flusher, one thread per process, fdatasyncs each WAL
this process wrote to at most every `flush_interval` seconds, through the group commit, and only
when what it wrote is not yet under the durable mark. What a power loss may take is pinned in
test_powerloss.py. These tests count fdatasyncs of the WAL through the fault hook and wait for
the flusher's flushes through events set when it publishes the durable mark: no sleeps.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import walspan
from walspan import _fsutil, _shm
from walspan._wal import WalHandle, check_durability

WAIT = 60  # safety net for every blocking wait, in seconds: never reached when the code is right


def _durable_mark(store: walspan.Store, sid: str = "s") -> int:
    h = store._acquire_handle(store._session(sid).stem)
    try:
        return h.shm.durable_end()
    finally:
        store._release_handle(h)


class _Flushes:
    """Counts fdatasyncs of one WAL (and the thread that ran each) and lets a test wait for the
    n-th durable mark published after a flush."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, wal: str) -> None:
        self.lock = threading.Condition()
        self.syncs: list[tuple[str, float]] = []
        self.published = 0
        original = _shm.SharedState.publish_flushed

        def publish(shm: _shm.SharedState, gen: int, end: int) -> None:
            original(shm, gen, end)
            with self.lock:
                self.published += 1
                self.lock.notify_all()

        def hook(op: str, path: str) -> None:
            if op == "fsync" and path == wal:
                with self.lock:
                    self.syncs.append((threading.current_thread().name, time.monotonic()))

        monkeypatch.setattr(_shm.SharedState, "publish_flushed", publish)
        monkeypatch.setattr(_fsutil.faults, "hook", hook)

    def wait_published(self, n: int) -> None:
        with self.lock:
            assert self.lock.wait_for(lambda: self.published >= n, WAIT), "the flusher never flushed"


def test_interval_append_is_written_before_it_returns_and_flushed_by_the_flusher(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 appends in the interval level run no fdatasync in the appending thread; each record
    is in the file when its append returns (readable by another descriptor); the background
    flusher then raises the durable mark past the last of them."""
    store = walspan.Store(store_dir, durability="interval", flush_interval=0.02, install_hooks=False)
    trace = store.open("s")
    span = trace.start_span("work")
    wal = str(store.wal_path("s"))
    flushes = _Flushes(monkeypatch, wal)
    sizes = []
    for n in range(2000):
        span.add_event("e", {"n": n, "pad": "x" * (n % 300)})
        sizes.append(os.path.getsize(wal))
    assert sizes == sorted(sizes) and len(set(sizes)) == 2000  # every append grew the file at once
    main = threading.current_thread().name
    with flushes.lock:
        assert [name for name, _t in flushes.syncs if name == main] == []
    end = os.path.getsize(wal)
    base = flushes.published
    while _durable_mark(store) < end:
        flushes.wait_published(base + 1)
        base += 1
    with flushes.lock:
        assert flushes.syncs and all(name == "walspan-flusher" for name, _t in flushes.syncs)
    doc = store.load("s")
    assert [e["attributes"]["n"] for e in doc["spans"][0]["events"]] == list(range(2000))
    trace.close()
    store.close()


def test_interval_flushes_are_at_least_one_interval_apart_and_skip_a_clean_wal(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a writer keeps appending, the flusher's fdatasyncs start at least `flush_interval`
    apart ("at most every N ms"); once everything written is under the durable mark, the
    flusher's later rounds run no fdatasync."""
    interval = 0.03
    store = walspan.Store(store_dir, durability="interval", flush_interval=interval, install_hooks=False)
    trace = store.open("s")
    span = trace.start_span("work")
    flushes = _Flushes(monkeypatch, str(store.wal_path("s")))
    n = 0
    while flushes.published < 5:  # append until the flusher has flushed five times
        span.add_event("e", {"n": n})
        n += 1
    with flushes.lock:
        starts = [t for _name, t in flushes.syncs]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps and min(gaps) >= interval * 0.99, gaps
    # now clean: let the flusher run more rounds and count its flushes
    end = os.path.getsize(str(store.wal_path("s")))
    while _durable_mark(store) < end:
        flushes.wait_published(flushes.published + 1)
    rounds = threading.Event()
    calls = [0]
    original = WalHandle.flush_written

    def flush_written(self: WalHandle) -> None:
        original(self)
        calls[0] += 1
        if calls[0] >= 3:
            rounds.set()

    monkeypatch.setattr(WalHandle, "flush_written", flush_written)
    with flushes.lock:
        before = len(flushes.syncs)
    assert rounds.wait(WAIT)
    with flushes.lock:
        assert len(flushes.syncs) == before
    trace.close()
    store.close()


def test_interval_close_flushes_what_the_flusher_has_not(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an interval far longer than the test, closing the store flushes (one fdatasync
    covering every record of this process, the detach included): a clean shutdown leaves
    nothing for a power loss to take."""
    store = walspan.Store(store_dir, durability="interval", flush_interval=60, install_hooks=False)
    trace = store.open("s")
    span = trace.start_span("work")
    wal = str(store.wal_path("s"))
    flushes = _Flushes(monkeypatch, wal)
    for n in range(500):
        span.add_event("e", {"n": n})
    trace.close()
    with flushes.lock:
        assert flushes.syncs == []
    store.close()
    with flushes.lock:
        assert len(flushes.syncs) == 1
    salt = walspan._format.decode_file_header(Path(wal).read_bytes()[:32])
    st = _shm.read_state(wal, salt, os.path.getsize(wal))
    assert st is not None and st.durable_end == os.path.getsize(wal)


def _forked_interval_writer(store_dir: str, out: Any) -> None:
    try:
        store = walspan.Store(store_dir, durability="interval", flush_interval=0.01, install_hooks=False)
        trace = store.open("s")
        span = trace.start_span("child")
        for n in range(300):
            span.add_event("e", {"n": n})
        end = os.path.getsize(str(store.wal_path("s")))
        h = store._acquire_handle(store._session("s").stem)
        done = threading.Event()
        original = _shm.SharedState.publish_flushed

        def publish(shm: _shm.SharedState, gen: int, e: int) -> None:
            original(shm, gen, e)
            if e >= end:
                done.set()

        _shm.SharedState.publish_flushed = publish  # type: ignore[method-assign]
        flushed = h.shm.durable_end() >= end or done.wait(WAIT)
        store._release_handle(h)
        out.put(("ok", flushed))
        out.close()
        out.join_thread()  # os._exit would drop what the queue's feeder thread has not sent
        os._exit(0)  # no close: only the child's own flusher can have flushed
    except BaseException as exc:  # pragma: no cover - reported by the test
        out.put(("error", repr(exc)))
        out.close()
        out.join_thread()
        os._exit(1)


def test_interval_flusher_runs_in_a_forked_child(store_dir: Path) -> None:
    """A process forked from one that uses the interval level gets its own flusher (threads do
    not survive fork): its appends are flushed without any close."""
    store = walspan.Store(store_dir, durability="interval", flush_interval=0.01, install_hooks=False)
    store.open("s").start_span("parent").end()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_forked_interval_writer, args=(str(store_dir), out))
    p.start()
    result = out.get(timeout=WAIT)
    p.join(WAIT)
    assert result == ("ok", True)
    store.close()


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"flush_interval": 0}, ValueError),
        ({"flush_interval": 61}, ValueError),
        ({"flush_interval": "0.1"}, TypeError),
        ({"flush_interval": True}, TypeError),
    ],
)
def test_bad_flush_interval_is_refused(store_dir: Path, kwargs: dict[str, Any], exc: type[Exception]) -> None:
    """flush_interval is seconds, a number between 0.001 and 60: anything else is refused at
    construction with an error naming it."""
    with pytest.raises(exc, match="flush_interval"):
        walspan.Store(store_dir, durability="interval", install_hooks=False, **kwargs)


def test_interval_is_a_durability_level() -> None:
    """"interval" is accepted wherever a durability level is checked; an unknown one is refused
    with the list of levels."""
    assert check_durability("interval") == "interval"
    with pytest.raises(ValueError, match="interval"):
        check_durability("everysec")
