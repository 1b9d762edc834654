"""`walspan tail`: records as one readable line each (or one JSON object each), from the read
API's Follower. Formatting only: reading, following and surviving compaction, repair and
pruning beside it are walspan.read's job."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from ._term import fmt_duration, fmt_time, safe
from .read import Notice, Record, iso_time

_NAMES_KEPT = 10_000  # span id -> (name, start): enough to name the end of any recent span


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = safe(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class TailFormatter:
    """Turns records and notices into lines; remembers recent span names so that an end or
    an event can say which span it belongs to."""

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json
        self._spans: OrderedDict[tuple[str, str], tuple[str, int | None]] = OrderedDict()

    def line(self, item: Record | Notice) -> str:
        if isinstance(item, Notice):
            if self.as_json:
                doc: dict[str, Any] = {"notice": item.kind, "session_id": item.session_id, "message": item.message}
                if item.seq is not None:
                    doc["seq"] = item.seq
                return json.dumps(doc, ensure_ascii=False)
            return f"-- {safe(item.session_id)}: {item.kind}: {safe(item.message)}"
        if self.as_json:
            return json.dumps(
                {
                    "session_id": item.session_id,
                    "seq": item.seq,
                    "type": item.type,
                    "time": iso_time(item.time),
                    "cursor": str(item.cursor),
                    "payload": item.payload,
                },
                ensure_ascii=False,
                sort_keys=True,
            )
        return f"{fmt_time(item.time)} {safe(item.session_id)} #{item.seq} {item.type} {self._detail(item)}".rstrip()

    def _name(self, session: str, span_id: Any) -> str:
        known = self._spans.get((session, str(span_id)))
        return safe(known[0]) if known else f"span {safe(span_id)}"

    def _detail(self, rec: Record) -> str:
        p = rec.payload
        t = rec.type
        if t == "trace_start":
            return f"trace {safe(p.get('trace_id'))}" + (f" metadata {_short(p['metadata'])}" if p.get("metadata") else "")
        if t == "writer_attach":
            return f"writer {safe(p.get('writer'))} attached (pid {safe(p.get('pid'))} on {safe(p.get('host'))})"
        if t == "writer_detach":
            return f"writer {safe(p.get('writer'))} detached"
        if t == "writer_lost":
            return f"writer {safe(p.get('lost'))} lost: {_short(p.get('message'))}"
        if t == "span_start":
            key = (rec.session_id, str(p.get("span_id")))
            self._spans[key] = (str(p.get("name")), rec.time)
            self._spans.move_to_end(key)
            while len(self._spans) > _NAMES_KEPT:
                self._spans.popitem(last=False)
            parent = f" parent {safe(p['parent'])}" if p.get("parent") else ""
            text = f"{safe(p.get('name'))} [{safe(p.get('kind'))}] {safe(p.get('span_id'))}{parent}"
            return text + (f" < {_short(p['input'])}" if p.get("input") is not None else "")
        if t == "span_attributes":
            return f"{self._name(rec.session_id, p.get('span_id'))} {_short(p.get('attributes'))}"
        if t == "span_event":
            return f"{self._name(rec.session_id, p.get('span_id'))} ! {safe(p.get('name'))} {_short(p.get('attributes') or {})}"
        if t == "span_end":
            known = self._spans.pop((rec.session_id, str(p.get("span_id"))), None)
            name = safe(known[0]) if known else f"span {safe(p.get('span_id'))}"
            took = f" {fmt_duration(known[1], rec.time)}" if known else ""
            msg = f" ({_short(p['message'], 60)})" if p.get("message") else ""
            out = f" > {_short(p['output'])}" if "output" in p and p["output"] is not None else ""
            return f"{name} {safe(p.get('status'))}{took}{msg}{out}"
        if t == "metadata":
            return _short(p.get("metadata"))
        if t == "terminal":
            return f"trace {safe(p.get('status'))}" + (f": {_short(p.get('message'), 120)}" if p.get("message") else "")
        return _short(p)
