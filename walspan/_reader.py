"""WAL reader: yields the records of the longest valid prefix, and tells the three endings apart.

- clean end: the file ends exactly after a valid record;
- torn tail: the bytes after the last valid record hold no valid record, and they lie beyond
  what is known to have been made durable (a writer died mid-write, or a power loss left a
  partial or garbage-filled last block). Expected; a writer truncates it under the append lock
  (keeping the bytes as evidence) before its next append;
- corruption: a bad file header, damage followed by a valid record, or damage below the
  durable mark the caller passes in (`durable_end`). Raised as CorruptWALError with the file
  and byte offset; never skipped, never repaired by dropping data.

How damage at offset p is judged (docs/FORMAT.md, "Reading"): when the record header at p is
intact (marker and header checksum good), its length is trusted, so the search for a later
valid record starts at the end of that record: a frame that a user placed inside the payload
is never looked at. Only when the header itself is damaged does the search start at p + 1,
finding candidate headers by the file's record marker and confirming each by both checksums.
The search reads from there to the first valid record or to the end of the file.

The reader never takes a lock and never writes: it reads with pread, so a concurrent append
only ever looks like a torn tail, and a record that completes while it is being judged is
read again rather than reported.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from ._format import (
    FILE_HEADER_SIZE,
    HEAD_CRC_AT,
    MAX_RECORD_PAYLOAD,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    HeaderError,
    UnsupportedVersionError,
    WalKeys,
    decode_file_header,
    type_is_readable,
    wal_keys,
)
from .errors import CorruptWALError, UnsupportedFormatError

_CHUNK = 1 << 20
_SEARCH_CHUNK = 8 << 20
_HS = RECORD_HEADER_SIZE

# How a damaged record was found, which decides where the search for a later record starts.
_CUT = 0  # the file ends inside the record: nothing can follow it
_HEADER = 1  # the header is not valid: search from the next byte
_BODY = 2  # the header is valid, the payload is not: search from the record's end


@dataclass
class ScanState:
    """Where a scan ended. Filled in as the iterator runs; final once it is exhausted."""

    path: str
    salt: int = 0
    end: int = FILE_HEADER_SIZE  # offset just past the last valid record
    last_seq: int = 0
    last_crc: int = 0  # header checksum of the last valid record (identifies its content)
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
    except UnsupportedVersionError as exc:
        raise UnsupportedFormatError(path, 0, str(exc)) from None
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
    durable_end: int = 0,
) -> Iterator[tuple[int, int, int, bytes | None]]:
    """Yield (offset, type, seq, payload) for each valid record from `start` on.

    `payload` is the raw msgpack bytes when `decode_types` is None or holds the type, else None
    (skipping payload copies keeps tail scans cheap). `start`/`start_seq` resume a scan at a
    known record boundary. `durable_end`: every byte below it is known to have been made
    durable, so damage there is corruption even at the end of the file. Raises CorruptWALError
    on corruption; a torn tail ends iteration with state.torn_offset set.
    """
    path = state.path
    state.salt = read_header(fd, path) if salt is None else salt
    keys = wal_keys(state.salt)
    sync, seed = keys.sync, keys.seed
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
    unpack_hdr = RECORD_HEADER.unpack_from
    while True:
        avail = len(buf) - i
        damage = ""
        kind = _CUT
        extent_end = 0
        if avail < _HS:
            more = os.pread(fd, _CHUNK, pos + len(buf))
            if more:
                buf, pos, i = buf[i:] + more, pos + i, 0
                view = memoryview(buf)
                continue
            if not avail:
                if pos + i < durable_end:  # the file ends inside what was known to be whole
                    raise CorruptWALError(
                        path, pos + i, f"the log ends here, below offset {durable_end} that was known to be whole"
                    )
                break  # clean end of file
            damage = "partial record header at end of file"
        else:
            marker, length, rtype, flags, seq, body_crc, head_crc = unpack_hdr(buf, i)
            if marker != sync:
                damage, kind = "no record marker where a record should start", _HEADER
            elif crc32(view[i:i + HEAD_CRC_AT], seed) != head_crc or length > MAX_RECORD_PAYLOAD:
                damage, kind = "record header checksum mismatch", _HEADER
            else:
                offset = pos + i
                if seq != last_seq + 1:
                    raise CorruptWALError(path, offset, f"sequence number {seq} follows {last_seq}")
                if flags != 0:
                    raise CorruptWALError(path, offset, f"record flags {flags:#x} are not supported")
                if not type_is_readable(rtype):
                    raise CorruptWALError(path, offset, f"unknown record type {rtype} (written by a newer walspan?)")
                want = _HS + length
                if avail < want:
                    more = os.pread(fd, max(_CHUNK, want - avail), pos + len(buf))
                    if more:
                        buf, pos, i = buf[i:] + more, pos + i, 0
                        view = memoryview(buf)
                        continue
                    damage = f"record of {want} bytes cut short at end of file"
                else:
                    body = view[i + _HS : i + want]  # no copy unless it is yielded
                    if crc32(body, seed) != body_crc:
                        damage, kind, extent_end = "payload checksum mismatch", _BODY, offset + want
        if damage:
            if _judge(fd, state, keys, pos + i, kind, damage, last_seq, extent_end, durable_end):
                buf, pos, i = b"", pos + i, 0  # the record completed while we looked: read it again
                view = memoryview(buf)
                continue
            break
        i += want
        last_seq = seq
        state.end = pos + i
        state.last_seq = seq
        state.last_crc = head_crc
        state.records += 1
        if decode_types is None or rtype in decode_types:
            yield offset, rtype, seq, bytes(body)
        else:
            yield offset, rtype, seq, None
    state.file_size = max(size, state.end + state.torn_bytes)


def _judge(
    fd: int,
    state: ScanState,
    keys: WalKeys,
    offset: int,
    kind: int,
    reason: str,
    last_seq: int,
    extent_end: int,
    durable_end: int,
) -> bool:
    """Decide whether bad bytes at `offset` are a torn tail or corruption (see module doc).

    Returns True if the record at `offset` has become valid since it was read: a lock-free
    reader raced an append in progress, and must re-read from `offset` instead of judging.
    """
    found = None
    if kind == _HEADER:
        found = find_valid_record(fd, offset + 1, keys, last_seq)
    elif kind == _BODY:
        found = find_valid_record(fd, extent_end, keys, last_seq)
    if found is not None or offset < durable_end:
        if _valid_at(fd, offset, keys, last_seq):
            return True
        if found is not None:
            detail = f"followed by a valid record (seq {found[1]}) at offset {found[0]}"
        else:
            detail = f"inside the region already made durable (below offset {durable_end})"
        raise CorruptWALError(state.path, offset, f"{reason}, {detail}")
    state.file_size = max(state.file_size, os.fstat(fd).st_size)
    state.torn_offset = offset
    state.torn_reason = reason
    return False


def _valid_at(fd: int, offset: int, keys: WalKeys, last_seq: int) -> bool:
    found = record_at(fd, offset, keys)
    return found is not None and found[0] == last_seq + 1


def _check_header(head: bytes | memoryview, keys: WalKeys) -> tuple[int, int, int, int] | None:
    """(length, type, seq, body_crc) of an intact record header, else None."""
    marker, length, rtype, _flags, seq, body_crc, head_crc = RECORD_HEADER.unpack_from(head, 0)
    if marker != keys.sync or length > MAX_RECORD_PAYLOAD:
        return None
    if zlib.crc32(head[:HEAD_CRC_AT], keys.seed) != head_crc:
        return None
    return length, rtype, seq, body_crc


def _read_record(fd: int, offset: int, keys: WalKeys) -> tuple[int, int, int, bytes] | None:
    head = os.pread(fd, _HS, offset)
    if len(head) < _HS:
        return None
    hdr = _check_header(head, keys)
    if hdr is None:
        return None
    length, _rtype, seq, body_crc = hdr
    body = os.pread(fd, length, offset + _HS)
    if len(body) != length or zlib.crc32(body, keys.seed) != body_crc:
        return None
    return seq, offset + _HS + length, RECORD_HEADER.unpack_from(head, 0)[6], body


def record_at(fd: int, offset: int, keys: WalKeys) -> tuple[int, int, int] | None:
    """(seq, end offset, header checksum) of the record at `offset` if a whole one with good
    checksums is there, else None."""
    rec = _read_record(fd, offset, keys)
    return None if rec is None else rec[:3]


def payload_at(fd: int, offset: int, keys: WalKeys) -> bytes | None:
    """The payload of the whole, valid record at `offset`, else None."""
    rec = _read_record(fd, offset, keys)
    return None if rec is None else rec[3]


def find_valid_record(fd: int, start: int, keys: WalKeys, last_seq: int) -> tuple[int, int] | None:
    """The first valid record at an offset >= start whose seq is above last_seq: (offset, seq),
    or None. Candidates are the offsets holding the file's record marker (found with
    bytes.find, at C speed); each is confirmed by its header and payload checksums. Works for
    any seq and any file size; reads from `start` to the first valid record or the end."""
    sync = keys.sync
    pos = start
    while True:
        chunk = os.pread(fd, _SEARCH_CHUNK, pos)
        if len(chunk) < _HS:
            return None
        j = chunk.find(sync)
        while j != -1 and j + _HS <= len(chunk):
            hdr = _check_header(memoryview(chunk)[j : j + _HS], keys)
            if hdr is not None:
                length, rtype, seq, body_crc = hdr
                if seq > last_seq and type_is_readable(rtype):
                    body = chunk[j + _HS : j + _HS + length]
                    if len(body) < length:
                        body = os.pread(fd, length, pos + j + _HS)
                    if len(body) == length and zlib.crc32(body, keys.seed) == body_crc:
                        return pos + j, seq
            j = chunk.find(sync, j + 1)
        if len(chunk) < _SEARCH_CHUNK:
            return None
        pos += len(chunk) - (_HS - 1)  # a header that straddles the chunk end is seen whole next time
