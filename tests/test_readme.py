"""The README tells the truth: every test it names as evidence for a guarantee exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _test_names() -> dict[str, set[str]]:
    out = {}
    for f in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(f.read_text())
        out[f.name] = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return out


def test_every_test_the_readme_names_exists() -> None:
    """Each `test_file.py::test_name` (and each following `::test_name`, which continues the
    last file named on that line) in README.md names a test that exists: a renamed or deleted
    test cannot leave a guarantee backed by nothing."""
    tests = _test_names()
    named, missing = 0, []
    for line in (ROOT / "README.md").read_text().splitlines():
        current = None
        for m in re.finditer(r"`(test_\w+\.py)(?:::(\w+))?`|`::(\w+)`", line):
            if m.group(1):
                current = m.group(1)
                named += 1
                if current not in tests:
                    missing.append(current)
                elif m.group(2) and m.group(2) not in tests[current]:
                    missing.append(f"{current}::{m.group(2)}")
            elif current is not None:
                named += 1
                if m.group(3) not in tests.get(current, set()):
                    missing.append(f"{current}::{m.group(3)}")
    assert named > 50, "the guarantees table names fewer tests than it did: did its format change?"
    assert missing == []
