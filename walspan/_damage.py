"""The damage phase of `walspan stress`: damaged copies of the run's WALs, and every reader's
verdict on each.

walspan's first promise is that what is lost to damage is reported, never silently cut. After a
stress run's checks, this phase takes copies of its WALs (in a scratch directory; the originals
are never touched), each cut at a record boundary to at most COPY_LIMIT bytes so the phase
takes seconds, and in each copy injects one kind of damage (seeded):

    bitflip         one bit flipped at a random offset
    zero_sector     a 512-byte sector (aligned, as a disk writes them) zeroed
    garbage_sector  a 512-byte sector overwritten with random bytes
    cut             the file cut at a random offset

Every reader then gets its own copy of the damaged file, alone in a fresh store directory (as
if the file were all that survived), and gives a verdict: the valid records it sees (count and
end offset), or the offset of the CorruptWALError it raises. The readers: Store.load,
Store.verify, Store.open (process mode, no hooks), Store.recover, Store.compact, Store.repair;
for those that write (open, recover, repair), the records they keep are the leading records of
the file afterwards that are identical to the undamaged copy's.

The verdicts must agree, and be right. Where the damage starts is known (the first byte that
changed), so the expected stop is the start of the record holding it (offset 0 for the file
header):
- torn: every reader sees the same records, ending at the expected stop, and no intact record
  of the undamaged copy lies after the damage (else the readers agree on a silent loss);
- corrupt: every reader reports corruption at the expected stop; then `repair` must get out:
  it moves every byte from there on, unchanged, to `<wal>.broken-<offset>`, and every reader
  run on copies of the repaired file sees the records before the damage, identical to the
  undamaged copy's, and nothing else.
Anything else fails the run, naming each reader and what it said.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("bitflip", "zero_sector", "garbage_sector", "cut")
SECTOR = 512
COPY_LIMIT = 256 << 10
DEFAULT_TRIALS = 24
# outcomes counted in the figures, in report order
OUTCOMES = ("torn", "corrupt_repaired", "disagreement", "wrong_offset", "silent_loss", "repair_failed")
_OK_OUTCOMES = ("torn", "corrupt_repaired")


@dataclass(frozen=True)
class Record:
    offset: int
    end: int
    rtype: int
    seq: int
    payload: bytes


@dataclass(frozen=True)
class Verdict:
    """What one reader made of a file: records seen (and where they end), or corruption at an
    offset, or something else raised (always a failure)."""

    records: int | None = None
    end: int | None = None
    corrupt_at: int | None = None
    error: str | None = None

    def __str__(self) -> str:
        if self.error is not None:
            return f"error: {self.error}"
        if self.corrupt_at is not None:
            return f"corrupt at {self.corrupt_at}"
        return f"{self.records} records to offset {self.end}"


# A reader: (path of its own copy of the WAL, alone in a store directory, session id, the
# undamaged copy's records) -> its verdict. It may change the file and the directory.
Reader = Callable[[str, str, list[Record]], Verdict]


def read_records(path: str) -> list[Record]:
    """The valid records of a WAL (CorruptWALError if it is corrupt)."""
    from ._format import RECORD_HEADER_SIZE
    from ._reader import ScanState, iter_records

    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        for offset, rtype, seq, payload in iter_records(fd, ScanState(path)):
            assert payload is not None
            out.append(Record(offset, offset + RECORD_HEADER_SIZE + len(payload), rtype, seq, bytes(payload)))
        return out
    finally:
        os.close(fd)


# == damage ===================================================================================


def inject(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """`data` with one damage of `kind` (see the module docstring), and a description of it."""
    size = len(data)
    if kind == "bitflip":
        offset, bit = rng.randrange(size), rng.randrange(8)
        out = bytearray(data)
        out[offset] ^= 1 << bit
        return bytes(out), f"bit {bit} of byte {offset} flipped"
    if kind in ("zero_sector", "garbage_sector"):
        start = SECTOR * rng.randrange((size + SECTOR - 1) // SECTOR)
        n = min(SECTOR, size - start)
        fill = bytes(n) if kind == "zero_sector" else rng.randbytes(n)
        what = "zeroed" if kind == "zero_sector" else "overwritten with random bytes"
        return data[:start] + fill + data[start + n :], f"sector at {start} ({n} bytes) {what}"
    if kind == "cut":
        at = rng.randrange(size)
        return data[:at], f"cut at {at} of {size} bytes"
    raise ValueError(f"unknown damage kind {kind!r}")


def first_change(original: bytes, damaged: bytes) -> int | None:
    """Offset of the first byte that differs (a cut differs from where it cut), or None."""
    n = min(len(original), len(damaged))
    for i in range(0, n, 4096):  # compare in blocks: most of a copy is untouched
        j = min(i + 4096, n)
        if original[i:j] != damaged[i:j]:
            return next(k for k in range(i, j) if original[k] != damaged[k])
    return None if len(original) == len(damaged) else n


def last_change(original: bytes, damaged: bytes) -> int:
    """Offset just past the last byte that differs (the end of the original for a cut)."""
    if len(damaged) != len(original):
        return len(original)
    i = len(original)
    while i > 0 and original[i - 1] == damaged[i - 1]:
        i -= 1
    return i


def expected_stop(records: list[Record], start: int) -> int:
    """Where every reader must stop for damage starting at `start`: the start of the record
    holding that byte (0 inside the file header)."""
    from ._format import FILE_HEADER_SIZE

    if start < FILE_HEADER_SIZE:
        return 0
    for r in records:
        if r.offset <= start < r.end:
            return r.offset
    return records[-1].end  # past the last record: nothing of it was damaged


# == the readers ==============================================================================


def _store(path: str, **kwargs: Any) -> Any:
    from ._store import Store

    return Store(os.path.dirname(path), install_hooks=False, create=False, **kwargs)


def kept(path: str, original: list[Record]) -> Verdict:
    """For readers that write: the leading records of the file now that are the undamaged
    copy's own (what the reader kept of them)."""
    from .errors import CorruptWALError

    try:
        now = read_records(path)
    except CorruptWALError as exc:
        return Verdict(error=f"accepted the file but left it corrupt at {exc.offset}")
    n = 0
    while n < len(now) and n < len(original) and now[n] == original[n]:
        n += 1
    return Verdict(records=n, end=original[n - 1].end if n else None)


