"""`walspan ship` against a loopback OTLP/HTTP receiver: what is sent, in what order, the
cursor, retries and refusals (docs/SHIP.md)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from shipkit import Receiver, check_in_order, end_order, write_trace

import walspan
from walspan import cli
from walspan.export import otlp_proto
from walspan.read import end_cursor, list_stems, summarize_stem
from walspan.ship import CursorStore, ShipOptions, Shipper, ship, trace_span_id
from walspan.ship._cursors import default_name
from walspan.ship._http import backoff, parse_retry_after


def _opts(url: str, **kw: object) -> ShipOptions:
    base: dict[str, object] = {"timeout": 2.0, "backoff_initial": 0.001, "backoff_max": 0.002, "give_up_after": 30.0}
    base.update(kw)
    return ShipOptions(url, **base)  # type: ignore[arg-type]


def _spans_of(export: bytes) -> dict[str, object]:
    req = ExportTraceServiceRequest.FromString(export)
    return {s.span_id.hex(): s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans}


def test_once_ships_every_span_exactly_as_export_encodes_it(tmp_path: Path) -> None:
    """--once over a store of several traces (thousands of spans, one with spans left open and
    one still running) sends each ended span once, byte-identical to `walspan export
    otlp-proto`; the open spans of the ended trace arrive interrupted, with the trace-status
    span; the running trace's open spans are not sent; every cursor is at its log's end."""
    d = str(tmp_path / "s")
    write_trace(d, "a", 1500, attrs=3)
    write_trace(d, "b", 300, open_spans=5)
    write_trace(d, "c", 40, end=False, open_spans=2)
    with Receiver() as rx:
        result = ship(d, rx.url, batch_spans=200, timeout=5.0)
        assert result.ok and result.status.retries == 0
        store = walspan.Store(d, durability="process", install_hooks=False)
        for sid in ("a", "b", "c"):
            doc = store.load(sid)
            want = _spans_of(otlp_proto(doc))
            got = {a.span_id: a for a in rx.arrivals if a.trace_id == doc["trace_id"]}
            n = sum(1 for a in rx.arrivals if a.trace_id == doc["trace_id"])
            if sid == "c":
                want = {k: v for k, v in want.items() if doc["spans"][[s["span_id"] for s in doc["spans"]].index(k)]["status"] != "open"}
                assert set(got) == set(want) and n == len(want)
            else:
                tid = trace_span_id(doc["trace_id"])
                assert set(got) == set(want) | {tid} and n == len(want) + 1
                assert got[tid].name == "walspan.trace" and got[tid].attributes["walspan.trace.status"] == "completed"
            for k, span in want.items():
                assert got[k].raw == span, f"{sid}: span {k} differs from the export"
            if sid == "b":
                assert sum(1 for a in got.values() if a.state == "interrupted") == 5
        store.close()
        assert check_in_order(rx.arrivals, end_order(d)) == 0
        assert rx.encodings == {"gzip"} and rx.content_types == {"application/x-protobuf"}
    cs = CursorStore(d, default_name(rx.url))
    for stem in list_stems(d):
        saved = cs.load(stem)
        assert saved is not None and saved.cursor == end_cursor(d, summarize_stem(d, stem).session_id)
        assert saved.done == (stem != "c")


def test_a_second_run_sends_only_what_was_appended_since(tmp_path: Path) -> None:
    """The cursor is durable: a second --once sends nothing for ended traces and, for a trace
    that grew, only the spans ended since (a span started before the first run and ended
    after it arrives whole)."""
    d = str(tmp_path / "s")
    write_trace(d, "done", 50)
    store = walspan.Store(d, durability="process", install_hooks=False)
    t = store.open("grow")
    early = t.start_span("early", attributes={"k": 1})
    t.start_span("first").end()
    with Receiver() as rx:
        assert ship(d, rx.url).ok
        n1 = len(rx.arrivals)
        assert n1 == 53  # 51 spans + the trace-status span of "done", "first" of "grow"
        early.set_attribute("k2", 2)
        early.end()
        t.start_span("second").end()
        t.end()
        assert ship(d, rx.url).ok
        later = rx.arrivals[n1:]
        assert [a.name for a in later] == ["early", "second", "walspan.trace"]
        assert later[0].attributes["k"] == 1 and later[0].attributes["k2"] == 2
        requests = rx.requests
        assert ship(d, rx.url).ok and rx.requests == requests  # nothing left: no request at all
    store.close()


def test_partial_ships_open_spans_as_they_start_then_again_when_they_end(tmp_path: Path) -> None:
    """--partial: a span is sent when it starts (marked open) and again when it ends, with
    the same ids, so a backend can replace the first by the second."""
    d = str(tmp_path / "s")
    store = walspan.Store(d, durability="process", install_hooks=False)
    t = store.open("p")
    s = t.start_span("work")
    with Receiver() as rx:
        assert ship(d, rx.url, partial=True).ok
        assert [(a.name, a.state) for a in rx.arrivals] == [("work", "open")]
        s.end()
        t.end()
        assert ship(d, rx.url, partial=True).ok
        assert [(a.name, a.state) for a in rx.arrivals] == [("work", "open"), ("work", "1"), ("walspan.trace", "1")]
        assert rx.arrivals[0].span_id == rx.arrivals[1].span_id
    store.close()


def test_json_protocol_without_gzip(tmp_path: Path) -> None:
    """--protocol http/json --no-gzip posts OTLP/JSON (hex ids) uncompressed."""
    d = str(tmp_path / "s")
    order = write_trace(d, "j", 30)
    with Receiver() as rx:
        assert ship(d, rx.url, protocol="http/json", gzip=False).ok
        assert rx.content_types == {"application/json"} and rx.encodings == {""}
        assert [a.span_id for a in rx.arrivals][:-1] == order


def test_fairness_a_busy_session_does_not_starve_the_others(tmp_path: Path) -> None:
    """With one session holding 3000 spans and 20 holding 5 each, every small session is
    fully sent within the first two requests: a batch takes an equal share from each session."""
    d = str(tmp_path / "s")
    write_trace(d, "big", 3000)
    small = {}
    for i in range(20):
        write_trace(d, f"small{i:02d}", 5)
    store = walspan.Store(d, durability="process", install_hooks=False)
    small = {store.load(f"small{i:02d}")["trace_id"] for i in range(20)}
    store.close()
    with Receiver() as rx:
        assert ship(d, rx.url, batch_spans=100, window=1).ok
        last_small = max(a.request for a in rx.arrivals if a.trace_id in small)
        assert last_small <= 1, f"small sessions finished only in request {last_small} of {rx.requests}"
        assert rx.requests >= 30


@pytest.mark.parametrize("fault", ["reset", "timeout", "cut", "500", "503", "429"])
def test_transient_faults_are_retried_until_acknowledged(tmp_path: Path, fault: str) -> None:
    """A refused/reset connection, a timeout, a reply cut mid-response, 500, 503 and 429 are
    retried; every span arrives in order; a fault that loses only the answer ("cut") may
    duplicate that one batch, no other."""
    d = str(tmp_path / "s")
    write_trace(d, "a", 120)
    write_trace(d, "b", 120)
    with Receiver(faults=[fault, fault, "ok", fault], retry_after="0") as rx:
        result = Shipper(d, _opts(rx.url, batch_spans=50, timeout=0.3, window=1)).run()
        assert result.ok and result.status.retries == 3
        dups = check_in_order(rx.arrivals, end_order(d))
        assert dups <= (3 * 50 if fault == "cut" else 0)
        if fault == "cut":
            assert dups > 0


def test_connection_refused_until_the_receiver_starts(tmp_path: Path) -> None:
    """No one listening (connection refused) is retried: once a receiver listens on the
    port, everything arrives."""
    d = str(tmp_path / "s")
    order = write_trace(d, "a", 20)
    rx = Receiver()
    port = rx.port
    rx.close()  # nobody listens there now
    refused = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Refused" in record.getMessage():
                refused.set()

    handler = Seen(logging.INFO)
    logger = logging.getLogger("walspan.ship")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    shipper = Shipper(d, _opts(f"http://127.0.0.1:{port}/v1/traces", backoff_initial=0.01, backoff_max=0.02))
    out: list[object] = []
    th = threading.Thread(target=lambda: out.append(shipper.run()))
    th.start()
    try:
        assert refused.wait(30)
        with Receiver(port=port) as rx:
            th.join(30)
            assert not th.is_alive() and out[0].ok  # type: ignore[attr-defined]
            assert [a.span_id for a in rx.arrivals][:-1] == order
    finally:
        shipper.stop()
        th.join(30)
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_retry_delays_follow_retry_after_and_backoff(tmp_path: Path) -> None:
    """The waits asked for: Retry-After's value for a 429, then an
    exponential backoff with jitter otherwise, growing per attempt and capped."""
    d = str(tmp_path / "s")
    write_trace(d, "a", 5)
    waits: list[float] = []

    class NoWait(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            return False

    with Receiver(faults=["429", "500", "500", "500", "500", "500", "500"], retry_after="7") as rx:
        result = Shipper(d, ShipOptions(rx.url, backoff_initial=1.0, backoff_max=8.0)).run(stop=NoWait())
        assert result.ok
    assert waits[0] == 7.0
    for attempt, w in enumerate(waits[1:]):
        base = min(8.0, 2.0 ** (attempt + 1))  # the 429 was attempt 0
        assert base / 2 <= w <= base, (attempt, w)
    assert len(set(waits[1:])) == len(waits) - 1  # jitter: no two equal
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 10) == 10.0
    assert parse_retry_after("soon") is None
    assert backoff(40, 1.0, 30.0) <= 30.0


def test_a_permanent_4xx_is_recorded_and_skipped_never_retried(tmp_path: Path) -> None:
    """A 400 refuses that batch for good: it is not retried, it is recorded in
    rejected.jsonl (sessions, cursors, span count, the receiver's message), the cursor moves
    past it, the rest arrives, and the run is not ok (exit 1) but the next one is."""
    d = str(tmp_path / "s")
    write_trace(d, "a", 99)
    with Receiver(faults=["ok", "400"]) as rx:
        result = Shipper(d, _opts(rx.url, batch_spans=50, window=1)).run()
        assert not result.ok and result.status.rejected_batches == 1 and result.status.retries == 0
        assert rx.requests == 3 and rx.answered == ["ok", "400", "ok"]
        got = [a.span_id for a in rx.arrivals]
        assert len(got) == 101 - 50  # the refused batch's 50 spans are not there
        cs = CursorStore(d, default_name(rx.url))
        rejects = [json.loads(line) for line in Path(cs.path, "rejected.jsonl").read_text().splitlines()]
        assert len(rejects) == 1 and rejects[0]["status"] == 400 and rejects[0]["spans"] == 50
        assert "refused for good" in rejects[0]["message"] and rejects[0]["sessions"][0]["session_id"] == "a"
        assert ship(d, rx.url).ok and rx.requests == 3


def test_giving_up_keeps_the_cursor_where_the_receiver_acknowledged(tmp_path: Path) -> None:
    """--once against a receiver that keeps failing gives up after give_up_after, reports it,
    and leaves the cursor at the last acknowledged batch: the next run sends the rest."""
    d = str(tmp_path / "s")
    order = write_trace(d, "a", 80)
    with Receiver(faults=["ok"] + ["503"] * 1000, retry_after="0") as rx:
        result = Shipper(d, _opts(rx.url, batch_spans=40, window=1, give_up_after=0.0)).run()
        assert not result.ok and "gave up" in result.errors[0]
        assert [a.span_id for a in rx.arrivals] == order[:40]
        rx.faults.clear()
        assert ship(d, rx.url).ok
        assert [a.span_id for a in rx.arrivals] == order + [trace_span_id(rx.arrivals[-1].trace_id)]


def test_cli_ship_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan ship DIR --endpoint URL --once` exits 0 when everything was acknowledged and
    prints a status line; bad options are one-line errors."""
    d = str(tmp_path / "s")
    write_trace(d, "a", 10)
    with Receiver() as rx:
        assert cli.main(["ship", d, "--endpoint", rx.url, "--once", "--headers", "authorization=Bearer x"]) == 0
        assert len(rx.arrivals) == 12
        assert "12 span(s) acknowledged" in capsys.readouterr().err
    assert cli.main(["ship", d, "--endpoint", "ftp://x", "--once"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("walspan: error: ") and err.count("\n") == 1
    assert cli.main(["ship", d, "--endpoint", "http://x", "--headers", "novalue", "--once"]) == 2
    assert "K=V" in capsys.readouterr().err
    assert cli.main(["ship", str(tmp_path / "nope"), "--endpoint", "http://x", "--once"]) == 1


def test_missing_protobuf_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without opentelemetry-proto, protobuf shipping fails at once, naming the `otel` extra
    and the JSON alternative; http/json still works."""
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.proto.collector.trace.v1.trace_service_pb2", None)
    with pytest.raises(ImportError, match=r"walspan\[otel\].*http/json"):
        ShipOptions("http://127.0.0.1:1/v1/traces").check()
    ShipOptions("http://127.0.0.1:1/v1/traces", protocol="http/json").check()
    assert os.environ is not None


def test_prune_keeps_what_a_configured_shipper_has_not_had_acknowledged(tmp_path: Path) -> None:
    """Once `ship` has run on a store (its marker is there), prune removes an ended trace only
    when every configured shipper's cursor is at the end of its log: a trace ended after the
    last run, and one whose shipping gave up half-way, are kept with the reason; after a
    run that acknowledges them they go. A store never shipped prunes as before."""
    from walspan._prune import prune

    d = str(tmp_path / "s")
    write_trace(d, "shipped", 10)
    later = time.time() + 3600
    with Receiver() as rx:
        assert ship(d, rx.url).ok
        write_trace(d, "half", 100)
        rx.faults[:] = ["ok"] + ["503"] * 100
        rx.retry_after = "0"
        assert not Shipper(d, _opts(rx.url, batch_spans=30, window=1, give_up_after=0.0)).run().ok
        write_trace(d, "after", 10)
        report = prune(d, older_than=0, now=later)
        assert [t.session_id for t in report.removed] == ["shipped"]
        kept = dict(report.kept)
        assert set(kept) == {"after", "half"} and kept["half"].startswith(f"not yet shipped to {default_name(rx.url)} ({rx.url})")
        rx.faults.clear()
        assert ship(d, rx.url).ok
        assert sorted(t.session_id for t in prune(d, older_than=0, now=later).removed) == ["after", "half"]
    other = str(tmp_path / "never-shipped")
    write_trace(other, "x", 3)
    assert [t.session_id for t in prune(other, older_than=0, now=later).removed] == ["x"]


def test_one_session_is_never_shipped_by_two_shippers_at_once(tmp_path: Path) -> None:
    """A second shipper (same cursors) started while the first holds two sessions' locks
    waits for them instead of sending; once the first is done, it finds their cursors at the
    end and sends nothing: every span arrives exactly once, all from the first."""
    d = str(tmp_path / "s")
    write_trace(d, "a", 40)
    write_trace(d, "b", 40)
    entered, release = threading.Event(), threading.Event()

    def hold(n: int, fault: str) -> None:
        if n == 0:
            entered.set()
            release.wait(30)

    with Receiver() as rx:
        rx.on_request = hold
        first = Shipper(d, _opts(rx.url, window=1, headers={"x-shipper": "first"}))
        second = Shipper(d, _opts(rx.url, window=1, poll_interval=0.01, headers={"x-shipper": "second"}))
        waiting = threading.Event()

        def watch(st: object) -> None:
            if getattr(st, "waiting_for_lock", 0) == 2:
                waiting.set()
            else:
                second.request_status()

        second.on_status = watch
        second.request_status()
        results: dict[str, object] = {}
        t1 = threading.Thread(target=lambda: results.update(first=first.run()))
        t1.start()
        assert entered.wait(30)
        t2 = threading.Thread(target=lambda: results.update(second=second.run()))
        t2.start()
        assert waiting.wait(30)
        release.set()
        t1.join(30)
        t2.join(30)
        assert results["first"].ok and results["second"].ok  # type: ignore[attr-defined]
        assert results["second"].status.spans == 0  # type: ignore[attr-defined]
        assert check_in_order(rx.arrivals, end_order(d)) == 0 and len(rx.arrivals) == 84


def test_a_partial_success_is_acknowledged_and_recorded_not_retried(tmp_path: Path) -> None:
    """A 2xx whose ExportTraceServiceResponse reports rejected spans is acknowledged (the
    OTLP spec says not to retry it): the cursor moves on, nothing is re-sent, the rejected
    count and the receiver's message are recorded, and the run is not ok."""
    d = str(tmp_path / "s")
    write_trace(d, "a", 20)
    with Receiver(faults=["partial"]) as rx:
        result = Shipper(d, _opts(rx.url)).run()
        assert not result.ok and result.status.rejected_spans == 3 and result.status.spans == 22 - 3
        assert rx.requests == 1 and result.status.retries == 0
        rejects = Path(CursorStore(d, default_name(rx.url)).path, "rejected.jsonl").read_text().splitlines()
        entry = json.loads(rejects[0])
        assert entry["partial"] is True and entry["spans"] == 3 and "too old" in entry["message"]
        assert ship(d, rx.url).ok and rx.requests == 1
