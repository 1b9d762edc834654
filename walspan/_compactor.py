"""Folding a WAL, and materialising the canonical JSON trace from it.

Compaction of one session is serialised by its own lock (.walspan/S.compact), never by the
append lock: appends never wait for it. It is monotonic: the JSON names the WAL position it
reflects (wal.offset / wal.seq), and a compaction never replaces a JSON with one reflecting
less. It is incremental: the existing JSON is the checkpoint of the fold, so only the k new
records are decoded and folded. Every record's framing is still read and checked (one pass at
checksum speed), so that compaction gives the same verdict about damage as every other reader.
The JSON is a cache: deleting it loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _fsutil, _locking, _summary
from ._fold import TraceFold, dumps
from ._format import FILE_HEADER_SIZE, unpack_payload, wal_keys
from ._reader import ScanState, iter_records, read_header, record_at
from ._shm import read_durable_end, read_witness
from ._wal import internal_dir
from .errors import CorruptWALError

log = logging.getLogger("walspan")

#: Test hook: called between the tmp file's fsync and the rename (used to widen the M1 window).
before_rename: Callable[[str], None] | None = None

_NO_PAYLOADS: frozenset[int] = frozenset()


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
    """Fold from the checkpoint if the WAL holds, whole and intact, the very record it folded
    last (same WAL id, offset, seq and header checksum: after a cut, offsets and seqs are
    reused, checksums are not); else the JSON describes another WAL, or records this one lost,
    and the fold starts over. The bool says whether the checkpoint matched the WAL.

    Either way every record of the log is read and checked, so that compaction gives the same
    verdict about damage as every other reader; only the records after the checkpoint are
    decoded and folded."""
    salt = read_header(fd, path)
    keys = wal_keys(salt)
    known_whole = read_witness(path, salt, os.fstat(fd).st_size)
    matched = (
        checkpoint is not None
        and checkpoint.wal_id == keys.wal_id
        and checkpoint.last_record >= FILE_HEADER_SIZE
        and record_at(fd, checkpoint.last_record, keys) == (checkpoint.seq, checkpoint.offset, checkpoint.last_crc)
    )
    if matched:
        assert checkpoint is not None
        _check_framing(fd, path, salt, checkpoint.offset, known_whole)
        try:
            fold, scan = _fold_from(fd, path, salt, checkpoint, upto, known_whole)
            return fold, scan, True
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.info("walspan: %s: checkpoint unusable (%s); folding from the start", path, exc)
    fold, scan = _fold_from(fd, path, salt, TraceFold(), upto, known_whole)
    return fold, scan, matched


def _check_framing(fd: int, path: str, salt: int, upto: int, known_whole: int) -> None:
    """Read the records below `upto` for their framing only (checksums, sequence)."""
    scan = ScanState(path)
    for _rec in iter_records(fd, scan, salt=salt, decode_types=_NO_PAYLOADS, durable_end=known_whole):
        if scan.end >= upto:
            return


def _fold_from(
    fd: int, path: str, salt: int, fold: TraceFold, upto: int | None, known_whole: int
) -> tuple[TraceFold, ScanState]:
    scan = ScanState(path)
    start = fold.offset if fold.offset >= FILE_HEADER_SIZE else FILE_HEADER_SIZE
    fold.wal_id = wal_keys(salt).wal_id
    apply = fold.apply
    end, seq, last, last_crc = start, fold.seq, fold.last_record, fold.last_crc
    for offset, rtype, rseq, payload in iter_records(
        fd, scan, start=start, start_seq=fold.seq, salt=salt, durable_end=known_whole
    ):
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
        end, seq, last, last_crc = scan.end, rseq, offset, scan.last_crc
    fold.offset, fold.seq, fold.last_record, fold.last_crc = end, seq, last, last_crc
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


@dataclass
class Compaction:
    """What compact() did: the JSON's path, whether it was rewritten, and where a previous
    JSON that showed records the WAL no longer holds was kept (evidence, never deleted)."""

    path: str
    rewritten: bool
    set_aside: str | None = None


def compact(store_dir: str, stem: str) -> Compaction:
    """Bring S.json up to the WAL's valid end."""
    wal_path = os.path.join(store_dir, stem + ".wal")
    json_path = os.path.join(store_dir, stem + ".json")
    if not os.path.exists(wal_path):
        raise FileNotFoundError(2, "no WAL", wal_path)
    os.makedirs(internal_dir(store_dir), mode=_fsutil.DIR_MODE, exist_ok=True)
    lock_fd = _fsutil.open_file(os.path.join(internal_dir(store_dir), stem + ".compact"), os.O_RDWR | os.O_CREAT)
    try:
        _locking.lock(lock_fd)
        _fsutil.faults("compact_locked", json_path)
        existing, present = _read_json_doc(json_path)
        checkpoint = None
        if existing is not None:
            try:
                checkpoint = TraceFold.from_dict(existing)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("walspan: %s is not a usable checkpoint (%r)", json_path, exc)
        old_seq = checkpoint.seq if checkpoint is not None else None  # before the fold moves it
        wal_fd = _fsutil.open_file(wal_path, os.O_RDWR)
        try:
            fold, _scan, matched = _fold_fd(wal_fd, wal_path, checkpoint, None)
            if matched and old_seq is not None and old_seq >= fold.seq:
                _ensure_summary(store_dir, stem, fold)
                return Compaction(json_path, False)  # monotonic: the JSON already reflects at least this much
            # The WAL must be durable up to what the JSON shows, or a power loss could take back
            # records a durable JSON still shows. In durable mode the appenders' flushes already
            # covered it (durable_end); in process mode this is the flush.
            if read_durable_end(wal_path, read_header(wal_fd, wal_path), os.fstat(wal_fd).st_size) < fold.offset:
                _fsutil.sync_data(wal_fd, wal_path)
        finally:
            os.close(wal_fd)
        aside = None
        if present and not matched:
            # The JSON shows records this WAL does not hold (they were lost to damage or a cut,
            # or it describes another WAL under the same name), or it does not parse. The WAL is
            # the truth and the JSON is rebuilt from it, but the old one is evidence: keep it.
            aside = _keep_aside(json_path, checkpoint)
            log.warning(
                "walspan: %s does not match %s (it shows records the WAL does not hold); kept it as %s "
                "and rebuilt it from the WAL", json_path, wal_path, aside,
            )
        data = dumps(fold.to_dict())
        hook = before_rename
        _fsutil.atomic_replace(json_path, data, before_rename=(lambda: hook(json_path)) if hook else None)
        _summary.write_summary(store_dir, stem, fold)  # a cache for `ls`, after the JSON it describes
        return Compaction(json_path, True, aside)
    finally:
        # Unlock explicitly: a fork() child (another thread forked meanwhile) holds a copy of
        # this descriptor, and closing ours alone would leave the lock held for its lifetime.
        try:
            _locking.unlock(lock_fd)
        finally:
            os.close(lock_fd)


def _read_json_doc(path: str) -> tuple[dict[str, Any] | None, bool]:
    """(the parsed JSON or None, whether a file is there at all)."""
    if not os.path.lexists(path):
        return None, False
    return read_json(path), True


def _keep_aside(json_path: str, checkpoint: TraceFold | None) -> str:
    """Give the current JSON a second name that nothing overwrites (a hard link: the rename
    of the rebuilt JSON then replaces only the first name); returns that name."""
    base = f"{json_path}.stale-{checkpoint.seq if checkpoint is not None else 'unreadable'}"
    for n in range(1000):
        name = base if n == 0 else f"{base}.{n}"
        try:
            os.link(json_path, name)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(17, "too many stale copies", base)  # pragma: no cover


# -- the summary side file (walspan/_summary.py) ----------------------------------------------


def _ensure_summary(store_dir: str, stem: str, fold: TraceFold) -> None:
    """A JSON already up to date may predate summaries: write one if it is missing."""
    if not os.path.exists(_summary.summary_path(store_dir, stem)):
        _summary.write_summary(store_dir, stem, fold)
