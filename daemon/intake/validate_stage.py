"""Intake, second half: the validation stage (SPEC §2, §3 part planning).

Every ``seen`` input is validated and becomes ``rejected`` (error file) or ``queued`` with its parts
and planned jobs (or goes straight to collect when identical content already succeeded). Small files
are validated in batches: one transaction marks the batch ``validating``, one worker-thread hop
validates all of them, one transaction records their parts, jobs and states.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from daemon.config import Config
from daemon.context import Context
from daemon.crash import crash_point
from daemon.intake.claim import reject
from daemon.io_faults import is_disk_fault
from daemon.states import InputState, JobState, display_name
from daemon.store import Move, loads
from daemon.validate.rules import Validation, validate_file
from daemon.windows import sha256_of

log = structlog.get_logger(__name__)

VALIDATE_INTERVAL = 30.0  # safety-net tick of the validator loop
BATCH_FILES = 100  # small files validated per worker-thread hop and transaction
SMALL_BYTES = 256 * 1024  # files up to this size are batched
_NO_PROBLEMS = {"problems": [], "problem_count": 0}


@dataclass
class _Outcome:
    row: dict[str, Any]
    v: Validation | None = None
    error: str | None = None  # the file could not be read
    seconds: float = 0.0  # spent validating it


def _validate_rows(cfg: Config, work_dir: Path, rows: list[dict[str, Any]]) -> list[_Outcome]:
    """Validate each row's file, writing its part files (runs in a worker thread)."""
    out: list[_Outcome] = []
    for row in rows:
        out_dir = work_dir / row["id"]
        for stale in out_dir.glob("part-*-a1.jsonl"):  # from a run cut short by a crash
            stale.unlink()
        started = time.monotonic()
        try:
            v = validate_file(
                Path(row["work_path"]),
                model=row["model"],
                cfg=cfg,
                out_dir=out_dir,
                defer_digest=True,
            )
        except OSError as e:
            if is_disk_fault(e) and e.errno not in (errno.EACCES, errno.EPERM):
                raise  # the machine's fault (EIO, a full state disk): validated again later
            out.append(_Outcome(row, error=f"cannot read the file: {e.strerror or e}"))
        else:
            out.append(_Outcome(row, v, seconds=time.monotonic() - started))
    return out


