"""The `walspan` command line: ls/show/compact/verify/recover, and errors as one clear line on
stderr with a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from walfiles import flip_byte, record_offsets

import walspan
from walspan.cli import main


def _demo(directory: Path) -> walspan.Store:
    s = walspan.Store(directory, durability="process", install_hooks=False)
    t = s.open("ses/1", metadata={"title": "demo"})
    with t.span("bash", kind="tool", attributes={"cmd": "ls"}, input="ls") as sp:
        sp.add_event("stdout", {"bytes": 3})
        t.start_span("child").end(output="out")
    t.end()
    s.open("ses 2").start_span("open-span")
    return s


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("walspan: ")
    return lines[0]


def test_ls_lists_sessions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan ls DIR` lists every session with status and span count; --json is parseable,
    with the span count an int."""
    _demo(tmp_path)
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ses/1" in out and "completed" in out and "ses 2" in out and "running" in out
    assert main(["ls", "--json", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["session_id"], r["status"], r["spans"]) for r in rows} == {("ses/1", "completed", 2), ("ses 2", "running", 1)}


def test_ls_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan ls` on an empty directory says so and succeeds."""
    assert main(["ls", str(tmp_path)]) == 0
    assert "no traces" in capsys.readouterr().out


def test_show_prints_span_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan show DIR SESSION` prints the session, status and the span tree (child under
    parent); -v adds attributes/events/io; --json prints load()'s dict."""
    s = _demo(tmp_path)
    assert main(["show", str(tmp_path), "ses/1"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "bash [tool]" in out
    lines = out.splitlines()
    bash = next(i for i, line in enumerate(lines) if "bash [tool]" in line)
    child = next(i for i, line in enumerate(lines) if "child [span]" in line)
    assert child > bash and lines[child].index("child") > lines[bash].index("bash")
    assert main(["show", "-v", str(tmp_path), "ses/1"]) == 0
    out = capsys.readouterr().out
    assert "cmd = ls" in out and "stdout" in out and "< out" in out
    assert main(["show", "--json", str(tmp_path), "ses/1"]) == 0
    assert json.loads(capsys.readouterr().out) == s.load("ses/1")


def test_compact_one_and_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan compact DIR [SESSION]` writes the canonical JSON and prints its path."""
    s = _demo(tmp_path)
    assert main(["compact", str(tmp_path), "ses 2"]) == 0
    assert capsys.readouterr().out.strip() == str(s.trace_path("ses 2"))
    s.trace_path("ses/1").unlink()
    assert main(["compact", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert json.loads(s.trace_path("ses/1").read_bytes()) == s.load("ses/1")


def test_verify_clean_and_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan verify DIR` exits 0 on a clean directory and 1 on corruption, saying which file
    and at which byte offset."""
    s = _demo(tmp_path)
    assert main(["verify", str(tmp_path)]) == 0
    assert "0 with errors" in capsys.readouterr().out
    wal = s.wal_path("ses/1")
    off = record_offsets(wal)[1][0]
    flip_byte(wal, off + 21)
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR session 'ses/1': {wal}: corrupt at byte offset {off}" in out and "1 with errors" in out
    # the way out names the session the way `repair` takes it, not the file's stem
    assert f"walspan repair {tmp_path} ses/1" in out


def test_verify_detects_tampered_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify compares each JSON with the fold of the WAL: an edited status is an error."""
    s = _demo(tmp_path)
    p = s.trace_path("ses/1")
    p.write_bytes(p.read_bytes().replace(b'"status":"completed"', b'"status":"crashed"'))
    assert main(["verify", str(tmp_path)]) == 1
    assert "differs from the fold" in capsys.readouterr().out


def test_recover_marks_dead_writers_crashed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan recover DIR` crashes a running trace whose writer is gone, and is idempotent."""
    code = "import sys, os, walspan; s = walspan.Store(sys.argv[1], install_hooks=False); s.open('dead').start_span('x'); os._exit(0)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    assert main(["recover", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dead: crashed" in out
    assert walspan.Store(tmp_path, install_hooks=False).load("dead")["status"] == "crashed"
    assert main(["recover", str(tmp_path)]) == 0
    assert "0 change(s)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code", [
    ([], 2),
    (["frobnicate"], 2),
    (["ls"], 2),
    (["ls", "{missing}"], 2),
    (["ls", "{file}"], 2),
    (["show", "{dir}"], 2),
    (["show", "{dir}", "no-such-session"], 1),
    (["show", "{missing}", "x"], 2),
    (["compact", "{dir}", "no-such-session"], 1),
    (["verify", "{missing}"], 2),
    (["recover", "{file}"], 2),
    (["ls", "--bogus", "{dir}"], 2),
])
def test_bad_usage_is_one_line_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> None:
    """Bad arguments, missing directories, files instead of directories and unknown sessions
    give one clear line on stderr and a non-zero exit code (2 usage, 1 bad data)."""
    (tmp_path / "file").write_text("x")
    d = tmp_path / "d"
    _demo(d)
    args = [a.format(missing=tmp_path / "missing", file=tmp_path / "file", dir=d) for a in argv]
    assert main(args) == code
    captured = capsys.readouterr()
    _one_error_line(captured.err)


def test_corrupt_wal_show_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show/compact of a corrupt WAL: one line naming the file and offset, exit 1; ls marks it
    CORRUPT and exits 1. (compact folds incrementally from the JSON's checkpoint, and ls trusts
    the summary of a compacted trace, so damage *before* a checkpoint is only found by a full
    fold: the JSON and its summary are removed here first; `verify` always finds it.)"""
    s = _demo(tmp_path)
    wal = s.wal_path("ses/1")
    off = record_offsets(wal)[1][0]
    flip_byte(wal, off + 21)
    assert main(["verify", str(tmp_path)]) == 1
    capsys.readouterr()
    s.trace_path("ses/1").unlink()
    (tmp_path / ".walspan" / (wal.stem + ".summary")).unlink()
    for argv in (["show", str(tmp_path), "ses/1"], ["compact", str(tmp_path), "ses/1"]):
        assert main(argv) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert str(wal) in line and f"offset {off}" in line
    assert main(["ls", str(tmp_path)]) == 1
    assert "CORRUPT" in capsys.readouterr().out


def test_garbage_wal_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file named like a WAL that is not one (bad header) is reported, not a traceback."""
    s = _demo(tmp_path)
    s.wal_path("ses/1").write_bytes(b"not a wal at all")
    assert main(["show", str(tmp_path), "ses/1"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "offset 0" in line
    assert main(["verify", str(tmp_path)]) == 1


def test_module_entry_point(tmp_path: Path) -> None:
    """`python -m walspan.cli` runs the CLI: exit codes and a single stderr line, no traceback."""
    _demo(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "walspan.cli", "ls", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0 and "ses/1" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "walspan.cli", "show", str(tmp_path), "nope"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1
    _one_error_line(bad.stderr)


def test_unreadable_wal_does_not_stop_ls_or_compact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A name that looks like a WAL but cannot be read (a directory, a planted symlink) is
    reported with its path, and ls/compact still handle every other session (exit 1)."""
    s = _demo(tmp_path)
    (tmp_path / "dir.wal").mkdir()
    os.symlink("/etc/hostname", tmp_path / "evil.wal")
    assert main(["ls", str(tmp_path)]) == 1
    cap = capsys.readouterr()
    assert "ses/1" in cap.out and "ses 2" in cap.out and "Traceback" not in cap.err
    assert str(tmp_path / "dir.wal") in cap.out and str(tmp_path / "evil.wal") in cap.out
    assert main(["ls", "--json", str(tmp_path)]) == 1
    rows = {r["session_id"]: r["status"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {"ses/1": "completed", "ses 2": "running", "dir": "unreadable", "evil": "unreadable"}
    s.trace_path("ses/1").unlink()
    assert main(["compact", str(tmp_path)]) == 1
    cap = capsys.readouterr()
    assert s.trace_path("ses/1").exists() and s.trace_path("ses 2").exists()
    errs = cap.err.strip().splitlines()
    assert len(errs) == 2 and all(e.startswith("walspan: ") for e in errs)
    assert any(str(tmp_path / "dir.wal") in e for e in errs) and any(str(tmp_path / "evil.wal") in e for e in errs)


def test_show_unreadable_wal_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show of a WAL that cannot be read: one line naming the file, exit 1."""
    _demo(tmp_path)
    (tmp_path / "dir.wal").mkdir()
    assert main(["show", str(tmp_path), "dir"]) == 1
    assert str(tmp_path / "dir.wal") in _one_error_line(capsys.readouterr().err)


def test_verify_goes_on_past_an_unreadable_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify reports a JSON it cannot read (here a directory) as an error on that file and still
    checks every other WAL (exit 1, no abort)."""
    s = _demo(tmp_path)
    s.compact("ses 2")
    bad = s.trace_path("ses/1")
    bad.unlink()
    bad.mkdir()
    assert main(["verify", str(tmp_path)]) == 1
    cap = capsys.readouterr()
    assert cap.err == ""
    assert f"ERROR session 'ses/1': {bad}" in cap.out and "2 WAL(s) checked, 1 with errors" in cap.out


@pytest.mark.parametrize("command", [["show", "STORE", "ses/1"], ["repair", "STORE", "ses/1"], ["ls", "STORE"], ["verify", "STORE"]])
def test_an_unreadable_store_says_permission_denied(tmp_path: Path, command: list[str]) -> None:
    """A store the user may not read is "permission denied" naming the path, one line, exit 1:
    never "no trace" or "no such directory" (which would send the user looking for a typo).
    The command runs without the capabilities that let root read anything (util-linux's
    setpriv), against a store whose mode is 000."""
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux's setpriv to drop the permission-override capabilities")
    store_dir = tmp_path / "traces"
    _demo(store_dir)
    os.chmod(store_dir, 0)
    try:
        args = [str(store_dir) if a == "STORE" else a for a in command]
        proc = subprocess.run(
            [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--", sys.executable, "-c",
             "import sys; from walspan.cli import main; sys.exit(main(sys.argv[1:]))", *args],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        os.chmod(store_dir, 0o700)
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "Permission denied" in line and str(store_dir) in line, line
