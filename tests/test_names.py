"""Session ids -> file names (invariant 8): injective, path-safe, bounded; raw id kept inside."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import walspan
from walspan._names import MAX_STEM, check_session_id, decode_stem, encode_session_id

STEM_RE = re.compile(r"^[a-z0-9_~-]+$")

HOSTILE = [
    "a.b",
    "a_b",
    "a/b",
    "a:b",
    "a\\b",
    "A",
    "a",
    "../x",
    "..",
    ".",
    "/abs",
    "/etc/passwd",
    "\x00",
    "a\x00b",
    "con",
    "CON",
    "nul",
    "com1",
    "lpt9",
    "-rf",
    "--help",
    " ",
    "x" * 4000,
    "x" * 3999 + "y",
    "é",
    "e\u0301",
    "日本語/セッション",
    "🙂",
    "a~b",
    "_2e",
]


@pytest.mark.parametrize("sid", HOSTILE, ids=range(len(HOSTILE)))
def test_stem_is_safe(sid: str) -> None:
    """Every stem is a plain file name: only [a-z0-9_~-], bounded length, not starting with '-',
    not a reserved device name, and decodes back to the raw id unless it is hashed (invariant 8)."""
    stem = encode_session_id(sid)
    assert STEM_RE.match(stem)
    assert len(stem) <= MAX_STEM
    assert not stem.startswith("-")
    assert stem.split(".")[0] not in {"con", "prn", "aux", "nul", "com1", "lpt9"}
    if "~" not in stem:
        assert decode_stem(stem) == sid


def test_hostile_ids_map_to_distinct_files_inside_the_store(tmp_path: Path) -> None:
    """a.b, a_b, a/b, a:b, A/a, ../x, /abs, NUL, con, -rf, long and unicode ids are distinct
    sessions with distinct files, all directly inside the store directory; each trace stores its
    raw id; sessions() lists exactly them (invariant 8)."""
    store = walspan.Store(tmp_path / "s", durability="process", install_hooks=False)
    paths = set()
    for sid in HOSTILE:
        t = store.open(sid)
        t.start_span("x").end()
        t.close()
        p = store.wal_path(sid)
        assert p.parent == Path(store.directory) and p.exists()
        assert os.path.realpath(p).startswith(os.path.realpath(store.directory) + os.sep)
        paths.add(p)
    assert len(paths) == len(HOSTILE)
    for sid in HOSTILE:
        doc = store.load(sid)
        assert doc["session_id"] == sid and [s["name"] for s in doc["spans"]] == ["x"]
    assert store.sessions() == sorted(HOSTILE)
    assert sorted(os.listdir(tmp_path)) == ["s"]  # nothing escaped the store directory
    store.close()


def test_case_only_difference_is_two_sessions(tmp_path: Path) -> None:
    """'A' and 'a' are different files even on a case-insensitive file system (uppercase is
    escaped, so the stems differ beyond case)."""
    assert encode_session_id("A").lower() != encode_session_id("a").lower()


def test_long_ids_are_hashed_and_distinct() -> None:
    """Ids whose escaped form exceeds MAX_STEM share a cut prefix but differ by the SHA-256
    suffix; the stem never cuts an escape in half."""
    a, b = "x" * 500 + "a", "x" * 500 + "b"
    sa, sb = encode_session_id(a), encode_session_id(b)
    assert sa != sb and len(sa) <= MAX_STEM and "~" in sa
    for sid in ["." * 300, "a" + "." * 300, "ab" + "." * 300]:
        stem = encode_session_id(sid)
        cut = stem.split("~")[0]
        assert re.fullmatch(r"(?:[a-z0-9-]|_[0-9a-f]{2})*", cut), stem


@pytest.mark.parametrize("bad, exc", [("", ValueError), (None, TypeError), (b"ab", TypeError), (1, TypeError), ("\ud800", ValueError), ("x" * 4097, ValueError)])
def test_invalid_ids_refused(tmp_path: Path, bad: object, exc: type) -> None:
    """Empty, non-str, lone-surrogate and over-long (> 4096 bytes) ids are refused with a clear
    error before any file is created."""
    with pytest.raises(exc):
        check_session_id(bad)
    store = walspan.Store(tmp_path / "s", install_hooks=False)
    with pytest.raises(exc):
        store.open(bad)  # type: ignore[arg-type]
    assert [n for n in os.listdir(store.directory) if not n.startswith(".")] == []
    store.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=80), min_size=2, max_size=2, unique=True))
def test_encoding_is_injective(pair: list[str]) -> None:
    """Property (invariant 8): two different ids never share a stem."""
    a, b = pair
    assert encode_session_id(a) != encode_session_id(b)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=13))
def test_decode_inverts_encode(sid: str) -> None:
    """Property: decode(encode(x)) == x for short ids (13 characters escape to at most 156 <
    MAX_STEM, so they are never hashed), and stems match ^[a-z0-9_~-]+$."""
    stem = encode_session_id(sid)
    assert STEM_RE.match(stem) and "~" not in stem
    assert decode_stem(stem) == sid


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=600))
def test_long_stems_bounded_and_safe(sid: str) -> None:
    """Property: any id gives a stem of at most MAX_STEM safe characters."""
    stem = encode_session_id(sid)
    assert len(stem) <= MAX_STEM and STEM_RE.match(stem)


def test_modes_0600_files_0700_dirs(tmp_path: Path) -> None:
    """The store directory and .walspan are created 0700, the WAL and JSON 0600 (whatever the
    umask allows less of, never more)."""
    old = os.umask(0)
    try:
        store = walspan.Store(tmp_path / "s", install_hooks=False)
        t = store.open("m")
        path = t.end()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(store.directory, ".walspan")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.wal_path("m")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for root, dirs, files in os.walk(store.directory):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600, f
    store.close()


def test_symlink_at_json_path_is_replaced_not_followed(tmp_path: Path) -> None:
    """Compaction replaces a symlink planted at the JSON path (tmp + rename) instead of writing
    through it: the link's target is untouched and the JSON is a regular file."""
    store = walspan.Store(tmp_path / "s", install_hooks=False)
    t = store.open("j")
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    os.symlink(target, store.trace_path("j"))
    path = t.end()
    assert target.read_bytes() == b"precious"
    assert not os.path.islink(path) and path.read_bytes().startswith(b"{")
    store.close()


def test_symlink_at_wal_path_is_refused(tmp_path: Path) -> None:
    """A symlink planted where an existing session's WAL should be is refused (O_NOFOLLOW),
    not followed: the target file is never written."""
    store = walspan.Store(tmp_path / "s", install_hooks=False)
    t = store.open("victim")
    t.close()
    store.close()
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    wal = store.wal_path("victim")
    os.unlink(wal)
    os.symlink(target, wal)
    store2 = walspan.Store(tmp_path / "s", install_hooks=False)
    with pytest.raises(OSError):
        store2.open("victim")
    with pytest.raises(OSError):
        store2.load("victim")
    assert target.read_bytes() == b"precious"
    store2.close()


def test_symlink_for_new_session_is_not_followed(tmp_path: Path) -> None:
    """A dangling symlink planted at a new session's WAL path is never followed to create or
    write the target."""
    store = walspan.Store(tmp_path / "s", install_hooks=False)
    target = tmp_path / "created-by-attacker"
    os.symlink(target, store.wal_path("new"))
    with pytest.raises(OSError):
        store.open("new")
    assert not target.exists()
    store.close()
