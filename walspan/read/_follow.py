"""Following a store as it grows: every record appended to any session, by polling.

A poll lists the store, stats each WAL, and reads the records after its cursor from the ones
that changed (size, mtime or inode). Nothing is held open between polls (a store may hold
thousands of sessions) and no lock is ever taken, so writers never wait for a follower.

Whatever happens beside it, a follower says so and never yields a record twice without
saying it might, nor skips one silently:

- a new WAL: a `new` notice, then its records from the first;
- a WAL removed (pruned): a `removed` notice;
- the log cut below the cursor (an explicit repair, a lost unsynced tail): the follower keeps
  the cursors of its last `history` records and resumes after the newest one the log still
  holds (a `resync` notice naming the seq); if none is left, it re-reads the log from the
  start and the `restart` notice says records may repeat;
- a new log under the same session id (pruned, then created anew): a `replaced` notice and
  the new trace from its first record;
- corruption: an `error` notice once, and another look when the file changes (e.g. after
  `walspan repair`).

Compaction and torn-tail truncation need no handling: a compaction does not touch the WAL,
and a torn tail is never read as records, so its truncation cuts nothing a cursor points at.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from .. import _fsutil
from .._format import unpack_payload
from .._names import decode_stem, encode_session_id
from .._reader import ScanState, iter_records
from ..errors import CorruptWALError, CursorMismatchError
from ._records import Cursor, Record, cursor_matches_fd, end_cursor_fd, iter_fd


class Notice(NamedTuple):
    """Something a reader of the stream should know that is not a record.

    kind: "new" | "removed" | "replaced" | "resync" | "restart" | "error". For `resync`,
    `seq` is the record the stream resumes after (the records after it that were yielded
    before are gone from the log); for `restart` and `replaced` it is 0 (everything that
    follows is from the first record)."""

    session_id: str
    kind: str
    message: str
    seq: int | None = None


@dataclass
class _Watch:
    session_id: str
    trace_id: str
    cursor: Cursor
    sig: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) when last read
    recent: deque[Cursor] = field(default_factory=lambda: deque(maxlen=256))
    error: str | None = None


class Follower:
    """Reads every session of a store (or only `session_id`) as records are appended.

    from_start: the sessions present at the first poll are read from their first record;
    otherwise from their end, less the last `back` records of each. Sessions that appear
    later are always read from their first record. `cursors` (session id -> Cursor) is the
    current position of each session: save it to resume elsewhere (`read_records(after=)`).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        session_id: str | None = None,
        *,
        from_start: bool = False,
        back: int = 0,
        history: int = 256,
    ) -> None:
        self.directory = os.fspath(directory)
        self.only = encode_session_id(session_id) if session_id is not None else None
        self.from_start = from_start
        self.back = back
        self.history = history
        self._watches: dict[str, _Watch] = {}
        self._bad: dict[str, str] = {}  # stem -> error already reported for a file not yet readable
        self._first = True

    @property
    def cursors(self) -> dict[str, Cursor]:
        return {w.session_id: w.cursor for w in self._watches.values()}

    def follow(self, interval: float = 0.25, stop: threading.Event | None = None) -> Iterator[Record | Notice]:
        """iter_poll() forever, `interval` seconds apart, until `stop` is set."""
        while True:
            yield from self.iter_poll()
            if stop is None:
                time.sleep(interval)
            elif stop.wait(interval):
                return

    def poll(self) -> list[Record | Notice]:
        """One pass over the store: the records appended since the last pass, and notices."""
        return list(self.iter_poll())

    def iter_poll(self) -> Iterator[Record | Notice]:
        """poll(), yielding each record as it is read (memory stays bounded however much was
        appended). Each session's cursor moves as its records are consumed."""
        stems = self._list()
        for stem in sorted(set(self._watches) - stems):
            w = self._watches.pop(stem)
            yield Notice(w.session_id, "removed", "its log was removed (pruned?)")
        for stem in sorted(stems):
            yield from self._poll_one(stem)
        self._first = False

    def _list(self) -> set[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return set()
        stems = {n[:-4] for n in names if n.endswith(".wal") and not n.startswith(".")}
        if self.only is not None:
            stems &= {self.only}
        return stems

    def _poll_one(self, stem: str) -> Iterator[Record | Notice]:
        out: list[Record | Notice] = []  # notices about the file itself
        path = os.path.join(self.directory, stem + ".wal")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # removed since the listing: the next poll says so
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        w = self._watches.get(stem)
        if w is not None and w.sig == sig:
            return
        if not stat.S_ISREG(st.st_mode):
            self._bad_file(stem, f"{path}: not a regular file", out)
            yield from out
            return
        try:
            fd = _fsutil.open_file(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._bad_file(stem, f"{path}: {exc.strerror or exc}", out)
            yield from out
            return
        try:
            if w is None or w.sig is None or w.sig[0] != sig[0]:
                w = self._start(stem, fd, path, w, out)
                yield from out
                if w is None:
                    return
            yield from self._read(w, fd, path)
            w.sig = sig
        finally:
            os.close(fd)

    def _bad_file(self, stem: str, message: str, out: list[Record | Notice]) -> None:
        if self._bad.get(stem) != message:
            self._bad[stem] = message
            out.append(Notice(decode_stem(stem) or stem, "error", message))

    def _start(self, stem: str, fd: int, path: str, old: _Watch | None, out: list[Record | Notice]) -> _Watch | None:
        """A WAL seen for the first time, or a new file under a known name."""
        try:
            first = _first_record(fd, path)
        except CorruptWALError as exc:
            self._bad_file(stem, str(exc), out)
            return None
        if first is None:
            return None  # being created: there next time
        self._bad.pop(stem, None)
        sid = first.get("session_id")
        sid = sid if isinstance(sid, str) else (decode_stem(stem) or stem)
        trace_id = str(first.get("trace_id"))
        if old is not None and old.trace_id == trace_id:
            return old  # same log, new inode (copied back): the cursor check decides
        cursor = Cursor.START
        if old is not None:
            out.append(Notice(sid, "replaced", f"a new trace {trace_id} under this session id; reading it from its start", 0))
        elif self._first and not self.from_start:
            cursor = end_cursor_fd(fd, path, self.back)
        elif not self._first:
            out.append(Notice(sid, "new", f"new trace {trace_id}"))
        w = _Watch(sid, trace_id, cursor, recent=deque(maxlen=self.history))
        self._watches[stem] = w
        return w

    def _read(self, w: _Watch, fd: int, path: str) -> Iterator[Record | Notice]:
        for _attempt in range(2):
            try:
                for rec in iter_fd(fd, path, w.session_id, w.cursor):
                    w.cursor = rec.cursor
                    w.recent.append(rec.cursor)
                    yield rec
                w.error = None
                return
            except CursorMismatchError as exc:
                notices: list[Record | Notice] = []
                self._resync(w, fd, path, exc, notices)
                yield from notices
            except CorruptWALError as exc:
                if w.error != str(exc):
                    w.error = str(exc)
                    yield Notice(w.session_id, "error", str(exc))
                return

    def _resync(self, w: _Watch, fd: int, path: str, exc: CursorMismatchError, out: list[Record | Notice]) -> None:
        while w.recent:
            c = w.recent.pop()
            if c != w.cursor and cursor_matches_fd(fd, path, w.session_id, c):
                w.cursor = c
                w.recent.append(c)
                out.append(Notice(w.session_id, "resync", f"{exc.reason}: the log was cut; resuming after seq {c.seq}", c.seq))
                return
        try:
            first = _first_record(fd, path)
        except CorruptWALError:
            first = None
        if first is not None and str(first.get("trace_id")) != w.trace_id:
            w.trace_id = str(first.get("trace_id"))
            out.append(Notice(w.session_id, "replaced", f"a new trace {w.trace_id} under this session id; reading it from its start", 0))
        else:
            out.append(
                Notice(w.session_id, "restart", f"{exc.reason}: the log was cut; re-reading it from the start (records may repeat)", 0)
            )
        w.cursor = Cursor.START


def _first_record(fd: int, path: str) -> dict[str, object] | None:
    """The trace-start payload, or None if the file holds no whole record yet."""
    for _off, _rtype, _seq, payload in iter_records(fd, ScanState(path)):
        body = unpack_payload(payload) if payload is not None else None
        return body if isinstance(body, dict) else {}
    return None
