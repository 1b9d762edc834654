"""`walspan ship --follow`: a daemon that follows new records and new sessions, says where it is
on SIGUSR1 (with its lag), and stops cleanly on SIGTERM."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shipkit import Receiver, check_in_order, end_order, write_trace

import walspan
from walspan.read import read_records
from walspan.ship import ShipOptions, Shipper, trace_span_id

CTX = multiprocessing.get_context("fork")


def _writer(directory: str, session: str, n: int) -> None:
    store = walspan.Store(directory, durability="process", install_hooks=False)
    t = store.open(session)
    root = t.start_span("root")
    for i in range(n):
        t.start_span(f"w{i}", parent=root, attributes={"i": i}).end()
    root.end()
    t.end()
    store.close()


def _names(rx: Receiver, trace_id: str) -> list[str]:
    return [a.name for a in rx.arrivals if a.trace_id == trace_id]


def test_follow_daemon_ships_new_records_and_sessions_reports_on_sigusr1_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The CLI daemon ships what is there, then records appended later and a session created
    later (by two writer processes appending 3000 spans while it runs), in order; SIGUSR1
    prints one status line with the lag; SIGTERM ends it with exit 0 and a final status."""
    d = str(tmp_path / "s")
    write_trace(d, "before", 20)
    with Receiver() as rx:
        proc = subprocess.Popen(
            [sys.executable, "-m", "walspan", "ship", d, "--endpoint", rx.url, "--follow", "--batch-age", "0.05", "--batch-size", "100"],
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            assert rx.wait_for(lambda a: len(a) >= 22)
            writers = [CTX.Process(target=_writer, args=(d, sid, 1500)) for sid in ("later-1", "later-2")]
            for w in writers:
                w.start()
            for w in writers:
                w.join()
            store = walspan.Store(d, durability="process", install_hooks=False)
            tids = [store.load(sid)["trace_id"] for sid in ("later-1", "later-2")]
            store.close()
            assert rx.wait_for(lambda a: {trace_span_id(t) for t in tids} <= {x.span_id for x in a})
            proc.send_signal(signal.SIGUSR1)
            line = proc.stderr.readline() if proc.stderr else ""
            assert line.startswith("walspan ship: ") and " lag " in line and "3026 span(s) acknowledged" in line, line
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=30)[1]
            assert proc.returncode == 0, out
            assert "walspan ship: " in out.splitlines()[-1]
        finally:
            if proc.poll() is None:
                proc.kill()
        assert check_in_order(rx.arrivals, end_order(d)) == 0
        assert len(rx.arrivals) == 3026  # 20 + 2 * 1500 spans, 3 roots, 3 trace-status spans


def test_lag_is_the_age_of_the_oldest_unacknowledged_record(tmp_path: Path) -> None:
    """While a batch waits for the receiver, status() shows it in flight with a lag at least
    the age of its oldest record; once acknowledged, the lag is 0 and the spans counted."""
    d = str(tmp_path / "s")
    write_trace(d, "a", 3)
    entered, release = threading.Event(), threading.Event()

    def hold(n: int, fault: str) -> None:
        entered.set()
        release.wait(30)

    first_time = next(r.time for r in read_records(d, "a") if r.type == "span_end")
    assert first_time is not None
    with Receiver() as rx:
        rx.on_request = hold
        stop = threading.Event()
        shipper = Shipper(d, ShipOptions(rx.url, batch_age=0.01))
        results = []
        th = threading.Thread(target=lambda: results.append(shipper.run(follow=True, stop=stop)))
        th.start()
        try:
            assert entered.wait(30)
            t0 = time.time()
            st = shipper.status()
            assert st.in_flight == 1 and st.spans == 0 and st.lag >= t0 - first_time / 1e9 and st.behind_bytes > 0
        finally:
            release.set()
            assert rx.wait_for(lambda a: len(a) == 5)
            stop.set()
            th.join(30)
        st = results[0].status
        assert st.spans == 5 and st.lag == 0.0 and st.in_flight == 0 and st.behind_bytes == 0
