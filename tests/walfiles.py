"""Byte-surgery helpers for WAL files (in the spirit of leveldb's log_test helpers).

They work on files, not on walspan objects, so a test states exactly which bytes it damaged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from walspan import _format, _reader


def record_offsets(path: str | os.PathLike[str]) -> list[tuple[int, int, int, int]]:
    """(offset, end, type, seq) of every record of the WAL's valid prefix."""
    fd = os.open(path, os.O_RDONLY)
    try:
        scan = _reader.ScanState(os.fspath(path))
        out = []
        for offset, rtype, seq, payload in _reader.iter_records(fd, scan):
            assert payload is not None
            out.append((offset, offset + _format.RECORD_HEADER_SIZE + len(payload), rtype, seq))
        return out
    finally:
        os.close(fd)


def flip_byte(path: str | os.PathLike[str], offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of the file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1, f"offset {offset} is past the end of {path}"
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def truncate(path: str | os.PathLike[str], n: int) -> None:
    """Cut the file to its first n bytes."""
    os.truncate(path, n)


def append_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def write_at(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def salt_of(path: str | os.PathLike[str]) -> int:
    with open(path, "rb") as f:
        return _format.decode_file_header(f.read(_format.FILE_HEADER_SIZE))


def copy_wal_alone(wal: str | os.PathLike[str], directory: Path, size: int | None = None) -> Path:
    """Copy a WAL (optionally only its first `size` bytes) into a fresh store directory, without
    the shared state of .walspan/: as if the file were all that survived."""
    directory.mkdir(parents=True, exist_ok=True)
    dst = directory / os.path.basename(wal)
    if size is None:
        shutil.copyfile(wal, dst)
    else:
        with open(wal, "rb") as f:
            dst.write_bytes(f.read(size))
    return dst


def build_wal(salt: int, records: list[tuple[int, int, bytes]]) -> bytes:
    """Header + records given as (type, seq, payload bytes), framed correctly."""
    out = _format.encode_file_header(salt)
    for rtype, seq, payload in records:
        out += _format.encode_record(salt, rtype, seq, payload)
    return out
