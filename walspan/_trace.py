"""Trace and Span: the writer-side API. Every method appends one record and returns once it
is acknowledged (see Store for what that means at each durability level)."""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._format import RecordType
from ._values import check_name, clean, clean_mapping
from .errors import ClosedError

if TYPE_CHECKING:
    from ._store import Store, _Session

_T = RecordType
log = logging.getLogger("walspan")
ENV_VAR = "WALSPAN_CONTEXT"
TRACEPARENT_VAR = "TRACEPARENT"
#: With TRACEPARENT alone (no WALSPAN_CONTEXT), the store a process joins the trace in.
DIR_VAR = "WALSPAN_DIR"
DURABILITY_VAR = "WALSPAN_DURABILITY"
SESSION_VAR = "WALSPAN_SESSION"
#: "unset" is OpenTelemetry's default status (neither ok nor error was decided).
SPAN_STATUSES = ("ok", "error", "unset")
_UNSET: Any = object()
_F = TypeVar("_F", bound=Callable[..., Any])

#: The span the current thread / asyncio task is inside (set by `with span:`).
current_span: contextvars.ContextVar[Span | None] = contextvars.ContextVar("walspan_current_span", default=None)


def _is_span_id(value: str) -> bool:
    return len(value) == 16 and all(c in "0123456789abcdef" for c in value)


def _is_hex_id(value: Any, digits: int) -> bool:
    return isinstance(value, str) and len(value) == digits and all(c in "0123456789abcdef" for c in value)


