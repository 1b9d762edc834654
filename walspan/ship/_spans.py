"""Which spans a record ships: the fold of a session's log, turned into what a backend sees.

Every record is folded (walspan._fold gives records their meaning); a record ships

- SPAN_END: the span as it ended (the first end only);
- SPAN_START, with `partial`: the span as it started, marked open, so a backend shows work in
  progress (the same span id is shipped again when it ends);
- WRITER_LOST (recovery found a writer dead): that writer's spans, closed `interrupted`;
- TERMINAL (the trace ended, or recovery marked it crashed): the spans still open, closed
  `interrupted`, and the trace-status span (below);
- anything else: nothing (but the cursor still moves past it).

The trace-status span carries a trace's final status, which OTLP has no other place for: name
`walspan.trace`, no parent, from the trace's start to its end, status OK for `completed` and
ERROR otherwise, attributes `walspan.trace.status` and `walspan.session.id`. Its span id is
derived from the trace id, so it is the same span every time it is shipped.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from .._fold import RUNNING, TraceFold
from .._format import RecordType
from ..read import Cursor, Record

TRACE_SPAN_NAME = "walspan.trace"
_CONTEXT_TYPES = frozenset({RecordType.TRACE_START, RecordType.WRITER_ATTACH, RecordType.METADATA})  # what spans are encoded in


class Item(NamedTuple):
    """One record's spans, with the context they are encoded in and the cursor after it."""

    cursor: Cursor
    time: int | None  # when the record was appended (ns), for the lag
    trace: dict[str, Any]  # session_id, trace_id, metadata, writers (see export.spans_model)
    spans: list[dict[str, Any]]


def trace_span_id(trace_id: str) -> str:
    return hashlib.sha256(f"{TRACE_SPAN_NAME}:{trace_id}".encode()).hexdigest()[:16]


def _type_number(name: str) -> int:
    if name.startswith("type_"):
        return int(name[5:])
    return int(RecordType[name.upper()])


def _snapshot(span: dict[str, Any]) -> dict[str, Any]:
    """A copy the fold will not change later (attributes may still be updated after an end)."""
    return dict(span, attributes=dict(span["attributes"]), events=list(span["events"]))


class SessionFeed:
    """The fold of one session's log and the spans each record ships."""

    def __init__(self, session_id: str, partial: bool) -> None:
        self.session_id = session_id
        self.partial = partial
        self.fold = TraceFold()
        self._trace: dict[str, Any] = self._context()

    @property
    def trace_id(self) -> str | None:
        return self.fold.trace_id

    @property
    def ended(self) -> bool:
        return self.fold.status != RUNNING

    def _context(self) -> dict[str, Any]:
        f = self.fold
        return {
            "session_id": f.session_id or self.session_id,
            "trace_id": f.trace_id,
            "metadata": dict(f.metadata),
            "writers": list(f.writers.values()),
        }

    def skip(self, rec: Record) -> None:
        """Fold a record already acknowledged: nothing is shipped for it."""
        rtype = _type_number(rec.type)
        self.fold.apply(rtype, rec.payload)
        if rtype in _CONTEXT_TYPES:
            self._trace = self._context()

    def apply(self, rec: Record) -> Item:
        """Fold a record and return what it ships (possibly no span)."""
        f = self.fold
        rtype = _type_number(rec.type)
        p = rec.payload
        out: list[dict[str, Any]] = []
        if rtype == RecordType.SPAN_END:
            span = f.spans.get(p.get("span_id"))  # type: ignore[arg-type]
            was_open = span is not None and span["end_time"] is None
            f.apply(rtype, p)
            if was_open and span is not None and span["end_time"] is not None and span["status"] != "open":
                out.append(_snapshot(span))
        elif rtype == RecordType.SPAN_START:
            known = p.get("span_id") in f.spans
            f.apply(rtype, p)
            if self.partial and not known and f.status == RUNNING:
                out.append(_snapshot(f.spans[p["span_id"]]))
        elif rtype in (RecordType.TERMINAL, RecordType.WRITER_LOST):
            running = f.status == RUNNING
            before = {sid for ids in f.open_spans.values() for sid in ids}
            f.apply(rtype, p)
            after = {sid for ids in f.open_spans.values() for sid in ids}
            out.extend(_snapshot(f.spans[sid]) for sid in sorted(before - after))
            if rtype == RecordType.TERMINAL and running and f.status != RUNNING:
                out.append(self._trace_span())
        else:
            f.apply(rtype, p)
            if rtype in _CONTEXT_TYPES:
                self._trace = self._context()
        return Item(rec.cursor, rec.time, self._trace, out)

    def _trace_span(self) -> dict[str, Any]:
        f = self.fold
        status = f.status
        return {
            "span_id": trace_span_id(f.trace_id or ""),
            "parent_span_id": None,
            "name": TRACE_SPAN_NAME,
            "kind": None,
            "start_time": f.start_time,
            "end_time": f.end_time or f.start_time,
            "status": "ok" if status == "completed" else "error",
            "status_message": f.status_message or (None if status == "completed" else status),
            "attributes": {"walspan.trace.status": status, "walspan.session.id": f.session_id or self.session_id},
            "events": [],
            "input": None,
            "output": None,
            "writer_id": None,
        }


__all__ = ["TRACE_SPAN_NAME", "Item", "SessionFeed", "trace_span_id"]
