"""What every stage is given: config, store, API client, folders, and wake-up signals.

Stages are stateless loops over the store. A :class:`Wakeup` lets one stage nudge the next
(e.g. intake → validation) so that work moves on at once instead of at the next timer tick;
the timer is only the safety net.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import anyio

from daemon.config import Config
from daemon.io_faults import IOFaults
from daemon.layout import jsonl_stem
from daemon.store import Store

if TYPE_CHECKING:
    from daemon.gemini import ApiError, GeminiClient


class Wakeup:
    """A level-triggered nudge: ``set()`` from anywhere, ``wait(timeout)`` in one loop."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Wait until set or ``timeout`` seconds; returns whether it was set. Clears it."""
        with anyio.move_on_after(timeout):
            await self._event.wait()
        was_set = self._event.is_set()
        if was_set:
            self._event = anyio.Event()
        return was_set


class KeyedLocks:
    """One ``anyio.Lock`` per key, made on first use and dropped when nobody holds or waits."""

    def __init__(self) -> None:
        self._entries: dict[str, list[Any]] = {}  # key → [lock, holders and waiters]

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._entries.setdefault(key, [anyio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._entries[key]


@dataclass
class Wakeups:
    validate: Wakeup = field(default_factory=Wakeup)
    submit: Wakeup = field(default_factory=Wakeup)
    poll: Wakeup = field(default_factory=Wakeup)
    collect: Wakeup = field(default_factory=Wakeup)
    scan: Wakeup = field(default_factory=Wakeup)


class Backpressure:
    """Submission first: while admitted jobs wait for a submit worker, polling and collecting
    yield (a job submitted earlier finishes earlier at the API). The submitter sets the backlog;
    pollers and collectors consult it; its end wakes them at once."""

    def __init__(self, wake: Wakeups) -> None:
        self._wake = wake
        self.backlog = False

    def set_backlog(self, backlog: bool) -> None:
        if self.backlog and not backlog:  # end their yield_to_submission
            self._wake.poll.set()
            self._wake.collect.set()
        self.backlog = backlog

    async def yield_to_submission(self, wake: Wakeup, seconds: float) -> None:
        """Wait ``seconds``, or less if the backlog ends (which sets ``wake``); other nudges
        are ignored."""
        deadline = time.monotonic() + seconds
        while self.backlog and (left := deadline - time.monotonic()) > 0:
            await wake.wait(left)


@dataclass
class Context:
    cfg: Config
    store: Store
    gemini: GeminiClient | None = None  # None for commands that never talk to the API
    wake: Wakeups = field(default_factory=Wakeups)
    metrics: Any = None  # daemon.control.metrics.Metrics once the control socket exists
    # Set by stages so that status can say what is going on without a query.
    last_api_error: dict[str, Any] | None = None
    backpressure: Backpressure = field(init=False)
    # The fingerprint of the API key in use (GeminiClient.key_fingerprint), recorded per job.
    key_fp: str | None = None

    # One writer at a time per outbox path (drops of the same name finishing together).
    _outbox_locks: KeyedLocks = field(default_factory=KeyedLocks)
    # One upload at a time per media content hash (jobs sharing a file upload it once).
    media_locks: KeyedLocks = field(default_factory=KeyedLocks)
    # One retry at a time, so two clients cannot plan the same retry twice.
    retry_lock: anyio.Lock = field(default_factory=anyio.Lock)

    def __post_init__(self) -> None:
        self.backpressure = Backpressure(self.wake)

    def note_api_error(self, e: ApiError) -> None:
        """Remember the last API error for ``status``."""
        self.last_api_error = {
            "at": time.time(),
            "endpoint": e.endpoint,
            "kind": e.kind,
            **e.to_json(),
        }

    @asynccontextmanager
    async def outbox_lock(self, rel_path: str) -> AsyncIterator[None]:
        """Held while an input of ``rel_path`` decides on and writes its outbox files."""
        rel = PurePosixPath(rel_path)
        key = str(rel.parent / jsonl_stem(rel.name))  # x.jsonl and x.JSONL share their files
        async with self._outbox_locks.hold(key):
            yield

    # Work paused on a full, read-only or failing local disk (see daemon.io_faults).
    io_faults: IOFaults = field(default_factory=IOFaults)

    @property
    def work_dir(self) -> Path:
        return self.cfg.state_dir / "work"

    def input_dir(self, input_id: str) -> Path:
        return self.work_dir / input_id

    @property
    def results_dir(self) -> Path:
        return self.cfg.state_dir / "results"