def parse_traceparent(value: str) -> tuple[str, str, int]:
    """(trace id, parent span id, flags) of a W3C `traceparent` header value; ValueError if it is
    not one (version 00 layout; ids lowercase hex and not all zeros)."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        raise ValueError(f"{TRACEPARENT_VAR} is not a W3C traceparent: {value!r}")
    _version, trace_id, span_id, flags = parts[:4]
    if not (_is_hex_id(trace_id, 32) and _is_hex_id(span_id, 16) and _is_hex_id(flags, 2)):
        raise ValueError(f"{TRACEPARENT_VAR} is not a W3C traceparent: {value!r}")
    if trace_id == "0" * 32 or span_id == "0" * 16:
        raise ValueError(f"{TRACEPARENT_VAR} has an all-zero id: {value!r}")
    return trace_id, span_id, int(flags, 16)


def _time_arg(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise ValueError(f"{where} must be nanoseconds since the Unix epoch (a non-negative int), not {value!r}")
    return value


def _links(links: Iterable[Any] | None, limit: int) -> list[dict[str, Any]]:
    """Links as stored: {trace_id, span_id, attributes} from Spans, (trace id, span id) pairs
    or dicts with those keys."""
    out = []
    for i, link in enumerate(links or ()):
        where = f"links[{i}]"
        attrs: Any = None
        trace_id: Any
        span_id: Any
        if isinstance(link, Span):
            trace_id, span_id = link.trace_id, link.span_id
        elif isinstance(link, tuple) and len(link) == 2:
            trace_id, span_id = link
        elif isinstance(link, dict):
            trace_id, span_id, attrs = link.get("trace_id"), link.get("span_id"), link.get("attributes")
        else:
            raise TypeError(f"{where} must be a Span, a (trace_id, span_id) pair or a dict, not {link!r}")
        if not _is_hex_id(trace_id, 32) or not _is_hex_id(span_id, 16):
            raise ValueError(f"{where}: trace_id must be 32 and span_id 16 lowercase hex digits")
        out.append({"trace_id": trace_id, "span_id": span_id, "attributes": clean_mapping(attrs, f"{where}.attributes", limit)})
    return out


class Trace:
    """One process's attachment to a session's trace. Use as a context manager to detach."""

    def __init__(self, store: Store, session: _Session, default_parent: str | None = None) -> None:
        self._store = store
        self._session = session
        self.default_parent = default_parent
        #: Set when this trace was joined from a W3C TRACEPARENT: the trace id its spans carry
        #: (the session's own trace id was chosen when the session was created).
        self.otel_trace_id: str | None = None
        self._closed = False
        self._detached = False  # close() was called: this object may not attach again

    @property
    def session_id(self) -> str:
        return self._session.session_id

    @property
    def trace_id(self) -> str:
        return self._session.trace_id

    @property
    def store(self) -> Store:
        return self._store

    def __repr__(self) -> str:
        return f"<walspan.Trace session={self.session_id!r} trace_id={self.trace_id}>"

    # -- spans ----------------------------------------------------------------------------

    def start_span(
        self,
        name: str,
        *,
        kind: str = "span",
        parent: Span | str | None = _UNSET,
        attributes: dict[str, Any] | None = None,
        input: Any = None,
        links: Iterable[Any] | None = None,
        start_time: int | None = None,
    ) -> Span:
        """Start a span. The parent defaults to the current span of this thread/task in this
        trace (or the context handed over by attach_from_env); pass parent=None for a root,
        or a Span / 16-hex span id, possibly from another process. `links`: Spans,
        (trace id, span id) pairs or dicts with `attributes` too; `start_time`: nanoseconds
        since the epoch, when the span started earlier than this call."""
        self._check_attached()
        limit = self._store.max_value_bytes
        name = check_name(name, "span name")
        kind = check_name(kind, "span kind")
        parent_id = self._parent_id(parent)
        attrs = clean_mapping(attributes, "attributes", limit)
        payload: dict[str, Any] = {
            "span_id": os.urandom(8).hex(),
            "parent": parent_id,
            "name": name,
            "kind": kind,
            "attributes": attrs,
            "input": clean(input, "input", limit),
            "time": time.time_ns(),
        }
        if links is not None:
            payload["links"] = _links(links, limit)
        if start_time is not None:
            payload["start_time"] = _time_arg(start_time, "start_time")
        if self.otel_trace_id is not None:
            payload["trace_id"] = self.otel_trace_id
            if parent_id is not None and parent_id == self.default_parent:
                payload["parent_remote"] = True  # the parent lives in the process that handed over
        self._store._append(self._session, _T.SPAN_START, payload)
        return Span(self, payload["span_id"], name, parent_id)

    def span(self, name: str, **kwargs: Any) -> SpanScope:
        """A span started on entry: `with trace.span(...) as span:` makes it current and ends it
        on exit (with the exception recorded and status "error" if one escapes); as a decorator,
        `@trace.span("name")`, each call of the function runs in a new span."""
        return SpanScope(self, name, kwargs)

    def _parent_id(self, parent: Span | str | None) -> str | None:
        if parent is _UNSET:
            cur = current_span.get()
            if cur is not None and cur.trace.session_id == self.session_id:
                return cur.span_id
            return self.default_parent
        if parent is None:
            return None
        if isinstance(parent, Span):
            return parent.span_id
        if isinstance(parent, str) and _is_span_id(parent):
            return parent
        raise TypeError(f"parent must be a Span, a 16-hex-digit span id or None, not {parent!r}")

    def _write_span_record(self, rtype: int, payload: dict[str, Any]) -> None:
        """Append a span record built elsewhere in walspan (the OpenTelemetry processor), its
        values already checked; acknowledged like every append."""
        self._store._append(self._session, rtype, payload)

    # -- trace-level records --------------------------------------------------------------

    def set_metadata(self, metadata: dict[str, Any] | None = None, /, **fields: Any) -> None:
        """Merge fields into the trace's metadata."""
        self._check_attached()
        merged = dict(metadata or {}, **fields)
        clean_meta = clean_mapping(merged, "metadata", self._store.max_value_bytes)
        self._store._append(self._session, _T.METADATA, {"metadata": clean_meta, "time": time.time_ns()})

    def end(self, status: str = "completed", message: str | None = None) -> Path:
        """Append the terminal record (if none exists: first terminal record wins, else
        TraceClosedError), compact, and return the canonical JSON's path."""
        self._check_attached()
        if message is not None:
            message = check_name(message, "message", self._store.max_value_bytes)
        path = self._store._terminate(self._session, status, message)
        self._closed = True
        return path

    def crash(self, reason: str = "crashed") -> Path:
        """End the trace as crashed (same rules as end())."""
        return self.end("crashed", reason)

    def close(self) -> None:
        """Detach without ending: the trace stays open (idle) for later writers."""
        if self._closed:
            return
        self._closed = True
        self._detached = True
        self._store._detach(self._session)

    def _check_attached(self) -> None:
        if self._detached:
            raise ClosedError(
                f"trace of session {self.session_id!r} was closed (detached); nothing was written. "
                f"Attach again with store.open({self.session_id!r})"
            )

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        _exit_keeping_theirs(self.close, exc_type, "detaching from the trace")

    # -- handing the trace to a child process ---------------------------------------------

    def env(self, span: Span | str | None = _UNSET) -> dict[str, str]:
        """Environment variables that let a child process join this trace under `span`
        (default: the current span) with walspan.attach_from_env()."""
        parent = self._parent_id(span)
        ctx: dict[str, Any] = {
            "v": 1,
            "dir": self._store.directory,
            "session": self.session_id,
            "span": parent,
            "durability": self._store.durability,
        }
        if self.otel_trace_id is not None:
            ctx["trace_id"] = self.otel_trace_id
        out = {ENV_VAR: json.dumps(ctx, separators=(",", ":"))}
        trace_id = self.otel_trace_id or self.trace_id
        if parent is not None and trace_id:
            out[TRACEPARENT_VAR] = f"00-{trace_id}-{parent}-01"
        return out


