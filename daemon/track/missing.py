"""Jobs ``batches.get`` answers 404 for: lost for good, or only out of sight.

The real API shows a job only to the API key (project) that created it; another key gets 404
(evidence Task 3 row 3: a key change made 348 live jobs look lost and be paid again). So a 404 is
"lost" (resubmitted within the retry budget, as before) only when the key in use is the job's
creator's and the API still answers for another active job of that key (or the job is the key's
only active one). Otherwise the job is *held*: it stays ``active``, is polled at the longest
interval, its input's reason says why, and nothing is resubmitted until the creator's key is back
(it then finishes normally) or the user runs ``retry`` (:meth:`daemon.store.Store.release_held`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from daemon.context import Context
from daemon.gemini import ApiError
from daemon.states import NOT_VISIBLE
from daemon.store import loads

log = structlog.get_logger(__name__)

Job = dict[str, Any]


def is_held(job: Job) -> bool:
    err = loads(job["error"]) if isinstance(job.get("error"), str) else job.get("error")
    return isinstance(err, dict) and bool(err.get("not_visible"))


async def not_found(
    ctx: Context,
    jobs: list[Job],
    *,
    lost: Callable[[Context, Job], Awaitable[None]],
    later: Callable[[Context, Job], Awaitable[None]],
) -> None:
    """Decide for the jobs whose ``get`` answered 404 in this poll pass."""
    for job in [j for j in jobs if j.get("input_cancel")]:
        await lost(ctx, job)  # cancelled meanwhile: nothing to wait for, nothing is retried
    jobs = [j for j in jobs if not j.get("input_cancel")]
    foreign = [j for j in jobs if j.get("key_fp") and ctx.key_fp and j["key_fp"] != ctx.key_fp]
    for job in foreign:
        await _hold(
            ctx, job, f"{NOT_VISIBLE}: job {job['remote_name']} was created with another key"
        )
    by_key: dict[str | None, list[Job]] = {}
    for job in jobs:
        if job not in foreign:
            by_key.setdefault(job.get("key_fp"), []).append(job)
    for key_fp, group in by_key.items():
        seen = await _key_sees_its_jobs(ctx, key_fp, group)
        for job in group:
            if seen is None:
                await later(ctx, job)
            elif seen:
                await lost(ctx, job)
            else:
                what = f"job {job['remote_name']} and the other active jobs of this key"
                await _hold(ctx, job, f"{NOT_VISIBLE}: {what} are all not found (404)")


async def _key_sees_its_jobs(ctx: Context, key_fp: str | None, missing: list[Job]) -> bool | None:
    """Whether the API still answers for another active job created with ``key_fp``: True
    (or a lone job: nothing to compare with), False (that one is not found either: hold), None
    (the check failed: decide next time)."""
    names = [j["remote_name"] for j in missing]
    other = await ctx.store.other_active_job(key_fp, names)
    if other is None:
        return len(missing) == 1
    assert ctx.gemini is not None
    try:
        await ctx.gemini.get_batch(other)
    except ApiError as e:
        return False if e.http_code == 404 else None
    return True


async def _hold(ctx: Context, job: Job, why: str) -> None:
    message = f"{why}; not resubmitted (the creator's key finishes it; `retry` resubmits it)"
    first = not is_held(job)
    if first:
        log.warning("job_not_visible", job=job["id"], remote=job["remote_name"], reason=why)
    row = await ctx.store.get_input(job["input_id"])
    interval = ctx.cfg.poll.max_interval
    async with ctx.store.tx() as conn:
        if first and row is not None:  # a note in the input's history (`show`), once
            await ctx.store.add_history(conn, job["input_id"], row["state"], message)
        await ctx.store.update_job(
            conn,
            job["id"],
            error={"not_visible": True, "message": message},
            poll_interval=interval,
            next_poll_at=time.time() + interval,
        )
        await ctx.store.update_input(conn, job["input_id"], reason=message)
