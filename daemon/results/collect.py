"""The collect stage: results of finished jobs → per-key reconciliation → retries or the outbox.

1. A ``done`` job's results (downloaded result file, or the inline responses of the raw operation)
   become ``state/work/<input>/job-<id>.results.jsonl`` (``{"key", "response"|"error"}`` lines),
   then the job is ``collected``. For a big input the job's answers are put in order of its part
   right away and appended to the outbox file in the making (:mod:`daemon.results.order`), so this
   work overlaps with the jobs still running.
2. When every job of an input is ``collected`` or ``cancelled``, the input *settles*: the index
   (completed, or built in memory for a small input) gives each key's best answer; keys with a
   retryable error or no answer are resubmitted as new ``planned`` jobs while the retry budget
   lasts; otherwise the outbox is written (:mod:`daemon.results.finish`) and the input gets its final
   state.

Longer than ~400 lines: the tests run every scenario with ``SMALL_INPUT_REQUESTS`` patched on
this module, so settling stays here until that is a parameter of ``collect_once``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import structlog

from daemon import quirks
from daemon.context import Context
from daemon.crash import crash_point
from daemon.io_faults import input_paused, is_disk_fault
from daemon.layout import job_results_name, part_file_name
from daemon.outbox import atomic_writer, fsync_dir
from daemon.results import order
from daemon.results.finish import finish_index, reuse_input
from daemon.results.index import (
    RETRYABLE_GRPC,
    RETRYABLE_HTTP,
    MergeIndex,
    Part,
    results_files,
)
from daemon.states import InputState, JobState, RemoteState, display_name
from daemon.store import Move
from daemon.store.group_commit import GroupCommit
from daemon.threads import run_stoppable

__all__ = [
    "RETRYABLE_GRPC",
    "RETRYABLE_HTTP",
    "collect_once",
    "finish_input",
    "plan_retries",
    "run_collector",
]

log = structlog.get_logger(__name__)
_EMPTY_STATES = {RemoteState.FAILED.value, RemoteState.EXPIRED.value}
# Inputs up to this many requests are merged in memory at settle time (no index file, nothing
# done per job); bigger ones are indexed job by job as each is collected.
SMALL_INPUT_REQUESTS = 10_000
COLLECT_CONCURRENCY = 2  # one job's download overlaps with an earlier one's ordering
SMALL_COLLECT_CONCURRENCY = 8  # small inline jobs / small inputs handled at once (latency-bound)


def small_input(row: dict[str, Any]) -> bool:
    return (row["request_count"] or 0) <= SMALL_INPUT_REQUESTS


# ---- the loop -----------------------------------------------------------------------------------
async def run_collector(ctx: Context, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """Collect forever: on a nudge from the pollers, or every few seconds as a safety net."""
    task_status.started()
    while True:
        started = time.monotonic()
        try:
            await collect_once(ctx)
        except Exception:
            log.exception("collect_round_failed")
        pause = max(ctx.cfg.poll.min_interval, 1.0)
        if ctx.backpressure.backlog:
            # Submission first: at most a quarter of the time for collecting while admitted
            # jobs wait for a worker (never nothing: the backlog may last).
            busy = time.monotonic() - started
            await ctx.backpressure.yield_to_submission(ctx.wake.collect, max(pause, 3 * busy))
        else:
            await ctx.wake.collect.wait(pause)


async def collect_once(ctx: Context) -> int:
    """One pass: collect every due ``done`` job (and those that become due meanwhile), then
    settle every input whose jobs all ended. Returns how many jobs and inputs were handled."""
    n = 0
    due = DueJobs(ctx)
    first = await due.fill()
    big = anyio.CapacityLimiter(COLLECT_CONCURRENCY)
    small = anyio.CapacityLimiter(_small_concurrency(ctx))
    writer: GroupCommit[_Collected] = GroupCommit(ctx.store, ctx.store.mark_collected)

    async def worker() -> None:
        nonlocal n
        while (job := await due.next()) is not None:  # shared: each worker takes the next job
            key = f"input:{job['input_id']}"
            try:
                if not ctx.io_faults.due(key):
                    continue  # waits for its backoff
                async with small if _is_small(job) else big:
                    n += await _collect_job(ctx, job, writer)
            except Exception as e:
                if not is_disk_fault(e):
                    log.exception("collect_failed", job=job["display_name"])
                else:
                    await input_paused(ctx, job["input_id"], "cannot store the results", e)
            finally:
                due.done(job)

    # A few at once: one job's download overlaps with an earlier one's indexing. A fixed pool
    # of tasks, not one per job: thousands of jobs may be due after a submission backlog.
    if first:
        async with anyio.create_task_group() as tg:
            for _ in range(min(max(first, COLLECT_CONCURRENCY), SMALL_COLLECT_CONCURRENCY)):
                tg.start_soon(worker)
    return n + await _settle_all(ctx, await ctx.store.settled_inputs())


class DueJobs:
    """The ``done`` jobs a collect round works through, oldest first. While a worker is still at
    a job of a big input, the others look for jobs of big inputs that became due meanwhile (when
    a poller saw one end and nudged the collector) and take them in the same round, so that one job's download overlaps
    with another's ordering instead of waiting for the next round. Small jobs wait for the next
    round (which settles what this one collected first); a round stops taking more after
    ``ROUND_SECONDS``, and nothing is added while submission has a backlog (the round then ends
    and yields to it)."""

    LOOK_EVERY = 1.0  # at most this long between looks for due jobs (pollers nudge sooner)
    ROUND_SECONDS = 30.0

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.queue: list[dict[str, Any]] = []
        self.taken: set[int] = set()
        self.big_busy = 0  # workers at a job of a big input
        self.lock = anyio.Lock()
        self.changed = anyio.Event()
        self.until = time.monotonic() + self.ROUND_SECONDS

    async def fill(self, *, big_only: bool = False) -> int:
        """Queue the jobs due now that this round has not taken; returns how many."""
        rows = await self.ctx.store.due_for_collect(
            time.time(), SMALL_INPUT_REQUESTS if big_only else None
        )
        fresh = [r for r in rows if r["id"] not in self.taken]
        self.taken.update(r["id"] for r in fresh)
        self.queue.extend(reversed(fresh))  # popped from the end: oldest first
        return len(fresh)

    async def next(self) -> dict[str, Any] | None:
        """The next job to collect (the caller calls :meth:`done` with it after), or None when
        the round is over."""
        while True:
            if self.queue:
                job = self.queue.pop()
                self.big_busy += not _is_small(job)
                return job
            if self.ctx.backpressure.backlog or not self.big_busy or time.monotonic() > self.until:
                return None
            await self._wait()
            async with self.lock:
                if not self.queue:
                    await self.fill(big_only=True)

    async def _wait(self) -> None:
        """Until a worker finishes (the round may be over) or a poller nudges the collector (a
        job ended), at most ``LOOK_EVERY`` seconds."""
        changed, nudge = self.changed, self.ctx.wake.collect

        async def first(wait: Any) -> None:
            await wait()
            tg.cancel_scope.cancel()

        with anyio.move_on_after(self.LOOK_EVERY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first, changed.wait)
                tg.start_soon(first, functools.partial(nudge.wait, self.LOOK_EVERY))

    def done(self, job: dict[str, Any]) -> None:
        self.big_busy -= not _is_small(job)
        self.changed.set()
        self.changed = anyio.Event()


def _small_concurrency(ctx: Context) -> int:
    """One at a time while submission has a backlog (it goes first), else several."""
    return 1 if ctx.backpressure.backlog else SMALL_COLLECT_CONCURRENCY


def _is_small(job: dict[str, Any]) -> bool:
    """An inline job of a small input: its results are small and it has no merge index (see
    :func:`_index_job`), so several are collected at once."""
    return job["mode"] != "file" and (job["input_requests"] or 0) <= SMALL_INPUT_REQUESTS


async def _settle_all(ctx: Context, rows: list[dict[str, Any]]) -> int:
    """Settle inputs: marked ``downloading`` together, small ones several at once. Inputs
    dropped under the same name settle one after the other, oldest first (the outbox names,
    temporary ones included, are shared; the newest drop must be written last)."""
    fresh = [r for r in rows if r["state"] != InputState.DOWNLOADING]
    if fresh:
        async with ctx.store.tx() as conn:
            await ctx.store.transition(conn, [Move(r["id"], InputState.DOWNLOADING) for r in fresh])
        for r in fresh:
            r["state"] = InputState.DOWNLOADING.value
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in rows:  # already in age order
        by_name.setdefault(r["rel_path"], []).append(r)
    small = anyio.CapacityLimiter(_small_concurrency(ctx))
    big = anyio.CapacityLimiter(1)
    n = 0

    groups = iter(by_name.values())

    async def worker() -> None:
        nonlocal n
        for group in groups:  # shared: each worker takes the next name
            for row in group:
                if not ctx.io_faults.due(f"input:{row['id']}"):
                    break  # waits for its backoff (and so do later drops of the same name)
                async with small if small_input(row) else big:
                    try:
                        await _settle(ctx, row)
                        n += 1
                    except Exception as e:
                        if not is_disk_fault(e):
                            log.exception("settle_failed", input_id=row["id"])
                        else:
                            await input_paused(ctx, row["id"], "cannot write the results", e)
                            break
                    else:
                        ctx.io_faults.clear(f"input:{row['id']}")

    async with anyio.create_task_group() as tg:
        for _ in range(min(len(by_name), SMALL_COLLECT_CONCURRENCY)):
            tg.start_soon(worker)
    return n


# ---- step 1: one job's results ------------------------------------------------------------------
_Collected = tuple[str, str | None, float, float, int]  # results path, file, finished, now, job


async def _collect_job(ctx: Context, job: dict[str, Any], writer: GroupCommit[_Collected]) -> bool:
    """Results of one ``done`` job into its results file, then ``collected``. A transient API
    error leaves the job ``done`` (with a backoff) for a later round."""
    dest = ctx.input_dir(job["input_id"]) / job_results_name(job["id"])
    result_file = job["result_file"]
    started = time.monotonic()
    try:
        if not job["remote_name"] or job["remote_state"] in _EMPTY_STATES:
            await anyio.to_thread.run_sync(_write_lines, dest, [])
        elif job["mode"] == "file" and not result_file:
            ready, result_file = await _file_job_without_file(ctx, job, dest)
            if not ready:
                return False  # asked again later
        elif job["mode"] == "file":
            await _download(ctx, result_file, dest)
        else:
            op = await _gemini(ctx).get_batch(job["remote_name"])
            await _write_inline(ctx, job, op, dest)
    except Exception as exc:
        if getattr(exc, "kind", None) != "permanent":
            delay = ctx.cfg.api.backoff_initial
            log.warning("collect_failed_will_retry", job=job["display_name"], error=str(exc))
            ctx.last_api_error = {"at": time.time(), "message": str(exc)}
            async with ctx.store.tx() as conn:
                await ctx.store.update_job(conn, job["id"], not_before=time.time() + delay)
            return False
        # The results are gone for good: the keys count as unanswered (and may be retried).
        log.error("results_lost", job=job["display_name"], error=str(exc))
        await anyio.to_thread.run_sync(_write_lines, dest, [])
    crash_point("after_download")
    downloaded = time.monotonic()
    if not _is_small(job):
        await _index_job(ctx, job, dest)
    now = time.time()
    item = (str(dest), result_file, job["finished_at"] or now, now, job["id"])
    # Committed with the other jobs collected meanwhile (shielded: the file is written).
    await writer.put([item])
    log.info(
        "job_collected",
        job=job["display_name"],
        input_id=job["input_id"],
        download_seconds=round(downloaded - started, 3),
        order_seconds=round(time.monotonic() - downloaded, 3),
    )
    if not _is_small(job):
        await _assemble_ready_parts(ctx, job["input_id"])
    return True


async def _index_job(ctx: Context, job: dict[str, Any], dest: Path) -> None:
    """A big input's job results are put in order while its other jobs still run
    (:mod:`daemon.results.order`); a small input's wait for settle."""
    row = await ctx.store.get_input(job["input_id"])
    if row is not None and not small_input(row):
        await order.index_job(ctx, row, job, dest)


