"""Synthetic agent traces in the canonical shape (docs/FORMAT.md, "Canonical JSON"), built
directly as dicts: a 100,000-span trace in well under a second, for the viewer's tests and its
benchmark. The viewer only ever sees `Store.load()`'s dict, and test_view.py checks that
these dicts have exactly the keys a real `load()` gives.

Shape: `turns` agent turns, round-robin over 3 writer processes; each turn holds a user
message, then generations, each followed by tool calls (some nested one level deeper). Some
tools fail (status error, an `exception` event with a traceback), the last turn's spans are
left open in a running trace or interrupted in an ended one, and a few values carry the
truncation marker.
"""

from __future__ import annotations

import random
from typing import Any

import walspan

T0 = 1_767_000_000_000_000_000  # 2025-12-29, in ns


def _span(sid: str, parent: str | None, name: str, kind: str, start: int, end: int | None, writer: str, **kw: Any) -> dict[str, Any]:
    return {
        "span_id": sid,
        "parent_span_id": parent,
        "name": name,
        "kind": kind,
        "start_time": start,
        "end_time": end,
        "status": kw.pop("status", "ok" if end is not None else "open"),
        "status_message": kw.pop("status_message", None),
        "attributes": kw.pop("attributes", {}),
        "events": kw.pop("events", []),
        "input": kw.pop("input", None),
        "output": kw.pop("output", None),
        "writer_id": writer,
    }


def agent_trace(n_spans: int, *, seed: int = 1, status: str = "crashed", session_id: str = "ses_bench") -> dict[str, Any]:
    """A trace with exactly `n_spans` spans (see the module docstring for its shape)."""
    rng = random.Random(seed)
    writers = [f"{w:016x}" for w in (0xA1, 0xB2, 0xC3)]
    spans: list[dict[str, Any]] = []
    t = T0 + 1_000_000
    turn = 0
    marker = walspan.TRUNCATION_MARKER.format(kept=2048, total=70_000)
    counter = 0

    def new_id() -> str:
        nonlocal counter
        counter += 1
        return f"{counter:016x}"

    while len(spans) < n_spans:
        w = writers[turn % len(writers)]
        turn_id = new_id()
        turn_span = _span(turn_id, None, f"turn {turn}", "agent", t, None, w, attributes={"turn": turn})
        spans.append(turn_span)
        t += 50_000
        spans.append(_span(new_id(), turn_id, "user", "user", t, t + 10_000, w, input=f"Request {turn}: please fix test_{turn} and run the suite."))
        t += 20_000
        for g in range(rng.randint(1, 3)):
            if len(spans) >= n_spans:
                break
            g_start = t
            t += rng.randint(200_000, 2_000_000)
            spans.append(
                _span(
                    new_id(), turn_id, "llm", "generation", g_start, t, w,
                    attributes={"model": "model-large" if g % 2 == 0 else "model-small", "input_tokens": rng.randint(100, 9000), "output_tokens": rng.randint(5, 900), "temperature": 0.2},
                    input=[{"role": "user", "content": f"turn {turn} step {g}"}],
                    output=f"I'll look at test_{turn} (step {g})." + (marker if rng.random() < 0.01 else ""),
                )
            )
            for _ in range(rng.randint(0, 3)):
                if len(spans) >= n_spans:
                    break
                tool = rng.choice(("bash", "read", "edit", "grep"))
                tool_id = new_id()
                tool_start = t
                t += rng.randint(50_000, 900_000)
                failed = rng.random() < 0.03
                kw: dict[str, Any] = {
                    "attributes": {"tool": tool, "cmd": f"{tool} file_{turn}.py", "exit_code": 1 if failed else 0},
                    "input": f"{tool} file_{turn}.py",
                    "output": "ok" if not failed else None,
                }
                if failed:
                    kw["status"] = "error"
                    kw["status_message"] = "CalledProcessError: exit status 1"
                    kw["events"] = [{"name": "exception", "time": t - 1000, "attributes": {
                        "exception.type": "CalledProcessError", "exception.message": "exit status 1",
                        "exception.stacktrace": 'Traceback (most recent call last):\n  File "agent.py", line 12, in run\n    check()\nCalledProcessError: exit status 1\n'}}]
                spans.append(_span(tool_id, turn_id, tool, "tool", tool_start, t, w, **kw))
                if len(spans) < n_spans and rng.random() < 0.3:
                    spans.append(_span(new_id(), tool_id, "subprocess", "span", tool_start + 1000, t - 1000, w, attributes={"pid": rng.randint(1000, 99999)}))
        turn_span["end_time"] = t
        turn_span["status"] = "ok"
        t += 100_000
        turn += 1
    spans = spans[:n_spans]
    ended = status != "running"
    last_writer = spans[-1]["writer_id"]
    for s in spans[-4:]:  # the last turn's latest spans: cut short
        if s["writer_id"] == last_writer:
            s["end_time"] = t if ended else None
            s["status"] = "interrupted" if ended else "open"
            s["status_message"] = "trace ended" if ended else None
            s["output"] = None
    return {
        "format": "walspan-trace/1",
        "session_id": session_id,
        "trace_id": f"{rng.getrandbits(128):032x}",
        "status": status,
        "status_message": "SIGKILL (recovered)" if status == "crashed" else None,
        "start_time": T0,
        "end_time": t if ended else None,
        "metadata": {"title": f"synthetic agent trace, {n_spans} spans"},
        "spans": spans,
        "writers": [
            {"writer_id": w, "host": "build-7", "pid": 4100 + k, "process_start_time": T0, "attached_at": T0,
             "detached_at": None, "state": "lost" if ended and w == last_writer else "detached" if ended else "attached",
             "last_time": t, "message": None}
            for k, w in enumerate(writers)
        ],
        "anomalies": 0,
        "wal": {"offset": 0, "seq": 0, "last_record": 0, "salt": "0" * 16},
    }
