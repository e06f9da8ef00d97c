"""A big input's jobs, put in order as each comes back (while the others still run).

Collected results of a job of a big input (more than ``SMALL_INPUT_REQUESTS``) are put in the
order of its part right away: the fast path (:mod:`daemon.results.fast_order`) when its first job
answered each key of the part exactly once, else folded into the input's on-disk merge index
(:mod:`daemon.results.index`). Parts in order are appended to the outbox file in the making
(:mod:`daemon.results.outbox_file`). At settle, :func:`fast_parts` says whether the fast path covers the
whole input. The size check is the caller's (:mod:`daemon.results.collect`).
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

from daemon.context import Context
from daemon.layout import INDEX_FILE, ordered_part_name, outbox_paths
from daemon.results import outbox_file
from daemon.results.fast_order import (
    OrderedParts,
    PartSummary,
    fast_path,
    load_summary,
    order_part,
    prepare_keys,
    ready_part,
)
from daemon.results.index import MergeIndex, Part, Rebuild, ResultsFile, Stopped, remove_index
from daemon.states import JobState
from daemon.threads import run_stoppable

log = structlog.get_logger(__name__)


async def index_job(ctx: Context, row: dict[str, Any], job: dict[str, Any], dest: Path) -> None:
    """Put a job's results (``dest``) in order now: the fast path when the job answered its
    part exactly once, else fold them into the input's merge index."""
    if await _order_part(ctx, row, job, dest) is not None:
        await _prepare_next(ctx, row, job["part_no"])
        return
    parts = await input_parts(ctx, row, await ctx.store.jobs_of(row["id"]))
    await _fold(ctx, row, parts, ResultsFile(dest, job["id"], job["attempt"]), job["part_no"])


async def assemble_ready_parts(ctx: Context, row: dict[str, Any]) -> None:
    """Append the parts put in order so far (consecutive from part 1) to the input's outbox
    file in the making (:mod:`daemon.results.outbox_file`), so that settling has little left to write."""
    input_id = row["id"]
    part_nos = sorted(r["part_no"] for r in await ctx.store.parts_of(input_id))
    ready = await _ready_parts(ctx, row, part_nos)
    if not ready:
        return
    work = ctx.input_dir(input_id)
    results = outbox_paths(ctx.cfg.outbox_dir, row["rel_path"])["results"]
    try:
        await anyio.to_thread.run_sync(outbox_file.extend, results, work, ready)
    except OSError:
        log.exception("assemble_failed", input_id=input_id)  # settling writes it whole


async def _ready_parts(
    ctx: Context, row: dict[str, Any], part_nos: list[int]
) -> list[outbox_file.Ready]:
    """Of ``part_nos`` (in order), those put in order from their first job with nothing to
    retry, up to the first that is not, as the outbox file in the making takes them."""
    first = {j["part_no"]: j for j in await ctx.store.jobs_of(row["id"]) if j["attempt"] == 1}
    work = ctx.input_dir(row["id"])

    def ready() -> list[outbox_file.Ready]:
        out = []
        for n in part_nos:
            j = first.get(n)
            if j is None or j["state"] != JobState.COLLECTED or not j["results_path"]:
                break
            summary = load_summary(work, n, j["id"], Path(j["results_path"]))
            if summary is None or summary.retryable:
                break
            out.append(ready_part(work, summary))
        return out

    return await anyio.to_thread.run_sync(ready)


def _fold_sync(
    path: Path, work: Path, parts: list[Part], rf: ResultsFile | None, part_no: int, stop: Any
) -> None:
    index = MergeIndex(path, stop)
    try:
        index.ensure_keys(work, parts)
        if rf is not None:
            index.add_results(rf)
            index.write_ordered(part_no, path.with_name(ordered_part_name(part_no)))
    finally:
        index.close()


async def _fold(
    ctx: Context, row: dict[str, Any], parts: list[Part], rf: ResultsFile | None, part_no: int
) -> None:
    """Keys (and a job's results) into the input's merge index. Best effort: settling
    rebuilds whatever is missing, so a failure here only costs time later."""
    path = index_path(ctx, row)
    stop = threading.Event()
    fold = functools.partial(_fold_sync, path, Path(row["work_path"]), parts, rf, part_no, stop)
    started = time.monotonic()
    try:
        await run_stoppable(fold, stop)
        log.info(
            "merge_index_updated",
            input_id=row["id"],
            job_id=rf.job_id if rf else None,
            seconds=round(time.monotonic() - started, 2),
        )
    except Rebuild as exc:
        log.info("merge_index_reset", input_id=row["id"], why=str(exc))
        await anyio.to_thread.run_sync(remove_index, path)
    except Exception:
        log.exception("merge_index_failed", input_id=row["id"])
        await anyio.to_thread.run_sync(remove_index, path)


