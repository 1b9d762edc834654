"""The durability rules checked at the system-call level (DESIGN.md §4, invariants 1 and 4).

Each test runs real walspan code in a child process under the LD_PRELOAD tracer
(tests/syscall_trace.py) and checks the calls it made: which file was fdatasync'ed, after
which write, before which acknowledgement, and in what order names appeared and directories
were flushed. A Python-level hook cannot prove any of this: an implementation that keeps its
fault hook but drops the fdatasync, or flushes the wrong descriptor, still calls the hook.
The last tests replay the same traces through a power-loss model (tests/powerloss_sim.py) and
recover what a power loss at many moments may leave.

Record positions come from the WAL itself (walspan._reader.iter_records); the tests compare
them with the offsets of the traced writes, never with sizes of their own.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from powerloss_sim import ALL, SYNCED, PowerLossModel, materialize
from syscall_trace import FLUSHES, Call, TraceLog, Tracer, covering_flush, flushes_of, writes_of
from walfiles import write_at

import walspan
from walspan import _fsutil
from walspan._format import RecordType, unpack_payload
from walspan._reader import ScanState, iter_records

# A writer: opens session "s", starts span "w<idx>" (tag (idx, 0)), appends events tagged
# (idx, n), marking "ack idx n" once each call returned; every `big`-th event carries a value of
# about 200 KB. Optionally compacts after event `compact_at` and ends the trace ("ack idx end").
WRITER = """
import os, sys, walspan
store_dir, durability, idx, n_ops, big, compact_at, finish = sys.argv[1:8]
idx, n_ops, big, compact_at = int(idx), int(n_ops), int(big), int(compact_at)
store = walspan.Store(store_dir, durability=durability, install_hooks=False)
trace = store.open("s")
mark(f"opened {idx}")
span = trace.start_span(f"w{idx}", attributes={"w": idx, "n": 0})
mark(f"ack {idx} 0")
for n in range(1, n_ops):
    size = 200_000 + n if big and n % big == 0 else 20 + (n * 37) % 700
    span.add_event("e", {"w": idx, "n": n, "pad": "x" * size})
    mark(f"ack {idx} {n}")
    if n == compact_at:
        mark("compacting")
        store.compact("s")
        mark("compacted")
if finish == "1":
    span.end()
    trace.end()
    mark(f"ack {idx} end")
    store.close()
os._exit(0)  # no detach: the process dies (or the power goes out)
"""


@dataclass(frozen=True)
class Rec:
    offset: int
    end: int
    rtype: int
    seq: int
    tag: tuple[int, int | str] | None  # (writer, n) of a tagged span start / event; (writer, "end")


def wal_records(wal: Path) -> list[Rec]:
    """Every record of the WAL's valid prefix, with its [offset, end) as the reader sees it."""
    fd = os.open(wal, os.O_RDONLY)
    try:
        scan = ScanState(str(wal))
        out = []
        for off, rtype, seq, payload in iter_records(fd, scan):
            assert payload is not None
            p = unpack_payload(payload)
            attrs = p.get("attributes") or {}
            tag: tuple[int, int | str] | None = (attrs["w"], attrs["n"]) if "w" in attrs and "n" in attrs else None
            out.append(Rec(off, scan.end, rtype, seq, tag))
        return out
    finally:
        os.close(fd)


def ack_tag(ack: Call) -> tuple[int, int | str]:
    _, w, n = ack.text.split(" ")
    return int(w), (n if n == "end" else int(n))


def acked_record(records: list[Rec], tag: tuple[int, int | str]) -> Rec:
    """The record an "ack w n" mark acknowledges ("ack w end": the terminal record)."""
    if tag[1] == "end":
        return next(r for r in records if r.rtype == RecordType.TERMINAL)
    found = [r for r in records if r.tag == tag]
    assert len(found) == 1, f"{len(found)} records tagged {tag}"
    return found[0]


