"""Shared benchmark helpers: the emulator and daemon as subprocesses, machine info, tables, targets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
API_KEY = "bench-key"
MB = 1_000_000
MiB = 1 << 20
# Input states that mean "a remote job exists for it" (SPEC §5: submitted or further, not rejected).
SUBMITTED_OR_LATER = ("submitted", "running", "downloading", "succeeded", "partial")


# ---- machine -----------------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    """CPU model, cores, RAM, Python, OS: printed with every table."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def machine_line() -> str:
    m = machine_info()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, Python {m['python']}, "
        f"{m['os']}; load average now {load}"
    )


def settle_io() -> None:
    """Flush dirty pages of earlier phases, so their writeback does not slow the next one."""
    os.sync()
    time.sleep(1)


# ---- output ------------------------------------------------------------------------------------
def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A Markdown table (readable in a terminal, pasteable into docs/benchmarks.md)."""
    cells = [[str(c) for c in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n### {title}\n")
    for n, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(flush=True)


def _cell(c: Any) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:,.2f}" if abs(c) < 1000 else f"{c:,.0f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


def target(label: str, ok: bool, measured: str) -> bool:
    """One line per target: PASS/FAIL, what it is, what was measured."""
    print(f"{'PASS' if ok else 'FAIL'}  {label}: {measured}", flush=True)
    return ok


def note(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def new_run_dir(name: str) -> Path:
    d = OUT / f"run-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    d.mkdir(parents=True)
    return d


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env["GEMINI_API_KEY"] = API_KEY
    env.pop("GOOGLE_API_KEY", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


def parse_time(s: str) -> float:
    """RFC 3339 (the API's `createTime`, with up to nanoseconds) → epoch seconds."""
    s = s.replace("Z", "+00:00")
    if "." in s:
        head, rest = s.split(".", 1)
        frac, tz = rest[: len(rest) - 6], rest[-6:]
        s = f"{head}.{frac[:6].ljust(6, '0')}{tz}"
    return datetime.fromisoformat(s).timestamp()


def union_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (jobs that overlap count once)."""
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_b is None or a > cur_b:
            if cur_b is not None and cur_a is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_a is not None and cur_b is not None:
        total += cur_b - cur_a
    return total


# ---- the emulator ------------------------------------------------------------------------------
class EmulatorProc:
    """`python -m daemon emulator` as a subprocess, with jobs that take no scripted time."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> EmulatorProc:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "daemon", "emulator", "--port", "0"]
        cmd += ["--pending-seconds", "0", "--running-seconds", "0"]
        # The create-time line check (on by default, as the real API does it) runs inside the
        # create call, before the job's createTime: it would count as the daemon's own share.
        cmd += ["--no-validate-at-create"]
        cmd += ["--data-dir", str(self.data_dir), *self.extra]
        log = (self.data_dir.parent / "emulator.log").open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, env=child_env(), cwd=REPO
        )
        assert self.proc.stdout is not None
        line = self._first_line(timeout)
        prefix = "gemini-batchd emulator listening on "
        if not line.startswith(prefix):
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.url = line.removeprefix(prefix).strip()
        # Drain anything else it prints, so a full pipe can never block it.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        return self

    def _first_line(self, timeout: float) -> str:
        box: list[bytes] = []
        assert self.proc is not None and self.proc.stdout is not None
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(timeout)
        return box[0].decode() if box else ""

    @property
    def hostport(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host.strip("[]"), int(port)

    def get_json(self, path: str) -> Any:
        conn = http.client.HTTPConnection(*self.hostport, timeout=120)
        try:
            conn.request("GET", path, headers={"x-goog-api-key": API_KEY})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        return self.get_json("/__emulator/stats")  # type: ignore[no-any-return]

    def batches(self) -> list[dict[str, Any]]:
        """Every batch operation the emulator holds (paged like the real `batches.list`)."""
        out: list[dict[str, Any]] = []
        token = ""
        while True:
            page = self.get_json(f"/v1beta/batches?pageSize=100&pageToken={token}")
            out += page.get("operations", [])
            token = page.get("nextPageToken") or ""
            if not token:
                return out

    def job_times(self) -> dict[str, float]:
        """Over finished jobs: `union` and `sum` of endTime - createTime, `jobs`, the
        `first_create` and `last_end` (epoch seconds)."""
        spans = []
        for op in self.batches():
            meta = op.get("metadata", {})
            if meta.get("endTime"):
                spans.append((parse_time(meta["createTime"]), parse_time(meta["endTime"])))
        return {
            "union": union_seconds(spans),
            "sum": sum(b - a for a, b in spans),
            "jobs": len(spans),
            "first_create": min((a for a, _ in spans), default=0.0),
            "last_end": max((b for _, b in spans), default=0.0),
        }

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def api_calls(stats: dict[str, Any]) -> int:
    return sum(stats.get("calls", {}).values())


# ---- the daemon --------------------------------------------------------------------------------
def toml_config(sections: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    out = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {value(v)}" for k, v in keys.items()]
        out.append("")
    return "\n".join(out)


class RssSampler:
    """Samples RSS of a process and its children every `interval` s; keeps the peak of the sum."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_at = 0.0  # epoch seconds of the sampled peak
        self.peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                children = sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                total = self.proc.memory_info().rss + children
            except psutil.Error:
                return
            if total > self.peak:
                self.peak, self.peak_at = total, time.time()
            self.peak_children = max(self.peak_children, children)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class DaemonProc:
    """`python -m daemon run -c CONFIG` on a fresh root under `run_dir`, pointed at an emulator."""

    def __init__(
        self,
        run_dir: Path,
        base_url: str,
        *,
        profile: Path | None = None,
        **sections: dict[str, Any],
    ) -> None:
        self.profile = profile  # run under cProfile (main thread only), stats written here
        self.root = run_dir / "root"
        self.config_path = run_dir / "daemon.toml"
        self.log_path = run_dir / "daemon.log"
        cfg: dict[str, dict[str, Any]] = {
            "paths": {"root": str(self.root)},
            "gemini": {"base_url": base_url},
            "api": {"max_rps": 1000.0},
            "inbox": {"settle_seconds": 0.2},
            "poll": {"min_interval": 0.2, "max_interval": 1.0},
            "daemon": {"log_format": "json"},
        }
        for name, keys in sections.items():
            cfg.setdefault(name, {}).update(keys)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml_config(cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler: RssSampler | None = None

    inbox = property(lambda self: self.root / "inbox")
    outbox = property(lambda self: self.root / "outbox")
    state = property(lambda self: self.root / "state")
    db_path = property(lambda self: self.root / "state" / "gemini-batchd.sqlite")
    staging = property(lambda self: self.root / "staging")  # same filesystem as the inbox

    def start(self, timeout: float = 60) -> DaemonProc:
        self.staging.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "daemon", "run", "-c", str(self.config_path)]
        if self.profile is not None:
            cmd[1:1] = ["-m", "cProfile", "-o", str(self.profile)]
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO
        )
        wait_until(self._ready, timeout, "the daemon's daemon_ready log line", 0.05)
        self.sampler = RssSampler(self.proc.pid).start()
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{tail}")
        return self.log_path.exists() and b"daemon_ready" in self.log_path.read_bytes()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def vm_hwm(self) -> int:
        """The exact peak RSS of the daemon process so far (kernel high-water mark), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def peak_rss(self) -> tuple[int, int]:
        """(VmHWM of the daemon, sampled peak of its children's RSS)."""
        children = self.sampler.peak_children if self.sampler else 0
        return self.vm_hwm(), children

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def db_bytes(self) -> int:
        return sum(
            p.stat().st_size for p in self.state.glob("gemini-batchd.sqlite*") if p.is_file()
        )

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the daemon's store read-only (never writes, safe while it runs)."""
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def first_at(self, states: Sequence[str]) -> dict[str, tuple[str, float]]:
        """input id → (rel_path, first history time it entered one of `states`)."""
        marks = ",".join("?" * len(states))
        rows = self.query(
            f"SELECT i.id, i.rel_path, MIN(h.at) FROM history h JOIN inputs i ON i.id = h.input_id "
            f"WHERE h.state IN ({marks}) GROUP BY i.id",
            *states,
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    def timeline(self, input_id: str) -> list[tuple[str, float]]:
        return [
            (s, at)
            for at, s in self.query(
                "SELECT at, state FROM history WHERE input_id = ? ORDER BY id", input_id
            )
        ]


def drop(src: Path, daemon: DaemonProc, name: str) -> float:
    """Put `src` into the inbox as `name` the Maildir way (link into staging, rename in).

    Returns the time of the rename. The cached source file stays where it was."""
    staged = daemon.staging / name
    try:
        os.link(src, staged)
    except OSError:
        shutil.copyfile(src, staged)
    t = time.time()
    os.rename(staged, daemon.inbox / name)
    return t


def count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        while block := f.read(8 * MiB):
            n += block.count(b"\n")
    return n


def cleanup(run_dir: Path, keep: bool) -> None:
    if keep:
        note(f"kept {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
