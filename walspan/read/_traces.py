"""Whole traces, read: one-line summaries of every session (what `ls` shows) and the folded
trace in bounded memory (what `show` walks).

A summary comes from the compactor's `.walspan/S.summary` when that still describes the log
(the WAL ends exactly after the fingerprinted record it names: O(1) per compacted session),
and from a fold of the log otherwise. Liveness is computed read-only: a writer's liveness
lock is probed, never a record written (see walspan._liveness).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import _fsutil, _liveness
from .._fold import RUNNING, TraceFold
from .._leanfold import PackedSpans, fields_of, fold_wal_lean, iter_canonical
from .._names import decode_stem, encode_session_id
from .._summary import read_summary, summarize
from .._wal import internal_dir
from ..errors import CorruptWALError, SessionNotFoundError, WalspanError
from ._records import Cursor, cursor_matches_fd

LIVE, IDLE, DEAD = "live", "idle", "dead-unrecovered"


def iso_time(ns: int | None) -> str | None:
    """UTC ISO-8601 with the zone spelled out (`2024-05-01T12:00:00.123456Z`), or None."""
    if not isinstance(ns, int) or isinstance(ns, bool):
        return None
    dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns % 1_000_000_000) // 1000:06d}Z"


@dataclass
class TraceSummary:
    """One session, as `ls` shows it. `status` is the trace's (`running`, `completed`, `error`,
    `crashed`) or `corrupt` / `unreadable` (then `error` says why). `liveness` (running traces
    only): `live` (a writer process is alive), `idle` (every writer detached cleanly) or
    `dead-unrecovered` (writers attached but all dead: `walspan recover` will mark it crashed).
    `source`: `summary` (the compactor's summary file) or `fold` (the log was folded)."""

    session_id: str
    stem: str
    status: str
    trace_id: str | None = None
    liveness: str | None = None
    status_message: str | None = None
    start_time: int | None = None
    end_time: int | None = None
    spans: int = 0
    error_spans: int = 0
    open_spans: int = 0
    anomalies: int = 0
    writers: int = 0
    wal_bytes: int = 0
    source: str = "fold"
    error: str | None = None
    attached: list[dict[str, Any]] = field(default_factory=list, repr=False)  # writer_id, host, pid, process_start_time

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """Typed fields, times as UTC ISO-8601 strings with their zone."""
        return {
            "session_id": self.session_id,
            "trace_id": self.trace_id,
            "status": self.status,
            "liveness": self.liveness,
            "status_message": self.status_message,
            "started": iso_time(self.start_time),
            "ended": iso_time(self.end_time),
            "duration_ms": (self.end_time - self.start_time) / 1e6 if self.start_time and self.end_time else None,
            "spans": self.spans,
            "error_spans": self.error_spans,
            "open_spans": self.open_spans,
            "anomalies": self.anomalies,
            "writers": self.writers,
            "wal_bytes": self.wal_bytes,
            "source": self.source,
            "error": self.error,
        }


def list_stems(directory: str | os.PathLike[str]) -> list[str]:
    """File-name stems of every WAL in the store, sorted."""
    return sorted(n[:-4] for n in os.listdir(directory) if n.endswith(".wal") and not n.startswith("."))


def summarize_stem(directory: str | os.PathLike[str], stem: str) -> TraceSummary:
    """The summary of the session whose WAL is `stem`.wal (never raises for a bad file)."""
    d = os.fspath(directory)
    path = os.path.join(d, stem + ".wal")
    guess = decode_stem(stem) or stem
    try:
        fd = _fsutil.open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SessionNotFoundError(guess, path) from None
    except OSError as exc:
        return TraceSummary(guess, stem, "unreadable", error=f"{exc.filename or path}: {exc.strerror or exc}")
    try:
        size = os.fstat(fd).st_size
        doc = _valid_summary(d, stem, fd, path, guess, size)
        if doc is not None:
            source = "summary"
        else:
            fold, _scan = fold_wal_lean(path)
            doc = summarize(fold, 0)
            source = "fold"
    except CorruptWALError as exc:
        return TraceSummary(guess, stem, "corrupt", error=str(exc))
    except (OSError, ValueError) as exc:
        where = getattr(exc, "filename", None) or path
        return TraceSummary(guess, stem, "unreadable", error=f"{where}: {getattr(exc, 'strerror', None) or exc}")
    finally:
        os.close(fd)
    sid = doc.get("session_id")
    status = str(doc.get("status"))
    return TraceSummary(
        session_id=sid if isinstance(sid, str) else guess,
        stem=stem,
        status=status,
        trace_id=doc.get("trace_id"),
        liveness=liveness(d, doc.get("attached") or []) if status == RUNNING else None,
        status_message=doc.get("status_message"),
        start_time=doc.get("start_time"),
        end_time=doc.get("end_time"),
        spans=int(doc.get("spans") or 0),
        error_spans=int(doc.get("error_spans") or 0),
        open_spans=int(doc.get("open_spans") or 0),
        anomalies=int(doc.get("anomalies") or 0),
        writers=int(doc.get("writers") or 0),
        wal_bytes=size,
        source=source,
        attached=list(doc.get("attached") or []),
    )


def _valid_summary(d: str, stem: str, fd: int, path: str, guess: str, size: int) -> dict[str, Any] | None:
    """The compactor's summary if it still describes this log, else None (then fold)."""
    doc = read_summary(d, stem)
    if doc is None:
        return None
    try:
        cursor = Cursor.from_dict({**doc["wal"], "record": doc["wal"]["last_record"]})
    except (KeyError, TypeError, ValueError):
        return None
    if cursor.offset != size or cursor.at_start:
        return None  # appended to (or cut) since it was written
    if not cursor_matches_fd(fd, path, guess, cursor):
        return None  # the same size, but not the same log (cut and regrown, or replaced)
    return doc


def liveness(directory: str, attached: list[dict[str, Any]]) -> str:
    """live / idle / dead-unrecovered for a running trace with these attached writers."""
    if not attached:
        return IDLE
    internal = internal_dir(directory)
    if any(_liveness.writer_alive(internal, w) for w in attached):
        return LIVE
    return DEAD


def summaries(directory: str | os.PathLike[str]) -> Iterator[TraceSummary]:
    """A summary of every session in the store, in file-name order (a WAL removed meanwhile is
    skipped)."""
    for stem in list_stems(directory):
        try:
            yield summarize_stem(directory, stem)
        except SessionNotFoundError:
            continue


def summary(directory: str | os.PathLike[str], session_id: str) -> TraceSummary:
    return summarize_stem(directory, encode_session_id(session_id))


class TraceView:
    """A session's trace folded now, in bounded memory: the canonical trace's fields in
    `info` (everything but the spans), the spans one at a time, and the canonical JSON as a
    stream of bytes (equal to `Store.load()` dumped canonically)."""

    def __init__(self, directory: str | os.PathLike[str], session_id: str) -> None:
        path = os.path.join(os.fspath(directory), encode_session_id(session_id) + ".wal")
        try:
            os.lstat(path)
        except FileNotFoundError:
            raise SessionNotFoundError(session_id, path) from None  # other errors (permission) propagate
        try:
            self._fold, self.scan = fold_wal_lean(path)
        except OSError as exc:
            if isinstance(exc, WalspanError) or exc.filename:
                raise
            raise OSError(exc.errno, exc.strerror, path) from exc
        self.path = path
        self.info = fields_of(self._fold)
        del self.info["spans"]

    @property
    def fold(self) -> TraceFold:
        return self._fold

    def __len__(self) -> int:
        return len(self._fold.spans)

    def spans(self) -> Iterator[dict[str, Any]]:
        """Every span, in the order of their SPAN_START records."""
        spans = self._fold.spans
        assert isinstance(spans, PackedSpans)
        return spans.iter_values()

    def span(self, span_id: str) -> dict[str, Any]:
        """One span (KeyError if there is none), unpacked for reading."""
        spans = self._fold.spans
        assert isinstance(spans, PackedSpans)
        return spans.peek(span_id)

    def canonical_json(self) -> Iterator[bytes]:
        return iter_canonical(self._fold)


__all__ = ["TraceSummary", "TraceView", "iso_time", "liveness", "list_stems", "summaries", "summary"]
