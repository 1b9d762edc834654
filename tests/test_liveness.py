"""Writer liveness: proven by a kernel-released lock, failing closed (DESIGN.md invariants 6 and 10)."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import walfiles
from crashkit import ForkWriter, attach_records, expect_line, spawn_script

import walspan
from walspan import _liveness
from walspan._format import RecordType, pack_payload
from walspan._names import encode_session_id
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


def _unused_pid() -> int:
    """A pid no process can have: Linux allocates pids below pid_max only."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read())
    assert not psutil.pid_exists(pid)
    return pid


def test_liveness_fails_closed_when_nothing_can_be_proven(tmp_path: Path) -> None:
    """Fail closed: a writer on another host, or with an unusable id / pid / start time, counts
    as alive. Each case differs in one field from a control record (this host, no lock file,
    no such pid) that is provably dead, so each guard is what decides it."""
    internal = internal_dir(str(tmp_path))
    dead = {
        "writer": "00000000000000bb",
        "host": _liveness.HOST,
        "pid": _unused_pid(),
        "process_start": 1.0,
    }
    assert _liveness.writer_alive(internal, dead) is False  # the control: death is proven
    assert _liveness.writer_alive(internal, dict(dead, host="some-other-host")) is True
    assert _liveness.writer_alive(internal, dict(dead, host=None)) is True
    for wid in ("../../escape", "", "00000000000000b", "00000000000000bbb", "00000000000000BB", None, 7):
        assert _liveness.writer_alive(internal, dict(dead, writer=wid)) is True, wid
    for pid in (str(dead["pid"]), 0, -1, None):
        assert _liveness.writer_alive(internal, dict(dead, pid=pid)) is True, pid
    me = dict(dead, pid=os.getpid())
    for start in (None, 0, "1.0"):
        assert _liveness.writer_alive(internal, dict(me, process_start=start)) is True, start


def _crafted_trace(store_dir: Path, session: str, attach: dict[str, Any]) -> Path:
    """A WAL built byte by byte: TRACE_START, then one WRITER_ATTACH carrying `attach` as is
    (whatever a file could say, not what walspan would write)."""
    now = time.time_ns()
    start = {"trace_id": "ab" * 16, "session_id": session, "metadata": {}, "time": now, "writer": attach["writer"]}
    data = walfiles.build_wal(
        0x5EED,
        [
            (RecordType.TRACE_START, 1, pack_payload(start)),
            (RecordType.WRITER_ATTACH, 2, pack_payload(dict(attach, time=now))),
        ],
    )
    store_dir.mkdir(parents=True, exist_ok=True)
    path = store_dir / (encode_session_id(session) + ".wal")
    path.write_bytes(data)
    return path


def _lock_file(store_dir: Path, wid: str) -> Path:
    wdir = Path(_liveness.writers_dir(internal_dir(str(store_dir))))
    wdir.mkdir(parents=True, exist_ok=True)
    path = wdir / (wid + ".live")
    path.write_text("{}")
    return path


def test_the_lock_decides_even_when_the_pid_names_a_live_process_here(tmp_path: Path) -> None:
    """Same host name, another pid namespace (a container): the attach record's pid and start
    time match a live process here (this one), but the writer's lock file is free, so the
    writer is dead, and recovery marks its trace crashed. The pid is never consulted while
    the lock file exists."""
    store_dir = tmp_path / "traces"
    wid = "00000000000000c1"
    me = psutil.Process()
    _crafted_trace(store_dir, "s", {"writer": wid, "host": _liveness.HOST, "pid": me.pid, "process_start": me.create_time()})
    lock = _lock_file(store_dir, wid)
    internal = internal_dir(str(store_dir))
    (rec,) = attach_records(store_dir / (encode_session_id("s") + ".wal"))
    assert _liveness._pid_alive(rec) is True  # by pid, it would look alive
    assert _liveness.writer_alive(internal, rec) is False
    store = walspan.Store(store_dir, install_hooks=False)
    try:
        assert store.recover().crashed == ["s"]
        assert store.load("s")["status"] == "crashed"
        assert not lock.exists()  # the dead writer's lock file is swept
    finally:
        store.close()


