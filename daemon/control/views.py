"""The socket's JSON views of inputs and jobs (what ``ls``, ``show`` and ``status`` print)."""

from __future__ import annotations

from typing import Any

import structlog

from daemon import quirks
from daemon.clock import iso
from daemon.context import Context
from daemon.states import InputState, JobState
from daemon.store import Row, loads

log = structlog.get_logger(__name__)


def iso_ms(t: float | None) -> str | None:
    return iso(t, "milliseconds")


def _progress(jobs: list[Row]) -> dict[str, int]:
    """batchStats of each part's current job (its latest attempt that was started)."""
    latest: dict[int, Row] = {}
    for j in jobs:
        if j["state"] in (JobState.PLANNED, JobState.CANCELLED) and not j["remote_name"]:
            continue
        if j["part_no"] not in latest or j["attempt"] > latest[j["part_no"]]["attempt"]:
            latest[j["part_no"]] = j
    cur = latest.values()
    return {
        "done": sum(j["done_count"] for j in cur),
        "failed": sum(j["failed_count"] for j in cur),
        "pending": sum(j["pending_count"] for j in cur),
        "total": sum(j["request_count"] for j in cur),
    }


def _requests(row: Row) -> dict[str, int | None]:
    summary = loads(row["summary"]) if row["summary"] else None
    counts = summary.get("requests") if isinstance(summary, dict) else None
    if isinstance(counts, dict):
        return {
            "total": counts.get("total", row["request_count"]),
            "succeeded": counts.get("succeeded"),
            "failed": counts.get("failed"),
        }
    return {"total": row["request_count"], "succeeded": None, "failed": None}


def input_view(row: Row, jobs: list[Row]) -> dict[str, Any]:
    """One input as ``GET /v1/inputs`` lists it."""
    return {
        "id": row["id"],
        "path": row["rel_path"],
        "model": row["model"],
        "kind": row["kind"],
        "state": row["state"],
        "final": InputState(row["state"]).final,
        "reason": row["reason"],
        "cancel_requested": row["cancel_requested"] == quirks.OWN_CANCEL,
        "cancelled_outside": row["cancel_requested"] == quirks.OUTSIDE_CANCEL,
        "fresh": bool(row["fresh"]),
        "reused_from": row["reused_from"],
        "requests": _requests(row),
        "progress": _progress(jobs),
        "jobs": [j["remote_name"] for j in jobs if j["remote_name"]],
        "created": iso_ms(row["created_at"]),
        "updated": iso_ms(row["updated_at"]),
        "finished": iso_ms(row["finished_at"]),
    }


def job_view(j: Row) -> dict[str, Any]:
    return {
        "id": j["id"],
        "part": j["part_no"],
        "attempt": j["attempt"],
        "display_name": j["display_name"],
        "remote_name": j["remote_name"],
        "state": j["state"],
        "remote_state": j["remote_state"],
        "mode": j["mode"],
        "requests": j["request_count"],
        "counts": {
            "done": j["done_count"],
            "failed": j["failed_count"],
            "pending": j["pending_count"],
        },
        "created": iso_ms(j["created_at"]),
        "submitted": iso_ms(j["submitted_at"]),
        "finished": iso_ms(j["finished_at"]),
        "next_poll": iso_ms(j["next_poll_at"]),
        "error": loads(j["error"]) if j["error"] else _submit_error(j),
    }


def _submit_error(j: Row) -> dict[str, Any] | None:
    """A job backing off before its create shows its submit bookkeeping as its error (the
    socket's shape from before the bookkeeping had its own columns)."""
    if not j.get("submit_retries"):
        return None
    last = loads(j["submit_error"]) if j.get("submit_error") else None
    return {"retries": j["submit_retries"], "check_remote": bool(j["check_remote"]), "last": last}


async def input_detail(ctx: Context, row: Row) -> dict[str, Any]:
    """One input with its parts, jobs and state history (``GET /v1/inputs/{id}``)."""
    jobs = await ctx.store.jobs_of(row["id"])
    view = input_view(row, jobs)
    view["size_bytes"] = row["size_bytes"]
    view["sha256"] = row["sha256"]
    view["est_tokens"] = row["est_tokens"]
    view["error"] = loads(row["error"]) if row["error"] else None
    view["summary"] = loads(row["summary"]) if row["summary"] else None
    view["parts"] = [
        {k: p[k] for k in ("part_no", "first_line", "last_line", "request_count", "size_bytes")}
        for p in await ctx.store.parts_of(row["id"])
    ]
    view["jobs"] = [job_view(j) for j in jobs]
    view["history"] = [
        {"at": iso_ms(h["at"]), "state": h["state"], "note": h["note"]}
        for h in await ctx.store.history(row["id"])
    ]
    return view