async def _assemble_ready_parts(ctx: Context, input_id: str) -> None:
    row = await ctx.store.get_input(input_id)
    if row is not None and not small_input(row):
        await order.assemble_ready_parts(ctx, row)


def _gemini(ctx: Context) -> Any:
    if ctx.gemini is None:
        raise RuntimeError("no API client")
    return ctx.gemini


def _output(op: dict[str, Any]) -> dict[str, Any]:
    out = (op.get("metadata") or {}).get("output") or op.get("response") or {}
    return out if isinstance(out, dict) else {}


def _inline_lines(op: dict[str, Any]) -> list[bytes]:
    """Normalised lines from an operation's inline responses, joined on ``metadata.key``."""
    out = _output(op)
    box = out.get("inlinedResponses") or out.get("inlinedEmbedContentResponses") or {}
    lines = []
    for item in box.get("inlinedResponses") or []:
        meta = item.get("metadata") if isinstance(item, dict) else None
        key = meta.get("key") if isinstance(meta, dict) else None
        if "response" in item:
            lines.append(orjson.dumps({"key": key, "response": item["response"]}))
        else:
            lines.append(orjson.dumps({"key": key, "error": item.get("error") or {}}))
    return lines


async def _file_job_without_file(
    ctx: Context, job: dict[str, Any], dest: Path
) -> tuple[bool, str | None]:
    """A finished file job the pollers saw without ``responsesFile``: asks again. Returns
    whether its results are written, and the results file if one was downloaded. Not written:
    SUCCEEDED without a file yet, within ``[poll] results_grace`` (asked again later)."""
    op = await _gemini(ctx).get_batch(job["remote_name"])
    out = _output(op)
    result_file: str | None = out.get("responsesFile")
    if result_file:
        await _download(ctx, result_file, dest)
    elif out.get("inlinedResponses"):  # a file job answered inline (bifrost #3951)
        await _write_inline(ctx, job, op, dest)
    elif job["remote_state"] == RemoteState.SUCCEEDED:
        if await quirks.wait_for_results_file(ctx, job):
            return False, None
        await quirks.results_file_missing(ctx, job)
        await anyio.to_thread.run_sync(_write_lines, dest, [])
    else:
        await anyio.to_thread.run_sync(_write_lines, dest, [])
    await quirks.done_waiting(ctx, job["input_id"])
    return True, result_file