def run_writer(
    tracer: Tracer, tmp_path: Path, durability: str, n_ops: int, *, big: int = 0, compact_at: int = -1,
    finish: bool = False, data: bool = False,
) -> tuple[Path, TraceLog]:
    store_dir = tmp_path / "store"
    log = tracer.run(
        WRITER, str(store_dir), durability, "0", str(n_ops), str(big), str(compact_at), "1" if finish else "0",
        log=tmp_path / "trace.log", data=data,
    )
    return store_dir, log


def assert_each_ack_follows_its_own_flush(log: TraceLog, wal: str, records: list[Rec]) -> int:
    """In each acknowledging process's own history: the write(s) of the record's bytes, then a
    successful flush of the WAL's path (same inode), then the ack. Returns the number of acks."""
    acks = log.marks("ack ")
    assert acks
    wal_writes = [c for c in log.on(wal, ("pwrite", "write")) if c.ok]
    wal_flushes = flushes_of(log, wal)
    by_pid = {pid: [c for c in wal_writes if c.pid == pid] for pid in log.pids()}
    for ack in acks:
        rec = acked_record(records, ack_tag(ack))
        written = writes_of(by_pid[ack.pid], wal, rec.offset, rec.end, before=ack.index)[0]
        i = bisect.bisect_right(wal_flushes, written.index, key=lambda c: c.index)
        flush = [c for c in wal_flushes[i:] if c.index < ack.index and c.pid == ack.pid and c.ino == written.ino]
        if not flush:
            others = [str(c) for c in log.history(ack.pid) if written.index < c.index < ack.index and c.op in FLUSHES]
            raise AssertionError(f"{ack} of [{rec.offset}, {rec.end}) after {written}: no flush of {wal} in between {others}")
    return len(acks)


# == durable mode: an ack follows an fdatasync of the WAL ======================================


def test_durable_ack_follows_an_fdatasync_of_the_wal_after_its_write(syscall_tracer: Tracer, tmp_path: Path) -> None:
    """Durable mode, one writer, 1,000 appends from 20 bytes to 200 KB: every acknowledged
    append is preceded, in its own process's history, by the pwrite that put the record's bytes
    (offsets from the reader) into the WAL, then a successful fdatasync of the WAL's own path and
    inode (not the shared-state or lock file), then the acknowledgement (invariant 1)."""
    store_dir, log = run_writer(syscall_tracer, tmp_path, "durable", 1000, big=200)
    wal = str(store_dir / "s.wal")
    records = wal_records(Path(wal))
    assert assert_each_ack_follows_its_own_flush(log, wal, records) == 1000
    assert max(r.end - r.offset for r in records) > 200_000


def test_durable_appends_after_a_repair_cut_are_flushed_again(syscall_tracer: Tracer, tmp_path: Path) -> None:
    """A repair that cuts the WAL below the durable mark (damage inside fdatasync'ed data) must
    pull that mark back: records appended afterwards at the same offsets are new bytes, and each
    is acknowledged only after an fdatasync of the WAL that followed its write (issue 9: a
    truncation that leaves durable_end past the end acknowledges appends with no flush)."""
    store_dir = tmp_path / "store"
    store = walspan.Store(store_dir, install_hooks=False)
    t = store.open("s")
    span = t.start_span("before", attributes={"w": 9, "n": 0})
    for n in range(1, 200):
        span.add_event("e", {"w": 9, "n": n, "pad": "y" * 300})
    t.close()
    store.close()
    wal = store_dir / "s.wal"
    before = wal_records(wal)
    # Damage the reader recognises whatever its torn-tail search does: a whole, valid record in
    # the wrong place (event 110's bytes over event 100's, both the same size) breaks the seq
    # chain in the middle of the durable region.
    damaged = next(r for r in before if r.tag == (9, 100))
    moved = next(r for r in before if r.tag == (9, 110))
    assert moved.end - moved.offset == damaged.end - damaged.offset
    data = wal.read_bytes()
    write_at(wal, damaged.offset, data[moved.offset : moved.end])
    store = walspan.Store(store_dir, install_hooks=False)
    result = store.repair("s")
    store.close()
    assert result is not None and result.offset == damaged.offset
    log = syscall_tracer.run(WRITER, str(store_dir), "durable", "1", "40", "0", "-1", "0", log=tmp_path / "trace.log")
    records = wal_records(wal)
    acked = [acked_record(records, ack_tag(a)) for a in log.marks("ack ")]
    assert acked[-1].end < before[-1].end  # every new record lies below the pre-repair end
    assert assert_each_ack_follows_its_own_flush(log, str(wal), records) == 40


