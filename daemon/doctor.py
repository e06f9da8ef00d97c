"""``gemini-batchd doctor``: an offline check of the setup (SPEC §14), and the table both modes print.

Each check is ``ok``, ``warn`` (works, but worth knowing) or ``problem`` (exit 1; with ``--strict``
a warning too). The offline checks never contact the API. ``--live`` (its report, output and exit
code here, its checks in :mod:`daemon.doctor_live`) does.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import orjson
from google.genai import version as genai_version
from rich.console import Console
from rich.table import Table

from daemon.config import Config, ConfigError, load_config, read_api_key

Status = Literal["ok", "warn", "problem"]
MIN_SDK = (3, 3)  # pyproject's floor; the wire notes were checked against 3.6.1
LOW_DISK = 100 * 1024 * 1024  # below this a drop's claim or a result download can fail: problem
WARN_DISK = 1024 * 1024 * 1024
SUN_PATH_MAX = 107  # bytes, without the terminating NUL


@dataclass
class Check:
    name: str
    status: Status
    detail: str


def _probe_write(d: Path) -> str | None:
    """None if a file can be created in ``d`` (a real write: root passes any mode check)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gemini-batchd-doctor-", suffix=".tmp", dir=d)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(tmp)
    return None


def check_folder(name: str, d: Path, *, optional: bool = False) -> Check:
    if not d.exists():
        if optional:
            return Check(name, "ok", f"{d}: absent (optional)")
        return Check(name, "problem", f"{d}: missing (`gemini-batchd run` creates it, or mkdir it)")
    if not d.is_dir():
        return Check(name, "problem", f"{d}: not a folder")
    err = _probe_write(d)
    if err:
        return Check(name, "problem", f"{d}: not writable ({err})")
    return Check(name, "ok", f"{d}: present, writable")


def _existing(p: Path) -> Path:
    """``p`` or its nearest existing ancestor (what a folder not yet made would live on)."""
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_filesystems(cfg: Config) -> Check:
    dirs = {"inbox": cfg.inbox_dir, "state": cfg.state_dir, "outbox": cfg.outbox_dir}
    devs = {k: os.stat(_existing(p)).st_dev for k, p in dirs.items()}
    if len(set(devs.values())) == 1:
        return Check("filesystems", "ok", "inbox, state and outbox share a filesystem (renames)")
    apart = ", ".join(f"{k} on device {v:#x}" for k, v in devs.items())
    return Check(
        "filesystems",
        "warn",
        f"not one filesystem ({apart}): claims and results are copied and fsynced instead of "
        "renamed (works, slower, twice the space while it runs)",
    )


def check_disk(cfg: Config) -> Check:
    worst: tuple[int, Path] | None = None
    for p in (cfg.inbox_dir, cfg.state_dir, cfg.outbox_dir):
        free = shutil.disk_usage(_existing(p)).free
        if worst is None or free < worst[0]:
            worst = (free, p)
    assert worst is not None
    free, where = worst
    text = f"{free / 2**30:.2f} GiB free (least: {where})"
    if free < LOW_DISK:
        return Check("disk", "problem", text)
    return Check("disk", "warn" if free < WARN_DISK else "ok", text)


