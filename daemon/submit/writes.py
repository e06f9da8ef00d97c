"""Submit's batched SQL: the intents of a round and the activations of concurrent workers, each
in one transaction with ``executemany`` (one statement per kind of row, not per job)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from daemon.context import Context
from daemon.states import InputState, JobState


async def commit_intents(
    ctx: Context, jobs: list[dict[str, Any]], waiting_reason: dict[str, str]
) -> list[dict[str, Any]]:
    """One transaction: each planned job → ``creating`` (inline) or ``uploading`` (file mode or
    local media), inputs → ``uploading`` where needed, and the waiting reasons. Returns the jobs
    that were still planned and not cancelled (only those may be started)."""
    if not jobs and not waiting_reason:
        return []
    now = time.time()
    async with ctx.store.tx() as conn:
        if waiting_reason:
            await conn.executemany(
                "UPDATE inputs SET reason = ?, updated_at = ? WHERE id = ? AND reason IS NOT ?",
                [(r, now, i, r) for i, r in waiting_reason.items()],
            )
        if not jobs:
            return []
        marks = ", ".join("?" for _ in jobs)
        upload_ids = [j["id"] for j in jobs if needs_upload(j)]
        umarks = ", ".join("?" for _ in upload_ids) or "NULL"
        async with conn.execute(
            f"UPDATE jobs SET state = CASE WHEN id IN ({umarks}) THEN 'uploading' "
            f"ELSE 'creating' END, updated_at = ? WHERE id IN ({marks}) AND state = 'planned' "
            "AND NOT EXISTS (SELECT 1 FROM inputs i WHERE i.id = jobs.input_id "
            "AND i.cancel_requested != 0) RETURNING id, state",
            [*upload_ids, now, *(j["id"] for j in jobs)],
        ) as cur:
            started = {r[0]: r[1] for r in await cur.fetchall()}
        jobs = [j for j in jobs if j["id"] in started]
        for job in jobs:
            job["state"] = started[job["id"]]
            job["key_fp"] = ctx.key_fp
        if ctx.key_fp is not None:
            await ctx.store.mark_key(conn, list(started), ctx.key_fp)
        uploading = {j["input_id"] for j in jobs if j["state"] == JobState.UPLOADING.value}
        if uploading:
            await advance_inputs(conn, uploading, InputState.UPLOADING, now)
    return jobs


def needs_upload(job: dict[str, Any]) -> bool:
    return job["mode"] == "file" or bool(job["media_count"])


_BEFORE = {
    InputState.UPLOADING: ("queued",),
    InputState.SUBMITTED: ("queued", "uploading"),
    InputState.RUNNING: ("queued", "uploading", "submitted"),
}


async def advance_inputs(
    conn: Any,
    input_ids: Iterable[str],
    state: InputState,
    now: float,
    *,
    clear_reason: bool = False,
) -> None:
    """Inside the caller's transaction: move inputs forward to ``state`` (with a history entry)
    unless they are already further along; optionally clear their reason."""
    ids = sorted(set(input_ids))
    before = ", ".join(f"'{s}'" for s in _BEFORE[state])
    await conn.executemany(
        "INSERT INTO history (input_id, at, state, note) "
        f"SELECT id, ?, ?, NULL FROM inputs WHERE id = ? AND state IN ({before})",
        [(now, state.value, i) for i in ids],
    )
    # A waiting reason stays while another part of the input still waits for admission.
    reason = (
        ", reason = CASE WHEN reason LIKE 'waiting:%' AND EXISTS (SELECT 1 FROM jobs "
        "WHERE jobs.input_id = inputs.id AND jobs.state = 'planned') THEN reason ELSE NULL END"
        if clear_reason
        else ""
    )
    await conn.executemany(
        f"UPDATE inputs SET state = CASE WHEN state IN ({before}) THEN ? ELSE state END{reason}, "
        "updated_at = ? WHERE id = ?",
        [(state.value, now, i) for i in ids],
    )


Activation = tuple[int, str, dict[str, Any], float, float]  # job, input, Operation, at, interval


async def write_activations(conn: Any, items: list[Activation]) -> None:
    rows = []
    for job_id, _, op, at, interval in items:
        meta = op.get("metadata") or {}
        rows.append(
            (
                op["name"],
                meta.get("state") or "BATCH_STATE_PENDING",
                meta.get("createTime"),
                at,
                interval,
                at + interval,
                at,
                job_id,
            )
        )
    await conn.executemany(
        "UPDATE jobs SET state = 'active', remote_name = ?, remote_state = ?, "
        "remote_create_time = ?, submitted_at = ?, poll_interval = ?, next_poll_at = ?, "
        "not_before = 0, error = NULL, updated_at = ? WHERE id = ?",
        rows,
    )
    now = max(item[3] for item in items)
    await advance_inputs(
        conn, (item[1] for item in items), InputState.SUBMITTED, now, clear_reason=True
    )


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
