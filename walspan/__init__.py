"""walspan: a multi-process, crash-resilient write-ahead logger for tracing spans.

The WAL is the truth; the JSON trace is a view. See README.md and docs/FORMAT.md. Reading a
store (records after a cursor, following it, summaries) is `walspan.read`.
"""

from ._recovery import RecoveryAction, RecoveryReport
from ._store import Store
from ._trace import ENV_VAR, Span, Trace, attach_from_env, current_span
from ._values import TRUNCATION_MARKER
from ._verify import FileCheck, VerifyReport
from .errors import (
    ClosedError,
    CorruptWALError,
    CursorMismatchError,
    DurabilityError,
    SessionNotFoundError,
    TraceClosedError,
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
    "SessionNotFoundError",
    "Span",
    "Store",
    "Trace",
    "TraceClosedError",
    "VerifyReport",
    "WalspanError",
    "attach_from_env",
    "current_span",
    "__version__",
]