def test_the_lock_decides_even_when_the_pid_does_not_exist_here(tmp_path: Path) -> None:
    """The other direction: a writer whose lock is held (alive, in another pid namespace) but
    whose pid names no process here is alive; recovery leaves its trace running. Once the lock
    is released (the writer died) the same record is proven dead."""
    store_dir = tmp_path / "traces"
    wid = "00000000000000c2"
    _crafted_trace(store_dir, "s", {"writer": wid, "host": _liveness.HOST, "pid": _unused_pid(), "process_start": 1.0})
    lock = _lock_file(store_dir, wid)
    internal = internal_dir(str(store_dir))
    (rec,) = attach_records(store_dir / (encode_session_id("s") + ".wal"))
    assert _liveness._pid_alive(rec) is False  # by pid, it would look dead
    store = walspan.Store(store_dir, install_hooks=False)
    try:
        with open(lock, "r+b") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: conflicts like another process
            assert _liveness.writer_alive(internal, rec) is True
            assert store.recover().actions == []
            assert store.load("s")["status"] == "running"
        assert _liveness.writer_alive(internal, rec) is False
        assert store.recover().crashed == ["s"]
    finally:
        store.close()


def test_a_reused_pid_is_not_the_writer(tmp_path: Path) -> None:
    """Without a lock file, a process with the writer's pid but another start time (the pid was
    reused) does not keep the writer alive, even when the two starts are only 2 s apart; with
    the same start time it does. Shown on writer_alive and through recover()."""
    proc = spawn_script("import sys; print('up', flush=True); sys.stdin.read()")
    try:
        expect_line(proc, "up")
        started = psutil.Process(proc.pid).create_time()
        store_dir = tmp_path / "traces"
        internal = internal_dir(str(store_dir))
        for sid, wid, start in (("same", "00000000000000d1", started), ("reused", "00000000000000d2", started - 2.0)):
            _crafted_trace(store_dir, sid, {"writer": wid, "host": _liveness.HOST, "pid": proc.pid, "process_start": start})
        same = {"writer": "00000000000000d1", "host": _liveness.HOST, "pid": proc.pid, "process_start": started}
        assert _liveness.writer_alive(internal, same) is True
        for delta in (2.0, -2.0, 3600.0):
            assert _liveness.writer_alive(internal, dict(same, process_start=started + delta)) is False, delta
        store = walspan.Store(store_dir, install_hooks=False)
        try:
            assert store.recover().crashed == ["reused"]
            assert store.load("same")["status"] == "running"
        finally:
            store.close()
    finally:
        proc.communicate("")


CRAFTED_IDS = ("../../../outside", "../x", "/abs/outside", "00000000000000e1/../../../outside")


@pytest.mark.parametrize("wid", CRAFTED_IDS)
def test_a_crafted_writer_id_never_reaches_outside_the_writers_directory(tmp_path: Path, wid: str) -> None:
    """A WAL whose attach record names a writer id shaped like a path cannot make liveness read,
    or recovery unlink, a file outside .walspan/writers/: a free-locked sentinel sits exactly
    where the id would resolve (`writers/<id>.live`), yet recovery proves nothing from it (the
    trace stays running: fail closed) and leaves it in place, and so does the sweep of dead
    lock files when asked for that id directly."""
    store_dir = tmp_path / "traces"
    internal = internal_dir(str(store_dir))
    wdir = Path(_liveness.writers_dir(internal))
    wdir.mkdir(parents=True)
    if wid.startswith("/"):
        wid = str(tmp_path / "abs-outside")
    target = Path(os.path.normpath(os.path.join(wdir, wid + ".live")))
    assert wdir not in target.parents
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("sentinel")
    _crafted_trace(store_dir, "s", {"writer": wid, "host": _liveness.HOST, "pid": _unused_pid(), "process_start": 1.0})
    (rec,) = attach_records(store_dir / (encode_session_id("s") + ".wal"))
    assert rec["writer"] == wid
    assert _liveness.writer_alive(internal, rec) is True
    store = walspan.Store(store_dir, install_hooks=False)
    try:
        assert store.recover().actions == []
        assert store.load("s")["status"] == "running"
        _liveness.remove_dead_lock_file(internal, wid)
        assert target.read_text() == "sentinel"
        assert store.verify().ok
    finally:
        store.close()


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
