"""SDK spans -> WalSpanProcessor -> walspan -> OTLP/JSON and OTLP protobuf, compared field by
field with what the SDK's own InMemorySpanExporter saw. The OTLP/JSON is judged by
opentelemetry-proto-json's decoder (hex ids, integer enums, 64-bit integers as strings)
re-encoded to the same document, not by protobuf's json_format (which reads hex ids as base64)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the otel extra: pip install -e '.[test,otel]'")
pytest.importorskip("opentelemetry.proto_json", reason="needs the test extra (opentelemetry-proto-json)")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace as trace_api
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto_json.trace.v1.trace import TracesData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: F401
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

import walspan
from walspan.export import otlp_json, otlp_proto
from walspan.otel import WalSpanProcessor

_HEX = re.compile(r"[0-9a-f]+")


def strict_decode(line: bytes) -> TracesData:
    """Decode one OTLP/JSON line and prove it conforms: the decoder must accept it, every id
    must be lowercase hex of the right length, and re-encoding gives back the same document
    (so no unknown key, no base64 id, no string enum, no 64-bit integer as a JSON number)."""
    doc = json.loads(line)
    data = TracesData.from_dict(doc)
    assert data.to_dict() == doc
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for s in ss["spans"]:
                ids = [(s["traceId"], 32), (s["spanId"], 16)] + ([(s["parentSpanId"], 16)] if "parentSpanId" in s else [])
                ids += [(x, n) for link in s.get("links", []) for x, n in ((link["traceId"], 32), (link["spanId"], 16))]
                for value, digits in ids:
                    assert len(value) == digits and _HEX.fullmatch(value), value
    return data


def _any(v: Any) -> Any:
    """An AnyValue (protobuf message or proto-json dataclass) as a Python value."""
    if hasattr(v, "WhichOneof"):
        field = v.WhichOneof("value")
        if field is None:
            return None
        inner = getattr(v, field)
    else:
        field = next((f for f in ("string_value", "bool_value", "int_value", "double_value", "array_value", "kvlist_value") if getattr(v, f) is not None), None)
        if field is None:
            return None
        inner = getattr(v, field)
    if field == "array_value":
        return tuple(_any(x) for x in inner.values)
    if field == "kvlist_value":
        return {kv.key: _any(kv.value) for kv in inner.values}
    return inner


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _any(kv.value) for kv in kvs}


def _norm_otlp(data: Any) -> dict[str, dict[str, Any]]:
    """span id -> the facts of each OTLP span (from a protobuf message or a proto-json one)."""
    out = {}
    for rs in data.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                out[s.span_id.hex()] = {
                    "trace_id": s.trace_id.hex(),
                    "parent": s.parent_span_id.hex() or None,
                    "name": s.name,
                    "kind": int(s.kind),
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "attributes": _attrs(s.attributes),
                    "dropped": (s.dropped_attributes_count or 0, s.dropped_events_count or 0, s.dropped_links_count or 0),
                    "events": [(e.name, e.time_unix_nano, _attrs(e.attributes), e.dropped_attributes_count or 0) for e in s.events],
                    "links": [(lk.trace_id.hex(), lk.span_id.hex(), lk.trace_state or "", _attrs(lk.attributes)) for lk in s.links],
                    "status": (int(s.status.code or 0) if s.status else 0, (s.status.message or "") if s.status else ""),
                    "trace_state": s.trace_state or "",
                    "flags": s.flags or 0,
                    "resource": (_attrs(rs.resource.attributes), rs.schema_url or ""),
                    "scope": (ss.scope.name or "", ss.scope.version or "", ss.schema_url or "", _attrs(ss.scope.attributes)),
                }
    return out


def _norm_sdk(spans: Any) -> dict[str, dict[str, Any]]:
    """The same facts, from the SDK's own ReadableSpans."""

    def val(v: Any) -> Any:
        return tuple(v) if isinstance(v, (list, tuple)) else v

    out = {}
    for s in spans:
        ctx, parent = s.context, s.parent
        flags = int(ctx.trace_flags) | 0x100 | (0x200 if parent is not None and parent.is_remote else 0)
        sc = s.instrumentation_scope
        out[format(ctx.span_id, "016x")] = {
            "trace_id": format(ctx.trace_id, "032x"),
            "parent": format(parent.span_id, "016x") if parent else None,
            "name": s.name,
            "kind": s.kind.value + 1,  # the API's INTERNAL is 0, OTLP's SPAN_KIND_INTERNAL is 1
            "start": s.start_time,
            "end": s.end_time,
            "attributes": {k: val(v) for k, v in s.attributes.items()},
            "dropped": (s.dropped_attributes, s.dropped_events, s.dropped_links),
            "events": [(e.name, e.timestamp, {k: val(v) for k, v in e.attributes.items()}, e.dropped_attributes) for e in s.events],
            "links": [(format(lk.context.trace_id, "032x"), format(lk.context.span_id, "016x"), lk.context.trace_state.to_header(), {k: val(v) for k, v in (lk.attributes or {}).items()}) for lk in s.links],
            "status": ({StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}[s.status.status_code], s.status.description or ""),
            "trace_state": ctx.trace_state.to_header(),
            "flags": flags,
            "resource": ({k: val(v) for k, v in s.resource.attributes.items()}, s.resource.schema_url or ""),
            "scope": (sc.name, sc.version or "", sc.schema_url or "", {k: val(v) for k, v in (sc.attributes or {}).items()}),
        }
    return out


