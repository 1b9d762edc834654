"""walspan for OpenTelemetry programs: `WalSpanProcessor`, an SDK span processor that writes
each span's start and end to a walspan store before returning, and the zero-code hooks
(`opentelemetry-instrument` with OTEL_TRACES_EXPORTER=walspan). See docs/OTEL.md.

Needs the `otel` extra: pip install 'walspan[otel]'.
"""

try:
    import opentelemetry.sdk.trace  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by hand without the extra
    raise ImportError(
        "walspan.otel needs the OpenTelemetry SDK, which is not installed: pip install 'walspan[otel]'"
    ) from exc

from ._processor import WalSpanProcessor

__all__ = ["WalSpanProcessor"]
