"""Streaming validation of a dropped JSONL file, part planning, and ``gemini-batchd check``.

One pass over the file in binary (bounded line reads, ``orjson`` per line, incremental sha256)
checks every rule of SPEC §2 and, when asked, writes the canonical part files that the submit stage
sends (SPEC §3). Memory stays flat on huge files: problems are capped, duplicate keys are found from
64-bit key hashes kept in 256 typed arrays (12 bytes per key), and hash-equal lines are confirmed by
a second read of just those lines.

Token estimate: ``len(request line bytes) // 4`` per request (crude; used only for admission).
"""

from __future__ import annotations

import os
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from daemon.config import MODEL_ID_RE, Config
from daemon.validate_io import (
    MAX_MEDIA_NAMES,
    Hasher,
    MediaChecker,
    PartPlan,
    PartWriter,
    blocks_of_lines,
    media_uris,
    part_file_name,
)

__all__ = ["PartPlan", "Problem", "Validation", "check_main", "part_file_name", "validate_file"]

Kind = Literal["generate", "embed"]
MAX_PROBLEMS = 100
_READ_BUFFER = 1 << 20
_WS = b" \t\r\n"
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Problem:
    """One reason the file is rejected; ``line`` is 1-based, 0 for the whole file."""

    line: int
    reason: str


@dataclass
class Validation:
    ok: bool
    problems: list[Problem]  # the first MAX_PROBLEMS, in line order
    problem_count: int
    request_count: int
    size_bytes: int
    sha256: str
    kind: Kind
    est_tokens: int
    media_refs: int  # parts referring to file:NAME
    media_names: set[str] = field(default_factory=set)  # distinct names (bounded)
    parts: list[PartPlan] = field(default_factory=list)


def model_kind(model: str) -> Kind:
    """Embedding models get an embeddings batch (``asyncBatchEmbedContent``)."""
    return "embed" if "embedding" in model else "generate"


def is_model_id(name: str) -> bool:
    return bool(MODEL_ID_RE.match(name))


def _object_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _read_line(readline: Any, limit: int, hasher: Any) -> tuple[bytes, int, bool]:
    """One physical line: ``(raw, length, too_long)``. An over-long line is consumed in chunks
    (hashed, counted) and only its first chunk is returned."""
    raw = readline(limit + 2)
    n = len(raw)
    if not n:
        return raw, 0, False
    hasher(raw)
    if n < limit + 2 or raw[-1] == 10:
        return raw, n, False
    while True:
        more = readline(_READ_BUFFER)
        if not more:
            break
        hasher(more)
        n += len(more)
        if more[-1] == 10:
            break
    return raw, n, True


