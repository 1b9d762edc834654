"""WAL framing: the file header and physical records. Framing only, no I/O policy.

The byte layout is specified in docs/FORMAT.md; keep the two in step.

File header (32 bytes, little-endian)::

    0  magic      8 bytes  b"\\x89WALSPN\\n"
    8  version    u16      FORMAT_VERSION
    10 hdr_len    u16      32
    12 flags      u32      0 (reserved)
    16 salt       u64      random per file; never published outside the WAL
    24 hdr_crc    u32      crc32 of bytes 0..24
    28 reserved   u32      0

Record (28-byte header + payload)::

    0  sync       4 bytes  the file's record marker, derived from the salt
    4  length     u32      payload length in bytes
    8  type       u16      record type (RecordType)
    10 flags      u16      0 (reserved)
    12 seq        u64      1 for the first record, +1 for each record after it
    20 body_crc   u32      crc32 of the payload, seeded with the file's key
    24 head_crc   u32      crc32 of bytes 0..24, seeded with the file's key
    28 payload    msgpack map

The header has a checksum of its own so that a reader can trust a record's length (and so
its extent) even when its payload is damaged: bytes inside a payload are then never taken
for a record, whatever the user put there. The marker lets a reader find candidate headers
after damage at C speed (bytes.find) instead of checking every offset.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import struct
import threading
import zlib
from typing import Any, NamedTuple

import msgpack

MAGIC = b"\x89WALSPN\n"
FORMAT_VERSION = 2
FILE_HEADER_SIZE = 32
RECORD_HEADER_SIZE = 28

_FILE_HEADER = struct.Struct("<8sHHIQ")  # magic, version, hdr_len, flags, salt
_FILE_HEADER_TAIL = struct.Struct("<II")  # hdr_crc, reserved
#: sync, length, type, flags, seq, body_crc, head_crc
RECORD_HEADER = struct.Struct("<4sIHHQII")
#: the 24 header bytes that head_crc covers
HEAD_COVERED = struct.Struct("<4sIHHQI")
HEAD_CRC_AT = 24
_U32_LE = struct.Struct("<I")

#: A payload larger than this is refused by writers and treated as damage by readers,
#: so that a crafted or garbled length field can never make a reader allocate more.
MAX_RECORD_PAYLOAD = 64 * 1024 * 1024


class RecordType(enum.IntEnum):
    """Logical record types. 1-63 are defined by the format.

    An unknown type below FIRST_SKIPPABLE_TYPE means the file was written by a newer
    walspan whose records this reader cannot interpret: readers must refuse it. Types
    from FIRST_SKIPPABLE_TYPE up may be skipped by readers that do not know them.
    """

    TRACE_START = 1
    WRITER_ATTACH = 2
    WRITER_DETACH = 3
    WRITER_LOST = 4
    SPAN_START = 5
    SPAN_ATTRIBUTES = 6
    SPAN_EVENT = 7
    SPAN_END = 8
    METADATA = 9
    TERMINAL = 10


FIRST_SKIPPABLE_TYPE = 0x8000
KNOWN_TYPES = frozenset(int(t) for t in RecordType)


def type_is_readable(rtype: int) -> bool:
    return rtype in KNOWN_TYPES or rtype >= FIRST_SKIPPABLE_TYPE


class WalKeys(NamedTuple):
    """What a file's salt determines: the record marker, the checksum seed, and the WAL id.

    The salt itself stays inside the WAL; the id (a one-way hash of it) is what JSON traces
    publish to say which WAL they describe. Without the salt, nobody who can only put bytes
    into payloads can make those bytes look like a record of this file.
    """

    sync: bytes
    seed: int
    wal_id: str


@functools.lru_cache(maxsize=1024)
def wal_keys(salt: int) -> WalKeys:
    raw = salt.to_bytes(8, "little")
    d = hashlib.blake2b(raw, digest_size=8, person=b"walspan-rec-v2").digest()
    wal_id = hashlib.blake2b(raw, digest_size=8, person=b"walspan-walid").hexdigest()
    return WalKeys(d[:4], int.from_bytes(d[4:], "little"), wal_id)


def encode_file_header(salt: int) -> bytes:
    head = _FILE_HEADER.pack(MAGIC, FORMAT_VERSION, FILE_HEADER_SIZE, 0, salt)
    return head + _FILE_HEADER_TAIL.pack(zlib.crc32(head), 0)


class HeaderError(ValueError):
    """The 32-byte file header is not a valid walspan header (reason in the message)."""


class UnsupportedVersionError(HeaderError):
    """A valid header of a format version this walspan does not read."""


def decode_file_header(data: bytes) -> int:
    """Return the salt of a valid header; raise HeaderError saying what is wrong."""
    if len(data) < FILE_HEADER_SIZE:
        raise HeaderError(f"file header is {len(data)} bytes, expected {FILE_HEADER_SIZE}")
    magic, version, hdr_len, _flags, salt = _FILE_HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise HeaderError(f"bad magic {magic!r}: not a walspan WAL")
    crc, reserved = _FILE_HEADER_TAIL.unpack_from(data, _FILE_HEADER.size)
    if zlib.crc32(data[: _FILE_HEADER.size]) != crc:
        raise HeaderError("file header checksum mismatch")
    if reserved != 0:  # outside the crc, so checked here: no byte of the header goes unchecked
        raise HeaderError(f"reserved header bytes are {reserved:#x}, expected 0")
    if version == 1:
        raise UnsupportedVersionError(
            "format version 1 (walspan 0.1) is not read by this walspan, which reads format "
            f"{FORMAT_VERSION}: read it with walspan 0.1 (`walspan show --json`) and re-log it"
        )
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"format version {version} is not supported (this walspan reads {FORMAT_VERSION})")
    if hdr_len != FILE_HEADER_SIZE:
        raise HeaderError(f"header length {hdr_len} is not supported")
    return int(salt)


_packers = threading.local()


def pack_payload(payload: dict[str, Any]) -> bytes:
    # one Packer per thread, reused: msgpack.packb builds a new one per call (~0.6 µs)
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    return packer.pack(payload)  # type: ignore[no-any-return]


def frame_record(keys: WalKeys, rtype: int, seq: int, body: bytes, flags: int = 0) -> bytes:
    """Header + payload of one record (the hot path's encode_record, without the size check:
    the caller checks the size)."""
    seed = keys.seed
    head = HEAD_COVERED.pack(keys.sync, len(body), rtype, flags, seq, zlib.crc32(body, seed))
    return head + _U32_LE.pack(zlib.crc32(head, seed)) + body


def encode_record(salt: int, rtype: int, seq: int, payload_bytes: bytes, flags: int = 0) -> bytes:
    length = len(payload_bytes)
    if length > MAX_RECORD_PAYLOAD:
        raise ValueError(f"record payload is {length} bytes, over the {MAX_RECORD_PAYLOAD}-byte limit")
    return frame_record(wal_keys(salt), rtype, seq, payload_bytes, flags)


def unpack_payload(data: bytes | memoryview) -> Any:
    """Decode a payload with explicit limits: a crafted file cannot force a large allocation."""
    n = len(data)
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n // 2,
        max_ext_len=n,
    )
