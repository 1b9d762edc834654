"""Processes and threads sharing one trace: worker pools, fork() children, threads
(DESIGN.md invariant 10). Pool scenarios run in a fresh interpreter with the default hooks on,
as a user's program would."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from crashkit import ForkWriter, events_by_writer, run_file, run_script, wal_records

import walspan
from walspan._format import RecordType as _T
from walspan._format import unpack_payload
from walspan._reader import ScanState, iter_records, read_header

POOL_SCRIPT = """
import multiprocessing as mp, os, sys
import walspan

TRACE = None

def init(env):
    # spawn: the worker joins through the environment hand-over (one writer per worker);
    # fork: the inherited trace attaches this worker as its own writer on first use
    global TRACE
    if env is not None:
        TRACE = walspan.attach_from_env(env)

def task(i):
    with TRACE.span(f"task {i}") as s:  # parent: the span handed over / passed below
        s.add_event("worked", {"i": i, "pid": os.getpid()})
    return os.getpid()

def main():
    global TRACE
    d, method, shutdown = sys.argv[1], sys.argv[2], sys.argv[3]
    store = walspan.Store(d)
    TRACE = store.open("pool")
    root = TRACE.start_span("fan out")
    TRACE.default_parent = root.span_id
    env = TRACE.env(root) if method == "spawn" else None
    ctx = mp.get_context(method)
    if shutdown == "terminate":
        with ctx.Pool(3, init, (env,)) as pool:  # __exit__ calls terminate(): SIGTERM to every worker
            pids = pool.map(task, range(12), chunksize=1)
    else:
        pool = ctx.Pool(3, init, (env,))
        pids = pool.map(task, range(12), chunksize=1)
        pool.close(); pool.join()  # workers leave through os._exit after finalizers
    root.end()
    TRACE.end("completed")
    print("workers", len(set(pids)), "parent", os.getpid())

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("shutdown", ["join", "terminate"])
def test_worker_pool_logs_into_one_trace_with_cross_process_parents(tmp_path: Path, method: str, shutdown: str) -> None:
    """A multiprocessing pool (fork or spawn) logs spans from every worker into the parent's
    trace, each worker attached as its own writer, each task span a child of the parent's span.
    Workers leaving by close()/join() detach; workers stopped by the pool's terminate()
    (SIGTERM, default disposition: walspan installs no signal handler in multiprocessing
    children) die at once, without a record, and do not crash the shared trace: the parent
    still completes it."""
    script = tmp_path / "pool_main.py"  # spawn workers import the main module from its file
    script.write_text(POOL_SCRIPT)
    proc = run_file(script, str(tmp_path / "traces"), method, shutdown, check=True)
    tmp_path = tmp_path / "traces"
    words = proc.stdout.split()
    n_workers, parent_pid = int(words[1]), int(words[3])
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        t = store.load("pool")
        assert t["status"] == "completed", (t["status_message"], proc.stderr)
        root = next(s for s in t["spans"] if s["name"] == "fan out")
        tasks = [s for s in t["spans"] if s["name"].startswith("task ")]
        assert sorted(s["name"] for s in tasks) == sorted(f"task {i}" for i in range(12))
        assert all(s["parent_span_id"] == root["span_id"] and s["status"] == "ok" for s in tasks)
        writers = {w["writer_id"]: w for w in t["writers"]}
        parent_writers = [w for w in writers.values() if w["pid"] == parent_pid]
        assert len(parent_writers) == 1
        worker_writers = {s["writer_id"] for s in tasks}
        assert len(worker_writers) == n_workers
        assert all(writers[w]["pid"] != parent_pid for w in worker_writers)
        expected_state = {"join": {"detached"}, "terminate": {"detached", "attached"}}[shutdown]
        assert {writers[w]["state"] for w in worker_writers} <= expected_state
        assert t["anomalies"] == 0
    finally:
        store.close()


def test_fork_child_attaches_as_its_own_writer_and_detaches_at_exit(
    tmp_path: Path,
) -> None:
    """A multiprocessing "fork" child with walspan's hooks on, leaving normally (os._exit after
    multiprocessing's finalizers), is detached by the exit finalizer without closing anything
    itself: the trace is idle afterwards, not crashed."""
    w = ForkWriter(str(tmp_path), "s", 0, 3, hooks=True)
    try:
        w.wait_done()
        w.release()
    finally:
        w.close()
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        t = store.load("s")
        assert [(x["pid"], x["state"]) for x in t["writers"]] == [(w.proc.pid, "detached")]
        assert store.recover().actions == []
    finally:
        store.close()


