"""Planting links and files in shared folders the way a producer would: as ``nobody`` in the
spool's group (the daemon and the tests run as root)."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from pathlib import Path

import pytest

NOBODY, NOGROUP = pwd.getpwnam("nobody")[2:4]  # uid, and its group (nogroup on Debian)
# Planting as another user and sharing folders with its group needs root (as the tests run here).
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="plants as nobody: needs root")


def as_producer(folder: Path, action: Callable[[int], object]) -> None:
    """Run ``action(<descriptor of folder>)`` in a child process as nobody:nogroup (a producer in
    the spool's group); the child makes only system calls, then leaves."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setgid(NOGROUP)
                os.setuid(NOBODY)
                action(fd)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"{action} failed as nobody in {folder}"
    finally:
        os.close(fd)


def plant_link(folder: Path, name: str, target: Path) -> Path:
    as_producer(folder, lambda fd: os.symlink(target, name, dir_fd=fd))
    assert (folder / name).is_symlink()
    return folder / name


def shared(folder: Path) -> Path:
    """A folder as the spool shares it: root:nogroup, setgid, group-writable."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, 0, NOGROUP)
    os.chmod(folder, 0o2770)
    return folder


def victim(tmp_path: Path) -> Path:
    """A folder of the daemon's user that a producer must not reach, with two files."""
    v = tmp_path / "victim"
    v.mkdir()
    (v / "secret.txt").write_bytes(b"do not touch")
    (v / "other.bin").write_bytes(b"\x00" * 10)
    return v


def untouched(v: Path) -> None:
    assert sorted(p.name for p in v.iterdir()) == ["other.bin", "secret.txt"]
    assert (v / "secret.txt").read_bytes() == b"do not touch"
    assert (v / "other.bin").read_bytes() == b"\x00" * 10
