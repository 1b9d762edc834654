"""Folding a WAL, and materialising the canonical JSON trace from it.

Compaction of one session is serialised by its own lock (.walspan/S.compact), never by the
append lock: appends never wait for it. It is monotonic: the JSON names the WAL position it
reflects (wal.offset / wal.seq), and a compaction never replaces a JSON with one reflecting
less. It is incremental: the existing JSON is the checkpoint of the fold, so compacting after
k new records costs O(k + size of the output), not a re-fold of the whole WAL.
The JSON is a cache: deleting it loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from . import _fsutil, _locking, _summary
from ._fold import TraceFold, dumps
from ._format import FILE_HEADER_SIZE, unpack_payload
from ._reader import ScanState, iter_records, read_header, record_at
from ._wal import durable_end_of, internal_dir
from .errors import CorruptWALError

log = logging.getLogger("walspan")

#: Test hook: called between the tmp file's fsync and the rename (used to widen the M1 window).
before_rename: Callable[[str], None] | None = None


def fold_wal(path: str, checkpoint: TraceFold | None = None, upto: int | None = None) -> tuple[TraceFold, ScanState]:
    """Fold the valid prefix of the WAL at `path` (optionally from a checkpoint, up to `upto`)."""
    fd = _fsutil.open_file(path, os.O_RDONLY)
    try:
        fold, scan, _resumed = _fold_fd(fd, path, checkpoint, upto)
        return fold, scan
    finally:
        os.close(fd)


def _fold_fd(
    fd: int, path: str, checkpoint: TraceFold | None, upto: int | None
) -> tuple[TraceFold, ScanState, bool]:
    """Fold from the checkpoint if the WAL holds, whole and intact, the last record it folded
    (else it describes another WAL, or one that lost its unsynced tail after the JSON was
    written, and the fold starts over). The bool says whether the checkpoint matched the WAL."""
    salt = read_header(fd, path)
    matched = (
        checkpoint is not None
        and checkpoint.salt == salt
        and checkpoint.last_record >= FILE_HEADER_SIZE
        and record_at(fd, checkpoint.last_record, salt) == (checkpoint.seq, checkpoint.offset)
    )
    if matched:
        assert checkpoint is not None
        try:
            fold, scan = _fold_from(fd, path, salt, checkpoint, upto)
            return fold, scan, True
        except (CorruptWALError, KeyError, TypeError, ValueError) as exc:
            log.info("walspan: %s: checkpoint unusable (%s); folding from the start", path, exc)
    fold, scan = _fold_from(fd, path, salt, TraceFold(), upto)
    return fold, scan, matched


def _fold_from(fd: int, path: str, salt: int, fold: TraceFold, upto: int | None) -> tuple[TraceFold, ScanState]:
    scan = ScanState(path)
    start = fold.offset if fold.offset >= FILE_HEADER_SIZE else FILE_HEADER_SIZE
    fold.salt = salt
    apply = fold.apply
    end, seq, last = start, fold.seq, fold.last_record
    for offset, rtype, rseq, payload in iter_records(fd, scan, start=start, start_seq=fold.seq, salt=salt):
        if upto is not None and offset >= upto:
            break
        try:
            body = unpack_payload(payload)  # type: ignore[arg-type]
        except Exception as exc:  # a record with a valid checksum whose payload is not ours
            raise CorruptWALError(path, offset, f"record payload does not decode: {exc}") from None
        if not isinstance(body, dict):
            raise CorruptWALError(path, offset, "record payload is not a map")
        try:
            apply(rtype, body)
        except (KeyError, TypeError, AttributeError) as exc:
            raise CorruptWALError(path, offset, f"record of type {rtype} is malformed: {exc!r}") from None
        end, seq, last = scan.end, rseq, offset
    fold.offset, fold.seq, fold.last_record = end, seq, last
    if fold.trace_id is None:
        # The trace start is written atomically with the file (create_wal), so a WAL without a
        # whole one was damaged, not torn by a crash: never fold it into an anonymous trace.
        raise CorruptWALError(path, FILE_HEADER_SIZE, "no trace start record")
    return fold, scan


def read_json(path: str) -> dict[str, Any] | None:
    """The canonical JSON at path, or None if it is missing or unreadable (it is only a cache)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("walspan: ignoring unreadable trace file %s: %s", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def compact(store_dir: str, stem: str) -> tuple[str, bool]:
    """Bring S.json up to the WAL's valid end. Returns (json path, whether it was rewritten)."""
    wal_path = os.path.join(store_dir, stem + ".wal")
    json_path = os.path.join(store_dir, stem + ".json")
    if not os.path.exists(wal_path):
        raise FileNotFoundError(2, "no WAL", wal_path)
    os.makedirs(internal_dir(store_dir), mode=_fsutil.DIR_MODE, exist_ok=True)
    lock_fd = _fsutil.open_file(os.path.join(internal_dir(store_dir), stem + ".compact"), os.O_RDWR | os.O_CREAT)
    try:
        _locking.lock(lock_fd)
        existing = read_json(json_path)
        checkpoint = None
        if existing is not None:
            try:
                checkpoint = TraceFold.from_dict(existing)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("walspan: %s is not a usable checkpoint (%r); rebuilding it", json_path, exc)
        old_seq = checkpoint.seq if checkpoint is not None else None  # before the fold moves it
        wal_fd = _fsutil.open_file(wal_path, os.O_RDWR)
        try:
            fold, _scan, matched = _fold_fd(wal_fd, wal_path, checkpoint, None)
            if matched and old_seq is not None and old_seq >= fold.seq:
                _ensure_summary(store_dir, stem, fold)
                return json_path, False  # monotonic: the JSON already reflects at least this much
            if checkpoint is not None and not matched:
                # The JSON reflects records this WAL does not hold (another WAL under the same
                # name, or damage): the WAL is the truth, so it is rebuilt, whatever it claims.
                log.warning("walspan: %s does not match %s; rebuilding it from the WAL", json_path, wal_path)
            # The WAL must be durable up to what the JSON shows, or a power loss could take back
            # records a durable JSON still shows. In durable mode the appenders' flushes already
            # covered it (durable_end); in process mode this is the flush.
            if durable_end_of(store_dir, stem, fold.salt) < fold.offset:
                _fsutil.sync_data(wal_fd, wal_path)
        finally:
            os.close(wal_fd)
        data = dumps(fold.to_dict())
        hook = before_rename
        _fsutil.atomic_replace(json_path, data, before_rename=(lambda: hook(json_path)) if hook else None)
        _summary.write_summary(store_dir, stem, fold)  # a cache for `ls`, after the JSON it describes
        return json_path, True
    finally:
        # Unlock explicitly: a fork() child (another thread forked meanwhile) holds a copy of
        # this descriptor, and closing ours alone would leave the lock held for its lifetime.
        try:
            _locking.unlock(lock_fd)
        finally:
            os.close(lock_fd)


# -- the summary side file (walspan/_summary.py) ----------------------------------------------


def _ensure_summary(store_dir: str, stem: str, fold: TraceFold) -> None:
    """A JSON already up to date may predate summaries: write one if it is missing."""
    if not os.path.exists(_summary.summary_path(store_dir, stem)):
        _summary.write_summary(store_dir, stem, fold)
