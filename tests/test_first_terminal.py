"""First terminal record wins in the fold (DESIGN.md invariant 3), even when a WAL holds two.

The append path refuses a second TERMINAL record under the lock; these tests bypass it by
writing one at byte level (tests/walfiles.py), as a crafted or damaged-and-repaired file could,
and check that every reader (load, the compacted JSON, incremental or from scratch, verify,
open) still takes the first one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import walfiles
from crashkit import read_json, terminal_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walspan
from walspan._format import RecordType, encode_record, pack_payload
from walspan._names import encode_session_id

_T = RecordType


def _append_raw(wal: Path, rtype: int, payload: dict[str, Any]) -> None:
    """Frame one record after the WAL's last valid one (next seq), bypassing every check."""
    *_, (_off, end, _type, seq) = walfiles.record_offsets(wal)
    assert end == os.path.getsize(wal)
    walfiles.append_bytes(wal, encode_record(walfiles.salt_of(wal), rtype, seq + 1, pack_payload(payload)))


@pytest.mark.parametrize("first", ["completed", "error", "crashed"])
def test_a_second_terminal_record_never_wins(tmp_path: Path, first: str) -> None:
    """A WAL with two TERMINAL records (the second written past the append lock's check,
    followed by a span of a late writer): load(), the JSON compacted incrementally from the
    checkpoint the first end() wrote, the JSON rebuilt from scratch, verify and a later open()
    all take the first record's status, message and time; the late span is counted as an
    anomaly, not shown."""
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        t = store.open("s")
        with t.span("work") as span:
            span.add_event("e", {"i": 1})
        t.end(first, message=f"first: {first}")
        wal = Path(store.wal_path("s"))
        (term,) = terminal_records(wal)
        before = store.load("s")
        assert (before["status"], before["status_message"], before["end_time"]) == (
            first,
            f"first: {first}",
            term["time"],
        )
        second = "completed" if first != "completed" else "crashed"
        _append_raw(
            wal, _T.TERMINAL, {"status": second, "message": "second", "time": term["time"] + 10**9, "by": "recovery"}
        )
        _append_raw(
            wal,
            _T.SPAN_START,
            {
                "span_id": "ab" * 8,
                "parent": None,
                "name": "late",
                "kind": "span",
                "attributes": {},
                "input": None,
                "time": term["time"] + 2 * 10**9,
                "writer": "cd" * 8,
            },
        )
        assert [p["status"] for p in terminal_records(wal)] == [first, second]  # the WAL holds both

        after = store.load("s")
        assert (after["status"], after["status_message"], after["end_time"]) == (first, f"first: {first}", term["time"])
        assert [sp["name"] for sp in after["spans"]] == ["work"]
        assert after["anomalies"] == before["anomalies"] + 2
        store.compact("s")  # incremental: resumes from the JSON end() wrote
        assert read_json(store, "s") == after
        os.unlink(store.trace_path("s"))
        store.compact("s")  # from scratch
        assert read_json(store, "s") == after
        report = store.verify()
        assert report.ok, report.errors
        assert [f.status for f in report.files] == [first]
        with pytest.raises(walspan.TraceClosedError) as exc:
            walspan.Store(tmp_path, install_hooks=False).open("s")
        assert exc.value.status == first
    finally:
        store.close()


# -- property: over random record sequences, the fold's outcome is the first terminal's ----------

WRITERS = [f"{i:016x}" for i in range(1, 4)]
SPANS = [f"{0x100 + i:016x}" for i in range(12)]
STATUSES = ("completed", "error", "crashed")

_op = st.one_of(
    st.tuples(st.just("attach"), st.sampled_from(WRITERS)),
    st.tuples(st.just("detach"), st.sampled_from(WRITERS)),
    st.tuples(st.just("lost"), st.sampled_from(WRITERS)),
    st.tuples(st.just("start"), st.sampled_from(WRITERS), st.sampled_from(SPANS)),
    st.tuples(st.just("event"), st.sampled_from(WRITERS), st.sampled_from(SPANS)),
    st.tuples(st.just("end"), st.sampled_from(WRITERS), st.sampled_from(SPANS)),
    st.tuples(st.just("meta"), st.sampled_from(WRITERS), st.integers(0, 5)),
    st.tuples(st.just("terminal"), st.sampled_from(STATUSES), st.integers(0, 3)),
)
# Thousands of records from a small drawing (so hypothesis can still shrink a failure): each
# op comes with how many times it repeats; at least two TERMINAL records go in at random places,
# besides the ones the op list may hold.
_ops = st.lists(st.tuples(_op, st.integers(1, 120)), min_size=20, max_size=60)
_terminals = st.lists(
    st.tuples(st.integers(0, 10**6), st.sampled_from(STATUSES), st.integers(0, 3)), min_size=2, max_size=6
)


