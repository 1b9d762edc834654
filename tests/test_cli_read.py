"""The read side of the command line: ls from summaries (with the fold as fallback) and its
liveness column, filters and typed JSON; show with --depth/--limit, a pager and a streamed
--json; escaped ids; progress only on a terminal; quiet SIGPIPE; `python -m walspan`."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from crashkit import dead_writer, script_env, spawn_script

import walspan
from walspan.cli import main
from walspan.read import _traces

TIMEOUT = 60


def _run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "walspan", *args], capture_output=True, text=True, env=script_env(kwargs.pop("env", None)), timeout=TIMEOUT, check=False, **kwargs)


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def _spans(store: walspan.Store, sid: str, n: int, status: str | None = "completed") -> None:
    t = store.open(sid)
    for i in range(n):
        with t.span(f"s{i}", kind="tool"):
            pass
    if status:
        t.end(status)
    else:
        t.close()


def test_ls_liveness_column_without_writing(tmp_path: Path) -> None:
    """ls tells a running trace with a live writer (live) from one whose writers all detached
    (idle) and one whose writers all died unrecovered (dead-unrecovered); ended traces have no
    liveness; and ls writes nothing: every file keeps its size and mtime."""
    dead_writer(tmp_path, "dead")
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    _spans(s, "done", 2)
    s.open("idle").close()
    holder = spawn_script("import sys, walspan\nwalspan.Store(sys.argv[1], install_hooks=False).open('live')\nprint('on', flush=True)\nsys.stdin.read()", str(tmp_path))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "on"
        before = _snapshot(tmp_path)
        proc = _run("ls", "--json", str(tmp_path))
        assert _snapshot(tmp_path) == before
        rows = {r["session_id"]: r["liveness"] for r in json.loads(proc.stdout)}
        assert rows == {"dead": "dead-unrecovered", "done": None, "idle": "idle", "live": "live"}
        text = _run("ls", str(tmp_path)).stdout.splitlines()
        assert text[0].split() == ["SESSION", "STATUS", "LIVENESS", "SPANS", "STARTED", "TRACE"]
        assert any(line.split()[:3] == ["dead", "running", "dead-unrecovered"] for line in text)
    finally:
        holder.kill()
        holder.wait()
    s.close()


def test_ls_filters_sorts_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--status takes statuses and liveness states (comma-separated or repeated), --sort orders
    (largest or newest first), --limit cuts after sorting; an unknown status is a usage error."""
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    _spans(s, "a", 1)
    _spans(s, "b", 5, "error")
    _spans(s, "c", 3, None)

    def ls(*args: str) -> list[str]:
        assert main(["ls", "--json", str(tmp_path), *args]) == 0
        return [r["session_id"] for r in json.loads(capsys.readouterr().out)]

    assert ls() == ["a", "b", "c"]
    assert ls("--status", "error,idle") == ["b", "c"]
    assert ls("--status", "completed", "--status", "running") == ["a", "c"]
    assert ls("--sort", "spans") == ["b", "c", "a"]
    assert ls("--sort", "started", "--limit", "2") == ["c", "b"]
    assert main(["ls", str(tmp_path), "--status", "sideways"]) == 2
    assert "--status sideways" in capsys.readouterr().err
    s.close()


