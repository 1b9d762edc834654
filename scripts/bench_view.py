#!/usr/bin/env python3
"""How fast `walspan view` pages are: writing one, and a browser making it interactive.

Builds a real store holding one agent trace of --spans spans (the shape of tests/tracegen.py:
turns with a user message, generations with model and tokens, tool calls, some failing with an
exception event, the last spans interrupted by a crash), written through the public API in
`process` durability, then:

- times `walspan view DIR SESSION` as a subprocess (load + render + write; peak RSS);
- opens the page --reps times, each in a fresh headless Chromium, and reads from the page
  when it became interactive: `readyMs`, milliseconds from navigation start to the first
  frame with rows drawn and every handler attached (it includes reading the file, parsing the
  HTML and the JSON, building the tree); also the script's JSON.parse and init times;
- in the last browser: the time a name filter takes to update the count, a click to fill the
  detail panel, and a jump to the last row to draw it.

Medians and maxima are reported, never means. Needs Chromium (see tests/browser.py).

    python scripts/bench_view.py                       # 100,000 spans, 5 page loads
    python scripts/bench_view.py --spans 20000 --reps 3 --json out.json
    python scripts/bench_view.py --screenshot docs/viewer.png   # the README's picture
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the browser driver and the trace shapes live with the tests

from browser import Chromium, find_chromium  # noqa: E402
from tracegen import agent_trace  # noqa: E402

import walspan  # noqa: E402


def build_store(directory: Path, n_spans: int, session: str) -> dict[str, Any]:
    """Write tracegen's agent trace through the real API; returns what the store then loads."""
    model = agent_trace(n_spans, status="crashed", session_id=session)
    store = walspan.Store(directory, durability="process", install_hooks=False)
    t = store.open(session, metadata=model["metadata"])
    ids: dict[str, walspan.Span] = {}
    for s in model["spans"]:
        parent = ids.get(s["parent_span_id"]) if s["parent_span_id"] else None
        ids[s["span_id"]] = sp = t.start_span(s["name"], kind=s["kind"], parent=parent, attributes=s["attributes"], input=s["input"])
        for ev in s["events"]:
            sp.add_event(ev["name"], ev["attributes"])
    for s in model["spans"]:
        if s["status"] in ("ok", "error"):
            ids[s["span_id"]].end(status=s["status"], message=s["status_message"], output=s["output"])
    t.crash("SIGKILL (benchmark)")  # the spans left open are interrupted, as after a crash
    store.close()
    return walspan.Store(directory, install_hooks=False, create=False).load(session)


def measure_page(chromium: str, page: Path, reps: int) -> dict[str, Any]:
    loads = []
    interactions: dict[str, float] = {}
    for rep in range(reps):
        with Chromium(chromium, timeout=120) as b:
            t0 = time.perf_counter()
            b.open(page)
            b.wait_for("window.walspanView && window.walspanView.ready", 120)
            wall = (time.perf_counter() - t0) * 1000
            v = b.eval("({ready: walspanView.readyMs, parse: walspanView.parseMs, init: walspanView.initMs, start: walspanView.scriptStartMs})")
            loads.append({"ready_ms": v["ready"], "script_start_ms": v["start"], "json_parse_ms": v["parse"], "init_ms": v["init"], "wall_ms": wall})
            assert b.errors() == [], b.errors()
            if rep == reps - 1:
                interactions = interact(b)
    return {"loads": loads, "interactions": interactions}


def interact(b: Chromium) -> dict[str, float]:
    out = {}
    total = b.eval("document.getElementById('count').dataset.total")
    t0 = time.perf_counter()
    b.type_text("#q", "subprocess")
    b.wait_for(f"document.getElementById('count').dataset.matches !== '{total}'")
    out["filter_ms_incl_debounce"] = (time.perf_counter() - t0) * 1000
    b.eval("(() => { const q = document.getElementById('q'); q.value = ''; q.dispatchEvent(new Event('input')); })()")
    b.wait_for(f"document.getElementById('count').dataset.matches === '{total}'")
    out["click_to_detail_ms"] = b.eval(
        "new Promise(r => { const row = document.querySelector('.row:nth-child(5)'); const t = performance.now();"
        " row.click(); requestAnimationFrame(() => r(performance.now() - t)); })"
    )
    out["jump_to_end_ms"] = b.eval(
        "new Promise(r => { const s = document.getElementById('scroller'); const t = performance.now();"
        " s.scrollTop = s.scrollHeight; requestAnimationFrame(() => requestAnimationFrame(() => r(performance.now() - t))); })"
    )
    return out


def screenshot(chromium: str, out: Path, work: Path) -> None:
    """The README's picture: a small agent trace of three writer processes that crashed, one
    failing tool selected. It is tracegen's dict as it is (the shape `load()` gives): the
    public API stamps span times itself, so a trace written through it in a loop would show
    every span at the same instant."""
    trace = agent_trace(60, seed=3, status="crashed", session_id="ses_demo")
    page = work / "demo.html"
    from walspan.view import render_trace

    page.write_text(render_trace(trace), encoding="utf-8")
    failed = next(s for s in trace["spans"] if s["status"] == "error")
    with Chromium(chromium, width=1280, height=720) as b:
        b.open(page, fragment=f"#span={failed['span_id']}")  # the page selects and shows that span
        b.wait_for("window.walspanView && window.walspanView.ready")
        b.screenshot(out)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5, help="page loads, each in a fresh browser")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--screenshot", help="write the README's screenshot here and stop")
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("bench_view: no Chromium found (apt-get install chromium, or set WALSPAN_CHROMIUM)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="walspan-bench-view-"))
    try:
        if args.screenshot:
            screenshot(chromium, Path(args.screenshot), work)
            return 0
        session = "ses_bench"
        t0 = time.perf_counter()
        trace = build_store(work / "store", args.spans, session)
        print(f"store: {len(trace['spans']):,} spans written in {time.perf_counter() - t0:.1f} s")
        page = work / "trace.html"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "walspan.cli", "view", str(work / "store"), session, "-o", str(page)], check=True, stdout=subprocess.DEVNULL)
        view_s = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        size = page.stat().st_size
        print(f"walspan view: {view_s:.2f} s, page {size / 1e6:.1f} MB, peak RSS {rss / 1024:.0f} MiB" + (" (an earlier child's)" if rss == before else ""))
        res = measure_page(chromium, page, args.reps)
        ready = [x["ready_ms"] for x in res["loads"]]
        print(f"interactive (readyMs, {args.reps} fresh browsers): median {statistics.median(ready):,.0f} ms, max {max(ready):,.0f} ms")
        for key in ("script_start_ms", "json_parse_ms", "init_ms"):
            vals = [x[key] for x in res["loads"]]
            print(f"  {key}: median {statistics.median(vals):,.0f} ms")
        for key, val in res["interactions"].items():
            print(f"  {key}: {val:,.0f} ms")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "spans": len(trace["spans"]), "view_seconds": view_s, "page_bytes": size, "view_peak_rss_kib": rss,
                "chromium": subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip(),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                **res,
            }, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
