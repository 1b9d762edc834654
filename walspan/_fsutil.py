"""File-system primitives with the durability rules of DESIGN.md §4 in one place.

- sync_data: fdatasync on Linux; F_FULLFSYNC on macOS (plain fsync there does not reach the
  platter); fsync elsewhere.
- fsync_dir: after a create or rename, so the name survives power loss (no-op on Windows,
  where directories cannot be opened).
- atomic_replace: tmp file in the same directory -> fsync -> os.replace -> fsync directory.
- Files are created 0600 and opened with O_NOFOLLOW: a planted symlink is refused, not followed.

Every function here goes through `faults`, a hook the fault-injection tests use to make a
chosen call fail (ENOSPC, EIO) or pause; in production it is a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sys
from collections.abc import Callable

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
FILE_MODE = 0o600
DIR_MODE = 0o700


class _Faults:
    """Fault-injection hook: tests set `hook(op, path)`; it may raise OSError or block."""

    hook: Callable[[str, str], None] | None = None

    def __call__(self, op: str, path: str) -> None:
        hook = self.hook
        if hook is not None:
            hook(op, path)


faults = _Faults()


def open_file(path: str, flags: int, mode: int = FILE_MODE) -> int:
    return os.open(path, flags | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY, mode)


if sys.platform == "darwin":  # pragma: no cover - not tested on this platform
    import fcntl

    def _sync(fd: int) -> None:
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        except OSError:
            os.fsync(fd)  # F_FULLFSYNC is refused on some file systems (e.g. network)

elif hasattr(os, "fdatasync"):
    _sync = os.fdatasync
else:  # pragma: no cover - Windows
    _sync = os.fsync


def sync_data(fd: int, path: str) -> None:
    faults("fsync", path)
    _sync(fd)


def truncate(fd: int, size: int, path: str) -> None:
    faults("truncate", path)
    os.ftruncate(fd, size)


def fsync_dir(path: str) -> None:
    if os.name == "nt":  # pragma: no cover
        return
    faults("fsync_dir", path)
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview, offset: int, path: str) -> None:
    """pwrite all of `data` at `offset` (a short write is continued, not ignored)."""
    faults("write", path)
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    offset += n
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - pwrite raises instead on real errors
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def tmp_name(final: str) -> str:
    return f"{final}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


#: A large file is written and synced this many bytes at a time (see _write_synced_tmp).
SYNC_CHUNK = 2 << 20
#: A source range to copy: (file descriptor, offset, length), read in chunks, never whole.
FileRange = tuple[int, int, int]
_COPY_CHUNK = SYNC_CHUNK


def _copy_range(dst: int, src: FileRange, path: str) -> None:
    """Copy the range in chunks, each synced before the next is written (see _write_synced_tmp)."""
    fd, offset, length = src
    done = 0
    while done < length:
        chunk = os.pread(fd, min(_COPY_CHUNK, length - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, f"the source ended {length - done} bytes early", path)
        write_all(dst, chunk, done, path)
        done += len(chunk)
        if done < length:
            sync_data(dst, path)


def _write_synced_tmp(final: str, data: bytes | FileRange) -> str:
    """A new temporary file beside `final` holding `data` (bytes, or a range of another file,
    copied in chunks so that a large one is never held in memory), fsynced; its path.

    Large data is written in chunks of SYNC_CHUNK bytes, each synced before the next is written:
    on ext4 (data=ordered) a journal commit, which every concurrent fdatasync of a WAL on the
    same file system waits for, first writes out the dirty data of files it allocated blocks
    for, so a JSON of hundreds of MB written whole and synced once would stall the appends of
    every session for as long as that writeback takes. In chunks, at most one chunk is dirty."""
    tmp = tmp_name(final)
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        if isinstance(data, tuple):
            faults("write", tmp)
            _copy_range(fd, data, tmp)
        else:
            view = memoryview(data)
            offset = 0
            while len(data) - offset > SYNC_CHUNK:
                write_all(fd, view[offset : offset + SYNC_CHUNK], offset, tmp)
                sync_data(fd, tmp)
                offset += SYNC_CHUNK
            write_all(fd, view[offset:], offset, tmp)
        sync_data(fd, tmp)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def atomic_replace(final: str, data: bytes, *, before_rename: Callable[[], None] | None = None) -> None:
    """Replace `final` with `data` so that a crash leaves the old file or the new, never a mix."""
    directory = os.path.dirname(final) or "."
    tmp = _write_synced_tmp(final, data)
    try:
        if before_rename is not None:
            before_rename()
        faults("replace", final)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def create_exclusive(final: str, data: bytes | FileRange) -> bool:
    """Create `final` holding `data`, durably, only if it does not exist. True if we created it.

    The content is complete before the name appears (tmp + fsync + link), so no reader ever
    sees a half-written file under the final name, and two racing creators cannot both win.
    """
    directory = os.path.dirname(final) or "."
    tmp = _write_synced_tmp(final, data)
    try:
        faults("link", final)
        try:
            if hasattr(os, "link"):
                os.link(tmp, final)
            else:  # pragma: no cover - Windows: rename refuses an existing target
                os.rename(tmp, final)
        except FileExistsError:
            return False
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(directory)
    return True


def ensure_dir(path: str) -> None:
    """Create the directory (0700) and its parents if missing; refuse a non-directory."""
    try:
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None
    if not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
