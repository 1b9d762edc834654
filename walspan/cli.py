"""The `walspan` command line. A user's mistake gets one clear line on stderr and a non-zero
exit code (2 for bad usage, 1 for a failed check or a bad file), never a traceback."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from ._names import decode_stem, encode_session_id
from ._store import Store, read_first_record
from ._stress import register as register_stress
from ._verify import FileCheck, verify_dir
from .errors import WalspanError


class UsageError(Exception):
    """A bad argument, reported as one line with exit code 2."""


def _existing_dir(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"no such directory: {path}") from None
    # any other OSError (permission denied, ...) is the answer the user needs: it propagates
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"not a directory: {path}")
    return path


def _store(path: str) -> Store:
    return Store(_existing_dir(path), install_hooks=False, create=False)


def _fmt_time(ns: int | None) -> str:
    if not ns:
        return "-"
    return datetime.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_duration(start: int | None, end: int | None) -> str:
    if not start or not end:
        return "open"
    ms = (end - start) / 1e6
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


# -- commands -------------------------------------------------------------------------------


def _error_text(exc: OSError | WalspanError, path: os.PathLike[str] | str) -> str:
    """One line about a WAL that could not be read (an OSError from pread names no file)."""
    if isinstance(exc, OSError) and not isinstance(exc, WalspanError):
        return f"{exc.filename or os.fspath(path)}: {exc.strerror or exc}"
    return str(exc)


def cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    rows = []
    for sid in store.sessions():
        try:
            t = store.load(sid)
        except WalspanError as exc:
            rows.append((sid, "CORRUPT", "-", "-", str(exc)))
            continue
        except OSError as exc:  # e.g. a directory or a planted symlink named like a WAL
            rows.append((sid, "UNREADABLE", "-", "-", _error_text(exc, store.wal_path(sid))))
            continue
        rows.append((sid, t["status"], str(len(t["spans"])), _fmt_time(t["start_time"]), t["trace_id"]))
    if args.json:
        print(json.dumps([dict(zip(("session_id", "status", "spans", "started", "trace_id"), r)) for r in rows]))
        return 1 if any(r[1] in ("CORRUPT", "UNREADABLE") for r in rows) else 0
    if not rows:
        print(f"no traces in {args.dir}")
        return 0
    widths = [max(len(r[i]) for r in rows + [("SESSION", "STATUS", "SPANS", "STARTED", "TRACE")]) for i in range(4)]
    header = ("SESSION", "STATUS", "SPANS", "STARTED", "TRACE")
    for r in [header, *rows]:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:4])) + "  " + r[4])
    return 1 if any(r[1] in ("CORRUPT", "UNREADABLE") for r in rows) else 0


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    try:
        t = store.load(args.session)
    except OSError as exc:
        if isinstance(exc, WalspanError) or exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror, os.fspath(store.wal_path(args.session))) from exc
    if args.json:
        print(json.dumps(t, ensure_ascii=False, indent=2, sort_keys=True))
        return 0
    print(f"session   {t['session_id']}")
    print(f"trace     {t['trace_id']}")
    status = t["status"] + (f" ({t['status_message']})" if t["status_message"] else "")
    print(f"status    {status}")
    print(f"started   {_fmt_time(t['start_time'])}   duration {_fmt_duration(t['start_time'], t['end_time'])}")
    for k, v in sorted(t["metadata"].items()):
        print(f"  {k} = {_short(v)}")
    print(f"writers   {len(t['writers'])}: " + ", ".join(f"{w['writer_id']} pid {w['pid']} {w['state']}" for w in t["writers"]))
    spans = t["spans"]
    children: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for s in spans:
        parent = s["parent_span_id"] if s["parent_span_id"] in ids else None
        children.setdefault(parent, []).append(s)
    print(f"spans     {len(spans)}")

    def walk(parent: str | None, prefix: str) -> None:
        kids = children.get(parent, [])
        for i, s in enumerate(kids):
            last = i == len(kids) - 1
            branch = "└─ " if last else "├─ "
            line = f"{prefix}{branch}{s['name']} [{s['kind']}] {s['status']} {_fmt_duration(s['start_time'], s['end_time'])}"
            if s["status_message"]:
                line += f" ({_short(s['status_message'], 40)})"
            if s["parent_span_id"] and s["parent_span_id"] not in ids:
                line += f" (parent {s['parent_span_id']} not in trace)"
            print(line)
            inner = prefix + ("   " if last else "│  ")
            if args.verbose:
                for k, v in sorted(s["attributes"].items()):
                    print(f"{inner}  · {k} = {_short(v)}")
                for e in s["events"]:
                    print(f"{inner}  ! {e['name']} {_short(e['attributes'])}")
                if s["input"] is not None:
                    print(f"{inner}  > {_short(s['input'])}")
                if s["output"] is not None:
                    print(f"{inner}  < {_short(s['output'])}")
            walk(s["span_id"], inner)

    walk(None, "")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    sessions = [args.session] if args.session is not None else store.sessions()
    failed = 0
    for sid in sessions:
        try:
            print(store.compact(sid))
        except (WalspanError, OSError) as exc:  # report it, and go on with the other sessions
            print(f"walspan: error: {_error_text(exc, store.wal_path(sid))}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _session_arg(f: FileCheck) -> str:
    """How to name this WAL's session on a command line (repair takes the raw session id)."""
    if f.session_id is not None:
        return shlex.quote(f.session_id)
    return "--wal " + shlex.quote(os.path.basename(f.wal))


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_dir(_existing_dir(args.dir))
    for f in report.files:
        who = f"session {f.session_id!r}" if f.session_id is not None else os.path.basename(f.wal)
        for e in f.errors:
            print(f"ERROR {who}: {e}")
        if args.verbose or not f.ok:
            for n in f.notes:
                print(f"note  {who}: {n}")
        if args.verbose and f.ok:
            print(f"ok    {who}: {f.records} records, {f.valid_end} bytes, status {f.status}")
    for n in report.notes:
        print(f"note  {n}")
    bad = [f for f in report.files if not f.ok]
    print(f"{len(report.files)} WAL(s) checked, {len(bad)} with errors")
    for f in bad:
        print(f"  to get out of it, keeping every record before the damage: walspan repair {shlex.quote(args.dir)} {_session_arg(f)}")
    return 1 if bad else 0


