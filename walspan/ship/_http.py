"""One OTLP/HTTP export request, and what its answer means (the OTLP/HTTP specification's
rules, https://opentelemetry.io/docs/specs/otlp/#otlphttp-response):

- 2xx: acknowledged. A `partial_success` with rejected spans is acknowledged too (the spec
  says not to retry it); the rejected count is reported.
- 408, 429 and 5xx, a refused or reset connection, a timeout, a reply cut short: retry,
  after `Retry-After` when the server sent one (seconds or an HTTP date), else after an
  exponential backoff with jitter.
- any other status (400, 401, 403, 404, 413, ...): permanent for this batch.

Standard library only (http.client): one keep-alive connection per sender thread.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import json
import random
import time
import urllib.parse
from typing import NamedTuple

OK, RETRY, REJECT = "ok", "retry", "reject"
PROTOBUF, JSON = "http/protobuf", "http/json"
CONTENT_TYPES = {PROTOBUF: "application/x-protobuf", JSON: "application/json"}


class Outcome(NamedTuple):
    kind: str  # OK | RETRY | REJECT
    status: int | None  # the HTTP status, None when there was no answer
    message: str
    retry_after: float | None = None  # seconds the server asked us to wait
    rejected_spans: int = 0  # a partial success's count


def traces_url(endpoint: str) -> urllib.parse.SplitResult:
    """The endpoint as given; `/v1/traces` is added when it has no path (a Collector's base
    URL, e.g. http://localhost:4318). ValueError for anything but an http(s) URL."""
    u = urllib.parse.urlsplit(endpoint)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--endpoint {endpoint!r}: expected an http:// or https:// URL, e.g. http://localhost:4318/v1/traces")
    if u.path in ("", "/"):
        u = u._replace(path="/v1/traces")
    return u


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (0-based): exponential, capped, with "equal jitter"
    (half fixed, half random) so that shippers failing together do not retry together and a
    delay never collapses to nothing."""
    base = min(maximum, initial * (2 ** min(attempt, 30)))
    return base / 2 + (rng or random).uniform(0, base / 2)


class Sender:
    """Posts request bodies to one endpoint over a kept-alive connection."""

    def __init__(self, endpoint: str, headers: dict[str, str], protocol: str, use_gzip: bool, timeout: float) -> None:
        if protocol not in CONTENT_TYPES:
            raise ValueError(f"--protocol {protocol!r}: one of {', '.join(CONTENT_TYPES)}")
        self.url = traces_url(endpoint)
        self.protocol = protocol
        self.use_gzip = use_gzip
        self.timeout = timeout
        self.headers = {"Content-Type": CONTENT_TYPES[protocol], **headers}
        if use_gzip:
            self.headers["Content-Encoding"] = "gzip"
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self.url.hostname or "", self.url.port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def post(self, body: bytes) -> Outcome:
        data = gzip.compress(body, compresslevel=5) if self.use_gzip else body
        path = self.url.path + (f"?{self.url.query}" if self.url.query else "")
        try:
            conn = self._connection()
            conn.request("POST", path, body=data, headers=self.headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as exc:  # TimeoutError is an OSError
            self.close()  # the connection's state is unknown: start afresh
            return Outcome(RETRY, None, f"{type(exc).__name__}: {exc}".rstrip(": "))
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        status = resp.status
        if 200 <= status < 300:
            rejected, message = _partial_success(payload, resp.getheader("Content-Type", ""))
            return Outcome(OK, status, message, rejected_spans=rejected)
        message = f"HTTP {status} {resp.reason}: {_excerpt(payload)}".rstrip(": ")
        if status in (408, 429) or status >= 500:
            return Outcome(RETRY, status, message, parse_retry_after(resp.getheader("Retry-After")))
        return Outcome(REJECT, status, message)


def _excerpt(payload: bytes, limit: int = 200) -> str:
    text = payload[:limit].decode("utf-8", "replace").strip()
    return " ".join(text.split())


def _partial_success(payload: bytes, content_type: str) -> tuple[int, str]:
    """(rejected spans, error message) from an ExportTraceServiceResponse, (0, "") if none."""
    if not payload:
        return 0, ""
    if "json" in content_type:
        try:
            ps = json.loads(payload).get("partialSuccess") or {}
            return int(ps.get("rejectedSpans") or 0), str(ps.get("errorMessage") or "")
        except (ValueError, AttributeError, TypeError):
            return 0, ""
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        r = ExportTraceServiceResponse.FromString(payload)
    except Exception:  # not ours to judge: the status said yes
        return 0, ""
    return int(r.partial_success.rejected_spans), r.partial_success.error_message


__all__ = ["JSON", "OK", "PROTOBUF", "REJECT", "RETRY", "Outcome", "Sender", "backoff", "parse_retry_after", "traces_url"]