def _pipeline(directory: Path, limits: SpanLimits | None = None) -> tuple[walspan.Store, TracerProvider, InMemorySpanExporter]:
    store = walspan.Store(directory, durability="process", install_hooks=False)
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource({"service.name": "rt-ß", "deploy": ("a", "b"), "n": 7}, schema_url="https://opentelemetry.io/schemas/1.26.0"),
        span_limits=limits,
    )
    provider.add_span_processor(WalSpanProcessor(store))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return store, provider, memory


def _export_both(store: walspan.Store, session: str) -> tuple[dict[str, Any], dict[str, Any]]:
    doc = store.load(session)
    line = otlp_json(doc)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one TracesData per line
    from_json = _norm_otlp(strict_decode(line))
    from_proto = _norm_otlp(ExportTraceServiceRequest.FromString(otlp_proto(doc)))
    return from_json, from_proto


def test_every_field_round_trips_through_walspan_to_otlp(tmp_path: Path) -> None:
    """Spans with every field the SDK records (five kinds, unicode, a 200 KB attribute, arrays,
    int64 extremes, events and an exception, links with trace state and attributes, an error
    status with description, a renamed span, explicit start/end times, a remote parent with
    trace state, limits that drop attributes, events and links, resource and scope with schema
    URLs) come out of walspan's OTLP/JSON and protobuf exactly as the SDK's exporter saw them."""
    limits = SpanLimits(max_span_attributes=6, max_events=3, max_links=2, max_event_attributes=5, max_link_attributes=2)
    store, provider, memory = _pipeline(tmp_path / "t", limits)
    tracer = provider.get_tracer("rt.scope", "2.0", schema_url="https://opentelemetry.io/schemas/1.25.0", attributes={"scope.attr": "x"})
    remote = SpanContext(0x1234567890ABCDEF1234567890ABCDEF, 0x00F067AA0BA902B7, is_remote=True,
                         trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "v1")]))
    parent_ctx = trace_api.set_span_in_context(NonRecordingSpan(remote))
    big = "λ" * 100_000  # 200 KB of UTF-8
    with tracer.start_as_current_span("root ☃", context=parent_ctx, kind=SpanKind.SERVER,
                                      attributes={"big": big, "ints": (0, -(2**63), 2**63 - 1), "f": 1.5, "b": True}) as root:
        other = tracer.start_span("sibling", kind=SpanKind.PRODUCER)
        other.end()
        links = [Link(other.get_span_context(), {"why": "fan-in", "n": 3}), Link(remote, {"a": 1, "b": 2, "c": 3}), Link(root.get_span_context())]
        child = tracer.start_span("child", kind=SpanKind.CLIENT, links=links, start_time=1_700_000_000_000_000_000)
        for i in range(8):
            child.set_attribute(f"k{i}", f"v{i} ünï")
        child.add_event("first", {"x": 1, "emoji": "🚀"}, timestamp=1_700_000_000_000_000_500)
        for i in range(3):
            child.add_event(f"e{i}", {f"a{j}": j for j in range(7)})
        try:
            raise KeyError("missing ✗")
        except KeyError as exc:
            child.record_exception(exc)
        child.update_name("child renamed")
        child.set_status(Status(StatusCode.ERROR, "it broke ✗"))
        child.end(end_time=1_700_000_000_000_009_999)
        for kind in (SpanKind.CONSUMER, SpanKind.INTERNAL):
            with tracer.start_as_current_span(f"k-{kind.name}", kind=kind) as s:
                s.set_status(Status(StatusCode.OK))
    session = format(remote.trace_id, "032x")
    expected = _norm_sdk(memory.get_finished_spans())
    from_json, from_proto = _export_both(store, session)
    assert set(from_json) == set(expected) and len(expected) == 5
    for sid, facts in expected.items():
        for field in facts:
            assert from_json[sid][field] == facts[field], (sid, field)
            assert from_proto[sid][field] == facts[field], (sid, field)
    child_facts = next(f for f in expected.values() if f["name"] == "child renamed")
    assert child_facts["dropped"] == (2, 2, 1)  # the limits did drop some of each
    assert child_facts["links"][1][2] == child_facts["trace_state"] == "vendor=v1"  # trace state was there to lose
    store.close()


