"""The compactor (invariants 4 and 5) and the fold: the JSON is a deterministic, monotonic,
rebuildable view of the WAL, and compaction never makes appends wait."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from walfiles import record_offsets

import walspan
from walspan import _compactor
from walspan._fold import dumps

TIMEOUT = 60


def _fill(store: walspan.Store, sid: str, n: int = 3) -> walspan.Trace:
    t = store.open(sid, metadata={"m": 1})
    for i in range(n):
        with t.span(f"s{i}", attributes={"i": i}) as sp:
            sp.add_event("e", {"i": i})
    return t


def _full_fold_bytes(wal: Path) -> bytes:
    fold, _ = _compactor.fold_wal(str(wal))
    return dumps(fold.to_dict())


def test_json_equals_load_and_reflects_the_wal(pstore: walspan.Store) -> None:
    """The compacted JSON parses to exactly load()'s dict, names the WAL position it reflects,
    and is the canonical bytes of the full fold."""
    _fill(pstore, "j")
    path = pstore.compact("j")
    doc = json.loads(path.read_bytes())
    assert doc == pstore.load("j")
    recs = record_offsets(pstore.wal_path("j"))
    assert doc["wal"]["offset"] == recs[-1][1] and doc["wal"]["seq"] == recs[-1][3]
    assert path.read_bytes() == _full_fold_bytes(pstore.wal_path("j"))


def test_json_is_a_cache_deleted_and_rebuilt_identically(pstore: walspan.Store) -> None:
    """Deleting the JSON loses nothing: compacting again rebuilds the same bytes (invariant 4)."""
    t = _fill(pstore, "d")
    path = t.end()
    before = path.read_bytes()
    os.unlink(path)
    assert pstore.compact("d").read_bytes() == before


def test_incremental_compaction_equals_full_fold(pstore: walspan.Store) -> None:
    """Compacting after every few appends (each from the previous JSON as checkpoint) gives the
    same bytes as one full fold of the final WAL, including spans left open across checkpoints."""
    t = pstore.open("inc")
    open_span = t.start_span("long", parent=None)
    for i in range(6):
        sp = t.start_span(f"s{i}", parent=open_span, attributes={"i": i})
        pstore.compact("inc")
        sp.set_attributes({"j": i})
        sp.add_event("ev")
        pstore.compact("inc")
        sp.end(output=i)
    t.set_metadata(k="v")
    pstore.compact("inc")
    open_span.end()
    path = pstore.compact("inc")
    assert path.read_bytes() == _full_fold_bytes(pstore.wal_path("inc"))


def test_stale_checkpoint_is_caught_up(pstore: walspan.Store) -> None:
    """A stale JSON (an older compaction put back in place) is only a checkpoint: the next
    compaction folds the records after it and the result equals a full fold."""
    t = _fill(pstore, "st", 2)
    old = pstore.compact("st").read_bytes()
    _fill(pstore, "st", 2).start_span("x").end()
    t.set_metadata(after=True)
    path = pstore.trace_path("st")
    pstore.compact("st")
    path.write_bytes(old)
    pstore.compact("st")
    assert path.read_bytes() == _full_fold_bytes(pstore.wal_path("st"))


def test_garbage_json_is_rebuilt(pstore: walspan.Store) -> None:
    """An unreadable or foreign JSON is not trusted as a checkpoint: compaction rebuilds it."""
    _fill(pstore, "g")
    path = pstore.trace_path("g")
    for junk in (b"{not json", b"[]", json.dumps({"format": "walspan-trace/1"}).encode()):
        path.write_bytes(junk)
        pstore.compact("g")
        assert path.read_bytes() == _full_fold_bytes(pstore.wal_path("g"))


# A second compactor, in its own process: "crash" attaches to session "mono" and crashes it
# (a terminal record, then the compaction that publishes it); "compact" only compacts. It prints
# "waiting for the compaction lock" just before it asks for that lock, then "done ...".
SECOND_COMPACTOR = textwrap.dedent("""
    import os, sys, walspan
    from walspan import _compactor, _locking
    store_dir, action = sys.argv[1], sys.argv[2]
    real_lock = _locking.lock

    def lock(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".compact"):
            print("waiting for the compaction lock", flush=True)
        real_lock(fd)

    _locking.lock = lock
    store = walspan.Store(store_dir, durability="process", install_hooks=False)
    if action == "crash":
        store.open("mono").crash("killed")
        print("done", flush=True)
    else:
        rewritten = _compactor.compact(store.directory, "mono").rewritten
        print(f"done rewritten={rewritten}", flush=True)
    store.close()