def validate_file(
    path: Path, *, model: str, cfg: Config, out_dir: Path | None = None
) -> Validation:
    """Validate ``path`` for ``model`` in one streaming pass; with ``out_dir``, also write the
    canonical part files (deleted again if the file turns out invalid). Raises OSError when the
    file cannot be read."""
    kind = model_kind(model)
    limit = cfg.inbox.max_line_bytes
    media = MediaChecker(cfg.media_dir)
    problems: list[Problem] = []
    problem_count = 0
    request_count = est_tokens = media_refs = 0
    media_names: set[str] = set()
    hashes = [array("Q") for _ in range(256)]
    key_lines = [array("I") for _ in range(256)]
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    need = "content" if kind == "embed" else "contents"
    parts = PartWriter(cfg, out_dir)
    add_part = parts.add
    too_long_msg = f"line is longer than max_line_bytes ({limit} bytes)"
    longest = limit + 1

    def problem(line: int, reason: str) -> None:
        nonlocal problem_count
        if problem_count == 0:
            parts.abandon()
        problem_count += 1
        if len(problems) < MAX_PROBLEMS:
            problems.append(Problem(line, reason))

    offset = line_no = 0
    ok = False
    hasher: Hasher | None = None
    try:
        with open(path, "rb", buffering=0) as f:
            hasher = Hasher(os.fstat(f.fileno()).st_size)
            for lines, last, has_file in blocks_of_lines(f, limit, hasher.update):
                nl = 0 if last else 1
                for raw in lines:
                    line_no += 1
                    start = offset
                    if type(raw) is int:
                        offset += raw
                        request_count += 1
                        problem(line_no, too_long_msg)
                        continue
                    n = len(raw)
                    offset += n + nl
                    if n > longest:
                        request_count += 1
                        problem(line_no, too_long_msg)
                        continue
                    if raw[:1] == b"{" and raw[-1:] == b"}":
                        body = raw  # already stripped (the common case)
                    else:
                        body = raw.strip(_WS)
                        if not body:
                            continue
                    request_count += 1
                    if len(body) > limit:
                        problem(line_no, too_long_msg)
                        continue
                    try:
                        obj = loads(body)
                    except decode_error as e:
                        try:
                            body.decode()
                        except UnicodeDecodeError as u:
                            problem(line_no, f"not valid UTF-8 (byte {u.start + 1} of the line)")
                        else:
                            problem(line_no, f"invalid JSON: {e}")
                        continue
                    if type(obj) is dict and len(obj) == 2 and not problem_count:
                        # fast path: a well-formed keyed line without media references
                        key: Any = obj.get("key")
                        req: Any = obj.get("request")
                        if (
                            type(key) is str
                            and key
                            and type(req) is dict
                            and need in req
                            and not (has_file and b"file" in body)
                        ):
                            h = hash(key) & _MASK64
                            hashes[h >> 56].append(h)
                            key_lines[h >> 56].append(line_no)
                            tokens = len(body) // 4
                            est_tokens += tokens
                            add_part(line_no, start, offset, body, tokens)
                            continue
                    if type(obj) is not dict:
                        problem(line_no, f"line is not a JSON object (found {_object_kind(obj)})")
                        continue
                    bare = "key" not in obj and "request" not in obj
                    if bare:
                        key = str(line_no)
                        req = obj
                    else:
                        key = obj.get("key")
                        req = obj.get("request")
                        if "key" not in obj:
                            problem(line_no, 'missing "key" (a line with "request" needs a "key")')
                            key = None
                        elif type(key) is not str or not key:
                            problem(line_no, '"key" must be a non-empty string')
                            key = None
                        if len(obj) != ("key" in obj) + ("request" in obj):
                            extra = sorted(k for k in obj if k not in ("key", "request"))
                            problem(
                                line_no, f"unknown member(s) {', '.join(extra)} besides key/request"
                            )
                    if key is not None:
                        h = hash(key) & _MASK64
                        hashes[h >> 56].append(h)
                        key_lines[h >> 56].append(line_no)
                    if not bare and "request" not in obj:
                        problem(line_no, 'missing "request"')
                        continue
                    if type(req) is not dict:
                        problem(
                            line_no, f'"request" is not a JSON object (found {_object_kind(req)})'
                        )
                        continue
                    if not req:
                        problem(line_no, '"request" is empty')
                        continue
                    if need not in req:
                        what = (
                            "an EmbedContentRequest"
                            if kind == "embed"
                            else "a GenerateContentRequest"
                        )
                        problem(line_no, f'request has no "{need}" ({model} takes {what})')
                        continue
                    if b"file" in body:
                        for name in media_uris(req, kind):
                            media_refs += 1
                            if len(media_names) < MAX_MEDIA_NAMES:
                                media_names.add(name)
                            why = media.check(name)
                            if why:
                                problem(line_no, why)
                    if key is None or problem_count:
                        continue
                    tokens = len(body) // 4
                    est_tokens += tokens
                    if bare:
                        canon = b'{"key":"%d","request":%b}' % (line_no, body)
                    else:
                        canon = body
                    add_part(line_no, start, offset, canon, tokens)
        if request_count == 0:
            problem(0, "the file has no request lines (empty)")
        candidates = _duplicate_candidates(hashes, key_lines)
        del hashes, key_lines
        if candidates:
            dup_problems, dup_count = _confirm_duplicates(path, candidates, limit)
            if dup_count:
                parts.abandon()
                problem_count += dup_count
                problems = sorted(problems + dup_problems, key=lambda p: p.line)[:MAX_PROBLEMS]
        ok = problem_count == 0
    finally:
        parts.close(keep=ok)
        if hasher is not None:
            hasher.close()
    assert hasher is not None
    return Validation(
        ok=ok,
        problems=problems,
        problem_count=problem_count,
        request_count=request_count,
        size_bytes=offset,
        sha256=hasher.hexdigest(),
        kind=kind,
        est_tokens=est_tokens,
        media_refs=media_refs,
        media_names=media_names,
        parts=parts.parts if ok else [],
    )


