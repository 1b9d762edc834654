"""Store: a directory of session WALs, the process's writer in it, and the descriptor LRU."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _compactor, _fsutil, _hooks, _liveness
from ._fold import TERMINAL_STATUSES
from ._format import RecordType, encode_record, pack_payload, unpack_payload
from ._names import check_session_id, decode_stem, encode_session_id
from ._values import DEFAULT_MAX_VALUE_BYTES, cap_str, clean_mapping
from ._wal import (
    DEFAULT_FLUSH_INTERVAL,
    LockedWal,
    Repair,
    WalHandle,
    WriterScan,
    check_durability,
    check_flush_interval,
    create_wal,
    internal_dir,
    set_aside_whole_wal,
)
from .errors import (
    ClosedError,
    CorruptWALError,
    DurabilityError,
    SessionNotFoundError,
    TraceClosedError,
    UnsupportedFormatError,
    WalspanError,
)

if TYPE_CHECKING:
    from ._recovery import RecoveryReport
    from ._trace import Trace
    from ._verify import VerifyReport

log = logging.getLogger("walspan")

_T = RecordType


class _Session:
    """This process's view of one session: attachment and refcount (not the trace state)."""

    __slots__ = ("session_id", "stem", "attached_pid", "refs", "failed", "threads", "trace_id")

    def __init__(self, session_id: str, stem: str) -> None:
        self.session_id = session_id
        self.stem = stem
        self.attached_pid = 0  # pid that wrote our attach record; 0: not attached
        self.refs = 0
        self.failed: DurabilityError | None = None
        self.threads: set[int] = set()
        self.trace_id = ""


