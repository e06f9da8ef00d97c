"""Intake: watch and scan the inbox, settle, claim; then validate claimed files (SPEC §2).

A claim moves the dropped file into ``state/work/<id>/input.jsonl`` and inserts its ``seen`` row in
one transaction (the rename happens inside it, so the row commits only if the file moved). A small
``claim.json`` written next to it first lets recovery re-create a row lost between rename and commit.
What cannot be claimed as a request file (symlinks, FIFOs and other non-regular files, files in a
folder that is not a model id) is moved out of the inbox the same way, into ``state/rejected/<id>/``
(or ``state/work/<id>/`` for regular files), with its rejection reason already on the row; the
rejection itself (error file first, then ``rejected`` committed) is shared with the validator.

A new drop of a path that was rejected before writes a new ``foo.error.json``; other ``foo.*`` files
of the earlier drop are left as they are until the new drop completes.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import anyio
import orjson
import structlog
from anyio.abc import TaskStatus
from watchfiles import awatch

from daemon.config import MODEL_ID_RE
from daemon.context import Context
from daemon.crash import crash_point
from daemon.outbox import fsync_dir, outbox_paths, write_json
from daemon.states import InputState
from daemon.store import loads, new_input_id
from daemon.validate import Validation, model_kind, part_file_name, validate_file

log = structlog.get_logger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", "~")
PROBE_NAME = ".gemini-batchd-watch-probe"
CLAIM_FILE = "claim.json"
VALIDATE_INTERVAL = 30.0  # safety-net tick of the validator loop


def classify(rel: PurePosixPath) -> Literal["take", "ignore", "reject"]:
    """What to do with a path relative to the inbox, by name alone (SPEC §2)."""
    parts = rel.parts
    if not parts or len(parts) > 2 or any(p.startswith(".") for p in parts):
        return "ignore"
    name = parts[-1]
    if name.endswith(IGNORED_SUFFIXES) or not name.endswith(".jsonl"):
        return "ignore"
    if len(parts) == 2 and not MODEL_ID_RE.match(parts[0]):
        return "reject"
    return "take"


class SettleTracker:
    """Remembers each path's last ``(size, mtime_ns)`` and since when it has not changed.

    A cache: losing it only delays a claim by one settle period."""

    def __init__(self, settle_seconds: float, clock: Any = time.monotonic) -> None:
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._seen: dict[str, tuple[tuple[int, int], float]] = {}

    def settled(self, rel: str, sig: tuple[int, int]) -> bool:
        now = self.clock()
        old = self._seen.get(rel)
        if old is None or old[0] != sig:
            self._seen[rel] = (sig, now)
            return False
        return now - old[1] >= self.settle_seconds

    def forget(self, rel: str) -> None:
        self._seen.pop(rel, None)

    def retain(self, rels: set[str]) -> None:
        for rel in [r for r in self._seen if r not in rels]:
            del self._seen[rel]

    def next_due(self) -> float | None:
        """Seconds until the earliest tracked path may settle, or None when nothing waits."""
        if not self._seen:
            return None
        now = self.clock()
        return max(0.0, min(since + self.settle_seconds - now for _, since in self._seen.values()))


@dataclass(frozen=True)
class _Candidate:
    path: Path
    rel: str
    sig: tuple[int, int]
    model: str
    reject: str | None  # why it cannot be claimed as a request file


def _list_inbox(inbox: Path, default_model: str) -> list[_Candidate]:
    """Everything in the inbox (and one level of folders) that is ours to take or reject."""
    found: list[_Candidate] = []

    def add(entry: os.DirEntry[str], rel: str, model: str, reject: str | None) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return
        found.append(_Candidate(Path(entry.path), rel, (st.st_size, st.st_mtime_ns), model, reject))

    try:
        top = list(os.scandir(inbox))
    except FileNotFoundError:
        return found
    for entry in top:
        name = entry.name
        verdict = classify(PurePosixPath(name))
        if name.startswith("."):
            continue
        if entry.is_symlink():
            if verdict != "ignore" or (
                not name.endswith(IGNORED_SUFFIXES) and os.path.isdir(entry.path)
            ):
                add(entry, name, default_model, "a symbolic link (never followed)")
            continue
        if entry.is_dir(follow_symlinks=False):
            _list_folder(entry, add)
            continue
        if verdict == "ignore":
            continue
        reject = None if entry.is_file(follow_symlinks=False) else "not a regular file"
        add(entry, name, default_model, reject)
    return found


def _list_folder(folder: os.DirEntry[str], add: Any) -> None:
    try:
        entries = list(os.scandir(folder.path))
    except OSError:
        return
    for entry in entries:
        rel = f"{folder.name}/{entry.name}"
        verdict = classify(PurePosixPath(rel))
        if verdict == "ignore":
            continue
        if entry.is_symlink():
            add(entry, rel, folder.name, "a symbolic link (never followed)")
        elif entry.is_dir(follow_symlinks=False):
            continue  # deeper nesting is ignored
        elif not entry.is_file(follow_symlinks=False):
            add(entry, rel, folder.name, "not a regular file")
        elif verdict == "reject":
            add(entry, rel, folder.name, f"folder name {folder.name!r} is not a model id")
        else:
            add(entry, rel, folder.name, None)


async def scan_once(ctx: Context, settle: SettleTracker) -> int:
    """One pass over the inbox: claim (or reject) every settled drop; returns how many."""
    if not ctx.accepting:
        return 0
    cfg = ctx.cfg
    found = await anyio.to_thread.run_sync(_list_inbox, cfg.inbox_dir, cfg.gemini.default_model)
    settle.retain({c.rel for c in found})
    done = 0
    for c in found:
        if not ctx.accepting:
            break
        if not settle.settled(c.rel, c.sig):
            continue
        settle.forget(c.rel)
        try:
            if c.reject is None:
                ok = await claim(ctx, c.path, c.rel, c.model)
            else:
                ok = await reject_unclaimable(ctx, c.path, c.rel, c.reject, model=c.model)
        except OSError as e:
            log.warning("claim_failed", file=c.rel, error=str(e))
            continue
        done += ok is not None
    return done


def _write_claim_note(dest_dir: Path, **note: Any) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    with open(dest_dir / CLAIM_FILE, "wb") as f:
        f.write(orjson.dumps(note))
        f.flush()
        os.fsync(f.fileno())


def _copy_in(src: Path, tmp: Path) -> None:
    with open(src, "rb") as inp, open(tmp, "wb") as out:
        shutil.copyfileobj(inp, out, 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())


def _move_special(src: Path, dest: Path) -> None:
    """Move a symlink or special file; across filesystems, re-create a link, drop anything else."""
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        if src.is_symlink():
            os.symlink(os.readlink(src), dest)
        src.unlink()


async def _take(
    ctx: Context,
    path: Path,
    rel: str,
    model: str,
    *,
    dest_dir: Path,
    dest: Path,
    input_id: str,
    reason: str | None = None,
) -> str:
    """Insert the row and move ``path`` to ``dest`` in one transaction."""
    kind = model_kind(model)
    fields: dict[str, Any] = {"id": input_id, "rel_path": rel, "model": model, "kind": kind}
    if reason is not None:
        fields["reason"] = reason
        fields["error"] = {"problems": [], "problem_count": 0}
    tmp = dest_dir / ".input.jsonl.copying"
    try:
        special = not stat.S_ISREG(os.lstat(path).st_mode)
        await anyio.to_thread.run_sync(lambda: _write_claim_note(dest_dir, **fields))
        cross_device = not special and os.stat(path).st_dev != os.stat(dest_dir).st_dev
        if cross_device:  # copy outside the transaction; the swap below is quick
            await anyio.to_thread.run_sync(_copy_in, path, tmp)
        with anyio.CancelScope(shield=True):  # the move and its commit are not torn apart
            async with ctx.store.tx() as conn:
                await ctx.store.add_input(conn, work_path=str(dest), **fields)
                if special:
                    _move_special(path, dest)
                elif cross_device:
                    os.rename(tmp, dest)
                    os.unlink(path)
                else:
                    os.rename(path, dest)
                fsync_dir(dest_dir)
                fsync_dir(path.parent)
    except BaseException:
        if not os.path.lexists(dest):
            shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    log.info("input_claimed", input_id=input_id, file=rel, model=model, rejected=reason)
    crash_point("after_claim")
    ctx.wake.validate.set()
    return input_id


async def claim(ctx: Context, path: Path, rel: str, model: str) -> str | None:
    """Move a settled drop into ``state/work/<id>/input.jsonl`` with its ``seen`` row."""
    input_id = new_input_id()
    dest_dir = ctx.input_dir(input_id)
    try:
        return await _take(
            ctx,
            path,
            rel,
            model,
            dest_dir=dest_dir,
            dest=dest_dir / "input.jsonl",
            input_id=input_id,
        )
    except FileNotFoundError:
        return None  # gone meanwhile (the producer took it back)


async def reject_unclaimable(
    ctx: Context, path: Path, rel: str, reason: str, *, model: str | None = None
) -> str | None:
    """Move something that is not a usable drop out of the inbox and reject it (error file)."""
    model = model or ctx.cfg.gemini.default_model
    input_id = new_input_id()
    try:
        regular = stat.S_ISREG(os.lstat(path).st_mode)
        if regular:  # keep the bytes with the other claimed files
            dest_dir = ctx.input_dir(input_id)
            dest = dest_dir / "input.jsonl"
        else:
            dest_dir = ctx.cfg.state_dir / "rejected" / input_id
            dest = dest_dir / path.name
        await _take(
            ctx,
            path,
            rel,
            model,
            dest_dir=dest_dir,
            dest=dest,
            input_id=input_id,
            reason=reason,
        )
    except FileNotFoundError:
        return None
    row = await ctx.store.get_input(input_id)
    assert row is not None
    await _reject(ctx, row, row["reason"], loads(row["error"]))
    return input_id


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def _reject(ctx: Context, row: dict[str, Any], reason: str, details: dict[str, Any]) -> None:
    """Write the error file, then commit ``rejected`` (a crash between redoes both)."""
    now = time.time()
    doc = {
        "input_id": row["id"],
        "file": row["rel_path"],
        "model": row["model"],
        "state": InputState.REJECTED.value,
        "reason": reason,
        "details": details,
        "created_at": _iso(row["created_at"]),
        "finished_at": _iso(now),
    }
    target = outbox_paths(ctx.cfg.outbox_dir, row["rel_path"])["error"]
    await anyio.to_thread.run_sync(write_json, target, doc)
    with anyio.CancelScope(shield=True):
        async with ctx.store.tx() as conn:
            await ctx.store.set_input_state(
                conn,
                row["id"],
                InputState.REJECTED,
                note=reason,
                reason=reason,
                error=details,
                finished_at=now,
            )
    log.warning("input_rejected", input_id=row["id"], file=row["rel_path"], reason=reason)


# ---- the watcher loop ------------------------------------------------------------------------


async def run_inbox(
    ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Scan at start, then watch (watchfiles) and rescan every ``rescan_seconds``; a change or
    a drop still settling schedules the next scan sooner. ``started`` once the watcher is live."""
    cfg = ctx.cfg
    inbox = cfg.inbox_dir
    inbox.mkdir(parents=True, exist_ok=True)
    settle = SettleTracker(cfg.inbox.settle_seconds)
    await scan_once(ctx, settle)
    probe_seen = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch, ctx, inbox, probe_seen)
        await _prove_watcher(inbox, probe_seen)
        task_status.started()
        log.info("inbox_watching", inbox=str(inbox), force_polling=cfg.inbox.force_polling)
        while True:
            await scan_once(ctx, settle)
            due = settle.next_due()
            delay = cfg.inbox.rescan_seconds if due is None else min(due, cfg.inbox.rescan_seconds)
            await ctx.wake.scan.wait(max(delay, 0.05))


