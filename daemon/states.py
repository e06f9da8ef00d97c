"""The one vocabulary shared by every stage: states (store, API answers, logs, socket), the
remote jobs' display names, model kinds and the reasons the stages write."""

from enum import StrEnum
from typing import Literal

Kind = Literal["generate", "embed"]

# An input's reason while its jobs are out of sight of the key in use (daemon.track.missing).
NOT_VISIBLE = "not visible with the current API key"
# The error of a job the API no longer knows (404), for good or released from a hold by `retry`.
LOST_JOB_ERROR = {
    "code": 404,
    "status": "NOT_FOUND",
    "message": "remote job disappeared",
    "lost": True,
}


def display_name(input_id: str, part_no: int, attempt: int) -> str:
    """``gemini-batchd:<id>:<part>`` for attempt 1, ``...:<part>:<attempt>`` after."""
    base = f"gemini-batchd:{input_id}:{part_no}"
    return base if attempt <= 1 else f"{base}:{attempt}"


def model_kind(model: str) -> Kind:
    """Embedding models get an embeddings batch (``asyncBatchEmbedContent``)."""
    return "embed" if "embedding" in model else "generate"


class InputState(StrEnum):
    """Lifecycle of an input (a file the user dropped), SPEC §5."""

    SEEN = "seen"
    VALIDATING = "validating"
    QUEUED = "queued"
    UPLOADING = "uploading"
    SUBMITTED = "submitted"
    RUNNING = "running"
    DOWNLOADING = "downloading"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def final(self) -> bool:
        return self in FINAL_INPUT_STATES


FINAL_INPUT_STATES = frozenset(
    {
        InputState.SUCCEEDED,
        InputState.PARTIAL,
        InputState.FAILED,
        InputState.EXPIRED,
        InputState.CANCELLED,
        InputState.REJECTED,
    }
)

# States from which `retry` may resubmit unanswered requests (SPEC §6).
RETRYABLE_INPUT_STATES = frozenset(
    {InputState.FAILED, InputState.EXPIRED, InputState.PARTIAL, InputState.CANCELLED}
)


class JobState(StrEnum):
    """Local lifecycle of one remote batch job (one attempt of one part)."""

    PLANNED = "planned"  # row exists; nothing spent yet (waits for admission)
    UPLOADING = "uploading"  # input file upload in progress
    CREATING = "creating"  # intent committed; batches.create may or may not have happened
    ACTIVE = "active"  # remote name known; pending or running remotely
    DONE = "done"  # remote job reached a terminal state; results not yet collected
    COLLECTED = "collected"  # results downloaded and indexed locally
    CANCELLED = "cancelled"  # cancelled locally before it was ever created


ACTIVE_JOB_STATES = frozenset({JobState.UPLOADING, JobState.CREATING, JobState.ACTIVE})


class RemoteState(StrEnum):
    """Batch states as the REST API spells them (`metadata.state`)."""

    UNSPECIFIED = "BATCH_STATE_UNSPECIFIED"
    PENDING = "BATCH_STATE_PENDING"
    RUNNING = "BATCH_STATE_RUNNING"
    SUCCEEDED = "BATCH_STATE_SUCCEEDED"
    FAILED = "BATCH_STATE_FAILED"
    CANCELLED = "BATCH_STATE_CANCELLED"
    EXPIRED = "BATCH_STATE_EXPIRED"

    @property
    def terminal(self) -> bool:
        return self in {
            RemoteState.SUCCEEDED,
            RemoteState.FAILED,
            RemoteState.CANCELLED,
            RemoteState.EXPIRED,
        }
