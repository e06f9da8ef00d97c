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
from daemon.states import ACTIVE_JOB_STATES, InputState, JobState

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


async def gather(ctx: Context, *, started_at: float) -> Snapshot:
    """Read every number of a scrape from the store (and the API client's call counter)."""
    store = ctx.store
    now = time.time()
    snap = Snapshot(uptime=max(0.0, now - started_at))
    counts = await store.counts_by_state()
    snap.inputs = {s.value: counts.get(s.value, 0) for s in InputState}
    job_counts = await store.job_counts()
    snap.jobs = {s.value: job_counts.get(s.value, 0) for s in JobState}
    snap.active_jobs = sum(snap.jobs[s.value] for s in ACTIVE_JOB_STATES)
    snap.queue_depth = await store.requests_in(NOT_SUBMITTED)
    snap.stuck_jobs = len(await store.stuck_jobs(ctx.cfg.poll.stuck_after, now))
    oldest = await store.next_poll_at()
    snap.poll_lag = max(0.0, now - oldest) if oldest is not None else 0.0
    snap.requests, snap.tokens = await store.summary_totals(OUTCOMES, TOKEN_KINDS)
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
        for name, text, value in (
            ("active_jobs", "Remote jobs in flight", s.active_jobs),
            ("queue_depth_requests", "Requests of inputs not yet submitted", s.queue_depth),
            ("stuck_jobs", "Remote jobs pending or running too long", s.stuck_jobs),
            (
                "poll_lag_seconds",
                "How far the most overdue active job is behind its poll time",
                s.poll_lag,
            ),
        ):
            yield GaugeMetricFamily(PREFIX + name, text, value=value)
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
