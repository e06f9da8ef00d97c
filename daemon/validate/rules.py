"""Streaming validation of a dropped JSONL file, and part planning.

One pass over the file in binary (bounded line reads, ``orjson`` per line) checks every rule of
SPEC §2 and plans the parts the submit stage sends (SPEC §3): byte ranges of the input while its
lines are canonical, else canonical part files. Blocks of well-formed lines are checked in bulk
with C-level ``map``s; the first doubt sends a block through the exact per-line checks. A second
thread reads the file on its own for its sha256 and for ``"file:`` (media references); only a file
that has one is validated again with a media check on every line. A big file's second half is
checked by a child process meanwhile (:mod:`daemon.validate.split`). Memory stays flat on huge
files: problems are capped, duplicate keys are found from 61-bit key hashes (8 bytes per key, in
64 buckets checked one set at a time), and hash-equal keys are confirmed by a second read of the
file (which only happens when a hash repeats).

Token estimate: request line bytes // 4 (crude; used only for admission).

Longer than the house's ~400 lines on purpose: the child process (``split.py``) runs this pass
whole, and the per-line rules share its state; splitting the pass is the next step.
"""

from __future__ import annotations

import functools
import io
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain, islice, repeat
from pathlib import Path
from typing import IO, Any, cast

import orjson

from daemon.config import MODEL_ID_RE, Config
from daemon.states import Kind, model_kind
from daemon.validate.reader import (
    MAX_MEDIA_NAMES,
    MEDIA_MARK,
    FileScan,
    MediaChecker,
    PartPlan,
    PartWriter,
    ScanningWindow,
    media_uris,
)
from daemon.validate.split import SHARE, SHARE_WITH_DIGEST, BlockRecorder, TailCheck

__all__ = ["PartPlan", "Problem", "Validation", "validate_file"]

MAX_PROBLEMS = 100
_READ_BUFFER = 1 << 20
_WS = b" \t\r\n"
_loads = orjson.loads
_get = dict.get
_has: Any = dict.__contains__
_TWO = {2}
_BUCKETS = 64  # key hashes are kept in buckets by their low 6 bits
_MASK = _BUCKETS - 1
_ENCODE: Any = str.encode  # TypeError for anything but a str
_FROM_BYTES = int.from_bytes


def _key_hash(key: str) -> int:
    """A 64-bit hash of a key that is the same in every process (``hash()`` of a ``str`` is
    salted per process; that of an ``int``, or of a tuple of one, is not), so the tail child's
    hashes meet ours. The tuple mixes the bits: an ``int``'s hash keeps the key's last bytes as
    its low bits, the bucket, so keys ending in digits filled 10 of the 64 buckets. Keys come
    from orjson, which refuses lone surrogates, so ``encode`` cannot fail."""
    return hash((_FROM_BYTES(key.encode()),))


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
    sha256: str | None  # None when deferred (``validate_file(defer_digest=True)``, big files)
    kind: Kind
    est_tokens: int
    media_refs: int  # parts referring to file:NAME
    media_names: set[str] = field(default_factory=set)  # distinct names (bounded)
    media_ids: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # name → file
    parts: list[PartPlan] = field(default_factory=list)
    tail_bytes: int = 0  # bytes checked by the child process (daemon.validate.split)


def is_model_id(name: str) -> bool:
    return bool(MODEL_ID_RE.match(name))


def _object_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _read_line(readline: Any, limit: int) -> tuple[bytes, int, bool]:
    """One physical line: ``(raw, length, too_long)``. An over-long line is consumed in chunks
    (counted) and only its first chunk is returned."""
    raw = readline(limit + 2)
    n = len(raw)
    if not n:
        return raw, 0, False
    if n < limit + 2 or raw[-1] == 10:
        return raw, n, False
    while True:
        more = readline(_READ_BUFFER)
        if not more:
            break
        n += len(more)
        if more[-1] == 10:
            break
    return raw, n, True


