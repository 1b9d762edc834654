"""Many processes appending to one session (invariant 1), and sessions isolated (invariant 9)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from walfiles import flip_byte, record_offsets

import walspan
from walspan import _verify

CTX = multiprocessing.get_context("fork")
TIMEOUT = 120
WRITERS = 5
PER_WRITER = 40


def _writer(directory: str, durability: str, k: int, n: int, barrier, q) -> None:
    s = walspan.Store(directory, durability=durability, install_hooks=False)
    t = s.open("shared")
    barrier.wait(TIMEOUT)
    for i in range(n):
        sp = t.start_span(f"w{k}-{i}", parent=None, attributes={"w": k, "i": i})
        q.put(("start", k, i))
        sp.add_event("tick", {"i": i})
        q.put(("event", k, i))
    t.close()
    s.close()
    q.put(("done", k, n))


@pytest.mark.parametrize("durability", ["durable", "process"])
def test_concurrent_writers_every_ack_present_once_in_order(tmp_path: Path, durability: str) -> None:
    """Invariants 1 and 2 under concurrency: 5 processes append to one session at once; every
    acknowledged span start and event is in the WAL exactly once, each writer's records appear
    in the order it wrote them, and the WAL verifies clean."""
    directory = str(tmp_path)
    walspan.Store(directory, install_hooks=False).open("shared").close()
    barrier = CTX.Barrier(WRITERS)
    q = CTX.Queue()
    procs = [CTX.Process(target=_writer, args=(directory, durability, k, PER_WRITER, barrier, q)) for k in range(WRITERS)]
    for p in procs:
        p.start()
    acked: list[tuple[str, int, int]] = []
    done = 0
    while done < WRITERS:
        item = q.get(timeout=TIMEOUT)
        if item[0] == "done":
            done += 1
        else:
            acked.append(item)
    for p in procs:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    assert len(acked) == WRITERS * PER_WRITER * 2
    doc = walspan.Store(directory, install_hooks=False).load("shared")
    starts = Counter((s["attributes"]["w"], s["attributes"]["i"]) for s in doc["spans"])
    assert set(starts) == {(k, i) for _, k, i in acked}
    assert all(c == 1 for c in starts.values())
    for s in doc["spans"]:
        assert [e["attributes"]["i"] for e in s["events"]] == [s["attributes"]["i"]]
    for k in range(WRITERS):
        mine = [s["attributes"]["i"] for s in doc["spans"] if s["attributes"]["w"] == k]
        assert mine == list(range(PER_WRITER))  # spans are listed in WAL order
    seqs = [r[3] for r in record_offsets(Path(directory) / "shared.wal")]
    assert seqs == list(range(1, len(seqs) + 1))
    assert _verify.verify_dir(directory).ok


def _spin(directory: str, k: int, barrier, conn) -> None:
    s = walspan.Store(directory, durability="process", install_hooks=False)
    t = s.open("shared")
    barrier.wait(TIMEOUT)
    i = 0
    while True:
        t.start_span(f"w{k}-{i}", parent=None, attributes={"w": k, "i": i})
        conn.send(i)
        i += 1


def test_writer_killed_mid_run_loses_no_acknowledged_record(tmp_path: Path) -> None:
    """Invariant 1: 4 processes append concurrently; one is SIGKILLed at an arbitrary point. Every
    record any of them acknowledged is present exactly once and in order; whatever the killed
    writer left half-written is repaired by the survivors (verify clean)."""
    directory = str(tmp_path)
    walspan.Store(directory, install_hooks=False).open("shared").close()
    barrier = CTX.Barrier(4)
    pipes = [CTX.Pipe(duplex=False) for _ in range(4)]
    procs = [CTX.Process(target=_spin, args=(directory, k, barrier, pipes[k][1])) for k in range(4)]
    for p in procs:
        p.start()
    acked: dict[int, list[int]] = {k: [] for k in range(4)}

    def pump(k: int, upto: int) -> None:
        while len(acked[k]) < upto:
            assert pipes[k][0].poll(TIMEOUT)
            acked[k].append(pipes[k][0].recv())

    pump(0, 25)
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].join(TIMEOUT)
    for k in range(1, 4):
        pump(k, len(acked[k]) + 30)  # the survivors keep appending after the kill
    for p in procs[1:]:
        os.kill(p.pid, signal.SIGKILL)
        p.join(TIMEOUT)
    for k in range(4):
        while pipes[k][0].poll(0):
            acked[k].append(pipes[k][0].recv())
    s = walspan.Store(directory, durability="process", install_hooks=False)
    t = s.open("shared")  # repairs a torn tail, if the last kill left one
    t.close()
    doc = s.load("shared")
    for k in range(4):
        mine = [sp["attributes"]["i"] for sp in doc["spans"] if sp["attributes"]["w"] == k]
        assert mine[: len(acked[k])] == acked[k]  # all acknowledged, once, in order
        assert len(mine) <= len(acked[k]) + 1  # at most the one in flight when killed
    assert _verify.verify_dir(directory).ok
    s.close()


def test_sessions_isolated_crash_and_end(store: walspan.Store) -> None:
    """Invariant 9: crashing or ending one session changes nothing in another, even in the same
    store and process: its WAL bytes stay the same, its status stays running, appends go on."""
    a = store.open("a")
    b = store.open("b")
    b.start_span("b-span").end()
    b_wal = store.wal_path("b")
    before = b_wal.read_bytes()
    a.crash("a died")
    assert b_wal.read_bytes() == before
    assert store.load("b")["status"] == "running"
    assert not store.trace_path("b").exists()
    b.start_span("after").end()
    assert [s["name"] for s in store.load("b")["spans"]] == ["b-span", "after"]
    c = store.open("c")
    c.end("completed")
    assert store.load("a")["status"] == "crashed" and store.load("c")["status"] == "completed"
    assert store.load("b")["status"] == "running"


def _attach_and_die(directory: str, sid: str, conn) -> None:
    s = walspan.Store(directory, install_hooks=False)
    s.open(sid).start_span("x")
    conn.send("ready")  # a pipe write is done when send() returns (a Queue's feeder thread may not be)
    os.kill(os.getpid(), signal.SIGKILL)


def test_sessions_isolated_recovery_and_corruption(tmp_path: Path) -> None:
    """Invariant 9: a writer SIGKILLed in session A, then recovery marking A crashed, and a
    corrupt session C do not touch session B (its bytes, status or ability to append)."""
    directory = str(tmp_path)
    s = walspan.Store(directory, install_hooks=False)
    b = s.open("b")
    b.start_span("b1").end()
    cc = s.open("c")
    for i in range(3):
        cc.start_span(f"c{i}").end()
    cc.close()
    c_wal = s.wal_path("c")
    flip_byte(c_wal, record_offsets(c_wal)[2][0] + 22)
    rx, tx = CTX.Pipe(duplex=False)
    p = CTX.Process(target=_attach_and_die, args=(directory, "a", tx))
    p.start()
    assert rx.poll(TIMEOUT) and rx.recv() == "ready"
    p.join(TIMEOUT)
    assert p.exitcode == -signal.SIGKILL
    before = s.wal_path("b").read_bytes()
    report = s.recover()
    assert report.crashed == ["a"]
    assert [e.path for e in report.corrupt] == [str(c_wal)]
    assert s.load("a")["status"] == "crashed"
    assert s.wal_path("b").read_bytes() == before
    assert s.load("b")["status"] == "running"
    b.start_span("b2").end()
    assert [x["name"] for x in s.load("b")["spans"]] == ["b1", "b2"]
    s.close()
