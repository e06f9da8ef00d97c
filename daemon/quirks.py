"""What the real Batch API does that the plain path does not expect (issue 13, evidence §1.6, §1.19).

* A job cancelled outside the daemon (AI Studio, another tool) ends ``BATCH_STATE_CANCELLED`` with
  ``error.code`` 13, which also means INTERNAL: the daemon decides on the state, never the code,
  and does not resubmit (``cancel_requested = OUTSIDE_CANCEL``).
* A cancel is best effort: a job the daemon cancelled may still SUCCEED; it was paid, its results
  are kept and the summary names it (:func:`ignored_cancels`).
* SUCCEEDED may come before ``responsesFile``: the job is asked again for ``[poll] results_grace``
  (:func:`wait_for_results_file`); after that its keys are *held*: not resubmitted automatically.
* Inline answers may come without ``metadata``: never joined by position (SPEC §3); counted,
  logged, and the keys held too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import structlog

from daemon.context import Context
from daemon.states import RemoteState

log = structlog.get_logger(__name__)

OWN_CANCEL = 1  # inputs.cancel_requested: the user asked the daemon (control socket)
OUTSIDE_CANCEL = 2  # the API reported a job CANCELLED that the daemon never cancelled
CANCEL_NOTE = "cancel requested"  # the history note of an own cancel (its time is looked up)
OUTSIDE_REASON = "cancelled outside gemini-batchd"
WAITING = "waiting for the results file"
HELD = "held"  # a flag in a job's error: its unanswered keys are not resubmitted automatically
_RETRY_HINT = "not resubmitted automatically (`gemini-batchd retry` pays for them again)"


def is_held(job: dict[str, Any]) -> bool:
    """The job's keys are not to be resubmitted without the user's ``retry``."""
    if not job.get("error"):
        return False
    err = orjson.loads(job["error"])
    return isinstance(err, dict) and bool(err.get(HELD))


def held_reason(jobs: list[dict[str, Any]]) -> str | None:
    """One line naming the held jobs and why, or None."""
    why = [orjson.loads(j["error"])["message"] for j in jobs if is_held(j)]
    return f"{'; '.join(why)}; {_RETRY_HINT}" if why else None


async def hold(ctx: Context, job: dict[str, Any], message: str) -> None:
    """Record why the job's keys are held (before its results are written as collected)."""
    async with ctx.store.tx() as conn:
        await ctx.store.update_job(conn, job["id"], error={"message": message, HELD: True})


def outside_reason(jobs: list[dict[str, Any]], counts: dict[str, int]) -> str:
    names = [j["remote_name"] for j in jobs if j["remote_state"] == RemoteState.CANCELLED]
    return (
        f"{OUTSIDE_REASON}: the API reports {', '.join(names) or 'a job'} BATCH_STATE_CANCELLED; "
        f"{counts['succeeded']} of {counts['total']} requests succeeded"
    )


async def ignored_cancels(
    ctx: Context, row: dict[str, Any], jobs: list[dict[str, Any]]
) -> list[str]:
    """Jobs of an input the user cancelled that SUCCEEDED after the cancel anyway (paid)."""
    if row["cancel_requested"] != OWN_CANCEL:
        return []
    at = await ctx.store.cancel_requested_at(row["id"], CANCEL_NOTE)
    if at is None:
        return []
    return [
        j["remote_name"]
        for j in jobs
        if j["remote_state"] == RemoteState.SUCCEEDED and (j["finished_at"] or 0) >= at
    ]


async def wait_for_results_file(ctx: Context, job: dict[str, Any]) -> bool:
    """A SUCCEEDED file job without ``responsesFile``: ask again later (True) while within
    ``[poll] results_grace`` of its end, the input's reason saying so; False once it is over."""
    now = time.time()
    ended = job["finished_at"] or now
    waited, grace = now - ended, ctx.cfg.poll.results_grace
    if waited >= grace:
        return False
    delay = min(grace - waited, ctx.cfg.poll.max_interval, max(ctx.cfg.poll.min_interval, waited))
    reason = (
        f"{WAITING}: job {job['remote_name']} SUCCEEDED {waited:.0f} s ago without one "
        f"(asked again for up to {grace:.0f} s)"
    )
    async with ctx.store.tx() as conn:  # finished_at kept: the grace counts from there
        await ctx.store.update_job(conn, job["id"], not_before=now + delay, finished_at=ended)
        await ctx.store.update_input(conn, job["input_id"], reason=reason)
    log.info("results_file_not_yet", job=job["display_name"], waited=round(waited, 1))
    return True


async def results_file_missing(ctx: Context, job: dict[str, Any]) -> None:
    """The grace is over: the job's keys count as unanswered, held (not paid twice unasked)."""
    grace = ctx.cfg.poll.results_grace
    log.error("results_file_missing", job=job["display_name"], remote=job["remote_name"])
    await hold(
        ctx,
        job,
        f"job {job['remote_name']} SUCCEEDED but no results file came within {grace:.0f} s",
    )


async def done_waiting(ctx: Context, input_id: str) -> None:
    async with ctx.store.tx() as conn:
        await ctx.store.clear_reason(conn, input_id, WAITING)


async def unkeyed_answers(
    ctx: Context, job: dict[str, Any], lines: list[bytes], dest: Path
) -> None:
    """Inline answers without ``metadata.key`` are never joined by position: counted, logged,
    and the job's keys held (the answers stay in ``dest``)."""
    n = sum(1 for line in lines if line.startswith(b'{"key":null'))
    if not n:
        return
    log.warning("inline_answers_without_key", job=job["display_name"], answers=n, kept=str(dest))
    await hold(
        ctx,
        job,
        f"job {job['remote_name']}: {n} answers without metadata.key (the API did not echo it; "
        f"answers are never joined by position), kept in {dest}",
    )
