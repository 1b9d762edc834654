"""The `walspan` command line. A user's mistake gets one clear line on stderr and a non-zero
exit code (2 for bad usage, 1 for a failed check or a bad file), never a traceback.

Every command takes `--json` (typed fields; times as UTC ISO-8601 strings with their zone,
except `show --json`, which prints the canonical trace itself). Text output escapes control
characters in ids and names; progress goes to stderr only when it is a terminal; when the
reader of a pipe goes away (`walspan show ... | head`) the command ends quietly with 141.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import stat
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

from . import __version__
from ._fold import TERMINAL_STATUSES
from ._names import decode_stem, encode_session_id
from ._prune import parse_age, prune
from ._store import Store, read_first_record
from ._stress import register as register_stress
from ._tail import TailFormatter
from ._term import Progress, fmt_bytes, fmt_duration, fmt_time, pager, safe, silence_stdout
from ._verify import FileCheck, VerifyReport, evidence_notes, verify_wal
from .errors import SessionNotFoundError, WalspanError
from .read import Follower, Notice, Record, TraceSummary, TraceView, list_stems, summarize_stem

LS_STATUSES = ("running", *TERMINAL_STATUSES, "corrupt", "unreadable", "live", "idle", "dead-unrecovered")


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


def _emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")


def _error_text(exc: OSError | WalspanError, path: os.PathLike[str] | str) -> str:
    """One line about a WAL that could not be read (an OSError from pread names no file)."""
    if isinstance(exc, OSError) and not isinstance(exc, WalspanError):
        return f"{exc.filename or os.fspath(path)}: {exc.strerror or exc}"
    return str(exc)


# -- commands -------------------------------------------------------------------------------


_LS_SORT: dict[str, tuple[Callable[[TraceSummary], Any], bool]] = {
    "session": (lambda r: r.session_id, False),
    "started": (lambda r: r.start_time or 0, True),
    "ended": (lambda r: r.end_time or 0, True),
    "spans": (lambda r: r.spans, True),
    "size": (lambda r: r.wal_bytes, True),
    "status": (lambda r: (r.status, r.session_id), False),
}


def _split_statuses(values: list[str] | None, allowed: Sequence[str], option: str = "--status") -> set[str] | None:
    if not values:
        return None
    wanted = {v.strip() for value in values for v in value.split(",") if v.strip()}
    bad = sorted(wanted - set(allowed))
    if bad:
        raise UsageError(f"{option} {', '.join(bad)}: expected one of {', '.join(allowed)}")
    return wanted


def cmd_ls(args: argparse.Namespace) -> int:
    directory = _existing_dir(args.dir)
    wanted = _split_statuses(args.status, LS_STATUSES)
    stems = list_stems(directory)
    rows: list[TraceSummary] = []
    with Progress("ls", len(stems)) as progress:
        for i, stem in enumerate(stems):
            progress.update(i, stem)
            try:
                rows.append(summarize_stem(directory, stem))
            except SessionNotFoundError:
                continue  # removed since the listing
    if wanted is not None:
        rows = [r for r in rows if r.status in wanted or r.liveness in wanted]
    key, newest_first = _LS_SORT[args.sort]
    rows.sort(key=key, reverse=newest_first)
    if args.limit is not None:
        rows = rows[: args.limit]
    bad = 1 if any(not r.ok for r in rows) else 0
    if args.json:
        _emit_json([r.to_json() for r in rows])
        return bad
    if not rows:
        print(f"no traces in {safe(args.dir)}" + (" match" if wanted is not None and stems else ""))
        return 0
    header = ("SESSION", "STATUS", "LIVENESS", "SPANS", "STARTED", "TRACE")
    table = [
        (
            safe(r.session_id),
            r.status if r.ok else r.status.upper(),
            r.liveness or "-",
            str(r.spans) if r.ok else "-",
            fmt_time(r.start_time),
            safe(r.trace_id or "") if r.ok else safe(r.error or ""),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(5)]
    for row in [header, *table]:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:5])) + "  " + row[5])
    return bad


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = safe(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cmd_show(args: argparse.Namespace) -> int:
    directory = _existing_dir(args.dir)
    with Progress("show") as progress:
        progress.update(0, f"folding the log of {args.session}")
        view = TraceView(directory, args.session)
    if args.json:
        for piece in view.canonical_json():
            sys.stdout.write(piece.decode("utf-8"))
        sys.stdout.write("\n")
        return 0
    with pager(not args.no_pager):
        _print_trace(view, args)
    return 0


def _print_trace(view: TraceView, args: argparse.Namespace) -> None:
    t = view.info
    print(f"session   {safe(t['session_id'])}")
    print(f"trace     {safe(t['trace_id'])}")
    status = t["status"] + (f" ({_short(t['status_message'], 200)})" if t["status_message"] else "")
    if t["status"] == "running":
        status += f" [{_liveness(view)}]"
    print(f"status    {status}")
    print(f"started   {fmt_time(t['start_time'])}   duration {fmt_duration(t['start_time'], t['end_time'])}")
    for k, v in sorted(t["metadata"].items()):
        print(f"  {safe(k)} = {_short(v)}")
    writers = t["writers"]
    shown = ", ".join(f"{safe(w['writer_id'])} pid {w['pid']} {w['state']}" for w in writers[:20])
    more = f", and {len(writers) - 20} more" if len(writers) > 20 else ""
    print(f"writers   {len(writers)}: {shown}{more}")
    print(f"spans     {len(view)}")
    _print_tree(view, args)


def _liveness(view: TraceView) -> str:
    from .read import liveness

    attached = [w for w in view.info["writers"] if w["state"] == "attached"]
    return liveness(os.path.dirname(view.path), attached)


def _print_tree(view: TraceView, args: argparse.Namespace) -> None:
    """The span tree, depth first, in the order spans started; iterative (no recursion limit),
    holding only ids and parents in memory (the spans themselves are unpacked one by one)."""
    spans = view.fold.spans
    children: dict[str | None, list[str]] = {}
    for sid, span in zip(spans, view.spans()):
        parent = span["parent_span_id"]
        children.setdefault(parent if parent in spans else None, []).append(sid)
    limit = args.limit
    printed = 0
    stack: list[tuple[str, str, int, bool]] = [(sid, "", 1, False) for sid in reversed(children.get(None, []))]
    if stack:
        stack[0] = (stack[0][0], "", 1, True)  # the last root
    while stack:
        sid, prefix, depth, last = stack.pop()
        if limit is not None and printed >= limit:
            print(f"… {len(spans) - printed} more span(s) (--limit {limit})")
            return
        s = view.span(sid)
        line = f"{prefix}{'└─ ' if last else '├─ '}{safe(s['name'])} [{safe(s['kind'])}] {s['status']} {fmt_duration(s['start_time'], s['end_time'])}"
        if s["status_message"]:
            line += f" ({_short(s['status_message'], 40)})"
        if s["parent_span_id"] and s["parent_span_id"] not in spans:
            line += f" (parent {safe(s['parent_span_id'])} not in trace)"
        kids = children.get(sid, [])
        if kids and args.depth is not None and depth >= args.depth:
            line += f" (+{len(kids)} child span(s) below --depth {args.depth})"
            kids = []
        print(line)
        printed += 1
        inner = prefix + ("   " if last else "│  ")
        if args.verbose:
            _print_details(s, inner)
        for i, kid in enumerate(reversed(kids)):
            stack.append((kid, inner, depth + 1, i == 0))
    unreachable = len(spans) - printed
    if unreachable and args.depth is None:
        hidden = sum(len(v) for k, v in children.items() if k is not None) + len(children.get(None, [])) - printed
        if hidden > 0:
            print(f"({hidden} span(s) not reachable from a root: their parents form a cycle)")


def _print_details(s: dict[str, Any], inner: str) -> None:
    for k, v in sorted(s["attributes"].items()):
        print(f"{inner}  · {safe(k)} = {_short(v)}")
    for e in s["events"]:
        print(f"{inner}  ! {safe(e['name'])} {_short(e['attributes'])}")
    if s["input"] is not None:
        print(f"{inner}  > {_short(s['input'])}")
    if s["output"] is not None:
        print(f"{inner}  < {_short(s['output'])}")


def cmd_compact(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    sessions = [args.session] if args.session is not None else store.sessions()
    failed = 0
    results = []
    with Progress("compact", len(sessions)) as progress:
        for i, sid in enumerate(sessions):
            progress.update(i, sid)
            try:
                path = str(store.compact(sid))
                results.append({"session_id": sid, "json": path, "error": None})
                if not args.json:
                    print(path)
            except (WalspanError, OSError) as exc:  # report it, and go on with the other sessions
                text = _error_text(exc, store.wal_path(sid))
                results.append({"session_id": sid, "json": None, "error": text})
                if not args.json:
                    print(f"walspan: error: {text}", file=sys.stderr)
                failed += 1
    if args.json:
        _emit_json(results)
    return 1 if failed else 0


def _session_arg(f: FileCheck) -> str:
    """How to name this WAL's session on a command line (repair takes the raw session id)."""
    if f.session_id is not None:
        return shlex.quote(f.session_id)
    return "--wal " + shlex.quote(os.path.basename(f.wal))


