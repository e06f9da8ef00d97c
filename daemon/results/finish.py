"""The end of an input: merged results, media, summary (or error file) in the outbox, final state.

Order (SPEC §4): the results file, then media, then the summary or error file last; only after
that rename is the final state committed. A crash before the commit reruns the merge, which
rewrites the same files atomically. Afterwards the remote files are deleted (best effort).

Longer than ~400 lines: every document of a finished input (results, media, summary, error
file) and its final state, written in that order.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson
import structlog

from daemon import fsio, quirks
from daemon.clock import iso
from daemon.context import Context
from daemon.crash import crash_point
from daemon.layout import SCRATCH_GLOBS, outbox_paths
from daemon.outbox import (
    append_file,
    atomic_writer,
    copy_atomic,
    link_or_copy,
    remove_quietly,
    write_json,
)
from daemon.results import outbox_file
from daemon.results.create_errors import refused_jobs, rejection
from daemon.results.fast_order import OrderedParts, fast_path, ready_part
from daemon.results.index import MergeIndex, iter_lines, remove_index
from daemon.results.media import extract_media
from daemon.states import InputState, RemoteState
from daemon.threads import run_stoppable

log = structlog.get_logger(__name__)
TOKEN_NAMES = {
    "promptTokenCount": "prompt",
    "candidatesTokenCount": "candidates",
    "thoughtsTokenCount": "thoughts",
    "cachedContentTokenCount": "cached",
    "totalTokenCount": "total",
}
_ERROR_STATES = {InputState.FAILED, InputState.EXPIRED, InputState.CANCELLED, InputState.REJECTED}
_T = TypeVar("_T")


def estimate_cost(ctx: Context, model: str, tokens: dict[str, int]) -> float | None:
    """Batch cost in USD (50% of the list prices in ``[prices]``), or None without a price."""
    price = ctx.cfg.prices.get(model) or ctx.cfg.prices.get(model.removeprefix("models/"))
    if price is None:
        return None
    out = tokens["candidates"] + tokens["thoughts"]
    cost = (tokens["prompt"] * price.input_per_mtok + out * price.output_per_mtok) / 1e6 * 0.5
    return round(cost, 6)


def _unanswered(state: InputState, attempts: int, job: dict[str, Any] | None) -> bytes:
    """The error value written for a key that has no answer at all."""
    if state == InputState.CANCELLED:
        err: dict[str, Any] = {"code": 1, "message": "cancelled before the API answered"}
        err["status"] = "CANCELLED"
    elif job is not None and job["error"] and not job["remote_name"]:
        err = orjson.loads(job["error"])  # the API refused the job: its own error
    else:
        why = " (batch job expired)" if job and job["remote_state"] == RemoteState.EXPIRED else ""
        err = {
            "code": 4,
            "message": f"no answer from the API after {attempts} attempt(s){why}",
            "status": "DEADLINE_EXCEEDED",
        }
    return orjson.dumps(err)


def _write_results(
    index: MergeIndex | OrderedParts,
    dest: Path,
    media_dir: Path | None,
    unanswered: dict[int, bytes],
) -> list[str]:
    """Results in input order (answers' raw lines); media of successful answers. A part whose
    answers were put in order while the jobs ran (:meth:`MergeIndex.write_ordered`) is copied
    as is (in the kernel); the others are read line by line from the job results files."""
    if isinstance(index, OrderedParts):
        return _publish_assembled(index, dest, media_dir)
    media: list[str] = []
    first = True
    with atomic_writer(dest) as out:
        for part, lo, hi in index.ranges():
            ready = index.ordered_file(part)
            if ready is not None:
                append_file(out, ready[0])
                if ready[1] and media_dir is not None:
                    media += _media_from_file(ready[0], media_dir)
            else:
                for chunk in index.answer_chunks(lo, hi):
                    buf = []
                    for ans in chunk:
                        if ans.line is None:
                            buf.append(b'{"key":' + orjson.dumps(ans.key) + b',"error":')
                            buf.append(unanswered[ans.part] + b"}\n")
                            continue
                        buf.append(ans.line + b"\n")
                        if ans.ok and media_dir is not None:
                            media += extract_media(ans.line, media_dir)
                    out.write(b"".join(buf))
            if first:
                first = False
                out.flush()
                crash_point("mid_outbox")
    return media


def _publish_assembled(index: OrderedParts, dest: Path, media_dir: Path | None) -> list[str]:
    """Every part was put in order: finish the file assembled while the jobs ran."""
    parts = [ready_part(index.work, s) for s in index.parts]
    outbox_file.publish(dest, index.work, parts, lambda: crash_point("mid_outbox"))
    media: list[str] = []
    if media_dir is not None:
        for s in index.parts:
            if s.media:
                media += _media_from_file(fast_path(index.work, s.part_no), media_dir)
    return media


def _media_from_file(src: Path, media_dir: Path) -> list[str]:
    names: list[str] = []
    for _n, raw in iter_lines(src):
        line = raw.rstrip(b"\r\n")
        if b'"response"' in line:
            names += extract_media(line, media_dir)
    return names


def _prune_media(media_dir: Path, keep: list[str]) -> None:
    """Drop media files left by an earlier drop of the same path (a planted link in the
    folder's place is removed, never followed: :func:`daemon.fsio.prune`)."""
    fsio.prune(media_dir, set(keep))


def _final_state(
    row: dict[str, Any], counts: dict[str, int], jobs: list[dict[str, Any]], ignored: list[str]
) -> tuple[InputState, str | None]:
    """The input's final state and one-line reason; ``ignored``: jobs that SUCCEEDED although
    the user cancelled them (:func:`daemon.quirks.ignored_cancels`)."""
    done = counts["succeeded"] == counts["total"]
    anyway = f"the API finished {', '.join(ignored)} anyway (a cancel is best effort)"
    if row["cancel_requested"] == quirks.OUTSIDE_CANCEL:
        return InputState.CANCELLED, quirks.outside_reason(jobs, counts)
    if row["cancel_requested"] and ignored and done:
        return InputState.SUCCEEDED, f"cancel requested, but {anyway}: results kept"
    if row["cancel_requested"]:
        return InputState.CANCELLED, (
            f"cancelled by request; {counts['succeeded']} of {counts['total']} requests succeeded"
            + (f"; {anyway}" if ignored else "")
        )
    if refused_jobs(jobs):  # the API refused lines at create: bad input (the reason: later)
        return InputState.REJECTED, None
    if done:
        return InputState.SUCCEEDED, None
    failed = counts["total"] - counts["succeeded"]
    held = quirks.held_reason(jobs)
    if counts["succeeded"]:
        why = f"{failed} of {counts['total']} requests failed"
        return InputState.PARTIAL, f"{why}; {held}" if held else why
    if held:
        return InputState.FAILED, held
    expired = any(j["remote_state"] == RemoteState.EXPIRED for j in jobs)
    if counts["answered"] == 0 and expired:
        attempts = max((j["attempt"] for j in jobs), default=0)
        return InputState.EXPIRED, f"batch job expired without answers after {attempts} attempt(s)"
    refused = [j for j in jobs if j["error"]]
    if refused:
        err = orjson.loads(refused[-1]["error"])
        if err.get("status") == "UNREADABLE":  # refused here, before the API saw anything
            return InputState.FAILED, f"not submitted: {err.get('message', '')}"
        what = " ".join(str(err.get(k)) for k in ("code", "status") if err.get(k) is not None)
        return InputState.FAILED, f"the API failed the job: {what}: {err.get('message', '')}"
    return InputState.FAILED, f"no request succeeded ({failed} errors)"


def _job_entry(j: dict[str, Any]) -> dict[str, Any]:
    return {
        "display_name": j["display_name"],
        "name": j["remote_name"],
        "state": j["remote_state"] or j["state"],
        "attempt": j["attempt"],
        "part": j["part_no"],
        "requests": j["request_count"],
    }


async def finish_index(
    ctx: Context,
    row: dict[str, Any],
    jobs: list[dict[str, Any]],
    index: MergeIndex | OrderedParts,
) -> None:
    """Write the outbox from a built index and commit the final state. When a later drop of the
    same path has already ended, the outbox is its: this one only commits its final state."""
    async with ctx.outbox_lock(row["rel_path"]):
        newer = await ctx.store.newer_final_drop(row)
        await _finish_index(ctx, row, jobs, index, newer)
    work = ctx.input_dir(row["id"])
    results = outbox_paths(ctx.cfg.outbox_dir, row["rel_path"])["results"]
    await anyio.to_thread.run_sync(outbox_file.discard, results, work)
    await anyio.to_thread.run_sync(_cleanup_work, work, index.path)
    await _cleanup_remote(ctx, jobs)


def superseded_reason(reason: str | None, newer: str) -> str:
    note = f"superseded by the later drop {newer} of the same name: the outbox keeps its files"
    return f"{reason}; {note}" if reason else note


# Long: the outbox of one input in the order that keeps it crash-safe (results, media, summary
# last, then the final state, shielded); the steps share the index and the counts.
async def _finish_index(
    ctx: Context,
    row: dict[str, Any],
    jobs: list[dict[str, Any]],
    index: MergeIndex | OrderedParts,
    newer: str | None,
) -> None:
    cfg = ctx.cfg
    paths = outbox_paths(cfg.outbox_dir, row["rel_path"])
    counts = await anyio.to_thread.run_sync(index.counts)
    ignored = await quirks.ignored_cancels(ctx, row, jobs)
    state, reason = _final_state(row, counts, jobs, ignored)
    problems: dict[str, Any] = {}
    if state == InputState.REJECTED:
        parts = [dict(p) for p in await ctx.store.parts_of(row["id"])]
        reason, problems = await anyio.to_thread.run_sync(rejection, row, jobs, parts)
    if newer is not None:
        reason = superseded_reason(reason, newer)
    last: dict[int, dict[str, Any]] = {}
    for j in jobs:  # the latest job of each part
        if j["part_no"] not in last or j["attempt"] > last[j["part_no"]]["attempt"]:
            last[j["part_no"]] = j
    attempts = max((j["attempt"] for j in jobs), default=0)
    media_dir = paths["media"] if cfg.outbox.extract_media else None
    unanswered = _Default(
        {p: _unanswered(state, j["attempt"], j) for p, j in last.items()},
        _unanswered(state, attempts, None),
    )
    with_results = (counts["answered"] > 0 or state not in _ERROR_STATES) and newer is None

    def write_outbox() -> tuple[list[str], dict[str, int], list[dict[str, Any]]]:
        media: list[str] = []
        if with_results:
            media = _write_results(index, paths["results"], media_dir, unanswered)
        return media, index.tokens(), index.error_codes()

    media, raw_tokens, error_codes = await run_stoppable(write_outbox, index.stop)
    tokens = {TOKEN_NAMES[k]: v for k, v in raw_tokens.items()}
    now = time.time()
    doc: dict[str, Any] = {
        "input_id": row["id"],
        "file": row["rel_path"],
        "model": row["model"],
        "state": state.value,
        "requests": {k: v for k, v in counts.items() if k != "answered"},
        "tokens": tokens,
        "estimated_cost_usd": estimate_cost(ctx, row["model"], tokens),
        "jobs": [_job_entry(j) for j in jobs],
        "attempts": attempts,
        "created_at": iso(row["created_at"]),
        "finished_at": iso(now),
        "outbox": {
            "results": str(paths["results"]) if with_results else None,
            "summary": None if state in _ERROR_STATES or newer else str(paths["summary"]),
            "media": str(paths["media"]) if media else None,
        },
        "reused": False,
        "reused_from": None,
    }
    if ignored:  # paid although cancelled: say so
        doc["cancel_ignored_by_api"] = ignored
    if newer is not None:
        doc["superseded_by"] = newer
    error_doc = None
    if state in _ERROR_STATES:
        error_doc = {
            **{k: doc[k] for k in ("input_id", "file", "model", "state")},
            "reason": reason,
            "details": {
                **problems,
                "jobs": [
                    _job_entry(j) | {"error": orjson.loads(j["error"])} for j in jobs if j["error"]
                ],
                "request_errors": error_codes,
            },
            **{k: doc[k] for k in ("requests", "jobs", "attempts", "created_at", "finished_at")},
            "outbox": doc["outbox"],
        }
        if ignored:
            error_doc["cancel_ignored_by_api"] = ignored
    keep = ctx.results_dir / f"{row['id']}.jsonl"

    def seal() -> None:
        if newer is not None:
            return
        if media_dir is not None:
            _prune_media(media_dir, media)
        if not with_results:
            remove_quietly(paths["results"])
        if error_doc is not None:
            write_json(paths["error"], error_doc)
            remove_quietly(paths["summary"])
        else:
            write_json(paths["summary"], doc)
            remove_quietly(paths["error"])
        if state == InputState.SUCCEEDED:
            link_or_copy(paths["results"], keep)

    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(seal)
        async with ctx.store.tx() as conn:
            await ctx.store.set_input_state(
                conn,
                row["id"],
                state,
                note=reason,
                reason=reason,
                summary=doc,
                error=error_doc,
                results_path=str(keep) if state == InputState.SUCCEEDED and not newer else None,
                finished_at=now,
            )
    log.info("input_finished", input_id=row["id"], state=state.value, **counts)
    if newer is not None:
        log.warning("input_superseded", input_id=row["id"], file=row["rel_path"], by=newer)


class _Default(dict[int, bytes]):
    """Part number → the error for its unanswered keys; parts without a job get the default."""

    def __init__(self, values: dict[int, bytes], default: bytes) -> None:
        super().__init__(values)
        self.default = default

    def __missing__(self, key: int) -> bytes:
        return self.default


def _cleanup_work(work: Path, index_path: Path) -> None:
    """Drop the scratch index and the retry part files; ``input.jsonl`` and the job results
    stay for ``retry``."""
    remove_index(index_path)
    scratch = SCRATCH_GLOBS
    for p in [q for pattern in scratch for q in work.glob(pattern)]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


async def _cleanup_remote(ctx: Context, jobs: list[dict[str, Any]]) -> None:
    if ctx.cfg.cleanup.keep_remote or ctx.gemini is None:
        return
    for j in jobs:
        for name in (j["upload_name"], j["result_file"]):
            if not name:
                continue
            try:
                await ctx.gemini.delete_file(name)
            except Exception as exc:
                log.warning("remote_file_not_deleted", file=name, error=str(exc))


# Long: a reuse publishes the earlier results under this input's names, with the same care as
# a finish (outbox lock, newer drop, shielded final state).
async def reuse_input(ctx: Context, row: dict[str, Any]) -> bool:
    """Serve an input from an earlier identical drop (dedupe); False if its results are gone."""
    src_row = await ctx.store.get_input(row["reused_from"])
    src = Path(src_row["results_path"]) if src_row and src_row["results_path"] else None
    if src is None or not src.exists():
        log.warning("reuse_impossible_submitting_again", input_id=row["id"])
        async with ctx.store.tx() as conn:
            await ctx.store.update_input(conn, row["id"], reused_from=None)
        return False
    assert src_row is not None
    paths = outbox_paths(ctx.cfg.outbox_dir, row["rel_path"])
    media_dir = paths["media"] if ctx.cfg.outbox.extract_media else None
    keep = ctx.results_dir / f"{row['id']}.jsonl"
    before = orjson.loads(src_row["summary"]) if src_row["summary"] else {}
    # A reuse of a reuse names the input that was paid for (each reuse records it).
    origin = (before.get("reused") and before.get("reused_from")) or src_row["id"]
    now = time.time()
    doc: dict[str, Any] = {
        "input_id": row["id"],
        "file": row["rel_path"],
        "model": row["model"],
        "state": InputState.SUCCEEDED.value,
        "requests": before.get("requests"),
        "tokens": before.get("tokens"),
        "estimated_cost_usd": before.get("estimated_cost_usd"),
        "jobs": [],
        "attempts": 0,
        "created_at": iso(row["created_at"]),
        "finished_at": iso(now),
        "outbox": {"results": str(paths["results"]), "summary": str(paths["summary"])},
        "reused": True,
        "reused_from": origin,
    }

    def write() -> None:
        copy_atomic(src, paths["results"])
        media = _media_from_file(src, media_dir) if media_dir else []  # not the shared copy
        if media_dir is not None:
            _prune_media(media_dir, media)
        doc["outbox"]["media"] = str(paths["media"]) if media else None
        write_json(paths["summary"], doc)
        remove_quietly(paths["error"])
        link_or_copy(paths["results"], keep)

    async with ctx.outbox_lock(row["rel_path"]):
        newer = await ctx.store.newer_final_drop(row)
        if newer is not None:
            doc["superseded_by"] = newer
            doc["outbox"] = {"results": None, "summary": None, "media": None}
        with anyio.CancelScope(shield=True):
            if newer is None:
                await anyio.to_thread.run_sync(write)
            async with ctx.store.tx() as conn:
                await ctx.store.set_input_state(
                    conn,
                    row["id"],
                    InputState.SUCCEEDED,
                    note=f"reused results of {origin}",
                    reason=None if newer is None else superseded_reason(None, newer),
                    summary=doc,
                    results_path=None if newer else str(keep),
                    finished_at=now,
                )
    log.info("input_reused", input_id=row["id"], reused_from=origin)
    return True
