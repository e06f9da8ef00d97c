"""Pollers: watch ``active`` jobs, record state and progress, hand finished jobs to collect.

A pass takes the due jobs (``next_poll_at <= now``). When there are more due jobs than
``batches.list`` pages needed to see them, one page walk replaces the per-job gets (the list
carries state and ``batchStats``, not inline results — collect does a ``get`` for those). Jobs the
walk did not find are read with ``get``, by ``[poll] workers`` concurrent workers.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from daemon import quirks
from daemon.context import Context
from daemon.crash import crash_point
from daemon.gemini import ApiError
from daemon.states import LOST_JOB_ERROR, NOT_VISIBLE, InputState, JobState, RemoteState
from daemon.store import Store
from daemon.store.group_commit import GroupCommit
from daemon.track.missing import is_held, not_found

log = structlog.get_logger(__name__)

LIST_PAGE_SIZE = 100
_KNOWN = {s.value for s in RemoteState}


def _count(stats: dict[str, Any], name: str) -> int:
    try:
        return int(stats.get(name) or 0)
    except (TypeError, ValueError):
        return 0


async def _due(ctx: Context, now: float) -> list[dict[str, Any]]:
    return await ctx.store.due_for_poll(now)


async def poll_once(ctx: Context) -> int:
    """Poll every due job once; returns the number of jobs whose answer was recorded."""
    now = time.time()
    due = await _due(ctx, now)
    if not due:
        return 0
    pending = {j["remote_name"]: j for j in due}
    recorded = 0
    writer: GroupCommit[_Seen] = GroupCommit(ctx.store, functools.partial(_write, ctx.store))
    pages = 1
    if len(due) > 2:  # a list walk might pay off: count the pages it would take
        n_active = await ctx.store.count_active()
        pages = max(1, math.ceil(n_active / LIST_PAGE_SIZE))
    if len(due) > pages + 1:
        recorded += await _poll_by_list(
            ctx, pending, writer, max_pages=max(pages + 1, len(due) // 2)
        )
    if pending:
        recorded += await _poll_by_get(ctx, list(pending.values()), writer)
    return recorded


async def _poll_by_list(
    ctx: Context,
    pending: dict[str, dict[str, Any]],
    writer: GroupCommit[_Seen],
    *,
    max_pages: int,
) -> int:
    """Walk ``batches.list`` until every pending job was seen (or ``max_pages``); each page's
    answers are written in one transaction."""
    gem = ctx.gemini
    assert gem is not None
    recorded, token, walked = 0, None, 0
    while pending and walked < max_pages:
        try:
            page = await gem.list_page(page_size=LIST_PAGE_SIZE, page_token=token)
        except ApiError as e:
            ctx.note_api_error(e)
            return recorded
        walked += 1
        seen = [
            _seen(ctx, job, op)
            for op in page.get("operations") or []
            if (job := pending.pop(op.get("name"), None)) is not None
        ]
        if seen:
            await _commit(ctx, writer, seen)
            recorded += len(seen)
        token = page.get("nextPageToken")
        if not token:
            break
    return recorded


async def _poll_by_get(ctx: Context, jobs: list[dict[str, Any]], writer: GroupCommit[_Seen]) -> int:
    gem = ctx.gemini
    assert gem is not None
    recorded = 0
    limiter = anyio.CapacityLimiter(ctx.cfg.poll.workers)
    missing: list[dict[str, Any]] = []

    async def one(job: dict[str, Any]) -> None:
        nonlocal recorded
        async with limiter:
            try:
                op = await gem.get_batch(job["remote_name"])
            except ApiError as e:
                if e.http_code == 404:  # lost, or out of sight: decided below, all together
                    missing.append(job)
                    recorded += 1
                    return
                ctx.note_api_error(e)
                await _retry_later(ctx, job)
                return
        await _commit(ctx, writer, [_seen(ctx, job, op)])  # group-committed with other workers
        recorded += 1

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(one, job)
    if missing:
        await not_found(ctx, missing, lost=_lost, later=_retry_later)
    return recorded


async def _retry_later(ctx: Context, job: dict[str, Any]) -> None:
    interval = _grow(ctx, job)
    async with ctx.store.tx() as conn:
        await ctx.store.update_job(
            conn, job["id"], poll_interval=interval, next_poll_at=time.time() + interval
        )


async def _lost(ctx: Context, job: dict[str, Any]) -> None:
    log.warning("job_lost", job=job["id"], remote=job["remote_name"])
    async with ctx.store.tx() as conn:
        await ctx.store.update_job(
            conn, job["id"], state=JobState.DONE, error=LOST_JOB_ERROR, finished_at=time.time()
        )
    ctx.wake.collect.set()
    ctx.wake.submit.set()


def _grow(ctx: Context, job: dict[str, Any]) -> float:
    current = job.get("poll_interval") or ctx.cfg.poll.min_interval
    return min(ctx.cfg.poll.max_interval, max(ctx.cfg.poll.min_interval, current * 2))


@dataclass
class _Seen:
    """One Operation's answer for one job, ready to be written."""

    job: dict[str, Any]
    state: str
    fields: dict[str, Any]
    terminal: bool
    changed: bool
    stuck_reason: str | None
    was_held: bool = False  # seen again after a 404 (the creator's key is back)


