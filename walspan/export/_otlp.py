"""A folded trace as OTLP: one model, two encodings.

`model()` builds the OTLP `TracesData` as nested dicts with the protobuf field names (ids as
bytes, times as ints); `to_json_dict()` applies the OTLP/JSON rules to it (lowerCamelCase
keys, trace and span ids as lowercase hex, not base64, 64-bit integers as decimal strings,
enums as integers) and `to_proto()` builds the official opentelemetry-proto messages from it,
so the two encodings cannot drift apart. Default values are left out, as protobuf does.

Spans still open, or interrupted by a crash, are exported with what is known and marked: the
attribute `walspan.span.status` ("open" / "interrupted"), and status ERROR with the reason
(interrupted) or UNSET with a message (open); an open span's end time is the last time its
writer was heard from, the rule the fold uses for interrupted spans.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

from ._genai import native_attributes

KINDS = {"internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}
STATUS_CODES = {"unset": 0, "ok": 1, "error": 2}
STATE_ATTRIBUTE = "walspan.span.status"
_INT64 = frozenset({"start_time_unix_nano", "end_time_unix_nano", "time_unix_nano", "int_value"})
_IDS = frozenset({"trace_id", "span_id", "parent_span_id"})
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200


def any_value(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if isinstance(v, bool):
        return {"bool_value": v}
    if isinstance(v, int):
        # int64 on the wire; walspan values reach 2**64 - 1, the rest travels as text
        return {"int_value": v} if -(1 << 63) <= v < (1 << 63) else {"string_value": str(v)}
    if isinstance(v, float):
        return {"double_value": v}
    if isinstance(v, str):
        return {"string_value": v}
    if isinstance(v, list):
        return {"array_value": {"values": [any_value(x) for x in v]} if v else {}}
    if isinstance(v, dict):
        return {"kvlist_value": {"values": key_values(v)} if v else {}}
    raise TypeError(f"not a trace value: {type(v).__name__}")


def key_values(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": any_value(v)} for k, v in attrs.items()]


def _put(d: dict[str, Any], key: str, value: Any) -> None:
    if value:  # protobuf leaves default values (0, "", empty lists) out
        d[key] = value


def _flags(trace_flags: int | None, remote: bool | None) -> int:
    flags = (trace_flags or 0) & 0xFF
    if remote is not None:
        flags |= _HAS_IS_REMOTE | (_IS_REMOTE if remote else 0)
    return flags


def _span(trace: dict[str, Any], s: dict[str, Any], last_heard: dict[str, int], include_io: bool) -> dict[str, Any]:
    otel = "resource" in s
    if otel:
        attrs, kind = dict(s["attributes"]), KINDS.get(s.get("kind") or "", 1)
    else:
        attrs, kind = native_attributes(s, trace["session_id"], include_io)
        kind = KINDS.get(s.get("kind") or "", kind)
    state = s["status"]
    start = s["start_time"] or 0
    end = s["end_time"]
    if state in ("open", "interrupted"):
        attrs[STATE_ATTRIBUTE] = state
    if state == "open":
        code, message = 0, "walspan: not ended when exported"
        end = max(start, last_heard.get(s.get("writer_id") or "", 0))
    elif state == "interrupted":
        code, message = 2, f"walspan: interrupted ({s.get('status_message') or 'writer lost'})"
    else:
        code, message = STATUS_CODES.get(state, 0), s.get("status_message") or ""
    dropped = s.get("dropped") or {}
    out: dict[str, Any] = {
        "trace_id": bytes.fromhex(s.get("trace_id") or trace["trace_id"]),
        "span_id": bytes.fromhex(s["span_id"]),
    }
    _put(out, "trace_state", s.get("trace_state"))
    if s.get("parent_span_id"):
        out["parent_span_id"] = bytes.fromhex(s["parent_span_id"])
    if "flags" in s or "parent_remote" in s:  # an SDK span (or one joined from a traceparent)
        _put(out, "flags", _flags(s.get("flags"), bool(s.get("parent_remote"))))
    _put(out, "name", s["name"])
    out["kind"] = kind
    _put(out, "start_time_unix_nano", start)
    _put(out, "end_time_unix_nano", end or 0)
    _put(out, "attributes", key_values(attrs))
    _put(out, "dropped_attributes_count", dropped.get("attributes", 0))
    events = []
    for e in s["events"]:
        ev: dict[str, Any] = {}
        _put(ev, "time_unix_nano", e["time"] or 0)
        _put(ev, "name", e["name"])
        _put(ev, "attributes", key_values(e["attributes"]))
        _put(ev, "dropped_attributes_count", e.get("dropped", 0))
        events.append(ev)
    _put(out, "events", events)
    _put(out, "dropped_events_count", dropped.get("events", 0))
    links = []
    for link in s.get("links") or ():
        lk: dict[str, Any] = {"trace_id": bytes.fromhex(link["trace_id"]), "span_id": bytes.fromhex(link["span_id"])}
        _put(lk, "trace_state", link.get("trace_state"))
        _put(lk, "attributes", key_values(link.get("attributes") or {}))
        _put(lk, "dropped_attributes_count", link.get("dropped", 0))
        if "flags" in link or "remote" in link:
            _put(lk, "flags", _flags(link.get("flags"), link.get("remote")))
        links.append(lk)
    _put(out, "links", links)
    _put(out, "dropped_links_count", dropped.get("links", 0))
    status: dict[str, Any] = {}
    _put(status, "message", message)
    _put(status, "code", code)
    _put(out, "status", status)
    return out


def _native_resource(trace: dict[str, Any], writer: dict[str, Any] | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"service.name": trace["metadata"].get("service.name", "walspan")}
    if writer is not None:
        attrs.update({"host.name": writer["host"], "process.pid": writer["pid"], "walspan.writer.id": writer["writer_id"]})
    return {"attributes": attrs}


def model(trace: dict[str, Any], *, include_io: bool = False) -> dict[str, Any]:
    """The trace as an OTLP TracesData, protobuf field names, ids as bytes (see the module doc)."""
    return spans_model([(trace, trace["spans"])], include_io=include_io)


def spans_model(parts: Iterable[tuple[dict[str, Any], Iterable[dict[str, Any]]]], *, include_io: bool = False) -> dict[str, Any]:
    """Some spans of one or more traces as one OTLP TracesData (what a shipper sends in a batch).

    Each part is `(trace, spans)`: `trace` gives the context a span is encoded in (its
    `session_id`, `trace_id`, `metadata` and `writers`, as in the folded trace dict; its own
    `spans` are not read) and `spans` are folded span dicts of that trace. Spans are grouped
    by resource and scope as `model()` groups a whole trace."""
    from .. import __version__

    groups: dict[str, tuple[dict[str, Any], dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]]] = {}
    for trace, spans in parts:
        writers = {w["writer_id"]: w for w in trace["writers"]}
        last_heard = {w["writer_id"]: w["last_time"] or 0 for w in trace["writers"]}
        for s in spans:
            if "resource" in s:
                res, scope = s["resource"], s.get("scope") or {}
            else:
                res = _native_resource(trace, writers.get(s.get("writer_id") or ""))
                scope = {"name": "walspan", "version": __version__}
            rkey = json.dumps(res, sort_keys=True)
            skey = json.dumps(scope, sort_keys=True)
            scopes = groups.setdefault(rkey, (res, {}))[1]
            scopes.setdefault(skey, (scope, []))[1].append(_span(trace, s, last_heard, include_io))
    resource_spans = []
    for res, scopes in groups.values():
        rs: dict[str, Any] = {"resource": {}}
        _put(rs["resource"], "attributes", key_values(res.get("attributes") or {}))
        scope_spans = []
        for scope, spans in scopes.values():
            sc: dict[str, Any] = {}
            _put(sc, "name", scope.get("name"))
            _put(sc, "version", scope.get("version"))
            _put(sc, "attributes", key_values(scope.get("attributes") or {}))
            ss: dict[str, Any] = {"scope": sc, "spans": spans}
            _put(ss, "schema_url", scope.get("schema_url"))
            scope_spans.append(ss)
        rs["scope_spans"] = scope_spans
        _put(rs, "schema_url", res.get("schema_url"))
        resource_spans.append(rs)
    out: dict[str, Any] = {}
    _put(out, "resource_spans", resource_spans)
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def to_json_dict(value: Any, key: str = "") -> Any:
    """The OTLP/JSON encoding of a model (see the module doc for the rules)."""
    if isinstance(value, dict):
        return {_camel(k): to_json_dict(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json_dict(v, key) for v in value]
    if isinstance(value, bytes):
        return value.hex() if key in _IDS else base64.b64encode(value).decode("ascii")
    if key in _INT64 and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def traces_data(trace: dict[str, Any], *, include_io: bool = False) -> dict[str, Any]:
    """The trace as an OTLP/JSON `TracesData` object."""
    return to_json_dict(model(trace, include_io=include_io))  # type: ignore[no-any-return]


def otlp_json(trace: dict[str, Any], *, include_io: bool = False) -> bytes:
    """One line of the OTLP file-exporter layout: a TracesData as JSON, then a newline."""
    body = json.dumps(traces_data(trace, include_io=include_io), ensure_ascii=False, separators=(",", ":"))
    return body.encode("utf-8") + b"\n"


def otlp_proto(trace: dict[str, Any], *, include_io: bool = False) -> bytes:
    """The serialized ExportTraceServiceRequest an OTLP/HTTP endpoint (/v1/traces,
    application/x-protobuf) takes, built with the official opentelemetry-proto messages."""
    return proto_request(model(trace, include_io=include_io))


def proto_request(m: dict[str, Any]) -> bytes:
    """A model (`model()`, `spans_model()`) as a serialized ExportTraceServiceRequest."""
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    except ImportError as exc:
        raise ImportError("OTLP protobuf export needs opentelemetry-proto: pip install 'walspan[otel]'") from exc
    return ExportTraceServiceRequest(resource_spans=m.get("resource_spans", [])).SerializeToString()  # type: ignore[no-any-return]


def json_request(m: dict[str, Any]) -> bytes:
    """A model as the OTLP/JSON body of an ExportTraceServiceRequest (POST /v1/traces,
    application/json): the TracesData object without the trailing newline."""
    return json.dumps(to_json_dict(m), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
