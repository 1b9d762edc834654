"""The shared state of one WAL (`.walspan/S.shm`): a cache of the log that every process maps.

It lets an append skip re-reading the log, lets writers share fdatasyncs (group commit), and
tells readers how much of the log is known to be whole. It is never the truth: every field is
checked against the log before it is used, and the state is rebuilt from the log whenever it
cannot be trusted (docs/FORMAT.md, "Shared state"). Layout, little-endian, 128 bytes::

    0   magic         8s   b"WSPSHM02"
    8   wal_id        u64  the id of the WAL described (else: another WAL's state)
    16  boot          16s  id of the kernel run that wrote it (a reboot may have lost writes)
    32  written_end   u64  offset just past the last complete record
    40  last_seq      u64  its sequence number
    48  terminal_off  u64  offset of the TERMINAL record, or 0
    56  durable_end   u64  every byte below it has been fdatasynced (a record boundary)
    64  cut_gen       u64  changes whenever the log is cut or the state rebuilt
    72  failed        u64  0, or 1 + durable_end when an fdatasync of the WAL failed
    80  crc           u32  crc32 of bytes 8..80
    88  flush_hint    u64  a flush leader's target: a hint, never trusted for durability
    96  flushed_end   u64  the flush slot: a written_end read before an fdatasync that succeeded
    104 flushed_gen   u64  the cut_gen read with it
    112 flushed_crc   u32  crc32 of bytes 96..112
    116 flush_seq     u32  bumped by every flush leader when it is done: the word flush waiters
                           sleep on (a futex on Linux), never trusted for anything else
    120 woken         u32  how many waiters the last flush leader woke (a hint for the next
                           leader's commit delay)

Bytes 0..84 are written together, under the append lock only; a reader copies them in one
slice and checks the crc, so a read racing a store is seen as "unknown", never as a value.
The flush slot (96..116) is written only by the holder of the flush lock, after its fdatasync,
so a flush raises the durable mark without taking the append lock. The durable mark a reader
sees (State.durable_end) is the larger of durable_end and flushed_end, the slot counting only
when its crc matches, its flushed_gen equals cut_gen (no cut or rebuild since its target was
read) and flushed_end <= written_end; anything else leaves durable_end alone, which is always
safe (it is lower).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import struct
import sys
import uuid
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _fsutil
from ._format import FILE_HEADER_SIZE, wal_keys

SHM_SIZE = 128
MAGIC = b"WSPSHM02"
_GROUP = struct.Struct("<8sQ16sQQQQQQ")
_CRC_AT = _GROUP.size  # 80
_GROUP_END = _CRC_AT + 4
_HINT_AT = 88
_SLOT_AT = 96
_SLOT = struct.Struct("<QQ")
_SLOT_END = _SLOT_AT + _SLOT.size + 4  # 116
_SEQ_AT = 116
_WOKEN_AT = 120
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class State(NamedTuple):
    written_end: int
    last_seq: int
    terminal_off: int
    durable_end: int
    cut_gen: int
    failed: int
    same_boot: bool


@functools.lru_cache(maxsize=1)
def boot_id() -> bytes:
    """16 bytes naming this run of the kernel: after a reboot, what the page cache held (and a
    written_end vouched for) may not have reached the disk."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):  # pragma: no cover - not Linux
        import psutil

        return struct.pack("<d", round(psutil.boot_time())) + b"\0" * 8


def shm_path(wal_path: str) -> str:
    directory, name = os.path.split(wal_path)
    return os.path.join(directory, ".walspan", name[: -len(".wal")] + ".shm")


def _flushed(raw: bytes, cut_gen: int, written_end: int) -> int:
    """flushed_end of the flush slot in `raw` if it counts for this cut_gen and written_end, else 0."""
    if len(raw) < _SLOT_END:
        return 0
    flushed_end, flushed_gen = _SLOT.unpack_from(raw, _SLOT_AT)
    if flushed_gen != cut_gen or flushed_end > written_end:
        return 0
    if _U32.unpack_from(raw, _SLOT_END - 4)[0] != zlib.crc32(raw[_SLOT_AT : _SLOT_END - 4]):
        return 0
    return int(flushed_end)


