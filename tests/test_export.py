"""Exports of native walspan traces: Perfetto trace-event JSON structure, OTLP GenAI mapping,
JSON Lines, and the `walspan export` command."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

import walspan
from walspan import cli
from walspan.export import jsonl, otlp_json, perfetto

CTX = multiprocessing.get_context("fork")


def _worker(directory: str, parent: str, n: int, conn) -> None:  # type: ignore[no-untyped-def]
    store = walspan.Store(directory, durability="process", install_hooks=False)
    t = store.open("s")
    tools = [t.start_span(f"tool-{i}", kind="tool", parent=parent) for i in range(n)]  # overlapping
    for i, span in enumerate(tools):
        span.add_event("progress", {"i": i})
        if i % 2 == 0:
            span.end()
    conn.send("ok")
    conn.recv()  # killed here: the odd spans stay open


def _two_process_trace(directory: Path) -> dict:
    store = walspan.Store(directory, durability="process", install_hooks=False)
    t = store.open("s")
    root = t.start_span("agent", kind="agent", attributes={"agent_name": "a"})
    for i in range(200):
        t.start_span(f"llm-{i}", kind="generation", parent=root, attributes={"model": "m", "input_tokens": i}).end()
    a, b = CTX.Pipe()
    p = CTX.Process(target=_worker, args=(str(directory), root.span_id, 40, b))
    p.start()
    assert a.recv() == "ok"
    p.kill()
    p.join()
    store.recover()  # the worker is lost: its open spans are interrupted
    doc = store.load("s")
    store.close()
    return doc


def test_perfetto_trace_is_structurally_valid(tmp_path: Path) -> None:
    """Every async begin has exactly one end with the same id on the same process track, ids
    are unique per track, one process track (named) per writer, timestamps are the spans'
    nanoseconds in microseconds with end >= begin, overlapping spans of one thread are separate
    async slices, and interrupted spans are there, named as such."""
    doc = _two_process_trace(tmp_path / "t")
    out = json.loads(perfetto(doc))
    events = out["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert len(names) == len(doc["writers"]) == 2
    begins, ends = {}, {}
    for e in events:
        if e["ph"] in ("b", "e"):
            key = (e["pid"], e["cat"], e["id"])
            target = begins if e["ph"] == "b" else ends
            assert key not in target  # one begin and one end per id and track
            target[key] = e
    assert begins.keys() == ends.keys() and len(begins) == len(doc["spans"])
    by_id = {s["span_id"]: s for s in doc["spans"]}
    last = {w["writer_id"]: w["last_time"] for w in doc["writers"]}
    for key, b in begins.items():
        s = by_id[key[2][2:]]
        end = s["end_time"] if s["end_time"] is not None else max(s["start_time"], last[s["writer_id"]])  # open: last heard
        assert b["ts"] == s["start_time"] / 1000 and ends[key]["ts"] == end / 1000 >= b["ts"]
        assert b["pid"] in names
    assert [b["name"] for b in begins.values() if b["name"].endswith("[open]")] == ["agent [open]"]
    interrupted = [b for b in begins.values() if b["name"].endswith("[interrupted]")]
    assert len(interrupted) == 20 and all(b["args"]["status"] == "interrupted" for b in interrupted)
    assert sum(1 for e in events if e["ph"] == "i") == 40


def test_native_spans_map_to_genai_conventions_in_otlp(tmp_path: Path) -> None:
    """walspan's agent kinds become gen_ai.operation.name (invoke_agent, chat, execute_tool)
    with the conversation id = the session and model/usage/tool attributes renamed; prompts
    and completions appear only with include_io."""
    store = walspan.Store(tmp_path / "t", durability="process", install_hooks=False)
    t = store.open("conv-1")
    with t.span("agent", kind="agent"):
        t.start_span("llm", kind="generation", attributes={"model": "gpt-x", "provider": "openai", "input_tokens": 3, "output_tokens": 4}, input="hi").end(output="yo")
        t.start_span("grep", kind="tool", attributes={"tool_call_id": "c1"}, input={"q": "x"}).end(output="r")
    doc = store.load("conv-1")

    def attrs(include_io: bool) -> dict[str, dict]:
        data = json.loads(otlp_json(doc, include_io=include_io))
        spans = data["resourceSpans"][0]["scopeSpans"][0]["spans"]
        return {s["name"]: {kv["key"]: next(iter(kv["value"].values())) for kv in s["attributes"]} | {"kind": s["kind"]} for s in spans}

    a = attrs(False)
    assert a["agent"]["gen_ai.operation.name"] == "invoke_agent" and a["agent"]["gen_ai.conversation.id"] == "conv-1"
    assert (a["llm"]["gen_ai.operation.name"], a["llm"]["gen_ai.request.model"], a["llm"]["gen_ai.provider.name"]) == ("chat", "gpt-x", "openai")
    assert (a["llm"]["gen_ai.usage.input_tokens"], a["llm"]["gen_ai.usage.output_tokens"], a["llm"]["kind"]) == ("3", "4", 3)
    assert (a["grep"]["gen_ai.tool.name"], a["grep"]["gen_ai.tool.call.id"]) == ("grep", "c1")
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output", "gen_ai.tool.call.arg", "gen_ai.tool.call.res")) for s in a.values() for k in s)
    b = attrs(True)
    assert b["llm"]["gen_ai.input.messages"] == "hi" and b["llm"]["gen_ai.output.messages"] == "yo"
    assert b["grep"]["gen_ai.tool.call.arguments"] == '{"q": "x"}' and b["grep"]["gen_ai.tool.call.result"] == "r"
    store.close()


def test_jsonl_is_the_trace_then_one_line_per_span(tmp_path: Path) -> None:
    """jsonl: a trace line equal to the folded trace minus its spans, then each span, in order."""
    doc = _two_process_trace(tmp_path / "t")
    lines = [json.loads(x) for x in jsonl(doc).splitlines()]
    head = dict(lines[0])
    assert head.pop("type") == "trace" and head == {k: v for k, v in doc.items() if k != "spans"}
    assert [x["span_id"] for x in lines[1:]] == [s["span_id"] for s in doc["spans"]]
    assert all(x["type"] == "span" and x["session_id"] == "s" for x in lines[1:])


@pytest.mark.parametrize("fmt", ["otlp-json", "perfetto", "jsonl"])
def test_cli_export_writes_the_format_to_a_file_or_stdout(tmp_path: Path, fmt: str, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """`walspan export DIR SESSION --format F [-o FILE]` writes exactly what the function
    returns, to the file or to standard output."""
    store = walspan.Store(tmp_path / "t", durability="process", install_hooks=False)
    store.open("s").start_span("x").end()
    expected = {"otlp-json": otlp_json, "perfetto": perfetto, "jsonl": jsonl}[fmt](store.load("s"))
    out = tmp_path / "out"
    assert cli.main(["export", str(tmp_path / "t"), "s", "--format", fmt, "-o", str(out)]) == 0
    assert out.read_bytes() == expected
    capsysbinary.readouterr()
    assert cli.main(["export", str(tmp_path / "t"), "s", "--format", fmt]) == 0
    assert capsysbinary.readouterr().out == expected
    store.close()


def test_cli_export_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown session or format: one `walspan: error:` line and a non-zero exit."""
    walspan.Store(tmp_path / "t", install_hooks=False).close()
    assert cli.main(["export", str(tmp_path / "t"), "nope", "--format", "jsonl"]) == 1
    assert cli.main(["export", str(tmp_path / "t"), "nope", "--format", "svg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("walspan: error: ") for line in err)


def test_spans_model_of_split_parts_encodes_each_span_as_the_whole_trace_does(tmp_path: Path) -> None:
    """spans_model over a trace's spans cut into parts (a shipper's batches, two traces mixed in
    one) gives, span for span, the bytes model() gives for the whole trace, under the same
    resource and scope; proto_request and json_request encode the same model."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from walspan.export import json_request, proto_request, spans_model
    from walspan.export._otlp import model

    doc = _two_process_trace(tmp_path / "t")
    store = walspan.Store(tmp_path / "u", durability="process", install_hooks=False)
    other = store.open("other")
    other.start_span("x").end()
    other.end()
    doc2 = store.load("other")
    store.close()

    def flat(m: dict) -> dict[bytes, tuple]:
        return {s["span_id"]: (json.dumps(rs["resource"], sort_keys=True), ss["scope"]["name"], json.dumps(s, default=bytes.hex, sort_keys=True))
                for rs in m["resource_spans"] for ss in rs["scope_spans"] for s in ss["spans"]}

    whole = flat(model(doc)) | flat(model(doc2))
    spans = doc["spans"]
    parts = [(doc, spans[:7]), (doc2, doc2["spans"]), (doc, spans[7:])]
    mixed = spans_model(parts)
    assert flat(mixed) == whole and len(whole) == len(spans) + 1
    req = ExportTraceServiceRequest.FromString(proto_request(mixed))
    assert sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans) == len(whole)
    body = json.loads(json_request(mixed))
    assert sum(len(ss["spans"]) for rs in body["resourceSpans"] for ss in rs["scopeSpans"]) == len(whole)
    assert body["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] == spans[0]["span_id"]
