"""Recovery: mark crashed the traces whose writers all died; record writers lost while others live.

Safe at any time, from any process, concurrently with live writers and other recoveries: all
decisions are taken under the session's append lock, from the WAL as it is then, and a writer
counts as dead only when its liveness lock proves it (see _liveness). Idempotent: a crashed
trace is terminal and a lost writer is no longer attached, so a second run changes nothing.
Torn tails are repaired (under the lock, as any append would); corrupt WALs are reported and
left untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from . import _compactor, _hooks, _liveness
from ._format import RecordType, unpack_payload
from ._reader import payload_at
from ._wal import WalHandle
from .errors import CorruptWALError

if TYPE_CHECKING:
    from ._store import Store

_T = RecordType


@dataclass
class RecoveryAction:
    session_id: str
    action: str  # "crashed" | "writer_lost" | "repaired_tail" | "compacted"
    message: str

    def __str__(self) -> str:
        return f"{self.session_id}: {self.action}: {self.message}"


@dataclass
class RecoveryReport:
    checked: int = 0
    actions: list[RecoveryAction] = field(default_factory=list)
    corrupt: list[CorruptWALError] = field(default_factory=list)
    unreadable: list[OSError] = field(default_factory=list)  # e.g. a directory named S.wal
    compacted: list[str] = field(default_factory=list)  # paths of the JSON files written

    @property
    def crashed(self) -> list[str]:
        return [a.session_id for a in self.actions if a.action == "crashed"]

    @property
    def changed(self) -> bool:
        return bool(self.actions or self.compacted)


def _fmt_ns(ns: int | None) -> str:
    if not ns:
        return "unknown"
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat(timespec="milliseconds")


def recover(store: Store, session_ids: list[str] | None = None) -> RecoveryReport:
    report = RecoveryReport()
    ids = store.sessions() if session_ids is None else session_ids
    for sid in ids:
        report.checked += 1
        try:
            # busy: a signal handler arriving now must not try to take the locks we hold
            with _hooks.busy():
                _recover_session(store, sid, report)
        except CorruptWALError as exc:
            report.corrupt.append(exc)
        except FileNotFoundError:
            report.checked -= 1  # deleted since it was listed: nothing left to recover
        except OSError as exc:  # one unreadable session must not stop the others' recovery
            report.unreadable.append(exc)
    if session_ids is None:
        _sweep(store)
    return report


_TMP_RE = re.compile(r"\.(?:json|wal)\.tmp-(\d+)-[0-9a-f]+$")


def _sweep(store: Store) -> None:
    """Housekeeping after a whole-store recovery: remove the temporary files of compactions and
    WAL creations whose process is gone (a kill between their write and their rename), and the
    liveness files of writers proven dead (a kill between creating one and attaching)."""
    for name in os.listdir(store.directory):
        m = _TMP_RE.search(name)
        if m and not psutil.pid_exists(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(store.directory, name))
    try:
        live = os.listdir(_liveness.writers_dir(store._internal))
    except FileNotFoundError:
        return
    for name in live:
        if name.endswith(".live"):
            _liveness.remove_dead_lock_file(store._internal, name[: -len(".live")])


def _recover_session(store: Store, session_id: str, report: RecoveryReport) -> None:
    from ._names import encode_session_id

    stem = encode_session_id(session_id)
    internal = store._internal
    own = store._writer.writer_id if store._writer is not None and store._writer.pid == os.getpid() else None
    handle = WalHandle(store.directory, stem, store.durability)
    changed = False
    end = 0
    dead: list[tuple[str, dict[str, Any]]] = []
    try:
        size_before = os.fstat(handle.fd).st_size
        pre = handle.prescan_writers()  # the whole log, read without holding the append lock
        with handle.locked() as wal:
            if wal.end < size_before:
                report.actions.append(
                    RecoveryAction(
                        session_id,
                        "repaired_tail",
                        f"truncated {size_before - wal.end} torn bytes at offset {wal.end}",
                    )
                )
                changed = True
            if not wal.terminal_off:
                ws = wal.attached_writers(pre)
                attached, last_off = ws.attached, ws.last
                alive = []
                for wid, p in attached.items():
                    if wid == own or _liveness.writer_alive(internal, p):
                        alive.append(wid)
                    else:
                        dead.append((wid, p))
                if dead:
                    last_time = _record_time(handle, last_off)
                    names = ", ".join(f"{wid} (pid {p.get('pid')} on {p.get('host')})" for wid, p in dead)
                    now = time.time_ns()
                    if alive:
                        for wid, p in dead:
                            msg = f"writer {wid} (pid {p.get('pid')} on {p.get('host')}) died without detaching"
                            wal.append(
                                _T.WRITER_LOST,
                                {
                                    "lost": wid,
                                    "message": msg,
                                    "time": now,
                                    "by": own or "recovery",
                                },
                            )
                            report.actions.append(RecoveryAction(session_id, "writer_lost", msg))
                    else:
                        msg = f"writer(s) {names} died without ending the trace; last record written at {_fmt_ns(last_time)}"
                        wal.append(
                            _T.TERMINAL,
                            {
                                "status": "crashed",
                                "message": msg,
                                "time": now,
                                "by": own or "recovery",
                            },
                        )
                        report.actions.append(RecoveryAction(session_id, "crashed", msg))
                    end = wal.end
                    changed = True
        if end and handle.durable:
            handle.wait_durable(end)
        for wid, _p in dead:
            _liveness.remove_dead_lock_file(internal, wid)
    finally:
        handle.close()
    json_path = os.path.join(store.directory, stem + ".json")
    if changed or not os.path.exists(json_path):
        done = _compactor.compact(store.directory, stem)
        if done.rewritten:
            report.compacted.append(done.path)
        if done.set_aside is not None:
            report.actions.append(
                RecoveryAction(
                    session_id,
                    "json_set_aside",
                    f"{json_path} showed records the WAL no longer holds; kept as {done.set_aside}",
                )
            )


def _record_time(handle: WalHandle, offset: int) -> int | None:
    if not offset:
        return None
    raw = payload_at(handle.fd, offset, handle.keys)
    body = unpack_payload(raw) if raw is not None else None
    t = body.get("time") if isinstance(body, dict) else None
    return t if isinstance(t, int) else None
