"""User values: what may go into a trace, and the one rule that caps large values.

Values must be JSON-representable, because the canonical trace is JSON: None, bool, int in
[-2**63, 2**64) (what msgpack carries), finite float, str, list/tuple of values, dict with str
keys. Anything else is refused at the call with a TypeError/ValueError naming where it was
(e.g. attributes["a"][2]), before anything is written.

The cap (the single truncation rule): every str longer than `max_value_bytes` UTF-8 bytes is
cut to at most that many bytes (at a character boundary) and followed by the marker
TRUNCATION_MARKER.format(kept=..., total=...). It applies to inputs, outputs, attribute values,
event attributes and metadata alike; nothing else truncates anything. The first value cut in a
process logs one warning (logger "walspan") naming its key path, so a cut is never silent.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

log = logging.getLogger("walspan")

TRUNCATION_MARKER = "…[walspan: truncated, kept {kept} of {total} bytes]"
DEFAULT_MAX_VALUE_BYTES = 1 << 20
MAX_DEPTH = 64
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


def cap_str(value: str, limit: int) -> str:
    if len(value) * 4 <= limit:  # fast path: cannot exceed the limit in UTF-8
        return value
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return value
    kept = raw[:limit].decode("utf-8", "ignore")  # drops a character cut in half
    return kept + TRUNCATION_MARKER.format(kept=len(kept.encode("utf-8")), total=len(raw))


_cap_warned = False


def _capped(where: str, value: str, limit: int) -> None:
    """The first cut value of the process: say so, once (a warning per value would flood)."""
    global _cap_warned
    if _cap_warned:
        return
    _cap_warned = True
    log.warning(
        "walspan: %s is %d bytes, over the value cap of %d bytes: stored cut, ending with %r "
        "(Store(max_value_bytes=...) sets the cap; logged once per process)",
        where,
        len(value.encode("utf-8", "surrogatepass")),
        limit,
        TRUNCATION_MARKER.split("{", 1)[0],
    )


def _reset_after_fork() -> None:
    global _cap_warned
    _cap_warned = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def clean(value: Any, where: str, limit: int, depth: int = 0) -> Any:
    """Return `value` checked and capped (lists for tuples); raise naming `where` if refused."""
    if value is None or value is True or value is False:
        return value
    t = type(value)
    if t is str:
        _check_text(value, where)
        capped = cap_str(value, limit)
        if capped is not value:
            _capped(where, value, limit)
        return capped
    if t is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"{where}: integer {value} does not fit in 64 bits")
        return value
    if t is float:
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number (JSON cannot carry it)")
        return value
    if depth >= MAX_DEPTH:
        raise ValueError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if t is dict:
        out = {}
        quick = limit // 4  # a str of at most this many characters cannot exceed the cap
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(f"{where}: key {k!r} is {type(k).__name__}, keys must be str")
            if not k.isascii():
                _check_text(k, where)
            # fast path for the common scalar values; the path in `where` is built only when needed
            tv = type(v)
            if tv is str and len(v) <= quick and v.isascii():
                out[k] = v
            elif v is None or tv is bool or (tv is int and _INT_MIN <= v <= _INT_MAX):
                out[k] = v
            else:
                out[k] = clean(v, f"{where}[{k!r}]", limit, depth + 1)
        return out
    if t is list or t is tuple:
        return [clean(v, f"{where}[{i}]", limit, depth + 1) for i, v in enumerate(value)]
    # subclasses of the plain types (IntEnum, str subclasses, ...) are normalised
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return clean(str(value), where, limit, depth)
    if isinstance(value, int):
        return clean(int(value), where, limit, depth)
    if isinstance(value, float):
        return clean(float(value), where, limit, depth)
    if isinstance(value, dict):
        return clean(dict(value), where, limit, depth)
    raise TypeError(
        f"{where}: value of type {type(value).__name__} cannot be stored "
        "(allowed: None, bool, int, float, str, list, tuple, dict with str keys)"
    )


def clean_mapping(value: Any, where: str, limit: int) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{where} must be a dict, not {type(value).__name__}")
    return clean(value, where, limit)  # type: ignore[no-any-return]


def check_name(value: Any, where: str, limit: int = 1024) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be str, not {type(value).__name__}")
    _check_text(value, where)
    capped = cap_str(value, limit)
    if capped is not value:
        _capped(where, value, limit)
    return capped


def _check_text(value: str, where: str) -> None:
    if value.isascii():
        return  # ASCII is valid Unicode: no lone surrogates to find
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where}: string is not valid Unicode ({exc.reason})") from None