def _records(ops: list[tuple[Any, ...]]) -> list[tuple[int, dict[str, Any]]]:
    """(type, payload) for a trace start, its creator's attach, then one record per op."""
    now = 1_700_000_000 * 10**9
    out: list[tuple[int, dict[str, Any]]] = [
        (_T.TRACE_START, {"trace_id": "ef" * 16, "session_id": "p", "metadata": {}, "time": now, "writer": WRITERS[0]}),
        (_T.WRITER_ATTACH, {"writer": WRITERS[0], "host": "h", "pid": 1, "process_start": 1.0, "time": now}),
    ]
    for i, op in enumerate(ops, start=1):
        t = now + i * 1000
        kind = op[0]
        if kind == "attach":
            out.append((_T.WRITER_ATTACH, {"writer": op[1], "host": "h", "pid": 2, "process_start": 1.0, "time": t}))
        elif kind == "detach":
            out.append((_T.WRITER_DETACH, {"writer": op[1], "time": t}))
        elif kind == "lost":
            out.append((_T.WRITER_LOST, {"lost": op[1], "message": "gone", "time": t, "by": "recovery"}))
        elif kind == "start":
            out.append(
                (
                    _T.SPAN_START,
                    {
                        "span_id": op[2],
                        "parent": None,
                        "name": f"n{i}",
                        "kind": "span",
                        "attributes": {},
                        "input": None,
                        "time": t,
                        "writer": op[1],
                    },
                )
            )
        elif kind == "event":
            out.append(
                (_T.SPAN_EVENT, {"span_id": op[2], "name": f"e{i}", "attributes": {}, "time": t, "writer": op[1]})
            )
        elif kind == "end":
            out.append((_T.SPAN_END, {"span_id": op[2], "status": "ok", "time": t, "writer": op[1]}))
        elif kind == "meta":
            out.append((_T.METADATA, {"metadata": {f"k{op[2]}": i}, "time": t, "writer": op[1]}))
        else:
            out.append(
                (_T.TERMINAL, {"status": op[1], "message": f"terminal {i}", "time": t, "writer": WRITERS[op[2] % 3]})
            )
    return out


def _load(directory: str, records: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Write the records as a WAL (byte level) into a store directory and load() it."""
    data = walfiles.build_wal(0xFACE, [(rt, seq, pack_payload(p)) for seq, (rt, p) in enumerate(records, start=1)])
    with open(os.path.join(directory, encode_session_id("p") + ".wal"), "wb") as f:
        f.write(data)
    return walspan.Store(directory, install_hooks=False).load("p")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=_ops, terminals=_terminals)
def test_fold_outcome_is_the_first_terminal_records(
    drawn: list[tuple[tuple[Any, ...], int]], terminals: list[tuple[int, str, int]]
) -> None:
    """For thousands of random records (spans, events, writers attaching, detaching and lost,
    two or more TERMINAL records anywhere), written as a WAL and loaded, the trace's status,
    status message and end time are those of the first TERMINAL record, and nothing after it
    changes the trace: its spans and metadata equal the load of the records up to it."""
    ops = [op for op, times in drawn for _ in range(times)]
    for at, status, who in terminals:
        ops.insert(at % (len(ops) + 1), ("terminal", status, who))
    records = _records(ops)
    first = next((i for i, (rt, _p) in enumerate(records) if rt == _T.TERMINAL), None)
    with tempfile.TemporaryDirectory() as d:
        trace = _load(d, records)
        assert first is not None and sum(1 for rt, _p in records if rt == _T.TERMINAL) >= 2
        assert len(records) >= 20
        p = records[first][1]
        assert (trace["status"], trace["status_message"], trace["end_time"]) == (p["status"], p["message"], p["time"])
        os.unlink(os.path.join(d, encode_session_id("p") + ".wal"))
        upto = _load(d, records[: first + 1])
        assert trace["spans"] == upto["spans"]
        assert trace["metadata"] == upto["metadata"]
        assert trace["status"] == upto["status"] and trace["end_time"] == upto["end_time"]
