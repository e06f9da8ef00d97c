"""Typed rows: what a store method returns, column by column (``schema.py`` has the meaning of
each). A query that joins input fields onto a job returns its own type, so ``job["model"]``
type-checks only where the row has it."""

from __future__ import annotations

from typing import TypedDict


class InputRow(TypedDict):
    id: str
    rel_path: str
    model: str
    kind: str
    state: str
    reason: str | None
    work_path: str
    size_bytes: int | None
    sha256: str | None
    request_count: int | None
    est_tokens: int | None
    fresh: int
    media_count: int
    cancel_requested: int
    reused_from: str | None
    error: str | None
    summary: str | None
    results_path: str | None
    created_at: float
    updated_at: float
    finished_at: float | None


class JobRow(TypedDict):
    id: int
    input_id: str
    part_no: int
    attempt: int
    display_name: str
    state: str
    mode: str
    source_path: str
    source_start: int | None
    source_end: int | None
    request_count: int
    est_tokens: int
    upload_name: str | None
    remote_name: str | None
    remote_state: str | None
    result_file: str | None
    results_path: str | None
    done_count: int
    failed_count: int
    pending_count: int
    error: str | None
    not_before: float
    poll_interval: float | None
    next_poll_at: float | None
    remote_create_time: str | None
    remote_end_time: str | None
    key_fp: str | None
    submit_retries: int
    check_remote: int | None
    submit_error: str | None
    created_at: float
    updated_at: float
    submitted_at: float | None
    finished_at: float | None


class DueJob(JobRow):
    """A job due for submission, with the input fields the submitter needs."""

    model: str
    kind: str
    media_count: int
    cancel_requested: int


class PollJob(JobRow):
    """An active job due to be asked, with its input's reason and cancel flag."""

    input_reason: str | None
    input_cancel: int


class CollectJob(JobRow):
    """A ``done`` job due to be collected, with its input's request count."""

    input_requests: int | None
