"""Safe file operations in folders that others may write to (the shared outbox).

Producers share the outbox's group-writable folders, so any name there may be a link one of them
planted. Nothing here follows a link the daemon did not make. Under a *shared root*
(:func:`share`, the outbox), folders are opened one component at a time from the root with
``O_NOFOLLOW | O_DIRECTORY``; a link in a folder's place is removed (not followed) and a real
folder made (logged as ``planted_folder_replaced``). Files are created with
``O_CREAT | O_EXCL | O_NOFOLLOW``, and renames and removals are made relative to the folder's
descriptor, so a link swapped in after a check is never followed either. Folders outside every
shared root (the daemon's own state folder) are opened as given: links there are the admin's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger(__name__)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_roots: set[Path] = set()


class PlantedLink(OSError):
    """A name the daemon would have to follow as a link (or a file not its own) was refused."""


def share(*roots: Path) -> None:
    """Declare ``roots`` shared: nothing below them is followed as a link."""
    _roots.update(Path(os.path.abspath(r)) for r in roots)


def _split(path: Path) -> tuple[Path, tuple[str, ...]]:
    """The trusted start of ``path`` and the components below it to open without links."""
    path = Path(os.path.abspath(path))
    best: Path | None = None
    for root in _roots:
        if path.is_relative_to(root) and (best is None or len(root.parts) > len(best.parts)):
            best = root
    if best is None:
        return path, ()
    return best, path.parts[len(best.parts) :]


@contextlib.contextmanager
def open_dir(path: Path, *, create: bool = True) -> Iterator[int]:
    """A descriptor of the folder ``path`` (made if missing unless ``create`` is False, which
    raises FileNotFoundError instead); below a shared root no component is followed as a link."""
    fd = _open_dir(path, create)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_dir(path: Path, create: bool) -> int:
    root, below = _split(path)
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, _DIR)
    try:
        where = root
        for name in below:
            where = where / name
            nxt = _child_dir(fd, name, where, create)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _child_dir(fd: int, name: str, where: Path, create: bool) -> int:
    for _ in range(3):
        try:
            return os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            if _is_link(fd, name):
                _unlink_link(fd, name, where)
                why = "planted link removed"
            elif create:  # a file where a folder belongs: kept aside for its owner
                move_aside(fd, name)
                why = "planted file moved aside"
            else:
                why = "not a folder"
            if not create:
                raise FileNotFoundError(errno.ENOENT, why, str(where)) from None
            log.warning("planted_folder_replaced", path=str(where), was=why)
    raise PlantedLink(errno.ELOOP, "a link keeps being planted here", str(where))


def _is_link(fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _where(dir_fd: int, name: str) -> Path:
    """The path of ``name`` in the folder ``dir_fd``, for the log."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{dir_fd}")) / name
    except OSError:
        return Path(name)


def _unlink_link(fd: int, name: str, where: Path) -> None:
    """Remove the link ``name`` (the link itself, never its target), saying what it pointed at."""
    with contextlib.suppress(OSError):
        log.warning("planted_link_removed", path=str(where), target=os.readlink(name, dir_fd=fd))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=fd)


def open_new(dir_fd: int, name: str, *, flags: int = os.O_WRONLY) -> int:
    """A new, empty file ``name`` in the folder ``dir_fd`` (mode 0600 until published). A
    leftover of that name is removed first (a link: the link, not its target); if something
    takes the name again in between (or a folder holds it), FileExistsError."""
    if _is_link(dir_fd, name):
        _unlink_link(dir_fd, name, _where(dir_fd, name))
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        os.unlink(name, dir_fd=dir_fd)
    return os.open(name, flags | _NEW, 0o600, dir_fd=dir_fd)


@contextlib.contextmanager
def new_file(dir_fd: int, name: str) -> Iterator[tuple[IO[bytes], str]]:
    """``(file, its name)``: :func:`open_new` for writing, with a random temporary name
    (``.<name>.<hex>.tmp``) when ``name`` is taken. Removed again if the body raises."""
    try:
        fd = open_new(dir_fd, name)
    except FileExistsError:
        name = f"{name.removesuffix('.tmp')}.{secrets.token_hex(8)}.tmp"
        fd = os.open(name, os.O_WRONLY | _NEW, 0o600, dir_fd=dir_fd)
    f = os.fdopen(fd, "wb")
    try:
        yield f, name
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        raise


def open_own(dir_fd: int, name: str) -> IO[bytes] | None:
    """``name`` open for reading and writing if it is a regular file of the daemon's own with
    no other name (not a link, not a producer's file); None when missing. Anything else is
    removed (logged)."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        _unlink_link(dir_fd, name, _where(dir_fd, name))
        return None
    st = os.fstat(fd)
    # one name only: not a hard link a producer made to some other file of the daemon's
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
        return os.fdopen(fd, "r+b")
    os.close(fd)
    log.warning("planted_file_removed", path=str(_where(dir_fd, name)), uid=st.st_uid)
    os.unlink(name, dir_fd=dir_fd)
    return None


def open_regular(dir_fd: int, name: str) -> IO[bytes]:
    """``name`` open for reading: a regular file of the daemon's own, never a link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PlantedLink(errno.ELOOP, "a link, not the daemon's file", name) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise PlantedLink(errno.EPERM, "not a regular file of the daemon's own", name)
    return os.fdopen(fd, "rb")


def move_aside(dir_fd: int, name: str) -> str:
    """Rename the entry ``name`` (e.g. a folder a producer planted where the daemon writes a
    file) to ``.<name>.planted-<hex>``, kept for its owner and logged; returns the new name."""
    aside = f".{name}.planted-{secrets.token_hex(4)}"
    os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    log.warning("planted_entry_moved_aside", path=str(_where(dir_fd, name)), to=aside)
    return aside


def remove(path: Path) -> bool:
    """Remove the file ``path`` (a link: the link) durably; whether it existed."""
    try:
        with open_dir(path.parent, create=False) as dfd:
            os.unlink(path.name, dir_fd=dfd)
            os.fsync(dfd)
    except FileNotFoundError:
        return False
    return True


def prune(folder: Path, keep: set[str]) -> None:
    """Remove the entries of ``folder`` not in ``keep`` (not sub-folders nor dot-names); the
    folder itself too when ``keep`` is empty. A link at ``folder`` is removed, not followed."""
    try:
        with open_dir(folder, create=False) as dfd:
            for entry in os.scandir(dfd):
                if entry.name.startswith(".") or entry.name in keep:
                    continue
                if not entry.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=dfd)
    except FileNotFoundError:
        return
    if not keep:
        with contextlib.suppress(OSError), open_dir(folder.parent, create=False) as pfd:
            os.rmdir(folder.name, dir_fd=pfd)
