"""Disk-fault bookkeeping (daemon.io_faults) and the STATUS= line that shows it."""

from __future__ import annotations

import errno
import sqlite3

from daemon.config import parse_config
from daemon.context import Context
from daemon.io_faults import IOFaults, describe, is_disk_fault, writable
from daemon.service import _status_line
from daemon.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_the_cap_and_clears():
    clock = Clock()
    faults = IOFaults(initial=1.0, maximum=3.0, clock=clock)
    e = OSError(errno.EROFS, "Read-only file system", "/out/.x.tmp")
    assert [faults.fail("input:a", "cannot write", e) for _ in range(4)] == [1.0, 2.0, 3.0, 3.0]
    assert not faults.due("input:a") and faults.retry_in("input:a") == 3.0
    clock.now += 3.0
    assert faults.due("input:a") and faults.next_due() == 0.0
    assert faults.active() == {"input:a": "cannot write: Read-only file system: /out/.x.tmp"}
    faults.clear("input:a")
    assert faults.active() == {} and faults.next_due() is None and faults.summary() is None


def test_what_counts_as_a_disk_fault():
    full = sqlite3.OperationalError("database or disk is full")
    assert is_disk_fault(full) and describe(full) == "state database: database or disk is full"
    assert is_disk_fault(OSError(errno.EIO, "Input/output error"))
    assert is_disk_fault(ExceptionGroup("x", [full, OSError(errno.ENOSPC, "full")]))
    assert not is_disk_fault(ExceptionGroup("x", [full, ValueError("bug")]))
    assert not is_disk_fault(FileNotFoundError(errno.ENOENT, "gone"))
    assert not is_disk_fault(sqlite3.OperationalError("no such table: x"))


def test_writable_probes_the_folder(tmp_path):
    assert writable(tmp_path) and list(tmp_path.iterdir()) == []
    assert not writable(tmp_path / "missing")


async def test_status_line_says_what_is_paused(tmp_path):
    cfg = parse_config({"paths": {"root": str(tmp_path)}})
    async with Store.open(cfg.db_path) as store:
        ctx = Context(cfg=cfg, store=store)
        assert await _status_line(ctx) == "queued 0, running 0, done 0, failed 0"
        ctx.io_faults.fail(
            "stage:poll", "poll paused", sqlite3.OperationalError("database or disk is full")
        )
        line = await _status_line(ctx)
    assert line == (
        "paused on a local I/O fault: poll paused: state database: database or disk is full; "
        "queued 0, running 0, done 0, failed 0"
    )
