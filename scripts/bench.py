#!/usr/bin/env python3
"""walspan benchmark: walspan side by side with what users would pick instead (issues 6 and 12).

Every system appends the same ~150-byte events to ONE shared file / database per run:

    raw-fdatasync             write + fdatasync per event, one stream: the disk's limit
    flock+fdatasync-outside   flock, write, unlock, then fdatasync (flushes can overlap)
    flock+fdatasync-inside    flock, write, fdatasync, unlock
    sqlite-wal-full           SQLite WAL mode, synchronous=FULL, one commit per event
    sqlite-wal-normal         SQLite WAL mode, synchronous=NORMAL (not durable on power loss)
    concurrent-log-handler    logging + portalocker, no fsync
    flock+write               flock, write, unlock (survives a process kill, not power loss)
    walspan-durable           Span.add_event, durability="durable" (group commit)
    walspan-interval          Span.add_event, durability="interval" (background flush every 100 ms)
    walspan-process           Span.add_event, durability="process"

with 1, 2, 4, 8 and 16 writer processes (walspan's levels also with 2-16 threads in one
process). For every run: events/s, latency percentiles, CPU (user + system) per append and
fdatasyncs per append (counted by a wrapper in each writer process). The runs are
interleaved and repeated (a shuffled order per repetition), so drift of a shared machine hits
every system alike; figures are medians over repetitions, ratios are taken within a
repetition (against that repetition's one-stream run) before the median. Latency percentiles
pool every acknowledged append of every repetition; the mean is never reported.

After each run the stored data is read back and every acknowledged event must be there,
exactly once, per writer; a run that lost or duplicated an event is reported VOID.

Also measured: the JSON-rewrite approach (tmp + fsync + rename per event, one process), cost
against trace length (1k/10k/100k spans), compaction (a large trace; incremental compaction
after k new records; appends during a compaction), and recovery (a directory of sessions whose
writers died; WAL scan MB/s).

Usage:
    python scripts/bench.py --quick --out bench-results      # about a minute
    python scripts/bench.py --out docs                        # the full run behind docs/BENCHMARKS.md

--out DIR writes DIR/bench-results.json (every figure), DIR/BENCHMARKS.md (the report, tables
and target verdicts) and DIR/bench-writers.png (events/s against writers, per system).
Peers need the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import walspan  # noqa: E402
from walspan import _compactor, _fold, _format, _reader  # noqa: E402
from walspan._names import encode_session_id  # noqa: E402

try:
    import fcntl
except ImportError:  # pragma: no cover
    sys.exit("bench.py needs a POSIX system (flock, fdatasync)")

EVENT_BYTES = 150
SESSION = "bench"
CTX = mp.get_context("fork")

SYSTEMS = [
    "raw-fdatasync",
    "flock+fdatasync-outside",
    "flock+fdatasync-inside",
    "sqlite-wal-full",
    "sqlite-wal-normal",
    "concurrent-log-handler",
    "flock+write",
    "walspan-durable",
    "walspan-interval",
    "walspan-process",
]
WALSPAN_LEVELS = ("walspan-durable", "walspan-interval", "walspan-process")
#: What a power loss may take of the acknowledged events.
DURABLE_ON_POWER_LOSS = {
    "raw-fdatasync": "yes",
    "flock+fdatasync-outside": "yes",
    "flock+fdatasync-inside": "yes",
    "sqlite-wal-full": "yes",
    "sqlite-wal-normal": "no (since the last checkpoint)",
    "concurrent-log-handler": "no",
    "flock+write": "no",
    "walspan-durable": "yes",
    "walspan-interval": "all but the last ~100 ms",
    "walspan-process": "no",
}


# -- the event stream -------------------------------------------------------------------------


def peer_line(w: int, i: int) -> bytes:
    """One JSON-lines event of ~EVENT_BYTES bytes (newline included), serialised per event from
    a dict as any logger must (walspan serialises its dict with msgpack)."""
    event = {"name": "tool_output", "w": w, "i": i, "time": time.time_ns(), "pad": _PEER_PAD}
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


_PEER_PAD = ""
_PEER_PAD = "x" * max(0, EVENT_BYTES - len(peer_line(100, 100000)))


def _walspan_pad() -> str:
    """Padding that makes one walspan event record (header + msgpack payload) ~EVENT_BYTES."""
    payload = {
        "span_id": "0" * 16,
        "name": "tool_output",
        "attributes": {"w": 1000, "i": 100000, "pad": ""},
        "time": time.time_ns(),
        "writer": "0" * 16,
    }
    base = _format.RECORD_HEADER_SIZE + len(_format.pack_payload(payload))
    return "x" * max(0, EVENT_BYTES - base)


WALSPAN_PAD = _walspan_pad()


def parse_lines(data: bytes) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for line in data.splitlines():
        if not line:
            continue
        d = json.loads(line)
        out.setdefault(d["w"], []).append(d["i"])
    return out


# -- appenders: one per system, built in the writer process -----------------------------------


FSYNCS = [0]  # fdatasync/fsync calls made by this writer process (peers and walspan alike)


def _counted(sync: Callable[[int], None]) -> Callable[[int], None]:
    """`sync`, counting its calls in FSYNCS (the figure to drive down: fdatasyncs per append)."""

    def counted(fd: int) -> None:
        FSYNCS[0] += 1
        sync(fd)

    return counted


class Appender:
    def __init__(self, append: Callable[[int], None], close: Callable[[], None]) -> None:
        self.append = append
        self.close = close


def make_appender(system: str, workdir: str, w: int) -> Appender:
    if system in ("raw-fdatasync", "flock+fdatasync-outside", "flock+fdatasync-inside", "flock+write"):
        fd = os.open(os.path.join(workdir, "events.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        write, sync, flock = os.write, _counted(os.fdatasync), fcntl.flock
        EX, UN = fcntl.LOCK_EX, fcntl.LOCK_UN

        if system == "raw-fdatasync":

            def append(i: int) -> None:
                write(fd, peer_line(w, i))
                sync(fd)

        elif system == "flock+fdatasync-outside":

            def append(i: int) -> None:
                line = peer_line(w, i)
                flock(fd, EX)
                write(fd, line)
                flock(fd, UN)
                sync(fd)

        elif system == "flock+fdatasync-inside":

            def append(i: int) -> None:
                line = peer_line(w, i)
                flock(fd, EX)
                write(fd, line)
                sync(fd)
                flock(fd, UN)

        else:

            def append(i: int) -> None:
                line = peer_line(w, i)
                flock(fd, EX)
                write(fd, line)
                flock(fd, UN)

        return Appender(append, lambda: os.close(fd))

    if system.startswith("sqlite"):
        conn = sqlite3.connect(os.path.join(workdir, "events.db"), timeout=600, isolation_level=None)
        conn.execute("PRAGMA synchronous=" + ("FULL" if system == "sqlite-wal-full" else "NORMAL"))
        sql = "INSERT INTO events(w, i, body) VALUES (?, ?, ?)"
        execute = conn.execute

        def append(i: int) -> None:
            execute(sql, (w, i, peer_line(w, i)))  # autocommit: one transaction per event

        return Appender(append, conn.close)

    if system == "concurrent-log-handler":
        from concurrent_log_handler import ConcurrentRotatingFileHandler

        handler = ConcurrentRotatingFileHandler(os.path.join(workdir, "events.log"), "a", maxBytes=0, backupCount=0)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger(f"walspan-bench-{w}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        info = logger.info

        def append(i: int) -> None:
            info(peer_line(w, i)[:-1].decode())

        def close() -> None:
            logger.removeHandler(handler)
            handler.close()

        return Appender(append, close)

    raise ValueError(system)


class WalspanWriters:
    """One process's Store, trace, and one span per thread (events go to that span)."""

    def __init__(self, system: str, workdir: str, w: int, threads: int) -> None:
        durability = system.split("-", 1)[1]
        self.store = walspan.Store(workdir, durability=durability, install_hooks=False)
        self.trace = self.store.open(SESSION)
        self.spans = [self.trace.start_span(f"writer-{w * 100 + t}", kind="agent") for t in range(threads)]
        self.ids = [w * 100 + t for t in range(threads)]

    def appender(self, t: int) -> Callable[[int], None]:
        add_event, wid, pad = self.spans[t].add_event, self.ids[t], WALSPAN_PAD

        def append(i: int) -> None:
            add_event("tool_output", {"w": wid, "i": i, "pad": pad})

        return append

    def close(self) -> None:
        for s in self.spans:
            s.end()
        self.trace.close()
        self.store.close()


