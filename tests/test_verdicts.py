"""One verdict about damage, at the sizes users have (issue: a flipped bit in a 12 KB WAL once
read as a torn tail and was cut away).

Property-based over synthetic WALs built byte by byte: 1 to thousands of records (and a few
files of tens of MiB, beyond the reader's 1 MiB read chunk and 8 MiB search chunk), payloads
from 0 bytes to several MiB, sequence numbers starting anywhere (across 2^16, 2^32 and 2^48:
the reader is resumed at a record boundary with that seq, as compaction resumes it), and every
kind of damage: a flipped bit anywhere, a zeroed or garbage 512-byte sector, a cut at any
offset, and a valid-looking frame that a user put inside a payload. For each, the reader's
verdict is the one docs/FORMAT.md ("Reading") defines:

- damage followed by any intact record: CorruptWALError at the start of the damaged record;
- damage with nothing intact after it: a torn tail there, the records before it returned whole;
- the same damage below what is known to be whole (`durable_end`): CorruptWALError;
- bytes inside a payload never change a verdict.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walspan import CorruptWALError
from walspan._format import FILE_HEADER_SIZE, RECORD_HEADER_SIZE, RecordType, encode_file_header, encode_record
from walspan._reader import ScanState, iter_records

SECTOR = 512
META = int(RecordType.METADATA)
BASES = [0, 2**16 - 5, 2**32 - 5, 2**48 + 3, 2**64 - 10_000]


@dataclass
class Wal:
    data: bytes
    offsets: list[int]  # start of each record
    ends: list[int]
    base: int  # seq of the first record is base + 1
    salt: int


def build(rng: random.Random, n: int, base: int, big: int = 0) -> Wal:
    """n records with realistic payload sizes (mostly tens to hundreds of bytes, some KiB, and
    `big` of several MiB), seqs base+1 .. base+n."""
    salt = rng.getrandbits(64)
    out = bytearray(encode_file_header(salt))
    offsets, ends = [], []
    big_at = set(rng.sample(range(n), min(big, n)))
    for i in range(n):
        if i in big_at:
            size = rng.randrange(2 << 20, 5 << 20)
        else:
            size = rng.choice([0, rng.randrange(1, 64), rng.randrange(64, 400), rng.randrange(400, 9000)])
        payload = rng.randbytes(size)
        offsets.append(len(out))
        out += encode_record(salt, META, base + 1 + i, payload)
        ends.append(len(out))
    return Wal(bytes(out), offsets, ends, base, salt)


def judge(tmp_path: Path, wal: Wal, data: bytes, durable_end: int = 0) -> tuple[str, int]:
    """("corrupt", offset) or ("prefix", number of records returned) for `data`."""
    p = tmp_path / "w.wal"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        scan = ScanState(str(p))
        n = 0
        for off, _t, seq, _payload in iter_records(
            fd, scan, start=FILE_HEADER_SIZE, start_seq=wal.base, decode_types=frozenset(), durable_end=durable_end
        ):
            assert off == wal.offsets[n] and seq == wal.base + 1 + n
            n += 1
        return "prefix", n
    except CorruptWALError as exc:
        assert exc.path == str(p)
        return "corrupt", exc.offset
    finally:
        os.close(fd)


def record_holding(wal: Wal, offset: int) -> int:
    """Index of the record whose bytes include `offset` (len(offsets) if past the end)."""
    for i, (start, end) in enumerate(zip(wal.offsets, wal.ends)):
        if start <= offset < end:
            return i
    return len(wal.offsets)


def expected(wal: Wal, first: int, last: int, durable_end: int) -> tuple[str, int]:
    """The verdict on damage to bytes first..last (inclusive) of the records region."""
    k = record_holding(wal, first)
    intact_after = any(start > last for start in wal.offsets[k + 1 :])
    if intact_after or wal.offsets[k] < durable_end:
        return "corrupt", wal.offsets[k]
    return "prefix", k


def damage(rng: random.Random, wal: Wal, kind: str) -> tuple[bytes, int, int]:
    """The damaged bytes, and the first and last byte that changed."""
    data = bytearray(wal.data)
    lo = FILE_HEADER_SIZE
    if kind == "bitflip":
        at = rng.randrange(lo, len(data))
        data[at] ^= 1 << rng.randrange(8)
        return bytes(data), at, at
    sector = rng.randrange(lo // SECTOR, (len(data) - 1) // SECTOR + 1) * SECTOR
    start, end = max(sector, lo), min(sector + SECTOR, len(data))
    new = bytes(end - start) if kind == "zero_sector" else rng.randbytes(end - start)
    changed = [i for i in range(start, end) if data[i] != new[i - start]]
    data[start:end] = new
    if not changed:  # the sector already held those bytes: nothing to judge
        return bytes(data), -1, -1
    return bytes(data), changed[0], changed[-1]


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(
    seed=st.integers(0, 2**32),
    n=st.one_of(st.integers(1, 12), st.integers(13, 600), st.integers(600, 4000)),
    base=st.sampled_from(BASES),
    kind=st.sampled_from(["bitflip", "zero_sector", "garbage_sector"]),
    vouched=st.booleans(),
)
def test_damage_anywhere_gets_the_defined_verdict(
    tmp_path: Path, seed: int, n: int, base: int, kind: str, vouched: bool
) -> None:
    """A flipped bit or a zeroed/garbage sector anywhere in a WAL of 1 to 4,000 records (seqs
    across 2^16, 2^32, 2^48): corruption at the damaged record when any intact record follows
    it or when the damage lies below what is known to be whole; a torn tail there otherwise.
    Never a shorter prefix with intact records silently cut."""
    rng = random.Random(seed)
    wal = build(rng, n, base)
    data, first, last = damage(rng, wal, kind)
    if first < 0:
        return
    durable_end = rng.choice([FILE_HEADER_SIZE, *wal.ends]) if vouched else 0  # a record boundary, as always
    assert judge(tmp_path, wal, data, durable_end) == expected(wal, first, last, durable_end)


@SETTINGS
@given(seed=st.integers(0, 2**32), n=st.integers(1, 2000), base=st.sampled_from(BASES), vouched=st.booleans())
def test_cut_anywhere_keeps_exactly_the_whole_records(tmp_path: Path, seed: int, n: int, base: int, vouched: bool) -> None:
    """A cut at any offset is a torn tail at the cut record: every whole record before it is
    returned, nothing else; a cut below what is known to be whole is corruption there."""
    rng = random.Random(seed)
    wal = build(rng, n, base)
    cut = rng.randrange(FILE_HEADER_SIZE, len(wal.data) + 1)
    whole = sum(1 for e in wal.ends if e <= cut)
    durable_end = rng.choice([FILE_HEADER_SIZE, *wal.ends]) if vouched else 0  # a record boundary, as always
    if cut < durable_end:  # the file ends inside what was known whole
        want: tuple[str, int] = ("corrupt", wal.offsets[whole])
    else:
        want = ("prefix", whole)
    assert judge(tmp_path, wal, wal.data[:cut], durable_end) == want


def test_files_beyond_every_chunk_damage_at_both_ends(tmp_path: Path) -> None:
    """WALs of 25-45 MiB (records of 2-5 MiB among thousands of small ones, crossing the 1 MiB
    read chunk and the 8 MiB search chunk many times): a flipped bit in the first record
    after the trace start, in the middle, and in the last record, and a garbage sector just
    before a multi-MiB record, each gets the defined verdict."""
    rng = random.Random(7)
    wal = build(rng, 3000, 2**32 - 1500, big=9)
    assert len(wal.data) > 3 * (8 << 20)
    big = [i for i in range(len(wal.offsets)) if wal.ends[i] - wal.offsets[i] > 2 << 20]
    targets = [wal.offsets[1] + 3, len(wal.data) // 2, wal.offsets[-1] + RECORD_HEADER_SIZE + 1, wal.offsets[big[0]] - 1]
    for at in targets:
        data = bytearray(wal.data)
        data[at] ^= 0x10
        assert judge(tmp_path, wal, bytes(data)) == expected(wal, at, at, 0), at


def forged_frame_wal(rng: random.Random, n: int, base: int) -> tuple[Wal, int]:
    """A WAL whose last record's payload carries, in the middle, a frame that is valid for this
    very file (made with its salt) and has the next sequence number: what a user who knew the
    salt could log as an attribute. Returns the WAL and the offset just after the forged frame."""
    wal = build(rng, n, base)
    forged = encode_record(wal.salt, META, base + n + 1, b"\x81\xa1k\xa1v")
    payload = rng.randbytes(rng.randrange(0, 300)) + forged + rng.randbytes(rng.randrange(1, 300))
    last = encode_record(wal.salt, META, base + n + 1, payload)
    data = wal.data + last
    inner_end = len(wal.data) + RECORD_HEADER_SIZE + payload.index(forged) + len(forged)
    return Wal(data, wal.offsets + [len(wal.data)], wal.ends + [len(data)], base, wal.salt), inner_end


@SETTINGS
@given(seed=st.integers(0, 2**32), n=st.integers(1, 300), base=st.sampled_from(BASES))
def test_a_frame_forged_inside_a_payload_never_steers_the_reader(tmp_path: Path, seed: int, n: int, base: int) -> None:
    """A torn write of a record whose payload holds a valid-looking frame (seq and checksums
    right for this file), cut anywhere after that frame, or with its payload damaged there,
    is a torn tail: the reader trusts the record's checksummed header for where it ends and
    never looks inside the payload. The intact WAL reads whole."""
    rng = random.Random(seed)
    wal, inner_end = forged_frame_wal(rng, n, base)
    assert judge(tmp_path, wal, wal.data) == ("prefix", n + 1)
    cut = rng.randrange(inner_end, len(wal.data))
    assert judge(tmp_path, wal, wal.data[:cut]) == ("prefix", n)
    data = bytearray(wal.data)
    data[rng.randrange(inner_end, len(data))] ^= 0x01
    assert judge(tmp_path, wal, bytes(data)) == ("prefix", n)


def test_forged_frame_behind_a_damaged_header_is_reported_not_trusted(tmp_path: Path) -> None:
    """If the header of the record carrying a forged frame is itself damaged, its extent is
    unknown and the forged frame is found by the search: the verdict is corruption (reported,
    repairable), never a silent acceptance of the forged record as data."""
    wal, _inner_end = forged_frame_wal(random.Random(3), 40, 0)
    data = bytearray(wal.data)
    data[wal.offsets[-1] + 5] ^= 0x01  # the length field of the carrying record
    assert judge(tmp_path, wal, bytes(data)) == ("corrupt", wal.offsets[-1])


@pytest.mark.parametrize("n", [83, 2000])
def test_the_reported_case_a_quarter_into_a_real_sized_wal(tmp_path: Path, n: int) -> None:
    """The case that slipped through before: one bit flipped a quarter of the way into a WAL of
    dozens to thousands of records is corruption at that record, not a torn tail."""
    wal = build(random.Random(n), n, 0)
    at = len(wal.data) // 4
    data = bytearray(wal.data)
    data[at] ^= 0x04
    assert judge(tmp_path, wal, bytes(data)) == ("corrupt", wal.offsets[record_holding(wal, at)])


def test_a_record_found_across_the_search_chunk_boundary_is_confirmed_whole(tmp_path: Path) -> None:
    """The search after a damaged header reads the file in 8 MiB chunks; a later record whose
    header lies in one chunk and whose payload runs into the next is read whole and confirmed
    (the verdict: corruption at the damaged record), not skipped as cut short."""
    from walspan import _reader

    salt = 0xABCDEF
    head = encode_file_header(salt)
    first = encode_record(salt, META, 1, b"\x00" * (_reader._SEARCH_CHUNK - 1000 - RECORD_HEADER_SIZE))
    second = encode_record(salt, META, 2, os.urandom(3 << 20))
    data = bytearray(head + first + second)
    offsets = [len(head), len(head) + len(first)]
    data[offsets[0] + 6] ^= 0x01  # the first record's length field: its header is damaged
    wal = Wal(bytes(data), offsets, [offsets[1], len(data)], 0, salt)
    # the search starts at offsets[0] + 1: the second record's header sits ~1000 bytes before
    # the end of that first chunk, its payload runs 3 MiB past it
    assert offsets[1] + RECORD_HEADER_SIZE < offsets[0] + 1 + _reader._SEARCH_CHUNK < len(data)
    assert judge(tmp_path, wal, bytes(data)) == ("corrupt", offsets[0])


def test_an_older_copy_of_a_record_after_the_damage_is_no_later_record(tmp_path: Path) -> None:
    """Garbage after the last record that happens to hold an intact copy of an earlier record
    (stale data in a block a power loss left behind) has a sequence number at or below the
    last valid one: it proves nothing was written after the damage, so the verdict stays a torn
    tail."""
    wal = build(random.Random(5), 50, 0)
    stale = wal.data[wal.offsets[10] : wal.ends[10]]
    previous = wal.data[wal.offsets[-2] : wal.ends[-2]]  # the same seq as the last valid record
    for copy in (stale, previous):
        data = wal.data[: wal.offsets[-1]] + b"\xee" * 7 + copy
        assert judge(tmp_path, wal, data) == ("prefix", 49)


def test_a_record_completed_while_the_reader_judges_it_is_read_not_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that takes no lock can see a record before its writer has finished it. If, by
    the time the reader searches past it, the record is whole and more records follow (the
    writer finished and went on), the reader reads it again instead of reporting corruption."""
    from walspan import _reader

    wal = build(random.Random(9), 30, 0)
    k = 20
    p = tmp_path / "w.wal"
    p.write_bytes(wal.data[: wal.offsets[k]] + bytes(RECORD_HEADER_SIZE) + wal.data[wal.offsets[k] + RECORD_HEADER_SIZE : wal.ends[k]])
    real = _reader.find_valid_record
    calls = []

    def writer_finishes_first(fd: int, start: int, keys: object, last_seq: int) -> object:
        calls.append(start)
        p.write_bytes(wal.data)  # the header lands, and the records after it
        return real(fd, start, keys, last_seq)  # type: ignore[arg-type]

    monkeypatch.setattr(_reader, "find_valid_record", writer_finishes_first)
    fd = os.open(p, os.O_RDONLY)
    try:
        got = [off for off, *_ in iter_records(fd, ScanState(str(p)), decode_types=frozenset())]
    finally:
        os.close(fd)
    assert calls and got == wal.offsets
