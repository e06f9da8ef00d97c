"""Big file: one ~1 GB / ~1M-request JSONL through the daemon, against the naive way and a floor.

    python -m bench.big_file --size-mb 1000          # also runs the daemon at --compare-mb 100

Each contender gets its own emulator (so API calls and job times are its own). "Emulator time" is
the union over its remote jobs of [createTime, endTime] from the API (overlapping jobs count once);
"own share" = wall - emulator time. The floor is a bare orjson loop + one raw streamed upload +
one raw streamed download of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import floor
from bench.common import (
    MB,
    DaemonProc,
    EmulatorProc,
    api_calls,
    child_env,
    cleanup,
    count_lines,
    drop,
    machine_line,
    new_run_dir,
    note,
    print_table,
    settle_io,
    target,
    wait_until,
)
from bench.gen import big_jsonl

NAME = "big.jsonl"


def run_daemon(src: Path, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Drop `src` into a fresh daemon; measure until its summary (or error file) appears."""
    run_dir = new_run_dir(f"big-daemon-{label}")
    emu = EmulatorProc(run_dir / "emulator", "--max-active-jobs", "1000").start()
    daemon = DaemonProc(
        run_dir, emu.url, inbox={"settle_seconds": args.settle}, **_poll(args)
    ).start()
    try:
        settle_io()
        cpu0 = daemon.cpu_seconds()
        t0 = drop(src, daemon, NAME)
        note(f"daemon ({label}): dropped {src.name}, waiting for its summary")
        summary = daemon.outbox / "big.summary.json"
        error = daemon.outbox / "big.error.json"
        wait_until(lambda: summary.exists() or error.exists(), args.timeout, "the summary", 0.05)
        if error.exists():
            raise RuntimeError(f"daemon failed the file: {error.read_text()[:2000]}")
        t1 = summary.stat().st_mtime
        # The remote clean-up (files.delete) follows the summary; count its calls too.
        try:
            wait_until(lambda: emu.stats()["files"] == 0, 60, "remote clean-up", 0.2)
        except TimeoutError as e:
            note(str(e))
        hwm, children = daemon.peak_rss()
        cpu = daemon.cpu_seconds() - cpu0
        sampler = daemon.sampler
        sampled, sampled_at = (sampler.peak, sampler.peak_at) if sampler else (0, 0.0)
        (iid,) = [r[0] for r in daemon.query("SELECT id FROM inputs")]
        timeline = daemon.timeline(iid)
        daemon.stop()
        stats = emu.stats()
        jt = emu.job_times()
        results = daemon.outbox / NAME
        lines = count_lines(results) if results.exists() else 0
        check_s = time_check(src, daemon) if args.check else None
    finally:
        daemon.stop()
        emu.stop()
    first: dict[str, float] = {}
    for state, at in timeline:
        first.setdefault(state, at)
    validation_s = first.get("queued", 0) - first.get("validating", 0)
    out = {
        "label": label,
        "size": src.stat().st_size,
        "wall": t1 - t0,
        "emu": jt["union"],
        "emu_sum": jt["sum"],
        "jobs": jt["jobs"],
        "own": t1 - t0 - jt["union"],
        "head": jt["first_create"] - t0,
        "tail": t1 - jt["last_end"],
        # peak memory of the daemon with its child process (the validator's tail checker)
        # at one moment: the daemon's exact high-water mark, or the 50 ms sampled sum of both
        # if higher (the child lives ~1 s, during validation; the daemon peaks later)
        "rss": max(hwm, sampled),
        "rss_daemon": hwm,
        "rss_children": children,
        "rss_sampled": sampled,
        "rss_sampled_at": sampled_at - t0,
        "cpu": cpu,
        "calls": api_calls(stats),
        "by_endpoint": stats.get("calls", {}),
        "validation_s": validation_s,
        "check_s": check_s,
        "timeline": [(s, at - t0) for s, at in timeline],
        "lines_out": lines,
        "lines_in": count_lines(src),
    }
    note(f"daemon ({label}): {json.dumps({k: v for k, v in out.items() if k != 'timeline'})}")
    note("timeline (s after drop): " + ", ".join(f"{s} {at:.2f}" for s, at in out["timeline"]))
    cleanup(run_dir, args.keep)
    return out