async def _order_part(
    ctx: Context, row: dict[str, Any], job: dict[str, Any], results: Path
) -> PartSummary | None:
    """The fast path for a first attempt's results (None when it does not apply)."""
    source = Path(job["source_path"]) if job["source_path"] else None
    if job["attempt"] != 1 or source is None or not source.exists() or not results.exists():
        return None
    work = ctx.input_dir(row["id"])
    dest = fast_path(work, job["part_no"])
    stop = threading.Event()
    span = None if job.get("source_start") is None else (job["source_start"], job["source_end"])
    before = await _ready_before(ctx, row, job["part_no"])
    straight = None
    if before is not None:  # the parts before are in the outbox file: this one can follow
        out = outbox_paths(ctx.cfg.outbox_dir, row["rel_path"])["results"]
        straight = functools.partial(
            outbox_file.straight_in, out, work, before, job["part_no"], job["id"]
        )
    order = functools.partial(
        order_part, job["part_no"], source, results, job["id"], dest, stop, span, straight
    )
    started = time.monotonic()
    try:
        summary = await run_stoppable(order, stop)
    except Stopped:
        raise
    except Exception:
        log.exception("part_order_failed", job=job["display_name"])
        return None
    log.info(
        "part_ordered",
        job=job["display_name"],
        fast=summary is not None,
        straight_in=summary is not None and summary.in_prefix,
        seconds=round(time.monotonic() - started, 2),
    )
    return summary


async def _prepare_next(ctx: Context, row: dict[str, Any], part_no: int) -> None:
    """Read the keys of the next part ahead while its job still runs (they are then ready when
    its results come back; the last part's ordering is on the way to the outbox file)."""
    nxt = [
        j
        for j in await ctx.store.jobs_of(row["id"])
        if j["part_no"] == part_no + 1 and j["attempt"] == 1 and j["state"] == JobState.ACTIVE
    ]
    if not nxt or not nxt[0]["source_path"]:
        return
    j = nxt[0]
    span = None if j.get("source_start") is None else (j["source_start"], j["source_end"])
    stop = threading.Event()
    try:
        await run_stoppable(
            functools.partial(prepare_keys, Path(j["source_path"]), span, stop), stop
        )
    except OSError:
        log.exception("prepare_keys_failed", job=j["display_name"])  # ordering reads them then


async def _ready_before(
    ctx: Context, row: dict[str, Any], part_no: int
) -> list[outbox_file.Ready] | None:
    """Parts 1 .. ``part_no`` - 1, when all are ready for the outbox file in the making."""
    before = list(range(1, part_no))
    ready = await _ready_parts(ctx, row, before)
    return ready if len(ready) == len(before) else None


async def fast_parts(
    ctx: Context, row: dict[str, Any], jobs: list[dict[str, Any]]
) -> OrderedParts | None:
    """The input's answers from its parts put in order by the fast path, when every part was
    answered exactly once by its first job with nothing to retry; else None (or when the
    input is being cancelled)."""
    if row["cancel_requested"]:
        return None
    part_nos = {r["part_no"] for r in await ctx.store.parts_of(row["id"])}
    by_part = {j["part_no"]: j for j in jobs}
    if (
        not part_nos
        or len(by_part) != len(jobs)
        or set(by_part) != part_nos
        or any(j["attempt"] != 1 or j["state"] != JobState.COLLECTED for j in jobs)
        or any(not j["results_path"] for j in jobs)
    ):
        return None
    work = ctx.input_dir(row["id"])
    summaries = []
    for j in jobs:
        results = Path(j["results_path"])
        summary = await anyio.to_thread.run_sync(load_summary, work, j["part_no"], j["id"], results)
        if summary is None:  # e.g. lost in a crash: put it in order again
            summary = await _order_part(ctx, row, j, results)
        if summary is None or summary.retryable:
            return None
        summaries.append(summary)
    if sum(s.total for s in summaries) != row["request_count"]:
        return None
    return OrderedParts(work, summaries, index_path(ctx, row))


async def input_parts(ctx: Context, row: dict[str, Any], jobs: list[dict[str, Any]]) -> list[Part]:
    # a part submitted straight from the work file (a byte range of it) has no source of its own
    first = {
        j["part_no"]: None if j.get("source_start") is not None else Path(j["source_path"])
        for j in jobs
        if j["attempt"] == 1
    }
    rows = await ctx.store.parts_of(row["id"])
    if rows:
        return [
            Part(
                r["part_no"],
                source=first.get(r["part_no"]),
                start=r["start_offset"],
                end=r["end_offset"],
                first_line=r["first_line"],
            )
            for r in rows
        ]
    return [Part(p, source=first[p]) for p in sorted(first)] or [Part(1)]


def index_path(ctx: Context, row: dict[str, Any]) -> Path:
    return ctx.input_dir(row["id"]) / INDEX_FILE
