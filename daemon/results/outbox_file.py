"""A big input's outbox results file, assembled while its jobs still run.

When the first parts of an input have been put in order (:mod:`daemon.results.fast_order`), they are
appended to a hidden temporary file next to the final outbox file
(``outbox/.<name>.<input id>.tmp``) and flushed to disk, so that settling the input only has to
append the parts that came back last, fsync and rename. A record in the input's work folder
(``prefix.json``, written after the data is on disk) lists the parts appended, with the job and
size each came from; settling trusts the file only as far as the record matches the parts it
would write anyway, and otherwise starts from scratch. Synchronous: run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

import orjson

from daemon import fsio
from daemon.layout import PREFIX_RECORD
from daemon.outbox import append_file, publish_file

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class Ready(NamedTuple):
    """A part whose answers are in order in ``path`` (``size`` bytes), from job ``job_id``."""

    part_no: int
    job_id: int
    path: Path
    size: int


def prefix_path(results: Path, work: Path) -> Path:
    """The temporary file for the outbox file ``results`` of the input with work folder ``work``
    (the input id in the name: two inputs of the same name never share it)."""
    return results.with_name(f".{results.name}.{work.name}.tmp")


def _record_path(work: Path) -> Path:
    return work / PREFIX_RECORD


def _lock(prefix: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(str(prefix), threading.Lock())


def _recorded(work: Path, parts: list[Ready]) -> list[list[int]]:
    """The record's rows, if they agree with ``parts`` as far as both go (the record may hold
    more parts than a caller knows of yet); [] if it disagrees or is missing."""
    try:
        rows = orjson.loads(_record_path(work).read_bytes())
    except (OSError, ValueError):
        return []
    for row, part in zip(rows, parts, strict=False):
        if row != [part.part_no, part.job_id, part.size]:
            return []
    return rows  # type: ignore[no-any-return]


def _open(prefix: Path, work: Path, parts: list[Ready]) -> tuple[IO[bytes], int]:
    """The prefix file open for appending after the parts it validly holds, and their count
    (which may exceed ``len(parts)``: a caller that looked before the last part was recorded).
    When the file cannot be trusted it starts empty, and its record goes (parts that went
    straight in are then no longer taken as held, see :func:`holds`)."""
    rows = _recorded(work, parts)
    size = sum(row[2] for row in rows)
    f = _open_prefix(prefix)
    if f is None:
        rows, size = [], 0
        f = _open_prefix(prefix, new=True)
        assert f is not None
    if os.fstat(f.fileno()).st_size < size:  # shorter than recorded: start again
        rows, size = [], 0
    if not rows:
        with contextlib.suppress(FileNotFoundError):
            _record_path(work).unlink()
    f.truncate(size)  # drops a half-appended part
    f.seek(size)
    return f, len(rows)


def _open_prefix(prefix: Path, *, new: bool = False) -> IO[bytes] | None:
    """The prefix file in the shared outbox: the daemon's own regular file or a new one (a link
    or a producer's file planted at its name is removed, never followed: :mod:`daemon.fsio`);
    None when it is missing and ``new`` is False."""
    with fsio.open_dir(prefix.parent) as dfd:
        if not new:
            return fsio.open_own(dfd, prefix.name)
        fd = fsio.open_new(dfd, prefix.name, flags=os.O_RDWR)
        return os.fdopen(fd, "w+b")


def extend(results: Path, work: Path, ready: list[Ready]) -> int:
    """Append the consecutive ready parts (from part 1) that the prefix file lacks, flush them to
    disk and record them; returns how many parts it holds."""
    prefix = prefix_path(results, work)
    with _lock(prefix):
        if not ready:
            return 0
        f, held = _open(prefix, work, ready)
        with f:
            if held >= len(ready):
                return held
            for part in ready[held:]:
                append_file(f, part.path)
            f.flush()
            os.fdatasync(f.fileno())
        _record(work, ready)
        return len(ready)


@contextlib.contextmanager
def straight_in(
    results: Path, work: Path, before: list[Ready], part_no: int, job_id: int
) -> Iterator[IO[bytes] | None]:
    """The prefix file open at its end for part ``part_no``'s bytes, when it holds exactly the
    parts ``before`` it (so the part needs no ordered file of its own, nor a copy); None (and
    nothing changed) otherwise. On success the part is flushed to disk and recorded; if the
    writer fails, what it wrote is cut off again."""
    prefix = prefix_path(results, work)
    with _lock(prefix):
        if len(before) != part_no - 1 or [p.part_no for p in before] != list(range(1, part_no)):
            yield None
            return
        f, held = _open(prefix, work, before)
        with f:
            if held != len(before):
                yield None
                return
            start = f.tell()
            try:
                yield f
            except BaseException:
                f.truncate(start)
                raise
            f.flush()
            os.fdatasync(f.fileno())
            size = f.tell() - start
        _record(work, [*before, Ready(part_no, job_id, Path(), size)])


def holds(work: Path, part_no: int, job_id: int, size: int) -> bool:
    """Whether the record says the prefix file holds this part, from this job, of this size."""
    try:
        rows = orjson.loads(_record_path(work).read_bytes())
    except (OSError, ValueError):
        return False
    return [part_no, job_id, size] in rows


def _record(work: Path, parts: list[Ready]) -> None:
    """Write the record of the parts the prefix file holds (after their data is on disk)."""
    tmp = _record_path(work).with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps([[p.part_no, p.job_id, p.size] for p in parts]))
    with open(tmp, "rb") as r:
        os.fsync(r.fileno())
    os.replace(tmp, _record_path(work))


def publish(
    results: Path, work: Path, parts: list[Ready], after_first: Callable[[], None] | None = None
) -> None:
    """At settle: append to the prefix file the parts it does not hold yet (all of them if it
    cannot be trusted), fsync it and rename it to ``results``; ``after_first`` runs once, when
    the first part appended here is flushed (or before the rename if nothing was left)."""
    prefix = prefix_path(results, work)
    with _lock(prefix):
        f, held = _open(prefix, work, parts)
        try:
            if held > len(parts):  # recorded parts the input does not have: not written out
                held = len(parts)
                f.truncate(sum(p.size for p in parts))
                f.seek(0, os.SEEK_END)
            for i, part in enumerate(parts[held:]):
                append_file(f, part.path)
                if i == 0 and after_first is not None:
                    f.flush()
                    after_first()
            if held == len(parts) and after_first is not None:
                after_first()
            publish_file(f, prefix, results)
        except BaseException:
            f.close()
            raise
    with contextlib.suppress(FileNotFoundError):
        _record_path(work).unlink()


def discard(results: Path, work: Path) -> None:
    """Remove the prefix file and its record (the input was written another way, or ended)."""
    prefix = prefix_path(results, work)
    with _lock(prefix):
        fsio.remove(prefix)
        with contextlib.suppress(FileNotFoundError):
            _record_path(work).unlink()
    with _locks_guard:
        _locks.pop(str(prefix), None)