def _read_load(path: str, sid: str, original: list[Record]) -> Verdict:
    wal = _store(path).load(sid)["wal"]
    return Verdict(records=wal["seq"], end=wal["offset"])


def _read_verify(path: str, sid: str, original: list[Record]) -> Verdict:
    (check,) = [f for f in _store(path).verify().files if os.path.samefile(f.wal, path)]
    if check.errors:
        m = re.search(r"corrupt at byte offset (\d+)", check.errors[0])
        return Verdict(corrupt_at=int(m.group(1))) if m else Verdict(error="; ".join(check.errors))
    return Verdict(records=check.records, end=check.valid_end)


def _read_open(path: str, sid: str, original: list[Record]) -> Verdict:
    from .errors import TraceClosedError

    store = _store(path, durability="process")
    try:
        store.open(sid)
    except TraceClosedError:
        pass  # an ended trace: opened, read and refused, as it should be
    finally:
        store.close()
    return kept(path, original)


def _read_recover(path: str, sid: str, original: list[Record]) -> Verdict:
    store = _store(path, durability="process")
    try:
        report = store.recover()
    finally:
        store.close()
    if report.corrupt:
        return Verdict(corrupt_at=report.corrupt[0].offset)
    if report.unreadable:
        return Verdict(error=str(report.unreadable[0]))
    return kept(path, original)


def _read_compact(path: str, sid: str, original: list[Record]) -> Verdict:
    with open(_store(path, durability="process").compact(sid), "rb") as f:
        wal = json.loads(f.read())["wal"]
    return Verdict(records=wal["seq"], end=wal["offset"])


def _read_repair(path: str, sid: str, original: list[Record]) -> Verdict:
    store = _store(path, durability="process")
    try:
        result = store.repair(sid)
    finally:
        store.close()
    if result is not None and result.action in ("cut", "set_aside"):
        return Verdict(corrupt_at=result.offset)
    return kept(path, original)  # sound, or a torn tail it truncated as an append would


