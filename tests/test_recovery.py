"""recover(): crash the traces whose writers all died, record writers lost while others live,
leave idle traces alone, repair torn tails, report corruption untouched (DESIGN.md inv. 2, 3, 6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from crashkit import (
    ForkWriter,
    dead_writer,
    read_json,
    run_script,
    terminal_records,
    wal_records,
)

import walspan
from walspan import cli
from walspan._format import RecordType


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = walspan.Store(tmp_path, install_hooks=False)
    yield s
    s.close()


def test_idle_trace_is_not_crashed_and_a_later_open_continues_it(
    store: walspan.Store,
) -> None:
    """A trace whose writers all detached cleanly without ending it is idle: recover() changes
    nothing, and a later open() continues the same trace (the long-lived-session case)."""
    t = store.open("s", metadata={"title": "chat"})
    t.start_span("turn 1").end()
    t.close()
    before = store.wal_path("s").read_bytes()
    assert store.recover().actions == []
    assert store.wal_path("s").read_bytes() == before
    again = store.open("s")
    assert again.trace_id == t.trace_id
    again.start_span("turn 2").end()
    again.end()
    done = store.load("s")
    assert done["status"] == "completed"
    assert [s["name"] for s in done["spans"]] == ["turn 1", "turn 2"]
    assert done["metadata"] == {"title": "chat"}


def test_all_writers_dead_crashes_with_names_and_last_record_time(tmp_path: Path, store: walspan.Store) -> None:
    """When every attached writer is proven dead, recover() appends one crashed terminal record
    naming the writers (id, pid, host) and the time of the last record, compacts, and reports
    it; open spans are interrupted at their writer's last record time."""
    w1, w2 = ForkWriter(str(tmp_path), "s", 0, 2), ForkWriter(str(tmp_path), "s", 1, 4)
    for w in (w1, w2):
        w.wait_done()
    for w in (w1, w2):
        w.kill()
        w.close()
    report = store.recover()
    assert [(a.session_id, a.action) for a in report.actions] == [("s", "crashed")]
    msg = report.actions[0].message
    assert f"pid {w1.proc.pid}" in msg and f"pid {w2.proc.pid}" in msg and "last record written at" in msg
    t = store.load("s")
    assert (t["status"], t["status_message"]) == ("crashed", msg)
    assert read_json(store, "s") == t
    for span in t["spans"]:
        assert span["status"] == "interrupted"
        assert span["end_time"] == max(e["time"] for e in span["events"])
    assert [p["status"] for p in terminal_records(store.wal_path("s"))] == ["crashed"]


def test_recovery_is_idempotent(tmp_path: Path, store: walspan.Store) -> None:
    """A second recover() changes nothing: the WAL and the JSON stay byte-identical."""
    dead_writer(tmp_path, "s")
    assert store.recover().crashed == ["s"]
    wal, js = store.wal_path("s").read_bytes(), store.trace_path("s").read_bytes()
    second = store.recover()
    assert second.actions == [] and second.checked == 1
    assert store.wal_path("s").read_bytes() == wal
    assert store.trace_path("s").read_bytes() == js


def test_dead_writer_among_live_ones_is_lost_and_the_trace_goes_on(tmp_path: Path, store: walspan.Store) -> None:
    """One writer dead while another lives: recovery records it lost (not a crash); its open
    span is interrupted with end time = its last record's time; the live writer's span stays
    open; the trace goes on and can still complete."""
    live = ForkWriter(str(tmp_path), "s", 1, 2)
    try:
        live.wait_done()
        dead = dead_writer(tmp_path, "s", 3, idx=0)
        report = store.recover()
        assert [a.action for a in report.actions] == ["writer_lost"]
        assert f"pid {dead.proc.pid}" in report.actions[0].message
        t = store.load("s")
        assert t["status"] == "running"
        spans = {s["span_id"]: s for s in t["spans"]}
        lost = spans[dead.span_id]  # type: ignore[index]
        assert (lost["status"], lost["status_message"]) == (
            "interrupted",
            "writer lost",
        )
        assert lost["end_time"] == max(e["time"] for e in lost["events"])
        assert spans[live.span_id]["status"] == "open"  # type: ignore[index]
        assert store.recover().actions == []
        live.release()
        t2 = store.open("s")
        t2.end()
        final = store.load("s")
        assert final["status"] == "completed"
        assert spans[live.span_id]["span_id"] in {s["span_id"] for s in final["spans"]}  # type: ignore[index]
    finally:
        live.close()


def test_ending_a_trace_interrupts_spans_still_open(store: walspan.Store) -> None:
    """When a trace ends (or crashes), spans still open are closed as interrupted in the fold:
    no span stays open forever."""
    t = store.open("s")
    done = t.start_span("done")
    done.end()
    t.start_span("still running")
    t.end("error", "gave up")
    spans = {s["name"]: s["status"] for s in store.load("s")["spans"]}
    assert spans == {"done": "ok", "still running": "interrupted"}


