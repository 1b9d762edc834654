"""The byte layout of walspan/_format.py (docs/FORMAT.md): file header and physical records."""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest

from walspan import _format
from walspan._format import (
    FILE_HEADER_SIZE,
    FIRST_SKIPPABLE_TYPE,
    MAGIC,
    RECORD_HEADER_SIZE,
    HeaderError,
    RecordType,
    decode_file_header,
    encode_file_header,
    encode_record,
    unpack_payload,
)

SALT = 0x1122334455667788


def test_file_header_layout() -> None:
    """The 32-byte header is magic, version, header length, flags, salt, crc32, reserved (LE)."""
    h = encode_file_header(SALT)
    assert len(h) == FILE_HEADER_SIZE == 32
    assert h[:8] == MAGIC == b"\x89WALSPN\n"
    version, hdr_len, flags, salt = struct.unpack_from("<HHIQ", h, 8)
    assert (version, hdr_len, flags, salt) == (_format.FORMAT_VERSION, 32, 0, SALT)
    crc, reserved = struct.unpack_from("<II", h, 24)
    assert crc == zlib.crc32(h[:24]) and reserved == 0
    assert decode_file_header(h) == SALT


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda h: h[:31], "32"),  # short
        (lambda h: b"X" + h[1:], "magic"),
        (lambda h: h[:8] + struct.pack("<H", 3) + h[10:24] + struct.pack("<I", zlib.crc32(h[:8] + struct.pack("<H", 3) + h[10:24])) + h[28:], "version 3"),
        (lambda h: h[:8] + struct.pack("<H", 1) + h[10:24] + struct.pack("<I", zlib.crc32(h[:8] + struct.pack("<H", 1) + h[10:24])) + h[28:], "version 1 .walspan 0.1."),
        (lambda h: h[:16] + bytes([h[16] ^ 1]) + h[17:], "checksum"),
        (lambda h: h[:24] + bytes([h[24] ^ 1]) + h[25:], "checksum"),
    ],
    ids=["short", "bad-magic", "bad-version", "v1", "salt-flip", "crc-flip"],
)
def test_bad_file_header_refused(damage, reason: str) -> None:
    """A short header, bad magic, unsupported version or header checksum mismatch is a HeaderError
    saying what is wrong (the reader turns it into CorruptWALError at offset 0)."""
    with pytest.raises(HeaderError, match=reason):
        decode_file_header(damage(encode_file_header(SALT)))


def test_record_layout_and_checksum() -> None:
    """A record is marker, length u32, type u16, flags u16, seq u64, body_crc u32 (crc32 of the
    payload seeded with the file's key), head_crc u32 (crc32 of the 24 bytes before it, same
    seed), then the payload (invariant 2: length + checksum). Marker and seed come from the salt
    through a one-way hash: neither is the salt, nor a part of it."""
    payload = msgpack.packb({"a": 1})
    rec = encode_record(SALT, RecordType.SPAN_START, 7, payload)
    assert len(rec) == RECORD_HEADER_SIZE + len(payload) == 28 + len(payload)
    marker, length, rtype, flags, seq, body_crc, head_crc = struct.unpack_from("<4sIHHQII", rec, 0)
    keys = _format.wal_keys(SALT)
    assert (marker, length, rtype, flags, seq) == (keys.sync, len(payload), 5, 0, 7)
    assert body_crc == zlib.crc32(payload, keys.seed)
    assert head_crc == zlib.crc32(rec[:24], keys.seed)
    assert rec[28:] == payload
    salt_bytes = SALT.to_bytes(8, "little")
    assert keys.sync not in salt_bytes and keys.seed.to_bytes(4, "little") not in salt_bytes
    assert keys.wal_id != f"{SALT:016x}" and len(keys.wal_id) == 16
    other = _format.wal_keys(SALT ^ 1)
    assert other.sync != keys.sync and other.seed != keys.seed and other.wal_id != keys.wal_id


def test_empty_payload_record() -> None:
    """An empty payload is a valid 28-byte record."""
    rec = encode_record(SALT, RecordType.METADATA, 1, b"")
    assert len(rec) == RECORD_HEADER_SIZE
    assert struct.unpack_from("<I", rec, 4)[0] == 0


def test_oversized_payload_refused_by_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload over MAX_RECORD_PAYLOAD is refused at encoding time."""
    monkeypatch.setattr(_format, "MAX_RECORD_PAYLOAD", 10)
    with pytest.raises(ValueError, match="limit"):
        encode_record(SALT, RecordType.METADATA, 1, b"x" * 11)


def test_record_type_numbers_are_stable() -> None:
    """Record type numbers are part of the on-disk format: they never change."""
    assert {t.name: int(t) for t in RecordType} == {
        "TRACE_START": 1,
        "WRITER_ATTACH": 2,
        "WRITER_DETACH": 3,
        "WRITER_LOST": 4,
        "SPAN_START": 5,
        "SPAN_ATTRIBUTES": 6,
        "SPAN_EVENT": 7,
        "SPAN_END": 8,
        "METADATA": 9,
        "TERMINAL": 10,
    }
    assert FIRST_SKIPPABLE_TYPE == 0x8000


def test_unpack_payload_limits_allocation() -> None:
    """A crafted payload announcing a huge array/string/map is refused, not allocated."""
    huge_array = b"\xdd\xff\xff\xff\xff"  # array32 with 4 billion items, 5 bytes long
    huge_str = b"\xdb\xff\xff\xff\xff"
    huge_map = b"\xdf\xff\xff\xff\xff"
    for data in (huge_array, huge_str, huge_map):
        with pytest.raises(ValueError):
            unpack_payload(data)


def test_pack_unpack_round_trip() -> None:
    """pack_payload/unpack_payload round-trip the value types walspan accepts."""
    value = {"s": "é", "i": -(1 << 63), "u": (1 << 64) - 1, "f": 1.5, "n": None, "l": [1, [2]], "d": {"k": True}}
    assert unpack_payload(_format.pack_payload(value)) == value