class SpanScope:
    """What `Trace.span()` returns: a context manager starting the span on entry, and a
    decorator running each call of a function in a span of its own."""

    __slots__ = ("_trace", "_name", "_kwargs", "_stack")

    def __init__(self, trace: Trace, name: str, kwargs: dict[str, Any]) -> None:
        self._trace = trace
        self._name = name
        self._kwargs = kwargs
        self._stack: list[Span] = []

    def __enter__(self) -> Span:
        span = self._trace.start_span(self._name, **self._kwargs)
        self._stack.append(span)
        return span.__enter__()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.pop().__exit__(exc_type, exc, tb)

    def __call__(self, func: _F) -> _F:
        trace, name, kwargs = self._trace, self._name, self._kwargs
        return _wrap(func, lambda: trace.start_span(name, **kwargs))


class Span:
    """A span in a trace. Every call after end() is ignored with one logged warning per span
    (as OpenTelemetry does); nothing is written for it."""

    __slots__ = ("trace", "span_id", "name", "parent_span_id", "_ended", "_token", "_status", "_warned")

    def __init__(self, trace: Trace, span_id: str, name: str, parent_span_id: str | None) -> None:
        self.trace = trace
        self.span_id = span_id
        self.name = name
        self.parent_span_id = parent_span_id
        self._ended = False
        self._token: contextvars.Token[Span | None] | None = None
        self._status: tuple[str, str | None] | None = None
        self._warned = False

    def __repr__(self) -> str:
        return f"<walspan.Span {self.name!r} id={self.span_id}>"

    @property
    def trace_id(self) -> str:
        """The trace id this span carries (the OpenTelemetry one when the trace was joined from
        a TRACEPARENT)."""
        return self.trace.otel_trace_id or self.trace.trace_id

    def _after_end(self, what: str) -> bool:
        if not self._ended:
            return False
        if not self._warned:
            self._warned = True
            log.warning("walspan: %s on span %r (%s) after its end() is ignored", what, self.name, self.span_id)
        return True

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        if self._after_end("set_attributes"):
            return
        attrs = clean_mapping(attributes, "attributes", self.trace.store.max_value_bytes)
        self._append(_T.SPAN_ATTRIBUTES, {"span_id": self.span_id, "attributes": attrs, "time": time.time_ns()})

    def set_attribute(self, key: str, value: Any) -> None:
        self.set_attributes({key: value})

    def update_name(self, name: str) -> None:
        """Rename the span (written at once, so a span that never ends keeps its new name)."""
        if self._after_end("update_name"):
            return
        name = check_name(name, "span name")
        self._append(_T.SPAN_ATTRIBUTES, {"span_id": self.span_id, "attributes": {}, "name": name, "time": time.time_ns()})
        self.name = name

    def add_event(self, name: str, attributes: dict[str, Any] | None = None, timestamp: int | None = None) -> None:
        if self._after_end("add_event"):
            return
        limit = self.trace.store.max_value_bytes
        payload = {
            "span_id": self.span_id,
            "name": check_name(name, "event name"),
            "attributes": clean_mapping(attributes, "attributes", limit),
            "time": time.time_ns(),
        }
        if timestamp is not None:
            payload["event_time"] = _time_arg(timestamp, "timestamp")
        self._append(_T.SPAN_EVENT, payload)

    def record_exception(
        self, exception: BaseException, attributes: dict[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        """An "exception" event with exception.type, .message and .stacktrace, as OpenTelemetry
        records it (docs/OTEL.md)."""
        if self._after_end("record_exception"):
            return
        module, qualname = type(exception).__module__, type(exception).__qualname__
        attrs: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
        }
        attrs.update(attributes or {})
        self.add_event("exception", attrs, timestamp)

    def set_status(self, status: str, message: str | None = None) -> None:
        """The status end() writes unless given one (as in OpenTelemetry: "ok" is final, "unset"
        changes nothing)."""
        if status not in SPAN_STATUSES:
            raise ValueError(f"span status must be one of {SPAN_STATUSES}, not {status!r}")
        if self._after_end("set_status"):
            return
        if status == "unset" or (self._status is not None and self._status[0] == "ok"):
            return
        if message is not None:
            message = check_name(message, "message", self.trace.store.max_value_bytes)
        self._status = (status, message)

    def end(
        self, status: str = _UNSET, message: str | None = None, output: Any = _UNSET, *, end_time: int | None = None
    ) -> None:
        """End the span: status "ok" unless set_status() or `status` says otherwise;
        `end_time` in nanoseconds since the epoch when it ended before this call."""
        if status is _UNSET:
            status, set_message = self._status or ("ok", None)
            message = message if message is not None else set_message
        if status not in SPAN_STATUSES:
            raise ValueError(f"span status must be one of {SPAN_STATUSES}, not {status!r}")
        if self._after_end("end"):
            return
        limit = self.trace.store.max_value_bytes
        payload: dict[str, Any] = {"span_id": self.span_id, "status": status, "time": time.time_ns()}
        if message is not None:
            payload["message"] = check_name(message, "message", limit)
        if output is not _UNSET:
            payload["output"] = clean(output, "output", limit)
        if end_time is not None:
            payload["end_time"] = _time_arg(end_time, "end_time")
        self._append(_T.SPAN_END, payload)
        self._ended = True

    @property
    def ended(self) -> bool:
        return self._ended

    def _append(self, rtype: int, payload: dict[str, Any]) -> None:
        self.trace._check_attached()
        self.trace.store._append(self.trace._session, rtype, payload)

    def __enter__(self) -> Span:
        self._token = current_span.set(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            try:
                current_span.reset(self._token)
            except ValueError:  # exited in another context (e.g. a different task): just clear
                current_span.set(None)
            self._token = None
        if not self._ended:
            if exc is None:
                self.end()
            else:
                etype = exc_type or type(exc)

                def record_and_end() -> None:
                    self.record_exception(exc)
                    self.end("error", _describe(etype, exc))

                _exit_keeping_theirs(record_and_end, etype, f"ending span {self.name!r}")

def _describe(exc_type: type[BaseException], exc: BaseException | None) -> str:
    try:
        return f"{exc_type.__name__}: {exc}"
    except Exception:  # noqa: BLE001 - an exception whose __str__ raises
        return exc_type.__name__


def _exit_keeping_theirs(action: Any, exc_type: type[BaseException] | None, what: str) -> None:
    """Run a context manager's exit action. With no exception in flight, its errors propagate;
    with one in flight (the caller's), ours is logged and theirs goes on unchanged: walspan
    never replaces an application's exception with its own."""
    if exc_type is None:
        action()
        return
    try:
        action()
    except Exception as ours:  # noqa: BLE001 - logged; the caller's exception propagates
        log.warning("walspan: %s failed while %s propagated: %s: %s", what, exc_type.__name__, type(ours).__name__, ours)


def get_current_span() -> Span | None:
    """The span the current thread / asyncio task is inside (`with span:`), or None."""
    return current_span.get()


def _wrap(func: _F, start: Callable[[], Span | None]) -> _F:
    """`func` with each call inside the span `start()` returns (none: the call runs untraced)."""
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            span = start()
            if span is None:
                return await func(*args, **kwargs)
            with span:
                return await func(*args, **kwargs)

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        span = start()
        if span is None:
            return func(*args, **kwargs)
        with span:
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_default_lock = threading.Lock()
_default: list[Trace | None] = []  # [] until resolved; then [the trace, or None]


def set_default_trace(trace: Trace | None) -> None:
    """The trace `@walspan.traced` functions log into when no span is current."""
    with _default_lock:
        _default[:] = [trace]


def _default_trace() -> Trace | None:
    with _default_lock:
        if not _default:
            _default.append(attach_from_env())  # WALSPAN_CONTEXT, or TRACEPARENT + WALSPAN_DIR
            if _default[0] is None:
                log.warning(
                    "walspan: @traced called with no current span and no trace to join "
                    "(WALSPAN_CONTEXT, or TRACEPARENT with WALSPAN_DIR, or set_default_trace()): running untraced"
                )
        return _default[0]


def traced(func: _F | None = None, /, *, name: str | None = None, kind: str = "span", **kwargs: Any) -> Any:
    """Decorator: each call runs in a span named after the function (or `name`), child of the
    current span, else in the default trace (set_default_trace(), or joined from the
    environment as attach_from_env() does). `@walspan.traced` or `@walspan.traced(kind="tool")`."""

    def decorate(f: _F) -> _F:
        span_name = name or f.__qualname__

        def start() -> Span | None:
            cur = current_span.get()
            trace = cur.trace if cur is not None else _default_trace()
            return None if trace is None else trace.start_span(span_name, kind=kind, **kwargs)

        return _wrap(f, start)

    return decorate if func is None else decorate(func)


def attach_from_env(environ: dict[str, str] | None = None, *, store: Store | None = None, **store_kwargs: Any) -> Trace | None:
    """Join the trace a parent process handed over.

    WALSPAN_CONTEXT (see Trace.env) names directory, session and parent span. Without it, a W3C
    TRACEPARENT joins that trace when a store is configured (`store=`, or WALSPAN_DIR with
    WALSPAN_DURABILITY): the session is WALSPAN_SESSION or else the traceparent's trace id (the
    default routing of walspan.otel.WalSpanProcessor, so native and OpenTelemetry spans of one
    trace share a session), and spans carry the traceparent's trace id. Returns the attached
    Trace, whose spans default to the handed-over span as their parent, or None if nothing is
    set. A malformed value raises ValueError.
    """
    from ._store import Store

    env = os.environ if environ is None else environ
    raw = env.get(ENV_VAR)
    if not raw:
        return _attach_from_traceparent(env, store, store_kwargs)
    try:
        ctx = json.loads(raw)
        directory, session, span = ctx["dir"], ctx["session"], ctx.get("span")
        if not isinstance(directory, str) or not isinstance(session, str):
            raise TypeError("dir and session must be strings")
        if span is not None and not (isinstance(span, str) and _is_span_id(span)):
            raise TypeError("span must be a 16-hex-digit id")
        otel_trace_id = ctx.get("trace_id")
        if otel_trace_id is not None and not _is_hex_id(otel_trace_id, 32):
            raise TypeError("trace_id must be 32 lowercase hex digits")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{ENV_VAR} is malformed: {exc}") from None
    store_kwargs.setdefault("durability", ctx.get("durability", "durable"))
    if store is None:
        store = Store(directory, create=False, **store_kwargs)
    trace = store.open(session)
    trace.default_parent = span
    trace.otel_trace_id = otel_trace_id
    return trace


def _attach_from_traceparent(env: Any, store: Store | None, store_kwargs: dict[str, Any]) -> Trace | None:
    from ._store import Store

    raw = env.get(TRACEPARENT_VAR)
    directory = env.get(DIR_VAR)
    if not raw or (store is None and not directory):
        return None
    trace_id, span_id, _flags = parse_traceparent(raw)
    if store is None:
        store_kwargs.setdefault("durability", env.get(DURABILITY_VAR) or "durable")
        store = Store(directory, **store_kwargs)
    trace = store.open(env.get(SESSION_VAR) or trace_id)
    trace.default_parent = span_id
    trace.otel_trace_id = trace_id
    return trace