_VALUES = st.one_of(
    st.text(max_size=40),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.text(max_size=10), max_size=5).map(tuple),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5).map(tuple),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=5).map(tuple),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attrs=st.dictionaries(st.text(min_size=1, max_size=20), _VALUES, max_size=12), name=st.text(max_size=30))
def test_attribute_values_round_trip(tmp_path_factory: pytest.TempPathFactory, attrs: dict[str, Any], name: str) -> None:
    """Property: any attribute map the SDK accepts (unicode, int64 extremes, floats, homogeneous
    arrays) and any span name come back from OTLP/JSON and protobuf as the SDK recorded them."""
    store, provider, memory = _pipeline(tmp_path_factory.mktemp("p"))
    span = provider.get_tracer("p").start_span(name, attributes=attrs)
    span.add_event("ev", attrs)
    span.end()
    expected = _norm_sdk(memory.get_finished_spans())
    from_json, from_proto = _export_both(store, format(span.get_span_context().trace_id, "032x"))
    assert from_json == expected and from_proto == expected
    store.close()


def test_open_and_interrupted_spans_are_exported_and_marked(tmp_path: Path) -> None:
    """A span still open is exported (never dropped) with walspan.span.status=open and UNSET
    status; after the trace ends, the same span is exported interrupted with ERROR status."""
    store, provider, _memory = _pipeline(tmp_path / "t")
    tracer = provider.get_tracer("o")
    root = tracer.start_span("root")
    child = tracer.start_span("child", context=trace_api.set_span_in_context(root))
    session = format(root.get_span_context().trace_id, "032x")
    spans = _norm_otlp(strict_decode(otlp_json(store.load(session))))
    for s in spans.values():
        assert s["attributes"]["walspan.span.status"] == "open" and s["status"][0] == 0 and s["end"] >= s["start"]
    child_id = format(child.get_span_context().span_id, "016x")
    store.open(session).crash("test")
    spans = _norm_otlp(strict_decode(otlp_json(store.load(session))))
    assert spans[child_id]["attributes"]["walspan.span.status"] == "interrupted"
    assert spans[child_id]["status"][0] == 2 and "interrupted" in spans[child_id]["status"][1]
    store.close()


def test_a_session_routed_by_trace_id_has_that_trace_id(tmp_path: Path) -> None:
    """Routed by OTel trace id (the default), the walspan trace created for the spans carries
    the OTel trace id as its own (`load()["trace_id"]`), so walspan's native view and every
    export name one trace, not two."""
    store, provider, _memory = _pipeline(tmp_path)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root") as root:
        with tracer.start_as_current_span("child"):
            pass
    hex_id = f"{root.get_span_context().trace_id:032x}"
    provider.shutdown()
    doc = store.load(hex_id)
    assert doc["trace_id"] == hex_id and {s["trace_id"] for s in doc["spans"] if "trace_id" in s} <= {hex_id}
    store.close()


def test_open_takes_a_trace_id_for_a_new_trace_and_refuses_a_bad_one(tmp_path: Path) -> None:
    """Store.open(trace_id=...) names a trace created now; an existing trace keeps its own id
    (identity is durable); a malformed id is refused before anything is written."""
    store = walspan.Store(tmp_path, install_hooks=False)
    t = store.open("s", trace_id="ab" * 16)
    assert t.trace_id == "ab" * 16 and store.load("s")["trace_id"] == "ab" * 16
    t.close()
    assert store.open("s", trace_id="cd" * 16).trace_id == "ab" * 16
    for bad in ("AB" * 16, "0" * 32, "ab" * 15, 7):
        with pytest.raises(ValueError, match="trace_id"):
            store.open("other", trace_id=bad)  # type: ignore[arg-type]
    assert not store.wal_path("other").exists()
    store.close()
