"""Pollers against the emulator: state and progress, intervals, terminal jobs, list walks."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.store import loads
from daemon.submit.submitter import submit_once
from daemon.track.poll import poll_once
from tests import remote_helpers as rh
from tests.remote_helpers import Env, lines_for, wait_for

env, emu_settings, cfg_sections = rh.env, rh.emu_settings, rh.cfg_sections


async def job(e: Env, job_id: int) -> dict[str, Any]:
    row = await e.ctx.store.get_job(job_id)
    assert row is not None
    return row


async def make_due(e: Env) -> None:
    async with e.ctx.store.tx() as conn:
        await conn.execute("UPDATE jobs SET next_poll_at = 0 WHERE state = 'active'")


async def active_jobs(e: Env, n: int, *, mode: str = "inline", lines: int = 2) -> tuple[str, list]:
    iid, ids = await e.add_input(lines_for(lines), mode=mode, parts=n)
    assert await submit_once(e.ctx) == n
    return iid, ids


@pytest.mark.parametrize("mode", ["file", "inline"])
async def test_progress_and_terminal(env: Env, mode: str) -> None:
    iid, (jid,) = await active_jobs(env, 1, mode=mode, lines=4)

    async def finished() -> bool:
        await make_due(env)
        await poll_once(env.ctx)
        return (await job(env, jid))["state"] == "done"

    await wait_for(finished)
    row = await job(env, jid)
    assert row["remote_state"] == "BATCH_STATE_SUCCEEDED"
    assert (row["done_count"], row["failed_count"], row["pending_count"]) == (4, 0, 0)
    assert row["remote_create_time"] and row["remote_end_time"] and row["finished_at"]
    assert row["error"] is None
    assert (row["result_file"] or "").startswith("files/batch-") == (mode == "file")
    assert await env.ctx.wake.collect.wait(0)
    states = [h["state"] for h in await env.ctx.store.history(iid)]
    assert "running" in states and states.index("submitted") < states.index("running")


# Intervals far longer than a busy box can stall (issue 13: a 0.1 s interval raced "not due yet"),
# and the job stays PENDING until the test moves it: nothing here depends on how fast it runs.
@pytest.mark.parametrize("cfg_sections", [{"poll": {"min_interval": 30, "max_interval": 240}}])
async def test_interval_grows_and_resets_on_change(env: Env) -> None:
    env.emu.settings.pending_seconds = 3600
    env.emu.settings.running_seconds = 3600
    _, (jid,) = await active_jobs(env, 1)
    cfg = env.ctx.cfg.poll
    seen = []
    for _ in range(4):
        await make_due(env)
        await poll_once(env.ctx)
        row = await job(env, jid)
        seen.append((row["remote_state"], row["poll_interval"]))
    # Unchanged PENDING: the interval doubles up to max_interval.
    assert [i for _, i in seen] == [60, 120, 240, cfg.max_interval]
    assert all(s == "BATCH_STATE_PENDING" for s, _ in seen)

    rec = env.emu.store.jobs[(await job(env, jid))["remote_name"].removeprefix("batches/")]
    rec["pending_s"] = 0.0  # the emulator's job starts running now
    await make_due(env)
    assert await poll_once(env.ctx) == 1
    row = await job(env, jid)
    assert row["remote_state"] == "BATCH_STATE_RUNNING"
    assert row["poll_interval"] == cfg.min_interval  # reset on the state change
    # next_poll_at is taken just before updated_at: within the interval, not after it
    assert 0 < row["next_poll_at"] - row["updated_at"] <= cfg.min_interval + 1e-3
    assert await poll_once(env.ctx) == 0  # not due yet: no call
    assert row["pending_count"] + row["done_count"] == 2


async def test_failed_job_keeps_api_error(env: Env) -> None:
    env.emu.settings.pending_seconds = 30
    _, (jid,) = await active_jobs(env, 1)
    rec = env.emu.store.jobs[(await job(env, jid))["remote_name"].removeprefix("batches/")]
    env.emu.store.force(rec, "FAILED")
    await make_due(env)
    assert await poll_once(env.ctx) == 1
    row = await job(env, jid)
    assert row["state"] == "done" and row["remote_state"] == "BATCH_STATE_FAILED"
    assert loads(row["error"])["code"] == 13
    assert await env.ctx.wake.collect.wait(0)


async def test_vanished_job_is_lost(env: Env) -> None:
    env.emu.settings.pending_seconds = 30
    _, (jid,) = await active_jobs(env, 1)
    await env.gem.delete_batch((await job(env, jid))["remote_name"])
    await make_due(env)
    await poll_once(env.ctx)
    row = await job(env, jid)
    assert row["state"] == "done"
    assert loads(row["error"])["message"] == "remote job disappeared"


async def test_transient_error_keeps_job_and_backs_off(env: Env) -> None:
    env.emu.settings.pending_seconds = 30
    _, (jid,) = await active_jobs(env, 1)
    before = await job(env, jid)
    env.emu.fail_next("batches.get", "503")
    await make_due(env)
    assert await poll_once(env.ctx) == 0
    row = await job(env, jid)
    assert row["state"] == "active" and row["poll_interval"] == 2 * before["poll_interval"]
    assert env.ctx.last_api_error and env.ctx.last_api_error["code"] == 503


@pytest.mark.parametrize("cfg_sections", [{"poll": {"stuck_after": 5}}])
async def test_stuck_job_is_flagged_once(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.emu.settings.pending_seconds = 30
    iid, _ = await active_jobs(env, 1)
    async with env.ctx.store.tx() as conn:  # submitted longer ago than stuck_after
        await conn.execute("UPDATE jobs SET submitted_at = submitted_at - 10")
    for _ in range(3):
        await make_due(env)
        await poll_once(env.ctx)
    inp = await env.ctx.store.get_input(iid)
    assert inp is not None and inp["reason"].startswith("stuck: job batches/")
    assert capsys.readouterr().out.count("job_stuck") == 1


async def test_list_walk_replaces_gets(env: Env) -> None:
    env.emu.settings.pending_seconds = 30
    _, ids = await active_jobs(env, 30)
    calls_before = dict(env.emu.stats["calls"])
    await make_due(env)
    assert await poll_once(env.ctx) == 30
    calls = env.emu.stats["calls"]
    gets = calls.get("batches.get", 0) - calls_before.get("batches.get", 0)
    lists = calls.get("batches.list", 0) - calls_before.get("batches.list", 0)
    assert (gets, lists) == (0, 1)  # one page instead of 30 gets
    for jid in ids:
        row = await job(env, jid)
        assert row["remote_state"] == "BATCH_STATE_PENDING" and row["poll_interval"] == 0.1


async def test_few_due_jobs_use_get(env: Env) -> None:
    env.emu.settings.pending_seconds = 30
    await active_jobs(env, 2)
    await make_due(env)
    assert await poll_once(env.ctx) == 2
    assert env.emu.stats["calls"].get("batches.list", 0) == 0
    assert env.emu.stats["calls"]["batches.get"] == 2


async def test_loops_take_a_job_to_done(env: Env) -> None:
    import anyio

    from daemon.submit.submitter import run_submitter
    from daemon.track.poll import run_pollers

    _, (jid,) = await env.add_input(lines_for(3), mode="file")
    async with anyio.create_task_group() as tg:
        await tg.start(run_submitter, env.ctx)
        await tg.start(run_pollers, env.ctx)
        env.ctx.wake.submit.set()

        async def done() -> bool:
            return (await job(env, jid))["state"] == "done"

        await wait_for(done)
        tg.cancel_scope.cancel()
    assert env.emu.stats["calls"]["batches.create"] == 1