def test_ls_json_is_typed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ls --json: ints are ints, times are UTC ISO-8601 with a zone, and a bad file's error text
    is in `error` (never in trace_id)."""
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    _spans(s, "ok", 2)
    (tmp_path / "broken.wal").write_bytes(b"not a wal")
    assert main(["ls", "--json", str(tmp_path)]) == 1
    rows = {r["session_id"]: r for r in json.loads(capsys.readouterr().out)}
    ok, bad = rows["ok"], rows["broken"]
    assert isinstance(ok["spans"], int) and ok["spans"] == 2 and isinstance(ok["wal_bytes"], int)
    assert ok["started"].endswith("Z") and ok["ended"].endswith("Z") and ok["started"][10] == "T"
    assert isinstance(ok["duration_ms"], float) and ok["error"] is None
    assert bad["status"] == "corrupt" and bad["trace_id"] is None and "offset 0" in bad["error"]
    s.close()


def test_ls_reads_the_summary_of_compacted_traces_and_folds_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With folding made impossible, ls still lists every compacted, unchanged trace (from its
    summary), and only a trace appended to since its compaction (a stale summary) needs a fold."""
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    for i in range(30):
        _spans(s, f"t{i:02d}", 2)
    stale = s.open("stale")
    s.compact("stale")
    stale.start_span("after-compaction")
    folded: list[str] = []
    real = _traces.fold_wal_lean

    def spy(path: str, upto: int | None = None) -> Any:
        folded.append(os.path.basename(path))
        return real(path, upto)

    monkeypatch.setattr(_traces, "fold_wal_lean", spy)
    assert main(["ls", "--json", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 31 and folded == ["stale.wal"]
    assert {r["source"] for r in rows if r["session_id"] != "stale"} == {"summary"}
    assert next(r for r in rows if r["session_id"] == "stale")["spans"] == 1
    s.close()


def test_control_characters_are_escaped_in_text_and_kept_in_json(tmp_path: Path) -> None:
    """A session id or span name holding a newline, an ESC sequence or a bidi override never
    reaches the terminal raw in ls or show (one row per trace); --json keeps the raw id."""
    sid = "evil\n\x1b[31mred\u202e"
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    t = s.open(sid)
    with t.span("name\x1b]0;title\x07", kind="k\r"):
        pass
    t.end()
    ls = _run("ls", str(tmp_path)).stdout
    assert len(ls.splitlines()) == 2 and "\x1b" not in ls and "\u202e" not in ls
    assert "evil\\n\\e[31mred\\u202e" in ls
    show = _run("show", str(tmp_path), sid).stdout
    assert "\x1b" not in show and "\x07" not in show and "\r" not in show
    assert "name\\e]0;title\\x07 [k\\r]" in show
    assert json.loads(_run("ls", "--json", str(tmp_path)).stdout)[0]["session_id"] == sid
    s.close()


def test_show_depth_limit_and_deep_trees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--depth N shows N levels and says how many children are below; --limit N shows N spans
    and how many more there are; a chain nested 3,000 deep prints (no recursion limit)."""
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    t = s.open("tree")
    with t.span("root"):
        for i in range(3):
            with t.span(f"child{i}"):
                t.start_span("grandchild").end()
    t.end()
    assert main(["show", str(tmp_path), "tree", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "root [span] ok" in out and "(+3 child span(s) below --depth 1)" in out and "child0" not in out
    assert main(["show", str(tmp_path), "tree", "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert [n for n in ("child0", "child1", "child2", "grandchild") if n in out] == ["child0", "child1", "child2"]
    assert out.count("(+1 child span(s) below --depth 2)") == 3
    assert main(["show", str(tmp_path), "tree", "--limit", "2"]) == 0
    tree = capsys.readouterr().out.splitlines()[6:]  # after the 6 header lines
    assert len(tree) == 3 and "child0" in tree[1] and tree[2] == "… 5 more span(s) (--limit 2)"
    deep = s.open("deep")
    parent = None
    for i in range(3000):
        parent = deep.start_span(f"d{i}", parent=parent)
    assert main(["show", str(tmp_path), "deep"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].lstrip(" │└─").startswith("d2999 [span] open")
    s.close()


def test_show_json_streams_the_canonical_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show --json prints the canonical trace: equal to the compacted JSON file, byte for byte."""
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    _spans(s, "j", 50)
    assert main(["show", "--json", str(tmp_path), "j"]) == 0
    assert capsys.readouterr().out.encode() == s.trace_path("j").read_bytes() + b"\n"
    s.close()


def test_sigpipe_ends_quietly(tmp_path: Path) -> None:
    """`walspan show … | head -2`, `ls … | head -2` and `tail … | head -2`: the first two lines,
    no "Broken pipe" noise on stderr, exit 141 like git when the pipe broke under a write (show's
    200 KB always do; a smaller output may fit the pipe and end with 0)."""
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    _spans(s, "big", 4000)
    for i in range(300):
        s.open(f"s{i:03d}").close()
    s.close()
    for cmd in (f"show {tmp_path} big", f"ls {tmp_path}", f"tail --from-start {tmp_path}"):
        proc = subprocess.run(
            ["bash", "-c", f"{sys.executable} -m walspan {cmd} | head -2; echo \"status ${{PIPESTATUS[0]}}\""],
            capture_output=True, text=True, env=script_env(), timeout=TIMEOUT, check=False,
        )
        lines = proc.stdout.splitlines()
        assert len(lines) == 3 and lines[2] in ("status 141", "status 0"), (cmd, proc.stdout, proc.stderr)
        assert lines[2] == "status 141" or not cmd.startswith("show")
        assert proc.stderr == "", (cmd, proc.stderr)


def _pty_run(args: list[str], env: dict[str, str], stdout_tty: bool = True, stderr_tty: bool = False) -> tuple[str, str, int]:
    """Run walspan with stdout and/or stderr on a pseudo-terminal; returns (stdout, stderr, code)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "walspan", *args],
        stdout=slave if stdout_tty else subprocess.PIPE,
        stderr=slave if stderr_tty else subprocess.PIPE,
        env=script_env(env),
    )
    os.close(slave)
    tty = b""
    while True:
        ready, _, _ = select.select([master], [], [], TIMEOUT)
        assert ready, "no output from the pty"
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        tty += chunk
    os.close(master)
    out, err = proc.communicate(timeout=TIMEOUT)
    piped = (out or b"").decode() if not stdout_tty else (err or b"").decode()
    text = tty.decode(errors="replace")
    return (text, piped, proc.returncode) if stdout_tty else (piped, text, proc.returncode)


def test_show_pages_on_a_terminal_only(tmp_path: Path) -> None:
    """On a terminal show goes through the pager ($WALSPAN_PAGER / $PAGER, run by the shell);
    --no-pager and a pipe print directly."""
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    _spans(s, "p", 5)
    s.close()
    paged = tmp_path / "paged.txt"
    out, _err, code = _pty_run(["show", str(tmp_path), "p"], {"WALSPAN_PAGER": f"cat > {paged}"})
    assert code == 0 and "s4 [tool]" not in out and "s4 [tool] ok" in paged.read_text()
    out, _err, code = _pty_run(["show", "--no-pager", str(tmp_path), "p"], {"WALSPAN_PAGER": f"cat > {tmp_path / 'never.txt'}"})
    assert code == 0 and "s4 [tool] ok" in out and not (tmp_path / "never.txt").exists()
    piped = _run("show", str(tmp_path), "p", env={"WALSPAN_PAGER": f"cat > {tmp_path / 'never.txt'}"})
    assert "s4 [tool] ok" in piped.stdout and not (tmp_path / "never.txt").exists()


def test_progress_goes_to_a_terminal_only(tmp_path: Path) -> None:
    """verify draws progress on stderr when it is a terminal (and erases it), and writes nothing
    there when stderr is a pipe; stdout is the same either way."""
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    for i in range(3):
        _spans(s, f"v{i}", 2)
    s.close()
    out, err, code = _pty_run(["verify", str(tmp_path)], {}, stdout_tty=False, stderr_tty=True)
    assert code == 0 and "verify: 0/3 v0.wal" in err and err.endswith("\r\x1b[K")
    piped = _run("verify", str(tmp_path))
    assert piped.stderr == "" and piped.stdout == out == "3 WAL(s) checked, 0 with errors\n"


def test_python_dash_m_walspan_and_json_on_every_command(tmp_path: Path) -> None:
    """`python -m walspan` runs the CLI, and every command's --json output parses."""
    s = walspan.Store(tmp_path, durability="process", install_hooks=False)
    _spans(s, "x", 2)
    s.close()
    d = str(tmp_path)
    for args in (["ls", d], ["show", d, "x"], ["compact", d], ["verify", d], ["recover", d], ["repair", d, "x"],
                 ["tail", "--from-start", d], ["prune", d, "--older-than", "30d"]):
        proc = _run(*args, "--json")
        assert proc.returncode == 0, (args, proc.stderr)
        docs = [json.loads(line) for line in proc.stdout.splitlines()]
        assert docs, args
    verify = json.loads(_run("verify", d, "--json").stdout)
    assert verify["ok"] is True and verify["checked"] == 1 and isinstance(verify["files"][0]["records"], int)
    repair = json.loads(_run("repair", d, "x", "--json").stdout)
    assert repair == {"session_id": "x", "repaired": False}
    bad = _run("show", d, "nope")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("walspan: error: ")
