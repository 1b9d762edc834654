"""The failures that motivated walspan (DESIGN.md §1), each reproduced against walspan.

Where timing matters the scenario runs many trials; every trial checks the exact outcome.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from crashkit import (
    FORK,
    WAIT_S,
    ForkWriter,
    burst_then_exit,
    events_by_writer,
    race_to_terminate,
    read_json,
    run_script,
    terminal_records,
)

import walspan
from walspan import _compactor, _fsutil
from walspan._names import encode_session_id


def _store(path: Path) -> walspan.Store:
    return walspan.Store(path, install_hooks=False)


# -- M2: a burst then an immediate exit ----------------------------------------------------


@pytest.mark.parametrize("durability", ["process", "durable"])
def test_m2_burst_then_immediate_exit_keeps_every_event(tmp_path: Path, durability: str) -> None:
    """M2: a burst of N tool-call events followed at once by os._exit(0) (no cleanup, no
    atexit) loses nothing: after recover() all N are present, in order, 20 trials out of 20
    (invariant 1: acknowledged means written; there is no debounce to lose a tail)."""
    for trial in range(20):
        session = f"m2-{trial}"
        n = 8 if trial % 2 == 0 else 40
        p = FORK.Process(target=burst_then_exit, args=(str(tmp_path), session, n, durability))
        p.start()
        p.join(WAIT_S)
        assert p.exitcode == 0
        store = _store(tmp_path)
        assert session in store.recover().crashed
        t = store.load(session)
        assert events_by_writer(t) == {0: list(range(n))}, trial
        assert t["status"] == "crashed" and read_json(store, session) == t
        store.close()


def test_m2_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """M2 with a fresh interpreter writing with default settings (durable, hooks on): 8 events
    then os._exit(0) -> all 8 in the recovered trace."""
    run_script(
        """
import os, sys, walspan
span = walspan.Store(sys.argv[1]).open("m2").start_span("burst")
for i in range(8):
    span.add_event("tool call", {"w": 0, "i": i})
os._exit(0)
""",
        str(tmp_path),
        check=True,
    )
    store = _store(tmp_path)
    store.recover()
    assert events_by_writer(store.load("m2")) == {0: list(range(8))}
    store.close()


# -- M3: end and crash racing on a large trace ----------------------------------------------


def test_m3_end_racing_crash_on_a_large_trace_first_terminal_record_wins(
    tmp_path: Path,
) -> None:
    """M3: one process ends a ~24 MB trace while another crashes it at the same moment (both
    released by one barrier). Every trial: exactly one terminal record exists, the loser is
    refused with TraceClosedError naming the winner's status, the JSON's status is the first
    terminal record's status, and load() equals the JSON (invariant 3)."""
    big = "x" * (4 << 20)
    winners = set()
    for trial in range(4):
        session = f"m3-{trial}"
        store = walspan.Store(tmp_path, durability="process", install_hooks=False, max_value_bytes=1 << 22)
        t = store.open(session)
        for i in range(6):
            t.start_span(f"llm call {i}", input=big).end(output={"i": i})
        store.close()  # the writers below are the only ones attached
        barrier = FORK.Barrier(2)
        out = FORK.Queue()
        procs = [
            FORK.Process(target=race_to_terminate, args=(str(tmp_path), session, a, barrier, out))
            for a in ("end", "crash")
        ]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=WAIT_S) for _ in procs)
        for p in procs:
            p.join(WAIT_S)
            assert p.exitcode == 0
        (first, *rest) = terminal_records(store.wal_path(session))
        assert rest == []
        status = first["status"]
        winner = "end" if status == "completed" else "crash"
        winners.add(winner)
        loser = "crash" if winner == "end" else "end"
        assert results == {winner: "won", loser: f"refused {status}"}
        assert store.wal_path(session).stat().st_size > 24 << 20
        assert read_json(store, session)["status"] == status
        assert store.load(session) == read_json(store, session)


