"""Threads of one process hand their records to one writer (walspan/_wal.py, "Appends within
a process"): while one thread writes, the others queue their records, and the next writer
writes the whole queue with one append-lock round-trip and one pwrite. Synchronised with
events: the first writer is held inside its write until every other thread has queued."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import walspan
from walspan import _fsutil, _locking
from walspan._compactor import fold_wal

WAIT = 60  # safety net only


class _SignalList(list):  # type: ignore[type-arg]
    """The handle's queue, setting `full` once it holds `n` records."""

    def __init__(self, n: int, full: threading.Event) -> None:
        super().__init__()
        self.n, self.full = n, full

    def append(self, item: Any) -> None:
        super().append(item)
        if len(self) >= self.n:
            self.full.set()


@pytest.mark.parametrize("durability", ["process", "durable"])
def test_records_queued_during_a_write_go_out_in_one_locked_write(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """Thread 0 writes and is held inside its pwrite; 7 more threads append meanwhile and queue.
    Then exactly one more append-lock round-trip and one more pwrite carry all 7 records; every
    append returns its own seq (consecutive), and every event is in the WAL once."""
    store = walspan.Store(store_dir, durability=durability, install_hooks=False)
    trace = store.open("s")
    spans = [trace.start_span(f"t{i}") for i in range(8)]
    wal = str(store.wal_path("s"))
    h = store._acquire_handle(store._session("s").stem)
    queued, in_write, go = threading.Event(), threading.Event(), threading.Event()
    h._queue = _SignalList(7, queued)
    writes, locks = [0], [0]

    def hook(op: str, path: str) -> None:
        if op == "write" and path == wal:
            writes[0] += 1
            if writes[0] == 1:
                in_write.set()
                assert go.wait(WAIT)

    lock = _locking.lock

    def counting_lock(fd: int) -> None:
        if fd == h._lock_fd:
            locks[0] += 1
        lock(fd)

    monkeypatch.setattr(_fsutil.faults, "hook", hook)
    monkeypatch.setattr(_locking, "lock", counting_lock)
    seqs: dict[int, int] = {}
    original = h.append

    def run(i: int) -> None:
        span = spans[i]
        span.add_event("e", {"n": i})

    def append(rtype: int, payload: dict[str, Any], session_id: str) -> tuple[int, int]:
        seq, end = original(rtype, payload, session_id)
        seqs[payload["attributes"]["n"]] = seq
        return seq, end

    monkeypatch.setattr(h, "append", append)
    first = threading.Thread(target=run, args=(0,))
    first.start()
    assert in_write.wait(WAIT)
    others = [threading.Thread(target=run, args=(i,)) for i in range(1, 8)]
    for t in others:
        t.start()
    assert queued.wait(WAIT)
    go.set()
    for t in [first, *others]:
        t.join(WAIT)
    assert writes[0] == 2 and locks[0] == 2, (writes, locks)
    assert sorted(seqs.values()) == list(range(seqs[0], seqs[0] + 8))
    store._release_handle(h)
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    trace.close()
    store.close()
    fold, _scan = fold_wal(wal)
    assert {s["name"]: [e["attributes"]["n"] for e in s["events"]] for s in fold.spans.values()} == {
        f"t{i}": [i] for i in range(8)
    }


def test_a_batch_after_the_terminal_record_is_refused_record_by_record(store_dir: Path) -> None:
    """First terminal record wins inside a batch too: records queued behind a TERMINAL in the same
    batch are refused with TraceClosedError and nothing of them is written."""
    from walspan._format import RecordType
    from walspan._wal import _Pending

    store = walspan.Store(store_dir, durability="process", install_hooks=False)
    trace = store.open("s")
    span = trace.start_span("a")
    h = store._acquire_handle(store._session("s").stem)
    pack = walspan._format.pack_payload
    batch = [
        _Pending(int(RecordType.SPAN_EVENT), pack({"span_id": span.span_id, "name": "x", "attributes": {}, "time": 1})),
        _Pending(int(RecordType.TERMINAL), pack({"status": "completed", "message": "done", "time": 2})),
        _Pending(int(RecordType.SPAN_EVENT), pack({"span_id": span.span_id, "name": "y", "attributes": {}, "time": 3})),
    ]
    with h._exclusive():
        h._write_batch(batch, "s")
    assert batch[0].error is None and batch[1].error is None
    assert isinstance(batch[2].error, walspan.TraceClosedError) and "completed" in str(batch[2].error)
    assert batch[2].end == 0
    size = store.wal_path("s").stat().st_size
    assert size == batch[1].end
    store._release_handle(h)
    doc = store.load("s")
    assert doc["status"] == "completed" and [e["name"] for e in doc["spans"][0]["events"]] == ["x"]
    store.close()
