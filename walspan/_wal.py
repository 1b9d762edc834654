"""One session's WAL as seen by a writer: locked appends, torn-tail repair, group commit.

Files, for a session whose name stem is S (docs/FORMAT.md, "Files"):

    S.wal                 the log (header + records), append-only
    .walspan/S.lock       flock'ed around every append: the append lock
    .walspan/S.shm        128 bytes shared by every process through mmap (below); flock'ed
                          exclusively by the process leading a flush: the flush lock

The shared state lets an append skip re-reading the log and lets writers share fdatasyncs:

    0  magic          b"WSPSHM01"
    8  salt           the salt of the WAL this state describes (else the state is ignored)
    16 written_end    \\ offset after the last complete record,   | written together under the
    24 last_seq        | its sequence number,                     | append lock; a crash
    32 terminal_off    | offset of the terminal record or 0,      | between the stores leaves
    40 state_crc      /  crc32 of bytes 8..40                     | a bad crc -> full rescan
    48 durable_end    every byte below it has been fdatasync'ed  | written under the append
    56 durable_crc    crc32 of salt (8 bytes) + durable_end      / lock, only ever raised
    64 flush_hint     written_end as read by the flush leader before its fdatasync (a hint)

Readers that do not hold the lock copy a field group in one slice and check its crc, so a
read racing a store is detected (and treated as "unknown"), never taken for a larger value.

Group commit. After its write, an append needs its record (ending at E) durable:

1. durable_end >= E: it returns at once, no flush of its own.
2. Within a process (threads), at most one flush runs at a time: a thread that finds one in
   flight waits for it (a Condition). If it covers E, the thread returns; if not (E was written
   after it began), the first thread to wake leads the next flush, which covers every record
   its process's threads wrote meanwhile: one fdatasync for the whole batch.
3. Across processes, that one thread tries the flush lock without blocking. The leader who
   gets it reads written_end W, publishes W as flush_hint, runs one fdatasync and raises
   durable_end to W. A writer who finds the lock taken and flush_hint >= E waits for that
   flush with a *shared* flock (every such waiter wakes at once when the leader is done, with
   no hand-off from waiter to waiter), then looks at durable_end again.
4. A writer whose record another process's flush in flight does not cover (it was written
   after that flush began) does not queue behind it: it reads W and runs its own fdatasync
   at once, beside the leader's. The kernel merges overlapping fdatasyncs of one file into one
   journal commit, so serialising processes here would only add a slow flock hand-off per
   flush (measured: slower than no sharing at all).

Why an acknowledged record is durable: an append returns only (a) after observing
durable_end >= E, or (b) after an fdatasync of its own that began after its record was
written. durable_end is raised only to a W read before an fdatasync that then succeeded, and
written_end only counts complete records, so every byte below W was written before that
fdatasync began and is covered by it. durable_end is raised (never lowered, except by the
torn-tail repair below) under the append lock, so concurrent raises cannot lose one another.
flush_hint only decides whether to wait or to flush: a stale or torn value costs a flush or a
second look, never a wrong acknowledgement. durable_end is only ever a record boundary, so a
torn tail below it means damage to synced data, not a crash. A failed fdatasync is never
retried: the handle is marked failed and every later append on it raises DurabilityError.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import _fsutil, _locking
from ._format import (
    FILE_HEADER_SIZE,
    MAX_RECORD_PAYLOAD,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RecordType,
    encode_file_header,
    frame_record,
    pack_payload,
    unpack_payload,
)
from ._reader import ScanState, iter_records, read_header
from .errors import CorruptWALError, DurabilityError, TraceClosedError

log = logging.getLogger("walspan")

SHM_SIZE = 128
_SHM_MAGIC = b"WSPSHM01"
_STATE = struct.Struct("<QQQQ")  # salt, written_end, last_seq, terminal_off
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_STATE_CRC = struct.Struct("<QQQQI")
_MAGIC_STATE_CRC = struct.Struct("<8sQQQQI")
_DURABLE = struct.Struct("<QI")
_TERMINAL = int(RecordType.TERMINAL)
_ATTACH, _DETACH = int(RecordType.WRITER_ATTACH), int(RecordType.WRITER_DETACH)
_WRITER_TYPES = frozenset({_ATTACH, _DETACH, int(RecordType.WRITER_LOST)})
_SLOW_FSYNC_NS = 1_000_000_000

DURABLE = "durable"
PROCESS = "process"
DURABILITY_LEVELS = (DURABLE, PROCESS)


def internal_dir(store_dir: str) -> str:
    return os.path.join(store_dir, ".walspan")


def durable_end_of(store_dir: str, stem: str, salt: int) -> int:
    """durable_end as the shared state of that WAL records it, read without mapping it; 0 when
    there is no trustworthy value (no state file, another WAL's state, a read racing a store)."""
    try:
        fd = _fsutil.open_file(os.path.join(internal_dir(store_dir), stem + ".shm"), os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        snap = os.pread(fd, 12, 48)
    finally:
        os.close(fd)
    if len(snap) < 12:
        return 0
    value, crc = _DURABLE.unpack(snap)
    return int(value) if crc == zlib.crc32(snap[:8], zlib.crc32(_U64.pack(salt))) else 0


def create_wal(wal_path: str, salt: int, first_records: bytes) -> bool:
    """Create a WAL holding its header and first records, atomically; False if it exists."""
    return _fsutil.create_exclusive(wal_path, encode_file_header(salt) + first_records)


class WalHandle:
    """Open descriptors on one session's WAL, lock file and shared state, for one process.

    Thread-safe. Not fork-safe by itself: the Store abandons it in a forked child (see _hooks).
    """

    _flush_cv: threading.Condition
    _flushing: bool
    _waiting: int

    def __init__(self, store_dir: str, stem: str, durability: str) -> None:
        self.stem = stem
        self.path = os.path.join(store_dir, stem + ".wal")
        self.durable = durability == DURABLE
        self.pid = os.getpid()
        self._mutex = threading.Lock()  # serialises this process's threads before the flock
        self._init_flush_state()
        self._failed: DurabilityError | None = None
        self._closed = False
        self.users = 0  # owned by the Store's descriptor cache (under its lock)
        self.retired = False  # left that cache: close when the last user is done
        self._fds: list[int] = []
        try:
            self.fd = self._open(self.path, os.O_RDWR)
            self.salt = read_header(self.fd, self.path)
            self._salt_crc = zlib.crc32(_U64.pack(self.salt))
            idir = internal_dir(store_dir)
            os.makedirs(idir, mode=_fsutil.DIR_MODE, exist_ok=True)  # e.g. WALs copied without it
            self._lock_fd = self._open(os.path.join(idir, stem + ".lock"), os.O_RDWR | os.O_CREAT)
            self._shm_fd = self._open(os.path.join(idir, stem + ".shm"), os.O_RDWR | os.O_CREAT)
            if os.fstat(self._shm_fd).st_size < SHM_SIZE:
                os.ftruncate(self._shm_fd, SHM_SIZE)  # racing creators extend to the same zeros
            self._shm = mmap.mmap(self._shm_fd, SHM_SIZE)
        except BaseException:
            self._close_fds()
            raise

    def _open(self, path: str, flags: int) -> int:
        fd = _fsutil.open_file(path, flags)
        self._fds.append(fd)
        return fd

    # -- shared state ---------------------------------------------------------------------

    def _load_state(self, size: int) -> tuple[int, int, int] | None:
        """(written_end, last_seq, terminal_off) if the shared state is trustworthy for `size`."""
        snap = self._shm[0:44]  # one copy: magic, the four fields and their crc
        magic, salt, written_end, last_seq, terminal_off, crc = _MAGIC_STATE_CRC.unpack(snap)
        if magic != _SHM_MAGIC or salt != self.salt or crc != zlib.crc32(snap[8:40]):
            return None
        if not FILE_HEADER_SIZE <= written_end <= size:
            return None
        return written_end, last_seq, terminal_off

    def _store_state(self, written_end: int, last_seq: int, terminal_off: int) -> None:
        packed = _STATE.pack(self.salt, written_end, last_seq, terminal_off)
        self._shm[0:44] = _SHM_MAGIC + packed + _U32.pack(zlib.crc32(packed))

    def _durable_end(self) -> int:
        snap = self._shm[48:60]
        value, crc = _DURABLE.unpack(snap)
        if crc != zlib.crc32(snap[:8], self._salt_crc):
            return 0  # never written for this WAL, or a read racing a store: unknown
        return int(value)

    def _set_durable_end(self, value: int) -> None:
        """Under the append lock only."""
        packed = _U64.pack(value)
        self._shm[48:60] = packed + _U32.pack(zlib.crc32(packed, self._salt_crc))

    def _flush_hint(self) -> int:
        return int(_U64.unpack(self._shm[64:72])[0])

    def _complete_end(self, fallback: int) -> int:
        """written_end read without the append lock, or `fallback` if it cannot be trusted."""
        snap = self._shm[8:44]
        salt, written_end, _seq, _term, crc = _STATE_CRC.unpack(snap)
        if salt != self.salt or crc != zlib.crc32(snap[:32]) or written_end < fallback:
            return fallback
        return int(written_end)

    # -- the locked section ---------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[LockedWal]:
        """Hold the append lock; yield a view with the current end of the log and `append`."""
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise ValueError(f"WAL handle for {self.path} is closed")
        with self._mutex:
            _locking.lock(self._lock_fd)
            try:
                yield LockedWal(self, *self._sync_locked())
            finally:
                _locking.unlock(self._lock_fd)

    def _sync_locked(self) -> tuple[int, int, int]:
        """Under the lock: find the end of the valid log, repairing a torn tail."""
        size = os.fstat(self.fd).st_size
        state = self._load_state(size)
        if state is not None and state[0] == size:
            return state
        if state is None:
            start, start_seq, terminal_off = FILE_HEADER_SIZE, 0, 0
        else:
            start, start_seq, terminal_off = state
        scan = ScanState(self.path)
        for offset, rtype, _seq, _payload in iter_records(
            self.fd, scan, start=start, start_seq=start_seq, salt=self.salt, decode_types=frozenset()
        ):
            if rtype == _TERMINAL and not terminal_off:
                terminal_off = offset
        if scan.end == FILE_HEADER_SIZE:
            # The trace start is written with the file (create_wal): its loss is damage, not a tear.
            raise CorruptWALError(self.path, FILE_HEADER_SIZE, "no trace start record; not repairing")
        if scan.torn_offset is not None:
            self._repair_locked(scan)
        self._store_state(scan.end, scan.last_seq, terminal_off)
        return scan.end, scan.last_seq, terminal_off

    def _repair_locked(self, scan: ScanState) -> None:
        """Truncate a torn tail (a writer died mid-write), durably, under the append lock."""
        torn = scan.torn_offset
        assert torn is not None
        if torn < self._durable_end():
            raise CorruptWALError(
                self.path, torn, f"{scan.torn_reason} inside the region already made durable; not truncating"
            )
        log.warning(
            "walspan: %s: truncating torn tail of %d bytes at offset %d (%s)",
            self.path,
            scan.torn_bytes,
            torn,
            scan.torn_reason,
        )
        self._truncate_locked(torn)

    def _truncate_locked(self, offset: int) -> None:
        """Under the append lock: cut the log at `offset`, durably, before anything is appended
        after it. durable_end may count bytes that are gone now: pull it back (it is written
        under the append lock; a flush that read its target before the cut read at most the
        old written_end <= offset, so it cannot push it past)."""
        os.ftruncate(self.fd, offset)
        self._sync()
        if self._durable_end() > offset:
            self._set_durable_end(offset)

    def cut_at_damage(self) -> tuple[int, int, str] | None:
        """Repair a corrupt WAL because the caller asked (never done implicitly): keep the
        records before the first damage and move every byte from it on, intact, to
        S.wal.broken-<offset> (etcd's Repair, with the copy made durable before the cut).
        Returns (offset, bytes moved, copy path), or None if there is no corruption."""
        with self._mutex:
            _locking.lock(self._lock_fd)
            try:
                scan = ScanState(self.path)
                try:
                    for _rec in iter_records(self.fd, scan, salt=self.salt, decode_types=frozenset()):
                        pass
                    return None
                except CorruptWALError as exc:
                    offset = exc.offset
                if offset <= FILE_HEADER_SIZE:
                    raise CorruptWALError(self.path, offset, "the trace start record is damaged: nothing to keep")
                size = os.fstat(self.fd).st_size
                tail = os.pread(self.fd, size - offset, offset)
                copy = f"{self.path}.broken-{offset}"
                _fsutil.atomic_replace(copy, tail)
                self._truncate_locked(offset)
                self._sync_locked()  # rebuild the shared state for the shortened log
                log.warning("walspan: %s: moved %d damaged bytes at offset %d to %s", self.path, len(tail), offset, copy)
                return offset, len(tail), copy
            finally:
                _locking.unlock(self._lock_fd)

    def prescan_writers(self) -> WriterScan:
        """The writer records of the valid log, read without the append lock (a concurrent
        append only ends the scan early); LockedWal.attached_writers finishes it under the lock."""
        ws = WriterScan({}, 0, FILE_HEADER_SIZE, 0)
        scan = ScanState(self.path)
        for off, rtype, seq, payload in iter_records(self.fd, scan, salt=self.salt, decode_types=_WRITER_TYPES):
            ws.last, ws.seq, ws.end = off, seq, scan.end
            if payload is not None:
                _apply_writer_record(ws.attached, rtype, payload)
        return ws

    def terminal_info(self, terminal_off: int) -> dict[str, Any]:
        header = os.pread(self.fd, RECORD_HEADER_SIZE, terminal_off)
        _crc, length, _t, _f, _s = RECORD_HEADER.unpack_from(header, 0)
        return unpack_payload(os.pread(self.fd, length, terminal_off + RECORD_HEADER_SIZE))  # type: ignore[no-any-return]

    # -- appends --------------------------------------------------------------------------

    def append(self, rtype: int, payload: dict[str, Any], session_id: str) -> tuple[int, int]:
        """Append one record; return (seq, end offset) once it is acknowledged."""
        body = _packed_within_limit(payload)
        # the locked section of `locked()`, spelled out: this is the hot path
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise ValueError(f"WAL handle for {self.path} is closed")
        with self._mutex:
            _locking.lock(self._lock_fd)
            try:
                wal = LockedWal(self, *self._sync_locked())
                if wal.terminal_off:
                    info = self.terminal_info(wal.terminal_off)
                    raise TraceClosedError(session_id, info.get("status", "?"), info.get("message"))
                seq, end = wal.append_packed(rtype, body)
            finally:
                _locking.unlock(self._lock_fd)
        if self.durable and self._durable_end() < end:
            self.wait_durable(end)
        return seq, end

    def wait_durable(self, end: int) -> None:
        """Return once every byte below `end` is durable (group commit: see the module doc)."""
        if self._durable_end() >= end:
            return
        cv = self._flush_cv
        with cv:
            while True:
                if self._failed is not None:
                    raise self._failed
                if self._durable_end() >= end:
                    return
                if not self._flushing:
                    break
                self._waiting += 1
                try:
                    cv.wait()  # this process's flush in flight covers `end`, or we lead the next one
                finally:
                    self._waiting -= 1
            self._flushing = True
        try:
            self._flush_across_processes(end)
        finally:
            with cv:
                self._flushing = False
                if self._waiting:
                    cv.notify_all()

    def _flush_across_processes(self, end: int) -> None:
        """This process's one flush: lead one, wait for one in flight, or flush beside it."""
        if _locking.try_lock(self._shm_fd):
            try:
                if self._durable_end() >= end:
                    return
                target = self._complete_end(end)
                self._shm[64:72] = _U64.pack(target)
                self._sync_and_raise(target)
            finally:
                _locking.unlock(self._shm_fd)
            return
        if self._flush_hint() >= end:
            _locking.lock_shared(self._shm_fd)  # wakes when the leader is done
            _locking.unlock(self._shm_fd)
            if self._durable_end() >= end:
                return
            # the leader failed, or the hint was stale: flush ourselves
        self._sync_and_raise(self._complete_end(end))

    def _sync_and_raise(self, target: int) -> None:
        """fdatasync, then raise durable_end to `target` (a written_end read before it)."""
        self._sync()
        with self._mutex:
            _locking.lock(self._lock_fd)
            try:
                if self._durable_end() < target:
                    self._set_durable_end(target)
            finally:
                _locking.unlock(self._lock_fd)

    def _sync(self) -> None:
        if self._failed is not None:
            raise self._failed
        t0 = time.monotonic_ns()
        try:
            _fsutil.sync_data(self.fd, self.path)
        except OSError as exc:
            # Never retry-and-acknowledge: after a failed fdatasync the kernel may have
            # dropped the dirty pages and a second call can "succeed" without them.
            self._failed = DurabilityError(self.path, "fdatasync", exc)
            raise self._failed from exc
        took = time.monotonic_ns() - t0
        if took > _SLOW_FSYNC_NS:
            log.warning("walspan: slow fdatasync on %s: %.1f ms", self.path, took / 1e6)

    def _init_flush_state(self) -> None:
        self._flush_cv = threading.Condition(threading.Lock())
        self._flushing = False  # a thread of this process is flushing (or waiting on another's)
        self._waiting = 0  # threads waiting on _flush_cv

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._close_fds()

    def _close_fds(self) -> None:
        shm = getattr(self, "_shm", None)
        if shm is not None:
            try:
                shm.close()
            except (BufferError, ValueError):  # pragma: no cover
                pass
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def abandon(self) -> None:
        """In a fork child: forget the descriptors without unlocking anything (the parent
        still owns the flocks through the shared open file descriptions)."""
        self._closed = True
        self._mutex = threading.Lock()
        self._init_flush_state()
        self._close_fds()


class LockedWal:
    """The log while its append lock is held: its valid end, and appends at that end."""

    __slots__ = ("_h", "end", "last_seq", "terminal_off")

    def __init__(self, handle: WalHandle, end: int, last_seq: int, terminal_off: int) -> None:
        self._h = handle
        self.end = end
        self.last_seq = last_seq
        self.terminal_off = terminal_off

    def append_packed(self, rtype: int, body: bytes) -> tuple[int, int]:
        h = self._h
        seq = self.last_seq + 1
        frame = frame_record(h.salt, rtype, seq, body)
        offset = self.end
        try:
            _fsutil.write_all(h.fd, frame, offset, h.path)
        except OSError as exc:
            try:  # leave no partial record behind; if this fails too, the next append repairs
                os.ftruncate(h.fd, offset)
            except OSError:
                pass
            raise DurabilityError(h.path, "write", exc) from exc
        end = offset + len(frame)
        if rtype == _TERMINAL:
            self.terminal_off = offset
        self.end = end
        self.last_seq = seq
        h._store_state(end, seq, self.terminal_off)
        return seq, end

    def append(self, rtype: int, payload: dict[str, Any]) -> tuple[int, int]:
        return self.append_packed(rtype, _packed_within_limit(payload))

    def records(
        self, decode_types: frozenset[int] | None = None, start: int = FILE_HEADER_SIZE, start_seq: int = 0
    ) -> Iterator[tuple[int, int, int, bytes | None]]:
        """Iterate the valid log from `start` (a record boundary) up to `end` (under the lock:
        nothing moves)."""
        h = self._h
        scan = ScanState(h.path)
        for rec in iter_records(h.fd, scan, start=start, start_seq=start_seq, salt=h.salt, decode_types=decode_types):
            if rec[0] >= self.end:
                return
            yield rec
        if scan.torn_offset is not None and scan.torn_offset < self.end:
            # Damage below the end the shared state vouched for (e.g. bit rot in the last record):
            # corruption inside the durable region, else a torn tail that state did not know of.
            h._repair_locked(scan)
            self.end, self.last_seq = scan.end, scan.last_seq
            if self.terminal_off >= scan.end:
                self.terminal_off = 0
            h._store_state(self.end, self.last_seq, self.terminal_off)

    def attached_writers(self, pre: WriterScan | None = None) -> WriterScan:
        """The attach records of writers neither detached nor lost, and the offset of the last
        record (its time is when the log was last written). With `pre`, a scan taken without
        the lock (WalHandle.prescan_writers), only the records appended since are read here, so
        the append lock is held for the tail, not for a scan of the whole log."""
        if pre is not None and FILE_HEADER_SIZE < pre.end <= self.end:
            try:
                return self._scan_writers(WriterScan(dict(pre.attached), pre.last, pre.end, pre.seq))
            except CorruptWALError:
                pass  # the log changed under the lock-free scan (an explicit repair): rescan whole
        return self._scan_writers(WriterScan({}, 0, FILE_HEADER_SIZE, 0))

    def _scan_writers(self, ws: WriterScan) -> WriterScan:
        for off, rtype, seq, payload in self.records(decode_types=_WRITER_TYPES, start=ws.end, start_seq=ws.seq):
            ws.last, ws.seq = off, seq
            if payload is not None:
                _apply_writer_record(ws.attached, rtype, payload)
        ws.end = self.end
        return ws


@dataclass
class WriterScan:
    """Writers still attached after the records up to `end` (seq `seq`); `last`: the offset of
    the last record read."""

    attached: dict[str, dict[str, Any]]
    last: int
    end: int
    seq: int


def _apply_writer_record(attached: dict[str, dict[str, Any]], rtype: int, payload: bytes) -> None:
    p = unpack_payload(payload)
    if rtype == _ATTACH:
        attached[p["writer"]] = p
    elif rtype == _DETACH:
        attached.pop(p["writer"], None)
    else:
        attached.pop(p["lost"], None)


def _packed_within_limit(payload: dict[str, Any]) -> bytes:
    body = pack_payload(payload)
    if len(body) > MAX_RECORD_PAYLOAD:  # a reader would take a longer record for damage
        raise ValueError(f"record of {len(body)} bytes is over the {MAX_RECORD_PAYLOAD}-byte limit; nothing written")
    return body


def check_durability(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"durability must be a str, one of {DURABILITY_LEVELS}, not {type(value).__name__}")
    if value not in DURABILITY_LEVELS:
        raise ValueError(f"durability must be one of {DURABILITY_LEVELS}, not {value!r}")
    return value