READERS: dict[str, Reader] = {
    "load": _read_load,
    "verify": _read_verify,
    "open": _read_open,
    "recover": _read_recover,
    "compact": _read_compact,
    "repair": _read_repair,
}


def _run_reader(reader: Reader, path: str, sid: str, original: list[Record]) -> Verdict:
    from .errors import CorruptWALError

    try:
        return reader(path, sid, original)
    except CorruptWALError as exc:
        return Verdict(corrupt_at=exc.offset)
    except Exception as exc:  # noqa: BLE001 - any other failure of a reader is a verdict to report
        return Verdict(error=f"{type(exc).__name__}: {exc}")


# == a trial ==================================================================================


@dataclass
class Trial:
    wal: str
    kind: str
    damage: str
    outcome: str = ""
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    after_repair: dict[str, Verdict] = field(default_factory=dict)
    problem: str = ""

    def describe(self) -> str:
        said = "; ".join(f"{name}: {v}" for name, v in self.verdicts.items())
        text = f"damage ({self.kind}) in a copy of {os.path.basename(self.wal)}, {self.damage}: {self.problem} [{said}]"
        if self.after_repair:
            text += " after repair [" + "; ".join(f"{n}: {v}" for n, v in self.after_repair.items()) + "]"
        return text


def _verdicts(readers: dict[str, Reader], data: bytes, name: str, sid: str, original: list[Record], scratch: str) -> tuple[dict[str, Verdict], dict[str, str]]:
    """Each reader on its own copy of `data`; returns the verdicts and each reader's WAL path."""
    out, paths = {}, {}
    for rname, reader in readers.items():
        d = os.path.join(scratch, rname)
        os.makedirs(d)
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(data)
        out[rname] = _run_reader(reader, path, sid, original)
        paths[rname] = path
    return out, paths


def run_trial(
    base: bytes,
    original: list[Record],
    name: str,
    sid: str,
    kind: str,
    rng: random.Random,
    scratch: str,
    readers: dict[str, Reader],
) -> Trial:
    """One damage of `kind` in `base` (an undamaged WAL named `name`, holding the records
    `original`), judged by every reader."""
    damaged, desc = inject(base, kind, rng)
    t = Trial(os.path.join(scratch, name), kind, desc)
    start = first_change(base, damaged)
    assert start is not None  # every kind changes at least one byte
    stop = expected_stop(original, start)
    t.verdicts, paths = _verdicts(readers, damaged, name, sid, original, os.path.join(scratch, "damaged"))
    distinct = set(t.verdicts.values())
    if len(distinct) != 1:
        t.outcome, t.problem = "disagreement", "readers disagree"
        return t
    (v,) = distinct
    if v.error is not None:
        t.outcome, t.problem = "disagreement", "every reader failed"
        return t
    at = v.corrupt_at if v.corrupt_at is not None else v.end
    if at != stop:
        t.outcome, t.problem = "wrong_offset", f"damage starts at byte {start} (record at {stop}), readers stop at {at}"
        return t
    if v.corrupt_at is None:
        damage_end = last_change(base, damaged)
        intact_after = [r for r in original if r.offset >= damage_end]
        if intact_after:
            t.outcome = "silent_loss"
            t.problem = (
                f"taken for a torn tail, but {len(intact_after)} intact record(s) follow the damage "
                f"(seq {intact_after[0].seq} at {intact_after[0].offset}): silently cut"
            )
        else:
            t.outcome = "torn"
        return t
    # every reader says corrupt at `stop`: repair must get out, keeping every record before it
    keep = [r for r in original if r.end <= stop]
    if not keep and paths.get("repair") is not None:
        # nothing before the damage to keep: repair moves the whole file aside, unchanged
        problem = _check_set_aside(paths["repair"], damaged)
        t.outcome, t.problem = ("repair_failed", problem) if problem else ("corrupt_repaired", "")
        return t
    problem = _check_repair(paths.get("repair"), damaged, stop)
    if problem is None:
        with open(paths["repair"], "rb") as f:
            repaired = f.read()
        t.after_repair, _ = _verdicts(readers, repaired, name, sid, original, os.path.join(scratch, "repaired"))
        want = Verdict(records=len(keep), end=keep[-1].end if keep else None)
        wrong = {n: v for n, v in t.after_repair.items() if v != want}
        if wrong:
            problem = f"after repair, expected {want} from every reader"
    if problem is not None:
        t.outcome, t.problem = "repair_failed", problem
    else:
        t.outcome = "corrupt_repaired"
    return t


