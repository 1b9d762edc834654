"""Writer identity and liveness: proven by a kernel-held lock, never guessed from a pid.

Each process that attaches to sessions in a store is one writer there. It creates
.walspan/writers/<writer_id>.live, flocks it exclusively, and keeps the descriptor open for
as long as it lives; the kernel drops the lock when the process dies, however it dies. The
attach record names the writer (writer id, host, pid, process start time from psutil).

Liveness check (fails closed: a writer is dead only when that is proven):
- the lock can be taken       -> dead (proven: no process holds it);
- the lock is held            -> alive;
- the lock file is missing    -> the owner removed it on a clean exit, or someone deleted it:
  on this host, dead unless a process with that pid *and* start time exists; on another
  host, alive (nothing can be proven from here).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
from typing import Any, TypeGuard

import psutil

from . import _fsutil, _locking

HOST = socket.gethostname()
# What ProcessWriter names itself (secrets.token_hex(8)). A writer id comes from a WAL, which
# anyone able to write the file could have crafted: it becomes part of a path (the lock file,
# and the file recovery unlinks) only if it has exactly this shape, so no id can reach outside
# the writers directory.
_WRITER_ID = re.compile(r"[0-9a-f]{16}")


def valid_writer_id(wid: object) -> TypeGuard[str]:
    return isinstance(wid, str) and _WRITER_ID.fullmatch(wid) is not None


def writers_dir(internal: str) -> str:
    return os.path.join(internal, "writers")


def process_start_time(pid: int | None = None) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):  # pragma: no cover - e.g. a restricted /proc
        return 0.0


class ProcessWriter:
    """This process's writer identity in one store, and the lock that proves it alive."""

    def __init__(self, internal: str) -> None:
        self.writer_id = secrets.token_hex(8)
        self.pid = os.getpid()
        self.host = HOST
        self.process_start = process_start_time()
        directory = writers_dir(internal)
        os.makedirs(directory, mode=_fsutil.DIR_MODE, exist_ok=True)
        self.path = os.path.join(directory, self.writer_id + ".live")
        fd = _fsutil.open_file(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            if not _locking.try_lock(fd):  # pragma: no cover - a fresh random name
                raise RuntimeError(f"liveness lock {self.path} is already held")
            os.write(fd, json.dumps(self.describe()).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"writer": self.writer_id, "host": self.host, "pid": self.pid, "process_start": self.process_start}

    def release(self) -> None:
        """Clean exit: remove the lock file, then drop the lock."""
        with self._lock:
            if self._fd is None:
                return
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """In a fork child: close the inherited descriptor without unlocking (the parent's)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def writer_alive(internal: str, writer: dict[str, Any]) -> bool:
    """Is the writer described by an attach record still alive? Fails closed.

    The lock decides whenever its file exists, whatever the pid says: the attach record's pid
    may name an unrelated process here (a writer in another pid namespace on a host with the
    same name, a container), and a dead writer's pid may have been reused. Only a missing file
    falls back to pid + start time.
    """
    wid = writer.get("writer_id") or writer.get("writer")
    if not valid_writer_id(wid):
        return True  # not a name we could have written: prove nothing, claim nothing
    path = os.path.join(writers_dir(internal), wid + ".live")
    try:
        fd = _fsutil.open_file(path, os.O_RDWR)
    except FileNotFoundError:
        return _pid_alive(writer)
    try:
        if _locking.try_lock(fd):
            _locking.unlock(fd)
            return False
        return True
    finally:
        os.close(fd)


def _pid_alive(writer: dict[str, Any]) -> bool:
    if writer.get("host") != HOST:
        return True
    pid = writer.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        proc = psutil.Process(pid)
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):  # pragma: no cover - access denied: cannot prove death
        return True
    recorded = writer.get("process_start_time", writer.get("process_start"))
    if not isinstance(recorded, (int, float)) or recorded <= 0:
        return True
    return abs(started - recorded) < 1.0  # same pid, same start: the same process


def remove_dead_lock_file(internal: str, writer_id: str) -> None:
    """Remove the lock file of a writer proven dead (housekeeping; safe if already gone)."""
    if not valid_writer_id(writer_id):
        return  # never a path built from a crafted id (see _WRITER_ID)
    path = os.path.join(writers_dir(internal), writer_id + ".live")
    try:
        fd = _fsutil.open_file(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        if _locking.try_lock(fd):
            os.unlink(path)
    finally:
        os.close(fd)