def _seen(ctx: Context, job: dict[str, Any], op: dict[str, Any]) -> _Seen:
    meta = op.get("metadata") or {}
    state = meta.get("state") or RemoteState.UNSPECIFIED.value
    stats = meta.get("batchStats") or {}
    now = time.time()
    changed = state != job.get("remote_state")
    interval = ctx.cfg.poll.min_interval if changed else _grow(ctx, job)
    fields: dict[str, Any] = {
        "remote_state": state,
        "done_count": _count(stats, "successfulRequestCount"),
        "failed_count": _count(stats, "failedRequestCount"),
        "pending_count": _count(stats, "pendingRequestCount"),
        "remote_create_time": meta.get("createTime") or job.get("remote_create_time"),
        "remote_end_time": meta.get("endTime"),
        "poll_interval": interval,
        "next_poll_at": now + interval,
    }
    terminal = state in _KNOWN and RemoteState(state).terminal
    held = is_held(job)
    if held:
        fields["error"] = None
    if terminal:
        output = meta.get("output") or op.get("response") or {}
        fields |= {"state": JobState.DONE, "finished_at": now, "error": op.get("error")}
        if output.get("responsesFile"):
            fields["result_file"] = output["responsesFile"]
    stuck = None
    if (
        not terminal
        and job.get("submitted_at")
        and now - job["submitted_at"] > ctx.cfg.poll.stuck_after
        and not (job.get("input_reason") or "").startswith("stuck:")
    ):
        hours = (now - job["submitted_at"]) / 3600
        stuck = f"stuck: job {job['remote_name']} {state} for {hours:.1f} h"
    return _Seen(job, state, fields, terminal, changed, stuck, held)


async def _write(store: Store, conn: Any, items: list[_Seen]) -> None:
    """Write a batch of answers: one UPDATE per job, inputs advanced to running together; an
    input whose job the API cancelled without the daemon asking is marked so (never resubmitted)."""
    now = time.time()
    await store.update_jobs(conn, ((it.fields, it.job["id"]) for it in items))
    running = [it.job["input_id"] for it in items if it.state == RemoteState.RUNNING.value]
    if running:
        await store.advance(conn, running, InputState.RUNNING, now)
    cancelled = [it.job["input_id"] for it in items if it.state == RemoteState.CANCELLED.value]
    if cancelled:
        await store.mark_cancelled_outside(conn, cancelled, quirks.OUTSIDE_REASON)
    back = [it.job["input_id"] for it in items if it.was_held]
    if back:
        await Store.clear_input_reasons(conn, back, NOT_VISIBLE)
    stuck = {it.job["input_id"]: it.stuck_reason for it in items if it.stuck_reason}
    if stuck:
        await store.set_reasons(conn, stuck)


async def _commit(ctx: Context, writer: GroupCommit[_Seen], items: list[_Seen]) -> None:
    for it in items:
        if it.state not in _KNOWN and it.changed:
            log.warning("unknown_remote_state", job=it.job["id"], state=it.state)
    await writer.put(items)
    for it in items:
        job = it.job
        if it.stuck_reason:
            log.warning("job_stuck", job=job["id"], remote=job["remote_name"], state=it.state)
        if it.changed:
            log.info("job_state", job=job["id"], remote=job["remote_name"], state=it.state)
        if it.state == RemoteState.CANCELLED.value and not job.get("input_cancel"):
            log.warning("job_cancelled_outside", job=job["id"], remote=job["remote_name"])
    if any(it.state == RemoteState.RUNNING.value for it in items):
        crash_point("while_running")
    if any(it.terminal for it in items):
        ctx.wake.collect.set()
        ctx.wake.submit.set()  # a slot under max_active_jobs is free; a cancelled input drops its unstarted parts


async def _next_due(ctx: Context) -> float:
    at = await ctx.store.next_poll_at()
    if at is None:
        return ctx.cfg.poll.max_interval
    return max(0.02, min(ctx.cfg.poll.max_interval, at - time.time()))


async def run_pollers(ctx: Context, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """Poll forever: when the next job is due or when submit signals a new job."""
    task_status.started()
    while True:
        await poll_once(ctx)
        wait = await _next_due(ctx)
        if ctx.backpressure.backlog:
            # Submission first: one pass per max_interval, not one per activation (each
            # activation nudges the pollers); a due job waits at most that long.
            await ctx.backpressure.yield_to_submission(
                ctx.wake.poll, max(wait, ctx.cfg.poll.max_interval)
            )
        else:
            await ctx.wake.poll.wait(wait)
