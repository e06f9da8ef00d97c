"""Limits on the control socket's connections: a header timeout, an idle timeout and a cap.

aiohttp closes a connection idle between requests after its ``keepalive_timeout``
(``[control] idle_timeout``) but has no limit on how long a request header may take nor on how
many connections are open. :class:`ConnectionGuard` is the protocol factory of the listening
socket: it wraps each of aiohttp's protocols, closes a connection whose first request header has
not arrived within ``header_timeout``, and at ``max_connections`` makes room by closing the
connection that has waited longest without a request in progress (idle or half-sent), so that a
flood of idle clients never locks the CLI out. Only when every connection is busy is a new one
answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from daemon.config import ControlConfig

log = structlog.get_logger(__name__)

_BUSY_BODY = b'{"error": {"code": 503, "message": "too many connections to the daemon"}}\n'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol behind a header timer and a busy count."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""  # the last bytes seen, to find a header's end across reads
        self.busy = 0  # requests being handled (set by the app's middleware)
        self.since = time.monotonic()  # last activity

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.guard.pending -= 1
        self.guard.open[transport] = self
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.guard.cfg.header_timeout, self._expire)
        self.inner.connection_made(transport)

    def _expire(self) -> None:
        self.timer = None
        if self.transport is not None and not self.busy:
            log.info("control_connection_timed_out", why="no request header")
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.since = time.monotonic()
        if self.timer is not None:
            seen = self.tail + data
            if b"\r\n\r\n" in seen:
                self.timer.cancel()
                self.timer = None
            self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.guard.open.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_BUSY)
        transport.close()


class ConnectionGuard:
    """The protocol factory for ``loop.create_server``, in front of aiohttp's ``web.Server``."""

    def __init__(self, cfg: ControlConfig, server: Callable[[], Any]) -> None:
        self.cfg = cfg
        self.server = server
        self.open: dict[asyncio.Transport, _Guarded] = {}
        self.pending = 0  # accepted, not yet connected (a burst of accepts in one loop turn)
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        full = len(self.open) + self.pending >= self.cfg.max_connections
        if full and not self._make_room():
            self.refused += 1
            return _Refused()
        self.pending += 1
        return _Guarded(self, self.server())

    def _make_room(self) -> bool:
        idle = [c for c in self.open.values() if not c.busy]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.since)
        assert oldest.transport is not None
        self.open.pop(oldest.transport, None)  # counted out now: its close completes later
        oldest.transport.close()
        return True

    def request_started(self, transport: Any) -> _Guarded | None:
        """Mark the connection of a request as busy (never evicted nor timed out meanwhile)."""
        conn = self.open.get(transport)
        if conn is not None:
            conn.busy += 1
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
        return conn

    @staticmethod
    def request_ended(conn: _Guarded | None) -> None:
        if conn is not None:
            conn.busy -= 1
            conn.since = time.monotonic()