def _timed_loop(append: Callable[[int], None], seconds: float, limit: int) -> tuple[int, array.array, int, int]:
    lats = array.array("q")
    rec = lats.append
    clock = time.perf_counter_ns
    t0 = time.monotonic_ns()
    deadline = clock() + int(seconds * 1e9)
    i = 0
    while i < limit:
        a = clock()
        append(i)
        b = clock()
        rec(b - a)
        i += 1
        if b >= deadline:
            break
    return i, lats, t0, time.monotonic_ns()


def writer_main(system: str, workdir: str, w: int, threads: int, seconds: float, limit: int, barrier: Any, queue: Any) -> None:
    """A writer process: set up, wait for everyone, append until the deadline, report."""
    try:
        gc.disable()
        if system.startswith("walspan"):
            from walspan import _fsutil

            _fsutil._sync = _counted(_fsutil._sync)  # every fdatasync walspan makes goes through it
            ws = WalspanWriters(system, workdir, w, threads)
            appends = [ws.appender(t) for t in range(threads)]
            close = ws.close
            ids = ws.ids
        else:
            assert threads == 1
            ap = make_appender(system, workdir, w)
            appends, close, ids = [ap.append], ap.close, [w]
        barrier.wait(timeout=120)
        FSYNCS[0] = 0
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        if threads == 1:
            results = [_timed_loop(appends[0], seconds, limit)]
        else:
            results = [None] * threads  # type: ignore[list-item]

            def run(t: int) -> None:
                results[t] = _timed_loop(appends[t], seconds, limit)  # type: ignore[call-overload]

            ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        # CPU (user + system) and fdatasyncs of the whole process over the timed loops, once per process
        usage = (ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime, FSYNCS[0])
        close()
        for k, (wid, (n, lats, t0, t1)) in enumerate(zip(ids, results)):
            queue.put(("ok", wid, n, lats.tobytes(), t0, t1, usage if k == 0 else (0.0, 0)))
    except BaseException:
        queue.put(("error", w, traceback.format_exc(), b"", 0, 0))
        try:
            barrier.abort()
        except Exception:
            pass


# -- verification: every acknowledged event is stored, exactly once ---------------------------


def stored_events(system: str, workdir: str) -> dict[int, list[int]]:
    if system in ("raw-fdatasync", "flock+fdatasync-outside", "flock+fdatasync-inside", "flock+write"):
        with open(os.path.join(workdir, "events.jsonl"), "rb") as f:
            return parse_lines(f.read())
    if system == "concurrent-log-handler":
        with open(os.path.join(workdir, "events.log"), "rb") as f:
            return parse_lines(f.read())
    if system.startswith("sqlite"):
        conn = sqlite3.connect(os.path.join(workdir, "events.db"))
        out: dict[int, list[int]] = {}
        for w, i in conn.execute("SELECT w, i FROM events"):
            out.setdefault(w, []).append(i)
        conn.close()
        return out
    if system.startswith("walspan"):
        fold, _scan = _compactor.fold_wal(os.path.join(workdir, encode_session_id(SESSION) + ".wal"))
        out = {}
        for span in fold.spans.values():
            out[int(span["name"].split("-")[1])] = [e["attributes"]["i"] for e in span["events"]]
        return out
    raise ValueError(system)


def verify(system: str, workdir: str, acked: dict[int, int]) -> str | None:
    """None if every acknowledged event is stored exactly once, else what is wrong."""
    try:
        stored = stored_events(system, workdir)
    except Exception as exc:
        return f"could not read back: {exc!r}"
    for w, n in acked.items():
        got = stored.get(w, [])
        if len(got) != n or set(got) != set(range(n)):
            return f"writer {w}: {n} acknowledged, {len(got)} stored ({len(set(got) & set(range(n)))} of them acknowledged ones)"
    extra = set(stored) - set(acked)
    if extra:
        return f"events from unknown writers {sorted(extra)}"
    return None


# -- one throughput run -----------------------------------------------------------------------


def prepare(system: str, workdir: str) -> None:
    if system.startswith("sqlite"):
        conn = sqlite3.connect(os.path.join(workdir, "events.db"))
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE events (w INTEGER, i INTEGER, body BLOB)")
        conn.commit()
        conn.close()
    elif system.startswith("walspan"):
        store = walspan.Store(workdir, durability="durable", install_hooks=False)
        store.open(SESSION).close()
        store.close()


def run_config(system: str, procs: int, threads: int, seconds: float, root: str, limit: int = 10**9) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="run-", dir=root)
    try:
        prepare(system, workdir)
        barrier = CTX.Barrier(procs + 1)
        queue = CTX.Queue()
        ps = [
            CTX.Process(target=writer_main, args=(system, workdir, w, threads, seconds, limit, barrier, queue))
            for w in range(procs)
        ]
        for p in ps:
            p.start()
        error = None
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            error = "a writer failed during setup"
        results = []
        for _ in range(procs * threads):
            try:
                item = queue.get(timeout=seconds + 300)
            except Exception:
                error = error or "a writer did not report"
                break
            if item[0] == "error":
                error = f"writer {item[1]} failed:\n{item[2]}"
                break
            results.append(item)
        for p in ps:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        if error:
            return {"void": error}
        acked = {r[1]: r[2] for r in results}
        total = sum(acked.values())
        t0 = min(r[4] for r in results)
        t1 = max(r[5] for r in results)
        lats = array.array("q")
        for r in results:
            lats.frombytes(r[3])
        problem = verify(system, workdir, acked)
        cpu = sum(r[6][0] for r in results)
        fsyncs = sum(r[6][1] for r in results)
        return {"events": total, "seconds": (t1 - t0) / 1e9, "rate": total / ((t1 - t0) / 1e9), "lats": lats,
                "cpu_us_per_append": cpu / total * 1e6 if total else None,
                "fsyncs_per_append": fsyncs / total if total else None, "void": problem}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def percentiles(lats: array.array) -> dict[str, float]:
    """p50/p99/p99.9/max in microseconds (nearest-rank)."""
    if not lats:
        return {}
    s = sorted(lats)
    n = len(s)

    def p(q: float) -> float:
        return s[min(n - 1, max(0, int(round(q * n)) - 1))] / 1000.0

    return {"p50_us": p(0.50), "p99_us": p(0.99), "p999_us": p(0.999), "max_us": s[-1] / 1000.0, "samples": n}


# -- JSON rewrite (the approach walspan replaces) ---------------------------------------------