def check_socket(path: Path) -> Check:
    n = len(os.fsencode(path))
    if n > SUN_PATH_MAX:
        return Check("socket", "problem", f"{path}: {n} bytes, AF_UNIX allows {SUN_PATH_MAX}")
    try:
        st = path.lstat()
    except FileNotFoundError:
        parent = _existing(path.parent)
        err = _probe_write(parent)
        if err:
            return Check("socket", "problem", f"{path}: cannot be created in {parent} ({err})")
        return Check("socket", "ok", f"{path}: absent (no daemon running)")
    if not stat.S_ISSOCK(st.st_mode):
        return Check("socket", "problem", f"{path}: exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(path))
    except OSError as e:
        return Check(
            "socket", "warn", f"{path}: stale ({e.strerror}); the daemon replaces it at start"
        )
    finally:
        s.close()
    return Check("socket", "ok", f"{path}: a daemon answers")


def check_sdk() -> Check:
    v = genai_version.__version__
    try:
        parts = tuple(int(x) for x in v.split(".")[:2])
    except ValueError:
        return Check("sdk", "warn", f"google-genai {v}: cannot read the version")
    if parts < MIN_SDK:
        return Check("sdk", "problem", f"google-genai {v}: need >= {'.'.join(map(str, MIN_SDK))}")
    return Check("sdk", "ok", f"google-genai {v}")


def check_key(cfg: Config) -> Check:
    try:
        key = read_api_key(cfg)
    except ConfigError as e:
        return Check("api key", "problem", str(e))
    if not key:
        return Check(
            "api key",
            "problem",
            "none: set [gemini] api_key_file, $GEMINI_API_KEY or the credential gemini-api-key",
        )
    return Check("api key", "ok", "present (not shown)")


def offline_checks(config_path: str | None) -> list[Check]:
    """Every offline check; a bad config stops there (the rest depends on it)."""
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        return [Check("config", "problem", str(e))]
    checks = [Check("config", "ok", cfg.source or "built-in defaults")]
    checks += [
        check_folder("inbox", cfg.inbox_dir),
        check_folder("outbox", cfg.outbox_dir),
        check_folder("state", cfg.state_dir),
        check_folder("media", cfg.media_dir, optional=True),
        check_filesystems(cfg),
        check_socket(cfg.socket_path),
        check_disk(cfg),
        check_sdk(),
        check_key(cfg),
    ]
    return checks


def failed(rows: list[dict[str, Any]], *, strict: bool) -> bool:
    bad = {"problem", "DIFF"} | ({"warn"} if strict else set())
    return any(r["status"] in bad and not r.get("tolerated") for r in rows)


def print_table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> None:
    """The rows as a rich table (plain text when not a terminal)."""
    table = Table(title=title, show_lines=False)
    for c in cols:
        table.add_column(c, overflow="fold")
    colour = {"ok": "green", "PASS": "green", "warn": "yellow", "problem": "red", "DIFF": "red"}
    for r in rows:
        cells = [str(r.get(c, "") or "") for c in cols]
        st = r["status"]
        cells[1] = f"[{colour.get(st, 'white')}]{st}[/]"
        table.add_row(*cells)
    Console(soft_wrap=False, width=max(100, shutil.get_terminal_size().columns)).print(table)


def doctor_main(args: Any) -> int:
    """``gemini-batchd doctor [--json] [--strict]`` (``--live``: :func:`doctor_live.live_main`)."""
    config_path = getattr(args, "config", None)
    if args.live:
        return live_main(config_path, args)
    rows = [asdict(c) for c in offline_checks(config_path)]
    bad = failed(rows, strict=args.strict)
    if args.json:
        sys.stdout.write(orjson.dumps({"ok": not bad, "checks": rows}).decode() + "\n")
    else:
        print_table("gemini-batchd doctor", rows, ["name", "status", "detail"])
    return 1 if bad else 0


def scrub(report: dict[str, Any], key: str) -> dict[str, Any]:
    """``report`` with every occurrence of ``key`` replaced (defence in depth: none is expected)."""
    text = orjson.dumps(report).decode()
    return orjson.loads(text.replace(key, "[redacted]")) if key else report  # type: ignore[no-any-return]


async def live_report(
    cfg: Config, key: str, *, model: str, timeout: float, poll_interval: float
) -> dict[str, Any]:
    """Run every live check; the report as a JSON-ready dict (the key scrubbed)."""
    from daemon.doctor_live import LiveRun
    from daemon.gemini import GeminiClient

    gem = GeminiClient(cfg, key)
    run = LiveRun(gem, model=model, timeout=timeout, poll_interval=poll_interval)
    started = time.time()
    try:
        await run.run()
    finally:
        await gem.aclose()
    rows = [asdict(f) for f in run.findings]
    report = {
        "base_url": gem.base_url,
        "api_version": gem.api_version,
        "model": model,
        "sdk": genai_version.__version__,
        "started": started,
        "seconds": round(time.time() - started, 2),
        "ok": not any(r["status"] == "DIFF" and not r["tolerated"] for r in rows),
        "checks": rows,
        "left_behind": run.leftovers,
    }
    return scrub(report, key)


def live_main(config_path: str | None, args: Any) -> int:
    """``gemini-batchd doctor --live``: table (or ``--json``), ``--report FILE``; exit 1 on a DIFF."""
    try:
        cfg = load_config(config_path)
        key = read_api_key(cfg)
    except ConfigError as e:
        print(f"gemini-batchd doctor: bad config: {e}", file=sys.stderr)
        return 1
    if not key:
        print("gemini-batchd doctor: no API key (see `gemini-batchd doctor`)", file=sys.stderr)
        return 1
    report = anyio.run(
        lambda: live_report(
            cfg, key, model=args.model, timeout=args.timeout, poll_interval=args.poll_interval
        )
    )
    blob = orjson.dumps(report, option=orjson.OPT_INDENT_2)
    if args.report:
        Path(args.report).write_bytes(blob + b"\n")
    if args.json:
        sys.stdout.write(blob.decode() + "\n")
    else:
        print_table(
            f"gemini-batchd doctor --live ({args.model})",
            report["checks"],
            ["name", "status", "expected", "seen", "note"],
        )
        if report["left_behind"]:
            print("not deleted: " + "; ".join(report["left_behind"]))
    return 1 if failed(report["checks"], strict=False) else 0
