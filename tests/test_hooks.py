"""Crash hooks: what a dying writer process records (uncaught exceptions, signals, normal exit).

Each test runs the dying process as a fresh interpreter (sys.executable -c), so the hooks are
installed there and never in the test runner itself. Synchronisation is by pipe (the child
prints "ready" once it has attached); nothing sleeps.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from crashkit import expect_line, read_json, run_script, script_env, spawn_script, terminal_records

import walspan

PRE = """
import os, signal, sys, threading
import walspan
d = sys.argv[1]
"""


def _store(path: Path) -> walspan.Store:
    return walspan.Store(path, install_hooks=False)


def test_uncaught_exception_ends_every_trace_of_the_process_as_error(
    tmp_path: Path,
) -> None:
    """An uncaught exception in the main thread ends every trace the process attached (across
    stores) as `error` with the exception's type and message; the previous excepthook still runs."""
    proc = run_script(
        PRE
        + """
def prev(t, e, tb):
    print("previous hook saw", t.__name__, flush=True)
sys.excepthook = prev
a = walspan.Store(d).open("a")
b = walspan.Store(os.path.join(d, "sub")).open("b")
span = a.start_span("work")
raise ValueError("boom 42")
""",
        str(tmp_path),
    )
    assert proc.returncode == 1
    assert "previous hook saw ValueError" in proc.stdout
    for directory, sid in ((tmp_path, "a"), (tmp_path / "sub", "b")):
        s = _store(directory)
        t = s.load(sid)
        assert (t["status"], t["status_message"]) == ("error", "ValueError: boom 42")
        assert read_json(s, sid) == t
    span = _store(tmp_path).load("a")["spans"][0]
    assert span["status"] == "interrupted"


