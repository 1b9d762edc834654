"""Self-contained HTML views of traces: `walspan view`.

One trace becomes one HTML file holding everything it needs (the trace as JSON, the script and
the stylesheet, all inlined; a Content-Security-Policy forbids any network request), so it can
be mailed, attached to a bug or opened from a disk years later. A store becomes an index page
linking to one such file per session. The data comes only from the public read side
(`Store.sessions()`, `Store.load()`); the page is drawn by plain JavaScript in the browser
(`trace.js`, `index.js`), which renders only the rows in view, so 100,000 spans stay usable.
"""

from ._page import IndexResult, default_trace_name, render_index, render_trace, write_index, write_trace

__all__ = ["IndexResult", "default_trace_name", "render_index", "render_trace", "write_index", "write_trace"]
