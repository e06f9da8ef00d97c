"""What a job needs before its create, and what a local disk fault does to it."""

from __future__ import annotations

import time
from typing import Any

from daemon.context import Context
from daemon.states import InputState, JobState


def needs_upload(job: dict[str, Any]) -> bool:
    return job["mode"] == "file" or bool(job["media_count"])


async def disk_paused(ctx: Context, job: dict[str, Any], e: OSError) -> None:
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
