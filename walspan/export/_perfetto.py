"""A folded trace as Chrome trace-event JSON, which ui.perfetto.dev (and chrome://tracing) opens.

One process track per writer process (named after its host, pid and writer id); each span is
an async begin/end pair ("b"/"e") keyed by its span id, so spans of one thread that overlap,
such as parallel tool calls, get lanes of their own instead of being forced to nest as
complete events would. Span events are instant events. Timestamps are microseconds.
Interrupted spans end where the fold ended them and carry "[interrupted]" in their name; open
spans end at the last time their writer was heard from and carry "[open]".
"""

from __future__ import annotations

import json
from typing import Any

CATEGORY = "span"


def trace_events(trace: dict[str, Any]) -> dict[str, Any]:
    """The trace as a trace-event JSON object: {"traceEvents": [...], "displayTimeUnit": "ms"}."""
    tracks: dict[str, int] = {}
    events: list[dict[str, Any]] = []
    writers = {w["writer_id"]: w for w in trace["writers"]}

    def track(writer_id: str) -> int:
        pid = tracks.get(writer_id)
        if pid is None:
            pid = tracks[writer_id] = len(tracks) + 1
            w = writers.get(writer_id)
            label = f"{w['host']} pid {w['pid']} (writer {writer_id})" if w else f"writer {writer_id or '?'}"
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}})
        return pid

    for s in trace["spans"]:
        wid = s.get("writer_id") or ""
        pid = track(wid)
        start = s["start_time"] or 0
        end = s["end_time"]
        name = s["name"]
        if s["status"] == "open":
            last = writers[wid]["last_time"] if wid in writers else None
            end = max(start, last or 0)
            name += " [open]"
        elif s["status"] == "interrupted":
            name += " [interrupted]"
        args = {
            "span_id": s["span_id"],
            "parent_span_id": s["parent_span_id"],
            "kind": s["kind"],
            "status": s["status"],
            "status_message": s["status_message"],
            "attributes": s["attributes"],
        }
        common = {"cat": CATEGORY, "id": "0x" + s["span_id"], "pid": pid, "tid": 0, "name": name}
        events.append({**common, "ph": "b", "ts": start / 1000, "args": args})
        for e in s["events"]:
            events.append(
                {"ph": "i", "s": "p", "pid": pid, "tid": 0, "name": e["name"], "ts": (e["time"] or start) / 1000,
                 "args": {"span_id": s["span_id"], **e["attributes"]}}
            )
        events.append({**common, "ph": "e", "ts": (end or start) / 1000})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "metadata": {"session_id": trace["session_id"], "trace_id": trace["trace_id"], "status": trace["status"]},
    }


def perfetto(trace: dict[str, Any]) -> bytes:
    return json.dumps(trace_events(trace), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
