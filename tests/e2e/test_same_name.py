"""The same name dropped again while its first drop runs: the latest drop wins the outbox."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from daemon.layout import outbox_paths
from tests.e2e.conftest import running_daemon, wait_final
from tests.helpers import drop, read_jsonl, request_lines, wait_until


async def _remote_jobs(ctx: Any, input_id: str, n: int) -> list[str]:
    async def created() -> Any:
        jobs = await ctx.store.jobs_of(input_id)
        names = [j["remote_name"] for j in jobs if j["remote_name"]]
        return len(names) == n and names

    return list(await wait_until(created))


@pytest.mark.parametrize(
    ("submit", "parts"),
    [({}, 1), ({"max_requests_per_job": 2, "inline_max_bytes": 0}, 3)],
    ids=["inline", "file-parts"],
)
async def test_an_older_drop_finishing_last_does_not_replace_the_newer_results(
    make_cfg, emulator, submit, parts
):
    cfg = make_cfg(submit=submit)
    paths = outbox_paths(cfg.outbox_dir, "same.jsonl")
    emulator.settings.update({"running_seconds": 3600.0})  # the first drop's jobs wait for us
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "same.jsonl", request_lines(5, prefix="old"))
        first = await wait_until(lambda: ctx.store.find_input("same.jsonl"))
        old_jobs = await _remote_jobs(ctx, first["id"], parts)
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
        async with aiohttp.ClientSession() as http:  # now let the first drop's jobs end
            for name in old_jobs:
                url = f"{emulator.url}/__emulator/{name}:force"
                async with http.post(url, json={"state": "SUCCEEDED"}) as r:
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
    # nothing else in the outbox: no results file in the making left behind by the older drop
    assert sorted(p.name for p in cfg.outbox_dir.iterdir()) == ["same.jsonl", "same.summary.json"]