def _slot_intact(raw: bytes) -> bool:
    """Whether the flush slot in `raw` is whole (its crc matches) or was never written."""
    slot = raw[_SLOT_AT : _SLOT_END - 4]
    return _U32.unpack_from(raw, _SLOT_END - 4)[0] == zlib.crc32(slot) or not any(raw[_SLOT_AT:_SLOT_END])


def decode(raw: bytes | mmap.mmap, salt: int, size: int) -> State | None:
    """The state in `raw` (the first 84 bytes of a state file at least; with the flush slot,
    116) if it describes the WAL with this salt and is consistent with a log of `size` bytes,
    else None. durable_end is the durable mark: durable_end or the flush slot's, the larger."""
    if len(raw) < _GROUP_END:
        return None
    magic, s, boot, written_end, last_seq, terminal_off, durable_end, cut_gen, failed = _GROUP.unpack_from(raw, 0)
    if magic != MAGIC or s != _wal_ident(salt) or _U32.unpack_from(raw, _CRC_AT)[0] != zlib.crc32(raw[8:_CRC_AT]):
        return None
    flushed = _flushed(bytes(raw[:_SLOT_END]), cut_gen, written_end)
    if flushed > durable_end:
        durable_end = flushed
    same_boot = boot == boot_id()
    if same_boot:
        if not FILE_HEADER_SIZE <= written_end <= size or durable_end > written_end:
            return None  # the log shrank under the state (restored, cut by hand): rebuild
        if terminal_off and not FILE_HEADER_SIZE <= terminal_off < written_end:
            return None
    elif durable_end > size:
        return None
    return State(written_end, last_seq, terminal_off, durable_end, cut_gen, failed, same_boot)


@functools.lru_cache(maxsize=1024)
def _wal_ident(salt: int) -> int:
    """The WAL's public id as a u64: the state names its WAL without holding a copy of the salt."""
    return int(wal_keys(salt).wal_id, 16)


def witness(state: State | None) -> int:
    """How far the log is known to be whole: damage below it is corruption, never a tear.

    Within one kernel run that is written_end (complete writes sit in the page cache whatever
    happens to a process); across a reboot only durable_end (lowered durably before any cut,
    so a stale value is never too high)."""
    if state is None:
        return 0
    return state.written_end if state.same_boot else state.durable_end


def read_state(wal_path: str, salt: int, size: int) -> State | None:
    """The state of a WAL, read without mapping or locking its file (None if none is usable)."""
    try:
        fd = _fsutil.open_file(shm_path(wal_path), os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        raw = _settled(lambda: os.pread(fd, SHM_SIZE, 0))
    finally:
        os.close(fd)
    return decode(raw, salt, size)


_SETTLE_TRIES = 8


def _settled(read: Callable[[], bytes]) -> bytes:
    """The state's bytes, read until two reads in a row agree (at most a few times): a read
    racing a store or a flush leader's slot write would otherwise see a crc mismatch and take
    the state, or the slot, for unknown, so that a mark another process saw could look lower.
    Unknown stays safe; this only keeps readers from seeing it for a write in progress."""
    a = read()
    for _ in range(_SETTLE_TRIES):
        b = read()
        if a == b:
            return b
        a = b
    return a


def read_witness(wal_path: str, salt: int, size: int) -> int:
    """witness() of a WAL's state file, read without locking it (0 if none)."""
    return witness(read_state(wal_path, salt, size))


def read_durable_end(wal_path: str, salt: int, size: int) -> int:
    """durable_end of a WAL's state file, read without locking it (0 if none, or if an
    fdatasync failure is recorded there)."""
    st = read_state(wal_path, salt, size)
    return 0 if st is None or st.failed else st.durable_end


# Futex numbers of the architectures walspan runs on; elsewhere flush waiters fall back to flocks.
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # not FUTEX_PRIVATE: the word is in a mapping shared by processes


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


@functools.lru_cache(maxsize=1)
def _futex() -> tuple[Any, int] | None:
    """(libc's syscall function, SYS_futex) on Linux where the number is known, else None."""
    nr = _SYS_FUTEX.get(os.uname().machine) if hasattr(os, "uname") and sys.platform.startswith("linux") else None
    if nr is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):  # pragma: no cover
        return None
    fn.restype = ctypes.c_long
    return fn, nr