def cmd_repair(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    if (args.session is None) == (args.wal is None):
        raise UsageError("repair takes a SESSION id, or --wal FILE for a WAL whose session id cannot be read")
    session = args.session if args.session is not None else _session_of_wal(store, args.wal)
    result = store.repair(session)
    label = repr(session)
    if result is None:
        print(f"{label}: no damage found; nothing changed")
        return 0
    if result.action == "resynced":
        print(f"{label}: re-wrote and re-synced {result.moved} bytes from offset {result.offset} after a failed fdatasync")
    elif result.action == "set_aside":
        print(f"{label}: nothing before the damage to keep ({result.reason}); moved the whole WAL to {result.evidence}")
    else:
        what = "torn tail" if result.action == "torn_tail" else "damage"
        print(
            f"{label}: kept the records before byte offset {result.offset}; moved {result.moved} bytes "
            f"from the {what} on ({result.reason}) to {result.evidence}"
        )
    return 0


def _session_of_wal(store: Store, name: str) -> str:
    stem = os.path.basename(name)
    stem = stem[:-4] if stem.endswith(".wal") else stem
    sid = decode_stem(stem)
    if sid is None or encode_session_id(sid) != stem:
        try:
            sid = read_first_record(os.path.join(store.directory, stem + ".wal")).get("session_id")
        except (OSError, ValueError, WalspanError):
            sid = None
    if not isinstance(sid, str):
        raise UsageError(f"cannot tell the session of {name}: its name is hashed and its trace start is damaged")
    return sid


def cmd_recover(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    report = store.recover()
    for action in report.actions:
        print(action)
    for exc in report.corrupt:
        print(f"CORRUPT {exc}")
    for err in report.unreadable:
        print(f"UNREADABLE {err.filename}: {err.strerror or err}")
    bad = len(report.corrupt) + len(report.unreadable)
    print(f"{report.checked} session(s) checked, {len(report.actions)} change(s), {bad} corrupt or unreadable")
    return 1 if bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    store = _store(args.dir)
    data = export(store, args.session, args.format, include_io=args.include_io)
    if args.output in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with open(args.output, "wb") as f:
            f.write(data)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from . import view  # only this command needs it

    store = _store(args.dir)
    if args.session is None:
        result = view.write_index(store, args.output or os.path.basename(os.path.abspath(args.dir)) + "-view")
        for _sid, reason in result.failed:
            print(f"walspan: error: {reason} (listed in the index as unreadable)", file=sys.stderr)
        print(f"wrote {result.index} and {len(result.pages)} session page(s) beside it")
        return 1 if result.failed else 0
    out = args.output or view.default_trace_name(store, args.session)
    if os.path.isdir(out):
        out = os.path.join(out, view.default_trace_name(store, args.session))
    path, trace = view.write_trace(store, args.session, out)
    n = len(trace["spans"])
    print(f"wrote {path} ({n} span{'' if n == 1 else 's'})")
    return 0


# -- entry point ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="walspan", description="Crash-resilient write-ahead logging for tracing spans.")
    p.add_argument("--version", action="version", version=f"walspan {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("ls", help="list the traces in a directory")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("show", help="show one trace as a span tree")
    s.add_argument("dir")
    s.add_argument("session")
    s.add_argument("-v", "--verbose", action="store_true", help="attributes, events, input and output too")
    s.add_argument("--json", action="store_true", help="the folded trace as JSON")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("compact", help="write the canonical JSON of one or every trace")
    s.add_argument("dir")
    s.add_argument("session", nargs="?")
    s.set_defaults(func=cmd_compact)

    s = sub.add_parser("verify", help="check every WAL and JSON; exit 1 on corruption")
    s.add_argument("dir")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser(
        "repair", help="get a damaged WAL going again: keep the records before the damage, move the rest aside"
    )
    s.add_argument("dir")
    s.add_argument("session", nargs="?")
    s.add_argument("--wal", help="the WAL's file name, for a WAL whose session id cannot be read")
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("recover", help="mark crashed the traces whose writers all died")
    s.add_argument("dir")
    s.set_defaults(func=cmd_recover)

    s = sub.add_parser("export", help="write one trace as OTLP/JSON, OTLP protobuf, Perfetto JSON or JSON Lines")
    s.add_argument("dir")
    s.add_argument("session")
    s.add_argument("--format", required=True, choices=["otlp-json", "otlp-proto", "perfetto", "jsonl"])
    s.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    s.add_argument(
        "--include-io", action="store_true", help="OTLP: span inputs/outputs as GenAI prompt and completion attributes"
    )
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("view", help="write a self-contained HTML page of one trace, or of every trace in DIR")
    s.add_argument("dir")
    s.add_argument("session", nargs="?")
    s.add_argument(
        "-o", "--output",
        help="the page to write (default: ./<session file stem>.html); without SESSION, the directory "
        "that gets index.html and one page per session (default: ./<DIR's name>-view)",
    )
    s.set_defaults(func=cmd_view)

    register_stress(sub)
    return p


class _WarningsToStderr(logging.Handler):
    """walspan's warnings (a torn tail truncated, evidence kept, a JSON set aside) are things a
    CLI user must be told: one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        print(msg if msg.startswith("walspan: ") else f"walspan: {msg}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    logger = logging.getLogger("walspan")
    handler = _WarningsToStderr(logging.WARNING)
    logger.addHandler(handler)
    try:
        return _main(argv)
    finally:
        logger.removeHandler(handler)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as exc:
        print(f"walspan: error: {exc}", file=sys.stderr)
        return 2
    except (WalspanError, LookupError, ValueError, ImportError) as exc:
        print(f"walspan: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"walspan: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("walspan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
