"""`walspan prune`: only ended traces, never one with a live writer, crash-safe at every step
(a prune SIGKILLed between any two removals leaves a store that reads cleanly and that the
next prune finishes), and it says what it removed and the space freed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from crashkit import script_env, spawn_script
from walfiles import flip_byte, record_offsets

import walspan
from walspan import _prune, _retention
from walspan.cli import main
from walspan.read import summaries

MONTH = 31 * 86400


def _ended(store: walspan.Store, sid: str, spans: int = 3, status: str = "completed") -> None:
    t = store.open(sid)
    for i in range(spans):
        with t.span(f"s{i}", attributes={"i": i}):
            pass
    t.end(status)


def _files_of(directory: Path, stem: str) -> list[str]:
    found = [p.name for p in directory.iterdir() if p.name.startswith(stem + ".")]
    found += [p.name for p in (directory / ".walspan").iterdir() if p.name.startswith(stem + ".")]
    return sorted(found)


def test_prune_selects_ended_traces_by_age_status_and_keep(pstore: walspan.Store, store_dir: Path) -> None:
    """Only traces with a terminal record that ended before the cutoff go; running and idle
    traces stay whatever their age; --status narrows, --keep N spares the N newest; a dry run
    removes nothing and reports the sizes a real run then frees."""
    _ended(pstore, "a-completed")
    _ended(pstore, "b-error", status="error")
    time.sleep(0.01)  # distinct end times for --keep (ordering only; nothing waits on it)
    _ended(pstore, "c-crashed", status="crashed")
    pstore.open("d-running").start_span("open")
    pstore.open("e-idle").close()
    later = time.time() + MONTH
    assert _prune.prune(str(store_dir), older_than=30 * 86400).removed == []  # nothing is 30 days old
    dry = _prune.prune(str(store_dir), older_than=30 * 86400, keep=1, now=later, dry_run=True)
    assert {t.session_id for t in dry.removed} == {"a-completed", "b-error"} and dry.kept == [("c-crashed", "among the 1 newest")]
    assert all(os.path.exists(f.path) for t in dry.removed for f in t.files)
    only = _prune.prune(str(store_dir), older_than=30 * 86400, statuses=("error",), now=later)
    assert [t.session_id for t in only.removed] == ["b-error"]
    assert only.bytes_freed == dry.removed[[t.session_id for t in dry.removed].index("b-error")].bytes
    rest = _prune.prune(str(store_dir), older_than=30 * 86400, now=later)
    assert sorted(t.session_id for t in rest.removed) == ["a-completed", "c-crashed"]
    assert sorted(s.session_id for s in summaries(store_dir)) == ["d-running", "e-idle"]
    for stem in ("a-completed", "b-error", "c-crashed"):
        assert _files_of(store_dir, stem) == []
    assert walspan.Store(store_dir, install_hooks=False, create=False).verify().ok


def test_prune_never_removes_a_trace_with_a_live_writer(store_dir: Path) -> None:
    """A trace ended by one process while another process is still attached and alive is kept
    (and removed once that process is gone); the process that ended a trace does not count; a
    running trace appended to all through the prune keeps every acknowledged span and verifies."""
    store = walspan.Store(store_dir, durability="process", install_hooks=False)
    _ended(store, "gone")  # this (live) process ended it: prunable
    holder = spawn_script(
        "import sys, threading, walspan\n"
        "s = walspan.Store(sys.argv[1], durability='process', install_hooks=False)\n"
        "t = s.open('shared'); r = s.open('running'); stop = threading.Event(); n = [0]; first = threading.Event()\n"
        "def burst():\n"
        "    while not stop.is_set():\n"
        "        with r.span('beside'): pass\n"
        "        n[0] += 1; first.set()\n"
        "th = threading.Thread(target=burst); th.start(); first.wait()\n"
        "print('appending', flush=True)\n"
        "sys.stdin.readline(); stop.set(); th.join()\n"
        "print(n[0], flush=True)\n"
        "sys.stdin.read()\n",
        str(store_dir),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "appending"
        ender = walspan.Store(store_dir, durability="process", install_hooks=False)
        ender.open("shared").end()
        ender.close()
        report = _prune.prune(str(store_dir), older_than=0)  # while `running` is appended to
        assert [t.session_id for t in report.removed] == ["gone"]
        assert report.kept == [("shared", "a writer process attached to it is still alive")]
        assert holder.stdin is not None
        holder.stdin.write("stop\n")
        holder.stdin.flush()
        appended = int(holder.stdout.readline())
        holder.stdin.close()
        assert holder.wait(60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    assert [sp["name"] for sp in store.load("running")["spans"]] == ["beside"] * appended
    assert [t.session_id for t in _prune.prune(str(store_dir), older_than=0).removed] == ["shared"]
    assert store.verify().ok and [s.session_id for s in summaries(store_dir)] == ["running"]
    store.close()


def test_a_process_reopens_a_pruned_session_as_a_new_trace(store_dir: Path) -> None:
    """A process that ended a trace (its descriptors still cached) and opens the same session
    after a prune gets a new trace in a new log, not the old one's closed state."""
    store = walspan.Store(store_dir, durability="process", install_hooks=False)
    t = store.open("x")
    old_id = t.trace_id
    t.end()
    assert [r.session_id for r in _prune.prune(str(store_dir), older_than=0).removed] == ["x"]
    t2 = store.open("x")
    with t2.span("again"):
        pass
    doc = store.load("x")
    assert t2.trace_id == doc["trace_id"] != old_id
    assert doc["status"] == "running" and [s["name"] for s in doc["spans"]] == ["again"]
    store.close()
    assert walspan.Store(store_dir, install_hooks=False, create=False).verify().ok