def _check_set_aside(repaired_path: str, damaged: bytes) -> str | None:
    aside = f"{repaired_path}.broken-0"
    if os.path.exists(repaired_path):
        return "repair left a WAL with nothing to keep in place"
    try:
        with open(aside, "rb") as f:
            moved = f.read()
    except OSError as exc:
        return f"repair left no {os.path.basename(aside)}: {exc.strerror or exc}"
    return None if moved == damaged else f"{os.path.basename(aside)} does not hold the damaged file unchanged"


def _check_repair(repaired_path: str | None, damaged: bytes, stop: int) -> str | None:
    """The repair reader's copy: the evidence moved aside intact; None if all is well."""
    if repaired_path is None:
        return "no repair reader to get out of the corruption"
    broken = f"{repaired_path}.broken-{stop}"
    try:
        with open(broken, "rb") as f:
            moved = f.read()
    except OSError as exc:
        return f"repair left no {os.path.basename(broken)}: {exc.strerror or exc}"
    if moved != damaged[stop:]:
        return f"{os.path.basename(broken)} does not hold the {len(damaged) - stop} bytes from {stop} on, unchanged"
    return None


# == the phase ================================================================================


@dataclass
class DamageFigures:
    trials: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def bounded_copy(wal: str, limit: int = COPY_LIMIT) -> tuple[bytes, list[Record]]:
    """The WAL's first bytes up to its last record boundary within `limit` (at least its first
    two records: the ones it is created with), and those records."""
    records = read_records(wal)
    keep = [r for r in records if r.end <= limit] or records[:2]
    if len(keep) < 2:
        keep = records[:2]
    with open(wal, "rb") as f:
        data = f.read(keep[-1].end)
    return data, keep


def damage_phase(
    wals: list[str],
    scratch: str,
    *,
    seed: int,
    trials: int,
    readers: dict[str, Reader] | None = None,
    limit: int = COPY_LIMIT,
) -> DamageFigures:
    """`trials` damaged copies of the given WALs (kinds in turn, WAL and place from `seed`),
    judged by every reader; copies live under `scratch` (removed for trials that pass, kept for
    inspection otherwise)."""
    readers = READERS if readers is None else readers
    figs = DamageFigures(kinds=dict.fromkeys(KINDS, 0))
    t0 = time.monotonic()
    # the readers log each torn tail they truncate: expected here, and not the run's news
    log = logging.getLogger("walspan")
    was_disabled, log.disabled = log.disabled, True
    try:
        _trials(wals, scratch, seed, trials, readers, limit, figs)
    finally:
        log.disabled = was_disabled
    figs.seconds = time.monotonic() - t0
    return figs


def _trials(
    wals: list[str], scratch: str, seed: int, trials: int, readers: dict[str, Reader], limit: int, figs: DamageFigures
) -> None:
    from ._names import decode_stem

    rng = random.Random(seed)
    bases: dict[str, tuple[str, bytes, list[Record]]] = {}
    for wal in sorted(wals):
        sid = decode_stem(os.path.basename(wal)[:-4])
        if sid is None:
            raise ValueError(f"{wal}: not a WAL of a plainly named session")
        bases[wal] = (sid, *bounded_copy(wal, limit))
    if not bases:
        return
    order = sorted(bases)
    for k in range(trials):
        kind = KINDS[k % len(KINDS)]
        wal = rng.choice(order)
        sid, base, original = bases[wal]
        trial_dir = os.path.join(scratch, f"trial-{k}-{kind}")
        os.makedirs(trial_dir)
        t = run_trial(base, original, os.path.basename(wal), sid, kind, rng, trial_dir, readers)
        figs.trials += 1
        figs.kinds[kind] += 1
        figs.outcomes[t.outcome] += 1
        if t.outcome in _OK_OUTCOMES:
            shutil.rmtree(trial_dir, ignore_errors=True)
        else:
            figs.failures.append(f"{t.describe()} (copies kept in {trial_dir})")
