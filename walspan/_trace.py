"""Trace and Span: the writer-side API. Every method appends one record and returns once it
is acknowledged (see Store for what that means at each durability level)."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._format import RecordType
from ._values import check_name, clean, clean_mapping
from .errors import ClosedError

if TYPE_CHECKING:
    from ._store import Store, _Session

_T = RecordType
log = logging.getLogger("walspan")
ENV_VAR = "WALSPAN_CONTEXT"
TRACEPARENT_VAR = "TRACEPARENT"
SPAN_STATUSES = ("ok", "error")
_UNSET: Any = object()

#: The span the current thread / asyncio task is inside (set by `with span:`).
current_span: contextvars.ContextVar[Span | None] = contextvars.ContextVar("walspan_current_span", default=None)


def _is_span_id(value: str) -> bool:
    return len(value) == 16 and all(c in "0123456789abcdef" for c in value)


class Trace:
    """One process's attachment to a session's trace. Use as a context manager to detach."""

    def __init__(self, store: Store, session: _Session, default_parent: str | None = None) -> None:
        self._store = store
        self._session = session
        self.default_parent = default_parent
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
    ) -> Span:
        """Start a span. The parent defaults to the current span of this thread/task in this
        trace (or the context handed over by attach_from_env); pass parent=None for a root,
        or a Span / 16-hex span id, possibly from another process."""
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
        self._store._append(self._session, _T.SPAN_START, payload)
        return Span(self, payload["span_id"], name, parent_id)

    def span(self, name: str, **kwargs: Any) -> Span:
        """Like start_span; meant for `with trace.span(...) as span:`, which makes it current,
        ends it on exit (status "error" with the exception if one escapes)."""
        return self.start_span(name, **kwargs)

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
        ctx = {
            "v": 1,
            "dir": self._store.directory,
            "session": self.session_id,
            "span": parent,
            "durability": self._store.durability,
        }
        out = {ENV_VAR: json.dumps(ctx, separators=(",", ":"))}
        if parent is not None and self.trace_id:
            out[TRACEPARENT_VAR] = f"00-{self.trace_id}-{parent}-01"
        return out


class Span:
    """A span in a trace. Ending it twice is harmless (the first end wins)."""

    __slots__ = ("trace", "span_id", "name", "parent_span_id", "_ended", "_token")

    def __init__(self, trace: Trace, span_id: str, name: str, parent_span_id: str | None) -> None:
        self.trace = trace
        self.span_id = span_id
        self.name = name
        self.parent_span_id = parent_span_id
        self._ended = False
        self._token: contextvars.Token[Span | None] | None = None

    def __repr__(self) -> str:
        return f"<walspan.Span {self.name!r} id={self.span_id}>"

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        attrs = clean_mapping(attributes, "attributes", self.trace.store.max_value_bytes)
        self._append(_T.SPAN_ATTRIBUTES, {"span_id": self.span_id, "attributes": attrs, "time": time.time_ns()})

    def set_attribute(self, key: str, value: Any) -> None:
        self.set_attributes({key: value})

    def add_event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        limit = self.trace.store.max_value_bytes
        payload = {
            "span_id": self.span_id,
            "name": check_name(name, "event name"),
            "attributes": clean_mapping(attributes, "attributes", limit),
            "time": time.time_ns(),
        }
        self._append(_T.SPAN_EVENT, payload)

    def end(self, status: str = "ok", message: str | None = None, output: Any = _UNSET) -> None:
        if status not in SPAN_STATUSES:
            raise ValueError(f"span status must be one of {SPAN_STATUSES}, not {status!r}")
        if self._ended:
            return
        limit = self.trace.store.max_value_bytes
        payload: dict[str, Any] = {"span_id": self.span_id, "status": status, "time": time.time_ns()}
        if message is not None:
            payload["message"] = check_name(message, "message", limit)
        if output is not _UNSET:
            payload["output"] = clean(output, "output", limit)
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
            if exc_type is None:
                self.end("ok")
            else:
                _exit_keeping_theirs(lambda: self.end("error", _describe(exc_type, exc)), exc_type, f"ending span {self.name!r}")


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


def attach_from_env(environ: dict[str, str] | None = None, **store_kwargs: Any) -> Trace | None:
    """Join the trace a parent process handed over in WALSPAN_CONTEXT (see Trace.env).

    Returns the attached Trace, whose spans default to the parent's span as their parent, or
    None if the variable is not set. A malformed value raises ValueError.
    """
    from ._store import Store

    env = os.environ if environ is None else environ
    raw = env.get(ENV_VAR)
    if not raw:
        return None
    try:
        ctx = json.loads(raw)
        directory, session, span = ctx["dir"], ctx["session"], ctx.get("span")
        if not isinstance(directory, str) or not isinstance(session, str):
            raise TypeError("dir and session must be strings")
        if span is not None and not (isinstance(span, str) and _is_span_id(span)):
            raise TypeError("span must be a 16-hex-digit id")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{ENV_VAR} is malformed: {exc}") from None
    store_kwargs.setdefault("durability", ctx.get("durability", "durable"))
    store = Store(directory, create=False, **store_kwargs)
    trace = store.open(session)
    trace.default_parent = span
    return trace