def json_rewrite(root: str, events: int) -> dict[str, Any]:
    """One process; per event the whole trace is rewritten: tmp, write, fsync, rename."""
    workdir = tempfile.mkdtemp(prefix="jsonrw-", dir=root)
    try:
        path = os.path.join(workdir, "trace.json")
        doc: dict[str, Any] = {"session_id": SESSION, "spans": [{"span_id": "root", "events": []}]}
        evs = doc["spans"][0]["events"]
        lats = array.array("q")
        t_start = time.perf_counter_ns()
        for i in range(events):
            a = time.perf_counter_ns()
            evs.append({"name": "tool_output", "w": 0, "i": i, "pad": "x" * 100})
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(json.dumps(doc).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            lats.append(time.perf_counter_ns() - a)
        total_s = (time.perf_counter_ns() - t_start) / 1e9
        with open(path, "rb") as f:
            stored = [e["i"] for e in json.load(f)["spans"][0]["events"]]
        q = max(1, events // 4)
        first = q / (sum(lats[:q]) / 1e9)
        last = q / (sum(lats[-q:]) / 1e9)
        return {
            "events": events,
            "rate": events / total_s,
            "rate_first_quarter": first,
            "rate_last_quarter": last,
            "latency": percentiles(lats),
            "void": None if stored == list(range(events)) else "events missing from the final file",
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- building large WALs fast (same records the API writes, bulk-written under the lock) ------


def build_trace(workdir: str, session: str, spans: int, events_per_span: int = 0) -> str:
    """Create `session` with `spans` ended spans; returns the WAL path.

    The first records come from the API; the spans are encoded with walspan's own framing and
    written in large chunks while holding the session's append lock (a bulk writer), which is
    what the API would write one record at a time, only faster to build.
    """
    store = walspan.Store(workdir, durability="process", install_hooks=False)
    trace = store.open(session)
    writer = store._writer
    assert writer is not None
    stem = encode_session_id(session)
    h = store._acquire_handle(stem)
    try:
        with h.locked() as wal:
            seq, end = wal.last_seq, wal.end
            buf: list[bytes] = []
            size = 0
            now = time.time_ns()
            wid = writer.writer_id
            pack, enc = _format.pack_payload, _format.encode_record
            T = _format.RecordType

            def put(rtype: int, payload: dict[str, Any]) -> None:
                nonlocal seq, size
                seq += 1
                frame = enc(h.salt, rtype, seq, pack(payload))
                buf.append(frame)
                size += len(frame)

            def flush() -> None:
                nonlocal end, size
                data = b"".join(buf)
                os.pwrite(h.fd, data, end)
                end += len(data)
                buf.clear()
                size = 0

            for k in range(spans):
                sid = "%016x" % (k + 1)
                put(T.SPAN_START, {"span_id": sid, "parent": None, "name": "step", "kind": "tool",
                                   "attributes": {"k": k}, "input": None, "time": now + k, "writer": wid})
                for e in range(events_per_span):
                    put(T.SPAN_EVENT, {"span_id": sid, "name": "ev", "attributes": {"e": e}, "time": now + k, "writer": wid})
                put(T.SPAN_END, {"span_id": sid, "status": "ok", "time": now + k, "writer": wid})
                if size > 8 << 20:
                    flush()
            flush()
            h.shm.store(end, seq, 0, wal._durable, wal._gen, 0)  # as LockedWal.append_packed does
        os.fsync(h.fd)
    finally:
        store._release_handle(h)
    trace.close()
    store.close()
    return os.path.join(workdir, stem + ".wal")


# -- cost against trace length ----------------------------------------------------------------


def _append_child(workdir: str, session: str, durability: str, events: int, queue: Any) -> None:
    try:
        t_open = time.perf_counter()
        store = walspan.Store(workdir, durability=durability, install_hooks=False)
        trace = store.open(session)
        span = trace.start_span("measure")
        t_open = time.perf_counter() - t_open
        lats = array.array("q")
        t0 = time.perf_counter_ns()
        for i in range(events):
            a = time.perf_counter_ns()
            span.add_event("tool_output", {"w": 0, "i": i, "pad": WALSPAN_PAD})
            lats.append(time.perf_counter_ns() - a)
        took = (time.perf_counter_ns() - t0) / 1e9
        span.end()
        trace.close()
        store.close()
        queue.put(("ok", events / took, t_open, lats.tobytes()))
    except BaseException:
        queue.put(("error", traceback.format_exc(), 0, b""))


def in_child(target: Callable[..., None], *args: Any) -> Any:
    queue = CTX.Queue()
    p = CTX.Process(target=target, args=(*args, queue))
    p.start()
    item = queue.get(timeout=300)
    p.join()
    if item[0] == "error":
        raise RuntimeError(item[1])
    return item


def trace_length_bench(root: str, lengths: list[int], events: int, reps: int) -> dict[str, Any]:
    dirs = {}
    for n in lengths:
        d = tempfile.mkdtemp(prefix=f"len{n}-", dir=root)
        build_trace(d, SESSION, n)
        dirs[n] = d
    rates: dict[str, dict[int, list[float]]] = {"durable": {n: [] for n in lengths}, "process": {n: [] for n in lengths}}
    opens: dict[int, list[float]] = {n: [] for n in lengths}
    order = [(n, dur) for n in lengths for dur in ("durable", "process")]
    for r in range(reps):
        random.Random(1000 + r).shuffle(order)
        for n, dur in order:
            _ok, rate, t_open, _l = in_child(_append_child, dirs[n], SESSION, dur, events if dur == "durable" else events * 5)
            rates[dur][n].append(rate)
            opens[n].append(t_open)
    out: dict[str, Any] = {"events_per_measurement": events, "reps": reps, "spans": lengths}
    for dur in rates:
        out[dur] = {str(n): statistics.median(v) for n, v in rates[dur].items()}
        out[dur + "_ratio_longest_to_shortest"] = statistics.median(
            a / b for a, b in zip(rates[dur][lengths[-1]], rates[dur][lengths[0]])
        )
    out["open_seconds"] = {str(n): statistics.median(v) for n, v in opens.items()}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    return out


# -- compaction ---------------------------------------------------------------------------------


def _appender_during(workdir: str, session: str, start: Any, stop: Any, queue: Any) -> None:
    try:
        store = walspan.Store(workdir, durability="durable", install_hooks=False)
        trace = store.open(session)
        span = trace.start_span("during-compaction")
        start.set()
        lats = array.array("q")
        i = 0
        while not stop.is_set():
            a = time.perf_counter_ns()
            span.add_event("tool_output", {"w": 0, "i": i, "pad": WALSPAN_PAD})
            lats.append(time.perf_counter_ns() - a)
            i += 1
        span.end()
        trace.close()
        store.close()
        queue.put(("ok", i, lats.tobytes()))
    except BaseException:
        start.set()
        queue.put(("error", traceback.format_exc(), b""))


def compaction_bench(root: str, big_spans: int, inc_spans: int, ks: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stem = encode_session_id(SESSION)
    # 1. a large trace, compacted from scratch, while a durable writer keeps appending
    d = tempfile.mkdtemp(prefix="compact-big-", dir=root)
    t = time.perf_counter()
    wal_path = build_trace(d, SESSION, big_spans)
    build_s = time.perf_counter() - t
    wal_bytes = os.path.getsize(wal_path)
    start, stop, queue = CTX.Event(), CTX.Event(), CTX.Queue()
    p = CTX.Process(target=_appender_during, args=(d, SESSION, start, stop, queue))
    p.start()
    start.wait(timeout=120)
    gc.collect()
    t = time.perf_counter()
    path = _compactor.compact(d, stem).path
    compact_s = time.perf_counter() - t
    stop.set()
    item = queue.get(timeout=300)
    p.join()
    json_bytes = os.path.getsize(path)
    with open(path, "rb") as f:
        doc = json.load(f)
    n_spans = len(doc["spans"])
    del doc
    out["large"] = {
        "spans": big_spans,
        "wal_mb": wal_bytes / 1e6,
        "json_mb": json_bytes / 1e6,
        "build_seconds": build_s,
        "compact_seconds": compact_s,
        "fold_mb_per_s": wal_bytes / 1e6 / compact_s,
        "spans_in_json": n_spans,
        "void": None if n_spans >= big_spans else f"JSON has {n_spans} spans, expected {big_spans}+",
    }
    if item[0] == "ok":
        out["appends_during_compaction"] = {"appends": item[1], "latency": percentiles(array.array("q", item[2]))}
    else:
        out["appends_during_compaction"] = {"void": item[1]}
    # 2. WAL scan speed (what an append's repair scan and recovery read at)
    fd = os.open(wal_path, os.O_RDONLY)
    try:
        best = float("inf")
        for _ in range(3):
            scan = _reader.ScanState(wal_path)
            t = time.perf_counter()
            for _rec in _reader.iter_records(fd, scan, decode_types=frozenset()):
                pass
            best = min(best, time.perf_counter() - t)
        out["scan"] = {"wal_mb": wal_bytes / 1e6, "records": scan.records, "seconds": best, "mb_per_s": wal_bytes / 1e6 / best}
    finally:
        os.close(fd)
    shutil.rmtree(d, ignore_errors=True)
    # 3. incremental: compact after k new records, against a full re-fold
    d = tempfile.mkdtemp(prefix="compact-inc-", dir=root)
    build_trace(d, SESSION, inc_spans)
    _compactor.compact(d, stem)
    store = walspan.Store(d, durability="process", install_hooks=False)
    trace = store.open(SESSION)
    span = trace.start_span("incremental")
    rows = []
    for k in ks:
        for i in range(k):
            span.add_event("tool_output", {"w": 0, "i": i, "pad": WALSPAN_PAD})
        t = time.perf_counter()
        rewritten = _compactor.compact(d, stem).rewritten
        inc_s = time.perf_counter() - t
        rows.append({"k": k, "seconds": inc_s, "rewritten": rewritten})
    span.end()
    trace.close()
    store.close()
    json_path = os.path.join(d, stem + ".json")
    json_mb = os.path.getsize(json_path) / 1e6
    os.remove(json_path)  # no checkpoint: the same compaction from scratch
    t = time.perf_counter()
    _compactor.compact(d, stem)
    rebuild_s = time.perf_counter() - t
    t = time.perf_counter()
    fold, _ = _compactor.fold_wal(os.path.join(d, stem + ".wal"))
    refold_s = time.perf_counter() - t
    t = time.perf_counter()
    data = _fold.dumps(fold.to_dict())
    dumps_s = time.perf_counter() - t
    t = time.perf_counter()
    _fold.TraceFold.from_dict(json.loads(data))
    load_s = time.perf_counter() - t
    out["incremental"] = {
        "spans": inc_spans,
        "json_mb": json_mb,
        "rows": rows,
        "full_rebuild_seconds": rebuild_s,
        "full_refold_seconds": refold_s,
        "dumps_seconds": dumps_s,
        "checkpoint_load_seconds": load_s,
    }
    shutil.rmtree(d, ignore_errors=True)
    return out


# -- recovery -----------------------------------------------------------------------------------


def _dying_writer(workdir: str, sessions: int, queue: Any) -> None:
    try:
        store = walspan.Store(workdir, durability="process", install_hooks=False)
        for k in range(sessions):
            trace = store.open(f"ses_{k:05d}")
            span = trace.start_span("turn", kind="agent")
            span.add_event("tool_output", {"w": 0, "i": 0, "pad": WALSPAN_PAD})
        queue.put(("ok", 0, 0, b""))
        queue.close()
        queue.join_thread()  # the report must be out before the process dies without cleanup
    except BaseException:
        queue.put(("error", traceback.format_exc()))
        return
    os._exit(0)  # die without detaching: every session is left to recovery


def recovery_bench(root: str, sessions: int) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="recover-", dir=root)
    try:
        t = time.perf_counter()
        in_child(_dying_writer, d, sessions)
        build_s = time.perf_counter() - t
        store = walspan.Store(d, durability="durable", install_hooks=False)
        t = time.perf_counter()
        report = store.recover()
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        again = store.recover()
        second_s = time.perf_counter() - t
        store.close()
        crashed = len(report.crashed)
        return {
            "sessions": sessions,
            "build_seconds": build_s,
            "first_seconds": first_s,
            "noop_seconds": second_s,
            "crashed": crashed,
            "second_run_changes": len(again.actions),
            "void": None if crashed == sessions and not again.actions else f"{crashed} of {sessions} marked crashed, {len(again.actions)} changes on a second run",
        }
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- read tools at scale (optional: --only read) ------------------------------------------------


_PEAK_RSS = (
    "import atexit, os, sys\n"
    "def _peak():\n"
    "    with open('/proc/self/status') as f:\n"
    "        os.write(int(os.environ['PEAK_FD']), next(l for l in f if l.startswith('VmHWM:')).split()[1].encode())\n"
    "atexit.register(_peak)\n"
    "sys.argv[0] = 'walspan'\n"
    "from walspan.cli import main\n"
    "sys.exit(main())\n"
)


def _cli(args: list[str]) -> tuple[float, float, int]:
    """Run the walspan CLI with ARGS, stdout to /dev/null: (seconds, peak RSS in MiB, exit code).
    The peak is the command's own (VmHWM of its address space, reported at exit): a child's
    ru_maxrss would count the memory of the process it was forked from."""
    r, w = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir), PEAK_FD=str(w))
    t = time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen([sys.executable, "-c", _PEAK_RSS, *args], stdout=null, stderr=null, env=env,
                                pass_fds=(w,))
        os.close(w)
        code = proc.wait()
    seconds = time.perf_counter() - t
    with os.fdopen(r, "rb") as f:
        peak_kib = int(f.read() or 0)
    return seconds, peak_kib / 1024, code


def read_tools_bench(root: str, spans: int, sessions: int, reps: int) -> dict[str, Any]:
    """`ls` of a store of `sessions` compacted traces (from their summaries) and of as many
    running ones (folded), then every read command on one `spans`-span trace: seconds and peak
    RSS of the whole process (interpreter start included; medians of `reps` runs)."""
    out: dict[str, Any] = {"sessions": sessions, "spans": spans, "reps": reps}
    many = tempfile.mkdtemp(prefix="read-many-", dir=root)
    big = tempfile.mkdtemp(prefix="read-big-", dir=root)
    try:
        store = walspan.Store(many, durability="process", install_hooks=False)
        for k in range(sessions):
            t = store.open(f"ses_{k:05d}", metadata={"title": f"session {k}"})
            for i in range(3):
                with t.span(f"step{i}", kind="tool", attributes={"i": i}):
                    pass
            t.end()
        store.close()
        from walspan.read import summaries

        def timed(fn: Callable[[], Any]) -> float:
            runs = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t0)
            return statistics.median(runs)

        out["ls_compacted_inprocess_s"] = timed(lambda: list(summaries(many)))
        out["ls_compacted_cli_s"] = statistics.median(_cli(["ls", many])[0] for _ in range(reps))
        for name in os.listdir(os.path.join(many, ".walspan")):  # no summaries: every trace folded
            if name.endswith(".summary"):
                os.unlink(os.path.join(many, ".walspan", name))
        out["ls_folded_inprocess_s"] = timed(lambda: list(summaries(many)))

        build_trace(big, "big", spans)
        s = walspan.Store(big, durability="process", install_hooks=False)
        t0 = time.perf_counter()
        s.open("big").end()  # compacts: the JSON and its summary
        out["compact_s"] = time.perf_counter() - t0
        s.close()
        out["wal_bytes"] = os.path.getsize(os.path.join(big, "big.wal"))
        out["json_bytes"] = os.path.getsize(os.path.join(big, "big.json"))
        commands = {
            "ls": ["ls", big],
            "show": ["show", "--no-pager", big, "big"],
            "show --limit 50": ["show", "--no-pager", "--limit", "50", big, "big"],
            "show --json": ["show", "--json", big, "big"],
            "verify": ["verify", big],
            "tail --from-start": ["tail", "--from-start", big],
        }
        rows = {}
        for label, args in commands.items():
            runs = [_cli(args) for _ in range(reps)]
            rows[label] = {
                "seconds": statistics.median(r[0] for r in runs),
                "peak_rss_mib": max(r[1] for r in runs),
                "exit_codes": sorted({r[2] for r in runs}),
            }
        out["commands"] = rows
        bad = [k for k, v in rows.items() if v["exit_codes"] != [0]]
        out["void"] = f"non-zero exit: {bad}" if bad else None
        return out
    finally:
        shutil.rmtree(many, ignore_errors=True)
        shutil.rmtree(big, ignore_errors=True)


