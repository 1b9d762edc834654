"""Export a trace to other tools' formats. Every exporter takes the folded trace dict that
`Store.load()` returns (the read API) and returns bytes; none reads a WAL itself.

- `otlp_json`: OTLP/JSON, one TracesData per line (the OTLP file-exporter layout)
- `otlp_proto`: a serialized OTLP ExportTraceServiceRequest (needs the `otel` extra)
- `perfetto`: Chrome trace-event JSON for ui.perfetto.dev
- `jsonl`: walspan's own trace and span records, one per line

`spans_model(parts)` encodes some spans of one or more traces (a shipper's batch) the same way;
`proto_request` / `json_request` turn a model into an OTLP/HTTP request body.

`export(store, session, format)` loads and converts in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._jsonl import jsonl
from ._otlp import json_request, otlp_json, otlp_proto, proto_request, spans_model, traces_data
from ._perfetto import perfetto, trace_events

if TYPE_CHECKING:
    from .._store import Store

FORMATS: dict[str, Callable[..., bytes]] = {
    "otlp-json": otlp_json,
    "otlp-proto": otlp_proto,
    "perfetto": perfetto,
    "jsonl": jsonl,
}


def export(store: Store, session_id: str, format: str, *, include_io: bool = False) -> bytes:
    """The session's trace, folded from its WAL now, in `format` (a FORMATS key).
    include_io: put span inputs and outputs (prompts, completions) in the OTLP GenAI attributes."""
    convert = FORMATS.get(format)
    if convert is None:
        raise ValueError(f"unknown export format {format!r} (one of {', '.join(FORMATS)})")
    trace: dict[str, Any] = store.load(session_id)
    if format.startswith("otlp"):
        return convert(trace, include_io=include_io)
    return convert(trace)


__all__ = [
    "FORMATS",
    "export",
    "json_request",
    "jsonl",
    "otlp_json",
    "otlp_proto",
    "perfetto",
    "proto_request",
    "spans_model",
    "trace_events",
    "traces_data",
]