def test_process_mode_appends_never_flush_the_wal(syscall_tracer: Tracer, tmp_path: Path) -> None:
    """Process mode: after the WAL is created (its temporary file fdatasync'ed before the link),
    500 appends write the WAL and never flush it (no fsync or fdatasync of its path): the level
    is "survives the process", and a flush per append is what it exists to avoid (DESIGN.md §5)."""
    store_dir, log = run_writer(syscall_tracer, tmp_path, "process", 500)
    wal = str(store_dir / "s.wal")
    link = next(c for c in log.on(wal, ("link", "rename")) if c.ok)
    tmp_flushes = [c for c in log.calls if c.op in FLUSHES and c.ok and c.path == link.old]
    writes = [c for c in log.on(wal, ("pwrite", "write")) if c.ok]
    assert tmp_flushes and len(writes) >= 500  # the tracer saw the creation's flush and the appends
    assert [str(c) for c in flushes_of(log, wal) if c.index > link.index] == []


GROUP_WRITERS = 4
GROUP_OPS = 150


def test_group_commit_every_ack_is_covered_by_a_wal_flush_begun_after_its_write(
    syscall_tracer: Tracer, tmp_path: Path
) -> None:
    """Durable mode, four writer processes on one WAL (group commit shares flushes across
    processes): each acknowledged append is covered by a successful flush of the WAL's path, by
    its own process or another, that began (CLOCK_MONOTONIC) after the append's pwrite completed
    and ended before the acknowledgement (invariant 1; DESIGN.md §4)."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    walspan.Store(store_dir, install_hooks=False).open("s").close()  # created once, attached by all
    argvs = [[str(store_dir), "durable", str(i), str(GROUP_OPS), "0", "-1", "0"] for i in range(GROUP_WRITERS)]
    log = syscall_tracer.run_many(WRITER, argvs, log=tmp_path / "trace.log")
    wal = str(store_dir / "s.wal")
    records = wal_records(Path(wal))
    flushes = flushes_of(log, wal)
    acks = log.marks("ack ")
    assert len(acks) == GROUP_WRITERS * GROUP_OPS
    wal_writes = [c for c in log.on(wal, ("pwrite", "write")) if c.ok]
    uncovered = []
    for ack in acks:
        rec = acked_record(records, ack_tag(ack))
        own = [c for c in wal_writes if c.pid == ack.pid]
        written = writes_of(own, wal, rec.offset, rec.end, before=ack.index)[0]
        if covering_flush(flushes, written, ack) is None:
            uncovered.append(f"{ack}: [{rec.offset}, {rec.end}) written by {written}")
    assert uncovered == []


# == creating a WAL =============================================================================


def test_wal_creation_links_synced_data_and_fsyncs_the_directory_before_the_first_ack(
    syscall_tracer: Tracer, tmp_path: Path
) -> None:
    """A new trace's WAL appears whole and durably: its header and first records are written to
    a temporary file, which is fdatasync'ed; only then is it linked to S.wal (same inode); then
    the store directory is fsynced, all before open() returns and the first append is
    acknowledged (FORMAT.md "File header"; a power loss cannot remove an acknowledged trace)."""
    store_dir, log = run_writer(syscall_tracer, tmp_path, "durable", 3)
    wal = str(store_dir / "s.wal")
    records = wal_records(Path(wal))
    created_end = records[1].end  # the trace start and the creator's attach: the created file
    opened = log.marks("opened")[0]
    first_ack = log.marks("ack ")[0]
    link = next(c for c in log.on(wal, ("link", "rename")) if c.ok)
    assert [c for c in log.on(wal) if c.index < link.index] == []  # no write to S.wal before its name
    tmp = link.old
    assert tmp != wal and os.path.dirname(tmp) == str(store_dir)
    writes = writes_of(log.calls, tmp, 0, created_end, before=link.index)
    assert {c.ino for c in writes} == {link.ino}
    tmp_flush = [c for c in log.calls if c.op in FLUSHES and c.ok and c.ino == link.ino and c.t0 >= max(w.t1 for w in writes)]
    assert tmp_flush and tmp_flush[0].t1 <= link.t0, "the name appeared before its data was flushed"
    dir_flush = [
        c for c in log.calls
        if c.op in FLUSHES and c.ok and c.fields["type"] == "d" and c.path == str(store_dir) and c.t0 >= link.t1
    ]
    assert dir_flush, "the store directory was never fsynced after the WAL's link"
    assert dir_flush[0].t1 <= opened.t0 <= first_ack.t0


# == compaction ================================================================================


@pytest.mark.parametrize("durability", ["process", "durable"])
def test_compaction_publishes_the_json_by_flushed_tmp_rename_and_directory_fsync(
    syscall_tracer: Tracer, tmp_path: Path, durability: str
) -> None:
    """Compaction writes the JSON to a temporary file, flushes it, renames it over S.json, then
    fsyncs the directory (invariant 4). In process mode it first fdatasyncs the WAL, after the
    last write the JSON reflects and before the rename, so the published JSON never shows
    records a power loss could take back; in durable mode the appends' flushes already did."""
    store_dir, log = run_writer(syscall_tracer, tmp_path, durability, 60, compact_at=40)
    wal, json_path = str(store_dir / "s.wal"), str(store_dir / "s.json")
    start, done = log.marks("compacting")[0], log.marks("compacted")[0]
    during = [c for c in log.calls if start.index < c.index < done.index]
    rename = next(c for c in during if c.op == "rename" and c.ok and c.path == json_path)
    tmp = rename.old
    writes = [c for c in during if c.op in ("pwrite", "write") and c.ok and c.ino == rename.ino]
    size = os.path.getsize(json_path)
    assert writes and writes_of(writes, tmp, 0, size)
    tmp_flush = [c for c in during if c.op in FLUSHES and c.ok and c.ino == rename.ino and c.t0 >= max(w.t1 for w in writes)]
    assert tmp_flush and tmp_flush[0].t1 <= rename.t0, "the JSON was renamed before its data was flushed"
    dir_flush = [
        c for c in during
        if c.op in FLUSHES and c.ok and c.fields["type"] == "d" and c.path == str(store_dir) and c.t0 >= rename.t1
    ]
    assert dir_flush, "the store directory was not fsynced after the JSON's rename"
    shown = json.loads(Path(json_path).read_bytes())["wal"]["offset"]
    last_write = writes_of(log.calls, wal, shown - 1, shown, before=start.index)[0]
    wal_flush = [c for c in flushes_of(log, wal) if c.t0 >= last_write.t1 and c.t1 <= rename.t0]
    if durability == "process":
        assert [c for c in wal_flush if c.index > start.index], "no fdatasync of the WAL before the JSON's rename"
    else:
        assert wal_flush  # the append's own flush covers everything the JSON shows


