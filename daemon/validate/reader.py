"""Building blocks of the validator: the whole-file scan (sha256, media marks) in a second
thread, the part planner/writer (byte ranges of the input, or canonical part files written in big
blocks and fsynced once each), and media checks.

Longer than ~400 lines: what the validator's child needs besides the rules (scan, part writer,
media checks), standard library only.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import io
import os
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from daemon.config import Config
from daemon.layout import part_file_name
from daemon.windows import FileWindow

MAX_MEDIA_NAMES = 10_000
BLOCK = 1 << 20
_THREAD_SCAN_BYTES = 8 * BLOCK  # smaller files are scanned inline
_SCAN_BLOCK = 8 * BLOCK  # few reads: each costs the scan thread a wait for the GIL


MEDIA_MARK = b'"file:'  # how a local media reference (a "file:NAME" URI) starts in JSON


class FileScan:
    """One read of a file for facts about the whole of it: its sha256 (unless ``digest`` is
    False) and whether ``"file:`` occurs anywhere (i.e. whether any line may refer to local
    media; unless ``marks`` is False). Both run without the GIL (hashlib, and libc ``memmem`` through ctypes), so a big file
    is scanned in a worker thread on the second core while the validator parses it; a small one,
    or any with ``inline``, is scanned in the caller's thread when :meth:`result` is asked."""

    def __init__(
        self,
        path: Path,
        size: int,
        *,
        inline: bool = False,
        digest: bool = True,
        marks: bool = True,
    ) -> None:
        self._path = path
        self._digest = digest
        self._marks = (MEDIA_MARK,) if marks else ()
        self._result: tuple[str | None, bool] | None = None
        threaded = size > _THREAD_SCAN_BYTES and not inline
        self._pool = ThreadPoolExecutor(1) if threaded else None
        self._future = self._pool.submit(self._scan) if self._pool is not None else None

    def _scan(self) -> tuple[str | None, bool]:
        sha = hashlib.sha256() if self._digest else None
        found = _scan_file(self._path, self._marks, _SCAN_BLOCK, sha.update if sha else None)
        return (sha.hexdigest() if sha else None), found

    def result(self) -> tuple[str | None, bool]:
        """``(sha256 hex digest or None, "file:" seen)``."""
        if self._result is None:
            if self._future is None:
                self._result = self._scan()
            else:
                try:
                    self._result = self._future.result()
                finally:
                    assert self._pool is not None
                    self._pool.shutdown()
        return self._result


def _memmem() -> Any:
    try:
        libc = ctypes.CDLL(None)
        fn = libc.memmem
    except (OSError, AttributeError):  # no libc memmem: bytes.find (holds the GIL)
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    return fn


_MEMMEM = _memmem()


def _has_mark(buf: bytearray | memoryview, n: int, mark: bytes) -> bool:
    if _MEMMEM is None:
        return (
            bytes(buf[:n]).find(mark) >= 0
            if isinstance(buf, memoryview)
            else buf.find(mark, 0, n) >= 0
        )
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    return bool(_MEMMEM(base, n, mark, len(mark)))


def file_contains(path: Path, marks: tuple[bytes, ...]) -> bool:
    """Whether any of ``marks`` occurs in the file (libc ``memmem`` over 1 MiB reads, without
    the GIL; a mark across two reads is found too)."""
    return _scan_file(path, marks, BLOCK)


def _scan_file(path: Path, marks: tuple[bytes, ...], block: int, update: Any = None) -> bool:
    """Read ``path`` once in ``block``-sized reads, feeding each to ``update`` (if given, to the
    end), and tell whether any of ``marks`` (at most 64 bytes each) occurs."""
    buf = bytearray(block)
    view = memoryview(buf)
    finder = MarkFinder(marks)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if update is not None:
                update(view[:n])
            if finder.feed(buf, n) and update is None:
                break
    return finder.found


