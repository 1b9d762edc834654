"""Integrity check of a trace directory, read-only: for testing and post-mortems.

For every WAL: the header and every record's framing, checksum and sequence (corruption is an
error; a torn tail is reported as a note: the next append or recover() truncates it). For every
canonical JSON beside a WAL: it parses, it describes this WAL (same WAL id), the WAL still holds
the last record it reflects, and it is byte-for-byte what folding the WAL up to there gives.
Damage is judged exactly as every other reader judges it (walspan/_reader.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ._fold import TraceFold
from ._format import wal_keys
from ._fsutil import open_file
from ._leanfold import fold_wal_lean, iter_canonical, read_wal_section, stream_equals
from ._names import decode_stem
from ._reader import read_header, record_at
from .errors import CorruptWALError

_EVIDENCE = re.compile(r"\.(?:wal\.(?:broken|torn)|json\.stale)-")


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
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    @property
    def errors(self) -> list[str]:
        return [e for f in self.files for e in f.errors]


def verify_wal(wal_path: str) -> FileCheck:
    check = FileCheck(wal_path)
    stem = os.path.basename(wal_path)[:-4]
    check.session_id = decode_stem(stem)  # until the trace start says (hashed names)
    try:
        fold, scan = fold_wal_lean(wal_path)  # bounded memory, however large the trace
    except CorruptWALError as exc:
        check.errors.append(str(exc))
        return check
    except OSError as exc:
        check.errors.append(f"{wal_path}: cannot read: {exc.strerror or exc}")
        return check
    decoded = check.session_id
    check.session_id = fold.session_id
    check.records = scan.records
    check.valid_end = scan.end
    check.status = fold.status
    if scan.torn_offset is not None:
        check.torn_bytes = scan.torn_bytes
        check.notes.append(
            f"{wal_path}: torn tail of {scan.torn_bytes} bytes at offset {scan.torn_offset} "
            f"({scan.torn_reason}); the next append, recover or repair truncates it"
        )
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
            offset, seq, wal_id = int(wal["offset"]), int(wal["seq"]), str(wal["id"])
            last_record, last_crc = int(wal["last_record"]), int(wal["last_crc"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            check.errors.append(f"{json_path}: not a valid canonical trace: {exc}; `walspan compact` rebuilds it")
            return
        if wal_id != fold.wal_id:
            check.errors.append(f"{json_path}: describes another WAL (id {wal_id}, this WAL's is {fold.wal_id})")
            return
        wal_fd = open_file(wal_path, os.O_RDONLY)
        try:
            found = record_at(wal_fd, last_record, wal_keys(read_header(wal_fd, wal_path)))
        finally:
            os.close(wal_fd)
        if offset > check.valid_end or found != (seq, offset, last_crc):
            check.errors.append(
                f"{json_path}: shows records up to seq {seq} (offset {offset}) that the WAL does not hold "
                f"(its valid records end at offset {check.valid_end}): they were lost to damage or a cut; "
                "`walspan compact` keeps this JSON aside as evidence and rebuilds it from the WAL"
            )
            return
        if offset != fold.offset:
            fold, _ = fold_wal_lean(wal_path, upto=offset)
        f.seek(0)
        if not stream_equals(iter_canonical(fold), f):
            check.errors.append(f"{json_path}: differs from the fold of the WAL up to offset {offset}")


def evidence_notes(directory: str, names: list[str], report: VerifyReport) -> None:
    """Files that repairs and compactions set aside are evidence: say they are there."""
    kept = [n for n in names if _EVIDENCE.search(n)]
    if kept:
        report.notes.append(
            f"{len(kept)} file(s) kept as evidence of damage or of a torn tail (never read by walspan; "
            f"inspect, then delete them): {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}"
        )


def verify_dir(directory: str) -> VerifyReport:
    report = VerifyReport(directory)
    names = sorted(os.listdir(directory))
    for name in names:
        if name.endswith(".wal") and not name.startswith("."):
            report.files.append(verify_wal(os.path.join(directory, name)))
    evidence_notes(directory, names, report)
    return report
