"""Settings, fault injection and call statistics."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

ENDPOINTS = (
    "files.upload",
    "files.upload_chunk",
    "files.get",
    "files.list",
    "files.delete",
    "files.download",
    "batches.create",
    "batches.create_embeddings",
    "batches.get",
    "batches.list",
    "batches.cancel",
    "batches.delete",
)
CREATE_ENDPOINTS = ("batches.create", "batches.create_embeddings")
KINDS = ("429", "500", "503", "drop", "create_then_503", "create_then_drop")


@dataclass
class EmulatorSettings:
    """Behaviour of the emulator; every field can be changed at runtime (POST /__emulator/config)."""

    pending_seconds: float = 0.2
    running_seconds: float = 0.5
    shuffle_results: bool = True
    api_key: str | None = None
    max_active_jobs: int = 100
    max_enqueued_tokens: dict[str, int] = field(default_factory=dict)
    fault_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    seed: int = 0
    # `error.code` of a cancelled job (13, as the real API answers; e.g. 1 to play an old guess).
    cancel_error_code: int = 13
    # Seconds a SUCCEEDED file job reports no `responsesFile` after it ended (ellmer: "The API can
    # report BATCH_STATE_SUCCEEDED before responsesFile is populated"); read at each get.
    results_file_delay: float = 0.0
    # Inline responses without their `metadata` (python-genai#2008, SRCLIB #816).
    drop_inline_metadata: bool = False
    # python-genai#1613/#1759: files.get/delete refuse ids over 40 chars (`batch-<36>` is 42).
    file_id_limit: bool = True
    # A missing (or another key's) file: 403 PERMISSION_DENIED as the real Files API (dify #192,
    # python-genai #1218); 404 NOT_FOUND for deviation tests.
    missing_file_status: int = 403
    # Refuse a create whose input file has bad lines ("Error on line N: ...", INSPECT #3257);
    # False: answer bad lines with per-line error output instead.
    validate_input_at_create: bool = True
    # Jobs and files visible only to the API key that created them (SRCLIB #289, #2446).
    scope_by_key: bool = False

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update; raises ValueError for unknown fields or bad values."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        for endpoint, rates in (changes.get("fault_rates") or {}).items():
            check_fault(endpoint, *rates)
        for k, v in changes.items():
            expected = _TYPES[k]
            if v is None and k == "api_key":
                pass
            elif expected is float and isinstance(v, int | float) and not isinstance(v, bool):
                v = float(v)
            elif not isinstance(v, expected) or (expected is int and isinstance(v, bool)):
                raise ValueError(f"setting {k} must be {expected.__name__}, got {v!r}")
            if k == "missing_file_status" and v not in (403, 404):
                raise ValueError(f"setting {k} must be 403 or 404, got {v!r}")
            setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TYPES: dict[str, type] = {
    "pending_seconds": float,
    "running_seconds": float,
    "shuffle_results": bool,
    "api_key": str,
    "max_active_jobs": int,
    "max_enqueued_tokens": dict,
    "fault_rates": dict,
    "seed": int,
    "file_id_limit": bool,
    "cancel_error_code": int,
    "results_file_delay": float,
    "drop_inline_metadata": bool,
    "missing_file_status": int,
    "validate_input_at_create": bool,
    "scope_by_key": bool,
}


def check_fault(endpoint: str, *kinds: str) -> None:
    if endpoint != "*" and endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; one of {', '.join(ENDPOINTS)} or '*'")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(KINDS)}")
        if kind.startswith("create_then") and endpoint not in (*CREATE_ENDPOINTS, "*"):
            raise ValueError(f"{kind} applies only to {', '.join(CREATE_ENDPOINTS)}")


class Faults:
    """Decides which fault, if any, a call gets: one-shot faults first, then random rates."""

    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self._seed = settings.seed
        self._rng = random.Random(settings.seed)
        self._next: dict[str, deque[str]] = {}

    def fail_next(self, endpoint: str, kind: str, count: int = 1) -> None:
        check_fault(endpoint, kind)
        self._next.setdefault(endpoint, deque()).extend([kind] * count)

    def pick(self, endpoint: str) -> str | None:
        if self._seed != self.settings.seed:
            self._seed = self.settings.seed
            self._rng = random.Random(self._seed)
        for name in (endpoint, "*"):
            q = self._next.get(name)
            if q:
                kind = q[0]
                if kind.startswith("create_then") and endpoint not in CREATE_ENDPOINTS:
                    continue
                q.popleft()
                return kind
        for name in (endpoint, "*"):
            for kind, p in (self.settings.fault_rates.get(name) or {}).items():
                if kind.startswith("create_then") and endpoint not in CREATE_ENDPOINTS:
                    continue
                if p > 0 and self._rng.random() < p:
                    return kind
        return None

    def clear(self) -> None:
        self._next.clear()


class Stats:
    """Calls per endpoint, creates per display name, bytes in and out."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: Counter[str] = Counter()
        self.creates_by_display_name: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "creates_by_display_name": dict(self.creates_by_display_name),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
