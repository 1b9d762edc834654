"""walspan.read: records after a cursor, the store follower, trace summaries, and the bounded-
memory fold behind them. A reader never yields a record that is not in the log, never skips one
silently, and says so when the log was cut or replaced under it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from walfiles import flip_byte, record_offsets

import walspan
from walspan._compactor import fold_wal
from walspan._fold import TraceFold, dumps
from walspan._format import RecordType
from walspan._leanfold import LeanFold, iter_canonical
from walspan.read import (
    Cursor,
    CursorMismatchError,
    Follower,
    Notice,
    Record,
    TraceView,
    check_cursor,
    end_cursor,
    read_records,
    summary,
)

T = RecordType


def _trace(store: walspan.Store, sid: str, spans: int = 3) -> walspan.Trace:
    t = store.open(sid, metadata={"m": 1})
    for i in range(spans):
        with t.span(f"s{i}", attributes={"i": i}) as sp:
            sp.add_event("e", {"i": i})
    return t


def _seqs(items: list[Any]) -> list[int]:
    return [i.seq for i in items if isinstance(i, Record)]


def _notices(items: list[Any]) -> list[tuple[str, str]]:
    return [(i.session_id, i.kind) for i in items if isinstance(i, Notice)]


# -- the bounded-memory fold ------------------------------------------------------------------

_ids = st.integers(0, 7).map(lambda i: f"{i:016x}")
_writers = st.sampled_from(["w0", "w1", "w2"])
_value = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
_attrs = st.dictionaries(st.sampled_from(["a", "b", "ü"]), st.one_of(_value, st.lists(_value, max_size=3)), max_size=3)
_RECORDS = st.lists(
    st.one_of(
        st.tuples(st.just(T.WRITER_ATTACH), st.fixed_dictionaries({"writer": _writers, "pid": st.integers(1, 9), "time": st.integers(0, 99)})),
        st.tuples(st.just(T.WRITER_DETACH), st.fixed_dictionaries({"writer": _writers, "time": st.integers(0, 99)})),
        st.tuples(st.just(T.WRITER_LOST), st.fixed_dictionaries({"lost": _writers, "message": st.text(max_size=4), "time": st.integers(0, 99)})),
        st.tuples(
            st.just(T.SPAN_START),
            st.fixed_dictionaries({"span_id": _ids, "parent": st.one_of(st.none(), _ids), "name": st.text(max_size=4), "kind": st.just("k"),
                                   "attributes": _attrs, "input": _value, "time": st.integers(0, 99), "writer": _writers}),
        ),
        st.tuples(st.just(T.SPAN_ATTRIBUTES), st.fixed_dictionaries({"span_id": _ids, "attributes": _attrs, "time": st.integers(0, 99), "writer": _writers})),
        st.tuples(st.just(T.SPAN_EVENT), st.fixed_dictionaries({"span_id": _ids, "name": st.text(max_size=3), "attributes": _attrs, "time": st.integers(0, 99), "writer": _writers})),
        st.tuples(st.just(T.SPAN_END), st.fixed_dictionaries({"span_id": _ids, "status": st.sampled_from(["ok", "error"]), "output": _value, "time": st.integers(0, 99), "writer": _writers})),
        st.tuples(st.just(T.METADATA), st.fixed_dictionaries({"metadata": _attrs, "time": st.integers(0, 99), "writer": _writers})),
        st.tuples(st.just(T.TERMINAL), st.fixed_dictionaries({"status": st.sampled_from(["completed", "crashed"]), "message": st.none(), "time": st.integers(0, 99)})),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(records=_RECORDS, cache=st.integers(1, 4))
def test_lean_fold_streams_exactly_the_canonical_json(records: list[tuple[int, dict[str, Any]]], cache: int) -> None:
    """The packed fold (spans msgpack-packed behind a tiny write-back cache, so spans are
    evicted and re-loaded between their records) streams byte-for-byte the canonical JSON of
    the plain fold, for any record sequence (duplicates, unknown spans, lost writers, records
    after the terminal one)."""
    plain, lean = TraceFold(), LeanFold(cache=cache)
    start = {"trace_id": "t" * 32, "session_id": "s", "metadata": {}, "time": 0, "writer": "w0"}
    for fold in (plain, lean):
        fold.apply(T.TRACE_START, dict(start))
        for rtype, payload in records:
            fold.apply(rtype, {k: (dict(v) if isinstance(v, dict) else v) for k, v in payload.items()})
    assert b"".join(iter_canonical(lean, batch=2)) == dumps(plain.to_dict())
    assert b"".join(iter_canonical(plain)) == dumps(plain.to_dict())


def test_trace_view_equals_load(pstore: walspan.Store) -> None:
    """TraceView (what show walks) holds the same trace as Store.load(), and its canonical JSON
    stream equals the compacted JSON file."""
    t = _trace(pstore, "v", 40)
    t.end()
    view = TraceView(pstore.directory, "v")
    doc = pstore.load("v")
    assert list(view.spans()) == doc["spans"] and len(view) == 40
    assert view.info == {k: v for k, v in doc.items() if k != "spans"}
    assert b"".join(view.canonical_json()) == pstore.trace_path("v").read_bytes()


# -- cursors ----------------------------------------------------------------------------------


def test_cursor_text_round_trip_and_bad_text() -> None:
    """A cursor survives str()/parse() and to_dict()/from_dict(); a malformed one is refused with
    a ValueError that quotes it."""
    c = Cursor(500, 7, 400, 0xDEADBEEF)
    assert Cursor.parse(str(c)) == c and Cursor.from_dict(c.to_dict()) == c
    assert Cursor.parse(str(Cursor.START)) == Cursor.START
    for bad in ["", "c1:1:2", "c2:500:7:400:deadbeef", "c1:500:x:400:00", "c1:400:7:500:00", "c1:40:0:4:00"]:
        with pytest.raises(ValueError, match="not a walspan cursor"):
            Cursor.parse(bad)


def test_records_after_every_cursor_are_the_suffix(pstore: walspan.Store) -> None:
    """From START every record of the valid prefix comes back decoded, in order; from the cursor
    of record k exactly the records after k; each cursor names its record's offsets."""
    _trace(pstore, "r", 20).end()
    wal = pstore.wal_path("r")
    offsets = record_offsets(wal)
    recs = list(read_records(pstore.directory, "r"))
    assert [(r.cursor.record, r.cursor.offset, r.seq) for r in recs] == [(o, e, s) for o, e, _t, s in offsets]
    assert recs[0].type == "trace_start" and recs[-1].type == "terminal" and recs[-1].payload["status"] == "completed"
    for k in range(0, len(recs), 7):
        assert [r.seq for r in read_records(pstore.directory, "r", after=recs[k].cursor)] == [r.seq for r in recs[k + 1 :]]
    assert end_cursor(pstore.directory, "r") == recs[-1].cursor
    assert end_cursor(pstore.directory, "r", back=3) == recs[-4].cursor
    assert end_cursor(pstore.directory, "r", back=len(recs)) == Cursor.START


