"""The damage phase of `walspan stress` (walspan/_damage.py): the damage it injects, and the
comparison of the readers' verdicts, shown to work with fake readers (a correct one, and ones
that disagree, cut silently, repair badly), then run with the real readers.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import walspan
from walspan import _damage
from walspan._damage import KINDS, SECTOR, Record, Verdict, damage_phase, inject
from walspan._format import FILE_HEADER_SIZE

# -- the damage itself ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=5000), seed=st.integers(0, 2**32), kind=st.sampled_from(KINDS))
def test_each_kind_of_damage_is_what_it_says(data: bytes, seed: int, kind: str) -> None:
    """A bit flip changes exactly one bit; a sector damage changes bytes only inside one
    aligned 512-byte sector (zeros, or random bytes) and keeps the size; a cut leaves a strict
    prefix. The same seed gives the same damage."""
    out, desc = inject(data, kind, random.Random(seed))
    assert (out, desc) == inject(data, kind, random.Random(seed))
    if kind == "cut":
        assert len(out) < len(data) and data.startswith(out)
        return
    assert len(out) == len(data)
    diff = [i for i in range(len(data)) if data[i] != out[i]]
    if kind == "bitflip":
        assert len(diff) == 1 and bin(data[diff[0]] ^ out[diff[0]]).count("1") == 1
        return
    start = int(desc.split()[2])
    assert start % SECTOR == 0 and start < len(data)
    assert all(start <= i < start + SECTOR for i in diff)
    if kind == "zero_sector":
        assert set(out[start : start + SECTOR]) <= {0}


# -- fake readers: the comparison logic on its own -------------------------------------------


@pytest.fixture(scope="module")
def wal(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A realistic small WAL: 400 spans with events and inputs of 0-3000 bytes (~500 KB)."""
    d = tmp_path_factory.mktemp("wal")
    store = walspan.Store(d, durability="process", install_hooks=False)
    t = store.open("damage-me")
    for i in range(400):
        with t.span("turn", attributes={"i": i}, input="x" * (i * 7 % 3000)) as span:
            span.add_event("e", {"i": i})
    store.close()
    return str(d / "damage-me.wal")


def _oracle(wal: str) -> Callable[[str, str, list[Record]], Verdict]:
    """A reader that is right by construction: it compares the file with the undamaged bytes."""
    base = Path(wal).read_bytes()[: _damage.bounded_copy(wal)[1][-1].end]

    def judge(path: str, sid: str, original: list[Record]) -> Verdict:
        data = Path(path).read_bytes()
        if data[:FILE_HEADER_SIZE] != base[:FILE_HEADER_SIZE]:
            return Verdict(corrupt_at=0)
        intact = [data[r.offset : r.end] == base[r.offset : r.end] for r in original]
        k = intact.index(False) if False in intact else len(original)
        if any(intact[k:]):
            return Verdict(corrupt_at=original[k].offset)
        return Verdict(records=k, end=original[k - 1].end if k else None)

    return judge


def _oracle_repair(
    wal: str, early: bool = False, evidence: str = "whole"
) -> Callable[[str, str, list[Record]], Verdict]:
    """The oracle's verdict; on corruption it repairs as walspan must (evidence aside, cut),
    or badly: cutting one record too early, keeping no evidence, or only part of it."""
    judge = _oracle(wal)

    def repair(path: str, sid: str, original: list[Record]) -> Verdict:
        v = judge(path, sid, original)
        if v.corrupt_at is not None:
            data = Path(path).read_bytes()
            if evidence != "none":
                moved = data[v.corrupt_at :] if evidence == "whole" else data[v.corrupt_at : -1]
                Path(f"{path}.broken-{v.corrupt_at}").write_bytes(moved)
            cut = v.corrupt_at
            if early:
                cut = max(r.offset for r in original if r.end <= v.corrupt_at)
            os.truncate(path, cut)
        return v

    return repair


def _run(wal: str, tmp_path: Path, readers: dict[str, Callable[[str, str, list[Record]], Verdict]], trials: int = 16):
    return damage_phase([wal], str(tmp_path / "scratch"), seed=7, trials=trials, readers=readers)


def test_agreeing_correct_readers_pass_and_corruption_is_repaired(wal: str, tmp_path: Path) -> None:
    """Readers that are right and agree pass every trial: cuts are torn tails, mid-file damage
    is corruption that the repair gets out of (evidence kept, every record before it kept);
    every kind ran, and the scratch copies of passing trials are removed."""
    oracle = _oracle(wal)
    figs = _run(wal, tmp_path, {"load": oracle, "verify": oracle, "repair": _oracle_repair(wal)})
    assert figs.ok, figs.failures
    assert figs.trials == 16 and figs.kinds == dict.fromkeys(KINDS, 4)
    assert figs.outcomes["torn"] >= 4 and figs.outcomes["corrupt_repaired"] >= 1
    assert figs.outcomes["torn"] + figs.outcomes["corrupt_repaired"] == 16
    assert os.listdir(tmp_path / "scratch") == []


