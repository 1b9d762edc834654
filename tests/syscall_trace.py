"""Run Python code under the syscall tracer (tests/syscalls/trace.c) and read what it logged.

The tracer is a small C library loaded with LD_PRELOAD: every open, write, pwrite, fsync,
fdatasync, ftruncate, rename, link and unlink the traced process makes through libc becomes one
line of a log file, with CLOCK_MONOTONIC start and end times, the pid, the descriptor's resolved
path and inode, offsets, lengths and the result. A traced script adds its own lines with `mark()`
(e.g. "ack 3 17" once an append returned), so the log is one ordered history per process, and
the timestamps order calls across processes. This is what lets a test check the real effect of
the durability code (which file was fdatasync'ed, after which write, before which
acknowledgement) rather than a Python-level hook that a broken implementation could still call.

Typical use (the `syscall_tracer` fixture in conftest.py builds the library):

    log = tracer.run(SCRIPT, str(store_dir))            # SCRIPT calls mark("ack ...")
    for ack in log.marks("ack"):
        ...log.history(ack.pid)...
"""

from __future__ import annotations

import bisect
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes

LOG_ENV = "WALSPAN_SYSCALL_LOG"
DATA_ENV = "WALSPAN_SYSCALL_DATA"
SOURCE = Path(__file__).with_name("syscalls") / "trace.c"
TESTS_DIR = Path(__file__).parent
TIMEOUT = 120.0  # safety net for a hung child; never reached when things work

FLUSHES = ("fdatasync", "fsync")
WRITES = ("pwrite", "write")


class TracerUnavailable(RuntimeError):
    """No C compiler to build the tracer with."""


@dataclass(frozen=True)
class Call:
    """One line of the log: a traced call, or a marker the traced script wrote (op == "mark")."""

    index: int  # line number: the order in which calls completed
    t0: int  # CLOCK_MONOTONIC ns just before the call (for a mark: when it was written)
    t1: int  # ... and just after it
    pid: int
    op: str
    fields: dict[str, str] = field(default_factory=dict)
    text: str = ""  # a mark's text
    data: bytes | None = None  # the bytes written (logs taken with data=True)

    def _path(self, key: str) -> str:
        return os.fsdecode(unquote_to_bytes(self.fields[key]))

    @property
    def path(self) -> str:
        """The file the call acted on (for rename and link: the new name)."""
        return self._path("new" if self.op in ("rename", "link") else "path")

    @property
    def old(self) -> str:
        return self._path("old")

    @property
    def ok(self) -> bool:
        return self.fields["err"] == "0" and int(self.fields["ret"]) >= 0

    @property
    def ret(self) -> int:
        return int(self.fields["ret"])

    @property
    def ino(self) -> int:
        return int(self.fields["ino"])

    @property
    def off(self) -> int:
        return int(self.fields["off"])

    @property
    def length(self) -> int:
        return int(self.fields["len"])

    @property
    def span(self) -> tuple[int, int]:
        """[start, end) of the bytes a successful write put in the file."""
        return self.off, self.off + self.ret

    def __str__(self) -> str:
        if self.op == "mark":
            return f"#{self.index} pid {self.pid} mark {self.text}"
        shown = " ".join(f"{k}={v}" for k, v in self.fields.items() if k not in ("fd",))
        return f"#{self.index} pid {self.pid} {self.op} {shown}"


@dataclass
class TraceLog:
    calls: list[Call]

    @classmethod
    def read(cls, path: Path) -> TraceLog:
        calls = []
        with open(path, "rb") as f:
            for index, raw in enumerate(f):
                calls.append(parse_line(index, raw.decode("ascii").rstrip("\n")))
        return cls(calls)

    def pids(self) -> list[int]:
        return sorted({c.pid for c in self.calls})

    def history(self, pid: int) -> list[Call]:
        """One process's calls and marks, in the order it made them."""
        return [c for c in self.calls if c.pid == pid]

    def marks(self, prefix: str = "", pid: int | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.op == "mark" and c.text.startswith(prefix) and (pid is None or c.pid == pid)
        ]

    def on(self, path: str | os.PathLike[str], ops: Iterable[str] | None = None) -> list[Call]:
        """Calls acting on `path` (see Call.path), optionally only those named in `ops`."""
        p = os.fspath(path)
        wanted = None if ops is None else set(ops)
        return [c for c in self.calls if c.op != "mark" and (wanted is None or c.op in wanted) and c.path == p]


def parse_line(index: int, line: str) -> Call:
    t0, t1, pid, op, *rest = line.split(" ")
    if op == "mark":
        return Call(index, int(t0), int(t1), int(pid), op, text=" ".join(rest))
    fields = dict(kv.split("=", 1) for kv in rest)
    data = fields.pop("data", None)
    return Call(index, int(t0), int(t1), int(pid), op, fields, data=None if data is None else bytes.fromhex(data))


# -- inside a traced process ------------------------------------------------------------------

_mark_fd: list[int] = []


