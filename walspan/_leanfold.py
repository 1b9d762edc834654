"""The fold in bounded memory, and the canonical JSON written out as a stream.

`TraceFold` keeps every span as a Python dict: about 1.4 KB per small span, so a 200,000-span
trace costs ~270 MB to fold. `LeanFold` is the same fold (same handlers, same rules: it only
swaps the span table) with each span kept msgpack-packed, about 5x smaller, behind a small
write-back cache of unpacked dicts: a handler gets a dict, mutates it in place, and the dict
is packed again only when it leaves the cache, so records about recent spans (the common
case: a span's end follows its start closely) cost no packing at all.

`iter_canonical` yields the canonical JSON of a fold piece by piece, byte-identical to
`_fold.dumps(fold.to_dict())` (a test pins this), without ever building the whole document:
`show --json`, `verify` and the read tools stay bounded however large the trace.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, MutableMapping
from typing import IO, Any

import msgpack

from . import _fsutil
from ._compactor import _fold_from
from ._fold import TraceFold
from ._reader import ScanState, read_header
from ._shm import read_witness

_PACK = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def _unpack(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)  # type: ignore[no-any-return]


class PackedSpans(MutableMapping[str, dict[str, Any]]):
    """span id -> span dict, in insertion order, stored packed; the `cache` most recently used
    dicts are kept unpacked (write-back: a dict handed out may be mutated until it is evicted).

    Safe for the fold's handlers because each one mutates the span it just looked up before
    looking up another: no handler holds more than one span dict at a time."""

    def __init__(self, cache: int = 512) -> None:
        self._packed: dict[str, bytes | None] = {}  # None: the current value is in the cache
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._limit = cache

    def __getitem__(self, key: str) -> dict[str, Any]:
        d = self._cache.get(key)
        if d is not None:
            self._cache.move_to_end(key)
            return d
        data = self._packed[key]  # KeyError for an unknown span, as a dict would raise
        assert data is not None
        d = _unpack(data)
        self._packed[key] = None  # the cached dict is the value now (it may be mutated)
        self._keep(key, d)
        return d

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        self._packed[key] = None
        self._keep(key, value)

    def __delitem__(self, key: str) -> None:
        del self._packed[key]
        self._cache.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._packed

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def _keep(self, key: str, value: dict[str, Any]) -> None:
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self._limit:
            old, d = self._cache.popitem(last=False)
            self._packed[old] = _PACK(d)

    def peek(self, key: str) -> dict[str, Any]:
        """The span, for reading only: unpacked without entering the cache (no eviction, no
        re-packing of another span). Mutating the result changes nothing."""
        data = self._packed[key]
        return _unpack(data) if data is not None else self._cache[key]

    def iter_values(self) -> Iterator[dict[str, Any]]:
        """Every span in insertion order, unpacked one at a time (the cache is left alone)."""
        for key, data in self._packed.items():
            yield _unpack(data) if data is not None else self._cache[key]


class LeanFold(TraceFold):
    """TraceFold with its spans packed (see the module docstring). Use `iter_canonical`
    instead of `to_dict()`, which would unpack every span at once."""

    def __init__(self, cache: int = 512) -> None:
        super().__init__()
        self.spans: PackedSpans = PackedSpans(cache)  # type: ignore[assignment]


def fold_wal_lean(path: str, upto: int | None = None) -> tuple[LeanFold, ScanState]:
    """Fold the valid prefix of the WAL at `path` (up to `upto`) from its start, in bounded
    memory. Raises CorruptWALError as `_compactor.fold_wal` does."""
    fd = _fsutil.open_file(path, os.O_RDONLY)
    try:
        fold = LeanFold()
        salt = read_header(fd, path)
        known_whole = read_witness(path, salt, os.fstat(fd).st_size)  # the verdict every reader gives
        _fold, scan = _fold_from(fd, path, salt, fold, upto, known_whole)
        return fold, scan
    finally:
        os.close(fd)


def _spans_of(fold: TraceFold) -> Iterable[dict[str, Any]]:
    spans = fold.spans
    if isinstance(spans, PackedSpans):
        return spans.iter_values()
    return spans.values()


def fields_of(fold: TraceFold) -> dict[str, Any]:
    """`fold.to_dict()` with an empty span list, without unpacking a span."""
    spans = fold.spans
    fold.spans = {}  # the real to_dict() gives every other field, whatever its shape
    try:
        return fold.to_dict()
    finally:
        fold.spans = spans


def iter_canonical(fold: TraceFold, batch: int = 512) -> Iterator[bytes]:
    """The canonical JSON of `fold` (`_fold.dumps(fold.to_dict())`), in pieces."""
    doc = fields_of(fold)
    # the same options as _fold.dumps: an encoder is context-free, so a value encoded on its
    # own is byte-for-byte the text it has inside the whole document
    encode = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode
    yield b"{"
    for i, key in enumerate(sorted(doc)):
        head = ("," if i else "") + encode(key) + ":"
        if key != "spans":
            yield (head + encode(doc[key])).encode("utf-8")
            continue
        yield (head + "[").encode("utf-8")
        parts: list[str] = []
        first = True
        for span in _spans_of(fold):
            parts.append(encode(span) if first else "," + encode(span))
            first = False
            if len(parts) >= batch:
                yield "".join(parts).encode("utf-8")
                parts.clear()
        yield ("".join(parts) + "]").encode("utf-8")
    yield b"}"


def stream_equals(pieces: Iterable[bytes], f: IO[bytes]) -> bool:
    """Whether the file's remaining bytes are exactly the concatenation of `pieces`."""
    for piece in pieces:
        if f.read(len(piece)) != piece:
            return False
    return f.read(1) == b""


def read_wal_section(f: IO[bytes], size: int) -> dict[str, Any]:
    """The top-level `wal` object of a canonical JSON, read from the end of the file (in the
    sorted document only `writers` follows it), without parsing the spans. Raises ValueError
    if there is none."""
    want = 1 << 16
    while True:
        start = max(0, size - want)
        f.seek(start)
        tail = f.read(size - start)
        at = max(tail.rfind(b',"wal":{'), tail.rfind(b'{"wal":{'))
        if at != -1:
            text = tail[at + len(b',"wal":') :].decode("utf-8", "replace")
            value, _end = json.JSONDecoder().raw_decode(text)
            if not isinstance(value, dict):
                raise ValueError("the wal section is not an object")
            return value
        if start == 0:
            raise ValueError("no top-level wal section")
        want *= 4
