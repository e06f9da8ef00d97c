"""Line-level pieces of the merge: input keys, canonical request lines, result lines.

Everything here works on one line at a time (no state), for :mod:`daemon.results.index`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

RETRYABLE_GRPC = {4, 8, 13, 14}  # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE
RETRYABLE_HTTP = {429, 500, 503, 504}
RETRYABLE_STATUS = {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE"}
TOKEN_FIELDS = (
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "totalTokenCount",
)


def is_retryable(error: Any) -> bool:
    """Whether a per-request ``google.rpc.Status`` error is worth resubmitting (SPEC §3)."""
    if not isinstance(error, dict):
        return False
    code = error.get("code")
    if isinstance(code, int) and (code in RETRYABLE_GRPC or code in RETRYABLE_HTTP):
        return True
    return error.get("status") in RETRYABLE_STATUS


def derive_key(obj: Any, line_no: int) -> str:
    """The key of an input line: its ``key`` field, or the physical line number for a bare request."""
    if isinstance(obj, dict) and ("key" in obj or "request" in obj):
        return str(obj.get("key"))
    return str(line_no)


def canonical_line(raw: bytes, line_no: int) -> tuple[str, bytes]:
    """``(key, line)`` where line is a ``{"key", "request"}`` line (keyed lines pass through)."""
    obj = orjson.loads(raw)
    if isinstance(obj, dict) and ("key" in obj or "request" in obj):
        return str(obj.get("key")), raw.rstrip(b"\r\n")
    key = str(line_no)
    return key, b'{"key":' + orjson.dumps(key) + b',"request":' + raw.strip() + b"}"


def iter_lines(
    path: Path, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` for the non-blank lines of ``path[start:end]``."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, line_no = start, first_line
        for raw in f:
            if end is not None and pos >= end:
                break
            pos += len(raw)
            if raw.strip():
                yield line_no, raw
            line_no += 1


def as_int(value: Any) -> int:
    """A token count as an int (int64 counts may come as strings); 0 when absent or odd."""
    if type(value) is int:
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


@dataclass
class ResultsFile:
    """One job's normalised results: ``{"key", "response"|"error"}`` lines."""

    path: Path
    job_id: int
    attempt: int


@dataclass
class Part:
    """Where the requests of one part live: an attempt-1 source file of canonical lines, or a
    byte range of the input file (``first_line`` is the line number at ``start``)."""

    part_no: int
    source: Path | None = None
    start: int = 0
    end: int | None = None
    first_line: int = 1


@dataclass
class Answer:
    ord: int
    key: str
    ok: bool | None  # None: no answer at all
    part: int
    line: bytes | None


def fast_key_bytes(raw: bytes) -> bytes | None:
    """The key of a ``{"key":"K",...}`` line (its raw bytes) without a JSON parse; None when
    unsure (an escape in the key, or another "key" member)."""
    if not raw.startswith(b'{"key":"'):
        return None
    end = raw.find(b'"', 8)
    if end < 0 or raw.find(b"\\", 8, end) >= 0 or raw.find(b'"key"', end) >= 0:
        return None
    return raw[8:end]


def fast_key(raw: bytes) -> str | None:
    """:func:`fast_key_bytes` decoded; None when unsure."""
    key = fast_key_bytes(raw)
    if key is None:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return None


def parse_result(line: bytes) -> tuple[Any, ...]:
    """``(key, ok, retryable, code, *usage)`` of one results line; key None if it is not one."""
    none = (None, 0, 0, None, 0, 0, 0, 0, 0)
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return none
    if not isinstance(obj, dict):
        return none
    key = obj.get("key")
    key = key if isinstance(key, str) else (str(key) if isinstance(key, int) else None)
    if "response" in obj:
        resp = obj["response"]
        usage = resp.get("usageMetadata") if isinstance(resp, dict) else None
        if not isinstance(usage, dict):
            usage = {}
        return (key, 1, 0, None, *(as_int(usage.get(f)) for f in TOKEN_FIELDS))
    error = obj.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    code = code if isinstance(code, int) else None
    return (key, 0, int(is_retryable(error)), code, 0, 0, 0, 0, 0)


def results_files(rows: Iterable[dict[str, Any]]) -> list[ResultsFile]:
    """The results files of collected job rows (``results_path`` set)."""
    return [
        ResultsFile(Path(r["results_path"]), r["id"], r["attempt"])
        for r in rows
        if r.get("results_path")
    ]