def test_fork_while_another_thread_holds_the_append_lock(tmp_path: Path) -> None:
    """fork() while another thread of the parent is inside an append (holding the thread mutex
    and the flock): the child neither deadlocks on the inherited mutex nor shares the parent's
    flock; it waits for the parent's append, attaches as its own writer and appends after it."""
    proc = run_script(
        """
import os, signal, sys, threading
import walspan
from walspan import _fsutil
d = sys.argv[1]
t = walspan.Store(d).open("s")
span = t.start_span("parent")
inside, go = threading.Event(), threading.Event()
parent_pid = os.getpid()
def hook(op, path):
    if op == "write" and path.endswith(".wal") and os.getpid() == parent_pid and not inside.is_set():
        inside.set()
        go.wait(60)
_fsutil.faults.hook = hook
th = threading.Thread(target=span.add_event, args=("held the lock",))
th.start()
inside.wait(60)
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a deadlock fails the test instead of hanging it
    try:
        t.start_span("child", parent=span).end()
        os._exit(0)
    except BaseException as e:
        print("child failed", repr(e), flush=True)
        os._exit(1)
go.set()
th.join()
_, status = os.waitpid(pid, 0)
print("child status", os.waitstatus_to_exitcode(status), "pid", pid, flush=True)
span.end()
t.end()
""",
        str(tmp_path),
        check=True,
    )
    words = proc.stdout.split()
    assert words[:3] == ["child", "status", "0"], proc.stdout + proc.stderr
    child_pid = int(words[4])
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        recs = wal_records(store.wal_path("s"))
        names = [p.get("name") for _t, p in recs if "name" in p]
        assert names == ["parent", "held the lock", "child"]
        t = store.load("s")
        assert t["status"] == "completed"
        writers = {w["writer_id"]: w["pid"] for w in t["writers"]}
        child = next(s for s in t["spans"] if s["name"] == "child")
        assert writers[child["writer_id"]] == child_pid and child["status"] == "ok"
        assert child["parent_span_id"] == t["spans"][0]["span_id"]
    finally:
        store.close()


def test_many_threads_log_into_one_trace(tmp_path: Path) -> None:
    """16 threads of one process, each with its own nested spans (`with trace.span`), log into
    one trace concurrently: every span and event is present once, each thread's spans nest
    under that thread's own root (contextvars); in the raw records, seqs are 1..N exactly once
    and each thread's records are complete and in the order that thread made them."""
    N = 100  # children per thread: enough appends for threads to really interleave
    store = walspan.Store(tmp_path, durability="process", install_hooks=False)
    trace = store.open("threads")
    start = threading.Barrier(16)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            start.wait(60)
            with trace.span(f"root {n}") as root:
                for i in range(N):
                    with trace.span(f"child {n}.{i}") as child:
                        child.add_event("e", {"w": n, "i": i})
                assert walspan.current_span.get() is root
        except BaseException as exc:  # noqa: BLE001 - any failure in a thread is reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up, not hide
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    trace.end()
    t = store.load("threads")
    store.close()
    assert events_by_writer(t) == {n: list(range(N)) for n in range(16)}
    by_id = {s["span_id"]: s for s in t["spans"]}
    for s in t["spans"]:
        if s["name"].startswith("child "):
            n = s["name"].split()[1].split(".")[0]
            assert by_id[s["parent_span_id"]]["name"] == f"root {n}"
        assert s["status"] == "ok"
    assert len(t["spans"]) == 16 * (N + 1) and t["anomalies"] == 0
    # From the raw records, not the fold: seqs are 1..N, each once, in file order; each thread's
    # records are exactly what it did, in the order it did it.
    records = _raw_records(store.wal_path("threads"))
    assert [seq for seq, _t, _p in records] == list(range(1, len(records) + 1))
    assert t["wal"]["seq"] == len(records)
    assert [rt for _s, rt, _p in records[:2]] == [_T.TRACE_START, _T.WRITER_ATTACH]
    assert records[-1][1] == _T.TERMINAL and [rt for _s, rt, _p in records].count(_T.TERMINAL) == 1
    names: dict[str, str] = {}
    per_thread: dict[str, list[str]] = {}
    for _seq, rtype, payload in records[2:-1]:
        if rtype == _T.SPAN_START:
            names[payload["span_id"]] = payload["name"]
            step = f"start {payload['name']}"
        elif rtype == _T.SPAN_EVENT:
            step = f"event {payload['attributes']['w']}.{payload['attributes']['i']}"
        else:
            assert rtype == _T.SPAN_END, rtype
            step = f"end {names[payload['span_id']]}"
        thread = step.split()[-1].split(".")[0]
        per_thread.setdefault(thread, []).append(step)
    expected = {
        str(n): [f"start root {n}"]
        + [step for i in range(N) for step in (f"start child {n}.{i}", f"event {n}.{i}", f"end child {n}.{i}")]
        + [f"end root {n}"]
        for n in range(16)
    }
    assert per_thread == expected


