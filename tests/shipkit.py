"""Test kit for `walspan ship`: an OTLP/HTTP receiver on loopback that decodes every request with
the official opentelemetry-proto messages (or the OTLP/JSON rules), with faults injected per
request, and helpers to write stores and to check what arrived."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import walspan
from walspan.read import list_stems, read_records, summarize_stem

#: Faults a receiver can answer a request with (one per request, in order; then "ok"):
#: ok, reset (close before reading), timeout (read, never answer), cut (process, then close
#: mid-response: the spans arrive but the shipper sees no answer), 500, 503, 429 (with
#: Retry-After: `retry_after`), 400 (permanent), partial (200 with a partial success).
FAULTS = ("ok", "reset", "timeout", "cut", "500", "503", "429", "400", "partial")


@dataclass
class Arrival:
    trace_id: str
    span_id: str
    name: str
    state: str  # walspan.span.status ("open", "interrupted") or the OTLP status code as text
    attributes: dict[str, Any]
    request: int  # which request (0-based) brought it
    raw: Any = None  # the protobuf Span


@dataclass
class Receiver:
    """A loopback OTLP/HTTP receiver. `faults` is consumed one per request."""

    faults: list[str] = field(default_factory=list)
    port: int = 0  # 0: any free port
    retry_after: str = "1"
    arrivals: list[Arrival] = field(default_factory=list)
    requests: int = 0
    answered: list[str] = field(default_factory=list)  # the fault (or "ok") of every request
    on_request: Callable[[int, str], None] | None = None  # called before reading the request
    on_processed: Callable[[int, str], bool] | None = None  # after its spans arrived; False: no answer
    content_types: set[str] = field(default_factory=set)
    encodings: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)  # ends "timeout" waits

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                receiver._handle(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]  # peers killed on purpose
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)  # a quick shutdown()
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            n = self.requests
            self.requests += 1
            fault = self.faults.pop(0) if self.faults else "ok"
            self.answered.append(fault)
        if self.on_request is not None:
            self.on_request(n, fault)
        if fault == "reset":
            h.close_connection = True
            h.connection.close()
            return
        body = h.rfile.read(int(h.headers["Content-Length"]))
        if fault == "timeout":
            self.release.wait(10)
            h.close_connection = True
            return
        if fault in ("500", "503", "429", "400"):
            h.send_response(int(fault))
            if fault == "429":
                h.send_header("Retry-After", self.retry_after)
            msg = b"bad request: refused for good" if fault == "400" else b"try later"
            h.send_header("Content-Length", str(len(msg)))
            h.end_headers()
            h.wfile.write(msg)
            return
        self.content_types.add(h.headers.get("Content-Type", ""))
        self.encodings.add(h.headers.get("Content-Encoding", ""))
        if h.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self._decode(body, h.headers.get("Content-Type", ""), n)
        if self.on_processed is not None and not self.on_processed(n, fault):
            h.close_connection = True
            return
        if fault == "cut":
            h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 64\r\n\r\n\x0a\x02")
            h.wfile.flush()
            h.close_connection = True
            return
        answer = b""
        if fault == "partial":  # accepted, but 3 spans refused (OTLP partial success)
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

            r = ExportTraceServiceResponse()
            r.partial_success.rejected_spans = 3
            r.partial_success.error_message = "3 spans too old"
            answer = r.SerializeToString()
        h.send_response(200)
        h.send_header("Content-Type", "application/x-protobuf")
        h.send_header("Content-Length", str(len(answer)))
        h.end_headers()
        h.wfile.write(answer)

    def _decode(self, body: bytes, content_type: str, n: int) -> None:
        if "json" in content_type:
            data = json.loads(body)
            spans = [
                (s["traceId"], s["spanId"], s.get("name", ""), {kv["key"]: next(iter(kv["value"].values()), None) for kv in s.get("attributes", [])},
                 str(s.get("status", {}).get("code", 0)), s)
                for rs in data.get("resourceSpans", []) for ss in rs.get("scopeSpans", []) for s in ss.get("spans", [])
            ]
        else:
            req = ExportTraceServiceRequest.FromString(body)
            spans = []
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attrs = {kv.key: getattr(kv.value, kv.value.WhichOneof("value") or "string_value") for kv in s.attributes}
                        spans.append((s.trace_id.hex(), s.span_id.hex(), s.name, attrs, str(s.status.code), s))
        with self._lock:
            for trace_id, span_id, name, attrs, code, raw in spans:
                state = str(attrs.get("walspan.span.status") or code)
                self.arrivals.append(Arrival(trace_id, span_id, name, state, attrs, n, raw))
            self._lock.notify_all()

    def wait_for(self, predicate: Callable[[list[Arrival]], bool], timeout: float = 30) -> bool:
        """Until predicate(arrivals) holds (a safety timeout only: a test fails, never waits)."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self.arrivals), timeout)


def write_trace(directory: str, session: str, spans: int, *, end: bool = True, open_spans: int = 0, attrs: int = 0) -> list[str]:
    """A trace of `spans` ended spans under one root (ended last), `open_spans` left open;
    returns the span ids in the order their end records were appended."""
    store = walspan.Store(directory, durability="process", install_hooks=False)
    t = store.open(session)
    root = t.start_span("root", kind="agent")
    order = []
    for i in range(spans):
        s = t.start_span(f"s{i}", kind="tool", parent=root, attributes={"i": i, **{f"a{k}": "v" * 20 for k in range(attrs)}})
        s.set_attribute("late", i)
        s.end()
        order.append(s.span_id)
    for i in range(open_spans):
        t.start_span(f"open{i}", parent=root)
    if end:
        root.end()
        order.append(root.span_id)
        t.end()
    store.close()
    return order


def end_order(directory: str) -> dict[str, list[str]]:
    """Per trace id, the span ids in the order the log ended them (SPAN_END records), read
    straight from the read API: the order a shipper must keep."""
    out: dict[str, list[str]] = {}
    for stem in list_stems(directory):
        sid = summarize_stem(directory, stem).session_id
        ids: list[str] = []
        trace_id = ""
        seen = set()
        for rec in read_records(directory, sid):
            if rec.type == "trace_start":
                trace_id = rec.payload["trace_id"]
            elif rec.type == "span_end" and rec.payload["span_id"] not in seen:
                seen.add(rec.payload["span_id"])
                ids.append(rec.payload["span_id"])
        out[trace_id] = ids
    return out


def check_in_order(arrivals: list[Arrival], expected: dict[str, list[str]]) -> int:
    """Every expected span arrived, and per trace the first arrival of each came in log order
    with no gap (a span never arrives before all the spans ended before it). Returns how
    many arrivals were duplicates."""
    return sum(duplicates_per_trace(arrivals, expected).values())


def duplicates_per_trace(arrivals: list[Arrival], expected: dict[str, list[str]]) -> dict[str, int]:
    """check_in_order's checks; per trace, how many arrivals were duplicates."""
    out = {}
    for trace_id, ids in expected.items():
        dups = 0
        wanted = set(ids)
        got = [a.span_id for a in arrivals if a.trace_id == trace_id and a.span_id in wanted]
        first: list[str] = []
        seen: set[str] = set()
        for sid in got:
            if sid in seen:
                dups += 1
            else:
                seen.add(sid)
                first.append(sid)
        assert first == ids, f"trace {trace_id}: arrival order differs from the log's (first {len(first)} of {len(ids)})"
        out[trace_id] = dups
    return out
