"""recover() housekeeping: leftovers of processes killed mid-operation are removed, and nothing
that a live process may still be using is touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import walspan


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_recover_sweeps_leftovers_of_dead_processes_only(tmp_path: Path) -> None:
    """Temporary files of a compaction or WAL creation whose process is gone, and the liveness
    file of a writer killed before it attached (its lock is free), are removed by recover();
    a temporary file of a live process and this process's own liveness file are kept."""
    d = tmp_path / "d"
    store = walspan.Store(d, install_hooks=False)
    trace = store.open("s")
    pid = dead_pid()
    stale = [d / f"s.json.tmp-{pid}-0a1b2c3d", d / f"t.wal.tmp-{pid}-deadbeef"]
    live_tmp = d / f"s.json.tmp-{os.getpid()}-00000000"
    for p in [*stale, live_tmp]:
        p.write_bytes(b"partial")
    writers = d / ".walspan" / "writers"
    orphan = writers / "0123456789abcdef.live"
    orphan.write_bytes(b"{}")
    own = set(os.listdir(writers)) - {orphan.name}
    assert len(own) == 1
    report = store.recover()
    assert report.corrupt == [] and report.crashed == []
    assert not any(p.exists() for p in stale) and live_tmp.exists()
    assert set(os.listdir(writers)) == own
    trace.start_span("still attached").end()
    trace.close()


def test_an_unreadable_session_does_not_stop_the_others_recovery(tmp_path: Path) -> None:
    """A directory planted under a WAL's name is reported as unreadable by recover(), and the
    other sessions are still recovered (invariant 9: sessions are isolated)."""
    d = tmp_path / "d"
    code = (
        "import os, sys, walspan\n"
        "t = walspan.Store(sys.argv[1], install_hooks=False).open('dead')\n"
        "t.start_span('x')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(d)], check=True, timeout=60)
    (d / "aaa.wal").mkdir()  # sorts before "dead"
    store = walspan.Store(d, install_hooks=False)
    report = store.recover()
    assert report.crashed == ["dead"]
    assert len(report.unreadable) == 1 and str(report.unreadable[0].filename).endswith("aaa.wal")
