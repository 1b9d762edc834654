"""The shipper: every session's records, read through walspan.read, folded into spans
(`_spans`), batched, posted (`_http`), and acknowledged into a durable cursor (`_cursors`).

At least once, in order per session:

- a session has at most one batch in flight; its next batch is formed only after the last
  one's cursor is durable, so a backend sees each session's spans in log order and a kill
  re-sends at most that one batch (the duplicate bound, docs/SHIP.md);
- a cursor moves only after the receiver answered 2xx (or refused the batch for good, which
  is recorded in `rejected.jsonl` first): a kill at any instant resumes after what the
  receiver acknowledged, never after a record it did not see;
- a restart folds the log from its start up to the saved cursor without shipping (the fold
  is what a span's end needs from its start), then ships what follows.

Threads: the caller's thread reads, folds and forms batches; `window` sender threads post
them and save cursors. Sessions are served round-robin, and a batch takes at most an equal
share of its spans from each session with spans waiting, so one busy session cannot starve
the others.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._names import decode_stem
from ..errors import CorruptWALError, CursorMismatchError, SessionNotFoundError
from ..export import json_request, proto_request, spans_model
from ..read import Cursor, check_cursor, list_stems, read_records, summarize_stem
from . import _cursors
from ._cursors import CursorStore, SavedCursor
from ._http import OK, PROTOBUF, REJECT, Outcome, Sender, backoff, traces_url
from ._spans import Item, SessionFeed

log = logging.getLogger("walspan.ship")


@dataclass
class ShipOptions:
    """How to ship. Times are in seconds."""

    endpoint: str
    headers: dict[str, str] = field(default_factory=dict)
    protocol: str = PROTOBUF  # or "http/json"
    gzip: bool = True
    partial: bool = False  # ship spans as they start too (marked open)
    include_io: bool = False  # prompts and completions in the GenAI attributes
    name: str | None = None  # the cursor directory's name; default from the endpoint
    batch_spans: int = 512  # a batch's size (one record's spans may exceed it)
    batch_age: float = 0.2  # how long a span may wait for a fuller batch (--follow)
    window: int = 4  # batches in flight at once (one per session at most)
    timeout: float = 10.0  # per request
    backoff_initial: float = 0.25
    backoff_max: float = 30.0
    retry_after_max: float = 300.0  # a longer Retry-After is waited this long
    give_up_after: float | None = None  # a batch failing this long stops the shipper; None: never
    poll_interval: float = 0.25  # --follow: how often the store is looked at

    def check(self) -> None:
        traces_url(self.endpoint)
        if self.name is not None:
            _cursors.check_name(self.name)
        for attr in ("batch_spans", "window"):
            if getattr(self, attr) < 1:
                raise ValueError(f"{attr.replace('_', '-')} must be 1 or more, not {getattr(self, attr)}")
        for attr in ("batch_age", "timeout", "backoff_initial", "backoff_max", "poll_interval"):
            if not getattr(self, attr) > 0:
                raise ValueError(f"{attr.replace('_', '-')} must be more than 0, not {getattr(self, attr)}")
        if self.protocol == PROTOBUF:
            try:
                import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
            except ImportError:
                raise ImportError(
                    "shipping OTLP protobuf needs opentelemetry-proto: pip install 'walspan[otel]' (or ship --protocol http/json)"
                ) from None


@dataclass
class ShipStatus:
    """Where a shipper is. `lag` is the age (seconds) of the oldest record read but not yet
    acknowledged, 0 when everything read is acknowledged; `behind_bytes` is how much of the
    logs it knows of is not acknowledged yet."""

    sessions: int = 0
    done: int = 0
    spans: int = 0  # acknowledged by the receiver
    batches: int = 0
    retries: int = 0
    rejected_batches: int = 0
    rejected_spans: int = 0
    pending_spans: int = 0
    in_flight: int = 0
    waiting_for_lock: int = 0
    lag: float = 0.0
    behind_bytes: int = 0

    def line(self) -> str:
        return (
            f"walspan ship: {self.sessions} session(s) ({self.done} done), {self.spans} span(s) acknowledged in "
            f"{self.batches} batch(es), {self.pending_spans} pending, {self.in_flight} in flight, {self.retries} retries, "
            f"{self.rejected_batches} rejected, lag {self.lag:.3f}s, {self.behind_bytes} byte(s) behind"
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ShipResult:
    """What a run did. `ok`: everything seen was acknowledged (nothing refused, no error)."""

    status: ShipStatus
    errors: list[str] = field(default_factory=list)
    stopped: bool = False  # a stop was asked for (--follow's SIGTERM)

    @property
    def ok(self) -> bool:
        return not self.errors and self.status.rejected_batches == 0


@dataclass
class _Session:
    stem: str
    session_id: str | None = None
    lock_fd: int | None = None
    feed: SessionFeed | None = None
    saved: SavedCursor | None = None  # acknowledged (durable)
    read: Cursor = Cursor.START  # after the last record folded
    skip_to: Cursor | None = None  # records up to here were acknowledged: fold only
    pending: deque[tuple[Item, float]] = field(default_factory=deque)
    pending_spans: int = 0
    in_flight: bool = False
    at_end: bool = False  # the last read reached the log's end
    sig: tuple[int, int, int] | None = None  # (inode, size, mtime) when at_end was set
    done: bool = False
    gone: bool = False
    error: str | None = None
    locked_out: bool = False

    @property
    def acked(self) -> Cursor:
        return self.saved.cursor if self.saved is not None else Cursor.START

    @property
    def spans_acked(self) -> int:
        return self.saved.spans if self.saved is not None else 0


@dataclass
class _Part:
    session: _Session
    items: list[Item]
    saved: SavedCursor  # what its acknowledgement makes durable

    @property
    def spans(self) -> int:
        return sum(len(i.spans) for i in self.items)


@dataclass
class _Batch:
    parts: list[_Part]
    outcome: Outcome | None = None
    result: str = ""  # "ack" | "reject" | "fail" | "abandon"
    retries: int = 0

    @property
    def spans(self) -> int:
        return sum(p.spans for p in self.parts)


class Shipper:
    """Ships a store's sessions to one OTLP/HTTP endpoint (see the module doc).

        shipper = Shipper("traces", ShipOptions("http://localhost:4318/v1/traces"))
        result = shipper.run()                    # --once: what is there now
        shipper.run(follow=True, stop=event)      # --follow: until event is set

    `on_status` is called (from run's thread) with a ShipStatus when request_status() was
    called: a signal handler may call request_status()."""

    def __init__(self, directory: str | os.PathLike[str], options: ShipOptions) -> None:
        options.check()
        self.directory = os.fspath(directory)
        self.options = options
        self.cursors = CursorStore(self.directory, options.name or _cursors.default_name(options.endpoint))
        self.on_status: Callable[[ShipStatus], None] | None = None
        #: seconds from a record's append to its acknowledgement, per span-bearing record (the
        #: newest 100,000): what scripts/bench.py reports as the shipping lag
        self.ack_lags: deque[float] = deque(maxlen=100_000)
        self._sessions: dict[str, _Session] = {}
        self._order: list[str] = []  # round-robin order of stems
        self._rr = 0
        self._stop = threading.Event()
        self._status_wanted = threading.Event()
        self._outbox: queue.Queue[_Batch | None] = queue.Queue()
        self._inbox: queue.Queue[_Batch] = queue.Queue()
        self._in_flight: list[_Batch] = []
        self._counts = ShipStatus()
        self._errors: list[str] = []
        self._lock = threading.Lock()  # counters updated by sender threads

    # -- public ---------------------------------------------------------------------------

    def request_status(self) -> None:
        self._status_wanted.set()

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> ShipStatus:
        with self._lock:
            st = ShipStatus(**self._counts.to_json())
        sessions = list(self._sessions.values())
        st.sessions = len(sessions)
        st.done = sum(1 for s in sessions if s.done)
        st.pending_spans = sum(s.pending_spans for s in sessions)
        st.in_flight = len(self._in_flight)
        st.waiting_for_lock = sum(1 for s in sessions if s.locked_out)
        oldest = [t for s in sessions if s.pending and (t := s.pending[0][0].time) is not None]
        oldest += [p.items[0].time for b in self._in_flight for p in b.parts if p.items and p.items[0].time is not None]
        st.lag = max(0.0, time.time() - min(oldest) / 1e9) if oldest else 0.0
        behind = 0
        for s in sessions:
            if not s.done and s.session_id is not None:
                try:
                    behind += max(0, os.stat(os.path.join(self.directory, s.stem + ".wal")).st_size - s.acked.offset)
                except OSError:
                    pass
        st.behind_bytes = behind
        return st

    def run(self, *, follow: bool = False, stop: threading.Event | None = None) -> ShipResult:
        """Ship until everything there is acknowledged (follow=False), or until `stop` is set
        or stop() is called (follow=True)."""
        if stop is not None:
            self._stop = stop
        self.cursors.configure(self.options.endpoint)
        threads = [threading.Thread(target=self._sender_main, name=f"walspan-ship-{i}", daemon=True) for i in range(self.options.window)]
        for t in threads:
            t.start()
        try:
            self._loop(follow)
            # let what is in flight finish (a stop abandons retries, not requests under way)
            while self._in_flight:
                self._complete(self._inbox.get())
        finally:
            for _ in threads:
                self._outbox.put(None)
            for t in threads:
                t.join()
            for s in self._sessions.values():
                self._unlock(s)
        errors = list(self._errors)
        for s in self._sessions.values():
            if not follow and s.error is not None:
                errors.append(s.error)
        return ShipResult(self.status(), errors, stopped=self._stop.is_set())

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self, follow: bool) -> None:
        discovered = False
        while not self._stop.is_set() and not self._errors:
            if follow or not discovered:
                self._discover()
                discovered = True
            self._read_all(follow)
            self._dispatch(flush_all=not follow)
            if self._status_wanted.is_set():
                self._status_wanted.clear()
                if self.on_status is not None:
                    self.on_status(self.status())
            if not follow and self._finished():
                return
            self._wait(follow)

    def _finished(self) -> bool:
        for s in self._sessions.values():
            if s.done or s.gone or s.error is not None:
                continue
            if s.locked_out or not s.at_end or s.pending or s.in_flight or s.read != s.acked:
                return False
        return True

    def _wait(self, follow: bool) -> None:
        """Until a batch completes, or it is time to look at the store (or age a batch) again."""
        idle = not any(s.pending for s in self._sessions.values()) and not self._in_flight
        if not follow and not idle and not any(s.locked_out for s in self._sessions.values()):
            busy = not self._in_flight or self._can_send()
            if busy:
                return  # more to read or send right away
        timeout = self.options.poll_interval
        if follow and any(s.pending for s in self._sessions.values()):
            timeout = min(timeout, self.options.batch_age / 2)
        try:
            batch = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return
        self._complete(batch)
        while True:  # take every completion already there
            try:
                self._complete(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _can_send(self) -> bool:
        return len(self._in_flight) < self.options.window and any(s.pending and not s.in_flight for s in self._sessions.values())

    def _discover(self) -> None:
        try:
            stems = list_stems(self.directory)
        except FileNotFoundError:
            stems = []
        for stem in stems:
            if stem not in self._sessions:
                self._sessions[stem] = _Session(stem)
                self._order.append(stem)
        present = set(stems)
        for stem, s in self._sessions.items():
            if stem not in present and not s.in_flight:
                s.gone = True
                self._unlock(s)

    # -- reading ------------------------------------------------------------------------------

    def _read_all(self, follow: bool) -> None:
        n = len(self._order)
        for k in range(n):
            s = self._sessions[self._order[(self._rr + k) % n]]
            if s.gone or s.in_flight and s.pending_spans >= self.options.batch_spans:
                continue
            try:
                sig = _sig(os.path.join(self.directory, s.stem + ".wal"))
            except FileNotFoundError:
                if not s.in_flight:
                    s.gone = True
                    self._unlock(s)
                continue
            if s.at_end and s.sig == sig and s.error is None:
                self._settle(s, follow)
                continue
            if s.error is not None and s.sig == sig:
                continue
            if s.lock_fd is None and not self._activate(s, sig):
                continue
            if s.done:
                continue
            if s.pending_spans < self.options.batch_spans and len(s.pending) < 4 * self.options.batch_spans:
                self._read(s, sig)

    def _settle(self, s: _Session, follow: bool) -> None:
        """A session read to its end: commit span-less records, let go of it when idle."""
        if s.in_flight:
            return
        if s.pending and not s.pending_spans:
            self._commit_local(s)
        if not s.pending and s.read == s.acked and s.lock_fd is not None:
            if s.feed is not None and s.feed.ended:
                s.done = True
                s.feed = None  # nothing more to fold: free the memory
            if follow or s.done:
                self._unlock(s)  # another shipper may take it; we re-check its cursor then

    def _activate(self, s: _Session, sig: tuple[int, int, int]) -> bool:
        """Take the session's lock and (re)load where its shipping stands."""
        fd = self.cursors.try_lock(s.stem)
        if fd is None:
            s.locked_out = True
            return False
        s.locked_out = False
        s.lock_fd = fd
        try:
            saved = self.cursors.load(s.stem)
        except ValueError as exc:
            s.error = str(exc)
            s.sig = sig
            self._unlock(s)
            return False
        if s.feed is not None and saved == s.saved:
            return True  # nobody shipped it meanwhile: our fold is still right
        s.saved, s.feed, s.pending, s.pending_spans, s.done, s.at_end, s.error = saved, None, deque(), 0, False, False, None
        if saved is not None and saved.done and (saved.inode, saved.cursor.offset) == (sig[0], sig[1]):
            s.session_id, s.done, s.at_end, s.sig, s.read = saved.session_id, True, True, sig, saved.cursor
            self._unlock(s)
            return True
        if s.session_id is None:
            s.session_id = decode_stem(s.stem) or (saved.session_id if saved is not None else None)
            if s.session_id is None:
                s.session_id = summarize_stem(self.directory, s.stem).session_id
        s.feed = SessionFeed(s.session_id, self.options.partial)
        s.read, s.skip_to = Cursor.START, None
        if saved is not None and not saved.cursor.at_start:
            try:
                still = check_cursor(self.directory, s.session_id, saved.cursor)
            except SessionNotFoundError:
                still = False
            if still:
                s.skip_to = saved.cursor
            elif saved.trace_id is not None:
                log.warning(
                    "walspan: ship: %s: the log no longer holds the record acknowledged last (cut by a repair, or a new trace): shipping it from its start",
                    s.session_id,
                )
        return True

    def _reset(self, s: _Session) -> None:
        """Forget what was read but not acknowledged; the next look reloads the cursor."""
        s.feed, s.pending, s.pending_spans, s.at_end, s.sig = None, deque(), 0, False, None
        self._unlock(s)

    def _unlock(self, s: _Session) -> None:
        if s.lock_fd is not None:
            os.close(s.lock_fd)
            s.lock_fd = None

    def _read(self, s: _Session, sig: tuple[int, int, int]) -> None:
        assert s.feed is not None and s.session_id is not None
        cap, item_cap = self.options.batch_spans, 4 * self.options.batch_spans
        records = read_records(self.directory, s.session_id, after=s.read)
        at_end = True
        try:
            for rec in records:
                if s.skip_to is not None:
                    s.feed.skip(rec)
                    s.read = rec.cursor
                    if rec.seq >= s.skip_to.seq:
                        s.skip_to = None  # check_cursor vouched for this record: same trace
                    continue
                item = s.feed.apply(rec)
                s.read = rec.cursor
                s.pending.append((item, time.monotonic()))
                s.pending_spans += len(item.spans)
                if s.pending_spans >= cap or len(s.pending) >= item_cap:
                    at_end = False
                    break
        except SessionNotFoundError:
            if not s.in_flight:
                s.gone = True
                self._unlock(s)
            return
        except CursorMismatchError as exc:
            # the log was cut below what we read (a repair, a new trace): start over from
            # what is acknowledged, once nothing of this session is in flight
            log.warning("walspan: ship: %s: %s: re-reading it", s.session_id, exc.reason)
            if not s.in_flight:
                self._reset(s)
            return
        except CorruptWALError as exc:
            s.error = f"{s.session_id}: not shipped past seq {s.read.seq}: {exc}"
            log.warning("walspan: ship: %s", s.error)
            s.sig = sig
            return
        finally:
            close = getattr(records, "close", None)  # a generator: let go of its descriptor now
            if close is not None:
                close()
        s.at_end = at_end
        s.sig = sig if at_end else None

    # -- batching ----------------------------------------------------------------------------

    def _saved_for(self, s: _Session, items: list[Item], spans: int, sig: tuple[int, int, int] | None) -> SavedCursor:
        assert s.feed is not None and s.session_id is not None
        last = items[-1].cursor
        done = s.feed.ended and last == s.read and s.at_end
        return SavedCursor(s.session_id, s.feed.trace_id, last, sig[0] if sig else 0, done, s.spans_acked + spans)

    def _commit_local(self, s: _Session) -> None:
        """Records that ship no span (attribute updates, detaches): nothing to send, so the
        cursor moves past them without a request."""
        items = [i for i, _ in s.pending]
        s.pending.clear()
        sig = s.sig
        saved = self._saved_for(s, items, 0, sig)
        self.cursors.save(s.stem, saved)
        s.saved = saved

    def _dispatch(self, flush_all: bool) -> None:
        o = self.options
        while len(self._in_flight) < o.window:
            ready = [s for s in self._rotated() if s.pending and not s.in_flight and s.lock_fd is not None]
            if not ready:
                return
            total = sum(s.pending_spans for s in ready)
            oldest = min(s.pending[0][1] for s in ready)
            full = total >= o.batch_spans
            aged = time.monotonic() - oldest >= o.batch_age
            if not (flush_all or full or aged):
                return
            for s in ready:
                if not s.pending_spans:
                    self._commit_local(s)
            with_spans = [s for s in ready if s.pending_spans]
            if not with_spans:
                return
            batch = self._form(with_spans)
            if batch is None:
                return
            self._rr += 1
            for p in batch.parts:
                p.session.in_flight = True
            self._in_flight.append(batch)
            self._outbox.put(batch)

    def _rotated(self) -> list[_Session]:
        n = len(self._order)
        return [self._sessions[self._order[(self._rr + k) % n]] for k in range(n)]

    def _form(self, with_spans: list[_Session]) -> _Batch | None:
        o = self.options
        share = max(1, o.batch_spans // max(1, len(with_spans)))
        parts: list[_Part] = []
        room = o.batch_spans
        for s in with_spans:
            if room <= 0:
                break
            items: list[Item] = []
            taken = 0
            limit = min(share, room)
            while s.pending:
                item = s.pending[0][0]
                n = len(item.spans)
                if n and taken and taken + n > limit:
                    break
                items.append(item)
                s.pending.popleft()
                taken += n
                if taken >= limit:
                    break
            while s.pending and not s.pending[0][0].spans:  # span-less records ride along
                items.append(s.pending.popleft()[0])
            s.pending_spans -= taken
            room -= taken
            sig = s.sig if not s.pending else None
            parts.append(_Part(s, items, self._saved_for(s, items, taken, sig)))
        return _Batch(parts) if parts else None

    # -- sending (sender threads) --------------------------------------------------------------

    def _sender_main(self) -> None:
        o = self.options
        sender = Sender(o.endpoint, o.headers, o.protocol, o.gzip, o.timeout)
        try:
            while True:
                batch = self._outbox.get()
                if batch is None:
                    return
                try:
                    self._deliver(sender, batch)
                except Exception as exc:  # a cursor that cannot be saved: stop, never skip
                    batch.result = "fail"
                    batch.outcome = Outcome("fail", None, f"{type(exc).__name__}: {exc}")
                self._inbox.put(batch)
        finally:
            sender.close()

    def _encode(self, batch: _Batch) -> bytes:
        m = spans_model(((i.trace, i.spans) for p in batch.parts for i in p.items if i.spans), include_io=self.options.include_io)
        return proto_request(m) if self.options.protocol == PROTOBUF else json_request(m)

    def _deliver(self, sender: Sender, batch: _Batch) -> None:
        o = self.options
        body = self._encode(batch)
        first = time.monotonic()
        attempt = 0
        while True:
            out = sender.post(body)
            batch.outcome = out
            if out.kind in (OK, REJECT):
                if out.kind == REJECT or out.rejected_spans:
                    self._record_reject(batch, out)
                for p in batch.parts:
                    self.cursors.save(p.session.stem, p.saved)
                batch.result = "ack" if out.kind == OK else "reject"
                return
            if out.retry_after is not None:
                delay = min(out.retry_after, o.retry_after_max)
            else:
                delay = backoff(attempt, o.backoff_initial, o.backoff_max)
            if o.give_up_after is not None and time.monotonic() - first + delay > o.give_up_after:
                batch.result = "fail"
                return
            log.info("walspan: ship: %s; retrying in %.2fs", out.message, delay)
            with self._lock:
                self._counts.retries += 1
            batch.retries += 1
            if self._stop.wait(delay):
                batch.result = "abandon"
                return
            attempt += 1

    def _record_reject(self, batch: _Batch, out: Outcome) -> None:
        spans = out.rejected_spans or batch.spans
        log.warning("walspan: ship: the receiver refused %d span(s) for good (%s); recorded in %s", spans, out.message, self.cursors.path)
        self.cursors.record_reject(
            {
                "status": out.status,
                "message": out.message,
                "spans": spans,
                "partial": bool(out.rejected_spans),
                "sessions": [
                    {"session_id": p.session.session_id, "after": str(p.session.acked), "to": str(p.saved.cursor), "spans": p.spans}
                    for p in batch.parts
                ],
            }
        )

    def _complete(self, batch: _Batch) -> None:
        """A sender is done with a batch (back in the run thread)."""
        self._in_flight.remove(batch)
        now = time.time()
        for p in batch.parts:
            p.session.in_flight = False
            if batch.result in ("ack", "reject"):
                p.session.saved = p.saved
                if batch.result == "ack":
                    self.ack_lags.extend(now - i.time / 1e9 for i in p.items if i.spans and i.time is not None)
            # else the run ends ("fail", "abandon"): the next one resumes from the saved cursor
        out = batch.outcome
        with self._lock:
            if batch.result == "ack":
                self._counts.batches += 1
                self._counts.spans += batch.spans - (out.rejected_spans if out else 0)
                if out is not None and out.rejected_spans:
                    self._counts.rejected_batches += 1
                    self._counts.rejected_spans += out.rejected_spans
            elif batch.result == "reject":
                self._counts.rejected_batches += 1
                self._counts.rejected_spans += batch.spans
        if batch.result == "fail":
            why = out.message if out is not None else "unknown"
            self._errors.append(f"gave up on a batch of {batch.spans} span(s) after {batch.retries} retries: {why}")
            log.warning("walspan: ship: %s", self._errors[-1])


def _sig(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def ship(directory: str | os.PathLike[str], endpoint: str, **options: Any) -> ShipResult:
    """Ship what the store holds now to `endpoint` and return once it is acknowledged (or a
    batch failed for longer than `give_up_after`, default 60 s). Options: ShipOptions."""
    options.setdefault("give_up_after", 60.0)
    return Shipper(directory, ShipOptions(endpoint, **options)).run()


__all__ = ["ShipOptions", "ShipResult", "ShipStatus", "Shipper", "ship"]
