"""User values: refused at the call, naming where, with nothing written; one truncation rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import walspan
from walspan import TRUNCATION_MARKER
from walspan._values import cap_str, clean


class Weird:
    pass


BAD_VALUES = [
    (object(), TypeError),
    (b"bytes", TypeError),
    ({1, 2}, TypeError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (1 << 64, ValueError),
    (-(1 << 63) - 1, ValueError),
    (Weird(), TypeError),
    ("\ud800", ValueError),
    (bytearray(b"x"), TypeError),
]


@pytest.mark.parametrize("value, exc", BAD_VALUES, ids=[type(v).__name__ + str(i) for i, (v, _) in enumerate(BAD_VALUES)])
def test_bad_value_is_refused_naming_the_key_path_and_nothing_is_written(tmp_path: Path, value: object, exc: type) -> None:
    """A non-serializable value nested in attributes is refused with TypeError/ValueError naming
    the key path (attributes['a'][2]) and the WAL is not touched, through every entry point."""
    store = walspan.Store(tmp_path, install_hooks=False)
    t = store.open("v")
    span = t.start_span("s")
    wal = store.wal_path("v")
    size = wal.stat().st_size
    nested = {"a": [0, 1, value]}
    calls = [
        lambda: t.start_span("x", attributes=nested),
        lambda: t.start_span("x", input={"a": [0, 1, value]}),
        lambda: span.set_attributes(nested),
        lambda: span.add_event("e", nested),
        lambda: span.end(output={"a": [0, 1, value]}),
        lambda: t.set_metadata(a=[0, 1, value]),
    ]
    for call in calls:
        with pytest.raises(exc) as ei:
            call()
        assert "['a'][2]" in str(ei.value)
        assert wal.stat().st_size == size
    assert not span.ended
    store.close()


def test_non_str_keys_refused(tmp_path: Path) -> None:
    """A dict with a non-str key is refused (TypeError naming the key and where), nothing written."""
    store = walspan.Store(tmp_path, install_hooks=False)
    t = store.open("k")
    size = store.wal_path("k").stat().st_size
    with pytest.raises(TypeError, match=r"attributes\['a'\].*key 1"):
        t.start_span("x", attributes={"a": {1: "x"}})
    with pytest.raises(TypeError):
        store.open("k2", metadata={(1, 2): "x"})  # type: ignore[dict-item]
    assert store.wal_path("k").stat().st_size == size
    assert not store.wal_path("k2").exists()
    store.close()


def test_bad_argument_types_refused(tmp_path: Path) -> None:
    """Wrong types for names, kinds, attributes, parent and statuses are refused, nothing written."""
    store = walspan.Store(tmp_path, install_hooks=False)
    t = store.open("a")
    size = store.wal_path("a").stat().st_size
    with pytest.raises(TypeError):
        t.start_span(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        t.start_span("x", kind=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        t.start_span("x", attributes=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        t.start_span("x", parent="not-a-span-id")
    s = t.start_span("ok")
    size = store.wal_path("a").stat().st_size
    with pytest.raises(ValueError):
        s.end(status="weird")
    with pytest.raises(ValueError):
        t.end(status="running")
    assert store.wal_path("a").stat().st_size == size
    store.close()


def test_accepted_values_round_trip(tmp_path: Path) -> None:
    """Values in the allowed set are stored as given (tuples as lists, subclasses normalised)."""
    store = walspan.Store(tmp_path, install_hooks=False)
    t = store.open("r")
    value = {"n": None, "b": True, "i": -(1 << 63), "u": (1 << 64) - 1, "f": -0.5, "s": "é🙂", "l": (1, [2, {"x": []}])}
    sp = t.start_span("s", attributes=value, input=value)
    sp.end(output=value)
    got = store.load("r")["spans"][0]
    expected = dict(value, l=[1, [2, {"x": []}]])
    assert got["attributes"] == expected and got["input"] == expected and got["output"] == expected
    store.close()


def test_cap_str_single_rule() -> None:
    """A string over the limit is cut at a character boundary to at most `limit` UTF-8 bytes and
    followed by the marker, which states kept and total bytes."""
    assert cap_str("abc", 3) == "abc"
    out = cap_str("é" * 10, 5)  # 20 bytes; 5 would cut the third 'é' in half
    kept = "é" * 2
    assert out == kept + TRUNCATION_MARKER.format(kept=4, total=20)
    assert clean({"a": ["x" * 100]}, "w", 64)["a"][0] == "x" * 64 + TRUNCATION_MARKER.format(kept=64, total=100)


def test_oversized_values_capped_with_visible_marker(tmp_path: Path) -> None:
    """Under Store(max_value_bytes=N), inputs, outputs, attributes, events and metadata over N
    bytes are capped with TRUNCATION_MARKER, once (no double truncation), everywhere alike."""
    n = 100
    store = walspan.Store(tmp_path, install_hooks=False, max_value_bytes=n)
    big = "p" * 5000
    capped = "p" * n + TRUNCATION_MARKER.format(kept=n, total=5000)
    t = store.open("big", metadata={"prompt": big})
    sp = t.start_span("s", attributes={"a": [big]}, input=big)
    sp.set_attributes({"b": big})
    sp.add_event("e", {"c": big})
    sp.end(output={"o": big})
    t.set_metadata(title=big)
    doc = store.load("big")
    s = doc["spans"][0]
    assert doc["metadata"] == {"prompt": capped, "title": capped}
    assert s["attributes"] == {"a": [capped], "b": capped}
    assert s["events"][0]["attributes"] == {"c": capped}
    assert s["input"] == capped and s["output"] == {"o": capped}
    path = t.end()
    assert path.read_text(encoding="utf-8").count("walspan: truncated") == 7
    assert os.path.getsize(store.wal_path("big")) < 5000
    store.close()


def test_max_value_bytes_validated(tmp_path: Path) -> None:
    """max_value_bytes must be an int (not a str, float, bool or None) of at least 64: anything
    else is refused at construction, naming the parameter; 64 itself is accepted and is the cap
    really applied (a 64-byte string is kept whole, a 65-byte one is cut to 64 bytes)."""
    for bad in ("10", 64.0, True, None):
        with pytest.raises(TypeError, match="max_value_bytes must be an int"):
            walspan.Store(tmp_path, install_hooks=False, max_value_bytes=bad)  # type: ignore[arg-type]
    for bad in (63, 0, -1):
        with pytest.raises(ValueError, match=f"max_value_bytes must be at least 64, not {bad}"):
            walspan.Store(tmp_path, install_hooks=False, max_value_bytes=bad)
    store = walspan.Store(tmp_path, install_hooks=False, max_value_bytes=64)
    try:
        assert store.max_value_bytes == 64
        t = store.open("cap")
        t.start_span("whole", input="a" * 64).end()
        t.start_span("cut", input="b" * 65).end()
        whole, cut = store.load("cap")["spans"]
        assert whole["input"] == "a" * 64
        assert cut["input"] == "b" * 64 + TRUNCATION_MARKER.format(kept=64, total=65)
    finally:
        store.close()


def test_cyclic_or_too_deep_value_refused(tmp_path: Path) -> None:
    """A self-referencing or over-deep value is a ValueError (not a RecursionError) and nothing
    is written."""
    store = walspan.Store(tmp_path, install_hooks=False)
    t = store.open("deep")
    size = store.wal_path("deep").stat().st_size
    cyclic: list = []
    cyclic.append(cyclic)
    deep: dict = {}
    cur = deep
    for _ in range(100):
        cur["x"] = {}
        cur = cur["x"]
    for value in (cyclic, deep):
        with pytest.raises(ValueError, match="nested"):
            t.start_span("s", input=value)
    assert store.wal_path("deep").stat().st_size == size
    store.close()


def test_record_over_the_size_limit_is_refused_and_nothing_written(tmp_path: Path) -> None:
    """A record whose payload would exceed the format's 64 MiB limit (many values, each under the
    per-value cap) is refused with ValueError before anything is written: a reader would take
    such a record for damage (invariant 2)."""
    store = walspan.Store(tmp_path / "d", durability="process", install_hooks=False)
    trace = store.open("s")
    size = store.wal_path("s").stat().st_size
    big = {f"k{i}": "x" * 1_000_000 for i in range(70)}  # 70 MB, each value under the 1 MiB cap
    with pytest.raises(ValueError, match="limit"):
        trace.start_span("huge", attributes=big)
    assert store.wal_path("s").stat().st_size == size
    trace.start_span("fine").end()
    assert [s["name"] for s in store.load("s")["spans"]] == ["fine"]
