"""`walspan ship` SIGKILLed at random moments: while a request is under way, after the receiver
took a batch but before it answered, and between any two steps of a cursor update. A second
shipper then finishes the job. Every span arrives, each session's spans arrive in log order,
and a session's duplicates stay within the documented bound (docs/SHIP.md): one batch per
kill, plus one batch per answer lost after the receiver took it ("cut")."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
from pathlib import Path

import pytest
from shipkit import Receiver, duplicates_per_trace, end_order, write_trace

from walspan.ship import ShipOptions, Shipper, _cursors, trace_span_id

CTX = multiprocessing.get_context("fork")
TRIALS = 100
CHUNKS = 4
STEPS = ("write", "fsync", "rename", "dirsync", "done")


def _child(directory: str, url: str, batch: int, window: int, kill_step: int) -> None:
    """The shipper under test; kills itself at the kill_step-th cursor-update step (if >0)."""
    count = [0]

    def hook(step: str, path: str) -> None:
        if path.endswith(".cursor"):
            count[0] += 1
            if count[0] == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    _cursors.step_hook = hook if kill_step > 0 else None
    opts = ShipOptions(url, batch_spans=batch, window=window, timeout=5.0, backoff_initial=0.001, backoff_max=0.002)
    result = Shipper(directory, opts).run()
    os._exit(0 if result.ok else 3)


def _trial(tmp: Path, seed: int) -> bool:
    rng = random.Random(seed)
    d = str(tmp / f"t{seed}")
    sessions = rng.randint(1, 3)
    for i in range(sessions):
        write_trace(d, f"s{i}", rng.randint(5, 40))
    batch, window = rng.randint(3, 15), rng.randint(1, 3)
    faults = [rng.choice(["ok", "ok", "ok", "500", "503", "429", "reset", "cut"]) for _ in range(rng.randint(0, 6))]
    where = rng.choice(["request", "processed", "step"])
    kill_at = rng.randint(0, 12)
    child_pid = [0]
    reaped = threading.Lock()  # held while the child's pid may be killed (it is not reaped yet)
    dead = [False]

    def kill(n: int, fault: str) -> bool:
        with reaped:
            if n == kill_at and child_pid[0] and not dead[0]:
                os.kill(child_pid[0], signal.SIGKILL)
                return False
        return True

    with Receiver(faults=faults, retry_after="0") as rx:
        if where == "request":
            rx.on_request = lambda n, f: None if kill(n, f) else None
        elif where == "processed":
            rx.on_processed = kill
        p = CTX.Process(target=_child, args=(d, rx.url, batch, window, rng.randint(1, 40) if where == "step" else 0))
        p.start()
        child_pid[0] = p.pid or 0
        os.waitid(os.P_PID, child_pid[0], os.WEXITED | os.WNOWAIT)  # exited, pid still ours
        with reaped:
            dead[0] = True  # a late request's hook never kills a pid the system may reuse
        p.join()
        first_run = len(rx.arrivals)
        rx.on_request = rx.on_processed = None
        cuts = rx.answered.count("cut")
        rx.faults.clear()
        result = Shipper(d, ShipOptions(rx.url, batch_spans=batch, window=window, timeout=5.0)).run()
        assert result.ok, result.errors
        expected = end_order(d)
        dups = duplicates_per_trace(rx.arrivals, expected)
        killed = p.exitcode == -signal.SIGKILL
        bound = batch * (int(killed) + cuts)
        for trace_id, n in dups.items():
            assert n <= bound, f"seed {seed}: {n} duplicates of trace {trace_id} > {bound} (killed={killed}, cuts={cuts}, where={where})"
            assert trace_span_id(trace_id) in {a.span_id for a in rx.arrivals if a.trace_id == trace_id}
        assert p.exitcode in (0, -signal.SIGKILL), f"seed {seed}: shipper exited {p.exitcode}"
        assert first_run <= len(rx.arrivals)
        return killed


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_shipper_killed_at_random_moments_loses_nothing(tmp_path: Path, chunk: int) -> None:
    """100 trials in all (seeds chunk, chunk+4, ...): random stores, batch sizes, windows and
    transient faults; the shipper SIGKILLed at a random request (before it is read, or after
    the receiver took its spans but before it answered) or at a random step of a cursor
    update. After a clean second run every span is there, in order per session, with at most
    one batch of duplicates per session per kill or lost answer."""
    killed = sum(_trial(tmp_path, seed) for seed in range(chunk, TRIALS, CHUNKS))
    assert killed >= TRIALS // CHUNKS // 2  # most trials did kill the shipper mid-way


def test_a_kill_between_fsync_and_rename_keeps_the_old_cursor(tmp_path: Path) -> None:
    """The cursor update is atomic: killed after the temporary file is written and synced but
    before the rename, the saved cursor is the previous one, whole; the next run resends
    exactly the unconfirmed batch."""
    d = str(tmp_path / "s")
    write_trace(d, "a", 29)
    with Receiver() as rx:
        cs = _cursors.CursorStore(d, _cursors.default_name(rx.url))
        killed_at = []

        def child() -> None:
            def hook(step: str, path: str) -> None:
                if step == "rename" and path.endswith(".cursor"):
                    killed_at.append(path)
                    if len(killed_at) == 2:
                        os.kill(os.getpid(), signal.SIGKILL)

            _cursors.step_hook = hook
            Shipper(d, ShipOptions(rx.url, batch_spans=10, window=1)).run()
            os._exit(0)

        p = CTX.Process(target=child)
        p.start()
        p.join()
        assert p.exitcode == -signal.SIGKILL
        saved = cs.load("a")
        assert saved is not None and saved.spans == 10  # the first batch's cursor, not the second's
        assert len(rx.arrivals) == 20
        assert Shipper(d, ShipOptions(rx.url, batch_spans=10, window=1)).run().ok
        names = [a.name for a in rx.arrivals]
        assert names[20:30] == names[10:20]  # exactly the unconfirmed batch again
        assert len(names) == 31 + 10
