"""A submit that did not work: the API's refusal (the job ends), its back-off (the job waits,
its bookkeeping says whether to look before creating again), or a local disk fault (the job
waits, nothing is failed). And what a job needs before its create."""

from __future__ import annotations

import random
import time

import structlog

from daemon.context import Context
from daemon.gemini import ApiError
from daemon.states import InputState, JobState
from daemon.store.rows import DueJob

log = structlog.get_logger(__name__)


def needs_upload(job: DueJob) -> bool:
    return job["mode"] == "file" or bool(job["media_count"])


async def disk_paused(ctx: Context, job: DueJob, e: OSError) -> None:
    """The job's source could not be read (or resolved) for a local disk fault: back to
    ``planned`` after a backoff, the input's reason saying why (never a failed input)."""
    key = f"input:{job['input_id']}"
    delay = ctx.io_faults.fail(key, "cannot read or prepare what it submits", e)
    reason = f"{ctx.io_faults.active()[key]}; retrying in {delay:g} s"
    async with ctx.store.tx() as conn:
        await ctx.store.update_job(
            conn, job["id"], state=JobState.PLANNED, not_before=time.time() + delay
        )
        row = await ctx.store.get_input(job["input_id"])
        state = InputState.QUEUED if row and row["state"] == "uploading" else None
        if state is not None:
            await ctx.store.set_input_state(conn, job["input_id"], state, reason=reason)
        else:
            await ctx.store.update_input(conn, job["input_id"], reason=reason)
    ctx.wake.submit.set()


def backoff_delay(ctx: Context, retries: int) -> float:
    """Exponential backoff with full jitter, by the number of consecutive failures."""
    cap = min(ctx.cfg.api.backoff_max, ctx.cfg.api.backoff_initial * 2 ** max(0, retries - 1))
    return random.uniform(0, cap)


async def job_failed(ctx: Context, job: DueJob, e: ApiError, *, back_to: JobState) -> None:
    ctx.note_api_error(e)
    last = {"code": e.http_code, "status": e.status, "message": e.message}
    if e.kind == "permanent":
        log.warning("job_refused", job=job["id"], error=str(e))
        async with ctx.store.tx() as conn:
            await ctx.store.update_job(
                conn,
                job["id"],
                state=JobState.DONE,
                remote_state=None,
                error=last,
                finished_at=time.time(),
            )
            # shown at once (the input's final reason follows when all its parts are done)
            await ctx.store.update_input(
                conn, job["input_id"], reason=f"part {job['part_no']} refused: {e.message}"
            )
        ctx.wake.collect.set()
        return
    retries = int(job["submit_retries"] or 0) + 1
    if back_to == JobState.CREATING and e.kind == "transient" and job["mode"] == "inline":
        back_to = JobState.PLANNED  # refused before acting, and nothing was spent yet
    # After an ambiguous create the job may exist remotely: look before creating again.
    check = bool(job["check_remote"]) or (e.kind == "ambiguous" and back_to == JobState.CREATING)
    delay = backoff_delay(ctx, retries)
    what = f"{e.http_code} {e.status}" if e.http_code else e.message
    reason = f"API busy ({what}), retrying in {delay:.0f}s"
    log.warning("api_backoff", job=job["id"], error=str(e), kind=e.kind, retry_in=round(delay, 1))
    async with ctx.store.tx() as conn:
        await ctx.store.update_job(
            conn,
            job["id"],
            state=back_to,
            not_before=time.time() + delay,
            submit_retries=retries,
            check_remote=int(check),
            submit_error=last,
        )
        if await ctx.store.state_in_tx(conn, job["input_id"]) == InputState.UPLOADING.value:
            await ctx.store.set_input_state(conn, job["input_id"], InputState.QUEUED, reason=reason)
        else:
            await ctx.store.update_input(conn, job["input_id"], reason=reason)
    ctx.wake.submit.set()  # the submit loop re-reads when the next backoff ends