def cmd_verify(args: argparse.Namespace) -> int:
    directory = _existing_dir(args.dir)
    report = VerifyReport(directory)
    names = sorted(n for n in os.listdir(directory) if n.endswith(".wal") and not n.startswith("."))
    with Progress("verify", len(names)) as progress:
        for i, name in enumerate(names):
            progress.update(i, name)
            report.files.append(verify_wal(os.path.join(directory, name)))
    evidence_notes(directory, sorted(os.listdir(directory)), report)
    bad = sum(1 for f in report.files if not f.ok)
    if args.json:
        files = [dict(asdict(f), ok=f.ok) for f in report.files]
        _emit_json(
            {"directory": directory, "ok": report.ok, "checked": len(report.files), "with_errors": bad, "files": files,
             "notes": report.notes}
        )
        return 1 if bad else 0
    for f in report.files:
        who = safe(f"session {f.session_id!r}" if f.session_id is not None else os.path.basename(f.wal))
        for e in f.errors:
            print(f"ERROR {who}: {e}")
        if args.verbose or not f.ok:
            for n in f.notes:
                print(f"note  {who}: {n}")
        if args.verbose and f.ok:
            print(f"ok    {who}: {f.records} records, {f.valid_end} bytes, status {f.status}")
    for n in report.notes:
        print(f"note  {n}")
    print(f"{len(report.files)} WAL(s) checked, {bad} with errors")
    for f in report.files:
        if not f.ok:
            print(f"  to get out of it, keeping every record before the damage: walspan repair {shlex.quote(args.dir)} {_session_arg(f)}")
    return 1 if bad else 0