async def _watch(ctx: Context, inbox: Path, probe_seen: anyio.Event) -> None:
    # awatch's watcher thread only sees a cancellation at its rust_timeout (5 s): a sibling sets
    # the stop event on cancellation so the thread returns within one step and shutdown is quick.
    stop = anyio.Event()

    async def stop_on_cancel() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_cancel)
        async for changes in awatch(
            inbox,
            recursive=True,
            force_polling=ctx.cfg.inbox.force_polling,
            watch_filter=None,
            step=50,
            debounce=400,
            stop_event=stop,
        ):
            for _change, path in changes:
                if os.path.basename(path) == PROBE_NAME:
                    probe_seen.set()
                else:
                    ctx.wake.scan.set()
        tg.cancel_scope.cancel()


async def _prove_watcher(inbox: Path, seen: anyio.Event, limit: float = 10.0) -> None:
    """Touch a probe dotfile until the watcher reports it: from then on no drop is missed."""
    probe = inbox / PROBE_NAME
    try:
        with anyio.move_on_after(limit) as scope:
            while not seen.is_set():
                probe.write_bytes(b"%f" % time.time())
                with anyio.move_on_after(0.5):
                    await seen.wait()
        if scope.cancelled_caught:
            log.warning("inbox_watcher_unconfirmed", inbox=str(inbox))
    finally:
        probe.unlink(missing_ok=True)