def _duplicate_candidates(hashes: list[array[int]], key_lines: list[array[int]]) -> list[int]:
    """Sorted line numbers whose key hash occurs more than once (true duplicates or collisions)."""
    found: list[int] = []
    for bucket, lines in zip(hashes, key_lines, strict=True):
        if len(set(bucket)) == len(bucket):
            continue
        seen: set[int] = set()
        twice: set[int] = set()
        for h in bucket:
            if h in seen:
                twice.add(h)
            seen.add(h)
        found.extend(line for h, line in zip(bucket, lines, strict=True) if h in twice)
    found.sort()
    return found


def _confirm_duplicates(path: Path, candidates: list[int], limit: int) -> tuple[list[Problem], int]:
    """Re-read the candidate lines and report every repeated key at its later line."""
    first: dict[str, int] = {}
    problems: list[Problem] = []
    count = 0
    wanted = iter(candidates)
    target = next(wanted)
    line_no = 0
    with open(path, "rb", buffering=_READ_BUFFER) as f:
        readline = f.readline
        while True:
            raw, n, _too_long = _read_line(readline, limit, _ignore)
            if not n:
                break
            line_no += 1
            if line_no != target:
                continue
            obj = orjson.loads(raw)
            key = obj["key"] if "key" in obj or "request" in obj else str(line_no)
            if key in first:
                count += 1
                if len(problems) < MAX_PROBLEMS:
                    problems.append(
                        Problem(line_no, f"duplicate key {key!r} (first on line {first[key]})")
                    )
            else:
                first[key] = line_no
            target = next(wanted, 0)
            if not target:
                break
    return problems, count


def _ignore(_data: bytes) -> None:
    return None


def _default_model(cfg: Config, file: Path) -> str:
    """The folder name when the file sits in ``inbox/<model>/`` (or a folder that looks like a
    Gemini model id), else ``[gemini] default_model``."""
    folder = file.resolve().parent
    name = folder.name
    if is_model_id(name) and (
        folder.parent == cfg.inbox_dir.resolve() or name.startswith("gemini") or "embedding" in name
    ):
        return name
    return cfg.gemini.default_model


def check_main(cfg: Config, file: str, *, model: str | None, as_json: bool) -> int:
    """``gemini-batchd check FILE``: validate offline as the daemon would; 0 ok, 1 problems."""
    path = Path(file)
    model = model or _default_model(cfg, path)
    try:
        if not path.is_file():
            raise OSError(0, "not a regular file" if path.exists() else "no such file")
        v = validate_file(path, model=model, cfg=cfg)
    except OSError as e:
        if as_json:
            sys.stdout.write(
                orjson.dumps(
                    {"file": file, "model": model, "ok": False, "error": e.strerror}
                ).decode()
                + "\n"
            )
        else:
            print(f"{file}: cannot read: {e.strerror}", file=sys.stderr)
        return 1
    if as_json:
        doc = {
            "file": file,
            "model": model,
            "kind": v.kind,
            "ok": v.ok,
            "problems": [{"line": p.line, "reason": p.reason} for p in v.problems],
            "problem_count": v.problem_count,
            "request_count": v.request_count,
            "size_bytes": v.size_bytes,
            "sha256": v.sha256,
            "est_tokens": v.est_tokens,
            "media_refs": v.media_refs,
            "parts": [
                {
                    "part_no": p.part_no,
                    "first_line": p.first_line,
                    "last_line": p.last_line,
                    "request_count": p.request_count,
                    "size_bytes": p.size_bytes,
                }
                for p in v.parts
            ],
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0 if v.ok else 1
    for p in v.problems:
        print(f"{file}:{p.line}: {p.reason}" if p.line else f"{file}: {p.reason}")
    if v.ok:
        print(
            f"{file}: ok: {v.request_count} requests, {len(v.parts)} part(s), "
            f"{v.size_bytes} bytes, ~{v.est_tokens} tokens (model {model}, {v.kind})"
        )
        return 0
    more = f" (first {len(v.problems)} shown)" if v.problem_count > len(v.problems) else ""
    print(f"{file}: rejected: {v.problem_count} problem(s){more}; {v.request_count} request lines")
    return 1
