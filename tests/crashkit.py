"""Helpers for the crash-resilience tests: writer processes that report what was acknowledged.

A writer child appends numbered events to one span and, after each append *returns*, sends an
ack through a pipe. The parent therefore knows exactly which events were acknowledged when it
kills the child (SIGKILL chosen from the ack stream, never after a sleep), and can check after
recovery that every acknowledged event is present exactly once and that each writer's events
form a prefix of what it sent.

Child processes come in two flavours:
- `ForkWriter`: multiprocessing "fork" context (fast; also exercises walspan's fork handling);
- `run_script` / `spawn_script`: `sys.executable -c <script>` for a fresh interpreter (hooks,
  signals, os._exit, environment propagation).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from typing import Any

import walspan
from walspan._format import RecordType, unpack_payload
from walspan._reader import ScanState, iter_records

FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")
WAIT_S = 60.0  # safety net for every blocking wait; never reached when things work


# -- fork writers ---------------------------------------------------------------------------


def ack_writer(
    conn: Any,
    directory: str,
    session: str,
    idx: int,
    n_events: int,
    durability: str,
    pad: int,
    hold: bool,
    parent: str | None = None,
    hooks: bool = False,
) -> None:
    """Child body: open `session`, start one span, append n_events numbered events, acking each.

    Messages sent: ("attached", idx, span_id), ("ack", idx, i) per acknowledged event,
    ("done", idx). With hold=True it then waits for any message from the parent (or to be
    killed) and leaves by returning (multiprocessing's exit path: os._exit after finalizers).
    With hooks=True the Store is left unclosed: walspan's exit finalizer must detach it;
    otherwise the writer closes its Store itself.
    """
    store = walspan.Store(directory, durability=durability, install_hooks=hooks)
    trace = store.open(session)
    span = trace.start_span(f"writer-{idx}", parent=parent)
    conn.send(("attached", idx, span.span_id))
    filler = "x" * pad
    for i in range(n_events):
        span.add_event("e", {"w": idx, "i": i, "pad": filler})
        conn.send(("ack", idx, i))
    conn.send(("done", idx))
    if hold:
        try:
            conn.recv()
        except EOFError:
            pass
    if not hooks:
        store.close()


class ForkWriter:
    """One ack_writer in a forked child, with the parent's end of its pipe."""

    def __init__(
        self,
        directory: str,
        session: str,
        idx: int,
        n_events: int,
        *,
        durability: str = "process",
        pad: int = 0,
        hold: bool = True,
        parent: str | None = None,
        hooks: bool = False,
    ) -> None:
        self.idx = idx
        self.n_events = n_events
        self.conn, child_conn = FORK.Pipe(duplex=True)
        self.proc = FORK.Process(
            target=ack_writer,
            args=(
                child_conn,
                str(directory),
                session,
                idx,
                n_events,
                durability,
                pad,
                hold,
                parent,
                hooks,
            ),
            daemon=True,
        )
        self.proc.start()
        child_conn.close()
        self.acked = 0  # number of acknowledged events (they are 0..acked-1)
        self.span_id: str | None = None
        self.done = False
        self.eof = False

    def pump(self) -> str | None:
        """Receive one message; returns its kind (None at end of stream)."""
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.eof = True
            return None
        kind = msg[0]
        if kind == "attached":
            self.span_id = msg[2]
        elif kind == "ack":
            assert msg[2] == self.acked, f"writer {self.idx} acked {msg[2]} after {self.acked}"
            self.acked += 1
        elif kind == "done":
            self.done = True
        return str(kind)

    def wait_done(self) -> None:
        while not self.done:
            if self.pump() is None:
                raise AssertionError(f"writer {self.idx} died before finishing (exit {self.proc.exitcode})")

    def wait_attached(self) -> None:
        while self.span_id is None:
            if self.pump() is None:
                raise AssertionError(f"writer {self.idx} died before attaching (exit {self.proc.exitcode})")

    def kill(self) -> None:
        if self.proc.pid is not None and self.proc.exitcode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.join(WAIT_S)
        assert self.proc.exitcode is not None, f"writer {self.idx} did not die"

    def release(self) -> None:
        """Let a holding writer leave normally; wait for it."""
        try:
            self.conn.send("exit")
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(WAIT_S)
        assert self.proc.exitcode == 0, f"writer {self.idx} exit code {self.proc.exitcode}"

    def close(self) -> None:
        self.conn.close()


def pump_any(writers: Iterable[ForkWriter]) -> ForkWriter | None:
    """Block until one writer has a message; process it and return that writer."""
    live = {w.conn: w for w in writers if not w.eof}
    if not live:
        return None
    ready = multiprocessing.connection.wait(list(live), timeout=WAIT_S)
    assert ready, "no writer made progress within the safety timeout"
    w = live[ready[0]]  # type: ignore[index]
    w.pump()
    return w


# -- fresh interpreters ---------------------------------------------------------------------


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WALSPAN_CONTEXT", None)
    env.pop("TRACEPARENT", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    if extra:
        env.update(extra)
    return env


def run_script(
    code: str,
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (sys.argv[1:] = args) and wait for it."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=script_env(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
        check=False,  # the caller asserts on the outcome (a crash is often the point)
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_file(path: str | os.PathLike[str], *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a script file in a fresh interpreter (needed where "spawn" children import __main__)."""
    proc = subprocess.run(
        [sys.executable, os.fspath(path), *args],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
        check=False,  # the caller asserts on the outcome
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_script(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `code` in a fresh interpreter with pipes on stdin/stdout (line protocol)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=script_env(env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def expect_line(proc: subprocess.Popen[str], prefix: str) -> str:
    """Read stdout lines until one starts with prefix; fail if the child exits first."""
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"child exited before printing {prefix!r}: {err}")
        if line.startswith(prefix):
            return line.rstrip("\n")


# -- reading outcomes -----------------------------------------------------------------------


def wal_records(wal_path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """(type, payload) of every record in the WAL's valid prefix."""
    fd = os.open(wal_path, os.O_RDONLY)
    try:
        from walspan._reader import read_header

        salt = read_header(fd, os.fspath(wal_path))
        scan = ScanState(os.fspath(wal_path))
        return [(rtype, unpack_payload(p)) for _o, rtype, _s, p in iter_records(fd, scan, salt=salt)]  # type: ignore[arg-type]
    finally:
        os.close(fd)


def terminal_records(wal_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [p for t, p in wal_records(wal_path) if t == RecordType.TERMINAL]


def read_json(store: walspan.Store, session: str) -> dict[str, Any]:
    with open(store.trace_path(session), "rb") as f:
        return json.loads(f.read())  # type: ignore[no-any-return]


def events_by_writer(trace: dict[str, Any]) -> dict[int, list[int]]:
    """Event numbers in trace order, per writer index (events appended by ack_writer)."""
    out: dict[int, list[int]] = {}
    for span in trace["spans"]:
        for ev in span["events"]:
            attrs = ev["attributes"]
            if "w" in attrs and "i" in attrs:
                out.setdefault(attrs["w"], []).append(attrs["i"])
    return out


def check_prefixes(trace: dict[str, Any], writers: Iterable[ForkWriter]) -> None:
    """Every acknowledged event present exactly once; each writer's events a prefix of what it sent."""
    got = events_by_writer(trace)
    for w in writers:
        seq = got.get(w.idx, [])
        assert seq == list(range(len(seq))), f"writer {w.idx}: events are not a prefix in order: {seq[:20]}..."
        assert len(seq) >= w.acked, f"writer {w.idx}: {w.acked} acknowledged but only {len(seq)} present"
        assert len(seq) <= w.n_events


def recover_in_child(directory: str) -> int:
    """Pool task: run recover() in this process; return how many traces it marked crashed."""
    store = walspan.Store(directory, install_hooks=False)
    try:
        return len(store.recover().crashed)
    finally:
        store.close()


def dead_writer(directory: str | os.PathLike[str], session: str, n_events: int = 3, **kwargs: Any) -> ForkWriter:
    """A writer process that attached to `session`, acknowledged n_events events in one open
    span, and was SIGKILLed without detaching."""
    w = ForkWriter(os.fspath(directory), session, kwargs.pop("idx", 0), n_events, **kwargs)
    w.wait_done()
    w.kill()
    w.close()
    return w


def attach_records(wal_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [p for t, p in wal_records(wal_path) if t == RecordType.WRITER_ATTACH]


def burst_then_exit(directory: str, session: str, n: int, durability: str) -> None:
    """Child body (M2): a burst of n events, then os._exit(0) at once: no cleanup at all."""
    store = walspan.Store(directory, durability=durability)
    span = store.open(session).start_span("burst")
    for i in range(n):
        span.add_event("tool call", {"w": 0, "i": i})
    os._exit(0)


def race_to_terminate(directory: str, session: str, action: str, barrier: Any, out: Any) -> None:
    """Child body (M3): attach, wait at the barrier, then end or crash the trace; report which
    status this process got recorded ("won") or that it was refused ("refused <status>")."""
    store = walspan.Store(directory, durability="process", install_hooks=False, max_value_bytes=1 << 22)
    trace = store.open(session)
    barrier.wait(WAIT_S)
    try:
        if action == "end":
            trace.end("completed")
        else:
            trace.crash("killed at the same moment")
        out.put((action, "won"))
    except walspan.TraceClosedError as exc:
        out.put((action, f"refused {exc.status}"))
    store.close()
