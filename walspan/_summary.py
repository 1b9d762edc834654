"""Trace summaries: a few hundred bytes per session, so `ls` of a compacted store costs O(1) per
trace instead of a fold of each whole log.

The compactor writes `.walspan/S.summary` after it publishes `S.json`: the trace's identity,
status, times, span counts, the writers still attached (for the liveness column), and the WAL
position it reflects, with a fingerprint of the last record folded (a crc32 of its payload).
It is a cache like everything under `.walspan/`: written in place without fsync (a torn or
stale one is detected and ignored), rebuilt by the next
compaction, and trusted by a reader only while the WAL still ends exactly after that
fingerprinted record (see `walspan.read`); otherwise the reader folds the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from typing import Any

from . import _fsutil
from ._fold import SPAN_OPEN, TraceFold
from ._reader import ScanState, iter_records
from ._wal import internal_dir

log = logging.getLogger("walspan")

SUMMARY_VERSION = 1
#: Status messages can be as long as a value may be (1 MiB): the summary keeps a bounded prefix.
MESSAGE_CHARS = 200


def summary_path(store_dir: str, stem: str) -> str:
    return os.path.join(internal_dir(store_dir), stem + ".summary")


def record_check(payload: bytes) -> int:
    """The fingerprint of a record: crc32 of its payload bytes (a time in ns, a writer id and
    usually random ids: two different records practically never share one)."""
    return zlib.crc32(payload)


def summarize(fold: TraceFold, check: int) -> dict[str, Any]:
    """The summary of a fold whose last folded record has fingerprint `check`."""
    spans = errors = still_open = 0
    values = fold.spans.values() if isinstance(fold.spans, dict) else fold.spans.iter_values()  # type: ignore[attr-defined]
    for span in values:
        spans += 1
        status = span.get("status")
        errors += status == "error"
        still_open += status == SPAN_OPEN
    message = fold.status_message
    if isinstance(message, str) and len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS] + "…"
    return {
        "v": SUMMARY_VERSION,
        "session_id": fold.session_id,
        "trace_id": fold.trace_id,
        "status": fold.status,
        "status_message": message,
        "start_time": fold.start_time,
        "end_time": fold.end_time,
        "spans": spans,
        "error_spans": errors,
        "open_spans": still_open,
        "anomalies": fold.anomalies,
        "writers": len(fold.writers),
        "attached": [
            {k: w.get(k) for k in ("writer_id", "host", "pid", "process_start_time")}
            for w in fold.writers.values()
            if w.get("state") == "attached"
        ],
        "wal": {"offset": fold.offset, "seq": fold.seq, "last_record": fold.last_record, "check": check},
    }


def last_record_check(wal_path: str, offset: int, seq: int) -> int | None:
    """The fingerprint of the record of sequence number `seq` at `offset`, or None if the WAL
    holds no such whole record there."""
    fd = _fsutil.open_file(wal_path, os.O_RDONLY)
    try:
        for off, _rtype, rseq, payload in iter_records(fd, ScanState(wal_path), start=offset, start_seq=seq - 1):
            if off == offset and rseq == seq and payload is not None:
                return record_check(payload)
            break
        return None
    finally:
        os.close(fd)


def write_summary(store_dir: str, stem: str, fold: TraceFold) -> None:
    """Write the summary of `fold` (the fold a compaction just published). Never raises: a
    summary that cannot be written only makes `ls` fold that log."""
    path = summary_path(store_dir, stem)
    try:
        check = last_record_check(os.path.join(store_dir, stem + ".wal"), fold.last_record, fold.seq)
        if check is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale summary would only be refused later; drop it now
            return
        data = json.dumps(summarize(fold, check), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        # Written in place, no tmp file to leak: a reader racing this write, or the remains of a
        # crash or power loss in the middle of it, hold a cut or zero-filled document, which
        # does not parse, so the reader folds the log instead.
        fd = _fsutil.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            _fsutil.write_all(fd, data.encode("utf-8"), 0, path)
        finally:
            os.close(fd)
    except Exception as exc:  # noqa: BLE001 - a cache: never fail a compaction over it
        log.info("walspan: could not write the summary %s: %s", path, exc)


def read_summary(store_dir: str, stem: str) -> dict[str, Any] | None:
    """The summary file as written, or None if it is missing or not a summary of this version.
    Not validated against the WAL: that is the reader's job (walspan.read)."""
    try:
        with open(summary_path(store_dir, stem), "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("v") != SUMMARY_VERSION or not isinstance(doc.get("wal"), dict):
        return None
    return doc