# ---- validation stage -----------------------------------------------------------------------


async def validate_once(ctx: Context) -> int:
    """Validate every ``seen`` input: ``rejected`` (error file) or ``queued`` with its parts and
    planned jobs (or straight to collect when identical content already succeeded)."""
    done = 0
    for row in await ctx.store.inputs_in(InputState.SEEN):
        if row["error"] is not None:  # claimed as unusable: only the rejection is left to do
            await _reject(ctx, row, row["reason"] or "rejected", loads(row["error"]))
            done += 1
            continue
        await _validate_input(ctx, row)
        done += 1
    return done


async def _validate_input(ctx: Context, row: dict[str, Any]) -> None:
    input_id = row["id"]
    async with ctx.store.tx() as conn:
        await ctx.store.set_input_state(conn, input_id, InputState.VALIDATING)
    out_dir = ctx.input_dir(input_id)
    for stale in out_dir.glob("part-*-a1.jsonl"):  # from a run cut short by a crash
        stale.unlink()
    try:
        v: Validation = await anyio.to_thread.run_sync(
            lambda: validate_file(
                Path(row["work_path"]), model=row["model"], cfg=ctx.cfg, out_dir=out_dir
            )
        )
    except OSError as e:
        reason = f"cannot read the file: {e.strerror or e}"
        await _reject(ctx, row, reason, {"problems": [], "problem_count": 0})
        return
    if not v.ok:
        first = v.problems[0]
        where = f"line {first.line}: " if first.line else ""
        more = f" (and {v.problem_count - 1} more)" if v.problem_count > 1 else ""
        details = {
            "problems": [{"line": p.line, "reason": p.reason} for p in v.problems],
            "problem_count": v.problem_count,
        }
        await _reject(ctx, row, f"invalid input: {where}{first.reason}{more}", details)
        return
    facts = {
        "size_bytes": v.size_bytes,
        "sha256": v.sha256,
        "request_count": v.request_count,
        "est_tokens": v.est_tokens,
        "media_count": v.media_refs,
        "kind": v.kind,
    }
    earlier = await _reusable(ctx, row, v.sha256)
    if earlier is not None:
        for part in v.parts:
            if part.source_path is not None:
                part.source_path.unlink(missing_ok=True)
        async with ctx.store.tx() as conn:
            await ctx.store.set_input_state(
                conn,
                input_id,
                InputState.DOWNLOADING,
                note=f"same content as {earlier}",
                reused_from=earlier,
                **facts,
            )
        log.info("input_reused", input_id=input_id, reused_from=earlier)
        ctx.wake.collect.set()
        return
    cfg = ctx.cfg
    async with ctx.store.tx() as conn:
        for part in v.parts:
            await ctx.store.add_part(
                conn,
                input_id=input_id,
                part_no=part.part_no,
                first_line=part.first_line,
                last_line=part.last_line,
                start_offset=part.start_offset,
                end_offset=part.end_offset,
                request_count=part.request_count,
                size_bytes=part.size_bytes,
                est_tokens=part.est_tokens,
            )
            inline = v.kind == "generate" and part.size_bytes <= cfg.submit.inline_max_bytes
            await ctx.store.add_job(
                conn,
                input_id=input_id,
                part_no=part.part_no,
                attempt=1,
                display_name=f"gemini-batchd:{input_id}:{part.part_no}",
                mode="inline" if inline else "file",
                source_path=str(part.source_path or out_dir / part_file_name(part.part_no)),
                request_count=part.request_count,
                est_tokens=part.est_tokens,
            )
        await ctx.store.set_input_state(conn, input_id, InputState.QUEUED, **facts)  # type: ignore[arg-type]
    log.info(
        "input_queued",
        input_id=input_id,
        requests=v.request_count,
        parts=len(v.parts),
        size_bytes=v.size_bytes,
    )
    ctx.wake.submit.set()


