"""One session's WAL as seen by a writer: locked appends, torn-tail repair, group commit.

Files, for a session whose name stem is S (docs/FORMAT.md, "Files"):

    S.wal                 the log (header + records), append-only
    .walspan/S.lock       flock'ed around every append: the append lock
    .walspan/S.shm        the shared state (walspan/_shm.py), mapped by every process;
                          flock'ed exclusively by the process leading a flush: the flush lock

Under the append lock a writer trusts the shared state only if it is consistent with the log
(same WAL, same kernel run, written_end == the file's size, durable_end <= written_end);
otherwise it rebuilds it by scanning the log, truncating a torn tail (and keeping the torn
bytes as evidence when it cannot prove they were never acknowledged).

Appends within a process. Threads hand their records to one writer: a thread that finds
another thread writing queues its record and waits for the writer's mutex; the next thread to
get it takes the whole queue and writes it with one lock round-trip, one pwrite and one store of
the shared state, and the threads whose records it wrote just pass the mutex on.

Group commit (durable level). After its write, an append needs its record (ending at E) durable:

1. durable mark >= E: it returns at once, no flush of its own.
2. Within a process at most one thread flushes at a time: a thread that finds a flush in flight
   waits for it; if it covers E the thread returns, if not the first thread to wake leads the
   next flush, which covers every record its process's threads wrote meanwhile.
3. Across processes, at most one flush runs at a time, led by the holder of the flush lock (an
   exclusive flock on S.shm, taken without blocking). If the previous leader woke more than one
   waiter, those writers are appending their next records right now: the leader first waits
   half as long as its last fdatasync took (at most 0.2 ms; PostgreSQL's commit_delay with
   commit_siblings), so that its flush covers them rather than the next one. It then reads
   (cut_gen, written_end W), publishes W as flush_hint, runs one fdatasync, records W in the
   flush slot of the shared state (the durable mark, raised without the append lock), bumps
   flush_seq, drops the lock and wakes every waiter (recording how many it woke).
4. A writer who finds the flush lock taken sleeps until flush_seq moves (a futex on that word
   of the shared mapping: every waiter wakes at once), then starts again at 1: the flush that
   ended covered it, or it was written while that flush ran and the first such writer to take
   the flush lock leads the next flush, whose W covers the whole queue (every record written
   while the previous flush ran); the others are covered by it and sleep once more. Each flush
   thus covers every record written before it began, and the fdatasyncs of one WAL run one
   after the other, each for a whole batch, as a database's group commit does. The sleep has
   a timeout (a leader that dies mid-flush wakes nobody; its flock is released by the kernel).
   Where no futex is available, a writer covered by the hint of the flush in flight waits for
   it with a shared flock on S.shm, and any other runs its own fdatasync at once.

Interval level. Appends return after their write; a background thread per process (one for
all its WALs) runs the group commit above for each WAL this process wrote to, at most every
`flush_interval` seconds and only if its writes are not yet under the durable mark. A power
loss therefore loses at most what was acknowledged since the start of the last completed
flush (about one interval plus one fdatasync), always a suffix of the log, never a hole.

Why an acknowledged durable record is durable: an append returns only (a) after observing a
durable mark >= E, or (b) after leading a flush, an fdatasync that began after its record was
written. The durable mark is raised only to a W read before an fdatasync that then succeeded:
durable_end under the append lock, the flush slot by the flush leader; either counts only while
cut_gen is what it was when W was read (no cut since) and no process recorded a failed
fdatasync; written_end only counts complete records, so every byte below W was written before
that fdatasync began and is covered by it. flush_hint and flush_seq only decide whether to wait
or to flush: a stale value costs a flush or a second look, never a wrong acknowledgement. A
failed fdatasync is never retried: it is recorded in the shared state, and every process then
refuses appends to this WAL (DurabilityError) until `repair` re-writes and re-syncs what
followed the last good flush.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import _fsutil, _locking
from ._format import (
    FILE_HEADER_SIZE,
    MAX_RECORD_PAYLOAD,
    RECORD_HEADER_SIZE,
    RecordType,
    encode_file_header,
    frame_record,
    pack_payload,
    unpack_payload,
    wal_keys,
)
from ._reader import ScanState, iter_records, payload_at, read_header
from ._shm import SharedState, State, witness
from .errors import CorruptWALError, DurabilityError, TraceClosedError

log = logging.getLogger("walspan")

_TERMINAL = int(RecordType.TERMINAL)
_ATTACH, _DETACH = int(RecordType.WRITER_ATTACH), int(RecordType.WRITER_DETACH)
_WRITER_TYPES = frozenset({_ATTACH, _DETACH, int(RecordType.WRITER_LOST)})
_NO_PAYLOADS: frozenset[int] = frozenset()
_SLOW_FSYNC_NS = 1_000_000_000
#: How long a flush waiter sleeps at most before it looks again (a leader that died mid-flush
#: wakes nobody); a flush normally ends, and wakes its waiters, in well under a millisecond.
_FLUSH_WAIT_TIMEOUT = 0.05
#: The longest a flush leader waits for the writers the previous flush woke (see _lead).
_MAX_COMMIT_DELAY = 0.0002

DURABLE = "durable"
INTERVAL = "interval"
PROCESS = "process"
DURABILITY_LEVELS = (DURABLE, INTERVAL, PROCESS)
DEFAULT_FLUSH_INTERVAL = 0.1


def internal_dir(store_dir: str) -> str:
    return os.path.join(store_dir, ".walspan")


def create_wal(wal_path: str, salt: int, first_records: bytes) -> bool:
    """Create a WAL holding its header and first records, atomically; False if it exists."""
    return _fsutil.create_exclusive(wal_path, encode_file_header(salt) + first_records)


def keep_evidence(path: str, fd: int, offset: int, label: str) -> str:
    """Copy every byte of the file from `offset` on to a new file `<path>.<label>-<offset>`
    (with a numeric suffix if that exists: evidence is never overwritten), durably."""
    data = (fd, offset, os.fstat(fd).st_size - offset)  # copied in chunks: it may be large
    base = f"{path}.{label}-{offset}"
    n = 0
    while True:
        copy = base if n == 0 else f"{base}.{n}"
        # the existence check only saves writing a copy in vain; create_exclusive decides
        if not os.path.lexists(copy) and _fsutil.create_exclusive(copy, data):
            return copy
        n += 1


def _new_generation() -> int:
    return int.from_bytes(secrets.token_bytes(8), "little")


class WalHandle:
    """Open descriptors on one session's WAL, lock file and shared state, for one process.

    Thread-safe. Not fork-safe by itself: the Store abandons it in a forked child (see _hooks).
    """

    _flush_cv: threading.Condition
    _flushing: bool
    _waiting: int
    _queue_lock: threading.Lock
    _queue: list[_Pending]

    def __init__(self, store_dir: str, stem: str, durability: str, flush_interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        self.stem = stem
        self.path = os.path.join(store_dir, stem + ".wal")
        self.durability = durability
        self.durable = durability == DURABLE
        self.interval = durability == INTERVAL
        self.flush_interval = flush_interval
        self.pid = os.getpid()
        self._mutex = threading.Lock()  # serialises this process's threads before the flock
        self._init_flush_state()
        self._failed: DurabilityError | None = None
        self._closed = False
        self._last_sync_ns = 0  # how long this process's last fdatasync of the WAL took
        self.written_hi = 0  # end of the last record this process wrote (the interval flusher's target)
        self.users = 0  # owned by the Store's descriptor cache (under its lock)
        self.retired = False  # left that cache: close when the last user is done
        self._fds: list[int] = []
        self._shm: SharedState | None = None
        try:
            self.fd = self._open(self.path, os.O_RDWR)
            st = os.fstat(self.fd)
            self._identity = (st.st_dev, st.st_ino)
            self.salt = read_header(self.fd, self.path)
            self.keys = wal_keys(self.salt)
            idir = internal_dir(store_dir)
            os.makedirs(idir, mode=_fsutil.DIR_MODE, exist_ok=True)  # e.g. WALs copied without it
            self._lock_fd = self._open(os.path.join(idir, stem + ".lock"), os.O_RDWR | os.O_CREAT)
            self._shm = SharedState(os.path.join(idir, stem + ".shm"), self.salt)
            self._shm_fd = self._shm.fd
        except BaseException:
            self._close_fds()
            raise
        if self.interval:
            _interval_flusher().add(self)

    def _open(self, path: str, flags: int) -> int:
        fd = _fsutil.open_file(path, flags)
        self._fds.append(fd)
        return fd

    @property
    def shm(self) -> SharedState:
        assert self._shm is not None
        return self._shm

    def is_stale(self) -> bool:
        """Whether the session's WAL is no longer the file this handle opened (replaced, set
        aside), or no longer the same log (another header). A damaged header raises
        CorruptWALError, as for every reader."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        if (st.st_dev, st.st_ino) != self._identity:
            return True
        return read_header(self.fd, self.path) != self.salt

    def _durable_end(self) -> int:
        return self.shm.durable_end()

    def witness(self) -> int:
        """How far the log is known to be whole, from the shared state (see _shm.witness)."""
        return witness(self.shm.read(os.fstat(self.fd).st_size))

    # -- the locked section ---------------------------------------------------------------

    @contextmanager
    def locked(self, *, allow_failed: bool = False) -> Iterator[LockedWal]:
        """Hold the append lock; yield a view with the current end of the log and `append`."""
        if self._failed is not None and not allow_failed:
            raise self._failed
        if self._closed:
            raise ValueError(f"WAL handle for {self.path} is closed")
        with self._exclusive():
            _locking.lock(self._lock_fd)
            try:
                yield self._sync_locked(allow_failed)
            finally:
                _locking.unlock(self._lock_fd)

    def _sync_locked(self, allow_failed: bool = False) -> LockedWal:
        """Under the lock: the valid end of the log, from the shared state if it can be trusted,
        else from a scan (which truncates a torn tail)."""
        size = os.lseek(self.fd, 0, os.SEEK_END)  # the size, without building a stat result
        st = self.shm.read(size)
        if st is None or not st.same_boot or st.written_end != size:
            st = self._rebuild_locked(size, st)
        if st.failed and not allow_failed:
            raise self._poisoned()
        return LockedWal(self, st)

    def _rebuild_locked(self, size: int, st: State | None) -> State:
        if st is not None and st.same_boot:  # a writer died after its write, or mid-write
            start, seq, term = st.written_end, st.last_seq, st.terminal_off
            durable, gen, failed = st.durable_end, st.cut_gen, st.failed
        else:  # no state, another WAL's, one the log contradicts, or one from before a reboot
            start, seq, term = FILE_HEADER_SIZE, 0, 0
            durable = st.durable_end if st is not None else 0
            gen, failed = _new_generation(), 0
        scan = ScanState(self.path)
        for offset, rtype, _seq, _payload in iter_records(
            self.fd, scan, start=start, start_seq=seq, salt=self.salt, decode_types=_NO_PAYLOADS,
            durable_end=witness(st),
        ):
            if rtype == _TERMINAL and not term:
                term = offset
        if scan.end == FILE_HEADER_SIZE:
            # The trace start is written with the file (create_wal): its loss is damage, not a tear.
            raise CorruptWALError(self.path, FILE_HEADER_SIZE, "no trace start record; run `walspan repair`")
        if scan.torn_offset is None:
            new = State(scan.end, scan.last_seq, term, min(durable, scan.end), gen, failed, True)
            self.shm.store(*new[:6])
            return new
        torn = scan.torn_offset
        # Within one kernel run, bytes past written_end are a write that never returned: never
        # acknowledged. Otherwise that cannot be proven, so the bytes are kept as evidence.
        evidence = None if (st is not None and st.same_boot) else keep_evidence(self.path, self.fd, torn, "torn")
        log.warning(
            "walspan: %s: truncating torn tail of %d bytes at offset %d (%s)%s",
            self.path, scan.torn_bytes, torn, scan.torn_reason, f"; bytes kept in {evidence}" if evidence else "",
        )
        return self._truncate_locked(torn, scan.last_seq, term, durable, gen, failed)

    def _truncate_locked(self, offset: int, last_seq: int, term: int, durable: int, gen: int, failed: int) -> State:
        """Under the append lock: cut the log at `offset` (a record boundary), durably, before
        anything is appended after it. The shared state is lowered first, and made durable if
        durable_end went down: no later run of the kernel may see a durable_end above the cut log. cut_gen changes,
        so a flush that read its target before the cut cannot raise durable_end over it."""
        new = State(offset, last_seq, term if term < offset else 0, min(durable, offset), gen + 1, failed, True)
        self.shm.store(*new[:6])
        if durable > offset:  # lowered: a stale copy on disk would now be too high
            self.shm.persist()
        _fsutil.truncate(self.fd, offset, self.path)
        try:
            self._sync()
        except DurabilityError:
            self._mark_failed_locked(new)
            raise
        return new

    def _poisoned(self) -> DurabilityError:
        return DurabilityError(
            self.path,
            "fdatasync",
            OSError(
                errno.EIO,
                "an earlier fdatasync of this WAL failed (recorded in its shared state), so its last records "
                "may not be on disk; nothing more is acknowledged until `walspan repair` re-writes and re-syncs them",
            ),
        )

    def _mark_failed_locked(self, st: State) -> None:
        """Under the append lock: record a failed fdatasync where every process sees it."""
        self.shm.store(st.written_end, st.last_seq, st.terminal_off, st.durable_end, st.cut_gen, 1 + st.durable_end)

    def _mark_failed(self) -> None:
        with self._exclusive():
            _locking.lock(self._lock_fd)
            try:
                st = self.shm.read(os.fstat(self.fd).st_size)
                if st is not None:
                    self._mark_failed_locked(st)
            finally:
                _locking.unlock(self._lock_fd)

    def repair(self) -> Repair | None:
        """Get the log out of every state that appends refuse, because the caller asked (never
        done implicitly), keeping every record before the first damage:

        - corruption at offset p: every byte from p on is moved, intact, to S.wal.broken-<p>
          (etcd's Repair, with the copy made durable before the cut), and the log is cut at p;
        - a torn tail at p: the same, to S.wal.torn-<p> (appends would cut it too);
        - a recorded fdatasync failure: the records written since the last good flush are
          re-written from the page cache, checked, and fdatasynced again.
        Returns what was done, or None if the log was sound."""
        with self._exclusive():
            _locking.lock(self._lock_fd)
            try:
                return self._repair_locked()
            finally:
                _locking.unlock(self._lock_fd)

    def _repair_locked(self) -> Repair | None:
        size = os.fstat(self.fd).st_size
        st = self.shm.read(size)
        scan = ScanState(self.path)
        term = 0
        damage: CorruptWALError | None = None
        try:
            for offset, rtype, _seq, _p in iter_records(
                self.fd, scan, salt=self.salt, decode_types=_NO_PAYLOADS, durable_end=witness(st)
            ):
                if rtype == _TERMINAL and not term:
                    term = offset
        except CorruptWALError as exc:
            damage = exc
        durable = st.durable_end if st is not None else 0
        gen = st.cut_gen if st is not None else _new_generation()
        if damage is not None or scan.torn_offset is not None:
            cut = damage.offset if damage is not None else scan.torn_offset
            assert cut is not None
            reason = damage.reason if damage is not None else scan.torn_reason
            if scan.records == 0:  # the trace start itself is damaged: nothing before it to keep
                return _set_aside_locked(self.path, self.fd, reason)
            label = "broken" if damage is not None else "torn"
            copy = keep_evidence(self.path, self.fd, cut, label)
            self._truncate_locked(cut, scan.last_seq, term, durable, gen, 0)
            log.warning("walspan: %s: moved %d bytes at offset %d to %s (%s)", self.path, size - cut, cut, copy, reason)
            return Repair("cut" if damage is not None else "torn_tail", cut, size - cut, copy, reason)
        if st is not None and st.failed:
            start = st.failed - 1
            pos = start
            while pos < scan.end:  # dirty the pages again, a chunk at a time (never the whole log in memory)
                chunk = os.pread(self.fd, min(_fsutil.SYNC_CHUNK, scan.end - pos), pos)
                if not chunk:
                    break
                _fsutil.write_all(self.fd, chunk, pos, self.path)
                pos += len(chunk)
            self._failed = None
            self._sync()
            self.shm.store(scan.end, scan.last_seq, term, scan.end, gen + 1, 0)
            msg = "re-wrote and re-synced the records after a failed fdatasync"
            log.warning("walspan: %s: %s (%d bytes from offset %d)", self.path, msg, pos - start, start)
            return Repair("resynced", start, pos - start, None, msg)
        if st is None or not st.same_boot or st.written_end != size:
            self.shm.store(scan.end, scan.last_seq, term, min(durable, scan.end), _new_generation(), 0)
        return None

    def prescan_writers(self) -> WriterScan:
        """The writer records of the valid log, read without the append lock (a concurrent
        append only ends the scan early); LockedWal.attached_writers finishes it under the lock."""
        ws = WriterScan({}, 0, FILE_HEADER_SIZE, 0)
        scan = ScanState(self.path)
        for off, rtype, seq, payload in iter_records(
            self.fd, scan, salt=self.salt, decode_types=_WRITER_TYPES, durable_end=self.witness()
        ):
            ws.last, ws.seq, ws.end = off, seq, scan.end
            if payload is not None:
                _apply_writer_record(ws.attached, rtype, payload)
        return ws

    def terminal_info(self, terminal_off: int) -> dict[str, Any]:
        body = payload_at(self.fd, terminal_off, self.keys)
        info = unpack_payload(body) if body is not None else None
        return info if isinstance(info, dict) else {}

    # -- appends --------------------------------------------------------------------------

    def append(self, rtype: int, payload: dict[str, Any], session_id: str) -> tuple[int, int]:
        """Append one record; return (seq, end offset) once it is acknowledged."""
        body = _packed_within_limit(payload)
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise ValueError(f"WAL handle for {self.path} is closed")
        mutex = self._mutex
        if not self._queue and mutex.acquire(False):  # no other thread of ours is writing: write now
            try:
                _locking.lock(self._lock_fd)
                try:
                    # _sync_locked and LockedWal.append_packed, spelled out: this is the hot path
                    size = os.lseek(self.fd, 0, os.SEEK_END)
                    st = self.shm.read(size)
                    if st is None or not st.same_boot or st.written_end != size or st.failed or st.terminal_off:
                        wal = self._sync_locked()
                        if wal.terminal_off:
                            info = self.terminal_info(wal.terminal_off)
                            raise TraceClosedError(session_id, info.get("status", "?"), info.get("message"))
                        seq, end = wal.append_packed(rtype, body)
                    else:
                        seq = st.last_seq + 1
                        frame = frame_record(self.keys, rtype, seq, body)
                        try:
                            _fsutil.write_all(self.fd, frame, size, self.path)
                        except OSError as exc:
                            _undo_write(self.fd, size)
                            raise DurabilityError(self.path, "write", exc) from exc
                        end = size + len(frame)
                        self.shm.store(end, seq, end - len(frame) if rtype == _TERMINAL else 0, st.durable_end, st.cut_gen, 0)
                        self.written_hi = end
                finally:
                    _locking.unlock(self._lock_fd)
            finally:
                mutex.release()
        else:
            seq, end = self._append_queued(_Pending(rtype, body), session_id)
        if self.durable and self.shm.durable_end() < end:
            self.wait_durable(end)
        return seq, end

    def _append_queued(self, item: _Pending, session_id: str) -> tuple[int, int]:
        """Another thread of this process is writing: queue the record and wait for the writer's
        mutex. Whoever gets it next writes every record queued by then in one locked section;
        a thread that finds its record already written just passes the mutex on."""
        with self._queue_lock:
            self._queue.append(item)
        self._mutex.acquire()
        try:
            if not item.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    self._write_batch(batch, session_id)
                finally:
                    for it in batch:
                        it.done = True  # read by their threads once they hold the mutex
        finally:
            self._mutex.release()
        if item.error is not None:
            raise item.error
        return item.seq, item.end

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process's writer mutex, for everything but appends."""
        with self._mutex:
            yield

    def _write_batch(self, batch: list[_Pending], session_id: str) -> None:
        """Holding the writer mutex: write the records of `batch` (queued by this process's
        threads) in one locked section: one flock round-trip, one pwrite, one store of the
        shared state. Each record gets its seq and end, or the error that refused it."""
        try:
            _locking.lock(self._lock_fd)
            try:
                wal = self._sync_locked()
                wal.append_batch(batch, session_id)
            finally:
                _locking.unlock(self._lock_fd)
        except BaseException as exc:  # refused before anything was written (or the write failed)
            for it in batch:
                if it.error is None and not it.end:
                    it.error = exc
            if not isinstance(exc, Exception):
                raise

    def wait_durable(self, end: int) -> None:
        """Return once every byte below `end` is durable (group commit: see the module doc)."""
        if self.shm.durable_end() >= end:
            return
        cv = self._flush_cv
        with cv:
            while True:
                if self._failed is not None:
                    raise self._failed
                if self.shm.durable_end() >= end:
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
                self._woke = self._waiting  # threads about to append again (see _lead)
                if self._waiting:
                    cv.notify_all()

    def _flush_across_processes(self, end: int) -> None:
        """This process's one flush: lead one, or sleep until the flush in flight ends and look
        again (module doc, steps 3-5)."""
        shm = self.shm
        if not shm.can_wait:
            self._flush_with_flocks(end)
            return
        flush_fd = self._shm_fd
        while True:
            seq = shm.flush_seq  # before the look: a flush ending after it makes the wait return at once
            if shm.durable_end() >= end:
                return
            if _locking.try_lock(flush_fd):
                try:
                    if shm.durable_end() < end:  # a flush may have ended since the first look
                        self._lead(end)
                finally:
                    _locking.unlock(flush_fd)
                    shm.wake_flush_waiters()
                return
            shm.wait_flush(seq, _FLUSH_WAIT_TIMEOUT)

    def _flush_with_flocks(self, end: int) -> None:
        """Where no futex is available: wait for a flush in flight that covers `end` with a
        shared flock on S.shm; otherwise flush beside it (the kernel merges the two)."""
        shm = self.shm
        if _locking.try_lock(self._shm_fd):
            try:
                if shm.durable_end() < end:
                    self._lead(end)
            finally:
                _locking.unlock(self._shm_fd)
            return
        if shm.flush_hint >= end:
            _locking.lock_shared(self._shm_fd)  # wakes when the leader is done
            _locking.unlock(self._shm_fd)
            if shm.durable_end() >= end:
                return
        self._sync()  # began after our record was written: that alone acknowledges it

    def _lead(self, end: int) -> None:
        """Holding the flush lock: read the target, flush, and raise the durable mark to the target (the flush slot), unless a cut happened or a
        failure was recorded meanwhile (then the slot does not count: see _shm)."""
        shm = self.shm
        if (shm.woken > 1 or self._woke > 1) and self._last_sync_ns:
            # commit_delay: the writers the last flush woke are appending their next records
            # now; waiting half a flush lets this one cover them too instead of the next one.
            time.sleep(min(_MAX_COMMIT_DELAY, self._last_sync_ns / 2e9))
        snap = shm.flush_target()
        if snap is not None and snap[2]:
            raise self._poisoned()  # another process's fdatasync failed: never flush over it
        if snap is not None and snap[1] >= end:
            shm.flush_hint = snap[1]
        try:
            self._sync()
            if snap is not None and snap[1] >= end:
                shm.publish_flushed(snap[0], snap[1])
        except DurabilityError:
            self._mark_failed()
            raise
        finally:
            shm.end_flush()  # after the mark: waiters look again, covered or to lead the next flush
        # else the state was unreadable or stale: our own record is covered, that is all

    def flush_written(self) -> None:
        """Make durable every record this process wrote (the interval flusher, and close)."""
        hi = self.written_hi
        if hi and not self._closed and self._failed is None and self.shm.durable_end() < hi:
            self.wait_durable(hi)

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
        self._last_sync_ns = took
        if took > _SLOW_FSYNC_NS:
            log.warning("walspan: slow fdatasync on %s: %.1f ms", self.path, took / 1e6)

    def _init_flush_state(self) -> None:
        self._flush_cv = threading.Condition(threading.Lock())
        self._flushing = False  # a thread of this process is flushing (or waiting on another's)
        self._waiting = 0  # threads waiting on _flush_cv
        self._woke = 0  # threads the last flush of this process woke
        self._queue_lock = threading.Lock()
        self._queue = []  # records handed over by this process's threads, not yet written

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        if self.interval and not self._closed:
            _interval_flusher().remove(self)  # waits for a flush of ours in progress
            try:
                self.flush_written()  # a clean close leaves nothing for a power loss to take
            except DurabilityError as exc:
                log.warning("walspan: %s: final flush failed: %s", self.path, exc)
        with self._exclusive():
            if self._closed:
                return
            self._closed = True
            self._close_fds()

    def _close_fds(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
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


def set_aside_whole_wal(store_dir: str, stem: str, reason: str) -> Repair:
    """Move a WAL whose file header is damaged (no handle can open it) aside, under its append
    lock: nothing in it can be trusted, so every byte is kept and the session starts afresh."""
    path = os.path.join(store_dir, stem + ".wal")
    idir = internal_dir(store_dir)
    os.makedirs(idir, mode=_fsutil.DIR_MODE, exist_ok=True)
    lock_fd = _fsutil.open_file(os.path.join(idir, stem + ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        _locking.lock(lock_fd)
        fd = _fsutil.open_file(path, os.O_RDONLY)
        try:
            return _set_aside_locked(path, fd, reason)
        finally:
            os.close(fd)
    finally:
        try:
            _locking.unlock(lock_fd)
        finally:
            os.close(lock_fd)


def _set_aside_locked(path: str, fd: int, reason: str) -> Repair:
    size = os.fstat(fd).st_size
    copy = keep_evidence(path, fd, 0, "broken")
    os.unlink(path)
    _fsutil.fsync_dir(os.path.dirname(path) or ".")
    log.warning("walspan: %s: nothing before the damage to keep (%s); moved the whole file to %s", path, reason, copy)
    return Repair("set_aside", 0, size, copy, reason)


@dataclass
class Repair:
    """What a repair did: `action` is "cut" (corruption), "torn_tail", "set_aside" (the whole
    file) or "resynced" (after a failed fdatasync); `evidence`: where the moved bytes are."""

    action: str
    offset: int
    moved: int
    evidence: str | None
    reason: str


class LockedWal:
    """The log while its append lock is held: its valid end, and appends at that end."""

    __slots__ = ("_h", "end", "last_seq", "terminal_off", "_durable", "_gen", "_failed")

    def __init__(self, handle: WalHandle, st: State) -> None:
        self._h = handle
        self.end = st.written_end
        self.last_seq = st.last_seq
        self.terminal_off = st.terminal_off
        self._durable = st.durable_end
        self._gen = st.cut_gen
        self._failed = st.failed

    def append_packed(self, rtype: int, body: bytes) -> tuple[int, int]:
        h = self._h
        seq = self.last_seq + 1
        frame = frame_record(h.keys, rtype, seq, body)
        offset = self.end
        try:
            _fsutil.write_all(h.fd, frame, offset, h.path)
        except OSError as exc:
            _undo_write(h.fd, offset)
            raise DurabilityError(h.path, "write", exc) from exc
        end = offset + len(frame)
        if rtype == _TERMINAL:
            self.terminal_off = offset
        self.end = end
        self.last_seq = seq
        h.shm.store(end, seq, self.terminal_off, self._durable, self._gen, self._failed)
        h.written_hi = end
        return seq, end

    def append(self, rtype: int, payload: dict[str, Any]) -> tuple[int, int]:
        return self.append_packed(rtype, _packed_within_limit(payload))

    def append_batch(self, batch: list[_Pending], session_id: str) -> None:
        """Append the records of `batch` in order with one pwrite and one store of the shared
        state; each gets its seq and end. First terminal record wins: a record after a TERMINAL
        (already in the log, or earlier in the batch) is refused with TraceClosedError."""
        h = self._h
        keys = h.keys
        offset = self.end
        seq = self.last_seq
        term = self.terminal_off
        frames = []
        end = offset
        written = []
        for it in batch:
            if term:
                info = h.terminal_info(term) if term < offset else _terminal_payload(batch, term, offset)
                it.error = TraceClosedError(session_id, info.get("status", "?"), info.get("message"))
                continue
            seq += 1
            frame = frame_record(keys, it.rtype, seq, it.body)
            if it.rtype == _TERMINAL:
                term = end
            it.seq = seq
            end += len(frame)
            it.end = end
            frames.append(frame)
            written.append(it)
        if not frames:
            return
        try:
            _fsutil.write_all(h.fd, frames[0] if len(frames) == 1 else b"".join(frames), offset, h.path)
        except OSError as exc:
            for it in written:
                it.seq = it.end = 0
            _undo_write(h.fd, offset)
            raise DurabilityError(h.path, "write", exc) from exc
        self.end, self.last_seq, self.terminal_off = end, seq, term
        h.shm.store(end, seq, term, self._durable, self._gen, self._failed)
        h.written_hi = end

    def records(
        self, decode_types: frozenset[int] | None = None, start: int = FILE_HEADER_SIZE, start_seq: int = 0
    ) -> Iterator[tuple[int, int, int, bytes | None]]:
        """Iterate the valid log from `start` (a record boundary) up to `end`. Under the lock
        nothing moves, and every byte below `end` was vouched for: damage there is corruption."""
        h = self._h
        scan = ScanState(h.path)
        for rec in iter_records(
            h.fd, scan, start=start, start_seq=start_seq, salt=h.salt, decode_types=decode_types, durable_end=self.end
        ):
            if rec[0] >= self.end:
                return
            yield rec

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


def _undo_write(fd: int, offset: int) -> None:
    """After a failed write: leave no partial record behind (if this fails too, the next append
    finds the torn bytes and cuts them)."""
    try:
        os.ftruncate(fd, offset)
    except OSError:
        pass


class _Pending:
    """A record handed to this process's writer: its type and payload, then its seq and end
    once written, or the error that refused it; `done` once its batch is over."""

    __slots__ = ("rtype", "body", "seq", "end", "error", "done")

    def __init__(self, rtype: int, body: bytes) -> None:
        self.rtype = rtype
        self.body = body
        self.seq = 0
        self.end = 0
        self.error: BaseException | None = None
        self.done = False


def _terminal_payload(batch: list[_Pending], term: int, offset: int) -> dict[str, Any]:
    """The payload of the TERMINAL record written at `term` by this batch (which starts at `offset`)."""
    for it in batch:
        if it.rtype == _TERMINAL and it.end and it.end - RECORD_HEADER_SIZE - len(it.body) == term:
            info = unpack_payload(it.body)
            return info if isinstance(info, dict) else {}
    return {}  # pragma: no cover - the batch wrote it


class _IntervalFlusher:
    """The interval level's background flusher: one daemon thread per process for every WAL
    it writes to in that level. Each WAL is looked at every `flush_interval` seconds and
    flushed (group commit) if what this process wrote is not yet under the durable mark."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._due: dict[WalHandle, float] = {}
        self._busy: WalHandle | None = None
        self._thread: threading.Thread | None = None

    def add(self, h: WalHandle) -> None:
        with self._cv:
            self._due[h] = time.monotonic() + h.flush_interval
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="walspan-flusher", daemon=True)
                self._thread.start()
            self._cv.notify()

    def remove(self, h: WalHandle) -> None:
        """Stop flushing `h`; returns once no flush of it is in progress."""
        with self._cv:
            self._due.pop(h, None)
            while self._busy is h and threading.current_thread() is not self._thread:
                self._cv.wait()

    def _run(self) -> None:
        cv = self._cv
        while True:
            with cv:
                while True:
                    now = time.monotonic()
                    due = [h for h, t in self._due.items() if t <= now]
                    if due:
                        break
                    cv.wait(min(self._due.values()) - now if self._due else None)
                for h in due:
                    self._due[h] = now + h.flush_interval
            for h in due:
                with cv:
                    if h not in self._due:
                        continue  # removed meanwhile
                    self._busy = h
                try:
                    h.flush_written()
                except Exception as exc:  # recorded on the handle: its next append raises it
                    log.warning("walspan: %s: background flush failed: %s", h.path, exc)
                finally:
                    with cv:
                        self._busy = None
                        cv.notify_all()


_flusher: _IntervalFlusher | None = None
_flusher_lock = threading.Lock()


def _interval_flusher() -> _IntervalFlusher:
    """This process's flusher, started on first use."""
    global _flusher
    with _flusher_lock:
        if _flusher is None:
            _flusher = _IntervalFlusher()
        return _flusher


def _forget_flusher_after_fork() -> None:
    """In a fork child: threads do not survive fork, and the parent's handles are abandoned;
    the child starts its own flusher when it opens a WAL in the interval level."""
    global _flusher, _flusher_lock
    _flusher = None
    _flusher_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_flusher_after_fork)


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


def check_flush_interval(value: object) -> float:
    """The interval level's flush period in seconds: a number, 0.001 <= value <= 60."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"flush_interval must be a number of seconds, not {type(value).__name__}")
    if not 0.001 <= value <= 60:
        raise ValueError(f"flush_interval must be between 0.001 and 60 seconds, not {value!r}")
    return float(value)


def check_durability(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"durability must be a str, one of {DURABILITY_LEVELS}, not {type(value).__name__}")
    if value not in DURABILITY_LEVELS:
        raise ValueError(f"durability must be one of {DURABILITY_LEVELS}, not {value!r}")
    return value

