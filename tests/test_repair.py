"""Explicit repair of a corrupt WAL (`Store.repair`, `walspan repair`): only when asked, keeping
the valid prefix and moving every damaged byte aside intact (invariant 2: never "repaired" by
dropping data without the caller asking)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import walspan
from walspan._format import FILE_HEADER_SIZE, RECORD_HEADER_SIZE
from walspan._reader import ScanState, iter_records
from walspan._verify import verify_dir
from walspan.cli import main


def record_offsets(wal: Path) -> list[int]:
    fd = os.open(wal, os.O_RDONLY)
    try:
        return [off for off, _t, _s, _p in iter_records(fd, ScanState(str(wal)), decode_types=frozenset())]
    finally:
        os.close(fd)


def damaged_store(tmp_path: Path, spans: int = 12) -> tuple[walspan.Store, Path, int]:
    """A closed trace of `spans` spans whose 6th span-start record has a zeroed payload byte."""
    store = walspan.Store(tmp_path / "d", durability="process", install_hooks=False)
    t = store.open("s")
    for i in range(spans):
        t.start_span(f"span{i}", attributes={"i": i}).end()
    t.close()
    wal = store.wal_path("s")
    offsets = record_offsets(wal)
    bad = offsets[2 + 2 * 5]  # trace start, attach, then (start, end) pairs
    with open(wal, "r+b") as f:
        f.seek(bad + RECORD_HEADER_SIZE + 3)
        byte = f.read(1)
        f.seek(bad + RECORD_HEADER_SIZE + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    return store, wal, bad


def test_repair_keeps_the_prefix_and_moves_the_damaged_rest_aside(tmp_path: Path) -> None:
    """A flipped byte followed by valid records is corruption: load() refuses it. repair() keeps
    exactly the records before the damage, writes every byte from the damage on to
    <wal>.broken-<offset> unchanged, rebuilds the JSON; afterwards verify is clean and the trace
    takes appends again."""
    store, wal, bad = damaged_store(tmp_path)
    before = wal.read_bytes()
    with pytest.raises(walspan.CorruptWALError) as info:
        store.load("s")
    assert info.value.offset == bad
    result = store.repair("s")
    assert result is not None and result.action == "cut"
    assert result.offset == bad and result.moved == len(before) - bad
    copy = Path(f"{wal}.broken-{bad}")
    assert result.evidence == str(copy) and copy.read_bytes() == before[bad:]
    assert wal.read_bytes() == before[:bad]
    doc = store.load("s")
    assert [s["name"] for s in doc["spans"]] == [f"span{i}" for i in range(5)]
    assert store.trace_path("s").read_bytes() and verify_dir(str(tmp_path / "d")).ok
    t = store.open("s")
    t.start_span("after").end()
    t.close()
    assert [s["name"] for s in store.load("s")["spans"]][-1] == "after"


def test_repair_of_a_sound_wal_changes_nothing(tmp_path: Path) -> None:
    """repair() of a sound WAL returns None and leaves every byte as it was."""
    store = walspan.Store(tmp_path / "d", install_hooks=False)
    t = store.open("s")
    t.start_span("x").end()
    t.close()
    before = store.wal_path("s").read_bytes()
    assert store.repair("s") is None
    assert store.wal_path("s").read_bytes() == before
    assert not [n for n in os.listdir(tmp_path / "d") if ".broken-" in n or ".torn-" in n]


def test_repair_truncates_a_torn_tail_keeping_its_bytes(tmp_path: Path) -> None:
    """A torn tail is what appends and recover() truncate; repair() does the same when asked
    (so `repair` answers every state a reader reports), keeping the bytes as evidence."""
    store = walspan.Store(tmp_path / "d", install_hooks=False)
    t = store.open("s")
    t.start_span("x").end()
    t.close()
    before = store.wal_path("s").read_bytes()
    with open(store.wal_path("s"), "ab") as f:
        f.write(b"\x07" * 9)
    result = store.repair("s")
    assert result is not None and result.action == "torn_tail" and result.offset == len(before)
    assert store.wal_path("s").read_bytes() == before
    assert Path(f"{store.wal_path('s')}.torn-{len(before)}").read_bytes() == b"\x07" * 9


def test_second_repair_at_the_same_offset_never_overwrites_evidence(tmp_path: Path) -> None:
    """Two damages cut at the same offset, one after the other: the second copy gets a name of
    its own, and the first copy's bytes are still there (evidence is never overwritten)."""
    store, wal, bad = damaged_store(tmp_path)
    first_tail = wal.read_bytes()[bad:]
    first = store.repair("s")
    assert first is not None and first.evidence == f"{wal}.broken-{bad}"
    t = store.open("s")
    for i in range(3):
        t.start_span(f"again{i}").end()
    t.close()
    with open(wal, "r+b") as f:  # the record now at the same offset, damaged the same way
        f.seek(bad + RECORD_HEADER_SIZE + 3)
        byte = f.read(1)
        f.seek(bad + RECORD_HEADER_SIZE + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    second_tail = wal.read_bytes()[bad:]
    second = store.repair("s")
    assert second is not None and second.offset == bad
    assert second.evidence == f"{wal}.broken-{bad}.1"
    assert Path(first.evidence).read_bytes() == first_tail
    assert Path(second.evidence).read_bytes() == second_tail


@pytest.mark.parametrize("where", ["file-header", "trace-start"])
def test_repair_sets_a_wal_with_nothing_to_keep_aside_whole(tmp_path: Path, where: str) -> None:
    """Damage in the file header or the trace start record leaves nothing before it to keep:
    open() refuses the WAL, and repair() -- the way out -- moves the whole file, unchanged, to
    <wal>.broken-0; the next open() starts the session afresh."""
    store = walspan.Store(tmp_path / "d", install_hooks=False)
    store.open("s").close()
    wal = store.wal_path("s")
    data = bytearray(wal.read_bytes())
    data[16 if where == "file-header" else FILE_HEADER_SIZE + RECORD_HEADER_SIZE + 1] ^= 0xFF
    wal.write_bytes(bytes(data))
    with pytest.raises(walspan.CorruptWALError):
        store.open("s")
    result = store.repair("s")
    assert result is not None and result.action == "set_aside" and result.offset == 0
    assert Path(f"{wal}.broken-0").read_bytes() == bytes(data)
    assert not wal.exists()
    t = store.open("s")
    t.start_span("fresh").end()
    t.close()
    assert [s["name"] for s in store.load("s")["spans"]] == ["fresh"]


def test_repair_refuses_a_wal_of_another_format_version(tmp_path: Path) -> None:
    """A WAL of format 1 (walspan 0.1) is not damage: every reader refuses it with a message
    naming the version, and repair() leaves it alone."""
    import struct
    import zlib

    store = walspan.Store(tmp_path / "d", install_hooks=False)
    store.open("s").close()
    wal = store.wal_path("s")
    data = bytearray(wal.read_bytes())
    struct.pack_into("<H", data, 8, 1)
    struct.pack_into("<I", data, 24, zlib.crc32(bytes(data[:24])))
    wal.write_bytes(bytes(data))
    for call in (lambda: store.load("s"), lambda: store.open("s"), lambda: store.repair("s")):
        with pytest.raises(walspan.UnsupportedFormatError, match="version 1"):
            call()
    assert wal.read_bytes() == bytes(data)


def test_cli_repair_and_verify_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan verify` fails on the damaged WAL and points at `walspan repair`; `walspan repair`
    says in one line what it kept and moved, exits 0, and verify is clean after it; an unknown
    session is one error line with exit code 1."""
    _store, _wal, bad = damaged_store(tmp_path)
    d = str(tmp_path / "d")
    assert main(["verify", d]) == 1
    assert "walspan repair" in capsys.readouterr().out
    assert main(["repair", d, "s"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and f"byte offset {bad}" in out[0]
    assert main(["verify", d]) == 0
    capsys.readouterr()
    assert main(["repair", d, "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "Traceback" not in err[0]


def test_store_verify_reports_damage_and_changes_nothing(tmp_path: Path) -> None:
    """Store.verify() (the API behind `walspan verify`) is clean on a sound store, names the file
    and byte offset of a damaged record, and changes no byte."""
    store = walspan.Store(tmp_path / "ok", install_hooks=False)
    t = store.open("s")
    t.start_span("x").end()
    t.close()
    store.compact("s")
    report = store.verify()
    assert isinstance(report, walspan.VerifyReport) and report.ok and report.errors == []
    damaged, wal, bad = damaged_store(tmp_path)
    before = wal.read_bytes()
    report = damaged.verify()
    assert not report.ok
    assert len(report.errors) == 1 and str(wal) in report.errors[0] and f"offset {bad}" in report.errors[0]
    assert wal.read_bytes() == before


def test_repair_moves_a_tail_larger_than_its_copy_chunk_intact(tmp_path: Path) -> None:
    """Damage early in a WAL of about 20 MiB: the evidence copy (made in chunks, never held
    whole in memory) holds every byte from the damage on, unchanged, across chunk boundaries."""
    from walspan import _fsutil

    store = walspan.Store(tmp_path / "d", durability="process", install_hooks=False)
    t = store.open("s")
    for i in range(20):
        t.start_span(f"big{i}", input=f"{i:02d}" * (512 << 10)).end()
    t.close()
    wal = store.wal_path("s")
    offsets = record_offsets(wal)
    bad = offsets[3]
    with open(wal, "r+b") as f:
        f.seek(bad + RECORD_HEADER_SIZE + 7)
        b = f.read(1)
        f.seek(bad + RECORD_HEADER_SIZE + 7)
        f.write(bytes([b[0] ^ 0x40]))
    before = wal.read_bytes()
    assert len(before) - bad > 2 * _fsutil._COPY_CHUNK
    result = store.repair("s")
    assert result is not None and result.offset == bad and result.moved == len(before) - bad
    assert Path(f"{wal}.broken-{bad}").read_bytes() == before[bad:]
    assert wal.read_bytes() == before[:bad]