def test_cursor_after_a_repair_cut_below_it_is_refused(pstore: walspan.Store) -> None:
    """When an explicit repair cuts the log below a cursor and new records are appended, reading
    after that cursor raises CursorMismatchError and yields nothing (never a record of the new
    tail taken for a continuation); a cursor below the cut still reads on."""
    t = _trace(pstore, "c", 10)
    recs = list(read_records(pstore.directory, "c"))
    wal = pstore.wal_path("c")
    k = 12
    flip_byte(wal, recs[k].cursor.record + 25)  # damage inside record k+1, with records after it
    pstore.repair("c")
    t.start_span("after-repair").end()
    with pytest.raises(CursorMismatchError):
        next(read_records(pstore.directory, "c", after=recs[-1].cursor))
    assert not check_cursor(pstore.directory, "c", recs[-1].cursor)
    assert check_cursor(pstore.directory, "c", recs[k - 1].cursor)
    after = list(read_records(pstore.directory, "c", after=recs[k - 1].cursor))
    assert [r.seq for r in after][0] == k + 1 and after[-1].type == "span_end"
    assert not any(r.payload == recs[k].payload for r in after)  # record k+1 (damaged) is gone


def test_cursor_of_a_replaced_log_is_refused(pstore: walspan.Store, store_dir: Path) -> None:
    """A session removed and created anew under the same id: the old cursor does not match,
    even where the new log is long enough to hold a record at the same offset."""
    _trace(pstore, "x", 5).end()
    old = list(read_records(store_dir, "x"))
    for p in store_dir.glob("x.*"):
        p.unlink()
    pstore.close()
    s2 = walspan.Store(store_dir, durability="process", install_hooks=False)
    _trace(s2, "x", 8)
    with pytest.raises(CursorMismatchError):
        list(read_records(store_dir, "x", after=old[-1].cursor))
    s2.close()


