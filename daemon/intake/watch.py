"""Intake, first half: watch and scan the inbox, settle, then claim (SPEC §2).

Settled drops are claimed in batches (``daemon.intake.claim``); what cannot be claimed as a request file
(symlinks, FIFOs and other non-regular files, files in a folder that is not a model id, ``*.jsonl``
nested deeper than a model folder, folders named ``*.jsonl``, names too long for their outbox files)
is moved out of the inbox the same way and rejected. Validation of claimed files is
``daemon.intake.validate_stage``.

A new drop of a path that was rejected before writes a new ``foo.error.json``; other ``foo.*`` files
of the earlier drop are left as they are until the new drop completes.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import anyio
import structlog
from anyio.abc import TaskStatus
from watchfiles import awatch

from daemon import fsio
from daemon.config import MODEL_ID_RE
from daemon.context import Context
from daemon.intake.claim import Drop, adopt_orphans, claim_many
from daemon.layout import OUTBOX_NAME_EXTRA, name_too_long

log = structlog.get_logger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", "~")
PROBE_NAME = ".gemini-batchd-watch-probe"
CLAIM_BATCH = 200  # drops claimed per transaction
ADOPT_KEY = "stage:claim-adopt"  # io_faults key while a failed batch's moved files lack rows


NESTED = "nested too deep: a drop goes directly in inbox/ or in inbox/<model-id>/"
A_FOLDER = "a folder, not a regular file"
A_SYMLINK = "a symbolic link (never followed)"
MAX_DEPTH = 8  # folders deeper than this under the inbox are not looked into


def is_jsonl(name: str) -> bool:
    """A request file's name: ``*.jsonl`` in any case, not a dotfile."""
    lower = name.lower()
    return lower.endswith(".jsonl") and not name.startswith(".")


def classify(rel: PurePosixPath) -> Literal["take", "ignore", "reject"]:
    """What to do with a path relative to the inbox, by name alone (SPEC §2)."""
    parts = rel.parts
    if not parts or any(p.startswith(".") for p in parts):
        return "ignore"
    name = parts[-1]
    if name.endswith(IGNORED_SUFFIXES) or not is_jsonl(name):
        return "ignore"
    if len(parts) > 2 or (len(parts) == 2 and not MODEL_ID_RE.match(parts[0])):
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


def _list_inbox(inbox: Path, default_model: str, outbox: Path) -> list[_Candidate]:
    """Everything under the inbox that is ours to take or reject: drops, and what only looks like
    one (symlinks, special files, folders named ``*.jsonl``, drops nested too deep, names too
    long for their outbox files)."""
    found: list[_Candidate] = []

    def add(entry: os.DirEntry[str], rel: str, model: str, reject: str | None) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return
        if reject is None and (limit := name_too_long((outbox / rel).parent, entry.name)):
            reject = (
                f"file name too long: its outbox files would exceed the file system's "
                f"{limit}-byte limit (keep the name under {limit - OUTBOX_NAME_EXTRA} bytes "
                "before .jsonl)"
            )
        found.append(_Candidate(Path(entry.path), rel, (st.st_size, st.st_mtime_ns), model, reject))

    try:
        top = list(os.scandir(inbox))
    except FileNotFoundError:
        return found
    for entry in top:
        name = entry.name
        if name.startswith("."):
            continue
        if entry.is_symlink():
            if classify(PurePosixPath(name)) != "ignore" or (
                not name.endswith(IGNORED_SUFFIXES) and os.path.isdir(entry.path)
            ):
                add(entry, name, default_model, A_SYMLINK)
        elif entry.is_dir(follow_symlinks=False):
            if is_jsonl(name) and not name.endswith(IGNORED_SUFFIXES):
                add(entry, name, default_model, A_FOLDER)
            else:
                _list_folder(entry, name, add, default_model, 1)
        elif classify(PurePosixPath(name)) == "take":
            reject = None if entry.is_file(follow_symlinks=False) else "not a regular file"
            add(entry, name, default_model, reject)
    return found


