#!/usr/bin/env python3
"""Mutation testing of the storage and trace layers with mutmut (the `dev` extra); not run in CI.

mutmut changes one thing at a time in the code (a `<` into `<=`, a constant, a call dropped)
and runs the tests that call the changed function; a mutant that no test notices ("survived")
is a behaviour nothing pins. Run it after changing these layers or their tests, and read the
survivors (`mutmut show NAME` prints the change; `mutmut browse` lists them interactively).

    pip install -e '.[test,dev]'
    python scripts/mutation.py                                   # every module in [tool.mutmut]
    python scripts/mutation.py --module _format --module _reader \\
        --tests tests/test_format.py tests/test_reader.py        # one or two modules, quickly

--module limits the run to the mutants of walspan/<module>.py (repeatable); --tests replaces the
test selection of [tool.mutmut] in pyproject.toml for this run. Results are kept in mutants/
(git-ignored): a second run resumes and only retests what changed. It ends with each module's
score, killed / (mutants - skipped), and the names of the survivors. Slow: each surviving mutant
costs a run of every selected test that calls its function; on two cores, a module takes minutes.
Code that the tests run only in child processes counts as untested (mutmut maps functions to
tests inside the pytest process).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED = ("killed", "timeout")  # a mutant that hangs the tests was noticed too
SKIPPED = ("skipped", "not checked")


def run_mutmut(modules: list[str], tests: list[str] | None, jobs: int | None) -> None:
    """`mutmut run` limited to the modules' mutants, in this process, with the test selection
    replaced when asked (mutmut reads it from pyproject.toml only, hence the config override)."""
    from mutmut import configuration

    cfg = configuration.config()
    if tests is not None:
        cfg.pytest_add_cli_args_test_selection = tests
    from mutmut.__main__ import cli  # after the override: importing it reads the config

    argv = ["run", *(f"walspan.{m}.*" for m in modules)]
    if jobs is not None:
        argv[1:1] = ["--max-children", str(jobs)]
    try:
        cli.main(argv, standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def results() -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all` (every mutant run so far)."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        m = re.fullmatch(r"\s+(walspan\.\S+): (.+)", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def module_of(mutant: str) -> str:
    return mutant.split(".")[1]


def report(statuses: dict[str, str], modules: list[str]) -> None:
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, status in sorted(statuses.items()):
        mod = module_of(name)
        if mod not in modules:
            continue
        by_module[mod][status] += 1
        if status not in KILLED and status not in SKIPPED:
            survivors[mod].append(f"{name} ({status})")
    for mod in modules:
        c = by_module[mod]
        total = sum(c.values())
        tested = total - sum(c[s] for s in SKIPPED)
        killed = sum(c[s] for s in KILLED)
        score = 100.0 * killed / tested if tested else 0.0
        detail = ", ".join(f"{n} {s}" for s, n in sorted(c.items()))
        print(f"walspan/{mod}.py: score {score:.1f}% ({killed}/{tested}); {detail}")
        for s in survivors[mod]:
            print(f"    {s}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", action="append", help="a module of walspan/ to mutate, e.g. _format (repeatable)")
    p.add_argument("--tests", nargs="+", help="test files or node ids to run instead of [tool.mutmut]'s selection")
    p.add_argument("--jobs", type=int, default=None, help="mutants tested at once (default: one per CPU)")
    p.add_argument("--report-only", action="store_true", help="print the scores of the last run; run nothing")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    import tomllib

    configured = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    known = [Path(f).stem for f in configured]
    modules = args.module or known
    unknown = sorted(set(modules) - set(known))
    if unknown:
        p.error(f"not in [tool.mutmut] only_mutate: {', '.join(unknown)} (known: {', '.join(known)})")
    if not args.report_only:
        run_mutmut(modules, args.tests, args.jobs)
    report(results(), modules)
    return 0


if __name__ == "__main__":
    sys.exit(main())
