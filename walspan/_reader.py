"""WAL reader: yields the records of the longest valid prefix, and tells the three endings apart.

- clean end: the file ends exactly after a valid record;
- torn tail: the bytes after the last valid record contain no valid record (a writer died
  mid-write, or a power loss left a partial or garbage-filled last block). Expected; the
  writer path truncates it under the lock before the next append;
- corruption: a bad header, or damage followed by a valid record. Raised as CorruptWALError
  with the file and byte offset; never skipped, never repaired by dropping data.

The reader never takes a lock and never writes: it reads with pread, so a concurrent append
only ever looks like a torn tail, and a concurrent truncation of a torn tail is harmless.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from ._format import (
    FILE_HEADER_SIZE,
    FIRST_SKIPPABLE_TYPE,
    KNOWN_TYPES,
    MAX_RECORD_PAYLOAD,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    HeaderError,
    decode_file_header,
)
from .errors import CorruptWALError

_CHUNK = 1 << 20
_SEARCH_CHUNK = 8 << 20
_HDR = RECORD_HEADER
_CRC_PART = struct.Struct("<IHHQ")


@dataclass
class ScanState:
    """Where a scan ended. Filled in as the iterator runs; final once it is exhausted."""

    path: str
    salt: int = 0
    end: int = FILE_HEADER_SIZE  # offset just past the last valid record
    last_seq: int = 0
    file_size: int = 0
    torn_offset: int | None = None  # start of a torn tail, if any
    torn_reason: str = ""
    records: int = 0

    @property
    def torn_bytes(self) -> int:
        return 0 if self.torn_offset is None else self.file_size - self.torn_offset


def read_header(fd: int, path: str) -> int:
    """Return the salt of the WAL open on fd, or raise CorruptWALError at offset 0."""
    data = os.pread(fd, FILE_HEADER_SIZE, 0)
    try:
        return decode_file_header(data)
    except HeaderError as exc:
        raise CorruptWALError(path, 0, str(exc)) from None


def iter_records(
    fd: int,
    state: ScanState,
    *,
    start: int = FILE_HEADER_SIZE,
    start_seq: int = 0,
    salt: int | None = None,
    decode_types: frozenset[int] | None = None,
) -> Iterator[tuple[int, int, int, bytes | None]]:
    """Yield (offset, type, seq, payload) for each valid record from `start` on.

    `payload` is the raw msgpack bytes when `decode_types` is None or holds the type, else None
    (skipping payload copies keeps tail scans cheap). `start`/`start_seq` resume a scan at a
    known record boundary. Raises CorruptWALError on corruption; a torn tail ends iteration
    with state.torn_offset set.
    """
    path = state.path
    state.salt = read_header(fd, path) if salt is None else salt
    seed = state.salt & 0xFFFFFFFF
    size = os.fstat(fd).st_size
    state.file_size = size
    state.end = start
    state.last_seq = start_seq
    pos = start  # file offset of buf[0]
    buf = b""
    view = memoryview(buf)
    i = 0  # index into buf
    last_seq = start_seq
    crc32 = zlib.crc32
    unpack_hdr = _HDR.unpack_from
    pack_crc = _CRC_PART.pack
    while True:
        avail = len(buf) - i
        want = RECORD_HEADER_SIZE
        damage = ""
        if avail >= RECORD_HEADER_SIZE:
            crc, length, rtype, flags, seq = unpack_hdr(buf, i)
            want = RECORD_HEADER_SIZE + length
            if length > MAX_RECORD_PAYLOAD:
                damage = f"record length {length} exceeds the limit"
        if not damage and avail < want:
            more = os.pread(fd, max(_CHUNK, want - avail), pos + len(buf))
            if more:
                buf = buf[i:] + more
                view = memoryview(buf)
                pos += i
                i = 0
                continue
            if not avail:
                break  # clean end of file
            damage = (
                "partial record header at end of file"
                if avail < RECORD_HEADER_SIZE
                else f"record of {want} bytes cut short at end of file"
            )
        body_start = i + RECORD_HEADER_SIZE
        if not damage:
            body = view[body_start : body_start + length]  # no copy unless it is yielded
            if crc32(body, crc32(pack_crc(length, rtype, flags, seq), seed)) != crc:
                damage = "checksum mismatch"
        if damage:
            if _torn_or_corrupt(fd, state, pos + i, damage, last_seq):
                buf, pos, i = b"", pos + i, 0  # a concurrent append completed it: read again
                view = memoryview(buf)
                continue
            break
        offset = pos + i
        if seq != last_seq + 1:
            raise CorruptWALError(path, offset, f"sequence number {seq} follows {last_seq}")
        if flags != 0:
            raise CorruptWALError(path, offset, f"record flags {flags:#x} are not supported")
        if rtype not in KNOWN_TYPES and rtype < FIRST_SKIPPABLE_TYPE:
            raise CorruptWALError(path, offset, f"unknown record type {rtype} (written by a newer walspan?)")
        i += want
        last_seq = seq
        state.end = pos + i
        state.last_seq = seq
        state.records += 1
        if decode_types is None or rtype in decode_types:
            yield offset, rtype, seq, bytes(body)
        else:
            yield offset, rtype, seq, None
    state.file_size = max(size, state.end + state.torn_bytes)


def _torn_or_corrupt(fd: int, state: ScanState, offset: int, reason: str, last_seq: int) -> bool:
    """Decide whether bad bytes at `offset` are a torn tail or corruption (see module doc).

    Returns True if the record at `offset` has become valid since it was read: a lock-free
    reader raced an append in progress, and must re-read from `offset` instead of judging.
    """
    found = find_valid_record_after(fd, offset + 1, state.salt, last_seq)
    if found is not None:
        if _valid_at(fd, offset, state.salt, last_seq):
            return True
        raise CorruptWALError(
            state.path, offset, f"{reason}, followed by a valid record (seq {found[1]}) at offset {found[0]}"
        )
    state.file_size = max(state.file_size, os.fstat(fd).st_size)
    state.torn_offset = offset
    state.torn_reason = reason
    return False


def _valid_at(fd: int, offset: int, salt: int, last_seq: int) -> bool:
    found = record_at(fd, offset, salt)
    return found is not None and found[0] == last_seq + 1


def record_at(fd: int, offset: int, salt: int) -> tuple[int, int] | None:
    """(seq, end offset) of the record at `offset` if a whole one with a good checksum is there."""
    head = os.pread(fd, RECORD_HEADER_SIZE, offset)
    if len(head) < RECORD_HEADER_SIZE:
        return None
    crc, length, rtype, flags, seq = _HDR.unpack_from(head, 0)
    if length > MAX_RECORD_PAYLOAD:
        return None
    body = os.pread(fd, length, offset + RECORD_HEADER_SIZE)
    seed = zlib.crc32(_CRC_PART.pack(length, rtype, flags, seq), salt & 0xFFFFFFFF)
    if len(body) != length or zlib.crc32(body, seed) != crc:
        return None
    return seq, offset + RECORD_HEADER_SIZE + length


def find_valid_record_after(fd: int, start: int, salt: int, last_seq: int) -> tuple[int, int] | None:
    """Find a valid record at any offset >= start whose seq is above last_seq; (offset, seq) or None.

    Candidates are found with bytes.find on the 8 bytes (flags=0, then the upper 48 bits of a
    plausible seq) that every record header carries at offset 10, then confirmed by checksum.
    This covers any seq in (last_seq, last_seq + 16 * 65536], far more records than any
    damaged region can hold, at C speed.
    """
    seed = salt & 0xFFFFFFFF
    patterns = []
    base_hi = (last_seq + 1) >> 16
    for hi in range(base_hi, base_hi + 16):
        patterns.append(b"\x00\x00" + struct.pack("<Q", hi << 16)[2:])
    pos = start
    overlap = RECORD_HEADER_SIZE
    while True:
        chunk = os.pread(fd, _SEARCH_CHUNK, pos)
        if len(chunk) < RECORD_HEADER_SIZE:
            return None
        hits: list[int] = []
        for pat in patterns:
            j = chunk.find(pat)
            while j != -1:
                if j >= 10:
                    hits.append(j - 10)
                j = chunk.find(pat, j + 1)
        for h in sorted(hits):
            if h + RECORD_HEADER_SIZE > len(chunk):
                continue
            crc, length, rtype, flags, seq = _HDR.unpack_from(chunk, h)
            if seq <= last_seq or length > MAX_RECORD_PAYLOAD:
                continue
            if rtype not in KNOWN_TYPES and rtype < FIRST_SKIPPABLE_TYPE:
                continue
            body = chunk[h + RECORD_HEADER_SIZE : h + RECORD_HEADER_SIZE + length]
            if len(body) < length:
                body = os.pread(fd, length, pos + h + RECORD_HEADER_SIZE)
                if len(body) < length:
                    continue
            if zlib.crc32(body, zlib.crc32(_CRC_PART.pack(length, rtype, flags, seq), seed)) == crc:
                return pos + h, seq
        if len(chunk) < _SEARCH_CHUNK:
            return None
        pos += len(chunk) - overlap
