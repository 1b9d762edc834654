"""The fold: a trace's state is a deterministic function of its WAL's valid prefix.

`TraceFold.apply(type, seq, payload)` is the only place where records acquire meaning; the
compactor, `Store.load()`, recovery and the CLI all go through it. The fold never looks at
the clock, the process or the file system, so the same prefix always gives the same state
and the same canonical JSON bytes.

Rules beyond the obvious ones (docs/FORMAT.md, "Fold"):
- the first TERMINAL record decides the status; spans still open then are closed as
  `interrupted`, their end time the last time their writer was heard from;
- WRITER_LOST (appended by recovery for a dead writer while others live) closes that
  writer's open spans the same way;
- a second SPAN_START with a known id, or an end of an already ended span, is ignored
  (first wins); records about an unknown span are counted in `anomalies`;
- the optional keys of docs/FORMAT.md (explicit times, a span's own trace id, links, dropped
  counts, resource, scope, the end-time snapshot of attributes and events) appear in a span
  only when a record carried them, so records written before they existed fold to the same
  bytes as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ._format import RecordType

TRACE_FORMAT = "walspan-trace/1"
SPAN_OPEN = "open"
SPAN_INTERRUPTED = "interrupted"
RUNNING = "running"
TERMINAL_STATUSES = ("completed", "error", "crashed")
#: SPAN_START keys copied into the span as they are, when present (docs/FORMAT.md).
START_EXTRAS = ("trace_id", "trace_state", "flags", "parent_remote", "links", "dropped", "resource", "scope")
#: SPAN_END keys that replace the span's value when present: the span as it was at its end.
END_SNAPSHOT = ("name", "attributes", "links", "dropped")

_T = RecordType


class TraceFold:
    """Trace state being folded from records."""

    def __init__(self) -> None:
        self.session_id: str | None = None
        self.trace_id: str | None = None
        self.start_time: int | None = None
        self.end_time: int | None = None
        self.status = RUNNING
        self.status_message: str | None = None
        self.metadata: dict[str, Any] = {}
        self.spans: dict[str, dict[str, Any]] = {}
        self.open_spans: dict[str, set[str]] = {}  # writer id -> ids of its open spans
        self.writers: dict[str, dict[str, Any]] = {}
        self.anomalies = 0
        self.offset = 0  # end of the last record folded
        self.seq = 0  # its seq
        self.last_record = 0  # its start offset (lets a checkpoint be checked against the WAL)
        self.last_crc = 0  # its header checksum: which record that was, not only where
        self.wal_id = ""  # the id of the WAL folded (a hash of its salt; the salt stays private)

    # -- applying records -----------------------------------------------------------------

    def apply(self, rtype: int, payload: dict[str, Any]) -> None:
        handler = _HANDLERS.get(rtype)
        if handler is None:
            return  # a skippable type from a newer walspan (the reader refused the others)
        writer = payload.get("writer")
        when = payload.get("time")
        if writer is not None and when is not None:
            w = self.writers.get(writer)
            if w is not None and (w["last_time"] is None or when > w["last_time"]):
                w["last_time"] = when
        if self.status != RUNNING and rtype != _T.WRITER_DETACH:
            self.anomalies += 1  # nothing but detaches can follow a terminal record
            return
        handler(self, payload)

    def _trace_start(self, p: dict[str, Any]) -> None:
        if self.trace_id is not None:
            self.anomalies += 1
            return
        self.trace_id = p["trace_id"]
        self.session_id = p["session_id"]
        self.start_time = p.get("time")
        self.metadata.update(p.get("metadata") or {})

    def _attach(self, p: dict[str, Any]) -> None:
        wid = p["writer"]
        w = self.writers.get(wid)
        if w is None:
            self.writers[wid] = {
                "writer_id": wid,
                "host": p.get("host"),
                "pid": p.get("pid"),
                "process_start_time": p.get("process_start"),
                "attached_at": p.get("time"),
                "detached_at": None,
                "state": "attached",
                "last_time": p.get("time"),
                "message": None,
            }
        else:  # the same process attaching again after a detach
            w["state"] = "attached"
            w["detached_at"] = None

    def _detach(self, p: dict[str, Any]) -> None:
        w = self.writers.get(p["writer"])
        if w is None:
            self.anomalies += 1
            return
        if w["state"] == "attached":
            w["state"] = "detached"
            w["detached_at"] = p.get("time")

    def _lost(self, p: dict[str, Any]) -> None:
        wid = p["lost"]
        w = self.writers.get(wid)
        if w is None:
            self.anomalies += 1
            return
        if w["state"] != "attached":
            return
        w["state"] = "lost"
        w["message"] = p.get("message")
        self._interrupt_writer(wid)

    def _span_start(self, p: dict[str, Any]) -> None:
        sid = p["span_id"]
        if sid in self.spans:
            self.anomalies += 1
            return
        writer = p.get("writer")
        self.spans[sid] = {
            "span_id": sid,
            "parent_span_id": p.get("parent"),
            "name": p.get("name"),
            "kind": p.get("kind"),
            "start_time": p.get("start_time", p.get("time")),
            "end_time": None,
            "status": SPAN_OPEN,
            "status_message": None,
            "attributes": dict(p.get("attributes") or {}),
            "events": [],
            "input": p.get("input"),
            "output": None,
            "writer_id": writer,
        }
        span = self.spans[sid]
        for key in START_EXTRAS:
            if key in p:
                span[key] = p[key]
        self.open_spans.setdefault(writer or "", set()).add(sid)

    def _span_attributes(self, p: dict[str, Any]) -> None:
        span = self.spans.get(p["span_id"])
        if span is None:
            self.anomalies += 1
            return
        span["attributes"].update(p.get("attributes") or {})
        if "name" in p:  # a rename (Span.update_name)
            span["name"] = p["name"]

    def _span_event(self, p: dict[str, Any]) -> None:
        span = self.spans.get(p["span_id"])
        if span is None:
            self.anomalies += 1
            return
        span["events"].append(_event(p, p.get("event_time", p.get("time"))))

    def _span_end(self, p: dict[str, Any]) -> None:
        span = self.spans.get(p["span_id"])
        if span is None:
            self.anomalies += 1
            return
        if span["end_time"] is not None:
            return  # first end wins
        span["end_time"] = p.get("end_time", p.get("time"))
        span["status"] = p.get("status") or "ok"
        span["status_message"] = p.get("message")
        if "output" in p:
            span["output"] = p["output"]
        for key in END_SNAPSHOT:
            if key in p:
                span[key] = p[key]
        if "events" in p:
            span["events"] = [_event(e, e.get("time")) for e in p["events"]]
        self.open_spans.get(span["writer_id"] or "", set()).discard(span["span_id"])

    def _metadata(self, p: dict[str, Any]) -> None:
        self.metadata.update(p.get("metadata") or {})

    def _terminal(self, p: dict[str, Any]) -> None:
        self.status = p["status"]
        self.status_message = p.get("message")
        self.end_time = p.get("time")
        for wid in list(self.open_spans):
            self._interrupt_writer(wid)

    def _interrupt_writer(self, wid: str) -> None:
        ids = self.open_spans.pop(wid, set())
        if not ids:
            return
        w = self.writers.get(wid)
        last = w["last_time"] if w is not None else self.end_time
        for sid in sorted(ids):
            span = self.spans[sid]
            span["end_time"] = max(span["start_time"] or 0, last or 0)
            span["status"] = SPAN_INTERRUPTED
            span["status_message"] = "writer lost" if w is not None and w["state"] == "lost" else "trace ended"

    # -- views ----------------------------------------------------------------------------

    @property
    def terminal(self) -> bool:
        return self.status != RUNNING

    def live_writers(self) -> list[dict[str, Any]]:
        return [w for w in self.writers.values() if w["state"] == "attached"]

    def to_dict(self) -> dict[str, Any]:
        """The canonical trace (docs/FORMAT.md, "Canonical JSON")."""
        return {
            "format": TRACE_FORMAT,
            "session_id": self.session_id,
            "trace_id": self.trace_id,
            "status": self.status,
            "status_message": self.status_message,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "metadata": self.metadata,
            "spans": list(self.spans.values()),
            "writers": list(self.writers.values()),
            "anomalies": self.anomalies,
            "wal": {
                "offset": self.offset,
                "seq": self.seq,
                "last_record": self.last_record,
                "last_crc": self.last_crc,
                "id": self.wal_id,
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceFold:
        """Rebuild a fold from a canonical trace (the compactor's checkpoint)."""
        if d.get("format") != TRACE_FORMAT:
            raise ValueError(f"not a {TRACE_FORMAT} document")
        f = cls()
        f.session_id = d["session_id"]
        f.trace_id = d["trace_id"]
        f.status = d["status"]
        f.status_message = d["status_message"]
        f.start_time = d["start_time"]
        f.end_time = d["end_time"]
        f.metadata = d["metadata"]
        f.spans = {s["span_id"]: s for s in d["spans"]}
        for s in d["spans"]:
            if s["end_time"] is None:
                f.open_spans.setdefault(s["writer_id"] or "", set()).add(s["span_id"])
        f.writers = {w["writer_id"]: w for w in d["writers"]}
        f.anomalies = d["anomalies"]
        wal = d["wal"]
        f.offset, f.seq, f.wal_id = int(wal["offset"]), int(wal["seq"]), str(wal["id"])
        f.last_record, f.last_crc = int(wal["last_record"]), int(wal["last_crc"])
        return f


def _event(p: dict[str, Any], when: Any) -> dict[str, Any]:
    event = {"name": p.get("name"), "time": when, "attributes": p.get("attributes") or {}}
    if "dropped" in p:  # attributes the SDK's limits dropped
        event["dropped"] = p["dropped"]
    return event


def dumps(trace: dict[str, Any]) -> bytes:
    """Canonical JSON bytes: same trace, same bytes."""
    return json.dumps(trace, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


_HANDLERS: dict[int, Callable[[TraceFold, dict[str, Any]], None]] = {
    _T.TRACE_START: TraceFold._trace_start,
    _T.WRITER_ATTACH: TraceFold._attach,
    _T.WRITER_DETACH: TraceFold._detach,
    _T.WRITER_LOST: TraceFold._lost,
    _T.SPAN_START: TraceFold._span_start,
    _T.SPAN_ATTRIBUTES: TraceFold._span_attributes,
    _T.SPAN_EVENT: TraceFold._span_event,
    _T.SPAN_END: TraceFold._span_end,
    _T.METADATA: TraceFold._metadata,
    _T.TERMINAL: TraceFold._terminal,
}
