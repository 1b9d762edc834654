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


def test_attach_reads_the_log_outside_the_lock_and_only_its_tail_under_it(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Attaching scans the whole log for writer records without holding the append lock (an
    append from elsewhere goes through meanwhile), then reads under the lock only what was
    appended since: a dead writer that another process recorded lost in that gap is not
    recorded lost a second time."""
    from walspan import _locking
    from walspan._format import RecordType, unpack_payload
    from walspan._reader import ScanState, iter_records
    from walspan._wal import WalHandle

    d = tmp_path / "d"
    code = (
        "import os, sys, walspan\n"
        "t = walspan.Store(sys.argv[1], install_hooks=False).open('s')\n"
        "t.start_span('dead writer')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(d)], check=True, timeout=60)
    original = WalHandle.prescan_writers
    lock_was_free = []

    def prescan(self: WalHandle):  # type: ignore[no-untyped-def]
        ws = original(self)
        if not lock_was_free:
            fd = os.open(d / ".walspan" / "s.lock", os.O_RDWR)
            try:
                lock_was_free.append(_locking.try_lock(fd))
            finally:
                os.close(fd)
            # another writer attaches in the gap, and records the dead writer lost
            other = walspan.Store(d, install_hooks=False)
            other.open("s").close()
            other.close()
        return ws

    monkeypatch.setattr(WalHandle, "prescan_writers", prescan)
    store = walspan.Store(d, install_hooks=False)
    store.open("s").close()
    store.close()
    assert lock_was_free == [True]
    fd = os.open(d / "s.wal", os.O_RDONLY)
    try:
        lost = [
            unpack_payload(p)["lost"]
            for _o, t, _s, p in iter_records(fd, ScanState(str(d / "s.wal")))
            if t == RecordType.WRITER_LOST
        ]
    finally:
        os.close(fd)
    assert len(lost) == 1
    t = walspan.Store(d, install_hooks=False).load("s")
    assert [s["status"] for s in t["spans"]] == ["interrupted"]
