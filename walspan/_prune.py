"""`walspan prune`: retention. Which traces go is decided here, from the read API; how their
files go (crash-safe, the WAL last) is walspan._retention's job.

A trace is removed only if it has a terminal record (ended, or crashed by recovery), it ended
before the cutoff, its status is one of those asked for, it is not among the `keep` newest,
no writer process still attached to it is alive, and, when shipping is configured for the
store (`walspan ship` left its marker in `.walspan/ship/NAME/`), every configured shipper has
had the whole log acknowledged (its saved cursor is at the WAL's end: docs/SHIP.md). All of
it is checked again under the session's compaction lock just before its first file goes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _retention
from ._fold import TERMINAL_STATUSES
from .read import LIVE, TraceSummary, end_cursor, iso_time, list_stems, liveness, read_records, summarize_stem
from .ship._cursors import unshipped

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> int:
    """`30d`, `12h`, `90m`, `45s`, `2w` -> seconds; ValueError naming the text otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise ValueError(f"--older-than {text!r}: expected a number and a unit (s, m, h, d or w), e.g. 30d")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass
class PrunedTrace:
    session_id: str
    trace_id: str | None
    status: str
    end_time: int | None
    files: list[_retention.Removed] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "trace_id": self.trace_id,
            "status": self.status,
            "ended": iso_time(self.end_time),
            "bytes": self.bytes,
            "files": [f.path for f in self.files],
        }


@dataclass
class PruneReport:
    dry_run: bool
    removed: list[PrunedTrace] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (session id, why)
    orphans: list[_retention.Removed] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(t.bytes for t in self.removed) + sum(f.bytes for f in self.orphans)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "removed": [t.to_json() for t in self.removed],
            "kept": [{"session_id": s, "reason": r} for s, r in self.kept],
            "orphans": [f.path for f in self.orphans],
            "bytes_freed": self.bytes_freed,
            "errors": self.errors,
        }


def _live_writers(directory: str, s: TraceSummary) -> bool:
    """Whether a writer process attached to the trace is alive. The writer that appended the
    terminal record does not count: end() leaves it attached in the log (nothing may follow a
    terminal record, not even its detach) although it is done with the trace."""
    alive = [w for w in s.attached if liveness(directory, [w]) == LIVE]
    if alive and s.status in TERMINAL_STATUSES:
        ender = _terminal_writer(directory, s.session_id)
        alive = [w for w in alive if w.get("writer_id") != ender]
    return bool(alive)


def _terminal_writer(directory: str, session_id: str) -> str | None:
    last = None
    for rec in read_records(directory, session_id, after=end_cursor(directory, session_id, back=1)):
        last = rec
    if last is None or last.type != "terminal":
        return None
    by = last.payload.get("writer", last.payload.get("by"))
    return by if isinstance(by, str) else None


def prune(
    directory: str,
    *,
    older_than: int,
    keep: int = 0,
    statuses: tuple[str, ...] = TERMINAL_STATUSES,
    dry_run: bool = False,
    now: float | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> PruneReport:
    """Remove (or, dry_run, list) the traces the rules above select; see the module doc."""
    for st in statuses:
        if st not in TERMINAL_STATUSES:
            raise ValueError(f"--status {st!r}: only ended traces are pruned ({', '.join(TERMINAL_STATUSES)})")
    if keep < 0:
        raise ValueError(f"--keep must be 0 or more, not {keep}")
    cutoff = int(((time.time() if now is None else now) - older_than) * 1e9)
    report = PruneReport(dry_run)
    stems = list_stems(directory)
    matching: list[TraceSummary] = []
    for i, stem in enumerate(stems):
        if progress is not None:
            progress(i, len(stems), stem)
        try:
            s = summarize_stem(directory, stem)
        except LookupError:
            continue  # removed meanwhile
        if s.error is not None:
            report.errors.append(f"{s.session_id}: not pruned: {s.error}")
        elif s.status in statuses:
            matching.append(s)
    matching.sort(key=lambda s: (s.end_time or 0, s.session_id), reverse=True)
    for rank, s in enumerate(matching):
        if rank < keep:
            report.kept.append((s.session_id, f"among the {keep} newest"))
            continue
        if s.end_time is None or s.end_time >= cutoff:
            continue
        if _live_writers(directory, s):
            report.kept.append((s.session_id, "a writer process attached to it is still alive"))
            continue
        behind = unshipped(directory, s.stem, s.session_id, s.trace_id)
        if behind:
            report.kept.append((s.session_id, f"not yet shipped to {', '.join(behind)}"))
            continue
        trace = PrunedTrace(s.session_id, s.trace_id, s.status, s.end_time)
        if dry_run:
            paths = _retention.session_files(directory, s.stem)
            trace.files = [_retention.Removed(p, _retention.file_size(p)) for p in paths]
            report.removed.append(trace)
            continue

        def still_prunable(s: TraceSummary = s) -> bool:
            now_s = summarize_stem(directory, s.stem)
            return (
                now_s.trace_id == s.trace_id
                and now_s.status == s.status
                and not _live_writers(directory, now_s)
                and not unshipped(directory, s.stem, s.session_id, s.trace_id)
            )

        try:
            files = _retention.remove_session(directory, s.stem, still_prunable)
        except LookupError:
            continue  # removed by someone else meanwhile
        except OSError as exc:
            report.errors.append(f"{s.session_id}: {exc.filename or directory}: {exc.strerror or exc}")
            continue
        if files is None:
            report.kept.append((s.session_id, "changed while pruning (a live writer, or a new trace)"))
            continue
        trace.files = files
        report.removed.append(trace)
    orphans = _retention.orphans(directory)
    if dry_run:
        report.orphans = [_retention.Removed(p, _retention.file_size(p)) for p in orphans]
    else:
        report.orphans = _retention.remove_orphans(orphans)
    return report
