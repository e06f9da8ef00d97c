"""Shared fixtures for the remote stages: emulator + real SQLite store + real API client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, parse_config
from daemon.context import Context
from daemon.emulator import Emulator, EmulatorSettings
from daemon.gemini import GeminiClient
from daemon.states import display_name
from daemon.store import Store
from tests.helpers import wait_until

KEY = "sk-test-4f9a0c1b2d3e"


def make_cfg(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "paths": {"root": str(tmp_path / "root")},
        "api": {"max_rps": 1000, "timeout": 5, "backoff_initial": 0.05, "backoff_max": 0.2},
        "poll": {"min_interval": 0.05, "max_interval": 0.4},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data)


@dataclass
class Env:
    emu: Emulator
    ctx: Context
    gem: GeminiClient
    tmp: Path

    async def add_input(
        self,
        lines: list[dict[str, Any]],
        *,
        mode: str = "file",
        model: str = "gemini-2.5-flash",
        parts: int = 1,
        est_tokens: int = 10,
        media_count: int = 0,
        kind: str = "generate",
    ) -> tuple[str, list[int]]:
        """Insert a `queued` input with `parts` planned jobs (attempt 1), each submitting `lines`."""
        store = self.ctx.store
        async with store.tx() as conn:
            row = await store.add_input(
                conn,
                rel_path=f"{len(lines)}.jsonl",
                model=model,
                kind=kind,
                state="queued",
                work_path="x",
                media_count=media_count,
            )
            iid = row["id"]
            d = self.ctx.input_dir(iid)
            d.mkdir(parents=True, exist_ok=True)
            ids = []
            for n in range(1, parts + 1):
                src = d / f"part-{n}-a1.jsonl"
                src.write_text("".join(json.dumps(li) + "\n" for li in lines))
                ids.append(
                    await store.add_job(
                        conn,
                        input_id=iid,
                        part_no=n,
                        attempt=1,
                        display_name=display_name(iid, n, 1),
                        mode=mode,
                        source_path=str(src),
                        request_count=len(lines),
                        est_tokens=est_tokens,
                    )
                )
        return iid, ids


def lines_for(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [
        {"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"{prefix} {i}"}]}]}}
        for i in range(n)
    ]


async def wait_for(pred: Callable[[], Any], timeout: float = 10.0) -> Any:
    """:func:`tests.helpers.wait_until` with these tests' shorter default timeout."""
    return await wait_until(pred, timeout=timeout)


@pytest.fixture
def emu_settings() -> EmulatorSettings:
    return EmulatorSettings(pending_seconds=0.1, running_seconds=0.3, api_key=KEY)


@pytest.fixture
def cfg_sections() -> dict[str, dict[str, Any]]:
    return {}


@pytest.fixture
async def env(
    tmp_path: Path, emu_settings: EmulatorSettings, cfg_sections: dict[str, dict[str, Any]]
) -> AsyncIterator[Env]:
    cfg = make_cfg(tmp_path, **cfg_sections)
    async with Emulator(data_dir=tmp_path / "emu", settings=emu_settings) as emu:
        gem = GeminiClient(cfg, KEY, base_url=emu.url)
        try:
            async with Store.open(cfg.db_path) as store:
                yield Env(
                    emu=emu, ctx=Context(cfg=cfg, store=store, gemini=gem), gem=gem, tmp=tmp_path
                )
        finally:
            await gem.aclose()
