#!/usr/bin/env python3
"""Soak test: repeated `walspan stress` rounds, each with a new seed, until a time or round limit.

Stops at the first failing round and exits non-zero, keeping that round's directory and
printing the seed that reproduces it (`walspan stress --seed N ...`).

    python scripts/stress.py --hours 1                       # an hour of default rounds
    python scripts/stress.py --rounds 20 --duration 60 --durability process --kill-rate 0.8

Every option not listed below is passed to `walspan stress` unchanged (--writers, --sessions,
--durability, --kill-rate, --duration). Figures of every round are appended as JSON lines to
--log (default: stress-soak.jsonl in the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="stop after this many rounds")
    p.add_argument("--hours", type=float, default=None, help="stop starting rounds after this long")
    p.add_argument("--seed", type=int, default=None, help="seed of the first round (then +1 per round)")
    p.add_argument("--log", default="stress-soak.jsonl", help="JSON lines of every round's figures")
    args, passthrough = p.parse_known_args(argv)
    if args.rounds is None and args.hours is None:
        args.rounds = 10
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    stop_at = time.monotonic() + args.hours * 3600 if args.hours is not None else None
    totals = {"rounds": 0, "events_acknowledged": 0}
    n = 0
    while (args.rounds is None or n < args.rounds) and (stop_at is None or time.monotonic() < stop_at):
        n += 1
        with tempfile.TemporaryDirectory(prefix="walspan-soak-") as tmp:
            run_dir = os.path.join(tmp, "traces")
            figures = os.path.join(tmp, "figures.json")
            cmd = [sys.executable, "-m", "walspan.cli", "stress", run_dir, "--seed", str(seed), "--json", figures, "-q"]
            cmd += passthrough
            print(f"round {n}: seed {seed}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            try:
                with open(figures, encoding="utf-8") as fh:
                    figs = json.load(fh)
            except (OSError, ValueError):
                figs = {"ok": False, "error": "no figures written"}
            figs["round"] = n
            with open(args.log, "a", encoding="utf-8") as log:
                log.write(json.dumps(figs, sort_keys=True) + "\n")
            if proc.returncode != 0 or not figs.get("ok"):
                where = "nothing to keep"
                if os.path.isdir(run_dir):
                    keep = tempfile.mkdtemp(prefix="walspan-soak-failed-")
                    os.rename(run_dir, os.path.join(keep, "traces"))
                    where = f"directory kept in {keep}"
                sys.stdout.write(proc.stdout)
                sys.stderr.write(proc.stderr)
                print(f"round {n} FAILED (exit {proc.returncode}); seed {seed}; {where}")
                return 1
            totals["rounds"] += 1
            totals["events_acknowledged"] += int(figs.get("events_acknowledged", 0))
            print(
                f"round {n}: ok, {figs['events_acknowledged']} events, {figs['events_per_s']:.0f}/s, "
                f"statuses {figs['statuses']}, recover {figs['recover_s'] * 1000:.0f} ms",
                flush=True,
            )
        seed += 1
    print(f"{totals['rounds']} round(s) passed, {totals['events_acknowledged']} acknowledged events checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
