"""walspan/_reader.py: the longest valid prefix, and torn tail vs corruption (invariant 2).

Table-driven in the style of leveldb's log_test / etcd's record tests: valid, empty,
truncated, one flipped byte in each header field and in the payload.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest
from walfiles import build_wal, copy_wal_alone, flip_byte, record_offsets, truncate

import walspan
from walspan import CorruptWALError, _compactor, _fsutil, _reader, _verify
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
    """A length field over MAX_RECORD_PAYLOAD, even with a header checksum that matches it, is
    damage (torn here, as the last record), and the reader never tries to read that many bytes."""
    import struct
    import zlib

    from walspan import _format

    p = three(tmp_path)
    offs = record_offsets(p)
    keys = _format.wal_keys(SALT)
    head = bytearray(p.read_bytes()[offs[2][0] : offs[2][0] + 28])
    struct.pack_into("<I", head, 4, 0x7FFFFFFF)
    struct.pack_into("<I", head, 24, zlib.crc32(bytes(head[:24]), keys.seed))
    with open(p, "r+b") as f:
        f.seek(offs[2][0])
        f.write(head)
    recs, st = scan(p)
    assert len(recs) == 2 and st.torn_offset == offs[2][0] and "header" in st.torn_reason


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


# -- through the public API: torn tails at every offset, bit flips, garbage sectors ------------


SID = "ses/torn:1"


def _real_wal(directory: Path, durability: str = "process") -> Path:
    """A small multi-record WAL written through the public API (spans, attributes, events,
    metadata, a large input), left open (closed, not ended)."""
    s = walspan.Store(directory, durability=durability, install_hooks=False)
    t = s.open(SID, metadata={"title": "torn"})
    with t.span("bash", kind="tool", attributes={"cmd": "ls", "n": [1, 2.5, None]}, input="i" * 700) as sp:
        sp.set_attributes({"exit_code": 0})
        sp.add_event("stdout", {"bytes": 120})
    g = t.start_span("llm", kind="generation", parent=None)
    t.set_metadata(prompt="hello")
    g.end(status="ok", output="o" * 200)
    t.start_span("left-open", kind="tool")
    t.close()
    s.close()
    return Path(s.wal_path(SID))


def _fold_upto(wal: Path, end: int) -> dict:
    fold, _ = _compactor.fold_wal(str(wal), upto=end)
    return fold.to_dict()


def test_torn_tail_at_every_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 2: truncating a real WAL at EVERY byte offset (a crash mid-write) never makes
    load() raise once the first record is complete; it returns exactly the fold of the records
    that are whole (a prefix of the full trace); and open() + a new span then repairs the file
    (torn bytes gone, verify clean) and appends after the surviving prefix.

    Below the end of the first record (the trace start, written atomically with the file, so
    never legitimately torn) the file is corrupt: load() and open() raise CorruptWALError and
    the file is left untouched."""
    wal = _real_wal(tmp_path / "src")
    data = wal.read_bytes()
    recs = record_offsets(wal)
    first_end = recs[0][1]
    full = walspan.Store(tmp_path / "src", install_hooks=False).load(SID)
    full_ids = [s["span_id"] for s in full["spans"]]
    assert len(recs) >= 10 and len(full_ids) == 3
    expected_by_k = {k: _fold_upto(wal, recs[k][0]) for k in range(1, len(recs))}
    expected_by_k[len(recs)] = full
    ends = [r[1] for r in recs]
    d = tmp_path / "cut"  # one directory, reused: a fresh WAL prefix and no shared state each time
    d.mkdir()
    w = d / wal.name
    shm = d / ".walspan" / (wal.name[:-4] + ".shm")
    # Thousands of repairs: their fdatasyncs only cost time here (flushes are tested elsewhere).
    monkeypatch.setattr(_fsutil, "sync_data", lambda fd, path: None)
    monkeypatch.setattr(_fsutil, "fsync_dir", lambda path: None)
    for n in range(len(data) + 1):
        if shm.exists():
            shm.unlink()
        for evidence in d.glob("*.torn-*"):  # kept by the previous round's repair
            evidence.unlink()
        fd = os.open(w, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data[:n], 0)
            os.ftruncate(fd, n)
        finally:
            os.close(fd)
        s = walspan.Store(d, durability="process", install_hooks=False)
        try:
            if n < first_end:
                with pytest.raises(CorruptWALError):
                    s.load(SID)
                with pytest.raises(CorruptWALError):
                    s.open(SID)
                assert w.read_bytes() == data[:n], n
                continue
            k = sum(1 for e in ends if e <= n)  # records wholly inside the prefix
            got = s.load(SID)
            assert got == expected_by_k[k], n
            assert [x["span_id"] for x in got["spans"]] == full_ids[: len(got["spans"])]
            t = s.open(SID)
            t.start_span("after", parent=None).end()
            t.close()
            after = record_offsets(w)
            assert [r[:3] for r in after[:k]] == [r[:3] for r in recs[:k]], n
            assert w.read_bytes()[: ends[k - 1]] == data[: ends[k - 1]]
            names = [x["name"] for x in s.load(SID)["spans"]]
            assert names == [x["name"] for x in got["spans"]] + ["after"], n
            report = _verify.verify_dir(str(d))
            assert report.ok and report.files[0].torn_bytes == 0, (n, report.errors)
        finally:
            s.close()


