"""A folded trace as JSON Lines: a "trace" line (everything but the spans), then one "span"
line per span in start order, each naming its session and trace. Values are walspan's own
(docs/FORMAT.md, "Canonical JSON"), for tools that stream records rather than load a tree."""

from __future__ import annotations

import json
from typing import Any


def jsonl(trace: dict[str, Any]) -> bytes:
    head = {k: v for k, v in trace.items() if k != "spans"}
    lines = [{"type": "trace", **head}]
    for s in trace["spans"]:
        lines.append({"type": "span", "session_id": trace["session_id"], "trace_id": s.get("trace_id", trace["trace_id"]), **{k: v for k, v in s.items() if k != "trace_id"}})
    return b"".join(json.dumps(x, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8") + b"\n" for x in lines)
