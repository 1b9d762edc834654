"""An OpenTelemetry-instrumented program for the crash tests (run as a script, or under
opentelemetry-instrument). It reports on stdout, one line each, flushed: its trace id, then
the span id of every span it ended, then "open <span id>" for a span it leaves open, then
"ready"; then it waits (for a kill) or leaves by os._exit.

usage: otel_child.py MODE HOW N [OUT]
  MODE  wal: WalSpanProcessor(Store(OUT)); batch: BatchSpanProcessor(file exporter on OUT);
        zerocode: the global provider opentelemetry-instrument configured
  HOW   wait: block on stdin until killed; exit: os._exit(0) after "ready"
With TRACEPARENT set, the spans continue that trace (root: its span, a remote parent).
"""

from __future__ import annotations

import json
import os
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator


class FileExporter(SpanExporter):
    """Appends each exported span id to a file, flushed at once: what it holds is exactly what
    the SDK handed to its exporter."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def export(self, spans):  # type: ignore[no-untyped-def]
        for s in spans:
            self.f.write(json.dumps({"span_id": format(s.context.span_id, "016x"), "name": s.name}) + "\n")
        self.f.flush()
        return SpanExportResult.SUCCESS


def main() -> None:
    mode, how, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = sys.argv[4] if len(sys.argv) > 4 else ""
    if mode == "zerocode":
        tracer = trace.get_tracer("otel-child")
    else:
        provider = TracerProvider()
        if mode == "wal":
            import walspan
            from walspan.otel import WalSpanProcessor

            provider.add_span_processor(WalSpanProcessor(walspan.Store(out)))
        else:
            provider.add_span_processor(BatchSpanProcessor(FileExporter(out)))
        tracer = provider.get_tracer("otel-child")
    parent_ctx = TraceContextTextMapPropagator().extract({"traceparent": os.environ["TRACEPARENT"]}) if os.environ.get("TRACEPARENT") else None
    root = tracer.start_span("child-root" if parent_ctx else "root", context=parent_ctx)
    ctx = trace.set_span_in_context(root)
    print(format(root.get_span_context().trace_id, "032x"), flush=True)
    for i in range(n):
        span = tracer.start_span(f"step-{i}", context=ctx, attributes={"i": i})
        span.end()
        print(format(span.get_span_context().span_id, "016x"), flush=True)
    pending = tracer.start_span("pending", context=ctx)
    print("open", format(pending.get_span_context().span_id, "016x"), format(root.get_span_context().span_id, "016x"), flush=True)
    print("ready", flush=True)
    if how == "exit":
        os._exit(0)
    if how == "finish":
        pending.end()
        root.end()
        return
    sys.stdin.read()  # the parent kills us while we wait here


if __name__ == "__main__":
    main()
