"""What a power loss at a chosen moment of a traced history may leave on disk.

A small model in the spirit of ALICE (OSDI 2014) and leveldb's fault_injection_test, rebuilt
from a syscall log taken with data=True (tests/syscall_trace.py). It is exact for the calls
walspan makes and deliberately no more general:

- File content belongs to an inode: the bytes written to it (write, pwrite) and its
  truncations (ftruncate, open O_TRUNC), in the order they completed. A power loss keeps every
  change that completed before the *start* of the inode's last fsync/fdatasync that completed
  (a flush covers what was done before it began); later changes may be kept or lost.
- Names belong to their directory: creations (open O_CREAT of a new file), links, renames and
  unlinks. A power loss keeps every change that completed before the start of the directory's
  last completed fsync; later ones may be kept or lost (a new file's own fsync does not make
  its name durable).
- A moment is a CLOCK_MONOTONIC time T: a call counts if it ended by T; one in flight at T
  counts as not done (its effect is volatile at best).

Only inodes born in the traced history (created by the traced processes) are modelled, so an
image holds exactly the files the history created and that survive; directories are taken as
durable. `image()` picks, independently for names and for data, the worst case (only what was
made durable) or the best case (everything done by T, as after a process crash), and for data
also "the durable part plus the first k later changes": write order kept, a prefix persisted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from syscall_trace import Call, TraceLog

SYNCED = "synced"  # only what a completed flush covers
ALL = "all"  # everything completed by the moment


@dataclass
class _Inode:
    changes: list[Call] = field(default_factory=list)  # writes and truncations, in completion order
    flushes: list[Call] = field(default_factory=list)


@dataclass
class _Dir:
    changes: list[tuple[Call, str, int | None]] = field(default_factory=list)  # (call, name, inode or None)
    flushes: list[Call] = field(default_factory=list)


class PowerLossModel:
    """Per-inode content and per-directory names of a traced history, replayable to any moment."""

    def __init__(self, log: TraceLog) -> None:
        self.inodes: dict[int, _Inode] = {}
        self.dirs: dict[str, _Dir] = {}
        for c in sorted(log.calls, key=lambda c: (c.t1, c.index)):
            if c.op != "mark" and c.ok:
                self._add(c)

    def _dir(self, path: str) -> _Dir:
        return self.dirs.setdefault(os.path.dirname(path), _Dir())

    def _add(self, c: Call) -> None:
        op = c.op
        if op == "open":
            flags = int(c.fields["flags"], 16)
            if c.fields["created"] == "1":
                self.inodes[c.ino] = _Inode()
                self._dir(c.path).changes.append((c, c.path, c.ino))
            elif flags & os.O_TRUNC and c.ino in self.inodes:
                self.inodes[c.ino].changes.append(c)
        elif op in ("write", "pwrite", "ftruncate"):
            if c.ino in self.inodes:
                if op != "ftruncate" and c.data is None:
                    raise ValueError("the log was taken without data=True: file content is unknown")
                self.inodes[c.ino].changes.append(c)
        elif op in ("fsync", "fdatasync"):
            if c.fields["type"] == "d":
                self.dirs.setdefault(c.path, _Dir()).flushes.append(c)
            elif c.ino in self.inodes:
                self.inodes[c.ino].flushes.append(c)
        elif op == "link":
            self._dir(c.path).changes.append((c, c.path, c.ino))
        elif op == "rename":
            self._dir(c.old).changes.append((c, c.old, None))
            self._dir(c.path).changes.append((c, c.path, c.ino))
        elif op == "unlink":
            self._dir(c.path).changes.append((c, c.path, None))

    @staticmethod
    def _durable_from(flushes: list[Call], moment: int) -> int:
        """Changes that ended by this time are durable: the start of the last flush done by `moment`."""
        return max((f.t0 for f in flushes if f.t1 <= moment), default=-1)

    def names(self, moment: int, mode: str = SYNCED) -> dict[str, int]:
        """name -> inode of every name (of a modelled inode) that survives a power loss at `moment`."""
        out: dict[str, int] = {}
        for d in self.dirs.values():
            limit = moment if mode == ALL else self._durable_from(d.flushes, moment)
            for c, name, ino in d.changes:
                if c.t1 > limit:
                    break
                if ino is None:
                    out.pop(name, None)
                else:
                    out[name] = ino
        return {n: i for n, i in out.items() if i in self.inodes}

    def content(self, ino: int, moment: int, mode: str | int = SYNCED) -> bytes:
        """The inode's bytes after a power loss at `moment`: SYNCED, ALL, or (an int k) the
        synced part plus the first k changes made after it."""
        node = self.inodes[ino]
        durable = self._durable_from(node.flushes, moment)
        data = bytearray()
        extra = 0
        for c in node.changes:
            if c.t1 > moment:
                break
            if c.t1 > durable and mode != ALL:
                if mode == SYNCED or extra >= int(mode):
                    break
                extra += 1
            if c.op == "open":  # O_TRUNC
                del data[:]
            elif c.op == "ftruncate":
                size = int(c.fields["len"])
                data = data[:size] + bytes(max(0, size - len(data)))
            else:
                assert c.data is not None
                off = c.off
                if len(data) < off:
                    data += bytes(off - len(data))
                data[off : off + len(c.data)] = c.data
        return bytes(data)

    def image(self, moment: int, names: str = SYNCED, data: str | int = SYNCED) -> dict[str, bytes]:
        """path -> content of every modelled file that a power loss at `moment` may leave."""
        return {path: self.content(ino, moment, data) for path, ino in self.names(moment, names).items()}


def materialize(image: dict[str, bytes], source_dir: str | os.PathLike[str], target: Path) -> list[str]:
    """Write the image's files that lived directly in `source_dir` into `target` (created); their names."""
    src = os.fspath(source_dir)
    target.mkdir(parents=True)
    written = []
    for path, content in sorted(image.items()):
        if os.path.dirname(path) == src:
            name = os.path.basename(path)
            (target / name).write_bytes(content)
            written.append(name)
    return written
