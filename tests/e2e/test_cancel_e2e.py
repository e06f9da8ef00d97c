"""Cancels and late or bare results as the real API shows them (issue 13, evidence §1.6, §1.19):
the real daemon against the real emulator, which plays the API's behaviour."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from daemon.context import Context
from daemon.layout import outbox_paths
from tests.e2e.conftest import running_daemon, wait_final
from tests.helpers import drop, read_jsonl, request_lines, wait_until

KEY = {"x-goog-api-key": "test-key-0123456789"}


async def api_post(emulator: Any, path: str, body: dict[str, Any] | None = None) -> Any:
    """A call straight to the emulator, as another tool (AI Studio, a script) would make it."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{emulator.url}/{path}", json=body or {}, headers=KEY) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


async def socket_call(ctx: Context, method: str, path: str, status: int = 200) -> Any:
    """The daemon's control socket, as the CLI uses it."""
    conn = aiohttp.UnixConnector(path=str(ctx.cfg.socket_path))
    async with (
        aiohttp.ClientSession(connector=conn) as s,
        s.request(method, f"http://d{path}") as r,
    ):
        assert r.status == status, await r.text()
        return await r.json()


async def jobs_where(ctx: Context, ref: str, cond: Any) -> list[dict[str, Any]]:
    row = await ctx.store.find_input(ref)
    if row is None:
        return []
    jobs = await ctx.store.jobs_of(row["id"])
    return jobs if jobs and all(cond(j) for j in jobs) else []


def creates(emulator: Any) -> int:
    return sum(emulator.stats["creates_by_display_name"].values())


@pytest.mark.parametrize("code", [13, 1])  # decided on metadata.state, whatever the code says
async def test_job_cancelled_outside_is_not_resubmitted(make_cfg, emulator, code) -> None:
    emulator.settings.update(
        {"pending_seconds": 0.0, "running_seconds": 600.0, "cancel_error_code": code}
    )
    cfg = make_cfg()
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "out.jsonl", request_lines(4))
        (job,) = await wait_until(
            lambda: jobs_where(
                ctx, "out.jsonl", lambda j: j["remote_state"] == "BATCH_STATE_RUNNING"
            )
        )
        await api_post(emulator, f"v1beta/{job['remote_name']}:cancel")
        row = await wait_final(ctx, "out.jsonl", timeout=30)
        assert row["state"] == "cancelled", row
        assert row["reason"].startswith("cancelled outside gemini-batchd"), row["reason"]
        assert [j["attempt"] for j in await ctx.store.jobs_of(row["id"])] == [1]
        shown = await socket_call(ctx, "GET", f"/v1/inputs/{row['id']}")
        assert shown["cancelled_outside"] is True and shown["cancel_requested"] is False
    assert creates(emulator) == 1  # never resubmitted
    out = outbox_paths(cfg.outbox_dir, "out.jsonl")
    err = orjson.loads(out["error"].read_bytes())
    assert err["state"] == "cancelled" and err["reason"] == row["reason"]
    assert not out["summary"].exists()


async def test_part_cancelled_outside_keeps_finished_parts(make_cfg, emulator) -> None:
    emulator.settings.update({"pending_seconds": 0.0, "running_seconds": 600.0})
    cfg = make_cfg(submit={"max_requests_per_job": 2})
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "two.jsonl", request_lines(4))
        jobs = await wait_until(
            lambda: jobs_where(
                ctx, "two.jsonl", lambda j: j["remote_state"] == "BATCH_STATE_RUNNING"
            )
        )
        assert len(jobs) == 2
        first, second = sorted(jobs, key=lambda j: j["part_no"])
        await api_post(emulator, f"__emulator/{first['remote_name']}:force", {"state": "SUCCEEDED"})
        await wait_until(
            lambda: jobs_where(
                ctx, "two.jsonl", lambda j: j["part_no"] == 2 or j["state"] == "collected"
            )
        )
        await api_post(emulator, f"v1beta/{second['remote_name']}:cancel")
        row = await wait_final(ctx, "two.jsonl", timeout=30)
        assert row["state"] == "cancelled" and "outside gemini-batchd" in row["reason"], row
    assert creates(emulator) == 2
    results = read_jsonl(outbox_paths(cfg.outbox_dir, "two.jsonl")["results"])
    assert [r["key"] for r in results] == ["k0", "k1", "k2", "k3"]
    assert ["response" in r for r in results] == [True, True, False, False]


