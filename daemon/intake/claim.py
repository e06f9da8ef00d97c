"""Claims: move settled drops out of the inbox with their ``seen`` rows, in batches; the shared
rejection step; and recovery of claims cut short by a crash.

A batch of claims is one transaction: a batch note (``state/work/.claims-<id>.json``, fsynced with
its folder) lists every file about to move, then the files are renamed into
``state/work/<id>/input.jsonl`` (or ``state/rejected/<id>/`` for what is not a regular file), the
source folders are fsynced once, the rows are inserted and the transaction commits. A crash after a
rename but before the commit leaves a moved file without a row: :func:`recover_claims` adopts it
from the note. Across filesystems the file is copied in first; the note records the source's
identity (device, inode, size, mtime) so that a copy whose source is still in the inbox is dropped
instead of adopted (the source is claimed again normally; adopting it would run it twice).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import structlog

from daemon.clock import iso
from daemon.context import Context
from daemon.crash import crash_point
from daemon.io_faults import is_disk_fault
from daemon.layout import BATCH_NOTE_PREFIX, CLAIM_FILE, INPUT_FILE, META_FILE, outbox_paths
from daemon.outbox import copy_in, fsync_dir, write_json
from daemon.states import InputState, model_kind
from daemon.store import Claimed, new_input_id

log = structlog.get_logger(__name__)

_NO_PROBLEMS = {"problems": [], "problem_count": 0}


@dataclass
class Drop:
    """One thing to take out of the inbox; ``reason`` set when it can only be rejected."""

    path: Path
    rel: str
    model: str
    reason: str | None = None


@dataclass
class _Item:
    drop: Drop
    input_id: str
    dest: Path
    special: bool
    cross: bool
    ident: list[int]
    moved: bool = False
    error: OSError | None = None  # the move failed (e.g. EIO): the file stays in the inbox

    @property
    def note(self) -> dict[str, Any]:
        d = self.drop
        note: dict[str, Any] = {
            "id": self.input_id,
            "rel_path": d.rel,
            "model": d.model,
            "kind": model_kind(d.model),
            "dest": str(self.dest),
            "source": str(d.path),
            "ident": self.ident,
        }
        if d.reason is not None:
            note["reason"] = d.reason
            note["error"] = _NO_PROBLEMS
        return note


def write_meta(folder: Path, note: dict[str, Any]) -> None:
    """What recovery needs to rebuild an input's row, kept beside its claimed file."""
    meta = {k: note[k] for k in ("id", "rel_path", "model", "kind")} | {"created_at": time.time()}
    (folder / META_FILE).write_bytes(orjson.dumps(meta))


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _prepare(ctx: Context, drops: list[Drop]) -> tuple[list[_Item], Path | None]:
    """Stat the sources, write and fsync the batch note, create the folders, copy across
    filesystems. Runs in a worker thread."""
    work = ctx.work_dir
    work.mkdir(parents=True, exist_ok=True)
    work_dev = os.stat(work).st_dev
    items: list[_Item] = []
    for d in drops:
        try:
            st = os.lstat(d.path)
        except FileNotFoundError:
            continue
        input_id = new_input_id()
        special = not stat.S_ISREG(st.st_mode)
        if special:
            dest = ctx.cfg.state_dir / "rejected" / input_id / d.path.name
        else:
            dest = ctx.input_dir(input_id) / INPUT_FILE
        cross = not special and st.st_dev != work_dev
        items.append(_Item(d, input_id, dest, special, cross, _identity(st)))
    if not items:
        return items, None
    note = work / f"{BATCH_NOTE_PREFIX}{uuid.uuid4().hex}.json"
    with open(note, "wb") as f:
        f.write(orjson.dumps([i.note for i in items]))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(work)
    for item in list(items):
        item.dest.parent.mkdir(parents=True, exist_ok=True)
        if not item.special:  # for `gemini-batchd recover`, should the store be lost
            write_meta(item.dest.parent, item.note)
        if item.cross:  # copy outside the transaction; the swap in _move is quick
            try:
                copy_in(item.drop.path, _tmp_of(item))
            except FileNotFoundError:
                shutil.rmtree(item.dest.parent, ignore_errors=True)
                items.remove(item)
    return items, note


def _tmp_of(item: _Item) -> Path:
    return item.dest.parent / ".input.jsonl.copying"


def move_special(src: Path, dest: Path) -> None:
    """Move a symlink or special file; across filesystems, re-create a link, drop anything else."""
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        if src.is_symlink():
            os.symlink(os.readlink(src), dest)
        src.unlink()


