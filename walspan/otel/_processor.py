"""WalSpanProcessor: an OpenTelemetry SDK span processor that writes to a walspan store.

`on_start` appends the span's start record and `on_end` its end record, each acknowledged at
the store's durability level before the call returns: nothing waits in a queue, so a span that
started is on disk even if the process is killed before it ends (recovery then marks it
interrupted), and a span that ended is on disk when `end()` returns.

Routing: each span goes to one walspan session. By default the session is the OTel trace id
(one session per trace). With `session_attribute` (e.g. "session.id" or
"gen_ai.conversation.id"), the session is that attribute's value, looked up on the span, then
in the parent context's baggage, then on the resource; a span without it joins the session its
trace was routed to in this process, else its trace id's session.

Trace lifetime (trace-id routing): when a trace's root span (no parent) ends, the processor
ends the walspan trace, "completed" or "error" after the root's status; a process whose last
open span of a trace with a remote parent ends detaches from that session (it stays open for
the process that owns the root). Attribute routing never ends a session by itself: end it
with `end_session()`, or let it stay idle (detached at exit).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from opentelemetry import baggage
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import Span as SDKSpan
from opentelemetry.trace import StatusCode

from .._format import RecordType
from .._store import Store
from .._trace import Trace
from ..errors import WalspanError
from . import _mapping

log = logging.getLogger("walspan.otel")


class WalSpanProcessor(SpanProcessor):
    """Write every span's start and end to `store` (a walspan Store, or a directory for one)
    before returning to the SDK.

    session_attribute: route spans by this attribute (span, baggage, resource) instead of by
    trace id. end_trace_on_root: with trace-id routing, end the walspan trace when its root
    span ends (status from the root). durability: for a Store made from a directory.
    """

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        *,
        session_attribute: str | None = None,
        end_trace_on_root: bool = True,
        durability: str = "durable",
    ) -> None:
        self._own_store = not isinstance(store, Store)
        self.store = Store(store, durability=durability) if not isinstance(store, Store) else store
        if session_attribute is not None and (not isinstance(session_attribute, str) or not session_attribute):
            raise ValueError("session_attribute must be a non-empty attribute name")
        self.session_attribute = session_attribute
        self.end_trace_on_root = end_trace_on_root
        self._lock = threading.Lock()
        self._traces: dict[str, Trace] = {}  # session id -> this process's attachment
        self._open: dict[str, int] = {}  # session id -> spans started here and not ended
        self._span_session: dict[int, str] = {}  # span id -> its session (to end it there)
        self._trace_session: dict[int, str] = {}  # trace id -> session it was routed to here
        self._resources: dict[int, tuple[Any, dict[str, Any]]] = {}  # id(Resource) -> (it, mapped)
        self._failed: set[str] = set()  # sessions whose failure was logged (once each)
        self._shutdown = False
        #: Spans whose record could not be written (logged): a processor must not raise into
        #: the instrumented program.
        self.failed_records = 0
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # the child is a new writer: it owns none of its parent's open spans
        self._lock = threading.Lock()
        self._open.clear()
        self._span_session.clear()

    # -- routing ----------------------------------------------------------------------------

    def _route(self, span: SDKSpan, parent_context: Context | None) -> str:
        trace_id = span.context.trace_id
        attr = self.session_attribute
        if attr is not None:
            value: Any = (span.attributes or {}).get(attr)
            if value is None and parent_context is not None:
                value = baggage.get_baggage(attr, parent_context)
            if value is None:
                value = span.resource.attributes.get(attr)
            if value is not None and str(value):
                return str(value)
        with self._lock:
            known = self._trace_session.get(trace_id)
        return known if known is not None else _mapping.trace_hex(trace_id)

    def _trace_for(self, session: str) -> Trace:
        with self._lock:
            trace = self._traces.get(session)
        if trace is None:
            # Routed by trace id (the default), the session is that trace: it gets its id.
            trace = self.store.open(session, trace_id=session if _is_otel_trace_hex(session) else None)
            with self._lock:
                other = self._traces.setdefault(session, trace)
            if other is not trace:  # another thread attached first: one Trace per session
                trace.close()
                trace = other
        return trace

    def _mapped_resource(self, span: ReadableSpan) -> dict[str, Any]:
        # A provider has one Resource for all its spans: map it once. The entry holds the
        # Resource itself, so its id cannot be reused by another object while cached.
        res = span.resource
        with self._lock:
            hit = self._resources.get(id(res))
        if hit is None or hit[0] is not res:
            hit = (res, _mapping.resource(res, self.store.max_value_bytes))
            with self._lock:
                self._resources[id(res)] = hit
        return hit[1]

    # -- SpanProcessor ----------------------------------------------------------------------

    def on_start(self, span: SDKSpan, parent_context: Context | None = None) -> None:
        if self._shutdown:
            return
        ctx = span.context
        session = "?"
        try:
            session = self._route(span, parent_context)
            limit = self.store.max_value_bytes
            payload = _mapping.start_payload(
                span, limit, self._mapped_resource(span), _mapping.scope(span.instrumentation_scope, limit)
            )
            trace = self._trace_for(session)
            with self._lock:
                self._trace_session.setdefault(ctx.trace_id, session)
                self._span_session[ctx.span_id] = session
                self._open[session] = self._open.get(session, 0) + 1
            trace._write_span_record(RecordType.SPAN_START, payload)
        except (WalspanError, OSError, ValueError, TypeError) as exc:
            self._failure(session, "start", span, exc)

    def on_end(self, span: ReadableSpan) -> None:
        if self._shutdown:
            return
        ctx = span.context
        with self._lock:
            session = self._span_session.pop(ctx.span_id, None)
            if session is not None:
                self._open[session] -= 1
                left = self._open[session]
        if session is None:
            return  # started before this processor was added, or its start failed (logged)
        try:
            trace = self._trace_for(session)
            trace._write_span_record(RecordType.SPAN_END, _mapping.end_payload(span, self.store.max_value_bytes))
            self._maybe_finish(session, span, trace, left)
        except (WalspanError, OSError, ValueError, TypeError) as exc:
            self._failure(session, "end", span, exc)

    def _maybe_finish(self, session: str, span: ReadableSpan, trace: Trace, left: int) -> None:
        if self.session_attribute is not None or session != _mapping.trace_hex(span.context.trace_id):
            return  # attribute routing: a session outlives its traces
        if span.parent is None and self.end_trace_on_root:
            status = span.status
            if status.status_code is StatusCode.ERROR:
                trace.end("error", status.description or f"root span {span.name!r} failed")
            else:
                trace.end("completed")
            self._forget(session)
        elif left == 0 and span.parent is not None and span.parent.is_remote:
            # the part of the trace this process ran is over: detach, leaving it to its owner
            self._forget(session)
            trace.close()

    def _forget(self, session: str) -> None:
        with self._lock:
            self._traces.pop(session, None)
            self._open.pop(session, None)
            for tid in [t for t, s in self._trace_session.items() if s == session]:
                del self._trace_session[tid]

    def _failure(self, session: str, what: str, span: ReadableSpan, exc: BaseException) -> None:
        with self._lock:
            self.failed_records += 1
            first = session not in self._failed
            self._failed.add(session)
        if first:  # once per session: a closed trace would otherwise log once per span
            log.error("walspan: could not write the %s of span %r to session %r: %s", what, span.name, session, exc)

    def end_session(self, session: str, status: str = "completed", message: str | None = None) -> None:
        """End a session's walspan trace (attribute routing never does so by itself)."""
        trace = self._trace_for(session)
        self._forget(session)
        trace.end(status, message)

    def shutdown(self) -> None:
        """Detach from every session this processor attached (none is ended: spans still open
        are interrupted by recovery once every writer is gone); later spans are ignored."""
        if self._shutdown:
            return
        self._shutdown = True
        with self._lock:
            traces = list(self._traces.values())
            self._traces.clear()
        for trace in traces:
            try:
                trace.close()
            except (WalspanError, OSError) as exc:
                log.warning("walspan: could not detach from session %r: %s", trace.session_id, exc)
        if self._own_store:
            self.store.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is ever buffered: every start and end was written (and, in durable mode,
        fdatasynced) before on_start / on_end returned. Always True."""
        return True


def _is_otel_trace_hex(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value) and value != "0" * 32