def test_a_reader_that_disagrees_fails_the_run_naming_what_each_said(wal: str, tmp_path: Path) -> None:
    """One reader off by one record (or one byte for corruption) makes every trial a
    disagreement; each failure names that reader's verdict beside the others'."""
    oracle = _oracle(wal)

    def liar(path: str, sid: str, original: list[Record]) -> Verdict:
        v = oracle(path, sid, original)
        if v.corrupt_at is not None:
            return Verdict(corrupt_at=v.corrupt_at + 1)
        return Verdict(records=(v.records or 0) - 1, end=v.end)

    figs = _run(wal, tmp_path, {"load": oracle, "liar": liar, "repair": _oracle_repair(wal)}, trials=8)
    assert not figs.ok
    assert figs.outcomes["disagreement"] == 8 and len(figs.failures) == 8
    for msg in figs.failures:
        assert "readers disagree" in msg and "liar: " in msg and "load: " in msg
    assert len(os.listdir(tmp_path / "scratch")) == 8  # copies kept for inspection


def test_agreeing_on_a_torn_tail_before_intact_records_is_a_silent_loss(wal: str, tmp_path: Path) -> None:
    """Readers that all take mid-file damage for a torn tail agree, yet lose the intact records
    after it: that is counted as a silent loss and fails the run."""
    oracle = _oracle(wal)

    def cuts_at_damage(path: str, sid: str, original: list[Record]) -> Verdict:
        v = oracle(path, sid, original)
        if v.corrupt_at is not None and v.corrupt_at > 0:
            k = next(i for i, r in enumerate(original) if r.offset == v.corrupt_at)
            return Verdict(records=k, end=original[k - 1].end)
        return v

    figs = _run(wal, tmp_path, {"load": cuts_at_damage, "verify": cuts_at_damage})
    assert figs.outcomes["silent_loss"] >= 1
    assert not figs.ok
    assert any("silently cut" in m and "intact record(s) follow the damage" in m for m in figs.failures)


def test_corruption_at_the_wrong_offset_is_flagged(wal: str, tmp_path: Path) -> None:
    """Readers agreeing on corruption, but not where the damage starts, fail the run."""
    oracle = _oracle(wal)

    def off(path: str, sid: str, original: list[Record]) -> Verdict:
        v = oracle(path, sid, original)
        return Verdict(corrupt_at=v.corrupt_at + 20) if v.corrupt_at else v

    figs = _run(wal, tmp_path, {"load": off, "verify": off})
    assert figs.outcomes["wrong_offset"] >= 1 and not figs.ok
    assert any("readers stop at" in m for m in figs.failures)


@pytest.mark.parametrize(
    "early, evidence, needle",
    [(True, "whole", "after repair"), (False, "none", "left no"), (False, "partial", "unchanged")],
)
def test_a_repair_that_loses_records_or_evidence_fails(
    wal: str, tmp_path: Path, early: bool, evidence: str, needle: str
) -> None:
    """A repair that cuts one record before the damage (a record lost), or that keeps no
    `.broken-<offset>` copy of what it moved, or not all of it, is a failed repair."""
    oracle = _oracle(wal)
    figs = _run(wal, tmp_path, {"load": oracle, "repair": _oracle_repair(wal, early=early, evidence=evidence)})
    assert figs.outcomes["repair_failed"] >= 1
    assert figs.outcomes["corrupt_repaired"] == 0
    assert not figs.ok and any(needle in m for m in figs.failures)


# -- the real readers ------------------------------------------------------------------------


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_the_phase_never_touches_the_originals(wal: str, tmp_path: Path) -> None:
    """The real readers work on copies only: the WAL judged, and its directory, are unchanged
    (no .walspan state, no JSON, no .broken file appear beside it), whatever the verdicts."""
    before = (_sha(wal), sorted(os.listdir(os.path.dirname(wal))))
    figs = damage_phase([wal], str(tmp_path / "scratch"), seed=3, trials=8)
    assert figs.trials == 8 and sum(figs.outcomes.values()) == 8
    assert (_sha(wal), sorted(os.listdir(os.path.dirname(wal)))) == before


def test_real_readers_give_one_right_verdict_on_every_damaged_copy(wal: str, tmp_path: Path) -> None:
    """load, verify, open, recover, compact and repair agree on every damaged copy of a
    500 KB WAL (16 trials, all four kinds) and are right: the same records for a torn tail,
    or corruption where the damage starts, which repair gets out of keeping every record
    before it."""
    figs = damage_phase([wal], str(tmp_path / "scratch"), seed=11, trials=16)
    assert figs.ok, "\n".join(figs.failures)
