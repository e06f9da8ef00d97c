"""The control socket and the CLI against a running daemon on the emulator (SPEC §6, §7)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from daemon.cli import build_parser
from daemon.context import Context
from daemon.control import client
from daemon.layout import outbox_paths
from tests.e2e.conftest import running_daemon, wait_final
from tests.helpers import drop, read_jsonl, request_lines, wait_until


@pytest.fixture(autouse=True)
def daemon_logs_to_stderr() -> Iterator[None]:
    """Daemon and CLI share this process here: keep the daemon's log lines off stdout."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    yield
    structlog.reset_defaults()


async def cli(ctx: Context, *argv: str) -> int:
    args = build_parser().parse_args([*argv, "--socket", str(ctx.cfg.socket_path)])
    return await anyio.to_thread.run_sync(client.main, ctx.cfg, args)


async def get(ctx: Context, url: str) -> tuple[int, Any]:
    conn = aiohttp.UnixConnector(path=str(ctx.cfg.socket_path))
    async with aiohttp.ClientSession(connector=conn) as s, s.get(f"http://d{url}") as r:
        body = await r.read()
        return r.status, orjson.loads(body) if r.content_type == "application/json" else body


async def test_cancel_a_running_job(make_cfg, emulator, capsys) -> None:
    emulator.settings.update({"running_seconds": 600.0})  # stays running until cancelled
    cfg = make_cfg()
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "long.jsonl", request_lines(5))

        async def running() -> Any:
            row = await ctx.store.find_input("long.jsonl")
            return row and row["state"] == "running"

        await wait_until(running, timeout=30)
        assert await cli(ctx, "cancel", "long.jsonl", "--json") == 0
        answer = orjson.loads(capsys.readouterr().out)
        assert answer["cancel_requested"] is True
        row = await wait_final(ctx, "long.jsonl", timeout=30)
        assert row["state"] == "cancelled"
        (job,) = await ctx.store.jobs_of(row["id"])
        assert job["remote_state"] == "BATCH_STATE_CANCELLED"
        assert await cli(ctx, "cancel", row["id"]) == 1  # finished: 409
    out = outbox_paths(cfg.outbox_dir, "long.jsonl")
    assert orjson.loads(out["error"].read_bytes())["state"] == "cancelled"
    assert not out["summary"].exists()


async def test_retry_a_partial_input(make_cfg, emulator, capsys) -> None:
    cfg = make_cfg(submit={"retry_failed_requests": 0})  # no automatic retry: ends partial
    lines = request_lines(6, text=lambda i: f"[[transient:13]] p{i}" if i in (1, 4) else f"p{i}")
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "p.jsonl", lines)
        row = await wait_final(ctx, "p.jsonl")
        assert row["state"] == "partial"
        assert await cli(ctx, "retry", "p.jsonl") == 0
        assert "retry:" in capsys.readouterr().out
        row = await wait_final(ctx, row["id"])  # the same input, finished again
        assert row["state"] == "succeeded", row
        jobs = await ctx.store.jobs_of(row["id"])
        assert [(j["attempt"], j["request_count"]) for j in jobs] == [(1, 6), (2, 2)]
        assert jobs[1]["display_name"].endswith(":1:2")
        assert await cli(ctx, "retry", row["id"]) == 1  # succeeded: 409
    results = read_jsonl(outbox_paths(cfg.outbox_dir, "p.jsonl")["results"])
    assert [r["key"] for r in results] == [f"k{i}" for i in range(6)]
    assert all("response" in r for r in results)


async def test_fifty_status_clients_while_100_files_in_flight(make_cfg, emulator) -> None:
    cfg = make_cfg()
    async with running_daemon(cfg) as ctx:
        for i in range(100):
            drop(cfg.inbox_dir, f"f{i:03}.jsonl", request_lines(3, prefix=f"f{i}-"))
        statuses: list[int] = []

        async def one() -> None:
            status, data = await get(ctx, "/v1/status")
            assert sum(data["inputs"].values()) <= 100
            statuses.append(status)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(one)
        assert statuses == [200] * 50

        async def all_final() -> bool:
            _, data = await get(ctx, "/v1/status")
            n = data["inputs"]
            return n["succeeded"] == 100

        await wait_until(all_final, timeout=120)
        status, text = await get(ctx, "/metrics")
        assert status == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode())
            for s in f.samples
        }
        assert samples[("gemini_batchd_inputs", (("state", "succeeded"),))] == 100
        assert samples[("gemini_batchd_requests_total", (("outcome", "succeeded"),))] == 300
        creates = await ctx.store.scalar("SELECT COUNT(*) FROM jobs WHERE remote_name IS NOT NULL")
        assert (
            samples[
                ("gemini_batchd_api_calls_total", (("code", "200"), ("endpoint", "batches.create")))
            ]
            == creates
        )
