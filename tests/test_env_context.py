"""Handing a trace to a child process through the environment (WALSPAN_CONTEXT / TRACEPARENT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from crashkit import run_script

import walspan

CHILD = """
import os, sys
import walspan
t = walspan.attach_from_env()
with t.span("child work", kind="tool") as s:
    s.add_event("ran", {"pid": os.getpid()})
    if len(sys.argv) > 1 and sys.argv[1] == "nest":
        import subprocess
        code = "import walspan; t = walspan.attach_from_env(); t.start_span('grandchild').end()"
        subprocess.run([sys.executable, "-c", code], env={**os.environ, **t.env()}, check=True)
print(os.getpid(), t.trace_id, flush=True)
"""


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = walspan.Store(tmp_path, install_hooks=False)
    yield s
    s.close()


def test_child_joins_the_trace_under_the_handed_over_span(store: walspan.Store) -> None:
    """A child started with trace.env(span) joins the same trace with attach_from_env(): its
    spans are children of that span, it is a writer of its own, and it detaches at exit."""
    trace = store.open("s")
    parent = trace.start_span("spawn tool")
    proc = run_script(CHILD, env=trace.env(parent), check=True)
    child_pid, trace_id = proc.stdout.split()
    assert trace_id == trace.trace_id
    parent.end()
    trace.end()
    t = store.load("s")
    child = next(s for s in t["spans"] if s["name"] == "child work")
    assert child["parent_span_id"] == parent.span_id and child["status"] == "ok"
    writers = {w["writer_id"]: w for w in t["writers"]}
    assert writers[child["writer_id"]]["pid"] == int(child_pid)
    assert writers[child["writer_id"]]["state"] == "detached"
    assert t["status"] == "completed"


def test_env_defaults_to_the_current_span_and_nests_across_generations(
    store: walspan.Store,
) -> None:
    """trace.env() without a span hands over the current span (`with trace.span`); a child can
    hand its own current span to a grandchild the same way: the tree spans three processes."""
    trace = store.open("s")
    with trace.span("agent turn") as turn:
        env = trace.env()
        proc = run_script(CHILD, "nest", env=env, check=True)
    trace.end()
    assert proc.stdout.split()[1] == trace.trace_id
    t = store.load("s")
    by_name = {s["name"]: s for s in t["spans"]}
    assert by_name["child work"]["parent_span_id"] == turn.span_id
    assert by_name["grandchild"]["parent_span_id"] == by_name["child work"]["span_id"]
    assert len({s["writer_id"] for s in t["spans"]}) == 3


def test_env_values_name_the_trace(store: walspan.Store) -> None:
    """WALSPAN_CONTEXT carries directory, raw session id, span and durability; TRACEPARENT is
    the W3C-like 00-<trace id>-<span id>-01 of the same span."""
    trace = store.open("a/b: c")
    span = trace.start_span("x")
    env = trace.env(span)
    ctx = json.loads(env[walspan.ENV_VAR])
    assert ctx["dir"] == store.directory and ctx["session"] == "a/b: c" and ctx["span"] == span.span_id
    assert ctx["durability"] == store.durability
    assert env["TRACEPARENT"] == f"00-{trace.trace_id}-{span.span_id}-01"
    assert trace.env(None).get("TRACEPARENT") is None and json.loads(trace.env(None)[walspan.ENV_VAR])["span"] is None


def test_attach_from_env_without_or_with_a_bad_value(tmp_path: Path) -> None:
    """No WALSPAN_CONTEXT: attach_from_env() returns None and creates nothing; a malformed value
    raises ValueError naming the variable."""
    assert walspan.attach_from_env({}) is None
    for bad in (
        "not json",
        json.dumps({"dir": str(tmp_path)}),
        json.dumps({"dir": 1, "session": "s"}),
        json.dumps({"dir": str(tmp_path), "session": "s", "span": "../x"}),
    ):
        with pytest.raises(ValueError, match="WALSPAN_CONTEXT"):
            walspan.attach_from_env({walspan.ENV_VAR: bad})
    assert list(tmp_path.iterdir()) == []


def test_child_of_an_ended_trace_gets_trace_closed_and_writes_nothing(
    store: walspan.Store,
) -> None:
    """A child handed a trace that has ended meanwhile gets TraceClosedError from
    attach_from_env() and writes nothing."""
    trace = store.open("s")
    env = trace.env(trace.start_span("x"))
    trace.end()
    before = store.wal_path("s").read_bytes()
    proc = run_script(
        """
import walspan
try:
    walspan.attach_from_env(install_hooks=False)
except walspan.TraceClosedError as e:
    print("closed", e.status)
""",
        env=env,
    )
    assert proc.stdout.strip() == "closed completed", proc.stderr
    assert store.wal_path("s").read_bytes() == before


def test_child_killed_while_parent_lives_is_lost_not_crashed(tmp_path: Path, store: walspan.Store) -> None:
    """A child joined through the environment and SIGKILLed mid-span, while the parent lives: its
    span is interrupted (writer lost) and the parent's trace goes on to complete."""
    trace = store.open("s")
    parent = trace.start_span("tool")
    proc = run_script(
        """
import os, signal, walspan
t = walspan.attach_from_env()
t.start_span("killed mid-span")
os.kill(os.getpid(), signal.SIGKILL)
""",
        env=trace.env(parent),
    )
    assert proc.returncode == -9
    report = store.recover()
    assert [a.action for a in report.actions] == ["writer_lost"]
    parent.end()
    trace.end()
    t = store.load("s")
    assert t["status"] == "completed"
    killed = next(s for s in t["spans"] if s["name"] == "killed mid-span")
    assert (killed["status"], killed["status_message"], killed["parent_span_id"]) == (
        "interrupted",
        "writer lost",
        parent.span_id,
    )