async def _reusable(ctx: Context, row: dict[str, Any], sha256: str) -> str | None:
    """An earlier succeeded input with the same model and bytes whose results are still kept."""
    if not ctx.cfg.submit.dedupe or row["fresh"]:
        return None
    for earlier in await ctx.store.fetchall(
        "SELECT id, results_path FROM inputs WHERE model = ? AND sha256 = ? AND state = ? "
        "AND id != ? AND results_path IS NOT NULL ORDER BY finished_at DESC",
        (row["model"], sha256, InputState.SUCCEEDED.value, row["id"]),
    ):
        if Path(earlier["results_path"]).is_file():
            return str(earlier["id"])
    return None


async def run_validator(
    ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """The validation stage loop."""
    task_status.started()
    while True:
        await validate_once(ctx)
        await ctx.wake.validate.wait(VALIDATE_INTERVAL)


# ---- recovery -------------------------------------------------------------------------------


async def recover_claims(ctx: Context) -> None:
    """Finish claims cut short by a crash (run at start, before the stages)."""
    inbox = ctx.cfg.inbox_dir
    for row in await ctx.store.inputs_in(InputState.SEEN):
        work = Path(row["work_path"])
        if os.path.lexists(work):
            continue
        src = inbox / row["rel_path"]
        if os.path.lexists(src):
            work.parent.mkdir(parents=True, exist_ok=True)
            if stat.S_ISREG(os.lstat(src).st_mode):
                await anyio.to_thread.run_sync(shutil.move, src, work)
            else:
                _move_special(src, work)
            log.info("claim_recovered", input_id=row["id"], file=row["rel_path"])
        else:
            async with ctx.store.tx() as conn:
                await conn.execute("DELETE FROM inputs WHERE id = ?", (row["id"],))
            log.warning("claim_dropped", input_id=row["id"], file=row["rel_path"])
    async with ctx.store.tx() as conn:
        for row in await ctx.store.inputs_in(InputState.VALIDATING):
            await ctx.store.set_input_state(conn, row["id"], InputState.SEEN, note="recovered")
    await _adopt_orphans(ctx)
    ctx.wake.validate.set()


async def _adopt_orphans(ctx: Context) -> None:
    """Re-create the row of a file moved in just before a crash lost the claim's commit."""
    known = {r["id"] for r in await ctx.store.fetchall("SELECT id FROM inputs")}
    for base in (ctx.work_dir, ctx.cfg.state_dir / "rejected"):
        if not base.is_dir():
            continue
        for entry in os.scandir(base):
            note_path = Path(entry.path) / CLAIM_FILE
            if entry.name in known or not note_path.is_file():
                continue
            note = orjson.loads(note_path.read_bytes())
            files = [p for p in Path(entry.path).iterdir() if p.name not in (CLAIM_FILE,)]
            moved = [p for p in files if not p.name.startswith((".", "part-"))]
            if not moved:  # the move never happened: the file is still in the inbox
                shutil.rmtree(entry.path, ignore_errors=True)
                continue
            fields: dict[str, Any] = {k: note[k] for k in ("id", "rel_path", "model", "kind")}
            if note.get("error") is not None:
                fields["reason"] = note.get("reason")
                fields["error"] = note["error"]
            async with ctx.store.tx() as conn:
                await ctx.store.add_input(conn, work_path=str(moved[0]), **fields)
            log.info("claim_adopted", input_id=note["id"], file=note["rel_path"])
