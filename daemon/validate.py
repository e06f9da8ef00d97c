"""Streaming validation of a dropped JSONL file, part planning, and ``gemini-batchd check``.

One pass over the file in binary (bounded line reads, ``orjson`` per line, incremental sha256)
checks every rule of SPEC §2 and, when asked, writes the canonical part files that the submit stage
sends (SPEC §3). Memory stays flat on huge files: problems are capped, duplicate keys are found from
64-bit key hashes kept in 256 typed arrays (12 bytes per key), and hash-equal lines are confirmed by
a second read of just those lines.

Token estimate: ``len(request line bytes) // 4`` per request (crude; used only for admission).
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import orjson

from daemon.config import MODEL_ID_RE, Config

Kind = Literal["generate", "embed"]
MAX_PROBLEMS = 100
MAX_MEDIA_NAMES = 10_000
_READ_BUFFER = 1 << 20
_WS = b" \t\r\n"
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Problem:
    """One reason the file is rejected; ``line`` is 1-based, 0 for the whole file."""

    line: int
    reason: str


@dataclass(frozen=True)
class PartPlan:
    """A run of consecutive requests submitted as one batch job."""

    part_no: int
    first_line: int
    last_line: int
    start_offset: int
    end_offset: int
    request_count: int
    size_bytes: int  # canonical {"key","request"} line bytes
    est_tokens: int
    source_path: Path | None  # the canonical part file, when written


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


def part_file_name(part_no: int, attempt: int = 1) -> str:
    return f"part-{part_no}-a{attempt}.jsonl"


class _MediaChecker:
    """Checks ``file:NAME`` references against ``media_dir``, caching verdicts by name."""

    def __init__(self, media_dir: Path) -> None:
        self.root = os.path.realpath(media_dir)
        self.cache: dict[str, str | None] = {}

    def check(self, name: str) -> str | None:
        verdict = self.cache.get(name, "")
        if verdict != "":
            return verdict
        verdict = self._check(name)
        if len(self.cache) < MAX_MEDIA_NAMES:
            self.cache[name] = verdict
        return verdict

    def _check(self, name: str) -> str | None:
        if not name:
            return "media reference 'file:' has no file name"
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or "\\" in name or "\x00" in name:
            return f"media file {name!r} is outside media_dir"
        real = os.path.realpath(os.path.join(self.root, name))
        if not real.startswith(self.root + os.sep):
            return f"media file {name!r} is outside media_dir (symlink)"
        try:
            st = os.stat(real)
        except FileNotFoundError:
            return f"media file {name!r} not found in media_dir"
        except OSError as e:
            return f"media file {name!r} cannot be read: {e.strerror}"
        if not stat.S_ISREG(st.st_mode):
            return f"media file {name!r} is not a regular file"
        try:
            with open(real, "rb"):
                pass
        except OSError as e:
            return f"media file {name!r} cannot be read: {e.strerror}"
        return None


def _media_uris(request: dict[str, Any], kind: Kind) -> Iterator[str]:
    """``file:`` URIs in ``contents[].parts[]`` (generate) or ``content.parts[]`` (embed)."""
    if kind == "embed":
        content = request.get("content")
        contents = [content] if isinstance(content, dict) else []
    else:
        found = request.get("contents")
        if not isinstance(found, list):
            return
        contents = found
    for content in contents:
        if not isinstance(content, dict):
            continue
        parts = content.get("parts")
        if not isinstance(parts, list):
            continue
        for part in parts:
            if not isinstance(part, dict):
                continue
            fd = part.get("fileData", part.get("file_data"))
            if isinstance(fd, dict):
                uri = fd.get("fileUri", fd.get("file_uri"))
                if isinstance(uri, str) and uri.startswith("file:"):
                    yield uri[5:]


def _object_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


class _PartWriter:
    """Plans parts in input order and (optionally) writes their canonical files."""

    def __init__(self, cfg: Config, out_dir: Path | None) -> None:
        self.max_requests = cfg.submit.max_requests_per_job
        self.max_bytes = cfg.submit.max_job_bytes
        self.out_dir = out_dir
        self.parts: list[PartPlan] = []
        self.written: list[Path] = []
        self.file: IO[bytes] | None = None
        self.writing = out_dir is not None
        self._reset()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def _reset(self) -> None:
        self.count = self.size = self.tokens = 0
        self.first_line = self.last_line = self.start = self.end = 0

    def add(self, line_no: int, start: int, end: int, canon: bytes, tokens: int) -> None:
        n = len(canon)
        if self.count and (self.count >= self.max_requests or self.size + n > self.max_bytes):
            self.finish()
        if not self.count:
            self.first_line, self.start = line_no, start
            if self.writing:
                assert self.out_dir is not None
                path = self.out_dir / part_file_name(len(self.parts) + 1)
                self.file = open(path, "wb", buffering=_READ_BUFFER)
                self.written.append(path)
        self.count += 1
        self.size += n
        self.tokens += tokens
        self.last_line, self.end = line_no, end
        if self.file is not None:
            self.file.write(canon)

    def finish(self) -> None:
        if not self.count:
            return
        source: Path | None = None
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
            source = self.written[-1]
        self.parts.append(
            PartPlan(
                part_no=len(self.parts) + 1,
                first_line=self.first_line,
                last_line=self.last_line,
                start_offset=self.start,
                end_offset=self.end,
                request_count=self.count,
                size_bytes=self.size,
                est_tokens=self.tokens,
                source_path=source,
            )
        )
        self._reset()

    def abandon(self) -> None:
        """Stop writing and delete every part file written so far (the input is invalid)."""
        self.writing = False
        if self.file is not None:
            self.file.close()
            self.file = None
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()

    def close(self, *, keep: bool) -> None:
        self.finish()
        if not keep:
            self.abandon()
        elif self.out_dir is not None and self.written:
            from daemon.outbox import fsync_dir

            fsync_dir(self.out_dir)


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
    media = _MediaChecker(cfg.media_dir)
    problems: list[Problem] = []
    problem_count = 0
    request_count = est_tokens = media_refs = 0
    media_names: set[str] = set()
    hashes = [array("Q") for _ in range(256)]
    key_lines = [array("I") for _ in range(256)]
    sha = hashlib.sha256()
    update = sha.update
    loads = orjson.loads
    need = "content" if kind == "embed" else "contents"
    parts = _PartWriter(cfg, out_dir)

    def problem(line: int, reason: str) -> None:
        nonlocal problem_count
        if problem_count == 0:
            parts.abandon()
        problem_count += 1
        if len(problems) < MAX_PROBLEMS:
            problems.append(Problem(line, reason))

    offset = line_no = 0
    ok = False
    try:
        with open(path, "rb", buffering=_READ_BUFFER) as f:
            readline = f.readline
            while True:
                raw, n, too_long = _read_line(readline, limit, update)
                if not n:
                    break
                line_no += 1
                start = offset
                offset += n
                if too_long:
                    request_count += 1
                    problem(line_no, f"line is longer than max_line_bytes ({limit} bytes)")
                    continue
                body = raw.strip(_WS)
                if not body:
                    continue
                request_count += 1
                if len(body) > limit:
                    problem(line_no, f"line is longer than max_line_bytes ({limit} bytes)")
                    continue
                try:
                    obj = loads(body)
                except orjson.JSONDecodeError as e:
                    try:
                        body.decode()
                    except UnicodeDecodeError as u:
                        problem(line_no, f"not valid UTF-8 (byte {u.start + 1} of the line)")
                    else:
                        problem(line_no, f"invalid JSON: {e}")
                    continue
                if type(obj) is not dict:
                    problem(line_no, f"line is not a JSON object (found {_object_kind(obj)})")
                    continue
                bare = "key" not in obj and "request" not in obj
                if bare:
                    key: Any = str(line_no)
                    req: Any = obj
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
                    problem(line_no, f'"request" is not a JSON object (found {_object_kind(req)})')
                    continue
                if not req:
                    problem(line_no, '"request" is empty')
                    continue
                if need not in req:
                    what = (
                        "an EmbedContentRequest" if kind == "embed" else "a GenerateContentRequest"
                    )
                    problem(line_no, f'request has no "{need}" ({model} takes {what})')
                    continue
                if b"file" in body:
                    for name in _media_uris(req, kind):
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
                    canon = b'{"key":"%d","request":%b}\n' % (line_no, body)
                else:
                    canon = body + b"\n"
                parts.add(line_no, start, offset, canon, tokens)
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
    return Validation(
        ok=ok,
        problems=problems,
        problem_count=problem_count,
        request_count=request_count,
        size_bytes=offset,
        sha256=sha.hexdigest(),
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
