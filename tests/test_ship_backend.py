"""`walspan ship` into a real OTLP backend: Arize Phoenix (from PyPI), started on loopback by the
test, receiving a trace written by several processes, read back through Phoenix's own REST API.

Phoenix is large (about 850 MB installed, a minute to install), so it is not a test
dependency: the test runs when a `phoenix` executable is found (WALSPAN_PHOENIX names it, else
the one on PATH or beside this Python) and skips otherwise. CI installs it in a virtualenv of
its own (.ci/run) so that its dependencies never change the ones the rest of the suite runs
with. Marker: `backend` (`pytest -m backend` runs only this)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import walspan
from walspan.ship import ship, trace_span_id

pytestmark = pytest.mark.backend
CTX = multiprocessing.get_context("fork")


def _phoenix() -> str | None:
    env = os.environ.get("WALSPAN_PHOENIX")
    if env:
        return env
    beside = os.path.join(os.path.dirname(sys.executable), "phoenix")
    return beside if os.access(beside, os.X_OK) else shutil.which("phoenix")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(directory: str, parent: str, index: int, n: int) -> None:
    store = walspan.Store(directory, durability="process", install_hooks=False)
    t = store.open("shared")
    for i in range(n):
        t.start_span(f"p{index}-tool-{i}", kind="tool", parent=parent, attributes={"worker": index, "i": i}).end(output="ok")
    store.close()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _all_spans(base: str) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = _get(f"{base}/v1/projects/default/spans?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        spans += page["data"]
        cursor = page.get("next_cursor")
        if not cursor:
            return spans


def test_a_multiprocess_trace_shipped_to_phoenix_reads_back_whole(tmp_path: Path) -> None:
    """Three writer processes add spans to one session under a root; `ship` sends it to
    Phoenix's OTLP/HTTP endpoint; Phoenix's REST API then returns every span with its id,
    parent, name, status and attributes, and the trace-status span says `completed`."""
    exe = _phoenix()
    if exe is None:
        pytest.skip("Phoenix is not installed (pip install arize-phoenix, or set WALSPAN_PHOENIX)")
    d = str(tmp_path / "store")
    store = walspan.Store(d, durability="process", install_hooks=False)
    t = store.open("shared")
    root = t.start_span("agent", kind="agent")
    procs = [CTX.Process(target=_worker, args=(d, root.span_id, k, 40)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    root.end()
    t.end()
    doc = store.load("shared")
    store.close()
    assert len({s["writer_id"] for s in doc["spans"]}) == 4

    port, grpc = _free_port(), _free_port()
    env = {**os.environ, "PHOENIX_WORKING_DIR": str(tmp_path / "phoenix"), "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(grpc), "PHOENIX_HOST": "127.0.0.1", "PHOENIX_TELEMETRY_ENABLED": "false"}
    proc = subprocess.Popen([exe, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        log = []
        assert proc.stdout is not None
        for line in proc.stdout:  # synchronised on Phoenix's own "ready" line
            log.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail("Phoenix did not start:\n" + "".join(log[-20:]))
        result = ship(d, f"{base}/v1/traces", batch_spans=50)
        assert result.ok, result.errors
        want = {s["span_id"]: s for s in doc["spans"]}
        deadline = time.monotonic() + 60
        while True:  # Phoenix stores what it acknowledged asynchronously: look until it is all there
            got = {s["context"]["span_id"]: s for s in _all_spans(base) if s["context"]["trace_id"] == doc["trace_id"]}
            if len(got) >= len(want) + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert set(got) == set(want) | {trace_span_id(doc["trace_id"])}
        for sid, s in want.items():
            g = got[sid]
            assert (g["name"], g["parent_id"], g["status_code"]) == (s["name"], s["parent_span_id"], "OK")
            if s["name"].startswith("p"):
                assert g["attributes"]["worker"] == int(s["name"][1]) and g["span_kind"] == "TOOL"
        status = got[trace_span_id(doc["trace_id"])]
        assert status["attributes"]["walspan.trace.status"] == "completed" and status["attributes"]["walspan.session.id"] == "shared"
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
