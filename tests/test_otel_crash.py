"""OpenTelemetry programs killed mid-run: what the SDK's BatchSpanProcessor loses and
WalSpanProcessor keeps, in code and zero-code (opentelemetry-instrument); several processes of
one program writing one trace, one of them SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the otel extra: pip install -e '.[test,otel]'")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import walspan
from walspan.otel import WalSpanProcessor

CHILD = str(Path(__file__).with_name("otel_child.py"))
N = 60


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WALSPAN_")) and k != "TRACEPARENT"}
    # The batch processor exports every 5 s by default; a longer delay only makes the outcome
    # independent of how loaded this machine is (a kill inside the delay loses the same way).
    env["OTEL_BSP_SCHEDULE_DELAY"] = "60000"
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], how: str) -> tuple[str, list[str], list[str]]:
    """Start the child, read its acknowledgements through the pipe, end it as `how` says.
    Returns (trace id, ids of the spans it ended, ids of the spans it left open)."""
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    assert p.stdout is not None
    trace_id = p.stdout.readline().strip()
    ended, still_open = [], []
    for line in p.stdout:
        line = line.strip()
        if line == "ready":
            break
        if line.startswith("open "):
            still_open = line.split()[1:]
        else:
            ended.append(line)
    if how == "sigkill":
        p.send_signal(signal.SIGKILL)
    elif how == "sigterm":
        p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
    assert rc == {"sigkill": -signal.SIGKILL, "sigterm": -signal.SIGTERM, "exit": 0}[how], rc
    assert len(trace_id) == 32 and len(ended) == N and len(still_open) == 2
    return trace_id, ended, still_open


def _check_wal_kept_everything(directory: Path, trace_id: str, ended: list[str], still_open: list[str]) -> None:
    store = walspan.Store(directory, install_hooks=False, create=False)
    store.recover()
    doc = store.load(trace_id)
    spans = {s["span_id"]: s for s in doc["spans"]}
    assert all(spans[sid]["status"] == "unset" and spans[sid]["end_time"] for sid in ended)
    assert all(spans[sid]["status"] == "interrupted" for sid in still_open)
    assert doc["status"] == "crashed"
    store.close()


@pytest.mark.parametrize("how", ["sigkill", "exit", "sigterm"])
def test_batch_processor_loses_what_wal_span_processor_keeps(tmp_path: Path, how: str) -> None:
    """A program that ended N spans (and told us so through a pipe) and is then killed by
    SIGKILL, leaves by os._exit, or dies of a default SIGTERM: with WalSpanProcessor every one
    of the N is in the store and its two open spans are there, interrupted after recover();
    with the SDK's BatchSpanProcessor the exporter never saw the queued spans."""
    wal_dir = tmp_path / "traces"
    trace_id, ended, still_open = _run([sys.executable, CHILD, "wal", how, str(N), str(wal_dir)], _env(), how)
    _check_wal_kept_everything(wal_dir, trace_id, ended, still_open)

    out = tmp_path / "batch.jsonl"
    _tid, ended, still_open = _run([sys.executable, CHILD, "batch", how, str(N), str(out)], _env(), how)
    exported = {json.loads(line)["span_id"] for line in out.read_text().splitlines()} if out.exists() else set()
    assert len(exported & set(ended)) < N  # the queued spans are gone
    assert not exported & set(still_open)  # and an open span is never exported at all


def test_zero_code_run_is_crash_proof(tmp_path: Path) -> None:
    """`opentelemetry-instrument python app.py` with OTEL_TRACES_EXPORTER=walspan and
    WALSPAN_DIR, SIGKILLed after N acknowledged spans: every one is in the store (the
    configurator installed WalSpanProcessor, not a batch processor)."""
    instrument = str(Path(sys.executable).with_name("opentelemetry-instrument"))
    env = _env(OTEL_TRACES_EXPORTER="walspan", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
               WALSPAN_DIR=str(tmp_path / "traces"), OTEL_PYTHON_CONFIGURATOR="walspan")
    trace_id, ended, still_open = _run([instrument, sys.executable, CHILD, "zerocode", "wait", str(N)], env, "sigkill")
    _check_wal_kept_everything(tmp_path / "traces", trace_id, ended, still_open)


def test_processes_of_one_program_write_one_trace_one_killed(tmp_path: Path) -> None:
    """A root span in this process and three child processes continuing its trace through
    TRACEPARENT, all through WalSpanProcessor; one child is SIGKILLed mid-run. Afterwards: one
    session holding one trace id; every child's root has this process's root as its (remote)
    parent and every step its child's root; the killed child's ended spans are kept and its
    open ones interrupted; the root's end completes the trace."""
    directory = tmp_path / "traces"
    store = walspan.Store(directory, install_hooks=False)
    provider = TracerProvider()
    provider.add_span_processor(WalSpanProcessor(store))
    root = provider.get_tracer("parent").start_span("root")
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(root))
    root_id = format(root.get_span_context().span_id, "016x")
    trace_id = format(root.get_span_context().trace_id, "032x")
    results = []
    for how in ["sigkill", "finish", "finish"]:
        env = _env(TRACEPARENT=carrier["traceparent"])
        args = [sys.executable, CHILD, "wal", "wait" if how == "sigkill" else "finish", "20", str(directory)]
        p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == trace_id
        lines = [line.strip() for line in p.stdout] if how == "finish" else []
        if how == "sigkill":
            for line in p.stdout:
                lines.append(line.strip())
                if line.strip() == "ready":
                    break
            p.kill()
        p.wait(timeout=60)
        results.append((how, [x for x in lines if len(x) == 16], lines[-2].split()[1:]))
    root.end()
    store.recover()
    assert store.sessions() == [trace_id]
    doc = store.load(trace_id)
    assert doc["status"] == "completed"
    spans = {s["span_id"]: s for s in doc["spans"]}
    assert {s["trace_id"] for s in spans.values()} == {trace_id}
    assert spans[root_id]["parent_span_id"] is None and spans[root_id]["status"] == "unset"
    for how, ended, (pending, child_root) in results:
        assert spans[child_root]["parent_span_id"] == root_id and spans[child_root]["parent_remote"] is True
        assert len(ended) == 20 and all(spans[s]["parent_span_id"] == child_root for s in ended)
        assert all(spans[s]["status"] == "unset" for s in ended)
        expected = "interrupted" if how == "sigkill" else "unset"
        assert spans[pending]["status"] == spans[child_root]["status"] == expected
    assert len(doc["writers"]) == 4
    store.close()
