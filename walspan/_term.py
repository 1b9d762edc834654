"""What the command line needs from a terminal: escaped text, UTC times, progress on stderr
(only on a terminal), a pager (only on a terminal), and a quiet end when the reader of a pipe
goes away (like git: `walspan show ... | head -2` ends with exit code 141 and no message)."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

# C0 and C1 control characters, DEL, and the bidirectional overrides and isolates (which can
# make a listing read differently from what it holds): shown as escapes, never sent raw.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}
_ESCAPES = {c: _NAMED.get(chr(c), f"\\x{c:02x}") for c in [*range(0x20), *range(0x7F, 0xA0)]}
_ESCAPES.update({c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F]})


def safe(text: object) -> str:
    """`text` with every control character escaped: one line, nothing that drives a terminal."""
    return str(text).translate(_ESCAPES)


def fmt_time(ns: int | None) -> str:
    """A UTC time for people: `2024-05-01 12:00:00.123Z`; `-` for none."""
    if not isinstance(ns, int) or isinstance(ns, bool) or not ns:
        return "-"
    dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%d %H:%M:%S") + f".{(ns % 1_000_000_000) // 1_000_000:03d}Z"


def fmt_duration(start: int | None, end: int | None) -> str:
    if not start or not end:
        return "open"
    ms = (end - start) / 1e6
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


class Progress:
    """`label: done/total detail` on stderr, redrawn at most ten times a second, erased at the
    end; silent unless stderr is a terminal (a pipe or a file never gets it)."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.total = total
        self.enabled = _isatty(self.stream)
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        count = f"{done}/{self.total} " if self.total is not None else ""
        line = f"{self.label}: {count}{safe(detail)}"[:150]
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self._drawn = True

    def done(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def pager(wanted: bool = True) -> Iterator[None]:
    """Send stdout through $WALSPAN_PAGER, $PAGER or `less` (LESS=FRX: quits at once when the
    text fits the screen) when stdout is a terminal; otherwise change nothing."""
    command = os.environ.get("WALSPAN_PAGER", os.environ.get("PAGER", "less"))
    if not wanted or not _isatty(sys.stdout) or command.strip() in ("", "cat"):
        yield
        return
    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    try:
        proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, env=env)
    except OSError:
        yield  # no pager to be had: print directly
        return
    assert proc.stdin is not None
    old = sys.stdout
    sys.stdout = io.TextIOWrapper(proc.stdin, encoding="utf-8", errors="replace", write_through=False)
    try:
        yield
    except BrokenPipeError:
        pass  # the pager was quit before the end: what it did not show is not wanted
    finally:
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            sys.stdout.close()
        sys.stdout = old
        proc.wait()


def silence_stdout() -> None:
    """After EPIPE: point fd 1 at /dev/null so the interpreter's final flush stays quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
