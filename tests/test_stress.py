"""`walspan stress`: a short run end to end, its plan, its checker, and its argument errors.

The long runs (default arguments, `scripts/stress.py` soaks) are not part of the suite; these
tests pin that the command runs, that its figures mean what they say, and that its checker
fails when an acknowledged event is missing or duplicated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import walspan
from walspan._stress import OP_KEY, Figures, WriterPlan, WriterState, check, damage, make_plan


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "walspan.cli", "stress", *args], capture_output=True, text=True, timeout=timeout,
        check=False,
    )


def test_short_stress_run_passes_and_reports_figures(tmp_path: Path) -> None:
    """A short durable run (4 writers, 2 shared sessions, 3 s) exits 0 and its JSON figures say:
    events were acknowledged, none lost or duplicated, every status as expected, every JSON valid,
    every writer ended by its planned fate (invariants 1, 3, 6)."""
    figures = tmp_path / "figures.json"
    proc = run_cli(str(tmp_path / "run"), "--duration", "3", "--writers", "4", "--sessions", "2",
                   "--seed", "11", "--json", str(figures), "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    f = json.loads(figures.read_text())
    assert f["ok"] is True and f["failures"] == []
    assert (f["writers"], f["sessions"], f["seed"], f["durability"]) == (4, 2, 11, "durable")
    assert f["events_acknowledged"] > 0
    for key in ("lost", "duplicates", "holes", "after_terminal", "wrong_statuses", "crashed_while_alive",
                "invalid_json", "fold_mismatches", "verify_errors", "wrong_exits"):
        assert f[key] == 0, key
    assert sum(f["kills"].values()) == 4
    assert sum(f["statuses"].values()) == 2
    assert f["peak_writer_rss_mb"] > 0
    assert "PASS" in proc.stdout and "events acknowledged" in proc.stdout


def test_damage_phase_runs_and_reports_every_verdict(tmp_path: Path) -> None:
    """After a short run, --damage-trials 8 damages 8 copies of its WALs (each kind twice) and
    counts one outcome per trial in the JSON figures and the summary table; the run passes only
    if every trial ended as a torn tail or a repaired corruption, and each other outcome is a
    failure naming the damage and every reader's verdict. The run's own WALs are untouched by
    it (verify still clean)."""
    figures = tmp_path / "figures.json"
    run_dir = tmp_path / "run"
    proc = run_cli(str(run_dir), "--duration", "1", "--writers", "2", "--sessions", "1", "--durability", "process",
                   "--seed", "21", "--json", str(figures), "-q", "--damage-trials", "8", "--keep")
    f = json.loads(figures.read_text())
    assert f["damage_trials"] == 8
    assert f["damage_kinds"] == {"bitflip": 2, "zero_sector": 2, "garbage_sector": 2, "cut": 2}
    outcomes = f["damage_outcomes"]
    assert sum(outcomes.values()) == 8
    bad = 8 - outcomes["torn"] - outcomes["corrupt_repaired"]
    damage_failures = [m for m in f["failures"] if m.startswith("damage (")]
    assert len(damage_failures) == bad
    assert all("load: " in m and "repair: " in m for m in damage_failures)
    assert (proc.returncode == 0) == (f["failures"] == []) and f["ok"] is (f["failures"] == [])
    assert "damage trials" in proc.stdout and "damage verdicts" in proc.stdout
    assert f["verify_errors"] == 0 and walspan.Store(run_dir, install_hooks=False).verify().ok
    scratch = run_dir / ".stress-damage"
    assert (len(os.listdir(scratch)) if scratch.exists() else 0) == bad  # failing trials' copies kept


def test_a_damage_disagreement_fails_the_stress_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stress run takes the damage phase's verdicts as its own: with a reader that always
    disagrees (one record short of `load`, or one byte off its corruption offset), every trial is a disagreement, counted in the
    figures, and the run fails with one message per trial naming both readers."""
    from walspan import _damage

    directory, _wid = _fake_writer_dir(tmp_path, 200)

    def short(path: str, sid: str, original: list) -> _damage.Verdict:  # type: ignore[type-arg]
        try:
            v = _damage.READERS["load"](path, sid, original)
        except walspan.CorruptWALError as exc:
            return _damage.Verdict(corrupt_at=exc.offset + 1)
        return _damage.Verdict(records=(v.records or 1) - 1, end=v.end)

    monkeypatch.setattr(_damage, "READERS", {"load": _damage.READERS["load"], "short": short})
    figs = _figs()
    damage(directory, 5, 4, figs)
    assert figs.damage_trials == 4 and figs.damage_outcomes["disagreement"] == 4
    assert not figs.ok and len(figs.failures) == 4
    assert all("load: " in m and "short: " in m for m in figs.failures)