def _same_size_records(trace: walspan.Trace, n: int) -> None:
    for _ in range(n):
        trace.set_metadata(k="v")  # same payload length each time: only the time differs


def test_cursor_detects_a_log_cut_and_regrown_to_the_same_offsets(pstore: walspan.Store) -> None:
    """A repair cuts the log below the cursor and as many records of the same length are
    appended again: the record the cursor points after has the same offset, seq and end, and
    only its fingerprint tells it apart. The cursor is refused, and so is a summary from
    before the cut."""
    t = pstore.open("g")
    _same_size_records(t, 12)
    pstore.compact("g")
    side = Path(pstore.directory) / ".walspan" / "g.summary"
    stale_summary = side.read_bytes()
    recs = list(read_records(pstore.directory, "g"))
    wal = pstore.wal_path("g")
    size = wal.stat().st_size
    flip_byte(wal, recs[8].cursor.record + 25)
    assert pstore.repair("g") is not None
    _same_size_records(t, len(recs) - 8)
    again = list(read_records(pstore.directory, "g"))
    assert wal.stat().st_size == size and again[-1].cursor.to_dict() | {"check": 0} == recs[-1].cursor.to_dict() | {"check": 0}
    with pytest.raises(CursorMismatchError, match="a different record"):
        list(read_records(pstore.directory, "g", after=recs[-1].cursor))
    side.write_bytes(stale_summary)
    assert summary(pstore.directory, "g").source == "fold"


def test_torn_tail_beside_a_reader_is_neither_read_nor_a_mismatch(pstore: walspan.Store) -> None:
    """Garbage after the last record (a writer died mid-write) ends a read quietly; the next
    append truncates it, and the reader's cursor still matches and reads exactly that append."""
    t = _trace(pstore, "torn", 2)
    wal = pstore.wal_path("torn")
    recs = list(read_records(pstore.directory, "torn"))
    with open(wal, "ab") as f:
        f.write(b"\x13\x00\x00\x00garbage")
    assert list(read_records(pstore.directory, "torn", after=recs[-1].cursor)) == []
    t.set_metadata(k="v")
    new = list(read_records(pstore.directory, "torn", after=recs[-1].cursor))
    assert [(r.seq, r.type, r.payload["metadata"]) for r in new] == [(recs[-1].seq + 1, "metadata", {"k": "v"})]


# -- the follower -------------------------------------------------------------------------------


def test_follower_reads_appends_and_new_sessions_once_each(pstore: walspan.Store) -> None:
    """A follower started at the end yields only what is appended afterwards, each record once,
    in order; a session created later is announced and read from its first record; with
    back=N the first poll starts with each session's last N records."""
    t = _trace(pstore, "a", 3)
    f = Follower(pstore.directory)
    assert f.poll() == []
    with t.span("x"):
        pass
    items = f.poll()
    assert [i.type for i in items] == ["span_start", "span_end"]
    assert f.poll() == []
    pstore.open("b")
    items = f.poll()
    assert _notices(items) == [("b", "new")] and _seqs(items) == [1, 2]
    last = f.cursors["a"].seq
    assert [r.seq for r in Follower(pstore.directory, back=2).poll() if r.session_id == "a"] == [last - 1, last]


def test_follower_resyncs_exactly_after_a_repair_cut(pstore: walspan.Store) -> None:
    """After a repair cuts the log below the follower's position, it resumes after the newest
    record still in the log (a `resync` notice), then yields the records appended since, with
    no record repeated or skipped."""
    t = _trace(pstore, "c", 10)
    f = Follower(pstore.directory, from_start=True)
    seen = f.poll()
    k = 8
    flip_byte(pstore.wal_path("c"), seen[k].cursor.record + 25)  # record k+1 is damaged: cut there
    assert pstore.repair("c") is not None
    t.start_span("new").end()
    items = f.poll()
    assert _notices(items) == [("c", "resync")] and f"after seq {k}" in items[0].message
    assert _seqs(items) == [k + 1, k + 2]
    assert [r.payload for r in items[1:]] == [r.payload for r in list(read_records(pstore.directory, "c"))[k:]]