async def test_own_cancel_ignored_by_the_api_keeps_the_paid_results(make_cfg, emulator) -> None:
    emulator.settings.update({"pending_seconds": 0.0, "running_seconds": 600.0})
    cfg = make_cfg()
    lines = request_lines(3, text=lambda i: "stubborn [[ignore_cancel]]" if i == 1 else f"p{i}")
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "ign.jsonl", lines)
        (job,) = await wait_until(
            lambda: jobs_where(
                ctx, "ign.jsonl", lambda j: j["remote_state"] == "BATCH_STATE_RUNNING"
            )
        )
        answer = await socket_call(ctx, "POST", f"/v1/inputs/{job['input_id']}/cancel", 202)
        assert answer["cancel_requested"] is True
        assert emulator.stats["calls"]["batches.cancel"] == 1
        (job,) = await ctx.store.jobs_of(job["input_id"])
        assert job["state"] == "active"  # acknowledged, not done: the daemon keeps polling
        await api_post(emulator, f"__emulator/{job['remote_name']}:force", {"state": "SUCCEEDED"})
        row = await wait_final(ctx, "ign.jsonl", timeout=30)
    assert creates(emulator) == 1
    out = outbox_paths(cfg.outbox_dir, "ign.jsonl")
    results = read_jsonl(out["results"])
    assert [r["key"] for r in results] == ["k0", "k1", "k2"] and all(
        "response" in r for r in results
    )
    assert row["state"] == "succeeded", row
    summary = orjson.loads(out["summary"].read_bytes())
    assert summary["cancel_ignored_by_api"] == [job["remote_name"]]


async def test_succeeded_before_its_results_file_waits_for_it(make_cfg, emulator) -> None:
    emulator.settings.update({"results_file_delay": 3600.0})
    cfg = make_cfg(submit={"inline_max_bytes": 1}, poll={"results_grace": 3600.0})
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "late.jsonl", request_lines(5))

        async def waiting() -> Any:
            row = await ctx.store.find_input("late.jsonl")
            return row and "results file" in (row["reason"] or "")

        await wait_until(waiting, timeout=30)
        (job,) = await ctx.store.jobs_of((await ctx.store.find_input("late.jsonl"))["id"])
        assert job["mode"] == "file" and job["remote_state"] == "BATCH_STATE_SUCCEEDED"
        emulator.settings.update({"results_file_delay": 0.0})  # the file shows up
        row = await wait_final(ctx, "late.jsonl", timeout=30)
        assert row["state"] == "succeeded", row
    assert creates(emulator) == 1
    results = read_jsonl(outbox_paths(cfg.outbox_dir, "late.jsonl")["results"])
    assert len(results) == 5 and all("response" in r for r in results)


async def test_results_file_that_never_comes_is_not_paid_twice(make_cfg, emulator) -> None:
    emulator.settings.update({"results_file_delay": 3600.0})
    cfg = make_cfg(submit={"inline_max_bytes": 1}, poll={"results_grace": 0.5})
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "lost.jsonl", request_lines(5))
        row = await wait_final(ctx, "lost.jsonl", timeout=30)
        assert row["state"] == "failed", row
        assert "results file" in row["reason"] and "retry" in row["reason"], row["reason"]
        assert [j["attempt"] for j in await ctx.store.jobs_of(row["id"])] == [1]
    assert creates(emulator) == 1
    err = orjson.loads(outbox_paths(cfg.outbox_dir, "lost.jsonl")["error"].read_bytes())
    assert err["state"] == "failed"


