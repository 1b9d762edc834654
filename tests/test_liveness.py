"""Writer liveness: proven by a kernel-released lock, failing closed (DESIGN.md invariants 6 and 10)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
from crashkit import ForkWriter, attach_records, expect_line, spawn_script

import walspan
from walspan import _liveness
from walspan._wal import internal_dir


def test_attach_record_names_the_writer_by_host_pid_and_start_time(
    tmp_path: Path,
) -> None:
    """The attach record names the writer: random writer id, host, pid, and the process start
    time from psutil (pid + start time guard against pid reuse)."""
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        store.open("s")
        (rec,) = attach_records(store.wal_path("s"))
        assert rec["pid"] == os.getpid()
        assert rec["host"] == _liveness.HOST
        assert rec["process_start"] == psutil.Process().create_time()
        assert len(rec["writer"]) == 16 and int(rec["writer"], 16) >= 0
        assert store.load("s")["writers"][0]["process_start_time"] == rec["process_start"]
    finally:
        store.close()


def test_live_writer_is_alive_until_sigkill_then_proven_dead(tmp_path: Path) -> None:
    """A writer process holds its liveness lock while it lives (alive, from another process's
    point of view), and the kernel releases it on SIGKILL (dead: the lock can be taken)."""
    w = ForkWriter(str(tmp_path), "s", 0, 1)
    try:
        w.wait_done()
        (rec,) = attach_records(tmp_path / "s.wal")
        internal = internal_dir(str(tmp_path))
        assert _liveness.writer_alive(internal, rec) is True
        w.kill()
        assert _liveness.writer_alive(internal, rec) is False
        assert _liveness.writer_alive(internal, rec) is False  # checking does not change it
    finally:
        w.close()


def test_missing_lock_file_falls_back_to_pid_and_start_time(tmp_path: Path) -> None:
    """Without its lock file, a writer on this host is alive only if a process with that pid
    *and* that start time exists: a recycled pid (other start time) or no process is dead."""
    internal = internal_dir(str(tmp_path))
    me = {
        "writer": "00000000000000aa",
        "host": _liveness.HOST,
        "pid": os.getpid(),
        "process_start": psutil.Process().create_time(),
    }
    assert _liveness.writer_alive(internal, me) is True
    recycled = dict(me, process_start=me["process_start"] - 3600)
    assert _liveness.writer_alive(internal, recycled) is False
    proc = spawn_script("import sys; print('up', flush=True); sys.stdin.read()")
    expect_line(proc, "up")
    gone = dict(me, pid=proc.pid, process_start=psutil.Process(proc.pid).create_time())
    assert _liveness.writer_alive(internal, gone) is True
    proc.communicate("")
    assert _liveness.writer_alive(internal, gone) is False


def test_liveness_fails_closed_when_nothing_can_be_proven(tmp_path: Path) -> None:
    """Fail closed: a writer on another host, or with an unusable id / pid / start time, counts
    as alive; a strange writer id is never turned into a path outside the writers directory."""
    internal = internal_dir(str(tmp_path))
    base = {
        "writer": "00000000000000bb",
        "host": "some-other-host",
        "pid": 1,
        "process_start": 1.0,
    }
    assert _liveness.writer_alive(internal, base) is True
    assert _liveness.writer_alive(internal, dict(base, writer="../../escape")) is True
    assert _liveness.writer_alive(internal, dict(base, writer="")) is True
    assert _liveness.writer_alive(internal, dict(base, host=_liveness.HOST, pid="1")) is True
    assert (
        _liveness.writer_alive(
            internal,
            dict(base, host=_liveness.HOST, pid=os.getpid(), process_start=None),
        )
        is True
    )


def test_clean_close_removes_the_lock_file_and_recovery_removes_dead_ones(
    tmp_path: Path,
) -> None:
    """A clean close() removes the writer's lock file; recovery removes the lock file of a
    writer it proved dead (housekeeping: the writers directory does not grow forever)."""
    wdir = Path(_liveness.writers_dir(internal_dir(str(tmp_path))))
    store = walspan.Store(tmp_path, install_hooks=False)
    store.open("clean")
    assert len(list(wdir.glob("*.live"))) == 1
    store.close()
    assert list(wdir.glob("*.live")) == []
    w = ForkWriter(str(tmp_path), "dead", 0, 1)
    w.wait_done()
    w.kill()
    w.close()
    assert len(list(wdir.glob("*.live"))) == 1
    store = walspan.Store(tmp_path, install_hooks=False)
    assert store.recover().crashed == ["dead"]
    assert list(wdir.glob("*.live")) == []
    store.close()


def test_fork_child_does_not_keep_its_parent_alive_and_attaches_as_itself(
    tmp_path: Path,
) -> None:
    """A fork() child inherits its parent's liveness descriptor (flock locks are shared through
    it) but must drop it: when the parent is SIGKILLed while the child lives on, the parent is
    proven dead (recorded lost: the child still lives), and the child, which attached as its
    own writer on first use, is alive until it is killed too; then the trace is crashed."""
    proc = spawn_script(
        """
import os, sys
import walspan
t = walspan.Store(sys.argv[1], install_hooks=False).open("s")
t.start_span("parent span")
pid = os.fork()
if pid == 0:
    t.start_span("child span")  # first use in the child: attaches as a new writer
    print("child", os.getpid(), flush=True)
    sys.stdin.read()  # blocks until the test kills us
    os._exit(0)
print("parent", os.getpid(), flush=True)
sys.stdin.read()
""",
        str(tmp_path),
    )
    assert proc.stdout is not None
    pids = dict(proc.stdout.readline().split() for _ in range(2))  # "child N" / "parent N", any order
    parent_pid, child_pid = int(pids["parent"]), int(pids["child"])
    assert parent_pid == proc.pid
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        proc.kill()
        proc.wait()
        report = store.recover()
        assert [a.action for a in report.actions] == ["writer_lost"], report.actions
        t = store.load("s")
        assert t["status"] == "running"
        states = {w["pid"]: w["state"] for w in t["writers"]}
        assert states == {parent_pid: "lost", child_pid: "attached"}
        spans = {s["name"]: s["status"] for s in t["spans"]}
        assert spans == {"parent span": "interrupted", "child span": "open"}
        os.kill(child_pid, signal.SIGKILL)
        _wait_gone(child_pid)
        assert store.recover().crashed == ["s"]
        assert store.load("s")["spans"][1]["status"] == "interrupted"
    finally:
        store.close()
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def _wait_gone(pid: int) -> None:
    """Wait (bounded) until a killed process that is not our child has been reaped."""
    try:
        proc = psutil.Process(pid)
        while proc.status() != psutil.STATUS_ZOMBIE:  # a zombie holds no descriptors any more
            proc.wait(timeout=60)
    except psutil.NoSuchProcess:
        pass
