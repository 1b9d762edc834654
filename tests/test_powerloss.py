"""What a crash or a power loss can leave of a WAL, and what walspan makes of it (issue 5,
harness parts a and b).

(a) A WAL cut at every byte offset (what a killed writer can leave): recovery keeps exactly the
    records that are whole, a reopened session appends after them, verify is clean.
(b) A power loss: the disk keeps what was fdatasync'ed; after the last fdatasync it may keep a
    prefix of what was written, then zeros or garbage in whole 512-byte sectors. The position of
    the last fdatasync is tracked two ways: the `fsync` fault hook (walspan._fsutil.faults) in
    the writer, and the durable_end mark that writers share in .walspan/S.shm (see _wal.py).

What a power loss can lose, by durability level (the statements these tests pin):
- durable: nothing acknowledged. An append returns only once durable_end covers its record,
  so every acknowledged record lies below the last fdatasync position.
- interval: every record acknowledged after the last completed flush began (the background
  flusher starts one at most every `flush_interval` seconds while the WAL has unflushed
  records, so about the last interval of events), always a suffix of the log, never a hole;
  every event acknowledged before that flush read its target survives.
- process: every record appended after the WAL's last fdatasync. In process mode walspan
  fdatasyncs the WAL only when it creates it (the header, the trace start and the creator's
  attach record, written as one file), when it truncates a torn tail, and before a compaction
  publishes a JSON (so the JSON never shows records a power loss can take); a power loss may take
  every span event since the last of these. What survives is always a prefix of the records
  (never a hole), and recovery marks the trace crashed: the creator's attach record is part of
  the created file, so a writer is always named.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from syscall_trace import WRITES, TraceLog, Tracer, covering_flush, flushes_of, writes_of

import walspan
from walspan import _fsutil, _shm
from walspan._format import (
    FILE_HEADER_SIZE,
    RECORD_HEADER_SIZE,
    decode_file_header,
    unpack_payload,
)
from walspan._reader import ScanState, iter_records
from walspan._verify import verify_dir

SECTOR = 512

_WRITER = textwrap.dedent(
    """
    import json, os, random, struct, sys, zlib
    import walspan
    from walspan import _format, _fsutil, _shm
    store_dir, durability, idx, n_ops, die_unsynced = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    max_pad = int(sys.argv[6])
    if "WALSPAN_SYSCALL_LOG" in os.environ:
        from syscall_trace import mark  # under the syscall tracer: each ack goes into its log too
    else:
        def mark(text):
            pass
    store = walspan.Store(store_dir, durability=durability, install_hooks=False)
    wal = str(store.wal_path("s"))
    state = {"synced": 0, "dying": False}

    def hook(op, path):
        if op == "fsync" and (path == wal or path.startswith(wal + ".tmp-")):
            if state["dying"]:
                os._exit(0)  # power loss between the write and its fdatasync
            state["synced"] = os.stat(path).st_size

    _fsutil.faults.hook = hook

    def durable_end():
        with open(wal, "rb") as f:
            salt = _format.decode_file_header(f.read(32))
        for _ in range(1000):  # a lock-free read racing another writer's store reads as unknown: again
            st = _shm.read_state(wal, salt, os.stat(wal).st_size)
            if st is not None:
                return st.durable_end
        return 0

    def ack(n):
        out = {"n": n, "synced": state["synced"]}
        if durability == "durable":
            out["durable_end"] = durable_end()
        sys.stdout.write(json.dumps(out) + "\\n")
        sys.stdout.flush()
        mark(f"ack {idx} {n}")

    rng = random.Random(idx)
    trace = store.open("s")
    span = trace.start_span(f"work-{idx}", attributes={"w": idx, "n": 0})
    ack(0)
    for n in range(1, n_ops):
        span.add_event("e", {"w": idx, "n": n, "pad": "p" * rng.randrange(1, max_pad)})
        ack(n)
    if die_unsynced:
        state["dying"] = True
        span.add_event("e", {"w": idx, "n": n_ops, "pad": "unacknowledged"})
    os._exit(0)  # no detach: the power goes out (or the process is killed)
    """
)


def run_writers(
    store_dir: Path, durability: str, n_ops: int, writers: int = 1, die_unsynced: bool = False, max_pad: int = 700,
    tracer: Tracer | None = None, log: Path | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """Run writer processes concurrently on session "s" (events padded with up to max_pad
    bytes); return each one's acknowledgements. With a tracer, they run under it, logging to
    `log` (each ack is also a mark "ack <writer> <n>" there)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(writers):
        argv = [str(store_dir), durability, str(i), str(n_ops), "1" if die_unsynced else "0", str(max_pad)]
        if tracer is None:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _WRITER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        else:
            assert log is not None
            procs.append(tracer.spawn(_WRITER, *argv, log=log, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    acks = {}
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        acks[i] = [json.loads(line) for line in out.splitlines()]
        assert [a["n"] for a in acks[i]] == list(range(n_ops))
    return acks


def tagged_records(wal: Path) -> tuple[list[tuple[int, int, tuple[int, int] | None]], int]:
    """(offset, end, (writer, op) or None) of every valid record, and the end of the trace start."""
    fd = os.open(wal, os.O_RDONLY)
    try:
        scan = ScanState(str(wal))
        out = []
        for off, _rtype, _seq, payload in iter_records(fd, scan):
            assert payload is not None
            p = unpack_payload(payload)
            attrs = p.get("attributes") or {}
            tag = (attrs["w"], attrs["n"]) if "w" in attrs and "n" in attrs else None
            out.append((off, off + RECORD_HEADER_SIZE + len(payload), tag))
        return out, out[0][1]
    finally:
        os.close(fd)


def shm_durable_end(store_dir: Path, stem: str = "s") -> int:
    wal = store_dir / f"{stem}.wal"
    salt = decode_file_header(wal.read_bytes()[:FILE_HEADER_SIZE])
    st = _shm.read_state(str(wal), salt, wal.stat().st_size)
    assert st is not None, "the shared state is unreadable"
    return st.durable_end


def present_ops(doc: dict[str, Any]) -> list[tuple[int, int]]:
    """(writer, op) of every tagged span start and event in a folded trace, in trace order."""
    out = []
    for s in doc["spans"]:
        if "w" in s["attributes"]:
            out.append((s["attributes"]["w"], s["attributes"]["n"]))
        out.extend((e["attributes"]["w"], e["attributes"]["n"]) for e in s["events"] if "w" in e["attributes"])
    return out


def power_loss_image(data: bytes, cut: int, rng: random.Random, fill: str, extra_sectors: int) -> bytes:
    """What the disk may hold: the bytes before `cut`, then zeros or garbage up to the end of
    the sector holding `cut` and `extra_sectors` sectors more (whole 512-byte sectors)."""
    end = -(-cut // SECTOR) * SECTOR + extra_sectors * SECTOR
    n = end - cut
    tail = bytes(n) if fill == "zeros" else rng.randbytes(n)
    return data[:cut] + tail


def recover_image(directory: Path, image: bytes) -> tuple[walspan.Store, walspan.RecoveryReport]:
    directory.mkdir(parents=True)
    (directory / "s.wal").write_bytes(image)
    store = walspan.Store(directory, durability="process", install_hooks=False)  # fewer fsyncs: faster
    return store, store.recover()


def expected_status(records: list[tuple[int, int, tuple[int, int] | None]], cut: int) -> str:
    """crashed if the writer's attach record survived the cut; else no writer is named in the
    WAL at all (the trace start alone), recovery has nobody to prove dead: the trace is idle."""
    return "crashed" if records[1][1] <= cut else "running"


def assert_usable_after(store: walspan.Store, directory: Path, status: str = "crashed") -> None:
    """A crashed trace refuses appends (writing nothing), an idle one continues; a new session
    works; verify is clean."""
    size = store.wal_path("s").stat().st_size
    if status == "crashed":
        with pytest.raises(walspan.TraceClosedError):
            store.open("s")
        assert store.wal_path("s").stat().st_size == size
    else:
        store.open("s").close()
    t = store.open("after")
    t.start_span("ok").end()
    t.end()
    store.close()
    report = verify_dir(str(directory))
    assert report.ok, report.errors


# == (a) a WAL cut at every byte offset ======================================================


@pytest.fixture
def no_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip fdatasync and directory fsync in this process (the loops below recover hundreds of
    copies; the durability of those copies is not what they test). Writer children still sync."""
    monkeypatch.setattr(_fsutil, "_sync", lambda fd: None)
    monkeypatch.setattr(_fsutil, "fsync_dir", lambda path: None)


def test_wal_cut_at_every_offset_recovers_the_whole_records(tmp_path: Path, no_flush: None) -> None:
    """For every byte offset c: a WAL cut at c (its writer dead) either loses its header or trace
    start, and recover() reports it corrupt without changing a byte; or recover() truncates the
    torn tail, crashes the trace (leaves it idle when the cut took the writer's attach record, so
    no writer is named), and the trace holds exactly the records that end at or before c; then a
    new session appends and verify is clean (invariant 2)."""
    src = tmp_path / "src"
    run_writers(src, "process", n_ops=5, max_pad=40)
    data = (src / "s.wal").read_bytes()
    records, start_end = tagged_records(src / "s.wal")
    assert len(data) < 1000  # compact: every offset below costs one recovery
    for c in range(len(data) + 1):
        d = tmp_path / f"cut{c}"
        store, report = recover_image(d, data[:c])
        if c < start_end:
            assert len(report.corrupt) == 1 and report.actions == []
            assert (d / "s.wal").read_bytes() == data[:c]
            assert not verify_dir(str(d)).ok
        else:
            status = expected_status(records, c)
            assert report.corrupt == [] and report.crashed == (["s"] if status == "crashed" else [])
            doc = store.load("s")
            assert doc["status"] == status
            assert present_ops(doc) == [tag for _o, end, tag in records if tag is not None and end <= c]
            assert json.loads(store.trace_path("s").read_bytes()) == doc
            assert_usable_after(store, d, status)
        shutil.rmtree(d)


def test_wal_cut_at_every_offset_reopens_and_appends_without_recover(tmp_path: Path, no_flush: None) -> None:
    """For every cut offset past the trace start, reopening the session directly (no recover())
    repairs the torn tail under the lock, records the dead writer as lost, and appends after the
    whole records; the trace stays running and verify is clean (invariants 2, 6)."""
    src = tmp_path / "src"
    run_writers(src, "process", n_ops=4, max_pad=40)
    data = (src / "s.wal").read_bytes()
    records, start_end = tagged_records(src / "s.wal")
    for c in range(start_end, len(data) + 1):
        d = tmp_path / f"cut{c}"
        d.mkdir()
        (d / "s.wal").write_bytes(data[:c])
        store = walspan.Store(d, durability="process", install_hooks=False)
        trace = store.open("s")
        trace.start_span("after-cut", attributes={"w": 9, "n": 0}).end()
        trace.close()
        doc = store.load("s")
        expected = [tag for _o, end, tag in records if tag is not None and end <= c] + [(9, 0)]
        assert present_ops(doc) == expected
        assert doc["status"] == "running"
        states = sorted(w["state"] for w in doc["writers"])
        assert states in (["detached"], ["detached", "lost"])  # lost iff its attach record survived
        store.close()
        assert verify_dir(str(d)).ok
        shutil.rmtree(d)


# == (b) power loss ===========================================================================


def test_durable_acknowledged_means_below_the_last_fdatasync(tmp_path: Path, syscall_tracer: Tracer) -> None:
    """Durable mode, two writers sharing one WAL (group commit), traced at the system-call level:
    when an append returns, a successful fdatasync of the WAL's own path, by that writer or the
    other, began after the pwrite of the record's bytes completed and ended before the
    acknowledgement; and the shared durable_end covers the record (invariant 1; DESIGN.md §5)."""
    src = tmp_path / "src"
    log_path = tmp_path / "trace.log"
    acks = run_writers(src, "durable", n_ops=40, writers=2, tracer=syscall_tracer, log=log_path)
    log = TraceLog.read(log_path)
    wal = str(src / "s.wal")
    records, _ = tagged_records(src / "s.wal")
    span_of = {tag: (off, end) for off, end, tag in records if tag is not None}
    flushes = flushes_of(log, wal)
    writes = [c for c in log.on(wal, WRITES) if c.ok]
    marks = log.marks("ack ")
    assert len(marks) == 2 * 40
    for m in marks:
        _, w, n = m.text.split(" ")
        off, end = span_of[(int(w), int(n))]
        written = writes_of([c for c in writes if c.pid == m.pid], wal, off, end, before=m.index)[0]
        assert covering_flush(flushes, written, m) is not None, f"{m}: [{off}, {end}) written by {written}, never flushed"
    for w, lst in acks.items():
        for a in lst:
            assert a["durable_end"] >= span_of[(w, a["n"])][1], (w, a)
    assert shm_durable_end(src) >= max(end for _off, end in span_of.values())


def test_durable_power_loss_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    """Durable mode, two writers that each die between writing their last record and its
    fdatasync. Power-loss images: the WAL cut at the last fdatasync position (durable_end) and at
    random points after it, the rest of the sector and 0-2 more sectors zeros or garbage. On
    each: recover() sees a torn tail (not corruption), every acknowledged event survives, the
    trace holds a prefix of the records, it is crashed, and the store goes on (invariants 1, 2)."""
    src = tmp_path / "src"
    acks = run_writers(src, "durable", n_ops=25, writers=2, die_unsynced=True)
    data = (src / "s.wal").read_bytes()
    durable = shm_durable_end(src)
    records, _ = tagged_records(src / "s.wal")
    acked = {(w, a["n"]) for w, lst in acks.items() for a in lst}
    end_of = {tag: end for _o, end, tag in records if tag is not None}
    assert max(end_of[t] for t in acked) <= durable, "an acknowledged record lies beyond durable_end"
    assert len(end_of) > len(acked)  # the unacknowledged last records were written
    assert durable < len(data)  # and the last of them was never synced: there is a tail to lose
    rng = random.Random(1)
    cuts = [durable] * 3 + sorted(rng.randrange(durable, len(data) + 1) for _ in range(9))
    for i, cut in enumerate(cuts):
        image = power_loss_image(data, cut, rng, ("zeros", "garbage")[i % 2], i % 3)
        d = tmp_path / f"img{i}"
        store, report = recover_image(d, image)
        assert report.corrupt == [], (cut, report.corrupt)
        doc = store.load("s")
        got = present_ops(doc)
        assert acked <= set(got), f"acknowledged events lost at cut {cut}"
        assert sorted(got) == sorted(t for t, end in end_of.items() if end <= cut)
        assert doc["status"] == "crashed"
        assert_usable_after(store, d)


def test_process_mode_power_loss_loses_only_what_followed_the_last_fdatasync(tmp_path: Path) -> None:
    """Process mode: walspan fdatasyncs the WAL only when creating it, so the last fdatasync
    position is the end of the created file (trace start and the creator's attach record), and a
    power loss can lose any event after it. On images cut anywhere from there (then zeros or
    garbage sectors), exactly the records that were whole before the cut survive (a prefix,
    never a hole), and recovery crashes the trace: its creator is always named as a writer."""
    src = tmp_path / "src"
    acks = run_writers(src, "process", n_ops=30)
    data = (src / "s.wal").read_bytes()
    records, start_end = tagged_records(src / "s.wal")
    created_end = records[1][1]  # the trace start and the creator's attach, created as one file
    assert {a["synced"] for a in acks[0]} == {created_end}  # never synced after the creation
    rng = random.Random(2)
    cuts = [created_end] + sorted(rng.randrange(created_end, len(data) + 1) for _ in range(11))
    for i, cut in enumerate(cuts):
        image = power_loss_image(data, cut, rng, ("garbage", "zeros")[i % 2], i % 3)
        d = tmp_path / f"img{i}"
        store, report = recover_image(d, image)
        assert report.corrupt == []
        doc = store.load("s")
        assert present_ops(doc) == [t for _o, end, t in records if t is not None and end <= cut]
        status = expected_status(records, cut)
        assert doc["status"] == status
        assert_usable_after(store, d, status)


_INTERVAL_WRITER = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import walspan
    from walspan import _shm
    store_dir, phases, per_phase = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = walspan.Store(store_dir, durability="interval", flush_interval=0.005, install_hooks=False)
    wal = str(store.wal_path("s"))
    targets = []  # (monotonic time, W) each time a flush leader read its target
    published = threading.Condition()
    marks = [0]
    read_target = _shm.SharedState.flush_target
    publish = _shm.SharedState.publish_flushed

    def flush_target(shm):
        snap = read_target(shm)
        if snap is not None:
            targets.append((time.monotonic(), snap[1]))
        return snap

    def publish_flushed(shm, gen, end):
        publish(shm, gen, end)
        with published:
            marks[0] = max(marks[0], end)
            published.notify_all()

    _shm.SharedState.flush_target = flush_target
    _shm.SharedState.publish_flushed = publish_flushed
    trace = store.open("s")
    span = trace.start_span("work", attributes={"w": 0, "n": 0})
    n = 0
    acks = []
    for phase in range(phases + 1):
        for _ in range(per_phase):
            n += 1
            span.add_event("e", {"w": 0, "n": n, "pad": "p" * (n % 200)})
            acks.append((n, time.monotonic()))
        if phase < phases:  # the flusher alone makes this phase durable (no close, no call)
            end = os.path.getsize(wal)
            with published:
                assert published.wait_for(lambda: marks[0] >= end, 60)
    sys.stdout.write(json.dumps({"acks": acks, "targets": list(targets)}))
    sys.stdout.flush()
    os._exit(0)  # the power goes out: whatever the flusher has not flushed may be lost
    """
)


def test_interval_power_loss_loses_only_what_followed_the_last_completed_flush(tmp_path: Path) -> None:
    """Interval mode (flush_interval 5 ms): a writer appends in phases, each made durable by the
    background flusher alone, then one more phase, and dies. Power-loss images: the WAL cut at
    the final durable mark and at random points after it, then zeros or garbage sectors. On each:
    no corruption; exactly the records whole before the cut survive (a prefix, never a hole);
    every event acknowledged before the last completed flush read its target survives (the
    bound: only events acknowledged after that flush began can be lost); the trace is crashed."""
    src = tmp_path / "src"
    src.mkdir()
    proc = subprocess.run([sys.executable, "-c", _INTERVAL_WRITER, str(src), "4", "150"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    data = (src / "s.wal").read_bytes()
    durable = shm_durable_end(src)
    records, _ = tagged_records(src / "s.wal")
    end_of = {tag[1]: end for _o, end, tag in records if tag is not None}
    acked = [(n, t) for n, t in report["acks"]]
    assert len(acked) == 5 * 150 and all(n in end_of for n, _t in acked)
    # the last completed flush: the one whose target is the final durable mark
    began = min(t for t, w in report["targets"] if w == durable)
    before = [n for n, t in acked if t < began]
    assert len(before) >= 4 * 150  # the four phases the flusher made durable
    assert all(end_of[n] <= durable for n in before), "an event acknowledged before the last flush began is past it"
    rng = random.Random(3)
    cuts = [durable] * 2 + sorted(rng.randrange(durable, len(data) + 1) for _ in range(6))
    for i, cut in enumerate(cuts):
        image = power_loss_image(data, cut, rng, ("zeros", "garbage")[i % 2], i % 3)
        d = tmp_path / f"img{i}"
        store, rep = recover_image(d, image)
        assert rep.corrupt == [], (cut, rep.corrupt)
        doc = store.load("s")
        got = [n for _w, n in present_ops(doc)]
        assert got == [t[1] for _o, end, t in records if t is not None and end <= cut]  # a prefix
        assert set(before) <= set(got)
        assert doc["status"] == "crashed"
        assert_usable_after(store, d)


def test_unsynced_sectors_persisted_out_of_order_are_reported_not_dropped(tmp_path: Path) -> None:
    """Write order is not persist order: a power loss may keep a later unsynced sector and lose an
    earlier one. A zeroed sector followed by whole valid records is then damage followed by valid
    records: recover() reports the WAL corrupt and changes no byte, load() refuses it, and every
    record before the damage is still intact in the file (invariant 2: never silently skipped)."""
    src = tmp_path / "src"
    run_writers(src, "process", n_ops=30)
    data = (src / "s.wal").read_bytes()
    _records, start_end = tagged_records(src / "s.wal")
    hole = (-(-start_end // SECTOR) + 1) * SECTOR  # a whole sector past the trace start
    assert hole + 3 * SECTOR < len(data)
    image = data[:hole] + bytes(SECTOR) + data[hole + SECTOR :]
    d = tmp_path / "img"
    store, report = recover_image(d, image)
    assert len(report.corrupt) == 1 and report.actions == []
    assert (d / "s.wal").read_bytes() == image
    with pytest.raises(walspan.CorruptWALError):
        store.load("s")
    assert not verify_dir(str(d)).ok


def test_json_never_outlives_the_wal_records_it_reflects(tmp_path: Path) -> None:
    """Process mode: compaction fdatasyncs the WAL before it publishes a JSON (invariant 4 with
    power loss in mind), so the last fdatasync of the WAL covers everything the durable JSON
    shows. A power loss that keeps only the synced prefix leaves a WAL that still holds every
    record the JSON reflects: recovery marks the trace crashed and the JSON equals load()."""
    src = tmp_path / "src"
    code = textwrap.dedent(
        """
        import os, sys, walspan
        from walspan import _fsutil
        s = walspan.Store(sys.argv[1], durability="process", install_hooks=False)
        wal = str(s.wal_path("s"))
        synced = [0]
        def hook(op, path):
            if op == "fsync" and path == wal:
                synced[0] = os.stat(path).st_size
        _fsutil.faults.hook = hook
        t = s.open("s")
        for i in range(5):
            t.start_span(f"s{i}").end()
        s.compact("s")
        for i in range(5, 8):
            t.start_span(f"s{i}").end()  # never synced: a power loss may take these
        print(synced[0], flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code, str(src)], check=True, timeout=60, capture_output=True, text=True)
    synced = int(out.stdout.strip())
    json_offset = json.loads((src / "s.json").read_bytes())["wal"]["offset"]
    assert synced >= json_offset > FILE_HEADER_SIZE
    d = tmp_path / "img"
    shutil.copytree(src, d)
    os.truncate(d / "s.wal", synced)  # power loss: only what was fdatasync'ed survives
    store = walspan.Store(d, install_hooks=False)
    assert store.recover().crashed == ["s"]
    trace = store.load("s")
    assert json.loads(store.trace_path("s").read_bytes()) == trace
    assert [sp["name"] for sp in trace["spans"]] == [f"s{i}" for i in range(5)]


def test_compaction_rebuilds_a_json_ahead_of_its_wal(tmp_path: Path) -> None:
    """A JSON that reflects records its WAL no longer holds (the WAL was damaged or replaced after
    the JSON was written) is no checkpoint: compaction rebuilds it from the WAL, the truth, even
    though that reflects less (the monotonic rule applies only to a JSON the WAL agrees with)."""
    store = walspan.Store(tmp_path / "d", install_hooks=False)
    t = store.open("s")
    start_end = os.path.getsize(store.wal_path("s"))
    for i in range(3):
        t.start_span(f"s{i}").end()
    store.compact("s")
    t.close()
    wal = store.wal_path("s")
    records, _ = tagged_records(wal)
    os.truncate(wal, records[-3][0])  # lose the last records the JSON reflects
    assert os.path.getsize(wal) > start_end
    store.compact("s")
    assert json.loads(store.trace_path("s").read_bytes()) == store.load("s")
    assert verify_dir(str(tmp_path / "d")).ok
