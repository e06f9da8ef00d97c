"""Submission: admission caps, media and input upload, intent-before-create, adoption, backoff.

Per job: ``planned`` → (file mode) ``uploading`` → ``creating`` → ``active``. Each state is committed
before the call it permits. ``batches.create`` is never blindly repeated: after an ambiguous failure
(timeout, dropped connection, 5xx) or a crash, the job stays ``creating`` with ``check_remote`` set,
and the next round looks the display name up in ``batches.list`` first, adopting the remote job if
it exists.

A submit's bookkeeping has its own columns: ``submit_retries``, ``check_remote`` (NULL: unknown,
so look first) and ``submit_error`` (the last API error). ``jobs.error`` is the API's error only:
a permanent refusal ends the job ``done`` with ``error = {"code", "status", "message"}`` and
``remote_state`` NULL; collect fails the input.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import orjson
import structlog
from anyio.abc import TaskGroup

from daemon.context import Context
from daemon.crash import crash_point
from daemon.gemini import ApiError
from daemon.io_faults import is_disk_fault
from daemon.layout import resolved_path
from daemon.states import NOT_VISIBLE, JobState
from daemon.store.group_commit import GroupCommit
from daemon.store.jobs import Activation
from daemon.store.rows import DueJob
from daemon.submit.backoff import disk_paused, job_failed, needs_upload
from daemon.submit.media import resolve_media

log = structlog.get_logger(__name__)

SUBMIT_WORKERS = 8  # jobs submitted concurrently (creates and uploads in flight)
# Uploads at once. Measured at 1 GB (10 parts): 2 at once peaked at 155 MB RSS (1 at once: 134 MB)
# for the same wall time, since parts 2-10 upload while earlier jobs run anyway. Creates of other
# jobs still run beside the one upload.
UPLOAD_CONCURRENCY = 1
QUEUE_PER_WORKER = 2  # a round starts at most this many jobs per worker (bounded intent backlog)
LOOKAHEAD = 256  # extra rows a round reads beyond what it can start (see Submitter.round)
_READ_INLINE_BYTES = 256 * 1024


def _needs_check(job: DueJob) -> bool:
    """Whether a ``creating`` job may already exist remotely. Without bookkeeping (a crash, or a
    row written by another stage) the answer is yes: look before creating."""
    return job["check_remote"] is None or bool(job["check_remote"])


# ---- admission ---------------------------------------------------------------------------
async def _cancel_planned(ctx: Context) -> int:
    """Jobs of cancelled inputs that cannot exist remotely: ``planned`` ones, and ``creating``
    ones whose bookkeeping says no create reached the API (see :func:`_needs_check`; those
    that may have are looked up by :func:`_create` first)."""
    n = await ctx.store.cancel_unstarted()
    if n:
        ctx.wake.collect.set()
    return n


class Submitter:
    """Plans rounds and runs each admitted job in a bounded pool of concurrent workers.

    A round reads the due jobs once, reserves admission capacity for each job it starts (so the
    caps hold however many creates are in flight), commits the intents of all its planned jobs in
    one transaction, then hands the jobs to workers. Jobs still in a worker are skipped by later
    rounds; activations of concurrent workers are committed together.
    """

    def __init__(self, ctx: Context, tg: TaskGroup, *, workers: int = SUBMIT_WORKERS) -> None:
        self.ctx = ctx
        self.tg = tg
        self.workers = workers
        self.limiter = anyio.CapacityLimiter(workers)
        self.uploads = anyio.CapacityLimiter(UPLOAD_CONCURRENCY)
        self.busy: set[int] = set()
        self.activated = 0
        self._more = False  # the last round left due jobs for later (queue bound reached)
        self._bound: int | None = None  # upper bound of the jobs in flight (see _in_flight)
        self._writer: GroupCommit[Activation] = GroupCommit(ctx.store, ctx.store.activate)

    # Long: select, admit under the caps and start, over one read of the due jobs.
    async def round(self) -> int:
        """Start every due job that the caps admit; returns the number of jobs cancelled."""
        ctx = self.ctx
        busy = set(self.busy)  # taken before the query: a job finishing meanwhile stays skipped
        now = time.time()
        room = max(0, QUEUE_PER_WORKER * self.workers - len(busy))
        # A bounded read: a round starts at most `room` jobs, so reading every planned row each
        # round made a backlog of N files cost O(N^2) (10,000 files: 18 files/s). The margin lets
        # a job of another model pass jobs held back by their model's token cap.
        limit = len(busy) + room + LOOKAHEAD
        rows = await ctx.store.due_for_submit(now, limit)
        truncated = len(rows) == limit
        done = 0
        if any(r["cancel_requested"] for r in rows):
            done = await _cancel_planned(ctx)
        # what is left of a cancelled input: `creating` jobs that may exist remotely (looked up)
        rows = [
            r
            for r in rows
            if r["id"] not in busy
            and (not r["cancel_requested"] or (r["state"] == "creating" and _needs_check(r)))
        ]
        self._more = truncated
        ctx.backpressure.set_backlog(False)  # set again below if admitted jobs are still left over
        if not rows:
            return done
        head = rows[:room]
        remote: dict[str, dict[str, Any]] | None = None
        if any(r["state"] == "creating" and _needs_check(r) for r in head):
            remote = await _remote_index(ctx)
        active, tokens = 0, dict[str, int]()
        if any(r["state"] == "planned" for r in head):
            active, tokens = await self._in_flight(room)
        cfg = ctx.cfg.submit
        waiting_reason: dict[str, str] = {}
        creating: list[DueJob] = []
        planned: list[DueJob] = []
        for r in rows:
            if len(creating) + len(planned) >= room:
                self._more = True
                ctx.backpressure.set_backlog(True)
                break
            if r["state"] == JobState.CREATING.value:
                creating.append(r)  # already counted in flight
                continue
            input_id, model, est = r["input_id"], r["model"], r["est_tokens"]
            if active >= cfg.max_active_jobs:
                waiting_reason.setdefault(
                    input_id, f"waiting: {active}/{cfg.max_active_jobs} active jobs"
                )
                continue
            model_tokens = tokens.get(model, 0)
            cap = cfg.max_enqueued_tokens
            if cap and model_tokens and model_tokens + est > cap:
                waiting_reason.setdefault(
                    input_id, f"waiting: {model_tokens}/{cap} tokens enqueued for {model}"
                )
                continue
            active += 1  # reserved: the intent below makes it count in flight for later rounds
            tokens[model] = model_tokens + est
            planned.append(r)
        uploads = [j["id"] for j in planned if needs_upload(j)]
        planned = await ctx.store.commit_intents(planned, uploads, waiting_reason, ctx.key_fp)
        if self._bound is not None:
            self._bound += len(planned)
        for job in creating:
            self._start(job, remote, fresh=False)
        for job in planned:
            self._start(job, {}, fresh=True)
        return done

    async def _in_flight(self, room: int) -> tuple[int, dict[str, int]]:
        """Jobs in flight (and tokens per model), or an upper bound when that cannot bind.

        Only this submitter moves jobs into flight, so the count measured at some point plus
        the jobs started since bounds the count now. While that bound plus this round's room
        stays under ``max_active_jobs`` (and no token cap is set), the count (a scan of every
        in-flight job) is not needed.
        """
        cfg = self.ctx.cfg.submit
        if (
            self._bound is not None
            and not cfg.max_enqueued_tokens
            and self._bound + room <= cfg.max_active_jobs
        ):
            return self._bound, {}
        active, tokens = await self.ctx.store.in_flight_by_model()
        self._bound = active
        return active, tokens

    def _start(self, job: DueJob, remote: dict[str, dict[str, Any]] | None, *, fresh: bool) -> None:
        self.busy.add(job["id"])
        self.tg.start_soon(self._work, job, remote, fresh)

    async def _work(
        self, job: DueJob, remote: dict[str, dict[str, Any]] | None, fresh: bool
    ) -> None:
        try:
            async with self.limiter:
                if fresh:
                    n = await _submit_planned(self.ctx, job, self)
                else:
                    n = await _create(self.ctx, job, remote, self)
                self.activated += n
        finally:
            self.busy.discard(job["id"])
            # With due jobs left over, the next round starts once half the queue has drained
            # (not after every job: each round reads and commits, batching is cheaper).
            if self._more and len(self.busy) <= self.workers * QUEUE_PER_WORKER // 2:
                self.ctx.wake.submit.set()

    async def activated_job(self, job: DueJob, op: dict[str, Any]) -> None:
        """Record the remote job (group-committed with other workers' activations)."""
        self.ctx.io_faults.clear(f"input:{job['input_id']}")
        interval = self.ctx.cfg.poll.min_interval
        await self._writer.put([(job["id"], job["input_id"], op, time.time(), interval)])
        self.ctx.wake.poll.set()


async def submit_once(ctx: Context) -> int:
    """One pass: reconcile/create ``creating`` jobs, admit and submit ``planned`` ones; returns
    the number of jobs activated or cancelled once every started job has finished."""
    done = activated = 0
    more = True
    while more:  # a round starts a bounded number of jobs: run rounds until none is left over
        async with anyio.create_task_group() as tg:
            sub = Submitter(ctx, tg)
            done += await sub.round()
        activated += sub.activated
        more = sub._more
    return done + activated


async def _remote_index(ctx: Context) -> dict[str, dict[str, Any]] | None:
    """display name → Operation of our remote jobs (one list walk); None if the list failed."""
    out: dict[str, dict[str, Any]] = {}
    try:
        async for op in ctx.gemini.list_batches():  # type: ignore[union-attr]
            name = (op.get("metadata") or {}).get("displayName")
            if isinstance(name, str) and name.startswith("gemini-batchd:"):
                out.setdefault(name, op)
    except ApiError as e:
        ctx.note_api_error(e)
        return None
    return out


# ---- one job -------------------------------------------------------------------------------
async def _submit_planned(ctx: Context, job: DueJob, sub: Submitter) -> int:
    """A job whose intent (``uploading`` or ``creating``) this round committed: upload, create."""
    gem = ctx.gemini
    assert gem is not None
    source: Path | None = None
    if job["state"] == JobState.UPLOADING.value:
        try:
            async with sub.uploads:
                source = Path(job["source_path"])
                if job["media_count"]:
                    source = await resolve_media(ctx, job)
                fields: dict[str, Any] = {"state": JobState.CREATING}
                if job["mode"] == "file":
                    up = await gem.upload_file(
                        source, display_name=job["display_name"], span=_span(job, source)
                    )
                    crash_point("after_upload")
                    job["upload_name"] = fields["upload_name"] = up["name"]
            async with ctx.store.tx() as conn:
                await ctx.store.update_job(conn, job["id"], **fields)
        except ApiError as e:
            await job_failed(ctx, job, e, back_to=JobState.PLANNED)
            return 0
        except OSError as e:  # a media file or the input changed or vanished after validation
            if is_disk_fault(e):  # or the disk failed (EIO, full, read-only): wait, retry
                await disk_paused(ctx, job, e)
            else:
                await job_failed(ctx, job, _unreadable(e), back_to=JobState.PLANNED)
            return 0
        job["state"] = JobState.CREATING.value
    # It was `planned` until this round, so nothing can exist remotely yet: an empty index.
    return await _create(ctx, job, {}, sub, source=source)


# Long: intent, lookup by display name, create, and each outcome's commit, in that order.
async def _create(
    ctx: Context,
    job: DueJob,
    remote: dict[str, dict[str, Any]] | None,
    sub: Submitter,
    *,
    source: Path | None = None,
) -> int:
    """Create the remote job for a ``creating`` row, adopting an existing one first if needed."""
    gem = ctx.gemini
    assert gem is not None
    if _needs_check(job):
        if remote is None:
            return 0  # the list failed: try again next round, never create blind
        op = remote.get(job["display_name"])
        if op is not None:
            log.info(
                "job_adopted", job=job["id"], remote=op.get("name"), display=job["display_name"]
            )
            await sub.activated_job(job, op)
            return 1
        if job.get("key_fp") and ctx.key_fp and job["key_fp"] != ctx.key_fp:
            await _hold_create(ctx, job)  # created with another key, maybe: never create blind
            return 0
    if job["cancel_requested"]:  # its input was cancelled and no remote job exists: never create
        async with ctx.store.tx() as conn:
            await ctx.store.update_job(conn, job["id"], state=JobState.CANCELLED)
        ctx.wake.collect.set()
        return 0
    if job["mode"] == "file" and job["upload_name"] is None:
        # never expected (`creating` is committed with the upload's name): upload again first
        async with ctx.store.tx() as conn:
            await ctx.store.update_job(conn, job["id"], state=JobState.PLANNED)
        ctx.wake.submit.set()
        return 0
    try:
        if job["mode"] == "file":
            assert job["upload_name"] is not None
            op = await gem.create_file_job(
                model=job["model"],
                file_name=job["upload_name"],
                display_name=job["display_name"],
                embed=job["kind"] == "embed",
            )
        else:
            path = source or (
                resolved_path(job) if job["media_count"] else Path(job["source_path"])
            )
            try:
                span = _span(job, path)
                size = span[1] - span[0] if span else path.stat().st_size
                if size <= _READ_INLINE_BYTES:
                    lines = _read_lines(path, span)  # small: cheaper than a thread hand-off
                else:
                    lines = await anyio.to_thread.run_sync(_read_lines, path, span)
            except (OSError, ValueError) as e:  # ValueError: a line cut short (orjson)
                if isinstance(e, OSError) and is_disk_fault(e):
                    await disk_paused(ctx, job, e)
                    return 0
                raise _unreadable(e) from None
            op = await gem.create_inline_job(
                model=job["model"], requests=lines, display_name=job["display_name"]
            )
    except ApiError as e:
        await job_failed(ctx, job, e, back_to=JobState.CREATING)
        return 0
    crash_point("after_create")  # created remotely, name not yet stored: recovery must adopt it
    log.info("job_created", job=job["id"], remote=op.get("name"), display=job["display_name"])
    await sub.activated_job(job, op)
    return 1


async def _hold_create(ctx: Context, job: DueJob) -> None:
    """A create that may have happened with another API key (its list shows only its own
    jobs): looked up again at the next start, when the creator's key may be back."""
    reason = (
        f"{NOT_VISIBLE}: the create of {job['display_name']} may have happened with another "
        "key; not resubmitted (restart with that key to adopt it)"
    )
    log.warning("create_not_visible", job=job["id"], display=job["display_name"])
    async with ctx.store.tx() as conn:
        await ctx.store.update_job(conn, job["id"], not_before=time.time() + 10 * 365 * 86400)
        await ctx.store.update_input(conn, job["input_id"], reason=reason)


def _unreadable(e: Exception) -> ApiError:
    """The job's source (or a media file) changed or vanished after validation: nothing to
    retry, the job fails with the reason."""
    return ApiError("permanent", f"cannot read what it submits: {e}", status="UNREADABLE")


def _span(job: DueJob, source: Path) -> tuple[int, int] | None:
    """The byte range of ``source`` the job submits; None for the whole file (a part file, or
    the media-resolved copy of one)."""
    start, end = job["source_start"], job["source_end"]
    if start is None or end is None or str(source) != job["source_path"]:
        return None
    return start, end


def _read_lines(path: Path, span: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """The request lines of a job's source; blank lines (kept in a canonical input's byte
    range, SPEC §2) are skipped."""
    with path.open("rb") as f:
        if span is None:
            return [orjson.loads(line) for line in f if line.strip()]
        f.seek(span[0])
        lines = f.read(span[1] - span[0]).splitlines()
        return [orjson.loads(line) for line in lines if line.strip()]


# ---- loops ---------------------------------------------------------------------------------
async def recover_submissions(ctx: Context) -> None:
    """At start: ``uploading`` → ``planned``; ``creating`` → reconciled against the remote list."""
    await ctx.store.replan_uploading()
    creating = await ctx.store.jobs_in(JobState.CREATING)
    if not creating:
        return
    await ctx.store.check_remote_first([j["id"] for j in creating])
    rows = await ctx.store.creating_jobs()
    remote = await _remote_index(ctx)
    async with anyio.create_task_group() as tg:
        sub = Submitter(ctx, tg)
        for job in rows:
            sub._start(job, remote, fresh=False)


async def _next_due(ctx: Context) -> float:
    idle = ctx.cfg.submit.idle_seconds
    nb = await ctx.store.next_submit_due(time.time())
    return idle if nb is None else max(0.05, min(idle, nb - time.time()))


async def run_submitter(ctx: Context, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """Submit forever: on a nudge from validate/collect/a worker, when a backoff ends, or every
    ``[submit] idle_seconds``. Workers of one round keep running while the next round starts new jobs."""
    async with anyio.create_task_group() as tg:
        sub = Submitter(ctx, tg)
        task_status.started()
        while True:
            await sub.round()
            # With a backlog, finishing workers start the next round: no need to look ahead.
            busy = sub._more and sub.busy
            await ctx.wake.submit.wait(
                ctx.cfg.submit.idle_seconds if busy else await _next_due(ctx)
            )