def test_uncaught_exception_in_a_thread_ends_only_that_threads_traces(
    tmp_path: Path,
) -> None:
    """threading.excepthook ends the traces opened by the failing thread as `error`; a trace
    opened by the main thread is untouched and detached at normal exit (idle, not crashed)."""
    proc = run_script(
        PRE
        + """
store = walspan.Store(d)
main_trace = store.open("main")
def work():
    t = store.open("worker")
    t.start_span("doomed")
    raise RuntimeError("thread failed")
th = threading.Thread(target=work)
th.start(); th.join()
main_trace.start_span("still fine").end()
print("main done", flush=True)
""",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "main done" in proc.stdout
    s = _store(tmp_path)
    worker = s.load("worker")
    assert (worker["status"], worker["status_message"]) == (
        "error",
        "RuntimeError: thread failed",
    )
    main = s.load("main")
    assert main["status"] == "running"
    assert [w["state"] for w in main["writers"]] == ["detached"]
    assert s.recover().crashed == []


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_fatal_signal_marks_crashed_then_the_process_dies_by_it(tmp_path: Path, signame: str) -> None:
    """SIGTERM/SIGHUP with the default disposition: every attached trace is marked crashed
    naming the signal, then the default action happens: the process dies by that signal."""
    proc = spawn_script(
        PRE
        + f"""
signal.signal(signal.{signame}, signal.SIG_DFL)  # the default disposition, whatever we inherited (nohup)
t = walspan.Store(d).open("s")
t.start_span("long tool call")
print("ready", flush=True)
sys.stdin.read()
print("not reached", flush=True)
""",
        str(tmp_path),
    )
    expect_line(proc, "ready")
    signum = getattr(signal, signame)
    proc.send_signal(signum)
    out, _err = proc.communicate(timeout=60)
    assert proc.returncode == -signum
    assert "not reached" not in out
    s = _store(tmp_path)
    t = s.load("s")
    assert (t["status"], t["status_message"]) == ("crashed", f"killed by {signame}")
    assert t["spans"][0]["status"] == "interrupted"
    assert read_json(s, "s") == t


def _spawn_file(tmp_path: Path, code: str, *args: str) -> subprocess.Popen[str]:
    """Like spawn_script, but the code runs as a script file (`python file.py`), not `-c`."""
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=script_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _events(trace: dict[str, Any]) -> list[int]:
    return [e["attributes"]["i"] for sp in trace["spans"] for e in sp["events"]]


def test_caught_ctrl_c_carries_on_and_the_trace_completes(tmp_path: Path) -> None:
    """A program that catches KeyboardInterrupt and carries on (a REPL, an agent loop) keeps
    its trace: SIGINT does not end it. Three Ctrl-Cs while the program waits for input, and one
    that lands inside an append (the append finishes first, then KeyboardInterrupt is raised
    as it returns), are each caught; every event written after them is kept, in order, once,
    and the trace ends `completed` by the program's own end()."""
    proc = spawn_script(
        PRE
        + """
from walspan import _fsutil
store = walspan.Store(d)
t = store.open("s")
n = 0
def burst(k):
    global n
    with t.span(f"after interrupt {k}") as span:
        for _ in range(100):
            span.add_event("e", {"i": n}); n += 1
for k in range(3):
    try:
        print("ready", k, flush=True)
        sys.stdin.readline()
        print("no interrupt", flush=True)
    except KeyboardInterrupt:
        print("caught", k, flush=True)
    burst(k)
span = t.start_span("interrupted inside an append")
armed = [1]
def hook(op, path):
    if op == "write" and path.endswith(".wal") and armed:
        armed.clear()
        os.kill(os.getpid(), signal.SIGINT)  # arrives inside the append, holding its lock
_fsutil.faults.hook = hook
try:
    span.add_event("e", {"i": n})
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("caught inside", flush=True)
n += 1
_fsutil.faults.hook = None
span.end()
burst(3)
t.end()
print("ended", n, flush=True)
""",
        str(tmp_path),
    )
    for k in range(3):
        expect_line(proc, f"ready {k}")
        proc.send_signal(signal.SIGINT)
        assert expect_line(proc, f"caught {k}") == f"caught {k}"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    assert "caught inside" in out and "ended 401" in out, out
    s = _store(tmp_path)
    t = s.load("s")
    assert (t["status"], t["status_message"]) == ("completed", None)
    assert _events(t) == list(range(401))  # every event, in order, exactly once
    assert all(sp["status"] == "ok" for sp in t["spans"])
    assert [w["state"] for w in t["writers"]] == ["attached"]  # end() closes; nothing crashed it
    assert read_json(s, "s") == t


@pytest.mark.parametrize("how", ["-c", "script", "own excepthook"])
def test_uncaught_keyboardinterrupt_marks_crashed_as_the_process_ends(tmp_path: Path, how: str) -> None:
    """Ctrl-C that the program does not catch ends the process: the traces are marked
    `crashed` ("interrupted: uncaught KeyboardInterrupt"), the open span interrupted, the
    traceback still printed and the process still dies by SIGINT, whether the code runs from
    -c or as a script file, and even when the program replaced sys.excepthook after walspan."""
    code = (
        PRE
        + """
t = walspan.Store(d).open("s")
t.start_span("long tool call")
if sys.argv[2] == "own excepthook":
    def quiet(tp, exc, tb):
        print("own hook", tp.__name__, flush=True)
    sys.excepthook = quiet
print("ready", flush=True)
sys.stdin.read()
print("not reached", flush=True)
"""
    )
    proc = _spawn_file(tmp_path, code, str(tmp_path), how) if how == "script" else spawn_script(code, str(tmp_path), how)
    expect_line(proc, "ready")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, (out, err)
    assert "not reached" not in out
    if how == "own excepthook":
        assert "own hook KeyboardInterrupt" in out
    else:
        assert "KeyboardInterrupt" in err
    s = _store(tmp_path)
    t = s.load("s")
    assert (t["status"], t["status_message"]) == ("crashed", "interrupted: uncaught KeyboardInterrupt")
    assert t["spans"][0]["status"] == "interrupted"
    assert [p["status"] for p in terminal_records(s.wal_path("s"))] == ["crashed"]
    assert read_json(s, "s") == t


def test_uncaught_interrupt_marks_crashed_only_after_the_threads_are_done(tmp_path: Path) -> None:
    """The main thread's uncaught KeyboardInterrupt does not end the process while a
    non-daemon thread still runs: that thread keeps logging (every event it writes after the
    interrupt is kept and its span ends `ok`); the trace is marked crashed at exit."""
    proc = spawn_script(
        PRE
        + """
t = walspan.Store(d).open("s")
def worker():
    sys.stdin.readline()  # the test writes a line once the main thread was interrupted
    with t.span("worker") as span:
        for i in range(200):
            span.add_event("e", {"i": i})
    print("worker done", flush=True)
threading.Thread(target=worker).start()
r, _w = os.pipe()
print("ready", flush=True)
os.read(r, 1)  # nobody writes: blocks until SIGINT
""",
        str(tmp_path),
    )
    expect_line(proc, "ready")
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    for line in proc.stderr:  # the main thread's traceback ends with this line
        if line.strip() == "KeyboardInterrupt":
            break
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == -signal.SIGINT, (out, err)
    assert "worker done" in out
    t = _store(tmp_path).load("s")
    assert (t["status"], t["status_message"]) == ("crashed", "interrupted: uncaught KeyboardInterrupt")
    assert _events(t) == list(range(200))
    assert t["spans"][0]["status"] == "ok"


def test_sigint_runs_the_programs_own_handler_and_the_trace_goes_on(tmp_path: Path) -> None:
    """A SIGINT handler the program installed before walspan still gets SIGINT (walspan chains
    to it) and decides: here it counts the interrupt and the program carries on logging, then
    ends the trace `completed`. walspan marks nothing crashed on the way."""
    proc = spawn_script(
        PRE
        + """
seen = []
def own(signum, frame):
    seen.append(signum)
    print("own handler ran", flush=True)
signal.signal(signal.SIGINT, own)
t = walspan.Store(d).open("s")
print("ready", signal.getsignal(signal.SIGINT) is not own, flush=True)
sys.stdin.readline()
with t.span("after the interrupt") as span:
    for i in range(100):
        span.add_event("e", {"i": i})
t.end()
print("ended", seen, flush=True)
""",
        str(tmp_path),
    )
    assert expect_line(proc, "ready") == "ready True"  # walspan's handler is in front
    proc.send_signal(signal.SIGINT)
    expect_line(proc, "own handler ran")
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, (out, err)
    assert f"ended [{int(signal.SIGINT)}]" in out
    t = _store(tmp_path).load("s")
    assert (t["status"], t["status_message"]) == ("completed", None)
    assert _events(t) == list(range(100))


def test_sigint_with_the_default_action_marks_crashed_then_kills(tmp_path: Path) -> None:
    """A program that gave SIGINT its default action (the kernel kills it, no exception is
    raised) is treated like SIGTERM: traces marked crashed naming the signal, then death by it."""
    proc = spawn_script(
        PRE
        + """
signal.signal(signal.SIGINT, signal.SIG_DFL)
t = walspan.Store(d).open("s")
print("ready", flush=True)
sys.stdin.read()
""",
        str(tmp_path),
    )
    expect_line(proc, "ready")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT
    t = _store(tmp_path).load("s")
    assert (t["status"], t["status_message"]) == ("crashed", "killed by SIGINT")


def test_interrupted_command_in_the_interactive_interpreter_does_not_crash_the_trace(tmp_path: Path) -> None:
    """The interactive interpreter survives a KeyboardInterrupt in a command (it shows it and
    prompts again), so walspan does not end the trace for it, even though the exception
    reached sys.excepthook and was the last one shown when the interpreter later exits
    normally: the events logged after it are kept and the writer is detached, not crashed."""
    proc = subprocess.run(
        [sys.executable, "-i", "-c", PRE + 't = walspan.Store(d).open("s")', str(tmp_path)],
        input='raise KeyboardInterrupt\nt.start_span("after").end()\nraise KeyboardInterrupt\nprint("bye")\n',
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("KeyboardInterrupt") == 2
    t = _store(tmp_path).load("s")
    assert t["status"] == "running"
    assert [sp["name"] for sp in t["spans"]] == ["after"]
    assert [w["state"] for w in t["writers"]] == ["detached"]


def test_signal_hooks_chain_to_a_previous_python_handler(tmp_path: Path) -> None:
    """A handler installed before walspan still runs after the trace is marked crashed."""
    proc = spawn_script(
        PRE
        + """
def prev(signum, frame):
    print("previous handler ran", flush=True)
    os._exit(7)
signal.signal(signal.SIGTERM, prev)
t = walspan.Store(d).open("s")
print("ready", flush=True)
sys.stdin.read()
""",
        str(tmp_path),
    )
    expect_line(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    out, _err = proc.communicate(timeout=60)
    assert proc.returncode == 7
    assert "previous handler ran" in out
    t = _store(tmp_path).load("s")
    assert (t["status"], t["status_message"]) == ("crashed", "killed by SIGTERM")


def test_ignored_signal_stays_ignored(tmp_path: Path) -> None:
    """A signal whose disposition was SIG_IGN is left alone: the process survives it and the
    trace is not marked crashed."""
    proc = spawn_script(
        PRE
        + """
signal.signal(signal.SIGHUP, signal.SIG_IGN)
t = walspan.Store(d).open("s")
print("ready", signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)
sys.stdin.readline()
t.start_span("after the signal").end()
print("survived", flush=True)
""",
        str(tmp_path),
    )
    assert expect_line(proc, "ready") == "ready True"
    proc.send_signal(signal.SIGHUP)
    out, _err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0
    assert "survived" in out
    t = _store(tmp_path).load("s")
    assert t["status"] == "running"
    assert [sp["name"] for sp in t["spans"]] == ["after the signal"]


def test_normal_exit_detaches_and_the_trace_is_idle_not_crashed(tmp_path: Path) -> None:
    """A process that exits normally without ending or closing its trace detaches at exit
    (even if its Store went out of scope unclosed): recovery leaves it alone and a later
    open() continues the same trace."""
    run_script(
        PRE
        + """
def work():
    store = walspan.Store(d)
    t = store.open("s", metadata={"title": "long-lived"})
    t.start_span("turn 1").end()
work()
""",
        str(tmp_path),
        check=True,
    )
    s = _store(tmp_path)
    t = s.load("s")
    assert t["status"] == "running"
    assert [w["state"] for w in t["writers"]] == ["detached"]
    assert s.recover().actions == []
    again = s.open("s")
    assert again.trace_id == t["trace_id"]
    again.start_span("turn 2").end()
    again.end()
    final = s.load("s")
    assert final["status"] == "completed"
    assert [sp["name"] for sp in final["spans"]] == ["turn 1", "turn 2"]
    s.close()


def test_hooks_are_installed_once_and_chain(tmp_path: Path) -> None:
    """Several stores and traces install the hooks once: sys.excepthook, threading.excepthook
    and the signal handlers are replaced a single time, and the original excepthook runs
    exactly once for an uncaught exception (no double wrapping)."""
    proc = run_script(
        PRE
        + """
before = (sys.excepthook, threading.excepthook)
stores = [walspan.Store(os.path.join(d, str(i))) for i in range(3)]
for i, s in enumerate(stores):
    s.open(f"t{i}"); s.open(f"u{i}")
after = (sys.excepthook, threading.excepthook, signal.getsignal(signal.SIGTERM))
walspan.Store(os.path.join(d, "x")).open("x")
again = (sys.excepthook, threading.excepthook, signal.getsignal(signal.SIGTERM))
print("once", after == again, "changed", after[0] is not before[0] and after[1] is not before[1], flush=True)
raise KeyError("once")
""",
        str(tmp_path),
    )
    assert "once True changed True" in proc.stdout
    assert proc.stderr.count("KeyError: 'once'") == 1  # the default hook ran exactly once


def test_install_hooks_false_leaves_the_process_alone(tmp_path: Path) -> None:
    """install_hooks=False: no excepthook, threading.excepthook or signal handler is replaced;
    an uncaught exception does not end the trace and exit does not detach it, so the writer
    is simply dead for recovery, which then marks the trace crashed."""
    proc = run_script(
        PRE
        + """
hooks = (sys.excepthook, threading.excepthook, signal.getsignal(signal.SIGTERM))
s = walspan.Store(d, install_hooks=False)
t = s.open("s")
t.start_span("x")
print("untouched", hooks == (sys.excepthook, threading.excepthook, signal.getsignal(signal.SIGTERM)), flush=True)
raise ValueError("nobody records this")
""",
        str(tmp_path),
    )
    assert proc.returncode == 1
    assert "untouched True" in proc.stdout
    s = _store(tmp_path)
    t = s.load("s")
    assert t["status"] == "running"
    assert [w["state"] for w in t["writers"]] == ["attached"]
    assert s.recover().crashed == ["s"]
    assert s.load("s")["status"] == "crashed"


def test_signal_during_an_append_does_not_deadlock(tmp_path: Path) -> None:
    """A SIGTERM delivered while the main thread is inside a walspan append (holding the append
    lock) is deferred until the append returns: the event is acknowledged and present, the
    trace is marked crashed, and the process dies by SIGTERM instead of hanging."""
    proc = run_script(
        PRE
        + """
from walspan import _fsutil
t = walspan.Store(d).open("s")
span = t.start_span("x")
armed = []
def hook(op, path):
    if op == "write" and path.endswith(".wal") and armed:
        armed.clear()
        os.kill(os.getpid(), signal.SIGTERM)  # handled right here, inside the append
_fsutil.faults.hook = hook
armed.append(1)
span.add_event("interrupted append", {"n": 1})
print("not reached", flush=True)
""",
        str(tmp_path),
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "not reached" not in proc.stdout
    s = _store(tmp_path)
    t = s.load("s")
    assert (t["status"], t["status_message"]) == ("crashed", "killed by SIGTERM")
    assert [e["name"] for e in t["spans"][0]["events"]] == ["interrupted append"]


def test_signal_during_compaction_does_not_deadlock(tmp_path: Path) -> None:
    """A SIGTERM delivered while the main thread holds a session's compaction lock (inside
    Store.compact) does not deadlock the crash hook on that same lock."""
    proc = run_script(
        PRE
        + """
from walspan import _compactor
s = walspan.Store(d)
t = s.open("s")
t.start_span("x").end()
def hook(path):
    _compactor.before_rename = None
    os.kill(os.getpid(), signal.SIGTERM)
_compactor.before_rename = hook
s.compact("s")
print("not reached", flush=True)
""",
        str(tmp_path),
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    s = _store(tmp_path)
    t = s.load("s")
    assert (t["status"], t["status_message"]) == ("crashed", "killed by SIGTERM")
    assert read_json(s, "s") == t


def test_signal_during_recovery_does_not_deadlock(tmp_path: Path) -> None:
    """A SIGTERM delivered while recover() holds a session's append lock (recording a dead
    fellow writer as lost) is deferred: the lost writer is recorded, then the trace is marked
    crashed by the hook, and the process dies by SIGTERM."""
    proc = run_script(
        PRE
        + """
from walspan import _fsutil
s = walspan.Store(d)
t = s.open("s")
pid = os.fork()
if pid == 0:
    walspan.Store(d, install_hooks=False).open("s").start_span("child span")
    os._exit(0)  # dies attached: no detach
os.waitpid(pid, 0)
armed = [1]
def hook(op, path):
    if op == "write" and path.endswith(".wal") and armed:
        armed.clear()
        os.kill(os.getpid(), signal.SIGTERM)
_fsutil.faults.hook = hook
s.recover()
print("not reached", flush=True)
""",
        str(tmp_path),
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    s = _store(tmp_path)
    t = s.load("s")
    assert (t["status"], t["status_message"]) == ("crashed", "killed by SIGTERM")
    assert sorted(w["state"] for w in t["writers"]) == ["attached", "lost"]
    child_span = t["spans"][0]
    assert (child_span["status"], child_span["status_message"]) == (
        "interrupted",
        "writer lost",
    )
    assert [p["status"] for p in terminal_records(s.wal_path("s"))] == ["crashed"]


def test_signal_hooks_installed_at_the_first_main_thread_attach(tmp_path: Path) -> None:
    """When a process's first writer attaches in a worker thread (where Python forbids
    signal.signal), the signal handlers are installed at the first attach from the main thread,
    so a later SIGTERM still marks the traces crashed."""
    proc = spawn_script(
        PRE
        + """
store = walspan.Store(d)
th = threading.Thread(target=store.open, args=("from thread",))
th.start(); th.join()
before = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
store.open("from main")
print("ready", before, signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, flush=True)
sys.stdin.read()
""",
        str(tmp_path),
    )
    assert expect_line(proc, "ready") == "ready True True"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    s = _store(tmp_path)
    for sid in ("from thread", "from main"):
        assert s.load(sid)["status"] == "crashed"


def test_hostile_exceptions_are_still_recorded_and_still_shown(tmp_path: Path) -> None:
    """An uncaught exception whose __str__ raises, or whose message is huge and holds lone
    surrogates, still ends the trace as error (message escaped, capped by the single truncation
    rule) and the original traceback is still printed by the previous hook."""
    for kind in ("broken_str", "huge"):
        proc = run_script(
            PRE
            + """
class Broken(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")
walspan.Store(d, max_value_bytes=4096).open(sys.argv[2])
if sys.argv[2] == "broken_str":
    raise Broken()
raise ValueError("\\udcff" + "m" * 100_000)
""",
            str(tmp_path),
            kind,
        )
        assert proc.returncode == 1
        assert ("Broken" if kind == "broken_str" else "ValueError") in proc.stderr
        t = _store(tmp_path).load(kind)
        assert t["status"] == "error"
        if kind == "broken_str":
            assert t["status_message"] == "Broken: <unprintable Broken>"
        else:
            assert t["status_message"].startswith("ValueError: \\udcffmmm")
            assert walspan.TRUNCATION_MARKER.split("{")[0] in t["status_message"]
            assert len(t["status_message"].encode()) < 4096 + 100