# Long: the one pass's set-up (the child for a big file's second half, the scan thread) and
# the merge of their findings.
def validate_file(
    path: Path,
    *,
    model: str,
    cfg: Config,
    out_dir: Path | None = None,
    defer_digest: bool = False,
) -> Validation:
    """Validate ``path`` for ``model`` in one streaming pass. With ``out_dir``, also plan the
    parts the submit stage sends: a part of canonical lines is a byte range of ``path`` itself
    (``source_path`` None); once a line needs rewriting, part files of canonical lines are
    written there (deleted again if the file turns out invalid). A file of at least ``[inbox]
    parallel_validation_bytes`` has its second half checked by a child process meanwhile
    (:mod:`daemon.validate.split`); with ``defer_digest`` such a file's sha256 is left to the
    caller (``sha256`` None). Raises OSError when the file cannot be read."""
    with open(path, "rb", buffering=_READ_BUFFER) as f:
        size = os.fstat(f.fileno()).st_size
        share = SHARE if defer_digest else SHARE_WITH_DIGEST
        tail = TailCheck.start(path, size, model, cfg, share=share)
        split = tail is not None
        # Split, every window this pass reads looks for media marks itself; the sha256, unless
        # deferred, is read by this thread once it has parsed its share (a scan thread beside
        # the parser would wait for the GIL at every read, and the child has the second core).
        scan = (
            None if split and defer_digest else FileScan(path, size, inline=split, marks=not split)
        )
        try:
            run = _run(
                path,
                f,
                model=model,
                cfg=cfg,
                out_dir=out_dir,
                check_media=False,
                tail=tail,
                meanwhile=scan.result if split and scan is not None else None,
            )
        finally:
            if tail is not None:
                tail.close()
            digest, media_marks = scan.result() if scan is not None else (None, False)
        media_marks = media_marks or run.marks_seen
        if media_marks:  # some line may refer to local media: look at every line for it
            run.parts.close(keep=False)
            f.seek(0)
            run = _run(path, f, model=model, cfg=cfg, out_dir=out_dir, check_media=True)
    ok = run.ok
    run.parts.close(keep=ok)
    return Validation(
        ok=ok,
        problems=run.problems,
        problem_count=run.problem_count,
        request_count=run.request_count,
        size_bytes=run.offset,
        sha256=digest,
        kind=run.kind,
        est_tokens=run.est_tokens,
        media_refs=run.media_refs,
        media_names=run.media_names,
        media_ids=run.media.ids if run.media is not None and ok else {},
        parts=run.parts.parts if ok else [],
        tail_bytes=run.tail_bytes,
    )


def _run(
    path: Path,
    f: IO[bytes],
    *,
    model: str,
    cfg: Config,
    out_dir: Path | None,
    check_media: bool,
    tail: TailCheck | None = None,
    meanwhile: Callable[[], object] | None = None,
) -> _Pass:
    run = _Pass(
        path,
        f,
        model=model,
        limit=cfg.inbox.max_line_bytes,
        parts=PartWriter(cfg, out_dir, path),
        media=MediaChecker(cfg.media_dir),
        check_media=check_media,
    )
    try:
        if tail is None:
            run.read_all()
        else:  # this thread takes the lines before the child's, then joins what the child found
            head = ScanningWindow(path, 0, tail.begin)
            with io.BufferedReader(head, _READ_BUFFER) as reader:
                run.f = reader
                run.read_all()
            if meanwhile is not None:
                meanwhile()
            run.take_tail(tail, os.fstat(f.fileno()).st_size)
            run.marks_seen = run.marks_seen or head.found
        run.finish()
    except BaseException:
        run.parts.close(keep=False)
        raise
    return run


def new_tail_pass(
    path: Path, f: IO[bytes], *, model: str, limit: int, recorder: BlockRecorder
) -> _Pass:
    """The pass the tail child runs (:mod:`daemon.validate.split`): bulk blocks only."""
    run = _Pass(
        path,
        f,
        model=model,
        limit=limit,
        parts=cast(PartWriter, recorder),
        media=None,
        check_media=False,
    )
    run.stop_at_slow = True  # so only add_block and abandon are called on the recorder
    return run