class SharedState:
    """The mapped state file of one WAL, for one process.

    The last state this process stored or decoded is kept with the bytes it came from: while
    the mapping holds the same bytes (and the log the same size), `read` skips the crc and the
    unpacking. Any change by anyone (a store, a flush, a hint) changes the bytes and so
    forces a full decode."""

    def __init__(self, path: str, salt: int) -> None:
        self.path = path
        self.salt = salt
        self._ident = _wal_ident(salt)
        self._boot = boot_id()
        self._seen: tuple[bytes, int, State | None] = (b"", -1, None)
        fd = _fsutil.open_file(path, os.O_RDWR | os.O_CREAT)
        try:
            _allocate(fd, path)
            self._mm = mmap.mmap(fd, SHM_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        futex = _futex()
        self._seq_word: ctypes.c_uint32 | None = None
        if futex is not None:
            self._seq_word = ctypes.c_uint32.from_buffer(self._mm, _SEQ_AT)
            self._seq_addr = ctypes.addressof(self._seq_word)
            self._futex_call, self._futex_nr = futex

    @property
    def can_wait(self) -> bool:
        """Whether flush waiters can sleep on flush_seq (a futex), rather than on flocks."""
        return self._seq_word is not None

    @property
    def flush_seq(self) -> int:
        return int(_U32.unpack_from(self._mm, _SEQ_AT)[0])

    def end_flush(self) -> None:
        """Bump flush_seq (holder of the flush lock only: it is the word's only writer)."""
        self._mm[_SEQ_AT : _SEQ_AT + 4] = _U32.pack((self.flush_seq + 1) & 0xFFFFFFFF)

    def wake_flush_waiters(self) -> None:
        """Wake every process sleeping in wait_flush (after end_flush and the flush lock's release)."""
        if self._seq_word is not None:
            n = self._futex_call(self._futex_nr, ctypes.c_void_p(self._seq_addr), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)
            self._mm[_WOKEN_AT : _WOKEN_AT + 4] = _U32.pack(max(0, n))

    @property
    def woken(self) -> int:
        """How many waiters the last flush leader woke: writers about to append again (a hint
        for the next leader's wait, never trusted for anything else)."""
        return int(_U32.unpack_from(self._mm, _WOKEN_AT)[0])

    def wait_flush(self, seq: int, timeout: float) -> None:
        """Sleep until flush_seq is no longer `seq` (a flush ended), or `timeout` seconds pass (a
        leader that died mid-flush wakes nobody: the caller looks again). Returns at once if
        flush_seq already moved. Only where can_wait."""
        ts = _Timespec(int(timeout), int((timeout % 1) * 1e9))
        self._futex_call(self._futex_nr, ctypes.c_void_p(self._seq_addr), _FUTEX_WAIT, seq, ctypes.byref(ts), None, 0)

    def read(self, size: int) -> State | None:
        raw = self._mm[0:_SLOT_END]
        seen = self._seen
        if raw == seen[0] and size == seen[1]:
            return seen[2]
        st = decode(raw, self.salt, size)
        self._seen = (raw, size, st)
        return st

    def store(self, written_end: int, last_seq: int, terminal_off: int, durable_end: int, cut_gen: int, failed: int) -> None:
        """Under the append lock only."""
        packed = _GROUP.pack(
            MAGIC, self._ident, self._boot, written_end, last_seq, terminal_off, durable_end, cut_gen, failed
        )
        mm = self._mm
        mm[0:_GROUP_END] = packed + _U32.pack(zlib.crc32(packed[8:]))
        raw = mm[0:_SLOT_END]
        flushed = _flushed(raw, cut_gen, written_end)
        if flushed > durable_end:
            durable_end = flushed
        self._seen = (raw, written_end, State(written_end, last_seq, terminal_off, durable_end, cut_gen, failed, True))

    def durable_end(self) -> int:
        """The durable mark read without the append lock; 0 when unknown (a state of another
        WAL or kernel run, a recorded fdatasync failure, a read racing a write that did not
        settle)."""
        mm = self._mm
        raw = mm[0:_SLOT_END]
        seen = self._seen
        if raw == seen[0]:
            st = seen[2]
            return 0 if st is None or st.failed or not st.same_boot else st.durable_end
        if _U32.unpack_from(raw, _CRC_AT)[0] != zlib.crc32(raw[8:_CRC_AT]) or not _slot_intact(raw):
            raw = _settled(lambda: mm[0:_SLOT_END])  # a store or a slot write in progress
        if _U32.unpack_from(raw, _CRC_AT)[0] != zlib.crc32(raw[8:_CRC_AT]):
            return 0
        magic, s, boot, written_end, _seq, _term, durable_end, cut_gen, failed = _GROUP.unpack_from(raw, 0)
        if magic != MAGIC or s != self._ident or boot != self._boot or failed:
            return 0
        flushed = _flushed(raw, cut_gen, written_end)
        return int(flushed if flushed > durable_end else durable_end)

    def flush_target(self) -> tuple[int, int, int] | None:
        """(cut_gen, written_end, failed) read without the append lock, or None if unknown."""
        raw = self._mm[0:_GROUP_END]
        if _U32.unpack_from(raw, _CRC_AT)[0] != zlib.crc32(raw[8:_CRC_AT]):
            return None
        magic, s, boot, written_end, _seq, _term, _de, cut_gen, failed = _GROUP.unpack_from(raw, 0)
        if magic != MAGIC or s != self._ident or boot != self._boot:
            return None
        return int(cut_gen), int(written_end), int(failed)

    def publish_flushed(self, cut_gen: int, end: int) -> None:
        """Record in the flush slot that every byte below `end` (a written_end read with
        `cut_gen` before an fdatasync that then succeeded) is durable. Holder of the flush lock
        only: it is the slot's only writer, so the slot never goes down within a cut_gen."""
        mm = self._mm
        old_end, old_gen = _SLOT.unpack_from(mm, _SLOT_AT)
        if old_gen == cut_gen and old_end >= end:
            return
        slot = _SLOT.pack(end, cut_gen)
        mm[_SLOT_AT:_SLOT_END] = slot + _U32.pack(zlib.crc32(slot))

    @property
    def flush_hint(self) -> int:
        return int(_U64.unpack_from(self._mm, _HINT_AT)[0])

    @flush_hint.setter
    def flush_hint(self, value: int) -> None:
        self._mm[_HINT_AT : _HINT_AT + 8] = _U64.pack(value)

    def persist(self) -> None:
        """Make the mapped state durable (before a cut, so that no later kernel run can see a
        durable_end above a log that was cut)."""
        self._mm.flush()
        _fsutil.sync_data(self.fd, self.path)

    def close(self) -> None:
        self._seq_word = None  # drop the export of the mapping, or it cannot be closed
        try:
            self._mm.close()
        except (BufferError, ValueError):  # pragma: no cover
            pass
        os.close(self.fd)


def _allocate(fd: int, path: str) -> None:
    """Give the state file real blocks before it is mapped. A file sized with ftruncate is a
    hole: the first store through the mapping would then need a block, and on a full disk the
    kernel can only answer with SIGBUS, killing the process. posix_fallocate never changes
    bytes that exist, so racing openers are safe; SQLite does the same for its -shm file."""
    fallocate = getattr(os, "posix_fallocate", None)
    try:
        _fsutil.faults("allocate", path)
        if fallocate is not None:
            fallocate(fd, 0, SHM_SIZE)
        elif os.fstat(fd).st_size < SHM_SIZE:  # pragma: no cover - no posix_fallocate here
            os.ftruncate(fd, SHM_SIZE)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(exc.errno, f"no space left to allocate the shared state file ({exc.strerror})", path) from exc
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL) and os.fstat(fd).st_size < SHM_SIZE:
            os.ftruncate(fd, SHM_SIZE)  # a file system without fallocate: the old way
            return
        raise
