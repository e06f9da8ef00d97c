"""Local I/O faults (a full or read-only disk, EIO): pause the affected work, say why, retry.

A fault is kept in memory under a key (``input:<id>`` for one input's step, ``stage:<name>`` for
a stage that stopped on it) with a one-line message and a backoff: the work is tried again when
its backoff is due and the fault is cleared when that works. Nothing here needs to survive a
restart: the store holds the work, this only spaces the retries and tells ``status`` why.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from daemon.context import Context

log = structlog.get_logger(__name__)

# Errors of the machine, not of the input: retried later instead of failing anything.
DISK_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}
)
_SQLITE_DISK = ("disk is full", "disk i/o error", "readonly database", "unable to open database")


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


def is_disk_fault(e: BaseException) -> bool:
    """Whether ``e`` (or every exception of a group) is a local disk fault worth waiting out."""
    leaves = _leaves(e)
    return bool(leaves) and all(_is_one(leaf) for leaf in leaves)


def _is_one(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in DISK_ERRNOS
    if isinstance(e, sqlite3.OperationalError):
        return any(s in str(e).lower() for s in _SQLITE_DISK)
    return False


def describe(e: BaseException) -> str:
    """One line for a disk fault: what failed and where."""
    leaf = _leaves(e)[0]
    if isinstance(leaf, OSError):
        where = f": {leaf.filename}" if leaf.filename else ""
        return f"{leaf.strerror or leaf}{where}"
    if isinstance(leaf, sqlite3.OperationalError):
        return f"state database: {leaf}"
    return str(leaf)


def fault_path(e: BaseException, fallback: Path) -> Path:
    """The folder to probe before retrying: where the failing file is, else ``fallback``."""
    leaf = _leaves(e)[0]
    name = getattr(leaf, "filename", None)
    path = Path(os.fsdecode(name)) if isinstance(name, str | bytes) else fallback
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def writable(folder: Path, size: int = 64 * 1024) -> bool:
    """Whether ``size`` bytes can be written and fsynced in ``folder`` now (a probe file)."""
    probe = folder / f".gemini-batchd-probe-{uuid.uuid4().hex[:8]}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(probe, flags, 0o600)  # a new file of ours: never through a planted link
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


@dataclass
class _Fault:
    message: str
    attempts: int
    due: float


class IOFaults:
    """The faults in force, with their backoff (``initial`` doubling up to ``maximum``)."""

    def __init__(
        self,
        initial: float = 1.0,
        maximum: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._clock = clock
        self._faults: dict[str, _Fault] = {}

    def fail(self, key: str, doing: str, e: BaseException) -> float:
        """Record that ``doing`` failed on ``e``; returns the seconds until the next try."""
        old = self._faults.get(key)
        attempts = (old.attempts if old else 0) + 1
        delay = min(self.maximum, self.initial * 2 ** (attempts - 1))
        message = f"{doing}: {describe(e)}"
        self._faults[key] = _Fault(message, attempts, self._clock() + delay)
        log.warning("io_fault", key=key, error=message, attempt=attempts, retry_in=round(delay, 3))
        return delay

    def clear(self, key: str) -> None:
        if self._faults.pop(key, None) is not None:
            log.info("io_fault_cleared", key=key)

    def due(self, key: str) -> bool:
        f = self._faults.get(key)
        return f is None or self._clock() >= f.due

    def next_due(self) -> float | None:
        """Seconds until the earliest retry (None: no fault)."""
        if not self._faults:
            return None
        return max(0.0, min(f.due for f in self._faults.values()) - self._clock())

    def retry_in(self, key: str) -> float:
        f = self._faults.get(key)
        return 0.0 if f is None else max(0.0, f.due - self._clock())

    def active(self) -> dict[str, str]:
        """``key → message`` of every fault in force."""
        return {k: f.message for k, f in self._faults.items()}

    def summary(self) -> str | None:
        """One line for STATUS= and logs, or None."""
        if not self._faults:
            return None
        first = next(iter(self._faults.values())).message
        more = f" (+{len(self._faults) - 1} more)" if len(self._faults) > 1 else ""
        return f"paused on a local I/O fault: {first}{more}"


async def input_paused(ctx: Context, input_id: str, doing: str, e: BaseException) -> None:
    """One input's step failed on the disk: its reason says so (when the store takes the write;
    else ``status`` has it from memory) and it waits for its backoff."""
    key = f"input:{input_id}"
    delay = ctx.io_faults.fail(key, doing, e)
    reason = f"{ctx.io_faults.active()[key]}; retrying in {delay:g} s"
    try:
        async with ctx.store.tx() as conn:
            await ctx.store.update_input(conn, input_id, reason=reason)
    except sqlite3.Error as db_error:
        log.warning("io_fault_reason_not_stored", input_id=input_id, error=str(db_error))