class _Pass:
    """The state of one validation pass. Lines come in small blocks (bounded ``readline`` calls,
    so an over-long line is never held whole); a block of well-formed keyed lines is checked with
    C-level ``map``s over the whole block, anything else line by line with exact messages."""

    def __init__(
        self,
        path: Path,
        f: IO[bytes],
        *,
        model: str,
        limit: int,
        parts: PartWriter,
        media: MediaChecker | None,
        check_media: bool,
    ) -> None:
        self.path, self.f, self.model = path, f, model
        self.kind: Kind = model_kind(model)
        self.need = "content" if self.kind == "embed" else "contents"
        self.limit = limit
        self.cap = self.limit + 2  # readline bound: longer means over-long
        self.media = media
        self.parts = parts
        self.problems: list[Problem] = []
        self.problem_count = 0
        self.request_count = self.est_tokens = self.media_refs = 0
        self.media_names: set[str] = set()
        self.check_media = check_media
        # a hash of every key, partitioned by value so that each bucket fits one set later
        self.buckets = [array("q") for _ in range(_BUCKETS)]
        self.add_hash = [b.append for b in self.buckets]
        self.tail_buckets: list[array[int]] | None = None  # the tail child's, each unique
        self.tail: TailCheck | None = None  # the child, while it may check upper buckets
        self.ok = False
        self.offset = self.line_no = 0
        self.too_long = f"line is longer than max_line_bytes ({self.limit} bytes)"
        self.stop_at_slow = False
        self.tail_bytes = 0
        self.marks_seen = False  # "file: in what the windows of a split pass read

    def problem(self, line: int, reason: str) -> None:
        if self.problem_count == 0:
            self.parts.abandon()
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(line, reason))

    def read_all(self) -> None:
        lines_of = iter(functools.partial(self.f.readline, self.cap), b"")
        n = 32
        while lines := list(islice(lines_of, n)):
            size = sum(map(len, lines))
            if self.problem_count or not self._fast_block(lines, size):
                if self.stop_at_slow:  # the tail child: the validator reads on from here
                    return
                self._slow_block(lines)
            # aim for ~32 KiB blocks: big enough to amortise, small enough to stay in cache
            n = max(8, min(4096, (32 * 1024 * len(lines)) // (size or 1)))

    def _fast_block(self, lines: list[bytes], size: int) -> bool:
        """Take a block of well-formed ``{"key","request"}`` lines (``size`` bytes) in bulk;
        False (nothing taken) if any line needs a closer look."""
        try:
            objs = list(map(_loads, lines))
            keys = list(map(_get, objs, repeat("key")))  # TypeError unless every line is a dict
            reqs = list(map(_get, objs, repeat("request")))
            encoded = list(map(_ENCODE, keys))  # TypeError unless every key is a str
            if not (
                set(map(len, objs)) == _TWO
                and all(encoded)
                and all(map(_has, reqs, repeat(self.need)))  # TypeError unless reqs are dicts
                and all(map(bytes.startswith, lines, repeat(b"{")))
                and all(map(bytes.endswith, lines, repeat(b"}\n")))
                and (size <= self.limit + 1 or max(map(len, lines)) <= self.limit + 1)
                and not (
                    self.check_media and any(map(bytes.__contains__, lines, repeat(MEDIA_MARK)))
                )
            ):
                return False
        except (orjson.JSONDecodeError, TypeError):
            return False
        count = len(lines)
        add_hash = self.add_hash
        for h in map(hash, zip(map(_FROM_BYTES, encoded))):  # _key_hash, from encoded keys
            add_hash[h & _MASK](h)
        tokens = (size - count) // 4
        self.parts.add_block(self.line_no + 1, self.offset, lines, size, tokens)
        self.line_no += count
        self.offset += size
        self.request_count += count
        self.est_tokens += tokens
        return True

    def _slow_block(self, lines: list[bytes]) -> None:
        i = 0
        while i < len(lines):
            raw = lines[i]
            i += 1
            self.line_no += 1
            start = self.offset
            n = len(raw)
            if n == self.cap and raw[-1] != 10:  # over-long: skip the rest of the line
                while True:
                    if i < len(lines):
                        more = lines[i]
                        i += 1
                    else:
                        more = self.f.readline(_READ_BUFFER)
                    n += len(more)
                    if not more or more[-1] == 10:
                        break
                self.offset += n
                self.request_count += 1
                self.problem(self.line_no, self.too_long)
                continue
            self.offset += n
            self._line(raw, start)

    # Long: every per-line rule, one after the other, for the lines the bulk blocks do not take;
    # not yet split into one function per rule (left for a session with the 1 GB bench at hand).
    def _line(self, raw: bytes, start: int) -> None:
        line_no = self.line_no
        body = raw.strip(_WS)
        if not body:
            return
        self.request_count += 1
        if len(body) > self.limit:
            self.problem(line_no, self.too_long)
            return
        try:
            obj = _loads(body)
        except orjson.JSONDecodeError as e:
            try:
                body.decode()
            except UnicodeDecodeError as u:
                self.problem(line_no, f"not valid UTF-8 (byte {u.start + 1} of the line)")
            else:
                self.problem(line_no, f"invalid JSON: {e}")
            return
        if type(obj) is not dict:
            self.problem(line_no, f"line is not a JSON object (found {_object_kind(obj)})")
            return
        key: Any
        req: Any
        bare = "key" not in obj and "request" not in obj
        if bare:
            key, req = str(line_no), obj
        else:
            key, req = obj.get("key"), obj.get("request")
            if "key" not in obj:
                self.problem(line_no, 'missing "key" (a line with "request" needs a "key")')
                key = None
            elif type(key) is not str or not key:
                self.problem(line_no, '"key" must be a non-empty string')
                key = None
            if len(obj) != ("key" in obj) + ("request" in obj):
                extra = sorted(k for k in obj if k not in ("key", "request"))
                self.problem(line_no, f"unknown member(s) {', '.join(extra)} besides key/request")
        if key is not None:
            h = _key_hash(key)
            self.add_hash[h & _MASK](h)
        if not bare and "request" not in obj:
            self.problem(line_no, 'missing "request"')
            return
        if type(req) is not dict:
            self.problem(line_no, f'"request" is not a JSON object (found {_object_kind(req)})')
            return
        if not req:
            self.problem(line_no, '"request" is empty')
            return
        if self.need not in req:
            what = "an EmbedContentRequest" if self.kind == "embed" else "a GenerateContentRequest"
            self.problem(line_no, f'request has no "{self.need}" ({self.model} takes {what})')
            return
        media = 0
        if b"file" in body:
            for name in media_uris(req, self.kind):
                media += 1
                if len(self.media_names) < MAX_MEDIA_NAMES:
                    self.media_names.add(name)
                why = self.media.check(name) if self.media is not None else None
                if why:
                    self.problem(line_no, why)
            self.media_refs += media
        if key is None or self.problem_count:
            return
        tokens = len(body) // 4
        self.est_tokens += tokens
        canon = b'{"key":"%d","request":%b}' % (line_no, body) if bare else body
        # a line kept byte for byte (no blank/space/CR around it, no media to rewrite) can stay
        # in a byte-range part; anything else needs part files
        same = not media and len(raw) == len(body) + (raw[-1:] == b"\n") and not bare
        self.parts.add(line_no, start, self.offset, canon, tokens, same=same)

    def take_tail(self, tail: TailCheck, file_size: int) -> None:
        """After this pass has read up to the child's first line: take over the child's findings
        (blocks of canonical lines: counts, tokens, key hashes and, while the parts are byte
        ranges, the line lengths to plan them), then read on from where the child stopped (the
        end of the file, or the first block it left for the exact checks)."""
        # part files being written need the child's lines themselves: read them here instead
        mine = self.offset != tail.begin or self.parts.writing
        found = None if mine else tail.result()
        resume = self.offset
        if found is not None:
            plan = None if self.problem_count else self.parts.add_run
            blocks, lengths = found.blocks, found.lengths
            line_no, offset, i = self.line_no, self.offset, 0
            for k in range(0, len(blocks), 3):
                n, size, tokens = blocks[k], blocks[k + 1], blocks[k + 2]
                if plan is not None:
                    plan(line_no + 1, offset, lengths[i : i + n], size, tokens)
                i += n
                line_no += n
                offset += size
                self.est_tokens += tokens
            self.request_count += line_no - self.line_no
            self.tail_bytes = offset - self.offset
            self.line_no, self.offset = line_no, offset
            if found.unique:  # kept apart: finish() only checks them against ours
                self.tail_buckets = found.buckets
                self.tail = tail
            else:
                for bucket, theirs in zip(self.buckets, found.buckets, strict=True):
                    bucket.extend(theirs)
            resume = offset
            self.marks_seen = found.marks
        rest = ScanningWindow(self.path, resume, file_size)
        with io.BufferedReader(rest, _READ_BUFFER) as reader:
            self.f = reader
            self.read_all()
        self.marks_seen = self.marks_seen or rest.found

    def finish(self) -> None:
        """After the last line: empty-file and duplicate-key checks; sets ``ok``."""
        if self.request_count == 0:
            self.problem(0, "the file has no request lines (empty)")
        dup = self._repeated_hashes()
        self.buckets = []
        self.tail_buckets = None
        self.tail = None
        self.add_hash = []
        if dup:
            found, count = _confirm_duplicates(self.path, dup, self.limit)
            if count:
                self.parts.abandon()
                self.problem_count += count
                self.problems = sorted(self.problems + found, key=lambda p: p.line)[:MAX_PROBLEMS]
        self.ok = self.problem_count == 0

    def _repeated_hashes(self) -> set[int]:
        """Key hashes seen more than once. With the tail child's hashes kept apart, the child
        (idle by now: it finished first) looks at the upper half of the buckets meanwhile."""
        mine, theirs, half = self.buckets, self.tail_buckets, _BUCKETS // 2
        if theirs is None or self.tail is None or not self.tail.send_upper(mine[half:]):
            return duplicate_hashes(mine, theirs)
        dup = duplicate_hashes(mine[:half], theirs[:half])
        upper = self.tail.upper_repeats()
        if upper is None:  # the child failed: look here
            upper = duplicate_hashes(mine[half:], theirs[half:])
        return dup | upper


def duplicate_hashes(buckets: list[array[int]], apart: list[array[int]] | None = None) -> set[int]:
    """Key hashes that occur more than once (true duplicates or, rarely, collisions); one set
    per bucket at a time keeps the memory small. ``apart`` holds more hashes by the same
    buckets, known to be unique among themselves (the tail child checked them): they need only
    be looked up in ours."""
    found: set[int] = set()
    for i, bucket in enumerate(buckets):
        theirs = apart[i] if apart is not None else ()
        seen = set(bucket)
        if len(seen) == len(bucket) and seen.isdisjoint(theirs):
            continue
        seen.clear()
        for h in chain(bucket, theirs):
            if h in seen:
                found.add(h)
            seen.add(h)
    return found


def _confirm_duplicates(path: Path, wanted: set[int], limit: int) -> tuple[list[Problem], int]:
    """Re-read the file and report every repeated key (among those whose hash is in ``wanted``)
    at its later line. Only runs when a key hash repeats, i.e. almost only for rejected files."""
    first: dict[str, int] = {}
    problems: list[Problem] = []
    count = line_no = 0
    with open(path, "rb", buffering=_READ_BUFFER) as f:
        readline = f.readline
        while True:
            raw, n, too_long = _read_line(readline, limit)
            if not n:
                break
            line_no += 1
            body = raw.strip(_WS)
            if too_long or not body:
                continue
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                continue
            if type(obj) is not dict:
                continue
            key = obj.get("key") if "key" in obj or "request" in obj else str(line_no)
            if type(key) is not str or not key or _key_hash(key) not in wanted:
                continue
            if key in first:
                count += 1
                if len(problems) < MAX_PROBLEMS:
                    problems.append(
                        Problem(line_no, f"duplicate key {key!r} (first on line {first[key]})")
                    )
            else:
                first[key] = line_no
    return problems, count
