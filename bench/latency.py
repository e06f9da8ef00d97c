"""Latency: drop-to-submitted for files renamed into the inbox one by one.

    python -m bench.latency --files 200 --interval 0.05 --settle 1.0 --settle 0.2

Each settle value gets a fresh emulator and daemon. Drop time = the rename; submitted time = the
first time the input's state history (in the store) shows `submitted` or later.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    SUBMITTED_OR_LATER,
    DaemonProc,
    EmulatorProc,
    cleanup,
    machine_line,
    new_run_dir,
    note,
    percentile,
    print_table,
    target,
    wait_until,
)
from bench.gen import small_files


def run(settle: float, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = new_run_dir(f"latency-{settle}")
    emu = EmulatorProc(run_dir / "emulator").start()
    daemon = DaemonProc(run_dir, emu.url, inbox={"settle_seconds": settle}).start()
    try:
        paths = small_files(daemon.staging / "lat", args.files, requests=2)
        dropped: dict[str, float] = {}
        note(f"settle {settle}: dropping {args.files} files every {args.interval} s")
        start = time.monotonic()
        for i, p in enumerate(paths):
            delay = start + i * args.interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            dropped[p.name] = time.time()
            os.rename(p, daemon.inbox / p.name)

        def all_submitted() -> bool:
            return len(daemon.first_at(SUBMITTED_OR_LATER)) >= args.files

        wait_until(all_submitted, args.timeout, "every input submitted", 0.2)
        submitted = daemon.first_at(SUBMITTED_OR_LATER)
        seen = daemon.first_at(("seen",))
    finally:
        daemon.stop()
        emu.stop()
    lat = [at - dropped[rel] for rel, at in submitted.values()]
    taken = [at - dropped[rel] for rel, at in seen.values()]
    cleanup(run_dir, args.keep)
    return {
        "settle": settle,
        "n": len(lat),
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "max": max(lat),
        "taken_p50": percentile(taken, 50),
        "taken_p99": percentile(taken, 99),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between drops")
    ap.add_argument(
        "--settle", type=float, action="append", help="[inbox] settle_seconds (repeatable)"
    )
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    settles = args.settle or [1.0, 0.2]
    results = [run(s, args) for s in settles]
    print(machine_line())
    print_table(
        f"Latency: {args.files} files dropped one every {args.interval} s; seconds from rename",
        ["settle_seconds", "to submitted p50", "p90", "p99", "max", "to seen p50", "to seen p99"],
        [
            [r["settle"], r["p50"], r["p90"], r["p99"], r["max"], r["taken_p50"], r["taken_p99"]]
            for r in results
        ],
    )
    ok = True
    for r in results:
        ok &= target(
            f"p50 drop-to-submitted <= settle + 0.3 s (settle {r['settle']})",
            r["p50"] <= r["settle"] + 0.3,
            f"p50 {r['p50']:.3f} s, p99 {r['p99']:.3f} s",
        )
    out = Path(__file__).parent / "out" / "latency.json"
    out.write_text(json.dumps({"results": results, "machine": machine_line()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
