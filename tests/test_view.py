"""`walspan view` without a browser: the page embeds exactly the trace `load()` gives, hostile
strings stay data (never markup), the page is self-contained with a policy that allows no
network, the assets ship in a wheel, and the CLI writes where it says and fails in one line.
(What the page does with the data in a real browser: test_view_browser.py.)"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tracegen import agent_trace
from walfiles import flip_byte, record_offsets

import walspan
from walspan.cli import main
from walspan.view import render_index, render_trace, write_index
from walspan.view._page import embed_json

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = [
    "</script><script>alert(1)</script>",
    "</SCRIPT >",
    "<!--<script>",
    '<img src=x onerror="alert(2)">',
    "\u2028\u2029",
    "\x1b[31mred\x1b[0m\x00\x07\r\n\t",
    "\u202egnp.exe",
    "&lt;&amp;",
    "{{DATA}}{{SCRIPT}}",
]


class _Page(html.parser.HTMLParser):
    """Every start tag, and the text of each <script>, as the HTML tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.title = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style", "title"):
            self._in = tag
            if tag == "script":
                self.scripts.append("")
            elif tag == "style":
                self.styles.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.scripts[-1] += data
        elif self._in == "style":
            self.styles[-1] += data
        elif self._in == "title":
            self.title += data


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def _embedded(page: str) -> dict[str, Any]:
    p = _parse(page)
    data_scripts = [i for i, (t, a) in enumerate(x for x in p.tags if x[0] == "script") if a.get("type") == "application/json"]
    assert data_scripts == [0], "exactly one data element, first"
    data: dict[str, Any] = json.loads(p.scripts[0])
    return data


def _tag_names(page: str) -> list[str]:
    return [t for t, _ in _parse(page).tags]


EMPTY_PAGE_TAGS = _tag_names(render_trace(agent_trace(3)))


def _demo_store(directory: Path, **kw: Any) -> walspan.Store:
    s = walspan.Store(directory, durability="process", install_hooks=False, **kw)
    t = s.open("ses/1", metadata={"title": "demo"})
    with t.span("turn", kind="agent"):
        t.start_span("ask", kind="user", input="list the files").end()
        g = t.start_span("llm", kind="generation", attributes={"model": "m-1", "input_tokens": 12, "output_tokens": 3})
        g.end(output="running ls")
        with t.span("bash", kind="tool", attributes={"cmd": "ls"}, input="ls") as sp:
            sp.add_event("stdout", {"bytes": 3})
    t.end()
    s.open("ses 2").start_span("open-span")
    return s


# -- the page and its data -----------------------------------------------------------------


def test_page_embeds_exactly_the_loaded_trace(tmp_path: Path) -> None:
    """The page's data element holds `Store.load()`'s dict unchanged (nothing dropped or
    reshaped), with the truncation marker template the page highlights."""
    s = _demo_store(tmp_path / "st")
    trace = s.load("ses/1")
    data = _embedded(render_trace(trace))
    assert data["kind"] == "trace"
    assert data["trace"] == trace
    assert data["truncation_marker"] == walspan.TRUNCATION_MARKER


def test_synthetic_traces_have_the_shape_load_gives(tmp_path: Path) -> None:
    """tracegen's dicts (used by the browser tests at 100,000 spans) have exactly the keys of a
    real `load()`: trace, span, event and writer keys."""
    real = _demo_store(tmp_path / "st").load("ses/1")
    fake = agent_trace(500)
    assert set(fake) == set(real)
    assert {frozenset(s) for s in fake["spans"]} == {frozenset(real["spans"][0])}
    assert {frozenset(w) for w in fake["writers"]} == {frozenset(real["writers"][0])}
    real_events = [e for s in real["spans"] for e in s["events"]]
    fake_events = [e for s in fake["spans"] for e in s["events"]]
    assert fake_events and {frozenset(e) for e in fake_events} == {frozenset(real_events[0])}
    assert len(fake["spans"]) == 500 and len({s["span_id"] for s in fake["spans"]}) == 500


@pytest.mark.parametrize("text", HOSTILE)
def test_embed_json_escapes_what_could_end_the_script(text: str) -> None:
    """`<`, `>`, `&`, U+2028 and U+2029 never appear raw in embedded JSON, and it still
    decodes to the same value."""
    out = embed_json({"k" + text: [text, {"v": text}]})
    assert not set("<>&\u2028\u2029") & set(out)
    assert json.loads(out) == {"k" + text: [text, {"v": text}]}


