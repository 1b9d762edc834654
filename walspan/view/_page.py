"""Building the HTML pages: the template, the inlined assets, and the one safe way to embed data.

Safety rests on two rules. Data (session ids, names, attribute values: anything a traced
program wrote) enters a page only as JSON inside a `<script type="application/json">` element,
with `<`, `>`, `&`, U+2028 and U+2029 written as JSON escapes, so no value can close that
element or start markup; the script reads it with JSON.parse and shows it through textContent,
never as HTML. And the page's Content-Security-Policy allows only the page's own inline script
and stylesheet (by their SHA-256) and no network at all, so even a mistake in the first rule
could neither run a script nor fetch anything.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import html
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# only walspan's public read side: Store.sessions(), Store.load() and the marker's template
from .. import TRUNCATION_MARKER, Store, __version__
from ..errors import SessionNotFoundError, WalspanError

# JSON text may hold these raw; in an HTML script element they could end it ("</script>"),
# open a comment ("<!--") or, for U+2028/2029, break older JavaScript parsers. Inside JSON
# they can only occur within strings, where the \uXXXX escape means the same character.
_JSON_HTML_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))
_SLOT = re.compile(r"\{\{([A-Z_]+)\}\}")


def embed_json(value: Any) -> str:
    """`value` as JSON text that is safe to place inside a <script> element."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in _JSON_HTML_ESCAPES:  # str.replace runs at memchr speed; translate() does not
        text = text.replace(raw, escaped)
    return text


@functools.cache
def _asset(name: str) -> str:
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    if name.endswith((".js", ".css")) and re.search(r"</(script|style)", text, re.IGNORECASE):
        raise RuntimeError(f"walspan.view asset {name} contains a closing tag")  # would end its element
    return text


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _page(kind: str, title: str, data: dict[str, Any]) -> str:
    style = _asset("viewer.css")
    script = _asset("common.js") + "\n" + _asset(f"{kind}.js")
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(script)}; style-src {_csp_hash(style)}; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    slots = {
        "TITLE": html.escape(title, quote=True),
        "CSP": html.escape(csp, quote=True),
        "STYLE": style,
        "SCRIPT": script,
        "DATA": embed_json(data),
    }
    # one pass over the template: a substituted value is never scanned for slots again
    return _SLOT.sub(lambda m: slots[m.group(1)], _asset("template.html"))


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _printable(text: str, limit: int = 120) -> str:
    """A short title for the browser tab: control and bidi characters shown as escapes."""
    out = re.sub(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]", lambda m: f"\\u{ord(m.group()):04x}", text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def render_trace(trace: dict[str, Any], *, source: str | None = None) -> str:
    """The self-contained HTML page of one trace (a dict shaped like `Store.load()`'s)."""
    data = {
        "kind": "trace",
        "trace": trace,
        "truncation_marker": TRUNCATION_MARKER,
        "source": source,
        "generated_at": _now_iso(),
        "walspan_version": __version__,
    }
    return _page("trace", f"{_printable(str(trace.get('session_id')))} · walspan", data)


def render_index(rows: list[dict[str, Any]], *, source: str | None = None) -> str:
    """The index page of a store: one row per session (see `write_index` for the fields)."""
    data = {
        "kind": "index",
        "sessions": rows,
        "source": source,
        "generated_at": _now_iso(),
        "walspan_version": __version__,
    }
    return _page("index", f"{_printable(source or 'store')} · walspan", data)


def _write_atomically(path: Path, text: str) -> None:
    # A browser tab reloading the page while we write sees the old file or the new one, never
    # half of one. No fsync: the page is a view that can be written again from the store.
    # (os.open with 0o666, not mkstemp's 0o600: the page gets the permissions the umask gives)
    tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:  # name the page asked for, not our temporary name
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def default_trace_name(store: Store, session_id: str) -> str:
    """`<stem>.html`: the session's file-name stem, which is path-safe and unique in the store."""
    return store.trace_path(session_id).stem + ".html"


def write_trace(store: Store, session_id: str, path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Load `session_id` from `store`, write its page to `path`; returns (path, trace)."""
    trace = store.load(session_id)
    out = Path(path)
    _write_atomically(out, render_trace(trace, source=os.fspath(store.directory)))
    return out, trace


@dataclass
class IndexResult:
    """What `write_index` wrote: the index page, one page per readable session, and the
    sessions it could not read (session id, one-line reason), which the index lists too."""

    index: Path
    pages: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _summary(session_id: str, trace: dict[str, Any], href: str) -> dict[str, Any]:
    writers = trace.get("writers") or []
    return {
        "session_id": session_id,
        "href": href,
        "status": trace.get("status"),
        "status_message": trace.get("status_message"),
        "trace_id": trace.get("trace_id"),
        "spans": len(trace.get("spans") or []),
        "start_time": trace.get("start_time"),
        "end_time": trace.get("end_time"),
        "writers": len(writers),
        "attached_writers": sum(1 for w in writers if w.get("state") == "attached"),
        "title": (trace.get("metadata") or {}).get("title"),
        "error": None,
    }


def write_index(store: Store, directory: str | os.PathLike[str]) -> IndexResult:
    """Write `index.html` and one `<stem>.html` per session of `store` into `directory`
    (created if missing). A session that cannot be read is listed with its error, not skipped;
    one removed while this runs is left out."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    result = IndexResult(index=out / "index.html")
    rows = []
    for sid in store.sessions():
        name = default_trace_name(store, sid)
        try:
            trace = store.load(sid)
        except SessionNotFoundError:
            continue  # removed since we listed the store (e.g. pruned): not an error
        except (WalspanError, OSError) as exc:
            if isinstance(exc, WalspanError):  # names the file (and the offset, if corrupt)
                reason = str(exc)
            else:  # an OSError from a read may not name its file
                reason = f"{exc.filename or store.wal_path(sid)}: {exc.strerror or exc}"
            result.failed.append((sid, reason))
            rows.append({"session_id": sid, "href": None, "error": reason})
            continue
        # (outside the try: failing to write our own page is an error of the command, not of the session)
        _write_atomically(out / name, render_trace(trace, source=os.fspath(store.directory)))
        result.pages.append(out / name)
        rows.append(_summary(sid, trace, name))
        del trace  # one trace in memory at a time, however large the store
    _write_atomically(result.index, render_index(rows, source=os.fspath(store.directory)))
    return result
