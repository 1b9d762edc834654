"""Records after a cursor: the read API's one way into a session's WAL.

Built on the storage reader (`walspan._reader.iter_records`): it never takes a lock, never
writes, and sees only whole records with good checksums, so a concurrent append looks like
the current end of the log and a concurrent torn-tail truncation cuts nothing it has read.

A cursor names the record it points after by offset, sequence number, end offset and a
fingerprint of that record's payload. Resuming re-reads that one record first: if the WAL no
longer holds it (an explicit repair cut the log below it, a power loss took an unsynced tail,
or the session was pruned and created anew), CursorMismatchError is raised and nothing is
yielded: never a record from another log, never a silent skip.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .. import _fsutil
from .._format import FILE_HEADER_SIZE, RecordType, unpack_payload
from .._names import encode_session_id
from .._reader import ScanState, iter_records
from .._summary import record_check
from ..errors import CorruptWALError, CursorMismatchError, SessionNotFoundError

_CURSOR_VERSION = "c1"


@dataclass(frozen=True)
class Cursor:
    """A durable position in one session's WAL: just after the record of sequence number `seq`
    that starts at byte `record` and ends at byte `offset`, whose payload has fingerprint
    `check`. `Cursor.START` (seq 0) is before the first record of whatever log is there.

    Serialise with `str(cursor)` / `Cursor.parse(text)` (or `to_dict` / `from_dict`); a
    cursor stays meaningful across processes and restarts."""

    offset: int = FILE_HEADER_SIZE
    seq: int = 0
    record: int = 0
    check: int = 0

    START: ClassVar[Cursor]  # before the first record (set below)

    @property
    def at_start(self) -> bool:
        return self.seq == 0

    def __str__(self) -> str:
        return f"{_CURSOR_VERSION}:{self.offset}:{self.seq}:{self.record}:{self.check:08x}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The cursor `str(cursor)` gave; ValueError naming what is wrong otherwise."""
        parts = text.split(":") if isinstance(text, str) else []
        if len(parts) != 5 or parts[0] != _CURSOR_VERSION:
            raise ValueError(f"not a walspan cursor: {text!r} (expected {_CURSOR_VERSION}:offset:seq:record:check)")
        try:
            offset, seq, record, check = int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4], 16)
        except ValueError:
            raise ValueError(f"not a walspan cursor: {text!r} (fields must be numbers)") from None
        return cls.from_dict({"offset": offset, "seq": seq, "record": record, "check": check})

    def to_dict(self) -> dict[str, int]:
        return {"offset": self.offset, "seq": self.seq, "record": self.record, "check": self.check}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cursor:
        try:
            c = cls(int(d["offset"]), int(d["seq"]), int(d["record"]), int(d["check"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a walspan cursor: {d!r} ({exc})") from None
        if c.seq < 0 or not 0 <= c.check <= 0xFFFFFFFF:
            raise ValueError(f"not a walspan cursor: {d!r}")
        if c.seq == 0:
            if (c.offset, c.record, c.check) != (FILE_HEADER_SIZE, 0, 0):
                raise ValueError(f"not a walspan cursor: {d!r} (a start cursor has no record)")
        elif not FILE_HEADER_SIZE <= c.record < c.offset:
            raise ValueError(f"not a walspan cursor: {d!r} (record must lie before offset)")
        return c


Cursor.START = Cursor()


def type_name(rtype: int) -> str:
    """`span_start`, `terminal`, ...; `type_<n>` for a skippable type this walspan does not know."""
    try:
        return RecordType(rtype).name.lower()
    except ValueError:
        return f"type_{rtype}"


class Record(NamedTuple):
    """One decoded record. `cursor` points just after it: resume from there."""

    session_id: str
    cursor: Cursor
    type: str
    payload: dict[str, Any]

    @property
    def seq(self) -> int:
        return self.cursor.seq

    @property
    def time(self) -> int | None:
        t = self.payload.get("time")
        return t if isinstance(t, int) else None


def wal_path(directory: str | os.PathLike[str], session_id: str) -> str:
    return os.path.join(os.fspath(directory), encode_session_id(session_id) + ".wal")


def _open(path: str, session_id: str) -> int:
    try:
        return _fsutil.open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SessionNotFoundError(session_id, path) from None


def read_records(
    directory: str | os.PathLike[str], session_id: str, after: Cursor | None = None
) -> Iterator[Record]:
    """Yield the records of the session's log after `after` (default: from the first record) up
    to its current valid end, decoded. Lock-free; a torn tail ends the iteration quietly.

    Raises SessionNotFoundError (no WAL), CursorMismatchError (the cursor's record is gone:
    nothing is yielded), CorruptWALError (damage followed by valid records)."""
    path = wal_path(directory, session_id)
    fd = _open(path, session_id)
    try:
        yield from iter_fd(fd, path, session_id, after)
    finally:
        os.close(fd)


def iter_fd(fd: int, path: str, session_id: str, after: Cursor | None) -> Iterator[Record]:
    """read_records on an open descriptor (the follower keeps none open between polls)."""
    after = after or Cursor.START
    state = ScanState(path)
    checking = not after.at_start
    start, start_seq = (after.record, after.seq - 1) if checking else (FILE_HEADER_SIZE, 0)
    records = iter_records(fd, state, start=start, start_seq=start_seq)
    try:
        for offset, rtype, seq, payload in records:
            assert payload is not None
            if checking:
                checking = False
                if (offset, seq, state.end, record_check(payload)) != (after.record, after.seq, after.offset, after.check):
                    raise CursorMismatchError(path, after, "a different record is there now")
                continue
            try:
                body = unpack_payload(payload)
            except Exception as exc:  # a record with a good checksum whose payload is not ours
                raise CorruptWALError(path, offset, f"record payload does not decode: {exc}") from None
            if not isinstance(body, dict):
                raise CorruptWALError(path, offset, "record payload is not a map")
            yield Record(session_id, Cursor(state.end, seq, offset, record_check(payload)), type_name(rtype), body)
    except CorruptWALError as exc:
        if checking and exc.offset >= after.record:
            # the bytes at the cursor's record do not parse as that record any more
            raise CursorMismatchError(path, after, f"its record is damaged or gone ({exc.reason})") from None
        raise
    if checking:
        raise CursorMismatchError(path, after, "the log now ends before it")


def check_cursor(directory: str | os.PathLike[str], session_id: str, cursor: Cursor) -> bool:
    """Whether the session's log still holds the record `cursor` points after (reads one record)."""
    if cursor.at_start:
        return os.path.exists(wal_path(directory, session_id))
    path = wal_path(directory, session_id)
    fd = _open(path, session_id)
    try:
        return cursor_matches_fd(fd, path, session_id, cursor)
    finally:
        os.close(fd)


def cursor_matches_fd(fd: int, path: str, session_id: str, cursor: Cursor) -> bool:
    """Reads the cursor's own record only: damage after it is not this question's business."""
    if cursor.at_start:
        return True
    state = ScanState(path)
    try:
        for offset, _rtype, seq, payload in iter_records(fd, state, start=cursor.record, start_seq=cursor.seq - 1):
            assert payload is not None
            return (offset, seq, state.end, record_check(payload)) == (cursor.record, cursor.seq, cursor.offset, cursor.check)
    except CorruptWALError:
        pass  # the bytes there do not parse as that record any more
    return False


def end_cursor(directory: str | os.PathLike[str], session_id: str, back: int = 0) -> Cursor:
    """A cursor after the last record of the log as it is now (`back` > 0: after the last
    `back` + 1-th record, so that the last `back` records follow it). Reads every record
    header once; copies no payload but one."""
    path = wal_path(directory, session_id)
    fd = _open(path, session_id)
    try:
        return end_cursor_fd(fd, path, back)
    finally:
        os.close(fd)


def end_cursor_fd(fd: int, path: str, back: int = 0) -> Cursor:
    for _attempt in range(3):  # a repair may cut the log between the two passes: look again
        last: deque[tuple[int, int]] = deque(maxlen=back + 1)
        for offset, _rtype, seq, _payload in iter_records(fd, ScanState(path), decode_types=frozenset()):
            last.append((offset, seq))
        if len(last) <= back:
            return Cursor.START  # fewer records than asked for: all of them follow the start
        offset, seq = last[0]
        state = ScanState(path)
        for off, _rtype, rseq, payload in iter_records(fd, state, start=offset, start_seq=seq - 1):
            if off == offset and rseq == seq and payload is not None:
                return Cursor(state.end, seq, offset, record_check(payload))
            break
    raise CorruptWALError(path, offset, "the log keeps changing under the reader")
