"""`walspan stress`: parallel writer processes that die in every way a process can, then a proof
that every trace came out right.

What a run does
---------------
1. Plans (from --seed) N writer processes over M sessions: writer i writes to session i mod M, so
   several writers share each trace. Each writer gets a *fate* and a moment for it:

   ========= ================================================================ =================
   fate      what happens                                                     terminal action
   ========= ================================================================ =================
   sigkill   the parent sends SIGKILL at a random moment of the load phase    none
   sigterm   the parent sends SIGTERM at a random moment; walspan's signal    ``crashed``
             hook ends the writer's trace as crashed ("killed by SIGTERM"),
             then the process dies by the signal
   end       at its moment the writer calls ``trace.end()`` and exits 0       ``completed``
   close     at its moment the writer calls ``trace.close()`` (detach, the    none
             trace stays open) and exits 0
   exception at its moment the writer raises an uncaught exception; walspan's ``error``
             ``sys.excepthook`` ends its trace as error, the process exits 1
   ========= ================================================================ =================

   About --kill-rate of the writers are signalled (a quarter of those, at least one when two or
   more are signalled, with SIGTERM), the rest split between end, close and exception.

2. Starts the writers (``python -c``, each its own interpreter and walspan writer). Each opens
   its session, reports its writer id, waits for the common "go" byte, then logs realistic
   agent turns as fast as it can: a root ``turn`` span, nested ``llm.generate`` spans (events,
   attribute updates, outputs), ``tool`` spans beneath those, metadata updates, some inputs and
   outputs of 64-256 KiB. Every call is one *op* carrying the writer's op number; the writer
   writes ``A <op>`` to its ack pipe right after the call returns, so the parent holds every
   acknowledged op as it happens. When an append is refused (TraceClosedError: another writer
   ended the trace), the writer stops logging and waits for its fate.

3. Meanwhile a janitor process runs ``Store.recover()`` and compacts every session in a loop;
   it is itself SIGKILLed at random moments (once per 5 s of load, at least once) and
   restarted, so recovery and compaction get killed mid-way too.

4. After the load phase and every writer's death, the parent runs ``recover()`` (timed), compacts,
   and checks, per writer and per session:

   - lost: an acknowledged op missing from the WAL (0 expected);
   - duplicates: an op present more than once (0);
   - holes: a writer's ops in the WAL are not exactly ops 0..k-1 in order, or k exceeds the
     acknowledged count by more than the one op that can be in flight at death (0);
   - after_terminal: an op of a writer recorded after the trace's terminal record (0);
   - wrong_statuses: the folded status differs from the expected one (below) (0);
   - crashed_while_alive: a crash or writer-lost record written by recovery for a writer not
     yet proven dead: its record time precedes the moment the parent signalled that writer, or
     it names a writer that was never signalled (0);
   - invalid_json: a canonical JSON that does not parse or differs from ``Store.load()`` (0);
   - fold: the folded trace holds one span per SPAN_START record and one event per SPAN_EVENT
     record before the terminal record, and no span of an ended trace is still open;
   - ``walspan._verify.verify_dir`` (what ``walspan verify`` runs) reports no error;
   - every writer ended the way its fate says (exit status 0, 1, -SIGTERM or -SIGKILL);
   - the janitor reported no error, and every JSON it read right after compacting parsed
     (a reader never sees a torn JSON).

5. The damage phase (walspan/_damage.py, --damage-trials, seeded from --seed): copies of the
   WALs, in .stress-damage/ beside them, get one bit flipped, a sector zeroed or garbled, or a
   cut; Store.load, verify, open, recover, compact and repair must then give one verdict on
   each copy (the same records, or corruption at the same offset that repair gets out of,
   keeping every record before it), and a torn-tail verdict must not leave intact records
   behind. Each outcome is counted; any other fails the run, naming what each reader said.

Sizes: the writers log a few MB per second of load between them, so traces grow with
--duration, and the final checks fold each whole trace in memory (measured, durable mode on 2
cores: 20 s -> ~150 MB of WAL; 90 s -> 415 MB of WAL and 1.4 GB peak RSS in the checking
parent; a 600 s run would need several GB). For long soaks run many rounds of the default size
instead: scripts/stress.py --hours N.

Expected status of a session (derived from its writers' fates)
---------------------------------------------------------------
The *terminal actions* are: ``end`` (status completed), ``exception`` (error) and ``sigterm``
(crashed, by walspan's signal hook). A writer *performs* its action when it reaches it: an end
or exception writer reports it to the parent just before acting, a sigterm writer when the
parent sends the signal. The first terminal record in the WAL wins (invariant 3), so:

1. If at least one writer of the session performed a terminal action, the WAL's first terminal
   record must be written by one of those writers (its ``writer`` field), and the status must be
   the one of that writer's action. If some writer's ``trace.end()`` returned without error, that
   writer won: the status is ``completed``. (Which of two truly concurrent actions wins is decided
   by the append lock; whichever did, the status must match it.)
2. Otherwise, if every writer was SIGKILLed, recovery marks the trace ``crashed`` (the record
   comes from recovery, not a writer).
3. Otherwise every writer closed cleanly: the trace is idle, status ``running`` (not crashed).

A session mixing SIGKILL and close without any terminal action would have a path-dependent
outcome (``running`` if a recovery recorded the killed writers as lost before the others
detached, else ``crashed``), so the plan turns one close fate of such a session into ``end``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._damage import DEFAULT_TRIALS as DEFAULT_DAMAGE_TRIALS
from ._wal import DURABILITY_LEVELS

FATES = ("sigkill", "sigterm", "end", "close", "exception")
TERMINAL_STATUS = {"end": "completed", "exception": "error", "sigterm": "crashed"}
EXPECTED_RC = {"sigkill": -signal.SIGKILL, "sigterm": -signal.SIGTERM, "end": 0, "close": 0, "exception": 1}
DEFAULT_DURATION = 20.0
OP_KEY = "stress.op"
_WAIT_EXIT_S = 60.0  # safety net only: a writer that outlives its fate by this much is a failure


# == the plan =================================================================================


@dataclass
class WriterPlan:
    index: int
    session: str
    fate: str
    at: float  # seconds after "go": when the fate happens
    seed: int


def make_plan(seed: int, writers: int, sessions: int, duration: float, kill_rate: float) -> list[WriterPlan]:
    """Deterministic for a seed: fates, moments, sessions, each writer's own seed."""
    rng = random.Random(seed)
    n_signal = round(kill_rate * writers)
    n_term = max(1, n_signal // 4) if n_signal >= 2 else 0
    rest = writers - n_signal
    fates = ["sigkill"] * (n_signal - n_term) + ["sigterm"] * n_term
    cycle = ("end", "close", "exception")
    start = rng.randrange(3)
    fates += [cycle[(start + k) % 3] for k in range(rest)]
    rng.shuffle(fates)
    plans = []
    for i, fate in enumerate(fates):
        if fate in ("sigkill", "sigterm"):
            at = rng.uniform(0.05, 0.9) * duration
        else:
            at = rng.uniform(0.4, 1.0) * duration
        plans.append(WriterPlan(i, f"stress-{i % sessions}", fate, at, rng.randrange(1 << 30)))
    by_session: dict[str, list[WriterPlan]] = {}
    for p in plans:
        by_session.setdefault(p.session, []).append(p)
    for group in by_session.values():
        kinds = {p.fate for p in group}
        if not kinds & set(TERMINAL_STATUS) and "sigkill" in kinds and "close" in kinds:
            next(p for p in group if p.fate == "close").fate = "end"
    return plans


def status_without_terminal_action(fates: list[str]) -> str:
    """Rules 2 and 3 of the module docstring: no writer of the session performed a terminal action."""
    return "crashed" if all(f == "sigkill" for f in fates) else "running"


# == the writer process =======================================================================

_WORDS = [
    "the", "agent", "reads", "file", "then", "runs", "tests", "and", "fixes", "failing", "assertion",
    "in", "parser", "while", "user", "asks", "for", "summary", "of", "every", "change", "made", "diff",
]


def _text(rng: random.Random, pool: str, size: int) -> str:
    start = rng.randrange(0, max(1, len(pool) - size))
    return pool[start : start + size]


def writer_main(config_json: str) -> int:
    """Entry point of one writer process (run with `python -c`); see the module docstring."""
    from ._store import Store
    from .errors import TraceClosedError

    cfg = json.loads(config_json)
    ack_fd, ctl_fd = cfg["ack_fd"], cfg["ctl_fd"]
    index, fate, at = cfg["index"], cfg["fate"], cfg["at"]
    rng = random.Random(cfg["seed"])
    # A parent that ignores SIGTERM would make it ignored here too; the test needs its default.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pool = " ".join(rng.choice(_WORDS) for _ in range(60_000))

    def send(line: str) -> None:
        os.write(ack_fd, (line + "\n").encode())

    store = Store(cfg["dir"], durability=cfg["durability"], install_hooks=True)
    trace = store.open(cfg["session"], metadata={"title": f"stress session {cfg['session']}", "stress.writers": True})
    writer = store._writer
    assert writer is not None
    send("R " + json.dumps({"writer_id": writer.writer_id, "pid": os.getpid()}))
    if os.read(ctl_fd, 1) != b"g":
        return 3  # the parent went away before "go"
    go = time.monotonic()
    deadline = go + at if fate in ("end", "close", "exception") else None
    import psutil

    proc = psutil.Process()
    op = 0
    last_rss = 0.0

    def ack() -> None:
        nonlocal op
        send(f"A {op}")
        op += 1

    def tag(extra: dict[str, Any] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {OP_KEY: op}
        if extra:
            d.update(extra)
        return d

    def big(p: float) -> str:
        if rng.random() < p:
            return _text(rng, pool, rng.randrange(64 << 10, 256 << 10))
        return _text(rng, pool, rng.randrange(200, 4000))

    try:
        turn = 0
        while deadline is None or time.monotonic() < deadline:
            if _readable(ctl_fd):  # once per turn (~3-20 ops)
                return 3  # the parent ended the run (or died): do not outlive it
            now = time.monotonic()
            if now - last_rss > 0.5:
                last_rss = now
                send(f"M {proc.memory_info().rss}")
            turn += 1
            root = trace.start_span(
                "turn", kind="agent", parent=None, attributes=tag({"turn": turn, "writer": index}), input=big(0.01)
            )
            ack()
            for _ in range(rng.randrange(1, 4)):
                gen = trace.start_span(
                    "llm.generate",
                    kind="llm",
                    parent=root,
                    attributes=tag({"model": "stress-1", "temperature": 0.2}),
                    input={"messages": [{"role": "user", "content": big(0.02)}]},
                )
                ack()
                gen.add_event("first_token", tag({"latency_ms": rng.randrange(50, 900)}))
                ack()
                tool = trace.start_span(
                    "tool", kind="tool", parent=gen, attributes=tag({"tool": rng.choice(("bash", "read", "edit"))}),
                    input={"command": _text(rng, pool, 120)},
                )
                ack()
                tool.end("ok" if rng.random() < 0.9 else "error", output={OP_KEY: op, "stdout": big(0.01)})
                ack()
                gen.set_attributes(tag({"usage.input_tokens": rng.randrange(1, 9000), "usage.output_tokens": 12}))
                ack()
                gen.end("ok", output={OP_KEY: op, "text": big(0.01)})
                ack()
            if rng.random() < 0.2:
                trace.set_metadata({OP_KEY: op, "last_turn": turn})
                ack()
            root.end("ok", output={OP_KEY: op, "summary": _text(rng, pool, 300)})
            ack()
    except TraceClosedError as exc:  # another writer ended the trace: stop logging, await the fate
        send(f"C {exc.status}")
    # The fate. Signalled writers wait for their signal (the parent closing ctl ends the wait).
    if deadline is None:  # sigkill / sigterm
        _wait_readable(ctl_fd, None)
        return 3
    assert deadline is not None
    _wait_readable(ctl_fd, max(0.0, deadline - time.monotonic()))
    if fate == "end":
        send("T end")
        try:
            trace.end("completed")
        except TraceClosedError as exc:
            send(f"E refused {exc.status}")
        else:
            send("E ok")
        return 0
    if fate == "close":
        trace.close()
        store.close()
        send("T close")
        return 0
    send("T exception")
    raise RuntimeError(f"stress: planned uncaught exception in writer {index}")


def _readable(fd: int) -> bool:
    import select

    r, _w, _x = select.select([fd], [], [], 0)
    return bool(r)


def _wait_readable(fd: int, timeout: float | None) -> None:
    import select

    select.select([fd], [], [], timeout)


_WRITER_CMD = "import sys; from walspan._stress import writer_main; sys.exit(writer_main(sys.argv[1]))"


# == the janitor process ======================================================================


def janitor_main(directory: str, out_fd: int, ctl_fd: int) -> int:
    """Run recover() and compact every session in a loop until ctl becomes readable."""
    from ._store import Store
    from .errors import WalspanError

    store = Store(directory, install_hooks=False, create=False)
    rounds = compactions = 0
    while not _readable(ctl_fd):
        report = store.recover()
        for a in report.actions:
            os.write(out_fd, ("J " + json.dumps({"session": a.session_id, "action": a.action, "time": time.time_ns()}) + "\n").encode())
        for exc in report.corrupt:
            os.write(out_fd, ("X " + json.dumps(str(exc)) + "\n").encode())
        for sid in store.sessions():
            try:
                path = store.compact(sid)
                compactions += 1
                # what a reader sees mid-run must always be a whole JSON (old or new, never torn)
                with open(path, "rb") as fh:
                    json.loads(fh.read())
            except (WalspanError, OSError, ValueError) as exc:
                os.write(out_fd, ("X " + json.dumps(f"{sid}: {exc}") + "\n").encode())
        rounds += 1
        os.write(out_fd, f"N {rounds} {compactions}\n".encode())
        _wait_readable(ctl_fd, 0.2)  # pacing: leave the CPU to the writers between rounds
    return 0


_JANITOR_CMD = (
    "import sys; from walspan._stress import janitor_main; "
    "sys.exit(janitor_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))"
)


# == the parent ===============================================================================


@dataclass
class WriterState:
    plan: WriterPlan
    proc: subprocess.Popen[bytes]
    ack_r: int
    ctl_w: int
    buf: bytes = b""
    writer_id: str | None = None
    acked: int = 0
    rss_peak: int = 0
    signalled_ns: int = 0  # wall clock (time.time_ns) just before the signal was sent
    performed: bool = False
    end_ok: bool = False
    closed_status: str | None = None
    rc: int | None = None
    eof: bool = False
    messages: list[str] = field(default_factory=list)


@dataclass
class Figures:
    seed: int
    writers: int
    sessions: int
    durability: str
    duration_s: float
    kill_rate: float
    events_acknowledged: int = 0
    events_per_s: float = 0.0
    peak_writer_rss_mb: float = 0.0
    kills: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    duplicates: int = 0
    holes: int = 0
    after_terminal: int = 0
    wrong_statuses: int = 0
    crashed_while_alive: int = 0
    invalid_json: int = 0
    fold_mismatches: int = 0
    verify_errors: int = 0
    wrong_exits: int = 0
    janitor_rounds: int = 0
    janitor_compactions: int = 0
    janitor_actions: int = 0
    janitor_kills: int = 0
    recover_s: float = 0.0
    recover_actions: int = 0
    wal_bytes: int = 0
    damage_trials: int = 0
    damage_kinds: dict[str, int] = field(default_factory=dict)
    damage_outcomes: dict[str, int] = field(default_factory=dict)
    damage_s: float = 0.0
    total_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        return d


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(
    directory: str,
    *,
    seed: int,
    writers: int = 8,
    sessions: int = 4,
    duration: float = DEFAULT_DURATION,
    durability: str = "durable",
    kill_rate: float = 0.5,
    progress: bool = True,
    damage_trials: int = DEFAULT_DAMAGE_TRIALS,
) -> Figures:
    """Run one stress round in `directory` (created if missing, must hold no WAL)."""
    t_start = time.monotonic()
    figs = Figures(seed, writers, sessions, durability, duration, kill_rate)
    os.makedirs(directory, exist_ok=True)
    if any(n.endswith(".wal") for n in os.listdir(directory)):
        raise ValueError(f"{directory} already holds traces; stress needs an empty directory")
    plans = make_plan(seed, writers, sessions, duration, kill_rate)
    figs.kills = {f: sum(1 for p in plans if p.fate == f) for f in FATES}
    env = dict(os.environ)
    env.pop("WALSPAN_CONTEXT", None)
    logs = os.path.join(directory, ".stress-logs")  # stderr of every process (not a trace)
    os.makedirs(logs, exist_ok=True)
    states: list[WriterState] = []
    sel = selectors.DefaultSelector()
    janitors: list[tuple[subprocess.Popen[bytes], _Janitor]] = []
    try:
        for p in plans:
            ack_r, ack_w = os.pipe()
            ctl_r, ctl_w = os.pipe()
            cfg = {
                "dir": directory, "session": p.session, "fate": p.fate, "at": p.at, "seed": p.seed,
                "index": p.index, "durability": durability, "ack_fd": ack_w, "ctl_fd": ctl_r,
            }
            with open(os.path.join(logs, f"writer-{p.index}.log"), "wb") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _WRITER_CMD, json.dumps(cfg)], pass_fds=(ack_w, ctl_r), env=env,
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                )
            os.close(ack_w)
            os.close(ctl_r)
            os.set_blocking(ack_r, False)
            st = WriterState(p, proc, ack_r, ctl_w)
            states.append(st)
            sel.register(ack_r, selectors.EVENT_READ, st)
        # wait until every writer is attached (bounded: a writer that dies early is a failure)
        ready_deadline = time.monotonic() + 120
        while any(s.writer_id is None and not s.eof for s in states) and time.monotonic() < ready_deadline:
            _pump(sel, 1.0, figs)
        for s in states:
            if s.writer_id is None:
                figs.failures.append(f"writer {s.plan.index} never attached (rc {s.proc.poll()})")
        if figs.failures:
            return figs
        def start_janitor() -> _Janitor:
            j_out_r, j_out_w = os.pipe()
            j_ctl_r, j_ctl_w = os.pipe()
            with open(os.path.join(logs, f"janitor-{len(janitors)}.log"), "wb") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _JANITOR_CMD, directory, str(j_out_w), str(j_ctl_r)],
                    pass_fds=(j_out_w, j_ctl_r), env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                )
            os.close(j_out_w)
            os.close(j_ctl_r)
            os.set_blocking(j_out_r, False)
            state = _Janitor(j_out_r, j_ctl_w)
            janitors.append((proc, state))
            sel.register(j_out_r, selectors.EVENT_READ, state)
            return state

        jstate = start_janitor()
        # the janitor itself is SIGKILLed at random moments (mid-recovery, mid-compaction) and
        # restarted: recovery and compaction must be as crash-safe as the writers
        jrng = random.Random(seed ^ 0x5EED)
        janitor_kills = sorted(jrng.uniform(0.1, 0.9) * duration for _ in range(max(1, int(duration // 5))))
        figs.janitor_kills = len(janitor_kills)

        # -- load phase ------------------------------------------------------------------
        go = time.monotonic()
        for s in states:
            os.write(s.ctl_w, b"g")
        pending = sorted((s for s in states if s.plan.fate in ("sigkill", "sigterm")), key=lambda s: s.plan.at)
        next_tick = go + 1.0
        end_at = go + duration
        while True:
            now = time.monotonic()
            while pending and go + pending[0].plan.at <= now:
                s = pending.pop(0)
                s.signalled_ns = time.time_ns()
                s.performed = True
                sig = signal.SIGKILL if s.plan.fate == "sigkill" else signal.SIGTERM
                try:
                    s.proc.send_signal(sig)
                except ProcessLookupError:  # pragma: no cover - it died on its own: rc check reports it
                    pass
            while janitor_kills and go + janitor_kills[0] <= now:
                janitor_kills.pop(0)
                janitors[-1][0].kill()
                janitors[-1][0].wait()
                jstate = start_janitor()
            if now >= next_tick:
                next_tick += 1.0
                if progress:
                    acked = sum(s.acked for s in states)
                    alive = sum(1 for s in states if s.proc.poll() is None)
                    signalled = sum(1 for s in states if s.signalled_ns)
                    _progress(
                        f"[{now - go:5.1f}s] acked {acked} ({acked / max(now - go, 1e-9):.0f}/s)  "
                        f"writers alive {alive}/{len(states)}  signalled {signalled}  "
                        f"janitor rounds {sum(j.rounds for _p, j in janitors)}"
                    )
            if now >= end_at and not pending:
                break
            wait = min(
                next_tick,
                end_at,
                go + pending[0].plan.at if pending else end_at,
                go + janitor_kills[0] if janitor_kills else end_at,
            ) - now
            _pump(sel, max(0.0, wait), figs)
        load_s = time.monotonic() - go

        # -- every writer ends its own way; drain pipes until each ack pipe is at EOF --------
        exit_deadline = time.monotonic() + _WAIT_EXIT_S
        while any(not s.eof for s in states) and time.monotonic() < exit_deadline:
            _pump(sel, 0.5, figs)
        for s in states:
            try:
                s.rc = s.proc.wait(timeout=max(0.1, exit_deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                figs.failures.append(f"writer {s.plan.index} ({s.plan.fate}) did not end; killed")
                s.proc.kill()
                s.rc = s.proc.wait()
        os.write(jstate.ctl_w, b"s")
        while not all(j.eof for _p, j in janitors):
            _pump(sel, 1.0, figs)
        last = janitors[-1][0]
        if last.wait(timeout=_WAIT_EXIT_S) != 0:
            figs.failures.append(f"janitor exited with status {last.returncode}")
        figs.janitor_rounds = sum(j.rounds for _p, j in janitors)
        figs.janitor_compactions = sum(j.compactions for _p, j in janitors)
        figs.janitor_actions = sum(len(j.actions) for _p, j in janitors)
        figs.failures.extend(f"janitor: {m}" for _p, j in janitors for m in j.errors)
        figs.events_acknowledged = sum(s.acked for s in states)
        figs.events_per_s = figs.events_acknowledged / load_s if load_s > 0 else 0.0
        figs.peak_writer_rss_mb = max((s.rss_peak for s in states), default=0) / (1 << 20)
        for s in states:
            if s.rc != EXPECTED_RC[s.plan.fate]:
                figs.wrong_exits += 1
                figs.failures.append(f"writer {s.plan.index} ({s.plan.fate}) exited with {s.rc}, expected {EXPECTED_RC[s.plan.fate]}")
            for m in s.messages:
                figs.failures.append(f"writer {s.plan.index}: {m}")

        # -- recover, then verify ---------------------------------------------------------
        check(directory, states, figs)
        if damage_trials:
            if progress:
                _progress(f"damage phase: {damage_trials} damaged copies, every reader's verdict on each")
            damage(directory, seed, damage_trials, figs)
    finally:
        for s in states:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()
            for fd in (s.ack_r, s.ctl_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        for jproc, j in janitors:
            if jproc.poll() is None:
                jproc.kill()
                jproc.wait()
            for fd in (j.out_r, j.ctl_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        sel.close()
        figs.total_s = time.monotonic() - t_start
    return figs


class _Janitor:
    def __init__(self, out_r: int, ctl_w: int) -> None:
        self.out_r, self.ctl_w = out_r, ctl_w
        self.buf = b""
        self.rounds = self.compactions = 0
        self.actions: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.eof = False

    def line(self, text: str) -> None:
        kind, _, rest = text.partition(" ")
        if kind == "N":
            r, c = rest.split()
            self.rounds, self.compactions = int(r), int(c)
        elif kind == "J":
            self.actions.append(json.loads(rest))
        elif kind == "X":
            self.errors.append(json.loads(rest))


def _pump(sel: selectors.BaseSelector, timeout: float, figs: Figures) -> None:
    """Read whatever the writers and the janitor have sent, waiting at most `timeout`."""
    for key, _ in sel.select(timeout):
        st = key.data
        fd = key.fd
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            st.eof = True
            sel.unregister(fd)
            continue
        data = st.buf + chunk
        *lines, st.buf = data.split(b"\n")
        for raw in lines:
            text = raw.decode()
            if isinstance(st, _Janitor):
                st.line(text)
            else:
                _writer_line(st, text)


def _writer_line(st: WriterState, text: str) -> None:
    kind, _, rest = text.partition(" ")
    if kind == "A":
        n = int(rest)
        if n != st.acked:
            st.messages.append(f"ack {n} out of order (expected {st.acked})")
        st.acked = n + 1
    elif kind == "M":
        st.rss_peak = max(st.rss_peak, int(rest))
    elif kind == "R":
        st.writer_id = json.loads(rest)["writer_id"]
    elif kind == "T":
        if rest in TERMINAL_STATUS:
            st.performed = True
    elif kind == "E":
        st.end_ok = rest == "ok"
    elif kind == "C":
        st.closed_status = rest


# == verification =============================================================================


def _op_of(rtype: int, p: dict[str, Any]) -> int | None:
    from ._format import RecordType as T

    if rtype in (T.SPAN_START, T.SPAN_ATTRIBUTES, T.SPAN_EVENT):
        v = (p.get("attributes") or {}).get(OP_KEY)
    elif rtype == T.SPAN_END:
        out = p.get("output")
        v = out.get(OP_KEY) if isinstance(out, dict) else None
    elif rtype == T.METADATA:
        v = (p.get("metadata") or {}).get(OP_KEY)
    else:
        return None
    return v if isinstance(v, int) else None


def check(directory: str, states: list[WriterState], figs: Figures) -> None:
    """Recover the directory, then run every check of the module docstring into `figs`."""
    from ._compactor import read_json
    from ._format import RecordType as T
    from ._format import unpack_payload
    from ._reader import ScanState, iter_records
    from ._store import Store
    from ._verify import verify_dir
    from .errors import WalspanError

    store = Store(directory, install_hooks=False, create=False)
    t0 = time.monotonic()
    report = store.recover()
    figs.recover_s = time.monotonic() - t0
    figs.recover_actions = len(report.actions)
    for exc in report.corrupt:
        figs.failures.append(f"recover: corrupt WAL: {exc}")
    by_session: dict[str, list[WriterState]] = {}
    for s in states:
        by_session.setdefault(s.plan.session, []).append(s)
    by_wid = {s.writer_id: s for s in states}
    fail = figs.failures
    for sid, group in sorted(by_session.items()):
        wal = str(store.wal_path(sid))
        figs.wal_bytes += os.path.getsize(wal)
        ops: dict[str, list[int]] = {s.writer_id or "": [] for s in group}
        terminal: dict[str, Any] | None = None
        n_starts = n_events = 0
        fd = os.open(wal, os.O_RDONLY)
        try:
            scan = ScanState(wal)
            for _off, rtype, _seq, payload in iter_records(fd, scan):
                p = unpack_payload(payload)  # type: ignore[arg-type]
                w = p.get("writer")
                if rtype == T.TERMINAL and terminal is None:
                    terminal = p
                    continue
                if rtype == T.WRITER_LOST:
                    _check_lost(p, by_wid, figs, sid)
                op = _op_of(rtype, p)
                if op is None:
                    continue
                if w not in ops:
                    fail.append(f"{sid}: op {op} by unknown writer {w}")
                    continue
                if terminal is not None:
                    figs.after_terminal += 1
                    fail.append(f"{sid}: op {op} of writer {by_wid[w].plan.index} after the terminal record")
                    continue
                ops[w].append(op)
                n_starts += rtype == T.SPAN_START
                n_events += rtype == T.SPAN_EVENT
        except WalspanError as exc:
            fail.append(f"{sid}: cannot read the WAL: {exc}")
            continue
        finally:
            os.close(fd)
        # -- per writer: exactly once, in order, a prefix of what it sent ------------------
        for s in group:
            got = ops[s.writer_id or ""]
            seen = set(got)
            dup = len(got) - len(seen)
            lost = sum(1 for k in range(s.acked) if k not in seen)
            figs.duplicates += dup
            figs.lost += lost
            if dup or lost:
                fail.append(f"{sid}: writer {s.plan.index}: {lost} acknowledged op(s) lost, {dup} duplicated")
            if got != list(range(len(got))) or len(got) > s.acked + 1:
                figs.holes += 1
                fail.append(f"{sid}: writer {s.plan.index}: ops in WAL are not a prefix 0..k-1 (k={len(got)}, acked {s.acked})")
        # -- status ----------------------------------------------------------------------
        doc = None
        try:
            store.compact(sid)
            loaded = store.load(sid)
            doc = read_json(str(store.trace_path(sid)))
            if doc is None or doc != loaded:
                figs.invalid_json += 1
                fail.append(f"{sid}: canonical JSON missing, invalid or different from load()")
        except (WalspanError, OSError, ValueError) as exc:
            figs.invalid_json += 1
            fail.append(f"{sid}: load/compact failed: {exc}")
            continue
        status = loaded["status"]
        figs.statuses[status] = figs.statuses.get(status, 0) + 1
        _check_status(sid, group, status, terminal, by_wid, figs)
        # -- the fold agrees with the records ---------------------------------------------
        spans = loaded["spans"]
        mine = [sp for sp in spans if OP_KEY in sp["attributes"]]
        n_ev = sum(1 for sp in spans for e in sp["events"] if OP_KEY in e["attributes"])
        still_open = [sp["span_id"] for sp in spans if status != "running" and sp["status"] == "open"]
        if len(mine) != n_starts or n_ev != n_events or still_open:
            figs.fold_mismatches += 1
            fail.append(
                f"{sid}: fold has {len(mine)} spans / {n_ev} events for {n_starts} / {n_events} records; "
                f"{len(still_open)} span(s) open in an ended trace"
            )
    vr = verify_dir(directory)
    figs.verify_errors = len(vr.errors)
    fail.extend(f"verify: {e}" for e in vr.errors)


def damage(directory: str, seed: int, trials: int, figs: Figures) -> None:
    """Step 5: the damage phase over copies of the run's WALs (see walspan/_damage.py)."""
    from ._damage import damage_phase

    scratch = os.path.join(directory, ".stress-damage")
    wals = [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".wal") and not n.startswith(".")]
    d = damage_phase(wals, scratch, seed=seed ^ 0xDA3A6E, trials=trials)
    figs.damage_trials, figs.damage_kinds, figs.damage_outcomes, figs.damage_s = d.trials, d.kinds, d.outcomes, d.seconds
    figs.failures.extend(d.failures)
    with contextlib.suppress(OSError):
        os.rmdir(scratch)  # empty unless a trial failed (its copies are kept for inspection)


def _check_lost(p: dict[str, Any], by_wid: dict[str | None, WriterState], figs: Figures, sid: str) -> None:
    s = by_wid.get(p.get("lost"))
    t = p.get("time") or 0
    if s is None or s.plan.fate != "sigkill" or not s.signalled_ns or t < s.signalled_ns:
        figs.crashed_while_alive += 1
        who = f"writer {s.plan.index} ({s.plan.fate})" if s is not None else repr(p.get("lost"))
        figs.failures.append(f"{sid}: {who} recorded lost before it was killed")


def _check_status(
    sid: str,
    group: list[WriterState],
    status: str,
    terminal: dict[str, Any] | None,
    by_wid: dict[str | None, WriterState],
    figs: Figures,
) -> None:
    fates = [s.plan.fate for s in group]
    performed = [s.plan.fate for s in group if s.performed and s.plan.fate in TERMINAL_STATUS]
    fail = figs.failures
    winners = [s for s in group if s.end_ok]
    wrong = None
    if performed:
        author = by_wid.get(terminal.get("writer")) if terminal is not None else None
        if len(winners) > 1:
            wrong = f"{len(winners)} writers' end() returned: first terminal record did not win"
        elif winners and (status != "completed" or author is not winners[0]):
            wrong = f"writer {winners[0].plan.index}'s end() returned but status is {status}"
        elif author is None or author not in group or not author.performed or author.plan.fate not in TERMINAL_STATUS:
            wrong = f"status {status} was not written by a writer that performed a terminal action"
        elif TERMINAL_STATUS[author.plan.fate] != status:
            wrong = f"status {status}, but the first terminal record is by a {author.plan.fate} writer"
        elif author.plan.fate == "sigterm" and "SIGTERM" not in str(terminal.get("message") if terminal else ""):
            wrong = f"crash by SIGTERM recorded as {terminal.get('message') if terminal else None!r}"
    else:
        exp = status_without_terminal_action(fates)
        if status != exp:
            wrong = f"status {status}, expected {exp} (fates {fates})"
        elif exp == "crashed":
            # written by recovery: it must have proven every writer dead first
            t = (terminal or {}).get("time") or 0
            early = [s for s in group if not s.signalled_ns or t < s.signalled_ns]
            if (terminal or {}).get("writer") is not None or early:
                figs.crashed_while_alive += 1
                fail.append(f"{sid}: marked crashed before writer(s) {[s.plan.index for s in early]} were killed")
    if wrong:
        figs.wrong_statuses += 1
        fail.append(f"{sid}: wrong status: {wrong} (fates {fates})")


# == output ===================================================================================


def summary_table(f: Figures) -> str:
    kills = ", ".join(f"{k} {v}" for k, v in f.kills.items())
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(f.statuses.items()))
    rows = [
        ("writers", f"{f.writers}"),
        ("sessions", f"{f.sessions}"),
        ("durability", f.durability),
        ("seed", f"{f.seed}"),
        ("load phase", f"{f.duration_s:.1f} s"),
        ("events acknowledged", f"{f.events_acknowledged}"),
        ("events/s", f"{f.events_per_s:.0f}"),
        ("peak RSS of a writer", f"{f.peak_writer_rss_mb:.1f} MiB"),
        ("WAL bytes", f"{f.wal_bytes}"),
        ("kills / ends by kind", kills),
        ("trace statuses", statuses),
        (
            "janitor",
            (
                f"{f.janitor_rounds} recover rounds, {f.janitor_compactions} compactions, "
                f"{f.janitor_actions} actions, SIGKILLed {f.janitor_kills}x"
            ),
        ),
        ("lost", f"{f.lost}"),
        ("duplicates", f"{f.duplicates}"),
        ("holes", f"{f.holes}"),
        ("after terminal", f"{f.after_terminal}"),
        ("wrong statuses", f"{f.wrong_statuses}"),
        ("crashed while alive", f"{f.crashed_while_alive}"),
        ("invalid JSON", f"{f.invalid_json}"),
        ("fold mismatches", f"{f.fold_mismatches}"),
        ("verify errors", f"{f.verify_errors}"),
        ("wrong exits", f"{f.wrong_exits}"),
        ("damage trials", f"{f.damage_trials} ({', '.join(f'{k} {v}' for k, v in f.damage_kinds.items())}) in {f.damage_s:.1f} s"),
        ("damage verdicts", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in f.damage_outcomes.items()) or "-"),
        ("time to recover", f"{f.recover_s * 1000:.0f} ms ({f.recover_actions} action(s) left for the final recover)"),
        ("total time", f"{f.total_s:.1f} s"),
        ("result", "PASS" if f.ok else f"FAIL ({len(f.failures)} problem(s))"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# == CLI ======================================================================================


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {v}")
        return v

    return parse


_positive_int = _int_at_least(1)


def _float_between(low: float, high: float, unit: str = "") -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}{unit}, not {v}")
        return v

    return parse


_duration = _float_between(0.5, 86400, " seconds")
_rate = _float_between(0.0, 1.0)


def register(sub: Any) -> None:
    """Add the `stress` subcommand to the CLI's subparsers."""
    s = sub.add_parser(
        "stress",
        help="parallel writers killed at random, then a proof that no acknowledged event was lost",
        description="Run N writer processes over M shared sessions, kill them in every way (SIGKILL, "
        "SIGTERM, uncaught exception, normal exit) while recover() and compactions run, then "
        "recover and check every acknowledged event, status and file. Exit 0 only if all checks hold.",
    )
    s.add_argument("dir", nargs="?", help="directory to run in (default: a temp dir, removed unless --keep)")
    s.add_argument("--duration", type=_duration, default=DEFAULT_DURATION, help="seconds of load (default %(default)s)")
    s.add_argument("--writers", type=_positive_int, default=8, help="writer processes (default %(default)s)")
    s.add_argument("--sessions", type=_positive_int, default=4, help="sessions shared by the writers (default %(default)s)")
    s.add_argument(
        "--durability",
        choices=DURABILITY_LEVELS,
        default="durable",
        help="durability level of the writers (default %(default)s); interval and process modes write about ten "
        "times the data per second, so the checks after the load take minutes: pair them with a short --duration",
    )
    s.add_argument("--kill-rate", type=_rate, default=0.5, help="share of writers killed by a signal (default %(default)s)")
    s.add_argument(
        "--damage-trials",
        type=_int_at_least(0),
        default=DEFAULT_DAMAGE_TRIALS,
        help="damaged copies of the WALs judged by every reader after the checks (default %(default)s; 0: none)",
    )
    s.add_argument("--seed", type=int, default=None, help="make the plan reproducible (default: random, printed)")
    s.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE")
    s.add_argument("--keep", action="store_true", help="keep the temp directory")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_stress, stress_parser=s)


def cmd_stress(args: argparse.Namespace) -> int:
    # Usage errors go through the CLI parser's error(): one line, exit code 2 (see cli._Parser).
    usage_error = args.stress_parser.error
    if args.sessions > args.writers:
        usage_error(f"--sessions ({args.sessions}) cannot exceed --writers ({args.writers})")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    temp = args.dir is None
    if temp:
        directory = tempfile.mkdtemp(prefix="walspan-stress-")
    else:
        directory = os.path.abspath(args.dir)
        if os.path.exists(directory) and not os.path.isdir(directory):
            usage_error(f"not a directory: {args.dir}")
        if os.path.isdir(directory) and any(n.endswith(".wal") for n in os.listdir(directory)):
            usage_error(f"{args.dir} already holds traces; give an empty or new directory")
    if not args.quiet:
        _progress(
            f"walspan stress: {args.writers} writers, {args.sessions} sessions, {args.duration:g} s, "
            f"{args.durability}, kill rate {args.kill_rate:g}, seed {seed}, in {directory}"
        )
    figs = run(
        directory, seed=seed, writers=args.writers, sessions=args.sessions, duration=args.duration,
        durability=args.durability, kill_rate=args.kill_rate, progress=not args.quiet,
        damage_trials=args.damage_trials,
    )
    print(summary_table(figs))
    for msg in figs.failures[:50]:
        print(f"FAIL {msg}")
    if len(figs.failures) > 50:
        print(f"FAIL ... and {len(figs.failures) - 50} more")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figs.as_dict() | {"directory": directory}, fh, indent=2, sort_keys=True)
    if temp and not args.keep:
        if figs.ok:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"kept {directory} for inspection (the run failed)")
    return 0 if figs.ok else 1
