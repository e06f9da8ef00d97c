"""The store's base: SQLite through aiosqlite, the single source of truth for every stage.

Two connections. Writes go through :meth:`Store.tx` on the writer connection, which holds an
``anyio.Lock`` and runs ``BEGIN IMMEDIATE … COMMIT`` (aiosqlite shares one transaction between tasks,
so unserialised transactions would interleave). Reads go through a second, read-only connection: in WAL
mode it sees only committed state, so a task never acts on another task's uncommitted (perhaps later
rolled back) rows. The task inside a transaction reads through the writer, and so sees its own writes.
Stages read and write rows as plain dicts.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import aiosqlite
import anyio
import orjson

from daemon.states import InputState, JobState
from daemon.store.schema import MIGRATIONS

Row = dict[str, Any]
MediaId = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns of a media file


class StoreError(Exception):
    """The database cannot be used (e.g. written by a newer version)."""


def new_input_id() -> str:
    """A short, time-sortable id: milliseconds in hex plus randomness."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)}"


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


class StoreBase:
    """The connections, transactions, migrations and generic reads; the row methods are in
    :mod:`.inputs`, :mod:`.jobs`, :mod:`.media` and :mod:`.stats`, composed into ``Store``."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._lock = anyio.Lock()
        self._reader: aiosqlite.Connection | None = None
        self._tx_task: int | None = None  # the task inside tx(), which reads through the writer

    # ---- lifecycle -------------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[Self]:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None, timeout=5.0)
        try:
            conn.row_factory = sqlite3.Row
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=FULL",  # a lost commit after a create could mean paying twice
                "PRAGMA foreign_keys=ON",
                "PRAGMA busy_timeout=5000",
            ):
                await conn.execute(pragma)
            store = cls(conn, path)
            await store._migrate()
            async with store._open_reader():
                yield store
        finally:
            # Shielded: a close abandoned by cancellation would finish in aiosqlite's thread after
            # the event loop is gone ("Event loop is closed").
            with anyio.CancelScope(shield=True):
                await conn.close()

    @asynccontextmanager
    async def _open_reader(self) -> AsyncIterator[None]:
        reader = await aiosqlite.connect(
            f"file:{quote(str(self.path))}?mode=ro", uri=True, isolation_level=None, timeout=5.0
        )
        try:
            reader.row_factory = sqlite3.Row
            await reader.execute("PRAGMA busy_timeout=5000")
            await reader.execute("PRAGMA query_only=ON")
            self._reader = reader
            yield
        finally:
            self._reader = None
            with anyio.CancelScope(shield=True):
                await reader.close()

    def _read_conn(self) -> aiosqlite.Connection:
        """The reader, except for the task inside :meth:`tx` (it must see its own writes)."""
        if self._reader is None or self._tx_task == _task_id():
            return self.conn
        return self._reader

    async def _migrate(self) -> None:
        (version,) = await self._one_value("PRAGMA user_version")
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this gemini-batchd knows "
                f"({len(MIGRATIONS)}); upgrade gemini-batchd"
            )
        for number in range(version + 1, len(MIGRATIONS) + 1):
            async with self.tx() as conn:
                for statement in MIGRATIONS[number - 1]:
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {number}")

    async def _one_value(self, sql: str, params: Iterable[Any] = ()) -> tuple[Any, ...]:
        async with self.conn.execute(sql, tuple(params)) as cur:
            row = await cur.fetchone()
        assert row is not None
        return tuple(row)

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction (BEGIN IMMEDIATE … COMMIT), serialised across tasks."""
        async with self._lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            self._tx_task = _task_id()
            try:
                yield self.conn
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._rollback()
                raise
            else:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.conn.execute("COMMIT")
                    except sqlite3.Error:  # e.g. a full disk: the transaction may still be open
                        await self._rollback()
                        raise
            finally:
                self._tx_task = None

    async def _rollback(self) -> None:
        """Roll back if a transaction is open; SQLite may have done it itself (a full disk),
        and a failing ROLLBACK must not hide the error that caused it."""
        if self.conn.in_transaction:
            try:
                await self.conn.execute("ROLLBACK")
            except sqlite3.OperationalError:
                pass

    # ---- generic reads ----------------------------------------------------------------------
    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        async with self._read_conn().execute(sql, tuple(params)) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def _typed(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """:meth:`fetchall` for a method that states its row type (``rows.py``): the query's
        columns are that type's keys."""
        return await self.fetchall(sql, params)

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        async with self._read_conn().execute(sql, tuple(params)) as cur:
            row = await cur.fetchone()
        return dict(row) if row is not None else None

    async def scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()))

    # ---- helpers ----------------------------------------------------------------------------
    @staticmethod
    async def _update(
        conn: aiosqlite.Connection, table: str, key: str, value: Any, fields: Mapping[str, Any]
    ) -> None:
        if not fields:
            return
        sets = ", ".join(f"{c} = ?" for c in fields)
        await conn.execute(
            f"UPDATE {table} SET {sets} WHERE {key} = ?",
            (*[_plain(v) for v in fields.values()], value),
        )


def _task_id() -> int:
    return anyio.get_current_task().id


def _plain(value: Any) -> Any:
    """Enums to their values, paths to text, dicts/lists to JSON."""
    if isinstance(value, InputState | JobState):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict | list):
        return dumps(value)
    return value
