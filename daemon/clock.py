"""Time as the outbox documents and the socket spell it: ISO 8601 in UTC with a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: float | None, timespec: str = "seconds") -> str | None:
    """``ts`` (a Unix time) as ``2026-01-02T03:04:05Z``; ``timespec`` as for
    :meth:`datetime.isoformat` (``"auto"`` keeps microseconds); None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
