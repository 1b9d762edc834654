"""A small headless-Chromium driver for the viewer tests and the viewer benchmark.

It speaks the Chrome DevTools Protocol over `--remote-debugging-pipe` (file descriptors 3 and
4, messages separated by NUL bytes), so it needs nothing beyond the standard library and the
browser itself: no websocket client, no WebDriver, no browser download. It records what the
tests assert on: console messages and uncaught exceptions, every network request, and
JavaScript dialogs (an injected `alert()` would show up there).

Chromium is found through $WALSPAN_CHROMIUM, then Debian's /usr/lib/chromium/chromium (the
binary itself, without the wrapper script's extension flags), then `chromium`,
`chromium-browser` or `google-chrome` on PATH.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    env = os.environ.get("WALSPAN_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page. Use as a context manager."""

    def __init__(self, executable: str, *, width: int = 1280, height: int = 800, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="walspan-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The protocol reads fd 3 and writes fd 4 in the browser. A tiny Python shim puts our
        # pipe ends there and execs the browser (no preexec_fn, which is unsafe beside threads;
        # no shell, as dash cannot name descriptors above 9); the ends are first moved to 10 and
        # above so that moving them to 3 and 4 cannot overwrite each other.
        r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)
        args = [
            sys.executable,
            "-c",
            f"import os, sys; os.dup2({r}, 3); os.dup2({w}, 4); os.close({r}); os.close({w}); os.execv(sys.argv[1], sys.argv[1:])",
            executable,
            "--headless",
            "--no-sandbox",  # tests may run as root in a container
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            pass_fds=(r, w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(r)
        os.close(w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.console: list[dict[str, Any]] = []  # {"type": "log"|"error"|..., "text": ...}
        self.exceptions: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.page(f"{domain}.enable")
        self.page("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    # -- protocol ---------------------------------------------------------------------------

    def _send(self, method: str, params: dict[str, Any] | None, session: str | None) -> int:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_child, data) :]
        return self._id

    def _recv(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise BrowserError("timed out waiting for the browser")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise BrowserError(f"the browser exited (code {self.proc.poll()})")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        msg: dict[str, Any] = json.loads(raw)
        if "method" in msg:
            self._note(msg)
        return msg

    def _note(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        method, p = ev["method"], ev.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.console.append({"type": p.get("type"), "text": text})
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.exceptions.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            self.console.append({"type": e.get("level"), "text": e.get("text", ""), "source": e.get("source")})
        elif method == "Network.requestWillBeSent":
            self.requests.append(p.get("request", {}).get("url", ""))
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(p.get("message", ""))
            self._send("Page.handleJavaScriptDialog", {"accept": True}, self.session)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        mid = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._recv(deadline)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    def page(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.call(method, params, self.session)

    def wait_event(self, method: str, since: int = 0, timeout: float | None = None) -> dict[str, Any]:
        """The first `method` event among those recorded from index `since` on (events that
        arrived while waiting for a command's answer are recorded too), waiting if needed."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for ev in self.events[since:]:
                if ev["method"] == method:
                    return ev
            since = len(self.events)
            self._recv(deadline)

    # -- what the tests use -------------------------------------------------------------------

    def open(self, path: Path, *, fragment: str = "") -> None:
        """Load a local file and wait for its load event."""
        mark = len(self.events)
        self.page("Page.navigate", {"url": path.resolve().as_uri() + fragment})
        self.wait_event("Page.loadEventFired", since=mark)

    def eval(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its value."""
        r = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(d.get("exception", {}).get("description") or d.get("text"))
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Evaluate `expression` until it is truthy (the page keeps running while we poll)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                value = self.eval(expression)
            except BrowserError:  # e.g. the page is between two documents
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression}")
            self.eval("new Promise(r => setTimeout(r, 20))")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the centre of the first match."""
        box = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'nearest'}); const r = e.getBoundingClientRect();"
            " return [r.left + Math.min(r.width / 2, 40), r.top + r.height / 2]; })()"
        )
        if box is None:
            raise BrowserError(f"nothing matches {selector}")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def type_text(self, selector: str, text: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        self.page("Input.insertText", {"text": text})

    def key(self, key: str, code: str, keycode: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": code, "windowsVirtualKeyCode": keycode})

    def screenshot(self, path: Path) -> Path:
        data = self.page("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions seen so far."""
        return [c["text"] for c in self.console if c["type"] in ("error", "assert")] + self.exceptions

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
