"""The fast path of a big input's merge: one part answered exactly once by its first job.

When a job (attempt 1) answers every key of its part once and nothing else (no duplicate, no
unknown key, no unparsable line), its answers are put in input order straight from the results
file, without the on-disk index of :mod:`daemon.results.index`: a dict of the part's keys to their
positions (bounded by ``max_requests_per_job``), each results line's ``(offset, length)`` recorded
by position (blocks of lines parsed with C-level maps), and the ordered file gathered with
``pread``. A summary (counts, tokens, error codes) is written next to it; :mod:`daemon.results.outbox_file`
appends ordered parts to the outbox file as they come.
Anything else returns None and the caller falls back to the index. Synchronous (worker thread).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import accumulate, islice, repeat
from operator import add
from pathlib import Path
from typing import IO, Any

import orjson

from daemon.layout import fast_part_name
from daemon.outbox import atomic_writer
from daemon.results import outbox_file
from daemon.results.index import Stopped
from daemon.results.lines import TOKEN_FIELDS, as_int, derive_key, fast_key_bytes, is_retryable
from daemon.results.outbox_file import Ready
from daemon.validate.reader import file_contains

_BLOCK = 1 << 20
_RESULTS_BLOCK = 1 << 18
_ORDERING = threading.Lock()
# The keys of one part read ahead while its job still runs: (source, span) -> key positions.
_PREPARED: dict[tuple[str, tuple[int, int] | None], dict[str, int]] = {}
_GATHER = 1024
_loads = orjson.loads
_get: Any = dict.get
_STR = {str}


@dataclass
class PartSummary:
    """What the outbox needs to know about one part put in order by :func:`order_part`."""

    part_no: int
    job_id: int
    results_size: int
    ordered_size: int
    total: int
    succeeded: int
    retryable: int
    media: bool
    tokens: list[int]
    codes: list[list[Any]] = field(default_factory=list)  # [code, count, first position, error]
    in_prefix: bool = False  # gathered straight into the outbox file in the making (no file)


def fast_path(work: Path, part_no: int) -> Path:
    """The ordered file of a part; its summary is the same name plus ``.json``."""
    return work / fast_part_name(part_no)


def ready_part(work: Path, summary: PartSummary) -> Ready:
    """A part put in order, as :mod:`daemon.results.outbox_file` appends it to the outbox file."""
    return Ready(
        summary.part_no, summary.job_id, fast_path(work, summary.part_no), summary.ordered_size
    )


def _blocks(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """``(offset of the first line, lines)`` of ``path`` in 256 KiB reads (a block's lines are
    parsed at once: small blocks keep that memory small); lines keep a ``\\r``."""
    with open(path, "rb") as f:
        rest, base = b"", 0
        while block := f.read(_RESULTS_BLOCK):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield base, lines
            base += sum(map(len, lines)) + len(lines)
        if rest:
            yield base, [rest]


# A canonical line's key; a block is taken whole when every line has one and no other "key".
_KEY = re.compile(rb'\n\{"key":"([^"\\\n]*)"')


def _slow_keys(lines: list[bytes]) -> list[bytes]:
    out = []
    for raw in lines:
        if not raw.strip():
            continue
        key = fast_key_bytes(raw)
        out.append(key if key is not None else derive_key(orjson.loads(raw), 0).encode())
    return out


def _part_keys(source: Path, span: tuple[int, int] | None = None) -> Iterator[list[bytes]]:
    """The keys of a part file (or of bytes ``span[0]:span[1]`` of a file) in input order, a
    block at a time: a regular expression over a block of canonical lines, line by line
    otherwise."""
    with open(source, "rb") as f:
        left = -1
        if span is not None:
            f.seek(span[0])
            left = span[1] - span[0]
        rest = b"\n"  # every line in ``chunk[:cut]`` follows a newline
        while block := f.read(_BLOCK if left < 0 else min(_BLOCK, left)):
            left -= len(block)
            chunk = rest + block
            cut = chunk.rfind(b"\n")
            rest = chunk[cut:]
            n = chunk.count(b"\n", 0, cut)
            keys = _KEY.findall(chunk, 0, cut)
            if len(keys) == n and chunk.count(b'"key"', 0, cut) == n:
                yield keys
            else:
                yield _slow_keys(chunk[1:cut].split(b"\n"))
        if rest.strip():
            yield _slow_keys([rest[1:]])


def _key_positions(
    source: Path, stop: threading.Event, span: tuple[int, int] | None = None
) -> dict[str, int] | None:
    """Each key of the part → its position (0-based); None if a key repeats (a duplicate key,
    which validation refuses, or something else the general path must sort out). A part holds
    at most ``max_requests_per_job`` keys, so this dict is bounded (~10 MB at 100,000 keys)."""
    keys: list[str] = []
    for block in _part_keys(source, span):
        if stop.is_set():
            raise Stopped
        keys.extend(map(bytes.decode, block))
    positions = dict(zip(keys, range(len(keys)), strict=True))
    return positions if len(positions) == len(keys) else None


class _Answers:
    """Where each answer of a part sits in the job's results file, and what the summary needs,
    filled a block of result lines at a time."""

    def __init__(self, positions: dict[str, int]) -> None:
        self.positions = positions
        self.pos = array("l")  # per result line, in file order: the key's position in the part
        self.offs = array("q")  # ... its offset in the results file
        self.lens = array("l")  # ... its length (without the newline)
        self.codes: dict[Any, list[Any]] = {}
        self.succeeded = self.retryable = 0
        self.tokens = [0] * len(TOKEN_FIELDS)

    def add_block(self, base: int, lines: list[bytes]) -> bool:
        """Take a block of successful answers in bulk (C-level maps); False (nothing taken)
        when any line needs a closer look."""
        try:
            objs = list(map(_loads, lines))
            keys = list(map(_get, objs, repeat("key")))  # TypeError unless all are objects
            if set(map(type, keys)) != _STR:
                return False
            pos: list[Any] = list(map(self.positions.get, keys))
            if None in pos:
                return False
            usage = list(map(_get, map(_get, objs, repeat("response")), repeat("usageMetadata")))
            tokens = [sum(filter(None, map(_get, usage, repeat(f)))) for f in TOKEN_FIELDS]
        except (orjson.JSONDecodeError, TypeError):  # not JSON, an error line, odd usage...
            return False
        if any(map(bytes.endswith, lines, repeat(b"\r"))):
            return False
        lens = list(map(len, lines))
        starts = islice(accumulate(lens, initial=base), len(lines))
        self.offs.extend(map(add, starts, range(len(lines))))  # + a newline per earlier line
        self.lens.extend(lens)
        self.pos.extend(pos)
        self.succeeded += len(lines)
        self.tokens = list(map(add, self.tokens, tokens))
        return True

    def add_line(self, off: int, raw: bytes) -> bool:
        """One result line, looked at closely; False if the part needs the general path."""
        try:
            obj = _loads(raw)
        except orjson.JSONDecodeError:
            return not raw.strip()  # a blank line is fine, anything else is not
        if type(obj) is not dict:
            return False
        key = obj.get("key")
        if type(key) is int:
            key = str(key)
        pos = self.positions.get(key) if type(key) is str else None
        if pos is None:
            return False
        line = raw.rstrip(b"\r")
        self.pos.append(pos)
        self.offs.append(off)
        self.lens.append(len(line))
        if "response" in obj:
            self.succeeded += 1
            resp = obj["response"]
            usage = resp.get("usageMetadata") if type(resp) is dict else None
            if type(usage) is dict:
                for i, f in enumerate(TOKEN_FIELDS):
                    self.tokens[i] += as_int(usage.get(f))
            return True
        error = obj.get("error")
        code = error.get("code") if type(error) is dict else None
        code = code if type(code) is int else None
        self.retryable += is_retryable(error)
        seen = self.codes.get(code)
        if seen is None:
            self.codes[code] = [code, 1, pos, error]
        else:
            seen[1] += 1
            if pos < seen[2]:
                seen[2], seen[3] = pos, error
        return True

    def in_order(self) -> tuple[array[int], array[int]] | None:
        """``(offsets, lengths)`` by position; None unless every key has exactly one answer."""
        n = len(self.positions)
        if len(self.pos) != n:
            return None
        offs = array("q", [-1]) * n
        lens = array("l", [0]) * n
        for i, p in enumerate(self.pos):
            if offs[p] >= 0:  # a second answer for one key (so another key has none)
                return None
            offs[p] = self.offs[i]
            lens[p] = self.lens[i]
        return offs, lens


def order_part(
    part_no: int,
    source: Path,
    results: Path,
    job_id: int,
    dest: Path,
    stop: threading.Event,
    span: tuple[int, int] | None = None,
    straight: Callable[[], contextlib.AbstractContextManager[IO[bytes] | None]] | None = None,
) -> PartSummary | None:
    """Write ``results``' answers in the order of ``source``'s keys (those in bytes ``span`` of
    it, if given) to ``dest`` (fsynced), or straight into the outbox file in the making when
    ``straight`` yields it (:func:`daemon.results.outbox_file.straight_in`: the parts before are all in
    it; not for answers with inline media, which are extracted from ``dest`` later), and the
    summary to ``dest.json``; None (nothing written) unless every key has exactly one answer."""
    with _one_at_a_time(stop):
        positions = _PREPARED.pop((str(source), span), None) or _key_positions(source, stop, span)
        if not positions:
            return None
        answers = _Answers(positions)
        for base, lines in _blocks(results):
            if stop.is_set():
                raise Stopped
            if answers.add_block(base, lines):
                continue
            off = base
            for raw in lines:
                if not answers.add_line(off, raw):
                    return None
                off += len(raw) + 1
        ordered = answers.in_order()
        del positions, answers.positions
        if ordered is None:  # unanswered keys or a duplicate answer: the general path
            return None
        # the ordered lines are the results' lines: the same marks
        media = file_contains(results, (b'"inlineData"', b'"inline_data"'))
        into = straight() if straight is not None and not media else None
        with into if into is not None else contextlib.nullcontext(None) as out:
            if out is not None:
                size = _gather_into(results, *ordered, out, stop)
            else:
                with atomic_writer(dest) as f:
                    size = _gather_into(results, *ordered, f, stop)
        summary = PartSummary(
            part_no=part_no,
            job_id=job_id,
            results_size=results.stat().st_size,
            ordered_size=size,
            total=len(ordered[0]),
            succeeded=answers.succeeded,
            retryable=answers.retryable,
            media=media,
            tokens=answers.tokens,
            codes=list(answers.codes.values()),
            in_prefix=out is not None,
        )
        with atomic_writer(Path(f"{dest}.json")) as f:
            f.write(orjson.dumps(asdict(summary)))
        return summary


def prepare_keys(source: Path, span: tuple[int, int] | None, stop: threading.Event) -> bool:
    """Read a part's keys ahead, while its job still runs, for :func:`order_part` to take
    (one part's worth at most, ~10 MB at 100,000 keys); returns whether they were read."""
    with _one_at_a_time(stop):
        _PREPARED.clear()
        positions = _key_positions(source, stop, span)
        if positions:
            _PREPARED[(str(source), span)] = positions
        return bool(positions)


@contextlib.contextmanager
def _one_at_a_time(stop: threading.Event) -> Iterator[None]:
    """One part put in order at a time: two would only take turns at the GIL while holding
    twice the memory (the collector still downloads the next job meanwhile)."""
    while not _ORDERING.acquire(timeout=0.2):
        if stop.is_set():
            raise Stopped
    try:
        yield
    finally:
        _ORDERING.release()


def _gather_into(
    results: Path, offs: array[int], lens: array[int], out: IO[bytes], stop: Any
) -> int:
    # pread per answer, not a memory map: mapped pages of the results file would count in the
    # daemon's RSS (+128 MB for a 100,000-request part).
    fd = os.open(results, os.O_RDONLY)
    pread = os.pread
    size = 0
    try:
        for lo in range(0, len(offs), _GATHER):
            if stop.is_set():
                raise Stopped
            hi = min(lo + _GATHER, len(offs))
            batch = [pread(fd, lens[p], offs[p]) for p in range(lo, hi)]
            batch.append(b"")
            data = b"\n".join(batch)
            out.write(data)
            size += len(data)
    finally:
        os.close(fd)
    return size


def load_summary(work: Path, part_no: int, job_id: int, results: Path) -> PartSummary | None:
    """The summary of a part put in order from ``job_id``'s ``results``, if it still holds."""
    dest = fast_path(work, part_no)
    try:
        doc = orjson.loads(Path(f"{dest}.json").read_bytes())
        summary = PartSummary(**doc)
        if (
            summary.part_no != part_no
            or summary.job_id != job_id
            or summary.results_size != results.stat().st_size
        ):
            return None
        if summary.in_prefix:  # its answers are only in the outbox file in the making
            if not outbox_file.holds(work, part_no, job_id, summary.ordered_size):
                return None
        elif summary.ordered_size != dest.stat().st_size:
            return None
    except (OSError, TypeError, ValueError):
        return None
    return summary


class OrderedParts:
    """The answers of an input whose every part was put in order by :func:`order_part`: the
    subset of :class:`~daemon.results.index.MergeIndex` that writing the outbox uses."""

    def __init__(self, work: Path, summaries: list[PartSummary], index_path: Path) -> None:
        self.work = work
        self.parts = sorted(summaries, key=lambda s: s.part_no)
        self.path = index_path  # removed with the work files once the input is final
        self.stop = threading.Event()

    def counts(self) -> dict[str, int]:
        total = sum(s.total for s in self.parts)
        ok = sum(s.succeeded for s in self.parts)
        return {
            "total": total,
            "succeeded": ok,
            "failed": total - ok,
            "answered": total,
            "duplicates_dropped": 0,
            "unknown_dropped": 0,
        }

    def tokens(self) -> dict[str, int]:
        sums = [sum(s.tokens[t] for s in self.parts) for t in range(len(TOKEN_FIELDS))]
        return dict(zip(TOKEN_FIELDS, sums, strict=True))

    def error_codes(self) -> list[dict[str, Any]]:
        merged: dict[Any, list[Any]] = {}
        base = 0
        for s in self.parts:
            for code, count, pos, error in s.codes:
                seen = merged.setdefault(code, [0, base + pos, error])
                seen[0] += count
            base += s.total
        ranked = sorted(merged.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:10]
        return [{"code": c, "count": v[0], "example": v[2]} for c, v in ranked]