def test_follower_restarts_when_the_cut_is_below_its_history(pstore: walspan.Store) -> None:
    """With the cut below every cursor it kept, the follower re-reads the log from its first
    record and says records may repeat (a `restart` notice), never skipping silently."""
    t = _trace(pstore, "c", 10)
    f = Follower(pstore.directory, from_start=True, history=3)
    seen = f.poll()
    flip_byte(pstore.wal_path("c"), seen[5].cursor.record + 25)
    assert pstore.repair("c") is not None
    t.start_span("new").end()
    items = f.poll()
    assert _notices(items) == [("c", "restart")] and "may repeat" in items[0].message
    assert _seqs(items) == list(range(1, 8))  # the 5 records kept, then the 2 appended


def test_follower_announces_removed_and_replaced_sessions(pstore: walspan.Store, store_dir: Path) -> None:
    """A WAL removed (pruned) gives a `removed` notice; a new log under a known session id a
    `replaced` notice (or `new`, once the removal was seen) and its records from the first."""
    _trace(pstore, "p", 1).end()
    f = Follower(store_dir, from_start=True)
    f.poll()
    for p in store_dir.glob("p.*"):
        p.unlink()
    assert _notices(f.poll()) == [("p", "removed")]
    pstore.close()
    s2 = walspan.Store(store_dir, durability="process", install_hooks=False)
    _trace(s2, "p", 1).end()
    items = f.poll()
    assert _notices(items) == [("p", "new")] and _seqs(items)[0] == 1
    for p in store_dir.glob("p.*"):
        p.unlink()
    s2.close()
    s3 = walspan.Store(store_dir, durability="process", install_hooks=False)
    _trace(s3, "p", 2)
    items = f.poll()
    assert _notices(items) == [("p", "replaced")] and _seqs(items)[0] == 1
    s3.close()
    # another trace's bytes written into the same file (same inode): told apart by its trace id
    elsewhere = walspan.Store(store_dir / "elsewhere", durability="process", install_hooks=False)
    _trace(elsewhere, "p", 4)
    elsewhere.close()
    (store_dir / "p.wal").write_bytes((store_dir / "elsewhere" / "p.wal").read_bytes())
    items = f.poll()
    assert _notices(items) == [("p", "replaced")] and _seqs(items) == list(range(1, 16))  # 4 spans, start, attach, detach


def test_follower_reports_corruption_once_and_goes_on_after_repair(pstore: walspan.Store, store_dir: Path) -> None:
    """A corrupt session yields its records before the damage, then one `error` notice (not one
    per poll) while the other sessions go on; once repaired, what is appended is read."""
    _trace(pstore, "bad", 3).end()
    _trace(pstore, "good", 1)
    wal = pstore.wal_path("bad")
    flip_byte(wal, record_offsets(wal)[3][0] + 25)
    f = Follower(store_dir, from_start=True)
    items = f.poll()
    assert _notices(items) == [("bad", "error")]
    assert [i.seq for i in items if isinstance(i, Record) and i.session_id == "bad"] == [1, 2, 3]
    assert {i.session_id for i in items if isinstance(i, Record)} == {"bad", "good"}
    os.utime(wal, ns=(1, 1))  # a change the follower notices, with the damage still there
    assert f.poll() == []
    assert pstore.repair("bad") is not None
    pstore.open("bad")  # the terminal record was cut away with the damage: the trace runs again
    items = f.poll()
    assert [(i.seq, i.type) for i in items] == [(4, "writer_attach")]


# -- summaries ------------------------------------------------------------------------------------


def test_summary_of_a_compacted_trace_comes_from_the_side_file(pstore: walspan.Store) -> None:
    """A compacted, unchanged trace is summarised from .walspan/S.summary (no fold), with the
    same figures a fold gives."""
    _trace(pstore, "s", 5).end()
    s = summary(pstore.directory, "s")
    fold, _ = fold_wal(str(pstore.wal_path("s")))
    assert s.source == "summary"
    assert (s.status, s.spans, s.trace_id, s.start_time, s.end_time) == ("completed", 5, fold.trace_id, fold.start_time, fold.end_time)


