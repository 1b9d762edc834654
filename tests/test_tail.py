"""`walspan tail`: a separate process following a live writer process through a compaction, a
torn-tail repair, an explicit repair, a new session and a prune beside it; every record once, in
order, each surprise announced, and a clean exit on SIGINT and when its reader goes away.

Processes are synchronised through pipes (the writer acknowledges each command; the test reads
the exact number of lines each step must produce); the overall timeout is only a safety net."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from crashkit import script_env, spawn_script
from walfiles import flip_byte

import walspan
from walspan.cli import main
from walspan.read import read_records

SAFETY_S = 60.0

WRITER = """
import sys, walspan
store = walspan.Store(sys.argv[1], durability="process", install_hooks=False)
traces = {"live": store.open("live")}
print("ready", flush=True)
for line in sys.stdin:
    cmd, *rest = line.split()
    if cmd == "spans":
        t = traces[rest[0]]
        for i in range(int(rest[1])):
            with t.span(f"op{i}", kind="tool", attributes={"i": i}):
                pass
    elif cmd == "open":
        traces[rest[0]] = store.open(rest[0])
    elif cmd == "end":
        traces[rest[0]].end()
    print("ok", flush=True)
"""


class LineReader:
    """Reads whole lines from a child's stdout with a deadline (no sleeps: select on the pipe)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)
        self.buf = b""
        self.deadline = time.monotonic() + SAFETY_S

    def lines(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            if b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                out.append(line.decode())
                continue
            left = self.deadline - time.monotonic()
            assert left > 0, f"timed out with {len(out)} of {n} lines: {out[-3:]}"
            if self.sel.select(left):
                chunk = os.read(self.fd, 65536)
                assert chunk, f"tail exited (code {self.proc.poll()}) after {len(out)} of {n} lines: {out[-3:]}"
                self.buf += chunk
        return out


def _tell(writer: subprocess.Popen[str], command: str) -> None:
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write(command + "\n")
    writer.stdin.flush()
    assert writer.stdout.readline().strip() == "ok"


def _tail(directory: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "walspan", "tail", str(directory), "-f", "--json", "--interval", "0.01", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=script_env(),
    )


def _records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def test_tail_follows_a_live_writer_through_compaction_repairs_new_sessions_and_prune(tmp_path: Path) -> None:
    """tail -f --from-start prints every record of a live writer's session once and in order
    (consecutive seqs, the exact payloads in the log) while, beside it, the trace is compacted,
    a torn tail is truncated by the writer's next append, an explicit repair cuts the log below
    tail's position (a `resync` notice, then exactly the records appended after the cut), a new
    session appears (a `new` notice and its records) and an ended one is pruned (a `removed`
    notice). SIGINT ends it with 130 and nothing on stderr."""
    d = tmp_path / "store"
    writer = spawn_script(WRITER, str(d))
    tail = None
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        tail = _tail(d, "--from-start")
        out = LineReader(tail)
        got = _records(out.lines(2))
        assert [(r["seq"], r["type"]) for r in got] == [(1, "trace_start"), (2, "writer_attach")]

        _tell(writer, "spans live 50")
        got += _records(out.lines(100))
        store = walspan.Store(d, install_hooks=False, create=False)
        store.compact("live")  # beside tail: it must not notice
        _tell(writer, "spans live 50")
        got += _records(out.lines(100))

        wal = store.wal_path("live")
        with open(wal, "ab") as f:  # a writer died mid-write: a partial record at the end
            f.write(b"\x7f\x00\x00\x00\x10\x00")
        _tell(writer, "spans live 10")  # its append truncates the torn tail first
        got += _records(out.lines(20))
        assert [r["seq"] for r in got] == list(range(1, len(got) + 1))
        assert [r["payload"] for r in got] == [r.payload for r in read_records(d, "live")]

        # an explicit repair cutting below tail's position: damage in record 10 (seq 11)
        offsets = [r.cursor.record for r in read_records(d, "live")]
        flip_byte(wal, offsets[10] + 25)
        assert store.repair("live") is not None
        _tell(writer, "spans live 3")
        notice, *after = _records(out.lines(7))
        assert notice["notice"] == "resync" and "after seq 10" in notice["message"]
        assert [r["seq"] for r in after] == list(range(11, 17))
        assert [r["payload"] for r in after] == [r.payload for r in read_records(d, "live")][10:]

        _tell(writer, "open other")
        new = _records(out.lines(3))
        assert (new[0]["notice"], new[0]["session_id"]) == ("new", "other")
        assert [(r["session_id"], r["seq"]) for r in new[1:]] == [("other", 1), ("other", 2)]
        _tell(writer, "end other")
        assert _records(out.lines(1))[0]["type"] == "terminal"
        assert main(["prune", str(d), "--older-than", "0s"]) == 0  # the live writer ended it itself
        assert _records(out.lines(1)) == [{"notice": "removed", "session_id": "other", "message": "its log was removed (pruned?)"}]
        assert os.path.exists(wal)  # the running trace is never pruned

        tail.send_signal(signal.SIGINT)
        assert tail.wait(SAFETY_S) == 130
        assert tail.stderr is not None and tail.stderr.read() == b""
        store.close()
    finally:
        for p in (writer, tail):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_tail_from_the_end_shows_the_last_records_then_only_new_ones(tmp_path: Path) -> None:
    """Without --from-start tail starts with the last -n records of the store as a whole (across
    sessions, oldest first) and then prints only what is appended."""
    store = walspan.Store(tmp_path, durability="process", install_hooks=False)
    s, t = store.open("s"), store.open("t")
    for i in range(20):
        s.set_metadata(i=i)
        t.set_metadata(i=i)
    tail = _tail(tmp_path, "-n", "3")
    try:
        out = LineReader(tail)
        first = _records(out.lines(3))
        assert [(r["session_id"], r["payload"]["metadata"]) for r in first] == [("t", {"i": 18}), ("s", {"i": 19}), ("t", {"i": 19})]
        s.set_metadata(i=20)
        assert _records(out.lines(1))[0]["payload"]["metadata"] == {"i": 20}
    finally:
        tail.kill()
        tail.wait()
        store.close()


def test_tail_without_follow_and_its_text_lines(tmp_path: Path) -> None:
    """tail without -f prints once and exits 0; the text form is one line per record, UTC time,
    control characters of ids escaped; a missing SESSION is one error line."""
    store = walspan.Store(tmp_path, durability="process", install_hooks=False)
    t = store.open("bad\nid\x1b[2J")
    with t.span("step", kind="tool"):
        pass
    proc = subprocess.run([sys.executable, "-m", "walspan", "tail", str(tmp_path), "--from-start"], capture_output=True, text=True, env=script_env(), timeout=SAFETY_S, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and all("bad\\nid\\e[2J" in line for line in lines)
    assert "\x1b" not in proc.stdout
    assert lines[2].split()[1].endswith("Z") and "span_start step [tool]" in lines[2]
    assert "step ok" in lines[3]
    missing = subprocess.run([sys.executable, "-m", "walspan", "tail", str(tmp_path), "nope"], capture_output=True, text=True, env=script_env(), timeout=SAFETY_S, check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("walspan: error: no trace for session 'nope'")
    store.close()


def test_tail_never_takes_the_append_lock(tmp_path: Path) -> None:
    """A writer holding the append lock (as a slow append would) does not stop tail from reading:
    tail reads what is there and returns."""
    from walspan._locking import lock, unlock

    store = walspan.Store(tmp_path, durability="process", install_hooks=False)
    store.open("s").set_metadata(a=1)
    fd = os.open(tmp_path / ".walspan" / "s.lock", os.O_RDWR)
    try:
        lock(fd)
        proc = subprocess.run([sys.executable, "-m", "walspan", "tail", str(tmp_path), "--from-start", "--json"], capture_output=True, text=True, env=script_env(), timeout=SAFETY_S, check=False)
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3
    finally:
        unlock(fd)
        os.close(fd)
        store.close()
