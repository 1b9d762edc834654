"""walspan/_reader.py: the longest valid prefix, and torn tail vs corruption (invariant 2).

Table-driven in the style of leveldb's log_test / etcd's record tests: valid, empty,
truncated, one flipped byte in each header field and in the payload.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from walfiles import build_wal, flip_byte, record_offsets, truncate
from walspan import CorruptWALError, _reader
from walspan._format import FILE_HEADER_SIZE, RECORD_HEADER_SIZE, RecordType

SALT = 0xDEADBEEFCAFEF00D
META = int(RecordType.METADATA)


def scan(path: Path) -> tuple[list[tuple[int, int, int, bytes | None]], _reader.ScanState]:
    fd = os.open(path, os.O_RDONLY)
    try:
        state = _reader.ScanState(str(path))
        return list(_reader.iter_records(fd, state)), state
    finally:
        os.close(fd)


def payload(i: int, size: int = 10) -> bytes:
    return msgpack.packb({"i": i, "pad": "x" * size})


def write(tmp_path: Path, records: list[tuple[int, int, bytes]], name: str = "s.wal") -> Path:
    p = tmp_path / name
    p.write_bytes(build_wal(SALT, records))
    return p


def three(tmp_path: Path) -> Path:
    return write(tmp_path, [(META, 1, payload(1)), (META, 2, payload(2, 30)), (META, 3, payload(3))])


def test_valid_records_read_in_order(tmp_path: Path) -> None:
    """A clean file yields every record with offset, type, seq and payload; no torn tail."""
    p = three(tmp_path)
    recs, st = scan(p)
    assert [(t, s, msgpack.unpackb(b)["i"]) for _o, t, s, b in recs] == [(META, 1, 1), (META, 2, 2), (META, 3, 3)]
    assert recs[0][0] == FILE_HEADER_SIZE
    assert st.torn_offset is None and st.end == p.stat().st_size and st.last_seq == 3 and st.records == 3


def test_empty_log_and_empty_payload(tmp_path: Path) -> None:
    """A header with no records is a clean, empty log; an empty payload is a valid record."""
    p = write(tmp_path, [])
    assert scan(p)[0] == [] and scan(p)[1].torn_offset is None
    p2 = write(tmp_path, [(META, 1, b""), (META, 2, payload(2))], "e.wal")
    recs, st = scan(p2)
    assert [r[3] for r in recs] == [b"", payload(2)] and st.torn_offset is None


@pytest.mark.parametrize("cut", [1, RECORD_HEADER_SIZE - 1, RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 3])
def test_truncated_last_record_is_a_torn_tail(tmp_path: Path, cut: int) -> None:
    """A last record cut short (inside its header or its payload) is a torn tail: the reader
    returns the records before it and reports where the tail starts (invariant 2)."""
    p = three(tmp_path)
    offs = record_offsets(p)
    truncate(p, offs[2][0] + cut)
    recs, st = scan(p)
    assert [r[2] for r in recs] == [1, 2]
    assert st.torn_offset == offs[2][0] and st.end == offs[2][0]
    assert st.torn_bytes == cut


# field name -> byte offset inside a record (header layout: crc 0-3, length 4-7, type 8-9,
# flags 10-11, seq 12-19, payload 20-)
FIELDS = {"crc": 0, "crc-high": 3, "length": 4, "length-high": 7, "type": 8, "flags": 10, "seq": 12, "seq-high": 19, "payload": 20, "payload-last": -1}


def _field_offset(rec: tuple[int, int, int, int], where: int) -> int:
    off, end, _t, _s = rec
    return end - 1 if where == -1 else off + where


@pytest.mark.parametrize("field", list(FIELDS))
def test_flip_in_a_record_before_the_last_is_corruption(tmp_path: Path, field: str) -> None:
    """One flipped byte in any header field or the payload of a record followed by a valid
    record is CorruptWALError naming the file and the damaged record's offset; the reader never
    yields an altered record (invariant 2)."""
    p = three(tmp_path)
    offs = record_offsets(p)
    flip_byte(p, _field_offset(offs[1], FIELDS[field]))
    with pytest.raises(CorruptWALError) as ei:
        scan(p)
    err = ei.value
    assert err.path == str(p) and err.offset == offs[1][0]
    assert str(p) in str(err) and f"offset {offs[1][0]}" in str(err)


@pytest.mark.parametrize("field", list(FIELDS))
def test_flip_in_the_last_record_is_a_torn_tail(tmp_path: Path, field: str) -> None:
    """The same flip in the last record cannot be told from a torn write: the reader returns
    the records before it and marks a torn tail (the writer path decides whether that region
    was already durable)."""
    p = three(tmp_path)
    offs = record_offsets(p)
    flip_byte(p, _field_offset(offs[2], FIELDS[field]))
    recs, st = scan(p)
    assert [r[2] for r in recs] == [1, 2]
    assert st.torn_offset == offs[2][0]


def test_flip_in_first_record_of_two_is_corruption(tmp_path: Path) -> None:
    """Damage to the very first record followed by a valid record is corruption at offset 32."""
    p = three(tmp_path)
    flip_byte(p, FILE_HEADER_SIZE + RECORD_HEADER_SIZE + 2)
    with pytest.raises(CorruptWALError) as ei:
        scan(p)
    assert ei.value.offset == FILE_HEADER_SIZE


@pytest.mark.parametrize("offset", [0, 7, 8, 10, 16, 24])
def test_bad_file_header_is_corruption_at_offset_0(tmp_path: Path, offset: int) -> None:
    """A flipped byte in the magic, version, header length, salt or header crc is
    CorruptWALError at offset 0 with the path in the message."""
    p = three(tmp_path)
    flip_byte(p, offset)
    with pytest.raises(CorruptWALError) as ei:
        scan(p)
    assert ei.value.offset == 0 and ei.value.path == str(p)
    assert str(p) in str(ei.value)


def test_short_file_is_corruption(tmp_path: Path) -> None:
    """A file shorter than its header (including an empty file) is CorruptWALError at 0."""
    for n in (0, 5, 31):
        p = tmp_path / f"short{n}.wal"
        p.write_bytes(build_wal(SALT, [])[:n])
        with pytest.raises(CorruptWALError) as ei:
            scan(p)
        assert ei.value.offset == 0


@pytest.mark.parametrize("seqs", [[1, 3, 4], [1, 2, 2], [2, 3, 4], [1, 2, 1]])
def test_sequence_gap_or_repeat_is_corruption(tmp_path: Path, seqs: list[int]) -> None:
    """Records with valid checksums but a seq that is not last+1 are corruption at the offset
    of the first out-of-order record."""
    p = write(tmp_path, [(META, s, payload(i)) for i, s in enumerate(seqs)])
    offs = []
    pos = FILE_HEADER_SIZE
    for i in range(3):
        offs.append(pos)
        pos += RECORD_HEADER_SIZE + len(payload(i))
    bad = next(i for i, s in enumerate(seqs) if s != (seqs[i - 1] + 1 if i else 1))
    with pytest.raises(CorruptWALError, match="sequence number") as ei:
        scan(p)
    assert ei.value.offset == offs[bad]


def test_unknown_type_below_0x8000_is_refused(tmp_path: Path) -> None:
    """An unknown record type below 0x8000 (a newer format this reader cannot interpret) is
    CorruptWALError, even as the last record."""
    for rtype in (63, 0x7FFF, 0):
        p = write(tmp_path, [(META, 1, payload(1)), (rtype, 2, payload(2))], f"t{rtype}.wal")
        with pytest.raises(CorruptWALError, match="unknown record type"):
            scan(p)


def test_skippable_type_is_yielded_and_scan_goes_on(tmp_path: Path) -> None:
    """A type >= 0x8000 passes the reader (the fold ignores it) and later records still read."""
    p = write(tmp_path, [(META, 1, payload(1)), (0x8000, 2, payload(2)), (0xFFFF, 3, b""), (META, 4, payload(4))])
    recs, st = scan(p)
    assert [(r[1], r[2]) for r in recs] == [(META, 1), (0x8000, 2), (0xFFFF, 3), (META, 4)]
    assert st.torn_offset is None


def test_huge_length_field_is_not_allocated(tmp_path: Path) -> None:
    """A length field over MAX_RECORD_PAYLOAD is damage (torn here, as the last record), and the
    reader never tries to read that many bytes."""
    p = three(tmp_path)
    offs = record_offsets(p)
    with open(p, "r+b") as f:
        f.seek(offs[2][0] + 4)
        f.write(b"\xff\xff\xff\x7f")
    recs, st = scan(p)
    assert len(recs) == 2 and st.torn_offset == offs[2][0] and "exceeds" in st.torn_reason


@pytest.mark.parametrize("fill", [b"\x00", b"\xff", b"garbage!"])
def test_garbage_sectors_after_the_last_record_are_a_torn_tail(tmp_path: Path, fill: bytes) -> None:
    """Whole 512-byte sectors of zeros or garbage after the last record (power loss) are a torn
    tail at the end of the last valid record."""
    p = three(tmp_path)
    size = p.stat().st_size
    with open(p, "ab") as f:
        f.write((fill * 1024)[:1024])
    recs, st = scan(p)
    assert len(recs) == 3 and st.torn_offset == size and st.torn_bytes == 1024


def test_resume_scan_from_known_boundary(tmp_path: Path) -> None:
    """iter_records(start=, start_seq=) resumes at a record boundary and checks seq from there."""
    p = three(tmp_path)
    offs = record_offsets(p)
    fd = os.open(p, os.O_RDONLY)
    try:
        st = _reader.ScanState(str(p))
        recs = list(_reader.iter_records(fd, st, start=offs[1][0], start_seq=1))
        assert [r[2] for r in recs] == [2, 3]
        with pytest.raises(CorruptWALError, match="sequence"):
            list(_reader.iter_records(fd, _reader.ScanState(str(p)), start=offs[1][0], start_seq=5))
    finally:
        os.close(fd)
