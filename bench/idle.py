"""Idle: CPU and RSS of a daemon with nothing to do (its default poll/rescan settings).

python -m bench.idle --seconds 60
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import (
    MB,
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=3, help="seconds after READY before measuring")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    run_dir = new_run_dir("idle")
    emu = EmulatorProc(run_dir / "emulator").start()
    # The shipped defaults for everything that wakes the daemon up (settle, rescan, poll intervals).
    daemon = DaemonProc(
        run_dir,
        emu.url,
        inbox={"settle_seconds": 1.0},
        poll={"min_interval": 5.0, "max_interval": 60.0},
        api={"max_rps": 10.0},
    ).start()
    try:
        time.sleep(args.warmup)
        calls0 = api_calls(emu.stats())
        rss0 = daemon.rss()
        cpu0, t0 = daemon.cpu_seconds(), time.monotonic()
        note(f"measuring an idle daemon for {args.seconds:.0f} s")
        time.sleep(args.seconds)
        cpu1, t1 = daemon.cpu_seconds(), time.monotonic()
        rss1 = daemon.rss()
        hwm, _ = daemon.peak_rss()
        calls = api_calls(emu.stats()) - calls0
    finally:
        daemon.stop()
        emu.stop()
    cleanup(run_dir, args.keep)
    pct = (cpu1 - cpu0) / (t1 - t0) * 100
    print(machine_line())
    print_table(
        f"Idle daemon over {t1 - t0:.0f} s",
        ["", "value"],
        [
            ["CPU time (s)", cpu1 - cpu0],
            ["CPU (% of one core)", pct],
            ["RSS at start / end (MB)", f"{rss0 / MB:.1f} / {rss1 / MB:.1f}"],
            ["peak RSS since start (MB)", hwm / MB],
            ["API calls while idle", calls],
        ],
    )
    ok = target("idle CPU < 1% of a core", pct < 1.0, f"{pct:.3f}%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