def _raw_records(wal_path: Path) -> list[tuple[int, int, dict[str, Any]]]:
    """(seq, type, payload) of every record of the WAL, as the reader yields them."""
    fd = os.open(wal_path, os.O_RDONLY)
    try:
        salt = read_header(fd, os.fspath(wal_path))
        return [
            (seq, rtype, unpack_payload(payload))
            for _off, rtype, seq, payload in iter_records(fd, ScanState(os.fspath(wal_path)), salt=salt)
            if payload is not None
        ]
    finally:
        os.close(fd)


def test_threads_opening_the_same_session_concurrently_create_one_trace(
    tmp_path: Path,
) -> None:
    """Threads (and their Store instances) opening the same new session at the same moment get
    one trace: a single trace id, one trace start record."""
    ids: list[str] = []
    start = threading.Barrier(8)

    def work() -> None:
        s = walspan.Store(tmp_path, install_hooks=False)
        start.wait(60)
        t = s.open("same")
        ids.append(t.trace_id)
        t.start_span("x").end()
        s.close()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert len(ids) == 8 and len(set(ids)) == 1
    recs = wal_records(tmp_path / "same.wal")
    from walspan._format import RecordType

    assert [t for t, _ in recs].count(RecordType.TRACE_START) == 1


TERMINATE_SCRIPT = """
import multiprocessing as mp, os, sys
import walspan

def worker(directory, ready, parent_attached):
    trace = walspan.Store(directory).open("s")
    trace.start_span("in flight")
    ready.set()
    mp.Event().wait()  # until terminated

def main():
    d, parent_attached = sys.argv[1], sys.argv[2] == "1"
    if parent_attached:
        trace = walspan.Store(d).open("s")
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=worker, args=(d, ready, parent_attached))
    p.start()
    assert ready.wait(60)
    p.terminate()  # SIGTERM from the parent
    p.join(60)
    print("exit", p.exitcode, flush=True)
    if parent_attached:
        trace.start_span("after the worker").end()
        trace.end("completed")

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("parent_attached", [True, False])
def test_multiprocessing_child_terminated_by_its_parent(tmp_path: Path, parent_attached: bool) -> None:
    """A multiprocessing child stopped by its parent's terminate() (SIGTERM) dies by the signal
    at once: walspan installs no signal handler in multiprocessing children, because a Python
    handler can miss a SIGTERM that lands just before the child blocks on a semaphore, and the
    parent's terminate()/join() then hangs. While the parent is a live writer, the trace goes on
    and the parent completes it (the child's in-flight span interrupted); when the child was
    the only writer, recovery proves it dead and marks the trace crashed."""
    script = tmp_path / "terminate_main.py"
    script.write_text(TERMINATE_SCRIPT)
    proc = run_file(script, str(tmp_path / "traces"), "1" if parent_attached else "0", check=True)
    assert proc.stdout.split() == ["exit", "-15"]
    store = walspan.Store(tmp_path / "traces", install_hooks=False)
    try:
        if parent_attached:
            assert store.recover().actions == []  # ended by the parent: nothing left to recover
        else:
            assert store.recover().crashed == ["s"]
        t = store.load("s")
        span = next(s for s in t["spans"] if s["name"] == "in flight")
        assert span["status"] == "interrupted"
        if parent_attached:
            assert t["status"] == "completed"
        else:
            assert t["status"] == "crashed" and "died without ending the trace" in t["status_message"]
    finally:
        store.close()


def test_fork_during_a_compaction_does_not_keep_the_compaction_lock(
    tmp_path: Path,
) -> None:
    """fork() while another thread is compacting: the long-lived child inherits a copy of the
    compaction lock's descriptor; once the parent's compaction is done the lock must be free
    (released explicitly, not by a close that the child's copy would defeat), so the parent's
    next compaction and trace.end() complete while the child still lives."""
    proc = run_script(
        """
import os, signal, sys, threading
import walspan
from walspan import _compactor
store = walspan.Store(sys.argv[1], install_hooks=False)
t = store.open("s")
t.start_span("x").end()
inside, go = threading.Event(), threading.Event()
def hook(path):
    if threading.current_thread() is not threading.main_thread() and not inside.is_set():
        inside.set()
        go.wait(60)
_compactor.before_rename = hook
th = threading.Thread(target=store.compact, args=("s",))
th.start()
inside.wait(60)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    os.read(r, 1)  # a long-lived child (a pool worker): lives until the parent closes the pipe
    os._exit(0)
os.close(r)
go.set()
th.join()
signal.alarm(30)  # a lock held by the child would hang here: fail instead
t.start_span("y").end()
t.end()
print("ended while the child lives", flush=True)
os.close(w)
os.waitpid(pid, 0)
""",
        str(tmp_path),
        check=True,
    )
    assert "ended while the child lives" in proc.stdout
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        assert store.load("s")["status"] == "completed"
    finally:
        store.close()