def test_m3_crash_during_a_slow_export_of_a_large_trace_is_refused(
    tmp_path: Path,
) -> None:
    """M3's exact window: the end's export (compaction of a large trace) is paused just before
    its rename while another process crashes the trace. The crash is refused (the end's terminal
    record came first) and the JSON says completed, the status of the first terminal record;
    never "crashed then overwritten", never the reverse."""
    store = walspan.Store(tmp_path, durability="process", install_hooks=False, max_value_bytes=1 << 22)
    t = store.open("m3")
    for i in range(5):
        t.start_span(f"step {i}", input="y" * (4 << 20)).end()
    in_window, go = threading.Event(), threading.Event()
    result: list[object] = []

    def hook(path: str) -> None:
        in_window.set()
        go.wait(WAIT_S)

    _compactor.before_rename = hook
    try:
        th = threading.Thread(target=lambda: result.append(t.end("completed")))
        th.start()
        assert in_window.wait(WAIT_S)
        proc = run_script(
            """
import sys, walspan
try:
    walspan.Store(sys.argv[1], install_hooks=False).open("m3").crash("crashed at the same moment")
    print("crash recorded")
except walspan.TraceClosedError as e:
    print("refused", e.status)
""",
            str(tmp_path),
        )
        go.set()
        th.join(WAIT_S)
    finally:
        _compactor.before_rename = None
    assert proc.stdout.strip() == "refused completed", proc.stderr
    assert [r["status"] for r in terminal_records(store.wal_path("m3"))] == ["completed"]
    assert read_json(store, "m3")["status"] == "completed" == store.load("m3")["status"]
    store.close()


# -- M1: a delayed rename while the trace is crashed --------------------------------------------


def test_m1_delayed_compaction_rename_cannot_clobber_crashed(tmp_path: Path) -> None:
    """M1: a compaction of the still-running trace is paused between its fold and its rename;
    meanwhile the trace is crashed (terminal record appended, its own compaction queued behind).
    The stale rename lands first, then the crash's compaction: the final JSON says crashed and
    equals load() (invariants 3, 4: the terminal record decides, compaction is monotonic)."""
    store = walspan.Store(tmp_path, install_hooks=False)  # durable: the crash's append fsyncs
    t = store.open("m1")
    t.start_span("tool").end()
    paused, terminal_written = threading.Event(), threading.Event()
    wal = str(store.wal_path("m1"))

    def before_rename(path: str) -> None:
        if threading.current_thread() is compactor:
            paused.set()
            assert terminal_written.wait(WAIT_S)

    def fault(op: str, path: str) -> None:
        if op == "fsync" and path == wal and paused.is_set():
            terminal_written.set()  # the crash's record is written (now being made durable)

    compactor = threading.Thread(target=store.compact, args=("m1",))
    _compactor.before_rename = before_rename
    _fsutil.faults.hook = fault
    try:
        compactor.start()
        assert paused.wait(WAIT_S)
        t.crash("process crashed")
        compactor.join(WAIT_S)
    finally:
        _compactor.before_rename = None
        _fsutil.faults.hook = None
    assert terminal_written.is_set()
    final = read_json(store, "m1")
    assert final["status"] == "crashed"
    assert final == store.load("m1")
    store.close()


# -- isolation ----------------------------------------------------------------------------------


def test_one_session_crashing_never_changes_another_in_the_same_process(
    tmp_path: Path,
) -> None:
    """A session crashing in one process does not stop, end or alter the process's other
    sessions: they keep logging and end with their own status (invariant 9)."""
    store = _store(tmp_path)
    a, b = store.open("a"), store.open("b")
    b.start_span("before").end()
    a.crash("a died")
    b.start_span("after").end()
    b.end("completed")
    assert store.load("a")["status"] == "crashed"
    tb = store.load("b")
    assert (tb["status"], [s["name"] for s in tb["spans"]]) == (
        "completed",
        ["before", "after"],
    )
    assert read_json(store, "b") == tb
    store.close()