def _poll(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {"poll": {"min_interval": 0.2, "max_interval": args.poll_seconds}}


def time_check(src: Path, daemon: DaemonProc) -> float:
    """Wall time of `gemini-batchd check FILE` (includes ~0.3 s of interpreter start-up)."""
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "daemon", "check", "-c", str(daemon.config_path), str(src)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - t


def run_naive(src: Path, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = new_run_dir("big-naive")
    emu = EmulatorProc(run_dir / "emulator").start()
    try:
        settle_io()
        note("naive: running the cookbook way")
        cmd = [sys.executable, "-m", "bench.naive", "--base-url", emu.url, "--file", str(src)]
        cmd += ["--out", str(run_dir / "results.jsonl"), "--poll-seconds", str(args.poll_seconds)]
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"naive run failed: {proc.stdout}\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        stats = emu.stats()
        jt = emu.job_times()
    finally:
        emu.stop()
    t = res["times"]
    out = {
        "wall": t["end"] - t["start"],
        "emu": jt["union"],
        "jobs": jt["jobs"],
        "own": t["end"] - t["start"] - jt["union"],
        "head": jt["first_create"] - t["start"],
        "tail": t["end"] - jt["last_end"],
        "rss": res["maxrss"],
        "calls": api_calls(stats),
        "by_endpoint": stats.get("calls", {}),
        "lines_out": res["lines"],
        "phases": {
            "upload": t["uploaded"] - t["start"],
            "create": t["created"] - t["uploaded"],
            "wait": t["done"] - t["created"],
            "download": t["downloaded"] - t["done"],
            "parse+write": t["end"] - t["downloaded"],
        },
    }
    note(f"naive: {json.dumps(out)}")
    cleanup(run_dir, args.keep)
    return out


def run_floor(src: Path, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = new_run_dir("big-floor")
    emu = EmulatorProc(run_dir / "emulator").start()
    try:
        settle_io()
        note(f"floor: orjson loop, raw upload, raw download; best of {args.floor_repeats}")
        host, port = emu.hostport
        parse_s = up_s = down_s = float("inf")
        for _ in range(args.floor_repeats):
            parse_s = min(parse_s, floor.orjson_loop(src)[0])
            t, name = floor.raw_upload(host, port, src)
            up_s = min(up_s, t)
            down_s = min(down_s, floor.raw_download(host, port, name, run_dir / "dl.jsonl")[0])
        stats = emu.stats()
    finally:
        emu.stop()
    out = {
        "wall": parse_s + up_s + down_s,
        "parse_s": parse_s,
        "upload_s": up_s,
        "download_s": down_s,
        "calls": api_calls(stats) // args.floor_repeats,
    }
    note(f"floor: {json.dumps(out)}")
    cleanup(run_dir, args.keep)
    return out


def report(d: dict[str, Any], small: dict[str, Any] | None, naive: Any, fl: Any) -> int:
    size = d["size"]
    mbs = size / MB
    val_mbs = mbs / d["validation_s"] if d["validation_s"] > 0 else float("nan")
    check_mbs = mbs / d["check_s"] if d["check_s"] else None
    orjson_mbs = mbs / fl["parse_s"] if fl else None
    n = naive or {}
    f = fl or {}
    print(machine_line())
    print_table(
        f"Big file: {mbs:,.0f} MB, {d['lines_out']:,} requests",
        ["", "gemini-batchd", "naive (cookbook)", "floor"],
        [
            ["wall, drop to results (s)", d["wall"], n.get("wall"), f.get("wall")],
            ["remote jobs", d["jobs"], n.get("jobs"), None],
            ["emulator job time (s)", d["emu"], n.get("emu"), None],
            ["own share = wall - emulator (s)", d["own"], n.get("own"), f.get("wall")],
            ["  before the first job was created (s)", d["head"], n.get("head"), None],
            ["  after the last job ended (s)", d["tail"], n.get("tail"), None],
            ["peak RSS (MB)", d["rss"] / MB, n["rss"] / MB if naive else None, None],
            ["  daemon process alone (VmHWM)", d["rss_daemon"] / MB, None, None],
            ["  its child processes (sampled peak)", d["rss_children"] / MB, None, None],
            ["CPU time (s)", d["cpu"], None, None],
            ["API calls", d["calls"], n.get("calls"), f.get("calls")],
            ["parse MB/s (validation / - / orjson loop)", val_mbs, None, orjson_mbs],
        ],
    )
    print(
        f"peak RSS of the daemon and its children together, sampled every 50 ms: "
        f"{d['rss_sampled'] / MB:.1f} MB at {d['rss_sampled_at']:.1f} s after the drop; state timeline "
        "(s after drop): " + ", ".join(f"{s} {at:.1f}" for s, at in d["timeline"])
    )
    if check_mbs:
        print(
            f"`gemini-batchd check` on the same file: {d['check_s']:.2f} s = {check_mbs:.0f} MB/s"
        )
    if small:
        print(
            f"daemon at {small['size'] / MB:,.0f} MB: wall {small['wall']:.2f} s, "
            f"peak RSS {small['rss'] / MB:.1f} MB, validation "
            f"{small['size'] / MB / small['validation_s']:.0f} MB/s"
        )
    print()
    ok = True
    ok &= target("daemon peak RSS <= 150 MB", d["rss"] <= 150 * MB, f"{d['rss'] / MB:.1f} MB")
    if small:
        ratio = d["rss"] / small["rss"]
        ok &= target(
            f"peak RSS at {mbs:,.0f} MB within 20% of {small['size'] / MB:,.0f} MB",
            ratio <= 1.2,
            f"{d['rss'] / MB:.1f} vs {small['rss'] / MB:.1f} MB (x{ratio:.2f})",
        )
    if fl:
        ok &= target(
            "own share <= 1.5 x floor",
            d["own"] <= 1.5 * fl["wall"],
            f"{d['own']:.1f} s vs floor {fl['wall']:.1f} s (x{d['own'] / fl['wall']:.2f})",
        )
        ok &= target(
            "validation >= 70% of a bare orjson loop",
            val_mbs >= 0.7 * orjson_mbs,
            f"{val_mbs:.0f} vs {orjson_mbs:.0f} MB/s ({val_mbs / orjson_mbs:.0%})",
        )
    if naive:
        ok &= target(
            "own share < naive own share",
            d["own"] < naive["own"],
            f"{d['own']:.1f} s vs {naive['own']:.1f} s",
        )
    ok &= target(
        "every request answered",
        d["lines_out"] == d["lines_in"],
        f"{d['lines_out']:,} result lines for {d['lines_in']:,} requests",
    )
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1000, help="input size (x1000 requests)")
    ap.add_argument(
        "--compare-mb", type=int, default=100, help="also run the daemon at this size (0: no)"
    )
    ap.add_argument("--settle", type=float, default=0.2, help="[inbox] settle_seconds")
    ap.add_argument(
        "--poll-seconds",
        type=float,
        default=1.0,
        help="naive poll interval = daemon's [poll] max_interval",
    )
    ap.add_argument("--timeout", type=float, default=3000, help="per run, seconds")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--floor-repeats", type=int, default=3, help="the floor is the best of N")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip timing `check`")
    ap.add_argument("--keep", action="store_true", help="keep the run folders under bench/out/")
    args = ap.parse_args()

    src = big_jsonl(args.size_mb)
    small = None
    if args.compare_mb and args.compare_mb != args.size_mb:
        small = run_daemon(big_jsonl(args.compare_mb), args, f"{args.compare_mb}mb")
    fl = None if args.no_floor else run_floor(src, args)
    d = run_daemon(src, args, f"{args.size_mb}mb")
    naive = None if args.no_naive else run_naive(src, args)
    rc = report(d, small, naive, fl)
    out = {"daemon": d, "small": small, "naive": naive, "floor": fl, "machine": machine_line()}
    path = Path(__file__).parent / "out" / f"big_file-{args.size_mb}mb.json"
    path.write_text(json.dumps(out, indent=1))
    note(f"raw numbers in {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