async def _write_inline(ctx: Context, job: dict[str, Any], op: dict[str, Any], dest: Path) -> None:
    lines = _inline_lines(op)
    await quirks.unkeyed_answers(ctx, job, lines, dest)
    await anyio.to_thread.run_sync(_write_lines, dest, lines)


def _write_lines(dest: Path, lines: list[bytes]) -> None:
    with atomic_writer(dest) as f:
        for line in lines:
            f.write(line + b"\n")


async def _download(ctx: Context, file_name: str, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.download")
    await _gemini(ctx).download_file(file_name, tmp)

    def seal() -> None:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)

    await anyio.to_thread.run_sync(seal)


# ---- step 2-4: settle an input ------------------------------------------------------------------
async def _settle(ctx: Context, row: dict[str, Any]) -> None:
    jobs = await ctx.store.jobs_of(row["id"])
    if row["reused_from"] and not jobs:
        if not await reuse_input(ctx, row):
            await plan_retries(ctx, row["id"], force=True)  # earlier results vanished: redo
        return
    fast = None if small_input(row) else await order.fast_parts(ctx, row, jobs)
    if fast is not None:
        await finish_index(ctx, row, jobs, fast)
        return
    index = await _build_index(ctx, row, jobs)
    try:
        if not row["cancel_requested"] and await _plan(ctx, row, jobs, index, force=False):
            return
        await finish_index(ctx, row, jobs, index)
    finally:
        index.close()


