"""Removing a session's files for good (what `walspan prune` does to each trace it selects),
in an order that a kill at any point cannot turn into something walspan misreads.

The WAL is the truth, so it goes last: until its unlink the trace is whole and everything
else (JSON, summary, shared state, lock files, repair evidence) is either a cache rebuilt
from it or evidence beside it. A prune killed before that unlink leaves a complete trace that
the next prune removes; one killed after leaves nothing of it. The directories are fsynced
before the WAL's unlink, so "the WAL last" holds across a power loss too.

The lock files (`.walspan/S.lock`, `S.shm`, `S.compact`) are removed while the WAL still
exists: no writer can create a new log under that name until the old one is gone, so no two
writers can ever hold the append lock on two different inodes of `S.lock`. The compaction
lock is held from the JSON's removal to the WAL's, so a compaction of this trace cannot write
the JSON back meanwhile. Details and the order: docs/PRUNE.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from . import _fsutil, _locking
from ._wal import internal_dir

#: Test hook: called with (step, path) just before each removal (steps: json, broken, summary,
#: shm, lock, compact, fsync, wal) and after the WAL's (after-wal).
step_hook: Callable[[str, str], None] | None = None

_INTERNAL = ("summary", "shm", "lock")  # removed in this order, then the compaction lock file


@dataclass
class Removed:
    path: str
    bytes: int


def _step(step: str, path: str) -> None:
    hook = step_hook
    if hook is not None:
        hook(step, path)


def session_files(store_dir: str, stem: str) -> list[str]:
    """Every file of the session that exists now, the WAL last (for --dry-run and sizes)."""
    internal = internal_dir(store_dir)
    paths = [os.path.join(store_dir, stem + ".json"), *_evidence(store_dir, stem)]
    paths += [os.path.join(internal, f"{stem}.{kind}") for kind in (*_INTERNAL, "compact")]
    paths.append(os.path.join(store_dir, stem + ".wal"))
    return [p for p in paths if os.path.lexists(p)]


def _evidence(store_dir: str, stem: str) -> list[str]:
    prefix = stem + ".wal.broken-"
    return sorted(os.path.join(store_dir, n) for n in os.listdir(store_dir) if n.startswith(prefix))


def file_size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


def _unlink(step: str, path: str, out: list[Removed]) -> None:
    size = file_size(path)
    _step(step, path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    out.append(Removed(path, size))


def remove_session(store_dir: str, stem: str, still_prunable: Callable[[], bool]) -> list[Removed] | None:
    """Remove every file of the session, the WAL last. `still_prunable` is asked again under
    the compaction lock, just before the first removal (e.g. "still terminal, same trace, no
    live writer"); if it says no, nothing is removed and None is returned."""
    internal = internal_dir(store_dir)
    removed: list[Removed] = []
    os.makedirs(internal, mode=_fsutil.DIR_MODE, exist_ok=True)
    compact_path = os.path.join(internal, stem + ".compact")
    lock_fd = _fsutil.open_file(compact_path, os.O_RDWR | os.O_CREAT)
    try:
        _locking.lock(lock_fd)
        if not still_prunable():
            return None
        _unlink("json", os.path.join(store_dir, stem + ".json"), removed)
        for path in _evidence(store_dir, stem):
            _unlink("broken", path, removed)
        for kind in _INTERNAL:
            _unlink(kind, os.path.join(internal, f"{stem}.{kind}"), removed)
        _unlink("compact", compact_path, removed)
        _step("fsync", store_dir)
        _fsutil.fsync_dir(internal)
        _fsutil.fsync_dir(store_dir)
        _unlink("wal", os.path.join(store_dir, stem + ".wal"), removed)
        _step("after-wal", store_dir)
        _fsutil.fsync_dir(store_dir)
        return removed
    finally:
        with contextlib.suppress(OSError):
            _locking.unlock(lock_fd)
        os.close(lock_fd)


def orphans(store_dir: str) -> list[str]:
    """Caches left without their WAL (a compaction that raced a prune can write a JSON back
    after the prune's removal): canonical JSONs and summaries only. Lock files are never
    touched here: without the WAL there is no way to know that no writer is creating a new
    log under that name right now."""
    from ._leanfold import read_wal_section

    names = set(os.listdir(store_dir))
    out = []
    for name in sorted(names):
        if not name.endswith(".json") or name.startswith(".") or name[:-5] + ".wal" in names:
            continue
        path = os.path.join(store_dir, name)
        try:
            with open(path, "rb") as f:
                if f.read(13) != b'{"anomalies":':
                    continue  # not a canonical walspan trace: not ours to remove
                read_wal_section(f, os.fstat(f.fileno()).st_size)
        except (OSError, ValueError):
            continue
        out.append(path)
    internal = internal_dir(store_dir)
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(internal)):
            if name.endswith(".summary") and name[: -len(".summary")] + ".wal" not in names:
                out.append(os.path.join(internal, name))
    return out


def remove_orphans(paths: list[str]) -> list[Removed]:
    removed: list[Removed] = []
    for path in paths:
        stem_wal = path.rsplit(".", 1)[0] + ".wal"
        if os.path.dirname(path).endswith(".walspan"):
            stem_wal = os.path.join(os.path.dirname(os.path.dirname(path)), os.path.basename(stem_wal))
        if os.path.lexists(stem_wal):
            continue  # a log appeared under that name since: the file is its cache now
        _unlink("orphan", path, removed)
    return removed


__all__ = ["Removed", "orphans", "remove_orphans", "remove_session", "session_files"]
