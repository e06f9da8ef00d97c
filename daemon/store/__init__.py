"""The store: SQLite through aiosqlite, the single source of truth for every stage.

One connection, opened in autocommit mode; every write goes through :meth:`Store.tx`, which holds an
``anyio.Lock`` and runs ``BEGIN IMMEDIATE … COMMIT`` (aiosqlite shares one transaction between tasks,
so unserialised transactions would interleave). Stages read and write rows as plain dicts.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import orjson

from daemon.states import FINAL_INPUT_STATES, InputState, JobState
from daemon.store.schema import MIGRATIONS

Row = dict[str, Any]


class StoreError(Exception):
    """The database cannot be used (e.g. written by a newer version)."""


def new_input_id() -> str:
    """A short, time-sortable id: milliseconds in hex plus randomness."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)}"


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


class Store:
    """Owns the one SQLite connection. Use ``async with Store.open(path) as store``."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._lock = anyio.Lock()

    # ---- lifecycle -------------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[Store]:
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
            yield store
        finally:
            # Shielded: a close abandoned by cancellation would finish in aiosqlite's thread after
            # the event loop is gone ("Event loop is closed").
            with anyio.CancelScope(shield=True):
                await conn.close()

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
        async with self.conn.execute(sql, tuple(params)) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        async with self.conn.execute(sql, tuple(params)) as cur:
            row = await cur.fetchone()
        return dict(row) if row is not None else None

    async def scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()))

    # ---- inputs -----------------------------------------------------------------------------
    async def add_input(self, conn: aiosqlite.Connection, **fields: Any) -> Row:
        """Insert an input row inside the caller's transaction; records the first history entry."""
        now = time.time()
        fields.setdefault("id", new_input_id())
        fields.setdefault("state", InputState.SEEN.value)
        fields.setdefault("created_at", now)
        fields["updated_at"] = now
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        await conn.execute(
            f"INSERT INTO inputs ({cols}) VALUES ({marks})",
            tuple(_plain(v) for v in fields.values()),
        )
        await self.add_history(conn, fields["id"], fields["state"], None, at=now)
        return fields

    async def add_history(
        self,
        conn: aiosqlite.Connection,
        input_id: str,
        state: str,
        note: str | None,
        *,
        at: float | None = None,
    ) -> None:
        await conn.execute(
            "INSERT INTO history (input_id, at, state, note) VALUES (?, ?, ?, ?)",
            (input_id, at or time.time(), str(state), note),
        )

    async def set_input_state(
        self,
        conn: aiosqlite.Connection,
        input_id: str,
        state: InputState,
        *,
        note: str | None = None,
        **fields: Any,
    ) -> None:
        """Move an input to ``state`` (inside the caller's transaction), with a history entry
        when the state changes. Extra ``fields`` are written in the same statement."""
        now = time.time()
        old = await self._state_of(conn, input_id)
        fields["state"] = state.value
        fields["updated_at"] = now
        if state in FINAL_INPUT_STATES and "finished_at" not in fields:
            fields["finished_at"] = now
        await self._update(conn, "inputs", "id", input_id, fields)
        if old != state.value:
            await self.add_history(conn, input_id, state.value, note, at=now)

    async def _state_of(self, conn: aiosqlite.Connection, input_id: str) -> str | None:
        async with conn.execute("SELECT state FROM inputs WHERE id = ?", (input_id,)) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def update_input(self, conn: aiosqlite.Connection, input_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        await self._update(conn, "inputs", "id", input_id, fields)

    async def get_input(self, input_id: str) -> Row | None:
        return await self.fetchone("SELECT * FROM inputs WHERE id = ?", (input_id,))

    async def find_input(self, ref: str) -> Row | None:
        """An input by id, or by its path relative to the inbox (its latest drop)."""
        row = await self.get_input(ref)
        if row is None:
            row = await self.fetchone(
                "SELECT * FROM inputs WHERE rel_path = ? ORDER BY created_at DESC, id DESC LIMIT 1",
                (ref.strip("/"),),
            )
        return row

    async def inputs_in(self, *states: InputState) -> list[Row]:
        marks = ", ".join("?" for _ in states)
        return await self.fetchall(
            f"SELECT * FROM inputs WHERE state IN ({marks}) ORDER BY created_at, id",
            [s.value for s in states],
        )

    async def list_inputs(self, state: str | None = None, limit: int = 100) -> list[Row]:
        if state:
            return await self.fetchall(
                "SELECT * FROM inputs WHERE state = ? ORDER BY created_at DESC, id DESC LIMIT ?",
                (state, limit),
            )
        return await self.fetchall(
            "SELECT * FROM inputs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,)
        )

    async def counts_by_state(self) -> dict[str, int]:
        rows = await self.fetchall("SELECT state, COUNT(*) AS n FROM inputs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    async def history(self, input_id: str) -> list[Row]:
        return await self.fetchall(
            "SELECT at, state, note FROM history WHERE input_id = ? ORDER BY id", (input_id,)
        )

    # ---- parts and jobs ---------------------------------------------------------------------
    async def add_part(self, conn: aiosqlite.Connection, **fields: Any) -> None:
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        await conn.execute(
            f"INSERT INTO parts ({cols}) VALUES ({marks})",
            tuple(_plain(v) for v in fields.values()),
        )

    async def add_job(self, conn: aiosqlite.Connection, **fields: Any) -> int:
        """Insert a job row (state ``planned`` unless given); returns its id."""
        now = time.time()
        fields.setdefault("state", JobState.PLANNED.value)
        fields.setdefault("created_at", now)
        fields["updated_at"] = now
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        cur = await conn.execute(
            f"INSERT INTO jobs ({cols}) VALUES ({marks})", tuple(_plain(v) for v in fields.values())
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def update_job(self, conn: aiosqlite.Connection, job_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        await self._update(conn, "jobs", "id", job_id, fields)

    async def get_job(self, job_id: int) -> Row | None:
        return await self.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))

    async def parts_of(self, input_id: str) -> list[Row]:
        return await self.fetchall(
            "SELECT * FROM parts WHERE input_id = ? ORDER BY part_no", (input_id,)
        )

    async def add_job_attempt(
        self, conn: aiosqlite.Connection, first: Row, attempt: int, display_name: str
    ) -> int:
        """A ``planned`` row for a later ``attempt`` of ``first``'s part (recovery: one that
        exists remotely and is adopted at once); returns its id."""
        now = time.time()
        cur = await conn.execute(
            "INSERT INTO jobs (input_id, part_no, attempt, display_name, state, mode, source_path, "
            "source_start, source_end, request_count, est_tokens, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, 'planned', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *(first["input_id"], first["part_no"], attempt, display_name, first["mode"]),
                *(first["source_path"], first["source_start"], first["source_end"]),
                *(first["request_count"], first["est_tokens"], now, now),
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def jobs_of(self, input_id: str) -> list[Row]:
        return await self.fetchall(
            "SELECT * FROM jobs WHERE input_id = ? ORDER BY part_no, attempt", (input_id,)
        )

    async def jobs_in(self, *states: JobState) -> list[Row]:
        marks = ", ".join("?" for _ in states)
        return await self.fetchall(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", [s.value for s in states]
        )

    # ---- media cache ------------------------------------------------------------------------
    async def get_media(self, sha256: str) -> Row | None:
        return await self.fetchone("SELECT * FROM media WHERE sha256 = ?", (sha256,))

    async def put_media(self, **fields: Any) -> None:
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        async with self.tx() as conn:
            await conn.execute(
                f"INSERT OR REPLACE INTO media ({cols}) VALUES ({marks})",
                tuple(_plain(v) for v in fields.values()),
            )

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


def _plain(value: Any) -> Any:
    """Enums to their values, paths to text, dicts/lists to JSON."""
    if isinstance(value, InputState | JobState):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict | list):
        return dumps(value)
    return value