@asynccontextmanager
async def _input_index(
    ctx: Context, input_id: str
) -> AsyncIterator[tuple[dict[str, Any], list[dict[str, Any]], MergeIndex]]:
    """The input's row, its jobs and its answer index (closed on exit)."""
    row = await ctx.store.get_input(input_id)
    if row is None:
        raise KeyError(input_id)
    jobs = await ctx.store.jobs_of(input_id)
    index = await _build_index(ctx, row, jobs)
    try:
        yield row, jobs, index
    finally:
        index.close()


async def finish_input(ctx: Context, input_id: str) -> None:
    """Merge what the input's collected jobs answered, write the outbox and the final state
    (also the end of a cancel: the state is then ``cancelled``)."""
    async with _input_index(ctx, input_id) as (row, jobs, index):
        await finish_index(ctx, row, jobs, index)


async def plan_retries(ctx: Context, input_id: str, *, force: bool = False) -> int:
    """Plan follow-up jobs for the input's unanswered and retryable requests; returns how many
    requests were planned. ``force`` (the ``retry`` command): every request without a success,
    ignoring the budget. The input goes back to ``queued`` when anything was planned."""
    async with _input_index(ctx, input_id) as (row, jobs, index):
        return await _plan(ctx, row, jobs, index, force=force)


