"""Integrity check of a trace directory, read-only: for testing and post-mortems.

For every WAL: the header and every record's framing, checksum and sequence (corruption is an
error; a torn tail is reported as a note: the next append or recover() truncates it). For every
canonical JSON beside a WAL: it parses, it describes this WAL (same salt), it reflects no more
than the WAL's valid prefix, and it is byte-for-byte what folding that prefix gives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ._fold import TraceFold
from ._leanfold import fold_wal_lean, iter_canonical, read_wal_section, stream_equals
from ._names import decode_stem
from .errors import CorruptWALError


@dataclass
class FileCheck:
    wal: str
    session_id: str | None = None
    records: int = 0
    valid_end: int = 0
    torn_bytes: int = 0
    status: str | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class VerifyReport:
    directory: str
    files: list[FileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    @property
    def errors(self) -> list[str]:
        return [e for f in self.files for e in f.errors]


def verify_wal(wal_path: str) -> FileCheck:
    check = FileCheck(wal_path)
    try:
        fold, scan = fold_wal_lean(wal_path)  # bounded memory, however large the trace
    except CorruptWALError as exc:
        check.errors.append(str(exc))
        return check
    except OSError as exc:
        check.errors.append(f"{wal_path}: cannot read: {exc.strerror or exc}")
        return check
    check.session_id = fold.session_id
    check.records = scan.records
    check.valid_end = scan.end
    check.status = fold.status
    if scan.torn_offset is not None:
        check.torn_bytes = scan.torn_bytes
        check.notes.append(
            f"{wal_path}: torn tail of {scan.torn_bytes} bytes at offset {scan.torn_offset} "
            f"({scan.torn_reason}); repaired by the next append or recover"
        )
    stem = os.path.basename(wal_path)[:-4]
    decoded = decode_stem(stem)
    if decoded is not None and fold.session_id is not None and decoded != fold.session_id:
        check.errors.append(f"{wal_path}: file name encodes session {decoded!r} but the trace says {fold.session_id!r}")
    json_path = wal_path[:-4] + ".json"
    _verify_json(json_path, wal_path, fold, check)
    return check


def _verify_json(json_path: str, wal_path: str, fold: TraceFold, check: FileCheck) -> None:
    try:
        f = open(json_path, "rb")  # noqa: SIM115 - closed below; opening is what may fail
    except FileNotFoundError:
        check.notes.append(f"{json_path}: not compacted yet")
        return
    except OSError as exc:  # e.g. a directory in its place: an error on this file, not an abort
        check.errors.append(f"{json_path}: cannot read: {exc.strerror or exc}")
        return
    with f:
        # The JSON is compared as a stream with the fold's canonical bytes: neither document is
        # ever whole in memory. Only its `wal` section is parsed, from the end of the file.
        try:
            wal = read_wal_section(f, os.fstat(f.fileno()).st_size)
            offset, jsalt = int(wal["offset"]), int(wal["salt"], 16)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            check.errors.append(f"{json_path}: not a valid canonical trace: {exc}")
            return
        salt = fold.salt
        if jsalt != salt:
            check.errors.append(f"{json_path}: describes another WAL (salt {jsalt:016x}, WAL has {salt:016x})")
            return
        if offset > check.valid_end:
            check.errors.append(f"{json_path}: reflects WAL offset {offset}, beyond its valid end {check.valid_end}")
            return
        if offset != fold.offset:
            fold, _ = fold_wal_lean(wal_path, upto=offset)
        f.seek(0)
        if not stream_equals(iter_canonical(fold), f):
            check.errors.append(f"{json_path}: differs from the fold of the WAL up to offset {offset}")


def verify_dir(directory: str) -> VerifyReport:
    report = VerifyReport(directory)
    for name in sorted(os.listdir(directory)):
        if name.endswith(".wal") and not name.startswith("."):
            report.files.append(verify_wal(os.path.join(directory, name)))
    return report