def _batches(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    batches: list[list[dict[str, Any]]] = []
    small: list[dict[str, Any]] = []
    for row in rows:
        try:
            size = os.stat(row["work_path"]).st_size
        except OSError:
            size = 0  # validation reports it
        if size > SMALL_BYTES:
            batches.append([row])
            continue
        small.append(row)
        if len(small) >= BATCH_FILES:
            batches.append(small)
            small = []
    if small:
        batches.append(small)
    return batches


async def validate_once(ctx: Context) -> int:
    """Validate every ``seen`` input; returns how many were handled."""
    done = 0
    todo: list[dict[str, Any]] = []
    for row in await ctx.store.inputs_in(InputState.SEEN):
        if row["error"] is not None:  # claimed as unusable: only the rejection is left to do
            if not ctx.io_faults.due(f"input:{row['id']}"):
                continue  # its error file could not be written: waits for its backoff
            details = loads(row["error"])
            reason = details.pop("pending_reason", None) or row["reason"] or "rejected"
            await reject(ctx, row, reason, details)
            done += 1
        else:
            todo.append(row)
    for batch in await anyio.to_thread.run_sync(_batches, todo):
        await _validate_batch(ctx, batch)
        done += len(batch)
    return done


async def _validate_batch(ctx: Context, rows: list[dict[str, Any]]) -> None:
    async with ctx.store.tx() as conn:
        await ctx.store.transition(conn, [Move(r["id"], InputState.VALIDATING) for r in rows])
    outcomes = await anyio.to_thread.run_sync(_validate_rows, ctx.cfg, ctx.work_dir, rows)
    good: list[_Outcome] = []
    for o in outcomes:
        if o.error is not None:
            await reject(ctx, o.row, o.error, _NO_PROBLEMS)
        elif o.v is not None and not o.v.ok:
            await _reject_invalid(ctx, o.row, o.v)
        else:
            good.append(o)
    if good:
        await _queue(ctx, good)


async def _reject_invalid(ctx: Context, row: dict[str, Any], v: Validation) -> None:
    first = v.problems[0]
    where = f"line {first.line}: " if first.line else ""
    more = f" (and {v.problem_count - 1} more)" if v.problem_count > 1 else ""
    details = {
        "problems": [{"line": p.line, "reason": p.reason} for p in v.problems],
        "problem_count": v.problem_count,
    }
    await reject(ctx, row, f"invalid input: {where}{first.reason}{more}", details)


async def _reusable(ctx: Context, good: list[_Outcome]) -> dict[str, str]:
    """Input id -> an earlier succeeded input with the same model and bytes whose results are
    still kept (one query for the whole batch)."""
    want = [o for o in good if ctx.cfg.submit.dedupe and not o.row["fresh"]]
    if not want:
        return {}
    await _digest_if_sized_like_a_success(ctx, want)
    shas = sorted({o.v.sha256 for o in want if o.v is not None and o.v.sha256 is not None})
    if not shas:
        return {}
    earlier = await ctx.store.successes_with_digest(shas)
    if not earlier:
        return {}
    found: dict[str, str] = {}
    for o in want:
        assert o.v is not None
        for e in earlier:
            if (
                e["sha256"] == o.v.sha256
                and e["model"] == o.row["model"]
                and e["id"] != o.row["id"]
                and Path(e["results_path"]).is_file()
            ):
                found[o.row["id"]] = str(e["id"])
                break
    return found


async def _digest_if_sized_like_a_success(ctx: Context, want: list[_Outcome]) -> None:
    """A big file's sha256 is deferred (:func:`fill_digests`); dedupe needs it now only when an
    earlier success for the same model has the same size."""
    undigested = [o for o in want if o.v is not None and o.v.sha256 is None]
    if not undigested:
        return
    alike = await ctx.store.success_sizes({o.v.size_bytes for o in undigested if o.v is not None})
    for o in undigested:
        assert o.v is not None
        if (o.row["model"], o.v.size_bytes) in alike:
            o.v.sha256 = await _digest(o.row["id"], o.row["work_path"])


async def _digest(input_id: str, work_path: str) -> str | None:
    """The file's sha256, or None (logged) if it cannot be read: not reusable then, and the
    submit stage reports an unreadable file."""
    try:
        return await anyio.to_thread.run_sync(sha256_of, Path(work_path))
    except OSError as e:
        log.warning("input_digest_failed", input_id=input_id, error=str(e))
        return None


async def fill_digests(ctx: Context, todo: list[tuple[str, str]]) -> None:
    """Work out the sha256 that validation left out for big files (``(input id, work path)``
    pairs). It only serves dedupe, so it is done after the input is queued, while its first
    jobs are being submitted; a crash before it is made good when the validator starts."""
    for input_id, work_path in todo:
        digest = await _digest(input_id, work_path)
        if digest is None:
            continue
        await ctx.store.set_digest(input_id, digest)


# Long on purpose: one transaction's rows for every valid input of a batch (parts, first
# jobs, moves), gathered in one pass so that the commit is one batched statement per table.
async def _queue(ctx: Context, good: list[_Outcome]) -> None:
    """Record parts, planned jobs and the new state of every valid input, in one transaction."""
    cfg = ctx.cfg
    reused = await _reusable(ctx, good)
    now = time.time()
    parts: list[tuple[Any, ...]] = []
    jobs: list[tuple[Any, ...]] = []
    moves: list[Move] = []
    for o in good:
        v, input_id = o.v, o.row["id"]
        assert v is not None
        facts = {
            "size_bytes": v.size_bytes,
            "sha256": v.sha256,
            "request_count": v.request_count,
            "est_tokens": v.est_tokens,
            "media_count": v.media_refs,
            "kind": v.kind,
        }
        earlier = reused.get(input_id)
        if earlier is not None:
            for part in v.parts:
                if part.source_path is not None:
                    part.source_path.unlink(missing_ok=True)
            state, note = InputState.DOWNLOADING, f"same content as {earlier}"
        else:
            state, note = InputState.QUEUED, None
            for p in v.parts:
                parts.append(
                    (
                        *(input_id, p.part_no, p.first_line, p.last_line, p.start_offset),
                        *(p.end_offset, p.request_count, p.size_bytes, p.est_tokens),
                    )
                )
                inline = v.kind == "generate" and p.size_bytes <= cfg.submit.inline_max_bytes
                mode = "inline" if inline else "file"
                span: tuple[int | None, int | None] = (None, None)
                if p.source_path is not None:
                    source = str(p.source_path)
                else:  # canonical lines: submitted straight from the work file
                    source, span = o.row["work_path"], (p.start_offset, p.end_offset)
                name = display_name(input_id, p.part_no, 1)
                jobs.append(
                    (
                        *(input_id, p.part_no, 1, name, mode, source, *span, p.request_count),
                        *(p.est_tokens, JobState.PLANNED.value, now, now),
                    )
                )
        moves.append(Move(input_id, state, note, {"reused_from": earlier, **facts}))
    async with ctx.store.tx() as conn:
        await ctx.store.plan_parts(conn, parts, jobs)
        await ctx.store.transition(conn, moves, now=now)
        for o in good:
            if o.v is not None and o.v.media_ids and o.row["id"] not in reused:
                await ctx.store.add_input_media(conn, o.row["id"], o.v.media_ids)
    for o in good:
        assert o.v is not None
        if o.row["id"] in reused:
            log.info("input_reused", input_id=o.row["id"], reused_from=reused[o.row["id"]])
        else:
            log.info(
                "input_queued",
                input_id=o.row["id"],
                requests=o.v.request_count,
                parts=len(o.v.parts),
                size_bytes=o.v.size_bytes,
                second_core_bytes=o.v.tail_bytes,
                validate_seconds=round(o.seconds, 3),
            )
    if reused:
        ctx.wake.collect.set()
    if len(reused) < len(good):
        ctx.wake.submit.set()
    crash_point("after_queue")
    await fill_digests(
        ctx,
        [
            (o.row["id"], o.row["work_path"])
            for o in good
            if o.v is not None and o.v.sha256 is None and o.row["id"] not in reused
        ],
    )


async def reset_validating(ctx: Context) -> None:
    """Inputs a stopped round left ``validating`` are validated again (before a restart of the
    stage; at start, claim recovery does the same)."""
    rows = await ctx.store.inputs_in(InputState.VALIDATING)
    if rows:
        async with ctx.store.tx() as conn:
            for row in rows:
                await ctx.store.set_input_state(conn, row["id"], InputState.SEEN, note="retried")


async def run_validator(
    ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """The validation stage loop."""
    task_status.started()
    missing = await ctx.store.undigested_inputs()
    # an input whose work file was cleaned up since cannot be read again: left without one
    todo = [
        (r["id"], r["work_path"])
        for r in missing
        if r["work_path"] and os.path.exists(r["work_path"])
    ]
    await fill_digests(ctx, todo)
    while True:
        await validate_once(ctx)
        retry = ctx.io_faults.next_due()
        await ctx.wake.validate.wait(
            VALIDATE_INTERVAL if retry is None else min(retry, VALIDATE_INTERVAL) + 0.01
        )