def _move_one(item: _Item) -> None:
    src = item.drop.path
    if item.special:
        move_special(src, item.dest)
    elif item.cross:
        os.rename(_tmp_of(item), item.dest)
        os.unlink(src)
    else:
        os.rename(src, item.dest)


def _move(items: list[_Item]) -> None:
    """Rename every item into place (inside the transaction), then fsync the touched folders
    once. An item whose source vanished meanwhile is left unmoved; so is one whose move failed
    (EIO, ...): it stays in the inbox for the next scan, and the others go on."""
    dirs: set[Path] = set()
    for item in items:
        src = item.drop.path
        try:
            _move_one(item)
        except FileNotFoundError:
            continue
        except OSError as e:
            # A failed rename may still have happened: then it is a move like any other.
            if os.path.lexists(src) or not os.path.lexists(item.dest):
                item.error = e
                continue
        item.moved = True
        dirs.add(src.parent)
        dirs.add(item.dest.parent.parent)
    for d in dirs:
        fsync_dir(d)


async def claim_many(ctx: Context, drops: list[Drop]) -> list[str]:
    """Claim (or move out for rejection) ``drops`` in one transaction; returns the ids of those
    taken (a drop that vanished meanwhile is skipped). Rejections are finished here too."""
    items, note = await anyio.to_thread.run_sync(_prepare, ctx, drops)
    if not items:
        return []
    try:
        with anyio.CancelScope(shield=True):  # the moves and their commit are not torn apart
            async with ctx.store.tx() as conn:
                await anyio.to_thread.run_sync(_move, items)
                now = time.time()
                moved = [i for i in items if i.moved]
                await ctx.store.claim_inputs(
                    conn,
                    (
                        Claimed(
                            *(i.input_id, i.drop.rel, i.drop.model, model_kind(i.drop.model)),
                            *(i.drop.reason, None if i.drop.reason is None else _NO_PROBLEMS),
                            str(i.dest),
                        )
                        for i in moved
                    ),
                    now,
                )
    finally:
        for i in items:
            if not i.moved:
                shutil.rmtree(i.dest.parent, ignore_errors=True)
    assert note is not None
    note.unlink(missing_ok=True)
    _report_failed_moves(ctx, items)
    for i in moved:
        log.info(
            "input_claimed",
            input_id=i.input_id,
            file=i.drop.rel,
            model=i.drop.model,
            rejected=i.drop.reason,
        )
    crash_point("after_claim")
    for i in moved:
        if i.drop.reason is not None:
            row = await ctx.store.get_input(i.input_id)
            assert row is not None
            await reject(ctx, row, i.drop.reason, _NO_PROBLEMS)
    if moved:
        ctx.wake.validate.set()
    return [i.input_id for i in moved]


def _report_failed_moves(ctx: Context, items: list[_Item]) -> None:
    failed = [i for i in items if i.error is not None]
    for i in failed:
        log.warning("claim_failed", file=i.drop.rel, error=str(i.error), retry="next scan")
    if failed and failed[0].error is not None:
        ctx.io_faults.fail("stage:claim", "cannot move files out of the inbox", failed[0].error)
    elif items:
        ctx.io_faults.clear("stage:claim")


async def reject(ctx: Context, row: dict[str, Any], reason: str, details: dict[str, Any]) -> None:
    """Write the error file, then commit ``rejected`` (a crash between redoes both)."""
    now = time.time()
    doc = {
        "input_id": row["id"],
        "file": row["rel_path"],
        "model": row["model"],
        "state": InputState.REJECTED.value,
        "reason": reason,
        "details": details,
        "created_at": iso(row["created_at"], "auto"),
        "finished_at": iso(now, "auto"),
    }
    target = outbox_paths(ctx.cfg.outbox_dir, row["rel_path"])["error"]
    async with ctx.outbox_lock(row["rel_path"]):
        newer = await ctx.store.newer_final_drop(row)  # if so, the outbox is the newer drop's
        if newer is None:
            try:
                await anyio.to_thread.run_sync(write_json, target, doc)
            except OSError as e:
                if not is_disk_fault(e):
                    raise
                await _rejection_paused(ctx, row, reason, details, e)
                return
        else:
            reason += f" (superseded by the later drop {newer}: no error file written)"
        ctx.io_faults.clear(f"input:{row['id']}")
        with anyio.CancelScope(shield=True):
            await _set_rejection(ctx, row, InputState.REJECTED, reason, details, finished_at=now)
    log.warning("input_rejected", input_id=row["id"], file=row["rel_path"], reason=reason)