# == torn tail ==================================================================================


def test_torn_tail_truncation_is_flushed_before_the_next_write(syscall_tracer: Tracer, tmp_path: Path) -> None:
    """A writer that finds a torn tail (a record cut short by a crash) truncates it under the lock
    and fdatasyncs the WAL *before* writing anything after the cut: otherwise a power loss could
    bring the torn bytes back behind new records, and the next reader would take them for
    corruption (FORMAT.md "Reading")."""
    store_dir = tmp_path / "store"
    store = walspan.Store(store_dir, durability="process", install_hooks=False)
    t = store.open("s")
    for i in range(30):
        t.start_span(f"s{i}").end()
    t.close()
    store.close()
    wal = store_dir / "s.wal"
    records = wal_records(wal)
    cut = records[-1].offset + (records[-1].end - records[-1].offset) // 2  # half of the last record
    os.truncate(wal, cut)
    log = syscall_tracer.run(WRITER, str(store_dir), "process", "1", "20", "0", "-1", "0", log=tmp_path / "trace.log")
    truncations = [c for c in log.on(str(wal), ("ftruncate",)) if c.ok]
    assert [int(c.fields["len"]) for c in truncations] == [records[-1].offset]
    trunc = truncations[0]
    history = log.history(trunc.pid)
    next_write = next(c for c in history if c.index > trunc.index and c.op in ("pwrite", "write") and c.path == str(wal))
    flush = [
        c for c in history
        if trunc.index < c.index < next_write.index and c.op in FLUSHES and c.ok and c.path == str(wal) and c.ino == trunc.ino
    ]
    assert flush, f"no flush of the WAL between {trunc} and {next_write}"
    assert len(log.marks("ack ")) == 20


