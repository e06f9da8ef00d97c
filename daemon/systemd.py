"""sd_notify(3) by hand: readiness, status and the watchdog for a Type=notify service.

The protocol is one AF_UNIX/SOCK_DGRAM datagram of newline-separated KEY=VALUE lines sent to
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). Outside systemd every call is a
no-op returning False. Nothing here raises on a send error or logs: systemd itself recommends
ignoring the result, and logging from inside the watchdog could itself wedge.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import anyio
import structlog
from anyio.abc import TaskStatus

__all__ = [
    "extend_timeout",
    "notify",
    "ready",
    "run_watchdog",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_ping",
]

_SEND_TIMEOUT = 1.0  # seconds; PID 1 drains its queue fast, this only bounds a pathological stall


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines to systemd. True if sent; False when not under systemd or on error."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not lines:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # Linux abstract namespace
    elif addr[0] != "/":
        return False  # vsock and other transports (systemd >= 253) are not supported
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(addr)
            sock.sendall("\n".join(lines).encode("utf-8", "replace"))
    except (OSError, ValueError):
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).replace("\r", " ")


def ready(status: str | None = None) -> bool:
    """``READY=1`` (plus ``STATUS=``): startup is finished, recovery done, the watcher is live."""
    return notify("READY=1", *([f"STATUS={_one_line(status)}"] if status is not None else []))


def stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: the shutdown has begun (send it as soon as SIGTERM is handled)."""
    return notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status is not None else []))


def status(text: str) -> bool:
    """``STATUS=<one line>``, shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_ping() -> bool:
    """``WATCHDOG=1``: the service is alive."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """``EXTEND_TIMEOUT_USEC=``: ask for more time to start or stop (a long recovery or drain)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``), or None if the watchdog is not ours."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    try:
        if not usec or int(usec) <= 0 or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2_000_000
    except ValueError:
        return None


async def run_watchdog(
    healthy: Callable[[], bool],
    *,
    interval: float | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Ping ``WATCHDOG=1`` every *interval* seconds while ``healthy()`` is true; run until cancelled.

    Start it with ``await tg.start(run_watchdog, healthy)``. With no interval (no ``WatchdogSec=``)
    it returns right after ``task_status.started()``. An unhealthy (or raising) ``healthy()`` skips
    the ping, so a wedged loop turns into a watchdog restart instead of a silent hang.
    """
    if interval is None:
        interval = watchdog_interval()
    task_status.started()
    if interval is None:
        return
    log = structlog.get_logger(__name__)
    was_healthy = True
    while True:
        try:
            ok = bool(healthy())
        except Exception:
            log.exception("watchdog_health_check_failed")
            ok = False
        if ok:
            watchdog_ping()
        elif was_healthy:
            log.warning("watchdog_ping_withheld", reason="daemon unhealthy")
        was_healthy = ok
        await anyio.sleep(interval)
