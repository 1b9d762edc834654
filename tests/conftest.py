"""Shared fixtures for the walspan test suite. Every test works in its own tmp_path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import walfiles`

from syscall_trace import Tracer, TracerUnavailable

import walspan


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A not-yet-created store directory inside this test's tmp_path."""
    return tmp_path / "traces"


@pytest.fixture
def store(store_dir: Path):
    """A durable Store in tmp_path (no process-wide hooks), closed after the test."""
    s = walspan.Store(store_dir, install_hooks=False)
    yield s
    s.close()


@pytest.fixture
def pstore(store_dir: Path):
    """A Store with durability="process" in tmp_path, closed after the test."""
    s = walspan.Store(store_dir, durability="process", install_hooks=False)
    yield s
    s.close()


@pytest.fixture(scope="session")
def syscall_tracer(tmp_path_factory: pytest.TempPathFactory) -> Tracer:
    """The LD_PRELOAD syscall tracer (tests/syscalls/trace.c), compiled once per test worker."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the syscall tracer needs Linux (LD_PRELOAD into glibc, /proc/self/fd)")
    try:
        return Tracer.build(tmp_path_factory.mktemp("syscall-tracer"))
    except TracerUnavailable as exc:
        pytest.skip(str(exc))
