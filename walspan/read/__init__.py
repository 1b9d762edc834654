"""walspan.read: the one public read API over a store (exporters, tail, prune, ls/show and a
future shipper all read through it).

Records after a cursor::

    from walspan.read import Cursor, read_records

    cursor = Cursor.START                            # or Cursor.parse(saved_text)
    for rec in read_records("traces", "ses_1", after=cursor):
        print(rec.seq, rec.type, rec.payload)        # "span_start", {"span_id": ..., ...}
        cursor = rec.cursor                           # str(cursor) survives a restart

Reading never takes a lock and never writes; only whole records with good checksums are
returned. If the log no longer holds the record a cursor points after (cut by a repair, an
unsynced tail lost to a power loss, or the session pruned and created anew),
`CursorMismatchError` is raised and nothing is yielded.

Following a store as it grows (every session, new ones included)::

    from walspan.read import Follower, Notice

    for item in Follower("traces").follow(interval=0.25):
        if isinstance(item, Notice): ...             # new / removed / replaced / resync / restart / error
        else: handle(item)                           # a Record

Whole traces: `summaries(directory)` (one `TraceSummary` per session, O(1) for a compacted
one), `TraceView(directory, session_id)` (the folded trace in bounded memory).
"""

from ..errors import CorruptWALError, CursorMismatchError, SessionNotFoundError
from ._follow import Follower, Notice
from ._records import Cursor, Record, check_cursor, end_cursor, read_records, type_name
from ._traces import (
    DEAD,
    IDLE,
    LIVE,
    TraceSummary,
    TraceView,
    iso_time,
    list_stems,
    liveness,
    summaries,
    summarize_stem,
    summary,
)

__all__ = [
    "DEAD",
    "IDLE",
    "LIVE",
    "CorruptWALError",
    "Cursor",
    "CursorMismatchError",
    "Follower",
    "Notice",
    "Record",
    "SessionNotFoundError",
    "TraceSummary",
    "TraceView",
    "check_cursor",
    "end_cursor",
    "iso_time",
    "list_stems",
    "liveness",
    "read_records",
    "summaries",
    "summarize_stem",
    "summary",
    "type_name",
]
