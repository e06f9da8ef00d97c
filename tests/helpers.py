"""Helpers shared by the tests: dropping files the way producers should, waiting without sleeps."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson

ROOT = Path(__file__).resolve().parents[1]


def short_tmpdir() -> Path:
    """A short folder for Unix sockets (sun_path is limited to 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="gbd", dir="/tmp"))


def request_lines(
    n: int, *, prefix: str = "k", text: Callable[[int], str] | None = None
) -> list[bytes]:
    """``n`` keyed generate requests whose prompt names the key (the emulator echoes prompts)."""
    out = []
    for i in range(n):
        key = f"{prefix}{i}"
        prompt = text(i) if text else f"prompt for {key}"
        out.append(
            orjson.dumps(
                {
                    "key": key,
                    "request": {"contents": [{"role": "user", "parts": [{"text": prompt}]}]},
                }
            )
        )
    return out


def drop(inbox: Path, rel: str, lines: Iterable[bytes] | bytes) -> Path:
    """Write a file elsewhere under a dot-name and rename it into the inbox (the Maildir way)."""
    final = inbox / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    data = lines if isinstance(lines, bytes) else b"".join(line + b"\n" for line in lines)
    tmp.write_bytes(data)
    os.rename(tmp, final)
    return final


async def wait_until(
    cond: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.02
) -> Any:
    """Poll ``cond`` (sync or async) until truthy; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while True:
            value = cond()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await anyio.sleep(interval)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def answer_text(result_line: dict[str, Any]) -> str:
    """The text of the first candidate of a generate response."""
    parts = result_line["response"]["candidates"][0]["content"]["parts"]
    return "".join(p.get("text", "") for p in parts)


@asynccontextmanager
async def serve_control(root: Path, *, gemini: Any = None, **paths: Any) -> AsyncIterator[Any]:
    """A real store under ``root`` and the control socket served at a short path under /tmp."""
    from daemon.config import parse_config
    from daemon.context import Context
    from daemon.control.http import run_control
    from daemon.store import Store

    short = short_tmpdir()
    cfg = parse_config({"paths": {"root": str(root), "socket": str(short / "c.sock"), **paths}})
    try:
        async with Store.open(cfg.db_path) as store:
            ctx = Context(cfg=cfg, store=store, gemini=gemini)
            async with anyio.create_task_group() as tg:
                await tg.start(run_control, ctx)
                yield ctx
                tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(short, ignore_errors=True)