# == power loss, replayed from the traces =======================================================

# (names, data): worst case, best case, and the mixes where one of them was kept and not the other
VARIANTS: list[tuple[str, str | int]] = [(SYNCED, SYNCED), (ALL, SYNCED), (SYNCED, ALL), (ALL, ALL), (ALL, 1)]


@pytest.fixture
def no_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fdatasync or directory fsync in this (untraced) process: the loops below recover
    hundreds of images whose own durability is not what they test."""
    monkeypatch.setattr(_fsutil, "_sync", lambda fd: None)
    monkeypatch.setattr(_fsutil, "fsync_dir", lambda path: None)


def moments(log: TraceLog, store_dir: Path, limit: int, seed: int) -> list[int]:
    """Cut points: the end of every call on a file of the store directory and every mark; all of
    the first and last 15 (creation, compaction, end), a seeded sample of the rest."""
    top = str(store_dir)
    times = sorted(
        {c.t1 for c in log.calls if c.op == "mark" or os.path.dirname(c.path) == top or c.path == top}
    )
    head, middle, tail = times[:15], times[15:-15], times[-15:]
    rng = random.Random(seed)
    return head + sorted(rng.sample(middle, min(len(middle), limit))) + tail


def check_image(
    model: PowerLossModel, log: TraceLog, store_dir: Path, records: list[Rec], moment: int,
    names: str, data: str | int, target: Path, durable: bool,
) -> None:
    """Recover what a power loss at `moment` may leave, and check what walspan promises of it."""
    where = f"power loss at {moment} (names {names}, data {data})"
    files = materialize(model.image(moment, names, data), store_dir, target)
    opened = [c for c in log.marks("opened") if c.t0 <= moment]
    acked = {ack_tag(c) for c in log.marks("ack ") if c.t0 <= moment}
    if "s.wal" not in files:
        assert not opened, f"{where}: the WAL of an opened trace is gone ({files})"
        return
    store = walspan.Store(target, durability="process", install_hooks=False)
    try:
        image_records = wal_records(target / "s.wal")  # the image's own valid prefix, before recovery
        if "s.json" in files:
            shown = json.loads((target / "s.json").read_bytes())["wal"]["seq"]
            assert shown <= image_records[-1].seq, f"{where}: the JSON shows seq {shown}, the WAL kept {image_records[-1].seq}"
        report = store.recover()
        assert report.corrupt == [], f"{where}: {report.corrupt}"
        doc = store.load("s")
        got = [(s["attributes"]["w"], s["attributes"]["n"]) for s in doc["spans"] if "w" in s["attributes"]]
        got += [(e["attributes"]["w"], e["attributes"]["n"]) for s in doc["spans"] for e in s["events"]]
        kept = {r.tag for r in records[: len(image_records)] if r.tag is not None}
        assert set(got) == kept, f"{where}: the trace is not the prefix the WAL kept"
        assert [r.seq for r in image_records] == [r.seq for r in records[: len(image_records)]]
        if durable:
            lost = sorted(t for t in acked if t[1] != "end" and t not in kept)
            assert lost == [], f"{where}: acknowledged events lost"
        if any(t[1] == "end" for t in acked):
            assert doc["status"] == "completed", f"{where}: the trace ended, and recovery says {doc['status']}"
    finally:
        store.close()


@pytest.mark.parametrize("durability", ["durable", "process"])
def test_power_loss_at_any_moment_keeps_what_was_promised(
    syscall_tracer: Tracer, tmp_path: Path, no_flush: None, durability: str
) -> None:
    """A writer creates a trace, appends 120 events (some of 200 KB), compacts, appends more,
    ends the trace. For ~50 moments of that history and five ways a power loss may treat what
    was not flushed (names and data each lost or kept, or a prefix of the unflushed writes), the
    model (tests/powerloss_sim.py) rebuilds what the disk may hold and walspan recovers it:
    recovery finds no corruption; the trace holds exactly the WAL's surviving record prefix; a
    JSON never shows more than the WAL kept; once open() returned the WAL exists; once end()
    returned the trace is completed; and in durable mode every acknowledged event survives."""
    store_dir, log = run_writer(syscall_tracer, tmp_path, durability, 120, big=40, compact_at=70, finish=True, data=True)
    records = wal_records(store_dir / "s.wal")
    model = PowerLossModel(log)
    cuts = moments(log, store_dir, 20, seed=len(records))
    for i, moment in enumerate(cuts):
        for j, (names, data) in enumerate(VARIANTS):
            target = tmp_path / f"img-{i}-{j}"
            check_image(model, log, store_dir, records, moment, names, data, target, durability == "durable")
            shutil.rmtree(target)


INTERVAL_WRITER = """
import os, sys, walspan
from walspan import _format, _shm
store_dir, n_ops = sys.argv[1], int(sys.argv[2])
store = walspan.Store(store_dir, durability="interval", flush_interval=0.002, install_hooks=False)
trace = store.open("s")
span = trace.start_span("w0", attributes={"w": 0, "n": 0})
for n in range(1, n_ops):
    span.add_event("e", {"w": 0, "n": n, "pad": "x" * (20 + (n * 37) % 700)})
