"""A create the API refused for bad lines: ``400 "Error on line N: <reason>"`` (one line of
message per bad line; evidence §1.9, INSPECT #3257). Permanent: the input ends ``rejected``,
and each N (a line of what the job submitted) is mapped back to the input's own line number.

A job submits either a byte range of the input (``jobs.source_start``/``source_end``: line N is
the input's line ``lines before the range + N``) or a part file of canonical lines (line N is
found again in the input by its key, within the part's byte range).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from daemon.layout import resolved_path

_LINE = re.compile(r"^Error on line (\d+): (.*)$")
MAX_PROBLEMS = 100  # as validation reports (SPEC §2)


def line_errors(error: Any) -> list[tuple[int, str]]:
    """The ``(line, reason)`` pairs of a create refusal, or [] if it is not one."""
    if not isinstance(error, dict) or error.get("code") != 400:
        return []
    message = error.get("message")
    if not isinstance(message, str) or not message.startswith("Error on line "):
        return []
    return [(int(m[1]), m[2]) for ln in message.splitlines() if (m := _LINE.match(ln))]


def _lines_before(path: Path, offset: int) -> int:
    n = 0
    with path.open("rb") as f:
        left = offset
        while left > 0 and (block := f.read(min(left, 1 << 20))):
            n += block.count(b"\n")
            left -= len(block)
    return n


def _nth_lines(path: Path, wanted: set[int]) -> dict[int, bytes]:
    """Physical lines ``wanted`` (1-based) of ``path``."""
    out: dict[int, bytes] = {}
    with path.open("rb") as f:
        for i, line in enumerate(f, 1):
            if i in wanted:
                out[i] = line
                if len(out) == len(wanted):
                    break
    return out


def _key_of(line: bytes, line_no: int) -> str | None:
    """A line's key as the daemon submits it: its ``key``, or for a bare request its physical
    line number."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    return str(obj.get("key")) if "request" in obj else str(line_no)


def _input_lines_by_key(work: Path, part: dict[str, Any], keys: set[str]) -> dict[str, int]:
    first = _lines_before(work, part["start_offset"]) + 1
    found: dict[str, int] = {}
    with work.open("rb") as f:
        f.seek(part["start_offset"])
        data = f.read(part["end_offset"] - part["start_offset"])
    for i, line in enumerate(data.split(b"\n")):
        if line.strip() and (key := _key_of(line, first + i)) in keys:
            found[key] = first + i
    return found


def map_to_input(
    job: dict[str, Any], part: dict[str, Any] | None, source: Path, numbers: list[int]
) -> dict[int, int | None]:
    """Line numbers of what ``job`` submitted (``source``) → the input's own line numbers
    (None where it cannot be told)."""
    work = Path(job["work_path"])  # the input's, added by the caller
    if job.get("source_start") is not None and source == work:
        base = _lines_before(work, job["source_start"])
        return {n: base + n for n in numbers}
    if part is None:
        return dict.fromkeys(numbers)
    raw = _nth_lines(source, set(numbers))
    keys = {n: _key_of(line, n) for n, line in raw.items()}
    where = _input_lines_by_key(work, part, {k for k in keys.values() if k is not None})
    return {n: where.get(keys.get(n) or "") for n in numbers}


def problems(
    job: dict[str, Any], part: dict[str, Any] | None, source: Path, errors: list[tuple[int, str]]
) -> list[dict[str, Any]]:
    """``[{"line": input line, "reason": the API's reason}]`` for the first errors (OSError
    when the files cannot be read: then the lines stay the API's, marked as such)."""
    shown = errors[:MAX_PROBLEMS]
    try:
        lines = map_to_input(job, part, source, [n for n, _ in shown])
    except OSError:
        lines = {}
    out = []
    for n, reason in shown:
        line = lines.get(n)
        entry: dict[str, Any] = {"line": line, "reason": reason}
        if line is None:
            entry["submitted_line"] = n
        out.append(entry)
    return out


def refused_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs whose create was refused with ``Error on line N``."""
    return [j for j in jobs if j["error"] and not j["remote_name"] and line_errors(_json(j))]


def _json(job: dict[str, Any]) -> Any:
    try:
        return orjson.loads(job["error"])
    except (orjson.JSONDecodeError, TypeError):
        return None


def rejection(
    row: dict[str, Any], jobs: list[dict[str, Any]], parts: list[dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    """The one-line reason and the ``problems`` details of an input whose creates were refused
    for bad lines (reads its files: run it in a thread)."""
    by_part = {p["part_no"]: p for p in parts}
    found: list[dict[str, Any]] = []
    total = 0
    for job in refused_jobs(jobs):
        errors = line_errors(_json(job))
        total += len(errors)
        source = resolved_path(job) if row["media_count"] else Path(job["source_path"])
        job = dict(job) | {"work_path": row["work_path"]}
        found += problems(job, by_part.get(job["part_no"]), source, errors)
    found.sort(key=lambda p: (p["line"] is None, p["line"] or 0))
    first = found[0]
    where = f"line {first['line']}: " if first["line"] is not None else ""
    more = f" (and {total - 1} more)" if total > 1 else ""
    reason = f"refused by the API at create: {where}{first['reason']}{more}"
    return reason, {"problems": found[:MAX_PROBLEMS], "problem_count": total}