class Store:
    """A directory of traces. Thread-safe; one instance per directory per process is plenty.

    durability: "durable" (default) -- an append returns after write + fdatasync (shared between
    concurrent writers); "interval" -- after write, and a background thread fdatasyncs what
    was written every `flush_interval` seconds (default 0.1): a power loss loses at most the
    events acknowledged in about the last interval, never a hole; "process" -- after write
    only: survives the death of the process, not power loss.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        durability: str = "durable",
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        install_hooks: bool = True,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        max_open_files: int = 128,
        create: bool = True,
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, not {type(directory).__name__}")
        self.durability = check_durability(durability)
        self.flush_interval = check_flush_interval(flush_interval)
        if not isinstance(install_hooks, bool):
            raise TypeError("install_hooks must be a bool")
        for name, value, low in (("max_value_bytes", max_value_bytes, 64), ("max_open_files", max_open_files, 1)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be at least {low}, not {value}")
        self.install_hooks = install_hooks
        self.max_value_bytes = max_value_bytes
        self.max_open_files = max_open_files
        path = os.path.abspath(os.fspath(directory))
        if create:
            _fsutil.ensure_dir(path)
        elif not os.path.isdir(path):
            raise FileNotFoundError(2, "trace directory does not exist", path)
        self.directory = path
        self._internal = internal_dir(path)
        if create:
            os.makedirs(self._internal, mode=_fsutil.DIR_MODE, exist_ok=True)
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._handles: OrderedDict[str, WalHandle] = OrderedDict()
        self._writer: _liveness.ProcessWriter | None = None
        self._closed = False  # close() was called: no more attaching through this Store
        _hooks.register(self)

    def __repr__(self) -> str:
        return f"walspan.Store({self.directory!r}, durability={self.durability!r})"

    # -- paths ----------------------------------------------------------------------------

    def wal_path(self, session_id: str) -> Path:
        return Path(self.directory, encode_session_id(session_id) + ".wal")

    def trace_path(self, session_id: str) -> Path:
        return Path(self.directory, encode_session_id(session_id) + ".json")

    def sessions(self) -> list[str]:
        """Raw session ids of every WAL in the store, sorted."""
        out = []
        for name in os.listdir(self.directory):
            if not name.endswith(".wal") or name.startswith("."):
                continue
            stem = name[:-4]
            sid = decode_stem(stem)
            if sid is not None and encode_session_id(sid) == stem:
                out.append(sid)
            elif "~" in stem:
                sid = self._read_session_id(os.path.join(self.directory, name))
                if sid is not None and encode_session_id(sid) == stem:
                    out.append(sid)
        return sorted(out)

    def _read_session_id(self, wal_path: str) -> str | None:
        try:
            first = read_first_record(wal_path)
        except (OSError, ValueError, WalspanError):  # unreadable: not listed (verify reports it)
            return None
        sid = first.get("session_id")
        return sid if isinstance(sid, str) else None

    # -- the process writer ---------------------------------------------------------------

    def _process_writer(self) -> _liveness.ProcessWriter:
        with self._lock:
            if self.install_hooks:
                _hooks.install()  # cheap once done; signal handlers wait for a main-thread attach
            if self._writer is None or self._writer.pid != os.getpid():
                _hooks.register_exit_finalizer(_hooks.detach_all)
                self._writer = _liveness.ProcessWriter(self._internal)
            return self._writer

    # -- handles (bounded LRU of open descriptors) ----------------------------------------

    def _session(self, session_id: str) -> _Session:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                s = self._sessions[session_id] = _Session(session_id, encode_session_id(session_id))
            return s

    def _acquire_handle(self, stem: str) -> WalHandle:
        with self._lock:
            h = self._handles.get(stem)
            if h is not None:
                self._handles.move_to_end(stem)
            else:
                h = WalHandle(self.directory, stem, self.durability, self.flush_interval)
                self._handles[stem] = h
                while len(self._handles) > self.max_open_files:
                    self._retire(self._handles.popitem(last=False)[1])
            h.users += 1
            return h

    def _release_handle(self, h: WalHandle) -> None:
        with self._lock:
            h.users -= 1
            if h.retired and not h.users:
                h.close()

    def _retire(self, h: WalHandle) -> None:
        """Under self._lock, once `h` left the LRU: close it now, or when its last user is done."""
        if h.users:
            h.retired = True
        else:
            h.close()

    # -- attaching ------------------------------------------------------------------------

    def open(self, session_id: str, *, metadata: dict[str, Any] | None = None, trace_id: str | None = None) -> Trace:
        """Attach to a session: create its trace, or continue the existing one.

        `trace_id` (32 lowercase hex digits, not all zeros, as W3C and OpenTelemetry write
        them) is the id a trace created now gets, e.g. the OpenTelemetry trace it records;
        by default a random one. An existing trace keeps the id it was created with.
        Raises TraceClosedError (writing nothing) if the trace already ended or crashed.
        """
        from ._trace import Trace

        check_session_id(session_id)
        if trace_id is not None and not _is_trace_id(trace_id):
            raise ValueError(f"trace_id must be 32 lowercase hex digits, not all zeros, not {trace_id!r}")
        self._check_open()
        meta = clean_mapping(metadata, "metadata", self.max_value_bytes)
        session = self._session(session_id)
        with _hooks.busy():
            self._attach(session, meta, trace_id)
        with self._lock:
            session.refs += 1
            session.threads.add(threading.get_ident())
        return Trace(self, session)

    def _attach(self, session: _Session, metadata: dict[str, Any] | None, trace_id: str | None = None) -> None:
        writer = self._process_writer()
        wal_path = os.path.join(self.directory, session.stem + ".wal")
        created = False
        if not os.path.exists(wal_path):
            now = time.time_ns()
            first: dict[str, Any] = {
                "trace_id": trace_id or secrets.token_hex(16),
                "session_id": session.session_id,
                "metadata": metadata or {},
                "time": now,
                "writer": writer.writer_id,
            }
            attach = dict(writer.describe(), time=now)
            salt = int.from_bytes(os.urandom(8), "little")
            # The creator's attach record is born with the file: no crash (nor, in process mode,
            # power loss) can leave a trace whose creator is not named as a writer.
            records = encode_record(salt, _T.TRACE_START, 1, pack_payload(first))
            records += encode_record(salt, _T.WRITER_ATTACH, 2, pack_payload(attach))
            created = create_wal(wal_path, salt, records)
        already = session.attached_pid == os.getpid() or created
        h = self._acquire_handle(session.stem)
        if session.attached_pid != os.getpid() and h.is_stale():
            # The file was replaced, set aside or rewritten since this handle opened it: a
            # cached handle must never append to a file that is no longer the session's WAL.
            self._release_handle(h)
            with self._lock:
                if self._handles.get(session.stem) is h:
                    del self._handles[session.stem]
                    self._retire(h)
            session.trace_id = ""  # another trace may live under this session id now
            h = self._acquire_handle(session.stem)
        try:
            # the whole log is read for its writer records outside the lock; under it, the tail
            pre = None if already else h.prescan_writers()
            with h.locked() as wal:
                if wal.terminal_off:
                    info = h.terminal_info(wal.terminal_off)
                    raise TraceClosedError(session.session_id, info.get("status", "?"), info.get("message"))
                if not already:
                    self._mark_lost_writers(wal, writer.writer_id, pre)
                    payload = dict(writer.describe(), time=time.time_ns())
                    _, end = wal.append(_T.WRITER_ATTACH, payload)
                if metadata and not created:
                    _, end = wal.append(_T.METADATA, {"writer": writer.writer_id, "metadata": metadata, "time": time.time_ns()})
                    already = False
                if created:
                    session.trace_id = first["trace_id"]
                elif not session.trace_id:  # identity never changes: read it once per session
                    session.trace_id = read_first_record_fd(h.fd, h.path).get("trace_id", "")
            if not already and h.durable:
                h.wait_durable(end)
            session.attached_pid = os.getpid()
            _hooks.hold(self)  # detached at exit even if the caller drops the Store unclosed
        finally:
            self._release_handle(h)

    def _mark_lost_writers(self, wal: LockedWal, own_writer_id: str, pre: WriterScan | None) -> list[dict[str, Any]]:
        """Under the append lock: record every attached writer proven dead as lost."""
        attached = wal.attached_writers(pre).attached
        lost = []
        for wid, p in attached.items():
            if wid == own_writer_id or _liveness.writer_alive(self._internal, p):
                continue
            msg = f"writer {wid} (pid {p.get('pid')} on {p.get('host')}) died without detaching"
            wal.append(_T.WRITER_LOST, {"lost": wid, "message": msg, "time": time.time_ns(), "by": own_writer_id})
            lost.append(p)
        return lost

    # -- appending ------------------------------------------------------------------------

    def _append(self, session: _Session, rtype: int, payload: dict[str, Any]) -> int:
        """Append one record for this process's writer; returns its sequence number."""
        if session.failed is not None:
            raise session.failed
        self._check_open()
        with _hooks.busy():
            if session.attached_pid != os.getpid():
                self._attach(session, None)  # a fork child (or after end()): attach anew
            writer = self._writer
            assert writer is not None
            payload["writer"] = writer.writer_id
            h = self._acquire_handle(session.stem)
            try:
                seq, _end = h.append(rtype, payload, session.session_id)
            except DurabilityError as exc:
                if exc.op == "fdatasync":
                    session.failed = exc
                raise
            finally:
                self._release_handle(h)
            return seq

    def _terminate(self, session: _Session, status: str, message: str | None) -> Path:
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, not {status!r}")
        self._append(session, _T.TERMINAL, {"status": status, "message": message, "time": time.time_ns()})
        path = _compactor.compact(self.directory, session.stem).path
        with self._lock:
            session.attached_pid = 0
        return Path(path)

    def _detach(self, session: _Session) -> None:
        with self._lock:
            session.refs = max(0, session.refs - 1)
            if session.refs or session.attached_pid != os.getpid():
                return
            session.attached_pid = 0
        writer = self._writer
        if writer is None:
            return
        h = self._acquire_handle(session.stem)
        try:
            with _hooks.busy(), h.locked() as wal:
                if wal.terminal_off:
                    return  # ended: nothing may follow the terminal record, and nothing needs to
                _, end = wal.append(_T.WRITER_DETACH, {"writer": writer.writer_id, "time": time.time_ns()})
            if h.durable:
                h.wait_durable(end)
        finally:
            self._release_handle(h)

    def _end_attached(self, status: str, message: str, thread: int | None) -> None:
        """Crash-hook entry: end every trace this process has attached (or one thread's)."""
        message = cap_str(message, self.max_value_bytes)  # the single truncation rule
        with self._lock:
            targets = [
                s
                for s in self._sessions.values()
                if s.attached_pid == os.getpid() and (thread is None or thread in s.threads)
            ]
        for s in targets:
            try:
                self._terminate(s, status, message)
            except TraceClosedError:
                pass

    # -- reading --------------------------------------------------------------------------

    def _existing_stem(self, session_id: str) -> str:
        stem = encode_session_id(session_id)
        path = os.path.join(self.directory, stem + ".wal")
        try:
            os.stat(path)
        except FileNotFoundError:
            raise SessionNotFoundError(session_id, path) from None
        # any other OSError (permission denied, ...) is the real answer: it propagates
        return stem

    def load(self, session_id: str) -> dict[str, Any]:
        """The trace folded from the WAL's valid prefix now (same shape as the canonical JSON)."""
        stem = self._existing_stem(session_id)
        fold, _scan = _compactor.fold_wal(os.path.join(self.directory, stem + ".wal"))
        return fold.to_dict()

    def compact(self, session_id: str) -> Path:
        """Bring the canonical JSON up to date with the WAL; returns its path."""
        stem = self._existing_stem(session_id)
        with _hooks.busy():  # a crash hook arriving now would wait for our own compaction lock
            path = _compactor.compact(self.directory, stem).path
        return Path(path)

    def repair(self, session_id: str) -> Repair | None:
        """The documented way out of every state that open() and appends refuse, because you
        asked (never done implicitly); every record before the first damage is kept:

        - corruption at byte p: the log is cut at p, every byte from p on moved intact to
          `<wal>.broken-<p>`; a torn tail likewise, to `<wal>.torn-<p>`;
        - a damaged file header or trace start record (nothing before the damage to keep): the
          whole file is moved to `<wal>.broken-0`, and the session starts afresh on next open;
        - a recorded fdatasync failure: the records since the last good flush are re-written
          and fdatasynced again;
        then the JSON is rebuilt (one showing records the WAL lost is kept as
        `<json>.stale-<seq>`). Evidence files are never overwritten. Returns what was done, or
        None if the log was sound. Run it while no writer is appending to the session."""
        stem = self._existing_stem(session_id)
        result: Repair | None
        with _hooks.busy():
            try:
                h = WalHandle(self.directory, stem, self.durability)
            except UnsupportedFormatError:
                raise
            except CorruptWALError as exc:  # the file header itself is damaged
                result = set_aside_whole_wal(self.directory, stem, exc.reason)
            else:
                try:
                    result = h.repair()
                finally:
                    h.close()
            with self._lock:  # our cached handle's view of the log may be stale: drop it
                old = self._handles.pop(stem, None)
                if old is not None:
                    self._retire(old)
            session = self._sessions.get(session_id)
            if session is not None:
                session.failed = None
            if result is not None and result.action != "set_aside":
                _compactor.compact(self.directory, stem)
        return result

    def verify(self) -> VerifyReport:
        """Read-only integrity check of every WAL and JSON in the store (what `walspan verify`
        runs): framing, checksums and sequence of every record, and every JSON equal to the fold
        of the WAL prefix it names. `report.ok`, `report.errors`; nothing is changed."""
        from ._verify import verify_dir

        return verify_dir(self.directory)

    def recover(self) -> RecoveryReport:
        """Mark crashed every trace whose writers all died; see walspan._recovery."""
        from ._recovery import recover

        return recover(self)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Detach every trace this process attached through this store (none is ended), and
        release descriptors. The traces stay open for later writers (idle, not crashed).
        Attaching through this Store afterwards (open(), or a Trace it gave) raises
        ClosedError; reading (load, verify, compact, recover) still works."""
        self._closed = True
        self._release()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self!r} was closed; nothing was written (make a new Store to attach again)")

    def _release(self) -> None:
        """close() without closing: the exit-time detach, after which a late append (an atexit
        handler registered before walspan's) may still attach again."""
        with self._lock:
            sessions = [s for s in self._sessions.values() if s.attached_pid == os.getpid()]
        first_error: BaseException | None = None
        for s in sessions:
            with self._lock:
                s.refs = 1
            try:
                self._detach(s)
            except TraceClosedError:
                pass
            except (WalspanError, OSError) as exc:
                # Keep going: the descriptors and the liveness lock must be released anyway,
                # so that recovery can prove this writer gone (its trace then counts as crashed).
                log.warning("walspan: could not detach from session %r: %s", s.session_id, exc)
                first_error = first_error or exc
        with self._lock:
            for h in self._handles.values():
                self._retire(h)
            self._handles.clear()
            if self._writer is not None and self._writer.pid == os.getpid():
                self._writer.release()
                self._writer = None
        _hooks.unhold(self)
        if first_error is not None:
            raise first_error

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _forget_after_fork(self) -> None:
        """In a fork child: drop every descriptor and lock inherited from the parent, without
        unlocking (the parent owns them); the child attaches as its own writer on first use."""
        self._lock = threading.RLock()
        for h in self._handles.values():
            h.abandon()
        self._handles.clear()
        for s in self._sessions.values():
            s.attached_pid = 0
            s.refs = 0
            s.threads.clear()
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None


def _is_trace_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 32
        and all(c in "0123456789abcdef" for c in value)
        and value != "0" * 32
    )


def read_first_record_fd(fd: int, path: str) -> dict[str, Any]:
    """The TRACE_START payload (record 1), checked like any record (header, crc, seq)."""
    from ._reader import ScanState, iter_records

    for _off, rtype, _seq, payload in iter_records(fd, ScanState(path)):
        if rtype != _T.TRACE_START or payload is None:
            break
        body = unpack_payload(payload)
        if isinstance(body, dict):
            return body
        break
    raise ValueError(f"{path}: the first record is not a valid trace start")


def read_first_record(path: str) -> dict[str, Any]:
    fd = _fsutil.open_file(path, os.O_RDONLY)
    try:
        return read_first_record_fd(fd, path)
    finally:
        os.close(fd)