def test_stale_summary_falls_back_to_folding(pstore: walspan.Store, store_dir: Path) -> None:
    """A summary is used only while the WAL ends exactly after the record it fingerprints: after
    an append, after the log is replaced by one of the same size, or when the file is torn or
    missing, the log is folded (and the figures are the log's)."""
    t = _trace(pstore, "s", 2)
    pstore.compact("s")
    assert summary(store_dir, "s").source == "summary"
    t.start_span("more")
    s = summary(store_dir, "s")
    assert (s.source, s.spans) == ("fold", 3)
    pstore.compact("s")
    assert summary(store_dir, "s").source == "summary"
    side = store_dir / ".walspan" / "s.summary"
    side.write_bytes(side.read_bytes()[:40])  # torn
    assert summary(store_dir, "s").source == "fold"
    pstore.compact("s")  # up to date already: only writes the missing or unusable summary back
    side.unlink()
    pstore.compact("s")
    assert summary(store_dir, "s").source == "summary"
    # the same number of bytes, but another log: the fingerprint of the last record differs
    other = walspan.Store(store_dir / "other", durability="process", install_hooks=False)
    o = _trace(other, "s", 2)
    o.start_span("more")
    other.close()
    src, dst = other.wal_path("s"), pstore.wal_path("s")
    pstore.close()
    assert src.stat().st_size == dst.stat().st_size
    dst.write_bytes(src.read_bytes())
    s = summary(store_dir, "s")
    assert s.source == "fold" and s.trace_id == other.load("s")["trace_id"]


# -- the follower's promise, under random interleavings ------------------------------------------

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["append", "append", "compact", "torn", "damage", "damage"]),
        st.integers(1, 6),  # how many appends
        st.floats(0, 1),  # where the damage goes, as a share of the log
        st.booleans(),  # poll afterwards
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, history=st.sampled_from([1, 4, 256]))
def test_follower_stream_always_rebuilds_the_log(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, float, bool]], history: int) -> None:
    """Whatever happens beside a follower (appends, compactions, torn tails, damage cut away by a
    repair or by the next append's torn-tail truncation, corruption reported and then repaired),
    replaying its stream, where a `resync` notice drops what followed its seq and a `restart`
    drops everything, gives exactly the records in the log: consecutive seqs, no record skipped
    or repeated without a notice."""
    d = tmp_path_factory.mktemp("follow")
    store = walspan.Store(d, durability="process", install_hooks=False)
    t = store.open("s")
    f = Follower(d, from_start=True, history=history)
    model: list[dict[str, Any]] = []
    counter = 0

    def replay() -> None:
        nonlocal model
        corrupt = False
        for item in f.poll():
            if isinstance(item, Notice) and item.kind == "error":
                corrupt = True  # an append after damaged bytes (a writer trusts its shared state)
            elif isinstance(item, Notice):
                assert item.kind in ("resync", "restart"), item
                assert item.seq is not None and item.seq <= len(model)
                model = model[: item.seq]
            else:
                assert item.seq == len(model) + 1, (item.seq, len(model))
                model.append(item.payload)
        if corrupt:
            assert store.repair("s") is not None
            replay()

    for op, count, where, poll in ops:
        wal = store.wal_path("s")
        if op == "append":
            for _ in range(count):
                counter += 1
                try:
                    t.set_metadata(n=counter)
                except walspan.CorruptWALError:
                    store.repair("s")  # damage inside the synced region: cut it away explicitly
                    t.set_metadata(n=counter)
        elif op == "compact":
            try:
                store.compact("s")
            except walspan.CorruptWALError:
                pass
        elif op == "torn":
            with open(wal, "ab") as fh:
                fh.write(b"\x00\x01\x02")
        else:
            try:
                offsets = record_offsets(wal)
            except walspan.CorruptWALError:  # earlier damage an append wrote past: cut it first
                store.repair("s")
                offsets = record_offsets(wal)
            if len(offsets) > 3:
                at = offsets[2 + int(where * (len(offsets) - 3))][0] + 21
                flip_byte(wal, at)
                if store.repair("s") is None:
                    # The reader took the damage for a torn tail (the last record, or a search
                    # that missed the records after it): what happens next is the storage
                    # layer's business, not the follower's. Undo it.
                    flip_byte(wal, at)
        if poll:
            replay()
    counter += 1
    try:
        t.set_metadata(n=counter)
    except walspan.CorruptWALError:
        store.repair("s")
        t.set_metadata(n=counter)
    replay()
    assert model == [r.payload for r in read_records(d, "s")]
    store.close()
