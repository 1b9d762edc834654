"""Zero-code setup: `opentelemetry-instrument` with OTEL_TRACES_EXPORTER=walspan.

Naming an exporter there is not enough by itself: the SDK wraps every exporter it names in a
BatchSpanProcessor, whose in-memory queue a kill loses. So walspan hooks in twice, and either
way a WalSpanProcessor ends up on the global TracerProvider:

- the configurator (entry point `opentelemetry_configurator` = `walspan`, picked by
  OTEL_PYTHON_CONFIGURATOR=walspan or as the only configurator installed) runs the SDK's
  standard setup without `walspan` in the exporter list, then adds a WalSpanProcessor;
- the exporter (entry point `opentelemetry_traces_exporter` = `walspan`), for when another
  configurator (such as opentelemetry-distro's) runs the setup: the SDK builds it after
  installing the provider, so it adds the WalSpanProcessor there itself and exports nothing
  (the processor has written every span already).

Both rely on how the SDK's setup works inside (`_OTelSDKConfigurator`, the order of
`_init_tracing`), so they check the SDK version against the ones tested and refuse others
with a message saying so. Configuration: WALSPAN_DIR (required), WALSPAN_DURABILITY
(`durable` or `process`), WALSPAN_SESSION_ATTRIBUTE (route by this attribute instead of the
trace id).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.sdk._configuration import _OTelSDKConfigurator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.version import __version__ as SDK_VERSION

from .._trace import DIR_VAR, DURABILITY_VAR
from ._processor import WalSpanProcessor

log = logging.getLogger("walspan.otel")

EXPORTER_NAME = "walspan"
EXPORTER_VAR = "OTEL_TRACES_EXPORTER"
SESSION_ATTRIBUTE_VAR = "WALSPAN_SESSION_ATTRIBUTE"
#: SDK minor versions the zero-code hooks are tested with (they use SDK internals).
TESTED_SDK_VERSIONS = ("1.45",)


def check_sdk_version(version: str = SDK_VERSION) -> None:
    minor = ".".join(version.split(".")[:2])
    if minor not in TESTED_SDK_VERSIONS:
        raise RuntimeError(
            f"walspan's zero-code setup is tested with opentelemetry-sdk {', '.join(v + '.*' for v in TESTED_SDK_VERSIONS)}, "
            f"not {version}: install a tested version (pip install 'walspan[otel]'), or add "
            "walspan.otel.WalSpanProcessor to your TracerProvider in code"
        )


def _selected() -> bool:
    return EXPORTER_NAME in [n.strip() for n in os.environ.get(EXPORTER_VAR, "").split(",")]


def processor_from_env() -> WalSpanProcessor:
    directory = os.environ.get(DIR_VAR)
    if not directory:
        raise RuntimeError(f"{EXPORTER_VAR}=walspan needs {DIR_VAR}: the directory to write traces to")
    return WalSpanProcessor(
        directory,
        durability=os.environ.get(DURABILITY_VAR) or "durable",
        session_attribute=os.environ.get(SESSION_ATTRIBUTE_VAR) or None,
    )


def install(provider: Any) -> WalSpanProcessor | None:
    """Add a WalSpanProcessor configured from the environment to `provider`, unless it has one."""
    if not isinstance(provider, TracerProvider):
        return None
    active = getattr(provider, "_active_span_processor", None)
    for p in getattr(active, "_span_processors", ()):
        if isinstance(p, WalSpanProcessor):
            return p
    processor = processor_from_env()
    provider.add_span_processor(processor)
    return processor


class WalspanConfigurator(_OTelSDKConfigurator):  # type: ignore[misc]
    """The SDK's standard setup; with `walspan` in OTEL_TRACES_EXPORTER, crash-proof."""

    def _configure(self, **kwargs: Any) -> None:
        if not _selected():
            super()._configure(**kwargs)
            return
        check_sdk_version()
        names = [n.strip() for n in os.environ[EXPORTER_VAR].split(",") if n.strip() and n.strip() != EXPORTER_NAME]
        saved = os.environ[EXPORTER_VAR]
        # the SDK reads the exporter list from the environment; restore it at once, since child
        # processes inherit it (and are auto-instrumented too)
        os.environ[EXPORTER_VAR] = ",".join(names) or "none"
        try:
            super()._configure(**kwargs)
        finally:
            os.environ[EXPORTER_VAR] = saved
        install(trace_api.get_tracer_provider())


class WalSpanExporter(SpanExporter):  # type: ignore[misc]
    """The `walspan` traces exporter. Built by the SDK's setup, it installs a WalSpanProcessor
    on the global provider and passes on nothing (see the module doc). Built by hand, it
    writes each span it is given, start and end, like any exporter behind its processor's queue."""

    def __init__(self) -> None:
        self._processor: WalSpanProcessor | None = None
        self._passive = False
        if _selected():
            check_sdk_version()
            self._processor = install(trace_api.get_tracer_provider())
            self._passive = self._processor is not None
        if self._processor is None:
            self._processor = processor_from_env()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self._passive:
            assert self._processor is not None
            for span in spans:
                self._processor.on_start(span)  # type: ignore[arg-type]
                self._processor.on_end(span)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if not self._passive and self._processor is not None:
            self._processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