def _list_folder(folder: os.DirEntry[str], rel: str, add: Any, default: str, depth: int) -> None:
    """A model folder (depth 1) or a folder below one (whose drops are all rejected)."""
    try:
        entries = list(os.scandir(folder.path))
    except OSError:
        return
    model = folder.name if depth == 1 else default
    for entry in entries:
        sub = f"{rel}/{entry.name}"
        if entry.name.startswith(".") or entry.name.endswith(IGNORED_SUFFIXES):
            continue
        if entry.is_dir(follow_symlinks=False) and not is_jsonl(entry.name):
            if depth < MAX_DEPTH:
                _list_folder(entry, sub, add, default, depth + 1)
            continue
        if not is_jsonl(entry.name):
            continue
        if entry.is_symlink():
            add(entry, sub, model, A_SYMLINK)
        elif depth > 1:
            add(entry, sub, default, NESTED)
        elif entry.is_dir(follow_symlinks=False):
            add(entry, sub, model, A_FOLDER)
        elif not entry.is_file(follow_symlinks=False):
            add(entry, sub, model, "not a regular file")
        elif not MODEL_ID_RE.match(folder.name):
            add(entry, sub, model, f"folder name {folder.name!r} is not a model id")
        else:
            add(entry, sub, model, None)


async def scan_once(ctx: Context, settle: SettleTracker) -> int:
    """One pass over the inbox: claim (or reject) every settled drop, ``CLAIM_BATCH`` per
    transaction; returns how many."""
    cfg = ctx.cfg
    if ADOPT_KEY in ctx.io_faults.active():  # a failed batch left moved files without rows
        await _adopt_after_failure(ctx)
    found = await anyio.to_thread.run_sync(
        _list_inbox, cfg.inbox_dir, cfg.gemini.default_model, cfg.outbox_dir
    )
    settle.retain({c.rel for c in found})
    ready: list[Drop] = []
    for c in found:
        if settle.settled(c.rel, c.sig):
            settle.forget(c.rel)
            ready.append(Drop(c.path, c.rel, c.model, c.reject))
    done = 0
    for i in range(0, len(ready), CLAIM_BATCH):
        batch = ready[i : i + CLAIM_BATCH]
        try:
            done += len(await claim_many(ctx, batch))
        except (OSError, sqlite3.Error) as e:
            log.warning("claim_failed", files=[d.rel for d in batch][:10], error=str(e))
            ctx.io_faults.fail("stage:claim", "cannot claim files from the inbox", e)
            ctx.io_faults.fail(ADOPT_KEY, "moved files wait for their rows", e)
            await _adopt_after_failure(ctx)
    return done


async def _adopt_after_failure(ctx: Context) -> None:
    """A batch failed after some of its files moved (its commit lost: EIO, a full disk): adopt
    them from its note now rather than at the next start (and at each scan until that works).
    Only this stage claims, so no other batch is half-way meanwhile."""
    try:
        await adopt_orphans(ctx)
    except (OSError, sqlite3.Error) as e:
        ctx.io_faults.fail(ADOPT_KEY, "moved files wait for their rows", e)
    else:
        ctx.io_faults.clear(ADOPT_KEY)
        ctx.wake.validate.set()


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
            if "stage:claim" in ctx.io_faults.active():  # files left behind by a failed move
                delay = min(delay, ctx.io_faults.retry_in("stage:claim") + cfg.inbox.settle_seconds)
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


def _touch(inbox: Path) -> None:
    """Write the probe as a new file: the inbox is shared, so a link planted at its name is
    removed, never written through (:func:`daemon.fsio.open_new`)."""
    with fsio.open_dir(inbox, create=False) as dfd:
        try:
            fd = fsio.open_new(dfd, PROBE_NAME)
        except FileExistsError:  # taken again meanwhile (or a folder): the next round tries
            return
        try:
            os.write(fd, b"%f" % time.time())
        finally:
            os.close(fd)


async def _prove_watcher(inbox: Path, seen: anyio.Event, limit: float = 10.0) -> None:
    """Touch a probe dotfile until the watcher reports it: from then on no drop is missed."""
    probe = inbox / PROBE_NAME
    try:
        with anyio.move_on_after(limit) as scope:
            while not seen.is_set():
                _touch(inbox)
                with anyio.move_on_after(0.5):
                    await seen.wait()
        if scope.cancelled_caught:
            log.warning("inbox_watcher_unconfirmed", inbox=str(inbox))
    finally:
        probe.unlink(missing_ok=True)