def mark(text: str) -> None:
    """Append a marker line to the trace log of this (traced) process: one O_APPEND write, so it
    lands whole, after every call this process made before it."""
    if not _mark_fd:
        _mark_fd.append(os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
    t = time.monotonic_ns()  # CLOCK_MONOTONIC, the tracer's clock
    os.write(_mark_fd[0], f"{t} {t} {os.getpid()} mark {text}\n".encode())


# -- running traced processes -----------------------------------------------------------------


@dataclass(frozen=True)
class Tracer:
    """The built tracer library; runs Python code under it."""

    lib: Path

    @classmethod
    def build(cls, directory: Path) -> Tracer:
        cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            raise TracerUnavailable("no C compiler (cc, gcc or clang) on PATH to build tests/syscalls/trace.c")
        lib = directory / "libsyscalltrace.so"
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(lib), str(SOURCE), "-ldl"],
            check=True, capture_output=True, timeout=TIMEOUT,
        )
        tracer = cls(lib)
        tracer._self_check(directory)
        return tracer

    def _self_check(self, directory: Path) -> None:
        """The library really interposes this interpreter's calls (a static build, or a libc
        the tracer does not match, would log nothing, and every "no such call" check would pass
        without looking): one file written, fdatasync'ed and renamed must show up, in order."""
        log_path = directory / "self-check.log"
        target = directory / "self-check.dat"
        code = f"""
            import os
            fd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT, 0o600)
            os.pwrite(fd, b"abc", 5)
            os.fdatasync(fd)
            os.ftruncate(fd, 2)
            os.close(fd)
            os.replace({str(target)!r}, {str(target) + ".2"!r})
            mark("done")
        """
        log = self.run(code, log=log_path)
        got = [(c.op, c.path) for c in log.calls if c.op != "mark" and c.path.startswith(str(target))]
        want = [
            ("open", str(target)),
            ("pwrite", str(target)),
            ("fdatasync", str(target)),
            ("ftruncate", str(target)),
            ("rename", str(target) + ".2"),
        ]
        if got != want or log.calls[-1].text != "done":
            raise RuntimeError(f"the syscall tracer does not see this interpreter's calls: {got}")

    def env(self, log: Path, data: bool = False) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_PRELOAD"] = f"{self.lib} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(self.lib)
        env[LOG_ENV] = str(log)
        env.pop(DATA_ENV, None)
        if data:
            env[DATA_ENV] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
        return env

    def spawn(self, code: str, *args: str, log: Path, data: bool = False, **popen: object) -> subprocess.Popen[str]:
        """Start `python -c code args...` under the tracer (the code may call `mark`)."""
        script = "from syscall_trace import mark\n" + textwrap.dedent(code)
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            [sys.executable, "-c", script, *args], env=self.env(log, data), text=True, **popen
        )

    def run(self, code: str, *args: str, log: Path, data: bool = False) -> TraceLog:
        """Run `code` to completion under the tracer; its log (a failing child fails the test)."""
        p = self.spawn(code, *args, log=log, data=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=TIMEOUT)
        if p.returncode != 0:
            raise AssertionError(f"traced child exited {p.returncode}\nstdout:\n{out}\nstderr:\n{err}")
        return TraceLog.read(log)

    def run_many(self, code: str, argvs: Sequence[Sequence[str]], *, log: Path, data: bool = False) -> TraceLog:
        """Run one traced child per argv, concurrently, all logging to `log`."""
        procs = [
            self.spawn(code, *argv, log=log, data=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for argv in argvs
        ]
        failures = []
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            if p.returncode != 0:
                failures.append(f"exit {p.returncode}\nstdout:\n{out}\nstderr:\n{err}")
        if failures:
            raise AssertionError("traced children failed:\n" + "\n".join(failures))
        return TraceLog.read(log)


# -- durability checks over a log -------------------------------------------------------------


def writes_of(calls: Sequence[Call], path: str, start: int, end: int, before: int | None = None) -> list[Call]:
    """The latest successful writes among `calls` (in log order; only those with index <
    `before` if given) that put the bytes [start, end) into `path`, latest first. Raises
    AssertionError if they do not cover the whole range."""
    hi = len(calls) if before is None else bisect.bisect_left(calls, before, key=lambda c: c.index)
    found: list[Call] = []
    missing = [(start, end)]  # ranges not yet covered by a later write
    for c in reversed(calls[:hi]):
        if not missing:
            break
        if c.op not in WRITES or not c.ok or c.path != path:
            continue
        a, b = c.span
        if any(a < m_end and b > m_start for m_start, m_end in missing):
            found.append(c)
            missing = [r for m_start, m_end in missing for r in ((m_start, min(m_end, a)), (max(m_start, b), m_end)) if r[0] < r[1]]
    if missing:
        raise AssertionError(f"no write of bytes {missing} of {path} before this point")
    return found


def flushes_of(log: TraceLog, path: str, ops: Iterable[str] = FLUSHES) -> list[Call]:
    """The successful flushes of `path` (by any process), in the order they completed."""
    return [c for c in log.on(path, ops) if c.ok]


def covering_flush(flushes: Sequence[Call], written: Call, acked: Call) -> Call | None:
    """Among `flushes` (see flushes_of), one that began after `written` completed and ended
    before `acked` (a mark) began: such a flush covers what `written` wrote. None if none."""
    for c in flushes:
        if c.t0 >= written.t1 and c.t1 <= acked.t0:
            return c
    return None
