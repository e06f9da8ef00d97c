"""What the socket and the metrics count: read-only queries over committed state."""

from __future__ import annotations

import time
from collections.abc import Iterable

from daemon.states import InputState, JobState, RemoteState
from daemon.store.base import Row, StoreBase


class StatsRows(StoreBase):
    """Counts and sums for ``status`` and ``/metrics``."""

    async def job_counts(self) -> dict[str, int]:
        rows = await self.fetchall("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    async def count_jobs_in(self, states: Iterable[JobState]) -> int:
        values = [s.value for s in states]
        marks = ", ".join("?" for _ in values)
        value = await self.scalar(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", values)
        return int(value or 0)

    async def requests_in(self, states: Iterable[InputState]) -> int:
        """The requests of the inputs in ``states``."""
        values = [s.value for s in states]
        marks = ", ".join("?" for _ in values)
        value = await self.scalar(
            f"SELECT COALESCE(SUM(request_count), 0) FROM inputs WHERE state IN ({marks})", values
        )
        return int(value or 0)

    async def stuck_jobs(self, stuck_after: float, now: float | None = None) -> list[Row]:
        """Active jobs pending/running remotely for longer than ``stuck_after`` seconds."""
        now = time.time() if now is None else now
        return await self.fetchall(
            "SELECT id, input_id, display_name, remote_name, remote_state, submitted_at FROM jobs "
            "WHERE state = ? AND submitted_at IS NOT NULL AND submitted_at < ? "
            "AND COALESCE(remote_state, '') IN (?, ?, ?, '') ORDER BY submitted_at",
            (
                JobState.ACTIVE.value,
                now - stuck_after,
                RemoteState.PENDING.value,
                RemoteState.RUNNING.value,
                RemoteState.UNSPECIFIED.value,
            ),
        )

    async def summary_totals(
        self, outcomes: Iterable[str], token_kinds: Iterable[str]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Requests per outcome and tokens per kind over the summaries of finished inputs
        (SQLite's JSON functions: a scrape does not parse every summary in Python). Tokens of
        reused inputs (served from an earlier identical drop) were not spent again."""
        outcomes, token_kinds = list(outcomes), list(token_kinds)
        sums = ", ".join(
            [
                f"COALESCE(SUM(json_extract(summary, '$.requests.{o}')), 0) AS r_{o}"
                for o in outcomes
            ]
            + [
                f"COALESCE(SUM(CASE WHEN reused_from IS NULL THEN "
                f"json_extract(summary, '$.tokens.{k}') END), 0) AS t_{k}"
                for k in token_kinds
            ]
        )
        row = await self.fetchone(
            f"SELECT {sums} FROM inputs WHERE summary IS NOT NULL AND json_valid(summary)"
        )
        assert row is not None
        return (
            {o: int(row[f"r_{o}"]) for o in outcomes},
            {k: int(row[f"t_{k}"]) for k in token_kinds},
        )