def test_attaching_to_a_terminal_trace_raises_and_writes_nothing(tmp_path: Path, store: walspan.Store) -> None:
    """open() on a trace that already ended or crashed raises TraceClosedError carrying the
    status, and the WAL is byte-identical afterwards (nothing written), from any process."""
    store.open("done").end("completed")
    dead_writer(tmp_path, "dead")
    store.recover()
    for sid, status in (("done", "completed"), ("dead", "crashed")):
        before = store.wal_path(sid).read_bytes()
        with pytest.raises(walspan.TraceClosedError) as info:
            store.open(sid)
        assert info.value.status == status
        proc = run_script(
            """
import sys, walspan
try:
    walspan.Store(sys.argv[1], install_hooks=False).open(sys.argv[2])
except walspan.TraceClosedError as e:
    print("closed", e.status)
""",
            str(tmp_path),
            sid,
        )
        assert proc.stdout.strip() == f"closed {status}", proc.stderr
        assert store.wal_path(sid).read_bytes() == before


def test_torn_tail_of_a_dead_writer_is_repaired_then_crashed(tmp_path: Path, store: walspan.Store) -> None:
    """A dead writer's half-written last record (torn tail) is truncated under the lock and
    reported; the trace is then crashed with every complete record kept (invariant 2)."""
    dead_writer(tmp_path, "s", 3)
    wal = store.wal_path("s")
    good = wal.read_bytes()
    last = wal_records(wal)
    with open(wal, "ab") as f:
        f.write(good[-30:-5])  # a partial frame: the prefix of some record
    report = store.recover()
    assert [a.action for a in report.actions] == ["repaired_tail", "crashed"]
    assert wal.read_bytes()[: len(good)] == good
    recs = wal_records(wal)
    assert recs[: len(last)] == last and [t for t, _ in recs[len(last) :]] == [RecordType.TERMINAL]
    assert store.load("s")["status"] == "crashed"


def test_corrupt_wal_is_reported_and_left_untouched(tmp_path: Path, store: walspan.Store) -> None:
    """Damage before valid records is corruption: recover() reports it (with the file), does not
    modify the file, and still recovers the other sessions."""
    dead_writer(tmp_path, "bad", 6)
    dead_writer(tmp_path, "good", 2)
    wal = store.wal_path("bad")
    data = bytearray(wal.read_bytes())
    data[200] ^= 0xFF  # inside an early record, with valid records after it
    wal.write_bytes(bytes(data))
    report = store.recover()
    assert report.crashed == ["good"]
    assert len(report.corrupt) == 1 and report.corrupt[0].path == str(wal)
    assert wal.read_bytes() == bytes(data)
    assert terminal_records(store.wal_path("good"))[0]["status"] == "crashed"


def test_cli_recover_prints_what_it_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan recover DIR` prints each change (session: action: message, and each JSON file it
    wrote, counted as a change) and a summary; a second run prints no change; a corrupt WAL is
    printed as CORRUPT with exit status 1."""
    dead_writer(tmp_path, "s")
    with walspan.Store(tmp_path, install_hooks=False) as s:
        s.open("idle").close()
    assert cli.main(["recover", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("s: crashed: writer(s) ")
    assert sorted(line for line in out if line.startswith("wrote ")) == [f"wrote {tmp_path / 'idle.json'}", f"wrote {tmp_path / 's.json'}"]
    assert out[-1] == "2 session(s) checked, 3 change(s) (2 JSON file(s) written), 0 corrupt or unreadable"
    assert cli.main(["recover", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["2 session(s) checked, 0 change(s) (0 JSON file(s) written), 0 corrupt or unreadable"]
    wal = tmp_path / "idle.wal"
    data = bytearray(wal.read_bytes())
    data[60] ^= 0xFF
    wal.write_bytes(bytes(data))
    assert cli.main(["recover", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and str(wal) in out


def test_recover_from_another_process_never_crashes_a_live_writers_trace(
    tmp_path: Path,
) -> None:
    """A recovery run in a separate process while this process is attached (and idle: no
    appends in flight) leaves the trace alone: the liveness lock proves this writer alive."""
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        t = store.open("s")
        t.start_span("open span")
        before = store.wal_path("s").read_bytes()
        proc = run_script(
            """
import sys, walspan
r = walspan.Store(sys.argv[1], install_hooks=False).recover()
print(len(r.actions), r.checked)
""",
            str(tmp_path),
            check=True,
        )
        assert proc.stdout.split() == ["0", "1"]
        assert store.wal_path("s").read_bytes() == before
    finally:
        store.close()
    assert os.path.exists(store.trace_path("s"))
