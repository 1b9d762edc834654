"""`walspan view` pages in a real headless Chromium: every span is reachable, a click shows
its details (attributes, events, the exception's traceback, input and output with the
truncation marker), filters count what they should, the conversation view shows the agent's
turns, the index links to working pages, hostile strings run nothing, the page makes no
request, and the console stays free of errors. A screenshot of each page is kept in the
test's tmp dir. Skipped when no Chromium is installed (see tests/browser.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import Chromium, find_chromium
from tracegen import agent_trace

import walspan
from walspan.cli import main
from walspan.view import render_trace

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium, or set WALSPAN_CHROMIUM)")

# Sanity bound on the 100,000-span page becoming interactive. Measured (scripts/bench_view.py,
# docs/VIEWER.md): a median of 1.3-1.9 s on 2 shared cores; this is more than 10x that, to
# catch a page that hangs or renders every row, never to time the normal case.
INTERACTIVE_BOUND_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    assert CHROMIUM is not None
    with Chromium(CHROMIUM) as b:
        yield b


@pytest.fixture
def page(browser: Chromium) -> Iterator[Chromium]:
    """The shared browser, its logs cleared for this test."""
    browser.console.clear()
    browser.exceptions.clear()
    browser.requests.clear()
    browser.dialogs.clear()
    yield browser


def _open(b: Chromium, path: Path, timeout: float = 30.0) -> None:
    b.open(path)
    b.wait_for("window.walspanView && window.walspanView.ready", timeout)


def _count(b: Chromium) -> dict[str, str]:
    counts: dict[str, str] = b.eval("Object.assign({}, document.getElementById('count').dataset)")
    return counts


def _rows(b: Chromium) -> list[dict[str, Any]]:
    """The rows in the DOM that are displayed, top to bottom: span id, name, top offset."""
    rows: list[dict[str, Any]] = b.eval(
        "[...document.querySelectorAll('.row')].filter(r => r.style.display !== 'none')"
        ".map(r => ({id: r.dataset.spanId, name: r.querySelector('.nm').textContent, top: r.offsetTop}))"
        ".sort((a, b) => a.top - b.top)"
    )
    return rows


def _writer_labels(b: Chromium) -> dict[str, str]:
    """Span id -> the writer label its row shows."""
    labels: dict[str, str] = b.eval(
        "Object.fromEntries([...document.querySelectorAll('.row')].filter(r => r.style.display !== 'none')"
        ".map(r => [r.dataset.spanId, r.querySelector('.wr').textContent]))"
    )
    return labels


def _selected(b: Chromium) -> str:
    sid: str = b.eval("document.querySelector('.row.sel').dataset.spanId")
    return sid


def _detail(b: Chromium) -> str:
    text: str = b.eval("document.getElementById('detail').innerText")
    return text


def _clean(b: Chromium, page: Path) -> None:
    """No console error, no uncaught exception, no dialog, no request but the page itself."""
    assert b.errors() == []
    assert b.dialogs == []
    assert set(b.requests) <= {page.resolve().as_uri()}


def _dfs(trace: dict[str, Any]) -> list[str]:
    """Span ids in the order the waterfall lists them: depth first, children in start order."""
    ids = {s["span_id"] for s in trace["spans"]}
    kids: dict[str | None, list[str]] = {}
    for s in trace["spans"]:
        kids.setdefault(s["parent_span_id"] if s["parent_span_id"] in ids else None, []).append(s["span_id"])
    out: list[str] = []
    stack = list(reversed(kids.get(None, [])))
    while stack:
        sid = stack.pop()
        out.append(sid)
        stack.extend(reversed(kids.get(sid, [])))
    return out


def _agent_store(directory: Path) -> tuple[walspan.Store, str]:
    s = walspan.Store(directory, durability="process", install_hooks=False, max_value_bytes=400)
    t = s.open("agent/1", metadata={"title": "fix the failing test"})
    with t.span("turn 1", kind="agent"):
        t.start_span("user", kind="user", input="Please fix test_parse.").end()
        g = t.start_span("llm", kind="generation", attributes={"gen_ai.request.model": "model-9", "gen_ai.usage.input_tokens": 1234, "gen_ai.usage.output_tokens": 56})
        g.end(output="I will read the file first.")
        with t.span("read", kind="tool", attributes={"gen_ai.tool.name": "read_file", "path": "parse.py"}, input="parse.py") as sp:
            sp.set_attributes({"lines": 900})
        read_out = t.start_span("read-big", kind="tool", input="big.log")
        read_out.end(output="L" * 1000)  # cut at 400 bytes: carries the truncation marker
        try:
            with t.span("edit", kind="tool", input="patch parse.py") as ed:
                try:
                    raise KeyError("line 12")
                except KeyError as exc:
                    import traceback

                    ed.add_event("exception", {
                        "exception.type": "KeyError",
                        "exception.message": str(exc),
                        "exception.stacktrace": "".join(traceback.format_exception(exc)),
                    })
                    raise
        except KeyError:
            pass
    t.start_span("still running", kind="tool", input="sleep 100")
    return s, "agent/1"


def test_small_trace_every_span_shown_click_shows_details(page: Chromium, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page written by `walspan view`: the page reports every span and draws a row for each
    (ids and names as stored), the exception's type and traceback, the attributes, the events
    and the input/output (with the truncation marker highlighted) appear on click, nothing
    errs or goes to the network; screenshot kept."""
    s, sid = _agent_store(tmp_path / "st")
    monkeypatch.chdir(tmp_path)
    assert main(["view", str(tmp_path / "st"), sid, "-o", "agent.html"]) == 0
    trace = s.load(sid)
    html = tmp_path / "agent.html"
    _open(page, html)
    assert _count(page) == {"total": "7", "matches": "7", "rows": "7"}
    rows = _rows(page)
    assert [r["id"] for r in rows] == _dfs(trace)
    by_id = {sp["span_id"]: sp for sp in trace["spans"]}
    assert [r["name"] for r in rows] == [by_id[r["id"]]["name"] for r in rows]
    pid = {w["writer_id"]: w["pid"] for w in trace["writers"]}
    assert _writer_labels(page) == {sid_: f"pid {pid[by_id[sid_]['writer_id']]}" for sid_ in by_id}

    edit = next(sp for sp in trace["spans"] if sp["name"] == "edit")
    page.click(f'.row[data-span-id="{edit["span_id"]}"]')
    text = _detail(page)
    assert "KeyError: 'line 12'" in text  # status message from the with-block
    assert "Traceback (most recent call last)" in text and 'raise KeyError("line 12")' in text
    assert "patch parse.py" in text and edit["span_id"] in text
    assert page.eval("document.querySelector('.row.sel').dataset.spanId") == edit["span_id"]

    big = next(sp for sp in trace["spans"] if sp["name"] == "read-big")
    page.click(f'.row[data-span-id="{big["span_id"]}"]')
    marks = page.eval("[...document.querySelectorAll('#detail mark.trunc')].map(m => m.textContent)")
    assert marks == [walspan.TRUNCATION_MARKER.format(kept=400, total=1000)]
    assert "cut at the store's size cap" in _detail(page)

    read = next(sp for sp in trace["spans"] if sp["name"] == "read")
    page.click(f'.row[data-span-id="{read["span_id"]}"]')
    text = _detail(page)
    assert "read_file" in text and "900" in text and "parse.py" in text

    page.click(f'.row[data-span-id="{rows[-1]["id"]}"]')  # the open span
    assert "open" in page.eval("document.querySelector('#detail .pill').textContent")

    # keyboard: up moves the selection, left goes to the parent, left again collapses it
    page.click(f'.row[data-span-id="{rows[2]["id"]}"]')
    page.key("ArrowUp", "ArrowUp", 38)
    assert _selected(page) == rows[1]["id"]
    page.key("ArrowLeft", "ArrowLeft", 37)
    assert _selected(page) == rows[0]["id"]  # the turn
    page.key("ArrowLeft", "ArrowLeft", 37)
    assert _count(page)["rows"] == "2"  # the collapsed turn and the open root span
    page.key("ArrowRight", "ArrowRight", 39)
    assert _count(page)["rows"] == "7"
    page.click(f'.row[data-span-id="{rows[0]["id"]}"] .tog')  # the triangle collapses too
    assert [r["id"] for r in _rows(page)] == [rows[0]["id"], rows[-1]["id"]]
    page.click(f'.row[data-span-id="{rows[0]["id"]}"] .tog')
    assert _count(page)["rows"] == "7"
    page.screenshot(tmp_path / "agent.png")
    assert (tmp_path / "agent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _clean(page, html)


def test_conversation_view_shows_messages_generations_and_tools(page: Chromium, tmp_path: Path) -> None:
    """The conversation tab lists the user message, the generation (model and tokens) and the
    tool calls (tool name, input, output) in start order; a card click shows its span."""
    s, sid = _agent_store(tmp_path / "st")
    html = tmp_path / "agent.html"
    html.write_text(render_trace(s.load(sid)), encoding="utf-8")
    _open(page, html)
    page.click("#tab-conversation")
    cards = page.eval("[...document.querySelectorAll('#conversation .card')].map(c => c.innerText)")
    assert [c.split("\n")[0].split(" ")[0] for c in cards] == ["Agent", "User", "Generation", "Tool", "Tool", "Tool", "Tool"]
    assert "Please fix test_parse." in cards[1]
    assert "model-9" in cards[2] and "1,234 in · 56 out tokens" in cards[2] and "I will read the file first." in cards[2]
    assert "read_file" in cards[3] and "parse.py" in cards[3]
    head = page.eval("document.querySelector('.conv-head').textContent")
    assert head.startswith("1 user message(s) · 1 generation(s), 1,234 input / 56 output tokens · 4 tool call(s)")
    page.click("#conversation .card.c-generation")
    assert "model-9" in _detail(page)
    page.screenshot(tmp_path / "conversation.png")
    _clean(page, html)


def test_hostile_strings_run_nothing_and_the_page_cannot_fetch(page: Chromium, tmp_path: Path) -> None:
    """Session id, names, attributes and input holding `</script>`, `<img onerror>` and
    control characters are shown as text: no dialog opens, no element is injected, the title
    shows escapes for control characters; and the page's policy blocks loading even a local
    image."""
    evil = "</script><script>alert(1)</script><img src=x onerror=alert(2)>\x1b[31m"
    trace = agent_trace(20, session_id=evil)
    trace["spans"][1].update(name=evil, attributes={evil: evil}, input=evil)
    html = tmp_path / "evil.html"
    html.write_text(render_trace(trace), encoding="utf-8")
    _open(page, html)
    assert page.eval("document.querySelectorAll('img, iframe, object, embed').length") == 0
    assert page.eval("document.scripts.length") == 2
    assert page.eval("document.title") == "</script><script>alert(1)</script><img src=x onerror=alert(2)>\\u001b[31m · walspan"
    page.click(f'.row[data-span-id="{trace["spans"][1]["span_id"]}"]')
    assert page.eval("document.querySelector('#detail h2').textContent") == evil.replace("\x1b", "\\u001b")
    _clean(page, html)
    png = tmp_path / "evil.png"
    page.screenshot(png)
    blocked = page.eval(
        "new Promise(r => { const i = new Image(); i.onload = () => r('loaded'); i.onerror = () => r('blocked');"
        f" i.src = {json.dumps(png.resolve().as_uri())}; }})"
    )
    assert blocked == "blocked"


def test_100k_spans_virtualised_filters_and_details(page: Chromium, tmp_path: Path) -> None:
    """A 100,000-span trace: the page becomes interactive (within a sanity bound far above the
    measured time), reports 100,000 spans while keeping only a screenful of rows in the DOM;
    rows after scrolling to the middle and the end are the spans the tree order puts there;
    name, kind and status filters count what Python counts; collapse all leaves the roots;
    a click after scrolling shows that span; screenshot kept."""
    n = 100_000
    trace = agent_trace(n, status="crashed")
    order = _dfs(trace)
    html = tmp_path / "big.html"
    html.write_text(render_trace(trace), encoding="utf-8")
    _open(page, html, timeout=INTERACTIVE_BOUND_MS / 1000)
    ready_ms = page.eval("walspanView.readyMs")
    assert ready_ms < INTERACTIVE_BOUND_MS
    assert _count(page) == {"total": str(n), "matches": str(n), "rows": str(n)}
    assert page.eval("document.querySelectorAll('.row').length") < 200
    row_h = page.eval("document.querySelector('.row').offsetHeight")
    for k in (0, n // 2 + 7, n - 1):
        page.eval(f"document.getElementById('scroller').scrollTop = {k * row_h}")
        page.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        rows = _rows(page)
        ids = [r["id"] for r in rows]
        assert order[k] in ids
        start = ids.index(order[k])
        assert ids[start:] == order[k : k + len(ids) - start]
        assert rows[start]["top"] == k * row_h
    last = order[-1]
    page.click(f'.row[data-span-id="{last}"]')
    by_id = {s["span_id"]: s for s in trace["spans"]}
    pid = {w["writer_id"]: w["pid"] for w in trace["writers"]}
    labels = _writer_labels(page)
    assert len({by_id[i]["writer_id"] for i in labels}) > 1  # rows of several writers in view
    assert labels == {i: f"pid {pid[by_id[i]['writer_id']]}" for i in labels}
    assert by_id[last]["name"] in page.eval("document.querySelector('#detail h2').textContent")
    assert "crashed" == page.eval("document.querySelector('#detail .pill').textContent")

    def settle(expect_matches: int) -> dict[str, str]:
        page.wait_for(f"document.getElementById('count').dataset.matches === '{expect_matches}'")
        return _count(page)

    page.type_text("#q", "subprocess")
    want = sum(1 for s in trace["spans"] if "subprocess" in s["name"])
    counts = settle(want)
    parents = {s["parent_span_id"] for s in trace["spans"] if "subprocess" in s["name"]}
    grand = {by_id[p]["parent_span_id"] for p in parents}
    assert int(counts["rows"]) == want + len(parents) + len(grand)  # matches with their ancestors
    page.eval("(() => { const q = document.getElementById('q'); q.value = ''; q.dispatchEvent(new Event('input')); })()")
    settle(n)
    for sel, value, pred in (("#kind", "generation", lambda s: s["kind"] == "generation"), ("#status", "error", lambda s: s["status"] == "error")):
        page.eval(f"(() => {{ const e = document.querySelector('{sel}'); e.value = '{value}'; e.dispatchEvent(new Event('change')); }})()")
        settle(sum(1 for s in trace["spans"] if pred(s)))
        page.eval(f"(() => {{ const e = document.querySelector('{sel}'); e.value = ''; e.dispatchEvent(new Event('change')); }})()")
        settle(n)
    # the conversation view adds its cards in chunks as it scrolls
    page.click("#tab-conversation")
    in_conv = sum(1 for s in trace["spans"] if s["kind"] in ("user", "generation", "tool", "agent"))
    assert page.eval("document.querySelector('.conv-head').textContent").startswith(
        f"{sum(1 for s in trace['spans'] if s['kind'] == 'user'):,} user message(s)"
    )
    first = page.eval("document.querySelectorAll('#conversation .card').length")
    assert 0 < first < 1000
    page.eval("(() => { const c = document.getElementById('conversation'); c.scrollTop = c.scrollHeight; })()")
    page.wait_for(f"document.querySelectorAll('#conversation .card').length > {first}")
    assert page.eval("document.querySelector('.sentinel').textContent") == f"{in_conv - 2 * first:,} more…"
    page.click("#tab-waterfall")
    page.click("#collapse-all")
    roots = sum(1 for s in trace["spans"] if s["parent_span_id"] is None)
    assert _count(page)["rows"] == str(roots)
    page.click("#expand-all")
    assert _count(page)["rows"] == str(n)
    page.screenshot(tmp_path / "big.png")
    _clean(page, html)


def test_index_lists_sessions_and_links_to_their_pages(page: Chromium, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`walspan view DIR`: the index page shows one row per session with its status and span
    count, and following a session's link opens a working page of that session."""
    s, sid = _agent_store(tmp_path / "st")
    t = s.open("other <b>2</b>")
    t.start_span("x").end()
    t.end("error", "boom")
    monkeypatch.chdir(tmp_path)
    assert main(["view", str(tmp_path / "st"), "-o", "site"]) == 0
    index = tmp_path / "site" / "index.html"
    _open(page, index)
    rows = page.eval("[...document.querySelectorAll('table.index tbody tr')].map(r => [...r.cells].map(c => c.innerText))")
    table = {r[0]: r for r in rows}
    assert set(table) == {"agent/1", "other <b>2</b>"}
    assert table["agent/1"][1].startswith("running") and table["agent/1"][2] == "7"
    assert table["other <b>2</b>"][1].startswith("error") and table["other <b>2</b>"][2] == "1"
    page.screenshot(tmp_path / "index.png")
    _clean(page, index)
    href = page.eval("[...document.querySelectorAll('table.index a')].find(a => a.textContent === 'other <b>2</b>').href")
    assert re.fullmatch(r"file://.*/site/[a-z0-9_~-]+\.html", href)
    page.click("table.index a[href$='3e.html']")
    page.wait_for("window.walspanView && window.walspanView.ready && window.walspanView.spans === 1")
    assert page.eval("document.querySelector('.sid').textContent") == "other <b>2</b>"
    assert page.errors() == [] and page.dialogs == []


def test_spans_with_missing_or_cyclic_parents_still_get_a_row(page: Chromium, tmp_path: Path) -> None:
    """A span whose parent is not in the trace (a parent id handed over from elsewhere) and
    spans whose parents form a cycle (only in a hand-edited file) are drawn as roots, marked,
    so every span of the trace has exactly one row."""
    trace = agent_trace(30, status="completed")
    spans = trace["spans"]
    spans[3]["parent_span_id"] = "f" * 16  # not in the trace
    a, b = spans[10], spans[11]
    a["parent_span_id"], b["parent_span_id"] = b["span_id"], a["span_id"]
    html = tmp_path / "odd.html"
    html.write_text(render_trace(trace), encoding="utf-8")
    _open(page, html)
    assert _count(page)["rows"] == "30"
    rows = _rows(page)
    assert sorted(r["id"] for r in rows) == sorted(s["span_id"] for s in spans)
    names = {r["id"]: r["name"] for r in rows}
    assert names[spans[3]["span_id"]].endswith("(parent not in trace)")
    assert any(names[s["span_id"]].endswith("(parent cycle)") for s in (a, b))
    _clean(page, html)
