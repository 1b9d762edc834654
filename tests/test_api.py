"""The public API contract of issue 3: names, return types, errors, first terminal wins,
durable identity, and "acknowledged means written"."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from walfiles import record_offsets

import walspan
from walspan import (
    CorruptWALError,
    SessionNotFoundError,
    TraceClosedError,
    WalspanError,
)
from walspan._format import RecordType

CTX = multiprocessing.get_context("fork")
TIMEOUT = 60


def test_public_names() -> None:
    """The names issue 3 promises are exported from the package."""
    for name in ["Store", "Trace", "Span", "attach_from_env", "current_span", "TRUNCATION_MARKER",
                 "WalspanError", "CorruptWALError", "TraceClosedError", "SessionNotFoundError", "DurabilityError"]:
        assert hasattr(walspan, name), name
        assert name in walspan.__all__


def test_error_hierarchy() -> None:
    """Every walspan error derives from WalspanError; SessionNotFoundError is a LookupError."""
    for exc in (CorruptWALError, TraceClosedError, SessionNotFoundError, walspan.DurabilityError):
        assert issubclass(exc, WalspanError)
    assert issubclass(SessionNotFoundError, LookupError)
    assert issubclass(walspan.DurabilityError, OSError)


def test_return_types_and_canonical_shape(store: walspan.Store) -> None:
    """open -> Trace, start_span -> Span, load -> dict with the documented keys, compact and end
    -> an existing Path; sessions() lists raw ids; wal_path/trace_path are Paths in the store."""
    t = store.open("ses_123", metadata={"title": "fix the bug"})
    assert isinstance(t, walspan.Trace) and t.session_id == "ses_123"
    assert len(t.trace_id) == 32 and all(c in "0123456789abcdef" for c in t.trace_id)
    with t.span("bash", kind="tool", attributes={"cmd": "ls"}, input="ls") as span:
        assert isinstance(span, walspan.Span) and walspan.current_span.get() is span
        span.set_attributes({"exit_code": 0})
        span.add_event("stdout", {"bytes": 120})
        child = t.start_span("inner")
        assert child.parent_span_id == span.span_id
        child.end()
    assert walspan.current_span.get() is None
    g = t.start_span("llm", kind="generation")
    assert g.parent_span_id is None
    g.end(status="ok", output="...")
    t.set_metadata(prompt="p")
    doc = store.load("ses_123")
    for key in ["session_id", "trace_id", "status", "status_message", "metadata", "spans"]:
        assert key in doc
    assert doc["status"] == "running" and doc["metadata"] == {"title": "fix the bug", "prompt": "p"}
    s0 = doc["spans"][0]
    for key in ["span_id", "parent_span_id", "name", "kind", "start_time", "end_time", "status", "attributes", "events", "input", "output"]:
        assert key in s0
    assert (s0["name"], s0["kind"], s0["attributes"], s0["input"]) == ("bash", "tool", {"cmd": "ls", "exit_code": 0}, "ls")
    assert s0["events"][0]["name"] == "stdout" and isinstance(s0["end_time"], int)
    cp = store.compact("ses_123")
    assert isinstance(cp, Path) and cp.exists() and cp == store.trace_path("ses_123")
    path = t.end(status="completed")
    assert isinstance(path, Path) and path.exists()
    assert store.load("ses_123")["status"] == "completed"
    assert store.sessions() == ["ses_123"]
    assert store.wal_path("ses_123").parent == Path(store.directory)


def test_span_exception_marks_error(store: walspan.Store) -> None:
    """An exception escaping `with trace.span()` ends the span with status error, then propagates."""
    t = store.open("e")
    with pytest.raises(RuntimeError), t.span("boom"):
        raise RuntimeError("bad")
    s = store.load("e")["spans"][0]
    assert s["status"] == "error" and "RuntimeError: bad" in s["status_message"]


def test_unknown_session_is_lookup_error(store: walspan.Store) -> None:
    """load()/compact() of an unknown session raise SessionNotFoundError (a LookupError) and
    create nothing."""
    for call in (store.load, store.compact):
        with pytest.raises(LookupError) as ei:
            call("nope")
        assert isinstance(ei.value, SessionNotFoundError) and "nope" in str(ei.value)
    assert not store.wal_path("nope").exists() and not store.trace_path("nope").exists()


@pytest.mark.parametrize("kwargs, exc", [
    ({"durability": "fast"}, ValueError),
    ({"durability": None}, TypeError),
    ({"durability": 1}, TypeError),
    ({"install_hooks": "yes"}, TypeError),
    ({"max_open_files": 0}, ValueError),
])
def test_bad_construction_refused(tmp_path: Path, kwargs: dict, exc: type) -> None:
    """A bad durability value or argument type is refused at construction, creating nothing."""
    with pytest.raises(exc):
        walspan.Store(tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()


def test_bad_directory_refused(tmp_path: Path) -> None:
    """A non-path directory is a TypeError; a file where the directory should be, or a missing
    directory with create=False, is an OSError."""
    with pytest.raises(TypeError):
        walspan.Store(123)  # type: ignore[arg-type]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError):
        walspan.Store(f)
    with pytest.raises(OSError):
        walspan.Store(tmp_path / "missing", create=False)


def test_closed_trace_refuses_everything(store: walspan.Store) -> None:
    """Invariant 3: after end(), every append -- from this Trace, another Trace object, a span
    started before the end, open() -- raises TraceClosedError and the WAL is unchanged."""
    t = store.open("c")
    other = store.open("c")
    early = t.start_span("early")
    t.end("error", "it failed")
    wal = store.wal_path("c")
    before = wal.read_bytes()
    calls = [
        lambda: t.start_span("x"),
        lambda: t.set_metadata(a=1),
        lambda: t.end("completed"),
        lambda: t.crash("late"),
        lambda: other.start_span("x"),
        lambda: other.end(),
        lambda: early.set_attributes({"a": 1}),
        lambda: early.add_event("e"),
        lambda: early.end(),
        lambda: store.open("c"),
    ]
    for call in calls:
        with pytest.raises(TraceClosedError) as ei:
            call()
        assert ei.value.status == "error" and "it failed" in str(ei.value)
    assert wal.read_bytes() == before
    doc = store.load("c")
    assert (doc["status"], doc["status_message"]) == ("error", "it failed")
    assert doc["spans"][0]["status"] == "interrupted"
    t.close()
    other.close()
    assert wal.read_bytes() == before


def _append_after_end(directory: str, q) -> None:
    s = walspan.Store(directory, install_hooks=False)
    out = []
    try:
        s.open("c")
    except TraceClosedError as exc:
        out.append(("open", exc.status))
    q.put(out)


def test_closed_trace_refuses_other_process(store: walspan.Store) -> None:
    """Invariant 3: another process cannot open (or append to) an ended trace; nothing written."""
    t = store.open("c")
    t.crash("boom")
    before = store.wal_path("c").read_bytes()
    q = CTX.Queue()
    p = CTX.Process(target=_append_after_end, args=(store.directory, q))
    p.start()
    got = q.get(timeout=TIMEOUT)
    p.join(TIMEOUT)
    assert got == [("open", "crashed")]
    assert store.wal_path("c").read_bytes() == before


def _race_terminal(directory: str, sid: str, how: str, barrier, q) -> None:
    s = walspan.Store(directory, install_hooks=False)
    t = s.open(sid)
    barrier.wait(TIMEOUT)
    try:
        if how == "end":
            t.end("completed")
        else:
            t.crash("killed")
        q.put((how, "won"))
    except TraceClosedError as exc:
        q.put((how, "lost:" + exc.status))


def test_first_terminal_record_wins_across_processes(tmp_path: Path) -> None:
    """Invariant 3 (closes M1/M3): end() racing crash() from two processes leaves exactly one
    terminal record; the loser gets TraceClosedError naming the winner's status; the JSON's
    status is the first terminal record's status. Several rounds, each its own session."""
    directory = str(tmp_path)
    for rnd in range(6):
        sid = f"race{rnd}"
        barrier = CTX.Barrier(2)
        q = CTX.Queue()
        procs = [CTX.Process(target=_race_terminal, args=(directory, sid, how, barrier, q)) for how in ("end", "crash")]
        for p in procs:
            p.start()
        results = dict(q.get(timeout=TIMEOUT) for _ in procs)
        for p in procs:
            p.join(TIMEOUT)
        winners = [h for h, r in results.items() if r == "won"]
        assert len(winners) == 1, results
        s = walspan.Store(directory, install_hooks=False)
        wal = s.wal_path(sid)
        terminals = [r for r in record_offsets(wal) if r[2] == RecordType.TERMINAL]
        assert len(terminals) == 1
        status = "completed" if winners[0] == "end" else "crashed"
        loser = "crash" if winners[0] == "end" else "end"
        assert results[loser] == "lost:" + status
        import json
        assert json.loads(s.trace_path(sid).read_bytes())["status"] == status
        assert s.load(sid)["status"] == status
        s.close()