async def _build_index(ctx: Context, row: dict[str, Any], jobs: list[dict[str, Any]]) -> MergeIndex:
    parts = await order.input_parts(ctx, row, jobs)
    files = results_files(j for j in jobs if j["state"] == JobState.COLLECTED)
    path = order.index_path(ctx, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    small = small_input(row)
    if small and not path.exists():
        path = Path(":memory:")
    stop = threading.Event()
    build = functools.partial(MergeIndex.build, path, Path(row["work_path"]), parts, files, stop)
    return await run_stoppable(build, stop)


# Long: the retry plan of one input (which keys, which parts, which attempt) and its commit.
async def _plan(
    ctx: Context,
    row: dict[str, Any],
    jobs: list[dict[str, Any]],
    index: MergeIndex,
    *,
    force: bool,
) -> int:
    budget = 1 + ctx.cfg.submit.retry_failed_requests
    part_rows = {r["part_no"]: r for r in await ctx.store.parts_of(row["id"])}
    input_path = Path(row["work_path"])
    planned: list[dict[str, Any]] = []
    for part in await order.input_parts(ctx, row, jobs):
        mine = [j for j in jobs if j["part_no"] == part.part_no]
        last = max(mine, key=lambda j: j["attempt"], default=None)
        attempts = last["attempt"] if last else 0
        if not force and last is not None:
            if attempts >= budget:
                continue
            if last["error"] and not last["remote_name"]:
                continue  # refused at create (e.g. unknown model): retrying cannot help
            if quirks.is_held(last):
                continue  # answered (paid) but the answers cannot be used: only `retry` pays again
        count = await anyio.to_thread.run_sync(
            functools.partial(index.retry_keys, part.part_no, force=force)
        )
        if not count:
            continue
        attempt = attempts + 1
        dest = ctx.input_dir(row["id"]) / part_file_name(part.part_no, attempt)

        def write(dest: Path = dest, part: Part = part) -> int:
            with atomic_writer(dest) as f:
                return index.write_retry_part(input_path, part, f)

        count = await anyio.to_thread.run_sync(write)
        size = dest.stat().st_size
        ref = part_rows.get(part.part_no) or last or {"est_tokens": 0, "request_count": 1}
        est = -(-ref["est_tokens"] * count // max(ref["request_count"], 1))
        mode = (
            "inline"
            if row["kind"] == "generate" and size <= ctx.cfg.submit.inline_max_bytes
            else "file"
        )
        planned.append(
            {
                "input_id": row["id"],
                "part_no": part.part_no,
                "attempt": attempt,
                "display_name": display_name(row["id"], part.part_no, attempt),
                "mode": mode,
                "source_path": str(dest),
                "request_count": count,
                "est_tokens": est,
            }
        )
    total = sum(p["request_count"] for p in planned)
    if not planned:
        return 0
    async with ctx.store.tx() as conn:
        for fields in planned:
            await ctx.store.add_job(conn, **fields)
        await ctx.store.set_input_state(
            conn,
            row["id"],
            InputState.QUEUED,
            note=f"resubmitting {total} requests" + (" (retry)" if force else ""),
            reason=None,
            finished_at=None,
            cancel_requested=0,
        )
    log.info("retries_planned", input_id=row["id"], requests=total, jobs=len(planned))
    ctx.wake.submit.set()
    return total