def test_stress_all_writers_signalled_crashes_every_trace(tmp_path: Path) -> None:
    """With --kill-rate 1 in process mode every writer dies by a signal: the session holding the
    SIGTERMed writer is crashed by its hook, the other (all SIGKILLed) by recovery, so both
    traces are crashed, and still no acknowledged event is lost (invariants 1, 6)."""
    figures = tmp_path / "figures.json"
    proc = run_cli(str(tmp_path / "run"), "--duration", "2", "--writers", "4", "--sessions", "2",
                   "--kill-rate", "1", "--durability", "process", "--seed", "5", "--json", str(figures), "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    f = json.loads(figures.read_text())
    assert f["kills"] == {"sigkill": 3, "sigterm": 1, "end": 0, "close": 0, "exception": 0}
    assert f["statuses"] == {"crashed": 2}
    assert f["lost"] == f["duplicates"] == f["wrong_statuses"] == 0


def test_plan_is_reproducible_and_never_ambiguous() -> None:
    """The plan is a function of the seed; the signalled share follows --kill-rate; no session
    mixes SIGKILL and close without a terminal action (its outcome would be path-dependent)."""
    assert make_plan(3, 8, 4, 20.0, 0.5) == make_plan(3, 8, 4, 20.0, 0.5)
    assert make_plan(3, 8, 4, 20.0, 0.5) != make_plan(4, 8, 4, 20.0, 0.5)
    for seed in range(200):
        plans = make_plan(seed, 9, 3, 10.0, 0.5)
        assert sum(p.fate in ("sigkill", "sigterm") for p in plans) == round(0.5 * 9)
        assert all(0 < p.at <= 10.0 for p in plans)
        sessions: dict[str, set[str]] = {}
        for p in plans:
            sessions.setdefault(p.session, set()).add(p.fate)
        assert len(sessions) == 3
        for fates in sessions.values():
            if not fates & {"end", "exception", "sigterm"}:
                assert not ({"sigkill", "close"} <= fates)


def _fake_writer_dir(tmp_path: Path, n_ops: int, duplicate: bool = False) -> tuple[str, str]:
    """A session written by this process the way a stress writer logs, then ended."""
    directory = str(tmp_path / "d")
    store = walspan.Store(directory, install_hooks=False)
    trace = store.open("stress-0")
    assert store._writer is not None
    wid = store._writer.writer_id
    span = trace.start_span("turn", attributes={OP_KEY: 0})
    for op in range(1, n_ops):
        span.add_event("e", {OP_KEY: op})
    if duplicate:
        span.add_event("e", {OP_KEY: n_ops - 1})
    trace.end("completed")
    store.close()
    return directory, wid


def _state(wid: str, acked: int) -> WriterState:
    st = WriterState(WriterPlan(0, "stress-0", "end", 1.0, 0), proc=None, ack_r=-1, ctl_w=-1)  # type: ignore[arg-type]
    st.writer_id, st.acked, st.performed, st.end_ok = wid, acked, True, True
    return st


def _figs() -> Figures:
    return Figures(seed=0, writers=1, sessions=1, durability="durable", duration_s=1.0, kill_rate=0.0)


@pytest.mark.parametrize("claimed, lost", [(5, 0), (6, 1), (8, 3)])
def test_checker_counts_acknowledged_events_missing_from_the_wal(tmp_path: Path, claimed: int, lost: int) -> None:
    """The checker is not vacuous: an acknowledgement for an op the WAL lacks counts as lost and
    fails the run; when acks and WAL agree, nothing is reported."""
    directory, wid = _fake_writer_dir(tmp_path, 5)
    figs = _figs()
    check(directory, [_state(wid, claimed)], figs)
    assert figs.lost == lost
    assert figs.ok is (lost == 0)
    assert figs.statuses == {"completed": 1}
    assert figs.wrong_statuses == figs.invalid_json == figs.verify_errors == 0


def test_checker_counts_duplicates_and_holes(tmp_path: Path) -> None:
    """An op present twice in a writer's records counts as a duplicate and breaks its prefix."""
    directory, wid = _fake_writer_dir(tmp_path, 5, duplicate=True)
    figs = _figs()
    check(directory, [_state(wid, 5)], figs)
    assert (figs.duplicates, figs.holes, figs.lost) == (1, 1, 0)
    assert not figs.ok


def test_checker_flags_a_status_that_does_not_match_the_fates(tmp_path: Path) -> None:
    """A trace ended 'completed' whose only writer was planned to be SIGKILLed (so recovery
    should have crashed it) is a wrong status."""
    directory, wid = _fake_writer_dir(tmp_path, 3)
    st = _state(wid, 3)
    st.plan.fate, st.performed, st.end_ok, st.signalled_ns = "sigkill", True, False, 1
    figs = _figs()
    check(directory, [st], figs)
    assert figs.wrong_statuses == 1
    assert not figs.ok


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--writers", "0"], "--writers"),
        (["--duration", "abc"], "--duration"),
        (["--kill-rate", "1.5"], "--kill-rate"),
        (["--writers", "2", "--sessions", "3"], "--sessions"),
        (["--durability", "fast"], "--durability"),
        (["--damage-trials", "-1"], "--damage-trials"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    """Bad stress arguments are one line on stderr and exit code 2, never a traceback; nothing runs."""
    proc = run_cli(str(tmp_path / "run"), *args, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("walspan: error:") and needle in lines[0]
    assert not (tmp_path / "run").exists()


def test_refuses_a_directory_holding_traces(tmp_path: Path) -> None:
    """Stress never runs over an existing trace directory (its checks assume it wrote every WAL)."""
    d = tmp_path / "existing"
    with walspan.Store(d, install_hooks=False) as store:
        store.open("someone-else").close()
    before = sorted(os.listdir(d))
    proc = run_cli(str(d), "--duration", "1", timeout=60)
    assert proc.returncode == 2
    assert "already holds traces" in proc.stderr
    assert sorted(os.listdir(d)) == before


SOAK = Path(__file__).resolve().parent.parent / "scripts" / "stress.py"


def test_soak_script_runs_rounds_and_logs_figures(tmp_path: Path) -> None:
    """scripts/stress.py runs the requested rounds with consecutive seeds, logs each round's
    figures as a JSON line, and exits 0 when every round passed."""
    log = tmp_path / "soak.jsonl"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--rounds", "2", "--seed", "40", "--log", str(log),
         "--duration", "1", "--writers", "2", "--sessions", "1"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rounds = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["round"], r["seed"], r["ok"], r["writers"]) for r in rounds] == [(1, 40, True, 2), (2, 41, True, 2)]
    assert "2 round(s) passed" in proc.stdout


def test_soak_script_stops_at_the_first_failing_round(tmp_path: Path) -> None:
    """A round that fails (here: walspan stress refuses its arguments) stops the soak at once
    with a non-zero exit, naming the seed; no further round runs."""
    log = tmp_path / "soak.jsonl"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--rounds", "3", "--seed", "7", "--log", str(log), "--writers", "0"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "round 1 FAILED" in proc.stdout and "seed 7" in proc.stdout
    assert [json.loads(line)["ok"] for line in log.read_text().splitlines()] == [False]
