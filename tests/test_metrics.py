"""GET /metrics over the socket: Prometheus text that parses and matches the store."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from daemon.context import Context
from daemon.control.metrics import Metrics
from daemon.states import InputState, JobState
from tests.helpers import serve_control

serve = serve_control


async def scrape(ctx: Context) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = aiohttp.UnixConnector(path=str(ctx.cfg.socket_path))
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://d/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("gemini_batchd_")
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def add(
    ctx: Context,
    state: InputState,
    requests: int,
    *,
    summary: dict[str, Any] | None = None,
    jobs: list[dict[str, Any]] = (),  # type: ignore[assignment]
    **fields: Any,
) -> str:
    async with ctx.store.tx() as conn:
        row = await ctx.store.add_input(
            conn, rel_path="x.jsonl", model="m", work_path="/nonexistent", request_count=requests
        )
        await ctx.store.set_input_state(conn, row["id"], state, summary=summary, **fields)
        for n, job in enumerate(jobs, start=1):
            await ctx.store.add_job(
                conn,
                input_id=row["id"],
                part_no=n,
                attempt=1,
                display_name=f"gemini-batchd:{row['id']}:{n}",
                mode="inline",
                source_path="/nonexistent",
                request_count=requests,
                est_tokens=1,
                **job,
            )
    return row["id"]


async def test_metrics_parse_and_match_the_store(tmp_path: Path) -> None:
    calls: Counter[tuple[str, int | str]] = Counter(
        {("batches.create", 200): 3, ("batches.create", 429): 2, ("batches.get", "timeout"): 1}
    )
    async with serve(tmp_path, gemini=SimpleNamespace(calls=calls)) as ctx:
        now = time.time()
        await add(ctx, InputState.QUEUED, 7, jobs=[{}])
        await add(ctx, InputState.SEEN, 0)
        await add(
            ctx,
            InputState.RUNNING,
            5,
            jobs=[
                {"state": "active", "remote_name": "b/1", "next_poll_at": now - 30},
                {"state": "active", "remote_name": "b/2", "next_poll_at": now + 30},
                {"state": "uploading"},
            ],
        )
        tokens = {"prompt": 100, "candidates": 40, "thoughts": 5, "cached": 10}
        await add(
            ctx,
            InputState.SUCCEEDED,
            4,
            summary={"requests": {"total": 4, "succeeded": 4, "failed": 0}, "tokens": tokens},
        )
        partial = await add(
            ctx,
            InputState.PARTIAL,
            3,
            summary={"requests": {"total": 3, "succeeded": 2, "failed": 1}, "tokens": tokens},
        )
        await add(  # served from the earlier drop: its requests count, its tokens were not spent
            ctx,
            InputState.PARTIAL,
            3,
            summary={"requests": {"total": 3, "succeeded": 2, "failed": 1}, "tokens": tokens},
            reused_from=partial,
        )
        m = await scrape(ctx)
        counts = await ctx.store.counts_by_state()

    for state in InputState:
        assert m[("gemini_batchd_inputs", (("state", state.value),))] == counts.get(state.value, 0)
    assert m[("gemini_batchd_inputs", (("state", "running"),))] == 1
    assert m[("gemini_batchd_jobs", (("state", JobState.ACTIVE.value),))] == 2
    assert m[("gemini_batchd_active_jobs", ())] == 3  # 2 active + 1 uploading
    assert m[("gemini_batchd_queue_depth_requests", ())] == 7
    assert m[("gemini_batchd_requests_total", (("outcome", "succeeded"),))] == 8
    assert m[("gemini_batchd_requests_total", (("outcome", "failed"),))] == 2
    for kind, n in tokens.items():
        assert m[("gemini_batchd_tokens_total", (("kind", kind),))] == 2 * n
    assert 30 <= m[("gemini_batchd_poll_lag_seconds", ())] < 60
    key = (("code", "200"), ("endpoint", "batches.create"))
    assert m[("gemini_batchd_api_calls_total", key)] == 3
    assert ("gemini_batchd_api_errors_total", key) not in m
    assert (
        m[("gemini_batchd_api_errors_total", (("code", "429"), ("endpoint", "batches.create")))]
        == 2
    )
    assert (
        m[("gemini_batchd_api_errors_total", (("code", "timeout"), ("endpoint", "batches.get")))]
        == 1
    )
    assert m[("gemini_batchd_uptime_seconds", ())] >= 0


async def test_metrics_empty_store_and_private_registry(tmp_path: Path) -> None:
    async with serve(tmp_path) as ctx:
        m = await scrape(ctx)
        assert m[("gemini_batchd_poll_lag_seconds", ())] == 0
        assert m[("gemini_batchd_requests_total", (("outcome", "failed"),))] == 0
        assert not [k for k in m if k[0].startswith("gemini_batchd_api_calls")]
        # two daemons in one process do not collide, and nothing lands in the global registry
        Metrics()
        Metrics()
        assert REGISTRY.get_sample_value("gemini_batchd_active_jobs") is None