def test_flip_before_last_record_never_alters_a_span(tmp_path: Path) -> None:
    """Invariant 2: flipping any single byte of any record before the last makes load() raise
    CorruptWALError naming the file: it never returns an altered (or shortened) trace."""
    wal = _real_wal(tmp_path / "src")
    recs = record_offsets(wal)
    pristine = wal.read_bytes()
    s = walspan.Store(tmp_path / "src", install_hooks=False)
    for off in range(recs[-1][0]):
        mask = 0x01 if off % 2 else 0x80
        flip_byte(wal, off, mask)
        try:
            with pytest.raises(CorruptWALError) as ei:
                s.load(SID)
            assert str(wal) in str(ei.value)
        finally:
            flip_byte(wal, off, mask)  # undo
    assert wal.read_bytes() == pristine
    s.close()


def test_flip_in_last_record_is_a_torn_tail_only_where_nothing_vouches_for_it(tmp_path: Path) -> None:
    """A damaged last record of a WAL written with durability="process" (never fdatasync'ed):
    while the shared state of this kernel run vouches that the record was written whole, it is
    corruption for every reader (load, open); in a copy of the WAL alone (nothing vouches for
    it) it is a torn tail for every reader: load() returns the trace without it, and the next
    append truncates it, keeping its bytes as evidence."""
    wal = _real_wal(tmp_path / "src", durability="process")
    recs = record_offsets(wal)
    expected = _fold_upto(wal, recs[-1][0])
    flip_byte(wal, recs[-1][0] + RECORD_HEADER_SIZE + 1)
    s = walspan.Store(tmp_path / "src", durability="process", install_hooks=False)
    with pytest.raises(CorruptWALError) as ei:
        s.load(SID)
    assert ei.value.offset == recs[-1][0]
    with pytest.raises(CorruptWALError) as ei:
        s.open(SID)
    assert ei.value.offset == recs[-1][0]
    s.close()

    copy = copy_wal_alone(wal, tmp_path / "copy")
    damaged = copy.read_bytes()
    c = walspan.Store(tmp_path / "copy", durability="process", install_hooks=False)
    assert c.load(SID) == expected
    t = c.open(SID)
    t.close()
    assert record_offsets(copy)[len(recs) - 1][:3] != recs[-1][:3]  # the damaged record is gone
    evidence = tmp_path / "copy" / f"{copy.name}.torn-{recs[-1][0]}"
    assert evidence.read_bytes() == damaged[recs[-1][0] :]
    assert _verify.verify_dir(str(tmp_path / "copy")).ok
    c.close()


