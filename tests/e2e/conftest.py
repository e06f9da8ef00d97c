"""End-to-end fixtures: the real daemon (in-process or as a subprocess) against the real emulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from daemon.config import Config, parse_config
from daemon.context import Context
from daemon.service import open_context, run_service
from daemon.states import FINAL_INPUT_STATES
from tests.helpers import ROOT, short_tmpdir, wait_until

API_KEY = "test-key-0123456789"


@pytest.fixture
async def emulator() -> AsyncIterator[Any]:
    from daemon.emulator import Emulator, EmulatorSettings

    emu = Emulator(settings=EmulatorSettings(pending_seconds=0.05, running_seconds=0.1))
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.fixture
async def slow_emulator() -> AsyncIterator[Any]:
    """Jobs stay RUNNING until the test releases them (:func:`release`)."""
    from daemon.emulator import Emulator, EmulatorSettings

    emu = Emulator(settings=EmulatorSettings(pending_seconds=0.05, running_seconds=3600.0))
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


def release(emu: Any) -> None:
    """Let the jobs of :func:`slow_emulator` end: new ones soon, running ones now."""
    emu.settings.running_seconds = 0.1
    for rec in emu.store.jobs.values():
        rec["running_s"] = 0.0


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_data(root: Path, url: str, **overrides: Any) -> dict[str, Any]:
    """Fast timings for tests; everything else as in production."""
    data: dict[str, Any] = {
        "paths": {"root": str(root), "socket": str(short_tmpdir() / "control.sock")},
        "gemini": {"base_url": url},
        "api": {"max_rps": 1000.0, "backoff_initial": 0.05, "backoff_max": 0.3, "timeout": 30.0},
        "inbox": {"settle_seconds": 0.05, "rescan_seconds": 0.5},
        "poll": {"min_interval": 0.05, "max_interval": 0.3},
        "daemon": {"shutdown_seconds": 5.0},
    }
    return _merge(data, overrides)


@pytest.fixture
def make_cfg(tmp_path: Path, emulator: Any):
    def make(**overrides: Any) -> Config:
        return parse_config(config_data(tmp_path / "root", emulator.url, **overrides))

    return make


@asynccontextmanager
async def running_daemon(cfg: Config, *, api_key: str = API_KEY) -> AsyncIterator[Context]:
    """The whole daemon in this event loop (signals left to pytest); cancelled on exit."""

    def factory(c: Config) -> Any:
        return open_context(c, api_key=api_key, base_url=c.gemini.base_url)

    async with anyio.create_task_group() as tg:
        ctx = await tg.start(partial(run_service, factory, cfg, handle_signals=False))
        try:
            yield ctx
        finally:
            tg.cancel_scope.cancel()


async def wait_final(ctx: Context, ref: str, *, timeout: float = 60.0) -> dict[str, Any]:
    async def final() -> Any:
        row = await ctx.store.find_input(ref)
        return row if row and row["state"] in FINAL_INPUT_STATES else None

    return await wait_until(final, timeout=timeout)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write a config dict as TOML (only the simple types our config uses)."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, int | float):
                lines.append(f"{k} = {v}")
            else:
                lines.append(f'{k} = "{v}"')
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    """``python -m daemon run`` as a real child process."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "GEMINI_API_KEY": API_KEY,
            **(env or {}),
        }
        self.log = config.with_suffix(".log")
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", str(config)],
            env=full_env,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
        )

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    async def wait_for_file(self, path: Path, timeout: float = 90.0) -> None:
        """Until ``path`` exists; on a timeout the daemon's log says where it hung."""
        try:
            await wait_until(path.exists, timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"no {path.name}:\n{self.output()[-6000:]}") from None

    async def wait_exit(self, timeout: float = 60.0) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout=timeout)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._logf.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")
