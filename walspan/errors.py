"""Exceptions raised by walspan. All derive from WalspanError, except where a built-in says it
better (TypeError/ValueError for bad arguments, OSError with its errno for the OS's own errors)."""

from __future__ import annotations

import os


class WalspanError(Exception):
    """Base class of every walspan-specific error."""


class CorruptWALError(WalspanError):
    """A WAL holds damage that is not a torn tail: a bad header, or bad bytes followed by valid
    records, or a checksum failure inside a region already made durable. Never repaired silently."""

    def __init__(self, path: str | os.PathLike[str], offset: int, reason: str) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path}: corrupt at byte offset {offset}: {reason}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.path, self.offset, self.reason))


class UnsupportedFormatError(CorruptWALError):
    """The file is a WAL of a format version this walspan does not read (e.g. walspan 0.1's
    format 1). Not damage: `repair` refuses to touch it."""


class TraceClosedError(WalspanError):
    """The trace already has a terminal record (completed, error or crashed): nothing more may be
    appended to it, and nothing was written."""

    def __init__(self, session_id: str, status: str, message: str | None = None) -> None:
        self.session_id = session_id
        self.status = status
        self.message = message
        detail = f" ({message})" if message else ""
        super().__init__(f"trace of session {session_id!r} is closed: status {status}{detail}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.session_id, self.status, self.message))


class SessionNotFoundError(WalspanError, LookupError):
    """No WAL exists for this session id in this store."""

    def __init__(self, session_id: str, path: str | os.PathLike[str]) -> None:
        self.session_id = session_id
        self.path = os.fspath(path)
        super().__init__(f"no trace for session {session_id!r} (expected {self.path})")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.session_id, self.path))


class DurabilityError(WalspanError, OSError):
    """Writing or flushing the WAL failed, so the event was NOT acknowledged. After a failed
    fdatasync the kernel may already have dropped the dirty pages, so the handle refuses to
    continue (a retried fsync that succeeds proves nothing); reopen the store to go on."""

    def __init__(self, path: str | os.PathLike[str], op: str, cause: OSError) -> None:
        self.path = os.fspath(path)
        self.op = op
        super().__init__(cause.errno, f"{op} failed on {self.path}: {cause.strerror or cause}")
        self.__cause__ = cause

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.path, self.op, OSError(self.errno, self.strerror)))


class ClosedError(WalspanError, ValueError):
    """A Trace or Store was used after its close(): nothing was written. Closing detaches for
    good; attach again with Store.open() (a new Store, after Store.close())."""


class CursorMismatchError(WalspanError):
    """A read cursor no longer matches its WAL: the record it points after is gone or different
    (the log was cut by a repair or lost an unsynced tail, or the session was removed and
    created anew). Nothing was read; resume from an older cursor that still matches, or from
    the start."""

    def __init__(self, path: str | os.PathLike[str], cursor: object, reason: str) -> None:
        self.path = os.fspath(path)
        self.cursor = cursor
        self.reason = reason
        super().__init__(f"{self.path}: cursor {cursor} no longer matches the log: {reason}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.path, self.cursor, self.reason))
