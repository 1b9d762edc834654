"""What a shipper has had acknowledged, durably: one cursor file per session, a lock per
session, and the marker that says shipping is configured for a store (docs/SHIP.md).

Layout, under the store: `.walspan/ship/NAME/` per shipper (NAME is `--name`, by default
derived from the endpoint), holding

- `shipper.json`: the marker (endpoint, name); its presence makes `prune` keep every trace
  this shipper has not had acknowledged to its end;
- `S.cursor`: the session's acknowledged position, replaced crash-safely (write a temporary
  file, fsync it, rename it over, fsync the directory): a kill at any instant leaves the old
  cursor or the new one, never a torn or empty one;
- `S.lock`: held (flock) by the one shipper process shipping the session;
- `rejected.jsonl`: batches the receiver refused for good (a 4xx other than 408/429), one
  JSON object per line, appended and fsynced before the cursor moves past them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..read import Cursor, check_cursor

SHIP_DIR = os.path.join(".walspan", "ship")
MARKER = "shipper.json"
REJECTS = "rejected.jsonl"
_VERSION = 1

#: Test hook: called with (step, path) at each step of a cursor update (write, fsync, rename,
#: dirsync, done), so a test can kill the process between any two of them.
step_hook: Callable[[str, str], None] | None = None


def _step(step: str, path: str) -> None:
    hook = step_hook
    if hook is not None:
        hook(step, path)


def default_name(endpoint: str) -> str:
    """A shipper name from its endpoint: readable host and port, and a hash of the whole URL so
    two endpoints on one host never share cursors."""
    u = urllib.parse.urlsplit(endpoint)
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{u.hostname or 'endpoint'}-{u.port or ''}").strip("-")
    return f"{host}-{hashlib.sha256(endpoint.encode('utf-8')).hexdigest()[:8]}"


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name or ""):
        raise ValueError(f"shipper name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    return name


@dataclass
class SavedCursor:
    """A session's acknowledged position. `trace_id` tells a new trace under the same session
    id apart; `done` means the trace had ended and everything in its log was acknowledged
    (with `inode`, lets a restart skip the log without reading it)."""

    session_id: str
    trace_id: str | None
    cursor: Cursor
    inode: int = 0
    done: bool = False
    spans: int = 0  # spans acknowledged so far (for the status line)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "session_id": self.session_id,
            "trace_id": self.trace_id,
            "cursor": str(self.cursor),
            "inode": self.inode,
            "done": self.done,
            "spans": self.spans,
        }

    @classmethod
    def from_json(cls, d: Any, path: str) -> SavedCursor:
        try:
            if d["version"] != _VERSION:
                raise ValueError(f"version {d['version']!r}")
            return cls(str(d["session_id"]), d["trace_id"], Cursor.parse(d["cursor"]), int(d["inode"]), bool(d["done"]), int(d["spans"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a walspan ship cursor ({exc})") from None


class CursorStore:
    """One shipper's directory in a store: cursors, locks, rejects (see the module doc)."""

    def __init__(self, store_dir: str, name: str) -> None:
        self.store_dir = os.fspath(store_dir)
        self.name = check_name(name)
        self.path = os.path.join(self.store_dir, SHIP_DIR, name)

    def configure(self, endpoint: str) -> None:
        """Create the directory and the marker (once; the marker is rewritten only if the
        endpoint changed)."""
        os.makedirs(self.path, exist_ok=True)
        marker = os.path.join(self.path, MARKER)
        body = {"name": self.name, "endpoint": endpoint}
        with contextlib.suppress(OSError, ValueError):
            with open(marker, encoding="utf-8") as f:
                if json.load(f).get("endpoint") == endpoint:
                    return
        _replace(marker, json.dumps(body, sort_keys=True).encode("utf-8") + b"\n")
        _fsync_dir(os.path.dirname(self.path))

    def cursor_path(self, stem: str) -> str:
        return os.path.join(self.path, stem + ".cursor")

    def load(self, stem: str) -> SavedCursor | None:
        """The saved cursor, None if the session was never acknowledged. ValueError if the
        file is not a cursor (someone else's file: never overwritten silently)."""
        path = self.cursor_path(stem)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            return SavedCursor.from_json(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a walspan ship cursor ({exc})") from None

    def save(self, stem: str, saved: SavedCursor) -> None:
        """Replace the session's cursor crash-safely (write, fsync, rename, fsync the directory)."""
        path = self.cursor_path(stem)
        _replace(path, json.dumps(saved.to_json(), sort_keys=True).encode("utf-8") + b"\n")

    def record_reject(self, entry: dict[str, Any]) -> None:
        """Append a refused batch to rejected.jsonl, durably, before the cursor passes it."""
        line = json.dumps({"time": time.time(), **entry}, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
        fd = os.open(os.path.join(self.path, REJECTS), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def try_lock(self, stem: str) -> int | None:
        """The session's lock, taken without waiting: its descriptor, or None if another
        shipper holds it. Closing the descriptor releases it (flock: per open file, so two
        shippers in one process exclude each other too)."""
        fd = os.open(os.path.join(self.path, stem + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd


def _replace(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    _step("write", path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        _step("fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)
    _step("rename", path)
    os.rename(tmp, path)
    _step("dirsync", path)
    _fsync_dir(os.path.dirname(path))
    _step("done", path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shippers(store_dir: str) -> Iterator[tuple[CursorStore, dict[str, Any]]]:
    """Every shipper configured for the store (a directory with a marker), with its marker."""
    root = os.path.join(os.fspath(store_dir), SHIP_DIR)
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for name in names:
        try:
            with open(os.path.join(root, name, MARKER), encoding="utf-8") as f:
                marker = json.load(f)
        except (OSError, ValueError):
            continue
        try:
            cs = CursorStore(store_dir, name)
        except ValueError:
            continue  # not a directory ship made
        yield cs, marker


def unshipped(store_dir: str, stem: str, session_id: str, trace_id: str | None) -> list[str]:
    """The shippers configured for the store that have not had this session's log
    acknowledged to its end ("NAME (ENDPOINT)"): what `prune` must keep. A saved cursor counts
    only if it names this trace, ends where the WAL ends, and the WAL still holds its record."""
    out = []
    wal = os.path.join(os.fspath(store_dir), stem + ".wal")
    for cs, marker in shippers(store_dir):
        try:
            saved = cs.load(stem)
            size = os.stat(wal).st_size
        except (ValueError, OSError):
            saved = None
        shipped = (
            saved is not None
            and saved.trace_id == trace_id
            and saved.cursor.offset == size
            and check_cursor(store_dir, session_id, saved.cursor)
        )
        if not shipped:
            out.append(f"{cs.name} ({marker.get('endpoint')})")
    return out


__all__ = ["MARKER", "SHIP_DIR", "CursorStore", "SavedCursor", "check_name", "default_name", "shippers", "unshipped"]
