"""GroupCommit against a real SQLite store: concurrent puts share transactions, none is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from daemon.store import Store
from daemon.store.group_commit import GroupCommit


async def test_concurrent_puts_are_batched_and_all_committed(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.sqlite") as store:
        await store.conn.execute("CREATE TABLE t (v INTEGER)")
        batches: list[int] = []

        async def write(conn: Any, items: list[int]) -> None:
            batches.append(len(items))
            await conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in items])

        gc: GroupCommit[int] = GroupCommit(store, write)

        async def put(i: int) -> None:
            await gc.put([i])
            # committed when put returns, whoever wrote it
            assert await store.scalar("SELECT COUNT(*) FROM t WHERE v = ?", (i,)) == 1

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(put, i)
        assert await store.scalar("SELECT COUNT(*) FROM t") == 50
        assert sum(batches) == 50 and len(batches) < 50


async def test_failed_write_keeps_items_for_the_next_put(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.sqlite") as store:
        await store.conn.execute("CREATE TABLE t (v INTEGER)")
        fail = [True]

        async def write(conn: Any, items: list[int]) -> None:
            await conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in items])
            if fail.pop():
                raise RuntimeError("disk on fire")

        gc: GroupCommit[int] = GroupCommit(store, write)
        with pytest.raises(RuntimeError):
            await gc.put([1])
        assert await store.scalar("SELECT COUNT(*) FROM t") == 0  # rolled back
        fail.append(False)
        await gc.put([2])
        rows = await store.fetchall("SELECT v FROM t ORDER BY v")
        assert [r["v"] for r in rows] == [1, 2]