async def _rejection_paused(
    ctx: Context, row: dict[str, Any], reason: str, details: dict[str, Any], e: OSError
) -> None:
    """The error file cannot be written (full or read-only outbox): back to ``seen`` with the
    rejection kept in ``error``, so that the validator only retries writing it, after a backoff."""
    key = f"input:{row['id']}"
    delay = ctx.io_faults.fail(key, "cannot write the error file", e)
    why = f"{ctx.io_faults.active()[key]}; retrying in {delay:g} s (then: {reason})"
    await _set_rejection(ctx, row, InputState.SEEN, why, details | {"pending_reason": reason})


async def _set_rejection(
    ctx: Context, row: dict[str, Any], state: InputState, why: str, error: Any, **fields: Any
) -> None:
    """The input → ``state`` with ``why`` as its note and reason and the rejection in ``error``."""
    async with ctx.store.tx() as conn:
        await ctx.store.set_input_state(
            conn, row["id"], state, note=why, reason=why, error=error, **fields
        )


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
                move_special(src, work)
            log.info("claim_recovered", input_id=row["id"], file=row["rel_path"])
        else:
            await ctx.store.delete_input(row["id"])
            log.warning("claim_dropped", input_id=row["id"], file=row["rel_path"])
    async with ctx.store.tx() as conn:
        for row in await ctx.store.inputs_in(InputState.VALIDATING):
            await ctx.store.set_input_state(conn, row["id"], InputState.SEEN, note="recovered")
    await adopt_orphans(ctx)
    ctx.wake.validate.set()


def _notes(ctx: Context) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """Every claim note: ``(folder, note)`` pairs, and the batch note files to delete after."""
    found: list[tuple[Path, dict[str, Any]]] = []
    batch_files: list[Path] = []
    work = ctx.work_dir
    if work.is_dir():
        for entry in os.scandir(work):
            if entry.name.startswith(BATCH_NOTE_PREFIX) and entry.is_file():
                batch_files.append(Path(entry.path))
                try:
                    notes = orjson.loads(Path(entry.path).read_bytes())
                except orjson.JSONDecodeError:  # torn before its fsync: nothing moved yet
                    continue
                found.extend((Path(n["dest"]).parent, n) for n in notes)
    for base in (work, ctx.cfg.state_dir / "rejected"):
        if base.is_dir():
            for entry in os.scandir(base):
                note_path = Path(entry.path) / CLAIM_FILE
                if note_path.is_file():
                    found.append((Path(entry.path), orjson.loads(note_path.read_bytes())))
    return found, batch_files


def _source_still_there(ctx: Context, note: dict[str, Any]) -> bool:
    ident = note.get("ident")
    if not ident:
        return False
    try:
        st = os.lstat(note.get("source") or ctx.cfg.inbox_dir / note["rel_path"])
    except OSError:
        return False
    return _identity(st) == list(ident)


async def adopt_orphans(ctx: Context) -> None:
    """Re-create the row of a file moved in just before a crash lost the claim's commit; drop a
    copy whose source is still in the inbox, and folders whose move never happened."""
    known = await ctx.store.input_ids()
    notes, batch_files = await anyio.to_thread.run_sync(_notes, ctx)
    for folder, note in notes:
        if note["id"] in known or not folder.is_dir():
            continue
        files = [p for p in folder.iterdir() if p.name != CLAIM_FILE]
        moved = [p for p in files if not p.name.startswith((".", "part-"))]
        if not moved:  # the move never happened: the file is still in the inbox
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if _source_still_there(ctx, note):  # a cross-filesystem copy; the source is claimed anew
            shutil.rmtree(folder, ignore_errors=True)
            log.info("claim_copy_dropped", input_id=note["id"], file=note["rel_path"])
            continue
        fields: dict[str, Any] = {k: note[k] for k in ("id", "rel_path", "model", "kind")}
        if note.get("error") is not None:
            fields["reason"] = note.get("reason")
            fields["error"] = note["error"]
        async with ctx.store.tx() as conn:
            await ctx.store.add_input(conn, work_path=str(moved[0]), **fields)
        known.add(note["id"])
        log.info("claim_adopted", input_id=note["id"], file=note["rel_path"])
    for f in batch_files:
        f.unlink(missing_ok=True)
