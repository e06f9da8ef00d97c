"""Building blocks of the validator: block reading with hashing in a second thread, the part
writer (canonical part files written in big blocks, fsynced once each), and media checks."""

from __future__ import annotations

import hashlib
import os
import stat
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from daemon.config import Config

MAX_MEDIA_NAMES = 10_000
BLOCK = 1 << 20
_THREAD_HASH_BYTES = 8 * BLOCK  # smaller files are hashed inline
_MAX_PENDING = 8  # blocks queued for the hashing thread (bounds memory)


def part_file_name(part_no: int, attempt: int = 1) -> str:
    return f"part-{part_no}-a{attempt}.jsonl"


class Hasher:
    """sha256 of a byte stream; big streams are hashed in a worker thread (hashlib releases the
    GIL for large buffers), so hashing overlaps with parsing."""

    def __init__(self, size_hint: int) -> None:
        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1) if size_hint > _THREAD_HASH_BYTES else None
        self._pending: deque[Future[None]] = deque()

    def update(self, data: bytes) -> None:
        if self._pool is None:
            self._sha.update(data)
            return
        self._pending.append(self._pool.submit(self._sha.update, data))
        while len(self._pending) > _MAX_PENDING:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        while self._pending:
            self._pending.popleft().result()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def blocks_of_lines(
    f: IO[bytes], limit: int, update: Any
) -> Iterator[tuple[list[Any], bool, bool]]:
    """Read ``f`` in 1 MiB blocks and yield ``(lines, last, has_file)``: lines without their
    newline; ``last`` for the final line when the file does not end with a newline; ``has_file``
    when ``b"file"`` occurs in the lines (a cheap block-level pre-check for media references). A line longer than
    ``limit + 1`` bytes is yielded as an int (its byte count) and never held in memory whole."""
    rest = b""
    skipping = -1  # >= 0: bytes so far of an over-long line being skipped
    read = f.read
    while True:
        block = read(BLOCK)
        if not block:
            break
        update(block)
        if skipping >= 0:
            i = block.find(b"\n")
            if i < 0:
                skipping += len(block)
                continue
            yield [skipping + i + 1], False, False
            skipping = -1
            block = block[i + 1 :]
        data = rest + block if rest else block
        lines = data.split(b"\n")
        rest = lines.pop()
        if len(rest) > limit + 1:
            skipping, rest = len(rest), b""
        if lines:
            yield lines, False, b"file" in data
    if skipping >= 0:
        yield [skipping], True, False
    elif rest:
        yield [rest], True, b"file" in rest


class MediaChecker:
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


def media_uris(request: dict[str, Any], kind: str) -> Iterator[str]:
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


class PartWriter:
    """Plans parts in input order and (optionally) writes their canonical files in big blocks,
    each fsynced once when complete."""

    def __init__(self, cfg: Config, out_dir: Path | None) -> None:
        self.max_requests = cfg.submit.max_requests_per_job
        self.max_bytes = cfg.submit.max_job_bytes
        self.out_dir = out_dir
        self.parts: list[PartPlan] = []
        self.written: list[Path] = []
        self.file: IO[bytes] | None = None
        self.writing = out_dir is not None
        self.buf: list[bytes] = []
        self.buf_bytes = 0
        self._reset()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def _reset(self) -> None:
        self.count = self.size = self.tokens = 0
        self.first_line = self.last_line = self.start = self.end = 0

    def add(self, line_no: int, start: int, end: int, canon: bytes, tokens: int) -> None:
        """Add one request; ``canon`` is its canonical line without the newline."""
        n = len(canon) + 1
        if self.count and (self.count >= self.max_requests or self.size + n > self.max_bytes):
            self.finish()
        if not self.count:
            self.first_line, self.start = line_no, start
            if self.writing:
                assert self.out_dir is not None
                path = self.out_dir / part_file_name(len(self.parts) + 1)
                self.file = open(path, "wb", buffering=0)
                self.written.append(path)
        self.count += 1
        self.size += n
        self.tokens += tokens
        self.last_line, self.end = line_no, end
        if self.file is not None:
            self.buf.append(canon)
            self.buf_bytes += n
            if self.buf_bytes >= BLOCK:
                self._flush()

    def _flush(self) -> None:
        if self.file is not None and self.buf:
            self.file.write(b"\n".join(self.buf))
            self.file.write(b"\n")
        self.buf.clear()
        self.buf_bytes = 0

    def finish(self) -> None:
        if not self.count:
            return
        source: Path | None = None
        if self.file is not None:
            self._flush()
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
        self.buf.clear()
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
