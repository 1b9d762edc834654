"""API edges: the value cap says so once, walspan never replaces the caller's exception, and a
closed Trace or Store refuses to attach again (while a fork child still attaches as its own
writer, and the exit-time detach does not close)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import walspan
from walspan import _fsutil, _hooks, _values
from walspan.errors import ClosedError, TraceClosedError


def test_first_capped_value_logs_one_warning_naming_the_key(store_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A value over max_value_bytes is stored cut (with the marker) and the first such cut in the
    process logs one warning naming its key path and the cap; later cuts log nothing."""
    monkeypatch.setattr(_values, "_cap_warned", False)
    s = walspan.Store(store_dir, durability="process", install_hooks=False, max_value_bytes=100)
    t = s.open("cap")
    with caplog.at_level(logging.WARNING, logger="walspan"):
        t.start_span("small", attributes={"ok": "x" * 100})
        t.start_span("big", attributes={"nested": {"prompt": "y" * 500}})
        t.start_span("bigger", input="z" * 1000)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "attributes['nested']['prompt']" in warnings[0] and "500 bytes" in warnings[0] and "100 bytes" in warnings[0]
    spans = {sp["name"]: sp for sp in s.load("cap")["spans"]}
    assert "truncated, kept 100 of 500 bytes" in spans["big"]["attributes"]["nested"]["prompt"]
    assert spans["small"]["attributes"]["ok"] == "x" * 100
    s.close()


def test_exception_escaping_a_span_is_never_replaced(store_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A KeyError raised inside `with trace.span(...)` after the trace ended elsewhere reaches the
    caller as that KeyError (walspan's TraceClosedError from ending the span is logged); without
    an exception in flight, the span's own error propagates."""
    s = walspan.Store(store_dir, durability="process", install_hooks=False)
    t = s.open("x")
    other = walspan.Store(store_dir, durability="process", install_hooks=False)
    with caplog.at_level(logging.WARNING, logger="walspan"), pytest.raises(KeyError, match="mine"):
        with t.span("work"):
            other.open("x").end()
            raise KeyError("mine")
    assert any("TraceClosedError" in r.getMessage() and "KeyError" in r.getMessage() for r in caplog.records)
    with pytest.raises(TraceClosedError):
        with t.span("late"):
            pass
    other.close()
    s.close()


def test_io_error_while_ending_a_span_keeps_the_callers_exception(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error writing the span's end while the caller's exception propagates: the caller
    gets their ValueError, not the OSError; the same exit with a clean block raises the OSError."""
    s = walspan.Store(store_dir, durability="process", install_hooks=False)
    t = s.open("io")

    def fail_writes(op: str, path: str) -> None:
        if op == "write" and path.endswith(".wal"):
            raise OSError(28, "No space left on device")

    theirs, clean = t.start_span("work"), t.start_span("clean")  # started now, ended by the with
    monkeypatch.setattr(_fsutil.faults, "hook", fail_writes)
    with pytest.raises(ValueError, match="theirs"):
        with theirs:
            raise ValueError("theirs")
    with pytest.raises(OSError, match="No space left"):
        with clean:
            pass
    monkeypatch.setattr(_fsutil.faults, "hook", None)
    s.close()


def test_trace_used_after_close_raises_and_writes_nothing(store_dir: Path) -> None:
    """After Trace.close() every write through that Trace (or its spans) raises ClosedError and
    the WAL is byte-for-byte unchanged (no silent re-attach); another Trace of the session, and
    a new store.open(), still work."""
    s = walspan.Store(store_dir, durability="process", install_hooks=False)
    t = s.open("c")
    keep = s.open("c")
    span = t.start_span("open")
    t.close()
    wal = s.wal_path("c")
    before = wal.read_bytes()
    for call in (lambda: t.start_span("x"), lambda: t.set_metadata(a=1), lambda: t.end(), lambda: span.end(), lambda: span.add_event("e")):
        with pytest.raises(ClosedError, match="closed"):
            call()
    assert wal.read_bytes() == before
    keep.start_span("still fine").end()
    keep.close()
    s.open("c").start_span("again").end()
    assert [sp["name"] for sp in s.load("c")["spans"]] == ["open", "still fine", "again"]
    s.close()


def test_store_used_after_close_raises_and_writes_nothing(store_dir: Path) -> None:
    """After Store.close(): open() and every write through its traces raise ClosedError, nothing
    is appended; reading (load) still works."""
    s = walspan.Store(store_dir, durability="process", install_hooks=False)
    t = s.open("c")
    t.start_span("before").end()
    s.close()
    wal = s.wal_path("c")
    before = wal.read_bytes()
    with pytest.raises(ClosedError):
        s.open("c")
    with pytest.raises(ClosedError):
        t.start_span("after")
    assert wal.read_bytes() == before
    assert s.load("c")["spans"][0]["name"] == "before"


def test_fork_child_still_attaches_and_exit_detach_does_not_close(store_dir: Path) -> None:
    """A fork() child appending through its parent's Trace attaches as its own writer (closing
    is explicit, forking is not); the exit-time detach (detach_all) releases without closing."""
    s = walspan.Store(store_dir, durability="process", install_hooks=False)
    t = s.open("f")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            t.start_span("from-child").end()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    s.install_hooks = True  # only hooked stores are detached at exit; just for this call
    _hooks.detach_all()
    s.install_hooks = False
    t.start_span("after-exit-detach").end()
    doc = s.load("f")
    assert [sp["name"] for sp in doc["spans"]] == ["from-child", "after-exit-detach"]
    assert len({sp["writer_id"] for sp in doc["spans"]}) == 2
    s.close()
