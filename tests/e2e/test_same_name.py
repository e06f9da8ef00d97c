"""The same name dropped again while its first drop runs: the latest drop wins the outbox."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from daemon.outbox import outbox_paths
from tests.e2e.conftest import running_daemon, wait_final
from tests.helpers import drop, read_jsonl, request_lines, wait_until


async def _remote_job(ctx: Any, input_id: str) -> str:
    async def created() -> Any:
        jobs = await ctx.store.jobs_of(input_id)
        return jobs and jobs[0]["remote_name"]

    return str(await wait_until(created))


async def test_an_older_drop_finishing_last_does_not_replace_the_newer_results(make_cfg, emulator):
    cfg = make_cfg()
    paths = outbox_paths(cfg.outbox_dir, "same.jsonl")
    emulator.settings.update({"running_seconds": 3600.0})  # the first drop's job waits for us
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "same.jsonl", request_lines(3, prefix="old"))
        first = await wait_until(lambda: ctx.store.find_input("same.jsonl"))
        old_job = await _remote_job(ctx, first["id"])
        emulator.settings.update({"running_seconds": 0.05})
        await wait_until(lambda: not (cfg.inbox_dir / "same.jsonl").exists())
        drop(cfg.inbox_dir, "same.jsonl", request_lines(2, prefix="new"))
        second = await wait_until(
            lambda: ctx.store.fetchone(
                "SELECT * FROM inputs WHERE rel_path = 'same.jsonl' AND id != ?", (first["id"],)
            )
        )
        second = await wait_final(ctx, second["id"])
        assert second["state"] == "succeeded", second
        async with (
            aiohttp.ClientSession() as http,  # now let the first drop's job end
            http.post(
                f"{emulator.url}/__emulator/{old_job}:force", json={"state": "SUCCEEDED"}
            ) as r,
        ):
            assert r.status == 200, await r.text()
        first = await wait_final(ctx, first["id"])
        history = await ctx.store.fetchall(
            "SELECT note FROM history WHERE input_id = ?", (first["id"],)
        )
    assert first["state"] == "succeeded", first
    assert [x["key"] for x in read_jsonl(paths["results"])] == ["new0", "new1"]
    summary = orjson.loads(paths["summary"].read_bytes())
    assert summary["input_id"] == second["id"]
    assert not paths["error"].exists()
    assert "superseded" in first["reason"] and second["id"] in first["reason"]
    doc = orjson.loads(first["summary"])
    assert doc["superseded_by"] == second["id"] and doc["outbox"]["results"] is None
    assert any("superseded" in (h["note"] or "") for h in history)
    assert sorted(p.name for p in cfg.outbox_dir.iterdir()) == ["same.jsonl", "same.summary.json"]
