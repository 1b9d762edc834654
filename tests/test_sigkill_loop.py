"""Writers SIGKILLed at random moments, and recovery racing live writers (DESIGN.md invariants 1, 2, 3, 6).

Kill moments are chosen from the ack stream (after the k-th acknowledged event overall), never
by sleeping, so every trial is reproducible in what it checks: after recover() every
acknowledged event is present exactly once, each writer's events are a prefix of what it sent,
the status is crashed, and the JSON on disk is valid and equal to load().
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from crashkit import ForkWriter, check_prefixes, events_by_writer, pump_any, read_json

import walspan

TRIALS_PER_TEST = 10
SEEDS = range(10)  # 10 x 10 = 100 trials in the suite; `walspan stress` runs more


def _trial(directory: Path, rng: random.Random, trial: int) -> None:
    session = f"kill-{trial}"
    n_writers = rng.randint(2, 4)
    durability = rng.choice(["process", "durable"])
    writers = [
        ForkWriter(
            str(directory),
            session,
            i,
            rng.randint(3, 25),
            durability=durability,
            pad=rng.choice([0, 64, 3000]),
        )
        for i in range(n_writers)
    ]
    store = walspan.Store(directory, install_hooks=False)
    try:
        total = sum(w.n_events for w in writers)
        first_kill = rng.randint(1, total)
        lose_one_first = rng.random() < 0.5
        victim = writers[0]
        # phase 1: run until `first_kill` events are acknowledged overall
        while sum(w.acked for w in writers) < first_kill:
            assert pump_any(writers) is not None
        if lose_one_first and victim.acked:
            # kill one writer while the others live (all attached): recovery must record it
            # lost and interrupt its span, not crash the trace
            rest = writers[1:]
            for w in rest:
                w.wait_attached()
            victim.kill()
            report = store.recover()
            actions = [(a.session_id, a.action) for a in report.actions if a.action != "repaired_tail"]
            assert actions == [(session, "writer_lost")], report.actions  # (killed mid-write: torn tail repaired)
            mid = store.load(session)
            assert mid["status"] == "running"
            span = next(s for s in mid["spans"] if s["span_id"] == victim.span_id)
            assert (span["status"], span["status_message"]) == (
                "interrupted",
                "writer lost",
            )
            assert span["end_time"] == max(e["time"] for e in span["events"])
            second_kill = rng.randint(sum(w.acked for w in rest), sum(w.n_events for w in rest))
            while sum(w.acked for w in rest) < second_kill:
                assert pump_any(rest) is not None
        order = list(writers)
        rng.shuffle(order)
        for w in order:
            w.kill()
        for w in writers:  # drain acks already in the pipes: they were acknowledged before death
            while w.pump() is not None:
                pass

        report = store.recover()
        assert session in report.crashed or store.load(session)["status"] == "crashed", report.actions
        assert not report.corrupt
        trace = store.load(session)
        assert trace["status"] == "crashed"
        assert read_json(store, session) == trace
        check_prefixes(trace, writers)
        assert all(s["status"] != "open" for s in trace["spans"])
        assert store.recover().actions == []  # idempotent
    finally:
        for w in writers:
            if w.proc.exitcode is None:
                w.kill()
            w.close()
        store.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_random_ack_counts_loses_no_acknowledged_event(tmp_path: Path, seed: int) -> None:
    """SIGKILL loop (10 trials per seed, 100 in all): writers killed after a random number of
    acknowledged events, sometimes one first while the others go on. After recover() every
    acknowledged event is present exactly once, each writer's events are a prefix of what it
    sent, the trace is crashed, no span stays open, and the JSON equals load() (invariants 1-3, 6)."""
    rng = random.Random(1000 + seed)
    for trial in range(TRIALS_PER_TEST):
        _trial(tmp_path, rng, trial)


@pytest.mark.parametrize("durability", ["process", "durable"])
def test_recover_in_a_loop_while_writers_append_changes_nothing(tmp_path: Path, durability: str) -> None:
    """recover() run again and again while several writer processes are alive and appending
    never crashes the trace, never records a live writer lost, and loses or duplicates no event;
    when the writers leave normally the trace is idle (running), with every event once (inv. 6)."""
    session = "busy"
    writers = [ForkWriter(str(tmp_path), session, i, 60, durability=durability, pad=200) for i in range(3)]
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        for w in writers:
            w.wait_attached()
        runs = 0
        while not all(w.done for w in writers) or runs < 5:
            report = store.recover()
            runs += 1
            assert report.actions == [], report.actions
            assert not report.corrupt
            for w in writers:
                if not w.done:
                    w.pump()
        for w in writers:
            w.release()
        report = store.recover()
        assert [a.action for a in report.actions if a.session_id == session] == []
        trace = store.load(session)
        assert trace["status"] == "running"
        assert events_by_writer(trace) == {w.idx: list(range(w.n_events)) for w in writers}
        assert {w["state"] for w in trace["writers"]} == {"detached"}
    finally:
        for w in writers:
            if w.proc.exitcode is None:
                w.kill()
            w.close()
        store.close()


def test_concurrent_recoveries_crash_a_dead_trace_exactly_once(tmp_path: Path) -> None:
    """Several processes running recover() on the same dead trace at once append exactly one
    terminal record between them (idempotent and safe under concurrency, invariant 3)."""
    from crashkit import SPAWN, recover_in_child, terminal_records

    w = ForkWriter(str(tmp_path), "dead", 0, 5)
    w.wait_done()
    w.kill()
    w.close()
    with SPAWN.Pool(3) as pool:
        results = pool.map(recover_in_child, [str(tmp_path)] * 6)
    assert sum(results) == 1, results
    store = walspan.Store(tmp_path, install_hooks=False)
    try:
        assert [t["status"] for t in terminal_records(store.wal_path("dead"))] == ["crashed"]
        assert read_json(store, "dead") == store.load("dead")
    finally:
        store.close()
