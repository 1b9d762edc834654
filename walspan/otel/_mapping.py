"""SDK span -> walspan record payloads: what on_start and on_end write (docs/OTEL.md, "Mapping").

Everything the SDK hands a processor is kept: ids, parent and whether it is remote, kind,
name, the SDK's start and end times, attributes with their dropped counts, events (with
exceptions), links, status and description, trace state and flags, resource and scope. A
span's attributes, events and links can change between start and end (and the SDK's limits
evict the oldest ones), so the end record carries them whole, replacing what the start said.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, StatusCode

from .._values import clean

#: walspan's kind names for OTel span kinds; the OTLP exporter maps them back.
KIND_NAMES = {
    SpanKind.INTERNAL: "internal",
    SpanKind.SERVER: "server",
    SpanKind.CLIENT: "client",
    SpanKind.PRODUCER: "producer",
    SpanKind.CONSUMER: "consumer",
}
STATUS_NAMES = {StatusCode.UNSET: "unset", StatusCode.OK: "ok", StatusCode.ERROR: "error"}


def trace_hex(trace_id: int) -> str:
    return format(trace_id, "032x")


def span_hex(span_id: int) -> str:
    return format(span_id, "016x")


def _value(v: Any) -> Any:
    # OTel allows NaN and infinities, JSON does not: they are kept as the strings OTLP/JSON
    # itself uses for them ("NaN", "Infinity", "-Infinity"), the one lossy case of the mapping.
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, (tuple, list)):
        return [_value(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    return v


def attributes(attrs: Mapping[str, Any] | None, where: str, limit: int) -> dict[str, Any]:
    out = {str(k): _value(v) for k, v in (attrs or {}).items()}
    return clean(out, where, limit)  # type: ignore[no-any-return]


def _dropped(**counts: int) -> dict[str, int]:
    return {k: n for k, n in counts.items() if n}


def resource(res: Resource | None, limit: int) -> dict[str, Any]:
    out: dict[str, Any] = {"attributes": attributes(res.attributes if res else None, "resource", limit)}
    if res is not None and res.schema_url:
        out["schema_url"] = res.schema_url
    return out


def scope(sc: InstrumentationScope | None, limit: int) -> dict[str, Any]:
    if sc is None:
        return {"name": ""}
    out: dict[str, Any] = {"name": sc.name}
    if sc.version:
        out["version"] = sc.version
    if sc.schema_url:
        out["schema_url"] = sc.schema_url
    if sc.attributes:
        out["attributes"] = attributes(sc.attributes, "scope.attributes", limit)
    return out


def links(items: Iterable[Link], limit: int) -> list[dict[str, Any]]:
    out = []
    for i, link in enumerate(items):
        ctx = link.context
        d: dict[str, Any] = {
            "trace_id": trace_hex(ctx.trace_id),
            "span_id": span_hex(ctx.span_id),
            "attributes": attributes(link.attributes, f"links[{i}].attributes", limit),
            "flags": int(ctx.trace_flags),
            "remote": bool(ctx.is_remote),
        }
        if ctx.trace_state:
            d["trace_state"] = ctx.trace_state.to_header()
        dropped = getattr(link, "dropped_attributes", 0)
        if dropped:
            d["dropped"] = dropped
        out.append(d)
    return out


def events(span: ReadableSpan, limit: int) -> list[dict[str, Any]]:
    out = []
    for i, e in enumerate(span.events):
        d: dict[str, Any] = {
            "name": e.name,
            "time": e.timestamp,
            "attributes": attributes(e.attributes, f"events[{i}].attributes", limit),
        }
        dropped = getattr(e, "dropped_attributes", 0)
        if dropped:
            d["dropped"] = dropped
        out.append(d)
    return out


def start_payload(span: ReadableSpan, limit: int, res: dict[str, Any], sc: dict[str, Any]) -> dict[str, Any]:
    ctx = span.context
    parent = span.parent
    payload: dict[str, Any] = {
        "span_id": span_hex(ctx.span_id),
        "parent": span_hex(parent.span_id) if parent is not None and parent.is_valid else None,
        "name": clean(span.name, "span name", limit),
        "kind": KIND_NAMES.get(span.kind, "internal"),
        "attributes": attributes(span.attributes, "attributes", limit),
        "input": None,
        "start_time": span.start_time,
        "trace_id": trace_hex(ctx.trace_id),
        "flags": int(ctx.trace_flags),
        "resource": res,
        "scope": sc,
    }
    if payload["parent"] is not None:
        payload["parent_remote"] = bool(parent.is_remote)  # type: ignore[union-attr]
    if ctx.trace_state:
        payload["trace_state"] = ctx.trace_state.to_header()
    if span.links:
        payload["links"] = links(span.links, limit)
    dropped = _dropped(attributes=span.dropped_attributes, links=span.dropped_links)
    if dropped:
        payload["dropped"] = dropped
    return payload


def end_payload(span: ReadableSpan, limit: int) -> dict[str, Any]:
    status = span.status
    payload: dict[str, Any] = {
        "span_id": span_hex(span.context.span_id),
        "status": STATUS_NAMES.get(status.status_code, "unset"),
        "end_time": span.end_time,
        "name": clean(span.name, "span name", limit),
        "attributes": attributes(span.attributes, "attributes", limit),
        "events": events(span, limit),
    }
    if status.description:
        payload["message"] = clean(status.description, "status description", limit)
    if span.links:
        payload["links"] = links(span.links, limit)
    dropped = _dropped(attributes=span.dropped_attributes, events=span.dropped_events, links=span.dropped_links)
    if dropped:
        payload["dropped"] = dropped
    return payload
