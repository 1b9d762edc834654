"""Many open sessions in one long-lived process: descriptors stay bounded by the LRU, and
evicting a descriptor never ends or detaches a trace."""

from __future__ import annotations

import os
from pathlib import Path

from crashkit import wal_records

import walspan
from walspan._format import RecordType

N_SESSIONS = 200


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_hundreds_of_open_sessions_keep_descriptors_bounded(tmp_path: Path) -> None:
    """200 sessions open at once through Store(max_open_files=8), each written to in turn and
    again after its descriptors were evicted: the process's descriptor count stays bounded
    (4 per cached WAL handle plus a constant, not per session), every append lands, and no
    session is detached or ended by eviction."""
    store = walspan.Store(tmp_path, durability="process", install_hooks=False, max_open_files=8)
    baseline = _open_fds()
    traces = []
    peak = 0
    for i in range(N_SESSIONS):
        t = store.open(f"session-{i}", metadata={"n": i})
        t.start_span("first").end()
        traces.append(t)
        peak = max(peak, _open_fds())
    for i, t in enumerate(traces):  # every handle was evicted long ago: reopened transparently
        t.start_span("second", attributes={"n": i}).end()
        peak = max(peak, _open_fds())
    # per cached handle: WAL, lock file, shared-state file and mmap's own duplicate of it
    assert peak - baseline <= 4 * 8 + 4, (baseline, peak)
    for i in (0, 1, N_SESSIONS // 2, N_SESSIONS - 1):
        types = [t for t, _ in wal_records(store.wal_path(f"session-{i}"))]
        assert RecordType.WRITER_DETACH not in types and RecordType.TERMINAL not in types
        loaded = store.load(f"session-{i}")
        assert loaded["status"] == "running"
        assert [w["state"] for w in loaded["writers"]] == ["attached"]
        assert [s["name"] for s in loaded["spans"]] == ["first", "second"]
    # a recovery meanwhile sees a live writer everywhere: nothing crashed
    assert store.recover().actions == []
    store.close()
    assert _open_fds() <= baseline
    for i in range(N_SESSIONS):
        loaded = store.load(f"session-{i}")
        assert loaded["status"] == "running" and [w["state"] for w in loaded["writers"]] == ["detached"]


def test_ending_some_sessions_leaves_the_others_open(tmp_path: Path) -> None:
    """In one process with many sessions and a small descriptor cache, ending or crashing some
    sessions changes nothing for the others (sessions are isolated, invariant 9)."""
    store = walspan.Store(tmp_path, durability="process", install_hooks=False, max_open_files=4)
    traces = [store.open(f"s{i}") for i in range(40)]
    for i, t in enumerate(traces):
        if i % 3 == 0:
            t.crash(f"crash {i}")
        elif i % 3 == 1:
            t.end("completed")
    for i, t in enumerate(traces):
        if i % 3 == 2:
            t.start_span("still going").end()
    store.close()
    for i in range(40):
        status = store.load(f"s{i}")["status"]
        assert status == ("crashed", "completed", "running")[i % 3], (i, status)
