"""Many files: N small files (10 requests each) renamed into the inbox at once.

    python -m bench.many_files --files 10000                          # the daemon's default cap (50)
    python -m bench.many_files --files 10000 --max-active-jobs 20000  # the cap lifted

Files are generated in a staging folder on the inbox's filesystem, then renamed in as fast as
possible. Completion = every `outbox/*.summary.json` exists; "through submission" = every input
has reached `submitted` or later (first such time per input, from the store's state history).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.common import (
    MB,
    SUBMITTED_OR_LATER,
    DaemonProc,
    EmulatorProc,
    api_calls,
    cleanup,
    machine_line,
    new_run_dir,
    note,
    print_table,
    target,
)
from bench.gen import small_files
from daemon.config import SubmitConfig

REAL_API_JOB_LIMIT = 100


def count_done(outbox: Path) -> tuple[int, int]:
    done = errors = 0
    with os.scandir(outbox) as it:
        for e in it:
            if e.name.endswith(".summary.json"):
                done += 1
            elif e.name.endswith(".error.json"):
                errors += 1
    return done, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=10, help="requests per file")
    ap.add_argument(
        "--max-active-jobs",
        type=int,
        default=SubmitConfig().max_active_jobs,
        help="the daemon's [submit] max_active_jobs (default: the daemon's default); the "
        "emulator's job limit is this or the real API's 100, whichever is higher",
    )
    ap.add_argument("--settle", type=float, default=0.2, help="[inbox] settle_seconds")
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--profile", action="store_true", help="run the daemon under cProfile (implies --keep)"
    )
    args = ap.parse_args()
    n = args.files

    run_dir = new_run_dir(f"many-{n}")
    emu_limit = max(REAL_API_JOB_LIMIT, args.max_active_jobs)
    emu = EmulatorProc(run_dir / "emulator", "--max-active-jobs", str(emu_limit))
    emu.start()
    daemon = DaemonProc(
        run_dir,
        emu.url,
        inbox={"settle_seconds": args.settle},
        submit={"max_active_jobs": args.max_active_jobs},
        profile=run_dir / "daemon.prof" if args.profile else None,
    ).start()
    try:
        gen_dir = daemon.staging / "many"
        t = time.monotonic()
        paths = small_files(gen_dir, n, requests=args.requests)
        note(f"generated {n:,} files in {time.monotonic() - t:.1f} s; renaming into the inbox")
        cpu0, emu_cpu0 = daemon.cpu_seconds(), emu.cpu_seconds()
        inbox = daemon.inbox
        t0 = time.time()
        for p in paths:
            os.rename(p, inbox / p.name)
        t_renamed = time.time()
        done = errors = 0
        last_note = time.monotonic()
        deadline = time.monotonic() + args.timeout
        while True:
            done, errors = count_done(daemon.outbox)
            if done + errors >= n:
                break
            if time.monotonic() > deadline:
                note(f"timeout: {done} done, {errors} errors")
                break
            if time.monotonic() - last_note > 15:
                note(f"{done:,}/{n:,} done, {errors} errors, {time.time() - t0:.0f} s")
                last_note = time.monotonic()
            time.sleep(0.2)
        t_done = max(
            (e.stat().st_mtime for e in os.scandir(daemon.outbox) if e.name.endswith(".json")),
            default=time.time(),
        )
        hwm, children = daemon.peak_rss()
        cpu = daemon.cpu_seconds() - cpu0
        emu_cpu = emu.cpu_seconds() - emu_cpu0
        stats = emu.stats()
        submitted = daemon.first_at(SUBMITTED_OR_LATER)
        states = dict(daemon.query("SELECT state, COUNT(*) FROM inputs GROUP BY state"))
        db_bytes = daemon.db_bytes()
    finally:
        daemon.stop()
        emu.stop()

    calls = api_calls(stats)
    sub_times = [at for _, at in submitted.values()]
    t_sub = max(sub_times) if len(sub_times) == n else None
    complete_s = t_done - t0
    print(machine_line())
    print_table(
        f"Many files: {n:,} files x {args.requests} requests, dropped at once "
        f"(max_active_jobs {args.max_active_jobs}, settle {args.settle} s)",
        ["", "value"],
        [
            ["rename of all files into the inbox (s)", t_renamed - t0],
            ["completed (summary files) / errors", f"{done:,} / {errors:,}"],
            ["inputs by final state", ", ".join(f"{k} {v:,}" for k, v in sorted(states.items()))],
            ["drop to last summary (s)", complete_s],
            ["files/s to completion", n / complete_s],
            ["drop to last submitted (s)", t_sub - t0 if t_sub else "not all submitted"],
            ["files/s through submission", n / (t_sub - t0) if t_sub else None],
            ["API calls (total)", calls],
            ["API calls per file", calls / n],
            ["API calls by endpoint", ", ".join(f"{k} {v:,}" for k, v in stats["calls"].items())],
            ["DB size (MB, with WAL)", db_bytes / MB],
            ["daemon peak RSS (MB)", (hwm + children) / MB],
            ["daemon CPU time (s) / per file (ms)", f"{cpu:.1f} / {cpu / n * 1000:.1f}"],
            ["emulator CPU time (s) / per file (ms)", f"{emu_cpu:.1f} / {emu_cpu / n * 1000:.1f}"],
        ],
    )
    ok = target("all complete", done == n and errors == 0, f"{done:,}/{n:,}, {errors} errors")
    rate = n / (t_sub - t0) if t_sub else 0.0
    ok &= target(">= 100 files/s through submission", rate >= 100, f"{rate:.0f} files/s")
    ok &= target("<= 6 API calls per file", calls / n <= 6, f"{calls / n:.2f}")
    raw = {
        "files": n,
        "complete_s": complete_s,
        "submitted_s": (t_sub - t0) if t_sub else None,
        "calls": stats["calls"],
        "db_bytes": db_bytes,
        "rss": hwm + children,
        "cpu": cpu,
        "emu_cpu": emu_cpu,
        "states": states,
        "machine": machine_line(),
    }
    out = Path(__file__).parent / "out" / f"many_files-{n}-{args.max_active_jobs}.json"
    out.write_text(json.dumps(raw, indent=1))
    if args.profile:
        note(f"profile: python -m pstats {run_dir / 'daemon.prof'}")
    cleanup(run_dir, args.keep or args.profile)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
