"""Fixtures: an in-process emulator, SDK clients pointed at it, and a poll helper."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import types

from daemon.emulator import Emulator, EmulatorSettings

KEY = "test-key"


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    settings = EmulatorSettings(pending_seconds=0.05, running_seconds=0.15, api_key=KEY)
    async with Emulator(data_dir=tmp_path / "emu", settings=settings) as emu:
        yield emu


@pytest.fixture
def sync_emulator(tmp_path: Path) -> Iterator[Emulator]:
    """An emulator on its own event loop in a thread, for tests using the sync SDK."""
    settings = EmulatorSettings(pending_seconds=0.05, running_seconds=0.15, api_key=KEY)
    emu = Emulator(data_dir=tmp_path / "emu", settings=settings)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(emu.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(emu.stop())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield emu
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def make_client(url: str, api_version: str | None = "v1beta", **kw: Any) -> genai.Client:
    opts = (
        types.HttpOptions(base_url=url, api_version=api_version, **kw)
        if api_version
        else types.HttpOptions(base_url=url, **kw)
    )
    return genai.Client(api_key=KEY, http_options=opts)


@pytest.fixture
def client(sync_emulator: Emulator) -> genai.Client:
    return make_client(sync_emulator.url)


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `pred` until it returns a truthy value (sync, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)
