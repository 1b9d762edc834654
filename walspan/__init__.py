"""walspan: a multi-process, crash-resilient write-ahead logger for tracing spans.

The WAL is the truth; the JSON trace is a view. See README.md and docs/FORMAT.md. Reading a
store (records after a cursor, following it, summaries) is `walspan.read`.
"""

from ._recovery import RecoveryAction, RecoveryReport
from ._store import Store
from ._trace import (
    ENV_VAR,
    Span,
    SpanScope,
    Trace,
    attach_from_env,
    current_span,
    get_current_span,
    set_default_trace,
    traced,
)
from ._values import TRUNCATION_MARKER
from ._verify import FileCheck, VerifyReport
from ._wal import Repair
from .errors import (
    ClosedError,
    CorruptWALError,
    CursorMismatchError,
    DurabilityError,
    SessionNotFoundError,
    TraceClosedError,
    UnsupportedFormatError,
    WalspanError,
)

__version__ = "0.1.0"

__all__ = [
    "ENV_VAR",
    "TRUNCATION_MARKER",
    "ClosedError",
    "CorruptWALError",
    "CursorMismatchError",
    "DurabilityError",
    "FileCheck",
    "RecoveryAction",
    "RecoveryReport",
    "Repair",
    "SessionNotFoundError",
    "Span",
    "SpanScope",
    "Store",
    "Trace",
    "TraceClosedError",
    "UnsupportedFormatError",
    "VerifyReport",
    "WalspanError",
    "attach_from_env",
    "current_span",
    "get_current_span",
    "set_default_trace",
    "traced",
    "__version__",
]
