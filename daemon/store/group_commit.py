"""Group commit: many concurrent tasks' small writes land in one transaction.

A task hands its items to :meth:`GroupCommit.put`; whoever holds the lock writes everything pending
so far in one ``BEGIN IMMEDIATE … COMMIT``. When ``put`` returns, the caller's items are committed
(by this task or by the one that took them along).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio

from daemon.store import Store

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Batch the writes of concurrent tasks; ``write(conn, items)`` runs inside one transaction."""

    def __init__(self, store: Store, write: Callable[[Any, list[T]], Awaitable[None]]) -> None:
        self._store = store
        self._write = write
        self._pending: list[T] = []
        self._lock = anyio.Lock()

    async def put(self, items: Sequence[T]) -> None:
        """Commit ``items`` (with whatever else is pending); shielded from cancellation, because
        the callers record side effects that already happened."""
        self._pending.extend(items)
        with anyio.CancelScope(shield=True):
            async with self._lock:
                if not self._pending:
                    return  # taken along by the previous holder, which has committed them
                batch, self._pending = self._pending, []
                try:
                    async with self._store.tx() as conn:
                        await self._write(conn, batch)
                except BaseException:
                    self._pending[:0] = batch  # not written: the next holder retries them
                    raise