_hostile_text = st.one_of(st.sampled_from(HOSTILE), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sid=_hostile_text, name=_hostile_text, key=_hostile_text, value=_hostile_text)
def test_hostile_strings_stay_data(sid: str, name: str, key: str, value: str) -> None:
    """Whatever a traced program wrote (session id, span name, attribute keys and values,
    metadata, input, output), the HTML tokenizer sees the same elements as for a harmless
    trace, and the data element decodes to exactly the trace: no string can close the script
    element or start markup."""
    trace = agent_trace(3, session_id=sid or "x")
    trace["metadata"] = {key: value, "title": value}
    span = trace["spans"][0]
    span.update(name=name, attributes={key: value}, input=value, output=[value, {key: name}], status_message=value)
    span["events"] = [{"name": name, "time": span["start_time"], "attributes": {"exception.stacktrace": value}}]
    page = render_trace(trace)
    assert _tag_names(page) == EMPTY_PAGE_TAGS
    assert _embedded(page)["trace"] == trace
    parsed = _parse(page)
    assert "\x1b" not in parsed.title and "\u202e" not in parsed.title  # shown as escapes


def test_index_page_keeps_hostile_ids_as_data() -> None:
    """The index page embeds its rows the same safe way."""
    rows = [{"session_id": t, "href": "a.html", "status": t, "error": None, "spans": 1} for t in HOSTILE]
    page = render_index(rows, source="</script>")
    tags = _tag_names(page)
    assert tags.count("script") == 2 and "img" not in tags
    assert _embedded(page)["sessions"] == rows


