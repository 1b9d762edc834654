"""The zero-code hooks put a WalSpanProcessor on the provider whichever configurator runs the
SDK's setup, and refuse untested SDK versions with a clear message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the otel extra: pip install -e '.[test,otel]'")

from opentelemetry.sdk import _configuration
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from walspan.otel import WalSpanProcessor, _zerocode


@pytest.fixture
def providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[TracerProvider]:
    """The environment of a zero-code run; the providers the SDK setup installs, in order."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "walspan")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "none")
    monkeypatch.setenv("WALSPAN_DIR", str(tmp_path / "t"))
    monkeypatch.setenv("WALSPAN_DURABILITY", "process")
    monkeypatch.setenv("WALSPAN_SESSION_ATTRIBUTE", "session.id")
    providers: list[TracerProvider] = []
    monkeypatch.setattr(_configuration, "set_tracer_provider", providers.append)
    monkeypatch.setattr(_zerocode.trace_api, "get_tracer_provider", lambda: providers[-1])
    return providers


def _processors(provider: TracerProvider) -> list[object]:
    return list(provider._active_span_processor._span_processors)


def test_configurator_installs_the_processor_and_no_batch_for_walspan(providers: list[TracerProvider]) -> None:
    """The walspan configurator runs the SDK setup without the walspan exporter (no batch
    processor around it), adds one WalSpanProcessor configured from WALSPAN_*, and leaves
    OTEL_TRACES_EXPORTER as it was (child processes inherit it)."""
    _zerocode.WalspanConfigurator()._configure()
    provider = providers[-1]
    procs = _processors(provider)
    assert [type(p) for p in procs] == [WalSpanProcessor]
    wp = procs[0]
    assert isinstance(wp, WalSpanProcessor)
    assert (wp.store.durability, wp.session_attribute) == ("process", "session.id")
    assert os.environ["OTEL_TRACES_EXPORTER"] == "walspan"
    wp.shutdown()


def test_exporter_under_another_configurator_still_installs_the_processor(providers: list[TracerProvider]) -> None:
    """When another configurator (opentelemetry-distro's calls the same SDK setup) builds the
    walspan exporter inside a BatchSpanProcessor, the exporter puts a WalSpanProcessor on the
    provider and itself passes nothing on."""
    _configuration._initialize_components()
    provider = providers[-1]
    procs = _processors(provider)
    assert [type(p) for p in procs] == [WalSpanProcessor, BatchSpanProcessor]
    tracer = provider.get_tracer("z")
    with tracer.start_as_current_span("root", attributes={"session.id": "conv"}):
        pass
    assert [s["name"] for s in procs[0].store.load("conv")["spans"]] == ["root"]  # type: ignore[attr-defined]
    procs[0].shutdown()  # type: ignore[attr-defined]


def test_untested_sdk_version_is_refused_clearly() -> None:
    """An SDK minor version the hooks were not tested with raises, naming the tested ones and
    the in-code alternative."""
    _zerocode.check_sdk_version("1.45.9")
    with pytest.raises(RuntimeError, match=r"tested with opentelemetry-sdk 1\.45\.\*, not 1\.52\.0.*WalSpanProcessor"):
        _zerocode.check_sdk_version("1.52.0")


def test_missing_walspan_dir_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_TRACES_EXPORTER=walspan without WALSPAN_DIR says what is missing."""
    monkeypatch.delenv("WALSPAN_DIR", raising=False)
    with pytest.raises(RuntimeError, match="WALSPAN_DIR"):
        _zerocode.processor_from_env()
