"""User actions on one input: cancel, retry, fresh rerun (used by the control socket).

Each action commits its intent to the store first, then nudges the stage that carries it out:
cancel marks the input and its unstarted jobs, asks the API to cancel the running ones and wakes
poll/collect (the collector finishes the input as ``cancelled``, keeping finished parts' results);
retry plans follow-up jobs for unanswered requests and wakes submit; a fresh rerun creates a new
input from the same work file and wakes validation.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from daemon import quirks
from daemon.context import Context
from daemon.layout import INPUT_FILE
from daemon.outbox import copy_in, fsync_dir
from daemon.states import (
    ACTIVE_JOB_STATES,
    RETRYABLE_INPUT_STATES,
    InputState,
)
from daemon.store import Row, new_input_id

log = structlog.get_logger(__name__)


class ActionError(Exception):
    """An action that cannot be done; ``code`` is the HTTP status the socket answers with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _require(ctx: Context, input_id: str) -> Row:
    row = await ctx.store.get_input(input_id)
    if row is None:
        raise ActionError(404, f"no input {input_id!r}")
    return row


async def cancel_input(ctx: Context, input_id: str) -> Row:
    """Cancel an unfinished input: unstarted jobs are dropped, running remote jobs cancelled.

    Raises :class:`ActionError` 404 (unknown) or 409 (already final). Cancelling twice is fine.
    """
    await _require(ctx, input_id)
    async with ctx.store.tx() as conn:
        state = await ctx.store.state_in_tx(conn, input_id)
        if state is None:
            raise ActionError(404, f"no input {input_id!r}")
        if InputState(state).final:
            raise ActionError(409, f"input {input_id} is already {state}")
        await ctx.store.update_input(
            conn, input_id, cancel_requested=quirks.OWN_CANCEL, reason=quirks.CANCEL_NOTE
        )
        await ctx.store.cancel_planned_of(conn, input_id)
        await ctx.store.add_history(conn, input_id, state, quirks.CANCEL_NOTE)

    # Best effort: a failed cancel call leaves the job running; the poller still sees it end and
    # the collector honours cancel_requested. Jobs without a remote name yet (uploading, or
    # creating before the API answered) are stopped by submit, which checks cancel_requested.
    running = [
        j
        for j in await ctx.store.jobs_of(input_id)
        if j["state"] in ACTIVE_JOB_STATES and j["remote_name"]
    ]
    for job in running:
        if ctx.gemini is None:
            break
        try:
            await ctx.gemini.cancel_batch(job["remote_name"])
        except Exception as e:  # ApiError, timeouts: logged, never fatal to the socket
            log.warning(
                "cancel_failed", input_id=input_id, job=job["remote_name"], error=str(e)[:300]
            )
        else:
            log.info("cancel_sent", input_id=input_id, job=job["remote_name"])
    if running:
        # Poll the cancelled jobs now rather than at their next scheduled time.
        await ctx.store.poll_soon(input_id)
    ctx.wake.poll.set()
    ctx.wake.collect.set()
    ctx.wake.submit.set()
    return await _require(ctx, input_id)


async def retry_input(ctx: Context, input_id: str, *, fresh: bool = False) -> Row:
    """Resubmit the unanswered requests of a failed/expired/partial/cancelled input, or of an
    unfinished one whose jobs are held as not visible with the current API key.

    With ``fresh`` any final input is run again as a new input (new id, new paid work, no reuse);
    the new input is returned. Raises :class:`ActionError` 404 or 409.
    """
    row = await _require(ctx, input_id)
    state = InputState(row["state"])
    if not state.final and not fresh:
        # Jobs held after a 404 (another API key): resubmitted now, deliberately.
        if released := await ctx.store.release_held(input_id):
            log.info("held_jobs_released", input_id=input_id, jobs=released)
            ctx.wake.collect.set()
            return await _require(ctx, input_id)
    if not state.final:
        raise ActionError(409, f"input {input_id} is {state.value}, not finished")
    if fresh:
        return await _fresh_rerun(ctx, row)
    if state not in RETRYABLE_INPUT_STATES:
        hint = " (use fresh to run it again)" if state is InputState.SUCCEEDED else ""
        raise ActionError(409, f"input {input_id} is {state.value}: nothing to retry{hint}")

    from daemon.results.collect import plan_retries  # the collector's planner; imported lazily

    # plan_retries inserts the follow-up jobs and moves the input to queued (clearing
    # cancel_requested and finished_at) in one transaction: a crash leaves either nothing or both.
    async with ctx.retry_lock:
        current = await _require(ctx, input_id)
        if current["state"] != state.value:
            raise ActionError(409, f"input {input_id} changed to {current['state']} meanwhile")
        planned = await plan_retries(ctx, input_id, force=True)
    if not planned:
        raise ActionError(409, f"input {input_id}: every request already has a successful answer")
    log.info("retry_planned", input_id=input_id, requests=planned)
    ctx.wake.submit.set()
    return await _require(ctx, input_id)


async def _fresh_rerun(ctx: Context, old: Row) -> Row:
    source = Path(old["work_path"])
    if not source.is_file():
        raise ActionError(409, f"input {old['id']}: its file is no longer kept ({source})")
    new_id = new_input_id()
    work = ctx.input_dir(new_id) / INPUT_FILE
    work.parent.mkdir(parents=True, exist_ok=True)
    # File first (durably), row second: a crash in between leaves an orphan folder, never a
    # row pointing at nothing.
    try:
        os.link(source, work)
    except OSError:
        copy_in(source, work)  # fsynced
    fsync_dir(work.parent)
    async with ctx.store.tx() as conn:
        await ctx.store.add_input(
            conn,
            id=new_id,
            rel_path=old["rel_path"],
            model=old["model"],
            kind=old["kind"],
            work_path=str(work),
            fresh=1,
            note=f"fresh rerun of {old['id']}",
        )
    log.info("fresh_rerun", input_id=new_id, of=old["id"], path=old["rel_path"])
    ctx.wake.validate.set()
    return await _require(ctx, new_id)
