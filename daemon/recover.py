"""``gemini-batchd recover``: rebuild a lost or corrupt store from ``state/work/`` and the remote
jobs, so that a normal start finishes the inputs that were in flight without paying twice.

1. The remote job list is read first (all pages); if it cannot be read nothing is changed.
2. The old database (and its ``-wal``/``-shm``) is moved aside as ``<name>.lost-<time>``.
3. Every claimed input in ``state/work/<id>/`` gets its row back: name, model and time from its
   ``.meta.json`` (written at claim time); an input the outbox has a summary or error file for
   is final as that file says. The others are validated again as at intake (the same parts, so
   the same display names) and their jobs are planned.
4. A planned job whose display name ``gemini-batchd:<id>:<part>[:<attempt>]`` is in the remote
   list is adopted (``active``, polled and collected as usual); later attempts found remotely
   are adopted too. Only jobs that exist nowhere are left to submit: none is created here.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import structlog

from daemon.config import Config, read_api_key
from daemon.context import Context
from daemon.gemini import ApiError, GeminiClient
from daemon.layout import INPUT_FILE, META_FILE
from daemon.states import FINAL_INPUT_STATES, JobState
from daemon.store import Store, StoreError, guard

log = structlog.get_logger(__name__)

_NAME_RE = re.compile(r"^gemini-batchd:([0-9a-f]+):(\d+)(?::(\d+))?$")


class RecoverError(Exception):
    """Recovery could not start (nothing was changed)."""


@dataclass
class Report:
    finished: int = 0
    in_flight: int = 0
    adopted: list[str] = field(default_factory=list)
    to_submit: int = 0
    moved_aside: list[str] = field(default_factory=list)

    def line(self) -> str:
        aside = f"; old database moved to {', '.join(self.moved_aside)}" if self.moved_aside else ""
        return (
            f"recovered {self.finished + self.in_flight} inputs ({self.finished} finished, "
            f"{self.in_flight} in flight); adopted {len(self.adopted)} remote jobs, "
            f"{self.to_submit} left to submit{aside}"
        )


def _outbox_docs(outbox: Path) -> dict[str, dict[str, Any]]:
    """input id → the summary or error file the outbox holds for it."""
    docs: dict[str, dict[str, Any]] = {}
    for pattern in ("**/*.error.json", "**/*.summary.json"):  # a summary wins
        for p in outbox.glob(pattern):
            try:
                doc = orjson.loads(p.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("input_id"), str):
                docs[doc["input_id"]] = doc
    return docs


def _meta(folder: Path, doc: dict[str, Any] | None, default_model: str) -> dict[str, Any]:
    try:
        meta = orjson.loads((folder / META_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        meta = {}
    rel = meta.get("rel_path") or (doc or {}).get("file") or f"recovered-{folder.name}.jsonl"
    model = meta.get("model") or (doc or {}).get("model") or default_model
    from daemon.states import model_kind

    return {
        "id": folder.name,
        "rel_path": rel,
        "model": model,
        "kind": meta.get("kind") or model_kind(model),
        "created_at": float(meta.get("created_at") or os.stat(folder).st_mtime),
    }


def move_aside(db: Path) -> list[str]:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for suffix in ("", "-wal", "-shm"):
        p = db.with_name(db.name + suffix)
        if p.exists():
            dest = p.with_name(f"{db.name}.lost-{stamp}{suffix}")
            os.rename(p, dest)
            moved.append(dest.name)
    return moved


async def remote_jobs(gemini: GeminiClient) -> dict[str, dict[str, Any]]:
    """display name → Operation of every remote job of ours (all pages); RecoverError if the
    list cannot be read."""
    out: dict[str, dict[str, Any]] = {}
    try:
        async for op in gemini.list_batches():
            name = (op.get("metadata") or {}).get("displayName")
            if isinstance(name, str) and _NAME_RE.match(name):
                out.setdefault(name, op)
    except ApiError as e:
        raise RecoverError(f"cannot list the remote jobs, nothing changed: {e}") from None
    return out


async def rebuild(ctx: Context, remote: dict[str, dict[str, Any]], report: Report) -> None:
    """Rows for every claimed input (steps 3 and 4 of the module doc)."""
    from daemon.intake.validate_stage import validate_once

    cfg = ctx.cfg
    docs = _outbox_docs(cfg.outbox_dir)
    for input_id in sorted(guard.work_inputs(ctx.work_dir)):
        folder = ctx.input_dir(input_id)
        doc = docs.get(input_id)
        fields = _meta(folder, doc, cfg.gemini.default_model)
        fields["work_path"] = str(folder / INPUT_FILE)
        state = (doc or {}).get("state")
        if state in {s.value for s in FINAL_INPUT_STATES}:
            fields |= {"state": state, "finished_at": time.time(), "reason": "recovered"}
            results = ctx.results_dir / f"{input_id}.jsonl"
            if results.exists():
                fields["results_path"] = str(results)
            report.finished += 1
        else:
            report.in_flight += 1
        async with ctx.store.tx() as conn:
            await ctx.store.add_input(conn, **fields)
    await validate_once(ctx)  # the in-flight ones: parts and planned jobs, as at intake
    await adopt(ctx, remote, report)


async def adopt(ctx: Context, remote: dict[str, dict[str, Any]], report: Report) -> None:
    """Planned jobs found remotely become ``active``; later attempts found remotely are added."""

    planned = {j["display_name"]: j for j in await ctx.store.jobs_in(JobState.PLANNED)}
    extra: list[tuple[dict[str, Any], int, dict[str, Any]]] = []
    for name, op in remote.items():
        m = _NAME_RE.match(name)
        if not m or name in planned or m.group(3) is None:
            continue
        first = planned.get(f"gemini-batchd:{m.group(1)}:{m.group(2)}")
        if first is not None:
            extra.append((first, int(m.group(3)), op))
    now = time.time()
    interval = ctx.cfg.poll.min_interval
    activations = []
    async with ctx.store.tx() as conn:
        for job, attempt, op in extra:
            job_id = await ctx.store.add_job_attempt(
                conn, job, attempt, op["metadata"]["displayName"]
            )
            activations.append((job_id, job["input_id"], op, now, interval))
        for name, job in planned.items():
            if name in remote:
                activations.append((job["id"], job["input_id"], remote[name], now, interval))
        if activations:
            await ctx.store.activate(conn, activations)
    report.adopted = sorted(a[2]["metadata"]["displayName"] for a in activations)
    report.to_submit = len(planned) - sum(1 for n in planned if n in remote)
    for name in report.adopted:
        log.info("job_adopted", display=name)


async def run_recover(cfg: Config, gemini: GeminiClient) -> Report:
    """List the remote jobs, move the old database aside, rebuild (see the module doc)."""
    report = Report()
    remote = await remote_jobs(gemini)
    report.moved_aside = move_aside(cfg.db_path)
    async with Store.open(cfg.db_path) as store:
        await rebuild(Context(cfg=cfg, store=store, gemini=gemini), remote, report)
    guard.mark_closed(cfg.state_dir)  # the old store's unclean stop is dealt with
    return report


def main_recover(cfg: Config) -> int:
    """``gemini-batchd recover`` (the daemon stopped): 0 done or nothing to do, 69 the remote
    list could not be read, 78 no API key or another daemon runs."""
    from daemon.logs import configure_logging
    from daemon.service import EX_CONFIG, AlreadyRunning, state_lock

    api_key = read_api_key(cfg)
    if api_key is None:
        print("gemini-batchd: recover needs the API key (to find the remote jobs)", file=sys.stderr)
        return EX_CONFIG
    configure_logging(cfg.daemon.log_level, "console", secrets=[api_key])
    try:
        with state_lock(cfg.state_dir):
            try:
                guard.check_store(cfg.db_path, cfg.state_dir / "work")
            except StoreError as e:
                print(f"gemini-batchd: {e}", file=sys.stderr)
            else:
                print(f"state database {cfg.db_path} matches state/work/: nothing to recover")
                return 0
            report = anyio.run(_recover_async, cfg, api_key, backend="asyncio")
    except AlreadyRunning as e:
        print(f"gemini-batchd: {e}", file=sys.stderr)
        return EX_CONFIG
    except RecoverError as e:
        print(f"gemini-batchd: {e}", file=sys.stderr)
        return 69
    print(report.line())
    return 0


async def _recover_async(cfg: Config, api_key: str) -> Report:
    gemini = GeminiClient(cfg, api_key, base_url=cfg.gemini.base_url)
    try:
        return await run_recover(cfg, gemini)
    finally:
        await gemini.aclose()
