"""Stages that stop on a local disk fault (a full or read-only disk, EIO) are started again.

A stage is a loop over the store that keeps nothing between rounds that the store does not hold,
so starting it again is as safe as starting the daemon again: what the failing round committed
stands, what it did not is redone. The supervisor records the fault (``status``, STATUS=, a log
line), waits with backoff until the folder where it happened takes a probe write again, runs the
stage's own recovery and starts it again. Any other exception still ends the daemon.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from daemon.context import Context
from daemon.io_faults import fault_path, is_disk_fault, writable

log = structlog.get_logger(__name__)

Stage = Callable[..., Awaitable[None]]
Recover = Callable[[Context], Awaitable[Any]]


class _StartedOnce:
    """Hands ``started()`` to the real task status the first time only."""

    def __init__(self, status: TaskStatus[Any]) -> None:
        self._status = status
        self.done = False

    def started(self, value: Any = None) -> None:
        if not self.done:
            self.done = True
            self._status.started(value)


async def supervised(
    ctx: Context,
    name: str,
    stage: Stage,
    recover: Recover | None = None,
    *,
    task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``stage(ctx, task_status=...)``; after a disk fault, wait it out and run it again."""
    once = _StartedOnce(task_status)
    key = f"stage:{name}"
    while True:
        try:
            if once.done and recover is not None:
                await recover(ctx)
            await stage(ctx, task_status=once)
            return
        except Exception as e:
            if not is_disk_fault(e):
                raise
            once.started()  # one that failed while starting: the daemon goes on meanwhile
            await wait_out(ctx, key, f"{name} paused", e)


async def wait_out(ctx: Context, key: str, doing: str, e: BaseException) -> None:
    """Until the folder of the fault takes a write again (probing with backoff)."""
    folder: Path = fault_path(e, ctx.cfg.state_dir)
    delay = ctx.io_faults.fail(key, doing, e)
    while True:
        await anyio.sleep(delay)
        if await anyio.to_thread.run_sync(writable, folder):
            break
        delay = ctx.io_faults.fail(key, doing, e)
    ctx.io_faults.clear(key)
    log.info("io_fault_resumed", key=key, folder=str(folder))


async def with_retry(ctx: Context, name: str, step: Recover) -> None:
    """Run a one-off ``step`` (recovery at start) until no disk fault stops it."""
    while True:
        try:
            await step(ctx)
            return
        except Exception as e:
            if not is_disk_fault(e):
                raise
            await wait_out(ctx, f"stage:{name}", f"{name} paused", e)
