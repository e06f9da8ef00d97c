"""Atomic outbox writing: temporary name, flush, fsync, rename, directory fsync.

A consumer that sees a final name sees the whole file (SPEC §4). Temporary names start with a dot and
end in ``.tmp`` so that tools watching the outbox ignore them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(final: Path, *, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Write ``final`` atomically: yields a binary file under a temporary name in the same folder;
    on success it is fsynced and renamed into place; on error the temporary file is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # One daemon per state folder (a lock), so a fixed temporary name is safe, and a crash's
    # leftover is simply overwritten by the retry.
    tmp = final.with_name(f".{final.name}.tmp")
    f = open(tmp, "wb")
    try:
        yield f
        publish_file(f, tmp, final, mode=mode)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def publish_file(f: IO[bytes], tmp: Path, final: Path, *, mode: int = 0o644) -> None:
    """Make the temporary file ``tmp`` (open as ``f``) ``final``: fsync, close, set its mode,
    rename it into place and fsync the folder."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, final)
    fsync_dir(final.parent)


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
    with atomic_writer(final) as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, 1024 * 1024)


def outbox_paths(outbox_dir: Path, rel_path: str) -> dict[str, Path]:
    """The outbox names for an input at ``rel_path`` (relative to the inbox): ``foo.jsonl`` (or
    ``foo.JSONL``) → ``foo.jsonl``, ``foo.summary.json``, ``foo.error.json``, ``foo.media/``.
    A name too long for its outbox files (:func:`name_too_long`) only gets a shortened error
    file: :func:`short_stem` ``.error.json``."""
    rel = Path(rel_path)
    stem = jsonl_stem(rel.name)
    folder = outbox_dir / rel.parent
    error_stem = short_stem(stem, folder) if name_too_long(folder, rel.name) else stem
    return {
        "results": folder / f"{stem}.jsonl",
        "summary": folder / f"{stem}.summary.json",
        "error": folder / f"{error_stem}.error.json",
        "media": folder / f"{stem}.media",
    }


# The longest name written next to an input's results is a big input's file in the making,
# ``.<stem>.jsonl.<input id>.tmp`` (daemon.assemble): 29 bytes more than the stem.
OUTBOX_NAME_EXTRA = len(".") + len(".jsonl.") + 17 + len(".tmp")
SHORT_STEM_BYTES = 200  # the start of an over-long stem kept in its error file's name


def jsonl_stem(name: str) -> str:
    """``foo.jsonl`` (any case) → ``foo``."""
    return name[: -len(".jsonl")] if name.lower().endswith(".jsonl") else name


@functools.lru_cache(maxsize=64)
def _name_max_of(existing: str) -> int:
    return os.pathconf(existing, "PC_NAME_MAX")


def name_max(folder: Path) -> int:
    """The file system's limit on one name's bytes, for ``folder`` or its nearest existing parent."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return _name_max_of(str(probe))
    except OSError:
        return 255


def name_too_long(folder: Path, name: str) -> int | None:
    """The limit, when the outbox files of a drop named ``name`` in ``folder`` would exceed it."""
    limit = name_max(folder)
    fits = len(os.fsencode(jsonl_stem(name))) + OUTBOX_NAME_EXTRA <= limit
    return None if fits else limit


def short_stem(stem: str, folder: Path) -> str:
    """``<first 200 bytes of the stem>~<8 hex digits of its sha256>`` (whole characters only):
    the error file of a drop whose name is too long, unique per name."""
    raw = os.fsencode(stem)
    keep = min(SHORT_STEM_BYTES, name_max(folder) - len(".error.json.tmp") - 10)
    head = raw[:keep].decode("utf-8", "ignore")  # a character cut in two is dropped
    digest = hashlib.sha256(raw).hexdigest()[:8]
    return f"{head}~{digest}"


def link_or_copy(src: Path, final: Path) -> None:
    """Make ``final`` a hard link of ``src`` (replacing it atomically), or an atomic copy when
    they are on different filesystems."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        copy_atomic(src, final)
        return
    os.replace(tmp, final)
    fsync_dir(final.parent)


def remove_quietly(path: Path) -> bool:
    """Remove a file if it exists (making the removal durable); returns whether it existed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
