"""The native API carries what OpenTelemetry users expect: exceptions, status, explicit times,
links, renames, decorators, the current span, joining from a W3C TRACEPARENT, and calls after
end() ignored with one warning."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

import walspan
from walspan import _trace


def test_record_exception_set_status_times_links_and_rename_are_stored(pstore: walspan.Store) -> None:
    """record_exception is an "exception" event with type, message and stacktrace; set_status
    decides end()'s status ("ok" final, "unset" ignored); explicit start/end/event times and
    links are stored as given; update_name is written at once."""
    t = pstore.open("s")
    other = t.start_span("other")
    span = t.start_span("first", start_time=1_000, links=[other, ("a" * 32, "b" * 16), {"trace_id": "c" * 32, "span_id": "d" * 16, "attributes": {"w": 1}}])
    try:
        raise ValueError("bad ✗")
    except ValueError as exc:
        span.record_exception(exc, timestamp=2_000)
    span.update_name("renamed")
    assert pstore.load("s")["spans"][1]["name"] == "renamed"  # durable before end
    span.set_status("error", "first")
    span.set_status("unset")
    span.end(end_time=3_000)
    ok = t.start_span("ok")
    ok.set_status("ok")
    ok.set_status("error", "too late")
    ok.end()
    s = {x["name"]: x for x in pstore.load("s")["spans"]}
    r = s["renamed"]
    assert (r["start_time"], r["end_time"], r["status"], r["status_message"]) == (1_000, 3_000, "error", "first")
    ev = r["events"][0]
    assert ev["name"] == "exception" and ev["time"] == 2_000
    assert ev["attributes"]["exception.type"] == "ValueError" and ev["attributes"]["exception.message"] == "bad ✗"
    assert "Traceback" in ev["attributes"]["exception.stacktrace"] and "bad ✗" in ev["attributes"]["exception.stacktrace"]
    assert [(lk["trace_id"], lk["span_id"], lk["attributes"]) for lk in r["links"]] == [
        (t.trace_id, other.span_id, {}), ("a" * 32, "b" * 16, {}), ("c" * 32, "d" * 16, {"w": 1})]
    assert s["ok"]["status"] == "ok"
    with pytest.raises(ValueError, match="links\\[0\\]"):
        t.start_span("x", links=[("A" * 32, "b" * 16)])
    with pytest.raises(ValueError, match="start_time"):
        t.start_span("x", start_time=-1)


def test_use_after_end_is_ignored_with_one_warning(pstore: walspan.Store, caplog: pytest.LogCaptureFixture) -> None:
    """After end(), set_attributes/add_event/record_exception/update_name/set_status/end write
    nothing, and the span logs one warning (not one per call)."""
    t = pstore.open("s")
    span = t.start_span("x")
    span.end()
    before = pstore.wal_path("s").read_bytes()
    with caplog.at_level(logging.WARNING, logger="walspan"):
        span.set_attributes({"a": 1})
        span.add_event("e")
        span.record_exception(RuntimeError("r"))
        span.update_name("y")
        span.set_status("error")
        span.end("error")
    assert pstore.wal_path("s").read_bytes() == before
    assert [r.getMessage() for r in caplog.records if "after its end()" in r.getMessage()] == [
        f"walspan: set_attributes on span 'x' ({span.span_id}) after its end() is ignored"]


def test_exception_escaping_a_with_block_is_recorded(pstore: walspan.Store) -> None:
    """An exception leaving `with trace.span(...)` is recorded as an exception event and ends
    the span as error."""
    t = pstore.open("s")
    with pytest.raises(KeyError), t.span("boom"):
        raise KeyError("k")
    span = pstore.load("s")["spans"][0]
    assert span["status"] == "error" and span["events"][0]["attributes"]["exception.type"] == "KeyError"


def test_decorators_run_each_call_in_its_own_span(pstore: walspan.Store) -> None:
    """@trace.span("name") and @walspan.traced (sync and async) start one span per call, child
    of the current span; get_current_span() is that span inside; an exception ends it error."""
    t = pstore.open("s")
    seen = []

    @t.span("step", kind="tool")
    def step(i: int) -> int:
        seen.append(walspan.get_current_span())
        return i * 2

    @walspan.traced
    def inner() -> str:
        return walspan.get_current_span().name  # type: ignore[union-attr]

    @walspan.traced(name="async-work", kind="agent")
    async def work() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("x")

    with t.span("root") as root:
        assert [step(1), step(2)] == [2, 4]
        assert inner() == "test_decorators_run_each_call_in_its_own_span.<locals>.inner"
        with pytest.raises(RuntimeError):
            asyncio.run(work())
    assert walspan.get_current_span() is None
    spans = {s["name"]: s for s in pstore.load("s")["spans"]}
    steps = [s for s in pstore.load("s")["spans"] if s["name"] == "step"]
    assert len(steps) == 2 and all(s["parent_span_id"] == root.span_id and s["kind"] == "tool" for s in steps)
    assert [x.span_id for x in seen] == [s["span_id"] for s in steps]  # type: ignore[union-attr]
    assert spans["async-work"]["status"] == "error" and spans["async-work"]["parent_span_id"] == root.span_id


def test_traceparent_alone_joins_the_trace_when_a_store_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With TRACEPARENT and WALSPAN_DIR (no WALSPAN_CONTEXT), attach_from_env joins the session
    named by the trace id; spans carry that trace id, their parent is the traceparent's span
    (remote), and env() hands the same trace id on. Without a store nothing is joined; a bad
    traceparent is refused."""
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    env = {"TRACEPARENT": tp, "WALSPAN_DIR": str(tmp_path / "t"), "WALSPAN_DURABILITY": "process"}
    trace = walspan.attach_from_env(env, install_hooks=False)
    assert trace is not None and trace.session_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    span = trace.start_span("joined")
    assert span.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace.env(span)["TRACEPARENT"] == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{span.span_id}-01"
    span.end()
    doc = trace.store.load(trace.session_id)
    s = doc["spans"][0]
    assert (s["trace_id"], s["parent_span_id"], s["parent_remote"]) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)
    trace.store.close()
    assert walspan.attach_from_env({"TRACEPARENT": tp}) is None
    for bad in ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "junk"):
        with pytest.raises(ValueError, match="TRACEPARENT"):
            walspan.attach_from_env({"TRACEPARENT": bad, "WALSPAN_DIR": str(tmp_path / "t")})
    monkeypatch.setattr(_trace, "_default", [])


def test_traced_with_no_trace_runs_untraced_with_one_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """@walspan.traced with no current span and nothing to join runs the function untraced,
    saying so once."""
    monkeypatch.setattr(_trace, "_default", [])
    for var in ("WALSPAN_CONTEXT", "TRACEPARENT", "WALSPAN_DIR"):
        monkeypatch.delenv(var, raising=False)

    @walspan.traced
    def f() -> int:
        assert walspan.get_current_span() is None
        return 1

    with caplog.at_level(logging.WARNING, logger="walspan"):
        assert f() + f() == 2
    assert sum("running untraced" in r.getMessage() for r in caplog.records) == 1