def test_one_session_crashing_never_changes_another_across_processes(
    tmp_path: Path,
) -> None:
    """A writer of session A killed (and A crash-marked by recovery, or by a signal hook in its
    process) changes nothing for session B written by another, live process."""
    a = ForkWriter(str(tmp_path), "a", 0, 3)
    b = ForkWriter(str(tmp_path), "b", 1, 3)
    try:
        a.wait_done()
        b.wait_done()
        a.kill()
        store = _store(tmp_path)
        assert store.recover().crashed == ["a"]
        assert store.load("b")["status"] == "running"
        proc = run_script(
            """
import os, signal, sys, walspan
walspan.Store(sys.argv[1]).open("c")
os.kill(os.getpid(), signal.SIGTERM)
""",
            str(tmp_path),
        )
        assert proc.returncode == -15
        assert store.load("c")["status"] == "crashed"
        b.release()
        tb = store.load("b")
        assert tb["status"] == "running" and [w["state"] for w in tb["writers"]] == ["detached"]
        assert events_by_writer(tb) == {1: [0, 1, 2]}
        assert store.recover().actions == []
        store.close()
    finally:
        a.close()
        b.close()


# -- session ids --------------------------------------------------------------------------------

TRICKY_IDS = [
    "a/b",
    "a\\b",
    "a.b",
    "a:b",
    "a_b",
    "a b",
    "a-b",
    "A.b",
    "../a",
    "a/../b",
    ".",
    "..",
    "a.b.",
    "con",
]


def test_tricky_session_ids_are_distinct_traces_each_crash_marked_correctly(
    tmp_path: Path,
) -> None:
    """Session ids with / \\ . : and ids a lossy sanitizer would merge (a.b / a_b / a:b ...) are
    distinct traces with distinct files inside the store; the ones whose writer is killed are
    crash-marked by recovery, the others keep their own status (invariant 8)."""
    killed = set(TRICKY_IDS[::2])
    writers = [ForkWriter(str(tmp_path), sid, i, 2) for i, sid in enumerate(TRICKY_IDS)]
    try:
        for w in writers:
            w.wait_done()
        store = _store(tmp_path)
        for w, sid in zip(writers, TRICKY_IDS):
            if sid in killed:
                w.kill()
            else:
                w.release()
        store.recover()
        assert sorted(store.sessions()) == sorted(TRICKY_IDS)
        stems = {encode_session_id(sid) for sid in TRICKY_IDS}
        assert len(stems) == len(TRICKY_IDS)
        assert sorted(p.name for p in tmp_path.glob("*.wal")) == sorted(s + ".wal" for s in stems)
        for i, sid in enumerate(TRICKY_IDS):
            t = store.load(sid)
            assert t["session_id"] == sid
            assert t["status"] == ("crashed" if sid in killed else "running"), sid
            assert events_by_writer(t) == {i: [0, 1]}
            assert read_json(store, sid)["session_id"] == sid
        assert len({store.load(sid)["trace_id"] for sid in TRICKY_IDS}) == len(TRICKY_IDS)
        store.close()
    finally:
        for w in writers:
            w.close()


# -- reopening from a new process ---------------------------------------------------------------


def test_reopen_in_a_new_process_keeps_trace_id_and_interrupts_the_dead_writers_span(
    tmp_path: Path,
) -> None:
    """A new process reopening a session whose previous writer died mid-generation keeps the
    trace id, metadata and every span (the trace never collapses to the new process's view);
    the dead writer's open span is interrupted (writer lost), not left open forever (inv. 7)."""
    first = ForkWriter(str(tmp_path), "s", 0, 4)
    first.wait_done()
    first.kill()
    first.close()
    store = _store(tmp_path)
    before = store.load("s")
    proc = run_script(
        """
import sys, walspan
t = walspan.Store(sys.argv[1]).open("s")
print(t.trace_id, flush=True)
t.start_span("turn 2").end()
t.close()
""",
        str(tmp_path),
        check=True,
    )
    assert proc.stdout.strip() == before["trace_id"]
    after = store.compact("s")
    t = read_json(store, "s")
    assert after.exists() and t == store.load("s")
    assert t["trace_id"] == before["trace_id"] and t["status"] == "running"
    old = next(s for s in t["spans"] if s["span_id"] == first.span_id)
    assert (old["status"], old["status_message"]) == ("interrupted", "writer lost")
    assert len(old["events"]) == 4
    assert [s["name"] for s in t["spans"]] == ["writer-0", "turn 2"]
    store.close()