class MarkFinder:
    """Looks for marks (at most 64 bytes each) in consecutive reads, a mark across two reads
    included; libc ``memmem`` in the reader's own buffer."""

    def __init__(self, marks: tuple[bytes, ...]) -> None:
        self.marks = marks
        self.found = False
        self._edge = b""  # the end of the previous read

    def feed(self, buf: bytearray | memoryview, n: int) -> bool:
        """Look at ``buf[:n]``, the next read; returns whether a mark was found so far."""
        if not self.found:
            edge = self._edge + bytes(buf[: min(n, 64)])
            self.found = any(m in edge or _has_mark(buf, n, m) for m in self.marks)
            self._edge = bytes(buf[max(0, n - 64) : n])
        return self.found


class MediaChecker:
    """Checks ``file:NAME`` references against ``media_dir``, caching verdicts by name."""

    def __init__(self, media_dir: Path) -> None:
        self.root = os.path.realpath(media_dir)
        self.cache: dict[str, str | None] = {}
        # name → (st_dev, st_ino, st_size, st_mtime_ns) of the file found valid: the upload
        # sends that very file (daemon.submit.media), not one swapped in later
        self.ids: dict[str, tuple[int, int, int, int]] = {}

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
        self.ids[name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return None


def media_parts(request: dict[str, Any], kind: str) -> Iterator[dict[str, Any]]:
    """The ``fileData``/``file_data`` dicts with a ``file:`` URI in ``contents[].parts[]``
    (generate) or ``content.parts[]`` (embed): the local media references validation checks
    and the submit stage uploads and rewrites."""
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
                    yield fd


def media_name(fd: dict[str, Any]) -> str:
    """``NAME`` of a :func:`media_parts` dict's ``file:NAME`` URI."""
    return str(fd.get("fileUri", fd.get("file_uri")))[5:]


def media_uris(request: dict[str, Any], kind: str) -> Iterator[str]:
    """The names of :func:`media_parts`."""
    return map(media_name, media_parts(request, kind))


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
    """Plans parts in input order. With an ``out_dir`` it also provides their sources: while every
    line so far is canonical (kept byte for byte), a part is just a byte range of the input and
    nothing is written; the first line that needs rewriting turns the parts so far into part
    files (copied from the input) and every later line is written there, in big blocks, each file
    fsynced once when complete."""

    def __init__(self, cfg: Config, out_dir: Path | None, src: Path) -> None:
        self.max_requests = cfg.submit.max_requests_per_job
        self.max_bytes = cfg.submit.max_job_bytes
        self.out_dir = out_dir
        self.src = src
        self.parts: list[PartPlan] = []
        self.written: list[Path] = []
        self.file: IO[bytes] | None = None
        self.writing = False  # part files are being written
        self.ranged = out_dir is not None  # parts are byte ranges of the input (so far)
        self.buf: list[bytes] = []
        self.buf_bytes = 0
        self._reset()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def _reset(self) -> None:
        self.count = self.size = self.tokens = 0
        self.first_line = self.last_line = self.start = self.end = 0

    def add_block(
        self, line_no: int, start: int, lines: list[bytes], size: int, tokens: int
    ) -> None:
        """Add a block of canonical lines (each with its newline) taken byte for byte."""
        n = len(lines)
        if self.count + n > self.max_requests or self.size + size > self.max_bytes:
            per_line = tokens // n
            for raw in lines:
                end = start + len(raw)
                self.add(line_no, start, end, raw[:-1], per_line, same=True)
                line_no, start = line_no + 1, end
            return
        self._take_block(line_no, start, n, size, tokens)
        if self.writing:
            self.buf.extend(lines)
            self.buf_bytes += size
            if self.buf_bytes >= BLOCK:
                self._flush()

    def add_run(
        self, line_no: int, start: int, lengths: Sequence[int], size: int, tokens: int
    ) -> None:
        """Like :meth:`add_block`, for lines known only by their lengths (with the newline):
        canonical lines of the input that stay byte ranges. Only while nothing is written."""
        assert not self.writing
        n = len(lengths)
        if self.count + n > self.max_requests or self.size + size > self.max_bytes:
            per_line = tokens // n
            for length in lengths:
                self._take(line_no, start, start + length, length, per_line, same=True)
                line_no, start = line_no + 1, start + length
            return
        self._take_block(line_no, start, n, size, tokens)

    def _take_block(self, line_no: int, start: int, n: int, size: int, tokens: int) -> None:
        if not self.count:
            self._open(line_no, start)
        self.count += n
        self.size += size
        self.tokens += tokens
        self.last_line, self.end = line_no + n - 1, start + size

    def add(
        self, line_no: int, start: int, end: int, canon: bytes, tokens: int, *, same: bool
    ) -> None:
        """Add one request; ``canon`` is its canonical line without the newline, ``same`` when
        it equals the input's bytes between ``start`` and ``end`` (less the newline)."""
        n = len(canon) + 1
        self._take(line_no, start, end, n, tokens, same=same)
        if self.writing:
            self.buf.append(canon + b"\n")
            self.buf_bytes += n
            if self.buf_bytes >= BLOCK:
                self._flush()

    def _take(self, line_no: int, start: int, end: int, n: int, tokens: int, *, same: bool) -> None:
        """Count one request of ``n`` canonical bytes into the part, starting a new part first
        when it would not fit."""
        if self.count and (self.count >= self.max_requests or self.size + n > self.max_bytes):
            self.finish()
        if self.ranged and not same:
            self._materialise()
        if not self.count:
            self._open(line_no, start)
        self.count += 1
        self.size += n
        self.tokens += tokens
        self.last_line, self.end = line_no, end

    def _open(self, line_no: int, start: int) -> None:
        self.first_line, self.start = line_no, start
        if self.writing:
            assert self.out_dir is not None
            path = self.out_dir / part_file_name(len(self.parts) + 1)
            self.file = open(path, "wb", buffering=0)
            self.written.append(path)

    def _materialise(self) -> None:
        """Switch from byte ranges to part files: copy the parts planned so far (and the part
        in progress) out of the input."""
        assert self.out_dir is not None
        self.ranged = False
        self.writing = True
        with open(self.src, "rb") as src:
            for i, p in enumerate(self.parts):
                path = self.out_dir / part_file_name(p.part_no)
                with open(path, "wb") as out:
                    _copy_range(src, out, p.start_offset, p.end_offset)
                    out.flush()
                    os.fsync(out.fileno())
                self.written.append(path)
                self.parts[i] = dataclasses.replace(p, source_path=path)
            if self.count:
                path = self.out_dir / part_file_name(len(self.parts) + 1)
                self.file = open(path, "wb", buffering=0)
                self.written.append(path)
                _copy_range(src, self.file, self.start, self.end)

    def _flush(self) -> None:
        if self.file is not None and self.buf:
            self.file.write(b"".join(self.buf))
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
        self.writing = self.ranged = False
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


def _copy_range(src: IO[bytes], out: IO[bytes], start: int, end: int) -> None:
    src.seek(start)
    left = end - start
    while left > 0:
        chunk = src.read(min(left, BLOCK))
        if not chunk:
            raise OSError(f"{src.name}: shorter than expected")
        out.write(chunk)
        left -= len(chunk)


class ScanningWindow(FileWindow):
    """A :class:`FileWindow` that also looks for the media mark (``"file:``) in what it reads,
    straight in the reader's buffer, so that a file parsed in windows needs no separate read to
    know whether it may refer to local media."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        super().__init__(path, start, end)
        self._marks = MarkFinder((MEDIA_MARK,))

    @property
    def found(self) -> bool:
        return self._marks.found

    read = io.RawIOBase.read  # type: ignore[assignment]  # every read goes through readinto

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        if n:
            self._marks.feed(buffer, n)
        return n
