"""Fixtures: an in-process emulator, one in a thread (for the sync SDK), and a sync client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from google import genai

from daemon.emulator import Emulator, EmulatorSettings
from tests.emulator.helpers import CLIENTS, KEY, make_client


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


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while CLIENTS:
        CLIENTS.pop().close()


@pytest.fixture
def client(sync_emulator: Emulator) -> genai.Client:
    return make_client(sync_emulator.url)
