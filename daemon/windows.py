"""Byte windows of a file and the one sha256 helper (standard library only: the validator's
child process imports this)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import IO, Any

_HASH_BLOCK = 8 << 20  # few reads: hashlib lets go of the GIL on big updates


def sha256_of(source: Path | IO[bytes]) -> str:
    """The sha256 (hex) of a file, by path or of an open binary file (read from its start)."""
    if isinstance(source, Path):
        with open(source, "rb", buffering=0) as f:
            return sha256_of(f)
    sha = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    source.seek(0)
    while n := source.readinto(buf):  # type: ignore[attr-defined]
        sha.update(view[:n])
    return sha.hexdigest()


class FileWindow(io.RawIOBase):
    """A read-only, seekable view of bytes ``start:end`` of a file, for the SDK's upload of an
    IO object (it takes the size from ``seek``/``tell`` and reads in chunks)."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        self._f = open(path, "rb", buffering=0)
        self._start, self._end, self._pos = start, end, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._end - self._start}
        self._pos = max(0, base[whence] + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        left = self._end - self._start - self._pos
        if size < 0 or size > left:
            size = max(0, left)
        data = os.pread(self._f.fileno(), size, self._start + self._pos) if size else b""
        if len(data) < size:  # the file shrank: never send a short (or endless) upload
            raise OSError(f"{self._f.name}: shorter than the part's byte range")
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        left = self._end - self._start - self._pos
        want = min(len(buffer), max(0, left))
        if not want:
            return 0
        with memoryview(buffer).cast("B")[:want] as view:  # straight into it: no copy
            n = os.preadv(self._f.fileno(), [view], self._start + self._pos)
        if n < want:  # the file shrank: never hand on a short window
            raise OSError(f"{self._f.name}: shorter than the part's byte range")
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()