def test_flip_in_durable_last_record_is_corruption_at_append_time(tmp_path: Path) -> None:
    """A damaged last record inside the region already made durable (fdatasync'ed) is not a
    torn write: attaching (the next append) raises CorruptWALError and writes nothing; the
    WAL is never truncated to 'repair' it (invariant 2)."""
    wal = _real_wal(tmp_path / "src", durability="durable")
    recs = record_offsets(wal)
    flip_byte(wal, recs[-1][0] + RECORD_HEADER_SIZE + 1)
    damaged = wal.read_bytes()
    s = walspan.Store(tmp_path / "src", install_hooks=False)
    with pytest.raises(CorruptWALError) as ei:
        s.open(SID)
    assert ei.value.offset == recs[-1][0]
    assert wal.read_bytes() == damaged
    s.close()


def test_log_cut_below_what_the_shared_state_vouched_for_gets_one_verdict(tmp_path: Path) -> None:
    """A WAL cut short below the end its shared state recorded (cut by hand, restored from an
    older copy) contradicts that state, so the state is not trusted (the log is the truth):
    every reader judges the log alone, and they agree. Here the cut falls inside the last
    record: load() and verify see a torn tail, the next append truncates it (keeping the cut
    record's bytes as evidence) and goes on; nothing is stuck."""
    s = walspan.Store(tmp_path, install_hooks=False)
    t = s.open(SID)
    t.start_span("a").end()
    wal = Path(s.wal_path(SID))
    recs = record_offsets(wal)
    truncate(wal, wal.stat().st_size - 3)
    cut = wal.read_bytes()
    fresh = walspan.Store(tmp_path, install_hooks=False)
    doc = fresh.load(SID)
    assert [sp["name"] for sp in doc["spans"]] == ["a"] and doc["spans"][0]["status"] == "open"
    report = _verify.verify_dir(str(tmp_path))
    assert report.ok and "torn tail" in report.files[0].notes[0]
    t.start_span("b").end()
    assert (tmp_path / f"{wal.name}.torn-{recs[-1][0]}").read_bytes() == cut[recs[-1][0] :]
    s.close()
    names = [sp["name"] for sp in fresh.load(SID)["spans"]]
    assert names == ["a", "b"]
    assert _verify.verify_dir(str(tmp_path)).ok


@pytest.mark.parametrize("fill", [b"\x00", b"\xa5", None])
def test_garbage_sectors_at_end_through_the_api(tmp_path: Path, fill: bytes | None) -> None:
    """Whole 512-byte sectors of zeros or garbage after the last record (power loss while the
    file grew) are a torn tail: load() ignores them, the next append truncates them."""
    wal = _real_wal(tmp_path / "src")
    before = wal.read_bytes()
    full = walspan.Store(tmp_path / "src", install_hooks=False).load(SID)
    d = tmp_path / "copy"
    w = copy_wal_alone(wal, d)
    junk = os.urandom(1024) if fill is None else fill * 1024
    with open(w, "ab") as f:
        f.write(junk)
    s = walspan.Store(d, durability="process", install_hooks=False)
    assert s.load(SID) == full
    s.open(SID).close()
    assert w.read_bytes()[: len(before)] == before
    assert _verify.verify_dir(str(d)).ok and _verify.verify_dir(str(d)).files[0].torn_bytes == 0
    s.close()


def test_nonzero_record_flags_refused(tmp_path: Path) -> None:
    """A record whose reserved flags field is not 0 (with checksums that cover it, so not
    damage) is refused as CorruptWALError: this reader cannot know what the flag means."""
    import struct

    from walspan._format import encode_record

    good = build_wal(SALT, [(META, 1, payload(1))])
    rec = encode_record(SALT, META, 2, payload(2), flags=1)
    p = tmp_path / "flags.wal"
    p.write_bytes(good + rec)
    with pytest.raises(CorruptWALError, match="flags") as ei:
        scan(p)
    assert ei.value.offset == len(good)
    assert struct.unpack_from("<H", rec, 10)[0] == 1