STEPS = ["json", "broken", "summary", "shm", "lock", "compact", "fsync", "wal", "after-wal"]

_KILLER = """
import os, signal, sys
from walspan import _prune, _retention
step = sys.argv[2]
def hook(s, path):
    if s == step and (step in ("fsync", "after-wal") or "victim" in path):
        os.kill(os.getpid(), signal.SIGKILL)
_retention.step_hook = hook
_prune.prune(sys.argv[1], older_than=0)
print("finished without being killed")
"""


@pytest.mark.parametrize("step", STEPS)
def test_prune_killed_at_any_step_leaves_a_store_that_reads_cleanly(store_dir: Path, step: str) -> None:
    """A prune SIGKILLed just before any of its removals (JSON, repair evidence, summary, shared
    state, locks, the directory fsync, the WAL) or just after the WAL's: the store verifies clean,
    the trace is either whole (same fold as before) or entirely gone, the other traces are
    untouched, and the next prune removes every file of it."""
    store = walspan.Store(store_dir, durability="process", install_hooks=False)
    t = store.open("victim")
    for i in range(6):
        with t.span(f"s{i}"):
            pass
    wal = store.wal_path("victim")
    flip_byte(wal, record_offsets(wal)[4][0] + 25)
    assert store.repair("victim") is not None  # leaves victim.wal.broken-<offset> beside it
    store.close()
    store = walspan.Store(store_dir, durability="process", install_hooks=False)
    _ended(store, "victim", 2)
    store.open("keeper").start_span("work")
    store.close()  # keeper's writer detaches: from here on nothing changes it
    before = store.load("victim")
    keeper = store.load("keeper")
    assert {"victim.json", "victim.summary", "victim.shm", "victim.lock", "victim.compact", "victim.wal"} <= set(_files_of(store_dir, "victim"))
    assert any(n.startswith("victim.wal.broken-") for n in _files_of(store_dir, "victim"))

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLER), str(store_dir), step], capture_output=True, text=True, env=script_env(), timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr

    reader = walspan.Store(store_dir, install_hooks=False, create=False)
    assert reader.verify().ok, reader.verify().errors
    listed = {s.session_id: s for s in summaries(store_dir)}
    if step == "after-wal":
        assert "victim" not in listed
    else:
        assert listed["victim"].status == "completed" and reader.load("victim") == before
    assert reader.load("keeper") == keeper
    assert main(["ls", str(store_dir)]) == 0

    again = _prune.prune(str(store_dir), older_than=0)
    assert [t.session_id for t in again.removed] == ([] if step == "after-wal" else ["victim"])
    assert _files_of(store_dir, "victim") == []
    assert [s.session_id for s in summaries(store_dir)] == ["keeper"] and reader.load("keeper") == keeper
    assert reader.verify().ok


def test_prune_cli_says_what_it_removed_and_the_space_freed(pstore: walspan.Store, store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Text: one line per trace and a total; --json: typed fields (bytes as ints, UTC ISO times
    with a zone); bad arguments are one line with exit 2."""
    _ended(pstore, "one")
    _ended(pstore, "two")
    sizes = sum(os.path.getsize(store_dir / f) for f in ("two.wal", "two.json")) + sum(
        os.path.getsize(store_dir / ".walspan" / f) for f in ("two.summary", "two.shm", "two.lock", "two.compact")
    )
    assert main(["prune", str(store_dir), "--older-than", "0s", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and {t["session_id"] for t in dry["removed"]} == {"one", "two"}
    two = next(t for t in dry["removed"] if t["session_id"] == "two")
    assert two["bytes"] == sizes and isinstance(two["bytes"], int) and two["ended"].endswith("Z")
    assert main(["prune", str(store_dir), "--older-than", "0s", "--keep", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].startswith("removed one (completed, ended ") and out[1] == "kept two: among the 1 newest"
    assert out[2].startswith("1 trace(s) removed, ") and out[2].endswith(" freed")
    for argv in (["--older-than", "soon"], ["--older-than", "1d", "--status", "running"], ["--older-than", "1d", "--keep", "-1"], []):
        assert main(["prune", str(store_dir), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("walspan: error: ")


def test_orphaned_caches_are_removed_but_never_foreign_files(pstore: walspan.Store, store_dir: Path) -> None:
    """A canonical JSON or summary left without its WAL (a compaction that raced a prune) is
    removed by the next prune; a JSON that is not a walspan trace is never touched."""
    _ended(pstore, "o")
    (store_dir / "o.wal").unlink()
    (store_dir / "config.json").write_text('{"mine": true}')
    report = _prune.prune(str(store_dir), older_than=0)
    assert sorted(os.path.basename(f.path) for f in report.orphans) == ["o.json", "o.summary"]
    assert (store_dir / "config.json").exists()
    assert _retention.orphans(str(store_dir)) == []