# -- the run ----------------------------------------------------------------------------------


def otel_bench(root: str, spans: int) -> dict[str, Any]:
    """Per-span cost (start + end, one attribute) of an OpenTelemetry SDK program with each
    span processor: none (the SDK alone), BatchSpanProcessor, SimpleSpanProcessor with a
    file exporter (one JSON line per span, flushed), and WalSpanProcessor in both durability
    levels. Optional (`--only otel`), needs the otel extra."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from walspan.otel import WalSpanProcessor

    class FileExporter(SpanExporter):  # type: ignore[misc]
        def __init__(self, path: str) -> None:
            self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115

        def export(self, batch: Any) -> Any:
            for sp in batch:
                self.f.write(sp.to_json(indent=None) + "\n")
            self.f.flush()
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            self.f.close()

    setups: dict[str, Callable[[str], Any]] = {
        "sdk, no processor": lambda d: None,
        "BatchSpanProcessor + file exporter": lambda d: BatchSpanProcessor(FileExporter(os.path.join(d, "spans.jsonl"))),
        "SimpleSpanProcessor + file exporter": lambda d: SimpleSpanProcessor(FileExporter(os.path.join(d, "spans.jsonl"))),
        "WalSpanProcessor, durable": lambda d: WalSpanProcessor(walspan.Store(d, install_hooks=False)),
        "WalSpanProcessor, process": lambda d: WalSpanProcessor(walspan.Store(d, durability="process", install_hooks=False)),
    }
    out: dict[str, Any] = {"spans": spans, "rows": []}
    for label, make in setups.items():
        workdir = tempfile.mkdtemp(dir=root)
        provider = TracerProvider()
        processor = make(workdir)
        if processor is not None:
            provider.add_span_processor(processor)
        tracer = provider.get_tracer("bench")
        with tracer.start_as_current_span("root"):
            for _ in range(min(200, spans)):  # warm-up: session attached, caches filled
                tracer.start_span("warm").end()
            lats = array.array("q")
            t0 = time.perf_counter_ns()
            for i in range(spans):
                a = time.perf_counter_ns()
                span = tracer.start_span("step", attributes={"i": i})
                span.end()
                lats.append(time.perf_counter_ns() - a)
            total = time.perf_counter_ns() - t0
        provider.shutdown()
        out["rows"].append(dict(percentiles(lats), system=label, spans_per_s=spans / (total / 1e9)))
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# -- shipping (optional: --only ship) ---------------------------------------------------------


def _otlp_sink(conn: Any) -> None:
    """A loopback OTLP/HTTP receiver in a process of its own (not sharing the shipper's GIL):
    decodes every request with opentelemetry-proto, counts spans, answers 200."""
    import gzip as _gzip
    import http.server

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    count = [0]

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = _gzip.decompress(body)
            if "json" in self.headers.get("Content-Type", ""):
                data = json.loads(body)
                count[0] += sum(len(ss.get("spans", [])) for rs in data.get("resourceSpans", []) for ss in rs.get("scopeSpans", []))
            else:
                req = ExportTraceServiceRequest.FromString(body)
                count[0] += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    conn.send(srv.server_address[1])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    conn.recv()
    conn.send(count[0])


def _paced_writer(workdir: str, session: str, rate: float, seconds: float) -> None:
    store = walspan.Store(workdir, durability="process", install_hooks=False)
    t = store.open(session)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        t.start_span("step", kind="tool", attributes={"i": i}).end()
        i += 1
        time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    t.end()
    store.close()


def ship_bench(root: str, sessions: int, spans: int, load_rate: float, load_seconds: float) -> dict[str, Any]:
    """`walspan ship` throughput (a backlog of `sessions` x `spans` ended spans shipped --once,
    per protocol) and lag (4 writer processes appending `load_rate` spans/s in all while a
    follow-mode shipper runs: seconds from each record's append to its acknowledgement)."""
    from walspan.ship import ShipOptions, Shipper

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    sink = ctx.Process(target=_otlp_sink, args=(child,), daemon=True)
    sink.start()
    url = f"http://127.0.0.1:{parent.recv()}/v1/traces"
    out: dict[str, Any] = {"sessions": sessions, "spans_per_session": spans, "throughput": [], "lag": []}
    backlog = tempfile.mkdtemp(dir=root)
    store = walspan.Store(backlog, durability="process", install_hooks=False)
    for k in range(sessions):
        t = store.open(f"s{k}")
        for i in range(spans):
            t.start_span("step", kind="tool", attributes={"i": i}).end()
        t.end()
    store.close()
    for protocol, gz in (("http/protobuf", True), ("http/protobuf", False), ("http/json", True)):
        name = f"{protocol.split('/')[1]}{'-gzip' if gz else ''}"
        t0 = time.perf_counter()
        res = Shipper(backlog, ShipOptions(url, protocol=protocol, gzip=gz, name=name, give_up_after=60)).run()
        dt = time.perf_counter() - t0
        assert res.ok and res.status.spans == sessions * (spans + 1), res  # + each trace-status span
        out["throughput"].append({"protocol": name, "spans": res.status.spans, "seconds": dt, "spans_per_s": res.status.spans / dt})
    for batch_age, poll in ((0.2, 0.25), (0.05, 0.05)):
        workdir = tempfile.mkdtemp(dir=root)
        shipper = Shipper(workdir, ShipOptions(url, batch_age=batch_age, poll_interval=poll))
        stop = threading.Event()
        th = threading.Thread(target=shipper.run, kwargs={"follow": True, "stop": stop})
        th.start()
        writers = [ctx.Process(target=_paced_writer, args=(workdir, f"w{k}", load_rate / 4, load_seconds)) for k in range(4)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        while shipper.status().behind_bytes or shipper.status().pending_spans or shipper.status().in_flight:
            time.sleep(0.05)
        stop.set()
        th.join()
        lags = array.array("q", (int(x * 1e9) for x in shipper.ack_lags))
        row = percentiles(lags)
        out["lag"].append({"batch_age": batch_age, "poll_interval": poll, "load_spans_per_s": load_rate, "records": len(lags),
                           **{k.replace("_us", "_ms"): v / 1000 for k, v in row.items() if k.endswith("_us")}})
    parent.send("count")
    out["received"] = parent.recv()
    sink.terminate()
    return out


def throughput_configs(writers: list[int]) -> list[tuple[str, int, int]]:
    """Every system at every process count; walspan's levels also at every thread count (one process)."""
    cfgs = [("raw-fdatasync", 1, 1)]
    for s in SYSTEMS[1:]:
        cfgs += [(s, n, 1) for n in writers]
    for s in WALSPAN_LEVELS:
        cfgs += [(s, 1, t) for t in writers if t > 1]
    return cfgs


def have_clh() -> bool:
    try:
        import concurrent_log_handler  # noqa: F401
    except ImportError:
        return False
    return True


def machine_info(root: str) -> dict[str, Any]:
    try:
        fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", root], capture_output=True, text=True,
                            timeout=10).stdout.strip()
        fs = fs or subprocess.run(["stat", "-f", "-c", "%T", root], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        fs = "?"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "filesystem": fs,
        "sqlite": sqlite3.sqlite_version,
        "loadavg_at_start": load,
        "walspan": walspan.__version__,
    }


def run_throughput(args: argparse.Namespace, root: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    cfgs = throughput_configs(args.writers)
    if args.systems:
        keep = set(args.systems.split(",")) | {"raw-fdatasync"}  # ratios need the one-stream run
        cfgs = [c for c in cfgs if c[0] in keep]
    if not have_clh():
        log("concurrent-log-handler is not installed (pip install -e '.[bench]'): skipped")
        cfgs = [c for c in cfgs if c[0] != "concurrent-log-handler"]
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {c: [] for c in cfgs}
    raw_key = ("raw-fdatasync", 1, 1)
    for r in range(args.reps):
        order = list(cfgs)
        random.Random(r).shuffle(order)
        for cfg in order:
            res = run_config(*cfg, seconds=args.seconds, root=root)
            res["rep"] = r
            runs[cfg].append(res)
            state = "VOID " + str(res["void"]).splitlines()[0] if res.get("void") else f"{res['rate']:10.0f} ev/s"
            log(f"  rep {r + 1}/{args.reps}  {cfg[0]:<24} procs={cfg[1]} threads={cfg[2]}  {state}")
    raw_by_rep = {x["rep"]: x["rate"] for x in runs[raw_key] if not x.get("void")}
    rows = []
    for (system, procs, threads), rs in runs.items():
        good = [x for x in rs if not x.get("void")]
        void = [str(x["void"]) for x in rs if x.get("void")]
        lats = array.array("q")
        for x in good:
            lats.extend(x["lats"])
        ratios = [x["rate"] / raw_by_rep[x["rep"]] for x in good if x["rep"] in raw_by_rep]
        rows.append(
            {
                "system": system,
                "procs": procs,
                "threads": threads,
                "writers": procs * threads,
                "durable_on_power_loss": DURABLE_ON_POWER_LOSS[system],
                "rates": [x["rate"] for x in good],
                "rate_median": statistics.median([x["rate"] for x in good]) if good else None,
                "ratio_to_one_stream": statistics.median(ratios) if ratios else None,
                "events_verified": sum(x["events"] for x in good),
                "cpu_us_per_append": _median([x.get("cpu_us_per_append") for x in good]),
                "fsyncs_per_append": _median([x.get("fsyncs_per_append") for x in good]),
                "latency": percentiles(lats),
                "void": void or None,
            }
        )
    return rows


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


# -- targets ----------------------------------------------------------------------------------


def _row(rows: list[dict[str, Any]], system: str, procs: int, threads: int = 1) -> dict[str, Any] | None:
    for r in rows:
        if r["system"] == system and r["procs"] == procs and r["threads"] == threads and r["rate_median"]:
            return r
    return None


def _per_rep_ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if a is None or b is None or not a["rates"] or not b["rates"]:
        return None
    if len(a["rates"]) == len(b["rates"]):
        return statistics.median(x / y for x, y in zip(a["rates"], b["rates"]))
    return a["rate_median"] / b["rate_median"]


def evaluate_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 12 (and those of issue 6 that still stand), measured in this run."""
    rows = res.get("throughput", [])
    n = 8
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, need: str, ok: bool | None, detail: str = "") -> None:
        targets.append({"target": name, "measured": value, "required": need, "met": ok, "detail": detail})

    def per_append(row: dict[str, Any] | None) -> str:
        if not row or row.get("cpu_us_per_append") is None:
            return ""
        f = row.get("fsyncs_per_append")
        return f"{row['cpu_us_per_append']:.0f} µs CPU" + ("" if f is None else f", {f:.2f} fdatasyncs") + " per append"

    wd, wp, wi = _row(rows, "walspan-durable", n), _row(rows, "walspan-process", n), _row(rows, "walspan-interval", n)
    out = _row(rows, "flock+fdatasync-outside", n)
    r = _per_rep_ratio(wd, out)
    add(f"durable, {n} procs, one session / flock + fdatasync outside the lock", r, ">= 1.5x",
        None if r is None else r >= 1.5, f"walspan {per_append(wd)}; the peer {per_append(out)}")
    full = _row(rows, "sqlite-wal-full", n)
    r = _per_rep_ratio(wd, full)
    add(f"durable, {n} procs / SQLite WAL synchronous=FULL", r, ">= 2.5x", None if r is None else r >= 2.5)
    w1 = _row(rows, "walspan-durable", 1)
    wt = _row(rows, "walspan-durable", 1, n)
    r = _per_rep_ratio(wt, w1)
    add(f"durable, {n} threads / 1 thread", r, ">= 3x", None if r is None else r >= 3, f"{n} threads: {per_append(wt)}")
    fw = _row(rows, "flock+write", n)
    r = _per_rep_ratio(wp, fw)
    wp1, fw1 = _row(rows, "walspan-process", 1), _row(rows, "flock+write", 1)
    cpu = ""
    if wp1 and fw1:
        cpu = (f"one process: walspan {per_append(wp1)}, flock+write "
               f"{fw1['cpu_us_per_append']:.1f} µs" if fw1.get("cpu_us_per_append") is not None else "")
    add(f"process level, {n} procs / flock + write", r, ">= 0.5x", None if r is None else r >= 0.5, cpu)
    normal = _row(rows, "sqlite-wal-normal", n)
    r = _per_rep_ratio(wp, normal)
    add(f"process level, {n} procs / SQLite WAL synchronous=NORMAL", r, ">= 2x", None if r is None else r >= 2)
    r = _per_rep_ratio(wi, normal)
    add(f"interval level, {n} procs / SQLite WAL synchronous=NORMAL", r, "(reported)", None, per_append(wi))
    raw = _row(rows, "raw-fdatasync", 1)
    if wd and raw and raw["latency"]:
        fsync = raw["latency"]["p50_us"]
        p999 = wd["latency"]["p999_us"]
        add(f"durable, {n} procs: p99.9 append / median fdatasync", p999 / fsync, "<= 10x", p999 / fsync <= 10,
            f"p99.9 {p999 / 1000:.2f} ms, median write+fdatasync {fsync / 1000:.2f} ms")
    comp = res.get("compaction")
    if comp:
        ad = comp.get("appends_during_compaction", {})
        if "latency" in ad:
            mx = ad["latency"]["max_us"] / 1000
            add(f"worst durable append during a {comp['large']['spans']:,}-span compaction (ms)", mx, "< 20 ms", mx < 20,
                f"p99 {ad['latency']['p99_us'] / 1000:.2f} ms, p99.9 {ad['latency']['p999_us'] / 1000:.2f} ms")
    r = _per_rep_ratio(w1, raw)
    detail = ""
    if w1 and raw:
        detail = f"walspan's own cost ~{1e6 / w1['rate_median'] - 1e6 / raw['rate_median']:.0f} µs per durable append"
    add("durable, 1 proc / one-stream write+fdatasync (issue 6)", r, ">= 0.9x", None if r is None else r >= 0.9, detail)
    if wd:
        mx = wd["latency"]["max_us"] / 1000
        add(f"durable, {n} procs: worst append (ms) (issue 6)", mx, "< 100 ms", mx < 100)
    tl = res.get("trace_length")
    if tl:
        r = tl["durable_ratio_longest_to_shortest"]
        add(f"durable events/s at {tl['spans'][-1]} spans / at {tl['spans'][0]} (issue 6)", r, ">= 0.9", r >= 0.9)
    comp = res.get("compaction")
    if comp:
        lg = comp["large"]
        add(f"compaction of a {lg['spans']:,}-span trace (s) (issue 6)", lg["compact_seconds"], "completes", not lg["void"])
        inc = comp["incremental"]
        rows_k = inc["rows"]
        small = min(rows_k, key=lambda x: x["k"])
        big = max(rows_k, key=lambda x: x["k"])
        add(f"incremental compaction after k={small['k']} / from scratch, {inc['spans']:,} spans",
            small["seconds"] / inc["full_rebuild_seconds"], "< 1 (no re-fold)", small["seconds"] < inc["full_rebuild_seconds"],
            f"k={big['k']:,}: {big['seconds']:.2f} s; from scratch {inc['full_rebuild_seconds']:.2f} s; the rest is reading "
            f"the checkpoint ({inc['checkpoint_load_seconds']:.2f} s) and writing the JSON ({inc['dumps_seconds']:.2f} s): O(output)")
        sc = comp["scan"]
        add("WAL scan (MB/s)", sc["mb_per_s"], ">= 100", sc["mb_per_s"] >= 100)
    rec = res.get("recovery")
    if rec:
        add(f"recover() over {rec['sessions']:,} dead sessions (s)", rec["first_seconds"], "< 2 s", rec["first_seconds"] < 2 and not rec["void"])
        add("recover() again, nothing to do (s)", rec["noop_seconds"], "< 2 s", rec["noop_seconds"] < 2)
    return targets


# -- report -----------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [
        "# walspan benchmarks",
        "",
        "Generated by `scripts/bench.py`; regenerate with:",
        "",
        "```",
        m["command"],
        "```",
        "",
        f"Run {m['date_utc']} UTC, mode `{m['mode']}`: {m['reps']} interleaved repetitions of {m['seconds']} s per "
        f"system and writer count; Python {m['python']}, {m['cpus']} CPUs, {m['filesystem']} file system, SQLite "
        f"{m['sqlite']}, load average at start {m['loadavg_at_start']}. Every system appends ~{EVENT_BYTES}-byte "
        "events to one shared file/database. Figures are medians over repetitions; ratios are taken within a "
        "repetition and then the median; latency percentiles pool every acknowledged append of every "
        "repetition. Each run was read back afterwards: a run that lost or duplicated an acknowledged event is "
        "VOID. Figures from a shared or virtual machine drift: compare within a table, not across runs.",
        "",
        "## Targets (issue 12, and those of issue 6 that still stand)",
        "",
        "| target | measured | required | verdict |",
        "|---|---|---|---|",
    ]
    for t in res["targets"]:
        verdict = "—" if t["met"] is None else ("met" if t["met"] else "**missed**")
        detail = f" ({t['detail']})" if t.get("detail") else ""
        lines.append(f"| {t['target']} | {_f(t['measured'], '{:,.2f}')} | {t['required']} | {verdict}{detail} |")
    lines += [
        "",
        "## Appends per second by writers",
        "",
        "![events/s against writers](bench-writers.png)",
        "",
        "CPU per append: user + system time of the writer processes over the timed loops (background "
        "threads included), divided by the appends. fdatasyncs per append: calls counted by a wrapper in "
        "each writer process (— where the system calls them in C: SQLite).",
        "",
        "| system | survives power loss | procs × threads | events/s (median) | × one stream | p50 µs | p99 µs | p99.9 µs | max ms | CPU µs / append | fdatasyncs / append | events verified |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.get("throughput", []):
        lat = r["latency"] or {}
        verified = f"{r['events_verified']:,}" + (" **VOID in some runs**" if r["void"] else "")
        lines.append(
            f"| {r['system']} | {r['durable_on_power_loss']} | {r['procs']} × {r['threads']} | "
            f"{_f(r['rate_median'])} | {_f(r['ratio_to_one_stream'], '{:.2f}')} | {_f(lat.get('p50_us'), '{:,.0f}')} | "
            f"{_f(lat.get('p99_us'), '{:,.0f}')} | {_f(lat.get('p999_us'), '{:,.0f}')} | "
            f"{_f(None if lat.get('max_us') is None else lat['max_us'] / 1000, '{:,.1f}')} | "
            f"{_f(r.get('cpu_us_per_append'), '{:,.1f}')} | "
            f"{_f(None if r['system'].startswith('sqlite') else r.get('fsyncs_per_append'), '{:.3f}')} | {verified} |"
        )
    jr = res.get("json_rewrite")
    if jr:
        lines += [
            "",
            "## The approach walspan replaces: rewrite the whole JSON per event",
            "",
            f"One process, {jr['events']:,} events, tmp + write + fsync + rename per event: {jr['rate']:,.0f} events/s "
            f"overall, {jr['rate_first_quarter']:,.0f}/s over the first quarter and {jr['rate_last_quarter']:,.0f}/s over "
            f"the last (the cost grows with the trace); p50 {jr['latency']['p50_us'] / 1000:.2f} ms, max "
            f"{jr['latency']['max_us'] / 1000:.1f} ms. {'VOID: ' + jr['void'] if jr['void'] else 'All events stored.'}",
        ]
    tl = res.get("trace_length")
    if tl:
        lines += [
            "",
            "## Cost against trace length",
            "",
            f"A fresh process attaches to a trace that already holds N ended spans and appends "
            f"{tl['events_per_measurement']:,} events (durable; 5× as many in process mode); median of {tl['reps']}.",
            "",
            "| spans in the trace | durable events/s | process events/s | attach (open) s |",
            "|---|---|---|---|",
        ]
        for n in tl["spans"]:
            lines.append(f"| {n:,} | {tl['durable'][str(n)]:,.0f} | {tl['process'][str(n)]:,.0f} | {tl['open_seconds'][str(n)]:.3f} |")
        lines.append(
            f"\nRatio longest/shortest: durable {tl['durable_ratio_longest_to_shortest']:.2f}, process "
            f"{tl['process_ratio_longest_to_shortest']:.2f}."
        )
    comp = res.get("compaction")
    if comp:
        lg, inc, sc = comp["large"], comp["incremental"], comp["scan"]
        lines += [
            "",
            "## Compaction",
            "",
            f"- A {lg['spans']:,}-span trace ({lg['wal_mb']:.0f} MB of WAL, {lg['json_mb']:.0f} MB of JSON) compacts "
            f"from scratch in {lg['compact_seconds']:.1f} s (fold + canonical JSON + fsync + rename: "
            f"{lg['fold_mb_per_s']:.1f} MB of WAL/s). {'VOID: ' + lg['void'] if lg['void'] else ''}",
        ]
        ad = comp.get("appends_during_compaction", {})
        if "latency" in ad:
            la = ad["latency"]
            lines.append(
                f"- Meanwhile another process appended {ad['appends']:,} durable events to the same session: p50 "
                f"{la['p50_us']:,.0f} µs, p99 {la['p99_us']:,.0f} µs, max {la['max_us'] / 1000:.1f} ms (appends do "
                "not take the compaction lock)."
            )
        lines += [
            f"- Incremental compaction of a {inc['spans']:,}-span trace ({inc['json_mb']:.1f} MB of JSON) after k new "
            f"records. The same compaction without a checkpoint takes {inc['full_rebuild_seconds']:.2f} s (the fold "
            f"alone {inc['full_refold_seconds']:.2f} s); reading the checkpoint costs "
            f"{inc['checkpoint_load_seconds']:.2f} s and serialising the JSON {inc['dumps_seconds']:.2f} s, the part "
            "proportional to the output:",
            "",
            "| k new records | compaction s |",
            "|---|---|",
        ]
        for row in inc["rows"]:
            lines.append(f"| {row['k']:,} | {row['seconds']:.3f} |")
        lines += ["", f"- WAL scan (framing + checksums, as a torn-tail repair or recovery reads): {sc['mb_per_s']:,.0f} MB/s over {sc['wal_mb']:.0f} MB."]
    rec = res.get("recovery")
    if rec:
        lines += [
            "",
            "## Recovery",
            "",
            f"{rec['sessions']:,} sessions whose writer died (killed without detaching): the first `recover()` marked "
            f"{rec['crashed']:,} crashed (terminal record + fdatasync + compaction each) in {rec['first_seconds']:.2f} s; "
            f"a second run found nothing to do in {rec['noop_seconds']:.2f} s. {'VOID: ' + rec['void'] if rec['void'] else ''}",
        ]
    ot = res.get("otel")
    if ot:
        lines += [
            "",
            "## OpenTelemetry span processors",
            "",
            f"Per span (start + end, one attribute; {ot['spans']:,} spans, one thread) in an OpenTelemetry SDK "
            "program. The batch processor only queues the span (a kill loses the queue); the simple processor "
            "with a file exporter writes at end only (an open span is never written); WalSpanProcessor writes "
            "start and end before returning.",
            "",
            "| processor | spans/s | p50 µs | p99 µs | max µs |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in ot["rows"]:
            lines.append(f"| {r['system']} | {r['spans_per_s']:,.0f} | {r['p50_us']:,.1f} | {r['p99_us']:,.1f} | {r['max_us']:,.1f} |")
    rt = res.get("read_tools")
    if rt:
        lines += ["", "## Read tools at scale", "",
                  f"`ls` of {rt['sessions']:,} compacted traces: {rt['ls_compacted_inprocess_s'] * 1000:,.0f} ms in process "
                  f"({rt['ls_compacted_cli_s'] * 1000:,.0f} ms for the whole `walspan ls` command); "
                  f"the same store without summaries (every log folded): {rt['ls_folded_inprocess_s'] * 1000:,.0f} ms.", "",
                  f"One trace of {rt['spans']:,} spans ({rt['wal_bytes'] / 2**20:,.1f} MiB of WAL, {rt['json_bytes'] / 2**20:,.1f} MiB of JSON), "
                  "each command as its own process (interpreter start included):", "",
                  "| command | seconds | peak RSS MiB |", "|---|---|---|"]
        for label, row in rt["commands"].items():
            lines.append(f"| `walspan {label}` | {row['seconds']:,.2f} | {row['peak_rss_mib']:,.0f} |")
    sh = res.get("ship")
    if sh:
        lines += ["", "## Shipping (`walspan ship`)", "",
                  f"Throughput: a backlog of {sh['sessions']} sessions x {sh['spans_per_session']:,} ended spans shipped "
                  "`--once` to a loopback OTLP/HTTP receiver (another process, decoding every request), default batch "
                  "of 512 spans, 4 requests in flight:", "",
                  "| protocol | spans | seconds | spans/s |", "|---|---:|---:|---:|"]
        for r in sh["throughput"]:
            lines.append(f"| {r['protocol']} | {r['spans']:,} | {r['seconds']:,.2f} | {r['spans_per_s']:,.0f} |")
        lines += ["", "Lag: 4 writer processes appending spans at a steady total rate while `ship --follow` runs; "
                  "seconds from each record's append to the receiver's acknowledgement (cursor saved):", "",
                  "| load spans/s | --batch-age | poll | records | p50 ms | p99 ms | p99.9 ms | max ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sh["lag"]:
            lines.append(f"| {r['load_spans_per_s']:,.0f} | {r['batch_age']} | {r['poll_interval']} | {r['records']:,} | "
                         f"{r['p50_ms']:,.0f} | {r['p99_ms']:,.0f} | {r['p999_ms']:,.0f} | {r['max_ms']:,.0f} |")
    if res.get("notes"):
        lines += ["", "## Notes", ""] + res["notes"]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(12, 5.5))
    rows = [r for r in res.get("throughput", []) if r["rate_median"]]
    for system in SYSTEMS:
        pts = sorted((r["procs"], r["rate_median"]) for r in rows if r["system"] == system and r["threads"] == 1)
        if not pts:
            continue
        loss = DURABLE_ON_POWER_LOSS[system]
        style = "-" if loss == "yes" else ("--" if loss.startswith("no") else "-.")
        lw = 2.5 if system.startswith("walspan") else 1.3
        if len(pts) == 1:
            ax.axhline(pts[0][1], color="grey", linestyle=":", label=f"{system} (1 stream)")
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", linewidth=lw, label=system)
    for r in rows:
        if r["threads"] > 1:
            ax.plot([r["writers"]], [r["rate_median"]], marker="*", markersize=13, linestyle="none",
                    label=f"{r['system']} ({r['procs']} proc × {r['threads']} threads)")
    ax.set_yscale("log")
    ax.set_xlabel("writers (processes)")
    ax.set_ylabel("events/s (median)")
    ax.set_xticks(sorted({r["procs"] for r in rows}))
    ax.set_title("Appends to one shared log; solid: survives power loss, dashed: does not, dash-dot: all but ~100 ms")
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


NOTES = [
    "- Group commit (walspan/_wal.py): an append writes its record under the append lock; in the durable "
    "level it then needs its end offset under the durable mark in the shared state. At most one fdatasync "
    "of a WAL runs at a time, led by the holder of the flush lock (a non-blocking flock); it covers every "
    "record written before it began and raises the mark through a crc'd slot written without the append "
    "lock. Writers that find a flush in flight sleep on a futex in the shared state until it ends, then are "
    "covered or lead the next flush, which takes the whole queue. A leader that follows a flush which woke "
    "several writers waits half an fdatasync (at most 0.2 ms) so that it covers their next records too "
    "(PostgreSQL's commit_delay/commit_siblings). Threads of one process hand their records to one writer "
    "(one lock round-trip and one pwrite per batch) and share one flush at a time.",
    "- The interval level runs the same group commit from one background thread per process, at most every "
    "100 ms per WAL, only when that process's writes are above the mark.",
    "- Compaction writes and fdatasyncs the JSON 2 MiB at a time: on ext4 (data=ordered) a journal commit, "
    "which every concurrent append's fdatasync waits for, first writes out the dirty data of files it "
    "allocated blocks for, so a JSON of hundreds of MB synced once stalled appends for its whole writeback.",
    "",
    "## Why targets are missed (read with the figures above)",
    "",
    "- **8 processes against `fdatasync` outside the lock, and against SQLite FULL.** The peer is already "
    "group-committed by the kernel: on ext4, overlapping fdatasyncs of one file wait for one journal commit, "
    "with no scheduling delay between one commit and the next. walspan now issues 5-10 times fewer "
    "fdatasyncs per append than the peer (see the table), so the disk is not what limits it; what does is "
    "CPU on 2 cores shared with other work: every durable append costs a sleep and a wake-up (futex), and "
    "its Python runs cold after each sleep (the CPU-per-append column: walspan's durable appends cost about "
    "as much CPU as the peer's, whose CPU is mostly the kernel's fdatasync work). A serialised flush also "
    "leaves the disk idle while the next leader is scheduled; the commit delay trades some of that for "
    "larger batches. The gap to 1.5x is therefore CPU per append and scheduling, not fdatasyncs: walspan "
    "matches the peer at 8 and 16 processes with 7-12 times fewer fdatasyncs. SQLite FULL in WAL mode "
    "runs near the one-stream limit here, so the 2.5x over it is met.",
    "- **Worst durable append during the 1,000,000-span compaction.** The JSON is now synced 2 MiB at a "
    "time; the remaining outliers (a few tens of ms at most, p99.9 a few ms) come with the disk shared "
    "with other work: in a run with a quieter disk the worst was 6.5 ms (before: 57-122 ms).",
    "- **Single-stream figures in a run with a contended disk.** When other work hammers the disk (see the "
    "one-stream `write`+`fdatasync` and `fdatasync` inside the lock rows), single-writer figures (1 process "
    "against the one-stream loop, events/s against trace length, `recover()` of 1,000 sessions, each one "
    "fdatasync after another) fall with it, and the ratios built on them swing: compare within a run.",
    "- **8 threads against 1 thread.** The threads share one flush at a time and write in batches, but all "
    "their Python (validation, msgpack, framing, the wake-ups) runs under one GIL: about 8 appends' worth "
    "of Python per flush cycle caps a single process well below 3x one thread.",
    "- **`process` level.** No disk in the loop, so this is CPU per append only: walspan's ~8-10 µs "
    "(Span API, validation, msgpack, crc32 framing, the append lock, the shared state) against ~4-5 µs for "
    "json.dumps + flock + write + unlock. The uncontended path no longer builds a stat result or a locked "
    "view per append and reads the shared state through cached bytes; what is left is spread over the "
    "layers (no single item above ~1 µs in the profile).",
    "- **p99.9 under 8 writers.** 8 processes on 2 cores: a writer descheduled between its write and its "
    "wake-up, or a leader descheduled while it holds the flush lock, delays the others; in absolute terms "
    "p99.9 is a few ms, as for the peer (whose fdatasyncs are merged by the kernel with no scheduling "
    "between them), and the ratio to a fast median fdatasync (0.1-0.2 ms) is large.",
    "",
    "## Reading the table",
    "",
    "- The one-stream `write`+`fdatasync` loop has no lock, no framing and no checksum: it is the disk's "
    "limit for one writer, not a competitor.",
    "- The peers serialise each event from a dict (json.dumps) as any logger must; walspan serialises its "
    "dict with msgpack.",
    "- The peers that do not survive power loss (SQLite NORMAL, concurrent-log-handler, flock+write, walspan "
    "`process`) are not comparable with the durable ones; they are there to place walspan's `process` and "
    "`interval` levels. SQLite NORMAL in WAL mode loses the transactions since its last checkpoint sync on "
    "power loss, like walspan's `interval` its last ~100 ms.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about a minute: one repetition, short runs, smaller traces")
    ap.add_argument("--out", default="bench-results", help="directory for bench-results.json, BENCHMARKS.md, bench-writers.png")
    ap.add_argument("--workdir", default=None, help="where the systems write (default: a temporary directory)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of the throughput matrix")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per throughput run")
    ap.add_argument("--only", default="throughput,json,length,compaction,recovery",
                    help="comma-separated parts to run (throughput,json,length,compaction,recovery; "
                         "otel, the OpenTelemetry processors' per-span cost, only when named: needs walspan[otel]; "
                         "read, read tools at scale, only when named; "
                         "ship, `walspan ship` throughput and lag to a loopback OTLP receiver, only when named: needs walspan[otel])")
    ap.add_argument("--systems", default="", help="comma-separated systems for the throughput matrix (default: all)")
    ap.add_argument("--report-from", metavar="JSON", default=None,
                    help="measure nothing: re-render BENCHMARKS.md and the plot into --out from a bench-results.json "
                         "(the figures of that run, this version's notes and target verdicts)")
    args = ap.parse_args(argv)
    if args.report_from:
        with open(args.report_from) as f:
            res = json.load(f)
        res["targets"] = evaluate_targets(res)
        res["notes"] = NOTES
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench-results.json"), "w") as f:
            json.dump(res, f, indent=1, default=lambda o: None)
        with open(os.path.join(args.out, "BENCHMARKS.md"), "w") as f:
            f.write(markdown(res))
        plot(res, os.path.join(args.out, "bench-writers.png"))
        return 0
    q = args.quick
    args.reps = args.reps or (1 if q else 5)
    args.seconds = args.seconds or (0.75 if q else 2.0)
    args.writers = [1, 2, 4, 8, 16]
    parts = set(args.only.split(","))
    os.makedirs(args.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="walspan-bench-", dir=args.workdir)
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.1f}s] {msg}", flush=True)

    cmd = "python scripts/bench.py" + (" --quick" if q else "") + f" --out {args.out}"
    if args.reps != (1 if q else 5):
        cmd += f" --reps {args.reps}"
    if args.seconds != (0.75 if q else 2.0):
        cmd += f" --seconds {args.seconds}"
    if parts != {"throughput", "json", "length", "compaction", "recovery"}:
        cmd += f" --only {args.only}"
    if args.systems:
        cmd += f" --systems {args.systems}"
    res: dict[str, Any] = {"meta": dict(machine_info(root), mode="quick" if q else "full", reps=args.reps,
                                        seconds=args.seconds, command=cmd, event_bytes=EVENT_BYTES)}
    try:
        if "throughput" in parts:
            log("throughput matrix")
            res["throughput"] = run_throughput(args, root, log)
        if "json" in parts:
            log("JSON rewrite per event")
            res["json_rewrite"] = json_rewrite(root, 500 if q else 2000)
        if "length" in parts:
            log("cost against trace length")
            res["trace_length"] = trace_length_bench(root, [1000, 10000, 100000], 500 if q else 2000, 2 if q else 3)
        if "compaction" in parts:
            log("compaction")
            res["compaction"] = compaction_bench(root, 100_000 if q else 1_000_000, 20_000 if q else 100_000,
                                                 [1, 100, 10_000])
        if "recovery" in parts:
            log("recovery")
            res["recovery"] = recovery_bench(root, 200 if q else 1000)
        if "otel" in parts:
            log("OpenTelemetry span processors")
            res["otel"] = otel_bench(root, 2000 if q else 20000)
        if "read" in parts:  # not in the default set: run with --only read
            log("read tools at scale")
            res["read_tools"] = read_tools_bench(root, 20_000 if q else 200_000, 200 if q else 1000, 1 if q else 3)
        if "ship" in parts:  # not in the default set: run with --only ship
            log("shipping: throughput and lag")
            res["ship"] = ship_bench(root, 20, 5_000 if q else 25_000, 2000, 5 if q else 20)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["targets"] = evaluate_targets(res)
    res["notes"] = NOTES
    res["meta"]["total_seconds"] = time.perf_counter() - t_all
    with open(os.path.join(args.out, "bench-results.json"), "w") as f:
        json.dump(res, f, indent=1, default=lambda o: None)
    with open(os.path.join(args.out, "BENCHMARKS.md"), "w") as f:
        f.write(markdown(res))
    plotted = plot(res, os.path.join(args.out, "bench-writers.png"))
    log(f"wrote {args.out}/bench-results.json, BENCHMARKS.md" + (", bench-writers.png" if plotted else " (no matplotlib: no plot)"))
    for t in res["targets"]:
        verdict = "?" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {verdict:<6} {t['target']}: {_f(t['measured'], '{:,.2f}')} (need {t['required']})")
    void = [r for r in res.get("throughput", []) if r["void"]]
    for r in void:
        print(f"  VOID   {r['system']} procs={r['procs']} threads={r['threads']}: {r['void'][0].splitlines()[0]}")
    return 1 if void else 0


if __name__ == "__main__":
    sys.exit(main())