def test_page_is_self_contained_and_its_policy_allows_only_its_own_code() -> None:
    """The page references nothing outside itself (no src/href/url(), no http), and its
    Content-Security-Policy allows no network, only the inline script and stylesheet whose
    SHA-256 it names (the browser refuses a script whose hash differs)."""
    page = render_trace(agent_trace(50))
    parsed = _parse(page)
    for tag, attrs in parsed.tags:
        assert not {"src", "href"} & set(attrs), (tag, attrs)
    assert not re.search(r"https?:|url\(|@import|//[a-z]", "".join(parsed.styles) + parsed.scripts[1])
    (csp,) = [a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp is not None
    rules = dict(r.strip().split(" ", 1) for r in csp.split(";"))
    assert rules["default-src"] == "'none'" and rules["img-src"] == "data:"

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert rules["script-src"] == sha(parsed.scripts[1])
    assert rules["style-src"] == sha(parsed.styles[0])


def test_assets_ship_in_the_wheel(tmp_path: Path) -> None:
    """A wheel built from the project holds the page's template, scripts and stylesheet, and
    `walspan.view` imported from that wheel (not from the checkout) renders a page."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "walspan", src / "walspan", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("walspan-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("template.html", "viewer.css", "common.js", "trace.js", "index.js"):
        assert f"walspan/view/{asset}" in names
    code = (
        "import walspan.view as v, sys; assert v.__file__.startswith(sys.argv[1]), v.__file__;"
        "page = v.render_trace({'session_id': 's', 'spans': []}); assert 'walspanView' in page and '{{' not in page;"
        "print('ok')"
    )
    env = dict(os.environ, PYTHONPATH=str(wheel))
    run = subprocess.run([sys.executable, "-c", code, str(wheel)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.stdout.strip() == "ok", run.stderr


# -- the command line ----------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("walspan: error: ")
    return lines[0]


def test_view_session_writes_stem_html_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`walspan view DIR SESSION` writes ./<stem>.html (the session's path-safe file stem),
    says where, and the page holds that session's trace; -o names another file, or a
    directory to write <stem>.html into."""
    s = _demo_store(tmp_path / "st")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["view", str(tmp_path / "st"), "ses/1"]) == 0
    assert capsys.readouterr().out.strip() == "wrote ses_2f1.html (4 spans)"
    assert _embedded((work / "ses_2f1.html").read_text(encoding="utf-8"))["trace"] == s.load("ses/1")
    assert main(["view", str(tmp_path / "st"), "ses 2", "-o", str(tmp_path / "two.html")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'two.html'} (1 span)"
    assert _embedded((tmp_path / "two.html").read_text(encoding="utf-8"))["trace"]["session_id"] == "ses 2"
    assert main(["view", str(tmp_path / "st"), "ses 2", "-o", str(work)]) == 0
    assert (work / "ses_202.html").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["ses_202.html", "ses_2f1.html"]  # no temporary files left


def test_view_errors_are_one_line_and_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown session, a missing store, an output directory that does not exist, and a
    corrupt WAL each give one `walspan: error:` line naming what is wrong and a non-zero exit,
    and leave no file behind."""
    s = _demo_store(tmp_path / "st")
    monkeypatch.chdir(tmp_path)
    assert main(["view", str(tmp_path / "st"), "nope"]) == 1
    assert "nope" in _one_error_line(capsys.readouterr().err)
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert "no such directory" in _one_error_line(capsys.readouterr().err)
    assert main(["view", str(tmp_path / "st"), "ses/1", "-o", str(tmp_path / "no" / "x.html")]) == 1
    assert str(tmp_path / "no" / "x.html") in _one_error_line(capsys.readouterr().err)
    wal = s.wal_path("ses/1")
    off, end, _, _ = record_offsets(wal)[1]
    flip_byte(wal, (off + end) // 2)
    assert main(["view", str(tmp_path / "st"), "ses/1"]) == 1
    assert str(wal) in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


def test_view_store_writes_an_index_and_a_page_per_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`walspan view DIR` writes ./<DIR name>-view/index.html listing every session (status,
    span count, start time as `load()` says) linking to a page per session written beside it;
    a corrupt session is listed as unreadable with its error, reported on stderr in one line,
    and the exit code is 1, while the other sessions' pages are still written."""
    s = _demo_store(tmp_path / "st")
    for k in range(3):
        t = s.open(f"extra/{k}")
        for j in range(k * 10):
            t.start_span(f"s{j}").end()
        t.end("error" if k == 1 else "completed")
    monkeypatch.chdir(tmp_path)
    assert main(["view", str(tmp_path / "st")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {Path('st-view', 'index.html')} and 5 session page(s) beside it"
    out = tmp_path / "st-view"
    rows = _embedded((out / "index.html").read_text(encoding="utf-8"))["sessions"]
    assert sorted(r["session_id"] for r in rows) == sorted(s.sessions())
    for r in rows:
        t = s.load(r["session_id"])
        assert (r["status"], r["spans"], r["start_time"], r["trace_id"]) == (t["status"], len(t["spans"]), t["start_time"], t["trace_id"])
        assert _embedded((out / r["href"]).read_text(encoding="utf-8"))["trace"] == t
    wal = s.wal_path("extra/2")
    off, end, _, _ = record_offsets(wal)[3]
    flip_byte(wal, (off + end) // 2)
    assert main(["view", str(tmp_path / "st"), "-o", str(tmp_path / "again")]) == 1
    captured = capsys.readouterr()
    assert str(wal) in _one_error_line(captured.err)
    rows = _embedded((tmp_path / "again" / "index.html").read_text(encoding="utf-8"))["sessions"]
    (bad,) = [r for r in rows if r["error"]]
    assert bad["session_id"] == "extra/2" and bad["href"] is None and str(wal) in bad["error"]
    assert len(list((tmp_path / "again").glob("*.html"))) == 1 + 4


def test_index_leaves_out_a_session_removed_while_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session listed by `sessions()` whose WAL is gone when its turn comes (pruned beside
    us) is left out of the index, not reported as unreadable."""
    s = _demo_store(tmp_path / "st")
    real = s.sessions()
    monkeypatch.setattr(s, "sessions", lambda: sorted(real + ["gone"]))
    result = write_index(s, tmp_path / "out")
    assert result.failed == [] and len(result.pages) == len(real)
    rows = _embedded(result.index.read_text(encoding="utf-8"))["sessions"]
    assert sorted(r["session_id"] for r in rows) == sorted(real)


def test_view_json_says_what_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`walspan view --json` prints one JSON object: the page and its span count for a
    session, the index, every page and the unreadable sessions for a store; the files exist."""
    import json as _json

    from walspan.cli import main

    store = walspan.Store(tmp_path / "s", install_hooks=False)
    t = store.open("a")
    t.start_span("x").end()
    t.close()
    store.close()
    monkeypatch.chdir(tmp_path)
    assert main(["view", str(tmp_path / "s"), "a", "--json"]) == 0
    one = _json.loads(capsys.readouterr().out)
    assert one["session_id"] == "a" and one["spans"] == 1 and Path(one["page"]).is_file()
    assert main(["view", str(tmp_path / "s"), "--json", "-o", str(tmp_path / "site")]) == 0
    many = _json.loads(capsys.readouterr().out)
    assert Path(many["index"]).is_file() and len(many["pages"]) == 1 and many["unreadable"] == []
