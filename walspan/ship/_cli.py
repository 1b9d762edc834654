"""`walspan ship`: the command line over walspan.ship.Shipper (registered by walspan.cli)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from ._http import JSON, PROTOBUF, traces_url
from ._shipper import ShipOptions, Shipper, ShipStatus


def _endpoint(text: str) -> str:
    try:
        traces_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--endpoint ")) from None
    return text


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected K=V, not {text!r}")
    return key.strip(), value.strip()


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected more than 0, not {text}")
        return value

    return parse


def register(sub: Any) -> None:
    """Add the `ship` subcommand to the CLI's subparsers."""
    s = sub.add_parser(
        "ship",
        help="send every trace to an OTLP/HTTP endpoint, at least once and in order (--once or --follow)",
        description="Send the spans of every session in DIR to an OTLP/HTTP endpoint (a Collector, Jaeger, "
        "Tempo, Phoenix, ...), resuming where the receiver last acknowledged. See docs/SHIP.md.",
    )
    s.add_argument("dir")
    s.add_argument("--endpoint", required=True, type=_endpoint, metavar="URL", help="e.g. http://localhost:4318/v1/traces")
    s.add_argument("--headers", nargs="+", action="extend", type=_header, default=[], metavar="K=V", help="HTTP headers (authentication)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="ship what is there and exit: 0 only if all of it was acknowledged (default)")
    mode.add_argument("--follow", action="store_true", help="keep shipping new records and sessions until SIGTERM; SIGUSR1 prints a status line")
    s.add_argument("--protocol", choices=(PROTOBUF, JSON), default=PROTOBUF, help="default %(default)s (needs the otel extra)")
    s.add_argument("--no-gzip", action="store_true", help="send bodies uncompressed")
    s.add_argument("--partial", action="store_true", help="also send spans as they start (marked open)")
    s.add_argument("--include-io", action="store_true", help="put span inputs and outputs in the GenAI attributes")
    s.add_argument("--name", help="name of this shipper's cursors in DIR/.walspan/ship/ (default: from the endpoint)")
    s.add_argument("--batch-size", type=_positive(int), default=512, metavar="SPANS", help="spans per request (default %(default)s)")
    s.add_argument("--batch-age", type=_positive(float), default=0.2, metavar="S", help="--follow: longest wait for a fuller batch (default %(default)s)")
    s.add_argument("--interval", type=_positive(float), default=0.25, metavar="S", help="--follow: seconds between looks at the store (default %(default)s)")
    s.add_argument("--window", type=_positive(int), default=4, metavar="N", help="requests in flight at once (default %(default)s)")
    s.add_argument("--timeout", type=_positive(float), default=10.0, metavar="S", help="per request (default %(default)s)")
    s.add_argument("--give-up-after", type=_positive(float), metavar="S", help="stop when a batch keeps failing this long (default: 60 with --once, never with --follow)")
    s.add_argument("--json", action="store_true", help="the final status as JSON on stdout")
    s.set_defaults(func=cmd_ship)


def cmd_ship(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.dir):
        raise NotADirectoryError(20, "not a directory", args.dir)
    options = ShipOptions(
        args.endpoint,
        headers=dict(args.headers),
        protocol=args.protocol,
        gzip=not args.no_gzip,
        partial=args.partial,
        include_io=args.include_io,
        name=args.name,
        batch_spans=args.batch_size,
        batch_age=args.batch_age,
        window=args.window,
        timeout=args.timeout,
        poll_interval=args.interval,
        give_up_after=args.give_up_after if args.give_up_after is not None else (None if args.follow else 60.0),
    )
    shipper = Shipper(args.dir, options)
    stop = threading.Event()

    def print_status(st: ShipStatus) -> None:
        print(st.line(), file=sys.stderr, flush=True)

    shipper.on_status = print_status
    old: dict[signal.Signals, Any] = {}
    if args.follow:  # a daemon: SIGTERM (and Ctrl-C) stop it cleanly, SIGUSR1 asks where it is
        for sig, handler in ((signal.SIGTERM, lambda *_: stop.set()), (signal.SIGINT, lambda *_: stop.set()),
                             (signal.SIGUSR1, lambda *_: shipper.request_status())):
            old[sig] = signal.signal(sig, handler)
    try:
        result = shipper.run(follow=args.follow, stop=stop)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if args.json:
        print(json.dumps({"ok": result.ok, "status": result.status.to_json(), "errors": result.errors}))
    print(result.status.line(), file=sys.stderr)
    for err in result.errors:
        print(f"walspan: error: {err}", file=sys.stderr)
    if result.status.rejected_batches:
        print(f"walspan: error: {result.status.rejected_spans} span(s) refused for good: see {shipper.cursors.path}/rejected.jsonl", file=sys.stderr)
    return 0 if result.ok else 1
