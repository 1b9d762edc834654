"""Session id <-> file name: injective, path-safe, case-insensitive-safe, bounded.

Rule (docs/FORMAT.md, "File names"): the UTF-8 bytes of the raw id are written out one by one;
lowercase ASCII letters, digits and '-' stand for themselves, every other byte becomes '_'
followed by two lowercase hex digits ('A' -> '_41', '.' -> '_2e', '_' -> '_5f', '/' -> '_2f').
A leading '-' is escaped too (no file name looks like a command-line option), and so is the
first character of a stem that spells a reserved Windows device name (con, nul, com1, ...).
Because '_' always starts an escape, decoding is unambiguous, so the map is injective; because
uppercase is escaped, it stays injective on case-insensitive file systems. A stem longer than
MAX_STEM is cut and followed by '~' and the SHA-256 of the raw id ('~' never occurs otherwise);
the raw id is also stored inside the trace, so nothing depends on decoding such a name.
"""

from __future__ import annotations

import hashlib
import re

MAX_STEM = 160
MAX_SESSION_ID_BYTES = 4096

_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"] + [f"com{i}" for i in range(10)] + [f"lpt{i}" for i in range(10)]
)
_ESCAPE_RE = re.compile(r"_([0-9a-f]{2})")
_STEM_RE = re.compile(r"^(?:[a-z0-9-]|_[0-9a-f]{2})+$")


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str):
        raise TypeError(f"session id must be str, not {type(session_id).__name__}")
    if not session_id:
        raise ValueError("session id must not be empty")
    try:
        raw = session_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"session id {session_id!r} is not valid Unicode text: {exc.reason}") from None
    if len(raw) > MAX_SESSION_ID_BYTES:
        raise ValueError(f"session id is {len(raw)} bytes long; the limit is {MAX_SESSION_ID_BYTES}")
    return session_id


def encode_session_id(session_id: str) -> str:
    """The file-name stem for a session id (no extension)."""
    raw = check_session_id(session_id).encode("utf-8")
    parts = [chr(b) if b in _PLAIN else f"_{b:02x}" for b in raw]
    if parts[0] == "-":
        parts[0] = "_2d"
    stem = "".join(parts)
    base = stem.split(".", 1)[0]
    if base in _RESERVED:
        stem = f"_{ord(stem[0]):02x}" + stem[1:]
    if len(stem) > MAX_STEM:
        digest = hashlib.sha256(raw).hexdigest()
        cut = stem[: MAX_STEM - 65]
        # never cut an escape in half: drop a trailing partial "_x"
        tail = cut.rfind("_")
        if tail != -1 and tail > len(cut) - 3:
            cut = cut[:tail]
        stem = f"{cut}~{digest}"
    return stem


def decode_stem(stem: str) -> str | None:
    """The session id a stem encodes, or None if the stem is hashed (read the id from the WAL)
    or is not a walspan name at all."""
    if "~" in stem or not _STEM_RE.match(stem):
        return None
    try:
        return bytes.fromhex("".join(_hexify(stem))).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def _hexify(stem: str) -> list[str]:
    out = []
    i = 0
    while i < len(stem):
        if stem[i] == "_":
            out.append(stem[i + 1 : i + 3])
            i += 3
        else:
            out.append(f"{ord(stem[i]):02x}")
            i += 1
    return out