def cmd_repair(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    if (args.session is None) == (args.wal is None):
        raise UsageError("repair takes a SESSION id, or --wal FILE for a WAL whose session id cannot be read")
    session = args.session if args.session is not None else _session_of_wal(store, args.wal)
    result = store.repair(session)
    if args.json:
        out: dict[str, Any] = {"session_id": session, "repaired": result is not None}
        if result is not None:
            out.update(
                action=result.action, offset=result.offset, moved_bytes=result.moved, evidence=result.evidence,
                reason=result.reason,
            )
        _emit_json(out)
        return 0
    label = safe(repr(session))
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
    with Progress("recover") as progress:
        progress.update(0, "checking every session")
        report = store.recover()
    bad = len(report.corrupt) + len(report.unreadable)
    changes = len(report.actions) + len(report.compacted)
    if args.json:
        _emit_json(
            {
                "checked": report.checked,
                "changes": changes,
                "actions": [asdict(a) for a in report.actions],
                "json_written": report.compacted,
                "corrupt": [str(e) for e in report.corrupt],
                "unreadable": [f"{e.filename}: {e.strerror or e}" for e in report.unreadable],
            }
        )
        return 1 if bad else 0
    for action in report.actions:
        print(safe(action))
    for path in report.compacted:
        print(f"wrote {path}")
    for exc in report.corrupt:
        print(f"CORRUPT {exc}")
    for err in report.unreadable:
        print(f"UNREADABLE {err.filename}: {err.strerror or err}")
    print(
        f"{report.checked} session(s) checked, {changes} change(s) "
        f"({len(report.compacted)} JSON file(s) written), {bad} corrupt or unreadable"
    )
    return 1 if bad else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    store = _store(args.dir)
    with Progress("export") as progress:
        progress.update(0, f"folding and encoding {args.session}")
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
        with Progress("view") as progress:
            progress.update(0, "writing the index and a page per session")
            result = view.write_index(store, args.output or os.path.basename(os.path.abspath(args.dir)) + "-view")
        for _sid, reason in result.failed:
            print(f"walspan: error: {safe(reason)} (listed in the index as unreadable)", file=sys.stderr)
        if args.json:
            _emit_json(
                {"index": str(result.index), "pages": [str(p) for p in result.pages],
                 "unreadable": [{"session_id": sid, "error": reason} for sid, reason in result.failed]}
            )
        else:
            print(f"wrote {result.index} and {len(result.pages)} session page(s) beside it")
        return 1 if result.failed else 0
    out = args.output or view.default_trace_name(store, args.session)
    if os.path.isdir(out):
        out = os.path.join(out, view.default_trace_name(store, args.session))
    with Progress("view") as progress:
        progress.update(0, f"writing the page of {args.session}")
        path, trace = view.write_trace(store, args.session, out)
    n = len(trace["spans"])
    if args.json:
        _emit_json({"session_id": args.session, "page": str(path), "spans": n})
    else:
        print(f"wrote {path} ({n} span{'' if n == 1 else 's'})")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    directory = _existing_dir(args.dir)
    if args.session is not None and not args.follow:  # with -f, wait for it to appear
        path = os.path.join(directory, encode_session_id(args.session) + ".wal")
        try:
            os.lstat(path)
        except FileNotFoundError:
            raise SessionNotFoundError(args.session, path) from None
    follower = Follower(directory, args.session, from_start=args.from_start, back=0 if args.from_start else args.lines)
    fmt = TailFormatter(as_json=args.json)
    if args.from_start:
        _write_lines(fmt, follower.iter_poll())  # streamed: a whole store may follow
    else:  # the last N records of the store as a whole (at most N per session), oldest first
        first = follower.poll()
        notices = [i for i in first if isinstance(i, Notice)]
        records = sorted((i for i in first if isinstance(i, Record)), key=lambda r: (r.time or 0, r.session_id, r.seq))
        _write_lines(fmt, [*notices, *records[max(0, len(records) - args.lines) :]])
    if not args.follow:
        return 0
    while True:  # until SIGINT (exit 130, quietly) or the reader of the pipe goes away (141)
        time.sleep(args.interval)
        _write_lines(fmt, follower.iter_poll())


def _write_lines(fmt: TailFormatter, items: Iterable[Record | Notice]) -> None:
    for item in items:
        sys.stdout.write(fmt.line(item) + "\n")
    sys.stdout.flush()


def cmd_prune(args: argparse.Namespace) -> int:
    directory = _existing_dir(args.dir)
    try:
        older = parse_age(args.older_than)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    statuses = _split_statuses(args.status, TERMINAL_STATUSES)
    if args.keep < 0:
        raise UsageError(f"--keep must be 0 or more, not {args.keep}")
    with Progress("prune") as progress:
        report = prune(
            directory,
            older_than=older,
            keep=args.keep,
            statuses=tuple(sorted(statuses)) if statuses else TERMINAL_STATUSES,
            dry_run=args.dry_run,
            progress=lambda i, n, stem: _step(progress, i, n, stem),
        )
    if args.json:
        _emit_json(report.to_json())
        return 1 if report.errors else 0
    verb = "would remove" if args.dry_run else "removed"
    for t in report.removed:
        print(f"{verb} {safe(t.session_id)} ({t.status}, ended {fmt_time(t.end_time)}): {len(t.files)} file(s), {fmt_bytes(t.bytes)}")
    for f in report.orphans:
        print(f"{verb} {f.path} (a cache left without its WAL), {fmt_bytes(f.bytes)}")
    for sid, why in report.kept:
        print(f"kept {safe(sid)}: {why}")
    for err in report.errors:
        print(f"walspan: error: {safe(err)}", file=sys.stderr)
    done = ("would be removed", "would be freed") if args.dry_run else ("removed", "freed")
    print(f"{len(report.removed)} trace(s) {done[0]}, {fmt_bytes(report.bytes_freed)} {done[1]}")
    return 1 if report.errors else 0


def _step(progress: Progress, done: int, total: int, detail: str) -> None:
    progress.total = total
    progress.update(done, detail)


# -- entry point ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, not {value}")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, not {text!r}") from None
    if not 0.001 <= value <= 60:
        raise argparse.ArgumentTypeError(f"expected 0.001 to 60 seconds, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="walspan", description="Crash-resilient write-ahead logging for tracing spans.")
    p.add_argument("--version", action="version", version=f"walspan {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("ls", help="list the traces in a directory")
    s.add_argument("dir")
    s.add_argument("--status", action="append", metavar="S[,S]", help=f"only these statuses or liveness states ({', '.join(LS_STATUSES)})")
    s.add_argument("--sort", choices=sorted(_LS_SORT), default="session", help="order (started/ended/spans/size: largest first)")
    s.add_argument("--limit", type=_nonnegative, help="at most this many rows (after --sort)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("show", help="show one trace as a span tree")
    s.add_argument("dir")
    s.add_argument("session")
    s.add_argument("-v", "--verbose", action="store_true", help="attributes, events, input and output too")
    s.add_argument("--depth", type=_nonnegative, help="levels of the tree to show (1: the roots)")
    s.add_argument("--limit", type=_nonnegative, help="at most this many spans")
    s.add_argument("--no-pager", action="store_true", help="never page (a pager is used only on a terminal)")
    s.add_argument("--json", action="store_true", help="the canonical trace (as Store.load()), streamed")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("compact", help="write the canonical JSON of one or every trace")
    s.add_argument("dir")
    s.add_argument("session", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_compact)

    s = sub.add_parser("verify", help="check every WAL and JSON; exit 1 on corruption")
    s.add_argument("dir")
    s.add_argument("-v", "--verbose", action="store_true")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser(
        "repair", help="get a damaged WAL going again: keep the records before the damage, move the rest aside"
    )
    s.add_argument("dir")
    s.add_argument("session", nargs="?")
    s.add_argument("--wal", help="the WAL's file name, for a WAL whose session id cannot be read")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("recover", help="mark crashed the traces whose writers all died")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true", help="machine-readable output")
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
    s.add_argument("--json", action="store_true", help="say what was written as JSON")
    s.set_defaults(func=cmd_view)

    s = sub.add_parser("tail", help="records as they are appended, across every session (never takes a lock)")
    s.add_argument("dir")
    s.add_argument("session", nargs="?", help="only this session")
    s.add_argument("-f", "--follow", action="store_true", help="keep reading as records are appended (and sessions appear)")
    s.add_argument("-n", "--lines", type=_nonnegative, default=10, help="start with the last N records (default %(default)s)")
    s.add_argument("--from-start", action="store_true", help="start with every record of every session")
    s.add_argument("--interval", type=_interval, default=0.25, help="seconds between polls with -f (default %(default)s)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(func=cmd_tail)

    s = sub.add_parser("prune", help="remove ended traces older than an age (never one with a live writer)")
    s.add_argument("dir")
    s.add_argument("--older-than", required=True, metavar="AGE", help="ended longer ago than this: 30d, 12h, 90m, 45s, 2w")
    s.add_argument("--keep", type=_nonnegative, default=0, help="always keep the N most recently ended traces")
    s.add_argument("--status", action="append", metavar="S[,S]", help=f"only traces that ended so ({', '.join(TERMINAL_STATUSES)})")
    s.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_prune)

    register_stress(sub)
    from .ship._cli import register as register_ship

    register_ship(sub)
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
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        func: Callable[[argparse.Namespace], int] = args.func
        code = func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        silence_stdout()  # the reader went away (`| head`): stop quietly, as git does
        return 141
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
        if command != "tail":  # Ctrl-C is how a `tail -f` ends: nothing to say
            print("walspan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