mark("appended")
wal = os.path.join(store_dir, "s.wal")
with open(wal, "rb") as f:
    salt = _format.decode_file_header(f.read(32))
while True:  # wait for the background flusher to cover everything (a condition, not a delay)
    st = _shm.read_state(wal, salt, os.path.getsize(wal))
    if st is not None and st.durable_end == os.path.getsize(wal):
        break
mark("covered")
os._exit(0)
"""


def test_interval_flusher_marks_durable_only_what_an_fdatasync_of_the_wal_covered(
    syscall_tracer: Tracer, tmp_path: Path
) -> None:
    """Interval level: appends return without flushing (far fewer flushes of the WAL than
    appends, none by the appending calls themselves being required), and when the background
    flusher has raised the durable mark to the end of the log, a flush of the WAL's own path
    began after the write of its last record completed: the mark is never raised over bytes
    no fdatasync covered."""
    store_dir = tmp_path / "store"
    log = syscall_tracer.run(INTERVAL_WRITER, str(store_dir), "2000", log=tmp_path / "trace.log")
    wal = str(store_dir / "s.wal")
    records = wal_records(Path(wal))
    assert len(records) >= 2000
    flushes = flushes_of(log, wal)
    writes = [c for c in log.on(wal, ("pwrite", "write")) if c.ok]
    assert 1 <= len(flushes) < len(records) // 10, f"{len(flushes)} flushes for {len(records)} records"
    covered = log.marks("covered")[0]
    last = writes_of(writes, wal, records[-1].offset, records[-1].end, before=covered.index)[0]
    assert covering_flush(flushes, last, covered) is not None, "the durable mark covers bytes no fdatasync did"
