"""What a writer process records as it dies, and what a fork() child must forget.

Installed once per process, when a Store with install_hooks=True first attaches a writer:
- sys.excepthook: an uncaught exception ends every trace this process has attached as
  `error` ("<Type>: <message>"); threading.excepthook ends the traces opened by that thread.
- SIGTERM, SIGHUP: mark every attached trace `crashed` ("killed by SIGTERM"), then the
  previous handler runs, or the default action happens (the process dies by the signal). A
  signal whose disposition was SIG_IGN is left alone.
- SIGINT is not fatal by itself: Python turns it into KeyboardInterrupt, and a REPL or an agent
  loop catches that and carries on. So the handler only chains to the previous one (Python's,
  which raises KeyboardInterrupt, or the program's own); the traces are marked `crashed`
  ("interrupted: ...") at the interpreter's exit, and only if an uncaught KeyboardInterrupt is
  what ends it (see `_at_exit`). Only when SIGINT's disposition was SIG_DFL (the process dies
  by it, no exception) does it act like SIGTERM.
- atexit (and multiprocessing's exit finalizers, which run where atexit does not): detach.
Every hook chains to whatever was installed before it. SIGKILL and power loss are recovery's job.

A signal can arrive while this very thread is inside a walspan call holding a lock; the handler
then defers its work to the moment the call returns (see `busy`), instead of deadlocking.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._store import Store

log = logging.getLogger("walspan")

_stores: weakref.WeakSet[Store] = weakref.WeakSet()
# Stores with attached writers are held strongly: a Store dropped without close() (a local in
# a function that returned) must still be detached at exit, not left to recovery as crashed.
_held: set[Store] = set()
_installed = False
_atexit_pid = 0
_finalizer_pid = 0
_install_lock = threading.Lock()
_local = threading.local()
_pending_signals: list[int] = []
HANDLED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))
_SIGINT = signal.SIGINT
_previous: dict[int, Any] = {}


def register(store: Store) -> None:
    _stores.add(store)


def hold(store: Store) -> None:
    """Keep `store` alive while it has attached writers, so the exit hooks can detach it."""
    _held.add(store)


def unhold(store: Store) -> None:
    _held.discard(store)


def stores() -> list[Store]:
    """The stores the process-wide hooks act on: those created with install_hooks=True."""
    return [s for s in set(_stores) | _held if s.install_hooks]


# -- re-entrancy guard --------------------------------------------------------------------


class _Busy:
    """Mark this thread as inside a walspan call; run deferred signal work when it leaves.
    A class, not a generator context manager: it wraps every append (hot path)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _local.depth = getattr(_local, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        depth = _local.depth - 1
        _local.depth = depth
        while depth == 0 and _pending_signals and threading.current_thread() is threading.main_thread():
            signum = _pending_signals.pop(0)
            _on_signal(signum, None)


_BUSY = _Busy()


def busy() -> _Busy:
    return _BUSY


def _is_busy() -> bool:
    return getattr(_local, "depth", 0) > 0


# -- installation -------------------------------------------------------------------------


_signals_installed = False


def install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            _install_signal_handlers()  # first attach was in another thread: retry from main
            return
        _installed = True
        previous_excepthook = sys.excepthook

        def excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
            try:
                # An uncaught KeyboardInterrupt is judged at exit instead (_at_exit): non-daemon
                # threads still run (and log) until the interpreter has joined them, and the
                # interactive interpreter calls this hook for every interrupted command.
                if not isinstance(exc, KeyboardInterrupt):
                    _end_all(_describe(exc_type, exc), thread=None, error=exc)
            finally:  # whatever happens here, the original traceback is still shown
                previous_excepthook(exc_type, exc, tb)

        sys.excepthook = excepthook
        previous_threadhook = threading.excepthook

        def threadhook(args: Any) -> None:
            try:
                if args.exc_type is not SystemExit:
                    ident = args.thread.ident if args.thread is not None else None
                    _end_all(_describe(args.exc_type, args.exc_value), thread=ident, error=args.exc_value)
            finally:
                previous_threadhook(args)

        threading.excepthook = threadhook
        _register_atexit()
        _install_signal_handlers()


def _install_signal_handlers() -> None:
    """Once, and only from the main thread (Python allows signal.signal nowhere else); a
    process whose first writer attaches in another thread gets them at its first main-thread
    attach."""
    global _signals_installed
    if _signals_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        log.debug("walspan: writer attached outside the main thread; signal hooks deferred")
        return
    _signals_installed = True
    if _in_multiprocessing_child():
        # Not in multiprocessing children: Pool.terminate() stops its workers with SIGTERM and
        # then joins them. A Python-level handler only runs when the main thread executes
        # bytecode, and a worker whose SIGTERM lands just before it blocks in the task queue's
        # semaphore never runs it: the worker never dies and terminate() hangs (reproduced).
        # With the default disposition the kernel kills the worker; recovery records it lost.
        return
    for signum in HANDLED_SIGNALS:
        try:
            prev = signal.getsignal(signum)
            if prev is signal.SIG_IGN or prev is None:
                continue  # ignored (or set from C): not ours to change
            _previous[signum] = prev
            signal.signal(signum, _on_signal)
        except (
            ValueError,
            OSError,
        ):  # pragma: no cover - e.g. not the main interpreter
            pass


def _describe(exc_type: type[BaseException], exc: BaseException | None) -> str:
    """'<Type>: <message>', even for an exception whose __str__ fails or returns odd text."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the original error
        text = f"<unprintable {exc_type.__name__}>"
    # lone surrogates cannot be encoded into the WAL: escape them rather than lose the record
    return f"{exc_type.__name__}: {text}".encode("utf-8", "backslashreplace").decode("utf-8")


def _end_all(message: str, thread: int | None, error: BaseException | None) -> None:
    status = "crashed" if isinstance(error, KeyboardInterrupt) else "error"
    for store in stores():
        try:
            store._end_attached(status, message, thread=thread)
        except Exception:  # pragma: no cover - dying anyway; keep the original traceback visible
            log.exception(
                "walspan: could not record the uncaught exception in %s",
                store.directory,
            )


def _on_signal(signum: int, frame: Any) -> None:
    if _is_busy():
        # Finish the current walspan call first: no crash record taken under our own locks, and
        # no KeyboardInterrupt raised in the middle of an append (between its write and the
        # shared state's update, or inside its flush).
        _pending_signals.append(signum)
        return
    prev = _previous.get(signum, signal.SIG_DFL)
    if signum == _SIGINT and callable(prev):
        # Not the end of the process: Python's handler raises KeyboardInterrupt (or the
        # program's own handler decides). Whether that interrupt ends the process is known
        # only at exit (_at_exit).
        prev(signum, frame)
        return
    name = signal.Signals(signum).name
    for store in stores():
        try:
            store._end_attached("crashed", f"killed by {name}", thread=None)
        except Exception:  # pragma: no cover
            log.exception("walspan: could not record %s in %s", name, store.directory)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _register_atexit() -> None:
    global _atexit_pid
    if _atexit_pid != os.getpid():  # atexit entries survive fork: one registration per process
        _atexit_pid = os.getpid()
        atexit.register(_at_exit)


def _at_exit() -> None:
    """The interpreter is exiting: after the main module returned or raised, and after every
    non-daemon thread was joined. If an uncaught KeyboardInterrupt is what ended it, the
    traces are crashed ("interrupted"); otherwise they are only detached."""
    interrupt = ended_by_interrupt()
    if interrupt is not None:
        _end_all(_interrupted_message(interrupt), thread=None, error=interrupt)
    detach_all()


def ended_by_interrupt() -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that is ending this interpreter, if one is.

    When the main module (script, -c or -m) ends by an uncaught exception, the interpreter
    stores it in sys.last_value (sys.last_exc from 3.12) before it calls sys.excepthook, so
    this holds whichever excepthook the program installed; then it joins threads, runs atexit
    and, for a KeyboardInterrupt, kills itself by SIGINT. The interactive interpreter stores
    every exception shown at its prompt there too, but a KeyboardInterrupt does not end it:
    it is never taken for one there.
    """
    if sys.flags.interactive or sys.flags.inspect or hasattr(sys, "ps1"):
        return None
    exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return exc if isinstance(exc, KeyboardInterrupt) else None


def _interrupted_message(exc: KeyboardInterrupt) -> str:
    detail = _describe(type(exc), exc)
    return "interrupted: uncaught " + (detail if exc.args else type(exc).__name__)


def _in_multiprocessing_child() -> bool:
    mp = sys.modules.get("multiprocessing")
    try:
        return mp is not None and mp.parent_process() is not None
    except Exception:  # noqa: BLE001 - a half-initialised multiprocessing must not break a crash hook
        return False


def detach_all() -> None:
    for store in stores():
        try:
            store._release()  # not close(): an atexit handler that logs later may attach again
        except Exception:  # pragma: no cover
            log.exception("walspan: could not detach from %s at exit", store.directory)


# -- fork ---------------------------------------------------------------------------------


def _after_fork_in_child() -> None:
    global _install_lock, _signals_installed
    _install_lock = threading.Lock()  # another thread may have held it at fork time
    _local.__dict__.clear()
    _pending_signals.clear()
    # Give the child back the dispositions it had before walspan: it installs its own handlers
    # when it attaches a writer (and none in a multiprocessing child, see above).
    for signum, prev in list(_previous.items()):
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, prev)
    _previous.clear()
    _signals_installed = False
    for store in set(_stores) | _held:  # every store, hooks or not: none may reuse inherited locks
        store._forget_after_fork()
    _held.clear()  # the child holds what it attaches itself


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def register_exit_finalizer(fn: Callable[[], None]) -> None:
    """multiprocessing children leave through os._exit, skipping atexit; its own finalizers
    still run there, so a forked worker detaches too."""
    global _finalizer_pid
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None and _finalizer_pid != os.getpid():
        # a multiprocessing child starts with an empty registry: register once per process
        _finalizer_pid = os.getpid()
        mp_util.Finalize(None, fn, exitpriority=10)