""")


def _compaction_lock_held(store: walspan.Store, stem: str) -> bool:
    """Whether some open file holds the session's compaction lock (a non-blocking flock fails)."""
    fd = os.open(os.path.join(store.directory, ".walspan", stem + ".compact"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our lock if we got it
    return False


class _Paused:
    """Makes the next compaction in this process stop between its tmp file's fsync and its
    rename (the `before_rename` hook), holding the compaction lock, until released."""

    def __init__(self) -> None:
        self.held, self.release = threading.Event(), threading.Event()

    def __enter__(self) -> _Paused:
        def hook(_path: str) -> None:
            self.held.set()
            assert self.release.wait(TIMEOUT)

        _compactor.before_rename = hook
        return self

    def __exit__(self, *exc: object) -> None:
        _compactor.before_rename = None
        self.release.set()


def _second_compactor(store: walspan.Store, action: str) -> tuple[subprocess.Popen[str], str]:
    """Start SECOND_COMPACTOR; return it and its first line, read once it either is about to
    wait for the compaction lock or is done without it (both deterministic: no sleep)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SECOND_COMPACTOR, store.directory, action],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


def test_a_stale_compaction_holding_the_lock_cannot_clobber_a_newer_json(pstore: walspan.Store) -> None:
    """Invariant 4, first order of the M1 race: a compaction that folded the running trace is
    paused before its rename, holding the compaction lock (checked with a non-blocking flock);
    another process then crashes the trace, and its compaction must wait for that lock. The stale
    JSON (running) is published first, the crashed one after it: the JSON ends crashed, equal to
    load(). Without the lock, the crashed JSON would land first and the stale one over it."""
    t = _fill(pstore, "mono", 2)
    with _Paused() as paused:
        stale = threading.Thread(target=pstore.compact, args=("mono",))
        stale.start()
        assert paused.held.wait(TIMEOUT)
        lock_held = _compaction_lock_held(pstore, "mono")
        newer, first = _second_compactor(pstore, "crash")
        paused.release.set()
        stale.join(TIMEOUT)
        out, err = newer.communicate(timeout=TIMEOUT)
    assert newer.returncode == 0, err
    doc = json.loads(pstore.trace_path("mono").read_bytes())
    assert doc["status"] == "crashed", "a stale compaction's JSON replaced a newer one"
    assert doc == pstore.load("mono")
    assert (lock_held, first, out) == (True, "waiting for the compaction lock\n", "done\n")
    t.close()


def test_a_compaction_queued_behind_a_newer_one_publishes_nothing(pstore: walspan.Store) -> None:
    """Invariant 4, the other order: the compaction publishing the crashed trace is paused before
    its rename, holding the lock (the JSON on disk still says running); a compaction started
    meanwhile in another process waits for the lock, then finds the JSON already reflects the
    whole WAL and rewrites nothing. Without the lock it would fold and publish concurrently."""
    t = _fill(pstore, "mono", 2)
    pstore.compact("mono")
    assert json.loads(pstore.trace_path("mono").read_bytes())["status"] == "running"
    with _Paused() as paused:
        newer = threading.Thread(target=t.crash, args=("killed",))
        newer.start()
        assert paused.held.wait(TIMEOUT)
        lock_held = _compaction_lock_held(pstore, "mono")
        later, first = _second_compactor(pstore, "compact")
        paused.release.set()
        newer.join(TIMEOUT)
        out, err = later.communicate(timeout=TIMEOUT)
    assert later.returncode == 0, err
    doc = json.loads(pstore.trace_path("mono").read_bytes())
    assert doc["status"] == "crashed" and doc == pstore.load("mono")
    assert (lock_held, first, out) == (True, "waiting for the compaction lock\n", "done rewritten=False\n")


CONCURRENT_COMPACT = textwrap.dedent("""
    import sys, walspan
    from walspan import _compactor
    s = walspan.Store(sys.argv[1], durability="process", install_hooks=False)
    t = s.open("cc")
    for i in range(int(sys.argv[2])):
        t.start_span(f"{sys.argv[3]}{i}", parent=None).end()
        s.compact("cc")
    t.close(); s.close()
""")


def test_concurrent_compactions_end_complete(pstore: walspan.Store) -> None:
    """Invariant 4: several processes appending and compacting the same session concurrently
    leave a JSON that reflects the whole WAL and equals its full fold; every intermediate
    compaction was a valid canonical document (verify finds nothing wrong)."""
    pstore.open("cc").close()
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_COMPACT, pstore.directory, "8", f"p{k}-"])
        for k in range(3)
    ]
    for p in procs:
        assert p.wait(TIMEOUT) == 0
    path = pstore.compact("cc")
    wal = pstore.wal_path("cc")
    assert path.read_bytes() == _full_fold_bytes(wal)
    assert len(pstore.load("cc")["spans"]) == 24
    from walspan import _verify
    assert _verify.verify_dir(pstore.directory).ok


APPENDER = textwrap.dedent("""
    import sys, walspan
    s = walspan.Store(sys.argv[1], install_hooks=False)
    t = s.open("busy")
    for i in range(20):
        t.start_span(f"during{i}", parent=None).end()
    t.close(); s.close()
    print("done", flush=True)
""")


def test_appends_never_wait_for_compaction(store: walspan.Store) -> None:
    """Invariant 5: while a compaction of the session is held (blocked inside before_rename,
    holding the compaction lock), another process opens the trace and completes 20 durable
    appends. The held compaction then finishes and a later one catches up."""
    t = _fill(store, "busy", 2)
    held, release = threading.Event(), threading.Event()

    def hook(_path: str) -> None:
        held.set()
        release.wait(TIMEOUT)

    _compactor.before_rename = hook
    try:
        result: list[object] = []
        th = threading.Thread(target=lambda: result.append(store.compact("busy")))
        th.start()
        assert held.wait(TIMEOUT)
        out = subprocess.run([sys.executable, "-c", APPENDER, store.directory], capture_output=True, text=True, timeout=TIMEOUT, check=False)
        still_held = th.is_alive()
        release.set()
        th.join(TIMEOUT)
    finally:
        _compactor.before_rename = None
        release.set()
    assert out.returncode == 0 and out.stdout == "done\n", out.stderr
    assert still_held  # the appends completed while the compaction was blocked
    assert isinstance(result[0], Path)
    names = [s["name"] for s in store.load("busy")["spans"]]
    assert names[-20:] == [f"during{i}" for i in range(20)]
    t.end()
    assert json.loads(store.trace_path("busy").read_bytes()) == store.load("busy")


# -- hypothesis: random API operation sequences against a simple model -------------------------

_key = st.sampled_from(["a", "b", "c"])
_val = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3))
_attrs = st.dictionaries(_key, _val, max_size=3)

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.integers(0, 10), _attrs, _val),
        st.tuples(st.just("attrs"), st.integers(0, 10), _attrs),
        st.tuples(st.just("event"), st.integers(0, 10), _attrs),
        st.tuples(st.just("end"), st.integers(0, 10), st.sampled_from(["ok", "error"]), _val),
        st.tuples(st.just("meta"), _attrs),
        st.tuples(st.just("compact")),
    ),
    max_size=25,
)

_counter = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, final=st.sampled_from([None, "completed", "error", "crashed"]))
def test_random_operations_fold_like_the_model(tmp_path: Path, ops: list[tuple], final: str | None) -> None:
    """Property: any sequence of API calls folds to the state a plain model predicts; load()
    equals the compacted JSON; incremental compactions give the same bytes as a full fold; and
    the JSON is deterministic (a copy of the same WAL compacts to the same bytes)."""
    d = tmp_path / f"ex{next(_counter)}"
    store = walspan.Store(d, durability="process", install_hooks=False)
    t = store.open("h", metadata={"m": 0})
    spans: list[walspan.Span] = []
    model: list[dict] = []
    meta: dict = {"m": 0}
    for op in ops:
        kind = op[0]
        if kind == "start":
            parent = spans[op[1] % len(spans)] if spans and op[1] % 2 else None
            spans.append(t.start_span(f"s{len(spans)}", parent=parent, attributes=op[2], input=op[3]))
            model.append({"parent": parent.span_id if parent else None, "attributes": dict(op[2]), "events": [], "status": "open", "input": op[3], "output": None})
        elif kind in ("attrs", "event", "end") and spans:
            i = op[1] % len(spans)
            ended = model[i]["status"] != "open"  # after end() the API ignores the call (logged)
            if kind == "attrs":
                spans[i].set_attributes(op[2])
                if not ended:
                    model[i]["attributes"].update(op[2])
            elif kind == "event":
                spans[i].add_event("ev", op[2])
                if not ended:
                    model[i]["events"].append(op[2])
            else:
                if model[i]["status"] == "open":
                    model[i]["status"], model[i]["output"] = op[2], op[3]
                spans[i].end(status=op[2], output=op[3])
        elif kind == "meta":
            t.set_metadata(op[1])
            meta.update(op[1])
        elif kind == "compact":
            store.compact("h")
    status = "running"
    if final:
        t.end(final, "bye") if final != "crashed" else t.crash("bye")
        status = final
        for m in model:
            if m["status"] == "open":
                m["status"] = "interrupted"
    doc = store.load("h")
    assert doc["status"] == status and doc["metadata"] == meta
    got = [
        {"parent": s["parent_span_id"], "attributes": s["attributes"], "events": [e["attributes"] for e in s["events"]],
         "status": s["status"], "input": s["input"], "output": s["output"]}
        for s in doc["spans"]
    ]
    assert got == model
    assert [s["span_id"] for s in doc["spans"]] == [s.span_id for s in spans]
    path = store.compact("h")
    raw = path.read_bytes()
    assert json.loads(raw) == doc
    wal = store.wal_path("h")
    assert raw == _full_fold_bytes(wal)
    copy = d.parent / f"{d.name}-copy"
    copy.mkdir()
    shutil.copyfile(wal, copy / wal.name)
    c = walspan.Store(copy, durability="process", install_hooks=False)
    assert c.compact("h").read_bytes() == raw
    store.close()
    c.close()


@pytest.mark.parametrize("durability, wal_flushes", [("durable", 0), ("process", 1)])
def test_compaction_flushes_the_wal_only_when_it_is_not_yet_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str, wal_flushes: int
) -> None:
    """Before publishing, compaction makes the WAL durable up to what the JSON shows (invariant
    4): in durable mode the appends' own flushes already did (durable_end covers the fold), so
    it issues no fdatasync of the WAL; in process mode it issues exactly one."""
    from walspan import _fsutil

    store = walspan.Store(tmp_path / "d", durability=durability, install_hooks=False)
    t = store.open("s")
    for i in range(3):
        t.start_span(f"s{i}").end()
    wal = str(store.wal_path("s"))
    flushes: list[str] = []
    monkeypatch.setattr(_fsutil.faults, "hook", lambda op, path: flushes.append(path) if op == "fsync" else None)
    store.compact("s")
    assert flushes.count(wal) == wal_flushes
    assert json.loads(store.trace_path("s").read_bytes())["wal"]["offset"] == os.path.getsize(wal)
    t.close()


def test_a_json_showing_lost_records_is_kept_aside_and_rebuilt(
    pstore: walspan.Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """A completed trace's WAL loses its last records (cut by hand below what its JSON shows):
    verify reports the JSON as showing records the WAL does not hold; `walspan compact` keeps
    that JSON, byte for byte, as <json>.stale-<seq> (evidence, never overwritten), says so in
    one line, and rebuilds the JSON from the WAL; verify is then clean."""
    from walspan.cli import main

    t = _fill(pstore, "lost", 4)
    t.end()
    wal, json_path = pstore.wal_path("lost"), pstore.trace_path("lost")
    shown = json_path.read_bytes()
    seq = json.loads(shown)["wal"]["seq"]
    os.truncate(wal, record_offsets(wal)[-2][0] + 5)  # the last two records are gone
    report = pstore.verify()
    assert not report.ok and "does not hold" in report.errors[0]
    assert main(["compact", pstore.directory, "lost"]) == 0
    err = capsys.readouterr().err
    aside = Path(f"{json_path}.stale-{seq}")
    assert aside.read_bytes() == shown and str(aside) in err
    assert json_path.read_bytes() == dumps(pstore.load("lost"))
    assert json.loads(json_path.read_bytes())["status"] == "running"
    assert pstore.verify().ok


def test_a_stale_json_is_not_the_checkpoint_of_new_records_at_its_offsets(pstore: walspan.Store) -> None:
    """After a cut, offsets and sequence numbers are reused: a record with the same seq, at the
    same offset and of the same length as the one a JSON names as its last can hold other
    content. Compaction must not take that JSON for its checkpoint (it checks the record's
    header checksum too): the rebuilt JSON equals a full fold of the WAL, and the old one is
    kept aside."""
    from walspan import _format
    from walspan._format import encode_record, unpack_payload

    t = _fill(pstore, "alias", 3)
    t.close()  # the last record: this writer's detach
    pstore.close()
    wal, json_path = pstore.wal_path("alias"), pstore.trace_path("alias")
    pstore.compact("alias")
    old = json.loads(json_path.read_bytes())
    last, seq = old["wal"]["last_record"], old["wal"]["seq"]
    data = wal.read_bytes()
    salt = _format.decode_file_header(data[:32])
    payload = unpack_payload(data[last + _format.RECORD_HEADER_SIZE :])
    other = dict(payload, writer=payload["writer"][::-1])  # another writer detaching: same length
    body = _format.pack_payload(other)
    assert len(body) == len(data) - last - _format.RECORD_HEADER_SIZE
    # the log is cut at that record, and a different record of the same seq and size takes its place
    wal.write_bytes(data[:last] + encode_record(salt, _format.RecordType.WRITER_DETACH, seq, body))
    rebuilt = pstore.compact("alias").read_bytes()
    assert rebuilt == _full_fold_bytes(wal) != json.dumps(old).encode()
    assert json.loads(Path(f"{json_path}.stale-{seq}").read_bytes()) == old
