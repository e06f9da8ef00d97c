"""Work in a worker thread that a shutdown can stop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import anyio

_T = TypeVar("_T")


async def run_stoppable(fn: Callable[[], _T], stop: threading.Event) -> _T:
    """``fn()`` in a worker thread; if the caller is cancelled (shutdown), ``stop`` is set so a
    long merge pass ends early (it raises :class:`~daemon.results.index.Stopped`), and the cancellation
    goes on once the thread has let go."""
    finished = threading.Event()
    box: list[_T] = []

    def run() -> _T:
        try:
            box.append(fn())
            return box[0]
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        stop.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(finished.wait, 30.0)
            for result in box:  # finished anyway: nobody will use it, release it
                close = getattr(result, "close", None)
                if close is not None:
                    await anyio.to_thread.run_sync(close)
        raise