async def test_inline_answers_without_metadata_are_not_paid_twice(make_cfg, emulator) -> None:
    emulator.settings.update({"drop_inline_metadata": True})
    cfg = make_cfg()
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "bare.jsonl", request_lines(3))
        row = await wait_final(ctx, "bare.jsonl", timeout=30)
        assert row["state"] == "failed", row
        assert "3 answers without metadata.key" in row["reason"], row["reason"]
        assert [j["attempt"] for j in await ctx.store.jobs_of(row["id"])] == [1]
    assert creates(emulator) == 1
    err = orjson.loads(outbox_paths(cfg.outbox_dir, "bare.jsonl")["error"].read_bytes())
    assert err["requests"]["unknown_dropped"] == 3


async def test_failed_job_with_error_13_is_still_retried(make_cfg, emulator) -> None:
    """Error 13 is also INTERNAL: a FAILED job (not CANCELLED) keeps its retry."""
    emulator.force_next("FAILED")  # ends FAILED with {code: 13}
    cfg = make_cfg()
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "f.jsonl", request_lines(2))
        row = await wait_final(ctx, "f.jsonl", timeout=30)
        assert row["state"] == "succeeded", row
        jobs = await ctx.store.jobs_of(row["id"])
        assert [j["remote_state"] for j in jobs] == ["BATCH_STATE_FAILED", "BATCH_STATE_SUCCEEDED"]
        assert orjson.loads(jobs[0]["error"])["code"] == 13
    assert creates(emulator) == 2


async def test_cancelled_outside_drops_parts_not_yet_submitted(make_cfg, emulator) -> None:
    emulator.settings.update({"pending_seconds": 0.0, "running_seconds": 600.0})
    cfg = make_cfg(submit={"max_requests_per_job": 2, "max_active_jobs": 1})
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "wait.jsonl", request_lines(4))

        async def first_running() -> Any:
            jobs = await jobs_where(ctx, "wait.jsonl", lambda j: True)
            running = [j for j in jobs if j["remote_state"] == "BATCH_STATE_RUNNING"]
            return running if len(jobs) == 2 else None

        (first,) = await wait_until(first_running)
        await api_post(emulator, f"v1beta/{first['remote_name']}:cancel")
        row = await wait_final(ctx, "wait.jsonl", timeout=30)
        assert row["state"] == "cancelled" and "outside gemini-batchd" in row["reason"], row
        states = [(j["part_no"], j["state"]) for j in await ctx.store.jobs_of(row["id"])]
        assert states == [(1, "collected"), (2, "cancelled")]
    assert creates(emulator) == 1  # the second part was never submitted


async def test_own_cancel_ignored_for_one_part_of_two(make_cfg, emulator) -> None:
    emulator.settings.update({"pending_seconds": 0.0, "running_seconds": 600.0})
    cfg = make_cfg(submit={"max_requests_per_job": 2})
    lines = request_lines(4, text=lambda i: "stubborn [[ignore_cancel]]" if i == 0 else f"p{i}")
    async with running_daemon(cfg) as ctx:
        drop(cfg.inbox_dir, "half.jsonl", lines)
        jobs = await wait_until(
            lambda: jobs_where(
                ctx, "half.jsonl", lambda j: j["remote_state"] == "BATCH_STATE_RUNNING"
            )
        )
        assert len(jobs) == 2
        first = min(jobs, key=lambda j: j["part_no"])
        await socket_call(ctx, "POST", f"/v1/inputs/{first['input_id']}/cancel", 202)
        await api_post(emulator, f"__emulator/{first['remote_name']}:force", {"state": "SUCCEEDED"})
        row = await wait_final(ctx, "half.jsonl", timeout=30)
    assert creates(emulator) == 2
    assert row["state"] == "cancelled" and "anyway" in row["reason"], row
    out = outbox_paths(cfg.outbox_dir, "half.jsonl")
    err = orjson.loads(out["error"].read_bytes())
    assert err["cancel_ignored_by_api"] == [first["remote_name"]]
    results = read_jsonl(out["results"])
    assert ["response" in r for r in results] == [True, True, False, False]