REOPEN = textwrap.dedent("""
    import json, sys, walspan
    s = walspan.Store(sys.argv[1], install_hooks=False)
    t = s.open(sys.argv[2])
    t.start_span("second-process", parent=None).end()
    print(json.dumps({"trace_id": t.trace_id, "session_id": t.session_id}))
    t.close(); s.close()
""")


def test_reopen_from_new_process_keeps_identity(store: walspan.Store) -> None:
    """Invariant 7: a NEW process reopening the session continues the same trace: same trace id,
    same raw session id and metadata, earlier spans kept (including one still open)."""
    sid = "Ses/1:é"
    t = store.open(sid, metadata={"title": "t"})
    t.start_span("first").end()
    t.start_span("still-open")
    trace_id = t.trace_id
    t.close()
    out = subprocess.run([sys.executable, "-c", REOPEN, store.directory, sid], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert out.returncode == 0, out.stderr
    import json
    assert json.loads(out.stdout) == {"trace_id": trace_id, "session_id": sid}
    doc = store.load(sid)
    assert doc["trace_id"] == trace_id and doc["session_id"] == sid and doc["metadata"] == {"title": "t"}
    assert [(s["name"], s["status"]) for s in doc["spans"]] == [("first", "ok"), ("still-open", "open"), ("second-process", "ok")]
    t2 = store.open(sid)
    assert t2.trace_id == trace_id


def _ack_then_wait(directory: str, durability: str, conn, go) -> None:
    s = walspan.Store(directory, durability=durability, install_hooks=False)
    t = s.open("ack")
    for i in range(5):
        sp = t.start_span(f"s{i}")
        sp.end()
        conn.send(i)  # acknowledged: the append calls returned
    go.wait(TIMEOUT)  # stay alive (and hold nothing) while the parent reads
    conn.send("bye")


@pytest.mark.parametrize("durability", ["durable", "process"])
def test_acknowledged_means_written_visible_to_fresh_reader(tmp_path: Path, durability: str) -> None:
    """Invariant 1: once an append returns, a reader opening the file fresh sees the record
    while the writer is still alive (no user-space buffering)."""
    parent, child = CTX.Pipe()
    go = CTX.Event()
    p = CTX.Process(target=_ack_then_wait, args=(str(tmp_path), durability, child, go))
    p.start()
    acked = [parent.recv() for _ in range(5)] if parent.poll(TIMEOUT) else []
    assert acked == [0, 1, 2, 3, 4]
    s = walspan.Store(tmp_path, install_hooks=False)
    spans = s.load("ack")["spans"]
    assert [(x["name"], x["status"]) for x in spans] == [(f"s{i}", "ok") for i in range(5)]
    go.set()
    assert parent.recv() == "bye"
    p.join(TIMEOUT)


def _ack_forever(directory: str, durability: str, conn) -> None:
    s = walspan.Store(directory, durability=durability, install_hooks=False)
    t = s.open("kill")
    i = 0
    while True:
        t.start_span(f"s{i}", parent=None)
        conn.send(i)
        i += 1


@pytest.mark.parametrize("durability", ["durable", "process"])
def test_sigkill_right_after_acks_keeps_them(tmp_path: Path, durability: str) -> None:
    """Invariant 1: a writer killed with SIGKILL right after acknowledging appends keeps every
    acknowledged record (at most one unacknowledged record may follow)."""
    parent, child = CTX.Pipe(duplex=False)
    p = CTX.Process(target=_ack_forever, args=(str(tmp_path), durability, child))
    p.start()
    acked = []
    while len(acked) < 30:
        assert parent.poll(TIMEOUT)
        acked.append(parent.recv())
    os.kill(p.pid, signal.SIGKILL)
    p.join(TIMEOUT)
    while parent.poll(0):
        acked.append(parent.recv())
    s = walspan.Store(tmp_path, install_hooks=False)
    names = [x["name"] for x in s.load("kill")["spans"]]
    assert names[: len(acked)] == [f"s{i}" for i in acked]
    assert len(names) <= len(acked) + 1
    s.close()


def test_with_trace_detaches(store: walspan.Store) -> None:
    """`with store.open(...)` detaches on exit without ending: the trace stays running and can
    be reopened and continued."""
    with store.open("w") as t:
        t.start_span("a").end()
    doc = store.load("w")
    assert doc["status"] == "running"
    assert [w["state"] for w in doc["writers"]] == ["detached"]
    with store.open("w") as t2:
        t2.start_span("b").end()
    assert [s["name"] for s in store.load("w")["spans"]] == ["a", "b"]


def test_corrupt_wal_gives_clear_error_nothing_lost(store: walspan.Store) -> None:
    """A WAL with damage before valid records makes load(), compact() and open() raise
    CorruptWALError with the path and offset, and none of them rewrites the WAL."""
    t = store.open("bad")
    for i in range(3):
        t.start_span(f"s{i}").end()
    t.close()
    wal = store.wal_path("bad")
    recs = record_offsets(wal)
    data = bytearray(wal.read_bytes())
    data[recs[2][0] + 21] ^= 0xFF
    wal.write_bytes(bytes(data))
    for call in (store.load, store.compact, store.open):
        with pytest.raises(CorruptWALError) as ei:
            call("bad")
        assert ei.value.offset == recs[2][0] and str(wal) in str(ei.value)
    assert wal.read_bytes() == bytes(data)


def _attached_then_append(directory: str, ready, go, conn) -> None:
    s = walspan.Store(directory, install_hooks=False)
    t = s.open("c2")
    sp = t.start_span("child-span")
    ready.set()
    go.wait(TIMEOUT)
    out = []
    for name, call in [("start", lambda: t.start_span("late")), ("attrs", lambda: sp.set_attributes({"a": 1})),
                       ("end-span", lambda: sp.end()), ("end", lambda: t.end())]:
        try:
            call()
            out.append((name, "written"))
        except TraceClosedError as exc:
            out.append((name, exc.status))
    conn.send(out)


def test_closed_trace_refuses_appends_from_an_attached_process(tmp_path: Path) -> None:
    """Invariant 3: a process that attached before the trace ended gets TraceClosedError on its
    every later append, and nothing is written after the terminal record."""
    ready, go = CTX.Event(), CTX.Event()
    rx, tx = CTX.Pipe(duplex=False)
    p = CTX.Process(target=_attached_then_append, args=(str(tmp_path), ready, go, tx))
    p.start()
    assert ready.wait(TIMEOUT)
    s = walspan.Store(tmp_path, install_hooks=False)
    s.open("c2").end("completed")
    before = s.wal_path("c2").read_bytes()
    go.set()
    assert rx.poll(TIMEOUT)
    assert rx.recv() == [("start", "completed"), ("attrs", "completed"), ("end-span", "completed"), ("end", "completed")]
    p.join(TIMEOUT)
    assert s.wal_path("c2").read_bytes() == before
    assert s.load("c2")["spans"][0]["status"] == "interrupted"
    s.close()
