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
    offset, moved, copy = store.repair("s")  # type: ignore[misc]
    assert offset == bad and moved == len(before) - bad
    assert copy == Path(f"{wal}.broken-{bad}") and copy.read_bytes() == before[bad:]
    assert wal.read_bytes() == before[:bad]
    doc = store.load("s")
    assert [s["name"] for s in doc["spans"]] == [f"span{i}" for i in range(5)]
    assert store.trace_path("s").read_bytes() and verify_dir(str(tmp_path / "d")).ok
    t = store.open("s")
    t.start_span("after").end()
    t.close()
    assert [s["name"] for s in store.load("s")["spans"]][-1] == "after"


def test_repair_of_a_sound_wal_changes_nothing(tmp_path: Path) -> None:
    """repair() of a WAL without corruption returns None and leaves every byte as it was (a torn
    tail is not corruption: appends and recover() handle it)."""
    store = walspan.Store(tmp_path / "d", install_hooks=False)
    t = store.open("s")
    t.start_span("x").end()
    t.close()
    before = store.wal_path("s").read_bytes()
    with open(store.wal_path("s"), "ab") as f:
        f.write(b"\x07" * 9)  # a torn tail
    assert store.repair("s") is None
    assert store.wal_path("s").read_bytes() == before + b"\x07" * 9
    assert not [n for n in os.listdir(tmp_path / "d") if ".broken-" in n]


def test_repair_refuses_a_damaged_trace_start(tmp_path: Path) -> None:
    """Damage in the trace start record leaves nothing worth keeping: repair() refuses with
    CorruptWALError and changes no byte."""
    store = walspan.Store(tmp_path / "d", install_hooks=False)
    store.open("s").close()
    wal = store.wal_path("s")
    data = bytearray(wal.read_bytes())
    data[FILE_HEADER_SIZE + RECORD_HEADER_SIZE + 1] ^= 0xFF
    wal.write_bytes(bytes(data))
    with pytest.raises(walspan.CorruptWALError):
        store.repair("s")
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
