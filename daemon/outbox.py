"""Atomic outbox writing: temporary name, flush, fsync, rename, directory fsync.

A consumer that sees a final name sees the whole file (SPEC §4). Temporary names start with a dot and
end in ``.tmp`` so that tools watching the outbox ignore them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from daemon import fsio

log = structlog.get_logger(__name__)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(final: Path, *, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Write ``final`` atomically: yields a binary file under a temporary name in the same folder;
    on success it is fsynced and renamed into place; on error the temporary file is removed.
    The folder and the temporary file never follow a planted link (:mod:`daemon.fsio`)."""
    with fsio.open_dir(final.parent) as dfd, fsio.new_file(dfd, f".{final.name}.tmp") as (f, tmp):
        yield f
        _publish_at(f, dfd, tmp, final.name, mode)


def publish_file(f: IO[bytes], tmp: Path, final: Path, *, mode: int = 0o644) -> None:
    """Make the temporary file ``tmp`` (open as ``f``, in ``final``'s folder) ``final``: fsync,
    set its mode, close, rename it into place and fsync the folder."""
    with fsio.open_dir(final.parent, create=False) as dfd:
        _publish_at(f, dfd, tmp.name, final.name, mode)


def _publish_at(f: IO[bytes], dfd: int, tmp: str, final: str, mode: int) -> None:
    f.flush()
    os.fsync(f.fileno())
    os.fchmod(f.fileno(), mode & ~_umask())
    f.close()
    # A link planted at the final name is replaced by the rename itself (never followed).
    try:
        os.replace(tmp, final, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as e:
        if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise
        fsio.move_aside(dfd, final)  # a folder planted at the final name
        os.replace(tmp, final, src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)


def append_file(out: IO[bytes], src: Path) -> None:
    """Append ``src`` to ``out`` (a kernel copy where the file system allows it)."""
    out.flush()
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        done = 0
        with contextlib.suppress(OSError):  # e.g. EXDEV on older kernels: copy in user space
            while done < size:
                n = os.copy_file_range(f.fileno(), out.fileno(), size - done, done)
                if n == 0:
                    break
                done += n
        if done < size:
            f.seek(done)
            out.seek(0, os.SEEK_END)
            shutil.copyfileobj(f, out, 1 << 20)
    out.seek(0, os.SEEK_END)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_json(final: Path, value: Any) -> None:
    """Write a JSON document atomically (pretty, one trailing newline)."""
    with atomic_writer(final) as f:
        f.write(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        f.write(b"\n")


def copy_atomic(src: Path, final: Path) -> None:
    """Copy a file into the outbox atomically."""
    with open(src, "rb") as inp, atomic_writer(final) as out:
        shutil.copyfileobj(inp, out, 1024 * 1024)


def copy_in(src: Path, tmp: Path) -> None:
    """Copy ``src`` to ``tmp`` and fsync the copy."""
    with open(src, "rb") as inp, open(tmp, "wb") as out:
        shutil.copyfileobj(inp, out, 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())


def link_or_copy(src: Path, final: Path) -> bool:
    """Make ``final`` a hard link of ``src`` (replacing it atomically), or an atomic copy when
    they are on different filesystems. ``src`` (in the shared outbox) must be the daemon's own
    regular file, not a link or a producer's file planted there: otherwise nothing is made, it
    is logged, and False returned."""
    try:
        with fsio.open_dir(src.parent, create=False) as sfd, fsio.open_regular(sfd, src.name) as f:
            st = os.fstat(f.fileno())
            with fsio.open_dir(final.parent) as dfd:
                if _link_same(sfd, src.name, dfd, final.name, st):
                    return True
            with atomic_writer(final) as out:
                shutil.copyfileobj(f, out, 1024 * 1024)
        return True
    except fsio.PlantedLink as e:
        log.warning("results_copy_refused", path=str(src), why=e.strerror)
        return False


def _link_same(sfd: int, src: str, dfd: int, final: str, st: os.stat_result) -> bool:
    """Hard-link ``src`` as ``final`` if the name still is the file ``st`` describes."""
    tmp = f".{final}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dfd)
    try:
        os.link(src, tmp, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    got = os.stat(tmp, dir_fd=dfd, follow_symlinks=False)
    if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):  # swapped since it was opened
        os.unlink(tmp, dir_fd=dfd)
        return False
    os.replace(tmp, final, src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)
    return True


def remove_quietly(path: Path) -> bool:
    """Remove a file if it exists (making the removal durable); returns whether it existed.
    A link planted on the way is not followed."""
    return fsio.remove(path)
