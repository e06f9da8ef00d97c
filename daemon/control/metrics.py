"""Prometheus metrics, read from the store at scrape time (``GET /metrics`` on the control socket).

Each daemon has its own ``CollectorRegistry`` (never the global one). The store is async and
prometheus collectors are sync, so a scrape first gathers a :class:`Snapshot` with async queries,
then renders it with ``generate_latest``.

Metrics (all prefixed ``gemini_batchd_``):

- ``gemini_batchd_info{version}`` — always 1.
- ``gemini_batchd_uptime_seconds`` — seconds since the daemon started.
- ``gemini_batchd_inputs{state}`` — inputs by state (every state, 0 included).
- ``gemini_batchd_jobs{state}`` — local job rows by state (planned, uploading, creating, active, ...).
- ``gemini_batchd_active_jobs`` — remote jobs in flight (uploading, creating or active).
- ``gemini_batchd_queue_depth_requests`` — requests of inputs not yet submitted (seen … uploading).
- ``gemini_batchd_stuck_jobs`` — remote jobs pending/running longer than ``[poll] stuck_after``.
- ``gemini_batchd_poll_lag_seconds`` — how far the most overdue active job is behind its poll time.
- ``gemini_batchd_requests_total{outcome}`` — requests of finished inputs, outcome succeeded|failed.
- ``gemini_batchd_tokens_total{kind}`` — tokens spent by finished inputs (reused ones excluded),
  kind prompt|candidates|thoughts|cached.
- ``gemini_batchd_api_calls_total{endpoint,code}`` — API calls by endpoint and HTTP code.
- ``gemini_batchd_api_errors_total{endpoint,code}`` — the calls among them that failed (code not 2xx).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from daemon import __version__
from daemon.context import Context
from daemon.states import ACTIVE_JOB_STATES, InputState, JobState, RemoteState
from daemon.store import Store

PREFIX = "gemini_batchd_"
NOT_SUBMITTED = (
    InputState.SEEN,
    InputState.VALIDATING,
    InputState.QUEUED,
    InputState.UPLOADING,
)
TOKEN_KINDS = ("prompt", "candidates", "thoughts", "cached")
OUTCOMES = ("succeeded", "failed")


@dataclass
class Snapshot:
    """The numbers of one scrape."""

    uptime: float = 0.0
    inputs: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    active_jobs: int = 0
    queue_depth: int = 0
    stuck_jobs: int = 0
    poll_lag: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    api_calls: dict[tuple[str, str], int] = field(default_factory=dict)


async def queue_depth(store: Store) -> int:
    """Requests of non-final inputs that are not yet submitted."""
    marks = ", ".join("?" for _ in NOT_SUBMITTED)
    value = await store.scalar(
        f"SELECT COALESCE(SUM(request_count), 0) FROM inputs WHERE state IN ({marks})",
        [s.value for s in NOT_SUBMITTED],
    )
    return int(value or 0)


async def stuck_jobs(store: Store, stuck_after: float, now: float | None = None) -> list[Any]:
    """Active jobs pending/running remotely for longer than ``stuck_after`` seconds."""
    now = time.time() if now is None else now
    return await store.fetchall(
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


async def gather(ctx: Context, *, started_at: float) -> Snapshot:
    """Read every number of a scrape from the store (and the API client's call counter)."""
    store = ctx.store
    now = time.time()
    snap = Snapshot(uptime=max(0.0, now - started_at))
    counts = await store.counts_by_state()
    snap.inputs = {s.value: counts.get(s.value, 0) for s in InputState}
    rows = await store.fetchall("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
    job_counts = {r["state"]: r["n"] for r in rows}
    snap.jobs = {s.value: job_counts.get(s.value, 0) for s in JobState}
    snap.active_jobs = sum(snap.jobs[s.value] for s in ACTIVE_JOB_STATES)
    snap.queue_depth = await queue_depth(store)
    snap.stuck_jobs = len(await stuck_jobs(store, ctx.cfg.poll.stuck_after, now))
    oldest = await store.scalar(
        "SELECT MIN(next_poll_at) FROM jobs WHERE state = ? AND next_poll_at IS NOT NULL",
        (JobState.ACTIVE.value,),
    )
    snap.poll_lag = max(0.0, now - oldest) if oldest is not None else 0.0
    # Totals of finished inputs, from the summary the collector wrote (SQLite's JSON functions,
    # so a scrape does not parse every summary in Python).
    # Tokens of reused inputs (served from an earlier identical drop) were not spent again.
    sums = ", ".join(
        [f"COALESCE(SUM(json_extract(summary, '$.requests.{o}')), 0) AS r_{o}" for o in OUTCOMES]
        + [
            f"COALESCE(SUM(CASE WHEN reused_from IS NULL THEN "
            f"json_extract(summary, '$.tokens.{k}') END), 0) AS t_{k}"
            for k in TOKEN_KINDS
        ]
    )
    row = await store.fetchone(
        f"SELECT {sums} FROM inputs WHERE summary IS NOT NULL AND json_valid(summary)"
    )
    assert row is not None
    snap.requests = {o: int(row[f"r_{o}"]) for o in OUTCOMES}
    snap.tokens = {k: int(row[f"t_{k}"]) for k in TOKEN_KINDS}
    calls: Mapping[Any, int] | None = getattr(ctx.gemini, "calls", None)
    if calls:
        snap.api_calls = {(str(ep), str(code)): int(n) for (ep, code), n in dict(calls).items()}
    return snap


def _is_error(code: str) -> bool:
    return not (code.isdigit() and 200 <= int(code) < 300)


class _SnapshotCollector:
    """Turns the snapshot set just before ``generate_latest`` into metric families."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def describe(self) -> list[Metric]:
        return []  # names are dynamic enough; skip the registry's duplicate check

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        if s is None:
            return
        info = GaugeMetricFamily(PREFIX + "info", "gemini-batchd build", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            PREFIX + "uptime_seconds", "Seconds since the daemon started", value=s.uptime
        )
        inputs = GaugeMetricFamily(PREFIX + "inputs", "Inputs by state", labels=["state"])
        for state, n in s.inputs.items():
            inputs.add_metric([state], n)
        yield inputs
        jobs = GaugeMetricFamily(PREFIX + "jobs", "Local job rows by state", labels=["state"])
        for state, n in s.jobs.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily(
            PREFIX + "active_jobs", "Remote jobs in flight", value=s.active_jobs
        )
        yield GaugeMetricFamily(
            PREFIX + "queue_depth_requests",
            "Requests of inputs not yet submitted",
            value=s.queue_depth,
        )
        yield GaugeMetricFamily(
            PREFIX + "stuck_jobs", "Remote jobs pending or running too long", value=s.stuck_jobs
        )
        yield GaugeMetricFamily(
            PREFIX + "poll_lag_seconds",
            "How far the most overdue active job is behind its poll time",
            value=s.poll_lag,
        )
        req = CounterMetricFamily(
            PREFIX + "requests", "Requests of finished inputs by outcome", labels=["outcome"]
        )
        for outcome, n in s.requests.items():
            req.add_metric([outcome], n)
        yield req
        tok = CounterMetricFamily(
            PREFIX + "tokens", "Tokens of finished inputs by kind", labels=["kind"]
        )
        for kind, n in s.tokens.items():
            tok.add_metric([kind], n)
        yield tok
        calls = CounterMetricFamily(
            PREFIX + "api_calls", "Gemini API calls", labels=["endpoint", "code"]
        )
        errors = CounterMetricFamily(
            PREFIX + "api_errors", "Gemini API calls that failed", labels=["endpoint", "code"]
        )
        for (endpoint, code), n in sorted(s.api_calls.items()):
            calls.add_metric([endpoint, code], n)
            if _is_error(code):
                errors.add_metric([endpoint, code], n)
        yield calls
        yield errors


class Metrics:
    """The daemon's metrics registry; ``await render(ctx)`` gives the Prometheus text."""

    def __init__(self, *, started_at: float | None = None) -> None:
        self.started_at = time.time() if started_at is None else started_at
        self.registry = CollectorRegistry()
        self._collector = _SnapshotCollector()
        self.registry.register(self._collector)  # type: ignore[arg-type]

    async def render(self, ctx: Context) -> bytes:
        snap = await gather(ctx, started_at=self.started_at)
        # No await between setting the snapshot and rendering: concurrent scrapes cannot mix.
        self._collector.snapshot = snap
        return generate_latest(self.registry)
